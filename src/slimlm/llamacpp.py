"""Run GGUF files in llama.cpp: logits to check an export, perplexity, speed as llama-bench reports it
(prompt processing and generation tokens/s), and ggml's own k-quant encoders.

llama.cpp comes prebuilt, with no compiler, from the PyPI package ``xllamacpp`` (the ``llamacpp``
extra): its one shared library exports llama.cpp's and ggml's C API, which this module calls through
ctypes. The structures below mirror ``llama.h`` of the pinned release (``PINNED``); a test reads the
library's own defaults through them, so a release with another layout fails that test rather than
computing garbage.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

PACKAGE = "xllamacpp"
PINNED = "2026.4.8929"  # the llama.h these structures mirror; keep in step with pyproject's llamacpp extra
INSTALL = "pip install 'slimlm[llamacpp]' (llama.cpp prebuilt, from the xllamacpp package)"
NATIVE_QUANT_TYPES = ("q4_k", "q5_k", "q6_k", "q3_k", "q2_k")  # ggml's k-quants (export.KQUANT_TYPES)
# llama.cpp's own fallback for rows that are not whole 256-wide k-quant blocks: a 32-wide type
KQUANT_FALLBACK = {10: 20, 11: 20, 12: 6, 13: 7, 14: 8}  # q2_k/q3_k -> iq4_nl, q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0
KQUANT_BLOCK = 256


def available() -> bool:
    """Whether llama.cpp (the ``xllamacpp`` package) is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


def require() -> ctypes.CDLL:
    """llama.cpp's C library, or a clear error that says how to install it."""
    if not available():
        raise SlimlmError(f"llama.cpp is not installed; {INSTALL}")
    version = importlib.metadata.version(PACKAGE)
    if version != PINNED:
        raise SlimlmError(f"slimlm calls llama.cpp as {PACKAGE}=={PINNED} ships it, found {version}; {INSTALL}")
    return _library()


class ModelParams(ctypes.Structure):
    """``struct llama_model_params``."""

    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.c_void_p),
        ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool),
        ("use_mmap", ctypes.c_bool),
        ("use_direct_io", ctypes.c_bool),
        ("use_mlock", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool),
    ]


class ContextParams(ctypes.Structure):
    """``struct llama_context_params``."""

    _fields_ = [
        ("n_ctx", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint32),
        ("n_ubatch", ctypes.c_uint32),
        ("n_seq_max", ctypes.c_uint32),
        ("n_threads", ctypes.c_int32),
        ("n_threads_batch", ctypes.c_int32),
        ("rope_scaling_type", ctypes.c_int),
        ("pooling_type", ctypes.c_int),
        ("attention_type", ctypes.c_int),
        ("flash_attn_type", ctypes.c_int),
        ("rope_freq_base", ctypes.c_float),
        ("rope_freq_scale", ctypes.c_float),
        ("yarn_ext_factor", ctypes.c_float),
        ("yarn_attn_factor", ctypes.c_float),
        ("yarn_beta_fast", ctypes.c_float),
        ("yarn_beta_slow", ctypes.c_float),
        ("yarn_orig_ctx", ctypes.c_uint32),
        ("defrag_thold", ctypes.c_float),
        ("cb_eval", ctypes.c_void_p),
        ("cb_eval_user_data", ctypes.c_void_p),
        ("type_k", ctypes.c_int),
        ("type_v", ctypes.c_int),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        ("embeddings", ctypes.c_bool),
        ("offload_kqv", ctypes.c_bool),
        ("no_perf", ctypes.c_bool),
        ("op_offload", ctypes.c_bool),
        ("swa_full", ctypes.c_bool),
        ("kv_unified", ctypes.c_bool),
        ("samplers", ctypes.c_void_p),
        ("n_samplers", ctypes.c_size_t),
    ]


class _Batch(ctypes.Structure):
    """``struct llama_batch``."""

    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_ERROR = 4  # ggml_log_level: llama.cpp says why a file does not load only at this level
_errors: collections.deque[str] = collections.deque(maxlen=8)


def _kept_errors(level: int, text: bytes, _data) -> None:
    """llama.cpp's log: silent (it logs every load to stderr otherwise), but its errors are kept to be
    told to the user with slimlm's own."""
    if level == _ERROR and text:
        _errors.append(text.decode(errors="replace").strip())


_LOG = _LOG_CALLBACK(_kept_errors)


def _why() -> str:
    """llama.cpp's first error since the call began (the cause; those after it say what failed in
    turn), for a message; empty when it logged none."""
    return f": {_errors[0]}" if _errors else ""


@functools.cache
def _library() -> ctypes.CDLL:
    folder = importlib.util.find_spec(PACKAGE).submodule_search_locations[0]
    (path,) = Path(folder).glob("xllamacpp*.so")
    lib = ctypes.CDLL(str(path))
    pointer, c_int32, c_bool = ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool
    signatures = {
        "llama_log_set": ([_LOG_CALLBACK, pointer], None),
        "llama_backend_init": ([], None),
        "llama_model_default_params": ([], ModelParams),
        "llama_context_default_params": ([], ContextParams),
        "llama_model_load_from_file": ([ctypes.c_char_p, ModelParams], pointer),
        "llama_model_free": ([pointer], None),
        "llama_init_from_model": ([pointer, ContextParams], pointer),
        "llama_free": ([pointer], None),
        "llama_model_get_vocab": ([pointer], pointer),
        "llama_vocab_n_tokens": ([pointer], c_int32),
        "llama_decode": ([pointer, _Batch], c_int32),
        "llama_get_logits": ([pointer], ctypes.POINTER(ctypes.c_float)),
        "llama_get_memory": ([pointer], pointer),
        "llama_memory_clear": ([pointer, c_bool], None),
        "ggml_quantize_chunk": (
            [ctypes.c_int, pointer, pointer, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, pointer],
            ctypes.c_size_t,
        ),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    lib.llama_log_set(_LOG, None)
    lib.llama_backend_init()
    return lib


class Llama:
    """One GGUF model with one context of ``context`` tokens on the CPU; ``eval`` continues the sequence."""

    def __init__(self, path: str | Path, context: int, threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise SlimlmError(f"no GGUF file at {path}")
        self.lib = require()
        _errors.clear()
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), self.lib.llama_model_default_params())
        if not self.model:
            raise SlimlmError(f"llama.cpp cannot load {path} (corrupt, or a shape its graph does not take){_why()}")
        params = self.lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = context
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        params.no_perf = True
        self.context = self.lib.llama_init_from_model(self.model, params)
        if not self.context:
            self.lib.llama_model_free(self.model)
            raise SlimlmError(f"llama.cpp could not make a context of {context} tokens for {path}{_why()}")
        self.size = context
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model))
        self.position = 0

    def reset(self) -> None:
        """Forget the sequence (clear the key/value cache)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)
        self.position = 0

    def eval(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Append ``ids`` to the sequence; the logits of every new position, or of the last one only."""
        count = len(ids)
        _errors.clear()
        if self.position + count > self.size:
            raise SlimlmError(f"{self.position + count} tokens do not fit llama.cpp's context of {self.size}")
        seq = ctypes.c_int32(0)
        outputs = [1] * count if all_logits else [0] * (count - 1) + [1]
        batch = _Batch(
            count,
            (ctypes.c_int32 * count)(*ids),
            None,
            (ctypes.c_int32 * count)(*range(self.position, self.position + count)),
            (ctypes.c_int32 * count)(*[1] * count),
            (ctypes.POINTER(ctypes.c_int32) * count)(*[ctypes.pointer(seq)] * count),
            (ctypes.c_int8 * count)(*outputs),
        )
        failed = self.lib.llama_decode(self.context, batch)
        if failed:
            raise SlimlmError(f"llama.cpp could not evaluate {count} tokens (code {failed}){_why()}")
        self.position += count
        rows = sum(outputs)
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.context), (rows, self.n_vocab)).copy()

    def close(self) -> None:
        """Free the context and the weights."""
        if self.context:
            self.lib.llama_free(self.context)
            self.lib.llama_model_free(self.model)
            self.context = self.model = None

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def logits(path: str | Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one sequence), shape ``(len(ids), vocab)``."""
    with Llama(path, len(ids)) as llama:
        return llama.eval(list(map(int, ids)), all_logits=True)


def perplexity(path: str | Path, windows) -> float:
    """Perplexity in llama.cpp over token windows (rows of a tensor or lists), each scored on its own."""
    rows = [list(map(int, w)) for w in windows]
    total, count = 0.0, 0
    with Llama(path, max(len(r) for r in rows)) as llama:
        for ids in rows:
            llama.reset()
            scores = llama.eval(ids, all_logits=True)[:-1].astype(np.float64)
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
    models = [Llama(path, prompt_tokens + new_tokens) for path in paths]
    try:
        rng = np.random.default_rng(0)
        samples: list[list[tuple[float, float]]] = [[] for _ in models]
        for _ in range(repeats + 1):
            tokens = rng.integers(0, min(m.n_vocab for m in models), prompt_tokens + new_tokens).tolist()
            for llama, taken in zip(models, samples, strict=True):
                taken.append(_timed(llama, tokens, prompt_tokens))
    finally:
        for llama in models:
            llama.close()
    return [
        Speed(
            float(np.median([prompt_tokens / p for p, _ in taken[1:]])),
            float(np.median([new_tokens / g for _, g in taken[1:]])),
        )
        for taken in samples
    ]


def _timed(llama: Llama, tokens: list[int], prompt_tokens: int) -> tuple[float, float]:
    """Seconds for the prompt pass and for the single-token steps after it."""
    llama.reset()
    start = time.perf_counter()
    llama.eval(tokens[:prompt_tokens])
    middle = time.perf_counter()
    for token in tokens[prompt_tokens:]:
        llama.eval([token])
    return middle - start, time.perf_counter() - middle


def quantize_rows(data: np.ndarray, ggml_type: int) -> np.ndarray:
    """The rows of the float matrix ``data`` encoded by ggml as ``ggml_type`` (no importance matrix): one
    row of bytes per row, as gguf's writer takes a raw tensor."""
    import gguf  # only exports quantize

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    rows = np.ascontiguousarray(data.reshape(-1, data.shape[-1]), dtype=np.float32)
    if rows.shape[1] % block:
        raise SlimlmError(f"rows of {rows.shape[1]} are not whole blocks of {block} for ggml type {ggml_type}")
    out = np.empty((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    written = require().ggml_quantize_chunk(ggml_type, rows.ctypes.data, out.ctypes.data, 0, *rows.shape, None)
    if written != out.size:
        raise SlimlmError(f"ggml wrote {written} bytes for a {out.size}-byte {ggml_type} tensor")
    return out.reshape(*data.shape[:-1], out.shape[-1])
