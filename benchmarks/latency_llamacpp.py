"""slimlm against ShortGPT where users deploy small models: decode speed in llama.cpp at one size.

ShortGPT removes whole layers, the shape llama.cpp runs fastest per parameter. slimlm searches with
`--objective latency --latency-runtime llama.cpp --min-speedup X`: every candidate is priced by
slimlm's latency model, fitted on sub-networks timed in llama.cpp beside the dense model (ms per
generated token after a `--seq-len` prompt), and only those predicted at least X times as fast as
the dense model are kept, where X is ShortGPT's speed-up timed by that same probe here, beside the
dense model (a speed-up, not milliseconds: the machine's speed drifts between the probe and the
search). Then dense, ShortGPT and
slimlm's winner (and slimlm's default winner, searched on parameters alone) are exported to f16 GGUF
files and timed side by side in llama.cpp (prompt and generation tokens/s, medians of interleaved
rounds), and measured on Austen prose and Python docs that no calibration, fitness or selection
window came from. Writes ``latency_llamacpp.md`` and ``.json`` to benchmarks/results/.

    python benchmarks/latency_llamacpp.py --model smollm2-135m --fraction 0.7
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from slimlm import llamacpp
from slimlm.costs import static_cost
from slimlm.data import DEFAULT_CALIBRATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.export import export_gguf
from slimlm.extract import extract
from slimlm.importance import cached_calibration
from slimlm.latency import DECODE_TOKENS, scratch_tokenizer_pre
from slimlm.models import load_model
from slimlm.prune import PruneInput, params_budget, prune
from slimlm.report import write_report
from slimlm.search import SearchJob, search

RESULTS = Path(__file__).parent / "results"
TEXTS = {"austen": "austen:prideprejudice", "pydoc": "pydoc"}
DEFAULTS = SearchJob(model="", out="")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fraction", type=float, default=0.7)
    parser.add_argument("--evaluations", type=int, default=DEFAULTS.evaluations, help="candidates per search")
    parser.add_argument("--no-plain", action="store_true", help="skip slimlm's default (parameters-only) search")
    parser.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="latency_llamacpp")
    args = parser.parse_args(argv)
    llamacpp.require()
    start = time.perf_counter()
    dense = load_model(args.model)
    total = static_cost(dense.dims).params
    texts = {name: model_windows(dense, spec, args.seq_len, args.eval_windows) for name, spec in TEXTS.items()}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folders = {"dense": dense.folder, "shortgpt": _shortgpt(dense, args, scratch)}
        files = {name: _gguf(load_model(folder), scratch / f"{name}.gguf") for name, folder in folders.items()}
        # the search's own probe (DECODE_TOKENS after a --seq-len prompt), 9 rounds, ShortGPT beside dense
        probe = llamacpp.compare_speed([files["dense"], files["shortgpt"]], args.seq_len, DECODE_TOKENS, 9)
        limit = probe[1].generation_tokens_per_s / probe[0].generation_tokens_per_s
        latency = {"objective": "latency", "latency_runtime": "llama.cpp", "min_speedup": limit}
        searches = {"slimlm-latency": latency}
        if not args.no_plain:
            searches["slimlm"] = {}
        reports = {}
        for name, settings in searches.items():
            folders[name], reports[name] = _slimlm(args, dense, scratch / name, **settings)
            files[name] = _gguf(load_model(folders[name]), scratch / f"{name}.gguf")
        speeds = llamacpp.compare_speed(list(files.values()), args.prompt_tokens, args.new_tokens, args.repeats)
        for (name, folder), speed in zip(folders.items(), speeds, strict=True):
            loaded = load_model(folder)
            row = {"method": name, "params_fraction": static_cost(loaded.dims).params / total}
            row |= {f"ppl_{text}": perplexity(loaded.model, ids) for text, ids in texts.items()}
            row |= {"layers": loaded.dims.num_layers, "gguf_mb": files[name].stat().st_size / 1e6}
            row |= {"prompt_tokens_per_s": speed.prompt_tokens_per_s, "gen_tokens_per_s": speed.generation_tokens_per_s}
            row["gen_speedup"] = speed.generation_tokens_per_s / speeds[0].generation_tokens_per_s
            row["prompt_speedup"] = speed.prompt_tokens_per_s / speeds[0].prompt_tokens_per_s
            row |= {k: reports.get(name, {}).get(k) for k in ("search_gain", "best_trial", "search_seconds")}
            row |= {k: reports.get(name, {}).get(k) for k in ("predicted_speedup", "latency_model_error")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "command": "python benchmarks/latency_llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "fraction": args.fraction,
        "shortgpt_probe_speedup": limit,
        "minutes": (time.perf_counter() - start) / 60,
        "rows": rows,
    }
    _write(args, result)
    return result


def _shortgpt(dense, args, scratch: Path) -> Path:
    calib = model_windows(dense, DEFAULT_CALIBRATION, args.seq_len, DEFAULTS.calibration_windows)
    calibration = cached_calibration(dense, calib, DEFAULT_CALIBRATION)
    pruned = prune("shortgpt", PruneInput(dense, calibration, calib, params_budget(dense.dims, args.fraction)))
    return extract(dense, pruned.subnet, scratch / "shortgpt", pruned.reformed).folder


def _slimlm(args, dense, out: Path, **settings) -> tuple[Path, dict]:
    job = SearchJob(
        model=args.model,
        out=str(out),
        params_fraction=args.fraction,
        evaluations=args.evaluations,
        seq_len=args.seq_len,
        evaluation_windows=args.eval_windows,
        **settings,
    )
    start = time.perf_counter()
    searcher, study = search(job, dense)
    searched = time.perf_counter() - start
    report = write_report(searcher, study)
    extra = {"search_seconds": searched}
    if searcher.latency:  # the winner's speed-up as the search priced it, and the model's error on its checks
        winner = next(m for m in report["finalists"] if m["trial"] == report["best_trial"])
        extra["predicted_speedup"] = report["dense"]["predicted_latency_ms"] / winner["predicted_latency_ms"]
        extra["latency_model_error"] = report["latency_model"]["mean_abs_check_error"]
    return out / "best", report | extra


def _gguf(loaded, path: Path) -> Path:
    return export_gguf(loaded, path, "f16", scratch_tokenizer_pre(loaded)).path


def _write(args, result: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Decode speed in llama.cpp at {args.fraction} of the parameters",
        "",
        f"`{result['command']}` ({result['minutes']:.0f} min). ShortGPT's model, timed by the search's own probe "
        f"beside the dense model: {result['shortgpt_probe_speedup']:.3f}x; `slimlm-latency` searched with that as "
        "`--min-speedup`. f16 GGUF files timed side by side in llama.cpp "
        f"({args.prompt_tokens}-token prompt, {args.new_tokens} generated, median of {args.repeats} rounds).",
        "",
        "| method | kept | layers | GGUF MB | gen tok/s | gen speed-up | predicted gen speed-up | prompt speed-up"
        " | ppl austen | ppl pydoc | search s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        predicted = f"{r['predicted_speedup']:.2f}x" if r.get("predicted_speedup") else ""
        searched = f"{r['search_seconds']:.0f}" if r.get("search_seconds") else ""
        lines.append(
            f"| {r['method']} | {r['params_fraction']:.3f} | {r['layers']} | {r['gguf_mb']:.1f} | "
            f"{r['gen_tokens_per_s']:.1f} | {r['gen_speedup']:.2f}x | {predicted} | {r['prompt_speedup']:.2f}x | "
            f"{r['ppl_austen']:.2f} | {r['ppl_pydoc']:.2f} | {searched} |"
        )
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
