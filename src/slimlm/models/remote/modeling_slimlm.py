"""Decoder models whose layers differ in shape, written by slimlm next to the weights it saves.

This file is copied into every heterogeneous model folder slimlm writes, so it depends on
nothing but torch and transformers: load such a folder with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

The config keeps the parent model's global sizes (so stock validation holds) and adds
``slimlm_layers``: one ``{"num_attention_heads", "num_key_value_heads", "intermediate_size"}``
per decoder layer, and ``slimlm_output_bias`` (biases on the attention and MLP output projections).
Each layer is built by the stock layer class from its own config view. A layer with 0 attention
heads has no attention sub-block, one with intermediate size 0 no MLP: the branch adds nothing
to the residual stream and has no weights, its norms included (the one before the branch, and in
Gemma-3 the one after it too). Phi-3's attention reads its head count from its config: each layer's
own view gives it that layer's. OPT's attention derives its head size from hidden / heads, so its
layers are built whole and their projections then resized (``build_opt_layer``).
"""

import copy

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.opt.modeling_opt import OPTDecoderLayer
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer


class NoAttention(nn.Module):
    """A removed attention sub-block: adds nothing to the residual stream.

    It still records zero-head keys in a KV cache, so the cache's length stays right when the
    first layer is one of these (transformers reads the sequence length from layer 0's cache).
    """

    def __init__(self, layer_idx, head_dim):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            batch, length = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class NoMLP(nn.Module):
    """A removed MLP sub-block: adds nothing to the residual stream."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


# sub-block -> the attributes of a decoder layer it owns: its norms, then its module (last)
LLAMA_SUB_BLOCKS = {"attention": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")}
# OPT's MLP is the layer's own fc1 and fc2: fc1 becomes the identity (as the norm does) and fc2 the zero
OPT_SUB_BLOCKS = {"attention": ("self_attn_layer_norm", "self_attn"), "mlp": ("final_layer_norm", "fc1", "fc2")}
# Gemma-3 also normalizes each branch's output before the residual add
GEMMA3_SUB_BLOCKS = {
    "attention": ("input_layernorm", "post_attention_layernorm", "self_attn"),
    "mlp": ("pre_feedforward_layernorm", "post_feedforward_layernorm", "mlp"),
}


def remove_sub_block(layer, name, layer_idx, head_dim, sub_blocks=LLAMA_SUB_BLOCKS):
    """Replace a layer's attention or MLP sub-block (and its norms) by one that adds nothing: every
    attribute but the last becomes the identity, the last the sub-block that adds zero."""
    *norms, module = sub_blocks[name]
    for norm in norms:
        setattr(layer, norm, nn.Identity())
    setattr(layer, module, NoAttention(layer_idx, head_dim) if name == "attention" else NoMLP())


class PerLayerShapes:
    """Config mix-in: a per-layer view of the config with that layer's own sizes."""

    def layer_config(self, index):
        view = copy.copy(self)
        for name, value in self.slimlm_layers[index].items():
            setattr(view, name, value)
        return view


def build_layer(config, layer_class, index, sub_blocks=LLAMA_SUB_BLOCKS):
    """Decoder layer ``index`` at its own shape, its removed sub-blocks replaced."""
    view = config.layer_config(index)
    attention, mlp = view.num_attention_heads > 0, view.intermediate_size > 0
    if not attention:  # built at the full shape (stock code divides by the head counts), then replaced
        view.num_attention_heads, view.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
    view.intermediate_size = view.intermediate_size or 1
    layer = layer_class(view, index)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for name, kept in (("attention", attention), ("mlp", mlp)):
        if not kept:
            remove_sub_block(layer, name, index, head_dim, sub_blocks)
    return layer


def rebuild_layers(model, layer_class, sub_blocks=LLAMA_SUB_BLOCKS):
    """Replace the uniformly built decoder layers with layers of their own shapes."""
    config = model.config
    layers = (build_layer(config, layer_class, i, sub_blocks) for i in range(config.num_hidden_layers))
    model.model.layers = nn.ModuleList(layers)
    if getattr(config, "slimlm_output_bias", False):  # pruning methods that compensate removed units with a bias
        add_output_biases([(layer.self_attn, "o_proj") for layer in model.model.layers])
        add_output_biases([(layer.mlp, "down_proj") for layer in model.model.layers])


def add_output_biases(linears):
    """Give each ``(module, name)`` linear that exists a zero bias where it has none (its weights load over it)."""
    for module, name in linears:
        linear = getattr(module, name, None)
        if isinstance(linear, nn.Linear) and linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features))


def build_opt_layer(config, index):
    """OPT decoder layer ``index`` at its own shape: built with every head (OPTAttention sizes its heads as
    hidden / heads), then its projections resized to its heads of the model's head size."""
    view = config.layer_config(index)
    heads, neurons = view.num_attention_heads, view.ffn_dim
    view.num_attention_heads, view.ffn_dim = config.num_attention_heads, neurons or 1
    layer = OPTDecoderLayer(view, index)
    head_dim = config.hidden_size // config.num_attention_heads
    attn, width, bias = layer.self_attn, heads * head_dim, config.enable_bias
    if heads:
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, nn.Linear(config.hidden_size, width, bias=bias))
        attn.out_proj = nn.Linear(width, config.hidden_size, bias=bias)
        attn.num_heads = heads  # OPTAttention splits its projections by this
    else:
        remove_sub_block(layer, "attention", index, head_dim, OPT_SUB_BLOCKS)
    if not neurons:
        remove_sub_block(layer, "mlp", index, head_dim, OPT_SUB_BLOCKS)
    return layer


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


class SlimQwen3Config(PerLayerShapes, Qwen3Config):
    model_type = "slimlm_qwen3"


class SlimQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = SlimQwen3Config

    def __init__(self, config):
        super().__init__(config)
        rebuild_layers(self, Qwen3DecoderLayer)
        self.post_init()


class SlimGemma3Config(PerLayerShapes, Gemma3TextConfig):
    model_type = "slimlm_gemma3_text"


class SlimGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = SlimGemma3Config

    def __init__(self, config):
        super().__init__(config)
        rebuild_layers(self, Gemma3DecoderLayer, GEMMA3_SUB_BLOCKS)
        self.post_init()


class SlimPhi3Config(PerLayerShapes, Phi3Config):
    model_type = "slimlm_phi3"


class SlimPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = SlimPhi3Config

    def __init__(self, config):
        super().__init__(config)
        rebuild_layers(self, Phi3DecoderLayer)
        self.post_init()


class SlimOPTConfig(PerLayerShapes, OPTConfig):
    model_type = "slimlm_opt"


class SlimOPTForCausalLM(OPTForCausalLM):
    config_class = SlimOPTConfig

    def __init__(self, config):
        super().__init__(config)
        decoder = self.model.decoder
        decoder.layers = nn.ModuleList(build_opt_layer(config, i) for i in range(config.num_hidden_layers))
        if getattr(config, "slimlm_output_bias", False):  # only where the model has no biases (enable_bias off)
            add_output_biases([(layer.self_attn, "out_proj") for layer in decoder.layers])
            add_output_biases([(layer, "fc2") for layer in decoder.layers])
        self.post_init()
