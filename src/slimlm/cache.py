"""Where slimlm keeps what it derives once and reuses: dequantized models, corpora, libraries."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def cache_root() -> Path:
    """The cache folder: ``$SLIMLM_CACHE`` if set, else ``~/.cache/slimlm``."""
    root = os.environ.get("SLIMLM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "slimlm"


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's weights by content (names, shapes, dtypes and bytes): two copies of the
    same weights share it wherever they live, and any changed weight changes it."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' contents (token windows, importance scores)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
