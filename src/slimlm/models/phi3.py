"""Phi-3 models (``Phi3ForCausalLM``, model_type ``phi3``): Phi-3 mini and medium, Phi-4 mini.

The Llama layout (``LlamaFamilyAdapter``) with fused projections: ``self_attn.qkv_proj`` holds the
query rows of every head, then the key rows, then the value rows (``head_dim`` each), and
``mlp.gate_up_proj`` the gate rows of every neuron, then their up rows. Query head ``h`` is rows
``h*d:(h+1)*d`` of ``qkv_proj`` and those columns of ``o_proj``; key/value head ``g`` is rows
``H*d + g*d ...`` (keys) and ``(H+G)*d + g*d ...`` (values), H query and G key/value heads; neuron
``j`` is rows ``j`` and ``N + j`` of ``gate_up_proj`` and column ``j`` of ``down_proj``. The offsets
of those blocks move with the kept counts, so each is one ``CoupledWeight`` with its ``offset``.

Phi-3's attention splits ``qkv_proj``'s output by ``config.num_attention_heads`` (not by its own
weight's shape), so a pruned layer's attention gets its own view of the config with its own counts;
in an extracted model each layer is built from such a view.

llama.cpp's ``phi3`` graph takes the fused tensors as they are (``attn_qkv``, and ``ffn_up`` halved
into gate and up), with neox rotary order (no reordering of rows). It fixes the attention output to
hidden x hidden: the query heads must fill the hidden size, so only models that keep every query
head export (MLP neurons and whole layers may go); every layer must have one shape. llama.cpp
currently attends over the whole context in Phi-3 (it disables Phi's sliding window), so a model with
a sliding window computes the same in both only on contexts up to that window.
"""

from __future__ import annotations

import copy

import gguf
from torch import nn
from transformers import Phi3Config, PretrainedConfig, PreTrainedModel

from slimlm.models.base import CoupledWeight, LayerShape
from slimlm.models.llama import Family, LlamaFamilyAdapter, head_dim_of
from slimlm.models.remote import modeling_slimlm as remote

MODEL_TYPE = "phi3"
CLASSES = Family(Phi3Config, "Phi3ForCausalLM", remote.SlimPhi3Config, "SlimPhi3ForCausalLM")
LLAMA_CPP_ACTIVATION = "silu"  # llama.cpp's phi3 graph: SwiGLU


class Phi3Adapter(LlamaFamilyAdapter):
    """The Llama-layout adapter for fused ``qkv_proj`` and ``gate_up_proj`` weights."""

    query_linear, key_linear, mlp_input_linear = "qkv_proj", "qkv_proj", "gate_up_proj"

    def __init__(self) -> None:
        super().__init__(MODEL_TYPE, CLASSES)

    def _layer_shape(self, layer: nn.Module, head_dim: int) -> LayerShape:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "qkv_proj"):  # else a removed sub-block (``remote.NoAttention``)
            heads = attn.o_proj.in_features // head_dim
            kv_heads = (attn.qkv_proj.out_features // head_dim - heads) // 2
        else:
            heads = kv_heads = 0
        return LayerShape(heads, kv_heads, mlp.down_proj.in_features if hasattr(mlp, "gate_up_proj") else 0)

    def coupled_weights(self, layer: nn.Module) -> list[CoupledWeight]:
        attn, mlp = layer.self_attn, layer.mlp
        weights = []
        if hasattr(attn, "qkv_proj"):  # else the sub-block was removed
            head = attn.head_dim
            queries = attn.o_proj.in_features  # heads * head_dim: where the key rows start
            keys = (attn.qkv_proj.out_features - queries) // 2
            weights += [
                CoupledWeight(attn.qkv_proj, 0, "heads", head),
                CoupledWeight(attn.qkv_proj, 0, "kv_heads", head, offset=queries),
                CoupledWeight(attn.qkv_proj, 0, "kv_heads", head, offset=queries + keys),
                CoupledWeight(attn.o_proj, 1, "heads", head),
            ]
        if hasattr(mlp, "gate_up_proj"):
            neurons = mlp.down_proj.in_features
            weights += [
                CoupledWeight(mlp.gate_up_proj, 0, "neurons", 1),
                CoupledWeight(mlp.gate_up_proj, 0, "neurons", 1, offset=neurons),
                CoupledWeight(mlp.down_proj, 1, "neurons", 1),
            ]
        return weights

    def layer_attributes(self, layer: nn.Module) -> list[tuple[object, str]]:
        attn = layer.self_attn
        return [
            (attn, "num_key_value_groups"),
            (attn, "num_key_value_heads"),
            (attn, "layer_idx"),
            (attn, "config"),
            (layer.mlp, "config"),
            (layer, "config"),
        ]

    def configure_layer(self, layer: nn.Module, shape: LayerShape, position: int) -> None:
        attn = layer.self_attn
        attn.layer_idx = position  # the KV cache is indexed by position among kept layers
        # the layer's own view of the config: Phi3Attention splits qkv_proj's output by its num_attention_heads
        view = copy.copy(layer.config)
        view.num_attention_heads, view.num_key_value_heads = shape.heads, shape.kv_heads
        view.intermediate_size = shape.neurons
        layer.config = view
        if hasattr(layer.mlp, "config"):  # else a removed MLP sub-block
            layer.mlp.config = view
        if hasattr(attn, "qkv_proj"):  # else a removed attention sub-block
            attn.config = view
            attn.num_key_value_heads, attn.num_key_value_groups = shape.kv_heads, shape.group_size

    def _stock_expresses(self, config: PretrainedConfig, shapes: list[LayerShape]) -> bool:
        # Phi3Config checks longrope factors against hidden_size // num_attention_heads, not head_dim
        rope = getattr(config, "rope_parameters", None) or {}
        factors = rope.get("short_factor") is not None or rope.get("long_factor") is not None
        head_dim = head_dim_of(config)
        return super()._stock_expresses(config, shapes) and (
            not factors or config.hidden_size // shapes[0].heads == head_dim
        )

    def gguf_refusal(self, model: PreTrainedModel) -> str | None:
        config, layers = model.config, self.decoder_layers(model)
        head_dim = head_dim_of(config)
        heads = sorted({self._layer_shape(layer, head_dim).heads for layer in layers})
        full = config.hidden_size // head_dim
        if heads != [full] or full * head_dim != config.hidden_size:
            return (
                f"llama.cpp's phi3 graph fixes the attention output at hidden x hidden ({config.hidden_size}), so "
                f"every layer needs all {full} query heads of {head_dim}, and this model's layers have "
                f"{', '.join(map(str, heads))}; the nearest expressible model keeps every attention head and prunes "
                "only MLP neurons and whole layers"
            )
        if config.hidden_act != LLAMA_CPP_ACTIVATION:
            return f"llama.cpp's phi3 graph gates its MLP with silu, this model with {config.hidden_act}"
        return None

    def gguf_hyperparameters(self, writer: gguf.GGUFWriter, model: PreTrainedModel) -> None:
        config = model.config  # as llama.cpp's converter writes them (0: no sliding window)
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_sliding_window(config.sliding_window or 0)
