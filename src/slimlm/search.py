"""The search engine: candidates proposed by a strategy, evaluated in place, stored in an Optuna study.

Every evaluated candidate is a COMPLETE trial (objectives: its fitness, KL divergence to the dense
model by default, and a cost), scored as it will be shipped: stitched from the reformed variant
library. Multi-fidelity strategies score a candidate again on more windows as a trial of its own
(user attribute ``stage``). Candidates outside the budget or already seen are PRUNED without
evaluation. The study lives in an SQLite file in the run folder by default, or at any database
URL Optuna accepts, so a killed search resumes from its store and several worker processes (or
machines) can share one study.
"""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import torch

from slimlm import llamacpp
from slimlm.allocator import release
from slimlm.apply import subnetwork_applied
from slimlm.cache import lock_file
from slimlm.costs import StaticCost, static_cost
from slimlm.data import model_windows
from slimlm.errors import SlimlmError
from slimlm.evaluate import DenseReference, dense_reference, fitness
from slimlm.export import check_exportable
from slimlm.importance import (
    IMPORTANCE_FILE,
    METRICS,
    cached_calibration,
    importance,
    load_importance,
)
from slimlm.jobfile import JOB_FILE, read_job_file, write_job_file
from slimlm.jobs import OPTIONAL_FIELDS as OPTIONAL_FIELDS  # the job's home is the torch-free slimlm.jobs
from slimlm.jobs import STORE_FILE as STORE_FILE
from slimlm.jobs import STUDY_NAME as STUDY_NAME
from slimlm.jobs import SearchJob
from slimlm.jobs import parse_size as parse_size
from slimlm.latency import LatencyModel, build_latency_model, llamacpp_ms_per_token, prefill_ms, scratch_tokenizer_pre
from slimlm.library import VariantLibrary, build_library
from slimlm.models import LayerShape, LoadedModel, load_model
from slimlm.outputs import check_run_folder
from slimlm.progress import optuna_verbosity, progress_bar, timed
from slimlm.prune import flap_shapes, params_budget
from slimlm.reform import reform
from slimlm.space import uniform_subnetwork
from slimlm.strategies import (
    CLAIMED,
    ETA,
    STAGE_ATTR,
    SUBNET_ATTR,
    History,
    SearchContext,
    completed,
    evaluations_done,
    make_strategy,
    stage_of,
)
from slimlm.subnet import SubNetwork

OBJECTIVES = ("params", "flops", "memory", "latency")
FITNESSES = ("kl", "perplexity")  # what ranks candidates: KL divergence to the dense model, or perplexity
LATENCY_RUNTIMES = ("transformers", "llama.cpp")
MAX_PRUNED_IN_A_ROW = 500  # the space is exhausted or the budget too tight for the strategy
LATENCY_ATTR = "latency_model"  # study user attribute: the latency model every process prices candidates with
EXHAUSTED_ATTR = "exhausted"  # study user attribute: the space gave no new candidate within the budget
MAX_FAILED_IN_A_ROW = 20  # candidates scoring NaN or inf one after another: the model, not the candidates
HEARTBEAT_SECONDS = 10  # an evaluating trial's heartbeat in the store
GRACE_SECONDS = 60  # a RUNNING trial silent this long belongs to a killed process: failed, its candidate free again
LOCK_FILE = ".slimlm.lock"
ROLES = ("all", "worker", "finaliser")  # a search process evaluates and reports, only evaluates, or only reports
FINALISER_POLL_SECONDS = 5


@dataclass(frozen=True)
class Budget:
    """Upper limits a result must meet; ``None`` is no limit."""

    params: int | None = None
    memory_bytes: int | None = None
    latency_ms: float | None = None
    min_speedup: float | None = None  # over the dense model, as the latency model predicts it

    def fits(self, cost: StaticCost) -> bool:
        return (self.params is None or cost.params <= self.params) and (
            self.memory_bytes is None or cost.memory_bytes <= self.memory_bytes
        )

    @property
    def on_latency(self) -> bool:
        return self.latency_ms is not None or self.min_speedup is not None

    def fits_latency(self, latency: LatencyModel, shapes: list[LayerShape]) -> bool:
        """Whether the predicted latency of these kept layer shapes is within the latency limits."""
        ratio = latency.ratio(shapes)
        return (self.latency_ms is None or latency.dense_ms * ratio <= self.latency_ms) and (
            self.min_speedup is None or ratio * self.min_speedup <= 1
        )

    def describe(self) -> str:
        parts = [
            f"params <= {self.params:,}" if self.params else "",
            f"memory <= {self.memory_bytes / 1e6:,.1f} MB" if self.memory_bytes else "",
            f"latency <= {self.latency_ms:g} ms" if self.latency_ms else "",
            f"speed-up >= {self.min_speedup:g}x" if self.min_speedup else "",
        ]
        return ", ".join(p for p in parts if p) or "no budget"


@dataclass
class Searcher:
    """A loaded model with what it needs to price and evaluate candidates."""

    job: SearchJob
    loaded: LoadedModel
    budget: Budget
    context: SearchContext
    calibration_ids: torch.Tensor  # importance, the variant library, reformation of the result
    fitness_ids: torch.Tensor  # scored per candidate
    selection_ids: torch.Tensor  # the final choice among finalists
    refinement_ids: torch.Tensor  # the winner's refinement: calibration windows, then more past selection
    evaluation_ids: torch.Tensor  # the report's evaluation text (checked before the search, used after it)
    reference: SubNetwork | None  # uniform importance-ranked sub-network at the budget (None: none fits)
    dense: DenseReference  # the dense model's next-token distributions on the fitness windows
    library: VariantLibrary | None  # reformed variants that candidates are stitched from (None: unreformed)
    latency: LatencyModel | None  # a candidate's latency from its shape (None: latency is not searched on)
    fingerprint: str  # the model's weights: the study's identity, wherever the model lives on each machine
    seconds: dict[str, float] = field(default_factory=dict)  # this process's wall time per phase, for the report

    def reformed(self, subnet: SubNetwork) -> Mapping | None:
        """The weights a candidate is scored with: library stitches, sequential reformation, or none."""
        if self.job.reform_candidates:
            return reform(self.loaded, subnet, self.calibration_ids)
        return self.library.reformed(subnet) if self.library else None

    def cost(self, subnet: SubNetwork) -> StaticCost:
        # the full model's dims, fixed at preparation (``loaded.dims`` reads modules, which shrink while applied)
        return static_cost(self.context.dims, subnet.shapes(), context=self.job.seq_len)

    def latency_ms(self, model) -> float:
        """Timed now: prefill of ``seq_len`` tokens in transformers, or ms per generated token in llama.cpp
        of the model as applied (the search prices candidates with ``latency`` instead)."""
        if self.job.latency_runtime == "llama.cpp":
            return llamacpp_ms_per_token(self.loaded, self.job.out or None, self.job.seq_len)  # a worker has no folder
        return prefill_ms(model, self.job.seq_len)

    def evaluate(self, subnet: SubNetwork, stage: int = 0) -> dict:
        """Fitness (KL to dense and perplexity on the stage's fitness windows) and costs of one candidate."""
        start = time.perf_counter()
        cost = self.cost(subnet)
        windows = self.context.stages[stage]
        with subnetwork_applied(self.loaded, subnet, self.reformed(subnet), views=True) as model:
            result = fitness(model, self.dense, windows) | {"stage": stage, "fitness_windows": windows}
            if self.latency is not None:
                result["latency_ms"] = self.latency.ms(subnet.shapes())
        release()  # the candidate's logits and reformed weights: candidates of other shapes would grow the heap
        shapes = subnet.shapes()
        return result | {
            "params": cost.params,
            "flops": cost.flops_per_token,
            "memory": cost.memory_bytes,
            "seconds": time.perf_counter() - start,
            # readable in optuna-dashboard, where the compact sub-network is an opaque string
            "structure": subnet.describe(self.context.dims.num_layers),
            "kept_layers": len(shapes),
            "kept_heads": sum(s.heads for s in shapes),
            "kept_kv_heads": sum(s.kv_heads for s in shapes),
            "kept_neurons": sum(s.neurons for s in shapes),
        }


def prepare(job: SearchJob, loaded: LoadedModel | None = None) -> Searcher:
    """Load, check the budget against the space, calibrate (cached), and set up the strategy context."""
    loaded = loaded or load_model(job.model, job.dtype, job.device, job.stream)
    dims = loaded.dims
    if job.objective not in OBJECTIVES:
        raise SlimlmError(f"unknown objective '{job.objective}'; choose from {', '.join(OBJECTIVES)}")
    strategy = make_strategy(job.strategy)  # unknown names fail before any work
    if job.fitness not in FITNESSES:
        raise SlimlmError(f"unknown fitness '{job.fitness}'; choose from {', '.join(FITNESSES)}")
    if job.stages < 1 or min(job.calibration_windows, job.fitness_windows, job.selection_windows) < 1:
        raise SlimlmError("--stages and the calibration, fitness and selection windows must each be at least 1")
    if job.refine_epochs < 0:
        raise SlimlmError(f"--refine-epochs must be 0 (no refinement) or more, got {job.refine_epochs}")
    if job.refines and job.refine_windows < 1:
        raise SlimlmError(f"--refine-windows must be at least 1, got {job.refine_windows}")
    if job.latency_runtime not in LATENCY_RUNTIMES:
        raise SlimlmError(f"unknown latency runtime '{job.latency_runtime}'; choose from {', '.join(LATENCY_RUNTIMES)}")
    if job.metric not in METRICS and not (Path(loaded.folder) / IMPORTANCE_FILE).is_file():
        raise SlimlmError(f"unknown importance metric '{job.metric}'; choose from {', '.join(METRICS)}")
    bad = [i for i in job.space.frozen_layers if not 0 <= i < dims.num_layers]
    if bad:
        raise SlimlmError(f"--frozen layer {bad[0]} is out of range: the model has {dims.num_layers} layers (0-based)")
    if job.latency_runtime == "llama.cpp":
        check_exportable(loaded, "f16", scratch_tokenizer_pre(loaded))
        llamacpp.require()
    total = static_cost(dims, context=job.seq_len)
    given = (job.params_fraction, job.max_params, job.non_embedding_fraction)
    params = None if given == (None, None, None) else params_budget(dims, *given)  # None: a memory budget only
    if job.min_speedup is not None and job.min_speedup <= 0:
        raise SlimlmError(f"--min-speedup must be above 0, got {job.min_speedup:g}")
    budget = Budget(params, job.max_memory_bytes, job.max_latency_ms, job.min_speedup)
    smallest = static_cost(dims, list(job.space.smallest(dims).values()), context=job.seq_len)
    if params is not None and smallest.params > params:
        raise SlimlmError(
            f"budget of {params:,} parameters is below the smallest sub-network this search space allows: "
            f"{smallest.params:,} ({smallest.params / total.params:.3f} of the model)"
        )
    if job.max_memory_bytes is not None and smallest.memory_bytes > job.max_memory_bytes:
        raise SlimlmError(
            f"memory budget of {job.max_memory_bytes / 1e6:,.1f} MB is below the smallest sub-network this "
            f"search space allows: {smallest.memory_bytes / 1e6:,.1f} MB"
        )
    calib, fitness_ids, selection_ids, refinement_ids = search_windows(job, loaded)
    evaluation_ids = model_windows(loaded, job.evaluation, job.seq_len, job.evaluation_windows)
    if len(evaluation_ids) < job.evaluation_windows:  # found now, not after the search
        raise SlimlmError(
            f"{job.evaluation} has {len(evaluation_ids)} windows of {job.seq_len} tokens; the report needs "
            f"{job.evaluation_windows} (--eval-windows)"
        )
    trained = Path(loaded.folder) / IMPORTANCE_FILE  # a super-network: keep the units its training kept
    seconds: dict[str, float] = {}
    with timed(seconds, "calibration"):
        calibration = cached_calibration(loaded, calib, job.calibration)
        scores = load_importance(trained) if trained.is_file() else importance(loaded, calibration, job.metric)

    def fits_statically(shapes: list[LayerShape]) -> bool:
        return budget.fits(static_cost(dims, shapes, context=job.seq_len))

    latency = None
    if job.objective == "latency" or budget.on_latency:
        with timed(seconds, "latency model"):
            latency = _latency_model(job, loaded, scores, fits_statically)
        fastest = list(job.space.smallest(dims).values())
        if not budget.fits_latency(latency, fastest):
            raise SlimlmError(
                "the latency budget is beyond the fastest sub-network this search space allows: "
                f"{latency.ms(fastest):.3g} ms predicted, {1 / latency.ratio(fastest):.2f}x the dense model's speed"
            )

    def within(shapes: list[LayerShape]) -> bool:
        return fits_statically(shapes) and (latency is None or budget.fits_latency(latency, shapes))

    starts = tuple(job.space.starts(dims, scores, within, _flap_allocation(loaded, calibration, params)))
    try:
        reference = uniform_subnetwork(dims, scores, (params or total.params) / total.params)
    except SlimlmError:  # budgets only depth pruning reaches have no uniform reference
        reference = None

    stages = fidelity_stages(job.fitness_windows, job.stages if strategy.multi_fidelity else 1)
    context = SearchContext(dims, scores, job.space, within, starts, job.seed, stages, job.evaluations)
    library = None
    if job.reform and not job.reform_candidates:
        with timed(seconds, "library"):
            library = build_library(loaded, scores, job.space, calib)
    with timed(seconds, "fitness reference"):
        dense = dense_reference(loaded.model, fitness_ids)
    identity = loaded.fingerprint()
    return Searcher(
        job,
        loaded,
        budget,
        context,
        calib,
        fitness_ids,
        selection_ids,
        refinement_ids,
        evaluation_ids,
        reference,
        dense,
        library,
        latency,
        identity,
        seconds,
    )


def search_windows(job: SearchJob, loaded: LoadedModel) -> tuple[torch.Tensor, ...]:
    """The job's windows of its calibration text, disjoint where they must be: calibration, fitness,
    selection, then refinement's, which are the calibration windows followed by as many windows past
    selection as ``refine_windows`` asks beyond them (none where the job does not refine). Fitness and
    selection come before refinement's extra windows, so they do not move when its number changes."""
    extra = max(job.refine_windows - job.calibration_windows, 0) if job.refines else 0
    split = [job.calibration_windows, job.fitness_windows, job.selection_windows, extra]
    windows = model_windows(loaded, job.calibration, job.seq_len, sum(split))
    if len(windows) < sum(split):
        needs = " + ".join(map(str, split[: 3 + bool(extra)]))
        uses = "calibration, fitness, selection and refinement" if extra else "calibration, fitness and selection"
        raise SlimlmError(  # refinement's extra windows named: lowering --refine-windows is one way out
            f"{job.calibration} has {len(windows)} windows of {job.seq_len} tokens; {uses} need {sum(split)} ({needs})"
        )
    calib, fitness_ids, selection_ids, more = windows.split(split)
    return calib, fitness_ids, selection_ids, torch.cat([calib[: job.refine_windows], more])


def _latency_model(job: SearchJob, loaded: LoadedModel, scores, within) -> LatencyModel:
    """The study's latency model (a resumed search, a worker joining one), or one fitted now: every
    process of a search must price candidates alike."""
    if _study_exists(job):
        stored = open_study(job, create=False).user_attrs.get(LATENCY_ATTR)
        if stored:
            return LatencyModel.from_dict(stored)
    return build_latency_model(loaded, job.latency_runtime, job.seq_len, job.space, scores, within, job.seed)


def _keep_latency_model(searcher: Searcher, study: optuna.Study) -> None:
    """Store the latency model with the study, for resumed searches and workers (the first one stays)."""
    if searcher.latency is not None and LATENCY_ATTR not in study.user_attrs:
        study.set_user_attr(LATENCY_ATTR, searcher.latency.summary())


def _flap_allocation(loaded: LoadedModel, calibration, params: int | None) -> list[LayerShape] | None:
    """FLAP's per-layer shapes at the parameter budget, for the search to start from (None: no such
    budget, or FLAP's smallest model does not fit it)."""
    if params is None:
        return None
    try:
        return flap_shapes(loaded, calibration, params)
    except SlimlmError:
        return None  # the budget is below FLAP's smallest model: the other starts (depth) still apply


def fidelity_stages(windows: int, stages: int) -> tuple[int, ...]:
    """Fitness windows per stage, fewest first, each ``ETA`` times the one before, the last all of them."""
    return tuple(sorted({max(1, windows // ETA**k) for k in range(stages)}))


def open_study(job: SearchJob, create: bool, fingerprint: str | None = None) -> optuna.Study:
    """The job's study; ``create`` makes it (refusing to mix with an existing one unless resuming).

    Its identity is the job's settings with the model's weights ``fingerprint`` for the model, so a
    worker whose copy of the model lies at another path joins it; without a fingerprint (checks made
    before the model is loaded) the model is left out of the comparison."""
    url = job.storage_url()
    storage = _storage(url)
    exists = _holds_study(storage, job.study_name)
    sampler = make_strategy(job.strategy).sampler(job.seed)
    if create and exists and not job.resume:
        raise SlimlmError(f"{url} already holds a search; pass --resume to continue it, or choose another --out")
    if create and not exists:
        if fingerprint is None:
            raise ValueError("a study is created with the model's fingerprint")
        # load_if_exists: machines starting together race to create it; the loser joins the winner's
        study = optuna.create_study(
            storage=storage,
            study_name=job.study_name,
            sampler=sampler,
            directions=["minimize", "minimize"],
            load_if_exists=True,
        )
        if "job" not in study.user_attrs:
            with warnings.catch_warnings():  # "experimental" in Optuna since 3.2, and what the dashboard reads
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([job.fitness, job.objective])
            study.set_user_attr("job", study_identity(job, fingerprint))
    else:
        study = optuna.load_study(study_name=job.study_name, storage=storage, sampler=sampler)
    _check_identity(study.user_attrs.get("job") or {}, study_identity(job, fingerprint))
    return study


def study_identity(job: SearchJob, fingerprint: str | None) -> dict:
    """What a study is (JSON values): the job's identity, the model named by its weights' fingerprint."""
    return json.loads(json.dumps(job.identity() | {"model": fingerprint}))


def _check_identity(stored: dict, wanted: dict) -> None:
    compared = [k for k in wanted if not (k == "model" and wanted[k] is None)]
    changed = sorted(k for k in compared if stored.get(k) != wanted[k])
    if changed:
        what = ", ".join("the model's weights" if k == "model" else k for k in changed)
        raise SlimlmError(f"--resume with different settings than the stored search: {what}")


def _storage(url: str) -> optuna.storages.RDBStorage:
    # heartbeats: a trial whose process was killed is failed by the next worker, and its candidate freed
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)


def _holds_study(storage: optuna.storages.RDBStorage, name: str) -> bool:
    return name in {s.study_name for s in optuna.study.get_all_study_summaries(storage)}


def _study_exists(job: SearchJob) -> bool:
    if job.storage is None and not job.private_store().is_file():
        return False  # not even an empty SQLite file made by asking
    return _holds_study(_storage(job.storage_url()), job.study_name)


def run_worker(searcher: Searcher, study: optuna.Study, on_result=None, on_miss=None) -> None:
    """Ask, propose, price, evaluate, tell, until the study holds ``evaluations`` candidates.
    ``on_result(result)`` is called with each scored candidate, ``on_miss(count)`` with each proposal in
    a row that is already scored or over the budget (a search can spend minutes on them)."""
    job, strategy = searcher.job, make_strategy(searcher.job.strategy)
    pruned = _Streak(
        MAX_PRUNED_IN_A_ROW,
        "candidates in a row were outside the budget or already seen; widen the search space or the budget",
    )
    failed = _Streak(
        MAX_FAILED_IN_A_ROW,
        f"candidates in a row scored {job.fitness} NaN or inf; the model or the calibration "
        "text gives no finite scores",
    )
    while True:
        _fail_stale_trials(study)
        history = History.read(study)  # this step's one read of the store; the claim checks below read again
        if _search_done(study, strategy, history, searcher.context, job.evaluations):
            return
        trial = _ask(study)
        with _heartbeat(study, trial):
            subnet = strategy.propose(trial, history, searcher.context)
            compact, stage = subnet.to_compact(), int(trial.user_attrs.get(STAGE_ATTR, 0))
            claimed = searcher.context.fits(subnet) and compact not in history.seen(stage, exclude=trial.number)
            if claimed:
                trial.set_user_attr(SUBNET_ATTR, compact)  # claim it before evaluating, so other workers skip it
                # two workers may claim one candidate at once: the lower trial number keeps it
                claimed = compact not in _claims_before(study, trial.number, stage)
            if not claimed:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                if _missed(study, pruned, on_miss):
                    return
                continue
            try:
                result = searcher.evaluate(subnet, stage)
            except BaseException:  # interrupted or broken: the trial must not stay RUNNING
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
        for key, value in result.items():
            trial.set_user_attr(key, value)
        if not math.isfinite(result[job.fitness]):  # failed, not best: NaN would win every comparison
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if failed.hit():
                raise failed.error()
            continue
        failed.reset()
        if compact in _claims_before(study, trial.number, stage):  # a claim raced after ours was checked
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, [result[job.fitness], result[_objective_key(job.objective)]])
        pruned.reset()
        if on_result:
            on_result(result)


def _claims_before(study: optuna.Study, number: int, stage: int) -> set[str]:
    """Candidates claimed at ``stage`` by trials numbered below ``number``, as the store holds them now."""
    return History(study.get_trials(deepcopy=False, states=CLAIMED)).seen(stage, before=number)


def _search_done(study: optuna.Study, strategy, history: History, context: SearchContext, evaluations: int) -> bool:
    """Done by the strategy's rule, or because a worker found the space exhausted."""
    return bool(study.user_attrs.get(EXHAUSTED_ATTR)) or strategy.finished(history, context, evaluations)


def _missed(study: optuna.Study, streak: _Streak, on_miss) -> bool:
    """Count a proposal that brought nothing new; whether the search ends here. At the streak's limit,
    with candidates evaluated, the space holds no more within the budget (a uniform one holds a handful
    that fill it; the report says the search ended early); with none, the budget is out of the
    strategy's reach, an error."""
    if not streak.hit():
        if on_miss:
            on_miss(streak.count)
        return False
    if not completed(study):
        raise streak.error()
    study.set_user_attr(EXHAUSTED_ATTR, True)  # the other workers and the finaliser stop too
    return True


class _Streak:
    """Outcomes of one kind in a row: ``limit`` of them ends the loop, not an endless one."""

    def __init__(self, limit: int, message: str) -> None:
        self.limit, self.message, self.count = limit, message, 0

    def hit(self) -> bool:
        """Count one more; whether the streak reached its limit."""
        self.count += 1
        return self.count >= self.limit

    def reset(self) -> None:
        self.count = 0

    def error(self) -> SlimlmError:
        return SlimlmError(f"{self.limit} {self.message}")


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():  # Optuna suggests optimize() with heartbeats; ask/tell records them itself
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


def _fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class _heartbeat:
    """Record ``trial``'s heartbeat in the store every ``HEARTBEAT_SECONDS`` while the block runs."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        # Optuna's ask/tell API gives no public handle on the trial's id; its optimize() loop uses the same one
        self._beat = lambda: study._storage.record_heartbeat(trial._trial_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self._beat()

    def __enter__(self) -> None:
        self._beat()
        self._thread.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _objective_key(objective: str) -> str:
    return "latency_ms" if objective == "latency" else objective


def _worker_process(job: SearchJob, threads: int) -> None:
    _exit_with_parent()
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna_verbosity())
    searcher = prepare(_evaluator(job))
    run_worker(searcher, open_study(job, create=False, fingerprint=searcher.fingerprint))


def _evaluator(job: SearchJob) -> SearchJob:
    """``job`` as a process that only evaluates candidates runs it: it ships no winner, so it refines
    nothing and needs no refinement windows (its calibration text may hold fewer)."""
    return replace(job, refine_epochs=0)


def _exit_with_parent() -> None:
    """A helper process ends when the search process that started it ends, even by kill -9."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        parent.join()
        os._exit(1)

    if parent is not None:
        threading.Thread(target=watch, daemon=True).start()


_HELD: dict[Path, object] = {}  # run folders this process holds, with their open lock files


def stored_candidate(run: str | Path, trial: int) -> tuple[SearchJob, SubNetwork]:
    """The job of the run folder ``run`` (its ``job.toml``) and the sub-network its trial ``trial``
    evaluated, to extract a front member other than the winner."""
    run = Path(run)
    if not (run / JOB_FILE).is_file():
        raise SlimlmError(f"{run} is not a slimlm run folder (no {JOB_FILE}); --trial needs one")
    job = replace(SearchJob.from_dict(read_job_file(run / JOB_FILE), f"{run / JOB_FILE}"), out=str(run))
    if not _study_exists(job):
        raise SlimlmError(f"{run} holds no search store ({job.storage_url()})")
    done = {t.number: t for t in completed(open_study(job, create=False))}
    if trial not in done:
        numbers = sorted(done)
        raise SlimlmError(
            f"trial {trial} of {run} is not an evaluated candidate; evaluated: {numbers[0]}-{numbers[-1]} "
            f"({len(numbers)} of them; pareto.json lists the front)"
            if numbers
            else f"{run} has no evaluated candidate"
        )
    return job, SubNetwork.from_compact(done[trial].user_attrs[SUBNET_ATTR])


def hold_run_folder(out: str | Path) -> None:
    """Lock the run folder for this process (until it ends), or refuse: another process searching or
    reporting in the same folder would fail this one's trials and overwrite its results."""
    folder = Path(out).resolve()
    if folder in _HELD:
        return
    handle = lock_file(folder / LOCK_FILE, wait=False)
    if handle is None:
        raise SlimlmError(f"another slimlm process is using {out}; wait for it to finish, or choose another --out")
    _HELD[folder] = handle


def _work(job: SearchJob, loaded: LoadedModel | None) -> tuple[Searcher, optuna.Study]:
    """A worker: evaluate candidates of the shared study until the search is done."""
    if _study_exists(job):  # other settings than the study's: refused now, not after calibration
        open_study(job, create=True)
    optuna.logging.set_verbosity(optuna_verbosity())
    searcher = prepare(_evaluator(job), loaded)
    study = open_study(job, create=True, fingerprint=searcher.fingerprint)
    _keep_latency_model(searcher, study)
    if not study.get_trials(deepcopy=False):  # the first to arrive seeds it; a raced seed is pruned as seen
        make_strategy(job.strategy).begin(study, searcher.context)
    with progress_bar() as bar:
        task = bar.add_task("searching (worker)", total=job.evaluations, completed=evaluations_done(study))
        run_worker(searcher, study, lambda _result: bar.update(task, completed=evaluations_done(study)))
        bar.update(task, completed=evaluations_done(study))
    return searcher, study


def _await_workers(searcher: Searcher, study: optuna.Study, show) -> None:
    """Wait until the workers have finished the search: done by the strategy's rule, nothing running
    (a killed worker's trial is failed by its stale heartbeat, and its candidate left to the others)."""
    strategy, job = make_strategy(searcher.job.strategy), searcher.job
    while True:
        _fail_stale_trials(study)
        done = _search_done(study, strategy, History.read(study), searcher.context, job.evaluations)
        trials = study.get_trials(False)  # one read of the store per poll: it may be a remote database
        busy = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        if done and not busy:
            return
        finished = [t.datetime_complete for t in trials if t.datetime_complete is not None]
        show(busy, (datetime.datetime.now() - max(finished)).total_seconds() if finished else None)
        time.sleep(FINALISER_POLL_SECONDS)


def search(job: SearchJob, loaded: LoadedModel | None = None, role: str = "all") -> tuple[Searcher, optuna.Study]:
    """Run (or resume) a search to ``job.evaluations`` evaluated candidates; show progress.

    ``role`` (``ROLES``), for a search over many machines on one ``job.storage``: ``all`` evaluates
    and returns for the report (the first process, or the only one); ``worker`` joins the study (or
    creates it), evaluates until the search is done, and writes nothing but the store (no run folder:
    ``job.out`` is unused); ``finaliser`` evaluates nothing and returns once the workers are done.
    """
    if job.evaluations < 1 or job.workers < 1:
        raise SlimlmError("--evaluations and --workers must be at least 1")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role != "all" and not job.storage:
        flag = "--worker" if role == "worker" else "--finalise"
        raise SlimlmError(f"{flag} needs --storage URL: the store that the machines of one search share")
    if role == "worker":
        return _work(replace(job, resume=True), loaded)  # joining the study is a worker's job, not a clash
    if role == "finaliser":
        job = replace(job, resume=True)  # the workers' study: continued, not a clash
    store = None if job.storage else job.private_store()
    check_run_folder(job.out, store, job.resume, job.overwrite, loaded.folder if loaded else job.model)
    if store is not None and store.is_file():
        hold_run_folder(job.out)  # before reading the store: another process may be writing it
        if job.overwrite and not job.resume:
            store.unlink()
    if _study_exists(job):  # without --resume, or with other settings: refused now, not after calibration
        open_study(job, create=True)
    optuna.logging.set_verbosity(optuna_verbosity())
    searcher = prepare(job, loaded)
    Path(job.out).mkdir(parents=True, exist_ok=True)  # only now: bad input leaves no empty run folder
    hold_run_folder(job.out)
    study = open_study(job, create=True, fingerprint=searcher.fingerprint)
    write_job_file(job.to_dict(), job.out, searcher.fingerprint)  # what ran, to rerun it (--config)
    _keep_latency_model(searcher, study)
    if not study.get_trials(deepcopy=False):
        make_strategy(job.strategy).begin(study, searcher.context)
    if not job.storage:  # a private store, and this process holds its folder: whatever was running is stale
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    threads = max(1, (os.cpu_count() or 1) // job.workers)
    context = multiprocessing.get_context("spawn")
    helpers = [context.Process(target=_worker_process, args=(job, threads)) for _ in range(job.workers - 1)]
    for process in helpers:
        process.start()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads if helpers else previous_threads)
    try:
        with timed(searcher.seconds, "search"), progress_bar() as bar:
            task = bar.add_task("searching", total=job.evaluations, completed=evaluations_done(study))

            def show(result: dict) -> None:
                done = completed(study)
                top = [t.values[0] for t in done if stage_of(t) == result["stage"]]
                stage = f"stage {result['stage'] + 1}/{len(searcher.context.stages)}"
                best = f", best {job.fitness} {min(top):.4g}" if top else ""
                bar.update(task, completed=History(done).first_stage(), description=f"searching ({stage}{best})")

            def missed(count: int) -> None:
                seen = f"{count} proposals in a row scored or over the budget"
                bar.update(task, description=f"searching ({seen}; the search ends at {MAX_PRUNED_IN_A_ROW})")

            if role == "finaliser":

                def waiting(busy: int, idle: float | None) -> None:  # says so when no worker is alive
                    last = "none yet" if idle is None else f"the last {idle:.0f} s ago"
                    state = f"waiting for the workers: {busy} evaluating, results {last}"
                    bar.update(task, completed=evaluations_done(study), description=f"finalising ({state})")

                _await_workers(searcher, study, waiting)
            else:
                run_worker(searcher, study, show, missed)
            for process in helpers:
                process.join()
            bar.update(task, completed=evaluations_done(study))
    finally:
        torch.set_num_threads(previous_threads)
        for process in helpers:
            if process.is_alive():
                process.terminate()
    failed = [p.exitcode for p in helpers if p.exitcode]
    if failed:
        raise SlimlmError(f"{len(failed)} search worker(s) failed (exit codes {failed}); the store keeps their results")
    return searcher, study
