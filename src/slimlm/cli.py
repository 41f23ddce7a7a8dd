"""The ``slimlm`` command line: argument parsing and printing only; the work is in the library."""

from __future__ import annotations

import copy
import errno
import functools
import inspect
import json
import os
import time
import typing
from collections import Counter
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Nothing imported here imports torch or transformers (seconds of start): each command imports the
# library functions it calls in its body, so `slimlm --help`, a command's --help and shell completion
# answer at once (test_cli checks that importing this module leaves torch unimported).
from slimlm import llamacpp
from slimlm.errors import SlimlmError
from slimlm.jobfile import read_job_file
from slimlm.jobs import (
    ALL_QUANT_TYPES,
    DEFAULT_CALIBRATION,
    DEFAULT_EVALUATION,
    DEFAULT_METRIC,
    DEFAULT_STRATEGY,
    GGUF_QUANT_TYPES,
    PRUNE_METHODS,
    SEARCH_STRATEGIES,
    STUDY_NAME,
    TRAIN_STRATEGIES,
    HealJob,
    SearchJob,
    TrainJob,
    budget_jobs,
    describe_specs,
    heal_data,
    parse_fractions,
    parse_size,
)
from slimlm.llamacpp import NATIVE_QUANT_TYPES

if TYPE_CHECKING:
    from slimlm.subnet import SubNetwork

app = typer.Typer(
    help="Make pretrained LLMs smaller and faster by structural sub-network search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion for bash, zsh, fish
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slimlm {metadata.version('slimlm')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print slimlm's version and exit")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress: only results and errors")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also the libraries' own logs (transformers, Optuna)")
    ] = False,
) -> None:
    """Make pretrained LLMs smaller and faster by structural sub-network search."""
    if quiet and verbose:
        err.print("[red]error:[/red] give -q (less) or -v (more), not both", highlight=False)
        raise typer.Exit(1)
    # the environment carries them to the library and to worker processes (slimlm.progress reads them)
    for flag, name in ((quiet, "SLIMLM_QUIET"), (verbose, "SLIMLM_VERBOSE")):
        if flag:
            os.environ[name] = "1"


def _console(stderr: bool = False) -> Console:
    """Messages stay on one line (scripts grep them); piped to a log, tables are not cut at rich's
    default 80 columns (a log has no width; COLUMNS still sets one)."""
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


LOG_WIDTH = 200
PRECISION_HELP = "autocast: auto (bf16 where the GPU or CPU computes bf16 natively), no, bf16, fp16"
out, err = _console(), _console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help="built-in name (smollm2-135m), Hugging Face folder, or .gguf file")]
DataOpt = Annotated[str, typer.Option(help=f"text: {describe_specs()}")]
SeqLenOpt = Annotated[int, typer.Option(help="tokens per window")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
ParamsFraction = Annotated[float | None, typer.Option("--params", help="keep at most this fraction of the parameters")]
ParamsFractions = Annotated[
    str | None,
    typer.Option(
        "--params",
        help="keep at most this fraction of the parameters; several (0.9,0.8,0.7): one run each, in RUN/params-0.9 ...",
    ),
]
MaxParams = Annotated[str | None, typer.Option(help="absolute parameter budget, e.g. 90M")]
NonEmbedding = Annotated[
    float | None,
    typer.Option(
        "--non-embedding",
        help="keep at most this fraction of the parameters outside the embeddings (kept whole): for models "
        "whose embedding is most of their size",
    ),
]
Calib = Annotated[str, typer.Option("--calib", help=f"calibration text: {describe_specs()}")]
EvalText = Annotated[str, typer.Option("--eval", help="evaluation text (same forms as --calib)")]
CalibWindows = Annotated[int, typer.Option("--calib-windows", help="calibration windows")]
EvalWindows = Annotated[int, typer.Option("--eval-windows", help="evaluation windows")]
ForeignSubnet = Annotated[
    bool,
    typer.Option(help="use a sub-network file made for another model, or hand-written (its indices are still checked)"),
]
Overwrite = Annotated[bool, typer.Option(help="replace a non-empty --out folder")]
TokenizerPre = Annotated[
    str | None, typer.Option(help="llama.cpp's pre-tokenizer name, for models that did not come from a GGUF")
]


def friendly(command):
    """Bad input ends in one clear line on stderr and exit code 1, not a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SlimlmError as error:
            _fail(str(error))
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # stores, libraries and caches are written so that a rerun (--resume) continues where this stopped
            where = f" writing {error.filename}" if error.filename else ""
            _fail(f"no space left on the disk{where}; free some, or move --out or $SLIMLM_CACHE, and run again")

    return run


def _fail(message: str) -> None:
    # escaped: messages name extras like slimlm[llamacpp], which rich would read as markup
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _comparison_rows(left: dict, right: dict, prompt_tokens: int, subject: int) -> list[list[str]]:
    """Size and speed of two measured models side by side; ratios are of model ``subject`` (0 or 1) to the other."""
    x, ref = (left, right) if subject == 0 else (right, left)
    return [
        ["parameters", f"{left['params']:,}", f"{right['params']:,}", f"{x['params'] / ref['params']:.3f}x"],
        [
            "weights on disk",
            _mb(left["disk_bytes"]),
            _mb(right["disk_bytes"]),
            f"{x['disk_bytes'] / ref['disk_bytes']:.3f}x",
        ],
        [
            f"prefill {prompt_tokens} tokens",
            f"{left['prefill_ms']:.1f} ms",
            f"{right['prefill_ms']:.1f} ms",
            f"{ref['prefill_ms'] / x['prefill_ms']:.2f}x faster",
        ],
        [
            "decode (generate)",
            f"{left['decode_tokens_per_s']:.1f} tok/s",
            f"{right['decode_tokens_per_s']:.1f} tok/s",
            f"{x['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x faster",
        ],
    ]


def _subnet_for(loaded, path: Path, foreign: bool) -> SubNetwork:
    """The sub-network file ``path``, checked to be made for ``loaded`` (unless ``foreign``)."""
    from slimlm.subnet import SubNetwork

    return SubNetwork.load(path, loaded.dims, loaded.fingerprint(), foreign=foreign)


@app.command()
@friendly
def info(
    model: ModelArg,
    context: Annotated[int, typer.Option(help="context length for FLOPs and KV-cache memory")] = 512,
    latency: Annotated[bool, typer.Option(help="measure prefill and decode speed")] = True,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Architecture, size, FLOPs, memory and measured CPU speed of a model."""
    from slimlm.costs import measure_latency, probe_lengths, static_cost
    from slimlm.models import load_model

    loaded = load_model(model, dtype, device)
    dims = loaded.dims
    cost = static_cost(dims, context=context)
    speed = measure_latency(loaded.model, *probe_lengths(dims.max_positions), repeats=2) if latency else None
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
    foreign_subnet: ForeignSubnet = False,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Perplexity of a model (or of a sub-network of it) on a text."""
    from slimlm.apply import subnetwork_applied
    from slimlm.data import model_windows
    from slimlm.evaluate import perplexity
    from slimlm.models import load_model

    loaded = load_model(model, dtype, device)
    chosen = _subnet_for(loaded, subnet, foreign_subnet) if subnet else None
    ids = model_windows(loaded, data, seq_len, windows)
    start = time.perf_counter()
    if chosen is None:
        ppl = perplexity(loaded.model, ids, batch_size, description=f"perplexity on {data}")
    else:
        with subnetwork_applied(loaded, chosen, views=True) as applied:
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
    model: Annotated[str, typer.Argument(help="as for every command; with --trial, a run folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the smaller model to")],
    subnet: Annotated[Path | None, typer.Option(help="sub-network JSON file")] = None,
    trial: Annotated[
        int | None, typer.Option(help="extract this trial of the search in the run folder MODEL (see pareto.json)")
    ] = None,
    reform: Annotated[bool, typer.Option(help="repair the kept weights with calibration data")] = True,
    calibration: Calib = DEFAULT_CALIBRATION,
    calibration_windows: CalibWindows = SearchJob.calibration_windows,
    seq_len: SeqLenOpt = 256,
    foreign_subnet: ForeignSubnet = False,
    overwrite: Overwrite = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Write a sub-network as a standalone smaller Hugging Face model folder (reformed by default).

    With ``--trial``, a member of a finished search is written as that search wrote its winner: with the
    run's model, windows and settings, reformed the better way on its selection windows and refined where
    the run refines (``--no-reform``: neither)."""
    from slimlm.costs import static_cost
    from slimlm.data import model_windows
    from slimlm.extract import extract as extract_subnetwork
    from slimlm.models import load_model
    from slimlm.outputs import check_output_folder
    from slimlm.reform import reform as reform_weights
    from slimlm.report import extract_trial
    from slimlm.search import stored_candidate

    if (subnet is None) == (trial is None):
        raise SlimlmError("give --subnet FILE, or --trial N with a run folder as MODEL")
    if trial is not None:
        job, chosen = stored_candidate(model, trial)
        check_output_folder(out_dir, overwrite, job.model)
        if reform:
            shipped = extract_trial(model, trial, out_dir)
            refinement = shipped.get("refinement") or {}
            how = f"reformed ({shipped['reformation']})" + (", refined" if refinement.get("kept") else "")
            _print_extracted(shipped["extracted"], shipped["dense_params"], how)
            out.print(f"evaluation perplexity on {job.evaluation}: {shipped['evaluation_perplexity']:.2f}")
            return
        model, dtype = job.model, job.dtype
    check_output_folder(out_dir, overwrite, model)
    loaded = load_model(model, dtype, device)
    chosen = _subnet_for(loaded, subnet, foreign_subnet) if subnet else chosen.validate(loaded.dims)
    reformed = None
    if reform:
        reformed = reform_weights(loaded, chosen, model_windows(loaded, calibration, seq_len, calibration_windows))
    result = extract_subnetwork(loaded, chosen, out_dir, reformed)
    _print_extracted(result, static_cost(loaded.dims).params, "reformed" if reform else "not reformed")


def _print_extracted(result, full: int, how: str) -> None:
    loads = "trust_remote_code=True" if result.needs_remote_code else "plain from_pretrained"
    out.print(
        f"wrote {result.folder}: {result.params:,} parameters ({result.params / full:.3f} of {full:,}), "
        f"{how}; loads with {loads}"
    )


@app.command("export")
@friendly
def export_command(
    model: ModelArg,
    gguf_file: Annotated[Path, typer.Option("--gguf", help="GGUF file to write, for llama.cpp")],
    quant: Annotated[
        str, typer.Option(help=f"tensor type: {', '.join([*GGUF_QUANT_TYPES, *NATIVE_QUANT_TYPES])}")
    ] = "f16",
    tokenizer_pre: TokenizerPre = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Write a model (e.g. one slimlm extracted) as one self-contained GGUF file that llama.cpp runs."""
    from slimlm.export import export_gguf
    from slimlm.models import load_model

    exported = export_gguf(load_model(model, dtype, device), gguf_file, quant, tokenizer_pre)
    out.print(f"wrote {exported.path}: {quant}, {exported.bytes / 1e6:,.1f} MB")
    if exported.padded_neurons:
        out.print(f"MLPs padded with {exported.padded_neurons} zero neurons in all, to whole {quant} blocks")
    if exported.kept_f16:
        out.print(f"kept in f16 (rows not whole {quant} blocks): {', '.join(exported.kept_f16)}")


@app.command("reform")
@friendly
def reform_command(
    model: ModelArg,
    subnet: Annotated[Path, typer.Option(help="sub-network JSON file")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the reformed smaller model to")],
    calibration: Calib = DEFAULT_CALIBRATION,
    evaluation: EvalText = DEFAULT_EVALUATION,
    calibration_windows: CalibWindows = SearchJob.calibration_windows,
    evaluation_windows: EvalWindows = 16,
    seq_len: SeqLenOpt = 256,
    foreign_subnet: ForeignSubnet = False,
    overwrite: Overwrite = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Reform a sub-network's kept weights, report perplexity before and after, and write the model."""
    from slimlm.apply import subnetwork_applied
    from slimlm.data import model_windows
    from slimlm.evaluate import perplexity
    from slimlm.extract import extract as extract_subnetwork
    from slimlm.models import load_model
    from slimlm.outputs import check_output_folder
    from slimlm.reform import reform as reform_weights

    check_output_folder(out_dir, overwrite, model)
    loaded = load_model(model, dtype, device)
    chosen = _subnet_for(loaded, subnet, foreign_subnet)
    calib = model_windows(loaded, calibration, seq_len, calibration_windows)
    ids = model_windows(loaded, evaluation, seq_len, evaluation_windows)
    start = time.perf_counter()
    reformed = reform_weights(loaded, chosen, calib)
    seconds = time.perf_counter() - start
    scores = []
    for weights in (None, reformed):
        with subnetwork_applied(loaded, chosen, weights, views=True) as applied:
            scores.append(perplexity(applied, ids, description="perplexity" + (" (reformed)" if weights else "")))
    result = extract_subnetwork(loaded, chosen, out_dir, reformed)
    out.print(
        f"perplexity on {evaluation}: {scores[0]:.2f} -> {scores[1]:.2f} after reformation "
        f"({calib.numel():,} calibration tokens, {seconds:.1f} s); wrote {result.folder}"
    )


@app.command("prune")
@friendly
def prune_command(
    model: ModelArg,
    method: Annotated[str, typer.Option(help=f"pruning method: {', '.join(PRUNE_METHODS)}")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the pruned model to")],
    params_fraction: ParamsFraction = None,
    non_embedding_fraction: NonEmbedding = None,
    max_params: MaxParams = None,
    calibration: Calib = DEFAULT_CALIBRATION,
    evaluation: EvalText = DEFAULT_EVALUATION,
    calibration_windows: CalibWindows = SearchJob.calibration_windows,
    evaluation_windows: EvalWindows = 16,
    seq_len: SeqLenOpt = 256,
    overwrite: Overwrite = False,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Prune with a one-shot method from the literature (a baseline for search); write the smaller model."""
    from slimlm.apply import subnetwork_applied
    from slimlm.costs import static_cost
    from slimlm.data import model_windows
    from slimlm.evaluate import perplexity
    from slimlm.extract import extract as extract_subnetwork
    from slimlm.importance import cached_calibration
    from slimlm.models import load_model
    from slimlm.outputs import check_output_folder
    from slimlm.prune import PruneInput, check_method, params_budget, prune

    check_method(method)
    check_output_folder(out_dir, overwrite, model)
    loaded = load_model(model, dtype, device)
    absolute = int(parse_size(max_params)) if max_params else None
    budget = params_budget(loaded.dims, params_fraction, absolute, non_embedding_fraction)
    calib = model_windows(loaded, calibration, seq_len, calibration_windows)
    ids = model_windows(loaded, evaluation, seq_len, evaluation_windows)
    given = PruneInput(loaded, cached_calibration(loaded, calib, calibration), calib, budget)
    pruned = prune(method, given)
    with subnetwork_applied(loaded, pruned.subnet, pruned.reformed, views=True) as applied:
        pruned_perplexity = perplexity(applied, ids, description=f"perplexity ({method})")
    result = extract_subnetwork(loaded, pruned.subnet, out_dir, pruned.reformed)
    full = static_cost(loaded.dims).params
    summary = {
        "method": method,
        "params": result.params,
        "params_fraction": result.params / full,
        "perplexity": pruned_perplexity,
        "evaluation": evaluation,
        "seconds": pruned.seconds,
        "folder": str(result.folder),
        "needs_remote_code": result.needs_remote_code,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    how = "trust_remote_code=True" if result.needs_remote_code else "plain from_pretrained"
    out.print(
        f"{method}: {result.params:,} parameters ({result.params / full:.3f} of {full:,}), perplexity "
        f"{pruned_perplexity:.2f} on {evaluation}, pruned in {pruned.seconds:.1f} s; "
        f"wrote {result.folder} (loads with {how})"
    )


@app.command("train")
@friendly
def train_command(
    model: ModelArg,
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the trained super-network and its checkpoint")],
    data: DataOpt = DEFAULT_CALIBRATION,
    strategy: Annotated[str, typer.Option(help=f"sub-networks per step: {', '.join(TRAIN_STRATEGIES)}")] = "sandwich",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 100,
    batch_size: Annotated[int, typer.Option(help="windows per step")] = 2,
    seq_len: SeqLenOpt = 256,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate")] = 2e-5,
    random_subnets: Annotated[int, typer.Option(help="random sub-networks per step")] = 2,
    distillation: Annotated[float, typer.Option(help="weight of the KL to the full model in [0, 1]")] = 0.5,
    temperature: Annotated[float, typer.Option(help="distillation temperature")] = 1.0,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (0: full fine-tuning)")] = 0,
    min_ratio: Annotated[float, typer.Option(help="smallest kept fraction of a layer's heads and neurons")] = 0.2,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 25,
    mixed_precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = TrainJob.mixed_precision,
    seed: Annotated[int, typer.Option(help="seed of batches and sub-networks")] = 0,
    resume: Annotated[bool, typer.Option(help="continue the run stored in --out")] = False,
) -> None:
    """Train the model once as a weight-sharing super-network; search it afterwards with `slimlm search OUT`."""
    from slimlm.space import SearchSpace
    from slimlm.train import train as train_supernetwork

    job = TrainJob(
        model=model,
        out=str(out_dir),
        data=data,
        strategy=strategy,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        learning_rate=learning_rate,
        random_subnets=random_subnets,
        distillation=distillation,
        temperature=temperature,
        lora_rank=lora_rank,
        space=SearchSpace(min_ratio=min_ratio),
        checkpoint_every=checkpoint_every,
        mixed_precision=mixed_precision,
        seed=seed,
        resume=resume,
    )
    folder = train_supernetwork(job)
    out.print(f"wrote the trained super-network to {folder} (search it with: slimlm search {folder} ...)")


@app.command("heal")
@friendly
def heal_command(
    model: Annotated[Path, typer.Argument(help="the pruned model folder (from compress, extract or prune)")],
    teacher: Annotated[str, typer.Option(help="the dense model it was pruned from (same forms as MODEL elsewhere)")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the healed model and its checkpoint")],
    data: Annotated[
        str | None,
        typer.Option(help="text to heal on (default: the calibration text, with `chat` for a chat model)"),
    ] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = HealJob.steps,
    batch_size: Annotated[int, typer.Option(help="windows per step")] = HealJob.batch_size,
    seq_len: SeqLenOpt = HealJob.seq_len,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate")] = HealJob.learning_rate,
    distillation: Annotated[float, typer.Option(help="weight of the KL to the teacher, 0-1")] = HealJob.distillation,
    temperature: Annotated[float, typer.Option(help="distillation temperature")] = HealJob.temperature,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank, merged when done (0: full fine-tuning)")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = HealJob.checkpoint_every,
    mixed_precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = HealJob.mixed_precision,
    seed: Annotated[int, typer.Option(help="seed of the batch order")] = HealJob.seed,
    resume: Annotated[bool, typer.Option(help="continue the run stored in --out")] = False,
    evaluation: EvalText = DEFAULT_EVALUATION,
    evaluation_windows: EvalWindows = 16,
    as_json: JsonOpt = False,
) -> None:
    """Recover a pruned model's quality by distillation from its dense teacher; perplexity before and after."""
    from slimlm.chat import has_template
    from slimlm.data import model_windows
    from slimlm.evaluate import perplexity
    from slimlm.heal import heal
    from slimlm.models import load_model

    student = load_model(str(model))
    job = HealJob(
        model=str(model),
        teacher=teacher,
        out=str(out_dir),
        data=data or heal_data(DEFAULT_CALIBRATION, has_template(student.tokenizer)),
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        learning_rate=learning_rate,
        distillation=distillation,
        temperature=temperature,
        lora_rank=lora_rank,
        checkpoint_every=checkpoint_every,
        mixed_precision=mixed_precision,
        seed=seed,
        resume=resume,
    )
    ids = model_windows(student, evaluation, seq_len, evaluation_windows)
    before = perplexity(student.model, ids, description="perplexity (before)")
    began = time.perf_counter()
    folder = heal(job, student)
    seconds = time.perf_counter() - began
    after = perplexity(load_model(folder).model, ids, description="perplexity (healed)")
    summary = {"folder": str(folder), "evaluation": evaluation, "perplexity_before": before}
    summary |= {"perplexity_after": after, "steps": steps, "seconds": seconds}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print(
        f"healed {steps} steps in {seconds:.0f} s: perplexity on {evaluation} {before:.2f} -> {after:.2f}; "
        f"wrote {folder}"
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
    runtime: Annotated[str, typer.Option(help="transformers, or llama.cpp (MODEL and --vs are .gguf files)")] = (
        "transformers"
    ),
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Measure two models side by side in one run and print the ratios."""
    from slimlm.costs import compare_speed, peak_memory, static_cost
    from slimlm.extract import folder_bytes
    from slimlm.models import load_model

    if runtime == "llama.cpp":
        _bench_llama_cpp(model, vs, prompt_tokens, new_tokens, repeats, as_json)
        return
    if runtime != "transformers":
        raise SlimlmError(f"unknown runtime '{runtime}'; choose transformers or llama.cpp")
    models = [load_model(model, dtype, device), load_model(vs, dtype, device)]
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
    table = _table(f"{model} vs {vs}", ["", model, vs, "ratio"], _comparison_rows(a, b, prompt_tokens, subject=0))
    if memory:
        table.add_row(
            "peak process memory",
            _mb(a["peak_memory_bytes"]),
            _mb(b["peak_memory_bytes"]),
            f"{ratios['peak_memory']:.3f}x",
        )
    out.print(table)


def _bench_llama_cpp(model: str, vs: str, prompt_tokens: int, new_tokens: int, repeats: int, as_json: bool) -> None:
    """``bench --runtime llama.cpp``: prompt and generation tokens/s of two GGUF files, side by side."""
    a, b = llamacpp.compare_speed([model, vs], prompt_tokens, new_tokens, repeats)
    sizes = [Path(model).stat().st_size, Path(vs).stat().st_size]
    ratios = {
        "file_size": sizes[0] / sizes[1],
        "prompt_speedup": a.prompt_tokens_per_s / b.prompt_tokens_per_s,
        "generation_speedup": a.generation_tokens_per_s / b.generation_tokens_per_s,
    }
    if as_json:
        rows = [{"model": m, "file_bytes": n, **asdict(x)} for m, n, x in ((model, sizes[0], a), (vs, sizes[1], b))]
        out.print_json(json.dumps({"runtime": "llama.cpp", "models": rows, "ratios": ratios}))
        return
    rows = [
        ["file size", _mb(sizes[0]), _mb(sizes[1]), f"{ratios['file_size']:.3f}x"],
        [
            f"prompt processing ({prompt_tokens} tokens)",
            f"{a.prompt_tokens_per_s:,.1f} tok/s",
            f"{b.prompt_tokens_per_s:,.1f} tok/s",
            f"{ratios['prompt_speedup']:.2f}x",
        ],
        [
            f"generation ({new_tokens} tokens)",
            f"{a.generation_tokens_per_s:,.1f} tok/s",
            f"{b.generation_tokens_per_s:,.1f} tok/s",
            f"{ratios['generation_speedup']:.2f}x",
        ],
    ]
    out.print(_table(f"llama.cpp: {model} vs {vs}", ["", model, vs, "ratio"], rows))


Strategy = Annotated[str, typer.Option(help=f"search strategy: {', '.join(SEARCH_STRATEGIES)}")]
Objective = Annotated[str, typer.Option(help="cost objective beside perplexity: params, flops, memory or latency")]
Evaluations = Annotated[int, typer.Option(help="candidates to evaluate (the store keeps every one)")]
MaxMemory = Annotated[str | None, typer.Option(help="weights + KV cache budget in bytes, e.g. 300MB")]
MaxLatency = Annotated[float | None, typer.Option(help="latency budget in ms per candidate (see --latency-runtime)")]
MinSpeedup = Annotated[
    float | None,
    typer.Option(help="latency budget as a speed-up over the dense model in --latency-runtime, e.g. 1.5"),
]
LatencyRuntime = Annotated[
    str,
    typer.Option(
        help="where latency is measured: transformers (prefill of --seq-len tokens) or llama.cpp (ms per "
        "generated token after --seq-len, in an f16 GGUF; needs the llamacpp extra)"
    ),
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="the weights' dtype: float32, bfloat16 or float16 (statistics stay float32+)")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="where the model runs: cpu, cuda, or auto (cuda if present)")]
StreamOpt = Annotated[
    bool,
    typer.Option(
        "--stream",
        help="keep the decoder layers on disk and read each as it runs: for models larger than memory (slower)",
    ),
]
RunOut = Annotated[Path | None, typer.Option("--out", help="run folder: store, job.toml, pareto.json, best/")]
JobModel = Annotated[
    str | None, typer.Argument(help="as for every command, or taken from --config", show_default=False)
]
Config = Annotated[
    Path | None,
    typer.Option("--config", help="run the job in this file (RUN/job.toml); typed options override it"),
]
Metric = Annotated[
    str, typer.Option(help="importance metric: reconstruction, activation, magnitude, fluctuation, second-order")
]
PerLayer = Annotated[bool, typer.Option("--per-layer/--uniform", help="per-layer ratios or one shape for all layers")]
Depth = Annotated[bool, typer.Option(help="allow removing attention and MLP sub-blocks and whole layers")]
MinRatio = Annotated[float, typer.Option(help="smallest kept fraction of a layer's heads / neurons")]
MaxRatio = Annotated[float, typer.Option(help="largest kept fraction of a layer's heads / neurons")]
Frozen = Annotated[str, typer.Option(help="comma-separated layers kept whole, e.g. 0,29")]
FitnessWindows = Annotated[
    int, typer.Option(help="calibration-text windows scored per candidate at the last fidelity stage")
]
SelectionWindows = Annotated[int, typer.Option(help="calibration-text windows that choose among the finalists")]
Fitness = Annotated[str, typer.Option(help="what ranks candidates: kl (to the dense model) or perplexity")]
Stages = Annotated[int, typer.Option(help="fidelity stages of the evolution (each scores 4x the windows)")]
Seed = Annotated[int, typer.Option(help="random seed")]
Storage = Annotated[str | None, typer.Option(help="Optuna storage URL (default: SQLite file in the run folder)")]
StudyName = Annotated[str, typer.Option("--study", help="study name in the store (one database, many searches)")]
Workers = Annotated[int, typer.Option(help="worker processes searching one store")]
Resume = Annotated[bool, typer.Option(help="continue the search stored in the run folder")]
Reform = Annotated[bool, typer.Option(help="reform the kept weights of the saved best model")]
ReformCandidates = Annotated[bool, typer.Option(help="score every candidate after reformation (slower)")]
RefineEpochs = Annotated[
    int, typer.Option(help="passes of layer-wise refinement of the winner over the refinement windows (0: none)")
]
RefineWindows = Annotated[
    int, typer.Option(help="windows refinement trains on: the calibration windows, then more past selection")
]


def _job(model: str | None, out_dir: Path | None, options: dict, typed: set | None, config: Path | None) -> SearchJob:
    """The search job of the CLI: the options, over the job file ``config`` when one is given (where
    only the ``typed`` options count); sizes parsed, the space assembled."""
    given = set(options) if typed is None else typed
    job = SearchJob.from_dict(read_job_file(config), f"job file {config}") if config else SearchJob(model="", out="")
    parsed = _options_job(options)
    space = {SPACE_OPTIONS[n]: getattr(parsed.space, SPACE_OPTIONS[n]) for n in given & set(SPACE_OPTIONS)}
    fields = {JOB_FIELDS.get(n, n) for n in given - set(SPACE_OPTIONS)}
    job = replace(job, space=replace(job.space, **space), **{f: getattr(parsed, f) for f in fields})
    job = replace(job, model=model or job.model, out=str(out_dir) if out_dir else job.out)
    if not job.model:
        raise SlimlmError("give a MODEL and --out RUN, or a job file with --config RUN/job.toml")
    budgets = (job.params_fraction, job.non_embedding_fraction, job.max_params, job.max_memory_bytes)
    if budgets == (None, None, None, None):
        raise SlimlmError(
            "give a budget: --params FRACTION, --non-embedding FRACTION, --max-params N or --max-memory BYTES"
        )
    return job


SPACE_OPTIONS = {
    "per_layer": "per_layer",
    "depth": "depth",
    "min_ratio": "min_ratio",
    "max_ratio": "max_ratio",
    "frozen": "frozen_layers",
}
JOB_FIELDS = {"max_memory": "max_memory_bytes"}  # options named otherwise than the job's field


def _run_folder(job: SearchJob) -> Path:
    """The run folder every role but a worker writes."""
    if not job.out:
        raise SlimlmError("give --out RUN (only a --worker writes no run folder)")
    return Path(job.out)


Worker = Annotated[
    bool,
    typer.Option(
        "--worker",
        help="only evaluate candidates of the --storage study (any number of machines); no run folder",
        rich_help_panel="Store and workers",
    ),
]
Finalise = Annotated[
    bool,
    typer.Option(
        "--finalise",
        help="evaluate nothing: wait for the --storage study's workers, then write the run folder",
        rich_help_panel="Store and workers",
    ),
]


def _options_job(options: dict) -> SearchJob:
    """The job the options alone describe (no budget check: a job file may hold the budget)."""
    from slimlm.space import SearchSpace

    options = dict(options)
    space = SearchSpace(
        **{field: options.pop(name) for name, field in SPACE_OPTIONS.items() if name != "frozen"},
        frozen_layers=_layer_list(options.pop("frozen"), "--frozen"),
    )
    max_params, max_memory = options.pop("max_params"), options.pop("max_memory")
    return SearchJob(
        model="",
        out="",
        space=space,
        max_params=int(parse_size(max_params)) if max_params else None,
        max_memory_bytes=int(parse_size(max_memory)) if max_memory else None,
        **options,
    )


def _layer_list(text: str, option: str) -> tuple[int, ...]:
    """``"0,29"`` -> (0, 29); anything else is a clear error."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = next((p for p in parts if not p.isdecimal()), None)
    if bad is not None:
        raise SlimlmError(f"{option} takes comma-separated layer numbers such as 0,29; got '{bad}'")
    return tuple(int(p) for p in parts)


def _search_options(
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    stream: StreamOpt = False,
    params_fraction: ParamsFractions = None,
    non_embedding_fraction: NonEmbedding = None,
    max_params: MaxParams = None,
    max_memory: MaxMemory = None,
    max_latency_ms: MaxLatency = None,
    min_speedup: MinSpeedup = None,
    strategy: Strategy = DEFAULT_STRATEGY,
    objective: Objective = "params",
    latency_runtime: LatencyRuntime = "transformers",
    evaluations: Evaluations = 200,
    calibration: Calib = DEFAULT_CALIBRATION,
    evaluation: EvalText = DEFAULT_EVALUATION,
    seq_len: SeqLenOpt = 256,
    calibration_windows: CalibWindows = SearchJob.calibration_windows,
    fitness_windows: FitnessWindows = 16,
    selection_windows: SelectionWindows = 8,
    evaluation_windows: EvalWindows = 16,
    fitness: Fitness = "kl",
    stages: Stages = 3,
    metric: Metric = DEFAULT_METRIC,
    per_layer: PerLayer = True,
    depth: Depth = True,
    min_ratio: MinRatio = 0.2,
    max_ratio: MaxRatio = 1.0,
    frozen: Frozen = "",
    seed: Seed = 0,
    storage: Storage = None,
    study_name: StudyName = STUDY_NAME,
    workers: Workers = 1,
    resume: Resume = False,
    reform: Reform = True,
    reform_candidates: ReformCandidates = False,
    refine_epochs: RefineEpochs = SearchJob.refine_epochs,
    refine_windows: RefineWindows = SearchJob.refine_windows,
    overwrite: Annotated[
        bool, typer.Option(help="use a non-empty --out that holds no search (or replace its search)")
    ] = False,
) -> dict:
    return locals()


def _resolved(fn) -> list[inspect.Parameter]:
    """Parameters with their annotations evaluated (this module postpones them; typer needs the real ones)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()]


def _with_search_options(command):
    """Give ``command`` the MODEL argument, ``--out``, ``--config`` and every search option (one
    definition for ``search`` and ``compress``); it receives the assembled ``jobs``, one per budget of
    ``--params`` (``jobs.budget_jobs``)."""
    own = [p for p in _resolved(command) if p.name != "jobs"]
    shared = _resolved(_search_options)

    @functools.wraps(command)
    def run(context: typer.Context, model: str | None, out_dir: Path | None, config: Path | None, **kwargs):
        options = {name: kwargs.pop(name) for name in [p.name for p in shared]}
        # typer bundles its own click, so the source is compared by name, not with click's enum
        typed = {name for name in options if context.get_parameter_source(name).name != "DEFAULT"}
        fractions = parse_fractions(options["params_fraction"]) if options["params_fraction"] else ()
        options["params_fraction"] = fractions[0] if fractions else None
        job = _job(model, out_dir, options, typed if config else None, config)
        return command(**kwargs, jobs=budget_jobs(job, fractions))

    run.__signature__ = inspect.Signature([*_resolved(_job_arguments), *own, *map(_in_panel, shared)])
    return run


PANELS = {  # --help groups the many search options
    "Budget": (
        "params_fraction",
        "non_embedding_fraction",
        "max_params",
        "max_memory",
        "max_latency_ms",
        "min_speedup",
    ),
    "Search": ("strategy", "objective", "latency_runtime", "evaluations", "fitness", "stages", "metric", "seed"),
    "Space": ("per_layer", "depth", "min_ratio", "max_ratio", "frozen"),
    "Text": (
        "calibration",
        "evaluation",
        "seq_len",
        "calibration_windows",
        "fitness_windows",
        "selection_windows",
        "evaluation_windows",
    ),
    "Weights": ("dtype", "device", "stream", "reform", "reform_candidates", "refine_epochs", "refine_windows"),
    "Store and workers": ("storage", "study_name", "workers", "resume", "overwrite"),
}


def _in_panel(parameter: inspect.Parameter) -> inspect.Parameter:
    """``parameter`` shown in its ``PANELS`` group (a copy of its option: the aliases are shared)."""
    panel = next((name for name, members in PANELS.items() if parameter.name in members), None)
    kind, *extras = typing.get_args(parameter.annotation)
    if panel is None or not extras:
        return parameter
    option = copy.copy(extras[0])
    option.rich_help_panel = panel
    return parameter.replace(annotation=Annotated[kind, option])


def _job_arguments(
    context: typer.Context, model: JobModel = None, out_dir: RunOut = None, config: Config = None
) -> None:
    """The arguments that say which job runs (their annotations are typer's)."""


EXAMPLES = {
    "search": "Examples: slimlm search smollm2-135m --params 0.8 --out runs/s80 · "
    "slimlm search smollm2-135m --max-params 90M --strategy nsga2 --out runs/n90 · "
    "slimlm search --config runs/s80/job.toml --out runs/again",
    "compress": "Examples: slimlm compress smollm2-135m --params 0.7 --out runs/demo · "
    "slimlm compress model.gguf --params 0.8 --quant q8_0 --out runs/q · "
    "slimlm compress --config runs/demo/job.toml --evaluations 400 --out runs/longer · "
    "slimlm compress smollm2-135m --params 0.9,0.8,0.7 --out runs/sweep",
}


@app.command("search", epilog=EXAMPLES["search"])
@friendly
@_with_search_options
def search_command(
    jobs: list[SearchJob], worker: Worker = False, finalise: Finalise = False, as_json: JsonOpt = False
) -> None:
    """Search for Pareto-optimal sub-networks within a budget; write the run folder."""
    if len(jobs) > 1 and (worker or finalise):
        raise SlimlmError("--worker and --finalise share one store: give them one budget")
    reports = [_search_one(job, worker, finalise, as_json and len(jobs) == 1) for job in jobs]
    if as_json and len(jobs) > 1:
        out.print_json(json.dumps(reports))


def _search_one(job: SearchJob, worker: bool, finalise: bool, as_json: bool) -> dict | None:
    from slimlm.progress import time_summary
    from slimlm.report import search_summary, write_report
    from slimlm.search import search as run_search

    if worker and finalise:
        raise SlimlmError("--worker evaluates and --finalise reports: give one of them (or neither, for both)")
    if worker:
        _, study = run_search(job, role="worker")
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")
        out.print(f"worker done: the study {job.study_name!r} holds {done} evaluated candidates; the finaliser reports")
        return None
    out_dir = _run_folder(job)
    searcher, study = run_search(job, role="finaliser" if finalise else "all")
    report = write_report(searcher, study)
    if as_json:
        out.print_json(json.dumps(report))
        return report
    rows = [
        [
            f"trial {m['trial']}",
            f"{m['params']:,}",
            f"{m['params_fraction']:.3f}",
            f"{m['calibration_perplexity']:.2f}",
            f"{m['evaluation_perplexity']:.2f}",
            f"{m['latency_ms']:.1f} ms",
            "yes" if m["trial"] == report["best_trial"] else "",
        ]
        for m in [*report["front"], *(f for f in report["finalists"] if f not in report["front"])]
    ]
    for name in ("uniform_importance", "dense"):
        m = report[name]
        if m is None:
            continue
        rows.append(
            [
                name.replace("_", " "),
                f"{m['params']:,}",
                f"{m['params_fraction']:.3f}",
                f"{m['calibration_perplexity']:.2f}",
                f"{m['evaluation_perplexity']:.2f}",
                f"{m['latency_ms']:.1f} ms",
                "",
            ]
        )
    latency = f"prefill {job.seq_len}" if job.latency_runtime == "transformers" else "llama.cpp per token"
    columns = ["", "parameters", "fraction", "calib ppl", "eval ppl", latency, "best"]
    out.print(_table(f"Pareto front: {job.strategy}, {report['evaluations']} candidates", columns, rows))
    out.print(f"hypervolume {report['hypervolume']:.4f} (kept parameters vs log perplexity over dense)")
    out.print(escape(search_summary(report)))
    out.print(time_summary(report["seconds"]))
    out.print(
        f"wrote {out_dir}/pareto.json, {out_dir}/pareto.png"
        + (f", {out_dir}/best" if report["best_trial"] is not None else "")
    )
    return report


@app.command(epilog=EXAMPLES["compress"])
@friendly
@_with_search_options
def compress(
    jobs: list[SearchJob],
    quant: Annotated[
        str | None,
        typer.Option(help=f"also write RUN/best quantized: {', '.join(ALL_QUANT_TYPES)} (int8: transformers)"),
    ] = None,
    tokenizer_pre: TokenizerPre = None,
    finalise: Finalise = False,
    heal_steps: Annotated[
        int, typer.Option(help="then distil RUN/best from the dense model for N steps into RUN/healed (0: no)")
    ] = 0,
    heal_data: Annotated[
        str | None,
        typer.Option(help="what --heal-steps heals on (default: the calibration, with `chat` for a chat model)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Search, save the best model within the budget in RUN/best, and compare it with the dense model."""
    from slimlm.pipeline import compress as compress_model
    from slimlm.pipeline import compress_budgets

    options = {"quant": quant, "tokenizer_pre": tokenizer_pre, "heal_steps": heal_steps, "heal_data": heal_data}
    if len(jobs) > 1:
        if finalise:
            raise SlimlmError("--finalise reports one store: give it one budget")
        summary = compress_budgets(jobs, Path(jobs[0].out).parent, **options)  # RUN, above RUN/params-0.9 ...
        if as_json:
            out.print_json(json.dumps(summary))
            return
        rows = [
            [
                f"{r['params_fraction']:.3f}",
                f"{r['params']:,}",
                f"{r['perplexity']:.2f}",
                f"{r['prefill_speedup']:.2f}x",
                f"{r['decode_speedup']:.2f}x",
                f"{r['chat_kl_per_token']:.3f}",
                r["run"],
            ]
            for r in summary["runs"]
        ]
        columns = ["kept", "parameters", "perplexity", "prefill", "decode", "chat KL", "run"]
        dense = summary["runs"][0]["dense_perplexity"]
        out.print(_table(f"{summary['model']}: dense perplexity {dense:.2f}", columns, rows))
        out.print(f"trade-off in {Path(jobs[0].out).parent / 'budgets.md'}; each run's own report in its folder")
        return
    (job,) = jobs
    _run_folder(job)
    report = compress_model(job, **options, role="finaliser" if finalise else "all")
    if as_json:
        out.print_json(json.dumps(report))
        return
    from slimlm.progress import time_summary

    model, out_dir = job.model, Path(job.out)
    dense, small = report["dense"], report["compressed"]
    rows = _comparison_rows(dense, small, report["speed_prompt_tokens"], subject=1)
    rows.insert(
        2,
        [
            f"perplexity ({report['evaluation']})",
            f"{dense['perplexity']:.2f}",
            f"{small['perplexity']:.2f}",
            f"{small['perplexity'] / dense['perplexity']:.2f}x",
        ],
    )
    for task, result in report["accuracy"].items():
        if "not_measured" in result:
            continue  # said below the table
        dense_acc, small_acc = result["dense"]["accuracy"], result["compressed"]["accuracy"]
        rows.append([f"{task} accuracy", f"{dense_acc:.3f}", f"{small_acc:.3f}", f"{small_acc - dense_acc:+.3f}"])
    out.print(_table(f"{model} -> {out_dir / 'best'}", ["", "dense", "compressed", "ratio"], rows))
    for task, result in report["accuracy"].items():
        if "not_measured" in result:
            out.print(escape(f"{task} accuracy not measured: {result['not_measured']}"))
    how = "trust_remote_code=True" if report["needs_remote_code"] else "plain from_pretrained"
    if report["uniform_importance_perplexity"] is not None:
        out.print(
            f"uniform importance-ranked sub-network at the same budget: perplexity "
            f"{report['uniform_importance_perplexity']:.2f} ({'reformed' if report['reformed'] else 'not reformed'})"
        )
    out.print(escape(report["summary"]))
    chat = report["chat"]
    how_asked = "through the chat template" if chat["templated"] else "as plain text (no chat template)"
    out.print(
        f"chat fidelity on {chat['prompts']} prompts {how_asked}: KL to dense {chat['kl_per_token']:.3f} nats/token, "
        f"dense token agreement {chat['dense_token_agreement']:.0%}, answers starting as dense's "
        f"{chat['first_tokens_match']:.0%}"
    )
    sample = chat["samples"][0] if chat["samples"] else None
    if sample:
        out.print(escape(f"  {sample['prompt']!r}: dense {sample['dense']!r} / compressed {sample['compressed']!r}"))
    reformed = "reformed" if report["reformed"] else "not reformed"
    out.print(f"saved {out_dir / 'best'}, {reformed} (loads with {how})")
    if healed := report.get("healed"):
        out.print(
            f"healed {healed['steps']} steps ({healed['seconds']:.0f} s) into {healed['folder']}: perplexity "
            f"{small['perplexity']:.2f} -> {healed['perplexity']:.2f}, chat KL to dense {chat['kl_per_token']:.3f} -> "
            f"{healed['chat']['kl_per_token']:.3f}, answers starting as dense's {chat['first_tokens_match']:.0%} -> "
            f"{healed['chat']['first_tokens_match']:.0%}"
        )
    out.print(time_summary(report["seconds"]))
    out.print(f"report in {out_dir / 'slimlm_report.json'} and {out_dir / 'report.md'}")
    if quantized := report.get("quantized"):
        measured = (
            f"perplexity {quantized['perplexity']:.2f}"
            if quantized["perplexity"] is not None
            else f"perplexity not measured: {llamacpp.INSTALL}"
        )
        line = f"saved {quantized['path']} ({quantized['quant']}): {_mb(quantized['disk_bytes'])}, {measured}"
        out.print(escape(line))
