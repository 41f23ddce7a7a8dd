"""Head to head: slimlm's search against the one-shot pruning methods users would pick instead.

For each kept fraction, every method runs on the same model, calibration text and budget; its model
is extracted to disk and loaded back as a user would, then measured identically: parameters,
perplexity on Austen prose and on Python documentation, slimlm's offline cloze accuracy, prefill
time and decode rate measured side by side with the dense model in one interleaved loop, peak
process memory, and the wall time of the method itself. Writes ``compare.md``, ``compare.json`` and
``compare.png`` to benchmarks/results/.

    python benchmarks/compare.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from slimlm.costs import compare_speed, peak_memory, static_cost
from slimlm.data import DEFAULT_CALIBRATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.extract import extract
from slimlm.importance import cached_calibration
from slimlm.models import load_model
from slimlm.prune import METHODS, PruneInput, params_budget, prune
from slimlm.report import write_report
from slimlm.search import SearchJob, search
from slimlm.space import SearchSpace
from slimlm.tasks import LASTWORD, build_task, evaluate_task

RESULTS = Path(__file__).parent / "results"
TEXTS = {"austen": "austen:prideprejudice", "pydoc": "pydoc"}
SLIMLM = "slimlm"
DEFAULTS = SearchJob(model="", out="")  # slimlm's own defaults, as `slimlm compress` runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fractions", default="0.9,0.8,0.7,0.5")
    parser.add_argument("--methods", default=",".join([*METHODS, SLIMLM]))
    parser.add_argument("--evaluations", type=int, default=DEFAULTS.evaluations, help="candidates per slimlm search")
    parser.add_argument("--no-depth", action="store_true", help="slimlm may not remove sub-blocks or layers")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=DEFAULTS.calibration_windows)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--cloze-examples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per model (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:])

    start = time.perf_counter()
    dense = load_model(args.model)
    total = static_cost(dense.dims).params
    calib = model_windows(dense, DEFAULT_CALIBRATION, args.seq_len, args.calib_windows)
    calibration = cached_calibration(dense, calib, DEFAULT_CALIBRATION)
    texts = {name: model_windows(dense, spec, args.seq_len, args.eval_windows) for name, spec in TEXTS.items()}
    cloze = build_task(LASTWORD, TEXTS["austen"], dense.tokenizer, examples=args.cloze_examples)
    methods = args.methods.split(",")
    rows = [measure_quality("dense", 1.0, dense, total, texts, cloze, 0.0)]
    rows[0]["fraction"] = 1.0
    with tempfile.TemporaryDirectory() as scratch:
        for fraction in map(float, args.fractions.split(",")):
            budget = params_budget(dense.dims, fraction)
            folders = {}
            for method in methods:
                folder, seconds, extra = run_method(method, fraction, budget, dense, calib, calibration, scratch, args)
                small = load_model(folder)  # from disk, as a user would
                row = measure_quality(method, fraction, small, total, texts, cloze, seconds) | extra
                row["peak_memory_bytes"] = peak_memory(str(folder))
                rows.append(row)
                folders[method] = small
                print(json.dumps(row), flush=True)
            # every model of this fraction and the dense one, timed in one interleaved loop
            latencies = compare_speed([dense.model, *(m.model for m in folders.values())], repeats=args.repeats)
            for row, latency in zip(rows[-len(methods) :], latencies[1:], strict=True):
                row["prefill_speedup"] = latencies[0].prefill_ms / latency.prefill_ms
                row["decode_speedup"] = latency.decode_tokens_per_s / latencies[0].decode_tokens_per_s
                row["decode_tokens_per_s"] = latency.decode_tokens_per_s
            del folders
    rows[0]["peak_memory_bytes"] = peak_memory(args.model)
    minutes = (time.perf_counter() - start) / 60
    write_results(args, rows, command, minutes)


def run_method(method, fraction, budget, dense, calib, calibration, scratch, args) -> tuple[Path, float, dict]:
    """Run one method at one budget; return its extracted model folder, its own wall time and what its
    report adds (slimlm: the best start against the winner, and how well fitness ranked)."""
    folder = Path(scratch) / f"{method}-{fraction}"
    start = time.perf_counter()
    if method == SLIMLM:  # the default compress job: evolution search, then reformation of the best
        job = SearchJob(
            model=args.model,
            out=str(folder),
            params_fraction=fraction,
            evaluations=args.evaluations,
            seq_len=args.seq_len,
            calibration_windows=args.calib_windows,
            evaluation_windows=args.eval_windows,
            space=SearchSpace(depth=not args.no_depth),
        )
        searcher, study = search(job, dense)
        searched = time.perf_counter() - start
        report = write_report(searcher, study)
        extra = {
            "search_seconds": searched,
            "phase_seconds": dict(searcher.seconds),  # calibration, library, search, front, finalists, extraction
            "best_start_ppl_austen": (report.get("best_start") or {}).get("evaluation_perplexity"),
            "search_gain": report.get("search_gain"),
            "spearman": report["fitness_evaluation_spearman"],
            "reformation": report.get("best_reformation"),
            "refinement": report.get("refinement"),
        }
        return folder / "best", time.perf_counter() - start, extra
    pruned = prune(method, PruneInput(dense, calibration, calib, budget))
    extract(dense, pruned.subnet, folder, pruned.reformed)
    return folder, time.perf_counter() - start, {}


def measure_quality(method, fraction, loaded, total, texts, cloze, seconds) -> dict:
    row = {"method": method, "fraction": fraction, "params": static_cost(loaded.dims).params, "seconds": seconds}
    row["params_fraction"] = row["params"] / total
    for name, ids in texts.items():
        row[f"ppl_{name}"] = perplexity(loaded.model, ids, description=f"{method} {fraction}: perplexity ({name})")
    result = evaluate_task(loaded.model, cloze, description=f"{method} {fraction}: cloze")
    row["cloze_accuracy"] = result.accuracy
    return row


def write_results(args, rows: list[dict], command: str, minutes: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    dense = rows[0]
    lines = [
        f"`{command}` ({minutes:.0f} min on {platform.machine()}, 2 cores).",
        "",
        f"Model `{args.model}`; calibration `{DEFAULT_CALIBRATION}` ({args.calib_windows} windows of {args.seq_len} "
        f"tokens); perplexity on {args.eval_windows} windows of {args.seq_len} tokens of `{TEXTS['austen']}` and "
        f"`{TEXTS['pydoc']}`; cloze: slimlm's own offline last-word task ({LASTWORD}, "
        f"{args.cloze_examples} passages of `{TEXTS['austen']}`). Speed-ups against dense measured side by side in "
        f"one run per kept fraction (prefill 128 tokens; greedy decode under transformers `generate`). "
        f"`{SLIMLM}`: `slimlm compress` with its defaults ({args.evaluations} candidates, multi-fidelity "
        f"evolution on the reformed variant library, KL fitness). "
        f"Time: the method's own wall time, calibration statistics cached; slimlm's split below (library: "
        f"building the variant library; search: scoring the {args.evaluations} candidates; finalists: their "
        f"sequential reformation and the choice on selection windows; refinement: the winner's layer-wise "
        f"refinement, shipped where it lowers selection perplexity).",
        "",
        "| kept | method | params | ppl austen | ppl pydoc | cloze acc | prefill x | decode x | peak MB | time s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| 1.0 | dense | {dense['params'] / 1e6:.1f}M | {dense['ppl_austen']:.2f} | {dense['ppl_pydoc']:.2f} | "
        f"{dense['cloze_accuracy']:.3f} | 1.00 | 1.00 | {dense['peak_memory_bytes'] / 1e6:.0f} | - |",
    ]
    for r in rows[1:]:
        best = {
            key: min(x[key] for x in rows[1:] if x["fraction"] == r["fraction"]) for key in ("ppl_austen", "ppl_pydoc")
        }
        ppl = [f"**{r[k]:.2f}**" if r[k] == best[k] else f"{r[k]:.2f}" for k in ("ppl_austen", "ppl_pydoc")]
        lines.append(
            f"| {r['fraction']} | {r['method']} | {r['params'] / 1e6:.1f}M ({r['params_fraction']:.3f}) | "
            f"{ppl[0]} | {ppl[1]} | {r['cloze_accuracy']:.3f} | {r['prefill_speedup']:.2f} | "
            f"{r['decode_speedup']:.2f} | {r['peak_memory_bytes'] / 1e6:.0f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "slimlm's search against its best start (the rules it starts from, reformed) on `austen`, and the rank",
        "correlation of its fitness with evaluation perplexity over the measured last-stage candidates:",
        "",
        "| kept | best start | winner | search gain | spearman | reformation | refinement (selection ppl) "
        "| library s | search s | finalists s | refinement s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows[1:] if r["method"] == SLIMLM):
        start, gain, rho = r.get("best_start_ppl_austen"), r.get("search_gain"), r.get("spearman")
        lines.append(
            f"| {r['fraction']} | {start:.2f} | {r['ppl_austen']:.2f} | {100 * gain:+.1f}% | "
            f"{'-' if rho is None else f'{rho:.2f}'} | {r['reformation']} | {_refinement(r)} | "
            f"{_seconds(r, 'library')} | {_seconds(r, 'search')} | {_seconds(r, 'finalists')} | "
            f"{_seconds(r, 'refinement')} |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / "compare.md").write_text(text)
    print(text)
    plot(rows, args.out / "compare.png")


def _refinement(row: dict) -> str:
    """The winner's selection perplexity before and after refinement, and whether the refined one shipped."""
    refined = row.get("refinement")
    if not refined or "skipped" in refined:
        return "-"
    selection, shipped = refined["selection_perplexity"], "shipped" if refined["kept"] else "not kept"
    return f"{selection['unrefined']:.2f} -> {selection['refined']:.2f} ({shipped})"


def _seconds(row: dict, phase: str) -> str:
    value = row.get("phase_seconds", {}).get(phase)
    return "-" if value is None else f"{value:.0f}"


def plot(rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = rows[0]
    for axis, (name, spec) in zip(axes, TEXTS.items(), strict=True):
        key = f"ppl_{name}"
        for method in dict.fromkeys(r["method"] for r in rows[1:]):
            points = sorted((r["params_fraction"], r[key]) for r in rows[1:] if r["method"] == method)
            style = {"linewidth": 2.5, "color": "black"} if method == SLIMLM else {}
            axis.plot(*zip(*points, strict=True), marker="o", label=method, **style)
        axis.scatter([1.0], [dense[key]], marker="*", s=150, color="gold", edgecolor="black", zorder=5, label="dense")
        axis.set_yscale("log")
        axis.set_xlabel("kept fraction of parameters")
        axis.set_ylabel(f"perplexity ({spec})")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("slimlm vs one-shot structured pruning (lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
