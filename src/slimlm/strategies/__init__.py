"""Search strategies, each one small object behind ``Strategy``; add one here with one registry line
(and its name in ``slimlm.jobs.SEARCH_STRATEGIES``, which the command line lists without importing this)."""

from __future__ import annotations

from slimlm.errors import SlimlmError
from slimlm.jobs import DEFAULT_STRATEGY  # the setting's home is the torch-free slimlm.jobs
from slimlm.strategies.base import (
    CLAIMED,
    ETA,
    STAGE_ATTR,
    SUBNET_ATTR,
    History,
    SearchContext,
    Strategy,
    candidate,
    completed,
    evaluations_done,
    ranked,
    stage_of,
)
from slimlm.strategies.evolution import Evolution
from slimlm.strategies.predicted import PredictedNSGA2
from slimlm.strategies.sampled import NSGA2, RandomSearch

STRATEGIES: dict[str, type] = {  # in the order of their names in slimlm.jobs.SEARCH_STRATEGIES (for the CLI)
    "evolution": Evolution,
    "nsga2": NSGA2,
    "linas": PredictedNSGA2,
    "random": RandomSearch,
}


def make_strategy(name: str) -> Strategy:
    """A strategy by name, or a clear error listing the known ones."""
    if name not in STRATEGIES:
        raise SlimlmError(f"unknown strategy '{name}'; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


__all__ = [
    "CLAIMED",
    "DEFAULT_STRATEGY",
    "ETA",
    "STAGE_ATTR",
    "STRATEGIES",
    "SUBNET_ATTR",
    "History",
    "SearchContext",
    "Strategy",
    "candidate",
    "completed",
    "evaluations_done",
    "make_strategy",
    "ranked",
    "stage_of",
]
