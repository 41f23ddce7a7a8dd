"""Run GGUF files in llama.cpp (through ``llama-cpp-python``, the optional ``llamacpp`` extra).

What users deploy small models with: logits to check an export, speed as llama-bench reports it
(prompt processing and generation tokens/s), and llama.cpp's own quantizer for the types gguf's
Python code cannot write (the k-quants).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

INSTALL = "pip install 'slimlm[llamacpp]' (builds llama.cpp: several minutes)"
# llama.cpp's file types for the quantizations only its own quantizer writes
NATIVE_QUANT_TYPES = {"q4_k": 15, "q5_k": 17, "q6_k": 18, "q3_k": 12, "q2_k": 10}  # q4_k is Q4_K_M


def available() -> bool:
    """Whether llama-cpp-python is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def require():
    """The ``llama_cpp`` module, or a clear error that says how to install it."""
    if not available():
        raise SlimlmError(f"llama.cpp is not installed; {INSTALL}")
    import llama_cpp

    return llama_cpp


def _open(path: str | Path, context: int, threads: int | None, all_logits: bool = False):
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"no GGUF file at {path}")
    try:
        return require().Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=context,
            n_threads=threads or os.cpu_count(),
            logits_all=all_logits,
            verbose=False,
        )
    except ValueError as error:  # llama.cpp says why only on its own log; the file is the usual cause
        raise SlimlmError(f"llama.cpp cannot load {path} (corrupt, or a shape its graph does not take)") from error


def logits(path: str | Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one sequence), shape ``(len(ids), vocab)``."""
    llama = _open(path, len(ids), None, all_logits=True)
    return _logits(llama, list(ids))


def _logits(llama, ids: list[int]) -> np.ndarray:
    llama.reset()
    llama.eval(ids)
    return np.array(llama.scores[: len(ids)], dtype=np.float32)


def perplexity(path: str | Path, windows) -> float:
    """Perplexity in llama.cpp over token windows (rows of a tensor or lists), each scored on its own."""
    rows = [list(map(int, w)) for w in windows]
    llama = _open(path, max(len(r) for r in rows), None, all_logits=True)
    total, count = 0.0, 0
    for ids in rows:
        scores = _logits(llama, ids)[:-1].astype(np.float64)
        log_z = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
        total += float((log_z - scores[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return float(np.exp(total / count))


@dataclass(frozen=True)
class Speed:
    """llama-bench's two numbers: prompt processing and generation, in tokens per second (medians)."""

    prompt_tokens_per_s: float
    generation_tokens_per_s: float


def compare_speed(
    paths: list[str | Path], prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3
) -> list[Speed]:
    """Speed of several GGUF files side by side: per round, each file times one batched prompt pass
    and ``new_tokens`` single-token steps after it (random tokens, as llama-bench); a first round
    warms up and is not counted."""
    models = [_open(path, prompt_tokens + new_tokens, None) for path in paths]
    rng = np.random.default_rng(0)
    samples: list[list[tuple[float, float]]] = [[] for _ in models]
    for _ in range(repeats + 1):
        tokens = rng.integers(0, min(m.n_vocab() for m in models), prompt_tokens + new_tokens).tolist()
        for llama, taken in zip(models, samples, strict=True):
            taken.append(_timed(llama, tokens, prompt_tokens))
    return [
        Speed(
            float(np.median([prompt_tokens / p for p, _ in taken[1:]])),
            float(np.median([new_tokens / g for _, g in taken[1:]])),
        )
        for taken in samples
    ]


def _timed(llama, tokens: list[int], prompt_tokens: int) -> tuple[float, float]:
    """Seconds for the prompt pass and for the single-token steps after it."""
    llama.reset()
    start = time.perf_counter()
    llama.eval(tokens[:prompt_tokens])
    middle = time.perf_counter()
    for token in tokens[prompt_tokens:]:
        llama.eval([token])
    return middle - start, time.perf_counter() - middle


def quantize(source: str | Path, out: str | Path, quant: str) -> Path:
    """Quantize the GGUF ``source`` (f16 or f32) to ``quant`` with llama.cpp's own quantizer."""
    if quant not in NATIVE_QUANT_TYPES:
        raise SlimlmError(f"llama.cpp quantization '{quant}' is not offered: {', '.join(NATIVE_QUANT_TYPES)}")
    llama_cpp = require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = NATIVE_QUANT_TYPES[quant]
    params.nthread = os.cpu_count() or 1
    out = Path(out)
    partial = out.with_name(out.name + ".part")
    failed = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if failed:
        partial.unlink(missing_ok=True)
        raise SlimlmError(f"llama.cpp could not quantize {source} to {quant} (code {failed})")
    partial.replace(out)
    return out
