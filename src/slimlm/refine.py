"""Layer-wise refinement: the extracted model's kept layers trained, one at a time, to do the dense layers' work.

Reformation (``slimlm.reform``) refits each branch's output projection in closed form: the best linear
repair of what the removed heads and neurons did. What is left is non-linear: the kept query, key, gate
and up projections and the norms could serve the pruned model's inputs better. Here every kept layer of
the extracted model (a real, smaller model) gets a few passes of Adam over the refinement windows (by
default the 128 calibration windows and 128 more past fitness and selection: ``search_windows``), its
output fitted to the dense layer's output on the same input plus a share ``drift`` of the dense
stream's lead (as reformation's target), the error of each token scaled by that token's target size:
early tokens' hidden states are far larger than the rest and would otherwise be all the loss.
Layer by layer, as reformation goes: each layer trains on the states the refined layers before it give,
with a layer's activations on those windows held at a time (as reformation holds them), never
a gradient through more than one layer. A per-layer distillation (as in BESA and LLM-Streamline's
layer replacement), not `slimlm heal`'s distillation of the whole model on its next-token distribution.

Measured on SmolLM2 at 0.9 of its parameters, on the model `slimlm compress` shipped before this stage
(its search's winner, sequentially reformed), with these defaults (4 epochs over 256 windows, Adam from
1e-3 decayed along a cosine): perplexity on 48 later windows of the calibration source 27.52 -> 26.79, on
Pride and Prejudice 27.57 -> 27.00, on pydoc 23.09 -> 22.41; on slimlm's chat prompts the KL to the dense
answers 0.657 -> 0.616 nats per token; 878 s of `compress`'s time on 2 cores (benchmarks/results/compress_09.md).
On the 128 calibration windows alone: 27.07, 27.26, 22.61, 0.639, in 570 s (benchmarks/results/refine_09.md).
Chosen on those 48 held windows (never on Austen or pydoc): first on FLAP's 0.9 sub-network (25.34
reformed): learning rate 1e-4 25.19, 5e-4 25.07 (one layer's error grew 7x), 5e-4 with each token's error
scaled 25.07 (no layer worse), 2e-3 scaled 25.08; then on the winner above, 2 epochs at 5e-4 27.12,
4 epochs 27.09, 4 epochs with the whole drift as target 27.14, 4 epochs from 1e-3 with the cosine 27.07
(the last two layers and the final norm then trained on the KL to the dense model's next-token
distribution, 2 epochs from 1e-4: 27.07, not worth a stage), the same on 256 windows 26.79: the default
(2 epochs on 256 windows: 26.90 in 591 s, benchmarks/results/refine_09_2x256.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from slimlm.evaluate import perplexity
from slimlm.jobs import SearchJob
from slimlm.models import LoadedModel, load_model
from slimlm.progress import quiet_transformers, track
from slimlm.reform import DRIFT, layer_inputs, layer_output

EPOCHS = SearchJob.refine_epochs  # passes over the refinement windows per layer
LEARNING_RATE = 1e-3  # at the first step, decayed to 0 along a cosine by the last


def refine_extracted(
    folder: Path,
    teacher: LoadedModel,
    kept_layers: list[int],
    windows: torch.Tensor,
    selection: torch.Tensor,
    evaluation: torch.Tensor,
    unrefined: float,
    epochs: int = EPOCHS,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict:
    """Refine the model extracted to ``folder`` (``refine``) and write it back only if its perplexity on
    the ``selection`` windows falls below ``unrefined`` (the extracted model's): a refinement that
    overfits its windows is not shipped. Returns what was measured, the refined model's
    perplexity on the ``evaluation`` windows included."""
    small = load_model(folder, dtype, device)
    _share_embeddings(small, teacher)
    errors = refine(small, teacher, kept_layers, windows, epochs=epochs)
    refined = perplexity(small.model, selection, description="perplexity (refined)")
    if refined < unrefined:
        _rewrite_weights(small, Path(folder))
    reduction = [after / before for before, after in errors.values() if before > 0]
    return {
        "epochs": epochs,
        "windows": len(windows),
        "learning_rate": LEARNING_RATE,  # the first step's: Adam's rate then falls along a cosine to 0 by the last
        "schedule": "cosine to 0",
        "selection_perplexity": {"unrefined": unrefined, "refined": refined},
        "kept": refined < unrefined,
        "mean_layer_error_ratio": sum(reduction) / len(reduction) if reduction else None,
        "evaluation_perplexity": perplexity(small.model, evaluation, description="perplexity (refined, evaluation)"),
    }


def _rewrite_weights(student: LoadedModel, folder: Path) -> None:
    """Write ``student``'s weights over ``folder``'s, each file replaced whole: a run killed here leaves
    the unrefined model or the refined one, never a torn file (``--resume`` extracts and refines again)."""
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-refined-"))
    try:
        with quiet_transformers():
            student.model.save_pretrained(scratch)
        for path in scratch.glob("*.safetensors*"):  # the weights, and the index of a sharded model
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _share_embeddings(student: LoadedModel, teacher: LoadedModel) -> None:
    """Point the student's token embedding and output head at the teacher's equal ones: refinement trains
    only decoder layers, and one copy is held instead of two (Gemma 3 270M: 168M of its 268M parameters)."""
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mine, theirs = getattr(student.model, get)(), getattr(teacher.model, get)()
        if mine is not None and theirs is not None and torch.equal(mine.weight, theirs.weight):
            mine.weight = theirs.weight


def refine(
    student: LoadedModel,
    teacher: LoadedModel,
    kept_layers: list[int],
    windows: torch.Tensor,
    epochs: int = EPOCHS,
    learning_rate: float = LEARNING_RATE,
    drift: float = DRIFT,
    batch_size: int = 4,
    seed: int = 0,
) -> dict[int, tuple[float, float]]:
    """Train ``student``'s decoder layers in place (layer k is the teacher's layer ``kept_layers[k]``) to
    reproduce the ``teacher``'s layer outputs on calibration ``windows``, one layer at a time.

    Families whose branches' outputs are normalised before they are added (Gemma 3) fit the local
    target alone, as reformation does (see ``slimlm.reform``).

    Returns each kept layer's fitting error (mean over tokens of the scaled squared error) before and
    after, by its index in the dense model."""
    share = drift if teacher.adapter.branches_add_linearly() else 0.0
    dense_layers = teacher.adapter.decoder_layers(teacher.model)
    small_layers = student.adapter.decoder_layers(student.model)
    position = {index: k for k, index in enumerate(kept_layers)}
    errors = {}
    with torch.no_grad():
        hidden, small_kwargs = layer_inputs(student, windows, batch_size)
        dense, dense_kwargs = layer_inputs(teacher, windows, batch_size)
    for index in track(range(len(dense_layers)), "refining layers"):
        if index not in position:  # a removed layer: the pruned stream passes it unchanged
            _advance(dense_layers[index], dense, dense_kwargs[index])
            continue
        layer, kwargs = small_layers[position[index]], small_kwargs[position[index]]
        targets = _targets(dense_layers[index], hidden, dense, dense_kwargs[index], share)
        before = _error(layer, hidden, kwargs, targets)
        _fit(layer, hidden, kwargs, targets, epochs, learning_rate, torch.Generator().manual_seed(seed + index))
        errors[index] = (before, _advance(layer, hidden, kwargs, targets))
    return errors


@torch.no_grad()
def _targets(dense_layer, hidden: list, dense: list, kwargs: list, share: float) -> list[torch.Tensor]:
    """The dense layer's output on each batch of the pruned stream ``hidden``, moved a ``share`` of the way
    to its output on the dense stream; ``dense`` is advanced past the layer on the way (in place, a batch at
    a time: no second copy of a stream is held)."""
    targets = []
    for b, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
        local = layer_output(dense_layer, h, kw)
        dense[b] = layer_output(dense_layer, dense[b], kw)
        targets.append(local.add_(dense[b] - local, alpha=share))
    return targets


@torch.no_grad()
def _advance(layer, states: list, kwargs: list, targets: list | None = None) -> float | None:
    """Replace each batch of ``states`` by ``layer``'s output on it (in place); with ``targets``, return the
    layer's fitting error on the way (``_error``)."""
    total = 0.0
    for b, kw in enumerate(kwargs):
        states[b] = layer_output(layer, states[b], kw)
        total += 0.0 if targets is None else _batch_error(states[b], targets[b])
    return None if targets is None else total / len(kwargs)


@torch.no_grad()
def _error(layer, hidden: list, kwargs: list, targets: list) -> float:
    """A layer's fitting error: the mean over batches of ``_batch_error`` of its outputs on ``hidden``."""
    total = sum(_batch_error(layer_output(layer, h, kw), t) for h, kw, t in zip(hidden, kwargs, targets, strict=True))
    return total / len(targets)


def _batch_error(output: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error of one batch, each token's scaled by ``_scale``."""
    return ((output.float() - target.float()) * _scale(target)).pow(2).mean().item()


def _scale(target: torch.Tensor) -> torch.Tensor:
    """Each token's weight in the error: one over its target's root mean square."""
    return target.float().pow(2).mean(-1, keepdim=True).add_(1e-6).rsqrt()


def _fit(layer, hidden: list, kwargs: list, targets: list, epochs: int, learning_rate: float, generator) -> None:
    """Adam on every parameter of ``layer`` (in float32, cast back after) for ``epochs`` passes, its
    learning rate decayed along a cosine to 0 at the last step."""
    dtype = next(layer.parameters()).dtype
    layer.float().requires_grad_(True)
    scales = [_scale(t) for t in targets]
    optimizer = torch.optim.Adam(layer.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(hidden))
    with torch.enable_grad():
        for _ in range(epochs):
            for b in torch.randperm(len(hidden), generator=generator).tolist():
                error = (layer_output(layer, hidden[b].float(), _floats(kwargs[b])) - targets[b].float()) * scales[b]
                optimizer.zero_grad(set_to_none=True)
                error.pow(2).mean().backward()
                optimizer.step()
                schedule.step()
    layer.requires_grad_(False).to(dtype)


def _floats(value):
    """``value`` (a layer's keyword arguments, a tuple of rotary tables) with its float tensors in float32."""
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_floats(v) for v in value)
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
