"""OPT models (``OPTForCausalLM``, model_type ``opt``): facebook/opt-125m up to opt-66b, but not opt-350m.

A decoder layer (``model.decoder.layers[i]``) is ``self_attn.{q,k,v,out}_proj`` and the layer's own
``fc1`` and ``fc2`` (ReLU between, no gate), every linear with a bias, each sub-block behind its
LayerNorm (``self_attn_layer_norm``, ``final_layer_norm``). Attention is plain multi-head: key/value
head ``h`` serves query head ``h`` alone (a GQA group of one), so query head ``h`` is rows
``h*d:(h+1)*d`` of ``q_proj`` (key/value head ``h`` those of ``k_proj`` and ``v_proj``), with their
bias entries, and those columns of ``out_proj``; neuron ``j`` is row ``j`` of ``fc1`` and its bias
entry and column ``j`` of ``fc2``. The output biases of ``out_proj`` and ``fc2`` belong to no unit
and stay (reformation solves the output weights only). Positions are learned embeddings outside the
layers (offset by 2), untouched by pruning.

OPTAttention splits its projections by its own ``num_heads`` (set per pruned layer) and derives its
head size from hidden / heads, so a stock ``OPTConfig`` holds only models keeping every head: one with
fewer heads, even the same in every layer, is slimlm's own (``SlimOPTForCausalLM``).

Refused in one line: opt-350m's layout (``do_layer_norm_before`` false: the norms follow the residual
add, so a layer is not ``h + attention(h)`` then ``+ mlp``) and its projections between a narrower word
embedding and the hidden size (``word_embed_proj_dim``). llama.cpp has no OPT graph, so no GGUF export.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import OPTConfig, PretrainedConfig, PreTrainedModel

from slimlm.models.base import Adapter, CoupledWeight, LayerShape, ModelDims
from slimlm.models.llama import Family
from slimlm.models.remote import modeling_slimlm as remote

MODEL_TYPE = "opt"
CLASSES = Family(OPTConfig, "OPTForCausalLM", remote.SlimOPTConfig, "SlimOPTForCausalLM")
SHAPE_KEYS = ("num_attention_heads", "ffn_dim")  # per layer in slimlm's config (key/value heads = heads)


def _has_bias(linear: nn.Linear) -> int:
    return int(linear.bias is not None)


def _params(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


class OPTAdapter(Adapter):
    """OPT's decoder layers: multi-head attention with biases, an inline ReLU MLP of ``fc1`` and ``fc2``."""

    sub_blocks = remote.OPT_SUB_BLOCKS

    def __init__(self) -> None:
        self.family, self.classes = MODEL_TYPE, CLASSES
        self.architectures = (CLASSES.stock_model, CLASSES.slim_model)

    def config_refusal(self, config: PretrainedConfig) -> str | None:
        if not config.do_layer_norm_before:
            return (
                "slimlm prunes OPT models whose layers normalize before each sub-block; this one normalizes after "
                "the residual add (do_layer_norm_before=false, as opt-350m)"
            )
        if config.word_embed_proj_dim != config.hidden_size:
            return (
                f"slimlm prunes OPT models whose word embeddings are hidden-sized; this one projects "
                f"{config.word_embed_proj_dim} to {config.hidden_size} (word_embed_proj_dim, as opt-350m)"
            )
        return None

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.model.decoder.layers

    def set_decoder_layers(self, model: PreTrainedModel, layers: nn.ModuleList) -> None:
        model.model.decoder.layers = layers

    def dims(self, model: PreTrainedModel) -> ModelDims:
        config, decoder = model.config, model.model.decoder
        hidden, vocab = config.hidden_size, config.vocab_size
        head_dim = hidden // config.num_attention_heads
        layers = self.decoder_layers(model)
        # bias conventions and norms from the first layer that still has each sub-block
        attn_layer = next(layer for layer in layers if hasattr(layer.self_attn, "q_proj"))
        mlp_layer = next(layer for layer in layers if isinstance(layer.fc1, nn.Linear))
        attn = attn_layer.self_attn
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        embedding = vocab * hidden * (1 if tied else 2) + decoder.embed_positions.weight.numel()  # never pruned
        return ModelDims(
            family=self.family,
            hidden_size=hidden,
            head_dim=head_dim,
            vocab_size=vocab,
            max_positions=config.max_position_embeddings,
            tied_embeddings=tied,
            layers=tuple(self._layer_shape(layer, head_dim) for layer in layers),
            params_per_head=2 * hidden * head_dim + head_dim * _has_bias(attn.q_proj),
            params_per_kv_head=2 * hidden * head_dim + 2 * head_dim * _has_bias(attn.k_proj),
            params_per_neuron=2 * hidden + _has_bias(mlp_layer.fc1),
            params_per_attention=_params(attn_layer.self_attn_layer_norm) + hidden * _has_bias(attn.out_proj),
            params_per_mlp=_params(mlp_layer.final_layer_norm) + hidden * _has_bias(mlp_layer.fc2),
            params_outside_layers=embedding + _params(decoder.final_layer_norm),
            embedding_params=embedding,
            weights_per_head=2 * hidden * head_dim,
            weights_per_kv_head=2 * hidden * head_dim,
            weights_per_neuron=2 * hidden,
        )

    def _layer_shape(self, layer: nn.Module, head_dim: int) -> LayerShape:
        attn = layer.self_attn
        heads = attn.q_proj.out_features // head_dim if hasattr(attn, "q_proj") else 0  # else ``remote.NoAttention``
        return LayerShape(heads, heads, layer.fc1.out_features if isinstance(layer.fc1, nn.Linear) else 0)

    def coupled_weights(self, layer: nn.Module) -> list[CoupledWeight]:
        attn, weights = layer.self_attn, []
        if hasattr(attn, "q_proj"):  # else the sub-block was removed
            head = attn.head_dim
            weights += [
                CoupledWeight(attn.q_proj, 0, "heads", head),
                CoupledWeight(attn.k_proj, 0, "kv_heads", head),
                CoupledWeight(attn.v_proj, 0, "kv_heads", head),
                CoupledWeight(attn.out_proj, 1, "heads", head),
            ]
        if isinstance(layer.fc1, nn.Linear):
            weights += [CoupledWeight(layer.fc1, 0, "neurons", 1), CoupledWeight(layer.fc2, 1, "neurons", 1)]
        return weights

    def output_projections(self, layer: nn.Module) -> tuple[nn.Linear | None, nn.Linear | None]:
        fc2 = layer.fc2 if isinstance(layer.fc2, nn.Linear) else None
        return getattr(layer.self_attn, "out_proj", None), fc2

    def residual_branches(self, layer: nn.Module):
        def attention(hidden: torch.Tensor, **kwargs) -> torch.Tensor:
            return layer.self_attn(layer.self_attn_layer_norm(hidden), **kwargs)[0]

        def mlp(hidden: torch.Tensor) -> torch.Tensor:
            return layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))

        return attention, mlp

    def layer_attributes(self, layer: nn.Module) -> list[tuple[object, str]]:
        return [(layer.self_attn, "num_heads"), (layer.self_attn, "layer_idx")]

    def configure_layer(self, layer: nn.Module, shape: LayerShape, position: int) -> None:
        layer.self_attn.num_heads = shape.heads  # OPTAttention splits q, k and v by it
        layer.self_attn.layer_idx = position  # the KV cache is indexed by position among kept layers

    def model_attributes(self, model: PreTrainedModel) -> list[tuple[object, str]]:
        return [(model.config, "num_hidden_layers")]

    def configure_model(self, model: PreTrainedModel, kept_layers: list[int]) -> None:
        model.config.num_hidden_layers = len(kept_layers)

    def extracted_config(
        self, config: PretrainedConfig, kept_layers: list[int], shapes: list[LayerShape], output_bias: bool = False
    ) -> PretrainedConfig:
        values = config.to_dict()
        for key in (
            "slimlm_layers",
            "slimlm_output_bias",
            "auto_map",
            "architectures",
            "model_type",
            "transformers_version",
        ):
            values.pop(key, None)
        values["num_hidden_layers"] = len(kept_layers)
        first = shapes[0]
        # stock OPT: one shape keeping every head (its head size is hidden / heads), biases where it has them
        every_head = first.heads == config.num_attention_heads
        if all(s == first for s in shapes) and every_head and first.has_mlp and (config.enable_bias or not output_bias):
            values["ffn_dim"] = first.neurons
            values["architectures"] = [CLASSES.stock_model]
            return OPTConfig.from_dict(values)
        values["slimlm_output_bias"] = output_bias and not config.enable_bias  # else the biases are there
        values["slimlm_layers"] = [dict(zip(SHAPE_KEYS, (s.heads, s.neurons), strict=True)) for s in shapes]
        values["architectures"] = [CLASSES.slim_model]
        values["auto_map"] = {
            "AutoConfig": f"modeling_slimlm.{CLASSES.slim_config.__name__}",
            "AutoModelForCausalLM": f"modeling_slimlm.{CLASSES.slim_model}",
        }
        return CLASSES.slim_config.from_dict(values)

    def gguf_refusal(self, model: PreTrainedModel) -> str | None:
        return (
            "llama.cpp has no OPT architecture (learned positions, ReLU MLP without a gate), so an OPT model "
            "does not export to GGUF; use the extracted Hugging Face folder"
        )
