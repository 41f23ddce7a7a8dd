"""Give memory that torch has freed back to the operating system.

torch's CPU tensors up to glibc's mmap threshold (which rises to 32 MB as large tensors come and go)
live on glibc's malloc heap, and glibc keeps what is freed there for reuse instead of returning it:
a run's resident memory grows past what it holds and stays there. Two remedies, both measured:

- ``release`` hands the free pages back where a step's temporaries are gone, at no measurable cost
  in time: after a streamed model's layer pass, each item of a tracked step and each candidate scored
  (compress in memory held 840 MB more than its live tensors after the finalists' reformation).
- ``memory_first`` maps every block over 4 MB on its own, so it goes back to the system when freed:
  building the library of a 1.5 GB streamed model peaked at 0.86-0.90 GB instead of 1.16-1.42 GB, 13%
  slower. Only a streamed run, which has chosen memory over speed, asks for it.

Elsewhere than Linux with glibc both do nothing (other C libraries manage memory their own way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

MMAP_THRESHOLD = 4 * 2**20  # bytes: larger blocks are mapped on their own and go back to the system when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release() -> None:
    """Return the allocator's free pages to the operating system (a few ms: fine per layer pass)."""
    trim = getattr(_libc(), "malloc_trim", None)  # glibc's; other C libraries may not have it
    if trim is not None:
        trim(0)


def memory_first() -> None:
    """From now on, blocks over ``MMAP_THRESHOLD`` are mapped on their own (slower, smaller peaks)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
