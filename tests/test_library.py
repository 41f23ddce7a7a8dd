"""The variant library: stitched candidates equal direct application, cache keys, resume after a kill;
the KL fitness; multi-fidelity evolution over levels with sub-block removal."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from slimlm import evaluate as evaluate_module
from slimlm import library as library_module
from slimlm import reform as reform_module
from slimlm.apply import subnetwork_applied
from slimlm.errors import SlimlmError
from slimlm.evaluate import coarse_kl, dense_reference, fitness, perplexity
from slimlm.importance import activation_importance
from slimlm.library import build_library
from slimlm.models.base import LayerShape
from slimlm.reform import ridge
from slimlm.search import SearchJob, fidelity_stages, search
from slimlm.space import SearchSpace, keep_most_important
from slimlm.strategies import completed, stage_of
from slimlm.subnet import LayerKeep, SubNetwork

from .conftest import FAMILIES, VOCAB, fast_search_settings, save_tiny, tiny_loaded
from .test_apply import INPUT, heterogeneous

WINDOWS = torch.randint(1, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))
SPACE = SearchSpace(step=0.25)


def built(loaded, space=SPACE, windows=WINDOWS):
    scores = activation_importance(loaded, windows)
    return scores, build_library(loaded, scores, space, windows)


def candidate(loaded, scores) -> SubNetwork:
    """A heterogeneous candidate on the space's levels, with a removed attention and a removed MLP."""
    dims = loaded.dims
    shapes = {0: LayerShape(0, 0, 16), 1: LayerShape(4, 2, 32), 2: LayerShape(3, 1, 0), 3: LayerShape(6, 2, 8)}
    if dims.family == "opt":  # multi-head: every query head its own key/value head
        shapes = {i: LayerShape(s.heads, s.heads, s.neurons) for i, s in shapes.items()}
    assert all(
        (s.heads, s.kv_heads) in [(a.heads, a.kv_heads) for a in SPACE.attention_levels(dims.layers[i])]
        and s.neurons in SPACE.mlp_levels(dims.layers[i])
        for i, s in shapes.items()
    )
    return keep_most_important(dims, scores, shapes)


def direct_reformation(loaded, subnet: SubNetwork, windows) -> dict:
    """The library's reformation computed from scratch: per layer, Ŵ from the dense inputs' Gram matrix."""
    adapter, layers = loaded.adapter, loaded.adapter.decoder_layers(loaded.model)
    captured = {}
    hooks = []
    for i in subnet.layers:
        for name, linear in zip(("attention", "mlp"), adapter.output_projections(layers[i]), strict=True):
            store = captured.setdefault((i, name), [])
            hooks.append(linear.register_forward_pre_hook(lambda _m, a, store=store: store.append(a[0].detach())))
    with torch.no_grad():
        loaded.model(input_ids=windows, use_cache=False)
    for hook in hooks:
        hook.remove()
    head_dim, reformed = loaded.dims.head_dim, {}
    for (i, name), inputs in captured.items():
        keep, full = subnet.layers[i], loaded.dims.layers[i]
        x = torch.cat(inputs).reshape(-1, inputs[0].shape[-1]).double()
        units = keep.heads if name == "attention" else keep.neurons
        if not units or len(units) == (full.heads if name == "attention" else full.neurons):
            continue
        kept = torch.tensor(units)
        cols = (kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1) if name == "attention" else kept
        gram = x.T @ x
        weight = adapter.output_projections(layers[i])[0 if name == "attention" else 1].weight.double()
        reformed[i, name] = ridge(weight @ gram[:, cols], gram[cols][:, cols]).float()
    return reformed


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stitched_candidate_equals_it_applied_with_the_same_reformation(family):
    loaded = tiny_loaded(family)
    scores, library = built(loaded)
    subnet = candidate(loaded, scores)
    stitched = library.reformed(subnet)
    direct = direct_reformation(loaded, subnet, WINDOWS)
    assert set(stitched) == set(direct) and len(direct) == 5  # layer 0 MLP, 1 both, 2 attention, 3 MLP
    with torch.no_grad():
        with subnetwork_applied(loaded, subnet, stitched) as model:
            got = model(input_ids=INPUT).logits
        with subnetwork_applied(loaded, subnet, direct) as model:
            expected = model(input_ids=INPUT).logits
        with subnetwork_applied(loaded, subnet) as model:
            unreformed = model(input_ids=INPUT).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, unreformed, atol=1e-3)  # the weights really are reformed


def test_the_library_refuses_a_candidate_whose_units_are_not_its_own():
    loaded = tiny_loaded()
    scores, library = built(loaded)
    subnet = candidate(loaded, scores)
    other = SubNetwork(dict(subnet.layers) | {3: LayerKeep(range(6), range(2), range(32, 40))})
    with pytest.raises(SlimlmError, match="layer 3: the candidate's kept mlp units are not the library's"):
        library.reformed(other)
    odd = SubNetwork(dict(subnet.layers) | {3: LayerKeep(range(6), range(2), range(17))})
    with pytest.raises(SlimlmError, match="layer 3: mlp at 17 units is not a level of the library"):
        library.reformed(odd)


def test_a_candidate_reads_only_its_own_levels_when_used_and_nothing_stays_in_memory(monkeypatch):
    """The library is several times the model on disk: holding the levels read so far would make it
    resident (1.8 GB for SmolLM2); each candidate reads just its own projections."""
    loaded = tiny_loaded()
    scores, library = built(loaded)
    subnet = candidate(loaded, scores)
    first = library.reformed(subnet)
    read = []
    real = reform_module.safe_open

    class Recorded:
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def __enter__(self):
            self.opened = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.opened.get_tensor(key)

    monkeypatch.setattr(reform_module, "safe_open", Recorded)
    again = library.reformed(subnet)
    assert read == []  # a weight is read when it is looked up (a streamed layer's as the layer is read)
    weights = {key: again[key] for key in again}  # read again, not served from memory
    assert sorted(read) == sorted(["mlp.16", "attention.4x2", "mlp.32", "attention.3x1", "mlp.8"])
    assert again.keys() == first.keys()
    for key in first:
        torch.testing.assert_close(weights[key], first[key], rtol=0, atol=0)


def test_the_cache_is_keyed_on_weights_text_and_levels(monkeypatch):
    loaded = tiny_loaded()
    scores, library = built(loaded)
    writes = []
    real = library_module._write_layer
    monkeypatch.setattr(library_module, "_write_layer", lambda *a: writes.append(a[1]) or real(*a))
    assert build_library(loaded, scores, SPACE, WINDOWS).folder == library.folder  # reused
    assert writes == []
    assert build_library(loaded, scores, SPACE, WINDOWS[:4]).folder != library.folder  # other text
    assert build_library(loaded, scores, SearchSpace(step=0.5), WINDOWS).folder != library.folder  # other levels
    with torch.no_grad():
        loaded.model.model.layers[2].mlp.up_proj.weight[0, 0] += 1e-3  # other weights, same shapes and names
    assert build_library(loaded, scores, SPACE, WINDOWS).folder != library.folder
    assert len(writes) == 3 * loaded.dims.num_layers


def test_a_killed_build_resumes_at_the_first_missing_layer(monkeypatch):
    loaded = tiny_loaded()
    scores = activation_importance(loaded, WINDOWS)
    real, calls = library_module._write_layer, []

    def dies_at_layer_2(*args):
        calls.append(args[1])
        if args[1] == 2:
            raise KeyboardInterrupt  # a kill
        return real(*args)

    monkeypatch.setattr(library_module, "_write_layer", dies_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        build_library(loaded, scores, SPACE, WINDOWS)
    monkeypatch.setattr(library_module, "_write_layer", lambda *a: calls.append(a[1]) or real(*a))
    resumed = build_library(loaded, scores, SPACE, WINDOWS)
    assert calls == [0, 1, 2, 2, 3]  # layers 0 and 1 were kept
    assert not list(resumed.folder.glob("*.tmp"))
    subnet = candidate(loaded, scores)
    direct = direct_reformation(loaded, subnet, WINDOWS)
    for key, weight in resumed.reformed(subnet).items():
        torch.testing.assert_close(weight, direct[key], rtol=1e-4, atol=1e-5)


def test_a_damaged_layer_file_is_rebuilt():
    loaded = tiny_loaded()
    scores, library = built(loaded)
    path = library.folder / "layer-0001.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    rebuilt = build_library(loaded, scores, SPACE, WINDOWS)
    subnet = candidate(loaded, scores)
    assert set(rebuilt.reformed(subnet)) == set(direct_reformation(loaded, subnet, WINDOWS))


# --- the KL fitness -----------------------------------------------------------------------------


def test_kl_fitness_is_zero_for_dense_and_exact_with_the_whole_vocabulary():
    loaded = tiny_loaded()
    dense_full = dense_reference(loaded.model, WINDOWS, top_k=VOCAB)
    dense_top = dense_reference(loaded.model, WINDOWS, top_k=8)
    assert fitness(loaded.model, dense_top, len(WINDOWS))["kl"] == pytest.approx(0, abs=1e-6)
    subnet = SubNetwork({i: LayerKeep([0, 1, 3, 4], [0, 1], range(0, 40, 2)) for i in range(4)})
    with torch.no_grad(), subnetwork_applied(loaded, subnet) as model:
        scores = fitness(model, dense_full, len(WINDOWS))
        coarse = fitness(model, dense_top, len(WINDOWS))["kl"]
        candidate_logprobs = F.log_softmax(model(input_ids=WINDOWS).logits[:, :-1], dim=-1)
    dense_logprobs = F.log_softmax(loaded.model(input_ids=WINDOWS).logits[:, :-1], dim=-1).detach()
    exact = (
        F.kl_div(candidate_logprobs, dense_logprobs, log_target=True, reduction="sum") / dense_logprobs[..., 0].numel()
    )
    assert scores["kl"] == pytest.approx(exact.item(), rel=1e-3)  # float32 sums of small terms
    assert 0 < coarse <= scores["kl"] + 1e-6  # a coarsened distribution's KL bounds the full one from below
    assert scores["perplexity"] > 1


@pytest.mark.parametrize("family", FAMILIES)
def test_fitness_and_perplexity_in_parts_are_those_of_the_whole_logits(family, monkeypatch):
    """The dense reference (its top-k merged part by part), the KL fitness and perplexity take a part of the
    vocabulary at a time for every position of a batch: the figures the causal-LM's whole logits give,
    Gemma's soft cap included."""
    cap = {"final_logit_softcapping": 0.25} if family == "gemma3_text" else {}  # binds on tiny random weights
    loaded = tiny_loaded(family, **cap)
    subnet = heterogeneous(family)
    calls, head = [], evaluate_module.head_logits
    monkeypatch.setattr(evaluate_module, "PART_BYTES", 4 * VOCAB * 4 * 5)  # 5 positions, or 32 tokens of 4 windows
    monkeypatch.setattr(evaluate_module, "head_logits", lambda *a, **k: calls.append(1) or head(*a, **k))
    reference = dense_reference(loaded.model, WINDOWS, top_k=8)
    assert len(calls) == 3 + 2  # 4 windows in three parts of the vocabulary, then 2 windows in two
    with torch.no_grad():
        dense = loaded.model(input_ids=WINDOWS[:, :-1], use_cache=False).logits.log_softmax(-1)
    top = dense.topk(8)
    assert torch.equal(reference.indices, top.indices)
    torch.testing.assert_close(reference.logprobs, top.values, rtol=0, atol=1e-6)
    with subnetwork_applied(loaded, subnet) as model, torch.no_grad():
        calls.clear()
        scores, ppl = fitness(model, reference, len(WINDOWS)), perplexity(model, WINDOWS)
        logprobs = model(input_ids=WINDOWS[:, :-1], use_cache=False).logits.log_softmax(-1)
    assert len(calls) == 2 * (3 + 2)  # each as the reference
    nll = -logprobs.gather(-1, WINDOWS[:, 1:, None]).mean().item()
    kl = coarse_kl(reference.logprobs, logprobs.gather(-1, reference.indices)).mean().item()
    assert scores["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert scores["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5) and ppl == pytest.approx(
        math.exp(nll), rel=1e-5
    )


def test_fidelity_stages_grow_by_four_up_to_every_fitness_window():
    assert fidelity_stages(32, 3) == (2, 8, 32)
    assert fidelity_stages(32, 1) == (32,)
    assert fidelity_stages(2, 3) == (1, 2)


# --- multi-fidelity evolution -------------------------------------------------------------------


@pytest.fixture(scope="module")
def evolved(tmp_path_factory, text):
    folder = save_tiny(tiny_loaded(), tmp_path_factory.mktemp("model") / "llama")
    job = SearchJob(
        model=str(folder),
        out=str(tmp_path_factory.mktemp("run") / "run"),
        params_fraction=0.6,
        evaluations=24,
        **(fast_search_settings(text) | {"fitness_windows": 8}),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        searcher, study = search(job)
    return job, searcher, study


def test_each_generation_promotes_its_best_quarter_stage_by_stage(evolved):
    _, searcher, study = evolved
    assert searcher.context.stages == (1, 2, 8)
    trials = completed(study)
    generation = lambda t: t.user_attrs["generation"]  # noqa: E731
    assert sorted({generation(t) for t in trials}) == [0, 1]  # 16 first-stage candidates, then 8
    for trial in trials:
        stage = stage_of(trial)
        assert trial.user_attrs["fitness_windows"] == searcher.context.stages[stage]
        if stage == 0:
            continue
        below = [t for t in trials if stage_of(t) == stage - 1 and generation(t) == generation(trial)]
        assert all(t.number < trial.number for t in below)  # promoted once its generation was done below
        best = sorted(below, key=lambda t: t.values[0])[: max(1, len(below) // 4)]
        assert trial.user_attrs["subnet"] in {t.user_attrs["subnet"] for t in best}
    counts = [[sum(stage_of(t) == s and generation(t) == g for t in trials) for s in range(3)] for g in (0, 1)]
    assert counts == [[16, 4, 1], [8, 2, 1]]


def test_evolution_removes_sub_blocks_and_fills_the_budget(evolved):
    _, searcher, study = evolved
    subnets = [SubNetwork.from_compact(t.user_attrs["subnet"]) for t in completed(study)]
    shapes = [s for subnet in subnets for s in subnet.shapes()]
    assert any(not s.has_attention for s in shapes) or any(not s.has_mlp for s in shapes)
    budget = searcher.budget.params
    children = [
        t for t in completed(study) if t.user_attrs["subnet"] not in {s.to_compact() for s in searcher.context.starts}
    ]
    assert children
    for trial in children:
        assert trial.user_attrs["params"] <= budget
        assert trial.user_attrs["params"] >= 0.9 * budget  # the repair steps sub-blocks up while they fit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_levels_written_one_at_a_time_read_back_with_safetensors(tmp_path, dtype):
    from safetensors import safe_open

    tensors = {"attention.4x2": torch.randn(6, 8).to(dtype), "mlp.3": torch.randn(6, 3).to(dtype)}
    path = tmp_path / "layer.safetensors"
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    library_module._write_safetensors(path, shapes, dtype, {"format": "x"}, iter(tensors.items()))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "x"} and set(f.keys()) == set(tensors)
        for key, tensor in tensors.items():
            torch.testing.assert_close(f.get_tensor(key), tensor, rtol=0, atol=0)
    with pytest.raises(SlimlmError, match="does not match its place"):
        library_module._write_safetensors(path, shapes, dtype, {}, iter(reversed(tensors.items())))
