"""Every stage in the model's dtype and on its device: bfloat16 on the CPU here, and on a GPU the same
tests again (``pytest -m gpu``; they skip, naming why, where torch sees no CUDA device)."""

from __future__ import annotations

import json
import math

import gguf
import pytest
import torch

from slimlm.apply import subnetwork_applied
from slimlm.data import token_windows
from slimlm.export import export_gguf
from slimlm.extract import extract
from slimlm.importance import calibrate, importance
from slimlm.models import load_model
from slimlm.reform import reform
from slimlm.subnet import LayerKeep, SubNetwork

from .conftest import FAMILIES, TEXT, invoke, one_error, save_tiny, tiny_loaded

GPU = pytest.mark.gpu
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with -m gpu where one is)")
PLACES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[GPU, NO_CUDA]),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=[GPU, NO_CUDA]),
]


def placed(family: str, device: str, dtype: torch.dtype):
    loaded = tiny_loaded(family)
    loaded.model.to(device=device, dtype=dtype)
    return loaded


def ragged(dims) -> SubNetwork:
    """Every kind of change: fewer heads and KV groups, fewer neurons, a removed MLP, a removed layer."""
    layers = {}
    for i, shape in enumerate(dims.layers[:-1]):  # the last layer dropped
        group = shape.heads // shape.kv_heads
        kv = list(range(max(1, shape.kv_heads - 1)))
        heads = [k * group + j for k in kv for j in range(group)]
        neurons = [] if i == 1 else list(range(0, shape.neurons, 2))
        layers[i] = LayerKeep(heads, kv, neurons)
    return SubNetwork(layers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("device", "dtype"), PLACES)
def test_calibration_reformation_and_extraction_in_the_models_dtype_and_device(tmp_path, family, device, dtype):
    loaded = placed(family, device, dtype)
    windows = token_windows(loaded.tokenizer, TEXT, 16, 8)
    calibration = calibrate(loaded, windows)
    assert calibration.attention[0].sum.dtype == torch.float64  # statistics in float64 whatever the weights
    scores = importance(loaded, calibration)
    assert all(torch.isfinite(h).all() for h in scores.heads)
    subnet = ragged(loaded.dims)
    reformed = reform(loaded, subnet, windows)
    assert {w.dtype for w in reformed.values()} == {dtype} and {w.device.type for w in reformed.values()} == {device}
    ids = windows[:2].to(device)
    with subnetwork_applied(loaded, subnet, reformed) as model, torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.isfinite(expected).all()
    info = extract(loaded, subnet, tmp_path / "small", reformed)
    small = load_model(info.folder, dtype=str(dtype).removeprefix("torch."), device=device)
    assert {p.dtype for p in small.model.parameters()} == {dtype}  # written as it was loaded
    with torch.no_grad():
        # half-precision rounding differs between the full and the smaller matmuls; a wrong weight is off by ~1
        torch.testing.assert_close(small.model(input_ids=ids).logits, expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize(("device", "dtype"), PLACES)
def test_the_variant_library_stitches_on_the_models_device(device, dtype):
    from .test_library import WINDOWS, built, candidate

    loaded = placed("llama", device, dtype)
    scores, library = built(loaded)
    subnet = candidate(loaded, scores)
    reformed = library.reformed(subnet)
    assert {w.dtype for w in reformed.values()} == {dtype}
    with subnetwork_applied(loaded, subnet, reformed) as model, torch.no_grad():
        logits = model(input_ids=WINDOWS[:1].to(device)).logits
    assert torch.isfinite(logits).all() and logits.dtype == dtype and logits.device.type == device


@pytest.mark.parametrize(("device", "dtype"), PLACES)
def test_a_gguf_is_written_from_the_models_dtype_and_device(tmp_path, device, dtype):
    from .test_export import bpe_model

    loaded = bpe_model(tmp_path)
    loaded.model.to(device=device, dtype=dtype)
    path = export_gguf(loaded, tmp_path / "m.gguf", "f16", tokenizer_pre="default").path
    reader = gguf.GGUFReader(path)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    source = loaded.model.get_input_embeddings().weight.detach().to("cpu", torch.float32)
    torch.testing.assert_close(torch.from_numpy(embedding.data.astype("float32")), source.half().float())


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=[GPU, NO_CUDA])])
def test_compress_in_bfloat16_writes_a_bfloat16_model(tmp_path, text, device):
    dense = save_tiny(tiny_loaded("qwen2"), tmp_path / "dense")
    out = tmp_path / "run"
    fast = ["--calib", text, "--eval", text, "--seq-len", "16", "--calib-windows", "8", "--fitness-windows", "2"]
    fast += ["--refine-windows", "12"]
    fast += ["--eval-windows", "2", "--evaluations", "6", "--dtype", "bfloat16", "--device", device]
    result = invoke("compress", dense, "--params", "0.6", "--out", out, *fast)
    assert result.exit_code == 0, result.output
    best = load_model(out / "best", dtype="bfloat16")
    assert {p.dtype for p in best.model.parameters()} == {torch.bfloat16}
    report = json.loads((out / "slimlm_report.json").read_text())
    assert report["compressed"]["params"] < report["dense"]["params"]
    assert math.isfinite(report["compressed"]["perplexity"]) and math.isfinite(report["dense"]["perplexity"])
    assert 'dtype = "bfloat16"' in (out / "job.toml").read_text()  # the rerun from the job file is bf16 too


def test_a_bad_dtype_or_device_is_one_line_before_any_work(tmp_path, text):
    dense = save_tiny(tiny_loaded("llama"), tmp_path / "dense")
    assert "unknown dtype 'float8'" in one_error(invoke("eval", dense, "--dtype", "float8", "--data", text))
    line = one_error(invoke("compress", dense, "--params", "0.6", "--out", tmp_path / "run", "--device", "tpu"))
    assert "unknown device 'tpu'" in line and not (tmp_path / "run").exists()
