"""Layer-wise refinement of an extracted model: it moves towards the dense model, layer k learns from the
dense layer it came from, and weights keep their dtype."""

from __future__ import annotations

import pytest
import torch

from slimlm.evaluate import perplexity
from slimlm.extract import extract
from slimlm.models import load_model
from slimlm.refine import refine, refine_extracted
from slimlm.reform import reform
from slimlm.subnet import LayerKeep, SubNetwork

from .conftest import FAMILIES, tiny_loaded
from .test_apply import heterogeneous

IDS = torch.randint(3, 96, (8, 24), generator=torch.Generator().manual_seed(0))


def extracted(loaded, subnet, folder, reformed=None):
    return load_model(extract(loaded, subnet, folder, reformed).folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kept_layer_fits_its_target_better_after_refinement(family, tmp_path):
    loaded = tiny_loaded(family)
    subnet = heterogeneous(family)
    small = extracted(loaded, subnet, tmp_path / "small", reform(loaded, subnet, IDS))
    errors = refine(small, loaded, subnet.kept_layers, IDS)
    assert sorted(errors) == subnet.kept_layers
    assert errors[0] == (0.0, 0.0)  # layer 0 is kept whole on the dense model's own inputs: nothing to fit
    assert all(after < before for before, after in (errors[i] for i in (2, 3))), errors


@pytest.mark.parametrize("family", FAMILIES)
def test_each_kept_layer_learns_from_the_dense_layer_it_came_from(family, tmp_path):
    """Layer 1 removed, the others whole: each kept layer already gives its dense layer's output on
    whatever it receives, so with no drift to undo nothing may change; learning from the dense layer at
    its own position in the smaller model (the dense layer 1 for the kept layer 2) would change it."""
    loaded = tiny_loaded(family)
    full = LayerKeep.full(loaded.dims.layers[0])
    subnet = SubNetwork({i: full for i in (0, 2, 3)})
    small = extracted(loaded, subnet, tmp_path / "small")
    before = {k: v.clone() for k, v in small.model.state_dict().items()}
    refine(small, loaded, subnet.kept_layers, IDS, learning_rate=1e-2, drift=0.0)
    after = small.model.state_dict()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-6, msg=name)


def test_a_bf16_model_is_refined_in_float32_and_keeps_its_dtype(tmp_path):
    loaded = tiny_loaded("llama")
    subnet = heterogeneous("llama")
    small = extracted(loaded, subnet, tmp_path / "small")
    small.model.to(torch.bfloat16)
    before = {k: v.clone() for k, v in small.model.state_dict().items()}
    refine(small, loaded, subnet.kept_layers, IDS)
    after = small.model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in after.values())
    assert any(not torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("unrefined", [float("inf"), 0.0])
def test_a_refined_model_is_written_back_only_when_it_scores_lower_on_selection(unrefined, tmp_path):
    loaded = tiny_loaded("llama")
    subnet = heterogeneous("llama")
    folder = tmp_path / "small"
    extract(loaded, subnet, folder, reform(loaded, subnet, IDS))
    written = load_model(folder).model.state_dict()
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    selection = IDS[:, :12]
    result = refine_extracted(folder, loaded, subnet.kept_layers, IDS, selection, IDS, unrefined)
    for name, value in loaded.model.state_dict().items():  # the teacher (the embeddings it lent too) is untouched
        assert torch.equal(value, dense[name]), name
    assert result["kept"] == (unrefined == float("inf"))
    again = load_model(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["small"]  # no scratch folder left beside it
    if result["kept"]:
        assert perplexity(again.model, selection) == pytest.approx(result["selection_perplexity"]["refined"])
        assert perplexity(again.model, IDS) == pytest.approx(result["evaluation_perplexity"])
    else:
        for name, value in again.model.state_dict().items():
            assert torch.equal(value, written[name]), name
