"""Extraction: the written model is a standalone stock-transformers model equal to the in-place one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from slimlm.apply import subnetwork_applied
from slimlm.costs import static_cost
from slimlm.errors import SlimlmError
from slimlm.extract import SUBNET_FILE, extract
from slimlm.subnet import LayerKeep, SubNetwork

from .conftest import FAMILIES, for_family, tiny_loaded
from .test_apply import INPUT, heterogeneous

CASES = {
    "uniform": SubNetwork({i: LayerKeep([0, 1, 3, 4], [0, 1], range(0, 40, 2)) for i in range(4)}),
    "layers_dropped": SubNetwork({i: LayerKeep(range(6), range(2), range(40)) for i in (0, 3)}),
    "gqa_pruned": SubNetwork({i: LayerKeep([3, 4, 5], [1], range(10, 30)) for i in range(4)}),
    "heterogeneous": heterogeneous(),
    # the first layer without attention (the KV cache must still count tokens), another without MLP
    "sub_blocks_removed": SubNetwork(
        {
            0: LayerKeep([], [], range(0, 40, 3)),
            1: LayerKeep([0, 1, 3, 4], [0, 1], range(20)),
            2: LayerKeep([3, 4, 5], [1], []),
            3: LayerKeep(range(6), range(2), range(40)),
        }
    ),
}
HETEROGENEOUS = {"heterogeneous", "sub_blocks_removed"}
# OPT's stock config sizes a head as hidden / heads: a model pruning heads, even alike in all layers, is slimlm's own
FEWER_HEADS = {"uniform", "gqa_pruned"}

# Runs in a fresh interpreter that never imports slimlm: what a user of the folder has.
RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    ids = torch.tensor(jobs["input"])
    for folder, remote in jobs["folders"]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            generated = model.generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        torch.save({"logits": logits, "generated": generated}, folder + "/reloaded.pt")
    assert not any(name.startswith("slimlm") for name in sys.modules)
    """
)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Every family x case extracted once, then reloaded together in one clean process."""
    results = {}
    for family in FAMILIES:
        for case, subnet in CASES.items():
            loaded, subnet = tiny_loaded(family), for_family(subnet, family)
            folder = tmp_path_factory.mktemp(f"{family}-{case}")
            info = extract(loaded, subnet, folder)
            with subnetwork_applied(loaded, subnet) as model, torch.no_grad():
                logits = model(input_ids=INPUT).logits
                generated = model.generate(INPUT[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
            results[family, case] = (loaded, info, logits, generated)
    jobs = {
        "input": INPUT.tolist(),
        "folders": [[str(i.folder), i.needs_remote_code] for _, i, _, _ in results.values()],
    }
    subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs)], check=True, timeout=300)
    return results


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_reloaded_model_has_the_in_place_logits_and_generation(extracted, family, case):
    _, info, logits, generated = extracted[family, case]
    reloaded = torch.load(info.folder / "reloaded.pt")
    torch.testing.assert_close(reloaded["logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(reloaded["generated"], generated)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_only_heterogeneous_models_need_remote_code(extracted, family, case):
    _, info, _, _ = extracted[family, case]
    config = json.loads((info.folder / "config.json").read_text())
    assert info.needs_remote_code == (case in HETEROGENEOUS or (family == "opt" and case in FEWER_HEADS))
    assert ("auto_map" in config) == info.needs_remote_code
    assert (info.folder / "modeling_slimlm.py").exists() == info.needs_remote_code
    assert config["num_hidden_layers"] == len(CASES[case].layers)
    if not info.needs_remote_code:
        shape = CASES[case].shapes()[0]
        assert config["model_type"] == family
        if family == "opt":  # multi-head: as many key/value heads as heads; the MLP width is ffn_dim
            assert (config["num_attention_heads"], config["ffn_dim"]) == (shape.heads, shape.neurons)
            return
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (shape.heads, shape.kv_heads)
        assert config["intermediate_size"] == shape.neurons


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_parameter_count_matches_the_static_cost(extracted, family, case):
    loaded, info, _, _ = extracted[family, case]
    assert info.params == static_cost(loaded.dims, for_family(CASES[case], family).shapes()).params


@pytest.mark.parametrize("family", FAMILIES)
def test_a_removed_sub_block_takes_its_norms_with_it(extracted, family):
    loaded, info, _, _ = extracted[family, "sub_blocks_removed"]  # layer 0 without attention, layer 2 without MLP
    names = set(load_file(info.folder / "model.safetensors"))
    layers = loaded.adapter.decoder_layers(loaded.model)
    path = next(name for name, module in loaded.model.named_modules() if module is layers)  # OPT: model.decoder.layers
    for layer, removed, kept in ((0, "attention", "mlp"), (2, "mlp", "attention")):
        for name, present in ((removed, False), (kept, True)):
            for attribute in loaded.adapter.sub_block_attributes(name):  # Gemma-3: two norms per sub-block
                prefix = f"{path}.{layer}.{attribute}."
                assert any(n.startswith(prefix) for n in names) == present, prefix


def test_folder_holds_tokenizer_and_subnetwork(extracted):
    _, info, _, _ = extracted["llama", "heterogeneous"]
    assert (info.folder / "tokenizer.json").is_file()
    assert SubNetwork.load(info.folder / SUBNET_FILE) == CASES["heterogeneous"]


def test_untied_embeddings_are_extracted_and_counted(tmp_path):
    loaded = tiny_loaded(tie_word_embeddings=False)
    assert not loaded.dims.tied_embeddings
    info = extract(loaded, CASES["uniform"], tmp_path / "out")
    assert info.params == static_cost(loaded.dims, CASES["uniform"].shapes()).params
    assert info.params > static_cost(tiny_loaded().dims, CASES["uniform"].shapes()).params


def test_extracted_slimlm_model_can_be_extracted_again(extracted, tmp_path):
    """A heterogeneous slimlm model is itself a valid MODEL: sub-networks of it extract too."""
    from slimlm.models import load_model

    _, info, _, _ = extracted["qwen2", "heterogeneous"]
    again = load_model(info.folder)
    assert again.dims.layers == tuple(CASES["heterogeneous"].shapes())
    smaller = SubNetwork({0: LayerKeep(range(6), range(2), range(40)), 2: LayerKeep([0], [0], range(13))})
    second = extract(again, smaller, tmp_path / "again")
    with subnetwork_applied(again, smaller) as model, torch.no_grad():
        expected = model(input_ids=INPUT).logits
    third = load_model(second.folder)
    torch.testing.assert_close(third.model(input_ids=INPUT).logits, expected, rtol=1e-5, atol=1e-5)


def test_refuses_to_write_into_a_folder_that_is_not_a_model(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(SlimlmError, match="not a model folder"):
        extract(tiny_loaded(), CASES["uniform"], mine)
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_kill_while_writing_leaves_the_old_folder_or_nothing_never_half_a_model(tmp_path, monkeypatch):
    loaded, out = tiny_loaded(), tmp_path / "small"
    extract(loaded, CASES["heterogeneous"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the kill comes after the weights, before the tokenizer

    monkeypatch.setattr(type(loaded.tokenizer), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(loaded, CASES["uniform"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old model, whole
    assert [p.name for p in tmp_path.iterdir()] == ["small"]  # no half-written folder beside it
    with pytest.raises(KeyboardInterrupt):
        extract(loaded, CASES["uniform"], tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_uniform_extraction_over_a_heterogeneous_one_leaves_no_stale_modeling_file(tmp_path):
    loaded, out = tiny_loaded(), tmp_path / "small"
    assert extract(loaded, CASES["heterogeneous"], out).needs_remote_code
    assert not extract(loaded, CASES["uniform"], out).needs_remote_code
    assert not (out / "modeling_slimlm.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())


def test_extract_never_writes_into_the_input_model_or_the_cache(tmp_path):
    from slimlm.cache import cache_root
    from slimlm.models import load_model

    from .conftest import save_tiny

    folder = save_tiny(tiny_loaded(), tmp_path / "model")
    loaded, weights = load_model(folder), (folder / "model.safetensors").read_bytes()
    for out in (folder, folder / "sub", tmp_path, cache_root() / "models" / "smollm2-135m"):
        with pytest.raises(SlimlmError, match=r"input model's folder|inside slimlm's cache"):
            extract(loaded, CASES["uniform"], out)
    assert (folder / "model.safetensors").read_bytes() == weights


def test_a_phi3_with_longrope_factors_and_fewer_heads_is_written_as_slimlms_own(tmp_path):
    """Phi3Config checks longrope factors against hidden_size // num_attention_heads, which pruned heads change
    (here 48 / 4 = 12 against a head of 8): the uniform model keeps the parent's head count in slimlm's config."""
    from slimlm.models import load_model

    factors = {"short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [3.0, 3.5, 4.0, 4.5]}  # head of 8: 4 each
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8} | factors
    loaded = tiny_loaded("phi3", rope_parameters=rope)
    info = extract(loaded, CASES["uniform"], tmp_path / "small")
    assert info.needs_remote_code
    with subnetwork_applied(loaded, CASES["uniform"]) as model, torch.no_grad():
        expected = model(input_ids=INPUT).logits  # 12 positions: past the original 8, the long factors
    again = load_model(info.folder)
    assert again.dims.layers == tuple(CASES["uniform"].shapes())
    torch.testing.assert_close(again.model(input_ids=INPUT).logits, expected, rtol=1e-5, atol=1e-5)
