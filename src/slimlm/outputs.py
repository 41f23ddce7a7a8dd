"""Where slimlm may write, checked before any work, and folders written whole or not at all.

Every command that writes a model folder or a run folder checks ``--out`` first: never the input
model's folder, never slimlm's cache (a pruned model written there would load as the dense one
ever after), never a non-empty folder slimlm did not make for this job unless ``--overwrite``
says so, and never a place that cannot be written. A model folder is then written beside its
final place and renamed into it, so a killed run leaves the old folder or the new one, never half
of one (nor stale files of the old one, such as a ``modeling_slimlm.py`` a uniform model lacks).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimlm.cache import cache_root, inside_cache
from slimlm.errors import SlimlmError

PARTIAL = ".partial-"  # ``.NAME.partial-PID``: a folder being written (left behind only by a kill)
RETIRED = ".retired-"  # ``.NAME.retired-PID``: the folder it replaces, deleted once the new one is in place


def refuse_protected(out: str | Path, model: str | Path | None = None) -> Path:
    """``out`` as a Path, unless it is (or holds, or lies in) the input model's folder or slimlm's cache."""
    out = Path(out)
    resolved = out.resolve()
    if inside_cache(out) or cache_root().resolve().is_relative_to(resolved):
        raise SlimlmError(f"{out} is inside slimlm's cache ({cache_root()}); choose another --out")
    source = Path(str(model)).expanduser() if model is not None else None
    if source is not None and source.is_dir():
        source = source.resolve()
        if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
            raise SlimlmError(f"{out} would write into the input model's folder {model}; choose another --out")
    return out


def refuse_foreign_folder(out: str | Path, model: str | Path | None = None) -> Path:
    """``out`` (checked by ``refuse_protected``) unless it exists and is not a model folder: a folder
    replaced whole must be one slimlm could have written (``config.json``), never a user's folder."""
    out = refuse_protected(out, model)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise SlimlmError(f"{out} exists and is not a model folder; refusing to replace it")
    return out


def check_writable(out: Path) -> None:
    """A clear error now, rather than a traceback after minutes of work, if ``out`` cannot be made."""
    ancestor = out
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise SlimlmError(f"cannot write {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SlimlmError(f"cannot write {out}: {ancestor} is not writable")


def writable_folder(out: str | Path, model: str | Path | None = None) -> Path:
    """``out`` as a Path if slimlm may make it or write into it: not protected (``refuse_protected``),
    not a file, and writable."""
    out = refuse_protected(out, model)
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"{out} exists and is not a folder; choose another --out")
    check_writable(out)
    return out


def check_output_folder(out: str | Path, overwrite: bool = False, model: str | Path | None = None) -> Path:
    """``out`` as a Path if a model folder may be written there: new, empty, or ``overwrite``."""
    out = writable_folder(out, model)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SlimlmError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another --out")
    return out


def check_run_folder(
    out: str | Path, store: Path | None, resume: bool, overwrite: bool, model: str | Path | None = None
) -> Path:
    """``out`` as a Path if a search may use it as its run folder.

    ``store`` is the run's private search store inside ``out`` (None: the study lives elsewhere). A
    folder holding a store is this kind of run: continued with ``resume``, replaced with
    ``overwrite``, else refused. Any other non-empty folder is refused unless ``overwrite``.
    """
    out = writable_folder(out, model)
    if not out.is_dir() or not any(out.iterdir()):
        return out
    holds_run = store is not None and store.is_file()
    if holds_run and not (resume or overwrite):
        raise SlimlmError(f"{out} already holds a search; pass --resume to continue it, or choose another --out")
    if not holds_run and not overwrite and not (resume and store is None):
        raise SlimlmError(
            f"{out} exists, is not empty and holds no slimlm search; pass --overwrite to write into it, "
            "or choose another --out"
        )
    return out


@contextmanager
def written_whole(out: str | Path) -> Iterator[Path]:
    """Yield a scratch folder beside ``out`` to write into; on success it replaces ``out`` in one rename.

    A kill leaves ``out`` as it was, or new; the next call cleans up after it (and puts the old
    folder back if the kill fell between the two renames).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    retired = sorted(out.parent.glob(f".{out.name}{RETIRED}*"))
    if retired and not out.exists():
        os.replace(retired.pop(), out)
    for leftover in [*out.parent.glob(f".{out.name}{PARTIAL}*"), *retired]:
        shutil.rmtree(leftover, ignore_errors=True)
    partial = out.with_name(f".{out.name}{PARTIAL}{os.getpid()}")
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    retired = out.with_name(f".{out.name}{RETIRED}{os.getpid()}")
    if out.exists():
        os.replace(out, retired)
    os.replace(partial, out)
    shutil.rmtree(retired, ignore_errors=True)
