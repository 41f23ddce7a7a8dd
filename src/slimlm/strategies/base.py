"""The one interface every search strategy implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import optuna

from slimlm.importance import Importance
from slimlm.models.base import LayerShape, ModelDims
from slimlm.space import SearchSpace
from slimlm.subnet import SubNetwork

SUBNET_ATTR = "subnet"  # trial user attribute holding the candidate (``SubNetwork.to_compact``)


@dataclass(frozen=True)
class SearchContext:
    """What a strategy may use to propose candidates."""

    dims: ModelDims
    importance: Importance
    space: SearchSpace
    within: Callable[[list[LayerShape]], bool]  # layer shapes within the budget, judged from structure alone
    starts: tuple[SubNetwork, ...]  # importance-ranked uniform sub-networks filling the budget, best guess first
    seed: int

    def fits(self, subnet: SubNetwork) -> bool:
        """Whether a candidate is within the budget (from its structure alone)."""
        return self.within(subnet.shapes())


class Strategy(Protocol):
    """A search strategy: an Optuna sampler plus how a trial becomes a candidate sub-network.

    Strategies that sample the parametric space call ``context.space.suggest(trial, ...)`` and let
    their sampler choose; strategies that work on kept sets directly (evolution) read the study's
    completed trials and ignore the sampler.
    """

    name: str

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler: ...

    def begin(self, study: optuna.Study, context: SearchContext) -> None:
        """Called once on a new, empty study before any trial (e.g. to enqueue a first population)."""

    def propose(self, trial: optuna.Trial, study: optuna.Study, context: SearchContext) -> SubNetwork: ...


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Evaluated candidates, oldest first."""
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def candidate(trial: optuna.trial.FrozenTrial) -> SubNetwork:
    return SubNetwork.from_compact(trial.user_attrs[SUBNET_ATTR])


def draw_number(study: optuna.Study, number: int) -> int:
    """A trial's number among the trials before it that did not fail, to seed its random draws.

    A trial killed mid-evaluation is failed on resume and leaves no gap, so a resumed search draws
    the same candidates an uninterrupted one would.
    """
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    return number - sum(t.number < number for t in failed)


def seen_candidates(study: optuna.Study, exclude: int | None = None, before: int | None = None) -> set[str]:
    """Candidates evaluated or being evaluated (by any worker), as stored compact strings.

    ``exclude`` leaves out one trial (the asking one); ``before`` keeps only lower-numbered trials.
    """
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    return {
        t.user_attrs[SUBNET_ATTR]
        for t in study.get_trials(deepcopy=False, states=states)
        if SUBNET_ATTR in t.user_attrs and t.number != exclude and (before is None or t.number < before)
    }
