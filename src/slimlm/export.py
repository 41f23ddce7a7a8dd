"""Write a model folder slimlm made as one self-contained GGUF file for llama.cpp.

Layers whose shapes differ are written as llama.cpp's per-layer arrays (``head_count``,
``head_count_kv``, ``feed_forward_length``) of its ``deci`` architecture (the one llama.cpp graph
that sizes every layer on its own), and the key/value head size is written explicitly, because
llama.cpp would otherwise derive it from the first layer's head count. Query and key
rows of Llama-layout models are reordered to llama.cpp's rotary layout (interleaved halves), as
its own converter does. The tokenizer travels in the file (``slimlm.gguf_tokenizer``).

Quantization: the types gguf's Python code can write (``QUANT_TYPES``), and the k-quants, encoded by
ggml itself through llama.cpp's library (``KQUANT_TYPES``; every matrix in the type, the output matrix
in Q6_K, as llama.cpp's quantizer writes them without its per-layer mixes). A matrix whose rows are
not a whole number of blocks stays in f16 (k-quants: llama.cpp's own 32-wide fallback type);
``export_gguf`` returns those names so the caller can say so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch

from slimlm import llamacpp
from slimlm.errors import SlimlmError
from slimlm.gguf_tokenizer import check_tokenizer, write_tokenizer
from slimlm.llamacpp import KQUANT_BLOCK, KQUANT_FALLBACK
from slimlm.stream import streamed_state

if TYPE_CHECKING:
    from slimlm.models import LayerShape, LoadedModel, ModelDims

Q = gguf.GGMLQuantizationType
QUANT_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# ggml's k-quants (llamacpp.NATIVE_QUANT_TYPES), with the nearest llama.cpp mix as the file
# type: its _S mixes write the type throughout and the output matrix in Q6_K, as slimlm does
KQUANT_TYPES = {
    "q4_k": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k": (Q.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_S),
    "q6_k": (Q.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
    "q3_k": (Q.Q3_K, gguf.LlamaFileType.MOSTLY_Q3_K_S),
    "q2_k": (Q.Q2_K, gguf.LlamaFileType.MOSTLY_Q2_K),
}
KQUANT_QTYPES = {qtype for qtype, _ in KQUANT_TYPES.values()}
# slimlm family -> (llama.cpp architecture, query/key rows need llama.cpp's rotary order)
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
    "gemma3_text": (gguf.MODEL_ARCH.GEMMA3, False),
    "phi3": (gguf.MODEL_ARCH.PHI3, False),  # fused attn_qkv and ffn_up, as llama.cpp's converter writes them
}
# llama.cpp's llama graph sizes every layer from the first one; its ``deci`` graph (Llama with
# per-layer head, key/value head and MLP counts, made for Nemotron-51B) reads each layer's own
PER_LAYER_ARCHITECTURES = {gguf.MODEL_ARCH.LLAMA: gguf.MODEL_ARCH.DECI}
# rows that are not whole k-quant blocks (256) take a 32-wide type instead, so MLPs are padded to 32
KQUANT_FALLBACK_BLOCK = 32


@dataclass(frozen=True)
class Exported:
    """A written GGUF file, its size, the matrices kept in f16 because their rows do not fit the blocks,
    and how many zero MLP neurons were added so that the others do."""

    path: Path
    bytes: int
    kept_f16: tuple[str, ...]
    padded_neurons: int = 0


def export_gguf(loaded: LoadedModel, out: str | Path, quant: str = "f16", tokenizer_pre: str | None = None) -> Exported:
    """Write ``loaded`` (any model slimlm loads or extracts) to the GGUF file ``out`` in ``quant``.

    For block-quantized types each layer's MLP is padded with zero neurons to whole blocks (32 wide):
    a pruned width such as 1384 would otherwise leave the down projection, whose rows are that wide,
    in f16. Zero neurons add exactly nothing to the output (their down-projection columns are zero).
    """
    out = Path(out)
    if out.suffix != ".gguf":
        raise SlimlmError(f"the GGUF file name must end in .gguf, got {out.name}")
    check_exportable(loaded, quant, tokenizer_pre)
    if quant in KQUANT_TYPES:
        return _write_gguf(loaded, out, quant, tokenizer_pre, KQUANT_FALLBACK_BLOCK)
    block = gguf.GGML_QUANT_SIZES[QUANT_TYPES[quant][0]][0]
    return _write_gguf(loaded, out, quant, tokenizer_pre, block)


def _write_gguf(loaded: LoadedModel, out: Path, quant: str, tokenizer_pre: str | None, block: int) -> Exported:
    arch, rotary_order = ARCHITECTURES[loaded.dims.family]
    if len(set(loaded.dims.layers)) > 1:
        if arch not in PER_LAYER_ARCHITECTURES:
            raise SlimlmError(
                f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} architecture needs every layer the same shape, and "
                "this model's layers differ; the nearest expressible model is a uniform one (search with --uniform)"
            )
        arch = PER_LAYER_ARCHITECTURES[arch]
    refusal = loaded.adapter.gguf_refusal(loaded.model)
    if refusal is not None:
        raise SlimlmError(refusal)
    qtype, file_type = {**QUANT_TYPES, **KQUANT_TYPES}[quant]
    shapes = _written_shapes(loaded.dims.layers, block, arch)
    widths = [s.neurons for s in shapes]
    partial = out.with_name(out.name + ".part")  # renamed when complete: a killed export leaves no broken .gguf
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch])
    _write_hyperparameters(writer, loaded, file_type, shapes)
    write_tokenizer(writer, loaded.folder, tokenizer_pre)
    kept_f16 = _write_tensors(writer, loaded, arch, rotary_order, qtype, widths)
    kept_f16 += _write_zero_sub_blocks(writer, loaded.dims, shapes, qtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    padded = sum(widths) - sum(s.neurons for s in loaded.dims.layers)
    return Exported(out, out.stat().st_size, tuple(kept_f16), padded)


def runtime_layer_shapes(family: str, layers: list[LayerShape]) -> list[LayerShape]:
    """The layer shapes llama.cpp runs for a model of ``family`` with these kept layers, written in f16."""
    arch = ARCHITECTURES[family][0]
    if len(set(layers)) > 1:
        arch = PER_LAYER_ARCHITECTURES.get(arch, arch)
    return _written_shapes(layers, 1, arch)


def ragged_layers_supported(family: str) -> bool:
    """Whether llama.cpp has a graph for this family with layers of different shapes."""
    return ARCHITECTURES[family][0] in PER_LAYER_ARCHITECTURES


def _written_shapes(layers: list[LayerShape], block: int, arch) -> list[LayerShape]:
    """The layer shapes as written for llama.cpp: each MLP padded with zero neurons to whole blocks, and
    in its Llama graphs two sub-blocks slimlm removed written back as zeros (zero weights add exactly
    nothing): an MLP where a layer keeps its attention (the ``deci`` graph skips the rest of a layer
    without an MLP, its attention included: it was made for layers that have neither), and one
    attention head in an attention-free first layer (llama.cpp takes the head size from the first layer)."""
    padded = [replace(s, neurons=-(-s.neurons // block) * block) for s in layers]
    if arch not in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.DECI):
        return padded
    padded = [replace(s, neurons=block) if s.has_attention and not s.has_mlp else s for s in padded]
    if padded and not padded[0].has_attention:
        padded[0] = replace(padded[0], heads=1, kv_heads=1)
    return padded


def _write_zero_sub_blocks(writer, dims: ModelDims, shapes: list[LayerShape], qtype) -> list[str]:
    """The zero tensors of the sub-blocks ``_written_shapes`` adds (norm weights of one)."""
    hidden, head_dim, kept_f16 = dims.hidden_size, dims.head_dim, []
    for i, (layer, written) in enumerate(zip(dims.layers, shapes, strict=True)):
        tensors = {}
        if written.has_mlp and not layer.has_mlp:
            width = written.neurons
            tensors["ffn_norm"] = np.ones(hidden)
            tensors |= {"ffn_gate": np.zeros((width, hidden)), "ffn_up": np.zeros((width, hidden))}
            tensors["ffn_down"] = np.zeros((hidden, width))
        if written.has_attention and not layer.has_attention:
            tensors["attn_norm"] = np.ones(hidden)
            tensors |= {name: np.zeros((head_dim, hidden)) for name in ("attn_q", "attn_k", "attn_v")}
            tensors["attn_output"] = np.zeros((hidden, head_dim))
        for name, data in tensors.items():
            if _add_tensor(writer, f"blk.{i}.{name}.weight", data, qtype):
                kept_f16.append(f"blk.{i}.{name}.weight")
    return kept_f16


def check_exportable(loaded: LoadedModel, quant: str, tokenizer_pre: str | None = None) -> None:
    """Refuse, before any slow work, what ``export_gguf`` could not write (the layer shapes are checked there)."""
    if quant not in QUANT_TYPES and quant not in KQUANT_TYPES:
        choices = ", ".join([*QUANT_TYPES, *KQUANT_TYPES])
        raise SlimlmError(f"unknown GGUF type '{quant}'; choose from {choices} (the k-quants need llama.cpp)")
    family = loaded.dims.family
    if family not in ARCHITECTURES:  # a family llama.cpp has no graph for says so itself (OPT)
        refusal = loaded.adapter.gguf_refusal(loaded.model)
        raise SlimlmError(
            refusal or f"GGUF export does not support the '{family}' family yet ({', '.join(ARCHITECTURES)})"
        )
    if quant in KQUANT_TYPES:
        llamacpp.require()
    check_tokenizer(loaded.folder, tokenizer_pre)


def _write_hyperparameters(
    writer: gguf.GGUFWriter, loaded: LoadedModel, file_type: int, shapes: list[LayerShape]
) -> None:
    config, dims = loaded.model.config, loaded.dims
    rope = _global_rope(config)
    if rope.get("rope_type", "default") != "default":
        raise SlimlmError(f"GGUF export does not write rope scaling '{rope}' yet")
    heads, kv_heads, widths = [s.heads for s in shapes], [s.kv_heads for s in shapes], [s.neurons for s in shapes]
    writer.add_name(Path(loaded.source).name)
    writer.add_block_count(dims.num_layers)
    writer.add_context_length(dims.max_positions)
    writer.add_embedding_length(dims.hidden_size)
    writer.add_feed_forward_length(_one_or_each(widths))
    writer.add_head_count(_one_or_each(heads))
    writer.add_head_count_kv(_one_or_each(kv_heads))
    writer.add_key_length(dims.head_dim)
    writer.add_value_length(dims.head_dim)
    writer.add_rope_dimension_count(int(dims.head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(dims.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    loaded.adapter.gguf_hyperparameters(writer, loaded.model)


def _global_rope(config) -> dict:
    """The rotary parameters of the full-attention layers (Gemma-3 keeps one set per layer type)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return rope.get("full_attention", rope)


def _one_or_each(values: list[int]) -> int | list[int]:
    """One number when every layer has it (what every GGUF reader expects), else one per layer."""
    return values[0] if len(set(values)) == 1 else values


def _write_tensors(writer, loaded: LoadedModel, arch, rotary_order: bool, qtype, widths: list[int]) -> list[str]:
    dims = loaded.dims
    names = gguf.get_tensor_name_map(arch, dims.num_layers)
    kept_f16 = []
    for hf_name, tensor in streamed_state(loaded.model):  # a streamed model's layers read one at a time
        if hf_name == "lm_head.weight" and dims.tied_embeddings:
            continue  # llama.cpp reads the embedding matrix when there is no output matrix
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SlimlmError(f"no GGUF name for the tensor {hf_name}")
        data = loaded.adapter.gguf_tensor(hf_name, tensor.detach().to("cpu", torch.float32).numpy())
        data = _padded_mlp(hf_name, data, widths)
        if rotary_order and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            data = _interleave_rotary_halves(data, dims.head_dim)
        is_output = name == "output.weight" or (name == "token_embd.weight" and dims.tied_embeddings)
        if _add_tensor(writer, name, data, Q.Q6_K if is_output and qtype in KQUANT_QTYPES else qtype):
            kept_f16.append(name)
    return kept_f16


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype) -> bool:
    """Write ``data`` as ``name`` in ``qtype``; whether it stayed f16 instead (rows not whole blocks)."""
    data, written = _encode(data, qtype)
    writer.add_tensor(name, data, raw_dtype=written)
    return written == Q.F16 and qtype not in (Q.F16, Q.F32)


def _padded_mlp(hf_name: str, data: np.ndarray, widths: list[int]) -> np.ndarray:
    """Gate and up projections get zero rows, the down projection zero columns, up to the layer's width
    (Phi-3's fused gate-and-up projection: each half)."""
    match = re.search(r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj)\.", hf_name)
    if match is None:
        return data
    width, kind = widths[int(match.group(1))], match.group(2)
    if kind == "gate_up_proj":
        return np.concatenate([_zero_padded(half, 0, width) for half in np.split(data, 2)])
    return _zero_padded(data, 1 if kind == "down_proj" else 0, width)


def _zero_padded(data: np.ndarray, axis: int, width: int) -> np.ndarray:
    missing = width - data.shape[axis]
    if missing == 0:
        return data
    pad = [(0, 0)] * data.ndim
    pad[axis] = (0, missing)
    return np.pad(data, pad)


def _interleave_rotary_halves(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Within each head, rows ``[x0..x(d/2-1), y0..]`` become ``[x0, y0, x1, y1, ...]``: transformers
    rotates the two halves of a head, llama.cpp's Llama graph rotates neighbouring pairs."""
    heads = rows.shape[0] // head_dim
    return rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rotary_halves(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """The inverse of ``_interleave_rotary_halves``: llama.cpp's pairs back to transformers' halves."""
    heads = rows.shape[0] // head_dim
    return rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _encode(data: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """``data`` in ``qtype``; vectors stay f32 and matrices whose rows do not fill whole blocks f16."""
    if data.ndim == 1 or qtype == Q.F32:
        return data.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return data.astype(np.float16), Q.F16
    if qtype in KQUANT_QTYPES:  # ggml's own encoders, in llama.cpp's library
        if data.shape[-1] % KQUANT_BLOCK:
            qtype = Q(KQUANT_FALLBACK[qtype])
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            return llamacpp.quantize_rows(data, qtype), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), Q.F16
    return gguf.quants.quantize(data, qtype), qtype
