"""Apply a sub-network to a loaded model in place, and undo it.

``subnetwork_applied`` is the hot loop of every search: candidate after candidate on one loaded
model. Each kept linear gets a smaller weight, layers not kept are left out of the layer list, and
everything is put back on exit. The forward pass then runs exactly the computation of the extracted
model. The smaller weight is a gathered copy of the kept slice (as extraction wants it), or with
``views`` a contiguous view of the start of the full weight's storage, where its kept rows and columns
were written in place: no second copy of the kept weights beside the model's (about 0.7 of them at
0.7), which is what evaluating and timing candidates wants; the move is undone on exit.

``subnetwork_masked`` is the training path: the full weights stay in place and removed heads and
neurons are zeroed at the inputs of the output projections (which is what removing them computes),
so gradients reach the shared weights of every sub-network a super-network trains.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.models import LinearSlice, LoadedModel
from slimlm.stream import layer_stream
from slimlm.subnet import SubNetwork

_APPLIED = "_slimlm_subnetwork_applied"


@contextmanager
def subnetwork_applied(
    loaded: LoadedModel, subnet: SubNetwork, reformed: Mapping | None = None, *, views: bool = False
) -> Iterator[PreTrainedModel]:
    """Within the block, ``loaded.model`` computes ``subnet``; on exit it is the full model again.

    ``reformed`` (from ``slimlm.reform.reform`` or a pruning method) replaces the kept output-projection
    weights (keys ``(layer, "attention" | "mlp")``) and sets their biases (``"attention_bias" | "mlp_bias"``).
    With ``views`` the kept weights are contiguous views into the full ones, rearranged in place rather
    than copied: for evaluating and timing, not for saving (a view keeps its whole storage).
    """
    adapter = loaded.adapter
    # a streamed layer's weights are read afresh for each forward and dropped after it: a copy of its kept
    # slice is one layer's, and moving rows in place would only be undone on weights about to be dropped
    views = views and layer_stream(loaded.model) is None

    @torch.no_grad()
    def shrink(layer, index: int, position: int, saved: list) -> None:
        keep = subnet.layers[index]
        kept = {"attention": keep.shape.has_attention, "mlp": keep.shape.has_mlp}
        projections = dict(zip(("attention", "mlp"), adapter.output_projections(layer), strict=True))
        replaced = {id(projections[n]) for n in kept if kept[n] and reformed and (index, n) in reformed}
        units = (torch.tensor(u, dtype=torch.long) for u in (keep.heads, keep.kv_heads, keep.neurons))
        for piece in adapter.layer_slices(layer, *units):
            if any(f is not None and not len(f) for f in (piece.rows, piece.cols)):
                continue  # a removed sub-block's weights: the whole module is replaced below
            saved += _current([(piece.linear, n) for n in ("weight", "bias", "in_features", "out_features")])
            if id(piece.linear) not in replaced:  # a reformed output projection is set whole below
                _slice_linear(piece, saved if views else None)
        for name, linear in projections.items():
            if not kept[name] or linear is None:
                continue
            saved += _current([(linear, "weight"), (linear, "bias")])
            if id(linear) in replaced:
                linear.weight = nn.Parameter(reformed[index, name].to(linear.weight.device), requires_grad=False)
                linear.out_features, linear.in_features = linear.weight.shape
            if reformed and (index, f"{name}_bias") in reformed:
                bias = reformed[index, f"{name}_bias"]
                linear.bias = nn.Parameter(bias.to(linear.weight.device), requires_grad=False)
        for name in (n for n, k in kept.items() if not k):
            saved += _current([(layer, attr) for attr in adapter.sub_block_attributes(name)])
            adapter.remove_sub_block(layer, name, position)
        adapter.configure_layer(layer, keep.shape, position)

    with _kept_layers_only(loaded, subnet, shrink) as model:
        yield model


@contextmanager
def _kept_layers_only(loaded: LoadedModel, subnet: SubNetwork, prepare_layer) -> Iterator[PreTrainedModel]:
    """The bookkeeping both ways of applying share: one sub-network at a time, ``prepare_layer(layer,
    index, position, saved)`` on every kept layer (appending what it changes to ``saved``), the
    removed layers left out of the layer list, and everything put back on exit."""
    model, adapter = loaded.model, loaded.adapter
    if getattr(model, _APPLIED, False):
        raise SlimlmError("a sub-network is already applied to this model; leave its block first")
    subnet.validate(loaded.dims)
    layers, kept = adapter.decoder_layers(model), subnet.kept_layers
    saved = _current(adapter.model_attributes(model))
    stream = layer_stream(model)
    setattr(model, _APPLIED, True)
    try:
        for position, index in enumerate(kept):
            saved += _current(adapter.layer_attributes(layers[index]))
            if stream is None:
                prepare_layer(layers[index], index, position, saved)
            else:  # no weights to slice yet: the change is made each time the layer is read, and undone
                stream.defer(layers[index], functools.partial(prepare_layer, layers[index], index, position))
        adapter.configure_model(model, kept)
        adapter.set_decoder_layers(model, nn.ModuleList(layers[i] for i in kept))
        yield model
    finally:
        if stream is not None:
            stream.clear()
        adapter.set_decoder_layers(model, layers)
        for undo in reversed(saved):
            undo()
        setattr(model, _APPLIED, False)


def _slice_linear(piece: LinearSlice, saved: list | None) -> None:
    """Give a linear the kept rows and columns of its weight; a full range is kept as is (no copy).

    With ``saved`` (a list of undo steps) the kept features are written at the start of the full weight's
    storage in place and the linear gets a contiguous view of them (``_to_front``); without, gathered copies.
    """
    linear = piece.linear
    weight, bias = linear.weight, linear.bias
    for axis, kept in enumerate((piece.rows, piece.cols)):
        if kept is None or len(kept) == weight.shape[axis]:
            continue
        weight = weight.index_select(axis, kept) if saved is None else _to_front(weight, axis, kept, saved)
        if axis == 0 and bias is not None:
            bias = bias.index_select(0, kept) if saved is None else _to_front(bias, 0, kept, saved)
    if weight is not linear.weight:
        linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not linear.bias:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def _to_front(tensor: torch.Tensor, axis: int, kept: torch.Tensor, saved: list) -> torch.Tensor:
    """``tensor``'s entries ``kept`` along ``axis``, in that order, as a contiguous view of the start of its
    storage: the kept slice is written there and the rest after it, in place (the gathers are transient,
    one tensor's worth); how to put them back joins ``saved``. Contiguous, so a model of views runs, and is
    timed, as its extracted copy would be (a narrowed view of the columns would be strided)."""
    if not tensor.is_contiguous():  # every family's weights are, as loaded; its start would not be its first rows
        raise SlimlmError("a weight is not contiguous, so its kept units cannot be viewed in place; apply copies")
    rest = torch.ones(tensor.shape[axis], dtype=torch.bool, device=kept.device)
    rest[kept] = False
    removed = rest.nonzero().squeeze(1)
    flat, size = tensor.data.view(-1), _kept_size(tensor, axis, kept)
    kept_part = tensor.index_select(axis, kept)
    flat[size:] = tensor.index_select(axis, removed).reshape(-1)  # read whole before the kept part is written
    flat[:size] = kept_part.reshape(-1)
    saved.append(functools.partial(_put_back, tensor, axis, kept, removed))
    return flat[:size].view(kept_part.shape)


@torch.no_grad()
def _put_back(tensor: torch.Tensor, axis: int, kept: torch.Tensor, removed: torch.Tensor) -> None:
    """Undo ``_to_front``: the kept and removed slices, stored one after the other, back in their places."""
    flat, shape, size = tensor.data.view(-1), list(tensor.shape), _kept_size(tensor, axis, kept)
    shape[axis] = len(kept)
    whole = torch.empty_like(tensor)
    whole.index_copy_(axis, kept, flat[:size].view(shape))
    shape[axis] = len(removed)
    whole.index_copy_(axis, removed, flat[size:].view(shape))
    tensor.data.copy_(whole)


def _kept_size(tensor: torch.Tensor, axis: int, kept: torch.Tensor) -> int:
    """Elements of ``tensor``'s slice ``kept`` along ``axis``: where the rest starts in its storage."""
    return tensor.numel() // tensor.shape[axis] * len(kept)


@contextmanager
def subnetwork_masked(loaded: LoadedModel, subnet: SubNetwork) -> Iterator[PreTrainedModel]:
    """Within the block, ``loaded.model`` computes ``subnet`` differentiably, by masks on the full weights.

    Removing a query head removes its channels of the attention output projection's input; removing
    a neuron, its channel of the MLP output projection's input; so zeroing those channels computes
    the sub-network exactly, and gradients flow to every kept weight. Removed layers are skipped.
    """
    if layer_stream(loaded.model) is not None:
        raise SlimlmError("training needs the weights in memory: load the model without --stream")
    adapter, head_dim, hooks = loaded.adapter, loaded.dims.head_dim, []

    def mask(layer, index: int, position: int, _saved: list) -> None:
        keep, shape = subnet.layers[index], loaded.dims.layers[index]
        adapter.configure_layer(layer, shape, position)  # full shape; position indexes the cache
        if keep.shape == shape:
            return
        heads = torch.zeros(shape.heads, dtype=torch.bool)
        heads[list(keep.heads)] = True
        neurons = torch.zeros(shape.neurons, dtype=torch.bool)
        neurons[list(keep.neurons)] = True
        o_proj, down_proj = adapter.output_projections(layer)
        hooks.append(o_proj.register_forward_pre_hook(_zero_channels(heads.repeat_interleave(head_dim))))
        hooks.append(down_proj.register_forward_pre_hook(_zero_channels(neurons)))

    try:
        with _kept_layers_only(loaded, subnet, mask) as model:
            yield model
    finally:
        for hook in hooks:
            hook.remove()


def _current(targets: list[tuple[object, str]]) -> list[Callable[[], None]]:
    """Steps that put back the present values of the attributes that exist."""
    return [functools.partial(setattr, obj, name, getattr(obj, name)) for obj, name in targets if hasattr(obj, name)]


def _zero_channels(kept: torch.Tensor):
    def hook(_module, args):
        return (args[0] * kept.to(device=args[0].device, dtype=args[0].dtype), *args[1:])

    return hook
