"""One-shot structured pruning methods from the literature: the baselines slimlm's search must beat.

Each method turns calibration text into a sub-network within a parameter budget (and, where the
method has one, a weight update), so its result is extracted, timed and evaluated by the same spine
as a searched one. Written here from the papers:

- ``magnitude``: one shape for every layer; heads and neurons ranked by weight norm.
- ``wanda-sp``: one shape for every layer; ranked by structured Wanda, ‖X_j‖·‖W_:,j‖ (FLAP's baseline).
- ``flap`` (An et al., AAAI 2024): fluctuation scores standardised within each layer's attention and
  MLP, one global ranking weighted by each unit's parameters (so layers get their own widths), and
  the removed channels' mean output added back as a bias on the output projections.
- ``shortgpt`` (Men et al., 2024): whole layers removed, lowest block influence first.
- ``llm-pruner`` (Ma et al., NeurIPS 2023): first-order Taylor importance of coupled structures, one
  shape for the middle layers while the first and last layers stay whole; no recovery training.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimlm.costs import static_cost
from slimlm.errors import SlimlmError
from slimlm.importance import Calibration, importance, taylor_importance
from slimlm.models import LoadedModel
from slimlm.models.base import LayerShape, ModelDims
from slimlm.reform import Reformed
from slimlm.space import NEURON_STEP, keep_most_important, uniform_shape
from slimlm.stream import resident
from slimlm.subnet import LayerKeep, SubNetwork


@dataclass(frozen=True)
class PruneInput:
    """What every method may use: the model, its calibration statistics and tokens, the parameter budget."""

    loaded: LoadedModel
    calibration: Calibration
    windows: torch.Tensor
    budget: int


@dataclass(frozen=True)
class Pruned:
    """A method's result: the sub-network, its weight update (or None), and the method's own time."""

    method: str
    subnet: SubNetwork
    reformed: Reformed | None
    seconds: float


def magnitude(given: PruneInput) -> tuple[SubNetwork, Reformed | None]:
    """Uniform widths, heads and neurons ranked by the L2 norm of their output-projection weights."""
    scores = importance(given.loaded, given.calibration, "magnitude")
    return uniform(given.loaded.dims, scores, given.budget), None


def wanda_sp(given: PruneInput) -> tuple[SubNetwork, Reformed | None]:
    """Uniform widths, ranked by structured Wanda (input norm times weight norm)."""
    scores = importance(given.loaded, given.calibration, "activation")
    return uniform(given.loaded.dims, scores, given.budget), None


def shortgpt(given: PruneInput) -> tuple[SubNetwork, Reformed | None]:
    """Remove whole layers, least influential first, until the model fits the budget."""
    dims = given.loaded.dims
    kept = list(range(dims.num_layers))
    for layer in sorted(kept, key=lambda i: float(given.calibration.block_influence[i])):
        if static_cost(dims, [dims.layers[i] for i in kept]).params <= given.budget or len(kept) == 1:
            break
        kept.remove(layer)
    if static_cost(dims, [dims.layers[i] for i in kept]).params > given.budget:
        raise SlimlmError(f"shortgpt: even one layer exceeds the budget of {given.budget:,} parameters")
    return SubNetwork({i: LayerKeep.full(dims.layers[i]) for i in kept}), None


def llm_pruner(given: PruneInput, taylor_windows: int = 16) -> tuple[SubNetwork, Reformed | None]:
    """Taylor-ranked units, one shape for the middle layers; the first 4/32 and last 2/32 of the depth stay whole
    (LLM-Pruner's LLaMA-7B setting, scaled to the model's depth)."""
    dims = given.loaded.dims
    scores = taylor_importance(given.loaded, given.windows[:taylor_windows], given.calibration.block_influence)
    first, last = round(dims.num_layers * 4 / 32), round(dims.num_layers * 2 / 32)
    frozen = (*range(first), *range(dims.num_layers - last, dims.num_layers))
    return uniform(dims, scores, given.budget, frozen), None


@torch.no_grad()
def flap(given: PruneInput) -> tuple[SubNetwork, Reformed | None]:
    """Fluctuation-ranked units across all layers and both modules, with bias compensation.

    Scores are standardised per layer and module (channel level, then averaged per head), so one
    ranking compares attention and MLP units of every layer; units are kept best first, each costing
    its parameters, while they fit. GQA keeps whole key/value groups; every layer keeps at least one
    group and one neuron (FLAP may drop a whole module; slimlm's layers always keep both).
    """
    subnet = _flap_subnet(given.loaded, given.calibration, given.budget)
    return subnet, _bias_compensation(given.loaded, given.calibration, subnet)


def flap_shapes(loaded: LoadedModel, calibration: Calibration, budget: int) -> list[LayerShape]:
    """FLAP's per-layer shapes within ``budget`` parameters (its allocation rule, without its weights):
    the search's adaptive start."""
    return _flap_subnet(loaded, calibration, budget).shapes()


@torch.no_grad()
def _flap_subnet(loaded: LoadedModel, calib: Calibration, budget: int) -> SubNetwork:
    dims = loaded.dims
    layers = loaded.adapter.decoder_layers(loaded.model)
    units: list[tuple[float, int, int, str, int]] = []  # (score, cost, layer, kind, index)
    kept_groups: dict[int, list[int]] = {}  # every layer starts with its best group and neuron
    kept_neurons: dict[int, list[int]] = {}
    group_cost = dims.layers[0].group_size * dims.params_per_head + dims.params_per_kv_head
    for i, layer in enumerate(layers):
        o_proj, down_proj = loaded.adapter.output_projections(layer)
        shape = dims.layers[i]
        with resident(loaded.model, layer):
            heads = _standardised(calib.attention[i].variance * o_proj.weight.double().pow(2).sum(dim=0))
            neurons = _standardised(calib.mlp[i].variance * down_proj.weight.double().pow(2).sum(dim=0))
        groups = heads.view(shape.kv_heads, -1).mean(dim=1)  # a group's channels, averaged
        units += [(float(v), group_cost, i, "group", k) for k, v in enumerate(groups)]
        units += [(float(v), dims.params_per_neuron, i, "neuron", k) for k, v in enumerate(neurons)]
        kept_groups[i], kept_neurons[i] = [int(groups.argmax())], [int(neurons.argmax())]
    spent = static_cost(dims, [LayerShape(dims.layers[i].group_size, 1, 1) for i in range(dims.num_layers)]).params
    if spent > budget:
        raise SlimlmError(f"flap: the smallest model it makes exceeds the budget of {budget:,} parameters")
    for _, cost, i, kind, k in sorted(units, key=lambda u: -u[0]):
        chosen = kept_groups[i] if kind == "group" else kept_neurons[i]
        if k in chosen or spent + cost > budget:
            continue
        chosen.append(k)
        spent += cost
    subnet = SubNetwork(
        {
            i: LayerKeep(
                sorted(h for g in kept_groups[i] for h in range(g * s.group_size, (g + 1) * s.group_size)),
                sorted(kept_groups[i]),
                sorted(kept_neurons[i]),
            )
            for i, s in enumerate(dims.layers)
        }
    )
    return subnet


def _standardised(scores: torch.Tensor) -> torch.Tensor:
    return (scores - scores.mean()) / scores.std().clamp_min(1e-12)


def _bias_compensation(loaded: LoadedModel, calib: Calibration, subnet: SubNetwork) -> Reformed:
    """Output-projection biases W[:, removed] · mean(X[removed]): the removed channels' average output."""
    dims, reformed = loaded.dims, {}
    for i, layer in enumerate(loaded.adapter.decoder_layers(loaded.model)):
        keep = subnet.layers[i]
        kept_channels = {
            "attention": torch.tensor([h * dims.head_dim + c for h in keep.heads for c in range(dims.head_dim)]),
            "mlp": torch.tensor(keep.neurons),
        }
        for (name, stats), linear in zip(
            (("attention", calib.attention[i]), ("mlp", calib.mlp[i])),
            loaded.adapter.output_projections(layer),
            strict=True,
        ):
            mean = (stats.sum / stats.count).to(linear.weight)  # the weight's device and dtype
            mean[kept_channels[name]] = 0
            bias = linear.weight.detach() @ mean
            reformed[i, f"{name}_bias"] = bias if linear.bias is None else linear.bias.detach() + bias
    return reformed


def uniform(dims: ModelDims, scores, budget: int, frozen: tuple[int, ...] = ()) -> SubNetwork:
    """One shape for every layer not ``frozen`` (those stay whole), as large as ``budget`` allows."""
    free = [i for i in range(dims.num_layers) if i not in frozen]
    whole = static_cost(dims, [dims.layers[i] for i in frozen]).params - dims.params_outside_layers
    try:
        shape = uniform_shape(dataclasses.replace(dims, layers=tuple(dims.layers[i] for i in free)), budget - whole)
    except SlimlmError:
        tiny = [dims.layers[i] if i in frozen else LayerShape(1, 1, NEURON_STEP) for i in range(dims.num_layers)]
        smallest = static_cost(dims, tiny).params
        raise SlimlmError(
            f"no sub-network this method makes fits the budget of {budget:,} parameters; the smallest has {smallest:,}"
        ) from None
    subnet = keep_most_important(dims, scores, dict.fromkeys(free, shape))
    return SubNetwork({**subnet.layers, **{i: LayerKeep.full(dims.layers[i]) for i in frozen}})


METHODS: dict[str, Callable[[PruneInput], tuple[SubNetwork, Reformed | None]]] = {
    "magnitude": magnitude,
    "wanda-sp": wanda_sp,
    "flap": flap,
    "shortgpt": shortgpt,
    "llm-pruner": llm_pruner,
}


def params_budget(
    dims: ModelDims, fraction: float | None = None, max_params: int | None = None, non_embedding: float | None = None
) -> int:
    """The parameter budget (exactly one given): a kept fraction of the model, an absolute count, or a
    kept fraction of the parameters outside the embeddings, which are never pruned (the knob for
    models whose embedding is most of their size: 168M of Gemma-3-270m's 268M)."""
    if sum(b is not None for b in (fraction, max_params, non_embedding)) != 1:
        raise SlimlmError("give exactly one budget: --params FRACTION, --non-embedding FRACTION or --max-params N")
    for option, value in (("--params", fraction), ("--non-embedding", non_embedding)):
        if value is not None and not 0 < value <= 1:
            raise SlimlmError(f"{option} must be a fraction in (0, 1], got {value}")
    if max_params is not None:
        return int(max_params)
    total = static_cost(dims).params
    if fraction is not None:
        return int(fraction * total)
    return dims.embedding_params + int(non_embedding * (total - dims.embedding_params))


def check_method(method: str) -> None:
    """Refuse a method slimlm does not have (before any model is loaded)."""
    if method not in METHODS:
        raise SlimlmError(f"unknown pruning method '{method}'; choose from {', '.join(METHODS)}")


def prune(method: str, given: PruneInput) -> Pruned:
    """Run one method (see ``METHODS``); its result fits ``given.budget`` or it raises a clear error."""
    check_method(method)
    start = time.perf_counter()
    subnet, reformed = METHODS[method](given)
    seconds = time.perf_counter() - start
    subnet.validate(given.loaded.dims)
    return Pruned(method, subnet, reformed, seconds)
