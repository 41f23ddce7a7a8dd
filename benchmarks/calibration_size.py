"""How many calibration tokens reformation needs, and which damping: quality and time.

For each kept fraction, the sub-network the search starts from (FLAP's per-layer allocation at the
budget, snapped to slimlm's grid, units ranked by the default importance on the default 32
calibration windows) is reformed sequentially from N calibration windows of the default
calibration text, for several N and dampings. Each reformed model is scored on held windows of the
calibration source that no calibration size used (what chooses defaults) and, for the record, on
the evaluation texts (never used to choose). Writes ``results/calibration_size.{md,json}``.

    python benchmarks/calibration_size.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slimlm.apply import subnetwork_applied
from slimlm.costs import static_cost
from slimlm.data import DEFAULT_CALIBRATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.importance import cached_calibration, importance
from slimlm.models import load_model
from slimlm.prune import flap_shapes, params_budget
from slimlm.reform import reform
from slimlm.space import SearchSpace

RESULTS = Path(__file__).parent / "results"
TEXTS = {"austen": "austen:prideprejudice", "pydoc": "pydoc"}
DEFAULT_WINDOWS = 32  # what importance and the start use, as `slimlm compress` does


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fractions", default="0.9,0.7")
    parser.add_argument("--windows", default="16,32,128,512", help="calibration windows to reform from")
    parser.add_argument("--dampings", default="0.01", help="dampings tried at every size")
    parser.add_argument("--extra-dampings", default="0.003,0.03", help="also tried at --extra-at windows")
    parser.add_argument("--extra-at", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--held-windows", type=int, default=24)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    command = "python benchmarks/calibration_size.py " + " ".join(sys.argv[1:])
    sizes = [int(n) for n in args.windows.split(",")]

    dense = load_model(args.model)
    pool = model_windows(dense, DEFAULT_CALIBRATION, args.seq_len, max(sizes) + args.held_windows)
    if len(pool) < max(sizes) + args.held_windows:
        raise SystemExit(f"{DEFAULT_CALIBRATION} has only {len(pool)} windows of {args.seq_len} tokens")
    held = pool[-args.held_windows :]  # after every calibration size: none of them saw these
    texts = {"held": held} | {n: model_windows(dense, s, args.seq_len, args.eval_windows) for n, s in TEXTS.items()}
    calibration = cached_calibration(dense, pool[:DEFAULT_WINDOWS], DEFAULT_CALIBRATION)
    scores = importance(dense, calibration)
    dims, space = dense.dims, SearchSpace()
    rows = [{"fraction": 1.0, "windows": 0, "damping": None} | score(dense.model, texts)]
    for fraction in map(float, args.fractions.split(",")):
        budget = params_budget(dims, fraction)

        def within(shapes, budget=budget) -> bool:
            return static_cost(dims, shapes, context=args.seq_len).params <= budget

        start = space.starts(dims, scores, within, flap_shapes(dense, calibration, budget))[0]
        with subnetwork_applied(dense, start) as model:
            rows.append({"fraction": fraction, "windows": 0, "damping": None} | score(model, texts))
        settings = [(n, float(d)) for n in sizes for d in args.dampings.split(",")]
        settings += [(args.extra_at, float(d)) for d in args.extra_dampings.split(",") if args.extra_at in sizes]
        for windows, damping in settings:
            begin = time.perf_counter()
            weights = reform(dense, start, pool[:windows], damping=damping)
            seconds = time.perf_counter() - begin
            with subnetwork_applied(dense, start, weights) as model:
                row = {"fraction": fraction, "windows": windows, "damping": damping, "reform_seconds": seconds}
                rows.append(row | score(model, texts))
            print(json.dumps(rows[-1]), flush=True)
    write(args, rows, command)


def score(model, texts: dict) -> dict:
    return {f"ppl_{name}": perplexity(model, windows) for name, windows in texts.items()}


def write(args, rows: list[dict], command: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_size.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Calibration size and damping for reformation",
        "",
        f"`{command}`",
        "",
        f"Start sub-network of `slimlm compress` at each fraction, reformed sequentially from N windows of "
        f"{args.seq_len} tokens of `{DEFAULT_CALIBRATION}`. *held*: {args.held_windows} later windows of the same "
        "source that no calibration size used (what defaults are chosen on); austen and pydoc: evaluation "
        "texts, reported only. Reform time on this machine (2 cores). N = 0: not reformed.",
        "",
        "| fraction | windows (tokens) | damping | reform s | held | austen | pydoc |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tokens = f"{r['windows']} ({r['windows'] * args.seq_len // 1000}k)" if r["windows"] else "-"
        seconds = f"{r['reform_seconds']:.0f}" if "reform_seconds" in r else "-"
        damping = f"{r['damping']:g}" if r["damping"] is not None else "-"
        lines.append(
            f"| {r['fraction']:g} | {tokens} | {damping} | {seconds} | {r['ppl_held']:.2f} "
            f"| {r['ppl_austen']:.2f} | {r['ppl_pydoc']:.2f} |"
        )
    (args.out / "calibration_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
