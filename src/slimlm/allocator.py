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
- ``reusing`` does the opposite for a training loop, whose steps free and take the same large blocks
  again (logits over the vocabulary, their gradients): blocks stay on the heap and are reused instead
  of being mapped, and faulted in by the kernel, anew at every step. A healing step of SmolLM2 (bf16
  autocast, 2 cores) spent most of its time in the kernel: 11.0 s a step before, 2.5 s after, for a
  peak of 6.2 GB instead of 5.3 GB.

Elsewhere than Linux with glibc both do nothing (other C libraries manage memory their own way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

MMAP_THRESHOLD = 4 * 2**20  # bytes: larger blocks are mapped on their own and go back to the system when freed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults


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


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Set glibc's ``mallopt`` parameters in order; False where the C library has no ``mallopt``."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    for parameter, value in settings:
        mallopt(parameter, value)
    return True


def memory_first() -> None:
    """From now on, blocks over ``MMAP_THRESHOLD`` are mapped on their own (slower, smaller peaks)."""
    _mallopt((_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


@contextmanager
def reusing() -> Iterator[None]:
    """Within: no block is mapped on its own and the heap is never trimmed, so a loop reuses the same
    memory at every step; after: glibc's defaults again, and the free pages are released."""
    if not _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)):  # mallopt takes a C int: 2 GB at most
        yield
        return
    try:
        yield
    finally:
        _mallopt((_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))
        release()
