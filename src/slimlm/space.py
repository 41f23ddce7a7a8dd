"""From a size to a concrete sub-network: which units to keep, ranked by importance."""

from __future__ import annotations

import itertools

from slimlm.costs import static_cost
from slimlm.errors import SlimlmError
from slimlm.importance import Importance
from slimlm.models.base import LayerShape, ModelDims
from slimlm.subnet import LayerKeep, SubNetwork

NEURON_STEP = 8  # kept MLP widths are multiples of this: ragged widths run slower on real kernels


def keep_most_important(dims: ModelDims, importance: Importance, shapes: dict[int, LayerShape]) -> SubNetwork:
    """The sub-network keeping, in each listed layer, its most important units in the given amounts.

    Heads are chosen group-wise so GQA stays valid: the ``kv_heads`` groups whose best
    ``group_size`` query heads score highest, and those query heads.
    """
    layers = {}
    for i, shape in shapes.items():
        full = dims.layers[i]
        head_scores = importance.heads[i].view(full.kv_heads, full.group_size)
        best_in_group = head_scores.topk(shape.group_size, dim=1)
        groups = best_in_group.values.sum(dim=1).topk(shape.kv_heads).indices
        heads = [int(g) * full.group_size + int(h) for g in groups for h in best_in_group.indices[g]]
        neurons = importance.neurons[i].topk(shape.neurons).indices
        layers[i] = LayerKeep(heads, groups.tolist(), neurons.tolist())
    return SubNetwork(layers)


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
    spare = per_layer - dims.params_per_layer - heads * dims.params_per_head - kv_heads * dims.params_per_kv_head
    neurons = min(limit, int(spare // dims.params_per_neuron) // NEURON_STEP * NEURON_STEP)
    return neurons if neurons >= NEURON_STEP else None


def uniform_subnetwork(dims: ModelDims, importance: Importance, params_fraction: float) -> SubNetwork:
    """Every layer the same shape, at most ``params_fraction`` of the model's parameters, best units kept."""
    if not 0 < params_fraction <= 1:
        raise SlimlmError(f"--params must be a fraction in (0, 1], got {params_fraction}")
    budget = int(params_fraction * static_cost(dims).params)
    shape = uniform_shape(dims, budget)
    return keep_most_important(dims, importance, dict.fromkeys(range(dims.num_layers), shape))
