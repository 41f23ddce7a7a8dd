"""Gemma-3 text models (``Gemma3ForCausalLM``, model_type ``gemma3_text``), e.g. Gemma 3 270M.

The projections and their units are the Llama layout's (``LlamaFamilyAdapter``), with Qwen3's
per-head query and key norms. What differs:

- each branch's output is normalized before the residual add: the attention branch is
  ``post_attention_layernorm(self_attn(input_layernorm(h)))`` and the MLP branch
  ``post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``, so a sub-block owns two norms,
  and removing it removes both;
- an RMSNorm scales by ``1 + weight`` (llama.cpp stores ``1 + weight``);
- layers are sliding-window or full attention (``config.layer_types``, filtered to the kept layers),
  and the attention scale comes from ``query_pre_attn_scalar``, not from the head count, so pruning
  heads leaves it alone. The input embedding is scaled by sqrt(hidden) inside the embedding module.

llama.cpp's ``gemma3`` graph fixes what a GGUF file cannot say: every sixth layer (5, 11, ...) is
full attention and the others slide, sliding layers rotate with base 10000, attention scales by
1/sqrt(head size), and the activation is tanh-approximated GELU. A model that differs is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch
from torch import nn
from transformers import Gemma3TextConfig, PreTrainedModel

from slimlm.models.llama import Family, LlamaFamilyAdapter
from slimlm.models.remote import modeling_slimlm as remote

MODEL_TYPE = "gemma3_text"
CLASSES = Family(Gemma3TextConfig, "Gemma3ForCausalLM", remote.SlimGemma3Config, "SlimGemma3ForCausalLM")
# llama.cpp's gemma3 graph (llama-model.cpp): set_swa_pattern(6), rope_freq_base_train_swa = 10000
LLAMA_CPP_SWA_PERIOD = 6
LLAMA_CPP_SLIDING_ROPE_THETA = 10000.0
LLAMA_CPP_27B_LAYERS = 62  # the one size whose attention scale llama.cpp takes from hidden / heads


class Gemma3Adapter(LlamaFamilyAdapter):
    """The Llama-layout adapter with Gemma-3's output norms, ``1 + weight`` norms and llama.cpp's fixed choices."""

    sub_blocks = remote.GEMMA3_SUB_BLOCKS

    def __init__(self) -> None:
        super().__init__(MODEL_TYPE, CLASSES)

    def residual_branches(self, layer: nn.Module):
        def attention(hidden: torch.Tensor, **kwargs) -> torch.Tensor:
            return layer.post_attention_layernorm(layer.self_attn(layer.input_layernorm(hidden), **kwargs)[0])

        def mlp(hidden: torch.Tensor) -> torch.Tensor:
            return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))

        return attention, mlp

    def branch_output(self, layer: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return layer.post_attention_layernorm if name == "attention" else layer.post_feedforward_layernorm

    def gguf_refusal(self, model: PreTrainedModel) -> str | None:
        config = model.config
        layers = config.num_hidden_layers
        expected = [_llama_cpp_layer_type(i) for i in range(layers)]
        if list(config.layer_types) != expected:
            full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
            return (
                f"llama.cpp's gemma3 graph makes every sixth layer full attention (5, 11, ...), and this model's "
                f"full-attention layers are {full or 'none'}; the nearest expressible model keeps every layer or "
                "drops only trailing ones (search with --no-depth)"
            )
        sliding = config.rope_parameters["sliding_attention"]
        if (sliding.get("rope_type", "default"), sliding["rope_theta"]) != ("default", LLAMA_CPP_SLIDING_ROPE_THETA):
            return f"llama.cpp's gemma3 graph rotates sliding layers by plain rope of base 10000, this model: {sliding}"
        scalar = config.hidden_size / config.num_attention_heads if layers == LLAMA_CPP_27B_LAYERS else config.head_dim
        if config.query_pre_attn_scalar != scalar:
            return (
                f"llama.cpp's gemma3 graph scales attention by 1/sqrt({scalar:g}), this model by "
                f"1/sqrt({config.query_pre_attn_scalar}) (query_pre_attn_scalar)"
            )
        unsupported = {
            "hidden_activation": config.hidden_activation != "gelu_pytorch_tanh",
            "final_logit_softcapping": config.final_logit_softcapping is not None,
            "attn_logit_softcapping": config.attn_logit_softcapping is not None,
            "use_bidirectional_attention": bool(config.use_bidirectional_attention),
        }
        named = [name for name, differs in unsupported.items() if differs]
        if named:
            return f"llama.cpp's gemma3 graph does not take this model's {', '.join(named)}"
        return None

    def gguf_hyperparameters(self, writer: gguf.GGUFWriter, model: PreTrainedModel) -> None:
        writer.add_sliding_window(model.config.sliding_window)

    def gguf_tensor(self, name: str, data: np.ndarray) -> np.ndarray:
        # Gemma3RMSNorm multiplies by (1 + weight); llama.cpp's norms multiply by the stored weight
        return data + 1 if name.endswith("norm.weight") else data


def _llama_cpp_layer_type(index: int) -> str:
    """The attention llama.cpp's gemma3 graph gives layer ``index``."""
    sliding = index % LLAMA_CPP_SWA_PERIOD < LLAMA_CPP_SWA_PERIOD - 1
    return "sliding_attention" if sliding else "full_attention"
