"""Sub-networks: validation against the model, JSON round trip."""

from __future__ import annotations

import json

import pytest

from slimlm.errors import SlimlmError
from slimlm.subnet import FORMAT, LayerKeep, SubNetwork

from .conftest import tiny_loaded


@pytest.fixture(scope="module")
def dims():
    return tiny_loaded().dims  # 4 layers; 6 heads in 2 kv groups of 3; 40 neurons


def keep(heads=range(6), kv=range(2), neurons=range(40)) -> LayerKeep:
    return LayerKeep(heads, kv, neurons)


def test_full_subnetwork_is_valid_and_keeps_everything(dims):
    full = SubNetwork.full(dims)
    assert full.validate(dims) is full
    assert full.shapes() == list(dims.layers)


def test_indices_are_sorted_and_unique():
    assert LayerKeep([3, 1, 1, 0], [1, 0, 0], [5, 2]).heads == (0, 1, 3)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({}, "keeps no layers"),
        ({4: keep()}, "layer 4 is out of range"),
        ({-1: keep()}, "layer -1 is out of range"),
        ({0: keep(heads=[], kv=[], neurons=[])}, "keeps neither attention nor MLP; leave the layer out"),
        ({0: keep(heads=[])}, "heads and kv_heads must be both empty"),
        ({0: keep(kv=[])}, "heads and kv_heads must be both empty"),
        ({0: keep(heads=[6, 7, 8])}, "heads index 6 out of range"),
        ({0: keep(neurons=[40])}, "neurons index 40 out of range"),
        ({0: keep(heads=[0, 1, 3], kv=[0])}, "query head 3 is kept without its key/value head 1"),
        ({0: keep(heads=[0, 1], kv=[0, 1])}, "key/value head 1 is kept with no query head"),
        ({0: keep(heads=[0, 1, 3], kv=[0, 1])}, "same number of query heads"),
    ],
)
def test_invalid_subnetworks_are_refused_with_a_clear_message(dims, layers, message):
    with pytest.raises(SlimlmError, match=message):
        SubNetwork(layers).validate(dims)


def test_gqa_pruned_layers_are_valid(dims):
    SubNetwork({0: keep(heads=[0, 2, 4, 5], kv=[0, 1]), 2: keep(heads=[3], kv=[1], neurons=[7])}).validate(dims)


def test_a_layer_may_lose_its_attention_or_its_mlp_alone(dims):
    subnet = SubNetwork({0: keep(heads=[], kv=[]), 1: keep(neurons=[]), 3: keep()}).validate(dims)
    assert [s.has_attention for s in subnet.shapes()] == [False, True, True]
    assert [s.has_mlp for s in subnet.shapes()] == [True, False, True]
    assert SubNetwork.from_compact(subnet.to_compact()) == subnet


def test_json_round_trip(tmp_path):
    subnet = SubNetwork({2: keep(heads=[4, 5], kv=[1], neurons=[3, 9]), 0: keep()})
    path = tmp_path / "s.json"
    subnet.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT
    assert list(data["layers"]) == ["0", "2"]
    assert data["layers"]["2"] == {"heads": [4, 5], "kv_heads": [1], "neurons": [3, 9]}
    assert SubNetwork.load(path) == subnet


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"layers": {}}', "not a slimlm sub-network"),
        (json.dumps({"format": FORMAT, "layers": {"0": {"heads": [0]}}}), "malformed sub-network"),
        (json.dumps({"format": FORMAT, "layers": {"x": {"heads": [], "kv_heads": [], "neurons": []}}}), "malformed"),
    ],
)
def test_bad_files_are_refused(tmp_path, text, message):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(SlimlmError, match=message):
        SubNetwork.load(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(SlimlmError, match="not found"):
        SubNetwork.load(tmp_path / "nope.json")
