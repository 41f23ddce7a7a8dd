"""``slimlm.jobs`` names the choices the command line lists without torch; the modules that implement
them register exactly those names, in the same order, and re-export the settings from there."""

from __future__ import annotations

from slimlm import data, export, heal, importance, jobs, llamacpp, prune, quantize, search, strategies, train


def test_the_registries_implement_exactly_the_listed_names_in_order():
    assert tuple(strategies.STRATEGIES) == jobs.SEARCH_STRATEGIES
    assert tuple(prune.METHODS) == jobs.PRUNE_METHODS
    assert tuple(export.QUANT_TYPES) == jobs.GGUF_QUANT_TYPES
    assert jobs.DEFAULT_METRIC in importance.METRICS
    assert jobs.DEFAULT_STRATEGY in jobs.SEARCH_STRATEGIES
    assert (*jobs.TORCH_QUANT_TYPES, *export.QUANT_TYPES, *llamacpp.NATIVE_QUANT_TYPES) == quantize.ALL_QUANT_TYPES


def test_gguf_type_names_pair_with_their_gguf_types():
    for name, (qtype, _) in export.QUANT_TYPES.items():
        assert qtype.name.lower() == name


def test_the_working_modules_re_export_the_jobs_and_settings():
    assert search.SearchJob is jobs.SearchJob and train.TrainJob is jobs.TrainJob and heal.HealJob is jobs.HealJob
    assert search.parse_size is jobs.parse_size and search.STUDY_NAME == jobs.STUDY_NAME
    assert data.DEFAULT_CALIBRATION == jobs.DEFAULT_CALIBRATION and data.describe_specs is jobs.describe_specs
    assert train.STRATEGIES == jobs.TRAIN_STRATEGIES and strategies.DEFAULT_STRATEGY == jobs.DEFAULT_STRATEGY
    assert train.TrainJob(model="m", out="o").strategy in jobs.TRAIN_STRATEGIES


def test_a_job_made_without_a_space_gets_the_default_search_space():
    from slimlm.space import SearchSpace

    assert jobs.SearchJob(model="m", out="o").space == SearchSpace()
    assert jobs.TrainJob(model="m", out="o").space == SearchSpace()
