"""One-shot pruning methods (the baselines): budgets, what each ranks by, FLAP's bias, Taylor scores, the CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.apply import subnetwork_applied
from slimlm.costs import static_cost
from slimlm.errors import SlimlmError
from slimlm.extract import extract
from slimlm.importance import calibrate, importance, taylor_importance
from slimlm.prune import METHODS, PruneInput, params_budget, prune
from slimlm.space import uniform_subnetwork

from .conftest import TEXT, invoke, one_error, save_tiny, tiny_loaded, unfused_llama


def windows(loaded, count: int = 8, length: int = 16) -> torch.Tensor:
    ids = loaded.tokenizer(TEXT)["input_ids"]
    return torch.tensor(ids[: count * length]).view(count, length)


def given(loaded, fraction: float) -> PruneInput:
    ids = windows(loaded)
    return PruneInput(loaded, calibrate(loaded, ids), ids, int(fraction * static_cost(loaded.dims).params))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_every_method_fits_the_budget_with_a_valid_subnetwork(method, fraction):
    loaded = tiny_loaded()
    inputs = given(loaded, fraction)
    pruned = prune(method, inputs)
    assert pruned.method == method and pruned.seconds >= 0
    subnet = pruned.subnet.validate(loaded.dims)
    params = static_cost(loaded.dims, subnet.shapes()).params
    assert params <= inputs.budget
    assert params < static_cost(loaded.dims).params
    with subnetwork_applied(loaded, subnet, pruned.reformed) as model:
        logits = model(input_ids=inputs.windows[:2]).logits
    assert torch.isfinite(logits).all()


def test_magnitude_keeps_the_units_with_the_largest_weights():
    loaded = tiny_loaded()
    layers = loaded.adapter.decoder_layers(loaded.model)
    with torch.no_grad():
        for layer in layers:
            o_proj, down_proj = loaded.adapter.output_projections(layer)
            o_proj.weight[:, : loaded.dims.head_dim] *= 50  # head 0
            down_proj.weight[:, -3:] *= 50  # the last three neurons
    subnet = prune("magnitude", given(loaded, 0.5)).subnet
    for keep in subnet.layers.values():
        assert 0 in keep.heads
        assert set(keep.neurons) >= {loaded.dims.layers[0].neurons - k for k in (1, 2, 3)}


def test_wanda_sp_is_the_uniform_activation_ranked_subnetwork():
    loaded = tiny_loaded()
    inputs = given(loaded, 0.6)
    expected = uniform_subnetwork(loaded.dims, importance(loaded, inputs.calibration, "activation"), 0.6)
    assert prune("wanda-sp", inputs).subnet == expected


def test_shortgpt_removes_a_layer_that_changes_nothing_first():
    loaded = tiny_loaded()
    idle = 2
    with torch.no_grad():  # no output from either branch: the layer passes its input through
        for linear in loaded.adapter.output_projections(loaded.adapter.decoder_layers(loaded.model)[idle]):
            linear.weight.zero_()
    full = static_cost(loaded.dims).params
    one_layer = full - static_cost(loaded.dims, list(loaded.dims.layers[1:])).params
    inputs = given(loaded, 1 - 0.5 * one_layer / full)
    subnet = prune("shortgpt", inputs).subnet
    assert subnet.kept_layers == [i for i in range(loaded.dims.num_layers) if i != idle]


def test_flap_bias_restores_the_mean_output_of_what_it_removed():
    """In the first layer the kept channels see the same inputs as in the full model, so with the bias the
    attention and MLP output projections' mean output over the calibration tokens is the full model's."""
    loaded = tiny_loaded()
    inputs = given(loaded, 0.5)
    pruned = prune("flap", inputs)
    assert pruned.subnet.layers[0].shape != loaded.dims.layers[0]
    first = loaded.adapter.decoder_layers(loaded.model)[0]
    o_proj, _ = loaded.adapter.output_projections(first)

    def mean_attention_output(subnet=None, reformed=None) -> torch.Tensor:
        seen = []
        hook = o_proj.register_forward_hook(lambda _m, _a, output: seen.append(output.reshape(-1, output.shape[-1])))
        try:
            with torch.no_grad():
                if subnet is None:
                    loaded.model(input_ids=inputs.windows)
                else:
                    with subnetwork_applied(loaded, subnet, reformed) as model:
                        model(input_ids=inputs.windows)
        finally:
            hook.remove()
        return torch.cat(seen).double().mean(0)

    full = mean_attention_output()
    compensated = mean_attention_output(pruned.subnet, pruned.reformed)
    uncompensated = mean_attention_output(pruned.subnet)
    assert torch.allclose(compensated, full, atol=1e-5)
    assert not torch.allclose(uncompensated, full, atol=1e-3)


def test_flap_gives_layers_their_own_widths_and_keeps_every_layer():
    loaded = tiny_loaded()
    with torch.no_grad():  # a layer whose neurons fluctuate alike scores flat after standardisation
        down = loaded.adapter.output_projections(loaded.adapter.decoder_layers(loaded.model)[1])[1]
        down.weight[:, :20] *= 30
    subnet = prune("flap", given(loaded, 0.6)).subnet
    assert subnet.kept_layers == list(range(loaded.dims.num_layers))
    assert len({s.neurons for s in subnet.shapes()}) > 1


def test_flap_model_extracts_with_its_biases_and_computes_the_same_logits(tmp_path):
    loaded = tiny_loaded()
    inputs = given(loaded, 0.6)
    pruned = prune("flap", inputs)
    result = extract(loaded, pruned.subnet, tmp_path / "flap", pruned.reformed)
    assert result.needs_remote_code
    small = AutoModelForCausalLM.from_pretrained(result.folder, trust_remote_code=True)
    assert small.model.layers[0].mlp.down_proj.bias is not None
    with torch.no_grad(), subnetwork_applied(loaded, pruned.subnet, pruned.reformed) as model:
        expected = model(input_ids=inputs.windows[:2]).logits
    with torch.no_grad():
        assert torch.allclose(small(input_ids=inputs.windows[:2]).logits, expected, atol=1e-4)
    assert loaded.adapter.output_projections(loaded.adapter.decoder_layers(loaded.model)[0])[1].bias is None


def test_taylor_importance_is_weight_times_gradient_over_coupled_weights():
    loaded = tiny_loaded()
    ids = windows(loaded, count=2)
    scores = taylor_importance(loaded, ids)
    model = loaded.model
    loss = sum(model(input_ids=w[None], labels=w[None]).loss for w in ids) / len(ids)
    layer = loaded.adapter.decoder_layers(model)[1]
    attn, mlp = layer.self_attn, layer.mlp
    weights = [attn.q_proj.weight, attn.o_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    q, o, gate, up, down = (
        (w * g).abs().double() for w, g in zip(weights, torch.autograd.grad(loss, weights), strict=True)
    )
    hd = loaded.dims.head_dim
    head = 1  # its rows of q_proj and columns of o_proj
    assert torch.isclose(scores.heads[1][head].double(), q[hd : 2 * hd].sum() + o[:, hd : 2 * hd].sum(), rtol=1e-4)
    neuron = 5  # its rows of gate and up, its column of down
    expected = gate[neuron].sum() + up[neuron].sum() + down[:, neuron].sum()
    assert torch.isclose(scores.neurons[1][neuron].double(), expected, rtol=1e-4)
    assert scores.kv_heads[1][0] > scores.heads[1][: loaded.dims.layers[1].group_size].sum()  # + its k, v rows
    assert all(p.grad is None for p in model.parameters())  # left as found
    assert all(p.requires_grad for p in model.parameters())


def test_taylor_importance_of_fused_weights_scores_each_block_as_its_unfused_weight():
    """Phi-3's qkv_proj and gate_up_proj: each unit scores its rows of every block, as the same weights unfused."""
    loaded = tiny_loaded("phi3")
    ids = windows(loaded, count=2)
    fused, unfused = taylor_importance(loaded, ids), taylor_importance(unfused_llama(loaded), ids)
    for name in ("heads", "kv_heads", "neurons"):
        for got, want in zip(getattr(fused, name), getattr(unfused, name), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)


def test_taylor_importance_of_opt_counts_the_bias_entries_of_each_units_rows():
    """OPT: a head scores its q rows and bias entries and its out_proj columns (not out_proj's bias, which
    stays); its key/value head adds the k and v rows and bias entries; a neuron its fc1 row and bias entry
    and its fc2 column."""
    loaded = tiny_loaded("opt")
    ids = windows(loaded, count=2)
    scores = taylor_importance(loaded, ids)
    model = loaded.model
    loss = sum(model(input_ids=w[None], labels=w[None]).loss for w in ids) / len(ids)
    layer = loaded.adapter.decoder_layers(model)[1]
    attn = layer.self_attn
    params = [getattr(getattr(attn, n), kind) for n in ("q_proj", "k_proj", "v_proj") for kind in ("weight", "bias")]
    params += [attn.out_proj.weight, layer.fc1.weight, layer.fc1.bias, layer.fc2.weight]
    q, qb, k, kb, v, vb, out, fc1, fc1b, fc2 = (
        (p * g).abs().double() for p, g in zip(params, torch.autograd.grad(loss, params), strict=True)
    )
    hd, head = loaded.dims.head_dim, 4
    rows = slice(head * hd, (head + 1) * hd)
    query = q[rows].sum() + qb[rows].sum() + out[:, rows].sum()
    assert qb[rows].sum() > 0 and torch.isclose(scores.heads[1][head].double(), query, rtol=1e-4)
    key_value = k[rows].sum() + kb[rows].sum() + v[rows].sum() + vb[rows].sum()
    assert torch.isclose(scores.kv_heads[1][head].double(), key_value + query, rtol=1e-4)  # a group of one head
    neuron = int(fc1b.argmax())  # a live one: ReLU gives a neuron that never fires no gradient
    expected = fc1[neuron].sum() + fc1b[neuron] + fc2[:, neuron].sum()
    assert fc1b[neuron] > 0 and torch.isclose(scores.neurons[1][neuron].double(), expected, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())  # left as found
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("enable_bias", [True, False])
def test_every_method_prunes_an_opt_and_flap_extracts_with_its_biases(tmp_path, enable_bias):
    """FLAP's compensation adds to OPT's own output biases (a stock-shaped bias), or, in an OPT without
    biases, gives slimlm's own model the biases it lacks; the reloaded model has the in-place logits."""
    loaded = tiny_loaded("opt", enable_bias=enable_bias)
    inputs = given(loaded, 0.6)
    for method in METHODS:
        pruned = prune(method, inputs)
        assert static_cost(loaded.dims, pruned.subnet.shapes()).params <= inputs.budget
    pruned = prune("flap", inputs)
    result = extract(loaded, pruned.subnet, tmp_path / "flap", pruned.reformed)
    small = AutoModelForCausalLM.from_pretrained(result.folder, trust_remote_code=True)
    assert small.config.slimlm_output_bias == (not enable_bias)  # OPT with biases has them already
    assert small.model.decoder.layers[0].fc2.bias is not None
    with torch.no_grad(), subnetwork_applied(loaded, pruned.subnet, pruned.reformed) as model:
        expected = model(input_ids=inputs.windows[:2]).logits
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=inputs.windows[:2]).logits, expected, rtol=1e-4, atol=1e-5)
    assert (loaded.model.model.decoder.layers[0].fc2.bias is None) == (not enable_bias)  # restored


def test_llm_pruner_keeps_the_first_and_last_layers_whole():
    loaded = tiny_loaded(num_hidden_layers=16)
    subnet = prune("llm-pruner", given(loaded, 0.7)).subnet
    full = loaded.dims.layers[0]
    whole = [i for i in subnet.kept_layers if subnet.layers[i].shape == full]
    assert whole == [0, 1, 15]  # 4/32 and 2/32 of 16 layers
    assert len({subnet.layers[i].shape for i in range(2, 15)}) == 1


@pytest.mark.parametrize("method", list(METHODS))
def test_an_infeasible_budget_is_a_clear_error(method):
    loaded = tiny_loaded()
    inputs = given(loaded, 0.01)
    with pytest.raises(SlimlmError, match=f"budget of {inputs.budget:,} parameters"):
        prune(method, inputs)


def test_unknown_method_and_bad_budgets_are_refused():
    loaded = tiny_loaded()
    with pytest.raises(SlimlmError, match="unknown pruning method 'sparsegpt'; choose from magnitude"):
        prune("sparsegpt", given(loaded, 0.5))
    with pytest.raises(SlimlmError, match="exactly one budget"):
        params_budget(loaded.dims)
    with pytest.raises(SlimlmError, match="fraction in"):
        params_budget(loaded.dims, 1.5)
    with pytest.raises(SlimlmError, match="exactly one budget"):
        params_budget(loaded.dims, 0.5, non_embedding=0.5)
    with pytest.raises(SlimlmError, match="--non-embedding must be a fraction"):
        params_budget(loaded.dims, non_embedding=0)


def test_a_non_embedding_budget_keeps_the_embeddings_whole_and_a_share_of_the_rest():
    dims = tiny_loaded().dims
    total, embedding = static_cost(dims).params, dims.embedding_params
    assert 0 < embedding < total
    assert params_budget(dims, non_embedding=1.0) == total
    assert params_budget(dims, non_embedding=0.5) == embedding + int(0.5 * (total - embedding))
    assert params_budget(dims, non_embedding=0.5) > params_budget(dims, 0.5)


def test_cli_prune_writes_a_model_that_loads_and_reports_its_perplexity(tmp_path, text):
    folder = save_tiny(tiny_loaded(), tmp_path / "tiny")
    out = tmp_path / "pruned"
    common = ["--calib", str(text), "--eval", str(text), "--seq-len", "16", "--calib-windows", "8"]
    result = invoke("prune", str(folder), "--method", "flap", "--params", "0.6", "--out", str(out), *common, "--json")
    assert result.exit_code == 0, result.output
    assert '"method": "flap"' in result.output
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) < 0.61 * sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters()
    )
    bad = invoke("prune", str(folder), "--method", "nope", "--params", "0.6", "--out", str(tmp_path / "x"), *common)
    assert bad.exit_code != 0 and "unknown pruning method 'nope'" in one_error(bad)
    assert not (tmp_path / "x").exists()
    # refused before any work: a model that does not exist is never reached
    missing = str(tmp_path / "missing")
    early = invoke("prune", missing, "--method", "nope", "--params", "0.6", "--out", str(tmp_path / "y"))
    assert early.exit_code != 0 and "unknown pruning method 'nope'" in one_error(early)
