"""Strategies that let an Optuna sampler choose per-layer shapes: ``random`` and ``nsga2``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from slimlm.space import keep_most_important
from slimlm.strategies.base import History, SearchContext
from slimlm.subnet import SubNetwork


class SampledShapes:
    """Shapes from the sampler, stepped down into the budget, kept units by importance.

    The repair is not written back to the trial's parameters: the sampler breeds from what it drew
    (Baldwinian repair), and the stored candidate is what was evaluated.
    """

    multi_fidelity = False  # every candidate is scored on all fitness windows

    def begin(self, study: optuna.Study, context: SearchContext) -> None:
        pass

    def finished(self, history: History, context: SearchContext, evaluations: int) -> bool:
        return history.first_stage() >= evaluations

    def propose(self, trial: optuna.Trial, history: History, context: SearchContext) -> SubNetwork:
        shapes = context.space.suggest(trial, context.dims)
        shapes = context.space.shrink_to_fit(context.dims, shapes, context.within)
        return keep_most_important(context.dims, context.importance, shapes)


def trial_seed(seed: int, trial_number: int) -> int:
    """A random seed for one trial: draws depend on (seed, trial), not on what ran before in this process.

    So a resumed study does not replay earlier draws, and workers sharing a study draw differently.
    """
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._rng.rng.seed(trial_seed(self._base_seed, History.read(study).draw_number(trial.number)))
        super().before_trial(study, trial)


class TrialSeededNSGAIISampler(optuna.samplers.NSGAIISampler):
    def __init__(self, population_size: int, seed: int) -> None:
        super().__init__(population_size=population_size, seed=seed)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        number = History.read(study).draw_number(trial.number)
        self._rng.rng.seed(trial_seed(self._base_seed, number))
        self._random_sampler._rng.rng.seed(trial_seed(self._base_seed + 1, number))
        super().before_trial(study, trial)


class RandomSearch(SampledShapes):
    """Uniformly random shapes: the baseline every other strategy must beat."""

    name = "random"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return TrialSeededRandomSampler(seed)


@dataclass
class NSGA2(SampledShapes):
    """Multi-objective genetic search over per-layer shapes (NSGA-II, as in LLaMA-NAS)."""

    population: int = 16
    name = "nsga2"

    def begin(self, study: optuna.Study, context: SearchContext) -> None:
        """The first generation starts with the importance-ranked uniform sub-networks (then random ones)."""
        for start in context.starts[: self.population]:
            study.enqueue_trial(
                context.space.params_of(context.dims, {i: start.layers[i].shape for i in start.kept_layers})
            )

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return TrialSeededNSGAIISampler(self.population, seed)
