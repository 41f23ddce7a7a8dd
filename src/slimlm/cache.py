"""Where slimlm keeps what it derives once and reuses: dequantized models, corpora."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder: ``$SLIMLM_CACHE`` if set, else ``~/.cache/slimlm``."""
    root = os.environ.get("SLIMLM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "slimlm"
