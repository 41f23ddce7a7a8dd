"""The Pareto front of a search: chosen, measured on evaluation text, written as JSON and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import matplotlib
import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # Optuna's own (pinned <6; a test checks it)

from slimlm.apply import subnetwork_applied
from slimlm.data import model_windows
from slimlm.evaluate import perplexity
from slimlm.extract import extract
from slimlm.progress import track
from slimlm.reform import reform
from slimlm.search import Searcher
from slimlm.strategies import candidate, completed
from slimlm.subnet import SubNetwork

matplotlib.use("Agg")  # files only; no display on servers

from matplotlib import pyplot as plt

FINALISTS = 3  # front members reformed before the best is chosen
HYPERVOLUME_CAP = 100.0  # perplexity over dense beyond which a sub-network adds no hypervolume (half-size
# SmolLM2 models score 6-15x dense: a cap of 10 gave every search at 0.5 kept a hypervolume of 0)


def pareto_front(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials no other trial beats on both objectives (lower is better), cheapest first."""
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
    reference = np.array([1.0, math.log(HYPERVOLUME_CAP)])
    losses = np.array([(params / dense_params, math.log(ppl / dense_perplexity)) for params, ppl in points])
    losses = losses[(losses < reference).all(axis=1)] if len(losses) else losses
    return float(compute_hypervolume(losses, reference)) if len(losses) else 0.0


def spread(front: list, size: int) -> list:
    """At most ``size`` members evenly spread along the front, always keeping both ends."""
    if len(front) <= size:
        return front
    if size < 2:
        return front[:size]
    picks = {round(i * (len(front) - 1) / (size - 1)) for i in range(size)}
    return [front[i] for i in sorted(picks)]


def measure(searcher: Searcher, subnet: SubNetwork | None, evaluation_ids) -> dict:
    """Evaluation perplexity and prefill latency of a sub-network (None: the dense model), in place."""
    full = SubNetwork.full(searcher.context.dims)
    subnet = subnet or full
    cost = searcher.cost(subnet)
    with subnetwork_applied(searcher.loaded, subnet) as model:
        return {
            "params": cost.params,
            "params_fraction": cost.params / searcher.cost(full).params,
            "flops_per_token": cost.flops_per_token,
            "memory_bytes": cost.memory_bytes,
            "latency_ms": searcher.latency_ms(model),
            "calibration_perplexity": perplexity(model, searcher.fitness_ids),
            "evaluation_perplexity": perplexity(model, evaluation_ids),
        }


def reformed_fitness(searcher: Searcher, subnet: SubNetwork) -> float:
    """Fitness perplexity of ``subnet`` after reformation on the calibration windows fitness does not
    score (all of them when there are no others), so the comparison stays on held-out windows."""
    held_out = searcher.calibration_ids[searcher.job.fitness_windows :]
    reformed = reform(searcher.loaded, subnet, held_out if len(held_out) else searcher.calibration_ids)
    with subnetwork_applied(searcher.loaded, subnet, reformed) as model:
        return perplexity(model, searcher.fitness_ids)


def write_report(searcher: Searcher, study: optuna.Study, front_size: int = 6) -> dict:
    """Evaluate the front on evaluation text; write ``pareto.json``, ``pareto.png`` and ``best/``.

    The front shown is ``front_size`` members spread along it. The best is the within-budget member
    with the lowest calibration perplexity. With reformation on, the ``FINALISTS`` lowest members of
    the whole front are also scored reformed (and shown), and the lowest of them, as it is or
    reformed, wins: reformation can reorder candidates, and where little was removed it can fit
    calibration noise (SmolLM2 at 0.9 kept: 29.6 unreformed, 34.5 reformed).
    """
    job, out = searcher.job, Path(searcher.job.out)
    evaluation_ids = model_windows(searcher.loaded, job.evaluation, job.seq_len, job.evaluation_windows)
    trials = completed(study)
    whole = pareto_front(trials)
    finalists = sorted(whole, key=lambda t: t.values[0])[:FINALISTS] if job.reform else []
    front = sorted({t.number: t for t in [*spread(whole, front_size), *finalists]}.values(), key=lambda t: t.values[1])
    members = []
    for trial in track(front, "evaluating the Pareto front"):
        subnet = candidate(trial)
        members.append(
            {
                "trial": trial.number,
                **measure(searcher, subnet, evaluation_ids),
                "within_budget": searcher.budget.fits(searcher.cost(subnet)),
                "subnet": subnet.to_json(),
            }
        )
    dense = measure(searcher, None, evaluation_ids)
    uniform = measure(searcher, searcher.reference, evaluation_ids) if searcher.reference else None
    feasible = sorted((m for m in members if m["within_budget"]), key=lambda m: m["calibration_perplexity"])
    best = feasible[0] if feasible else None
    chosen = [m for m in feasible if m["trial"] in {t.number for t in finalists}]
    for member in track(chosen, "reforming the finalists"):
        member["reformed_calibration_perplexity"] = reformed_fitness(searcher, SubNetwork.from_json(member["subnet"]))
    if chosen:  # each finalist as it is or reformed, whichever is lower on the windows reformation did not see
        best = min(chosen, key=lambda m: min(m["calibration_perplexity"], m["reformed_calibration_perplexity"]))
    reform_best = bool(chosen) and best["reformed_calibration_perplexity"] < best["calibration_perplexity"]
    report = {
        "model": job.model,
        "strategy": job.strategy,
        "objective": job.objective,
        "budget": asdict(searcher.budget),
        "evaluations": len(trials),
        "calibration": job.calibration,
        "evaluation": job.evaluation,
        "seq_len": job.seq_len,
        "dense": dense,
        "uniform_importance": uniform,
        "front": members,
        "hypervolume": hypervolume(
            [(t.user_attrs["params"], t.values[0]) for t in trials],
            dense["params"],
            dense["calibration_perplexity"],
        ),
        "best_trial": best["trial"] if best else None,
    }
    (out / "pareto.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, trials, out / "pareto.png")
    if best:
        subnet = SubNetwork.from_json(best["subnet"])
        reformed = reform(searcher.loaded, subnet, searcher.calibration_ids) if reform_best else None
        extract(searcher.loaded, subnet, out / "best", reformed)
        with subnetwork_applied(searcher.loaded, subnet, reformed) as model:
            report["best_evaluation_perplexity"] = perplexity(model, evaluation_ids)
        report["best_reformed"] = reform_best
        (out / "pareto.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def plot(report: dict, trials: list[optuna.trial.FrozenTrial], path: Path) -> None:
    """Perplexity against parameters: every candidate, the front, the dense and uniform models, the budget."""
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    millions = 1e6
    ax.scatter(
        [t.user_attrs["params"] / millions for t in trials],
        [t.values[0] for t in trials],
        s=12,
        color="0.75",
        label="candidates (calibration)",
    )
    front = report["front"]
    xs = [m["params"] / millions for m in front]
    ax.plot(xs, [m["calibration_perplexity"] for m in front], "o-", color="tab:blue", label="front (calibration)")
    ax.plot(xs, [m["evaluation_perplexity"] for m in front], "s--", color="tab:orange", label="front (evaluation)")
    for name, marker, color in (("dense", "*", "black"), ("uniform_importance", "D", "tab:red")):
        point = report[name]
        if point is None:
            continue
        ax.scatter(
            [point["params"] / millions],
            [point["evaluation_perplexity"]],
            marker=marker,
            s=120,
            color=color,
            zorder=5,
            label=f"{name.replace('_', ' ')} (evaluation)",
        )
    if report["budget"]["params"]:
        ax.axvline(report["budget"]["params"] / millions, color="tab:green", linestyle=":", label="budget")
    perplexity_axes(ax, f"{report['model']}: {report['strategy']} search, {report['evaluations']} candidates")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def perplexity_axes(ax, title: str, ylabel: str = "perplexity (log scale)", legend_size: int = 8) -> None:
    """How slimlm's plots read: log perplexity against millions of parameters, gridded, with a legend."""
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
