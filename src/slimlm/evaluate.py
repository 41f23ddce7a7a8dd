"""Quality of a model or sub-network: perplexity on fixed token windows."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.progress import track

WINDOWS = 4  # windows a forward for perplexity and the KL fitness: their logits are made a part at a time
# a part's float32 logits: 42 positions of 4 windows for SmolLM2, 8 for Gemma 3. Measured against 128 MB
# (16 fitness windows, alone): SmolLM2 154 MB above the model at peak instead of 283-319 MB, as fast (timings
# within their noise); Gemma 3 136 MB instead of 331-346 MB, 21.6-24.0 s instead of 17.3 s (its head's matmul
# on 32 rows at a time)
PART_BYTES = 32 * 2**20


def logit_parts(model: PreTrainedModel, batch: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``model``'s next-token logits on ``batch`` (windows of token ids) as (first position, float32 logits of
    the positions from there), each part under ``PART_BYTES``: the decoder runs once, the output head a
    part at a time, so a batch's logits over the vocabulary are never held whole (Gemma 3: 268 MB a window
    of 256 tokens). The same numbers as ``model(batch).logits`` (tested for every family).
    """
    hidden = model.base_model(input_ids=batch.to(model.device), use_cache=False).last_hidden_state
    step = max(1, PART_BYTES // (len(batch) * model.config.vocab_size * 4))
    for start in range(0, hidden.shape[1], step):
        yield start, head_logits(model, hidden[:, start : start + step])


def head_logits(model: PreTrainedModel, hidden: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
    """float32 logits of the decoder's final ``hidden`` states over the vocabulary's ``tokens``, as the
    causal-LM head makes them (its soft cap included): the head alone, so callers choose how many logits
    exist at once (positions, or a part of the vocabulary for many positions)."""
    head = model.get_output_embeddings()
    logits = F.linear(hidden, head.weight[tokens], None if head.bias is None else head.bias[tokens]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # Gemma's soft cap, as its causal-LM head applies it
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int | None = None, description: str | None = None
) -> float:
    """exp(mean next-token negative log-likelihood) over all windows (each scored on its own).

    ``batch_size`` windows per forward (None: ``WINDOWS``); ``description`` shows a
    progress bar with that label; None evaluates silently (search loops).
    """
    batch_size = WINDOWS if batch_size is None else batch_size
    if batch_size < 1:
        raise SlimlmError(f"batch size must be at least 1, got {batch_size}")
    batches = windows.split(batch_size)
    if description is not None:
        batches = track(batches, description)
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        targets = batch[:, 1:].to(model.device)
        for start, logits in logit_parts(model, batch[:, :-1]):
            for row, ids in zip(logits, targets[:, start : start + logits.shape[1]], strict=True):  # a window at a time
                total_nll += F.cross_entropy(row, ids, reduction="sum").item()
        total_tokens += targets.numel()
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
    model: PreTrainedModel, windows: torch.Tensor, top_k: int = TOP_K, batch_size: int = WINDOWS
) -> DenseReference:
    """What the KL fitness compares candidates with: the dense model's top ``top_k`` log-probabilities."""
    k = min(top_k, model.config.vocab_size)
    indices = torch.empty(*windows[:, 1:].shape, k, dtype=torch.long)
    logprobs = torch.empty(*windows[:, 1:].shape, k)
    batches = track(windows.split(batch_size), "dense reference for the KL fitness")
    for first, batch in zip(range(0, len(windows), batch_size), batches, strict=True):
        for start, logits in logit_parts(model, batch[:, :-1]):
            for offset, row in enumerate(logits):  # a window at a time: no part-sized temporaries beside the logits
                top = F.log_softmax(row, dim=-1).topk(k)
                at = (first + offset, slice(start, start + len(row)))
                indices[at], logprobs[at] = top.indices.cpu(), top.values.cpu()
    return DenseReference(windows, indices, logprobs)


@torch.no_grad()
def fitness(
    model: PreTrainedModel, reference: DenseReference, windows: int, batch_size: int = WINDOWS
) -> dict[str, float]:
    """KL divergence to the dense model (nats per token) and perplexity, on the first ``windows`` windows.

    KL is taken over the dense model's top-k tokens plus one bin for the rest of the vocabulary: the
    exact KL of those coarsened distributions, a lower bound of the full KL that ranks candidates alike.
    """
    total_kl, total_nll = 0.0, 0.0
    for first in range(0, windows, batch_size):
        batch = reference.windows[first : min(windows, first + batch_size)]
        for start, logits in logit_parts(model, batch[:, :-1]):
            for offset, row in enumerate(logits):  # a window at a time: no part-sized temporaries beside the logits
                at = (first + offset, slice(start, start + len(row)))
                kl, nll = _fitness_terms(row.cpu(), reference, at)
                total_kl, total_nll = total_kl + kl, total_nll + nll
    tokens = windows * (reference.windows.shape[1] - 1)
    return {"kl": total_kl / tokens, "perplexity": math.exp(total_nll / tokens)}


def _fitness_terms(logits: torch.Tensor, reference: DenseReference, at: tuple[int, slice]) -> tuple[float, float]:
    """Summed KL to the dense model and negative log-likelihood of next-token ``logits`` at positions ``at``
    (window, positions) of the reference."""
    norm = logits.logsumexp(dim=-1, keepdim=True)  # log-probabilities only where needed, not over the vocabulary
    kl = coarse_kl(reference.logprobs[at], logits.gather(-1, reference.indices[at]) - norm)
    targets = reference.windows[at[0], 1:][at[1]]
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
