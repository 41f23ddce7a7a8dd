"""What a model or sub-network costs: parameters, FLOPs, memory, and measured CPU latency.

Parameters, FLOPs and memory are computed from the structure alone (``ModelDims`` and the kept
layer shapes), so a search can price thousands of candidates without touching weights; the
tests check the parameter count against the real extracted models. Latency is measured.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.models.base import LayerShape, ModelDims
from slimlm.progress import track


@dataclass(frozen=True)
class StaticCost:
    """Size and work of one model structure."""

    params: int  # all parameters, tied embeddings counted once
    params_without_embeddings: int
    flops_per_token: int  # forward pass, one token at position ``context``
    memory_bytes: int  # weights + KV cache for ``context`` tokens
    context: int

    def as_dict(self) -> dict:
        return asdict(self)


def static_cost(
    dims: ModelDims, shapes: list[LayerShape] | None = None, context: int = 512, bytes_per_value: int = 4
) -> StaticCost:
    """Cost of the model with decoder layers of ``shapes`` (default: the model as it is)."""
    shapes = list(dims.layers) if shapes is None else shapes
    layer_params = sum(dims.layer_params(s) for s in shapes)
    params = dims.params_outside_layers + layer_params
    matmul_weights = dims.vocab_size * dims.hidden_size + sum(
        s.heads * dims.weights_per_head + s.kv_heads * dims.weights_per_kv_head + s.neurons * dims.weights_per_neuron
        for s in shapes
    )
    # scores (q·k) and mixing (p·v) against ``context`` cached positions: 2 matmuls, 2 FLOPs per MAC
    attention = sum(4 * s.heads * dims.head_dim * context for s in shapes)
    kv_cache = sum(2 * s.kv_heads * dims.head_dim * context for s in shapes)
    return StaticCost(
        params=params,
        params_without_embeddings=params - dims.embedding_params,
        flops_per_token=2 * matmul_weights + attention,
        memory_bytes=(params + kv_cache) * bytes_per_value,
        context=context,
    )


@dataclass(frozen=True)
class Latency:
    """Measured CPU speed: prefill time for ``prompt_tokens`` and greedy decode rate under ``generate``."""

    prefill_ms: float
    decode_tokens_per_s: float
    prompt_tokens: int
    new_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


class LatencyProbe:
    """Times one model; call ``sample()`` repeatedly (interleaved with other models) then ``result()``."""

    def __init__(self, model: PreTrainedModel, prompt_tokens: int = 128, new_tokens: int = 32, seed: int = 0):
        if prompt_tokens < 1 or new_tokens < 2:
            raise SlimlmError(
                f"need a prompt of at least 1 token and at least 2 new tokens, got {prompt_tokens}, {new_tokens}"
            )
        self.model = model
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
        self.prompt = prompt.to(model.device)
        self.new_tokens = new_tokens
        eos = model.generation_config.eos_token_id
        pad = model.generation_config.pad_token_id
        self.pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
        self.prefill: list[float] = []
        self.decode: list[float] = []

    @torch.no_grad()
    def sample(self) -> None:
        t0 = time.perf_counter()
        self.model(input_ids=self.prompt, use_cache=True)
        synchronize(self.model)
        t1 = time.perf_counter()
        one = self._generate(1)
        many = self._generate(self.new_tokens)
        self.prefill.append(t1 - t0)
        # generate(N) - generate(1) leaves N-1 decode steps without the prefill
        self.decode.append((self.new_tokens - 1) / max(many - one, 1e-9))

    def _generate(self, n: int) -> float:
        start = time.perf_counter()
        self.model.generate(
            self.prompt,
            attention_mask=torch.ones_like(self.prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=self.pad,
        )
        synchronize(self.model)
        return time.perf_counter() - start

    def result(self) -> Latency:
        return Latency(
            prefill_ms=1000 * statistics.median(self.prefill),
            decode_tokens_per_s=statistics.median(self.decode),
            prompt_tokens=self.prompt.shape[1],
            new_tokens=self.new_tokens,
        )


def check_repeats(repeats: int) -> None:
    """Timings are medians of repeated runs: at least one is needed."""
    if repeats < 1:
        raise SlimlmError(f"repeats must be at least 1, got {repeats}")


def probe_lengths(max_positions: int, prompt_tokens: int = 128, new_tokens: int = 32) -> tuple[int, int]:
    """Prompt and decode lengths for timing, within the model's context: a short-context model (GPT-2
    style position tables of 128) would otherwise index past its positions. At most half the context
    for the prompt and a quarter for the decode."""
    return min(prompt_tokens, max(1, max_positions // 2)), min(new_tokens, max(2, max_positions // 4))


def measure_latency(
    model: PreTrainedModel, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3
) -> Latency:
    """Median prefill time and decode rate of ``model`` over ``repeats`` runs, after one warm-up."""
    return compare_speed([model], repeats, prompt_tokens, new_tokens)[0]


def compare_speed(
    models: list[PreTrainedModel], repeats: int = 3, prompt_tokens: int = 128, new_tokens: int = 32
) -> list[Latency]:
    """Latency of several models measured side by side: a warm-up each, then one sample of each in turn."""
    check_repeats(repeats)
    probes = [LatencyProbe(m, prompt_tokens, new_tokens) for m in models]
    for probe in probes:  # warm-up, not counted: first calls allocate and pick kernels
        probe.sample()
        probe.prefill.clear()
        probe.decode.clear()
    rounds = range(repeats)
    for _ in track(rounds, "timing prefill and decode") if len(models) > 1 else rounds:
        for probe in probes:
            probe.sample()
    return [p.result() for p in probes]


def peak_memory(model: str, prompt_tokens: int = 128, new_tokens: int = 32) -> int:
    """Peak resident memory in bytes of a fresh process that loads ``model`` and generates once.

    A separate process, because a process's peak never goes down: measured in the caller, the
    second model would inherit the first one's peak.
    """
    code = "import sys; from slimlm.costs import _report_peak_memory as r; r(sys.argv[1], *map(int, sys.argv[2:]))"
    args = [sys.executable, "-c", code, model, str(prompt_tokens), str(new_tokens)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {model} failed: {done.stderr.strip().splitlines()[-1:]}")
    return int(done.stdout.split()[-1])


def _report_peak_memory(model: str, prompt_tokens: int, new_tokens: int) -> None:
    from slimlm.models import load_model

    probe = LatencyProbe(load_model(model).model, prompt_tokens, new_tokens)
    probe.sample()
    print(_peak_resident_bytes())


def _peak_resident_bytes() -> int:
    """This process's peak resident memory since it started.

    On Linux, ``ru_maxrss`` survives ``exec`` and so starts at the parent's resident size when the
    probe was forked; ``VmHWM`` belongs to the new address space and does not.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, others KiB


def synchronize(model) -> None:
    """Wait for the accelerator: its kernels run asynchronously, and a timer must not stop before them."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
