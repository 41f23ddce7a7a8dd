"""Pruned and quantized in llama.cpp: slimlm's models at several kept fractions, each in several GGUF types.

For each kept fraction, slimlm's default compress job runs once (its model is kept under
``--runs``, so a second run of this script reuses it); the dense model and every compressed one
are exported in each type. Per file: size on disk, perplexity computed in llama.cpp, and prompt
and generation tokens/s timed in llama.cpp side by side with the dense file of the same type (one
interleaved loop per type). The ideal generation speed-up is the dense file's size over the
file's (decoding reads every weight once per token); the goal is at least 0.9 of it, and q8_0 on
top of pruning losing under 2% perplexity against f16. Needs the ``llamacpp`` extra. Writes
``quantized.md`` and ``quantized.json`` to benchmarks/results/.

The transformers runtime (``--runtimes``) does the same for users who stay in PyTorch: every model
as float32 and as int8 weights (``compress --quant int8``, torchao), all timed in one interleaved
loop (``quantized_transformers.md``); there too each type is compared with the dense model in that type.

    python benchmarks/quantized.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slimlm import llamacpp
from slimlm.costs import compare_speed
from slimlm.data import DEFAULT_EVALUATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.export import export_gguf
from slimlm.models import load_model
from slimlm.quantize import load_folder, quantize_int8, quantized_bytes
from slimlm.report import write_report
from slimlm.search import SearchJob, search

RESULTS = Path(__file__).parent / "results"


def compressed(model: str, fraction: float, runs: Path) -> Path:
    """slimlm's best model at ``fraction`` (the default compress search), reused when already there."""
    folder = runs / f"slimlm-{fraction}"
    if not (folder / "best" / "config.json").is_file():
        searcher, study = search(SearchJob(model=model, out=str(folder), params_fraction=fraction))
        write_report(searcher, study)
    return folder / "best"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fractions", default="0.9,0.8,0.7,0.5")
    parser.add_argument("--runtimes", default="llama.cpp,transformers")
    parser.add_argument("--quants", default="f16,q8_0,q4_k", help="GGUF types (llama.cpp runtime)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=Path("runs/gguf-bench"), help="compressed models and their files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runtimes = args.runtimes.split(",")
    if "llama.cpp" in runtimes:
        llamacpp.require()
    command = "python benchmarks/quantized.py " + " ".join(sys.argv[1:])
    dense = load_model(args.model)
    windows = model_windows(dense, DEFAULT_EVALUATION, 256, args.eval_windows)
    models = {1.0: dense}
    for fraction in map(float, args.fractions.split(",")):
        models[fraction] = load_model(compressed(args.model, fraction, args.runs))
    for runtime in runtimes:
        start = time.perf_counter()
        measure = in_llama_cpp if runtime == "llama.cpp" else in_transformers
        rows = measure(args, models, windows)
        write(args, runtime, rows, command, (time.perf_counter() - start) / 60)


def in_llama_cpp(args, models: dict, windows) -> list[dict]:
    """Every model in every GGUF type: size, perplexity and speed in llama.cpp (one interleaved loop per type)."""
    rows = []
    for quant in args.quants.split(","):
        files = {}
        for fraction, loaded in models.items():
            files[fraction] = export_gguf(loaded, args.runs / f"{fraction}.{quant}.gguf", quant).path
        speeds = llamacpp.compare_speed(list(files.values()), args.prompt_tokens, args.new_tokens, args.repeats)
        for (fraction, path), speed in zip(files.items(), speeds, strict=True):
            rows.append(
                {
                    "fraction": fraction,
                    "quant": quant,
                    "file_bytes": path.stat().st_size,
                    "perplexity": llamacpp.perplexity(path, windows),
                    "prompt_tokens_per_s": speed.prompt_tokens_per_s,
                    "generation_tokens_per_s": speed.generation_tokens_per_s,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def in_transformers(args, models: dict, windows) -> list[dict]:
    """Every model as float32 and as int8 weights (torchao): size, perplexity, prefill and decode speed,
    all timed side by side in one interleaved loop."""
    folders = {}
    for fraction, loaded in models.items():
        folders[(fraction, "f32")] = Path(loaded.folder)
        folders[(fraction, "int8")] = quantize_int8(loaded.folder, args.runs / f"{fraction}-int8")
    loaded = {key: load_folder(folder) for key, folder in folders.items()}
    speeds = compare_speed(list(loaded.values()), args.repeats, args.prompt_tokens, args.new_tokens)
    rows = []
    for ((fraction, quant), model), speed in zip(loaded.items(), speeds, strict=True):
        rows.append(
            {
                "fraction": fraction,
                "quant": quant,
                "file_bytes": quantized_bytes(folders[(fraction, quant)]),
                "perplexity": perplexity(model, windows),
                "prompt_tokens_per_s": args.prompt_tokens / speed.prefill_ms * 1000,
                "generation_tokens_per_s": speed.decode_tokens_per_s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(args, runtime: str, rows: list[dict], command: str, minutes: float) -> None:
    name = "quantized" if runtime == "llama.cpp" else f"quantized_{runtime}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    dense = {r["quant"]: r for r in rows if r["fraction"] == 1.0}
    unquantized = {r["fraction"]: r for r in rows if r["quant"] == rows[0]["quant"]}
    lines = [
        f"`{command}` ({runtime}: {minutes:.0f} min): perplexity in {runtime} on `{DEFAULT_EVALUATION}` "
        f"({args.eval_windows} windows of 256 tokens); speed in {runtime}, {args.prompt_tokens}-token prompt and "
        f"{args.new_tokens} generated tokens, medians of {args.repeats} interleaved rounds"
        + (" per type." if runtime == "llama.cpp" else " of all models."),
        "",
        f"| kept | type | MB | ppl | ppl vs {rows[0]['quant']} | prompt tok/s | gen tok/s | gen speed-up | ideal "
        "| of ideal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = dense[r["quant"]]
        speedup = r["generation_tokens_per_s"] / base["generation_tokens_per_s"]
        ideal = base["file_bytes"] / r["file_bytes"]
        versus = f"{r['perplexity'] / unquantized[r['fraction']]['perplexity'] - 1:+.1%}"
        lines.append(
            f"| {r['fraction']} | {r['quant']} | {r['file_bytes'] / 1e6:.1f} | {r['perplexity']:.2f} | {versus} "
            f"| {r['prompt_tokens_per_s']:.0f} | {r['generation_tokens_per_s']:.1f} | {speedup:.2f}x | {ideal:.2f}x "
            f"| {speedup / ideal:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
