"""The Pareto front of a search: chosen, measured on evaluation text, written as JSON and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import matplotlib
import numpy as np
import optuna

from slimlm.apply import subnetwork_applied
from slimlm.costs import static_cost
from slimlm.evaluate import perplexity
from slimlm.extract import extract
from slimlm.models import BUILTIN_MODELS
from slimlm.progress import timed, track
from slimlm.refine import refine_extracted
from slimlm.reform import reform, spill
from slimlm.search import EXHAUSTED_ATTR, Searcher, open_study, prepare, stored_candidate
from slimlm.strategies import SUBNET_ATTR, candidate, completed, evaluations_done, ranked, stage_of
from slimlm.subnet import SubNetwork

matplotlib.use("Agg")  # files only; no display on servers

from matplotlib import pyplot as plt
from matplotlib import ticker

FINALISTS = 3  # fittest last-stage candidates (with the best start) among which the winner is chosen
HYPERVOLUME_CAP = 100.0  # perplexity over dense beyond which a sub-network adds no hypervolume (half-size
# SmolLM2 models score 6-15x dense: a cap of 10 gave every search at 0.5 kept a hypervolume of 0)


def pareto_front(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials no other trial beats on both objectives (lower is better), cheapest first. Given the last
    fidelity stage's trials: ``study.best_trials`` would mix fitness measured on different windows."""
    front = [
        t
        for t in trials
        if not any(o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in trials)
    ]
    unique = {tuple(t.values): t for t in sorted(front, key=lambda t: t.number)}  # one per point
    return sorted(unique.values(), key=lambda t: t.values[1])


def hypervolume(points: list[tuple[float, float]], dense_params: int, dense_perplexity: float) -> float:
    """Area of the (kept parameter fraction, log perplexity over dense) plane the points dominate, up to
    the fixed reference (1, log ``HYPERVOLUME_CAP``): one number, larger is better, comparable across
    searches, strategies and trainings of one model. Points worse than the cap count nothing."""
    # two objectives: a sweep in order of cost, each point adding the strip below the best loss so far
    # (Optuna's hypervolume is private API; the 2-D case needs none)
    cap = math.log(HYPERVOLUME_CAP)
    losses = sorted((params / dense_params, math.log(ppl / dense_perplexity)) for params, ppl in points)
    area, best = 0.0, cap
    for cost, loss in losses:
        if cost < 1.0 and loss < best:
            area += (1.0 - cost) * (best - loss)
            best = loss
    return area


def spread(front: list, size: int) -> list:
    """At most ``size`` members evenly spread along the front, always keeping both ends."""
    if len(front) <= size:
        return front
    if size < 2:
        return front[:size]
    picks = {round(i * (len(front) - 1) / (size - 1)) for i in range(size)}
    return [front[i] for i in sorted(picks)]


def measure(searcher: Searcher, subnet: SubNetwork | None, evaluation_ids, reformed: dict | None = None) -> dict:
    """A sub-network (None: the dense model) as the search scored it (library weights) or with
    ``reformed`` weights: perplexity on fitness, selection and evaluation windows, and latency."""
    full = SubNetwork.full(searcher.context.dims)
    subnet = subnet or full
    cost = searcher.cost(subnet)
    if reformed is None and subnet != full:
        reformed = searcher.reformed(subnet)
    with subnetwork_applied(searcher.loaded, subnet, reformed, views=True) as model:  # contiguous: timed as extracted
        latency = searcher.latency_ms(model)
        return {
            "params": cost.params,
            "params_fraction": cost.params / searcher.cost(full).params,
            "flops_per_token": cost.flops_per_token,
            "memory_bytes": cost.memory_bytes,
            "latency_ms": latency,  # timed: what the report states
            **({"predicted_latency_ms": searcher.latency.ms(subnet.shapes())} if searcher.latency else {}),
            "calibration_perplexity": perplexity(model, searcher.fitness_ids),
            "selection_perplexity": perplexity(model, searcher.selection_ids),
            "evaluation_perplexity": perplexity(model, evaluation_ids),
        }


def last_stage(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials of the highest fidelity stage reached: the only ones whose fitness compares."""
    trials = completed(study)
    top = max((stage_of(t) for t in trials), default=0)
    return [t for t in trials if stage_of(t) == top]


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation of two equally long sequences (None for fewer than 3 points)."""
    if len(xs) < 3:
        return None
    rx, ry = (np.argsort(np.argsort(np.asarray(v, dtype=float))) for v in (xs, ys))
    return float(np.corrcoef(rx, ry)[0, 1])


def _finalist(searcher: Searcher, trial: optuna.trial.FrozenTrial, sequential: bool) -> dict:
    """A finalist scored on the selection windows as the library stitches it and, where reformation is
    on, after the sequential reformation the shipped model would get; the better of the two is kept."""
    subnet = candidate(trial)
    options = {"library": searcher.reformed(subnet)}
    if sequential:
        options["sequential"] = reform(searcher.loaded, subnet, searcher.calibration_ids)
    scores = {}
    for name, weights in options.items():
        with subnetwork_applied(searcher.loaded, subnet, weights, views=True) as model:
            scores[name] = perplexity(model, searcher.selection_ids)
    way = min(scores, key=scores.get)
    weights = None if options[way] is None else spill(options[way])  # on disk until the winner is extracted
    return {"trial": trial.number, "selection_perplexity": scores, "reformation": way, "weights": weights}


def _selection_score(finalist: dict) -> float:
    return min(finalist["selection_perplexity"].values())


def _choose(searcher: Searcher, finalists: list[optuna.trial.FrozenTrial], start: int | None) -> list[dict]:
    """Every finalist scored (``_finalist``); weights are kept only for the best so far and the best
    start (trial ``start``), the two models measured afterwards: each set is a model's worth of
    output projections, so keeping every finalist's would cost a model's memory per finalist."""
    chosen: list[dict] = []
    for trial in track(finalists, "choosing among the finalists"):
        chosen.append(_finalist(searcher, trial, searcher.job.reform))
        best = min(chosen, key=_selection_score)
        for other in chosen:
            if other is not best and other["trial"] != start:
                other.pop("weights", None)
    return chosen


def _member(searcher: Searcher, trial: optuna.trial.FrozenTrial, starts: set[str]) -> dict:
    """A front member or finalist as the report lists it, measured on the evaluation text."""
    subnet = candidate(trial)
    return {
        "trial": trial.number,
        "stage": stage_of(trial),
        "fitness": trial.values[0],
        **measure(searcher, subnet, searcher.evaluation_ids),
        "within_budget": searcher.context.fits(subnet),
        "start": trial.user_attrs[SUBNET_ATTR] in starts,
        "subnet": subnet.to_json(),
    }


def write_report(searcher: Searcher, study: optuna.Study, front_size: int = 6) -> dict:
    """Evaluate the front on evaluation text; choose the winner; write ``pareto.json``, ``pareto.png``, ``best/``.

    The front is that of the last fidelity stage, ``front_size`` members spread along it. The winner
    is chosen on selection windows no fitness saw, among the ``FINALISTS`` fittest within-budget
    members and the best start (the rules a search must beat), each as the library stitches it and
    after the sequential reformation; the report states the best start against the winner.
    """
    job, out = searcher.job, Path(searcher.job.out)
    evaluation_ids = searcher.evaluation_ids
    trials = last_stage(study)
    whole = pareto_front(trials)
    within = [t for t in sorted(trials, key=lambda t: t.values[0]) if searcher.context.fits(candidate(t))]
    starts = {s.to_compact() for s in searcher.context.starts}
    fittest = within[:FINALISTS]
    best_start = next((t for t in ranked(study) if t.user_attrs[SUBNET_ATTR] in starts), None)
    finalists = {t.number: t for t in [*fittest, *([best_start] if best_start else [])]}
    shown = spread(whole, front_size)
    measured = sorted({t.number: t for t in [*shown, *finalists.values()]}.values(), key=lambda t: t.values[1])
    with timed(searcher.seconds, "front"):
        members = {
            t.number: _member(searcher, t, starts) for t in track(measured, "evaluating the front and the finalists")
        }
        dense = measure(searcher, None, evaluation_ids)
    top = [m for m in members.values() if trials and m["stage"] == stage_of(trials[0])]
    with timed(searcher.seconds, "finalists"):
        uniform = None
        if searcher.reference:  # its widths need not be levels of the library: reformed as ``extract`` would
            # reformed weights passed on, not named: freed once measured, before the finalists are reformed
            uniform = measure(
                searcher,
                searcher.reference,
                evaluation_ids,
                reform(searcher.loaded, searcher.reference, searcher.calibration_ids) if job.reform else None,
            )
        # every finalist fits: the fittest are taken within the budget, and every start fills it
        chosen = _choose(searcher, list(finalists.values()), best_start.number if best_start else None)
    best = min(chosen, key=_selection_score) if chosen else None
    report = {
        "model": job.model,
        "strategy": job.strategy,
        "objective": job.objective,
        "fitness": job.fitness,
        "fitness_stages": list(searcher.context.stages),
        "budget": asdict(searcher.budget),
        "evaluations": evaluations_done(study),
        "evaluations_asked": job.evaluations,
        # the search ended before ``evaluations_asked``: the space gave no new candidate within the budget
        "space_exhausted": bool(study.user_attrs.get(EXHAUSTED_ATTR)),
        # the fidelity stage whose fitness ranked the front and the finalists (0: the fewest windows)
        "fitness_stage_reached": stage_of(trials[0]) if trials else None,
        "trials": len(completed(study)),
        # what priced the candidates' latency, and its error on timed sub-networks it was not fitted on
        "latency_model": searcher.latency.summary() if searcher.latency else None,
        "calibration": job.calibration,
        "evaluation": job.evaluation,
        "seq_len": job.seq_len,
        "dense": dense,
        "uniform_importance": uniform,
        "front": [members[t.number] for t in sorted(shown, key=lambda t: t.values[1])],
        "finalists": [
            members[c["trial"]] | {"reformation": c["reformation"], "finalist_perplexity": c["selection_perplexity"]}
            for c in chosen
        ],
        # how well fitness ranks what is measured on the evaluation text (last-stage members only)
        "fitness_evaluation_spearman": spearman([m["fitness"] for m in top], [m["evaluation_perplexity"] for m in top]),
        "hypervolume": hypervolume(
            [(t.user_attrs["params"], t.user_attrs["perplexity"]) for t in trials],
            dense["params"],
            dense["calibration_perplexity"],
        ),
        "best_trial": best["trial"] if best else None,
        "seconds": searcher.seconds,  # this process's wall time per phase (a resumed search: since it resumed)
    }
    (out / "pareto.json").write_text(json.dumps(report, indent=1) + "\n")
    if best:
        subnet = candidate(study.trials[best["trial"]])
        weights = best["weights"] if job.reform else None
        shipped = _ship(searcher, subnet, best, out / "best")
        extracted = shipped.pop("extracted")
        report["best_evaluation_perplexity"] = shipped["evaluation_perplexity"]
        if "refinement" in shipped:
            report["refinement"] = shipped["refinement"]
        report["best_reformed"] = bool(weights)
        report["best_reformation"] = best["reformation"] if weights else None
        card = model_card(report, job, subnet, searcher.context.dims, extracted.needs_remote_code)
        (out / "best" / "README.md").write_text(card, encoding="utf-8")
        if best_start is not None:
            start = next((c for c in chosen if c["trial"] == best_start.number), None)
            start_weights = start["weights"] if start and job.reform else None
            with subnetwork_applied(searcher.loaded, candidate(best_start), start_weights, views=True) as model:
                start_eval = perplexity(model, evaluation_ids)
            report["best_start"] = {
                "trial": best_start.number,
                "evaluation_perplexity": start_eval,
                "selection_perplexity": min(start["selection_perplexity"].values()) if start else None,
            }
            # like for like: the winner as reformed, before any refinement (the start is not refined)
            unrefined = (report.get("refinement") or {}).get("evaluation_perplexity", {}).get("unrefined")
            report["search_gain"] = 1 - (unrefined or report["best_evaluation_perplexity"]) / start_eval
        (out / "pareto.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, trials, out / "pareto.png")
    return report


def _ship(searcher: Searcher, subnet: SubNetwork, finalist: dict, folder: Path) -> dict:
    """Write a scored finalist (``_finalist``) to ``folder`` as the search ships its winner: extracted with
    its chosen weights, then refined (``slimlm.refine``) where the job refines and the selection windows keep
    it. Returns the ``Extracted`` folder, the shipped model's evaluation perplexity and the refinement."""
    job = searcher.job
    weights = finalist["weights"] if job.reform else None
    with timed(searcher.seconds, "extraction"):
        shipped = {"extracted": extract(searcher.loaded, subnet, folder, weights)}
    with subnetwork_applied(searcher.loaded, subnet, weights, views=True) as model:
        shipped["evaluation_perplexity"] = perplexity(model, searcher.evaluation_ids)
    if weights and job.refine_epochs and job.stream:
        shipped["refinement"] = {"skipped": "the model is streamed: refinement trains its layers in memory"}
    elif weights and job.refines:
        with timed(searcher.seconds, "refinement"):
            shipped["refinement"] = _refined(searcher, subnet, folder, finalist, shipped)
    return shipped


def _refined(searcher: Searcher, subnet: SubNetwork, folder: Path, finalist: dict, shipped: dict) -> dict:
    """Refine the extracted finalist (``slimlm.refine``); where the selection windows keep it, the shipped
    model is the refined one and ``shipped``'s evaluation perplexity becomes its."""
    job = searcher.job
    refinement = refine_extracted(
        folder,
        searcher.loaded,
        subnet.kept_layers,
        searcher.refinement_ids,
        searcher.selection_ids,
        searcher.evaluation_ids,
        _selection_score(finalist),
        job.refine_epochs,
        job.dtype,
        job.device,
    )
    unrefined = shipped["evaluation_perplexity"]
    refined = refinement.pop("evaluation_perplexity")
    refinement["evaluation_perplexity"] = {"unrefined": unrefined, "refined": refined}
    if refinement["kept"]:
        shipped["evaluation_perplexity"] = refined
    return refinement


def extract_trial(run: str | Path, trial: int, out: str | Path) -> dict:
    """Write trial ``trial`` of the search in run folder ``run`` to ``out`` as that search wrote its winner to
    ``best/``: with the run's own model, windows and settings, reformed the way that scores better on the
    selection windows (the library's stitches or the sequential reformation), extracted, and refined where
    the run refines and the selection windows keep it. So a front member other than the winner ships as
    the winner would have. Returns the ``Extracted`` folder, the selection and evaluation perplexities,
    the reformation chosen, the refinement and the dense model's parameter count."""
    job, _ = stored_candidate(run, trial)
    searcher = prepare(job)
    frozen = open_study(job, create=False, fingerprint=searcher.fingerprint).trials[trial]
    finalist = _finalist(searcher, frozen, job.reform)
    shipped = _ship(searcher, candidate(frozen), finalist, Path(out))
    return shipped | {
        "selection_perplexity": finalist["selection_perplexity"],
        "reformation": finalist["reformation"],
        "dense_params": static_cost(searcher.context.dims).params,
    }


SEARCH_ADDS_VALUE = 0.10  # a winner less than 10% below the best start: the rules nearly do as well (issue 15)


def search_summary(report: dict) -> str:
    """One line: the winner against the best start (the rules it must beat), said plainly when the
    search adds little over them, and how well fitness ranked."""
    if report.get("best_trial") is None:
        return "no candidate within the budget"
    line = f"winner trial {report['best_trial']}: evaluation perplexity {report['best_evaluation_perplexity']:.2f}"
    if report.get("best_reformation"):
        line += f" ({report['best_reformation']} reformation)"
    refined = report.get("refinement") or {}
    if "skipped" in refined:
        line += f"; not refined: {refined['skipped']}"
    elif refined:
        selection = refined["selection_perplexity"]
        line += (
            f"; layer-wise refinement: selection perplexity {selection['unrefined']:.2f} -> {selection['refined']:.2f}"
            f" ({'shipped' if refined['kept'] else 'not shipped: no lower'})"
        )
    if start := report.get("best_start"):
        line += (
            f"; best start trial {start['trial']}: {start['evaluation_perplexity']:.2f}"
            f" (search gain {100 * report['search_gain']:+.1f}%)"
        )
        if report["search_gain"] < SEARCH_ADDS_VALUE:
            line += f"; the search adds little over its best start (less than {SEARCH_ADDS_VALUE:.0%})"
    if report.get("fitness_evaluation_spearman") is not None:
        line += f"; fitness vs evaluation rank correlation {report['fitness_evaluation_spearman']:.2f}"
    if model := report.get("latency_model"):
        winner = next(m for m in report["finalists"] if m["trial"] == report["best_trial"])
        speedup = report["dense"]["latency_ms"] / winner["latency_ms"]
        line += (
            f"; its latency timed {winner['latency_ms']:.2f} ms ({speedup:.2f}x"
            f" the dense model), predicted {winner['predicted_latency_ms']:.2f} ms (the latency model's error on"
            f" sub-networks it was not fitted on: {100 * model['mean_abs_check_error']:.1f}% on average)"
        )
    if report.get("space_exhausted"):
        line += (
            f"; the search ended after {report['evaluations']} of {report['evaluations_asked']} candidates:"
            " the space gave no new one within the budget"
        )
    stages, reached = report.get("fitness_stages") or [], report.get("fitness_stage_reached")
    if reached is not None and reached < len(stages) - 1:  # an exhausted or stopped search: fitness on fewer windows
        line += (
            f"; its finalists were ranked at fidelity stage {reached + 1} of {len(stages)}"
            f" ({stages[reached]} of {stages[-1]} fitness windows)"
        )
    return line


def plot(report: dict, trials: list[optuna.trial.FrozenTrial], path: Path) -> None:
    """Perplexity against parameters in two panels: the whole trade-off (dense, every candidate, the
    budget), and the candidates' own region, where a search within a budget crowds them, with the front,
    the best start and the model shipped (as reformed)."""
    fig, (whole, near) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=120)
    millions = 1e6
    xs = [t.user_attrs["params"] / millions for t in trials]
    ys = [t.user_attrs["perplexity"] for t in trials]
    members = {m["trial"]: m for m in [*report["front"], *report["finalists"]]}
    marked = [("dense", report["dense"], "*", "black")]
    if report.get("uniform_importance"):
        marked.append(("uniform importance", report["uniform_importance"], "D", "tab:red"))
    if (start := report.get("best_start")) and start["trial"] in members:
        marked.append(("best start", members[start["trial"]] | start, "P", "tab:purple"))
    if report.get("best_trial") is not None and "best_evaluation_perplexity" in report:
        shipped = members[report["best_trial"]] | {"evaluation_perplexity": report["best_evaluation_perplexity"]}
        marked.append(("shipped (as reformed)", shipped, "*", "tab:green"))
    for ax in (whole, near):
        ax.scatter(xs, ys, s=12, color="0.75", label="candidates (fitness windows)")
        front = report["front"]
        front_xs = [m["params"] / millions for m in front]
        for key, style, color in (("calibration", "o-", "tab:blue"), ("evaluation", "s--", "tab:orange")):
            ax.plot(front_xs, [m[f"{key}_perplexity"] for m in front], style, color=color, label=f"front ({key})")
        for name, point, marker, color in marked:
            x, y = point["params"] / millions, point["evaluation_perplexity"]
            ax.scatter([x], [y], marker=marker, s=160, color=color, zorder=5, label=f"{name} (evaluation)")
        if report["budget"]["params"]:
            ax.axvline(report["budget"]["params"] / millions, color="tab:green", linestyle=":", label="budget")
    if xs:  # the candidates' region: their parameter span and perplexities up to the 90th percentile
        low, high = min(xs), max(xs)
        pad = max(0.02 * (high - low), 0.005 * high)
        near.set_xlim(low - pad, high + pad)
        shown = [y for y in ys if y <= np.quantile(ys, 0.9)] + [p["evaluation_perplexity"] for _, p, _, _ in marked[1:]]
        near.set_ylim(0.95 * min(shown), 1.05 * max(shown))
    title = f"{report['model']}: {report['strategy']} search, {report['evaluations']} candidates"
    perplexity_axes(whole, title)
    perplexity_axes(near, "the candidates' region")
    near.get_legend().remove()  # one legend, on the left
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def perplexity_axes(ax, title: str, ylabel: str = "perplexity (log scale)", legend_size: int = 8) -> None:
    """How slimlm's plots read: log perplexity against millions of parameters, gridded, with a legend."""
    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda value, _: f"{value:.4g}")  # 45.2, not 4.52 x 10^1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


# the tokenizer too: transformers reads the folder's config (slimlm's own model type) to pick it, and
# would otherwise stop at its y/N remote-code prompt; peft knows no default LoRA targets for that type
REMOTE_CODE_NOTE = (
    "Its layers differ in shape, so it ships its modeling code: load the model and the tokenizer with "
    '`trust_remote_code=True`. For LoRA, name the targets: `LoraConfig(target_modules="all-linear")` '
    "(peft has no default for this model type)."
)


def model_card(report: dict, job, subnet: SubNetwork, dims, remote_code: bool) -> str:
    """The ``README.md`` of a saved model: its base model, what was removed, the measured figures
    (on text the search never used), and how to load it."""
    dense, kept = dims.layers, subnet.shapes()
    best = next(m for m in [*report["finalists"], *report["front"]] if m["trial"] == report["best_trial"])
    base = base_model_name(job.model)
    removed = [str(i) for i in range(dims.num_layers) if i not in subnet.layers]
    rows = [
        ("parameters", f"{report['dense']['params']:,}", f"{best['params']:,} ({best['params_fraction']:.3f})"),
        (
            f"perplexity, {job.evaluation}",
            f"{report['dense']['evaluation_perplexity']:.2f}",
            f"{report['best_evaluation_perplexity']:.2f}",
        ),
        ("decoder layers", str(dims.num_layers), str(len(kept))),
        ("attention heads", str(sum(s.heads for s in dense)), str(sum(s.heads for s in kept))),
        ("key/value heads", str(sum(s.kv_heads for s in dense)), str(sum(s.kv_heads for s in kept))),
        ("MLP neurons", f"{sum(s.neurons for s in dense):,}", f"{sum(s.neurons for s in kept):,}"),
    ]
    load = ", trust_remote_code=True" if remote_code else ""
    reformed = f"reformed from calibration ({report['best_reformation']})" if report["best_reformed"] else "as pruned"
    if (report.get("refinement") or {}).get("kept"):
        refined = report["refinement"]
        reformed += (
            f", then refined layer by layer ({refined['epochs']} epochs over {refined['windows']} windows, "
            f"Adam from {refined['learning_rate']:g}, {refined['schedule']})"
        )
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [slimlm, pruned, structured-pruning]",
        "---",
        "",
        f"# {base}, structurally pruned by slimlm",
        "",
        f"Sub-network of `{base}` found by slimlm's `{job.strategy}` search ({report['evaluations']} candidates, "
        f"fitness {job.fitness}, budget {_budget_text(report['budget'])}); kept weights {reformed}. "
        f"Calibrated on `{job.calibration}`; perplexity measured on `{job.evaluation}` "
        f"({job.evaluation_windows} windows of {job.seq_len} tokens that no calibration, fitness or selection used).",
        "",
        "| | base model | this model |",
        "|---|---:|---:|",
        *(f"| {name} | {a} | {b} |" for name, a, b in rows),
        "",
        f"Removed layers: {', '.join(removed) or 'none'}. Per layer (`layer:heads/kv_heads/neurons`, `-` removed):",
        "",
        f"    {subnet.describe(dims.num_layers)}",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{load})',
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{load})',
        "```",
        "",
        REMOTE_CODE_NOTE if remote_code else "Every layer has one shape: stock transformers loads it.",
        "",
    ]
    return "\n".join(lines)


def _budget_text(budget: dict) -> str:
    parts = [f"{k.replace('_', ' ')} <= {v:,}" for k, v in budget.items() if v is not None]
    return ", ".join(parts) or "none"


def base_model_name(model: str) -> str:
    """The name a model card gives the base model: the Hugging Face id of a built-in model, else as given."""
    builtin = BUILTIN_MODELS.get(model)
    return builtin.hub_id if builtin else model
