"""Applying a sub-network in place: it computes the sub-network, and leaves no trace afterwards."""

from __future__ import annotations

import pytest
import torch

from slimlm.apply import subnetwork_applied, subnetwork_masked
from slimlm.errors import SlimlmError
from slimlm.subnet import LayerKeep, SubNetwork

from .conftest import FAMILIES, for_family, tiny_loaded, unfused_llama

INPUT = torch.arange(2 * 12).view(2, 12) % 90 + 3


def heterogeneous(family: str = "llama") -> SubNetwork:
    """Layer 1 dropped, per-layer widths, GQA groups pruned in different ways (OPT: the same query heads)."""
    subnet = SubNetwork(
        {
            0: LayerKeep([0, 1, 2, 3, 4, 5], [0, 1], range(40)),
            2: LayerKeep([1, 2, 3, 5], [0, 1], [0, 3, 9, 17, 39]),
            3: LayerKeep([4], [1], range(0, 40, 3)),
        }
    )
    return for_family(subnet, family)


def masked_logits(loaded, subnet: SubNetwork, ids: torch.Tensor) -> torch.Tensor:
    """Reference: the full model with removed units zeroed and removed layers skipped by hooks."""
    model, dims = loaded.model, loaded.dims
    layers = loaded.adapter.decoder_layers(model)
    hooks = []
    for i, layer in enumerate(layers):
        if i not in subnet.layers:
            hooks.append(layer.register_forward_hook(lambda _m, args, _out: args[0]))
            continue
        keep, o_proj, down_proj = subnet.layers[i], *loaded.adapter.output_projections(layer)
        head_mask = torch.zeros(dims.layers[i].heads).index_fill(0, torch.tensor(keep.heads), 1)
        neuron_mask = torch.zeros(dims.layers[i].neurons).index_fill(0, torch.tensor(keep.neurons), 1)
        head_mask = head_mask.repeat_interleave(dims.head_dim)
        hooks.append(o_proj.register_forward_pre_hook(lambda _m, args, m=head_mask: (args[0] * m,)))
        hooks.append(down_proj.register_forward_pre_hook(lambda _m, args, m=neuron_mask: (args[0] * m,)))
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("views", [False, True], ids=["copies", "views"])
@pytest.mark.parametrize("family", FAMILIES)
def test_applied_model_computes_the_masked_subnetwork(family, views):
    loaded = tiny_loaded(family)
    subnet = heterogeneous(family)
    expected = masked_logits(loaded, subnet, INPUT)
    with subnetwork_applied(loaded, subnet, views=views) as model, torch.no_grad():
        got = model(input_ids=INPUT, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("views", [False, True], ids=["copies", "views"])
@pytest.mark.parametrize("family", FAMILIES)
def test_restore_leaves_the_model_exactly_as_it_was(family, views):
    loaded = tiny_loaded(family)
    model = loaded.model
    before_params = {name: p for name, p in model.named_parameters()}
    before_values = {name: p.detach().clone() for name, p in before_params.items()}
    before_logits = model(input_ids=INPUT).logits.detach()
    config_before = model.config.to_dict()
    with subnetwork_applied(loaded, heterogeneous(family), views=views) as applied:
        assert len(loaded.adapter.decoder_layers(applied)) == 3
        assert applied.config.num_hidden_layers == 3
    after = dict(model.named_parameters())
    assert after.keys() == before_params.keys()
    for name, param in after.items():
        assert param is before_params[name], name  # the very same tensors, not copies
        assert torch.equal(param, before_values[name]), name
    assert model.config.to_dict() == config_before
    assert loaded.dims.layers == tiny_loaded(family).dims.layers
    torch.testing.assert_close(model(input_ids=INPUT).logits, before_logits, rtol=0, atol=0)


@pytest.mark.parametrize("views", [False, True], ids=["copies", "views"])
def test_restore_happens_even_when_the_block_raises(views):
    loaded = tiny_loaded()
    before, dense = loaded.dims, loaded.model(input_ids=INPUT).logits.detach()
    with pytest.raises(RuntimeError, match="boom"), subnetwork_applied(loaded, heterogeneous(), views=views):
        raise RuntimeError("boom")
    assert loaded.dims == before
    torch.testing.assert_close(loaded.model(input_ids=INPUT).logits, dense, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_views_hold_no_copy_of_the_kept_weights_and_compute_what_copies_compute(family):
    """Views (the search's way) are the full weights' own storage, rearranged; copies (extraction's way)
    are new tensors; both are contiguous and compute the same sub-network, and a reformed projection is
    used as given."""
    loaded = tiny_loaded(family)
    subnet = heterogeneous(family)
    storage = {id(p): p.untyped_storage().data_ptr() for p in loaded.model.parameters()}
    o_proj = loaded.adapter.output_projections(loaded.adapter.decoder_layers(loaded.model)[2])[0]
    reformed = {(2, "attention"): torch.randn(o_proj.out_features, len(subnet.layers[2].heads) * loaded.dims.head_dim)}
    layers, logits = loaded.adapter.decoder_layers(loaded.model), {}
    pruned = {id(layers[i]) for i, keep in subnet.layers.items() if keep.shape != loaded.dims.layers[i]}
    assert len(pruned) >= 2
    for views in (False, True):
        with subnetwork_applied(loaded, subnet, reformed, views=views) as model, torch.no_grad():
            logits[views] = model(input_ids=INPUT, use_cache=False).logits
            # contiguous either way: a model of views runs, and is timed, as its extracted copy
            assert all(p.is_contiguous() for p in model.parameters())
            for layer in loaded.adapter.decoder_layers(model):
                new = [p for p in layer.parameters() if p.untyped_storage().data_ptr() not in storage.values()]
                if views:  # only the reformed projection is not the model's own storage
                    assert new == ([o_proj.weight] if layer is layers[2] else [])
                else:
                    assert bool(new) == (id(layer) in pruned)
            assert torch.equal(loaded.adapter.output_projections(layers[2])[0].weight, reformed[2, "attention"])
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-6, atol=1e-6)


def test_views_of_a_strided_weight_are_refused_and_the_model_is_left_whole():
    loaded = tiny_loaded()
    with torch.no_grad():
        dense = loaded.model(input_ids=INPUT).logits
    q_proj = loaded.model.model.layers[2].self_attn.q_proj  # layer 2 keeps 4 of its heads
    q_proj.weight = torch.nn.Parameter(q_proj.weight.detach().t().contiguous().t())  # equal values, strided
    with pytest.raises(SlimlmError, match="not contiguous"), subnetwork_applied(loaded, heterogeneous(), views=True):
        pass
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=INPUT).logits, dense, rtol=0, atol=0)


def test_full_subnetwork_shares_all_weights_and_matches_dense():
    loaded = tiny_loaded()
    dense = loaded.model(input_ids=INPUT).logits.detach()
    weights = {name: p for name, p in loaded.model.named_parameters()}
    with subnetwork_applied(loaded, SubNetwork.full(loaded.dims)) as model:
        for name, param in model.named_parameters():
            assert param is weights[name], f"{name} was copied although every unit is kept"
        torch.testing.assert_close(model(input_ids=INPUT).logits, dense, rtol=0, atol=0)


def test_nested_application_is_refused():
    loaded = tiny_loaded()
    with (
        subnetwork_applied(loaded, heterogeneous()),
        pytest.raises(SlimlmError, match="already applied"),
        subnetwork_applied(loaded, heterogeneous()),
    ):
        pass


def test_invalid_subnetwork_is_refused_before_touching_the_model():
    loaded = tiny_loaded()
    before = loaded.dims
    with (
        pytest.raises(SlimlmError, match="out of range"),
        subnetwork_applied(loaded, SubNetwork({0: LayerKeep([0], [0], [99])})),
    ):
        pass
    assert loaded.dims == before


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_kv_cache_works_on_the_applied_model(family):
    loaded = tiny_loaded(family)
    with subnetwork_applied(loaded, heterogeneous(family)) as model, torch.no_grad():
        out = model.generate(INPUT[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        # greedy decoding with the cache must agree with recomputing the whole sequence each time
        ids = INPUT[:1]
        for _ in range(6):
            next_id = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(out, ids)


# --- the masked (training) path ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_model_computes_what_the_applied_model_computes(family):
    loaded = tiny_loaded(family)
    with torch.no_grad(), subnetwork_applied(loaded, heterogeneous(family)) as model:
        expected = model(input_ids=INPUT).logits
    with torch.no_grad(), subnetwork_masked(loaded, heterogeneous(family)) as model:
        got = model(input_ids=INPUT).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_kept_weights_only_and_the_model_is_restored():
    loaded = tiny_loaded()
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    subnet = heterogeneous()
    with subnetwork_masked(loaded, subnet) as model:
        model(input_ids=INPUT, labels=INPUT).loss.backward()
    layers = loaded.adapter.decoder_layers(loaded.model)
    assert all(p.grad is None or not p.grad.any() for p in layers[1].parameters())  # a removed layer
    o_proj, down_proj = loaded.adapter.output_projections(layers[3])  # keeps head 4 and every third neuron
    head_dim = loaded.dims.head_dim
    assert o_proj.weight.grad[:, 4 * head_dim : 5 * head_dim].abs().sum() > 0
    assert not o_proj.weight.grad[:, : 4 * head_dim].any() and not o_proj.weight.grad[:, 5 * head_dim :].any()
    kept = torch.zeros(down_proj.in_features, dtype=torch.bool)
    kept[list(subnet.layers[3].neurons)] = True
    assert down_proj.weight.grad[:, kept].abs().sum() > 0 and not down_proj.weight.grad[:, ~kept].any()
    assert len(layers) == loaded.dims.num_layers and loaded.model.config.num_hidden_layers == loaded.dims.num_layers
    for name, param in loaded.model.named_parameters():
        assert torch.equal(param, before[name]), name
    for module in loaded.model.modules():
        assert not module._forward_pre_hooks, "a mask hook was left behind"


def test_masked_generation_matches_the_applied_model():
    loaded = tiny_loaded()
    prompt = INPUT[:1, :5]
    with torch.no_grad(), subnetwork_applied(loaded, heterogeneous()) as model:
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    with torch.no_grad(), subnetwork_masked(loaded, heterogeneous()) as model:
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


# --- fused projections (Phi-3) -------------------------------------------------------------------------


def test_phi3_fused_weights_keep_exactly_the_rows_of_the_kept_units():
    """``qkv_proj`` keeps the kept heads' query rows, then their groups' key rows, then value rows, and
    ``gate_up_proj`` the kept neurons' gate rows, then their up rows; the pruned model computes what the
    same weights unfused (a Llama, whose separate projections are sliced on their own) compute."""
    loaded = tiny_loaded("phi3")
    config, subnet = loaded.model.config, heterogeneous()
    head_dim, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    full = {i: layer.self_attn.qkv_proj.weight.detach().clone() for i, layer in enumerate(loaded.model.model.layers)}
    gate_up = {i: layer.mlp.gate_up_proj.weight.detach().clone() for i, layer in enumerate(loaded.model.model.layers)}
    unfused = unfused_llama(loaded)
    with torch.no_grad():
        torch.testing.assert_close(unfused.model(INPUT).logits, loaded.model(INPUT).logits)

    def rows(units, start, count) -> list[int]:  # the rows of ``units`` in a block of ``count`` heads at ``start``
        assert all(u < count for u in units)
        return [start + u * head_dim + d for u in units for d in range(head_dim)]

    with torch.no_grad(), subnetwork_applied(loaded, subnet) as model:
        for position, (index, keep) in enumerate(sorted(subnet.layers.items())):
            layer = model.model.layers[position]
            q = rows(keep.heads, 0, heads)
            k = rows(keep.kv_heads, heads * head_dim, kv_heads)
            v = rows(keep.kv_heads, (heads + kv_heads) * head_dim, kv_heads)
            assert torch.equal(layer.self_attn.qkv_proj.weight, full[index][q + k + v])
            neurons = list(keep.neurons)
            expected = gate_up[index][neurons + [config.intermediate_size + j for j in neurons]]
            assert torch.equal(layer.mlp.gate_up_proj.weight, expected)
            view = layer.self_attn.config  # Phi3Attention splits qkv by its config's head count
            assert (view.num_attention_heads, view.num_key_value_heads) == (len(keep.heads), len(keep.kv_heads))
            assert view.intermediate_size == len(keep.neurons) and layer.mlp.config is view
            assert layer.self_attn.num_key_value_heads == len(keep.kv_heads)
        got = model(input_ids=INPUT, use_cache=False).logits
    with torch.no_grad(), subnetwork_applied(unfused, subnet) as model:
        expected = model(input_ids=INPUT, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert config.num_attention_heads == heads  # the model's own config was never touched
    for layer in loaded.model.model.layers:
        assert layer.config is config and layer.self_attn.config is config and layer.mlp.config is config


# --- biases on every row (OPT) -------------------------------------------------------------------------


def opt_by_hand(model, subnet: SubNetwork, full: dict, ids: torch.Tensor) -> torch.Tensor:
    """OPT's forward pass written out from ``full``'s kept rows, columns and bias entries: a reference that
    shares no code with transformers' OPT beyond the weights."""
    F, config = torch.nn.functional, model.config
    head_dim, hidden = config.hidden_size // config.num_attention_heads, config.hidden_size
    length = ids.shape[1]
    h = full["model.decoder.embed_tokens.weight"][ids] + full["model.decoder.embed_positions.weight"][2 : 2 + length]
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    def norm(x, name):
        return F.layer_norm(x, (hidden,), full[f"{name}.weight"], full[f"{name}.bias"])

    for i, keep in sorted(subnet.layers.items()):
        p = f"model.decoder.layers.{i}."
        rows = [h * head_dim + d for h in keep.heads for d in range(head_dim)]
        if rows:
            x = norm(h, p + "self_attn_layer_norm")
            q, k, v = (
                F.linear(x, full[f"{p}self_attn.{n}.weight"][rows], full[f"{p}self_attn.{n}.bias"][rows])
                .view(*x.shape[:2], len(keep.heads), head_dim)
                .transpose(1, 2)
                for n in ("q_proj", "k_proj", "v_proj")
            )
            scores = (q * head_dim**-0.5) @ k.transpose(-1, -2)
            mixed = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
            mixed = mixed.transpose(1, 2).reshape(*x.shape[:2], len(rows))
            out = full[p + "self_attn.out_proj.weight"][:, rows]
            h = h + F.linear(mixed, out, full[p + "self_attn.out_proj.bias"])  # the output bias stays whole
        neurons = list(keep.neurons)
        if neurons:
            x = F.linear(
                norm(h, p + "final_layer_norm"), full[p + "fc1.weight"][neurons], full[p + "fc1.bias"][neurons]
            )
            h = h + F.linear(x.relu(), full[p + "fc2.weight"][:, neurons], full[p + "fc2.bias"])
    return F.linear(norm(h, "model.decoder.final_layer_norm"), full["model.decoder.embed_tokens.weight"])


def test_opt_pruned_rows_take_their_bias_entries_and_the_model_is_the_kept_weights_by_hand():
    """OPT's q/k/v and fc1 rows leave with their bias entries, out_proj and fc2 lose the columns but keep
    their biases, and the pruned model computes what the kept weights compute written out by hand
    (a removed layer, a removed attention, a removed MLP and fewer heads and neurons)."""
    loaded = tiny_loaded("opt")
    full = {name: p.detach().clone() for name, p in loaded.model.state_dict().items()}
    subnet = SubNetwork(
        {
            0: LayerKeep([], [], range(0, 40, 3)),
            2: LayerKeep([1, 2, 5], [1, 2, 5], range(20)),
            3: LayerKeep([0, 4], [0, 4], []),
        }
    )
    head_dim = loaded.dims.head_dim
    with torch.no_grad(), subnetwork_applied(loaded, subnet) as model:
        layer = model.model.decoder.layers[1]  # full layer 2
        rows = [h * head_dim + d for h in (1, 2, 5) for d in range(head_dim)]
        for name in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(layer.self_attn, name)
            assert torch.equal(linear.weight, full[f"model.decoder.layers.2.self_attn.{name}.weight"][rows])
            assert torch.equal(linear.bias, full[f"model.decoder.layers.2.self_attn.{name}.bias"][rows])
        out = layer.self_attn.out_proj
        assert torch.equal(out.weight, full["model.decoder.layers.2.self_attn.out_proj.weight"][:, rows])
        assert torch.equal(out.bias, full["model.decoder.layers.2.self_attn.out_proj.bias"])
        assert layer.self_attn.num_heads == 3
        assert torch.equal(layer.fc1.bias, full["model.decoder.layers.2.fc1.bias"][:20])
        assert torch.equal(layer.fc2.bias, full["model.decoder.layers.2.fc2.bias"])
        got = model(input_ids=INPUT, use_cache=False).logits
    torch.testing.assert_close(got, opt_by_hand(loaded.model, subnet, full, INPUT), rtol=1e-5, atol=1e-5)
    assert all(layer.self_attn.num_heads == 6 for layer in loaded.model.model.decoder.layers)  # restored
