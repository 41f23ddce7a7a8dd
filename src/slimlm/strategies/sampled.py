"""Strategies that let an Optuna sampler choose per-layer shapes: ``random`` and ``nsga2``."""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from slimlm.space import keep_most_important
from slimlm.strategies.base import SearchContext
from slimlm.subnet import SubNetwork


class _SampledShapes:
    """Shapes from the sampler, kept units by importance."""

    def propose(self, trial: optuna.Trial, study: optuna.Study, context: SearchContext) -> SubNetwork:
        return keep_most_important(context.dims, context.importance, context.space.suggest(trial, context.dims))


class RandomSearch(_SampledShapes):
    """Uniformly random shapes: the baseline every other strategy must beat."""

    name = "random"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)


@dataclass
class NSGA2(_SampledShapes):
    """Multi-objective genetic search over per-layer shapes (NSGA-II, as in LLaMA-NAS)."""

    population: int = 16
    name = "nsga2"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(population_size=self.population, seed=seed)
