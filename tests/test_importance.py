"""Importance: the calibration pass, every metric, and the on-disk calibration cache."""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import slimlm.importance
from slimlm.cache import cache_root
from slimlm.errors import SlimlmError
from slimlm.importance import DAMPING, METRICS, Calibration, ChannelStats, cached_calibration, calibrate, importance
from slimlm.models import load_model

from .conftest import VOCAB, save_tiny, tiny_loaded


def windows(seed: int, n: int = 6, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibrated():
    loaded = tiny_loaded()
    return loaded, calibrate(loaded, windows(0))


def all_scores(scores) -> list[torch.Tensor]:
    return [*scores.heads, *scores.kv_heads, *scores.neurons, scores.layers]


def assert_same_calibration(a: Calibration, b: Calibration) -> None:
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.block_influence, b.block_influence, rtol=0, atol=0)
    for side_a, side_b in ((a.attention, b.attention), (a.mlp, b.mlp)):
        assert len(side_a) == len(side_b)
        for x, y in zip(side_a, side_b, strict=True):
            assert x.count == y.count
            for name in ("sum", "sumsq", "inverse_gram_diagonal"):
                torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=0, atol=0)


# --- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", list(METRICS))
def test_every_metric_scores_every_unit(calibrated, metric):
    loaded, calibration = calibrated
    dims = loaded.dims
    scores = importance(loaded, calibration, metric)
    assert [h.shape for h in scores.heads] == [(s.heads,) for s in dims.layers]
    assert [k.shape for k in scores.kv_heads] == [(s.kv_heads,) for s in dims.layers]
    assert [n.shape for n in scores.neurons] == [(s.neurons,) for s in dims.layers]
    assert scores.layers.shape == (dims.num_layers,)
    for t in all_scores(scores):
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all() and (t >= 0).all()
    assert any((n > 0).any() for n in scores.neurons)
    assert any((h > 0).any() for h in scores.heads)


@pytest.mark.parametrize("metric", list(METRICS))
def test_heads_sum_their_channels_and_kv_heads_their_query_heads(calibrated, metric):
    loaded, calibration = calibrated
    dims = loaded.dims
    scores = importance(loaded, calibration, metric)
    layers = loaded.adapter.decoder_layers(loaded.model)
    for i, layer in enumerate(layers):
        o_proj, down_proj = loaded.adapter.output_projections(layer)
        shape = dims.layers[i]
        channels = METRICS[metric](calibration.attention[i], o_proj.weight.double().norm(dim=0))
        heads = channels.view(shape.heads, dims.head_dim).sum(1)
        torch.testing.assert_close(scores.heads[i], heads.float())
        torch.testing.assert_close(scores.kv_heads[i], heads.view(shape.kv_heads, shape.group_size).sum(1).float())
        neurons = METRICS[metric](calibration.mlp[i], down_proj.weight.double().norm(dim=0))
        torch.testing.assert_close(scores.neurons[i], neurons.float())
    torch.testing.assert_close(scores.layers, calibration.block_influence.float())


def test_unknown_metric_is_refused(calibrated):
    loaded, calibration = calibrated
    with pytest.raises(SlimlmError, match=r"unknown importance metric 'wanda'.*activation"):
        importance(loaded, calibration, "wanda")


def test_magnitude_ignores_activations_and_activation_does_not():
    loaded = tiny_loaded()
    one, other = calibrate(loaded, windows(1)), calibrate(loaded, windows(2))
    magnitude = [importance(loaded, c, "magnitude") for c in (one, other)]
    for a, b in zip(magnitude[0].heads + magnitude[0].neurons, magnitude[1].heads + magnitude[1].neurons, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    activation = [importance(loaded, c, "activation") for c in (one, other)]
    assert not all(torch.equal(a, b) for a, b in zip(activation[0].neurons, activation[1].neurons, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(activation[0].heads, activation[1].heads, strict=True))


# --- the calibration pass -----------------------------------------------------------------------


def test_calibrate_matches_a_direct_computation_on_the_captured_inputs():
    loaded = tiny_loaded()
    ids = windows(3, n=6)  # two batches of the default 4 windows
    layer = loaded.adapter.decoder_layers(loaded.model)[1]
    o_proj, down_proj = loaded.adapter.output_projections(layer)
    captured = {"attention": [], "mlp": []}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, side=side: captured[side].append(args[0].detach().clone()))
        for module, side in ((o_proj, "attention"), (down_proj, "mlp"))
    ]
    try:
        calibration = calibrate(loaded, ids)
    finally:
        for hook in hooks:
            hook.remove()

    assert calibration.tokens == ids.numel()
    assert len(calibration.attention) == len(calibration.mlp) == loaded.dims.num_layers
    for side, stats in (("attention", calibration.attention[1]), ("mlp", calibration.mlp[1])):
        assert len(captured[side]) == 2
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[side]]).double()
        assert stats.count == x.shape[0] == ids.numel()
        # float32 precision: the pass may multiply in float32 per batch and accumulate in float64
        close = {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(stats.sum, x.sum(0), **close)
        torch.testing.assert_close(stats.sumsq, x.pow(2).sum(0), **close)
        torch.testing.assert_close(stats.norm, x.norm(dim=0), **close)
        torch.testing.assert_close(stats.variance, x.var(0), **close)
        gram = x.T @ x
        damping = DAMPING * gram.diagonal().mean()
        expected = torch.linalg.inv(gram + damping * torch.eye(gram.shape[0], dtype=torch.float64)).diagonal()
        # the inverse amplifies float32 rounding of the Gram matrix by its condition number (~1e3 here)
        torch.testing.assert_close(stats.inverse_gram_diagonal, expected, rtol=1e-3, atol=1e-6)
    assert calibration.block_influence.shape == (loaded.dims.num_layers,)
    assert ((calibration.block_influence >= 0) & (calibration.block_influence <= 2)).all()


@pytest.mark.parametrize("dead", [[5], list(range(40))], ids=["one-neuron", "whole-mlp"])
def test_dead_channels_keep_every_metric_finite(dead):
    """A channel that is always zero makes the Gram matrix singular; damping keeps its inverse finite."""
    loaded = tiny_loaded()
    mlp = loaded.adapter.decoder_layers(loaded.model)[1].mlp
    with torch.no_grad():  # down_proj input is act(gate(x)) * up(x): zero rows there, zero channels here
        mlp.gate_proj.weight[dead] = 0
        mlp.up_proj.weight[dead] = 0
    calibration = calibrate(loaded, windows(4))
    stats = calibration.mlp[1]
    assert (stats.sumsq[dead] == 0).all()
    damping = DAMPING * stats.sumsq.mean().clamp_min(1e-12)  # the Gram diagonal is the sum of squares
    expected = (1 / damping).expand(len(dead))
    torch.testing.assert_close(stats.inverse_gram_diagonal[dead], expected, rtol=1e-5, atol=0)
    for metric in METRICS:
        scores = importance(loaded, calibration, metric)
        for t in all_scores(scores):
            assert torch.isfinite(t).all() and (t >= 0).all(), metric
    for metric in ("activation", "fluctuation"):
        assert (importance(loaded, calibration, metric).neurons[1][dead] == 0).all()


# --- the cache ----------------------------------------------------------------------------------


def test_cached_calibration_is_written_once_and_read_back(tmp_path, monkeypatch):
    loaded = load_model(save_tiny(tiny_loaded(), tmp_path / "model"))
    ids = windows(5)
    first = cached_calibration(loaded, ids, "words.txt")
    entries = sorted((cache_root() / "calibration").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".pt"
    assert entries[0].parent.parent == tmp_path / "cache"
    assert_same_calibration(first, calibrate(loaded, ids))

    def no_calibration(*_args, **_kwargs):
        raise AssertionError("calibrate called although the cache holds this calibration")

    monkeypatch.setattr(slimlm.importance, "calibrate", no_calibration)
    second = cached_calibration(loaded, ids, "words.txt")
    assert_same_calibration(first, second)
    assert all(isinstance(s, ChannelStats) for s in second.attention + second.mlp)
    assert sorted((cache_root() / "calibration").iterdir()) == entries  # no new entry, no temp file left

    # other tokens or another source are other entries, not served from this one
    with pytest.raises(AssertionError, match="calibrate called"):
        cached_calibration(loaded, windows(6), "words.txt")
    with pytest.raises(AssertionError, match="calibrate called"):
        cached_calibration(loaded, ids, "other.txt")


def test_statistics_hold_only_their_own_elements(tmp_path):
    """A diagonal kept as a view of the inverse Gram matrix holds the whole matrix: width² floats per
    projection in memory and in the cache instead of width (650 MB instead of 1.6 MB for SmolLM2)."""
    loaded = load_model(save_tiny(tiny_loaded(), tmp_path / "model"))
    for calibration in (calibrate(loaded, windows(5)), cached_calibration(loaded, windows(5), "words.txt")):
        for stats in calibration.attention + calibration.mlp:
            for name in ("sum", "sumsq", "inverse_gram_diagonal", "removal_rank"):
                tensor = getattr(stats, name)
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
    (entry,) = (cache_root() / "calibration").iterdir()
    widths = sum(s.sum.numel() for s in calibration.attention + calibration.mlp)
    assert entry.stat().st_size < 40 * widths + 100_000  # four float64 vectors per projection, plus pickling


def test_processes_sharing_the_cache_calibrate_once(tmp_path, monkeypatch):
    loaded = load_model(save_tiny(tiny_loaded(), tmp_path / "model"))
    ids, calls, real = windows(7), [], slimlm.importance.calibrate

    def slow_calibration(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # long enough for the other worker to ask for the same entry meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(slimlm.importance, "calibrate", slow_calibration)
    with ThreadPoolExecutor(3) as pool:  # each holds its own lock file handle, as processes do
        results = list(pool.map(lambda _: cached_calibration(loaded, ids, "words.txt"), range(3)))
    assert len(calls) == 1
    for result in results[1:]:
        assert_same_calibration(result, results[0])


def test_in_memory_models_are_not_cached(tmp_path, monkeypatch):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    loaded = dataclasses.replace(tiny_loaded(), folder=empty)
    calls = []
    real = slimlm.importance.calibrate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(slimlm.importance, "calibrate", counting)
    ids = windows(7)
    first = cached_calibration(loaded, ids, "words.txt")
    second = cached_calibration(loaded, ids, "words.txt")
    assert len(calls) == 2
    assert_same_calibration(first, second)
    assert not (cache_root() / "calibration").exists()


def _counting_calibrate(monkeypatch) -> list:
    calls, real = [], slimlm.importance.calibrate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(slimlm.importance, "calibrate", counting)
    return calls


def test_other_weights_with_the_same_size_and_time_are_calibrated_again(tmp_path, monkeypatch):
    """``cp -p`` / ``rsync -a`` keep size and mtime: the cache key is the weights' content."""
    folder = save_tiny(tiny_loaded(seed=0), tmp_path / "model")
    weights = folder / "model.safetensors"
    stat = weights.stat()
    calls, ids = _counting_calibrate(monkeypatch), windows(5)
    first = cached_calibration(load_model(folder), ids, "words.txt")
    other = save_tiny(tiny_loaded(seed=1), tmp_path / "other") / "model.safetensors"
    assert other.stat().st_size == stat.st_size
    weights.write_bytes(other.read_bytes())
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = cached_calibration(load_model(folder), ids, "words.txt")
    assert len(calls) == 2
    assert not torch.equal(first.mlp[0].sum, second.mlp[0].sum)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-content"])
def test_a_damaged_cache_entry_is_a_miss_and_is_rewritten(tmp_path, monkeypatch, damage):
    loaded = load_model(save_tiny(tiny_loaded(), tmp_path / "model"))
    ids = windows(5)
    expected = cached_calibration(loaded, ids, "words.txt")
    (entry,) = (cache_root() / "calibration").iterdir()
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00" * 64)
    else:
        torch.save({"attention": [{"nonsense": 1}]}, entry)
    calls = _counting_calibrate(monkeypatch)
    assert_same_calibration(cached_calibration(loaded, ids, "words.txt"), expected)
    assert len(calls) == 1
    calls.clear()
    assert_same_calibration(cached_calibration(loaded, ids, "words.txt"), expected)  # rewritten whole
    assert calls == []


# --- greedy structured OBS (the ``reconstruction`` metric) --------------------------------------


def refit_error(weight: torch.Tensor, x: torch.Tensor, kept: list[int], damping: float) -> float:
    """Output error ‖W X − Ŵ X_K‖² of the best (ridge) re-fit of W on the columns ``kept``."""
    gram = x.T @ x
    damped = gram + damping * torch.eye(gram.shape[0], dtype=torch.float64)
    fitted = weight @ gram[:, kept] @ torch.linalg.inv(damped[kept][:, kept])
    return float(((x @ weight.T - x[:, kept] @ fitted.T) ** 2).sum())


def inputs(seed: int, rows: int = 200, width: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g, dtype=torch.float64)
    return torch.randn(rows, width, generator=g, dtype=torch.float64) @ mixing  # correlated channels


@pytest.mark.parametrize("seed", range(4))
def test_removal_rank_first_removes_the_unit_a_refit_misses_least(seed):
    x = inputs(seed)
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    damping = 1e-6 * float((x.T @ x).diagonal().mean())
    inverse = torch.linalg.inv(x.T @ x + damping * torch.eye(8, dtype=torch.float64))
    rank = slimlm.importance.removal_rank(weight, inverse)
    errors = [refit_error(weight, x, [k for k in range(8) if k != j], damping) for j in range(8)]
    assert int(rank.argmin()) == min(range(8), key=errors.__getitem__)
    assert sorted(rank.floor().tolist()) == list(range(8))  # one unit per step at this width


def test_removal_rank_sees_redundancy_a_one_shot_score_cannot():
    """Two copies of one strong channel: each alone is cheap to drop (its twin takes over), both are not.

    The one-shot OBS score (``second-order``) ranks both copies lowest; the greedy pass drops one copy
    first and then keeps the other longest, since without it the output is lost.
    """
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0]  # channel 1 duplicates channel 0
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    weight[:, :2] *= 5  # the duplicated channel carries most of the output
    inverse = slimlm.importance._damped_inverse(x.T @ x)
    rank = slimlm.importance.removal_rank(weight, inverse)
    one_shot = weight.norm(dim=0) ** 2 / inverse.diagonal()
    assert set(one_shot.argsort()[:2].tolist()) == {0, 1}
    assert int(rank.argmin()) in (0, 1) and int(rank.argmax()) in (0, 1)


def test_removal_rank_groups_columns_and_chunks_steps():
    x = inputs(3, width=12)
    weight = torch.randn(5, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inverse = slimlm.importance._damped_inverse(x.T @ x)
    heads = slimlm.importance.removal_rank(weight, inverse, group=3)
    assert heads.shape == (4,) and sorted(heads.floor().tolist()) == [0, 1, 2, 3]
    errors = [refit_error(weight, x, [c for c in range(12) if c // 3 != h], 0.0) for h in range(4)]
    assert int(heads.argmin()) == min(range(4), key=errors.__getitem__)
    chunked = slimlm.importance.removal_rank(weight, inverse, steps=4)  # 12 units, 3 per step
    assert sorted(chunked.floor().tolist()) == [s for s in range(4) for _ in range(3)]


def test_calibration_ranks_removal_on_the_captured_inputs_and_dead_neurons_go_first():
    loaded = tiny_loaded()
    mlp = loaded.adapter.decoder_layers(loaded.model)[1].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[[2, 9]] = 0  # neurons 2 and 9 never fire
    captured = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
    try:
        calibration = calibrate(loaded, windows(8))
    finally:
        hook.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    expected = slimlm.importance.removal_rank(mlp.down_proj.weight, slimlm.importance._damped_inverse(x.T @ x))
    torch.testing.assert_close(calibration.mlp[1].removal_rank, expected)
    scores = importance(loaded, calibration, "reconstruction")
    assert set(scores.neurons[1].argsort()[:2].tolist()) == {2, 9}
    head_dim = loaded.dims.head_dim
    assert (calibration.attention[0].removal_rank.view(-1, head_dim).diff(dim=1) == 0).all()  # one rank per head
