"""Where slimlm keeps what it derives once and reuses: dequantized models, corpora, libraries.

Every entry is keyed on content (weights, tokens, settings), never on paths or file times: copies
made with ``cp -p`` or ``rsync -a`` keep a file's size and time while changing its bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import platformdirs
import torch

from slimlm.stream import streamed_state

CHUNK = 1 << 24


def cache_root() -> Path:
    """The cache folder: ``$SLIMLM_CACHE`` if set, else the platform's user cache folder
    (``$XDG_CACHE_HOME/slimlm``, by default ``~/.cache/slimlm`` on Linux)."""
    root = os.environ.get("SLIMLM_CACHE")
    return Path(root) if root else Path(platformdirs.user_cache_dir("slimlm", appauthor=False))


def inside_cache(path: str | Path) -> bool:
    """Whether ``path`` is the cache folder or lies inside it (slimlm never writes results there)."""
    return Path(path).resolve().is_relative_to(cache_root().resolve())


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's weights by content (names, shapes, dtypes and bytes): two copies of the
    same weights share it wherever they live, and any changed weight changes it."""
    digest = hashlib.sha256()  # sha256, not blake2b: hardware-accelerated, about twice as fast here
    for name, tensor in streamed_state(model):  # a streamed model's layers read one at a time
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def file_digest(path: str | Path) -> str:
    """A hash of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' contents (token windows, importance scores)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def lock_file(path: str | Path, wait: bool = True) -> IO | None:
    """Open ``path`` (created if missing) and lock it exclusively; the lock lasts until the returned
    handle is closed or the process ends, however it ends (kill -9 included), so a lock file left
    behind never blocks anyone. With ``wait=False``, None at once when another process holds it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - the open handle is the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


@contextmanager
def computed_once(entry: str | Path) -> Iterator[None]:
    """Hold the lock of the cache entry ``entry`` (a file or folder) for the ``with`` block: processes
    sharing a cache (one machine's, or a shared folder every worker mounts) compute an entry once;
    the others wait, then read it. Check for the entry inside the block."""
    entry = Path(entry)  # entries are named by content hashes: the name and its kind make a unique lock
    with exclusive(cache_root() / "locks" / f"{entry.parent.name}-{entry.name}.lock"):
        yield


@contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` for the ``with`` block (waiting for it if need be)."""
    handle = lock_file(path)
    try:
        yield
    finally:
        handle.close()
