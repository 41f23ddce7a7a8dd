"""Strategies that let an Optuna sampler choose per-layer shapes: ``random`` and ``nsga2``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from slimlm.space import keep_most_important
from slimlm.strategies.base import SearchContext
from slimlm.subnet import SubNetwork


class _SampledShapes:
    """Shapes from the sampler, kept units by importance."""

    def propose(self, trial: optuna.Trial, study: optuna.Study, context: SearchContext) -> SubNetwork:
        return keep_most_important(context.dims, context.importance, context.space.suggest(trial, context.dims))


def trial_seed(seed: int, trial_number: int) -> int:
    """A random seed for one trial: draws depend on (seed, trial), not on what ran before in this process.

    So a resumed study does not replay earlier draws, and workers sharing a study draw differently.
    """
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


class _TrialSeededRandomSampler(optuna.samplers.RandomSampler):
    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._rng.rng.seed(trial_seed(self._base_seed, trial.number))
        super().before_trial(study, trial)


class _TrialSeededNSGAIISampler(optuna.samplers.NSGAIISampler):
    def __init__(self, population_size: int, seed: int) -> None:
        super().__init__(population_size=population_size, seed=seed)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._rng.rng.seed(trial_seed(self._base_seed, trial.number))
        self._random_sampler._rng.rng.seed(trial_seed(self._base_seed + 1, trial.number))
        super().before_trial(study, trial)


class RandomSearch(_SampledShapes):
    """Uniformly random shapes: the baseline every other strategy must beat."""

    name = "random"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return _TrialSeededRandomSampler(seed)


@dataclass
class NSGA2(_SampledShapes):
    """Multi-objective genetic search over per-layer shapes (NSGA-II, as in LLaMA-NAS)."""

    population: int = 16
    name = "nsga2"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return _TrialSeededNSGAIISampler(self.population, seed)
