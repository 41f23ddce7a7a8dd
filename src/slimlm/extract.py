"""Write a sub-network as a standalone, smaller Hugging Face model folder.

Uniform sub-networks become a stock config of the same family (plain ``from_pretrained``);
sub-networks whose layers differ get slimlm's ``modeling_slimlm.py`` beside the weights
(``trust_remote_code=True``). Both load without slimlm installed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from slimlm.apply import subnetwork_applied
from slimlm.gguf_tokenizer import TOKENIZER_GGUF, tokenizer_gguf
from slimlm.models import LoadedModel
from slimlm.models.remote import modeling_slimlm
from slimlm.outputs import refuse_foreign_folder, written_whole
from slimlm.progress import quiet_transformers
from slimlm.stream import INDEX_FILE, layer_stream, streamed_state
from slimlm.subnet import SubNetwork, model_record

SUBNET_FILE = "slimlm_subnetwork.json"
REMOTE_CODE_FILE = "modeling_slimlm.py"  # beside the weights of sub-networks whose layers differ


@dataclass(frozen=True)
class Extracted:
    """Where a sub-network was written and how it loads."""

    folder: Path
    needs_remote_code: bool
    params: int


def needs_remote_code(folder: str | Path) -> bool:
    """Whether a model folder loads through slimlm's modeling file (``trust_remote_code=True``)."""
    return (Path(folder) / REMOTE_CODE_FILE).is_file()


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def extract(loaded: LoadedModel, subnet: SubNetwork, out: str | Path, reformed: Mapping | None = None) -> Extracted:
    """Save ``subnet`` of ``loaded`` (with ``reformed`` weights, if given) to ``out`` with its tokenizer.

    ``out`` is replaced whole (see ``outputs.written_whole``); it may not be the input model's folder or
    lie in slimlm's cache. Commands check ``--out`` with ``outputs.check_output_folder`` before any work.
    """
    out = refuse_foreign_folder(out, loaded.folder)
    subnet.validate(loaded.dims)
    output_bias = any(str(key[1]).endswith("_bias") for key in reformed or {})
    config = loaded.adapter.extracted_config(loaded.model.config, subnet.kept_layers, subnet.shapes(), output_bias)
    remote = bool(getattr(config, "auto_map", None))
    record = model_record(loaded.dims, loaded.fingerprint())
    with written_whole(out) as folder:
        with subnetwork_applied(loaded, subnet, reformed) as model:
            write = _write_in_memory if layer_stream(model) is None else _write_streamed
            params = write(model, config, folder)
        with quiet_transformers():
            loaded.tokenizer.save_pretrained(folder)
        subnet.save(folder / SUBNET_FILE, record)
        if (tokenizer := tokenizer_gguf(loaded.folder)) is not None:
            shutil.copy(tokenizer, folder / TOKENIZER_GGUF)
        if remote:
            shutil.copy(modeling_slimlm.__file__, folder / REMOTE_CODE_FILE)
    return Extracted(out, remote, params)


def _write_in_memory(model, config, folder: Path) -> int:
    """The applied sub-network as a model of ``config`` in ``folder`` (``save_pretrained``); its parameters."""
    # the applied model's own tensors, not copies (a model's worth of memory): ``small`` is written before
    # the sub-network is undone
    state = model.state_dict()
    with torch.device("meta"):  # no random init: every weight comes from ``state``
        small = AutoModelForCausalLM.from_config(config, dtype=model.dtype)  # written as loaded
    small.load_state_dict(state, strict=True, assign=True)
    small.tie_weights()
    small.generation_config = model.generation_config
    with quiet_transformers():
        small.save_pretrained(folder)
    return sum(p.numel() for p in {id(p): p for p in small.parameters()}.values())


def _write_streamed(model, config, folder: Path) -> int:
    """The applied sub-network of a streamed model written a layer at a time, as ``save_pretrained``
    shards a large model: a safetensors file per kept layer, one for the rest, and their index. A tied
    output head is written once, as its embedding. Returns the parameters written."""
    inside = f"{layer_stream(model).prefix}."
    total = len(model.get_submodule(inside[:-1])) + 1
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    rest: dict[str, torch.Tensor] = {}
    layer: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    seen: set[int] = set()
    params = 0
    for name, tensor in streamed_state(model):
        if not name.startswith(inside):
            if tensor.data_ptr() not in seen:  # a tied head shares its embedding's storage
                seen.add(tensor.data_ptr())
                rest[name], weight_map[name] = tensor, shard(total, total)
                params += tensor.numel()
            continue
        file = shard(int(name[len(inside) :].split(".")[0]) + 1, total)
        if layer and weight_map[next(iter(layer))] != file:  # the previous layer is complete
            save_file(layer, str(folder / weight_map[next(iter(layer))]), metadata={"format": "pt"})
            layer = {}
        layer[name], weight_map[name] = tensor.contiguous(), file
        params += tensor.numel()
    for tensors in (layer, rest):
        if tensors:
            save_file(tensors, str(folder / weight_map[next(iter(tensors))]), metadata={"format": "pt"})
    index = {"metadata": {"total_size": params * model.dtype.itemsize}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.dtype = model.dtype
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return params
