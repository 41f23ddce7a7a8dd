"""Models larger than memory: a streamed model (decoder layers read from disk as they run) computes
exactly what the same model held in memory computes, in every stage, with one layer resident at a time."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.apply import subnetwork_applied
from slimlm.errors import SlimlmError
from slimlm.importance import calibrate, importance
from slimlm.library import build_library
from slimlm.models import load_model
from slimlm.reform import SpilledWeights, reform
from slimlm.stream import layer_stream

from .conftest import FAMILIES, invoke, save_tiny, tiny_loaded
from .test_apply import INPUT
from .test_library import SPACE, WINDOWS, candidate


@pytest.fixture(params=FAMILIES)
def pair(request, tmp_path):
    """The same tiny model of each family loaded from its folder twice: in memory, and streamed."""
    folder = save_tiny(tiny_loaded(request.param), tmp_path / request.param)
    return load_model(folder), load_model(folder, stream=True)


def resident_layers(loaded) -> int:
    """How many decoder layers hold weights now."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    return sum(not all(p.is_meta for p in layer.parameters()) for layer in layers)


def logits(loaded, subnet=None, reformed=None) -> torch.Tensor:
    with torch.no_grad():
        if subnet is None:
            return loaded.model(input_ids=INPUT).logits
        with subnetwork_applied(loaded, subnet, reformed) as model:
            return model(input_ids=INPUT).logits


def test_a_streamed_model_computes_the_same_logits_with_one_layer_resident(pair):
    memory, streamed = pair
    assert resident_layers(streamed) == 0 and layer_stream(memory.model) is None
    seen = []
    for layer in streamed.adapter.decoder_layers(streamed.model):
        layer.register_forward_pre_hook(lambda *_: seen.append(resident_layers(streamed)))  # after the read
    torch.testing.assert_close(logits(streamed), logits(memory), rtol=0, atol=0)
    assert seen == [1] * streamed.dims.num_layers  # each layer alone as it ran
    assert resident_layers(streamed) == 0
    assert streamed.fingerprint() == memory.fingerprint()  # caches and studies are shared with in-memory runs


def test_every_stage_on_a_stream_equals_it_in_memory(pair):
    """Calibration, importance, the variant library, a stitched candidate, sequential reformation."""
    memory, streamed = pair
    calibrations = [calibrate(m, WINDOWS) for m in (memory, streamed)]
    (a_mlp, a_attention), (b_mlp, b_attention) = ((c.mlp, c.attention) for c in calibrations)
    for a, b in zip(a_mlp + a_attention, b_mlp + b_attention, strict=True):
        torch.testing.assert_close(a.sumsq, b.sumsq)
        torch.testing.assert_close(a.removal_rank, b.removal_rank)
    scores = [importance(m, c, "activation") for m, c in zip((memory, streamed), calibrations, strict=True)]
    for a, b in zip(scores[0].neurons + scores[0].heads, scores[1].neurons + scores[1].heads, strict=True):
        torch.testing.assert_close(a, b)
    subnet = candidate(memory, scores[0])
    library = build_library(memory, scores[0], SPACE, WINDOWS)
    stitched = library.reformed(subnet)
    expected = logits(memory, subnet, stitched)
    torch.testing.assert_close(logits(streamed, subnet, stitched), expected, rtol=0, atol=0)
    assert resident_layers(streamed) == 0
    torch.testing.assert_close(logits(streamed), logits(memory), rtol=0, atol=0)  # the full model again
    reformed = [reform(m, subnet, WINDOWS) for m in (memory, streamed)]
    assert isinstance(reformed[1], SpilledWeights)  # a model's worth of projections: on disk, not in memory
    assert reformed[0].keys() == reformed[1].keys()
    for key in reformed[0]:
        torch.testing.assert_close(reformed[0][key], reformed[1][key])


def test_the_library_built_on_a_stream_is_the_one_built_in_memory(tmp_path, monkeypatch):
    folder = save_tiny(tiny_loaded("llama"), tmp_path / "llama")
    memory, streamed = load_model(folder), load_model(folder, stream=True)
    scores = importance(memory, calibrate(memory, WINDOWS), "activation")
    libraries = []
    for i, loaded in enumerate((memory, streamed)):
        monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / f"cache-{i}"))  # built twice, not read back
        libraries.append(build_library(loaded, scores, SPACE, WINDOWS))
    subnet = candidate(memory, scores)
    a, b = (library.reformed(subnet) for library in libraries)
    assert a.keys() == b.keys() and len(a) == 5
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_training_refuses_a_streamed_model(pair):
    from slimlm.apply import subnetwork_masked

    _, streamed = pair
    subnet = candidate(streamed, importance(streamed, calibrate(streamed, WINDOWS)))
    with pytest.raises(SlimlmError, match="without --stream"), subnetwork_masked(streamed, subnet):
        pass


def test_extraction_from_a_stream_writes_the_model_extraction_in_memory_writes(pair, tmp_path):
    """A shard per kept layer, read by stock transformers into the same weights, config and logits."""
    from transformers import AutoModelForCausalLM

    from slimlm.extract import extract

    memory, streamed = pair
    scores = importance(memory, calibrate(memory, WINDOWS), "activation")
    subnet = candidate(memory, scores)
    reformed = build_library(memory, scores, SPACE, WINDOWS).reformed(subnet)
    written = [extract(m, subnet, tmp_path / name, reformed) for m, name in ((memory, "memory"), (streamed, "stream"))]
    assert written[0].params == written[1].params and written[0].needs_remote_code == written[1].needs_remote_code
    assert len(list(written[1].folder.glob("model-*.safetensors"))) == len(subnet.kept_layers) + 1
    models = [
        AutoModelForCausalLM.from_pretrained(w.folder, trust_remote_code=w.needs_remote_code).eval() for w in written
    ]
    configs = [json.loads((w.folder / "config.json").read_text()) for w in written]
    assert configs[0] == configs[1]
    states = [m.state_dict() for m in models]
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(models[1](input_ids=INPUT).logits, logits(memory, subnet, reformed))


def test_compress_with_stream_ships_the_model_compress_in_memory_ships(text, tmp_path):
    """The whole job streamed (search, reformation, extraction, the comparison) chooses, writes and
    measures what the in-memory job does; the report says the speeds were taken streamed."""
    dense = save_tiny(tiny_loaded("llama"), tmp_path / "llama")
    settings = ["--calib", text, "--eval", text, "--seq-len", "16", "--calib-windows", "8", "--fitness-windows", "2"]
    settings += ["--refine-windows", "12"]
    settings += ["--eval-windows", "2", "--evaluations", "8", "--params", "0.6", "--json"]
    reports = []
    # refinement trains in memory: a streamed job skips it and says so (the in-memory one runs without it)
    for name, extra in (("memory", ["--refine-epochs", "0"]), ("stream", ["--stream"])):
        result = invoke("compress", dense, "--out", tmp_path / name, *settings, *extra)
        assert result.exit_code == 0, result.output
        reports.append(json.loads((tmp_path / name / "slimlm_report.json").read_text()))
    memory, streamed = reports
    assert not memory["streamed"] and streamed["streamed"]
    subnets = [json.loads((tmp_path / n / "best" / "slimlm_subnetwork.json").read_text()) for n in ("memory", "stream")]
    assert subnets[0]["layers"] == subnets[1]["layers"]
    for model in ("dense", "compressed"):
        assert streamed[model]["params"] == memory[model]["params"]
        assert streamed[model]["perplexity"] == pytest.approx(memory[model]["perplexity"], rel=1e-5)
    assert streamed["chat"]["kl_per_token"] == pytest.approx(memory["chat"]["kl_per_token"], rel=1e-4, abs=1e-6)
    assert "streamed from disk" in (tmp_path / "stream" / "report.md").read_text()
    assert memory["refinement"] is None and "not refined: the model is streamed" in streamed["summary"]
