"""The real SmolLM2-135M model: perplexity in a sane range, and a 70% sub-network extracted and reloaded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from slimlm.apply import subnetwork_applied
from slimlm.costs import static_cost
from slimlm.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.extract import extract
from slimlm.importance import activation_importance
from slimlm.models import load_model
from slimlm.space import uniform_subnetwork

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_dense_perplexity_is_in_a_sane_range(smollm):
    ids = model_windows(smollm, DEFAULT_EVALUATION, 512, 4)
    assert 12 < perplexity(smollm.model, ids) < 40  # about 22 on the opening of Pride and Prejudice


def test_seventy_percent_subnetwork_reloads_with_stock_transformers(smollm, tmp_path):
    calib = model_windows(smollm, DEFAULT_CALIBRATION, 256, 4)
    subnet = uniform_subnetwork(smollm.dims, activation_importance(smollm, calib), 0.7)
    full = static_cost(smollm.dims).params
    assert 0.65 * full < static_cost(smollm.dims, subnet.shapes()).params <= 0.7 * full
    info = extract(smollm, subnet, tmp_path / "small")
    assert not info.needs_remote_code
    ids = model_windows(smollm, DEFAULT_EVALUATION, 64, 2)
    with subnetwork_applied(smollm, subnet) as model, torch.no_grad():
        expected = model(input_ids=ids).logits
        sub_ppl = perplexity(model, ids)
    code = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
        with torch.no_grad():
            torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
        """
    )
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", code, str(info.folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True,
        timeout=300,
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-4, atol=1e-4)
    assert json.loads((info.folder / "config.json").read_text())["num_hidden_layers"] == 30
    assert sub_ppl > 1  # finite and a real distribution; quality is the benchmarks' business
