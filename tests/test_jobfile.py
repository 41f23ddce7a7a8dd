"""Job files: a search job round-trips through plain values and ``job.toml``, and ``--config`` reruns it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pytest
import tomllib
import torch

from slimlm import refine
from slimlm.costs import static_cost
from slimlm.errors import SlimlmError
from slimlm.extract import SUBNET_FILE
from slimlm.jobfile import JOB_FILE, read_job_file, write_job_file
from slimlm.models import load_model
from slimlm.search import OPTIONAL_FIELDS, STORE_FILE, STUDY_NAME, SearchJob
from slimlm.space import SearchSpace
from slimlm.strategies import SUBNET_ATTR
from slimlm.subnet import SubNetwork

from .conftest import VOCAB, invoke, one_error, save_tiny, tiny_loaded

JOB = SearchJob(
    model="smollm2-135m",
    out="runs/x",
    max_params=90_000_000,
    strategy="nsga2",
    storage="postgresql+psycopg2://user@host/db",
    space=SearchSpace(per_layer=False, min_ratio=0.3, frozen_layers=(0, 3)),
    resume=True,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny(tiny_loaded("llama"), tmp_path_factory.mktemp("model") / "llama")


def fast(text: Path) -> list:
    return [
        *("--calib", text, "--eval", text, "--seq-len", 16, "--calib-windows", 8, "--refine-windows", 12),
        *("--fitness-windows", 2, "--eval-windows", 2, "--evaluations", 6, "--params", 0.7),
    ]


def candidates(run: Path) -> list:
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / STORE_FILE}")
    return [t.user_attrs.get(SUBNET_ATTR) for t in study.get_trials(deepcopy=False)]


def test_a_job_round_trips_through_plain_values_and_a_toml_file(tmp_path):
    values = JOB.to_dict()
    assert "resume" not in values and "params_fraction" not in values  # an invocation flag; an unset option
    assert SearchJob.from_dict(values) == SearchJob(**{**vars(JOB), "resume": False})
    write_job_file(values, tmp_path, fingerprint="abc")
    assert SearchJob.from_dict(read_job_file(tmp_path / JOB_FILE)).space.frozen_layers == (0, 3)
    assert SearchJob.from_dict(read_job_file(tmp_path / JOB_FILE)) == SearchJob.from_dict(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"evaluatons": 10}, "unknown settings: evaluatons"),
        ({"evaluations": "ten"}, "evaluations must be a int"),
        ({"space": {"min_ratio": 2.0}}, "min ratio"),
        ({"space": {"per_layer": 1}}, "per_layer must be a bool"),
        ({"max_params": 1.5}, "max_params must be a int"),
    ],
)
def test_a_bad_job_is_one_clear_error(values, message):
    with pytest.raises(SlimlmError, match=message):
        SearchJob.from_dict({"model": "m", "out": "o"} | values)


def test_a_search_records_its_job_and_a_rerun_from_it_proposes_the_same_candidates(folder, text, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert invoke("search", folder, "--out", first, "--seed", 3, *fast(text)).exit_code == 0
    document = tomllib.loads((first / JOB_FILE).read_text())
    assert document["job"]["seed"] == 3 and document["job"]["model"] == str(folder)
    provenance = document["provenance"]
    assert provenance["model_fingerprint"] == load_model(folder).fingerprint()
    assert {"slimlm", "torch", "optuna"} <= set(provenance["versions"]) and provenance["command"]

    result = invoke("search", "--config", first / JOB_FILE, "--out", second)
    assert result.exit_code == 0, result.output
    assert candidates(second) == candidates(first) and len(candidates(first)) >= 6
    assert SearchJob.from_dict(read_job_file(second / JOB_FILE)) == SearchJob.from_dict(
        document["job"] | {"out": str(second)}
    )


def test_options_typed_with_a_job_file_override_it(folder, text, tmp_path):
    first = tmp_path / "first"
    assert invoke("search", folder, "--out", first, *fast(text), "--frozen", "0").exit_code == 0
    result = invoke("search", "--config", first / JOB_FILE, "--out", tmp_path / "more", "--evaluations", 9)
    assert result.exit_code == 0, result.output
    job = SearchJob.from_dict(read_job_file(tmp_path / "more" / JOB_FILE))
    assert job.evaluations == 9 and job.space.frozen_layers == (0,) and job.params_fraction == 0.7


def test_a_missing_or_broken_job_file_is_one_clear_error(tmp_path):
    assert "does not exist" in one_error(invoke("search", "--config", tmp_path / "none.toml"))
    broken = tmp_path / "job.toml"
    broken.write_text("[job\nmodel = 1")
    assert "not valid TOML" in one_error(invoke("compress", "--config", broken))
    broken.write_text('[job]\nmodel = "m"\nout = "o"\nsed = 1\n')
    assert "unknown settings: sed" in one_error(invoke("compress", "--config", broken))
    assert "give a MODEL and --out" in one_error(invoke("search", "--params", 0.5))


def test_extract_takes_any_evaluated_trial_of_a_run(folder, text, tmp_path):
    run = tmp_path / "run"
    assert invoke("search", folder, "--out", run, *fast(text)).exit_code == 0
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / STORE_FILE}")
    trial = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    result = invoke("extract", run, "--trial", trial.number, "--out", tmp_path / "member")
    assert result.exit_code == 0, result.output
    saved = SubNetwork.load(tmp_path / "member" / SUBNET_FILE, foreign=True)
    assert saved.to_compact() == trial.user_attrs[SUBNET_ATTR]
    assert static_cost(load_model(tmp_path / "member").dims).params == trial.user_attrs["params"]

    assert "reformed (" in result.output  # as the search's winner would be: the better reformation chosen

    pruned = [t.number for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    missing = pruned[0] if pruned else len(study.trials) + 5
    assert "is not an evaluated candidate" in one_error(
        invoke("extract", run, "--trial", missing, "--out", tmp_path / "x")
    )
    assert "not a slimlm run folder" in one_error(invoke("extract", folder, "--trial", 0, "--out", tmp_path / "y"))
    assert "give --subnet FILE, or --trial N" in one_error(invoke("extract", folder, "--out", tmp_path / "z"))


def test_every_unset_setting_has_a_type_to_check_against():
    unset = {f.name for f in dataclasses.fields(SearchJob) if f.default is None}
    assert unset == set(OPTIONAL_FIELDS)


def test_the_winning_trial_extracted_again_is_the_model_its_search_shipped(folder, text, tmp_path, monkeypatch):
    measured = refine.perplexity

    def perplexity(model, ids, description: str = "") -> float:  # a refined tiny random model seldom scores
        value = measured(model, ids)  # better on the selection windows: here the refinement is always kept
        return value / 2 if description == "perplexity (refined)" else value

    monkeypatch.setattr(refine, "perplexity", perplexity)
    run = tmp_path / "run"
    assert invoke("search", folder, "--out", run, *fast(text)).exit_code == 0
    pareto = json.loads((run / "pareto.json").read_text())
    result = invoke("extract", run, "--trial", pareto["best_trial"], "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    wrote = next(line for line in result.output.splitlines() if line.startswith("wrote"))
    assert pareto["refinement"]["kept"] and ", refined;" in wrote
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    shipped, again = (load_model(f).model for f in (run / "best", tmp_path / "again"))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, shipped(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
