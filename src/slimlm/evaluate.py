"""Quality of a model or sub-network: perplexity on fixed token windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.progress import track

# a forward's float32 logits stay under this: 2 windows of 256 tokens of a 49k-token vocabulary (SmolLM2), as
# fast on 2 cores as 4 windows (5.5 s for 16 windows either way; 1 window a forward: 6.1 s) at half the memory
LOGITS_BYTES = 128 * 2**20
POSITIONS = 64  # positions of a window normalised at once: the softmax's temporaries stay small (Gemma 3's
# 262k-token vocabulary gives 268 MB per window of 256 tokens, and each full-window temporary as much again)


def windows_per_forward(model: PreTrainedModel, seq_len: int, most: int = 4) -> int:
    """Windows scored in one forward: ``most``, or fewer where their logits would pass ``LOGITS_BYTES``
    (Gemma 3's 262k-token vocabulary gives 268 MB of logits per window of 256 tokens)."""
    return max(1, min(most, LOGITS_BYTES // (seq_len * model.config.vocab_size * 4)))


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int | None = None, description: str | None = None
) -> float:
    """exp(mean next-token negative log-likelihood) over all windows (each scored on its own).

    ``batch_size`` windows per forward (None: ``windows_per_forward``); ``description`` shows a
    progress bar with that label; None evaluates silently (search loops).
    """
    batch_size = windows_per_forward(model, windows.shape[-1]) if batch_size is None else batch_size
    if batch_size < 1:
        raise SlimlmError(f"batch size must be at least 1, got {batch_size}")
    batches = windows.split(batch_size)
    if description is not None:
        batches = track(batches, description)
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        batch = batch.to(model.device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row, ids in zip(logits, batch, strict=True):  # a window at a time: no batch-sized copies of the logits
            for part, targets in zip(row[:-1].split(POSITIONS), ids[1:].split(POSITIONS), strict=True):
                total_nll += F.cross_entropy(part.float(), targets, reduction="sum").item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


TOP_K = 128  # dense next-token probabilities kept per position for the KL fitness (the rest is one tail bin)


@dataclass(frozen=True)
class DenseReference:
    """The dense model's top-k next-token log-probabilities on the fitness windows, computed once."""

    windows: torch.Tensor  # (n, seq_len) token ids
    indices: torch.Tensor  # (n, seq_len - 1, k) token ids of the dense model's top-k
    logprobs: torch.Tensor  # (n, seq_len - 1, k) their log-probabilities


@torch.no_grad()
def dense_reference(
    model: PreTrainedModel, windows: torch.Tensor, top_k: int = TOP_K, batch_size: int | None = None
) -> DenseReference:
    """What the KL fitness compares candidates with: the dense model's top ``top_k`` log-probabilities."""
    batch_size = windows_per_forward(model, windows.shape[-1]) if batch_size is None else batch_size
    indices, logprobs = [], []
    for batch in track(windows.split(batch_size), "dense reference for the KL fitness"):
        logits = model(input_ids=batch.to(model.device), use_cache=False).logits[:, :-1]
        for row in logits:  # a window at a time: no batch-sized temporaries beside the logits
            k = min(top_k, row.shape[-1])
            tops = [F.log_softmax(part.float(), dim=-1).topk(k) for part in row.split(POSITIONS)]
            indices.append(torch.cat([top.indices for top in tops]).cpu())
            logprobs.append(torch.cat([top.values for top in tops]).cpu())
    return DenseReference(windows, torch.stack(indices), torch.stack(logprobs))


@torch.no_grad()
def fitness(
    model: PreTrainedModel, reference: DenseReference, windows: int, batch_size: int | None = None
) -> dict[str, float]:
    """KL divergence to the dense model (nats per token) and perplexity, on the first ``windows`` windows.

    KL is taken over the dense model's top-k tokens plus one bin for the rest of the vocabulary: the
    exact KL of those coarsened distributions, a lower bound of the full KL that ranks candidates alike.
    """
    batch_size = windows_per_forward(model, reference.windows.shape[-1]) if batch_size is None else batch_size
    total_kl, total_nll, tokens = 0.0, 0.0, 0
    for start in range(0, windows, batch_size):
        batch = reference.windows[start : min(windows, start + batch_size)]
        logits = model(input_ids=batch.to(model.device), use_cache=False).logits[:, :-1]
        for offset, row in enumerate(logits):  # a window at a time: no batch-sized temporaries beside the logits
            kl, nll = _window_fitness(row.float().cpu(), reference, start + offset)
            total_kl, total_nll, tokens = total_kl + kl, total_nll + nll, tokens + len(row)
    return {"kl": total_kl / tokens, "perplexity": math.exp(total_nll / tokens)}


def _window_fitness(logits: torch.Tensor, reference: DenseReference, window: int) -> tuple[float, float]:
    """Summed KL to the dense model and negative log-likelihood of one window's next-token ``logits``."""
    # log-probabilities only where needed, not over the whole vocabulary; a few positions' temporaries at a time
    norm = torch.cat([part.logsumexp(dim=-1, keepdim=True) for part in logits.split(POSITIONS)])
    kl = coarse_kl(reference.logprobs[window], logits.gather(-1, reference.indices[window]) - norm)
    targets = reference.windows[window, 1:]
    nll = -(logits.gather(-1, targets[:, None]) - norm).sum()
    return kl.sum().item(), nll.item()


def coarse_kl(dense_top: torch.Tensor, candidate_top: torch.Tensor) -> torch.Tensor:
    """KL from the dense to the candidate distribution at each position, over the dense model's top-k
    tokens (their log-probabilities under each model, ``(..., k)``) plus one bin for the rest of the
    vocabulary: the exact KL of those coarsened distributions, a lower bound of the full KL."""
    p = dense_top.exp()
    kl = (p * (dense_top - candidate_top)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
    q_tail = (1 - candidate_top.exp().sum(-1)).clamp_min(1e-12)
    return kl + p_tail * (p_tail.log() - q_tail.log())
