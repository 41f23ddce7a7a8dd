"""Give memory that torch has freed back to the operating system.

torch's CPU tensors of a few MB live on glibc's malloc heap, and glibc keeps what is freed there for
reuse instead of returning it. Sequential reformation frees and allocates hundreds of batch-sized
activations per layer, so the heap grows well past what is alive: measured on SmolLM2
(``benchmarks/memory.py``), compress in memory held 840 MB more resident memory than its live tensors
after one reformation, and the next stage (the compressed model loaded beside the dense one) came on
top of it. ``release`` hands those pages back where a step's temporaries are gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import cache


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl): nothing to trim there."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release() -> None:
    """Collect unreachable objects, then return the allocator's free pages to the operating system."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
