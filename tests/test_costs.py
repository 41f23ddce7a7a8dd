"""Costs: parameter counts against real modules, FLOPs and memory formulas, latency probes."""

from __future__ import annotations

import pytest

from slimlm.costs import measure_latency, static_cost
from slimlm.models.base import LayerShape

from .conftest import FAMILIES, tiny_loaded


def unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_params_equal_the_model_parameter_count(family, tied):
    loaded = tiny_loaded(family, tie_word_embeddings=tied)
    cost = static_cost(loaded.dims)
    assert cost.params == unique_params(loaded.model)
    embeddings = loaded.model.get_input_embeddings().weight.numel() * (1 if tied else 2)
    positions = [p for name, p in loaded.model.named_parameters() if "embed_positions" in name]  # OPT's, learned
    assert cost.params_without_embeddings == cost.params - embeddings - sum(p.numel() for p in positions)


def test_bias_terms_are_counted_for_qwen2():
    qwen, llama = tiny_loaded("qwen2").dims, tiny_loaded("llama").dims
    assert qwen.params_per_head == llama.params_per_head + qwen.head_dim  # q bias
    assert qwen.params_per_kv_head == llama.params_per_kv_head + 2 * qwen.head_dim  # k and v bias


def test_flops_and_memory_follow_the_formulas():
    dims = tiny_loaded().dims  # hidden 48, head dim 8, vocab 96, 4 layers of (6 heads, 2 kv, 40 neurons)
    cost = static_cost(dims, context=10)
    per_layer_weights = 48 * 8 * 6 * 2 + 48 * 8 * 2 * 2 + 48 * 40 * 3
    assert cost.flops_per_token == 2 * (96 * 48 + 4 * per_layer_weights) + 4 * (4 * 6 * 8 * 10)
    kv_cache_values = 4 * 2 * 2 * 8 * 10
    assert cost.memory_bytes == 4 * (cost.params + kv_cache_values)
    assert static_cost(dims, context=20).flops_per_token > cost.flops_per_token


def test_smaller_shapes_cost_less():
    dims = tiny_loaded().dims
    full = static_cost(dims)
    small = static_cost(dims, [LayerShape(3, 1, 20)] * 2)
    assert small.params < full.params
    assert small.flops_per_token < full.flops_per_token
    assert small.memory_bytes < full.memory_bytes


def test_latency_is_measured():
    speed = measure_latency(tiny_loaded().model, prompt_tokens=8, new_tokens=4, repeats=1)
    assert speed.prefill_ms > 0
    assert speed.decode_tokens_per_s > 0
    assert (speed.prompt_tokens, speed.new_tokens) == (8, 4)
