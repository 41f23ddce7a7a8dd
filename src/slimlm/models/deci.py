"""Read back slimlm's own ragged GGUF files: llama.cpp's ``deci`` architecture, which ``export`` writes
for Llama-layout models whose layers differ and which transformers' GGUF loader does not take.

The file's per-layer head, key/value head and MLP counts become slimlm's heterogeneous Llama
(``slimlm_layers``, as extraction writes it); gguf's own code dequantizes the weights, and the query
and key rows go back from llama.cpp's rotary order to transformers'. The tokenizer is built by
transformers from the file's tokenizer keys, handed to it in a tensor-free GGUF of the ``llama``
architecture (the one it reads tokenizers of).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from slimlm.errors import SlimlmError
from slimlm.export import rotary_halves
from slimlm.gguf_tokenizer import copy_tokenizer_keys
from slimlm.models.base import LayerShape

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI]


def load_deci(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a ``deci`` GGUF file, in float32."""
    reader = gguf.GGUFReader(path)
    config = _config(reader)
    with torch.device("meta"):  # every weight comes from the file
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    state = {}
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embedding, tied below
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name not in tensors:
            raise SlimlmError(f"{path.name} has no tensor {name} for {hf_name}")
        data = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).astype(np.float32)
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = rotary_halves(data, config.head_dim)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(data))
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model, _tokenizer(reader)


def _config(reader: gguf.GGUFReader):
    """slimlm's heterogeneous Llama config for the file's hyperparameters and per-layer counts."""
    from slimlm.models import ADAPTERS  # the family registry imports this module's caller

    def value(key: str):
        field = reader.fields.get(f"{ARCH}.{key}")
        if field is None:
            raise SlimlmError(f"the deci GGUF has no {ARCH}.{key}")
        return field.contents()

    layers = value("block_count")

    def each(key: str) -> list[int]:
        counts = value(key)
        return [int(c) for c in counts] if isinstance(counts, list) else [int(counts)] * layers

    heads, kv_heads = each("attention.head_count"), each("attention.head_count_kv")
    neurons = each("feed_forward_length")
    hidden, head_dim = int(value("embedding_length")), int(value("attention.key_length"))
    dense_heads = hidden // head_dim  # the Llama layout: hidden = heads x head size
    groups = max(kv_heads)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    special = {k: reader.fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos")}
    base = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=max(neurons),
        num_hidden_layers=layers,
        num_attention_heads=dense_heads,
        num_key_value_heads=groups if dense_heads % groups == 0 else dense_heads,
        head_dim=head_dim,
        max_position_embeddings=int(value("context_length")),
        rms_norm_eps=float(value("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(value("rope.freq_base"))},
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_token_id=int(special["bos"].contents()),
        eos_token_id=int(special["eos"].contents()),
    )
    shapes = [LayerShape(h, kv, n) for h, kv, n in zip(heads, kv_heads, neurons, strict=True)]
    return ADAPTERS["llama"].extracted_config(base, list(range(layers)), shapes)


def _tokenizer(reader: gguf.GGUFReader) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory(prefix="slimlm-deci-") as folder:
        path = Path(folder) / "tokenizer.gguf"
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        for key in ("block_count", "context_length", "embedding_length", "attention.head_count"):
            field = reader.fields[f"{ARCH}.{key}"]
            counts = field.contents()
            writer.add_uint32(f"llama.{key}", int(max(counts) if isinstance(counts, list) else counts))
        copy_tokenizer_keys(reader, writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
