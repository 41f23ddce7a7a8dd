"""The end-to-end job: a model and a budget in, a smaller real model out, measured against the dense one."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from slimlm.allocator import release
from slimlm.chat import chat_fidelity, chat_reference, has_template
from slimlm.costs import measure_latency, probe_lengths, static_cost
from slimlm.data import check_spec
from slimlm.errors import SlimlmError
from slimlm.evaluate import perplexity
from slimlm.extract import folder_bytes, needs_remote_code
from slimlm.heal import HealJob, heal
from slimlm.heal import check as check_heal
from slimlm.jobs import heal_data as default_heal_data
from slimlm.models import LoadedModel, load_model
from slimlm.progress import time_summary, timed
from slimlm.quantize import check_quant, quantize, quantized_bytes, quantized_perplexity
from slimlm.report import search_summary, write_report
from slimlm.search import SearchJob, search
from slimlm.tasks import TASKS, build_task, evaluate_task

REPORT_FILE = "slimlm_report.json"
STREAMED_NOTE = "Both models were streamed from disk (`--stream`): speeds include reading every layer per forward."
HEALED = "healed"  # RUN/healed: best/ after recovery distillation
MARKDOWN_FILE = "report.md"
BUDGETS_FILE = "budgets"  # RUN/budgets.json and .md: the trade-off across the budgets of one run


@dataclass(frozen=True)
class ModelReport:
    """One model's size, quality and speed, measured in the same run as the models it is compared to."""

    name: str
    params: int
    params_without_embeddings: int
    flops_per_token: int
    disk_bytes: int
    perplexity: float
    prefill_ms: float
    decode_tokens_per_s: float


def describe(loaded: LoadedModel, windows, latency, name: str, context: int, description: str) -> ModelReport:
    """Measure ``loaded`` into a report (perplexity on ``windows``; ``latency`` already measured)."""
    cost = static_cost(loaded.dims, context=context)
    return ModelReport(
        name=name,
        params=cost.params,
        params_without_embeddings=cost.params_without_embeddings,
        flops_per_token=cost.flops_per_token,
        disk_bytes=folder_bytes(loaded.folder),
        perplexity=perplexity(loaded.model, windows, description=description),
        prefill_ms=latency.prefill_ms,
        decode_tokens_per_s=latency.decode_tokens_per_s,
    )


def compress(
    job: SearchJob,
    repeats: int = 3,
    quant: str | None = None,
    tokenizer_pre: str | None = None,
    heal_steps: int = 0,
    heal_data: str | None = None,
    role: str = "all",
) -> dict:
    """Search ``job``, write its run folder (store, ``pareto.json``, ``pareto.png``, ``best/``), then
    reload ``best/`` from disk as a user would and measure it against the dense model, one model in
    memory at a time (the dense model's figures first).
    With ``quant``, also write ``best/`` in that type (``best.q8_0.gguf``, ``best-int8/``) and measure
    its size and perplexity. With ``heal_steps``, also distil ``best/`` from the dense model for that
    many steps on ``heal_data`` (default ``jobs.heal_data``: the calibration text, with the model's own
    chat where it has a template) into ``healed/`` (``slimlm.heal``) and measure it the same way.
    ``role`` ``finaliser`` evaluates nothing itself: the workers of ``job.storage`` do (``search``).

    Returns the comparison, also saved as ``RUN/slimlm_report.json``.
    """
    loaded = load_model(job.model, job.dtype, job.device, job.stream)
    if quant is not None:
        check_quant(loaded, quant, tokenizer_pre)  # before the search, not after it
    heal_job = HealJob(model=str(Path(job.out) / "best"), teacher=job.model, out=str(Path(job.out) / HEALED))
    data = heal_data or default_heal_data(job.calibration, has_template(loaded.tokenizer))
    heal_job = replace(heal_job, data=data, seq_len=job.seq_len, steps=heal_steps, seed=job.seed)
    if heal_steps < 0:
        raise SlimlmError("--heal-steps must be 0 (no recovery) or more")
    if heal_steps and job.stream:
        raise SlimlmError("--heal-steps trains the weights in memory: it cannot be combined with --stream")
    if heal_steps:
        check_heal(heal_job)
        check_spec(data)  # a bad spec refused now, not after the search
    tasks = cloze_tasks(loaded.tokenizer, job.evaluation)  # from the evaluation text, before the long part
    searcher, study = search(job, loaded, role)  # "finaliser": the workers of job.storage evaluate
    pareto = write_report(searcher, study)
    release()  # the search's and the finalists' temporaries: the measurements below start from what is alive
    if pareto["best_trial"] is None:
        raise SlimlmError("the search found no candidate within the budget; allow more evaluations or a larger budget")
    out, dense, evaluation_ids = Path(job.out), searcher.loaded, searcher.evaluation_ids
    del loaded, searcher  # ``dense`` is the only hold on the dense model from here
    lengths = probe_lengths(dense.dims.max_positions)
    # one model in memory at a time: the dense model's figures, then the compressed model's (timed one
    # after the other, not interleaved); the chat reference keeps what fidelity needs of the dense model
    seconds = dict(pareto["seconds"])  # the search's phases, then the measurements'
    measure = {
        "windows": evaluation_ids,
        "tasks": tasks,
        "lengths": lengths,
        "repeats": repeats,
        "seq_len": job.seq_len,
    }
    with timed(seconds, "dense figures"):
        reference = chat_reference(dense.model, dense.tokenizer)
        dense_report, dense_accuracy = _measured(dense, "dense", f"dense {job.model}", **measure)
    if heal_steps:
        with timed(seconds, "healing"):
            healed = _healed(heal_job, dense, tasks, evaluation_ids, reference)  # the dense model is the teacher
    del dense
    release()
    with timed(seconds, "compressed figures"):
        small = load_model(out / "best", job.dtype, job.device, job.stream)
        small_report, small_accuracy = _measured(small, "compressed", str(out / "best"), **measure)
        chat = chat_fidelity(small.model, small.tokenizer, reference)
    report = {
        "model": job.model,
        "budget": pareto["budget"],
        "strategy": job.strategy,
        "evaluations": pareto["evaluations"],
        "calibration": job.calibration,
        "evaluation": job.evaluation,
        "seq_len": job.seq_len,
        "evaluation_tokens": evaluation_ids.numel(),
        "speed_prompt_tokens": lengths[0],  # prefill timed on this many tokens, then ``speed_new_tokens`` decoded
        "speed_new_tokens": lengths[1],
        "streamed": job.stream,  # timed while every layer was read from disk per forward
        "needs_remote_code": needs_remote_code(out / "best"),
        "reformed": pareto["best_reformed"],
        "reformation": pareto.get("best_reformation"),
        "refinement": pareto.get("refinement"),  # the winner's layer-wise refinement (slimlm.refine)
        "fitness": job.fitness,
        "best_start": pareto.get("best_start"),  # the best rule-made start, reformed, on the evaluation text
        "search_gain": pareto.get("search_gain"),
        "fitness_evaluation_spearman": pareto["fitness_evaluation_spearman"],
        "summary": search_summary(pareto),
        "uniform_importance_perplexity": (pareto["uniform_importance"] or {}).get("evaluation_perplexity"),
        "dense": asdict(dense_report),
        "compressed": asdict(small_report),
        # cloze accuracy on the evaluation text, and chat: what users deploy Instruct models for
        "accuracy": {task: dense_accuracy[task] | small_accuracy[task] for task in tasks},
        "chat": chat,
        "seconds": seconds,  # wall time per phase: the search's, the measurements', healing, quantization
    }
    if heal_steps:
        report["healed"] = healed
    if quant is not None:
        with timed(seconds, "quantization"):
            path = quantize(small, quant, tokenizer_pre)
            report["quantized"] = {
                "quant": quant,
                "path": str(path),
                "disk_bytes": quantized_bytes(path),
                "perplexity": quantized_perplexity(path, evaluation_ids),  # None: llama.cpp is not installed
            }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (out / MARKDOWN_FILE).write_text(markdown_report(report, out), encoding="utf-8")
    return report


def compress_budgets(jobs: list[SearchJob], folder: str | Path, **options) -> dict:
    """``compress`` each job (one per budget, ``jobs.budget_jobs``), then write the trade-off across
    them to ``folder``/budgets.json and budgets.md. ``options`` are ``compress``'s."""
    rows = []
    for job in jobs:
        report = compress(job, **options)
        dense, small = report["dense"], report["compressed"]
        rows.append(
            {
                "run": job.out,
                "params_fraction_budget": job.params_fraction,
                "params": small["params"],
                "params_fraction": small["params"] / dense["params"],
                "perplexity": small["perplexity"],
                "dense_perplexity": dense["perplexity"],
                "prefill_speedup": dense["prefill_ms"] / small["prefill_ms"],
                "decode_speedup": small["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                "chat_kl_per_token": report["chat"]["kl_per_token"],
                "chat_first_tokens_match": report["chat"]["first_tokens_match"],
                "search_gain": report["search_gain"],
            }
        )
    summary = {"model": jobs[0].model, "evaluation": jobs[0].evaluation, "runs": rows}
    folder = Path(folder)
    (folder / f"{BUDGETS_FILE}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / f"{BUDGETS_FILE}.md").write_text(budgets_markdown(summary), encoding="utf-8")
    return summary


def budgets_markdown(summary: dict) -> str:
    """The trade-off across one run's budgets as a markdown table."""
    lines = [
        f"# {summary['model']} at {len(summary['runs'])} budgets",
        "",
        f"Perplexity on `{summary['evaluation']}` (dense {summary['runs'][0]['dense_perplexity']:.2f}); speed-ups "
        "against dense in transformers, timed one after the other in each run.",
        "",
        "| kept | parameters | perplexity | prefill | decode | chat KL | first tokens as dense | run |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['params_fraction']:.3f} | {r['params']:,} | {r['perplexity']:.2f} | {r['prefill_speedup']:.2f}x | "
            f"{r['decode_speedup']:.2f}x | {r['chat_kl_per_token']:.3f} | {r['chat_first_tokens_match']:.0%} | "
            f"`{r['run']}` |"
        )
    return "\n".join(lines) + "\n"


def _measured(
    loaded: LoadedModel, role: str, name: str, windows, tasks: dict, lengths, repeats: int, seq_len: int
) -> tuple[ModelReport, dict]:
    """One model's report (speed, size, perplexity on ``windows``) and cloze accuracies, as ``role``."""
    latency = measure_latency(loaded.model, *lengths, repeats)
    report = describe(loaded, windows, latency, name, seq_len, f"perplexity ({role})")
    return report, accuracy({role: loaded.model}, tasks)


def _healed(job: HealJob, dense: LoadedModel, tasks: dict, evaluation_ids, reference) -> dict:
    """Heal ``best/`` into ``healed/`` and measure it as the compressed model is measured."""
    began = time.perf_counter()
    folder = heal(job, teacher=dense)
    seconds = time.perf_counter() - began
    healed = load_model(folder)
    return {
        "folder": str(folder),
        "steps": job.steps,
        "data": job.data,
        "seconds": seconds,
        "perplexity": perplexity(healed.model, evaluation_ids, description="perplexity (healed)"),
        "accuracy": accuracy({"healed": healed.model}, tasks),
        "chat": chat_fidelity(healed.model, healed.tokenizer, reference, "healed"),
    }


ACCURACY_EXAMPLES = 100  # per task: a standard error of about 4-5 points, in well under a minute per model


def cloze_tasks(tokenizer, text: str) -> dict:
    """slimlm's offline cloze tasks built from ``text``: ``{task: examples}``, or ``{task: reason}``
    where the text cannot give them (too short): said in the report, not skipped silently."""
    tasks = {}
    for name in TASKS:
        try:
            tasks[name] = build_task(name, text, tokenizer, examples=ACCURACY_EXAMPLES)
        except SlimlmError as error:
            tasks[name] = str(error)
    return tasks


def accuracy(models: dict, tasks: dict) -> dict:
    """Each named model on each of ``tasks`` (see ``cloze_tasks``): ``{task: {name: TaskResult as a
    dict}}``, or ``{task: {"not_measured": reason}}``."""
    results = {}
    for task, examples in tasks.items():
        if isinstance(examples, str):
            results[task] = {"not_measured": examples}
            continue
        results[task] = {
            name: asdict(evaluate_task(model, examples, description=f"{task} ({name})"))
            for name, model in models.items()
        }
    return results


def markdown_report(report: dict, out: Path) -> str:
    """``RUN/report.md``: the comparison, the search, chat answers side by side, and how to rerun and load."""
    dense, small, chat = report["dense"], report["compressed"], report["chat"]
    rows = [
        ("parameters", f"{dense['params']:,}", f"{small['params']:,}", small["params"] / dense["params"]),
        ("weights on disk (MB)", f"{dense['disk_bytes'] / 1e6:,.1f}", f"{small['disk_bytes'] / 1e6:,.1f}", None),
        (f"perplexity, {report['evaluation']}", f"{dense['perplexity']:.2f}", f"{small['perplexity']:.2f}", None),
        ("prefill (ms)", f"{dense['prefill_ms']:.1f}", f"{small['prefill_ms']:.1f}", None),
        ("decode (tokens/s)", f"{dense['decode_tokens_per_s']:.1f}", f"{small['decode_tokens_per_s']:.1f}", None),
        *(
            (f"{task} accuracy", f"{r['dense']['accuracy']:.3f}", f"{r['compressed']['accuracy']:.3f}", None)
            for task, r in report["accuracy"].items()
            if "not_measured" not in r
        ),
    ]
    how = ", trust_remote_code=True" if report["needs_remote_code"] else ""
    asked = "through its chat template" if chat["templated"] else "as plain text (the model has no chat template)"
    lines = [
        f"# slimlm: {report['model']} compressed",
        "",
        "| | dense | compressed |",
        "|---|---:|---:|",
        *(f"| {name} | {a} | {b}{f' ({ratio:.3f})' if ratio else ''} |" for name, a, b, ratio in rows),
        "",
        f"Perplexity on {report['evaluation_tokens']:,} tokens of `{report['evaluation']}`, which no calibration, "
        f"fitness or selection window came from. Search: `{report['strategy']}`, {report['evaluations']} "
        f"candidates, fitness {report['fitness']}, calibration `{report['calibration']}`; "
        f"kept weights {'reformed (' + str(report['reformation']) + ')' if report['reformed'] else 'not reformed'}.",
        *(["", STREAMED_NOTE] if report.get("streamed") else []),
        "",
        report["summary"] + ".",
        "",
        time_summary(report["seconds"]).capitalize() + ".",
        "",
        "![Pareto front](pareto.png)",
        "",
        "## Chat",
        "",
        f"{chat['prompts']} prompts of slimlm's set, asked {asked}; the dense model's greedy answers are the "
        f"reference. KL to dense {chat['kl_per_token']:.3f} nats per token (teacher-forced), the dense token "
        f"at {chat['dense_token_agreement']:.0%} of positions, answers starting as the dense one's "
        f"{chat['first_tokens_match']:.0%}.",
        "",
        "| prompt | dense | compressed |",
        "|---|---|---|",
        *(f"| {_cell(x['prompt'])} | {_cell(x['dense'])} | {_cell(x['compressed'])} |" for x in chat["samples"]),
        "",
        *_healed_lines(report),
        "## Reproduce and load",
        "",
        "```bash",
        f"slimlm compress --config {out / 'job.toml'} --out {out}-again",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{out / "best"}"{how})',
        f'tokenizer = AutoTokenizer.from_pretrained("{out / "best"}"{how})',
        "```",
        "",
    ]
    return "\n".join(lines)


def _healed_lines(report: dict) -> list[str]:
    """The report's recovery section: the healed model against the compressed one (none without healing)."""
    healed = report.get("healed")
    if healed is None:
        return []
    small, chat = report["compressed"], healed["chat"]
    accuracies = [
        f"{task} {r['compressed']['accuracy']:.3f} -> {healed['accuracy'][task]['healed']['accuracy']:.3f}"
        for task, r in report["accuracy"].items()
        if "not_measured" not in r
    ]
    return [
        "## Recovery",
        "",
        f"`{healed['folder']}`: `best/` distilled from the dense model for {healed['steps']} steps on "
        f"`{healed['data']}` ({healed['seconds']:.0f} s). "
        f"Perplexity {small['perplexity']:.2f} -> {healed['perplexity']:.2f}; "
        f"chat KL to dense {report['chat']['kl_per_token']:.3f} -> {chat['kl_per_token']:.3f} nats per token, "
        f"answers starting as the dense one's {report['chat']['first_tokens_match']:.0%} -> "
        f"{chat['first_tokens_match']:.0%}" + (f"; accuracy {', '.join(accuracies)}." if accuracies else "."),
        "",
    ]


def _cell(text: str) -> str:
    """Text in one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"
