"""Quantization stacked on a compressed model: GGUF types for llama.cpp, int8 weights for transformers.

Structural pruning and quantization remove different redundancy (whole units against bits per
weight), so they multiply: a model slimlm extracted is quantized like any other. GGUF types go
through ``export_gguf``; ``int8`` writes a transformers folder whose linear weights are int8 with
one scale per output row (torchao's weight-only int8, the optional ``int8`` extra), which loads
with plain ``from_pretrained`` where torchao is installed.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from slimlm import llamacpp
from slimlm.errors import SlimlmError
from slimlm.evaluate import perplexity
from slimlm.export import QUANT_TYPES, check_exportable, export_gguf
from slimlm.extract import folder_bytes
from slimlm.jobs import ALL_QUANT_TYPES, TORCH_QUANT_TYPES  # their home is the torch-free slimlm.jobs
from slimlm.llamacpp import NATIVE_QUANT_TYPES
from slimlm.models import LoadedModel
from slimlm.outputs import refuse_foreign_folder, written_whole

INSTALL_INT8 = "pip install 'slimlm[int8]'"
WEIGHT_FILES = (".safetensors", ".bin", ".index.json")  # name endings of a folder's weight files and their index


def check_quant(loaded: LoadedModel, quant: str, tokenizer_pre: str | None = None) -> None:
    """Refuse, before any slow work, a type ``quantize`` could not write for this model."""
    if quant in TORCH_QUANT_TYPES:
        _require_torchao()
    elif quant in QUANT_TYPES or quant in NATIVE_QUANT_TYPES:
        check_exportable(loaded, quant, tokenizer_pre)
    else:
        raise SlimlmError(f"unknown quantization '{quant}'; choose from {', '.join(ALL_QUANT_TYPES)}")


def quantized_path(folder: str | Path, quant: str) -> Path:
    """Where ``quantize`` writes ``folder`` in ``quant``: ``best.q8_0.gguf`` or ``best-int8/`` beside it."""
    folder = Path(folder)
    if quant in TORCH_QUANT_TYPES:
        return folder.with_name(f"{folder.name}-{quant}")
    return folder.with_name(f"{folder.name}.{quant}.gguf")


def quantize(loaded: LoadedModel, quant: str, tokenizer_pre: str | None = None) -> Path:
    """Write ``loaded`` (loaded from its folder) in ``quant`` beside that folder; return the path written."""
    check_quant(loaded, quant, tokenizer_pre)
    out = quantized_path(loaded.folder, quant)
    if quant in TORCH_QUANT_TYPES:
        return quantize_int8(loaded.folder, out)
    return export_gguf(loaded, out, quant, tokenizer_pre).path


def quantize_int8(folder: str | Path, out: str | Path) -> Path:
    """A transformers folder with int8 linear weights (per-row scales); embeddings and norms stay as they are."""
    _require_torchao()
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    folder, out = Path(folder), refuse_foreign_folder(out, folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()),
        trust_remote_code=False,  # slimlm's own classes are registered in process
    )
    with written_whole(out) as partial:  # a killed run leaves no half folder
        model.save_pretrained(partial)
        for path in folder.iterdir():  # tokenizer, sub-network, slimlm's modeling file: all but the weights
            if path.is_file() and not (partial / path.name).exists() and not path.name.endswith(WEIGHT_FILES):
                shutil.copy(path, partial / path.name)
    return out


def _require_torchao() -> None:
    if importlib.util.find_spec("torchao") is None:
        raise SlimlmError(f"int8 in transformers needs torchao; {INSTALL_INT8}")


def quantized_bytes(path: str | Path) -> int:
    """Bytes on disk of a GGUF file, or of a folder's weight files."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else folder_bytes(path)


def quantized_perplexity(path: str | Path, windows: torch.Tensor) -> float | None:
    """Perplexity of a quantized model on ``windows`` in its own runtime (None: llama.cpp is not installed)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return llamacpp.perplexity(path, windows) if llamacpp.available() else None
    return perplexity(load_folder(path), windows, description=f"perplexity ({path.name})")


def load_folder(folder: str | Path):
    """A transformers model from a folder (int8 or not), with slimlm's modeling file where it has one."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
