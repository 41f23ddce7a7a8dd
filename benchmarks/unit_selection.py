"""Which units to keep: importance metrics compared on the reformed model they lead to.

For each kept fraction, every metric ranks the units of the same per-layer shapes (FLAP's
allocation at the budget, snapped to slimlm's grid: the search's first start); the kept units are
reformed sequentially from the default calibration windows, as `slimlm compress` ships them. Each
model is scored on held windows of the calibration source that neither importance nor reformation
saw (what chooses the default metric) and, for the record only, on the evaluation texts. Also
reported unreformed, to show how much of a metric's merit appears only after reformation. Writes
``results/unit_selection.{md,json}``.

    python benchmarks/unit_selection.py --model smollm2-135m
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
from slimlm.search import SearchJob
from slimlm.space import SearchSpace, keep_most_important

RESULTS = Path(__file__).parent / "results"
TEXTS = {"austen": "austen:prideprejudice", "pydoc": "pydoc"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fractions", default="0.9,0.8,0.7")
    parser.add_argument("--metrics", default="activation,reconstruction")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--held-windows", type=int, default=24)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    command = "python benchmarks/unit_selection.py " + " ".join(sys.argv[1:])
    calib_windows = SearchJob.calibration_windows

    dense = load_model(args.model)
    pool = model_windows(dense, DEFAULT_CALIBRATION, args.seq_len, calib_windows + args.held_windows)
    if len(pool) < calib_windows + args.held_windows:
        raise SystemExit(f"{DEFAULT_CALIBRATION} has only {len(pool)} windows of {args.seq_len} tokens")
    calib, held = pool[:calib_windows], pool[-args.held_windows :]
    texts = {"held": held} | {n: model_windows(dense, s, args.seq_len, args.eval_windows) for n, s in TEXTS.items()}
    begin = time.perf_counter()
    calibration = cached_calibration(dense, calib, DEFAULT_CALIBRATION)
    print(f"calibration (or its cache) {time.perf_counter() - begin:.0f} s", flush=True)
    dims, space = dense.dims, SearchSpace()
    rows = [{"fraction": 1.0, "metric": "-"} | score(dense.model, texts, "reformed")]
    for fraction in map(float, args.fractions.split(",")):
        budget = params_budget(dims, fraction)

        def within(shapes, budget=budget) -> bool:
            return static_cost(dims, shapes, context=args.seq_len).params <= budget

        allocation = flap_shapes(dense, calibration, budget)
        shapes = None
        for metric in args.metrics.split(","):
            scores = importance(dense, calibration, metric)
            start = space.starts(dims, scores, within, allocation)[0]
            shapes = shapes or {i: k.shape for i, k in start.layers.items()}
            subnet = keep_most_important(dims, scores, shapes)  # every metric on the same shapes
            row = {"fraction": fraction, "metric": metric}
            with subnetwork_applied(dense, subnet) as model:
                row |= score(model, texts, "unreformed")
            begin = time.perf_counter()
            weights = reform(dense, subnet, calib)
            row["reform_seconds"] = time.perf_counter() - begin
            with subnetwork_applied(dense, subnet, weights) as model:
                row |= score(model, texts, "reformed")
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(args, rows, command, calib_windows)


def score(model, texts: dict, label: str) -> dict:
    return {f"{label}_{name}": perplexity(model, windows) for name, windows in texts.items()}


def write(args, rows: list[dict], command: str, calib_windows: int) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unit_selection.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Which units to keep: importance metrics judged after reformation",
        "",
        f"`{command}`",
        "",
        f"Per fraction, the same per-layer shapes (FLAP's allocation, snapped to the grid); each metric picks "
        f"the kept units, reformed sequentially from {calib_windows} windows of {args.seq_len} tokens of "
        f"`{DEFAULT_CALIBRATION}`. *held*: {args.held_windows} later windows of that source, which neither "
        "importance nor reformation saw (what chooses the default); austen and pydoc: evaluation texts, "
        "reported only. Perplexity; lower is better.",
        "",
        "| fraction | metric | held unreformed | held | austen | pydoc | reform s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        unreformed = f"{r['unreformed_held']:.2f}" if "unreformed_held" in r else "-"
        seconds = f"{r['reform_seconds']:.0f}" if "reform_seconds" in r else "-"
        lines.append(
            f"| {r['fraction']:g} | {r['metric']} | {unreformed} | {r['reformed_held']:.2f} "
            f"| {r['reformed_austen']:.2f} | {r['reformed_pydoc']:.2f} | {seconds} |"
        )
    (args.out / "unit_selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
