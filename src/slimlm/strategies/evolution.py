"""Multi-fidelity evolution over per-layer levels (EvoPress, ICML 2025; "Search for Efficient LLMs", 2024).

A candidate gives every layer an attention level (removed, or a grouped-query shape) and an MLP level
(removed, or a width) from the search space's grid; its kept units are the most important ones, as
the variant library stores them, so a candidate is a stitch of stored, reformed weights.

The first candidates are the starts (every rule slimlm knows: uniform shapes, FLAP's own per-layer
allocation snapped to the grid, ShortGPT-like depth). A child then comes from one parent (mutation)
or two (per-layer crossover, then mutation). Mutation switches levels in pairs, one sub-block up and another down
(EvoPress's level switch, which keeps the size near the budget), then repairs: random steps down until
the child fits, then one pass of steps up while it still fits, so no child wastes budget.

Fidelity rises in stages (successive halving per generation, as EvoPress selects in steps): every
child is scored on the first stage's few windows; once a generation of ``generation`` children is
scored at a stage, its best ``1/eta`` are scored again on the next stage's windows, each as a trial of
its own. (Promoting whenever a candidate enters the best quarter so far, as asynchronous ASHA does,
promoted most children on SmolLM2: an evolution's children keep improving, so each new one ranks
high.) Parents are the best candidates by the highest stage they reached, and the search's result
is chosen from the last stage. Each child is drawn from a
generator seeded by (seed, trial number) and the stored history, so a killed run resumes to the same
candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from slimlm.models.base import LayerShape
from slimlm.space import keep_most_important
from slimlm.strategies.base import CLAIMED, ETA, STAGE_ATTR, SUBNET_ATTR, History, SearchContext, candidate, stage_of
from slimlm.subnet import SubNetwork

GENERATION_ATTR = "generation"  # trial user attribute: the generation a candidate was born in
ATTEMPTS = 100  # redraws of a child outside the budget or already seen before handing it back anyway
Genome = dict[int, list[int]]  # layer -> [attention level, MLP level] (indices into the space's levels)


@dataclass
class Evolution:
    parents: int = 4
    crossover: float = 0.5  # probability a child has two parents
    switches: int = 3  # at most this many level switches per mutation
    eta: int = ETA  # the best 1/eta of a generation at a stage go on to the next
    generation: int = 16  # first-stage candidates judged together for promotion
    name = "evolution"
    multi_fidelity = True

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)  # unused: children come from the history

    def begin(self, study: optuna.Study, context: SearchContext) -> None:
        pass  # the first candidates are ``context.starts``

    def propose(self, trial: optuna.Trial, history: History, context: SearchContext) -> SubNetwork:
        promotion = self.promotion(history, context)
        if promotion is not None:
            subnet, stage, generation = promotion
            trial.set_user_attr(STAGE_ATTR, stage)
            trial.set_user_attr(GENERATION_ATTR, generation)
            return subnet
        trial.set_user_attr(GENERATION_ATTR, self._next_generation(history))
        seen = history.seen(exclude=trial.number)
        for start in context.starts:
            if start.to_compact() not in seen:
                return start
        rng = np.random.default_rng([context.seed, history.draw_number(trial.number)])
        parents = [_genome(context, candidate(t)) for t in history.ranked()[: self.parents]]
        parents = parents or [_genome(context, s) for s in context.starts]
        child = parents[0]
        for _ in range(ATTEMPTS):
            child = dict(parents[rng.integers(len(parents))])
            if len(parents) > 1 and rng.random() < self.crossover:
                other = parents[rng.integers(len(parents))]
                child = {i: list((child if rng.random() < 0.5 else other)[i]) for i in child}
            child = self._mutate(rng, child, context)
            subnet = _subnet(context, child)
            if subnet.layers and context.fits(subnet) and subnet.to_compact() not in seen:
                return subnet
        return _subnet(context, child)

    def finished(self, history: History, context: SearchContext, evaluations: int) -> bool:
        """Every requested child scored, and every candidate that earned a higher stage scored there."""
        return history.first_stage() >= evaluations and self.promotion(history, context) is None

    def promotion(self, history: History, context: SearchContext) -> tuple[SubNetwork, int, int] | None:
        """The next (candidate, stage, generation) to score at a higher stage, highest stage first: once a
        generation is done at a stage, the best ``1/eta`` of it there (at least one) go on."""
        by_stage: dict[int, dict[int, list]] = {}  # stage -> generation -> its trials: one pass, not one per generation
        for t in history.completed:
            by_stage.setdefault(stage_of(t), {}).setdefault(_generation(t), []).append(t)
        for stage in reversed(range(len(context.stages) - 1)):
            taken = history.seen(stage=stage + 1)
            for generation, members in sorted(by_stage.get(stage, {}).items()):
                if len(members) < self._expected(generation, stage, context):
                    continue
                for t in sorted(members, key=lambda t: t.values[0])[: max(1, len(members) // self.eta)]:
                    if t.user_attrs[SUBNET_ATTR] not in taken:
                        return SubNetwork.from_compact(t.user_attrs[SUBNET_ATTR]), stage + 1, generation
        return None

    def _expected(self, generation: int, stage: int, context: SearchContext) -> int:
        """How many of a generation's candidates are scored at ``stage`` once it is done there."""
        size = min(self.generation, max(0, context.evaluations - generation * self.generation))
        if context.evaluations == 0:  # no target known: only full generations are judged
            size = self.generation
        for _ in range(stage):
            size = max(1, size // self.eta)
        return size

    def _next_generation(self, history: History) -> int:
        """First-stage candidates are numbered in the order they are claimed, ``generation`` to a generation."""
        claimed = [t for t in history.trials if t.state in CLAIMED and SUBNET_ATTR in t.user_attrs]
        return sum(stage_of(t) == 0 for t in claimed) // self.generation

    def _mutate(self, rng: np.random.Generator, genome: Genome, context: SearchContext) -> Genome:
        """Level switches in pairs (one sub-block up, another down), then repaired to fill the budget."""
        genome = {i: list(levels) for i, levels in genome.items()}
        tops = _tops(context)
        free = [i for i in sorted(genome) if i not in context.space.frozen_layers]
        if not free:
            return genome
        # one shape for all layers: the first free layer's levels are mutated and copied to the others
        units = [(i, k) for i in (free if context.space.per_layer else free[:1]) for k in (0, 1)]
        for _ in range(rng.integers(1, self.switches + 1)):
            up = [u for u in units if genome[u[0]][u[1]] < tops[u]]
            down = [u for u in units if genome[u[0]][u[1]] > 0]
            if up:
                i, k = up[rng.integers(len(up))]
                genome[i][k] += 1
            if down:
                i, k = down[rng.integers(len(down))]
                genome[i][k] -= 1

        def fits(g: Genome) -> bool:
            if not context.space.per_layer:
                for i in free[1:]:
                    g[i] = list(g[free[0]])
            return context.within(list(_shapes(context, g).values()))

        while not fits(genome):
            down = [u for u in units if genome[u[0]][u[1]] > 0]
            if not down:
                break
            i, k = down[rng.integers(len(down))]
            genome[i][k] -= 1
        for j in rng.permutation(len(units)):
            i, k = units[j]
            if genome[i][k] < tops[i, k]:
                genome[i][k] += 1
                if not fits(genome):
                    genome[i][k] -= 1
        fits(genome)
        return genome


def _generation(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs.get(GENERATION_ATTR, 0))


def _tops(context: SearchContext) -> dict[tuple[int, int], int]:
    space = context.space
    return {
        (i, k): len(space.attention_levels(full) if k == 0 else space.mlp_levels(full)) - 1
        for i, full in enumerate(context.dims.layers)
        for k in (0, 1)
    }


def _genome(context: SearchContext, subnet: SubNetwork) -> Genome:
    """Level indices of a candidate; a layer it leaves out is at level 0 twice (both sub-blocks removed)."""
    space, genome = context.space, {}
    for i, full in enumerate(context.dims.layers):
        shape = subnet.layers[i].shape if i in subnet.layers else LayerShape(0, 0, 0)
        attention = [(a.heads, a.kv_heads) for a in space.attention_levels(full)]
        neurons = list(space.mlp_levels(full))
        genome[i] = [_nearest(attention, (shape.heads, shape.kv_heads)), _nearest(neurons, shape.neurons)]
    return genome


def _nearest(levels: list, value) -> int:
    if value in levels:
        return levels.index(value)
    key = (
        (lambda v: abs(v[0] - value[0]) + abs(v[1] - value[1]))
        if isinstance(value, tuple)
        else (lambda v: abs(v - value))
    )
    return min(range(len(levels)), key=lambda j: key(levels[j]))


def _shapes(context: SearchContext, genome: Genome) -> dict[int, LayerShape]:
    space, shapes = context.space, {}
    for i, (a, n) in genome.items():
        full = context.dims.layers[i]
        attention, neurons = space.attention_levels(full)[a], space.mlp_levels(full)[n]
        if attention.heads or neurons:
            shapes[i] = LayerShape(attention.heads, attention.kv_heads, neurons)
    return shapes


def _subnet(context: SearchContext, genome: Genome) -> SubNetwork:
    return keep_most_important(context.dims, context.importance, _shapes(context, genome))
