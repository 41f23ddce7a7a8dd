"""Reformation: the closed form matches the paper's ADMM, errors drop, nothing blows up."""

from __future__ import annotations

import pytest
import torch

from slimlm.apply import subnetwork_applied
from slimlm.errors import SlimlmError
from slimlm.extract import extract
from slimlm.models import load_model
from slimlm.reform import DAMPING, StoredWeights, admm, layer_inputs, reform, ridge, solve, spill, stacked
from slimlm.subnet import LayerKeep, SubNetwork

from .conftest import FAMILIES, tiny_loaded
from .test_apply import heterogeneous

IDS = torch.randint(3, 96, (8, 24), generator=torch.Generator().manual_seed(0))


def problem(seed: int = 0, tokens: int = 300):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 24, generator=g, dtype=torch.float64)
    x = torch.randn(24, tokens, generator=g, dtype=torch.float64)
    return weight, x, torch.tensor([0, 3, 5, 7, 11, 20, 21])


def reconstruction_error(weight, x, kept, new_weight) -> float:
    return ((new_weight @ x[kept] - weight @ x) ** 2).sum().item()


def test_closed_form_agrees_with_the_papers_admm():
    weight, x, kept = problem()
    gram = x @ x.T
    closed = solve(weight, gram, kept, damping=1e-12)
    iterative = admm(weight, gram, kept, rho=gram.diagonal().mean().item(), iterations=100)
    torch.testing.assert_close(closed, iterative, rtol=1e-6, atol=1e-6)


def test_closed_form_is_the_least_squares_optimum():
    weight, x, kept = problem()
    closed = solve(weight, x @ x.T, kept, damping=1e-12)
    reference = torch.linalg.lstsq(x[kept].T, (weight @ x).T).solution.T
    torch.testing.assert_close(closed, reference, rtol=1e-6, atol=1e-6)
    assert reconstruction_error(weight, x, kept, closed) < reconstruction_error(weight, x, kept, weight[:, kept])


def test_singular_gram_gives_finite_weights():
    weight, x, kept = problem(tokens=4)  # 4 tokens, 24 channels: rank 4, and a dead channel
    x[kept[0]] = 0
    new = solve(weight, x @ x.T, kept)
    assert torch.isfinite(new).all()
    assert reconstruction_error(weight, x, kept, new) <= reconstruction_error(weight, x, kept, weight[:, kept])


def test_hopeless_gram_is_a_clear_error():
    weight, _, kept = problem()
    with pytest.raises(SlimlmError, match="reformation failed"):
        solve(weight, torch.full((24, 24), float("nan"), dtype=torch.float64), kept)


@pytest.mark.parametrize("family", FAMILIES)
def test_reformation_brings_the_subnetwork_closer_to_the_full_model(family):
    loaded = tiny_loaded(family)
    subnet = heterogeneous(family)
    with torch.no_grad():
        dense = loaded.model(input_ids=IDS).logits
    errors = []
    for weights in (None, reform(loaded, subnet, IDS)):
        with subnetwork_applied(loaded, subnet, weights) as model, torch.no_grad():
            errors.append((model(input_ids=IDS).logits - dense).pow(2).mean().item())
    assert errors[1] < errors[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_layer_is_reformed_on_what_the_reformed_layers_before_it_give_it(family):
    """The last MLP's new weights solve the least squares on the inputs the pruned model, with every
    earlier projection reformed, really gives that MLP (so the hidden states reform carries from layer
    to layer are the model's own: Gemma-3 normalizes each branch's output before adding it)."""
    loaded = tiny_loaded(family)
    subnet = heterogeneous(family)
    reformed = reform(loaded, subnet, IDS, drift=0)
    last = max(subnet.layers)
    keep = subnet.layers[last]
    # the pruned model as reform sees it when it reaches the last MLP: that MLP still whole
    before = SubNetwork(dict(subnet.layers) | {last: LayerKeep(keep.heads, keep.kv_heads, range(40))})
    earlier = {key: w for key, w in reformed.items() if key != (last, "mlp")}
    _, down_proj = loaded.adapter.output_projections(loaded.adapter.decoder_layers(loaded.model)[last])
    inputs = []
    hook = down_proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    with subnetwork_applied(loaded, before, earlier) as model, torch.no_grad():
        model(input_ids=IDS, use_cache=False)
    hook.remove()
    x = torch.cat(inputs).reshape(-1, 40).double()
    expected = solve(down_proj.weight.detach(), x.T @ x, torch.tensor(keep.neurons))
    torch.testing.assert_close(reformed[last, "mlp"], expected, rtol=1e-4, atol=1e-5)


def _last_mlp_inputs(loaded, subnet, reformed, last):
    """The stream entering the last layer's MLP branch and its down projection's input, as ``subnet`` with
    ``reformed`` computes them (llama names)."""
    layer = loaded.adapter.decoder_layers(loaded.model)[last]
    streams, inputs = [], []
    hooks = [
        layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, args: streams.append(args[0].detach())),
        layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())),
    ]
    with subnetwork_applied(loaded, subnet, reformed) as model, torch.no_grad():
        model(input_ids=IDS, use_cache=False)
    for hook in hooks:
        hook.remove()
    flat = [torch.cat(t).flatten(0, -2).double() for t in (streams, inputs)]
    return flat[0], flat[1]


def test_drift_target_undoes_a_share_of_the_streams_drift_from_the_dense_model():
    """The last MLP's new weights solve Ŵ X_K ≈ W X + drift·R, R the dense stream after the branch minus the
    pruned one's (with the branch unreformed), damped towards the kept weights."""
    loaded = tiny_loaded("llama")
    subnet, drift = heterogeneous("llama"), 0.5
    reformed = reform(loaded, subnet, IDS, drift=drift)
    last = max(subnet.layers)
    keep = subnet.layers[last]
    before = SubNetwork(dict(subnet.layers) | {last: LayerKeep(keep.heads, keep.kv_heads, range(40))})
    earlier = {key: w for key, w in reformed.items() if key != (last, "mlp")}
    stream, x = _last_mlp_inputs(loaded, before, earlier, last)
    dense_stream, dense_x = _last_mlp_inputs(loaded, SubNetwork.full(loaded.dims), None, last)
    weight = loaded.adapter.output_projections(loaded.adapter.decoder_layers(loaded.model)[last])[1].weight.double()
    kept = torch.tensor(keep.neurons)
    residual = (dense_stream + dense_x @ weight.T) - (stream + x @ weight.T)
    rhs = weight @ (x.T @ x[:, kept]) + drift * residual.T @ x[:, kept]
    expected = ridge(rhs, (x.T @ x)[kept[:, None], kept], DAMPING, prior=weight[:, kept]).float()
    torch.testing.assert_close(reformed[last, "mlp"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reformed[last, "mlp"], reform(loaded, subnet, IDS, drift=0)[last, "mlp"])


def test_a_family_that_normalises_branch_outputs_is_reformed_without_drift():
    loaded = tiny_loaded("gemma3_text")
    assert not loaded.adapter.branches_add_linearly()
    subnet = heterogeneous("gemma3_text")
    with_drift, without = reform(loaded, subnet, IDS), reform(loaded, subnet, IDS, drift=0)
    assert with_drift.keys() == without.keys()
    for key in without:
        assert torch.equal(with_drift[key], without[key])


def test_full_subnetwork_is_left_unchanged():
    loaded = tiny_loaded()
    reformed = reform(loaded, SubNetwork.full(loaded.dims), IDS)
    for index, layer in enumerate(loaded.adapter.decoder_layers(loaded.model)):
        o_proj, down_proj = loaded.adapter.output_projections(layer)
        assert torch.equal(reformed[index, "attention"], o_proj.weight)
        assert torch.equal(reformed[index, "mlp"], down_proj.weight)


def test_reform_only_touches_kept_layers_and_leaves_the_model_intact():
    loaded = tiny_loaded()
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    reformed = reform(loaded, heterogeneous(), IDS)
    assert {i for i, _ in reformed} == set(heterogeneous().layers)
    for name, param in loaded.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_reformed_extraction_reloads_with_the_in_place_logits(tmp_path):
    loaded = tiny_loaded("qwen2")
    subnet = SubNetwork({i: LayerKeep([0, 1, 3, 4], [0, 1], range(0, 40, 2)) for i in range(4)})
    reformed = reform(loaded, subnet, IDS)
    with subnetwork_applied(loaded, subnet, reformed) as model, torch.no_grad():
        expected = model(input_ids=IDS).logits
    info = extract(loaded, subnet, tmp_path / "small", reformed)
    again = load_model(info.folder)
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_stacked_batches_are_views_of_one_tensor_with_the_same_values():
    # reformation holds a layer's activations this way so they are one allocation, freed whole
    batches = [torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.randn(2, 3, 5)]
    views = stacked(iter(batches), [4, 4, 2])
    assert [v.shape for v in views] == [b.shape for b in batches]
    assert all(torch.equal(v, b) for v, b in zip(views, batches, strict=True))
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1
    assert stacked(iter([]), []) == []
    with pytest.raises(ValueError):
        stacked(iter(batches), [4, 4])  # sizes that do not match the batches are a bug, not truncated


@pytest.mark.parametrize("family", FAMILIES)
def test_first_layer_inputs_are_the_embedded_batches_in_one_tensor(family):
    # the embedded batches, each written into one tensor as it comes (see ``stacked`` for why one tensor)
    loaded = tiny_loaded(family)
    captured = []
    layer = loaded.adapter.decoder_layers(loaded.model)[0]
    handle = layer.register_forward_pre_hook(lambda _m, args, _kw: captured.append(args[0]), with_kwargs=True)
    with torch.no_grad():
        for batch in IDS.split(3):
            loaded.model(input_ids=batch, use_cache=False)
    handle.remove()
    hidden, _ = layer_inputs(loaded, IDS, batch_size=3)
    assert [len(h) for h in hidden] == [3, 3, 2]
    assert all(torch.equal(h, c) for h, c in zip(hidden, captured, strict=True))
    assert len({h.untyped_storage().data_ptr() for h in hidden}) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_every_batch_s_keyword_arguments_are_held_once(family):
    # alike in every batch (the same positions, no padding): one copy, not one per batch
    def tensors(value):
        if isinstance(value, torch.Tensor):
            return [value]
        return [t for v in value for t in tensors(v)] if isinstance(value, tuple | list) else []

    _, kwargs = layer_inputs(tiny_loaded(family), IDS, batch_size=2)
    for per_batch in kwargs:
        held = [tensors(list(kw.values())) for kw in per_batch]
        assert len(held) == 4 and held[0]
        assert all(all(a is b for a, b in zip(h, held[0], strict=True)) for h in held)


def test_spilled_weights_read_back_equal_and_stored_ones_stay_put():
    weights = {(0, "attention"): torch.randn(8, 4), (2, "mlp"): torch.randn(8, 6)}
    stored = spill(weights)
    assert isinstance(stored, StoredWeights)
    assert sorted(stored) == sorted(weights)
    assert all(torch.equal(stored[place], w) for place, w in weights.items())
    assert spill(stored) is stored  # already on disk: not written again
    folder = stored.folder
    del stored
    assert not folder.exists()  # the temporary folder goes with the mapping


@pytest.mark.parametrize("drift", [-0.1, 1.5])
def test_a_drift_share_outside_0_to_1_is_a_clear_error(drift):
    loaded = tiny_loaded()
    with pytest.raises(SlimlmError, match="between 0 and 1"):
        reform(loaded, heterogeneous(), IDS, drift=drift)
