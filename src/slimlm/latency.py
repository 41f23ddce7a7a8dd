"""A candidate's latency predicted from its shape, by a cost model fitted once on timed sub-networks.

Timing every candidate (a GGUF export and a llama.cpp probe, or transformers forwards) costs seconds
each, and on a shared machine its noise, several percent, is as large as the differences a search
must resolve near a latency budget: the fittest candidates within it are then those timed low by
chance (benchmarks/results/latency_llamacpp_rerun.md: 162 candidates timed over the budget, and a
winner slower than the budget's model). A forward runs the layers one after another, so its time is
a sum over sub-blocks: per attention and per MLP block a fixed cost (norms, small kernels, their
launches) and a cost per query head, key/value head and neuron (the weights read). slimlm times
``SAMPLES`` sub-networks drawn across the space, each beside the dense model so that the machine's
drift cancels, fits those costs and a constant by least squares to the time relative to the dense
model, and checks the fit on ``CHECKS`` sub-networks it was not fitted on. The search then prices a
candidate in microseconds and never proposes one over a latency budget, as with a parameter budget.
This is the latency lookup table of hardware-aware NAS (HAT, Once-for-All) reduced to its linear
terms, which is what a sequential layer stack leaves.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from slimlm import llamacpp
from slimlm.apply import subnetwork_applied
from slimlm.costs import LatencyProbe, synchronize
from slimlm.export import export_gguf, ragged_layers_supported, runtime_layer_shapes
from slimlm.gguf_tokenizer import tokenizer_gguf
from slimlm.importance import Importance
from slimlm.models import LayerShape, LoadedModel
from slimlm.progress import track
from slimlm.space import SearchSpace, keep_most_important
from slimlm.subnet import SubNetwork

FEATURES = ("constant", "attention blocks", "query heads", "key/value heads", "MLP blocks", "MLP neurons")
SAMPLES = 16  # timed sub-networks the costs are fitted on (six unknowns)
CHECKS = 6  # timed sub-networks the fit is checked on before they are fitted on too
ROUNDS = 5  # interleaved timing rounds per sub-network and the dense model beside it (medians)
DECODE_TOKENS = 16  # tokens generated per llama.cpp round, after a prompt of the job's sequence length


@dataclass(frozen=True)
class LatencyModel:
    """Predicted latency of a sub-network in one runtime: ``dense_ms`` times a linear function of the
    layer shapes the runtime runs (``weights`` per ``FEATURES``, in fractions of the dense time)."""

    runtime: str
    family: str
    dense_ms: float
    weights: tuple[float, ...]
    check_errors: tuple[float, ...]  # predicted / timed - 1 on sub-networks the fit had not seen

    def ratio(self, shapes: list[LayerShape]) -> float:
        """Predicted time of a sub-network with these kept layer shapes over the dense model's."""
        return float(np.dot(self.weights, runtime_features(self.runtime, self.family, shapes)))

    def ms(self, shapes: list[LayerShape]) -> float:
        return self.dense_ms * self.ratio(shapes)

    def summary(self) -> dict:
        """What a report states: the model, and how close it came on sub-networks it was not fitted on."""
        errors = [abs(e) for e in self.check_errors]
        return asdict(self) | {"mean_abs_check_error": statistics.mean(errors), "max_abs_check_error": max(errors)}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        fields = ("runtime", "family", "dense_ms", "weights", "check_errors")
        values = {k: data[k] for k in fields}
        return cls(**values | {"weights": tuple(values["weights"]), "check_errors": tuple(values["check_errors"])})


def features(shapes: list[LayerShape]) -> np.ndarray:
    """The counts a forward's time is linear in (``FEATURES``), for the kept layers' shapes."""
    return np.array(
        [
            1.0,
            sum(s.has_attention for s in shapes),
            sum(s.heads for s in shapes),
            sum(s.kv_heads for s in shapes),
            sum(s.has_mlp for s in shapes),
            sum(s.neurons for s in shapes),
        ]
    )


def runtime_features(runtime: str, family: str, shapes: list[LayerShape]) -> np.ndarray:
    """``features`` of the layer shapes the runtime runs: llama.cpp runs some removed sub-blocks as small
    zero ones (``slimlm.export``), and they cost time there."""
    return features(runtime_layer_shapes(family, shapes) if runtime == "llama.cpp" else shapes)


def fit(samples: list[tuple[np.ndarray, float]], dense: np.ndarray) -> tuple[float, ...]:
    """Least-squares weights of ``FEATURES`` from (features, time relative to dense) pairs, none below
    zero; the dense model (``dense``: its features) is one exact pair (ratio 1). Features are scaled by
    the dense model's, so the solve is well conditioned whatever the widths."""
    rows = np.array([row / dense for row, _ in samples] + [np.ones(len(FEATURES))])
    ratios = np.array([ratio for _, ratio in samples] + [1.0])
    # a negative cost is timing noise fitted (no sub-block makes a forward faster) and would price some
    # candidates below any real model: drop the most negative one and solve again (an active set, as NNLS)
    active, weights = list(range(len(FEATURES))), np.zeros(len(FEATURES))
    while True:
        solved, *_ = np.linalg.lstsq(rows[:, active], ratios, rcond=None)
        if solved.min() >= 0 or len(active) == 1:
            break
        active.pop(int(solved.argmin()))
    weights[active] = solved
    return tuple(float(w) for w in weights / dense)


def build_latency_model(
    loaded: LoadedModel,
    runtime: str,
    seq_len: int,
    space: SearchSpace,
    importance: Importance,
    within: Callable[[list[LayerShape]], bool] = lambda _shapes: True,
    seed: int = 0,
) -> LatencyModel:
    """Time ``SAMPLES + CHECKS`` sub-networks drawn from ``space`` beside the dense model, fit the
    costs on the first ``SAMPLES``, check them on the rest, and fit again on all. Every other one is
    drawn wide and shrunk until ``within`` the search's (static) budget, where its candidates lie: a
    fit on sub-networks across the space alone priced SmolLM2's candidates at 0.7 of its parameters 3%
    fast in llama.cpp, and the sub-networks it was checked on up to 6% slow."""
    rng = np.random.default_rng(seed)
    dims, family = loaded.dims, loaded.dims.family
    # llama.cpp's graphs of some families need every layer the same shape (slimlm.export refuses others)
    ragged = runtime != "llama.cpp" or ragged_layers_supported(family)

    def draw(k: int) -> SubNetwork:
        if k % 2 == 0:
            return keep_most_important(dims, importance, space.sample_levels(dims, rng, ragged))
        shapes = space.shrink_to_fit(dims, space.sample_levels(dims, rng, ragged, wide=True), within)
        return keep_most_important(dims, importance, shapes)

    drawn = [draw(k) for k in range(SAMPLES + CHECKS)]
    dense_times, samples = [], []
    with _timer(loaded, runtime, seq_len) as time_beside_dense:
        for subnet in track(drawn, f"timing sub-networks in {runtime} for the latency model"):
            dense_ms, sample_ms = time_beside_dense(subnet)
            dense_times.append(dense_ms)
            samples.append((runtime_features(runtime, family, subnet.shapes()), sample_ms / dense_ms))
    dense = runtime_features(runtime, family, loaded.dims.layers)
    weights = np.array(fit(samples[:SAMPLES], dense))
    errors = tuple(float(np.dot(weights, row)) / ratio - 1 for row, ratio in samples[SAMPLES:])
    return LatencyModel(runtime, family, statistics.median(dense_times), fit(samples, dense), errors)


@contextmanager
def _timer(loaded: LoadedModel, runtime: str, seq_len: int) -> Iterator[Callable[[SubNetwork], tuple[float, float]]]:
    """A function timing a sub-network beside the dense model: (dense ms, sub-network ms)."""
    if runtime == "transformers":

        def beside(subnet: SubNetwork) -> tuple[float, float]:
            dense = prefill_ms(loaded.model, seq_len)
            with subnetwork_applied(loaded, subnet, None, views=True) as model:  # contiguous views: timed as extracted
                return dense, prefill_ms(model, seq_len)

        yield beside
        return
    with tempfile.TemporaryDirectory(prefix="slimlm-latency-") as scratch:  # removed however the build ends
        folder = Path(scratch)
        dense_file = export_gguf(loaded, folder / "dense.gguf", "f16", scratch_tokenizer_pre(loaded)).path

        def beside(subnet: SubNetwork) -> tuple[float, float]:
            with subnetwork_applied(loaded, subnet, None):
                path = export_gguf(loaded, folder / "sample.gguf", "f16", scratch_tokenizer_pre(loaded)).path
            dense, sample = llamacpp.compare_speed([dense_file, path], seq_len, DECODE_TOKENS, ROUNDS)
            return 1000 / dense.generation_tokens_per_s, 1000 / sample.generation_tokens_per_s

        yield beside


def prefill_ms(model, seq_len: int) -> float:
    """Time of one forward over ``seq_len`` tokens without a cache, the middle of three."""
    probe = LatencyProbe(model, prompt_tokens=seq_len, new_tokens=2)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=probe.prompt, use_cache=False)
        synchronize(model)
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[1]


def llamacpp_ms_per_token(loaded: LoadedModel, folder: str | Path | None, seq_len: int) -> float:
    """ms per generated token after a ``seq_len`` prompt of the model as applied now, in llama.cpp
    (a scratch f16 GGUF in ``folder``, one per process, removed after)."""
    path = Path(folder or tempfile.gettempdir()) / f"latency-{os.getpid()}.gguf"
    try:
        export_gguf(loaded, path, "f16", scratch_tokenizer_pre(loaded))
        speed = llamacpp.compare_speed([path], prompt_tokens=seq_len, new_tokens=DECODE_TOKENS, repeats=3)[0]
    finally:
        path.unlink(missing_ok=True)
    return 1000 / speed.generation_tokens_per_s


def scratch_tokenizer_pre(loaded: LoadedModel) -> str | None:
    """A pre-tokenizer name for GGUF files only timed, never tokenized with: the source's, or any."""
    return None if tokenizer_gguf(loaded.folder) else "default"
