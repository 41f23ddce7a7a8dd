"""The ``slimlm`` command line: argument parsing and printing only; the work is in the library."""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from slimlm.apply import subnetwork_applied
from slimlm.costs import measure_latency, peak_memory, static_cost
from slimlm.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, describe_specs, model_windows
from slimlm.errors import SlimlmError
from slimlm.evaluate import perplexity
from slimlm.extract import extract as extract_subnetwork
from slimlm.models import load_model
from slimlm.pipeline import compare_speed, folder_bytes
from slimlm.pipeline import compress as compress_model
from slimlm.subnet import SubNetwork

app = typer.Typer(
    help="Make pretrained LLMs smaller and faster by structural sub-network search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help="built-in name (smollm2-135m), Hugging Face folder, or .gguf file")]
DataOpt = Annotated[str, typer.Option(help=f"text: {describe_specs()}")]
SeqLenOpt = Annotated[int, typer.Option(help="tokens per window")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def friendly(command):
    """Bad input ends in one clear line on stderr and exit code 1, not a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SlimlmError as error:
            err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return run


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


@app.command()
@friendly
def info(
    model: ModelArg,
    context: Annotated[int, typer.Option(help="context length for FLOPs and KV-cache memory")] = 512,
    latency: Annotated[bool, typer.Option(help="measure prefill and decode speed")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Architecture, size, FLOPs, memory and measured CPU speed of a model."""
    loaded = load_model(model)
    dims = loaded.dims
    cost = static_cost(dims, context=context)
    speed = measure_latency(loaded.model, repeats=2) if latency else None
    shapes = Counter(dims.layers)
    result = {
        "model": model,
        "family": dims.family,
        "layers": dims.num_layers,
        "layer_shapes": [{**vars(s), "count": n} for s, n in shapes.items()],
        "hidden_size": dims.hidden_size,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab_size,
        "tied_embeddings": dims.tied_embeddings,
        "max_positions": dims.max_positions,
        **cost.as_dict(),
        "load_seconds": loaded.load_seconds,
        **(speed.as_dict() if speed else {}),
    }
    if as_json:
        out.print_json(json.dumps(result))
        return
    shape_text = "; ".join(f"{n}x({s.heads} heads, {s.kv_heads} kv, {s.neurons} mlp)" for s, n in shapes.items())
    rows = [
        ["family", dims.family],
        ["layers", f"{dims.num_layers}: {shape_text}"],
        ["hidden / head dim / vocab", f"{dims.hidden_size} / {dims.head_dim} / {dims.vocab_size:,}"],
        ["tied embeddings / context", f"{dims.tied_embeddings} / {dims.max_positions:,}"],
        ["parameters", f"{cost.params:,}"],
        ["parameters without embeddings", f"{cost.params_without_embeddings:,}"],
        [f"FLOPs per token at {context}", f"{cost.flops_per_token / 1e6:,.1f} M"],
        [f"memory: weights + KV cache at {context}", _mb(cost.memory_bytes)],
        ["load time", f"{loaded.load_seconds:.2f} s"],
    ]
    if speed:
        rows += [
            [f"prefill {speed.prompt_tokens} tokens", f"{speed.prefill_ms:,.1f} ms"],
            ["decode (generate)", f"{speed.decode_tokens_per_s:,.1f} tokens/s"],
        ]
    out.print(_table(model, ["", ""], rows))


@app.command("eval")
@friendly
def evaluate(
    model: ModelArg,
    data: DataOpt = DEFAULT_EVALUATION,
    seq_len: SeqLenOpt = 512,
    windows: Annotated[int, typer.Option(help="number of windows to score")] = 16,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 4,
    subnet: Annotated[Path | None, typer.Option(help="evaluate this sub-network (JSON) in place")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of a model (or of a sub-network of it) on a text."""
    loaded = load_model(model)
    ids = model_windows(loaded, data, seq_len, windows)
    start = time.perf_counter()
    if subnet is None:
        ppl = perplexity(loaded.model, ids, batch_size, description=f"perplexity on {data}")
    else:
        with subnetwork_applied(loaded, SubNetwork.load(subnet)) as applied:
            ppl = perplexity(applied, ids, batch_size, description=f"perplexity on {data}")
    seconds = time.perf_counter() - start
    result = {
        "model": model,
        "subnet": str(subnet) if subnet else None,
        "data": data,
        "perplexity": ppl,
        "tokens": ids.numel(),
        "seconds": seconds,
        "tokens_per_s": ids.numel() / seconds,
    }
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"perplexity {ppl:.3f} on {data} ({ids.numel():,} tokens, {ids.numel() / seconds:,.0f} tokens/s)")


@app.command()
@friendly
def extract(
    model: ModelArg,
    subnet: Annotated[Path, typer.Option(help="sub-network JSON file")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the smaller model to")],
) -> None:
    """Write a sub-network as a standalone smaller Hugging Face model folder."""
    loaded = load_model(model)
    result = extract_subnetwork(loaded, SubNetwork.load(subnet), out_dir)
    full = static_cost(loaded.dims).params
    how = "trust_remote_code=True" if result.needs_remote_code else "plain from_pretrained"
    out.print(
        f"wrote {result.folder}: {result.params:,} parameters ({result.params / full:.3f} of {full:,}); "
        f"loads with {how}"
    )


@app.command()
@friendly
def bench(
    model: ModelArg,
    vs: Annotated[str, typer.Option(help="the model to compare against (e.g. the dense one)")],
    prompt_tokens: Annotated[int, typer.Option(help="prompt length for prefill")] = 128,
    new_tokens: Annotated[int, typer.Option(help="tokens to generate for the decode rate")] = 32,
    repeats: Annotated[int, typer.Option(help="timed rounds (median is reported)")] = 5,
    memory: Annotated[bool, typer.Option(help="measure peak process memory (one process per model)")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Measure two models side by side in one run and print the ratios."""
    models = [load_model(model), load_model(vs)]
    speeds = compare_speed([m.model for m in models], repeats, prompt_tokens, new_tokens)
    rows = []
    for name, loaded, speed in zip((model, vs), models, speeds, strict=True):
        cost = static_cost(loaded.dims, context=prompt_tokens + new_tokens)
        rows.append(
            {
                "model": name,
                "params": cost.params,
                "disk_bytes": folder_bytes(loaded.folder),
                "flops_per_token": cost.flops_per_token,
                **speed.as_dict(),
                "peak_memory_bytes": peak_memory(name, prompt_tokens, new_tokens) if memory else None,
            }
        )
    a, b = rows
    ratios = {
        "params": a["params"] / b["params"],
        "prefill_speedup": b["prefill_ms"] / a["prefill_ms"],
        "decode_speedup": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
        "peak_memory": a["peak_memory_bytes"] / b["peak_memory_bytes"] if memory else None,
    }
    if as_json:
        out.print_json(json.dumps({"models": rows, "ratios": ratios}))
        return
    table = _table(
        f"{model} vs {vs}",
        ["", model, vs, "ratio"],
        [
            ["parameters", f"{a['params']:,}", f"{b['params']:,}", f"{ratios['params']:.3f}x"],
            [
                "weights on disk",
                _mb(a["disk_bytes"]),
                _mb(b["disk_bytes"]),
                f"{a['disk_bytes'] / b['disk_bytes']:.3f}x",
            ],
            [
                f"prefill {prompt_tokens} tokens",
                f"{a['prefill_ms']:.1f} ms",
                f"{b['prefill_ms']:.1f} ms",
                f"{ratios['prefill_speedup']:.2f}x faster",
            ],
            [
                "decode (generate)",
                f"{a['decode_tokens_per_s']:.1f} tok/s",
                f"{b['decode_tokens_per_s']:.1f} tok/s",
                f"{ratios['decode_speedup']:.2f}x faster",
            ],
        ],
    )
    if memory:
        table.add_row(
            "peak process memory",
            _mb(a["peak_memory_bytes"]),
            _mb(b["peak_memory_bytes"]),
            f"{ratios['peak_memory']:.3f}x",
        )
    out.print(table)


@app.command()
@friendly
def compress(
    model: ModelArg,
    params: Annotated[float, typer.Option(help="fraction of the parameters to keep, in (0, 1]")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the smaller model to")],
    calib: DataOpt = DEFAULT_CALIBRATION,
    eval_data: Annotated[str, typer.Option("--eval", help="evaluation text (same forms as --calib)")] = (
        DEFAULT_EVALUATION
    ),
    seq_len: SeqLenOpt = 512,
    calib_windows: Annotated[int, typer.Option(help="calibration windows for importance")] = 8,
    eval_windows: Annotated[int, typer.Option(help="evaluation windows for perplexity")] = 16,
) -> None:
    """Shrink a model to a parameter budget, save it, and compare it with the dense model."""
    report = compress_model(model, params, out_dir, calib, eval_data, seq_len, calib_windows, eval_windows)
    dense, small = report["dense"], report["compressed"]
    rows = [
        ["parameters", f"{dense['params']:,}", f"{small['params']:,}", f"{small['params'] / dense['params']:.3f}x"],
        [
            "weights on disk",
            _mb(dense["disk_bytes"]),
            _mb(small["disk_bytes"]),
            f"{small['disk_bytes'] / dense['disk_bytes']:.3f}x",
        ],
        [
            f"perplexity ({report['evaluation']})",
            f"{dense['perplexity']:.2f}",
            f"{small['perplexity']:.2f}",
            f"{small['perplexity'] / dense['perplexity']:.2f}x",
        ],
        [
            "prefill 128 tokens",
            f"{dense['prefill_ms']:.1f} ms",
            f"{small['prefill_ms']:.1f} ms",
            f"{dense['prefill_ms'] / small['prefill_ms']:.2f}x faster",
        ],
        [
            "decode (generate)",
            f"{dense['decode_tokens_per_s']:.1f} tok/s",
            f"{small['decode_tokens_per_s']:.1f} tok/s",
            f"{small['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}x faster",
        ],
    ]
    out.print(_table(f"{model} -> {out_dir}", ["", "dense", "compressed", "ratio"], rows))
    how = "trust_remote_code=True" if report["needs_remote_code"] else "plain from_pretrained"
    out.print(f"saved {out_dir} (loads with {how}); report in {out_dir / 'slimlm_report.json'}")
