"""The search on a real PostgreSQL server (a throw-away cluster, see ``conftest.postgres_url``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from slimlm import search as search_module
from slimlm.report import write_report
from slimlm.search import SearchJob, search
from slimlm.strategies import SUBNET_ATTR, completed, stage_of

from .conftest import fast_search_settings, save_tiny, tiny_loaded


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny(tiny_loaded("llama"), tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture
def make_job(folder, text):
    def make(out: Path, **overrides) -> SearchJob:
        values = dict(model=str(folder), out=str(out), params_fraction=0.6, evaluations=10)
        return SearchJob(**(values | fast_search_settings(text) | overrides))

    return make


def stored(job: SearchJob) -> list[optuna.trial.FrozenTrial]:
    return completed(optuna.load_study(study_name=job.study_name, storage=job.storage_url()))


def candidates(job: SearchJob) -> Counter:
    return Counter((stage_of(t), t.user_attrs[SUBNET_ATTR]) for t in stored(job))


def test_a_search_on_postgresql_proposes_what_one_on_sqlite_does(make_job, postgres_url, tmp_path):
    on_postgres = make_job(tmp_path / "pg", storage=postgres_url, study_name=tmp_path.name)
    on_sqlite = make_job(tmp_path / "sqlite")
    search(on_postgres)
    search(on_sqlite)
    assert sum(stage_of(t) == 0 for t in stored(on_postgres)) == 10
    assert [t.user_attrs[SUBNET_ATTR] for t in stored(on_postgres)] == [
        t.user_attrs[SUBNET_ATTR] for t in stored(on_sqlite)
    ]


def test_two_workers_on_postgresql_evaluate_each_candidate_once(make_job, postgres_url, tmp_path):
    job = make_job(tmp_path / "run", storage=postgres_url, study_name=tmp_path.name, workers=2, evaluations=12)
    search(job)
    seen = candidates(job)
    assert sum(n for (stage, _), n in seen.items() if stage == 0) >= 12
    assert max(seen.values()) == 1  # no candidate evaluated twice at one stage


def test_a_finished_search_on_postgresql_resumes_without_new_work(make_job, postgres_url, tmp_path):
    job = make_job(tmp_path / "run", storage=postgres_url, study_name=tmp_path.name, evaluations=6)
    search(job)
    before = [t.number for t in stored(job)]
    resumed = make_job(tmp_path / "again", storage=postgres_url, study_name=tmp_path.name, evaluations=6, resume=True)
    search(resumed)
    assert [t.number for t in stored(resumed)] == before


KILLED_AT_THE_NINTH = """
import json, os, signal, sys
from slimlm.search import Searcher, SearchJob, search
evaluate, calls = Searcher.evaluate, []
def killed(self, subnet, stage=0):
    calls.append(stage)
    if len(calls) == 9:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-evaluation: no handler runs, the trial stays RUNNING
    return evaluate(self, subnet, stage)
Searcher.evaluate = killed
search(SearchJob.from_dict(json.loads(sys.argv[1])))
"""


def test_a_worker_killed_mid_trial_is_failed_by_heartbeat_and_the_search_finishes_as_uninterrupted(
    make_job, postgres_url, tmp_path, monkeypatch
):
    job = make_job(tmp_path / "run", storage=postgres_url, study_name=tmp_path.name, evaluations=12)
    done = subprocess.run([sys.executable, "-c", KILLED_AT_THE_NINTH, json.dumps(job.to_dict())], timeout=300)
    assert done.returncode == -9
    study = optuna.load_study(study_name=job.study_name, storage=job.storage_url())
    running = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1  # the killed worker's trial, left behind
    monkeypatch.setattr(search_module, "GRACE_SECONDS", 1)  # instead of a minute of silence
    time.sleep(1.5)
    _, resumed = search(replace(job, resume=True))
    states = {t.number: t.state for t in resumed.get_trials()}
    assert states[running[0]] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states.values()
    assert max(candidates(job).values()) == 1
    uninterrupted = make_job(tmp_path / "sqlite", evaluations=12)
    search(uninterrupted)
    assert candidates(job) == candidates(uninterrupted)


A_WORKER = """
import json, sys
from slimlm.report import write_report
from slimlm.search import SearchJob, search
search(SearchJob.from_dict(json.loads(sys.argv[1])), role="worker")
"""


def test_two_worker_machines_and_a_finaliser_share_one_postgresql_study(make_job, postgres_url, tmp_path, monkeypatch):
    job = make_job(tmp_path / "run", storage=postgres_url, study_name=tmp_path.name, evaluations=12)
    worker = json.dumps(replace(job, out="").to_dict())  # a worker has no run folder
    workers = [subprocess.Popen([sys.executable, "-c", A_WORKER, worker]) for _ in range(2)]  # racing to create it
    try:

        def evaluate(*_args, **_kwargs):
            raise AssertionError("the finaliser evaluated a candidate")

        monkeypatch.setattr(search_module, "FINALISER_POLL_SECONDS", 0.5)
        monkeypatch.setattr(search_module.Searcher, "evaluate", evaluate)
        searcher, study = search(job, role="finaliser")  # waits for the workers
        monkeypatch.undo()
        assert [w.wait(timeout=300) for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
    seen = candidates(job)
    assert sum(n for (stage, _), n in seen.items() if stage == 0) >= 12
    assert max(seen.values()) == 1  # no candidate evaluated twice at one stage
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in study.get_trials()}
    report = write_report(searcher, study)
    assert report["best_trial"] is not None and (tmp_path / "run" / "best" / "config.json").is_file()
