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

Drift correction: the pruned model's residual stream drifts from the dense model's layer after layer.
Each reformed branch is also fitted to undo a share ``drift`` of that drift: its target becomes
W X + drift·R, where R is the dense stream after the branch minus the pruned stream after it (with
the branch unreformed). The dense model runs beside the pruned one for this. Measured on SmolLM2
(FLAP's allocation, reformed on 128 windows, perplexity on 8 held calibration-source windows): 0.9
kept 27.85 (local target damped towards the kept weights) -> 27.55 (share ½); 0.7 kept 51.64 -> 44.32;
undoing all the drift overfits (27.96 at 0.9). Side by side on 2026-12-06: share ½ 27.41 at 0.9 and
43.98 at 0.7, ¼ 27.40 and 44.31.

Families that normalise a branch's output before adding it (Gemma 3) keep the local target. Carrying
R back through the norm to first order (rms(z) R / (1 + g)) was measured on Gemma 3 270M at 0.7 of its
non-embedding parameters: with FLAP's allocation, held perplexity 54.83 -> 39.93 at share ¼ (43.13 at
½); with compress's winner, on short plain prompts the answer's second token (after the first blank line)
matched the dense model's for 0 of 16 prompts (7 without drift; greedy answers looped on ``<strong>``),
and after a paragraph of text for 7 of 16 either way: drift fitted on windows of running text
mis-serves a sequence's first positions.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimlm.errors import SlimlmError
from slimlm.models import LoadedModel
from slimlm.progress import track
from slimlm.stream import resident
from slimlm.subnet import SubNetwork

DAMPING = 0.01  # λ relative to the mean diagonal of G[K, K]; raised automatically if the solve is unstable
DRIFT = 0.5  # share of the residual stream's drift from the dense model each reformed branch is fitted to undo
# (layer index, "attention" | "mlp") -> new output-projection weight; "attention_bias" | "mlp_bias" -> its bias
Reformed = dict[tuple[int, str], torch.Tensor]


def solve(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Ŵ over columns ``kept`` minimising ‖Ŵ X_K − W X‖² given G = X Xᵀ (float64 inside)."""
    columns = gram.double()[:, kept]  # G[:, K]: the only columns of G the solution uses (W G[:, K] and G_KK)
    return ridge(weight.double() @ columns, columns[kept], damping).to(weight.dtype)


GRAM_COLUMNS = 1024  # columns of X Xᵀ made at once: a float32 block, not the whole product twice over


def add_gram(gram: torch.Tensor, x: torch.Tensor, columns: torch.Tensor | None = None) -> None:
    """``gram`` (float64) += X Xᵀ of the rows of ``x`` (any leading shape), or only its ``columns``:
    float32 products (fast), float64 sums (exact enough), a block of columns at a time, so no full-size
    float32 and float64 copies of the product exist (at width 4608: 85 MB and 170 MB)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    right = flat if columns is None else flat[:, columns]
    for start in range(0, right.shape[1], GRAM_COLUMNS):
        block = slice(start, start + GRAM_COLUMNS)
        gram[:, block] += (flat.T @ right[:, block]).double()


def ridge(
    rhs: torch.Tensor,
    gram: torch.Tensor,
    damping: float = DAMPING,
    kept: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The solution Ŵ of Ŵ (G_KK + λI) = ``rhs`` (+ λ ``prior``) for a positive semi-definite ``gram`` G
    (float64), over its rows and columns ``kept`` (all if None): the damping pulls Ŵ towards ``prior``
    (towards zero if None).

    One matrix of the system's size exists at a time: G_KK is gathered, damped and factored in place
    (a copy, a factor and the solver's own copy were three: at width 4608, 170 MB each).
    """
    diagonal = gram.diagonal() if kept is None else gram.diagonal()[kept]
    scale = diagonal.mean().clamp_min(1e-12)
    info = torch.empty((), dtype=torch.int32, device=gram.device)
    for attempt in range(6):  # damping x10 each time the system is too ill-conditioned to trust
        system = gram.clone() if kept is None else gram[kept[:, None], kept]
        system.diagonal().add_(damping * 10**attempt * scale)
        factor = system.mT  # symmetric: its transpose is itself, in the column-major layout LAPACK factors in place
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if info == 0:
            pulled = rhs if prior is None else rhs + damping * 10**attempt * scale * prior
            half = torch.linalg.solve_triangular(factor, pulled.T, upper=False)  # L⁻¹ rhsᵀ
            solution = torch.linalg.solve_triangular(factor.mT, half, upper=True).T  # L⁻ᵀ L⁻¹ rhsᵀ
            if torch.isfinite(solution).all():
                return solution
        del system, factor
    raise SlimlmError("reformation failed: the calibration Gram matrix is singular even with strong damping")


def admm(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, rho: float = 1.0, iterations: int = 30):
    """The paper's ADMM for the same problem (reference; ``solve`` is the fast path).

    Ŵ = (G + ρI)⁻¹(G Wᵀ + ρ(Z − U)ᵀ); Z = Ŵ + U with pruned columns zeroed; U += Ŵ − Z.
    Returns the kept columns of Z.
    """
    w, g = weight.double(), gram.double()
    d = g.shape[0]
    mask = torch.zeros(d, dtype=torch.bool, device=g.device)
    mask[kept] = True
    inverse = torch.linalg.inv(g + rho * torch.eye(d, dtype=torch.float64, device=g.device))
    z, u = w.clone(), torch.zeros_like(w)
    target = g @ w.T
    for _ in range(iterations):
        w_hat = (inverse @ (target + rho * (z - u).T)).T
        z = (w_hat + u) * mask
        u = u + w_hat - z
    return z[:, kept].to(weight.dtype)


@contextmanager
def _capture_input(linear: torch.nn.Module, store: list[torch.Tensor]) -> Iterator[None]:
    """Append ``linear``'s input to ``store`` and stop the forward there (``_Captured``, suppressed):
    the projection's own output is never used, and it was a quarter of reformation's matrix products."""

    def hook(_module, args):
        store.append(args[0].detach())
        raise _Captured

    handle = linear.register_forward_pre_hook(hook)
    try:
        with suppress(_Captured):
            yield
    finally:
        handle.remove()


@torch.no_grad()
def reform(
    loaded: LoadedModel,
    subnet: SubNetwork,
    windows: torch.Tensor,
    batch_size: int = 4,
    damping: float = DAMPING,
    drift: float = DRIFT,
) -> StoredWeights:
    """New output-projection weights for every kept layer of ``subnet``, from calibration ``windows``
    (on disk, read when looked up), each branch fitted to undo a share ``drift`` of the residual stream's
    drift from the dense model (0: its own output alone).

    Families whose branches' outputs are normalised before they are added (Gemma 3) are fitted to the
    local target (drift 0), see the module docstring.

    A branch's kept inputs X_K (a layer's widest activations, up to 192 MB on SmolLM2 at 128 windows) are
    not held from its solve until its new output is added: they are made again from the unchanged hidden
    states. Side by side on SmolLM2 (FLAP's 0.7 non-embedding allocation, 128 windows, one thread each):
    347.7 s against 299.5 s holding them, the same weights; compress in memory peaked at 1458 MB instead
    of 1636 MB on SmolLM2 (Gemma 3 unchanged at 2408 MB; issue 17's target: at most 1.5x the weights plus
    the calibration activations).

    Measured worse or not worth their cost on SmolLM2 (FLAP's 0.8 sub-network, perplexity on Austen,
    16 calibration windows): targets from the dense run's inputs alone (the whole drift, no residual
    term), 44.8 against 35.6; an intercept (a new bias), 35.55, which adds parameters a budget did not
    count. On 2026-12-06 (FLAP's 0.9 sub-network, 128 windows, perplexity 25.34 on 48 later windows of the
    calibration source): refitting each branch's input projections (q, k, v / gate, up: one ridge solve
    from the pruned and dense streams' normalised inputs) to undo a share of the drift, 25.36 at ½ and
    25.44 at 1. Adam on every kept weight of each layer after this (2 epochs, the layer's output fitted
    to the local target plus half the drift), 25.07-25.19 (1.1% at best) for 6 more minutes on 2 cores:
    too slow for every finalist, so it is a stage of its own for the winner (``slimlm.refine``).
    Refitting the final norm's gain to the dense model's final states (diagonal least squares): 25.32-25.33.
    """
    subnet.validate(loaded.dims)
    if not 0 <= drift <= 1:
        raise SlimlmError(f"drift is the share of the stream's drift to undo, between 0 and 1; got {drift:g}")
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    hidden, layer_kwargs = layer_inputs(loaded, windows, batch_size)
    # the dense model's stream, run beside the pruned one (from the same first hidden states)
    dense = [h.clone() for h in hidden] if drift and adapter.branches_add_linearly() else None
    # a model's worth of output projections (SmolLM2 and Gemma 3 at 0.7: 100 MB), written as they are made:
    # not held while the later layers' activations are (nor, streamed, beside the model they need not fit in)
    reformed = SpilledWeights()
    for index in track(range(len(layers)), "reforming layers"):
        if index not in subnet.layers and dense is None:
            continue  # a removed layer passes the pruned model's hidden states through unchanged
        with resident(model, layers[index]):  # a streamed model's layer is read for this
            if index not in subnet.layers:
                dense = layer_pass(layers[index], dense, layer_kwargs[index])
                continue
            weights: Reformed = {}
            hidden, dense = _reform_layer(
                loaded, index, subnet, (hidden, dense), layer_kwargs[index], weights, damping, drift
            )
            reformed.update(weights)
    return reformed


class StoredWeights(Mapping):
    """(layer, "attention" | "mlp") -> a weight in a safetensors file (path, tensor name), read when looked
    up: a streamed model's as its layer is read, so never all at once."""

    def __init__(self, places: dict[tuple[int, str], tuple[Path, str]] | None = None) -> None:
        self.places = places or {}

    def __getitem__(self, place: tuple[int, str]) -> torch.Tensor:
        path, name = self.places[place]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self.places)

    def __len__(self) -> int:
        return len(self.places)


class SpilledWeights(StoredWeights):
    """Reformed weights written to a temporary folder, a safetensors file per layer; the folder goes when
    the mapping does."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="slimlm-reformed-"))
        weakref.finalize(self, shutil.rmtree, self.folder, True)

    def update(self, weights: Reformed) -> None:
        """Write ``weights`` (one layer's) to a file of their own."""
        if not weights:
            return
        path = self.folder / f"part-{len(self.places):05d}.safetensors"
        names = {place: f"{place[0]}.{place[1]}" for place in weights}
        save_file({names[place]: w.contiguous() for place, w in weights.items()}, str(path))
        self.places.update({place: (path, name) for place, name in names.items()})


def spill(weights: Mapping[tuple[int, str], torch.Tensor]) -> StoredWeights:
    """``weights`` kept for later on disk (as they are, if they are there already): a model's worth of
    output projections need not stay in memory while other candidates are reformed."""
    if isinstance(weights, StoredWeights):
        return weights
    stored = SpilledWeights()
    stored.update(dict(weights))
    return stored


def _reform_layer(
    loaded: LoadedModel,
    index: int,
    subnet: SubNetwork,
    streams: tuple[list, list | None],
    kwargs: list,
    reformed: Reformed,
    damping: float,
    drift: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Reform layer ``index``'s output projections into ``reformed``; the pruned and dense hidden states after
    the layer (``streams``' own tensors, updated in place: the states before the layer are not needed again;
    the dense stream is None when no drift is corrected)."""
    adapter, head_dim = loaded.adapter, loaded.dims.head_dim
    layer, keep = adapter.decoder_layers(loaded.model)[index], subnet.layers[index]
    attention, mlp = _branches(adapter, layer)
    heads = torch.tensor(keep.heads, dtype=torch.long)
    head_cols = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    o_proj, down_proj = adapter.output_projections(layer)
    neurons = torch.tensor(keep.neurons, dtype=torch.long)
    branches = (("attention", attention, o_proj, head_cols), ("mlp", mlp, down_proj, neurons))
    hidden, dense = streams
    for name, run, projection, kept in branches:
        # the family's step from the projection's result to the stream (e.g. Gemma-3 normalises it)
        branch = _Branch(run, projection, adapter.branch_output(layer, name))
        if not len(kept):  # a removed sub-block adds nothing to the pruned stream
            if dense is not None:
                _run_dense(branch, dense, kwargs)
            continue
        inputs = _branch_inputs(branch, hidden, dense, kwargs, kept)
        weight = projection.weight.detach()
        undo = inputs.drift if inputs.drift is not None and inputs.drift.any() else None  # none before any pruning
        if undo is None and len(kept) == projection.in_features:
            w = weight.clone()  # every column kept and no drift to undo: the weight is already optimal
        else:
            rhs = weight.double() @ inputs.columns
            if undo is not None:
                rhs += drift * undo
            # with a drift target even a whole projection is refitted: damped towards its own weights, not
            # towards zero (which shrank whole projections: 30.2 against 27.8 on SmolLM2 at 0.9)
            prior = None if undo is None else weight[:, kept].double()
            w = ridge(rhs, inputs.columns[kept], damping, prior=prior).to(weight.dtype)
        reformed[index, name] = w
        branch.add_outputs(hidden, kwargs, kept, w)
    return hidden, dense


class _Branch(NamedTuple):
    """A residual branch as reformation runs it: ``run(hidden, layer_kwargs)``, its output projection, and
    what the family does to the projection's result before adding it to the stream (``branch_output``)."""

    run: Callable[[torch.Tensor, dict], torch.Tensor]
    projection: torch.nn.Linear
    out: Callable[[torch.Tensor], torch.Tensor]

    def projection_input(self, h: torch.Tensor, kw: dict) -> torch.Tensor:
        """What the projection receives when the branch runs on ``h`` (the branch stops there)."""
        captured: list[torch.Tensor] = []
        with _capture_input(self.projection, captured):
            self.run(h, kw)
        return captured[0]

    def added(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """What the branch adds to the stream from projection input ``x`` (with ``weight``, or its own)."""
        w = self.projection.weight if weight is None else weight
        return self.out(_project(x, w, self.projection.bias))

    def add_outputs(self, hidden: list, kwargs: list[dict], kept: torch.Tensor, weight: torch.Tensor) -> None:
        """Add to each batch of ``hidden`` (in place) the branch's output with the new ``weight`` over the
        projection's input columns ``kept``, from inputs made again from ``hidden`` (not changed since they
        were first made): a layer's widest activations are not held between the solve and this."""
        for h, kw in zip(hidden, kwargs, strict=True):
            x = self.projection_input(h, kw)
            h.add_(self.added(x if len(kept) == x.shape[-1] else x[..., kept], weight))

    def dense_step(self, h: torch.Tensor, kw: dict) -> torch.Tensor:
        """What the unpruned, unreformed branch adds to stream ``h`` (the dense model's step)."""
        return self.added(self.projection_input(h, kw))


@dataclass
class _BranchInputs:
    """What a branch's output projection receives on the calibration batches, as its solve needs it."""

    columns: torch.Tensor | None  # G[:, K] (float64), None when every column is kept and no drift is undone
    drift: torch.Tensor | None  # R X_Kᵀ (float64): the stream's drift after the branch against the kept inputs


def _branch_inputs(
    branch: _Branch, hidden: list, dense: list | None, kwargs: list[dict], kept: torch.Tensor
) -> _BranchInputs:
    """``_BranchInputs`` of ``branch``'s projection on each batch of ``hidden``; where the ``dense`` stream
    is given, it is advanced past the branch on the way (in place).
    The removed columns enter G[:, K] and are dropped: the widest activations of a layer are a projection's
    inputs, and the removed share of them is what a sub-network saves."""
    projection = branch.projection
    full = len(kept) == projection.in_features and dense is None
    width, device = projection.in_features, projection.weight.device
    columns = None if full else torch.zeros(width, len(kept), dtype=torch.float64, device=device)
    drift = (
        None if dense is None else torch.zeros(projection.out_features, len(kept), dtype=torch.float64, device=device)
    )
    for batch, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
        x = branch.projection_input(h, kw)
        if columns is not None:
            add_gram(columns, x, kept)
        if drift is not None:  # R = (dense stream + its branch output) - (pruned stream + its branch output)
            d = dense[batch]
            after = branch.dense_step(d, kw)
            residual = (d - h) + (after - branch.added(x))  # exact 0 where the streams are alike
            _add_cross(drift, residual, x[..., kept])
            d.add_(after)
    return _BranchInputs(columns, drift)


def _run_dense(branch: _Branch, dense: list[torch.Tensor], kwargs: list[dict]) -> None:
    """Advance the dense stream past a branch the pruned model no longer has (in place)."""
    for d, kw in zip(dense, kwargs, strict=True):
        d.add_(branch.dense_step(d, kw))


def _add_cross(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``total`` (float64) += Lᵀ R over the rows of ``left`` and ``right`` (any leading shape)."""
    total += (left.reshape(-1, left.shape[-1]).float().T @ right.reshape(-1, right.shape[-1]).float()).double()


def layer_pass(layer: torch.nn.Module, hidden: list, kwargs: list, pre_hooks: dict | None = None) -> list:
    """One decoder layer run on its own on every batch of ``hidden`` (with ``layer_inputs``' keyword
    arguments), ``pre_hooks`` (module -> forward pre-hook) seeing its modules' inputs; its outputs."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in (pre_hooks or {}).items()]
    try:
        out = (layer_output(layer, h, kw) for h, kw in zip(hidden, kwargs, strict=True))
        return stacked(out, _sizes(hidden))
    finally:
        for handle in handles:
            handle.remove()


def layer_output(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder layer's output states on ``hidden`` (families return them alone or first)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def stacked(batches: Iterable[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """Batches made one at a time (of ``sizes`` rows each), written into one tensor as they come:
    returned as views of it.

    A layer's activations on the calibration windows, held as a list of batch-sized tensors of a few
    MB, sit on glibc's malloc heap between shorter-lived ones and leave holes it keeps when freed
    (measured on SmolLM2 with 128 windows: reformation grew the resident size by 730 MB for some
    350 MB alive). One tensor that large is mapped on its own and given back whole when freed, and
    each batch's temporaries reuse the last batch's place on the heap.
    """
    whole, offset = None, 0
    for batch, size in zip(batches, sizes, strict=True):
        if whole is None:
            whole = batch.new_empty((sum(sizes), *batch.shape[1:]))
        whole[offset : offset + size] = batch
        offset += size
    return [] if whole is None else list(whole.split(sizes))


def _sizes(batches: list[torch.Tensor]) -> list[int]:
    return [len(b) for b in batches]


def _branches(adapter, layer):
    """The layer's attention and MLP residual branches, both called as ``branch(hidden, layer_kwargs)``."""
    attention, mlp = adapter.residual_branches(layer)
    return (lambda h, kw: attention(h, **kw)), (lambda h, _kw: mlp(h))


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


class _Captured(Exception):
    """Raised once a forward has given what it was run for (a layer's or a projection's input): the rest
    of it is not needed."""


class _PassThrough(torch.nn.Module):
    """A decoder layer's stand-in that returns its input: the model around it still builds every layer's
    keyword arguments (masks per layer type, rotary embeddings), from the attributes it reads off the layer."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its weights are not this module's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
        return hidden_states


def _shared(value, seen: list[torch.Tensor]):
    """``value`` (a tensor, a tuple of them, or anything else) with each tensor replaced by an equal one in
    ``seen`` where there is one (and added to ``seen`` where there is not)."""
    if isinstance(value, tuple):
        return tuple(_shared(v, seen) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    for known in seen:
        if known.shape == value.shape and known.dtype == value.dtype and torch.equal(known, value):
            return known
    seen.append(value)
    return value


@torch.no_grad()
def layer_inputs(loaded: LoadedModel, windows: torch.Tensor, batch_size: int):
    """Hidden states entering the first decoder layer (per batch of ``windows``), and the keyword
    arguments each layer gets (per layer, per batch): what running the model a layer at a time needs.

    Keyword arguments (attention mask, rotary embeddings) are taken per layer: families with
    sliding-window layers give different layers different masks. Every batch's are alike (the same
    positions, no padding), so they are held once, not once per batch (Gemma 3 270M, 128 windows:
    31 MB less held through reformation, counted over live tensors).
    """
    adapter, model = loaded.adapter, loaded.model
    layers = adapter.decoder_layers(model)
    hidden: list[torch.Tensor] = []  # per batch, views of one tensor written as the batches come (``stacked``)
    kwargs: list[list[dict]] = [[] for _ in layers]
    keys = ("attention_mask", "position_embeddings", "position_ids")
    seen: list[torch.Tensor] = []

    def capture(index: int):
        def hook(_module, args, layer_kwargs):
            if index == 0:
                if not hidden:
                    hidden.extend(args[0].new_empty((len(windows), *args[0].shape[1:])).split(batch_size))
                hidden[len(kwargs[0])].copy_(args[0])
            kwargs[index].append({k: _shared(v, seen) for k, v in layer_kwargs.items() if k in keys})
            if index == len(layers) - 1:
                raise _Captured  # nothing after the last layer is needed: no norm, no output head

        return hook

    stand_ins = torch.nn.ModuleList(_PassThrough(layer) for layer in layers)  # no layer computes (or is read)
    for i, stand_in in enumerate(stand_ins):
        stand_in.register_forward_pre_hook(capture(i), with_kwargs=True)
    adapter.set_decoder_layers(model, stand_ins)
    try:
        for batch in windows.split(batch_size):
            with suppress(_Captured):
                model(input_ids=batch.to(model.device), use_cache=False)
    finally:
        adapter.set_decoder_layers(model, layers)
    return hidden, kwargs
