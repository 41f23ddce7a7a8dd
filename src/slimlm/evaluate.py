"""Quality of a model or sub-network: perplexity on fixed token windows."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.progress import track


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 4, description: str | None = None
) -> float:
    """exp(mean next-token negative log-likelihood) over all windows (each scored on its own).

    ``description`` shows a progress bar with that label; None evaluates silently (search loops).
    """
    if batch_size < 1:
        raise SlimlmError(f"batch size must be at least 1, got {batch_size}")
    batches = windows.split(batch_size)
    if description is not None:
        batches = track(batches, description)
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
