"""The search space: what may shrink, how, and how a point in it becomes a concrete sub-network.

A point gives every layer a shape (kept query heads and key/value heads as a GQA shape, kept MLP
neurons, or removed); ``keep_most_important`` turns shapes into kept unit indices by importance,
so every candidate inherits the most important weights.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
import torch

from slimlm.costs import static_cost
from slimlm.errors import SlimlmError
from slimlm.importance import Importance
from slimlm.models.base import LayerShape, ModelDims
from slimlm.subnet import LayerKeep, SubNetwork

NEURON_STEP = 8  # kept MLP widths are multiples of this: ragged widths run slower on real kernels


@dataclass(frozen=True)
class SearchSpace:
    """What may shrink and how.

    ``per_layer``: each layer gets its own ratios (else one shape for all layers).
    ``depth``: whole layers may be removed, and (in level-based search) a layer's attention or MLP
    sub-block alone. ``min_ratio``/``max_ratio``/``step``: bounds and grid of
    the kept fraction of each layer's neurons and heads. ``frozen_layers`` are always kept whole.
    """

    per_layer: bool = True
    depth: bool = True
    min_ratio: float = 0.2
    max_ratio: float = 1.0
    step: float = 0.025
    frozen_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= self.max_ratio <= 1:
            raise SlimlmError(f"need 0 < min ratio <= max ratio <= 1, got {self.min_ratio}, {self.max_ratio}")
        if not 0 < self.step <= 1:
            raise SlimlmError(f"ratio step must be in (0, 1], got {self.step}")

    @functools.cache  # noqa: B019 - the space is frozen and few layer sizes exist; repairs call this in loops
    def neuron_choices(self, full: LayerShape) -> tuple[int, ...]:
        """Allowed kept-neuron counts of a layer: the ratio grid, rounded to ``NEURON_STEP``."""
        steps = round((self.max_ratio - self.min_ratio) / self.step)
        ratios = [self.min_ratio + i * self.step for i in range(steps + 1)]
        counts = {
            min(full.neurons, max(NEURON_STEP, round(r * full.neurons / NEURON_STEP) * NEURON_STEP)) for r in ratios
        }
        return tuple(sorted(counts))

    @functools.cache  # noqa: B019 - as above
    def attention_choices(self, full: LayerShape) -> tuple[LayerShape, ...]:
        """Allowed (query heads, key/value heads) of a layer, smallest first; neurons left 0."""
        shapes = [
            LayerShape(kv * per_group, kv, 0)
            for kv, per_group in itertools.product(range(1, full.kv_heads + 1), range(1, full.group_size + 1))
        ]
        allowed = [s for s in shapes if self.min_ratio - 1e-9 <= s.heads / full.heads <= self.max_ratio + 1e-9]
        allowed = allowed or [min(shapes, key=lambda s: abs(s.heads / full.heads - self.min_ratio))]
        return tuple(sorted(allowed, key=lambda s: (s.heads, s.kv_heads)))

    def attention_levels(self, full: LayerShape) -> tuple[LayerShape, ...]:
        """A layer's attention levels for level-based search, smallest first: removed (where the space
        allows depth; sub-block removal as in BlockPruner), then every choice of ``attention_choices``."""
        return ((LayerShape(0, 0, 0),) if self.depth else ()) + self.attention_choices(full)

    def mlp_levels(self, full: LayerShape) -> tuple[int, ...]:
        """A layer's MLP widths for level-based search, smallest first: removed (0, where the space
        allows depth), then ``neuron_choices``."""
        return ((0,) if self.depth else ()) + self.neuron_choices(full)

    def suggest(self, trial: optuna.Trial, dims: ModelDims) -> dict[int, LayerShape]:
        """Layer shapes chosen by an Optuna trial (define-by-run: the sampler picks every choice)."""
        full = dims.layers[0]
        if not self.per_layer:
            uniform = self._suggest_layer(trial, "", full)
        shapes = {}
        for i, layer in enumerate(dims.layers):
            if i in self.frozen_layers:
                shapes[i] = layer
                continue
            if self.depth and not trial.suggest_categorical(f"keep_{i}", [True, False]):
                continue
            shapes[i] = self._suggest_layer(trial, f"_{i}", layer) if self.per_layer else uniform
        return shapes or {0: dims.layers[0]}

    def sample(self, dims: ModelDims, rng: np.random.Generator) -> dict[int, LayerShape]:
        """Layer shapes drawn uniformly from this space's choices (for super-network training)."""
        full, uniform = dims.layers[0], None
        shapes = {}
        for i, layer in enumerate(dims.layers):
            if i in self.frozen_layers:
                shapes[i] = layer
                continue
            if self.depth and rng.random() < 0.5:
                continue
            if self.per_layer or uniform is None:
                attention, neurons = self.attention_choices(layer), self.neuron_choices(layer)
                a = attention[rng.integers(len(attention))]
                shape = LayerShape(a.heads, a.kv_heads, neurons[rng.integers(len(neurons))])
                uniform = uniform or shape
            shapes[i] = shape if self.per_layer else self._nearest(layer, uniform, full)
        return shapes or {0: dims.layers[0]}  # as ``suggest``: a model keeps at least one layer

    def sample_levels(
        self, dims: ModelDims, rng: np.random.Generator, ragged: bool = True, wide: bool = False
    ) -> dict[int, LayerShape]:
        """Layer shapes with every layer's attention and MLP level drawn uniformly (removed among them
        where the space allows depth) and, where it does, up to half the layers removed whole: sub-networks
        across the space, to time (``slimlm.latency``). ``ragged=False``: one shape for every layer.
        ``wide``: levels from the upper half and at most a fifth of the layers removed (to shrink to a budget)."""

        def drawn(levels: tuple) -> object:
            return levels[rng.integers(len(levels) // 2 if wide else 0, len(levels))]

        if not ragged:
            full = dims.layers[0]
            a, n = drawn(self.attention_choices(full)), drawn(self.neuron_choices(full))
            return {i: LayerShape(a.heads, a.kv_heads, n) for i in range(dims.num_layers)}
        removal = rng.uniform(0, 0.2 if wide else 0.5) if self.depth else 0.0
        shapes = {}
        for i, layer in enumerate(dims.layers):
            if i in self.frozen_layers:
                shapes[i] = layer
            elif rng.random() >= removal:
                a, n = drawn(self.attention_levels(layer)), drawn(self.mlp_levels(layer))
                shapes[i] = LayerShape(a.heads, a.kv_heads, n)
        return shapes if any(s.has_attention or s.has_mlp for s in shapes.values()) else {0: dims.layers[0]}

    def params_of(self, dims: ModelDims, shapes: dict[int, LayerShape]) -> dict[str, int | bool]:
        """The trial parameters ``suggest`` would need to return ``shapes`` (to enqueue a known point).

        Shapes must be choices of this space; with one shape for all layers, the first free layer's counts.
        """
        free = [i for i in range(dims.num_layers) if i not in self.frozen_layers]
        params: dict[str, int | bool] = {}
        for i in free:
            if self.depth:
                params[f"keep_{i}"] = i in shapes
            if i in shapes and (self.per_layer or "attention" not in params):
                suffix = f"_{i}" if self.per_layer else ""
                shape, full = shapes[i], dims.layers[i]
                attention = [(a.heads, a.kv_heads) for a in self.attention_choices(full)]
                try:
                    params[f"attention{suffix}"] = attention.index((shape.heads, shape.kv_heads))
                    params[f"neurons{suffix}"] = self.neuron_choices(full).index(shape.neurons)
                except ValueError:
                    raise SlimlmError(f"layer {i} shape {shape} is not a choice of this search space") from None
        return params

    def _suggest_layer(self, trial: optuna.Trial, suffix: str, full: LayerShape) -> LayerShape:
        attention = self.attention_choices(full)
        neurons = self.neuron_choices(full)
        a = attention[trial.suggest_int(f"attention{suffix}", 0, len(attention) - 1)]
        n = neurons[trial.suggest_int(f"neurons{suffix}", 0, len(neurons) - 1)]
        return LayerShape(a.heads, a.kv_heads, n)

    def smallest(self, dims: ModelDims) -> dict[int, LayerShape]:
        """The cheapest shapes the space allows (one layer left when depth may shrink)."""
        shapes = {}
        for i, full in enumerate(dims.layers):
            if i in self.frozen_layers:
                shapes[i] = full
            elif not self.depth:
                a = self.attention_choices(full)[0]
                shapes[i] = LayerShape(a.heads, a.kv_heads, self.neuron_choices(full)[0])
        if not shapes:  # every layer may go, but a model needs one
            full = dims.layers[0]
            a = self.attention_choices(full)[0]
            shapes[0] = LayerShape(a.heads, a.kv_heads, self.neuron_choices(full)[0])
        return shapes

    def starts(
        self,
        dims: ModelDims,
        importance: Importance,
        within: Callable[[list[LayerShape]], bool],
        allocated: list[LayerShape] | None = None,
    ) -> list[SubNetwork]:
        """Importance-ranked sub-networks of this space with one shape for every free layer: for each
        attention shape, the most neurons the budget allows (``within(shapes)``). With ``depth``, the
        least influential layers go first when nothing fits with all of them.

        Ordered best guess first: kept head fraction closest to kept neuron fraction (heads and
        neurons shrink alike), then larger. With ``depth`` the layer-removal start comes last: whole
        layers, the least influential removed until the rest fit (ShortGPT's answer), so a search can
        mix depth and width from both ends. Frozen layers stay whole and shapes come from the space's
        own choices, so a search started here stays inside the space.

        ``allocated``: per-layer shapes made by another rule (FLAP's allocation, see
        ``prune.flap_shapes``), snapped to the grid and shrunk to fit; it goes first. FLAP's exact shapes
        keep attention almost whole on SmolLM2 at 0.9 and reformed reach 26.1 held-out perplexity,
        where the threshold rule of ``_adaptive_start`` (group scores standardised over only three
        groups per layer, so one group always looks weak) cut a third of the groups: 35.7.
        """
        free = [i for i in range(dims.num_layers) if i not in self.frozen_layers]
        by_influence = sorted(free, key=lambda i: -float(importance.layers[i]))
        per_layer = allocated and self.per_layer  # a uniform space holds no per-layer shapes
        starts = [self._allocated_start(dims, importance, within, allocated)] if per_layer else []
        starts += self._width_starts(dims, importance, within, free, by_influence)
        starts.append(self._adaptive_start(dims, importance, within) if self.per_layer else None)
        starts.append(self._depth_start(dims, importance, within, by_influence) if self.depth else None)
        unique = {s.to_compact(): s for s in starts if s is not None}
        return list(unique.values())

    def _allocated_start(self, dims, importance, within, allocated: list[LayerShape]) -> SubNetwork | None:
        """``allocated`` shapes snapped into the space (the group count kept, the most query heads and
        neurons the grid allows at or below them), frozen layers whole, shrunk until they fit."""
        shapes = {}
        for i, (full, wanted) in enumerate(zip(dims.layers, allocated, strict=True)):
            if i in self.frozen_layers:
                shapes[i] = full
                continue
            below = [a for a in self.attention_choices(full) if a.heads <= wanted.heads] or [
                self.attention_choices(full)[0]
            ]
            attention = min(below, key=lambda a: (abs(a.kv_heads - wanted.kv_heads), -a.heads))
            neurons = [n for n in self.neuron_choices(full) if n <= wanted.neurons] or [self.neuron_choices(full)[0]]
            shapes[i] = LayerShape(attention.heads, attention.kv_heads, neurons[-1])
        shapes = self.shrink_to_fit(dims, shapes, within)
        return keep_most_important(dims, importance, shapes) if within(list(shapes.values())) else None

    def _adaptive_start(self, dims, importance, within) -> SubNetwork | None:
        """Per-layer widths from one global threshold on importance standardised within each layer's
        attention and MLP (FLAP's adaptive structure), snapped to the grid: the lowest threshold that fits."""
        free = [i for i in range(dims.num_layers) if i not in self.frozen_layers]
        groups = {i: _standardised(importance.kv_heads[i]) for i in free}
        neurons = {i: _standardised(importance.neurons[i]) for i in free}

        def shapes_at(threshold: float) -> dict[int, LayerShape]:
            shapes = {i: dims.layers[i] for i in self.frozen_layers}
            for i in free:
                full = dims.layers[i]
                kv = max(1, int((groups[i] > threshold).sum()))
                attention = min(
                    self.attention_choices(full), key=lambda a: (abs(a.kv_heads - kv), -a.group_size, a.heads)
                )
                wanted = int((neurons[i] > threshold).sum())
                n = max([c for c in self.neuron_choices(full) if c <= wanted], default=self.neuron_choices(full)[0])
                shapes[i] = LayerShape(attention.heads, attention.kv_heads, n)
            return dict(sorted(shapes.items()))

        thresholds = sorted({float(v) for scores in (*groups.values(), *neurons.values()) for v in scores})
        low, high = 0, len(thresholds) - 1  # find the lowest threshold whose shapes fit
        if not thresholds or not within(list(shapes_at(thresholds[high]).values())):
            return None
        while low < high:
            middle = (low + high) // 2
            if within(list(shapes_at(thresholds[middle]).values())):
                high = middle
            else:
                low = middle + 1
        return keep_most_important(dims, importance, shapes_at(thresholds[low]))

    def _depth_start(self, dims, importance, within, by_influence) -> SubNetwork | None:
        """Every layer whole but the least influential ones, removed until the rest fit; None if none fits."""
        frozen = {i: dims.layers[i] for i in self.frozen_layers}
        for count in range(len(by_influence), 0, -1):
            shapes = frozen | {
                i: self._nearest(dims.layers[i], dims.layers[i], dims.layers[i]) for i in by_influence[:count]
            }
            if within(list(shapes.values())):
                return keep_most_important(dims, importance, dict(sorted(shapes.items())))
        return None

    def _width_starts(self, dims, importance, within, free, by_influence) -> list[SubNetwork]:
        full = dims.layers[free[0]] if free else dims.layers[0]
        for count in range(len(free), 0, -1) if self.depth else [len(free)]:
            kept = sorted(by_influence[:count])
            found: list[tuple[float, int, dict[int, LayerShape]]] = []
            for a in self.attention_choices(full):
                for n in reversed(self.neuron_choices(full)):  # the most neurons that fit with this attention
                    target = LayerShape(a.heads, a.kv_heads, n)
                    shapes = {i: dims.layers[i] for i in self.frozen_layers} | {
                        i: self._nearest(dims.layers[i], target, full) for i in kept
                    }
                    if within(list(shapes.values())):
                        cost = static_cost(dims, list(shapes.values())).params
                        found.append((abs(a.heads / full.heads - n / full.neurons), -cost, shapes))
                        break
            if found:
                found.sort(key=lambda f: f[:2])
                return [keep_most_important(dims, importance, shapes) for *_, shapes in found]
        smallest = static_cost(dims, list(self.smallest(dims).values())).params
        raise SlimlmError(
            f"no sub-network of this search space fits the budget; the smallest has {smallest:,} parameters"
        )

    def shrink_to_fit(
        self, dims: ModelDims, shapes: dict[int, LayerShape], within: Callable[[list[LayerShape]], bool]
    ) -> dict[int, LayerShape]:
        """Shapes made to fit the budget by stepping down, one grid step at a time, the free layer that
        keeps the largest fraction of its units (its larger of heads and neurons first).

        A repair for strategies that sample shapes blindly: at tight budgets almost no random point
        fits, so without it they would spend their evaluations on candidates the budget rejects.
        Returns the shapes unchanged when they fit, and the smallest reachable ones when nothing does.
        """
        shapes = dict(shapes)
        # each free layer's next step down, updated only for the layer that moved: repairs run in inner loops
        smaller = {i: self._step_down(dims.layers[i], s) for i, s in shapes.items() if i not in self.frozen_layers}
        while not within(list(shapes.values())):
            steps = [(self._fraction(dims.layers[i], shapes[i]), i) for i, s in smaller.items() if s != shapes[i]]
            if not steps:
                break
            _, i = max(steps)
            shapes[i] = smaller[i]
            smaller[i] = self._step_down(dims.layers[i], shapes[i])
        return shapes

    @staticmethod
    def _fraction(full: LayerShape, shape: LayerShape) -> float:
        return max(shape.heads / full.heads, shape.neurons / full.neurons)

    def _step_down(self, full: LayerShape, shape: LayerShape) -> LayerShape:
        """One grid step smaller: neurons when they keep the larger fraction, else attention."""
        neurons = [n for n in self.neuron_choices(full) if n < shape.neurons]
        attention = [a for a in self.attention_choices(full) if a.heads < shape.heads]
        if neurons and (shape.neurons / full.neurons >= shape.heads / full.heads or not attention):
            return LayerShape(shape.heads, shape.kv_heads, neurons[-1])
        if attention:
            a = min(attention, key=lambda a: (-a.heads, abs(a.kv_heads / a.heads - shape.kv_heads / shape.heads)))
            return LayerShape(a.heads, a.kv_heads, shape.neurons)
        return shape

    def _nearest(self, full: LayerShape, target: LayerShape, reference: LayerShape) -> LayerShape:
        """The allowed shape of a layer of size ``full`` that keeps the fractions ``target`` keeps of ``reference``."""
        head_ratio, kv_ratio = target.heads / reference.heads, target.kv_heads / reference.kv_heads
        neuron_ratio = target.neurons / reference.neurons
        a = min(
            self.attention_choices(full),
            key=lambda c: (abs(c.heads / full.heads - head_ratio), abs(c.kv_heads / full.kv_heads - kv_ratio)),
        )
        n = min(self.neuron_choices(full), key=lambda c: abs(c / full.neurons - neuron_ratio))
        return LayerShape(a.heads, a.kv_heads, n)


def keep_most_important(dims: ModelDims, importance: Importance, shapes: dict[int, LayerShape]) -> SubNetwork:
    """The sub-network keeping, in each listed layer, its most important units in the given amounts.

    Heads are chosen group-wise so GQA stays valid: the ``kv_heads`` groups whose best
    ``group_size`` query heads score highest, and those query heads.
    """
    layers = {}
    for i, shape in shapes.items():
        if not shape.has_attention and not shape.has_mlp:
            continue  # neither sub-block kept: the layer is removed
        full = dims.layers[i]
        head_scores = importance.heads[i].view(full.kv_heads, full.group_size)
        best_in_group = head_scores.topk(shape.group_size, dim=1)
        groups = best_in_group.values.sum(dim=1).topk(shape.kv_heads).indices
        heads = [int(g) * full.group_size + int(h) for g in groups for h in best_in_group.indices[g]]
        neurons = importance.neurons[i].topk(shape.neurons).indices
        layers[i] = LayerKeep(heads, groups.tolist(), neurons.tolist())
    return SubNetwork(layers)


def _standardised(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.double()
    return (scores - scores.mean()) / scores.std().clamp_min(1e-12) if len(scores) > 1 else scores * 0


def uniform_shape(dims: ModelDims, params: int) -> LayerShape:
    """The largest same-for-every-layer shape within ``params`` that shrinks heads and neurons alike.

    Among the grouped-query attention shapes (key/value heads x query heads per group) each gets
    the most neurons that still fit; the one whose kept head fraction is closest to its kept neuron
    fraction wins (ties: more parameters).
    """
    full = dims.layers[0]
    if any(s != full for s in dims.layers):
        raise SlimlmError("a uniform shape needs a model whose layers all have the same shape")
    best: tuple[float, int, LayerShape] | None = None
    for kv, per_group in itertools.product(range(1, full.kv_heads + 1), range(1, full.group_size + 1)):
        neurons = _most_neurons(dims, params, kv * per_group, kv, full.neurons)
        if neurons is None:
            continue
        shape = LayerShape(kv * per_group, kv, neurons)
        cost = static_cost(dims, [shape] * dims.num_layers).params
        key = (abs(shape.heads / full.heads - neurons / full.neurons), -cost)
        if best is None or key < best[:2]:
            best = (*key, shape)
    if best is None:
        smallest = static_cost(dims, [LayerShape(1, 1, NEURON_STEP)] * dims.num_layers).params
        total = static_cost(dims).params
        raise SlimlmError(
            f"no uniform sub-network has at most {params:,} parameters; the smallest has {smallest:,}"
            f" ({smallest / total:.3f} of {total:,})"
        )
    return best[2]


def _most_neurons(dims: ModelDims, params: int, heads: int, kv_heads: int, limit: int) -> int | None:
    per_layer = (params - dims.params_outside_layers) / dims.num_layers
    spare = per_layer - dims.layer_params(LayerShape(heads, kv_heads, 0)) - dims.params_per_mlp
    neurons = min(limit, int(spare // dims.params_per_neuron) // NEURON_STEP * NEURON_STEP)
    return neurons if neurons >= NEURON_STEP else None


def uniform_subnetwork(dims: ModelDims, importance: Importance, params_fraction: float) -> SubNetwork:
    """Every layer the same shape, at most ``params_fraction`` of the model's parameters, best units kept."""
    if not 0 < params_fraction <= 1:
        raise SlimlmError(f"--params must be a fraction in (0, 1], got {params_fraction}")
    budget = int(params_fraction * static_cost(dims).params)
    shape = uniform_shape(dims, budget)
    return keep_most_important(dims, importance, dict.fromkeys(range(dims.num_layers), shape))
