"""How much each structural unit matters, measured on calibration text.

One streaming pass over calibration windows (``calibrate``) records, for the input of every
output projection (attention ``o_proj``: head channels; MLP ``down_proj``: neurons), the per-channel
count, sum, sum of squares and the diagonal of the inverse Gram matrix, plus each layer's block
influence. Metrics turn those statistics and the projection's weights into channel scores; a head
scores the sum of its channels, a key/value head the sum of its query heads.

Metrics (``METRICS``; a new one is one function and one registry line):
- ``activation`` (structured Wanda): ‖X_j‖ · ‖W_:,j‖.
- ``magnitude``: ‖W_:,j‖. Misleading on real models: in SmolLM2 the most active layer-0 MLP neurons
  have the smallest weight norms, so it is not the default.
- ``fluctuation`` (FLAP): Var(X_j) · ‖W_:,j‖², the output change a bias could not compensate.
- ``second-order`` (Shen et al., NeurIPS 2024): ‖W_:,j‖² / [(XXᵀ + λI)⁻¹]_jj, the optimal-brain-surgeon
  error of removing column j alone.
- ``reconstruction`` (structured OBS, as ZipLM): the order in which a greedy optimal-brain-surgeon
  pass removes units (``removal_rank``): each step drops the units whose removal, with the remaining
  columns re-fitted, least increases the layer's output error, then updates the weights and the
  inverse Gram matrix as if they were gone. Unlike the one-shot scores it sees that two correlated
  units are redundant together, and it ranks for the reformation that follows. The default:
  benchmarks/unit_selection.py, reformed models on held calibration-source text, 52.1 against
  ``activation``'s 58.0 at 0.7 kept, 33.3 against 34.4 at 0.8, level at 0.9 (26.3 / 26.1).
Layers are scored by block influence, mean 1 − cos(layer input, layer output) (ShortGPT).

``taylor_importance`` (LLM-Pruner) needs gradients, so it is its own pass: per weight |w · ∂L/∂w| of
the calibration loss, summed over every weight coupled to a unit (``Adapter.coupled_weights``), and
the bias entries of its rows (removed with them: Qwen2's and OPT's query, key and value biases).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimlm.cache import cache_root, computed_once
from slimlm.errors import SlimlmError
from slimlm.jobs import DEFAULT_METRIC  # the setting's home is the torch-free slimlm.jobs
from slimlm.models import LoadedModel
from slimlm.progress import track
from slimlm.reform import add_gram, layer_inputs, layer_pass
from slimlm.stream import resident

CALIBRATION_FORMAT = "slimlm.calibration/5"  # in the cache key: a new layout never reads an old entry
IMPORTANCE_FILE = "slimlm_importance.safetensors"  # a trained super-network's unit ranking, in its folder
DAMPING = 0.01  # λ as a fraction of the mean Gram diagonal: keeps the inverse finite on dead channels


@dataclass
class ChannelStats:
    """Streaming statistics of one projection's input channels."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    inverse_gram_diagonal: torch.Tensor
    removal_rank: torch.Tensor  # per channel: the greedy OBS step its unit is removed at (higher: kept longer)

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
    "reconstruction": lambda stats, w: stats.removal_rank,
}


class _Accumulator:
    """Sums of one projection's inputs, fed batch by batch from a forward pre-hook."""

    def __init__(self, width: int, device: torch.device) -> None:  # the activations' device: no copies per batch
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(width, dtype=torch.float64, device=device)
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)

    def __call__(self, _module, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.sumsq += x.pow(2).sum(0, dtype=torch.float64)
        add_gram(self.gram, x)

    def _spend_gram(self) -> torch.Tensor:
        """The Gram matrix, handed over: the accumulator keeps no reference, so it can be freed early."""
        gram, self.gram = self.gram, None
        return gram

    def stats(self, weight: torch.Tensor, group: int) -> ChannelStats:
        """The statistics, with the removal order of ``weight``'s input units of ``group`` channels each."""
        inverse = _damped_inverse(self._spend_gram())
        rank = removal_rank(weight, inverse, group).repeat_interleave(group)
        # on the CPU: a calibration is cached on disk and serves any device. The diagonal is copied out:
        # as a view it would keep the whole inverse alive, in memory and in the cache (650 MB for SmolLM2)
        diagonal = inverse.diagonal().to("cpu", copy=True)
        return ChannelStats(self.count, self.sum.cpu(), self.sumsq.cpu(), diagonal, rank.cpu())


def _damped_factor(gram: torch.Tensor) -> torch.Tensor | None:
    """The Cholesky factor of G + λI, ``gram`` damped in place; None if it is not positive definite even
    damped (rounding), for the general inverse."""
    gram.diagonal().add_(DAMPING * gram.diagonal().mean().clamp_min(1e-12))
    factor, info = torch.linalg.cholesky_ex(gram)
    return None if info else factor


def _damped_inverse(gram: torch.Tensor) -> torch.Tensor:
    """(G + λI)⁻¹ through its Cholesky factor, ``gram`` damped in place and, when the caller holds no other
    reference, freed before the inverse is made: two matrices of its size at a time, not an identity, a
    sum and an LU inverse's copies (170 MB each at width 4608)."""
    factor = _damped_factor(gram)
    if factor is None:
        return torch.linalg.inv(gram)
    del gram
    return torch.cholesky_inverse(factor)


STEPS = 128  # greedy removal steps per projection at most: units leave in chunks beyond that (1536 neurons: 12)


@torch.no_grad()
def removal_rank(weight: torch.Tensor, inverse_gram: torch.Tensor, group: int = 1, steps: int = STEPS) -> torch.Tensor:
    """Greedy structured optimal-brain-surgeon order of ``weight``'s input units (``group`` columns each).

    ``inverse_gram`` is (X Xᵀ + λI)⁻¹ of the projection's inputs X. Removing the columns S of W with
    the rest re-fitted costs tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ) in output error; the cheapest units go, W and
    H⁻¹ are updated to the re-fitted weights and the inverse over the remaining columns, and so on.
    Returns per unit the step it left at (0 first; the last unit standing scores highest), ties within
    a step broken by error.
    """
    w, hinv = weight.detach().double(), inverse_gram.double()
    units = w.shape[1] // group
    chunk = max(1, -(-units // steps))
    device = w.device
    ids = torch.arange(units, device=device)  # the units still standing, in the order of w's and hinv's column groups
    rank = torch.zeros(units, dtype=torch.float64, device=device)
    for step in range(-(-units // chunk)):
        n = len(ids)
        if group == 1:  # single columns (neurons): the blocks are the diagonal
            errors = w.pow(2).sum(dim=0) / hinv.diagonal()
        else:
            blocks = hinv.view(n, group, n, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n, group, group)
            per_unit = w.view(-1, n, group).permute(1, 0, 2)  # (n, out, group)
            errors = (per_unit @ torch.linalg.inv(blocks) * per_unit).sum(dim=(1, 2))
        order = errors.argsort()[:chunk]
        leaving = torch.zeros(n, dtype=torch.bool, device=device)
        leaving[order] = True
        columns = torch.arange(n * group, device=device).view(n, group)
        gone, kept = (columns[mask].reshape(-1) for mask in (leaving, ~leaving))
        within = torch.arange(len(order), dtype=torch.float64, device=device) / chunk  # within a step: by error
        rank[ids[order]] = step + within
        # the remaining columns re-fitted, and the inverse Gram of the remaining columns (Schur complement)
        solve = torch.linalg.inv(hinv[gone][:, gone]) @ hinv[gone][:, kept]
        w = w[:, kept] - w[:, gone] @ solve
        cross = hinv[kept[:, None], gone]
        hinv = hinv[kept[:, None], kept]  # one gather (no row copies); the old inverse is freed before the product
        hinv -= cross @ solve  # in place: at width 4608 each full-size matrix is 170 MB
        ids = ids[~leaving]
    return rank


@torch.no_grad()
def calibrate(loaded: LoadedModel, windows: torch.Tensor, batch_size: int = 4) -> Calibration:
    """``Calibration`` from ``windows``, running the model a layer at a time: one layer's weights (when
    streamed) and Gram matrices in memory at a time, whatever the depth."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    device = loaded.model.device  # where the activations are (a streamed layer's weights are not there yet)
    hidden, kwargs = layer_inputs(loaded, windows, batch_size)
    influence = torch.zeros(len(layers), dtype=torch.float64)
    attention_stats, mlp_stats = [], []
    for i in track(range(len(layers)), "calibrating"):
        with resident(loaded.model, layers[i]):
            o_proj, down_proj = loaded.adapter.output_projections(layers[i])
            attention, mlp = _Accumulator(o_proj.in_features, device), _Accumulator(down_proj.in_features, device)
            out = layer_pass(layers[i], hidden, kwargs[i], {o_proj: attention, down_proj: mlp})
            for before, after in zip(hidden, out, strict=True):  # block influence (ShortGPT)
                influence[i] += float((1 - torch.cosine_similarity(before.double(), after.double(), dim=-1)).sum())
            mlp_stats.append(mlp.stats(down_proj.weight, 1))  # first: its Gram matrix is freed before attention's
            attention_stats.append(attention.stats(o_proj.weight, loaded.dims.head_dim))
        hidden = out
    return Calibration(attention_stats, mlp_stats, influence / windows.numel(), windows.numel())


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
        with resident(loaded.model, layer):
            channel = score(calibration.attention[i], o_proj.weight.double().norm(dim=0).cpu())
            neurons.append(score(calibration.mlp[i], down_proj.weight.double().norm(dim=0).cpu()).float())
        head = channel.view(shape.heads, dims.head_dim).sum(dim=1)
        heads.append(head.float())
        kv_heads.append(head.view(shape.kv_heads, shape.group_size).sum(dim=1).float())
    return Importance(heads, kv_heads, neurons, calibration.block_influence.float())


def activation_importance(loaded: LoadedModel, windows: torch.Tensor, batch_size: int = 4) -> Importance:
    """Calibrate on ``windows`` and score with the activation-aware metric (structured Wanda)."""
    return importance(loaded, calibrate(loaded, windows, batch_size), "activation")


def cached_calibration(loaded: LoadedModel, windows: torch.Tensor, source: str) -> Calibration:
    """``calibrate``, cached on disk per model weights and exact calibration tokens.

    Models not loaded from safetensors files (built in memory) are calibrated without caching.
    """
    path = _cache_path(loaded, windows, source)
    if path is None:
        return calibrate(loaded, windows)
    with computed_once(path):
        return _read_calibration(path) or _write_calibration(path, calibrate(loaded, windows))


def _read_calibration(path: Path) -> Calibration | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        return Calibration(
            [ChannelStats(**s) for s in data["attention"]],
            [ChannelStats(**s) for s in data["mlp"]],
            data["block_influence"],
            data["tokens"],
        )
    except Exception:  # truncated or tampered: a cache miss, rewritten
        path.unlink(missing_ok=True)
        return None


def _write_calibration(path: Path, calibration: Calibration) -> Calibration:
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
    coupled weights and their rows' biases take gradients). A key/value head scores its key and value
    rows plus its query heads. ``layers`` become the layer scores (default: all equal; this pass does
    not score layers).
    """
    model, adapter, dims = loaded.model, loaded.adapter, loaded.dims
    coupled = [adapter.coupled_weights(layer) for layer in adapter.decoder_layers(model)]
    weights = {id(c.linear.weight) for layer in coupled for c in layer}
    weights |= {id(c.linear.bias) for layer in coupled for c in layer if c.axis == 0 and c.linear.bias is not None}
    parameters = list(model.parameters())
    previous = [p.requires_grad for p in parameters]
    for p in parameters:  # gradients for the coupled weights only
        p.requires_grad_(id(p) in weights)
        p.grad = None
    try:
        with torch.enable_grad():
            for window in track(windows.split(1), "taylor scores"):
                window = window.to(model.device)
                (model(input_ids=window, labels=window, use_cache=False).loss / len(windows)).backward()
        sums: list[dict[str, torch.Tensor]] = []
        for layer, shape in zip(coupled, dims.layers, strict=True):
            per_unit: dict[str, torch.Tensor] = {}
            for c in layer:
                score = (c.linear.weight * c.linear.weight.grad).abs().double().sum(dim=1 - c.axis)
                if c.axis == 0 and c.linear.bias is not None:  # a row's bias entry goes with it
                    score = score + (c.linear.bias * c.linear.bias.grad).abs().double()
                score = score.narrow(0, c.offset, getattr(shape, c.unit) * c.width)  # its block of a fused weight
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
