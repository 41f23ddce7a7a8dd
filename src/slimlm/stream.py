"""Models larger than memory: each decoder layer's weights are read from the checkpoint only while it runs.

A streamed model is an ordinary transformers model whose decoder layers hold no weights (meta
tensors). A forward pre-hook reads a layer's weights from the folder's safetensors shards when the
layer is called, and a forward hook drops them when it returns. So beside the embeddings, the final
norm and the output head, one layer's weights are resident at a time. Everything that only calls the
model (perplexity, the KL fitness, calibration hooks, reformation's input capture, generation) runs
unchanged. Code that reads a layer's weights outside a forward holds the layer with ``resident``.

A sub-network applied to a streamed model (``slimlm.apply``) cannot slice weights that are not
there: its per-layer change is registered with ``defer`` and made each time the layer is read,
then undone before the weights are dropped.

Reading costs a copy of every layer per forward: from the page cache while the files fit in memory,
from disk when they do not (slower, but it runs).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from slimlm.allocator import memory_first, release
from slimlm.errors import SlimlmError

_STREAM = "_slimlm_stream"
INDEX_FILE = "model.safetensors.index.json"
Prepare = Callable[[list], None]  # makes a layer's change, appending the steps that undo it (callables)


class LayerStream:
    """Reads decoder layers' weights from a folder's safetensors files while they are in use."""

    def __init__(self, folder: Path, model: PreTrainedModel, layers: nn.ModuleList, dtype, device) -> None:
        self.files = _tensor_files(folder)
        self.dtype, self.device = dtype, torch.device(device)  # the layers' weights are read in and onto these
        self.layers = list(layers)
        self.prefix = prefix = next(name for name, module in model.named_modules() if module is layers)
        # per layer: checkpoint name -> name within the layer
        self.names = [{f"{prefix}.{i}.{n}": n for n, _ in layer.named_parameters()} for i, layer in enumerate(layers)]
        missing = [n for names in self.names for n in names if n not in self.files]
        if missing:
            raise SlimlmError(f"cannot stream {folder}: tensor {missing[0]} is not in its safetensors files")
        self._held = [0] * len(layers)
        self._prepares: dict[int, Prepare] = {}
        self._undo: dict[int, list] = {}
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda _m, _a, i=index: self.hold(i))
            layer.register_forward_hook(lambda _m, _a, _o, i=index: self.release(i))

    def hold(self, index: int) -> None:
        """Read layer ``index`` (once however often it is held), then make its deferred change."""
        self._held[index] += 1
        if self._held[index] > 1:
            return
        layer = self.layers[index]
        for name, tensor in self.read(list(self.names[index])).items():
            set_module_tensor_to_device(layer, self.names[index][name], self.device, value=tensor)
        self._undo[index] = []
        if index in self._prepares:
            self._prepares[index](self._undo[index])

    def release(self, index: int) -> None:
        """Undo the deferred change and drop the layer's weights once nobody holds it."""
        self._held[index] -= 1
        if self._held[index]:
            return
        for undo in reversed(self._undo.pop(index, [])):
            undo()
        layer = self.layers[index]
        for local in self.names[index].values():
            set_module_tensor_to_device(layer, local, "meta")
        release()

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors ``names`` from the checkpoint, in the model's dtype."""
        out, by_file = {}, {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, wanted in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                out |= {n: f.get_tensor(n).to(self.dtype) for n in wanted}
        return out

    def defer(self, layer: nn.Module, prepare: Prepare) -> None:
        """Make ``prepare`` each time ``layer`` is read (a sub-network's change to it), until ``clear``."""
        index = self.layers.index(layer)
        if self._held[index]:
            raise SlimlmError("cannot change a streamed layer while it is held")
        self._prepares[index] = prepare

    def clear(self) -> None:
        """Forget every deferred change."""
        self._prepares.clear()


def layer_stream(model: nn.Module) -> LayerStream | None:
    """The stream of a model loaded with ``stream_model``, or None for a model held in memory."""
    return getattr(model, _STREAM, None)


def resident(model: nn.Module, layer: nn.Module):
    """A context in which ``layer``'s weights are in memory (nothing to do for a model held in memory)."""
    stream = layer_stream(model)
    return nullcontext() if stream is None else _held(stream, stream.layers.index(layer))


@contextmanager
def _held(stream: LayerStream, index: int) -> Iterator[None]:
    stream.hold(index)
    try:
        yield
    finally:
        stream.release(index)


def stream_model(folder: Path, config: PretrainedConfig, layers_of, dtype: torch.dtype, device: torch.device):
    """``folder``'s model with every weight outside the decoder layers read, and the layers streamed.

    ``layers_of(model)`` gives the decoder layers' ``ModuleList`` (the family adapter knows where).
    Buffers (rotary frequencies) are computed as usual; only parameters start empty.
    """
    memory_first()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = layers_of(model)
    stream = LayerStream(folder, model, layers, dtype, device)
    layer_names = {n for names in stream.names for n in names}
    outside = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in layer_names]
    for name, tensor in stream.read([n for n in outside if n in stream.files]).items():
        set_module_tensor_to_device(model, name, device, value=tensor)
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta and n not in layer_names]
    if empty:
        raise SlimlmError(f"cannot stream {folder}: tensor {empty[0]} is not in its safetensors files")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    setattr(model, _STREAM, stream)
    return model.eval()


def streamed_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()``'s items in its order; a streamed model's layers are read one at a time
    (with any sub-network applied to them: its kept layers, renumbered, and their sliced weights)."""
    stream = layer_stream(model)
    if stream is None:
        yield from model.state_dict().items()
        return
    layers = model.get_submodule(stream.prefix)  # the kept layers while a sub-network is applied
    inside = f"{stream.prefix}."
    done = False
    for name, tensor in model.state_dict().items():
        if not name.startswith(inside):
            yield name, tensor
        elif not done:  # every layer where the first one stands in the state dict's order
            done = True
            for position, layer in enumerate(layers):
                with _held(stream, stream.layers.index(layer)):  # its prepared (applied) state, read now
                    for local, value in layer.state_dict().items():
                        yield f"{inside}{position}.{local}", value


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Which safetensors file of ``folder`` holds each tensor."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"cannot stream {folder}: it has no safetensors files")
    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            found |= dict.fromkeys(f.keys(), file)
    return found
