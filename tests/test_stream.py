"""Models larger than memory: a streamed model (decoder layers read from disk as they run) computes
exactly what the same model held in memory computes, in every stage, with one layer resident at a time."""

from __future__ import annotations

import pytest
import torch

from slimlm.apply import subnetwork_applied
from slimlm.errors import SlimlmError
from slimlm.importance import calibrate, importance
from slimlm.library import build_library
from slimlm.models import load_model
from slimlm.reform import reform
from slimlm.stream import layer_stream

from .conftest import FAMILIES, save_tiny, tiny_loaded
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
    for a, b in zip(calibrations[0].mlp + calibrations[0].attention, calibrations[1].mlp + calibrations[1].attention):
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
    with pytest.raises(SlimlmError, match="without --stream"):
        with subnetwork_masked(streamed, candidate(streamed, importance(streamed, calibrate(streamed, WINDOWS)))):
            pass
