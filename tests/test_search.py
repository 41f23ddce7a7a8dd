"""The search engine (strategies, store, resume, workers), the Pareto report, and the search CLI commands."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from unittest.mock import ANY

import optuna
import pytest
import torch
from sqlalchemy import event
from sqlalchemy.engine import Engine

from slimlm import report as report_module
from slimlm import search as search_module
from slimlm.apply import subnetwork_applied
from slimlm.costs import static_cost
from slimlm.data import model_windows
from slimlm.errors import SlimlmError
from slimlm.evaluate import fitness, perplexity
from slimlm.extract import extract, needs_remote_code
from slimlm.importance import cached_calibration
from slimlm.latency import CHECKS, SAMPLES
from slimlm.models import load_model
from slimlm.models.base import LayerShape
from slimlm.progress import time_summary, timed
from slimlm.prune import flap_shapes, params_budget
from slimlm.reform import reform
from slimlm.report import (
    FINALISTS,
    HYPERVOLUME_CAP,
    base_model_name,
    hypervolume,
    last_stage,
    model_card,
    pareto_front,
    search_summary,
    spread,
    write_report,
)
from slimlm.search import (
    EXHAUSTED_ATTR,
    LATENCY_ATTR,
    STUDY_NAME,
    Searcher,
    SearchJob,
    open_study,
    parse_size,
    prepare,
    run_worker,
    search,
    search_windows,
)
from slimlm.space import NEURON_STEP, SearchSpace
from slimlm.strategies import STRATEGIES, SUBNET_ATTR, candidate, completed, stage_of
from slimlm.subnet import LayerKeep, SubNetwork

from .conftest import VOCAB, fast_search_settings, invoke, one_error, save_tiny, tiny_loaded

FRACTION = 0.6
EVALUATIONS = 12
COMPLETE, PRUNED, FAIL, RUNNING = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
    optuna.trial.TrialState.RUNNING,
)


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """Module-scoped runs calibrate before the per-test cache exists: give them their own empty cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMLM_CACHE", str(tmp_path_factory.mktemp("module-cache")))
        yield


@pytest.fixture(scope="module", autouse=True)
def _sqlite_without_fsync():
    """Each Optuna write is an SQLite commit; without fsync they are ~100x faster. Durability is not under test.

    Only this process: worker processes spawned by a search use SQLite as shipped.
    """

    def no_fsync(connection, _record):
        if isinstance(connection, sqlite3.Connection):
            connection.execute("PRAGMA synchronous = OFF")

    event.listen(Engine, "connect", no_fsync)
    yield
    event.remove(Engine, "connect", no_fsync)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny(tiny_loaded("llama"), tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def make_job(folder, text):
    """A fast job on the tiny model (``fast_search_settings``)."""

    def make(out: Path, **overrides) -> SearchJob:
        values = dict(model=str(folder), out=str(out), params_fraction=FRACTION, evaluations=EVALUATIONS)
        return SearchJob(**(values | fast_search_settings(text) | overrides))

    return make


@pytest.fixture(scope="module")
def runs(make_job, tmp_path_factory):
    """Searches shared by the tests that only read them: ``runs(strategy, tag=..., **overrides)``."""
    done = {}

    def run(strategy: str, tag: str = "", **overrides):
        key = (strategy, tag, tuple(sorted(overrides.items())))
        if key not in done:
            job = make_job(tmp_path_factory.mktemp(f"{strategy}{tag}") / "run", strategy=strategy, **overrides)
            searcher, study = search(job)
            done[key] = job, searcher, study
        return done[key]

    return run


@pytest.fixture(scope="module")
def reported(runs):
    """The report of the shared evolution run; ``best/`` holds the plain sub-network (no weight reformation)."""
    job, searcher, study = runs("evolution")
    if any(f.name == "reform" for f in dataclasses.fields(SearchJob)):
        searcher = dataclasses.replace(searcher, job=dataclasses.replace(job, reform=False))
    return job, searcher, study, write_report(searcher, study)


def subnets(study: optuna.Study) -> list[str]:
    return [t.user_attrs["subnet"] for t in completed(study)]


def first_stage(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Candidates scored at the first fidelity stage: one per requested evaluation."""
    return [t for t in completed(study) if stage_of(t) == 0]


def total_params(loaded) -> int:
    return static_cost(loaded.dims).params


def smallest_params(dims) -> int:
    """Parameters of the cheapest sub-network the default search space allows."""
    return static_cost(dims, list(SearchSpace().smallest(dims).values())).params


# --- every strategy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_evaluates_distinct_subnetworks_within_the_budget(runs, strategy):
    job, searcher, study = runs(strategy)
    trials = study.get_trials()
    assert {t.state for t in trials} <= {COMPLETE, PRUNED}
    done = first_stage(study)
    assert len(done) == EVALUATIONS
    dims = searcher.context.dims
    budget = FRACTION * total_params(searcher.loaded)
    assert searcher.budget.params == int(budget)
    for trial in done:
        subnet = candidate(trial).validate(dims)
        cost = static_cost(dims, subnet.shapes(), context=job.seq_len)
        assert cost.params <= budget
        assert trial.user_attrs["params"] == cost.params
        assert trial.user_attrs["flops"] == cost.flops_per_token
        assert trial.user_attrs["memory"] == cost.memory_bytes
        assert trial.values == [trial.user_attrs["kl"], cost.params]
        assert trial.values[0] >= 0  # KL divergence to the dense model
        assert 1 < trial.user_attrs["perplexity"] < 10 * VOCAB  # of a (random) model over this vocabulary
    assert len({t.user_attrs["subnet"] for t in done}) == EVALUATIONS
    later = [t for t in completed(study) if stage_of(t) > 0]  # promotions rescore first-stage candidates
    assert {t.user_attrs["subnet"] for t in later} <= {t.user_attrs["subnet"] for t in done}
    assert len({(t.user_attrs["subnet"], stage_of(t)) for t in later}) == len(later)
    for trial in trials:
        if trial.state == PRUNED and "subnet" in trial.user_attrs:  # only the latency budget prunes after pricing
            pytest.fail(f"trial {trial.number} was pruned after evaluation without a latency budget")


def space_violations(subnet: SubNetwork, dims, space: SearchSpace) -> list[str]:
    """How ``subnet`` leaves ``space`` (empty: it is one of the space's points)."""
    problems = []
    shapes = {i: keep.shape for i, keep in subnet.layers.items()}
    for i, full in enumerate(dims.layers):
        shape = shapes.get(i)
        if shape is None:
            if not space.depth or i in space.frozen_layers:
                problems.append(f"layer {i} removed")
        elif i in space.frozen_layers:
            if shape != full:
                problems.append(f"frozen layer {i} shrunk to {shape}")
        else:
            attention = [(a.heads, a.kv_heads) for a in space.attention_levels(full)]  # removed too, with depth
            if (shape.heads, shape.kv_heads) not in attention or shape.neurons not in space.mlp_levels(full):
                problems.append(f"layer {i} shape {shape} is not a choice of the space")
    free = [s for i, s in shapes.items() if i not in space.frozen_layers]
    if not space.per_layer and len(set(free)) > 1:
        problems.append(f"layers differ in a uniform space: {set(free)}")
    return problems


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_candidates_lie_in_the_default_search_space(runs, strategy):
    job, searcher, study = runs(strategy)
    for trial in completed(study):
        assert space_violations(candidate(trial), searcher.context.dims, job.space) == [], trial.number


@pytest.mark.parametrize(
    ("space", "fraction"),
    [
        (SearchSpace(frozen_layers=(0,)), FRACTION),
        (SearchSpace(per_layer=False), FRACTION),
        (SearchSpace(max_ratio=0.5), 0.9),
    ],
    ids=["frozen", "uniform", "max-ratio"],
)
def test_evolution_candidates_lie_in_the_search_space(make_job, tmp_path, space, fraction):
    job = make_job(tmp_path / "run", space=space, params_fraction=fraction, evaluations=4)
    searcher, study = search(job)
    for trial in completed(study):
        assert space_violations(candidate(trial), searcher.context.dims, space) == [], trial.number


def test_evolution_starts_from_the_uniform_importance_subnetworks(runs):
    """The initial population is every uniform importance-ranked shape that fills the budget, best guess first."""
    _, searcher, study = runs("evolution")
    starts = searcher.context.starts
    assert len(starts) > 1
    assert [candidate(t) for t in first_stage(study)[: len(starts)]] == list(starts)


def test_nsga2_first_generation_starts_from_the_uniform_importance_subnetworks(runs):
    _, searcher, study = runs("nsga2")
    starts = searcher.context.starts
    assert [candidate(t) for t in first_stage(study)[: len(starts)]] == list(starts)


@pytest.mark.parametrize("strategy", ["random", "nsga2"])
def test_sampling_strategies_fill_a_tight_budget_without_wasting_trials(make_job, tmp_path, strategy):
    """At a budget few random points fit, the repair steps samples into it instead of discarding them."""
    job = make_job(tmp_path / "run", strategy=strategy, params_fraction=0.4, evaluations=6)
    searcher, study = search(job)
    done = completed(study)
    assert len(done) == 6
    assert all(searcher.context.fits(candidate(t)) for t in done)
    assert len(study.get_trials()) <= 2 * 6  # only repeats are discarded (without the repair: hundreds)


def test_stored_fitness_is_the_kl_of_the_library_stitched_subnetwork_in_place(runs):
    job, searcher, study = runs("random")
    loaded = searcher.loaded
    split = [job.calibration_windows, job.fitness_windows, job.selection_windows, 4]  # refinement: 12 = 8 + 4
    calibration, fitness_ids, selection, more = model_windows(loaded, job.calibration, job.seq_len, sum(split)).split(
        split
    )
    assert torch.equal(searcher.calibration_ids, calibration)  # disjoint sets of windows
    assert torch.equal(searcher.fitness_ids, fitness_ids)
    assert torch.equal(searcher.selection_ids, selection)
    assert torch.equal(searcher.refinement_ids, torch.cat([calibration, more]))  # past fitness and selection
    trial = completed(study)[-1]
    subnet = candidate(trial)
    assert searcher.reformed(subnet)  # scored as shipped: with the library's reformed weights
    with subnetwork_applied(loaded, subnet, searcher.reformed(subnet)) as model:
        scores = fitness(model, searcher.dense, job.fitness_windows)
        assert scores["kl"] == pytest.approx(trial.values[0], rel=1e-6)
        assert perplexity(model, fitness_ids) == pytest.approx(trial.user_attrs["perplexity"], rel=1e-5)
    assert fitness(loaded.model, searcher.dense, job.fitness_windows)["kl"] == pytest.approx(0, abs=1e-6)
    dense = perplexity(loaded.model, fitness_ids)  # the model is whole again after the block
    assert dense == pytest.approx(perplexity(load_model(job.model).model, fitness_ids), rel=1e-6)


def test_refinement_windows_grow_past_selection_and_leave_the_search_windows_alone(runs):
    job, searcher, _ = runs("random")
    base = search_windows(dataclasses.replace(job, refine_epochs=0, refine_windows=500), searcher.loaded)
    assert torch.equal(base[3], base[0])  # no refinement: no window beyond selection is asked for
    for count in (3, 8, 20):
        windows = search_windows(dataclasses.replace(job, refine_windows=count), searcher.loaded)
        assert all(torch.equal(a, b) for a, b in zip(windows[:3], base[:3], strict=True))
        assert len(windows[3]) == count
        assert torch.equal(windows[3][: min(count, 8)], base[0][:count])  # the calibration windows first
        used = torch.cat(windows[:3])
        for extra in windows[3][8:]:  # then windows no calibration, fitness or selection used
            assert not (used == extra).all(dim=1).any()


def test_other_objectives_are_stored_as_the_second_value(runs):
    _, _, study = runs("evolution", objective="flops", evaluations=4)
    assert len(first_stage(study)) == 4
    for trial in completed(study):
        assert trial.values == [trial.user_attrs["kl"], trial.user_attrs["flops"]]


# --- determinism and resume ---------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["evolution", "random"])
def test_same_seed_same_search(runs, strategy):
    _, _, first = runs(strategy)
    _, _, again = runs(strategy, tag="again")
    assert first._storage is not again._storage
    assert subnets(again) == subnets(first)
    assert [t.values for t in completed(again)] == [t.values for t in completed(first)]


def test_another_seed_another_search(runs):
    _, _, first = runs("evolution")
    _, _, other = runs("evolution", seed=1)
    assert subnets(other)[0] == subnets(first)[0]  # both start from the importance-ranked uniform sub-network
    assert subnets(other) != subnets(first)


def test_resume_continues_the_stored_search(make_job, runs, tmp_path):
    job = make_job(tmp_path / "run", evaluations=6)
    _, study = search(job)
    before = [(t.number, t.values, t.user_attrs["subnet"]) for t in completed(study)]
    assert len(first_stage(study)) == 6

    _, study = search(dataclasses.replace(job, evaluations=EVALUATIONS, resume=True))
    after = [(t.number, t.values, t.user_attrs["subnet"]) for t in completed(study)]
    assert len(first_stage(study)) == EVALUATIONS
    assert after[: len(before)] == before


def test_an_existing_store_needs_resume(runs):
    job, _, _ = runs("evolution")
    with pytest.raises(SlimlmError, match="already holds a search; pass --resume"):
        search(dataclasses.replace(job, evaluations=EVALUATIONS + 2))
    assert len(first_stage(optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url()))) == EVALUATIONS


def test_the_study_is_the_models_weights_not_its_path(make_job, folder, tmp_path):
    """A worker's copy of the model at another path joins the study; other weights at the same path do not."""
    job = make_job(tmp_path / "run", evaluations=2)
    search(job)
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    search(dataclasses.replace(job, model=str(copy), resume=True, evaluations=3))
    study = optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url())
    assert len(first_stage(study)) == 3 and study.user_attrs["job"]["model"] == load_model(folder).fingerprint()
    other = save_tiny(tiny_loaded(seed=5), tmp_path / "other")
    with pytest.raises(SlimlmError, match=r"different settings than the stored search: the model.s weights$"):
        search(dataclasses.replace(job, model=str(other), resume=True, evaluations=4))
    assert len(first_stage(optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url()))) == 3


@pytest.mark.parametrize(
    ("setting", "value"),
    [("seed", 7), ("strategy", "random"), ("params_fraction", 0.7), ("space", SearchSpace(min_ratio=0.5))],
)
def test_resume_with_other_settings_is_refused(runs, setting, value):
    job, _, _ = runs("evolution")
    changed = dataclasses.replace(job, resume=True, evaluations=EVALUATIONS + 2, **{setting: value})
    with pytest.raises(SlimlmError, match=f"different settings than the stored search: {setting}$"):
        search(changed)
    study = optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url())
    assert len(first_stage(study)) == EVALUATIONS  # nothing was added


@pytest.mark.parametrize("strategy", ["evolution", "random"])
def test_resume_after_a_kill_finishes_the_uninterrupted_search(make_job, runs, tmp_path, monkeypatch, strategy):
    job = make_job(tmp_path / "run", strategy=strategy)
    evaluate, calls = Searcher.evaluate, []

    def killed_at_the_ninth(self, subnet, stage=0):
        calls.append(stage)
        if len(calls) == 9:
            raise KeyboardInterrupt  # a kill mid-evaluation: the trial stays RUNNING
        return evaluate(self, subnet, stage)

    monkeypatch.setattr(Searcher, "evaluate", killed_at_the_ninth)
    with pytest.raises(KeyboardInterrupt):
        search(job)
    monkeypatch.setattr(Searcher, "evaluate", evaluate)
    killed = [t.number for t in optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url()).trials]
    _, study = search(dataclasses.replace(job, resume=True))
    states = {t.number: t.state for t in study.get_trials()}
    assert states[killed[-1]] == FAIL
    assert RUNNING not in states.values()
    _, _, uninterrupted = runs(strategy)
    assert subnets(study) == subnets(uninterrupted)


def test_a_resumed_random_search_does_not_replay_its_draws(make_job, tmp_path):
    job = make_job(tmp_path / "run", strategy="random", evaluations=3)
    _, study = search(job)
    first_run = len(study.trials)
    _, study = search(dataclasses.replace(job, evaluations=5, resume=True))
    trials = study.get_trials()
    assert len(completed(study)) == 5
    assert trials[first_run].params != trials[0].params


# --- budgets and bad settings -------------------------------------------------------------------


def test_a_non_embedding_budget_keeps_that_share_of_the_layers_parameters(make_job, tmp_path):
    job = make_job(tmp_path / "run", params_fraction=None, non_embedding_fraction=0.6)
    searcher = prepare(job)
    dims = searcher.context.dims
    assert searcher.budget.params == params_budget(dims, non_embedding=0.6)
    assert searcher.budget.params > params_budget(dims, 0.6)  # the embeddings are kept whole, not shrunk
    assert SearchJob.from_dict(job.to_dict()) == job


@pytest.mark.parametrize(
    "budget",
    [
        lambda smallest: {"params_fraction": 0.05},
        lambda smallest: {"params_fraction": None, "max_params": smallest - 1},
    ],
    ids=["fraction", "max-params"],
)
def test_an_infeasible_budget_names_the_smallest_feasible_size(make_job, tmp_path, budget):
    smallest = smallest_params(tiny_loaded().dims)
    job = make_job(tmp_path / "run", **budget(smallest))
    with pytest.raises(SlimlmError, match="below the smallest sub-network") as error:
        search(job)
    assert f"{smallest:,}" in str(error.value)
    assert not (tmp_path / "run" / "search.db").exists()


def test_the_smallest_subnetwork_itself_is_a_feasible_budget(make_job, tmp_path):
    smallest = smallest_params(tiny_loaded().dims)
    _, study = search(make_job(tmp_path / "run", params_fraction=None, max_params=smallest, evaluations=1))
    assert [t.user_attrs["params"] <= smallest for t in first_stage(study)] == [True]


def test_depth_search_accepts_budgets_below_every_layer_kept(make_job, tmp_path):
    space = SearchSpace(depth=True)
    dims = tiny_loaded().dims
    smallest = static_cost(dims, list(space.smallest(dims).values())).params  # one layer left
    uniform = smallest_params(dims)  # every layer at its smallest
    budget = (smallest + uniform) // 2
    job = make_job(tmp_path / "run", strategy="random", space=space, params_fraction=None, max_params=budget)
    _, study = search(dataclasses.replace(job, evaluations=2))
    assert all(t.user_attrs["params"] <= budget for t in completed(study))


def test_an_infeasible_memory_budget_is_refused(make_job, tmp_path):
    job = make_job(tmp_path / "run", params_fraction=None, max_memory_bytes=1000)
    with pytest.raises(SlimlmError, match=r"memory budget of 0\.0 MB is below the smallest"):
        search(job)
    assert not (tmp_path / "run" / "search.db").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "annealing"}, "unknown strategy 'annealing'; choose from evolution, nsga2, linas, random"),
        ({"objective": "energy"}, "unknown objective 'energy'; choose from params, flops, memory, latency"),
        ({"evaluations": 0}, "--evaluations and --workers must be at least 1"),
        (
            {"fitness_windows": 400, "refine_epochs": 0},
            r"has 250 windows of 16 tokens; calibration, fitness and selection need 416 \(8 \+ 400 \+ 8\)",
        ),
        (
            {"refine_windows": 300},
            r"calibration, fitness, selection and refinement need 310 \(8 \+ 2 \+ 8 \+ 292\)",
        ),
        ({"fitness": "loss"}, "unknown fitness 'loss'; choose from kl, perplexity"),
        ({"params_fraction": 1.5}, r"--params must be a fraction in \(0, 1\]"),
        ({"latency_runtime": "onnx"}, "unknown latency runtime 'onnx'; choose from transformers, llama.cpp"),
        ({"refine_epochs": -1}, r"--refine-epochs must be 0 \(no refinement\) or more, got -1"),
        ({"refine_windows": 0}, "--refine-windows must be at least 1, got 0"),
    ],
    ids=[
        "strategy",
        "objective",
        "evaluations",
        "fitness-windows",
        "refine-windows",
        "fitness",
        "fraction",
        "latency-runtime",
        "refine",
        "no-refine-windows",
    ],
)
def test_bad_settings_are_refused_before_any_store(make_job, tmp_path, overrides, message):
    with pytest.raises(SlimlmError, match=message):
        search(make_job(tmp_path / "run", **overrides))
    assert not (tmp_path / "run" / "search.db").exists()


@pytest.mark.parametrize(
    ("text", "value"), [("90M", 90e6), ("1.5G", 1.5e9), ("300MB", 300e6), ("12345", 12345), (" 2k ", 2000)]
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "", "1.5X", "-3M"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(SlimlmError, match="cannot read size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["1.2.3", ".", "1..5M"])
def test_parse_size_refuses_several_dots(text):
    with pytest.raises(SlimlmError, match="cannot read size"):
        parse_size(text)


# --- the report ---------------------------------------------------------------------------------


def test_report_front_is_non_dominated_and_fully_measured(reported):
    job, searcher, study, report = reported
    saved = json.loads((Path(job.out) / "pareto.json").read_text())
    assert saved == json.loads(json.dumps(report))
    front = report["front"]
    assert front
    stored = {t.number: t.values for t in last_stage(study)}  # fitness compares within the last stage only
    values = [stored[m["trial"]] for m in front]
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            if i != j:
                assert not (b[0] <= a[0] and b[1] <= a[1]), f"front member {front[i]['trial']} is dominated"
        assert not any(o[0] <= a[0] and o[1] <= a[1] and o != a for o in stored.values())
    assert [m["params"] for m in front] == sorted(m["params"] for m in front)
    keys = {"subnet", "params", "flops_per_token", "memory_bytes", "latency_ms"}
    keys |= {"calibration_perplexity", "evaluation_perplexity"}
    for member, (kl, params) in zip(front, values, strict=True):
        assert keys <= set(member)
        assert member["params"] == params
        assert member["fitness"] == kl
        trial = study.trials[member["trial"]]
        assert trial.user_attrs["fitness_windows"] == job.fitness_windows  # the last stage scores them all
        assert member["calibration_perplexity"] == pytest.approx(trial.user_attrs["perplexity"], rel=1e-5)
        assert member["evaluation_perplexity"] > 1 and member["latency_ms"] > 0
        SubNetwork.from_json(member["subnet"]).validate(searcher.context.dims)
        assert member["within_budget"]
    assert report["evaluations"] == EVALUATIONS
    assert report["dense"]["params"] == total_params(searcher.loaded)
    assert report["dense"]["params_fraction"] == 1
    assert report["uniform_importance"]["params"] <= FRACTION * report["dense"]["params"]


def test_report_best_is_the_finalist_lowest_on_the_selection_windows(reported):
    _, searcher, study, report = reported
    finalists = report["finalists"]
    fittest = sorted(last_stage(study), key=lambda t: t.values[0])[:FINALISTS]
    starts = {s.to_compact() for s in searcher.context.starts}
    assert {t.number for t in fittest} <= {f["trial"] for f in finalists}
    assert any(study.trials[f["trial"]].user_attrs["subnet"] in starts for f in finalists)  # the best start
    assert report["best_start"]["trial"] in {f["trial"] for f in finalists}
    best = min(finalists, key=lambda f: min(f["finalist_perplexity"].values()))
    assert report["best_trial"] == best["trial"]
    assert set(best["finalist_perplexity"]) == {"library"}  # reformation off: nothing else to compare
    assert report["search_gain"] == pytest.approx(
        1 - report["best_evaluation_perplexity"] / report["best_start"]["evaluation_perplexity"]
    )


def test_with_reformation_the_winner_is_shipped_as_it_scored_lowest_on_selection(runs, tmp_path):
    job, searcher, study = runs("evolution")
    job = dataclasses.replace(job, out=str(tmp_path), reform=True, refine_epochs=0)
    searcher = dataclasses.replace(searcher, job=job)
    report = write_report(searcher, study)
    assert "refinement" not in report
    for finalist in report["finalists"]:
        scores = finalist["finalist_perplexity"]
        assert set(scores) == {"library", "sequential"}
        assert finalist["reformation"] == min(scores, key=scores.get)
    best = next(f for f in report["finalists"] if f["trial"] == report["best_trial"])
    assert report["best_reformation"] == best["reformation"] and report["best_reformed"]
    subnet = candidate(study.trials[best["trial"]])
    weights = reform(searcher.loaded, subnet, searcher.calibration_ids)
    if best["reformation"] == "library":
        weights = searcher.reformed(subnet)
    with subnetwork_applied(searcher.loaded, subnet, weights) as model:
        assert perplexity(model, searcher.selection_ids) == pytest.approx(min(best["finalist_perplexity"].values()))
    small = load_model(tmp_path / "best")
    assert perplexity(small.model, searcher.selection_ids) == pytest.approx(
        min(best["finalist_perplexity"].values()), rel=1e-4
    )


def test_the_reformed_winner_is_refined_and_shipped_as_the_selection_windows_say(runs, tmp_path, monkeypatch):
    job, searcher, study = runs("evolution")
    job = dataclasses.replace(job, out=str(tmp_path), reform=True)
    searcher = dataclasses.replace(searcher, job=job)
    trained_on = []
    refine_extracted = report_module.refine_extracted
    monkeypatch.setattr(
        report_module, "refine_extracted", lambda *a, **k: trained_on.append(a[3]) or refine_extracted(*a, **k)
    )
    report = write_report(searcher, study)
    refinement = report["refinement"]
    assert torch.equal(trained_on[0], searcher.refinement_ids)  # 8 calibration windows and 4 past selection
    assert refinement["windows"] == job.refine_windows == len(searcher.refinement_ids) == 12
    best = next(f for f in report["finalists"] if f["trial"] == report["best_trial"])
    selection = refinement["selection_perplexity"]
    assert selection["unrefined"] == pytest.approx(min(best["finalist_perplexity"].values()))
    assert refinement["kept"] == (selection["refined"] < selection["unrefined"])
    shipped = "refined" if refinement["kept"] else "unrefined"
    small = load_model(tmp_path / "best")
    assert perplexity(small.model, searcher.selection_ids) == pytest.approx(selection[shipped], rel=1e-4)
    assert report["best_evaluation_perplexity"] == refinement["evaluation_perplexity"][shipped]
    start = report["best_start"]["evaluation_perplexity"]  # the search's gain: like for like, before refinement
    assert report["search_gain"] == pytest.approx(1 - refinement["evaluation_perplexity"]["unrefined"] / start)
    assert f"selection perplexity {selection['unrefined']:.2f} -> {selection['refined']:.2f}" in search_summary(report)
    card = (tmp_path / "best" / "README.md").read_text()
    assert ("then refined layer by layer" in card) == refinement["kept"]
    assert ("cosine to 0)" in card) == refinement["kept"]  # the rate's schedule named beside its first value
    assert ("4 epochs over 12 windows" in card) == refinement["kept"]


def test_the_uniform_reference_off_the_library_grid_is_reported_reformed(make_job, tmp_path):
    job = make_job(tmp_path / "run", space=SearchSpace(step=0.25), evaluations=4)
    searcher, study = search(job)
    reference = searcher.reference.shapes()[0]
    assert reference.neurons not in job.space.mlp_levels(searcher.context.dims.layers[0])  # not a library level
    report = write_report(searcher, study)
    weights = reform(searcher.loaded, searcher.reference, searcher.calibration_ids)
    with subnetwork_applied(searcher.loaded, searcher.reference, weights) as model:
        expected = perplexity(model, searcher.selection_ids)
    assert report["uniform_importance"]["selection_perplexity"] == pytest.approx(expected)


def test_report_best_folder_computes_the_best_subnetwork(reported):
    job, searcher, study, report = reported
    small = load_model(Path(job.out) / "best")
    subnet = candidate(study.trials[report["best_trial"]])
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with subnetwork_applied(searcher.loaded, subnet) as model:
            expected = model(input_ids=ids, use_cache=False).logits
        got = small.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    best = next(m for m in report["finalists"] if m["trial"] == report["best_trial"])
    assert static_cost(small.dims).params == best["params"] == sum(p.numel() for p in small.model.parameters())


def test_hypervolume_is_the_area_the_front_dominates_up_to_the_reference():
    dense_params, dense_ppl = 1000, 20.0
    front = [(500, dense_ppl * math.e), (750, dense_ppl * math.exp(0.5))]
    cap = math.log(HYPERVOLUME_CAP)
    by_hand = 0.25 * (cap - 1.0) + 0.25 * (cap - 0.5)
    assert hypervolume(front, dense_params, dense_ppl) == pytest.approx(by_hand)
    worse = [(800, dense_ppl * math.e), (400, dense_ppl * HYPERVOLUME_CAP * 2)]  # dominated; beyond the cap
    assert hypervolume(front + worse, dense_params, dense_ppl) == pytest.approx(by_hand)
    assert hypervolume([(600, dense_ppl * 1.5), *front], dense_params, dense_ppl) > by_hand
    assert hypervolume([], dense_params, dense_ppl) == 0.0


def test_report_states_the_hypervolume_of_every_candidate(reported):
    _, _, study, report = reported
    points = [(t.user_attrs["params"], t.user_attrs["perplexity"]) for t in last_stage(study)]
    expected = hypervolume(points, report["dense"]["params"], report["dense"]["calibration_perplexity"])
    assert report["hypervolume"] == pytest.approx(expected) and report["hypervolume"] > 0


def test_report_plot_is_a_png(reported):
    job, *_ = reported
    data = (Path(job.out) / "pareto.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def made(values: list[tuple[float, float]]) -> list[optuna.trial.FrozenTrial]:
    trials = []
    for number, v in enumerate(values):
        trial = optuna.trial.create_trial(values=list(v))
        trial.number = number
        trials.append(trial)
    return trials


def test_pareto_front_keeps_the_non_dominated_cheapest_first():
    trials = made([(10, 5), (8, 7), (12, 3), (11, 6), (8, 8), (20, 1), (10, 5), (9, 7)])
    front = pareto_front(trials)
    assert [tuple(t.values) for t in front] == [(20, 1), (12, 3), (10, 5), (8, 7)]
    assert [t.number for t in front][:2] == [5, 2]
    assert {t.number for t in front if tuple(t.values) == (10, 5)} <= {0, 6}  # one of two equal points


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    single = made([(3, 3)])
    assert pareto_front(single) == single
    same = made([(3, 3), (3, 3)])
    assert len(pareto_front(same)) == 1


def test_spread_keeps_both_ends_and_spaces_evenly():
    assert spread([1, 2, 3], 6) == [1, 2, 3]
    assert spread(list(range(6)), 6) == list(range(6))
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread(list(range(10)), 2) == [0, 9]
    picked = spread(list(range(100)), 6)
    assert len(picked) == 6 and picked[0] == 0 and picked[-1] == 99 and picked == sorted(picked)
    assert spread([], 3) == []


def test_spread_to_one_member():
    assert len(spread(list(range(5)), 1)) == 1


# --- workers ------------------------------------------------------------------------------------


def test_two_worker_processes_share_one_store(make_job, tmp_path):
    evaluations = 8
    _, study = search(make_job(tmp_path / "run", evaluations=evaluations, workers=2))
    # each worker checks the count before evaluating, so both may add the last candidate at once
    done = first_stage(optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'run' / 'search.db'}"))
    assert evaluations <= len(done) <= evaluations + 1
    assert len(first_stage(study)) == len(done)
    dims = tiny_loaded().dims
    for trial in done:
        subnet = candidate(trial).validate(dims)
        assert static_cost(dims, subnet.shapes()).params <= FRACTION * static_cost(dims).params
    assert RUNNING not in {t.state for t in study.get_trials()}


@pytest.mark.parametrize("strategy", ["evolution", "random"])
def test_concurrent_workers_never_evaluate_one_candidate_twice(make_job, tmp_path, monkeypatch, strategy):
    """Two workers as ``search`` runs them (the first creates the store, the others open it), in threads,
    with their first evaluations overlapping as they do on a multi-core machine."""
    job = make_job(tmp_path / "run", strategy=strategy, evaluations=4, workers=2)
    Path(job.out).mkdir()
    searchers = [prepare(job), prepare(job)]
    fingerprint = searchers[0].fingerprint
    studies = [open_study(job, create=True, fingerprint=fingerprint), open_study(job, False, fingerprint)]
    overlap = threading.Barrier(2, timeout=60)
    started = set()
    evaluate = Searcher.evaluate

    def overlapping(self, subnet, stage=0):
        if id(self) not in started:
            started.add(id(self))
            overlap.wait()
        return evaluate(self, subnet, stage)

    monkeypatch.setattr(Searcher, "evaluate", overlapping)
    errors = []

    def work(searcher, study):
        try:
            run_worker(searcher, study)
        except Exception as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=pair) for pair in zip(searchers, studies, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    stored = completed(optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url()))
    scored = [(t.user_attrs["subnet"], stage_of(t)) for t in stored]
    assert sum(stage == 0 for _, stage in scored) >= job.evaluations
    assert len(set(scored)) == len(scored)  # no candidate scored twice at one stage


def test_workers_check(make_job, tmp_path):
    with pytest.raises(SlimlmError, match="--evaluations and --workers must be at least 1"):
        search(make_job(tmp_path / "run", workers=0))


def test_a_worker_writes_only_the_store_and_a_finaliser_reports_without_evaluating(make_job, tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    worker = dataclasses.replace(make_job(tmp_path / "unused", storage=store, study_name="shared"), out="")
    _, study = search(worker, role="worker")
    assert not (tmp_path / "unused").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "shared.db"]
    evaluated = [t.user_attrs[SUBNET_ATTR] for t in completed(study)]
    assert sum(stage_of(t) == 0 for t in completed(study)) >= EVALUATIONS
    _, again = search(worker, role="worker")  # a worker arriving late finds the search done: no new work
    assert [t.user_attrs[SUBNET_ATTR] for t in completed(again)] == evaluated

    def no_evaluation(*_args, **_kwargs):
        raise AssertionError("the finaliser evaluated a candidate")

    monkeypatch.setattr(Searcher, "evaluate", no_evaluation)
    finaliser = dataclasses.replace(worker, out=str(tmp_path / "run"))
    searcher, study = search(finaliser, role="finaliser")
    monkeypatch.undo()  # the report evaluates its finalists on held-out windows, as any search's does
    report = write_report(searcher, study)
    assert report["best_trial"] in {t.number for t in completed(study)}
    assert (tmp_path / "run" / "best" / "config.json").is_file()
    alone = make_job(tmp_path / "alone")  # one process, its own store: the same candidates
    _, single = search(alone)
    assert [t.user_attrs[SUBNET_ATTR] for t in completed(single)] == evaluated


def test_roles_need_a_shared_store(make_job, tmp_path):
    for role, flag in (("worker", "--worker"), ("finaliser", "--finalise")):
        with pytest.raises(SlimlmError, match=f"{flag} needs --storage URL"):
            search(make_job(tmp_path / "run"), role=role)


# --- the command line ---------------------------------------------------------------------------


def search_options(text: Path, run: Path) -> list:
    return [
        *("--out", run, "--calib", text, "--eval", text, "--seq-len", 16),
        *("--calib-windows", 8, "--fitness-windows", 2, "--eval-windows", 2, "--evaluations", 10),
        *("--refine-windows", 12),
    ]


def test_cli_worker_needs_no_run_folder_and_roles_are_checked(folder, text, tmp_path):
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    options = search_options(text, tmp_path / "run")[2:]  # no --out
    result = invoke("search", folder, "--params", FRACTION, "--storage", store, "--worker", *options)
    assert result.exit_code == 0, result.output
    assert "worker done" in result.stdout and not (tmp_path / "run").exists()
    line = one_error(invoke("search", folder, "--params", FRACTION, "--worker", *options))
    assert "--worker needs --storage URL" in line
    line = one_error(invoke("search", folder, "--params", FRACTION, "--storage", store, "--worker", "--finalise"))
    assert "give one of them" in line
    assert "give --out RUN" in one_error(invoke("search", folder, "--params", FRACTION, "--storage", store))


def test_cli_search_prints_the_front_and_writes_the_run(folder, text, tmp_path):
    run = tmp_path / "run"
    result = invoke("search", folder, "--params", FRACTION, *search_options(text, run))
    assert result.exit_code == 0, result.output
    report = json.loads((run / "pareto.json").read_text())
    assert report["evaluations"] == 10 and report["strategy"] == "evolution"
    assert "Pareto front: evolution, 10 candidates" in result.stdout
    assert f"hypervolume {report['hypervolume']:.4f}" in result.stdout
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│ ")}
    assert {"uniform importance", "dense"} <= set(rows)  # piped: not cut at rich's 80 columns
    assert f"{report['dense']['params']:,}" in rows["dense"]
    for member in report["front"]:
        row = rows[f"trial {member['trial']}"]
        assert f"{member['params']:,}" in row and f"{member['calibration_perplexity']:.2f}" in row
        assert ("yes" in row) == (member["trial"] == report["best_trial"])
    assert str(run / "pareto.json") in result.stdout.replace("\n", "")
    assert (run / "pareto.png").is_file() and (run / "best" / "config.json").is_file()
    phases = ["calibration", "library", "fitness reference", "search", "front", "finalists", "extraction", "refinement"]
    assert list(report["seconds"]) == phases and all(s > 0 for s in report["seconds"].values())
    assert time_summary(report["seconds"]) in result.stdout


def test_cli_compress_writes_a_smaller_model_and_its_report(folder, text, tmp_path):
    run = tmp_path / "run"
    result = invoke("compress", folder, "--params", FRACTION, *search_options(text, run))
    assert result.exit_code == 0, result.output
    report = json.loads((run / "slimlm_report.json").read_text())
    dense, small = report["dense"]["params"], report["compressed"]["params"]
    assert dense == static_cost(tiny_loaded().dims).params
    assert small <= FRACTION * dense
    assert small == static_cost(load_model(run / "best").dims).params
    assert report["evaluations"] == 10
    assert (run / "pareto.json").is_file()
    assert "saved" in result.stdout
    searched = json.loads((run / "pareto.json").read_text())["seconds"]
    assert report["seconds"] == searched | {"dense figures": ANY, "compressed figures": ANY}  # the search's, then these
    assert time_summary(report["seconds"]) in result.stdout
    assert time_summary(report["seconds"]).capitalize() in (run / "report.md").read_text()


def test_timed_adds_each_block_to_its_phase():
    seconds: dict[str, float] = {}
    for pause in (0.02, 0.03):
        with timed(seconds, "phase"):
            time.sleep(pause)
    with pytest.raises(ValueError), timed(seconds, "failed"):  # a phase that fails is counted too
        raise ValueError
    assert 0.05 <= seconds["phase"] < 1 and list(seconds) == ["phase", "failed"]
    assert time_summary({"a": 1.2, "b": 3.4}) == "time: a 1 s, b 3 s (5 s in all)"


@pytest.mark.parametrize("command", ["search", "compress"])
@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (["--params", "0.01"], "below the smallest sub-network this search space allows"),
        ([], "give a budget: --params FRACTION, --non-embedding FRACTION, --max-params N or --max-memory BYTES"),
        (["--params", "0.5", "--non-embedding", "0.5"], "give exactly one budget"),
        (["--max-params", "abc"], "cannot read size 'abc'"),
    ],
    ids=["too-small", "none", "two", "not-a-size"],
)
def test_cli_bad_budgets_are_one_clear_error(folder, text, tmp_path, command, budget, message):
    run = tmp_path / "run"
    line = one_error(invoke(command, folder, *budget, *search_options(text, run)))
    assert message in line
    assert not (run / "search.db").exists()


# --- reliability: run folders, other processes, kills, NaN ------------------------------------------


def _run_script(tmp_path: Path, body: str, job: SearchJob, wait: bool = True):
    """Run ``body`` in a fresh Python process with ``job`` unpickled as ``job`` (as a second user would)."""
    import os
    import pickle
    import subprocess
    import sys

    (tmp_path / "job.pickle").write_bytes(pickle.dumps(job))
    script = tmp_path / "script.py"
    script.write_text(
        "import os, pickle, sys, time\n"
        "if __name__ == '__main__':\n"
        "    job = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
    )
    command = [sys.executable, str(script), str(tmp_path / "job.pickle")]
    if wait:
        return subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_second_process_on_a_running_search_folder_is_refused_and_harms_nothing(make_job, tmp_path):
    job = make_job(tmp_path / "run", evaluations=4)
    first = _run_script(  # a search that has finished its trials but not yet its report
        tmp_path,
        "from slimlm.search import search\nsearch(job)\nopen(job.out + '/done', 'w')\ntime.sleep(60)",
        job,
        wait=False,
    )
    try:
        for _ in range(1200):
            if (Path(job.out) / "done").exists():
                break
            threading.Event().wait(0.1)
        assert _locked(Path(job.out) / ".slimlm.lock")
        before = [
            (t.number, t.state) for t in optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url()).trials
        ]
        with pytest.raises(SlimlmError, match="another slimlm process is using"):
            search(dataclasses.replace(job, resume=True, evaluations=6))
    finally:
        first.kill()
        first.wait()
    after = optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url()).get_trials()
    assert [(t.number, t.state) for t in after] == before  # no trial failed, none added


def _locked(path: Path) -> bool:
    from slimlm.cache import lock_file

    handle = lock_file(path, wait=False)
    if handle is None:
        return True
    handle.close()
    return False


def test_a_killed_worker_on_a_storage_url_is_failed_by_heartbeat_and_its_candidate_evaluated(
    make_job, runs, tmp_path, monkeypatch
):
    """kill -9 mid-evaluation with ``--storage``: no process may fail RUNNING trials blindly there, so the
    killed one's silence (its heartbeat) frees its candidate; the search then equals the uninterrupted one."""
    job = make_job(tmp_path / "run", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    killed = _run_script(
        tmp_path,
        "from slimlm.search import Searcher, search\n"
        "real, calls = Searcher.evaluate, []\n"
        "def dies(self, subnet, stage=0):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 9: os._exit(9)  # kill -9: no except, no finally\n"
        "    return real(self, subnet, stage)\n"
        "Searcher.evaluate = dies\n"
        "search(job)",
        job,
    )
    assert killed.returncode == 9, killed.stderr
    stored = optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url())
    (running,) = [t.number for t in stored.get_trials() if t.state == RUNNING]
    monkeypatch.setattr("slimlm.search.GRACE_SECONDS", 1)
    threading.Event().wait(2.5)  # longer than the grace period, with no heartbeat from the dead process
    _, study = search(dataclasses.replace(job, resume=True))
    states = {t.number: t.state for t in study.get_trials()}
    assert states[running] == FAIL
    assert RUNNING not in states.values()
    _, _, uninterrupted = runs("evolution")
    assert subnets(study) == subnets(uninterrupted)


def test_helper_workers_end_when_the_search_process_is_killed(make_job, tmp_path):
    import os
    import signal

    job = make_job(tmp_path / "run", workers=2, evaluations=10_000)
    main = _run_script(tmp_path, "from slimlm.search import search\nsearch(job)", job, wait=False)
    try:
        helpers = []
        for _ in range(600):  # the spawned helper appears once the main process has prepared
            helpers = _children(main.pid)
            if helpers:
                break
            threading.Event().wait(0.1)
        assert helpers, "no helper worker started"
        threading.Event().wait(1)
        os.kill(main.pid, signal.SIGKILL)
        main.wait()
        for _ in range(1800):  # a helper still importing torch notices once its work starts
            if not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in helpers):
                break
            threading.Event().wait(0.1)
        alive = [pid for pid in helpers if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, "a helper worker outlived its killed search process"
    finally:
        if main.poll() is None:
            main.kill()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_candidate_scoring_nan_fails_its_trial_and_the_search_goes_on(make_job, tmp_path, monkeypatch):
    evaluate, calls = Searcher.evaluate, []

    def nan_once(self, subnet, stage=0):
        calls.append(1)
        result = evaluate(self, subnet, stage)
        return result | ({"kl": math.nan} if len(calls) == 3 else {})

    monkeypatch.setattr(Searcher, "evaluate", nan_once)
    _, study = search(make_job(tmp_path / "run", evaluations=6))
    assert len(first_stage(study)) == 6
    assert sum(t.state == FAIL for t in study.get_trials()) == 1


def test_every_candidate_scoring_nan_is_one_clear_error(make_job, tmp_path, monkeypatch):
    evaluate = Searcher.evaluate
    monkeypatch.setattr(Searcher, "evaluate", lambda self, s, stage=0: evaluate(self, s, stage) | {"kl": math.nan})
    with pytest.raises(SlimlmError, match="candidates in a row scored kl NaN or inf"):
        search(make_job(tmp_path / "run", evaluations=40))


def test_a_failing_evaluation_leaves_no_running_trial(make_job, tmp_path, monkeypatch):
    def broken(self, subnet, stage=0):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Searcher, "evaluate", broken)
    job = make_job(tmp_path / "run")
    with pytest.raises(RuntimeError):
        search(job)
    states = {t.state for t in optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url()).get_trials()}
    assert RUNNING not in states


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("non-empty", "exists, is not empty and holds no slimlm search; pass --overwrite"),
        ("file", "exists and is not a folder"),
        ("model", "would write into the input model's folder"),
        ("cache", "is inside slimlm's cache"),
        ("under-a-file", "is a file, not a folder"),
    ],
)
def test_a_run_folder_slimlm_may_not_use_is_refused_before_any_work(
    make_job, folder, tmp_path, monkeypatch, case, message
):
    from slimlm.cache import cache_root

    out = {
        "non-empty": tmp_path / "mine",
        "file": tmp_path / "a-file",
        "model": folder,
        "cache": cache_root() / "runs" / "x",
        "under-a-file": tmp_path / "a-file" / "run",
    }[case]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "pareto.json").write_text("my own results")
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setattr("slimlm.search.prepare", lambda *a: pytest.fail("work started before --out was checked"))
    with pytest.raises(SlimlmError, match=message):
        search(make_job(out))
    assert (tmp_path / "mine" / "pareto.json").read_text() == "my own results"


def test_overwrite_writes_into_a_non_empty_folder_and_replaces_an_old_search(make_job, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    _, study = search(make_job(out, evaluations=4, overwrite=True))
    assert len(first_stage(study)) == 4
    _, study = search(make_job(out, evaluations=3, overwrite=True))  # a fresh search, not the old store
    assert len(first_stage(study)) == 3 and (out / "notes.txt").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(metric="wanda"), "unknown importance metric 'wanda'"),
        (dict(space=SearchSpace(frozen_layers=(99,))), "--frozen layer 99 is out of range"),
        (dict(evaluation_windows=10_000), "the report needs 10000 \\(--eval-windows\\)"),
    ],
)
def test_settings_that_would_fail_late_fail_before_calibration(make_job, tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr("slimlm.search.cached_calibration", lambda *a: pytest.fail("calibration ran"))
    with pytest.raises(SlimlmError, match=message):
        search(make_job(tmp_path / "run", **overrides))


def test_frozen_that_is_not_layer_numbers_is_one_clear_error(folder, text, tmp_path):
    args = ["--params", "0.6", "--out", tmp_path / "run", "--calib", text, "--eval", text, "--seq-len", "16"]
    assert "--frozen takes comma-separated layer numbers" in one_error(
        invoke("search", folder, *args, "--frozen", "a,b")
    )


def test_the_search_starts_from_flaps_allocation_snapped_into_its_space(make_job, tmp_path):
    """FLAP's per-layer shapes at the budget are the first start (a search must contain the rules it
    must beat), on the grid of the space and within the budget."""
    job = make_job(tmp_path / "run")
    searcher = prepare(job)
    dims, space = searcher.context.dims, job.space
    flap = flap_shapes(
        searcher.loaded,
        cached_calibration(searcher.loaded, searcher.calibration_ids, job.calibration),
        searcher.budget.params,
    )
    start = searcher.context.starts[0]
    assert searcher.context.fits(start)
    assert len(start.layers) == dims.num_layers
    for i, keep in start.layers.items():
        assert keep.shape.heads <= flap[i].heads and keep.shape.kv_heads <= flap[i].kv_heads
        assert keep.shape.neurons in space.neuron_choices(dims.layers[i]) and keep.shape.neurons <= flap[i].neurons
    smaller = static_cost(dims, [LayerShape(s.heads, s.kv_heads, s.neurons - NEURON_STEP) for s in flap]).params
    assert static_cost(dims, start.shapes()).params >= smaller  # snapped, not shrunk further than a grid step


# --- what optuna-dashboard shows ------------------------------------------------------------------


def test_the_store_names_its_objectives_and_shows_each_candidates_structure(runs):
    job, searcher, _ = runs("evolution")
    stored = optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url())
    assert stored.metric_names == [job.fitness, job.objective]
    for trial in completed(stored):
        subnet = SubNetwork.from_compact(trial.user_attrs[SUBNET_ATTR])
        layers = trial.user_attrs["structure"].split(" ")
        assert len(layers) == searcher.context.dims.num_layers
        for i, part in enumerate(layers):
            kept = subnet.layers.get(i)
            assert part == (f"{i}:{kept.shape.heads}/{kept.shape.kv_heads}/{kept.shape.neurons}" if kept else f"{i}:-")
        assert trial.user_attrs["kept_neurons"] == sum(s.neurons for s in subnet.shapes())


def linear_latency(shapes) -> float:
    """A runtime whose time is exactly linear in the shapes: 2 ms, plus per attention block 0.1 and per
    query head 0.02, per MLP block 0.05 and per neuron 0.0001."""
    attention = sum(0.1 + 0.02 * s.heads for s in shapes if s.has_attention)
    return 2.0 + attention + sum(0.05 + 1e-4 * s.neurons for s in shapes if s.has_mlp)


@pytest.fixture
def timed_linearly(monkeypatch):
    """Sub-networks timed by ``linear_latency`` beside a dense model: the list of those timed."""
    timed = []

    @contextlib.contextmanager
    def timer(loaded, _runtime, _seq_len):
        dense = linear_latency(loaded.dims.layers)

        def beside(subnet):
            timed.append(subnet)
            return dense, linear_latency(subnet.shapes())

        yield beside

    monkeypatch.setattr("slimlm.latency._timer", timer)
    return timed


def test_no_candidate_over_a_latency_budget_is_evaluated(make_job, tmp_path, timed_linearly):
    """Candidates are priced by the latency model before evaluation: one over the budget is never scored
    (they were timed and scored, then pruned: a search of mostly such misses)."""
    dense = linear_latency(load_model(make_job(tmp_path).model).dims.layers)
    searcher, study = search(make_job(tmp_path / "run", max_latency_ms=0.8 * dense))
    assert len(timed_linearly) == SAMPLES + CHECKS
    # half the timed sub-networks are where the search's candidates lie: within the parameter budget
    assert sum(searcher.budget.fits(searcher.cost(s)) for s in timed_linearly[1::2]) == (SAMPLES + CHECKS) // 2
    assert max(abs(e) for e in searcher.latency.check_errors) < 1e-9  # an exactly linear runtime is fitted exactly
    done = completed(study)
    assert len(first_stage(study)) == EVALUATIONS
    for trial in done:
        predicted = trial.user_attrs["latency_ms"]
        assert predicted == pytest.approx(linear_latency(candidate(trial).shapes()))
        assert predicted <= 0.8 * dense
    assert study.user_attrs[LATENCY_ATTR]["weights"] == list(searcher.latency.weights)


def test_a_speedup_budget_holds_every_candidate_to_it_and_a_resumed_search_prices_alike(
    make_job, tmp_path, timed_linearly
):
    job = make_job(tmp_path / "run", min_speedup=1.25, objective="latency")
    searcher, study = search(job)
    dense = searcher.latency.dense_ms
    assert all(dense / t.values[1] >= 1.25 - 1e-9 for t in completed(study))
    timed = len(timed_linearly)
    again, _ = search(dataclasses.replace(job, resume=True, evaluations=EVALUATIONS + 4), searcher.loaded)
    assert len(timed_linearly) == timed  # the study's latency model, not a new one
    assert again.latency == searcher.latency
    report = write_report(again, study)
    winner = next(m for m in report["finalists"] if m["trial"] == report["best_trial"])
    assert winner["predicted_latency_ms"] * 1.25 <= report["dense"]["predicted_latency_ms"] + 1e-9
    assert report["latency_model"]["max_abs_check_error"] < 1e-9
    assert "predicted" in search_summary(report) and "speed-up >= 1.25x" in searcher.budget.describe()


def test_a_speedup_of_zero_is_refused_before_any_work(make_job, tmp_path):
    with pytest.raises(SlimlmError, match="--min-speedup must be above 0"):
        search(make_job(tmp_path / "run", min_speedup=0.0))
    assert not (tmp_path / "run").exists()


def test_a_space_smaller_than_the_evaluations_ends_the_search_and_the_report_says_so(make_job, tmp_path, monkeypatch):
    """One shape for every layer and no depth: the evolution's budget-filling candidates are a handful.
    The search ended in an error after 500 fruitless proposals (seen on Gemma 3 with --uniform); it ends
    with what it found, says so, and a resumed search with more evaluations stops at once."""
    monkeypatch.setattr("slimlm.search.MAX_PRUNED_IN_A_ROW", 30)
    space = SearchSpace(per_layer=False, depth=False)
    job = make_job(tmp_path / "run", evaluations=100, space=space)
    searcher, study = search(job)
    done = len(first_stage(study))
    assert 0 < done < 100 and study.user_attrs[EXHAUSTED_ATTR]
    report = write_report(searcher, study)
    assert report["space_exhausted"] and report["best_trial"] is not None
    assert f"the search ended after {done} of 100 candidates" in search_summary(report)
    reached, stages = report["fitness_stage_reached"], report["fitness_stages"]
    assert reached == max(stage_of(t) for t in completed(study))
    said = f"ranked at fidelity stage {reached + 1} of {len(stages)}" in search_summary(report)
    assert said == (reached < len(stages) - 1)  # here stage 1 of 2: the handful never got promoted
    trials = len(study.get_trials(deepcopy=False))
    _, again = search(dataclasses.replace(job, resume=True, evaluations=200), searcher.loaded)
    assert len(again.get_trials(deepcopy=False)) == trials


def test_fruitless_proposals_are_shown_as_they_happen(make_job, tmp_path, monkeypatch):
    """Minutes of proposals that bring nothing new must not look like a hung search."""
    monkeypatch.setattr("slimlm.search.MAX_PRUNED_IN_A_ROW", 30)
    job = make_job(tmp_path / "run", evaluations=100, space=SearchSpace(per_layer=False, depth=False))
    searcher = prepare(job)
    Path(job.out).mkdir()
    study = open_study(job, create=True, fingerprint=searcher.fingerprint)
    misses = []
    run_worker(searcher, study, on_miss=misses.append)
    assert misses[-29:] == list(range(1, 30))  # the 30th ends the search


def test_a_latency_budget_no_candidate_meets_is_one_clear_error(make_job, tmp_path, timed_linearly):
    with pytest.raises(
        SlimlmError, match="the latency budget is beyond the fastest sub-network this search space allows"
    ):
        search(make_job(tmp_path / "run", max_latency_ms=1.0))  # below the 2 ms every model takes
    assert not (tmp_path / "run").exists()


def test_two_searches_share_one_database_under_their_study_names(make_job, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    for name, seed in (("first", 0), ("second", 1)):
        search(make_job(tmp_path / name, storage=url, study_name=name, seed=seed, evaluations=3))
    names = {s.study_name for s in optuna.study.get_all_study_summaries(url)}
    assert names == {"first", "second"}
    assert all(len(first_stage(optuna.load_study(study_name=n, storage=url))) == 3 for n in names)


def test_the_saved_model_has_a_card_naming_its_base_model_and_what_was_removed(reported, folder):
    job, _, study, report = reported
    card = (Path(job.out) / "best" / "README.md").read_text()
    subnet = candidate(study.trials[report["best_trial"]])
    assert f"base_model: {folder}" in card
    kept = subnet.shapes()
    assert f"| MLP neurons | {4 * 40} | {sum(s.neurons for s in kept)} |" in card
    assert f"| decoder layers | 4 | {len(kept)} |" in card
    assert f"{report['best_evaluation_perplexity']:.2f} |" in card
    assert subnet.describe(4) in card
    assert ("trust_remote_code=True" in card) == needs_remote_code(Path(job.out) / "best")


def test_the_model_cards_code_loads_a_ragged_model_and_its_tokenizer_without_a_prompt(reported, folder, tmp_path):
    """Run as written (stdin closed, as in a batch job): transformers' remote-code y/N prompt would stop it."""
    job, searcher, _, report = reported
    ragged = SubNetwork({0: LayerKeep(range(6), range(2), range(40)), 2: LayerKeep([0, 1, 2], [0], range(8))})
    info = extract(load_model(folder), ragged, tmp_path / "ragged")
    assert info.needs_remote_code
    card = model_card(report, job, ragged, searcher.context.dims, remote_code=True)
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(info.folder))
    check = "assert model.config.vocab_size == len(tokenizer)"
    done = subprocess.run(
        [sys.executable, "-c", code + check], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "[y/N]" not in done.stdout + done.stderr
    assert 'target_modules="all-linear"' in card


def test_a_built_in_model_is_named_by_its_hugging_face_id():
    assert base_model_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name("/models/mine") == "/models/mine"


def test_cli_search_json_is_the_written_report(folder, text, tmp_path):
    run = tmp_path / "run"
    result = invoke("search", folder, "--params", FRACTION, *search_options(text, run), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((run / "pareto.json").read_text())


def test_the_summary_says_plainly_when_the_search_adds_little_over_its_start():
    report = {"best_trial": 7, "best_evaluation_perplexity": 33.5, "best_start": {"trial": 0}}
    little = search_summary(report | {"best_start": {"trial": 0, "evaluation_perplexity": 34.4}, "search_gain": 0.026})
    assert "search gain +2.6%" in little and "adds little over its best start" in little
    much = search_summary(report | {"best_start": {"trial": 0, "evaluation_perplexity": 51.5}, "search_gain": 0.13})
    assert "search gain +13.0%" in much and "adds little" not in much


def test_a_waiting_finaliser_says_how_many_workers_evaluate_and_when_the_last_result_came(monkeypatch):
    """A finaliser with no worker alive must not wait in silence: its progress names both figures."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0))  # one result in, long enough ago to be seen
    study.ask()  # one candidate being evaluated
    monkeypatch.setattr(search_module, "_search_done", lambda *_: False)
    monkeypatch.setattr(search_module, "FINALISER_POLL_SECONDS", 0)
    seen = []

    def show(busy: int, idle: float | None) -> None:
        seen.append((busy, idle))
        if len(seen) == 2:
            raise KeyboardInterrupt  # the only way out of a search that never ends

    job = dataclasses.replace(SearchJob(model="m", out="o"), strategy="random")
    with pytest.raises(KeyboardInterrupt):
        search_module._await_workers(types.SimpleNamespace(job=job, context=None), study, show)
    assert seen[-1][0] == 1 and 0 <= seen[-1][1] < 60
