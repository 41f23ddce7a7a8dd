"""The Llama family as transformers implements it: Llama, Mistral, Qwen2, Qwen3 (and SmolLM, which is Llama).

A decoder layer is ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``. Query head ``h``
is rows ``h*d:(h+1)*d`` of ``q_proj`` and the same columns of ``o_proj``; key/value head ``g`` is
those rows of ``k_proj`` and ``v_proj``; MLP neuron ``j`` is row ``j`` of ``gate_proj`` and
``up_proj`` and column ``j`` of ``down_proj``. Pruning always removes these coupled slices together.
Qwen3's per-head query and key norms (``q_norm``, ``k_norm``) act on each head's ``head_dim``
features with one weight shared by all heads, so they stay whole whichever heads are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from slimlm.models.base import Adapter, CoupledWeight, LayerShape, ModelDims
from slimlm.models.remote import modeling_slimlm as remote


@dataclass(frozen=True)
class Family:
    """A family's classes: the stock config and causal-LM class, and slimlm's heterogeneous pair."""

    stock_config: type[PretrainedConfig]
    stock_model: str  # as config.json's ``architectures`` names it
    slim_config: type[PretrainedConfig]
    slim_model: str  # a class of ``modeling_slimlm``


def _family(stock: type[PretrainedConfig], slim: type[PretrainedConfig]) -> Family:
    """The Llama-layout families name their classes alike: ``XConfig``, ``XForCausalLM``, ``SlimXForCausalLM``."""
    name = stock.__name__.removesuffix("Config")
    return Family(stock, f"{name}ForCausalLM", slim, f"Slim{name}ForCausalLM")


# model_type -> its classes
FAMILIES: dict[str, Family] = {
    "llama": _family(LlamaConfig, remote.SlimLlamaConfig),
    "mistral": _family(MistralConfig, remote.SlimMistralConfig),
    "qwen2": _family(Qwen2Config, remote.SlimQwen2Config),
    "qwen3": _family(Qwen3Config, remote.SlimQwen3Config),
}
SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def head_dim_of(config: PretrainedConfig) -> int:
    """Per-head width; explicit in newer configs, implied by hidden size in older ones."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _has_bias(linear: nn.Linear) -> int:
    return int(linear.bias is not None)


def _head_norm_params(attention: nn.Module) -> int:
    """Qwen3's and Gemma-3's query and key norms: one ``head_dim`` weight each, shared by every head."""
    return sum(getattr(attention, name).weight.numel() for name in ("q_norm", "k_norm") if hasattr(attention, name))


class LlamaFamilyAdapter(Adapter):
    """Adapter for one Llama-layout family (one of ``FAMILIES``, or ``classes`` for a subclass's own)."""

    #: sub-block -> the decoder-layer attributes it owns (its norms, then its module)
    sub_blocks = remote.LLAMA_SUB_BLOCKS
    #: the linears holding a layer's query rows, key/value rows and MLP input rows (one linear may hold
    #: several, fused); an attention or MLP sub-block that has no such linear was removed
    query_linear, key_linear, mlp_input_linear = "q_proj", "k_proj", "gate_proj"

    def __init__(self, family: str, classes: Family | None = None) -> None:
        self.family = family
        self.classes = classes or FAMILIES[family]
        self.architectures = (self.classes.stock_model, self.classes.slim_model)

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.model.layers

    def set_decoder_layers(self, model: PreTrainedModel, layers: nn.ModuleList) -> None:
        model.model.layers = layers

    def dims(self, model: PreTrainedModel) -> ModelDims:
        config = model.config
        head_dim = head_dim_of(config)
        layers = self.decoder_layers(model)
        # bias conventions and norms from the first layer that still has each sub-block
        attn_layer = next(layer for layer in layers if hasattr(layer.self_attn, self.query_linear))
        mlp_layer = next(layer for layer in layers if hasattr(layer.mlp, self.mlp_input_linear))
        attn, mlp = attn_layer.self_attn, mlp_layer.mlp
        query, key = getattr(attn, self.query_linear), getattr(attn, self.key_linear)
        mlp_input = getattr(mlp, self.mlp_input_linear)
        hidden, vocab = config.hidden_size, config.vocab_size
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        embedding = vocab * hidden * (1 if tied else 2)
        return ModelDims(
            family=self.family,
            hidden_size=hidden,
            head_dim=head_dim,
            vocab_size=vocab,
            max_positions=config.max_position_embeddings,
            tied_embeddings=tied,
            layers=tuple(self._layer_shape(layer, head_dim) for layer in layers),
            params_per_head=2 * hidden * head_dim + head_dim * _has_bias(query),
            params_per_kv_head=2 * hidden * head_dim + 2 * head_dim * _has_bias(key),
            params_per_neuron=3 * hidden + 2 * _has_bias(mlp_input),
            params_per_attention=self._norm_params(attn_layer, "attention")
            + hidden * _has_bias(attn.o_proj)
            + _head_norm_params(attn),
            params_per_mlp=self._norm_params(mlp_layer, "mlp") + hidden * _has_bias(mlp.down_proj),
            params_outside_layers=embedding + hidden,
            embedding_params=embedding,
            weights_per_head=2 * hidden * head_dim,
            weights_per_kv_head=2 * hidden * head_dim,
            weights_per_neuron=3 * hidden,
        )

    def _norm_params(self, layer: nn.Module, name: str) -> int:
        """Parameters of the norms the ``name`` sub-block owns (removed with it)."""
        norms = self.sub_blocks[name][:-1]
        return sum(p.numel() for norm in norms for p in getattr(layer, norm).parameters())

    def _layer_shape(self, layer: nn.Module, head_dim: int) -> LayerShape:
        attn, mlp = layer.self_attn, layer.mlp
        attention = hasattr(attn, "q_proj")  # else a removed sub-block (``remote.NoAttention``)
        return LayerShape(
            heads=attn.q_proj.out_features // head_dim if attention else 0,
            kv_heads=attn.k_proj.out_features // head_dim if attention else 0,
            neurons=mlp.gate_proj.out_features if hasattr(mlp, "gate_proj") else 0,
        )

    def coupled_weights(self, layer: nn.Module) -> list[CoupledWeight]:
        attn, mlp = layer.self_attn, layer.mlp
        weights = []
        if hasattr(attn, "q_proj"):  # else the sub-block was removed
            head = attn.head_dim
            weights += [
                CoupledWeight(attn.q_proj, 0, "heads", head),
                CoupledWeight(attn.k_proj, 0, "kv_heads", head),
                CoupledWeight(attn.v_proj, 0, "kv_heads", head),
                CoupledWeight(attn.o_proj, 1, "heads", head),
            ]
        if hasattr(mlp, "gate_proj"):
            weights += [
                CoupledWeight(mlp.gate_proj, 0, "neurons", 1),
                CoupledWeight(mlp.up_proj, 0, "neurons", 1),
                CoupledWeight(mlp.down_proj, 1, "neurons", 1),
            ]
        return weights

    def output_projections(self, layer: nn.Module) -> tuple[nn.Linear | None, nn.Linear | None]:
        return getattr(layer.self_attn, "o_proj", None), getattr(layer.mlp, "down_proj", None)

    def residual_branches(self, layer: nn.Module):
        def attention(hidden: torch.Tensor, **kwargs) -> torch.Tensor:
            return layer.self_attn(layer.input_layernorm(hidden), **kwargs)[0]

        def mlp(hidden: torch.Tensor) -> torch.Tensor:
            return layer.mlp(layer.post_attention_layernorm(hidden))

        return attention, mlp

    def layer_attributes(self, layer: nn.Module) -> list[tuple[object, str]]:
        attn = layer.self_attn
        return [(attn, "num_key_value_groups"), (attn, "layer_idx"), (layer.mlp, "intermediate_size")]

    def configure_layer(self, layer: nn.Module, shape: LayerShape, position: int) -> None:
        layer.self_attn.num_key_value_groups = shape.group_size
        layer.self_attn.layer_idx = position  # the KV cache is indexed by position among kept layers
        layer.mlp.intermediate_size = shape.neurons

    def model_attributes(self, model: PreTrainedModel) -> list[tuple[object, str]]:
        return [(model.config, "num_hidden_layers"), (model.config, "layer_types")]

    def configure_model(self, model: PreTrainedModel, kept_layers: list[int]) -> None:
        config = model.config
        config.num_hidden_layers = len(kept_layers)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in kept_layers]

    def extracted_config(
        self, config: PretrainedConfig, kept_layers: list[int], shapes: list[LayerShape], output_bias: bool = False
    ) -> PretrainedConfig:
        stock, slim, slim_model = self.classes.stock_config, self.classes.slim_config, self.classes.slim_model
        values = config.to_dict()
        for key in ("slimlm_layers", "auto_map", "architectures", "model_type", "transformers_version"):
            values.pop(key, None)
        values["num_hidden_layers"] = len(kept_layers)
        values["head_dim"] = head_dim_of(config)
        if values.get("layer_types") is not None:
            values["layer_types"] = [values["layer_types"][i] for i in kept_layers]
        first = shapes[0]
        if self._stock_expresses(config, shapes) and not output_bias:
            values.update(zip(SHAPE_KEYS, (first.heads, first.kv_heads, first.neurons), strict=True))
            values["architectures"] = [self.classes.stock_model]
            return stock.from_dict(values)
        values["slimlm_output_bias"] = output_bias
        values["slimlm_layers"] = [dict(zip(SHAPE_KEYS, (s.heads, s.kv_heads, s.neurons), strict=True)) for s in shapes]
        values["architectures"] = [slim_model]
        values["auto_map"] = {
            "AutoConfig": f"modeling_slimlm.{slim.__name__}",
            "AutoModelForCausalLM": f"modeling_slimlm.{slim_model}",
        }
        return slim.from_dict(values)

    def _stock_expresses(self, config: PretrainedConfig, shapes: list[LayerShape]) -> bool:
        """Whether the stock config (one shape for every layer) holds a model of these layer shapes."""
        first = shapes[0]
        # Stock configs require hidden_size % num_attention_heads == 0 even with an explicit head_dim.
        return all(s == first for s in shapes) and first.heads > 0 and config.hidden_size % first.heads == 0
