"""Quality of a model or sub-network: perplexity on fixed token windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.progress import track

WINDOWS = 4  # windows a forward for perplexity and the KL fitness: their logits are made a part at a time
# float32 logits made at once: a part of the vocabulary for every row of a batch (``token_scores``: perplexity,
# the KL fitness and its dense reference, the cloze tasks, chat fidelity; 8,224 tokens for 4 windows of 256).
# A few positions over the whole vocabulary at a time (before) read Gemma 3's head for every 32 rows
PART_BYTES = 32 * 2**20


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


def decoder_states(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states at every position of ``ids`` (windows of token ids): what the
    output head turns into logits (``head_logits``), without the head."""
    return model.base_model(input_ids=ids.to(model.device), use_cache=False).last_hidden_state


@dataclass(frozen=True)
class TokenScores:
    """Per row of states, its next-token distribution as the scores need it: never its logits."""

    logprob: torch.Tensor  # log P(the row's target token)
    top: torch.Tensor | None  # whether the target is strictly the most likely token (a tie is a miss), if asked
    gathered: torch.Tensor | None  # log-probabilities of the token ids asked for (rows x k), if asked
    best: torch.Tensor | None  # log-probabilities of the k most likely tokens, most likely first (rows x k), if asked
    best_ids: torch.Tensor | None  # their token ids, if asked


def token_scores(
    model,
    states: torch.Tensor,
    targets: torch.Tensor,
    gather: torch.Tensor | None = None,
    greedy: bool = False,
    best: int = 0,
) -> TokenScores:
    """``TokenScores`` of each row of ``states`` (a transformers model's final hidden states, any other
    model's logits already) for its token in ``targets``, the log-probabilities of token ids ``gather``, with
    ``greedy`` whether greedy decoding picks the target (10-15% of the time on Gemma 3), and with ``best``
    the log-probabilities and ids of the ``best`` most likely tokens (kept across parts as they come).

    The vocabulary is taken a part at a time, every row at once, ``PART_BYTES`` of logits at a time: the
    output head's weights are read once for all rows (Gemma 3's: 671 MB) and no row's logits are ever
    whole (Gemma 3: 1 MB a token). Against a few positions at a time over the whole vocabulary (the head
    read once per part), side by side: Gemma 3's KL fitness on 16 windows 11.2-14.2 s instead of 18.6-21.0 s
    and its perplexity 9.7-13.8 s instead of 15.7-19.4 s; SmolLM2's as fast; the same KL to 7 digits, and
    perplexity nearer float64's (SmolLM2, 4 windows: 23.566358 against 23.566364; 23.566166 before).
    """
    head = isinstance(model, PreTrainedModel)
    vocab = model.get_output_embeddings().weight.shape[0] if head else states.shape[-1]
    targets = targets.to(states.device)
    gather = None if gather is None else gather.to(states.device)
    rows = torch.arange(len(states), device=states.device)
    total = torch.full((len(states),), -math.inf, device=states.device)  # log of the summed probabilities
    target, rival = torch.zeros_like(total), torch.full_like(total, -math.inf)  # rival: the best other token
    picked = None if gather is None else torch.zeros(gather.shape, device=states.device)
    k = min(best, vocab)
    leaders, leader_ids = total[:, None].expand(-1, 0), rows[:, None].expand(-1, 0)  # the k best so far: none yet
    step = max(1, PART_BYTES // (max(1, len(states)) * 4))
    for start in range(0, vocab, step):
        tokens = slice(start, min(start + step, vocab))
        logits = head_logits(model, states, tokens) if head else states[:, tokens].to(torch.float32, copy=True)
        total = torch.logaddexp(total, logits.logsumexp(-1))
        if gather is not None:
            inside = (gather >= start) & (gather < tokens.stop)
            picked = torch.where(inside, logits.gather(-1, (gather - start).clamp(0, logits.shape[1] - 1)), picked)
        if k:  # this part's leaders against the leaders so far
            part = logits.topk(min(k, logits.shape[1]))
            values, ids = torch.cat([leaders, part.values], 1), torch.cat([leader_ids, part.indices + start], 1)
            kept = values.topk(min(k, values.shape[1]))
            leaders, leader_ids = kept.values, ids.gather(1, kept.indices)
        inside = (targets >= start) & (targets < tokens.stop)
        at = (rows[inside], targets[inside] - start)
        target[inside] = logits[at]
        if greedy:
            logits[at] = -math.inf  # the target leaves the rivals
            rival = torch.maximum(rival, logits.max(-1).values)
    top = target > rival if greedy else None
    gathered = None if picked is None else picked - total[:, None]
    best_logprobs = leaders - total[:, None] if k else None
    return TokenScores(target - total, top, gathered, best_logprobs, leader_ids if k else None)


def window_scores(model: PreTrainedModel, batch: torch.Tensor, **asked) -> TokenScores:
    """``token_scores`` of every position of ``batch`` (windows of token ids) for its next token, a row per
    position, windows in order; ``asked``: what else ``token_scores`` should give."""
    states = decoder_states(model, batch[:, :-1]).flatten(0, 1)
    return token_scores(model, states, batch[:, 1:].reshape(-1), **asked)


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
        total_nll -= window_scores(model, batch).logprob.sum().item()
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
    model: PreTrainedModel, windows: torch.Tensor, top_k: int = TOP_K, batch_size: int = WINDOWS
) -> DenseReference:
    """What the KL fitness compares candidates with: the dense model's top ``top_k`` log-probabilities."""
    k = min(top_k, model.config.vocab_size)
    indices = torch.empty(*windows[:, 1:].shape, k, dtype=torch.long)
    logprobs = torch.empty(*windows[:, 1:].shape, k)
    batches = track(windows.split(batch_size), "dense reference for the KL fitness")
    for first, batch in zip(range(0, len(windows), batch_size), batches, strict=True):
        scores = window_scores(model, batch, best=k)
        at = slice(first, first + len(batch))
        indices[at], logprobs[at] = (t.view(len(batch), -1, k).cpu() for t in (scores.best_ids, scores.best))
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
    k = reference.indices.shape[-1]
    for first in range(0, windows, batch_size):
        at = slice(first, min(windows, first + batch_size))
        scores = window_scores(model, reference.windows[at], gather=reference.indices[at].reshape(-1, k))
        dense_top = reference.logprobs[at].reshape(-1, k).to(scores.gathered.device)
        total_kl += coarse_kl(dense_top, scores.gathered).sum().item()
        total_nll -= scores.logprob.sum().item()
    tokens = windows * (reference.windows.shape[1] - 1)
    return {"kl": total_kl / tokens, "perplexity": math.exp(total_nll / tokens)}


def coarse_kl(dense_top: torch.Tensor, candidate_top: torch.Tensor) -> torch.Tensor:
    """KL from the dense to the candidate distribution at each position, over the dense model's top-k
    tokens (their log-probabilities under each model, ``(..., k)``) plus one bin for the rest of the
    vocabulary: the exact KL of those coarsened distributions, a lower bound of the full KL."""
    p = dense_top.exp()
    kl = (p * (dense_top - candidate_top)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
    q_tail = (1 - candidate_top.exp().sum(-1)).clamp_min(1e-12)
    return kl + p_tail * (p_tail.log() - q_tail.log())
