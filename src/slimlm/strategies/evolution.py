"""Training-free evolutionary search on kept sets (Shen et al., "Search for Efficient LLMs", NeurIPS 2024).

The initial population is the importance-ranked uniform sub-networks that fill the budget, one per
attention shape (so the search sees early whether heads or neurons are the cheaper to lose).
A child comes from one parent (mutation) or two (per-layer crossover, then mutation). Mutation
changes a few layers' widths by one grid step (an attention step moves the neurons the other way
to keep the layer's size; with depth search it also removes or restores layers),
then resamples their kept neurons with probability proportional to importance while inheriting at
least ``overlap`` of the parent's kept set. Parents are the ``parents`` fittest candidates so far;
children outside the budget are discarded and redrawn. Each child is drawn from a generator seeded
by (seed, trial number) and the stored history, so a run is reproducible and a killed run resumes
from its store to the same candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import optuna

from slimlm.models.base import LayerShape
from slimlm.space import keep_most_important
from slimlm.strategies.base import SearchContext, candidate, completed, draw_number, seen_candidates
from slimlm.subnet import LayerKeep, SubNetwork

ATTEMPTS = 100  # redraws of a child outside the budget before handing it back anyway


@dataclass
class Evolution:
    population: int = 8
    parents: int = 4
    crossover: float = 0.5  # probability a child has two parents
    mutate_layer: float = 0.15  # probability each layer mutates
    overlap: float = 0.9  # minimum share of a mutated layer's kept neurons inherited from its parent
    name = "evolution"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)  # unused: children come from the history

    def begin(self, study: optuna.Study, context: SearchContext) -> None:
        pass  # the initial population is proposed from ``context.starts``

    def propose(self, trial: optuna.Trial, study: optuna.Study, context: SearchContext) -> SubNetwork:
        history = completed(study)
        seen = seen_candidates(study, exclude=trial.number)
        for start in context.starts:  # the initial population: every uniform shape that fills the budget
            if start.to_compact() not in seen:
                return start
        rng = np.random.default_rng([context.seed, draw_number(study, trial.number)])
        ranked = [candidate(t) for t in sorted(history, key=lambda t: t.values[0])]
        parents = ranked[: self.parents] or list(context.starts)
        child = parents[0]
        for _ in range(ATTEMPTS):
            first = parents[rng.integers(len(parents))]
            child = first
            if len(parents) > 1 and rng.random() < self.crossover:
                child = self._cross(rng, first, parents[rng.integers(len(parents))], context)
            child = self._mutate(rng, child, context)
            if context.fits(child) and child.to_compact() not in seen:
                return child
        return child

    def _cross(self, rng: np.random.Generator, a: SubNetwork, b: SubNetwork, context: SearchContext) -> SubNetwork:
        if not context.space.per_layer:  # one shape for all layers: mix only kept sets of equally shaped layers
            b = SubNetwork({i: b.layers[i] if b.layers.get(i, k).shape == k.shape else k for i, k in a.layers.items()})
        layers = {}
        for i in range(context.dims.num_layers):
            source = a if rng.random() < 0.5 else b
            if i in source.layers:
                layers[i] = source.layers[i]
        return SubNetwork(layers or dict(a.layers))

    def _mutate(self, rng: np.random.Generator, parent: SubNetwork, context: SearchContext) -> SubNetwork:
        """Depth, width and mask mutation; with a uniform space one width change applies to every layer."""
        space, dims = context.space, context.dims
        layers = dict(parent.layers)
        free = [i for i in range(dims.num_layers) if i not in space.frozen_layers]
        if space.depth:
            for i in free:
                if rng.random() < self.mutate_layer * 0.2:
                    if i in layers and len(layers) > 1:
                        del layers[i]
                    elif i not in layers:
                        template = next((layers[j].shape for j in free if j in layers), dims.layers[i])
                        layers[i] = keep_most_important(dims, context.importance, {i: template}).layers[i]
        present = [i for i in free if i in layers]
        if not present:
            return SubNetwork(layers)
        if space.per_layer:
            for i in present:
                if rng.random() < self.mutate_layer:
                    shape = self._step(rng, context, dims.layers[i], layers[i].shape)
                    layers[i] = self._reshape(rng, layers[i], i, shape, context)
        else:
            shape = self._step(rng, context, dims.layers[present[0]], layers[present[0]].shape)
            for i in present:
                layers[i] = self._reshape(rng, layers[i], i, shape, context)
        return SubNetwork(layers)

    @staticmethod
    def _step(rng: np.random.Generator, context: SearchContext, full: LayerShape, shape: LayerShape) -> LayerShape:
        """A neighbouring shape on the space's grid: one neuron step (70%), or one attention step (30%)
        with the neurons moved the other way to keep the layer's size, so heads can be traded for neurons."""
        space, dims = context.space, context.dims
        attention, neurons = space.attention_choices(full), space.neuron_choices(full)
        a = min(
            range(len(attention)),
            key=lambda j: (abs(attention[j].heads - shape.heads), abs(attention[j].kv_heads - shape.kv_heads)),
        )
        n = min(range(len(neurons)), key=lambda j: abs(neurons[j] - shape.neurons))
        if rng.random() >= 0.3:
            n = int(np.clip(n + rng.choice([-1, 1]), 0, len(neurons) - 1))
            return LayerShape(attention[a].heads, attention[a].kv_heads, neurons[n])
        a = int(np.clip(a + rng.choice([-1, 1]), 0, len(attention) - 1))
        new = attention[a]
        size = _layer_params(dims, shape)
        fitting = [c for c in neurons if _layer_params(dims, LayerShape(new.heads, new.kv_heads, c)) <= size]
        return LayerShape(new.heads, new.kv_heads, fitting[-1] if fitting else neurons[0])

    def _reshape(
        self, rng: np.random.Generator, keep: LayerKeep, i: int, shape: LayerShape, context: SearchContext
    ) -> LayerKeep:
        """``keep`` at ``shape``: heads re-ranked if the attention shape changed, neurons resampled (mask mutation)."""
        if (shape.heads, shape.kv_heads) == (keep.shape.heads, keep.shape.kv_heads):
            heads, kv_heads = keep.heads, keep.kv_heads
        else:
            ranked = keep_most_important(context.dims, context.importance, {i: shape}).layers[i]
            heads, kv_heads = ranked.heads, ranked.kv_heads
        kept = self._resample(rng, keep.neurons, shape.neurons, context.importance.neurons[i].numpy())
        return LayerKeep(heads, kv_heads, kept)

    def _resample(self, rng: np.random.Generator, kept: tuple[int, ...], size: int, scores: np.ndarray) -> list[int]:
        """``size`` neurons: at least ``overlap`` of them from ``kept``, all drawn in proportion to importance."""
        weights = np.maximum(scores.astype(np.float64), 0) + 1e-12
        inherit = min(len(kept), math.ceil(self.overlap * min(len(kept), size)), size)
        old = np.array(kept)
        chosen = rng.choice(old, inherit, replace=False, p=weights[old] / weights[old].sum()) if inherit else []
        rest = np.setdiff1d(np.arange(len(scores)), chosen)
        extra = rng.choice(rest, size - inherit, replace=False, p=weights[rest] / weights[rest].sum())
        return [int(j) for j in (*chosen, *extra)]


def _layer_params(dims, shape: LayerShape) -> int:
    return (
        dims.params_per_layer
        + shape.heads * dims.params_per_head
        + shape.kv_heads * dims.params_per_kv_head
        + shape.neurons * dims.params_per_neuron
    )
