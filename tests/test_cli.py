"""Tests for the ``slimlm`` command line, on tiny random models saved as Hugging Face folders."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from slimlm.chat import chat_prompts
from slimlm.cli import app, friendly
from slimlm.costs import peak_memory, static_cost
from slimlm.errors import SlimlmError
from slimlm.extract import SUBNET_FILE
from slimlm.models import load_model
from slimlm.subnet import FORMAT, LayerKeep, SubNetwork

from .conftest import FAMILIES, invoke, one_error, save_subnet, save_tiny, tiny_loaded

# The tiny model: 4 layers, 6 query heads in 2 groups of 3 (head h uses kv head h // 3), 40 neurons.
SMALL = SubNetwork(
    {
        0: LayerKeep((0, 1, 2), (0,), tuple(range(16))),
        2: LayerKeep((3, 4, 5), (1,), tuple(range(8, 24))),
    }
)
WINDOWS = ["--seq-len", "16", "--windows", "4"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny llama folder shared by the tests that only read it."""
    return save_tiny(tiny_loaded("llama"), tmp_path_factory.mktemp("dense") / "llama")


@pytest.fixture(scope="module")
def small_subnet(tmp_path_factory, dense) -> Path:
    return save_subnet(SMALL, tmp_path_factory.mktemp("subnet") / "small.json", dense)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, dense, small_subnet) -> Path:
    """``dense`` with only ``SMALL`` kept, written by ``slimlm extract``."""
    out = tmp_path_factory.mktemp("extracted") / "small"
    result = invoke("extract", dense, "--subnet", small_subnet, "--out", out, "--no-reform")
    assert result.exit_code == 0, result.output
    return out


def ok_json(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- info ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_info_json_without_latency(tmp_path, family):
    tiny = tiny_loaded(family)
    folder = save_tiny(tiny, tmp_path / family)

    info = ok_json("info", folder, "--no-latency", "--context", "64")

    params = static_cost(tiny.dims).params
    assert info["params"] == params
    assert params == sum(p.numel() for p in tiny.model.parameters())  # tied embeddings counted once
    assert info["family"] == family
    assert info["layers"] == 4
    kv_heads = 6 if family == "opt" else 2  # OPT: multi-head, every head its own key/value head
    assert info["layer_shapes"] == [{"heads": 6, "kv_heads": kv_heads, "neurons": 40, "count": 4}]
    assert info["hidden_size"] == 48
    assert info["max_positions"] == 128
    assert info["context"] == 64
    assert info["flops_per_token"] == static_cost(tiny.dims, context=64).flops_per_token
    assert "prefill_ms" not in info


def test_info_table_with_latency(dense):
    result = invoke("info", dense)
    assert result.exit_code == 0, result.output
    params = static_cost(tiny_loaded("llama").dims).params
    assert f"{params:,}" in result.stdout
    prefill = re.search(r"prefill 64 tokens\D*([\d,.]+) ms", result.stdout)  # half the 128-token context
    decode = re.search(r"decode \(generate\)\D*([\d,.]+) tokens/s", result.stdout)
    assert prefill and decode, result.stdout
    assert float(prefill[1].replace(",", "")) > 0
    assert float(decode[1].replace(",", "")) > 0


# --- eval ---------------------------------------------------------------------------------------


def test_eval_prints_perplexity(dense, text):
    result = invoke("eval", dense, "--data", text, *WINDOWS)
    assert result.exit_code == 0, result.output
    assert re.search(r"perplexity \d+\.\d{3} on .*words\.txt \(64 tokens", result.stdout), result.stdout


def test_eval_json_and_subnetworks(dense, text, small_subnet, tmp_path):
    full = ok_json("eval", dense, "--data", text, *WINDOWS)
    assert math.isfinite(full["perplexity"]) and full["perplexity"] > 1
    assert full["tokens"] == 64
    assert full["subnet"] is None

    small = ok_json("eval", dense, "--data", text, *WINDOWS, "--subnet", small_subnet)
    assert math.isfinite(small["perplexity"]) and small["perplexity"] > 1
    assert small["subnet"] == str(small_subnet)
    assert abs(small["perplexity"] - full["perplexity"]) > 1e-3 * full["perplexity"]

    everything = tmp_path / "full.json"
    save_subnet(SubNetwork.full(tiny_loaded("llama").dims), everything, dense)
    same = ok_json("eval", dense, "--data", text, *WINDOWS, "--subnet", everything)
    assert same["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)


# --- extract ------------------------------------------------------------------------------------


def test_extract_writes_a_smaller_model_that_evaluates_like_the_subnetwork(dense, extracted, text, small_subnet):
    config = json.loads((extracted / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 3
    assert config["num_key_value_heads"] == 1
    assert config["intermediate_size"] == 16

    small = ok_json("eval", extracted, "--data", text, *WINDOWS)
    in_place = ok_json("eval", dense, "--data", text, *WINDOWS, "--subnet", small_subnet)
    assert small["perplexity"] == pytest.approx(in_place["perplexity"], rel=1e-4)


def test_extract_reports_the_parameter_count(dense, small_subnet, tmp_path):
    out = tmp_path / "small"
    result = invoke("extract", dense, "--subnet", small_subnet, "--out", out, "--no-reform")
    assert result.exit_code == 0, result.output
    params = static_cost(load_model(out).dims).params
    full = static_cost(tiny_loaded("llama").dims).params
    assert f"{params:,} parameters" in result.stdout
    assert f"of {full:,}" in result.stdout
    assert "plain from_pretrained" in result.stdout
    assert "not reformed" in result.stdout


def test_extract_reforms_by_default_and_reform_reports_the_gain(dense, small_subnet, text, tmp_path):
    calib = ["--calib", text, "--seq-len", "16", "--calib-windows", "8"]
    result = invoke("extract", dense, "--subnet", small_subnet, "--out", tmp_path / "a", *calib)
    assert result.exit_code == 0, result.output
    assert "reformed" in result.stdout and "not reformed" not in result.stdout
    plain = ok_json("eval", dense, "--data", text, *WINDOWS, "--subnet", small_subnet)["perplexity"]
    reformed = ok_json("eval", tmp_path / "a", "--data", text, *WINDOWS)["perplexity"]
    assert reformed != pytest.approx(plain, rel=1e-4)  # the written weights are the reformed ones
    result = invoke(
        "reform",
        dense,
        "--subnet",
        small_subnet,
        "--out",
        tmp_path / "b",
        *calib,
        "--eval",
        text,
        "--eval-windows",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert "after reformation" in result.stdout and (tmp_path / "b" / "config.json").is_file()


# --- bench --------------------------------------------------------------------------------------

BENCH_FAST = ["--repeats", "1", "--new-tokens", "4", "--prompt-tokens", "8"]


def test_bench_without_memory(dense, extracted):
    report = ok_json("bench", extracted, "--vs", dense, "--no-memory", *BENCH_FAST)
    small, full = report["models"]
    assert small["model"] == str(extracted) and full["model"] == str(dense)
    assert small["params"] == static_cost(load_model(extracted).dims).params
    assert full["params"] == static_cost(tiny_loaded("llama").dims).params
    assert small["disk_bytes"] < full["disk_bytes"]
    for row in (small, full):
        assert row["prompt_tokens"] == 8 and row["new_tokens"] == 4
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["peak_memory_bytes"] is None
    ratios = report["ratios"]
    assert ratios["params"] == pytest.approx(small["params"] / full["params"])
    assert 0 < ratios["params"] < 1
    assert ratios["prefill_speedup"] > 0
    assert ratios["decode_speedup"] > 0
    assert ratios["peak_memory"] is None


def test_bench_with_memory(dense, extracted, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the memory probe's processes, as _one_thread is for this one
    report = ok_json("bench", extracted, "--vs", dense, *BENCH_FAST)
    peaks = [row["peak_memory_bytes"] for row in report["models"]]
    assert all(isinstance(p, int) and p > 50 * 2**20 for p in peaks)  # a process with torch loaded
    assert report["ratios"]["peak_memory"] == pytest.approx(peaks[0] / peaks[1])


# --- compress -----------------------------------------------------------------------------------


def test_compress_end_to_end(dense, text, tmp_path):
    out = tmp_path / "compressed"
    result = invoke(
        "compress",
        dense,
        "--params",
        "0.6",
        "--out",
        out,
        "--calib",
        text,
        "--eval",
        text,
        "--seq-len",
        "16",
        "--calib-windows",
        "8",
        "--refine-windows",
        "12",
        "--fitness-windows",
        "2",
        "--eval-windows",
        "2",
        "--evaluations",
        "8",
    )
    assert result.exit_code == 0, result.output
    assert (out / "best" / "config.json").is_file()
    report = json.loads((out / "slimlm_report.json").read_text())
    dense_params, small_params = report["dense"]["params"], report["compressed"]["params"]
    assert dense_params == static_cost(tiny_loaded("llama").dims).params
    assert small_params <= 0.6 * dense_params
    assert small_params == static_cost(load_model(out / "best").dims).params
    assert report["evaluation_tokens"] == 32
    assert math.isfinite(report["compressed"]["perplexity"])
    chat = report["chat"]
    assert chat["prompts"] == len(chat_prompts()) and not chat["templated"]  # the tiny tokenizer has no template
    assert chat["kl_per_token"] >= 0 and 0 <= chat["first_tokens_match"] <= 1 and len(chat["samples"]) == 3
    assert f"chat fidelity on {chat['prompts']} prompts as plain text" in result.stdout
    markdown = (out / "report.md").read_text()
    small = report["compressed"]
    assert f"| {small['params']:,} (" in markdown and f"{small['perplexity']:.2f}" in markdown
    assert f"slimlm compress --config {out / 'job.toml'}" in markdown and "![Pareto front](pareto.png)" in markdown
    assert markdown.count("\n| ") >= 5 + 1 + 3  # the comparison rows, the chat header, three sample answers
    assert "saved" in result.stdout
    assert str(out / "slimlm_report.json") in result.stdout.replace("\n", "")


def test_compress_holds_one_model_at_a_time_when_measuring(dense, text, tmp_path, monkeypatch):
    """The dense model is freed before ``best/`` is loaded to be measured: compress's peak is one model
    and its temporaries, not both models (issue 17's memory target)."""
    import gc
    import weakref

    from slimlm import pipeline

    loads, alive_at_best = [], []

    def load(spec, *args, **kwargs):
        if Path(spec).name == "best":
            gc.collect()
            alive_at_best.append([ref() is not None for ref in loads])
        loaded = load_model(spec, *args, **kwargs)
        loads.append(weakref.ref(loaded.model))
        return loaded

    monkeypatch.setattr(pipeline, "load_model", load)
    args = ["--calib", text, "--eval", text, "--seq-len", "16", "--calib-windows", "8", "--fitness-windows", "2"]
    args += ["--refine-windows", "12"]
    result = invoke("compress", dense, "--params", "0.6", "--out", tmp_path / "run", *args, "--evaluations", "4")
    assert result.exit_code == 0, result.output
    assert alive_at_best == [[False]]  # one load of best/, and the dense model was gone by then


def test_compress_at_several_budgets_writes_one_run_each_and_the_trade_off(dense, text, tmp_path, monkeypatch):
    """One calibration (cached) serves every budget; each budget is its own run, as one-budget runs are."""
    from slimlm import importance

    calibrations = []
    calibrate = importance.calibrate
    monkeypatch.setattr(importance, "calibrate", lambda *a, **k: calibrations.append(1) or calibrate(*a, **k))
    out = tmp_path / "sweep"
    args = ["--calib", text, "--eval", text, "--seq-len", "16", "--calib-windows", "8", "--fitness-windows", "2"]
    args += ["--refine-windows", "12"]
    result = invoke(
        "compress", dense, "--params", "0.7,0.5", "--out", out, *args, "--eval-windows", "2", "--evaluations", "4"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "budgets.json").read_text())
    assert [r["run"] for r in summary["runs"]] == [str(out / "params-0.7"), str(out / "params-0.5")]
    for row, fraction in zip(summary["runs"], (0.7, 0.5), strict=True):
        run = Path(row["run"])
        report = json.loads((run / "slimlm_report.json").read_text())
        assert row["params"] == report["compressed"]["params"] == static_cost(load_model(run / "best").dims).params
        assert row["params_fraction"] <= fraction and row["perplexity"] == report["compressed"]["perplexity"]
        assert json.loads((run / "best" / "slimlm_subnetwork.json").read_text())  # a model per budget
    assert summary["runs"][1]["params"] < summary["runs"][0]["params"]
    assert len(calibrations) == 1
    assert "params-0.5" in (out / "budgets.md").read_text() and "params-0.5" in result.stdout


@pytest.mark.parametrize("fractions", ["0.7,0.7", "0.7,x", "0.7,1.5"])
def test_several_budgets_must_be_different_fractions(dense, text, tmp_path, fractions):
    line = one_error(invoke("compress", dense, "--params", fractions, "--out", tmp_path / "out", "--calib", text))
    assert "--params must be a fraction in (0, 1], or several different ones" in line
    assert not (tmp_path / "out").exists()


# --- bad input: one clear line, exit code 1 -------------------------------------------------------


def test_unknown_model_name(text):
    line = one_error(invoke("eval", "no-such-model", "--data", text, *WINDOWS))
    assert "unknown model 'no-such-model'" in line
    assert "smollm2-135m" in line


def test_missing_subnet_file(dense, text, tmp_path):
    missing = tmp_path / "nope.json"
    line = one_error(invoke("eval", dense, "--data", text, *WINDOWS, "--subnet", missing))
    assert f"sub-network file not found: {missing}" in line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"layers": {}}', "not a slimlm sub-network"),
        (json.dumps({"format": FORMAT, "layers": {"0": {"heads": [0]}}}), "malformed sub-network"),
        (
            json.dumps({"format": FORMAT, "layers": {"zero": {"heads": [0], "kv_heads": [0], "neurons": [0]}}}),
            "malformed",
        ),
    ],
    ids=["not-json", "no-format", "missing-keys", "bad-index"],
)
def test_malformed_subnet_file(dense, text, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert message in one_error(invoke("eval", dense, "--data", text, *WINDOWS, "--subnet", path))


@pytest.mark.parametrize(
    ("subnet", "message"),
    [
        (SubNetwork({99: LayerKeep((0,), (0,), (0,))}), "layer 99 is out of range: the model has 4"),
        (SubNetwork({0: LayerKeep((0, 7), (0, 2), (0,))}), "index 7 out of range"),
        (SubNetwork({0: LayerKeep((0,), (0,), (40,))}), "neurons index 40 out of range"),
        (SubNetwork({0: LayerKeep((3,), (0,), (0,))}), "query head 3 is kept without its key/value head 1"),
    ],
    ids=["layer", "head", "neuron", "orphan-head"],
)
def test_subnet_that_does_not_fit_the_model(dense, text, tmp_path, subnet, message):
    path = save_subnet(subnet, tmp_path / "bad.json", dense)
    assert message in one_error(invoke("eval", dense, "--data", text, *WINDOWS, "--subnet", path))
    out = tmp_path / "out"
    assert message in one_error(invoke("extract", dense, "--subnet", path, "--out", out))
    assert not (out / "config.json").exists()


def test_a_subnet_made_for_another_model_is_refused_unless_asked(dense, text, tmp_path):
    """Indices in range are not enough: a file from other weights, or another shape, would silently
    prune the wrong units (the audit's 4-layer file on SmolLM2: perplexity 1e8, exit 0)."""
    other = save_tiny(tiny_loaded("llama", seed=7), tmp_path / "other")  # same shape, other weights
    deeper = save_tiny(tiny_loaded("llama", num_hidden_layers=5), tmp_path / "deeper")
    same_shape = save_subnet(SMALL, tmp_path / "other.json", other)
    other_shape = save_subnet(SMALL, tmp_path / "deeper.json", deeper)
    hand_written = tmp_path / "hand.json"
    SMALL.save(hand_written)
    args = ("eval", dense, "--data", text, *WINDOWS, "--subnet")
    assert "was made for other weights of the same shape" in one_error(invoke(*args, same_shape))
    assert "made for a model of another shape (5 layers" in one_error(invoke(*args, other_shape))
    assert "does not say which model it was made for" in one_error(invoke(*args, hand_written))
    out = tmp_path / "out"
    assert "--foreign-subnet" in one_error(invoke("extract", dense, "--subnet", hand_written, "--out", out))
    assert not out.exists()
    for path in (same_shape, other_shape, hand_written):  # asked for: used, the indices still checked
        assert ok_json(*args, path, "--foreign-subnet")["perplexity"] > 1
    far = tmp_path / "far.json"
    SubNetwork({3: LayerKeep((0,), (0,), (39,))}).save(far)
    SubNetwork({4: LayerKeep((0,), (0,), (0,))}).save(tmp_path / "beyond.json")
    assert ok_json(*args, far, "--foreign-subnet")["perplexity"] > 1
    assert "layer 4 is out of range" in one_error(invoke(*args, tmp_path / "beyond.json", "--foreign-subnet"))


def test_a_subnet_extracted_from_this_model_is_accepted(dense, extracted, text):
    assert ok_json("eval", dense, "--data", text, *WINDOWS, "--subnet", extracted / SUBNET_FILE)["perplexity"] > 1


@pytest.mark.parametrize("index", ["1.7", '"5"', "true", "-0.0"])
def test_subnet_indices_must_be_integers(dense, text, tmp_path, index):
    path = tmp_path / "bad.json"
    path.write_text(
        '{"format": "slimlm.subnetwork/1", "layers": {"0": {"heads": [0, 1, 2], "kv_heads": [0], '
        f'"neurons": [0, {index}]}}}}}}'
    )
    line = one_error(invoke("eval", dense, "--data", text, *WINDOWS, "--subnet", path, "--foreign-subnet"))
    assert f"index {json.loads(index)!r} is not an integer" in line


def test_seq_len_longer_than_context(dense, text):
    line = one_error(invoke("eval", dense, "--data", text, "--seq-len", "256", "--windows", "1"))
    assert "--seq-len 256 is longer than the model's context of 128 tokens" in line


def test_text_too_short(dense, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3\n")
    line = one_error(invoke("eval", dense, "--data", short, *WINDOWS))
    assert "has 3 tokens; one window needs 16" in line


def test_empty_text_file(dense, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in one_error(invoke("eval", dense, "--data", empty, *WINDOWS))


def test_unknown_data_spec(dense):
    assert "unknown data spec" in one_error(invoke("eval", dense, "--data", "no/such/file.txt", *WINDOWS))


def test_extract_refuses_a_folder_that_is_not_a_model(dense, small_subnet, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = one_error(invoke("extract", dense, "--subnet", small_subnet, "--out", out))
    assert "exists and is not empty; pass --overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_compress_infeasible_budget(dense, text, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "compress", dense, "--params", "0.0001", "--out", out, "--calib", text, "--eval", text, "--seq-len", "16"
    )
    line = one_error(result)
    assert "below the smallest sub-network this search space allows" in line
    assert not out.exists()


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_compress_fraction_out_of_range(dense, text, tmp_path, fraction):
    args = ["--out", tmp_path / "out", "--calib", text, "--eval", text, "--seq-len", "16"]
    line = one_error(invoke("compress", dense, "--params", fraction, *args))
    assert "--params must be a fraction in (0, 1]" in line


# Nonsense numbers: each must be one clear error line, not a traceback from deep inside torch.
BAD_NUMBERS = [
    pytest.param(
        ["bench", "{m}", "--vs", "{m}", "--no-memory", "--repeats", "0", "--prompt-tokens", "8", "--new-tokens", "4"],
        id="bench-repeats-0",
    ),
    pytest.param(
        ["bench", "{m}", "--vs", "{m}", "--no-memory", "--repeats", "1", "--prompt-tokens", "8", "--new-tokens", "1"],
        id="bench-new-tokens-1",
    ),
    pytest.param(
        ["bench", "{m}", "--vs", "{m}", "--no-memory", "--repeats", "1", "--prompt-tokens", "0"],
        id="bench-prompt-tokens-0",
    ),
    pytest.param(
        ["eval", "{m}", "--data", "{t}", *WINDOWS, "--batch-size", "0"],
        id="eval-batch-size-0",
    ),
    pytest.param(["eval", "{m}", "--data", "{t}", "--seq-len", "1"], id="eval-seq-len-1"),
    pytest.param(["eval", "{m}", "--data", "{t}", "--seq-len", "16", "--windows", "0"], id="eval-windows-0"),
]


@pytest.mark.parametrize("args", BAD_NUMBERS)
def test_nonsense_numbers_are_one_clear_error(dense, text, args):
    one_error(invoke(*(a.format(m=dense, t=text) for a in args)))


def test_peak_memory_is_the_probe_process_own(dense, monkeypatch):
    """The probe is forked from this process: its figure must not inherit this process's size."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    alone = peak_memory(str(dense), prompt_tokens=8, new_tokens=4)
    ballast = torch.ones(2**28)  # 1 GiB resident in this process while probing
    beside = peak_memory(str(dense), prompt_tokens=8, new_tokens=4)
    assert ballast.sum() > 0
    assert abs(beside - alone) < 256 * 2**20


def test_error_lines_keep_bracketed_words(capsys):
    @friendly
    def failing():
        raise SlimlmError("llama.cpp is not installed; pip install 'slimlm[llamacpp]'")

    with pytest.raises(typer.Exit):
        failing()
    assert "pip install 'slimlm[llamacpp]'" in capsys.readouterr().err


# --- basics ---------------------------------------------------------------------------------------


def test_version_is_the_installed_package_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"slimlm {metadata.version('slimlm')}"


def test_python_dash_m_slimlm_is_the_same_command_line():
    done = subprocess.run([sys.executable, "-m", "slimlm", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == invoke("--version").stdout.strip()


@pytest.mark.parametrize("help_of", [[], ["compress"], ["heal"]])
def test_the_command_line_starts_without_torch(help_of):
    """Importing the CLI (and printing help) loads neither torch nor transformers, seconds of start:
    commands import the library when they run (timings belong in benchmarks, not here)."""
    code = "import sys, slimlm.cli\n"
    if help_of:
        code += f"slimlm.cli.app([*{help_of!r}, '--help'], prog_name='slimlm', standalone_mode=False)\n"
    code += "print('torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["False", "False"]


def test_shell_completion_completes_slimlm():
    args = [sys.executable, "-m", "slimlm", "--show-completion", "bash"]
    # typer reads the shell from the parent processes unless told to take the option's value (its tests' switch):
    # a test run whose parent shell has exited (a background job) found none
    env = os.environ | {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "complete -o default -F _slimlm_completion slimlm" in done.stdout


def test_search_options_are_grouped_in_help_with_examples():
    result = CliRunner().invoke(app, ["compress", "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    panels = [line.split("─")[1].strip() for line in result.stdout.splitlines() if line.startswith("╭─")]
    assert {"Budget", "Search", "Space", "Text", "Store and workers"} <= set(panels)
    budget = result.stdout.split("╭─ Budget")[1].split("╰")[0]
    assert "--params" in budget and "--max-params" in budget and "--seed" not in budget
    assert "slimlm compress smollm2-135m --params 0.7 --out runs/demo" in result.stdout


def test_compress_times_a_short_context_model_within_its_positions(text, tmp_path):
    """OPT's learned position table of 128 cannot take the default 128 + 32 timing tokens."""
    dense = save_tiny(tiny_loaded("opt"), tmp_path / "dense")
    assert load_model(dense).dims.max_positions == 128
    out = tmp_path / "run"
    fast = ["--calib", text, "--eval", text, "--seq-len", "16", "--calib-windows", "8", "--fitness-windows", "2"]
    fast += ["--refine-windows", "12"]
    result = invoke(
        "compress", dense, "--params", "0.6", "--out", out, *fast, "--eval-windows", "2", "--evaluations", "4"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "slimlm_report.json").read_text())
    assert (report["speed_prompt_tokens"], report["speed_new_tokens"]) == (64, 32)
    assert "prefill 64 tokens" in result.stdout


def test_a_full_disk_is_one_clear_line_naming_the_file(dense, tmp_path, monkeypatch):
    """The library build met a full disk with a traceback; any command now says it in one line."""
    target = tmp_path / "model.gguf"

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr("slimlm.export.export_gguf", full)
    line = one_error(invoke("export", dense, "--gguf", target))
    assert f"no space left on the disk writing {target}" in line


def test_other_os_errors_are_not_dressed_as_a_full_disk(dense, tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("slimlm.export.export_gguf", broken)
    result = invoke("export", dense, "--gguf", tmp_path / "model.gguf")
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EIO
