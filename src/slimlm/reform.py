"""Reformation: repair a sub-network's kept weights with calibration data, without training.

Removing heads or neurons removes input columns of the attention and MLP output projections
(``o_proj``, ``down_proj``). "Search for Efficient LLMs" (Shen et al., NeurIPS 2024) uses what was
removed to correct what is kept: for each projection, find Ŵ over the kept columns K that best
reproduces the full layer's output on calibration inputs X,

    min ‖Ŵ X_K − W X‖²   →   Ŵ = W G[:, K] (G[K, K] + λI)⁻¹,   G = X Xᵀ,

a closed-form ridge solution (the paper's ADMM iteration converges to the same point, see
``admm``; the tests check they agree). Inputs are gathered sequentially: each layer sees hidden
states from the already pruned and reformed layers before it (the model as it will run), and only
Gram matrices and one layer's activations are held at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from slimlm.errors import SlimlmError
from slimlm.models import LoadedModel
from slimlm.progress import track
from slimlm.subnet import SubNetwork

DAMPING = 0.01  # λ relative to the mean diagonal of G[K, K]; raised automatically if the solve is unstable
# (layer index, "attention" | "mlp") -> new output-projection weight; "attention_bias" | "mlp_bias" -> its bias
Reformed = dict[tuple[int, str], torch.Tensor]


def solve(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Ŵ over columns ``kept`` minimising ‖Ŵ X_K − W X‖² given G = X Xᵀ (float64 inside)."""
    w, g = weight.double(), gram.double()
    g_kk = g[kept][:, kept]
    scale = g_kk.diagonal().mean().clamp_min(1e-12)
    rhs = w @ g[:, kept]
    for attempt in range(6):  # damping x10 each time the system is too ill-conditioned to trust
        lam = damping * 10**attempt * scale
        factor, info = torch.linalg.cholesky_ex(g_kk + lam * torch.eye(len(kept), dtype=torch.float64))
        if info == 0:
            solution = torch.cholesky_solve(rhs.T, factor).T
            if torch.isfinite(solution).all():
                return solution.to(weight.dtype)
    raise SlimlmError("reformation failed: the calibration Gram matrix is singular even with strong damping")


def admm(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, rho: float = 1.0, iterations: int = 30):
    """The paper's ADMM for the same problem (reference; ``solve`` is the fast path).

    Ŵ = (G + ρI)⁻¹(G Wᵀ + ρ(Z − U)ᵀ); Z = Ŵ + U with pruned columns zeroed; U += Ŵ − Z.
    Returns the kept columns of Z.
    """
    w, g = weight.double(), gram.double()
    d = g.shape[0]
    mask = torch.zeros(d, dtype=torch.bool)
    mask[kept] = True
    inverse = torch.linalg.inv(g + rho * torch.eye(d, dtype=torch.float64))
    z, u = w.clone(), torch.zeros_like(w)
    target = g @ w.T
    for _ in range(iterations):
        w_hat = (inverse @ (target + rho * (z - u).T)).T
        z = (w_hat + u) * mask
        u = u + w_hat - z
    return z[:, kept].to(weight.dtype)


@contextmanager
def _capture_input(linear: torch.nn.Module, store: list[torch.Tensor]) -> Iterator[None]:
    hook = linear.register_forward_pre_hook(lambda _m, args: store.append(args[0].detach()))
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def reform(loaded: LoadedModel, subnet: SubNetwork, windows: torch.Tensor, batch_size: int = 4) -> Reformed:
    """New output-projection weights for every kept layer of ``subnet``, from calibration ``windows``."""
    subnet.validate(loaded.dims)
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    head_dim = loaded.dims.head_dim
    hidden, layer_kwargs = _layer_inputs(loaded, windows, batch_size)
    reformed: Reformed = {}
    for index in track(range(len(layers)), "reforming layers"):
        if index not in subnet.layers:
            continue  # a removed layer passes hidden states through unchanged
        layer, keep = layers[index], subnet.layers[index]
        o_proj, down_proj = adapter.output_projections(layer)
        attention, mlp = adapter.residual_branches(layer)
        heads = torch.tensor(keep.heads)
        head_cols = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        neurons = torch.tensor(keep.neurons)

        inputs: list[torch.Tensor] = []
        with _capture_input(o_proj, inputs):
            for h, kwargs in zip(hidden, layer_kwargs[index], strict=True):
                attention(h, **kwargs)
        reformed[index, "attention"] = w_o = _reform_projection(o_proj, inputs, head_cols)
        hidden = [h + _project(x[..., head_cols], w_o, o_proj.bias) for h, x in zip(hidden, inputs, strict=True)]

        inputs = []
        with _capture_input(down_proj, inputs):
            for h in hidden:
                mlp(h)
        reformed[index, "mlp"] = w_down = _reform_projection(down_proj, inputs, neurons)
        hidden = [h + _project(x[..., neurons], w_down, down_proj.bias) for h, x in zip(hidden, inputs, strict=True)]
    return reformed


def _reform_projection(linear: torch.nn.Linear, inputs: list[torch.Tensor], kept: torch.Tensor) -> torch.Tensor:
    gram = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64)
    for x in inputs:
        flat = x.reshape(-1, x.shape[-1]).float()
        gram += (flat.T @ flat).double()
    if len(kept) == linear.in_features:
        return linear.weight.detach().clone()
    return solve(linear.weight.detach(), gram, kept)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _layer_inputs(loaded: LoadedModel, windows: torch.Tensor, batch_size: int):
    """Hidden states entering the first decoder layer, and the keyword arguments each layer gets.

    Keyword arguments (attention mask, rotary embeddings) are taken per layer: families with
    sliding-window layers give different layers different masks.
    """
    layers = loaded.adapter.decoder_layers(loaded.model)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]
    keys = ("attention_mask", "position_embeddings", "position_ids")

    def capture(index: int):
        def hook(_module, args, layer_kwargs):
            if index == 0:
                hidden.append(args[0].detach())
            kwargs[index].append({k: v for k, v in layer_kwargs.items() if k in keys})

        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in windows.split(batch_size):
            loaded.model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return hidden, kwargs
