"""Database traffic of the search: the store's overhead per trial as the study grows, on SQLite and
PostgreSQL, and candidates per minute with 1 and 2 workers on a real model.

Part 1 runs the default search (multi-fidelity evolution; 2 fitness windows make 2 fidelity stages, so
16 first-stage candidates make 20 trials) on a tiny random Llama built here with the tests' builders
(``tests.conftest``: 6 layers, 16-token windows), so an evaluation costs milliseconds and the loop's
own cost shows, until the study holds ``--trials`` trials; once per storage (SQLite: the private file
in the run folder; PostgreSQL: a throw-away cluster, ``tests.postgres``). The overhead of a completed
trial is the time not spent evaluating since the completed trial before it (by start): the gap from
that one's completion to this one's start, plus this one's duration less its evaluation
(``user_attrs["seconds"]``); pruned trials in between count as overhead. It is averaged over the
first ``--window`` (100) trial numbers and the last ones (the store holding ~100 and ~``--trials``
trials). Optuna's storage classes are wrapped in this process to count, per trial (from one
``study.ask`` to the next), the calls slimlm and Optuna make on the study's store (``_CachedStorage``),
the time spent in them, the trials it hands out (``get_all_trials``, ``get_trial``: the lists slimlm
scans), the trials read from the database (``RDBStorage``) and the SQL statements sent: a count that
grows with the study is traffic quadratic in the search's length.

Part 2 (only with ``--model``) searches the real model with ``workers=1`` then ``workers=2`` (helper
processes on the same store), same budget (0.7 of the non-embedding parameters) and ``--evaluations``.
Candidates per minute: completed first-stage candidates over the span from the first trial's start
to the last trial's completion, so preparation (calibration and the variant library, cached on disk
after the first run; a helper's own start-up is inside the span) is left out. All trials per minute
(promotions to later stages included) are reported beside it. Example:

    python benchmarks/store_traffic.py --trials 1000 --model smollm2-135m --evaluations 40
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny-model builders of the tests, and their PostgreSQL cluster

import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
import torch  # noqa: E402
from optuna.storages import BaseStorage, RDBStorage  # noqa: E402
from optuna.storages._cached_storage import _CachedStorage  # noqa: E402
from tests.conftest import TEXT, fast_search_settings, save_tiny, tiny_loaded  # noqa: E402
from tests.postgres import MISSING, server_bin, throwaway_cluster  # noqa: E402

from slimlm.search import SearchJob, search  # noqa: E402
from slimlm.strategies import STRATEGIES, stage_of  # noqa: E402
from slimlm.strategies.base import ETA  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STORAGES = ("sqlite", "postgresql")
TINY = dict(num_hidden_layers=6, intermediate_size=64)  # 6 layers x 54 levels: room for thousands of candidates
TRIAL_LISTS = ("get_all_trials", "_get_trials")  # calls returning lists of trials
# what the store is asked: Optuna's storage interface, and the private calls its cache makes on RDBStorage
STORE_METHODS = [
    *sorted(n for n, v in vars(BaseStorage).items() if callable(v) and not n.startswith("_")),
    "record_heartbeat",
    "get_heartbeat_interval",
    "get_heartbeat_stale_trial_callback",
    "_get_stale_trial_ids",
]
DB_METHODS = [*STORE_METHODS, "_get_trials", "_create_new_trial", "_set_trial_param", "_get_best_trial_id"]


class Traffic:
    """Calls of Optuna's storage classes and SQL statements in this process, per trial: everything from
    one ``Study.ask`` to the next is charged to the trial the first one began (in a fresh study searched
    by one process, slot k is trial number k; slot -1 is preparation)."""

    def __init__(self) -> None:
        self.slots: dict[int, Counter] = defaultdict(Counter)
        self.slot, self.on = -1, False
        self._lock, self._local, self._undo = threading.Lock(), threading.local(), []

    def count(self, key: str, n: int = 1) -> None:
        if self.on:
            with self._lock:
                self.slots[self.slot][key] += n

    @contextmanager
    def counting(self):
        self.slots.clear()
        self.slot, self.on = -1, True
        try:
            yield self
        finally:
            self.on = False

    def install(self) -> None:
        for cls, layer, names in ((_CachedStorage, "store", STORE_METHODS), (RDBStorage, "db", DB_METHODS)):
            for name in names:
                if hasattr(cls, name) and not isinstance(vars(cls).get(name), staticmethod):
                    self._wrap(cls, layer, name)
        ask = optuna.Study.ask

        @functools.wraps(ask)
        def counted_ask(study, *args, **kwargs):
            if self.on:
                self.slot += 1
            return ask(study, *args, **kwargs)

        self._patch(optuna.Study, "ask", counted_ask)
        listener = lambda *_args: self.count("sql")  # noqa: E731
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", listener)
        self._undo.append(lambda: sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", listener))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _patch(self, cls, name: str, value) -> None:
        own = name in vars(cls)
        before = vars(cls).get(name)
        setattr(cls, name, value)
        self._undo.append(lambda: setattr(cls, name, before) if own else delattr(cls, name))

    def _wrap(self, cls, layer: str, name: str) -> None:
        original, local = getattr(cls, name), self._local

        @functools.wraps(original)
        def counted(*args, **kwargs):
            depth = getattr(local, layer, 0)  # only the outermost call of a layer counts (they call each other)
            setattr(local, layer, depth + 1)
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                setattr(local, layer, depth)
            if depth == 0:
                self.count(f"{layer}_seconds", time.perf_counter() - start)
                self.count(f"{layer}_calls")
                self.count(f"{layer}.{name}")
                n = len(result) if name in TRIAL_LISTS else 1 if name == "get_trial" else 0
                self.count(f"{layer}_trials", n)
            return result

        self._patch(cls, name, counted)


def evaluations_for(trials: int) -> int:
    """First-stage candidates that make ``trials`` trials with 2 fidelity stages: each generation of
    ``generation`` candidates sends its best ``1/ETA`` on to the second stage."""
    generation = STRATEGIES["evolution"]().generation
    return math.ceil(trials * generation / (generation + generation // ETA))


def overheads(study: optuna.Study) -> dict[int, tuple[float, float]]:
    """Completed trials' (overhead, evaluation) seconds by trial number; the first has no overhead."""
    done = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=start_of)
    result = {}
    for before, t in itertools.pairwise(done):
        duration = (t.datetime_complete - t.datetime_start).total_seconds()
        gap = (t.datetime_start - before.datetime_complete).total_seconds()
        result[t.number] = (gap + duration - t.user_attrs["seconds"], t.user_attrs["seconds"])
    return result


def start_of(trial: optuna.trial.FrozenTrial):
    return trial.datetime_start


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def store_overhead(
    storage: str, url: str | None, trials: int, window: int, model: str, text: Path, work: Path, traffic
) -> dict:
    """Part 1 on one storage: the search on the tiny model, then its overhead and traffic at both ends."""
    job = SearchJob(
        model=model,
        out=str(work / f"tiny-{storage}"),
        params_fraction=0.6,
        evaluations=evaluations_for(trials),
        storage=url,
        study_name=f"tiny-{storage}-{os.getpid()}",
        **fast_search_settings(text),
    )
    start = time.perf_counter()
    with traffic.counting():
        _, study = search(job)
    seconds = time.perf_counter() - start
    stored = study.get_trials(deepcopy=False)
    timed = overheads(study)
    reached = min(trials, len(stored))
    windows = []
    for lo, hi in [(0, min(window, reached))] + ([(reached - window, reached)] if reached > window else []):
        numbers = range(lo, hi)
        slots = [traffic.slots[n] for n in numbers]
        methods = sorted({k for s in slots for k in s if "." in k})
        windows.append(
            {
                "trials": f"{lo + 1}-{hi}",
                "completed": sum(n in timed for n in numbers),
                "overhead_ms": 1000 * mean(timed[n][0] for n in numbers if n in timed),
                "evaluation_ms": 1000 * mean(timed[n][1] for n in numbers if n in timed),
                "in_store_calls_ms": 1000 * mean(s["store_seconds"] for s in slots),
                **{key: mean(s[key] for s in slots) for key in ("sql", "store_calls", "store_trials", "db_trials")},
                "db_calls": mean(s["db_calls"] for s in slots),
                "calls_by_method": {k: mean(s[k] for s in slots) for k in methods},
            }
        )
    states = Counter(t.state.name for t in stored)
    return {
        "storage": storage,
        "evaluations": job.evaluations,
        "trials": len(stored),
        "states": dict(states),
        "first_stage": sum(stage_of(t) == 0 for t in stored if t.state == optuna.trial.TrialState.COMPLETE),
        "search_seconds": seconds,
        "windows": windows,
        "preparation": dict(traffic.slots[-1]),  # the store's traffic before the first trial
        "overhead_ms_by_trial": {n: round(1000 * o, 3) for n, (o, _) in sorted(timed.items())},
    }


def throughput(storage: str, url: str | None, workers: int, model: str, evaluations: int, loaded, work: Path) -> dict:
    """Part 2 on one storage and worker count: the real model's search, its candidates per minute."""
    job = SearchJob(
        model=model,
        out=str(work / f"{storage}-{workers}"),
        non_embedding_fraction=0.7,
        evaluations=evaluations,
        workers=workers,
        storage=url,
        study_name=f"real-{storage}-{workers}-{os.getpid()}",
    )
    start = time.perf_counter()
    _, study = search(job, loaded)
    seconds = time.perf_counter() - start
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    span = (
        max(t.datetime_complete for t in trials if t.datetime_complete) - min(map(start_of, trials))
    ).total_seconds()
    first = sum(stage_of(t) == 0 for t in done)
    return {
        "model": model,
        "storage": storage,
        "workers": workers,
        "first_stage": first,
        "completed": len(done),
        "trials": len(trials),
        "span_seconds": span,
        "candidates_per_minute": first / (span / 60),
        "trials_per_minute": len(done) / (span / 60),
        "search_seconds": seconds,
    }


def overhead_table(rows: list[dict]) -> str:
    lines = [
        "| storage | trials | overhead per trial | of it in store calls | evaluation per trial"
        " | SQL statements per trial | store calls per trial | trials handed out per trial"
        " | trials read from the database per trial |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for w in r["windows"]:
            lines.append(
                f"| {r['storage']} | {w['trials']} | {w['overhead_ms']:.1f} ms | {w['in_store_calls_ms']:.1f} ms"
                f" | {w['evaluation_ms']:.1f} ms"
                f" | {w['sql']:.1f} | {w['store_calls']:.1f} | {w['store_trials']:.0f} | {w['db_trials']:.1f} |"
            )
    return "\n".join(lines)


def overhead_notes(rows: list[dict]) -> str:
    return "\n".join(
        f"- {r['storage']}: {r['evaluations']} first-stage evaluations, {r['trials']} trials"
        f" ({', '.join(f'{n} {k.lower()}' for k, n in sorted(r['states'].items()))}),"
        f" search {r['search_seconds']:.1f} s"
        for r in rows
    )


def throughput_table(rows: list[dict]) -> str:
    lines = [
        "| model | storage | workers | first-stage candidates | trials completed | span | candidates / min"
        " | trials / min | search call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['storage']} | {r['workers']} | {r['first_stage']} | {r['completed']}"
            f" | {r['span_seconds']:.1f} s | {r['candidates_per_minute']:.1f} | {r['trials_per_minute']:.1f}"
            f" | {r['search_seconds']:.1f} s |"
        )
    by = {(r["storage"], r["workers"]): r["candidates_per_minute"] for r in rows}
    storages = [s for s in dict.fromkeys(r["storage"] for r in rows) if {(s, 1), (s, 2)} <= by.keys()]
    ratios = [f"{s}: {by[s, 2] / by[s, 1]:.2f}x" for s in storages]
    ratio = "\n\n2 workers / 1 worker, candidates per minute: " + ", ".join(ratios) if ratios else ""
    return "\n".join(lines) + ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000, help="trials the tiny model's study is to reach")
    parser.add_argument("--window", type=int, default=100, help="trials averaged at each end of the study")
    parser.add_argument("--storages", default=",".join(STORAGES))
    parser.add_argument("--model", help="a real model for part 2 (e.g. smollm2-135m); without it, part 1 only")
    parser.add_argument("--evaluations", type=int, default=40, help="first-stage candidates per search of part 2")
    parser.add_argument("--name", default="store_traffic")
    args = parser.parse_args()
    storages = args.storages.split(",")
    if unknown := set(storages) - set(STORAGES):
        parser.error(f"unknown storage {sorted(unknown)}; choose from {', '.join(STORAGES)}")
    if "postgresql" in storages and server_bin() is None:
        print(f"{MISSING}: SQLite only", flush=True)
        storages = [s for s in storages if s != "postgresql"]

    overhead_rows, throughput_rows = [], []
    traffic = Traffic()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        urls = {s: stack.enter_context(throwaway_cluster()) if s == "postgresql" else None for s in storages}
        text = work / "words.txt"
        text.write_text(TEXT, encoding="utf-8")
        tiny = str(save_tiny(tiny_loaded("llama", **TINY), work / "tiny-llama"))
        threads = torch.get_num_threads()
        cache = os.environ.get("SLIMLM_CACHE")
        os.environ["SLIMLM_CACHE"] = str(work / "cache")  # the tiny model's calibration and library: thrown away
        torch.set_num_threads(1)  # a tiny model gains nothing from threads
        traffic.install()
        try:
            for storage in storages:
                row = store_overhead(storage, urls[storage], args.trials, args.window, tiny, text, work, traffic)
                overhead_rows.append(row)
                print(overhead_table(overhead_rows[-1:]), flush=True)
        finally:
            traffic.uninstall()
            torch.set_num_threads(threads)
            if cache is None:
                del os.environ["SLIMLM_CACHE"]
            else:
                os.environ["SLIMLM_CACHE"] = cache
        if args.model:
            from slimlm.models import load_model

            loaded = load_model(args.model)
            for storage in storages:
                for workers in (1, 2):
                    row = throughput(storage, urls[storage], workers, args.model, args.evaluations, loaded, work)
                    throughput_rows.append(row)
                    print(throughput_table([row]), flush=True)

    RESULTS.mkdir(exist_ok=True)
    results = {"store_overhead": overhead_rows, "throughput": throughput_rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    command = "python benchmarks/store_traffic.py " + " ".join(sys.argv[1:])
    report = f"# Database traffic of the search\n\n`{command}`\n\n## Store overhead per trial (tiny model)\n\n"
    report += f"{overhead_table(overhead_rows)}\n\n{overhead_notes(overhead_rows)}\n"
    if throughput_rows:
        report += f"\n## Candidates per minute, 1 and 2 workers\n\n{throughput_table(throughput_rows)}\n"
    (RESULTS / f"{args.name}.md").write_text(report)
    print(overhead_table(overhead_rows))
    print(overhead_notes(overhead_rows))
    if throughput_rows:
        print(throughput_table(throughput_rows))


if __name__ == "__main__":
    main()
