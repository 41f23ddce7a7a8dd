"""How much each structural unit matters, measured on calibration text.

Default metric is activation-aware (Wanda-style, structured): a unit's score is the norm of the
activations that flow through it times the norm of the weights that carry them on. Weight
magnitude alone is misleading on real models: in SmolLM2 the most active layer-0 MLP neurons have
the smallest weight norms. Scores come from one streaming pass; only per-channel sums are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.models import LoadedModel
from slimlm.progress import track


@dataclass(frozen=True)
class Importance:
    """Per-layer scores: query heads, key/value heads (sum of their query heads), MLP neurons, layers."""

    heads: list[torch.Tensor]
    kv_heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: torch.Tensor  # block influence: mean 1 - cos(layer input, layer output)


@torch.no_grad()
def activation_importance(loaded: LoadedModel, windows: torch.Tensor, batch_size: int = 4) -> Importance:
    """Score every head, key/value head, neuron and layer of the full model on ``windows``."""
    model, dims = loaded.model, loaded.dims
    layers = loaded.adapter.decoder_layers(model)
    n = len(layers)
    o_sq = [torch.zeros(s.heads * dims.head_dim, dtype=torch.float64) for s in dims.layers]
    down_sq = [torch.zeros(s.neurons, dtype=torch.float64) for s in dims.layers]
    influence = torch.zeros(n, dtype=torch.float64)
    hooks = []

    def accumulate(store: list[torch.Tensor], i: int):
        def hook(_module, args):
            store[i] += args[0].double().pow(2).sum(dim=(0, 1))

        return hook

    def block_influence(i: int):
        def hook(_module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(args[0].double(), out.double(), dim=-1)
            influence[i] += (1 - cos).sum()

        return hook

    outputs = [loaded.adapter.output_projections(layer) for layer in layers]
    for i, (layer, (o_proj, down_proj)) in enumerate(zip(layers, outputs, strict=True)):
        hooks.append(o_proj.register_forward_pre_hook(accumulate(o_sq, i)))
        hooks.append(down_proj.register_forward_pre_hook(accumulate(down_sq, i)))
        hooks.append(layer.register_forward_hook(block_influence(i)))
    try:
        for batch in track(windows.split(batch_size), "scoring importance"):
            model(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    heads, kv_heads, neurons = [], [], []
    for i, (o_proj, down_proj) in enumerate(outputs):
        shape = dims.layers[i]
        channel = o_sq[i].sqrt() * o_proj.weight.double().norm(dim=0)
        head = channel.view(shape.heads, dims.head_dim).sum(dim=1)
        heads.append(head.float())
        kv_heads.append(head.view(shape.kv_heads, shape.group_size).sum(dim=1).float())
        neurons.append((down_sq[i].sqrt() * down_proj.weight.double().norm(dim=0)).float())
    return Importance(heads, kv_heads, neurons, (influence / windows.numel()).float())
