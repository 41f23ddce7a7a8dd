"""Predictor-assisted NSGA-II (LINAS) on a tiny model: the predictor fits, and it steers the proposals."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

import slimlm.strategies.predicted as predicted
from slimlm.costs import static_cost
from slimlm.space import SearchSpace, keep_most_important
from slimlm.strategies import SUBNET_ATTR, History, SearchContext
from slimlm.strategies.predicted import PredictedNSGA2, features, fit_predictor

from .conftest import tiny_loaded
from .test_space import fixed_importance


def context_for(fraction: float = 0.8) -> SearchContext:
    dims = tiny_loaded().dims
    budget = int(fraction * static_cost(dims).params)

    def within(shapes):
        return static_cost(dims, shapes).params <= budget

    scores = fixed_importance(dims)
    space = SearchSpace()
    return SearchContext(dims, scores, space, within, tuple(space.starts(dims, scores, within)), seed=0)


def evaluated(context: SearchContext, shapes: dict, value: float) -> optuna.trial.FrozenTrial:
    subnet = keep_most_important(context.dims, context.importance, shapes)
    return optuna.trial.create_trial(values=[value, 0.0], user_attrs={SUBNET_ATTR: subnet.to_compact()})


def random_shapes(context: SearchContext, rng: np.random.Generator) -> dict:
    return context.space.sample(context.dims, rng)


def test_the_predictor_recovers_a_linear_law_of_the_kept_fractions():
    context = context_for()
    rng = np.random.default_rng(0)
    law = rng.normal(size=4 * context.dims.num_layers)
    shapes = [random_shapes(context, rng) for _ in range(60)]
    history = [evaluated(context, s, float(np.exp(features(context.dims, s) @ law + 2.0))) for s in shapes]
    predict = fit_predictor(context.dims, history, ridge=1e-6)
    for s in [random_shapes(context, rng) for _ in range(5)]:
        assert predict(s) == pytest.approx(features(context.dims, s) @ law + 2.0, abs=0.05)


def test_after_the_warmup_the_proposal_is_the_predicted_best(monkeypatch):
    context = context_for()
    study = optuna.create_study(directions=["minimize", "minimize"])
    rng = np.random.default_rng(1)
    for start in context.starts:
        study.add_trial(optuna.trial.create_trial(values=[50.0, 0.0], user_attrs={SUBNET_ATTR: start.to_compact()}))
    for _ in range(4):
        study.add_trial(evaluated(context, random_shapes(context, rng), 60.0))
    # a predictor that only likes layer 0's neurons: the proposal must keep all of them, within the budget
    monkeypatch.setattr(predicted, "fit_predictor", lambda dims, history: lambda s: -s[0].neurons if 0 in s else 0)
    strategy = PredictedNSGA2(warmup=4)
    proposal = strategy.propose(study.ask(), History.read(study), context)
    assert proposal.layers[0].shape.neurons == context.dims.layers[0].neurons
    assert context.fits(proposal)
    seen = {t.user_attrs[SUBNET_ATTR] for t in study.trials if SUBNET_ATTR in t.user_attrs}
    assert proposal.to_compact() not in seen
