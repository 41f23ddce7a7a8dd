"""The latency model: a candidate's time predicted from its shape, fitted on timed sub-networks."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from slimlm.export import runtime_layer_shapes
from slimlm.latency import FEATURES, LatencyModel, build_latency_model, features, fit
from slimlm.models.base import LayerShape
from slimlm.space import SearchSpace

from .conftest import FAMILIES, tiny_loaded
from .test_space import fixed_importance

FULL = [LayerShape(4, 2, 64)] * 6


def test_a_runtime_linear_in_the_shapes_is_fitted_exactly():
    """Costs per block, head, key/value head and neuron, and a constant, are recovered from timings."""
    costs = np.array([3.0, 0.2, 0.05, 0.07, 0.1, 0.001])  # per FEATURES

    def ratio(shapes):
        return float(np.dot(costs, features(shapes)) / np.dot(costs, features(FULL)))

    rng = np.random.default_rng(0)
    shapes = [
        [LayerShape(int(h), int(k), int(n)) for h, k, n in rng.integers(0, [5, 3, 65], (6, 3))] for _ in range(12)
    ]
    weights = fit([(features(s), ratio(s)) for s in shapes], features(FULL))
    model = LatencyModel("transformers", "llama", 10.0, weights, ())
    for s in [*shapes, [LayerShape(1, 1, 8)], FULL]:
        assert model.ratio(s) == pytest.approx(ratio(s), rel=1e-9)
    assert model.ms(FULL) == pytest.approx(10.0)


def test_no_cost_is_fitted_below_zero():
    """Timing noise that makes more heads look faster is not fitted as a negative cost per head, which
    would price wide-attention candidates below any real model."""
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(12):
        shapes = [LayerShape(int(h), 1, int(n)) for h, n in rng.integers(1, [5, 65], (6, 2))]
        heads, neurons = sum(s.heads for s in shapes), sum(s.neurons for s in shapes)
        samples.append((features(shapes), 0.2 + 0.8 * neurons / 384 - 0.05 * heads / 24))  # heads "help"
    weights = fit(samples, features(FULL))
    assert min(weights) >= 0 and weights[FEATURES.index("query heads")] == 0


def test_sampled_levels_are_the_space_levels_and_remove_layers_only_where_depth_is_allowed():
    dims = tiny_loaded().dims
    rng = np.random.default_rng(0)
    space = SearchSpace()
    drawn = [space.sample_levels(dims, rng) for _ in range(40)]
    full = dims.layers[0]
    for shapes in drawn:
        for s in shapes.values():
            assert LayerShape(s.heads, s.kv_heads, 0) in space.attention_levels(full)
            assert s.neurons in space.mlp_levels(full)
    assert any(len(shapes) < dims.num_layers for shapes in drawn)
    assert any(not s.has_attention for shapes in drawn for s in shapes.values())  # sub-block removal drawn
    no_depth = SearchSpace(depth=False)
    for shapes in (no_depth.sample_levels(dims, rng) for _ in range(20)):
        assert len(shapes) == dims.num_layers and all(s.has_attention and s.has_mlp for s in shapes.values())
    uniform = space.sample_levels(dims, rng, ragged=False)
    assert len(uniform) == dims.num_layers and len(set(uniform.values())) == 1
    wide = [space.sample_levels(dims, rng, wide=True) for _ in range(40)]  # the upper half of the levels
    assert (
        min(s.neurons for shapes in wide for s in shapes.values())
        >= space.mlp_levels(full)[len(space.mlp_levels(full)) // 2]
    )


def test_llama_cpp_is_priced_on_the_shapes_it_runs():
    """llama.cpp's Llama graph runs an attention kept without its MLP with a one-neuron zero MLP, and
    takes its head size from the first layer (slimlm.export): those blocks cost time there."""
    shapes = [LayerShape(0, 0, 32), LayerShape(4, 2, 0), LayerShape(4, 2, 64)]
    assert runtime_layer_shapes("llama", shapes) == [LayerShape(1, 1, 32), LayerShape(4, 2, 1), LayerShape(4, 2, 64)]
    assert runtime_layer_shapes("qwen2", FULL) == FULL
    model = LatencyModel("llama.cpp", "llama", 1.0, (0, 0, 0, 0, 1.0, 0), ())  # MLP blocks only
    assert model.ratio(shapes) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_a_latency_model_is_fitted_on_real_timings_in_transformers(family, monkeypatch):
    """Timed for real on a tiny model (fast, so noisy: only the model's form is checked)."""
    monkeypatch.setattr("slimlm.latency.SAMPLES", 8)
    monkeypatch.setattr("slimlm.latency.CHECKS", 2)
    loaded = tiny_loaded(family)
    model = build_latency_model(loaded, "transformers", 16, SearchSpace(), fixed_importance(loaded.dims))
    assert model.dense_ms > 0 and len(model.check_errors) == 2 and min(model.weights) >= 0
    assert model.ratio(loaded.dims.layers) > 0
    assert LatencyModel.from_dict(model.summary()) == model


def test_llama_cpp_costs_are_fitted_on_the_shapes_it_runs_as_they_are_priced(monkeypatch):
    """A runtime linear in the shapes llama.cpp runs (a kept attention's zero MLP included) is fitted
    exactly: the fit and the prices see the same shapes."""
    loaded = tiny_loaded("llama")
    costs = np.array([3.0, 0.2, 0.05, 0.07, 0.4, 0.001])

    def timed(shapes):
        return float(np.dot(costs, features(runtime_layer_shapes("llama", shapes))))

    @contextlib.contextmanager
    def timer(_loaded, _runtime, _seq_len):
        yield lambda subnet: (timed(loaded.dims.layers), timed(subnet.shapes()))

    monkeypatch.setattr("slimlm.latency._timer", timer)
    model = build_latency_model(loaded, "llama.cpp", 16, SearchSpace(), fixed_importance(loaded.dims))
    assert max(abs(e) for e in model.check_errors) < 1e-9
    alone = [LayerShape(4, 2, 0)] * 3  # attention kept without its MLP: run with a one-neuron zero MLP
    assert model.ratio(alone) == pytest.approx(timed(alone) / timed(loaded.dims.layers), rel=1e-9)
