"""How much each structural unit matters, measured on calibration text.

One streaming pass over calibration windows (``calibrate``) records, for the input of every
output projection (attention ``o_proj``: head channels; MLP ``down_proj``: neurons), the per-channel
count, sum, sum of squares and the diagonal of the inverse Gram matrix, plus each layer's block
influence. Metrics turn those statistics and the projection's weights into channel scores; a head
scores the sum of its channels, a key/value head the sum of its query heads.

Metrics (``METRICS``; a new one is one function and one registry line):
- ``activation`` (default; structured Wanda): ‖X_j‖ · ‖W_:,j‖.
- ``magnitude``: ‖W_:,j‖. Misleading on real models: in SmolLM2 the most active layer-0 MLP neurons
  have the smallest weight norms, so it is not the default.
- ``fluctuation`` (FLAP): Var(X_j) · ‖W_:,j‖², the output change a bias could not compensate.
- ``second-order`` (Shen et al., NeurIPS 2024): ‖W_:,j‖² / [(XXᵀ + λI)⁻¹]_jj, the optimal-brain-surgeon
  error of removing column j.
Layers are scored by block influence, mean 1 − cos(layer input, layer output) (ShortGPT).

``taylor_importance`` (LLM-Pruner) needs gradients, so it is its own pass: per weight |w · ∂L/∂w| of
the calibration loss, summed over every weight coupled to a unit (``Adapter.coupled_weights``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimlm.cache import cache_root
from slimlm.errors import SlimlmError
from slimlm.models import LoadedModel
from slimlm.progress import track

CALIBRATION_FORMAT = "slimlm.calibration/2"  # in the cache key: a new layout never reads an old entry
IMPORTANCE_FILE = "slimlm_importance.safetensors"  # a trained super-network's unit ranking, in its folder
DAMPING = 0.01  # λ as a fraction of the mean Gram diagonal: keeps the inverse finite on dead channels


@dataclass
class ChannelStats:
    """Streaming statistics of one projection's input channels."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    inverse_gram_diagonal: torch.Tensor

    @property
    def norm(self) -> torch.Tensor:
        return self.sumsq.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return (self.sumsq / self.count - mean**2).clamp_min(0) * self.count / max(self.count - 1, 1)


@dataclass
class Calibration:
    """Everything importance needs from calibration text, per decoder layer of the full model."""

    attention: list[ChannelStats]  # inputs of the attention output projection (head channels)
    mlp: list[ChannelStats]  # inputs of the MLP output projection (neurons)
    block_influence: torch.Tensor
    tokens: int


@dataclass(frozen=True)
class Importance:
    """Per-layer scores: query heads, key/value heads (sum of their query heads), MLP neurons, layers."""

    heads: list[torch.Tensor]
    kv_heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: torch.Tensor


Metric = Callable[[ChannelStats, torch.Tensor], torch.Tensor]  # (input stats, weight column norms) -> score

METRICS: dict[str, Metric] = {
    "activation": lambda stats, w: stats.norm * w,
    "magnitude": lambda stats, w: w,
    "fluctuation": lambda stats, w: stats.variance * w**2,
    "second-order": lambda stats, w: w**2 / stats.inverse_gram_diagonal,
}
DEFAULT_METRIC = "activation"


class _Accumulator:
    """Sums of one projection's inputs, fed batch by batch from a forward pre-hook."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sumsq = torch.zeros(width, dtype=torch.float64)
        self.gram = torch.zeros(width, width, dtype=torch.float64)

    def __call__(self, _module, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.sumsq += x.pow(2).sum(0, dtype=torch.float64)
        self.gram += (x.T @ x).double()  # float32 matmul per batch (fast); float64 running sum (exact enough)

    def stats(self) -> ChannelStats:
        damping = DAMPING * self.gram.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(self.gram.shape[0], dtype=torch.float64)
        inverse = torch.linalg.inv(self.gram + damping * eye)
        return ChannelStats(self.count, self.sum, self.sumsq, inverse.diagonal().clone())


@torch.no_grad()
def calibrate(loaded: LoadedModel, windows: torch.Tensor, batch_size: int = 4) -> Calibration:
    """One streaming pass over ``windows`` through the full model, collecting ``Calibration``."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    projections = [loaded.adapter.output_projections(layer) for layer in layers]
    attention = [_Accumulator(o.in_features) for o, _ in projections]
    mlp = [_Accumulator(d.in_features) for _, d in projections]
    influence = torch.zeros(len(layers), dtype=torch.float64)

    def block_influence(i: int):
        def hook(_module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            influence[i] += (1 - torch.cosine_similarity(args[0].double(), out.double(), dim=-1)).sum()

        return hook

    hooks = []
    for i, (layer, (o_proj, down_proj)) in enumerate(zip(layers, projections, strict=True)):
        hooks += [
            o_proj.register_forward_pre_hook(attention[i]),
            down_proj.register_forward_pre_hook(mlp[i]),
            layer.register_forward_hook(block_influence(i)),
        ]
    try:
        for batch in track(windows.split(batch_size), "calibrating"):
            loaded.model(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return Calibration(
        [a.stats() for a in attention], [m.stats() for m in mlp], influence / windows.numel(), windows.numel()
    )


@torch.no_grad()
def importance(loaded: LoadedModel, calibration: Calibration, metric: str = DEFAULT_METRIC) -> Importance:
    """Score every unit of the full model with ``metric`` (see ``METRICS``)."""
    if metric not in METRICS:
        raise SlimlmError(f"unknown importance metric '{metric}'; choose from {', '.join(METRICS)}")
    score = METRICS[metric]
    dims = loaded.dims
    heads, kv_heads, neurons = [], [], []
    for i, layer in enumerate(loaded.adapter.decoder_layers(loaded.model)):
        o_proj, down_proj = loaded.adapter.output_projections(layer)
        shape = dims.layers[i]
        channel = score(calibration.attention[i], o_proj.weight.double().norm(dim=0))
        head = channel.view(shape.heads, dims.head_dim).sum(dim=1)
        heads.append(head.float())
        kv_heads.append(head.view(shape.kv_heads, shape.group_size).sum(dim=1).float())
        neurons.append(score(calibration.mlp[i], down_proj.weight.double().norm(dim=0)).float())
    return Importance(heads, kv_heads, neurons, calibration.block_influence.float())


def activation_importance(loaded: LoadedModel, windows: torch.Tensor, batch_size: int = 4) -> Importance:
    """Calibrate on ``windows`` and score with the default, activation-aware metric."""
    return importance(loaded, calibrate(loaded, windows, batch_size))


def cached_calibration(loaded: LoadedModel, windows: torch.Tensor, source: str) -> Calibration:
    """``calibrate``, cached on disk per model weights and exact calibration tokens.

    Models not loaded from safetensors files (built in memory) are calibrated without caching.
    """
    path = _cache_path(loaded, windows, source)
    if path is None:
        return calibrate(loaded, windows)
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            return Calibration(
                [ChannelStats(**s) for s in data["attention"]],
                [ChannelStats(**s) for s in data["mlp"]],
                data["block_influence"],
                data["tokens"],
            )
        except Exception:  # truncated or tampered: a cache miss, rewritten below
            path.unlink(missing_ok=True)
    calibration = calibrate(loaded, windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    as_dicts = [
        [{f.name: getattr(s, f.name) for f in fields(s)} for s in side]
        for side in (calibration.attention, calibration.mlp)
    ]
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "attention": as_dicts[0],
            "mlp": as_dicts[1],
            "block_influence": calibration.block_influence,
            "tokens": calibration.tokens,
        },
        tmp,
    )
    tmp.rename(path)  # atomic: a killed run leaves no half-written cache entry
    return calibration


def _cache_path(loaded: LoadedModel, windows: torch.Tensor, source: str) -> Path | None:
    """Keyed on the weights' content and the exact tokens (never on file paths or times)."""
    if not any(Path(loaded.folder).glob("*.safetensors")):
        return None
    digest = hashlib.sha256(f"{CALIBRATION_FORMAT}|{loaded.fingerprint()}|{source}".encode())
    digest.update(windows.numpy().tobytes())
    return cache_root() / "calibration" / f"{digest.hexdigest()[:16]}.pt"


def taylor_importance(loaded: LoadedModel, windows: torch.Tensor, layers: torch.Tensor | None = None) -> Importance:
    """First-order Taylor importance (LLM-Pruner, element-wise): Σ |w · ∂L/∂w| over each unit's coupled weights.

    L is the mean language-modelling loss over ``windows`` (one backward pass per window; only the
    coupled weights take gradients). A key/value head scores its key and value rows plus its query
    heads. ``layers`` become the layer scores (default: all equal; this pass does not score layers).
    """
    model, adapter, dims = loaded.model, loaded.adapter, loaded.dims
    coupled = [adapter.coupled_weights(layer) for layer in adapter.decoder_layers(model)]
    weights = {id(c.linear.weight) for layer in coupled for c in layer}
    parameters = list(model.parameters())
    previous = [p.requires_grad for p in parameters]
    for p in parameters:  # gradients for the coupled weights only
        p.requires_grad_(id(p) in weights)
        p.grad = None
    try:
        with torch.enable_grad():
            for window in track(windows.split(1), "taylor scores"):
                (model(input_ids=window, labels=window, use_cache=False).loss / len(windows)).backward()
        sums: list[dict[str, torch.Tensor]] = []
        for layer in coupled:
            per_unit: dict[str, torch.Tensor] = {}
            for c in layer:
                score = (c.linear.weight * c.linear.weight.grad).abs().double().sum(dim=1 - c.axis)
                score = score.view(-1, c.width).sum(dim=1)
                per_unit[c.unit] = per_unit.get(c.unit, 0) + score
            sums.append(per_unit)
    finally:
        for p, needed in zip(parameters, previous, strict=True):
            p.grad = None
            p.requires_grad_(needed)
    heads = [s["heads"].float() for s in sums]
    kv_heads = [
        (s["kv_heads"] + s["heads"].view(shape.kv_heads, shape.group_size).sum(dim=1)).float()
        for s, shape in zip(sums, dims.layers, strict=True)
    ]
    neurons = [s["neurons"].float() for s in sums]
    return Importance(heads, kv_heads, neurons, torch.ones(dims.num_layers) if layers is None else layers)


def save_importance(scores: Importance, path: Path) -> None:
    """Write a unit ranking (per-layer head, key/value head, neuron and layer scores) as safetensors."""
    tensors = {"layers": scores.layers.contiguous()}
    for name in ("heads", "kv_heads", "neurons"):
        tensors |= {f"{name}.{i}": t.contiguous() for i, t in enumerate(getattr(scores, name))}
    save_file(tensors, str(path))


def load_importance(path: Path) -> Importance:
    """The unit ranking ``save_importance`` wrote."""
    tensors = load_file(str(path))
    count = len(tensors["layers"])
    return Importance(
        *([tensors[f"{name}.{i}"] for i in range(count)] for name in ("heads", "kv_heads", "neurons")),
        tensors["layers"],
    )
