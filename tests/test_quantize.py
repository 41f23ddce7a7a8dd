"""Quantization stacked on compressed models: int8 folders for transformers, GGUF types beside ``best/``."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from slimlm.errors import SlimlmError
from slimlm.models import load_model
from slimlm.quantize import check_quant, quantize, quantized_path

from .conftest import invoke, one_error, save_tiny, tiny_loaded
from .test_export import bpe_model, ragged

pytest.importorskip("torchao", reason="int8 needs the int8 extra (the test extra installs it)")


def logits(folder, ids: torch.Tensor, remote: bool = False) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("subnet", [None, ragged], ids=["dense", "layers-that-differ"])
def test_int8_folder_loads_with_from_pretrained_and_stays_close(tmp_path, subnet):
    loaded = bpe_model(tmp_path, subnet=subnet, hidden_size=96, intermediate_size=128)
    out = quantize(loaded, "int8")
    assert out == quantized_path(loaded.folder, "int8") and out.name == f"{loaded.folder.name}-int8"
    with safe_open(out / "model.safetensors", "pt") as weights:
        dtypes = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
    assert any(d == "I8" and "mlp.down_proj" in n for n, d in dtypes.items()), dtypes
    assert (out / "tokenizer.json").is_file()
    remote = subnet is not None
    assert (out / "modeling_slimlm.py").is_file() == remote
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    expected, got = logits(loaded.folder, ids, remote), logits(out, ids, remote)
    assert not torch.equal(got, expected)  # really quantized
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_unknown_type_and_missing_tokenizer_name_are_refused_before_any_work(tmp_path):
    loaded = bpe_model(tmp_path)
    with pytest.raises(SlimlmError, match="unknown quantization 'int4'; choose from int8, f32"):
        check_quant(loaded, "int4")
    with pytest.raises(SlimlmError, match="--tokenizer-pre"):
        check_quant(loaded, "q8_0")
    check_quant(loaded, "q8_0", tokenizer_pre="default")  # no error


COMPRESS = ["--params", "0.6", "--seq-len", "16", "--calib-windows", "8", "--fitness-windows", "2"]
COMPRESS += ["--eval-windows", "2", "--evaluations", "6", "--refine-windows", "12"]


def test_compress_with_quant_ends_with_both_files(tmp_path, text):
    dense = bpe_model(tmp_path, hidden_size=96, intermediate_size=128).folder
    out = tmp_path / "run"
    args = ["compress", dense, "--out", out, "--calib", text, "--eval", text, *COMPRESS]
    result = invoke(*args, "--quant", "q8_0", "--tokenizer-pre", "default")
    assert result.exit_code == 0, result.output
    assert (out / "best" / "config.json").is_file()
    report = json.loads((out / "slimlm_report.json").read_text())["quantized"]
    path = out / "best.q8_0.gguf"
    assert report["path"] == str(path) and report["disk_bytes"] == path.stat().st_size
    reader = gguf.GGUFReader(path)
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in reader.tensors)
    assert "best.q8_0.gguf" in result.output


def test_compress_with_a_bad_quant_fails_before_the_search(tmp_path, text):
    dense = save_tiny(tiny_loaded(), tmp_path / "dense")
    out = tmp_path / "run"
    args = ["compress", dense, "--out", out, "--calib", text, "--eval", text, *COMPRESS]
    line = one_error(invoke(*args, "--quant", "q8"))
    assert "unknown quantization 'q8'" in line
    assert not out.exists()
    line = one_error(invoke(*args, "--quant", "q8_0"))
    assert "--tokenizer-pre" in line
    line = one_error(invoke(*args, "--quant", "q8_0", "--tokenizer-pre", "default"))
    assert "tokenizers are BPE (byte-level or with byte fallback); this one is WordLevel" in line
    assert not out.exists()


def test_int8_of_a_compressed_run_measures_its_perplexity(tmp_path, text):
    dense = save_tiny(tiny_loaded(hidden_size=96, intermediate_size=128), tmp_path / "dense")
    out = tmp_path / "run"
    result = invoke("compress", dense, "--out", out, "--calib", text, "--eval", text, *COMPRESS, "--quant", "int8")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "slimlm_report.json").read_text())
    quantized = report["quantized"]
    assert quantized["perplexity"] == pytest.approx(report["compressed"]["perplexity"], rel=0.05)
    assert quantized["disk_bytes"] < report["compressed"]["disk_bytes"]
    assert load_model(out / "best-int8").dims.num_layers == load_model(out / "best").dims.num_layers
