"""Decoder models whose layers differ in shape, written by slimlm next to the weights it saves.

This file is copied into every heterogeneous model folder slimlm writes, so it depends on
nothing but torch and transformers: load such a folder with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

The config keeps the parent model's global sizes (so stock validation holds) and adds
``slimlm_layers``: one ``{"num_attention_heads", "num_key_value_heads", "intermediate_size"}``
per decoder layer, and ``slimlm_output_bias`` (biases on the attention and MLP output projections).
Each layer is built by the stock layer class from its own config view.
"""

import copy

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer


class PerLayerShapes:
    """Config mix-in: a per-layer view of the config with that layer's own sizes."""

    def layer_config(self, index):
        view = copy.copy(self)
        for name, value in self.slimlm_layers[index].items():
            setattr(view, name, value)
        return view


def rebuild_layers(model, layer_class):
    """Replace the uniformly built decoder layers with layers of their own shapes."""
    config = model.config
    model.model.layers = nn.ModuleList(layer_class(config.layer_config(i), i) for i in range(config.num_hidden_layers))
    if getattr(config, "slimlm_output_bias", False):  # pruning methods that compensate removed units with a bias
        for layer in model.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if linear.bias is None:
                    linear.bias = nn.Parameter(torch.zeros(linear.out_features))


class SlimLlamaConfig(PerLayerShapes, LlamaConfig):
    model_type = "slimlm_llama"


class SlimLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlimLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        rebuild_layers(self, LlamaDecoderLayer)
        self.post_init()


class SlimMistralConfig(PerLayerShapes, MistralConfig):
    model_type = "slimlm_mistral"


class SlimMistralForCausalLM(MistralForCausalLM):
    config_class = SlimMistralConfig

    def __init__(self, config):
        super().__init__(config)
        rebuild_layers(self, MistralDecoderLayer)
        self.post_init()


class SlimQwen2Config(PerLayerShapes, Qwen2Config):
    model_type = "slimlm_qwen2"


class SlimQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = SlimQwen2Config

    def __init__(self, config):
        super().__init__(config)
        rebuild_layers(self, Qwen2DecoderLayer)
        self.post_init()
