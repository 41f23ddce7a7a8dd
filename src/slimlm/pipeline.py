"""The end-to-end job: a model and a size in, a smaller real model out, measured against the dense one."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedModel

from slimlm.costs import LatencyProbe, check_repeats, static_cost
from slimlm.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.extract import extract
from slimlm.importance import activation_importance
from slimlm.models import LoadedModel, load_model
from slimlm.progress import track
from slimlm.space import uniform_subnetwork

REPORT_FILE = "slimlm_report.json"


@dataclass(frozen=True)
class ModelReport:
    """One model's size, quality and speed, measured in the same run as the models it is compared to."""

    name: str
    params: int
    params_without_embeddings: int
    flops_per_token: int
    disk_bytes: int
    perplexity: float
    prefill_ms: float
    decode_tokens_per_s: float


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def compare_speed(
    models: list[PreTrainedModel], repeats: int = 3, prompt_tokens: int = 128, new_tokens: int = 32
) -> list:
    """Latency of several models measured side by side: one sample of each in turn, then medians."""
    check_repeats(repeats)
    probes = [LatencyProbe(m, prompt_tokens, new_tokens) for m in models]
    for probe in probes:  # warm-up, not counted
        probe.sample()
        probe.prefill.clear()
        probe.decode.clear()
    for _ in track(range(repeats), "timing prefill and decode"):
        for probe in probes:
            probe.sample()
    return [p.result() for p in probes]


def describe(loaded: LoadedModel, windows, latency, name: str, context: int, description: str) -> ModelReport:
    """Measure ``loaded`` into a report (perplexity on ``windows``; ``latency`` already measured)."""
    cost = static_cost(loaded.dims, context=context)
    return ModelReport(
        name=name,
        params=cost.params,
        params_without_embeddings=cost.params_without_embeddings,
        flops_per_token=cost.flops_per_token,
        disk_bytes=folder_bytes(loaded.folder),
        perplexity=perplexity(loaded.model, windows, description=description),
        prefill_ms=latency.prefill_ms,
        decode_tokens_per_s=latency.decode_tokens_per_s,
    )


def compress(
    model: str,
    params_fraction: float,
    out: str | Path,
    calibration: str = DEFAULT_CALIBRATION,
    evaluation: str = DEFAULT_EVALUATION,
    seq_len: int = 512,
    calibration_windows: int = 8,
    evaluation_windows: int = 16,
    repeats: int = 3,
) -> dict:
    """Shrink ``model`` to ``params_fraction`` of its parameters, write it to ``out``, and measure both.

    Units are ranked by activation-aware importance on the calibration text and every layer keeps
    the same shape. The written model is reloaded from disk for measurement, as a user would load it.
    Returns the report that is also saved as ``out/slimlm_report.json``.
    """
    dense = load_model(model)
    calib = model_windows(dense, calibration, seq_len, calibration_windows)
    evaluation_ids = model_windows(dense, evaluation, seq_len, evaluation_windows)
    subnet = uniform_subnetwork(dense.dims, activation_importance(dense, calib), params_fraction)
    extracted = extract(dense, subnet, out)
    small = load_model(extracted.folder)
    latency = compare_speed([dense.model, small.model], repeats=repeats)
    reports = [
        describe(dense, evaluation_ids, latency[0], f"dense {model}", seq_len, "perplexity (dense)"),
        describe(small, evaluation_ids, latency[1], str(out), seq_len, "perplexity (compressed)"),
    ]
    report = {
        "model": model,
        "params_fraction": params_fraction,
        "calibration": calibration,
        "evaluation": evaluation,
        "seq_len": seq_len,
        "evaluation_tokens": evaluation_ids.numel(),
        "needs_remote_code": extracted.needs_remote_code,
        "dense": asdict(reports[0]),
        "compressed": asdict(reports[1]),
    }
    (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
