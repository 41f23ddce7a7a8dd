"""The one interface every search strategy implements."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import optuna

from slimlm.importance import Importance
from slimlm.models.base import LayerShape, ModelDims
from slimlm.space import SearchSpace
from slimlm.subnet import SubNetwork

SUBNET_ATTR = "subnet"  # trial user attribute holding the candidate (``SubNetwork.to_compact``)
ETA = 4  # each fidelity stage scores 4x the windows of the one before, and the best quarter goes on to it
STAGE_ATTR = "stage"  # trial user attribute: the fidelity stage it was scored at (absent: 0)
# trial user attribute of a candidate evaluated and found over a measured budget (latency): PRUNED, and
# never proposed again (it would be measured, and pruned, over and over)


@dataclass(frozen=True)
class SearchContext:
    """What a strategy may use to propose candidates."""

    dims: ModelDims
    importance: Importance
    space: SearchSpace
    within: Callable[[list[LayerShape]], bool]  # layer shapes within the budget, judged from structure alone
    starts: tuple[SubNetwork, ...]  # importance-ranked uniform sub-networks filling the budget, best guess first
    seed: int
    stages: tuple[int, ...] = (1,)  # fitness windows scored at each fidelity stage, fewest first
    evaluations: int = 0  # first-stage candidates the search is to score (0: not known)

    def fits(self, subnet: SubNetwork) -> bool:
        """Whether a candidate is within the budget (from its structure alone)."""
        return self.within(subnet.shapes())


class Strategy(Protocol):
    """A search strategy: an Optuna sampler plus how a trial becomes a candidate sub-network.

    Strategies that sample the parametric space call ``context.space.suggest(trial, ...)`` and let
    their sampler choose; strategies that work on kept sets directly (evolution) read the study's
    completed trials (``History``) and ignore the sampler.
    """

    name: str

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler: ...

    def begin(self, study: optuna.Study, context: SearchContext) -> None:
        """Called once on a new, empty study before any trial (e.g. to enqueue a first population)."""

    def propose(self, trial: optuna.Trial, history: History, context: SearchContext) -> SubNetwork:
        """The candidate ``trial`` is to evaluate, from the study's trials as read just before it was asked."""

    def finished(self, history: History, context: SearchContext, evaluations: int) -> bool:
        """Whether the search is done (``evaluations`` candidates scored, and whatever the strategy adds)."""


# trials whose candidate is taken: evaluated, or being evaluated by some worker
CLAIMED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)


class History:
    """The study's trials as read once, oldest first: every decision of one step of the search loop is
    made from one read, so a trial costs one fetch from the store (Optuna's cache asks the database
    only for trials new or unfinished since its last read) and scans of a list in memory, not a fetch
    per question."""

    def __init__(self, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
        self.trials = list(trials)

    @classmethod
    def read(cls, study: optuna.Study) -> History:
        return cls(study.get_trials(deepcopy=False))

    @functools.cached_property
    def completed(self) -> list[optuna.trial.FrozenTrial]:
        """Evaluated candidates (at any stage), oldest first."""
        return [t for t in self.trials if t.state == optuna.trial.TrialState.COMPLETE]

    def first_stage(self) -> int:
        """Candidates evaluated at the first stage: the count ``evaluations`` asks for."""
        return sum(stage_of(t) == 0 for t in self.completed)

    def ranked(self) -> list[optuna.trial.FrozenTrial]:
        """One trial per candidate, best first: its highest stage, then its fitness there (fitness is
        only comparable within a stage: later stages score more windows)."""
        best: dict[str, optuna.trial.FrozenTrial] = {}
        key = lambda t: (-stage_of(t), t.values[0])  # noqa: E731
        for t in self.completed:
            compact = t.user_attrs[SUBNET_ATTR]
            if compact not in best or key(t) < key(best[compact]):
                best[compact] = t
        return sorted(best.values(), key=key)

    def draw_number(self, number: int) -> int:
        """A trial's number among the trials before it that did not fail, to seed its random draws.

        A trial killed mid-evaluation is failed on resume and leaves no gap, so a resumed search draws
        the same candidates an uninterrupted one would.
        """
        failed = optuna.trial.TrialState.FAIL
        return number - sum(t.number < number and t.state == failed for t in self.trials)

    def seen(self, stage: int = 0, exclude: int | None = None, before: int | None = None) -> set[str]:
        """Candidates evaluated or being evaluated (by any worker) at ``stage``, as stored compact strings.

        ``exclude`` leaves out one trial (the asking one); ``before`` keeps only lower-numbered trials.
        """
        return {
            t.user_attrs[SUBNET_ATTR]
            for t in self.trials
            if t.state in CLAIMED
            and SUBNET_ATTR in t.user_attrs
            and t.number != exclude
            and (before is None or t.number < before)
            and stage_of(t) == stage
        }


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Evaluated candidates (at any stage), oldest first."""
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def evaluations_done(study: optuna.Study) -> int:
    """Candidates evaluated at the first stage: what ``evaluations`` counts."""
    return History(completed(study)).first_stage()


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """``History.ranked`` of the study as it is now."""
    return History(completed(study)).ranked()


def stage_of(trial: optuna.trial.FrozenTrial) -> int:
    """The fidelity stage a trial was scored at."""
    return int(trial.user_attrs.get(STAGE_ATTR, 0))


def candidate(trial: optuna.trial.FrozenTrial) -> SubNetwork:
    return SubNetwork.from_compact(trial.user_attrs[SUBNET_ATTR])
