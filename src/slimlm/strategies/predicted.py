"""Predictor-assisted NSGA-II (LINAS, as used by LLaMA-NAS): fewer real evaluations for the same front.

After a warm-up of real evaluations (the importance-ranked starts, then random shapes), each
proposal fits a cheap predictor of log perplexity on every evaluation so far (ridge regression on
each layer's kept fractions of heads, key/value heads and neurons), runs a short NSGA-II on the
predicted perplexity and the exact parameter count (an in-memory Optuna study: predictions cost
microseconds), and hands back the unseen member of the predicted Pareto front with the lowest
predicted perplexity. Only that candidate is evaluated for real, and it joins the predictor's data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna

from slimlm.costs import static_cost
from slimlm.models.base import LayerShape, ModelDims
from slimlm.space import keep_most_important
from slimlm.strategies.base import History, SearchContext, candidate
from slimlm.strategies.sampled import SampledShapes, TrialSeededRandomSampler, trial_seed
from slimlm.subnet import SubNetwork

Predictor = Callable[[dict[int, LayerShape]], float]  # layer shapes -> predicted log perplexity


def features(dims: ModelDims, shapes: dict[int, LayerShape]) -> np.ndarray:
    """Per layer: kept or not, and the kept fractions of its query heads, key/value heads and neurons."""
    values = []
    for i, full in enumerate(dims.layers):
        shape = shapes.get(i)
        if shape is None:
            values += [0.0, 0.0, 0.0, 0.0]
        else:
            values += [1.0, shape.heads / full.heads, shape.kv_heads / full.kv_heads, shape.neurons / full.neurons]
    return np.array(values)


def fit_predictor(dims: ModelDims, history: list[optuna.trial.FrozenTrial], ridge: float = 1e-2) -> Predictor:
    """Ridge regression of log perplexity on ``features``, fitted on evaluated candidates."""
    x = np.stack([features(dims, {i: k.shape for i, k in candidate(t).layers.items()}) for t in history])
    y = np.log([t.values[0] for t in history])
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    penalty = ridge * len(x) * np.eye(z.shape[1])
    penalty[-1, -1] = 0  # the intercept is not shrunk
    weights = np.linalg.solve(z.T @ z + penalty, z.T @ y)

    def predict(shapes: dict[int, LayerShape]) -> float:
        return float(np.append((features(dims, shapes) - mean) / scale, 1.0) @ weights)

    return predict


@dataclass
class PredictedNSGA2(SampledShapes):
    """Real evaluations only for what an NSGA-II on a fitted predictor finds best (LINAS)."""

    warmup: int = 10  # real evaluations before the predictor is trusted
    population: int = 24  # of the inner NSGA-II on predictions
    generations: int = 10
    name = "linas"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return TrialSeededRandomSampler(seed)  # warm-up draws

    def propose(self, trial: optuna.Trial, history: History, context: SearchContext) -> SubNetwork:
        seen = history.seen(exclude=trial.number)
        for start in context.starts:
            if start.to_compact() not in seen:
                return start
        if len(history.completed) < self.warmup:
            return super().propose(trial, history, context)
        predict = fit_predictor(context.dims, history.completed)
        found = self.predicted_front(predict, context, trial_seed(context.seed, history.draw_number(trial.number)))
        for subnet in found:
            if subnet.to_compact() not in seen:
                return subnet
        return super().propose(trial, history, context)  # the predicted front is all evaluated: explore

    def predicted_front(self, predict: Predictor, context: SearchContext, seed: int) -> list[SubNetwork]:
        """The Pareto front of a short NSGA-II on (predicted log perplexity, parameters), best predicted first."""
        dims, space = context.dims, context.space
        inner = optuna.create_study(
            directions=["minimize", "minimize"],
            sampler=optuna.samplers.NSGAIISampler(population_size=self.population, seed=seed),
        )

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            shapes = space.shrink_to_fit(dims, space.suggest(trial, dims), context.within)
            trial.set_user_attr("shapes", [(i, s.heads, s.kv_heads, s.neurons) for i, s in shapes.items()])
            if not context.within(list(shapes.values())):
                raise optuna.TrialPruned()  # even the smallest shapes do not fit
            return predict(shapes), static_cost(dims, list(shapes.values())).params

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            inner.optimize(objective, n_trials=self.population * self.generations)
        finally:
            optuna.logging.set_verbosity(verbosity)
        front = sorted(inner.best_trials, key=lambda t: t.values[0])
        shapes = [{i: LayerShape(h, kv, n) for i, h, kv, n in t.user_attrs["shapes"]} for t in front]
        return [keep_most_important(dims, context.importance, s) for s in shapes]
