"""Progress bars for long steps: what is being done, how far, and an ETA."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers.utils import logging as hf_logging

from slimlm.allocator import release

T = TypeVar("T")

console = Console(stderr=True)
# `slimlm -q` / `-v` set these; worker processes inherit them, and users may set them in a job's environment
QUIET, VERBOSE = "SLIMLM_QUIET", "SLIMLM_VERBOSE"


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the block's wall time to ``seconds[phase]`` (a run's time per phase, for its report)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def time_summary(seconds: dict[str, float]) -> str:
    """``seconds`` per phase on one line, with their total."""
    parts = ", ".join(f"{phase} {value:.0f} s" for phase, value in seconds.items())
    return f"time: {parts} ({sum(seconds.values()):.0f} s in all)"


def quiet() -> bool:
    """No progress: only results and errors (``slimlm -q``)."""
    return bool(os.environ.get(QUIET))


def verbose() -> bool:
    """The libraries' own logs too: transformers' and Optuna's (``slimlm -v``)."""
    return bool(os.environ.get(VERBOSE))


class LogProgress:
    """``Progress``'s interface for logs that are not a terminal (a piped or redirected stderr), where
    rich draws nothing until the end: one plain line per task at most every ``interval`` seconds,
    and when it starts and finishes."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval, self.tasks = interval, {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *_exc) -> None:
        for task in self.tasks:
            self._print(task, force=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "completed": completed, "start": time.time()}
        self.tasks[task]["printed"] = 0.0
        self._print(task, force=True)
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + advance)

    def update(
        self,
        task: int,
        completed: float | None = None,
        description: str | None = None,
        advance: float | None = None,
        **_kw,
    ) -> None:
        state = self.tasks[task]
        if completed is not None:
            state["completed"] = completed
        if advance is not None:  # rich's update takes both, as run_steps uses it
            state["completed"] += advance
        if description is not None:
            state["description"] = description
        self._print(task, force=state["total"] is not None and state["completed"] >= state["total"])

    def _print(self, task: int, force: bool = False) -> None:
        state, now = self.tasks[task], time.time()
        if not force and now - state["printed"] < self.interval:
            return
        if force and state.get("done"):
            return
        elapsed, done, total = now - state["start"], state["completed"], state["total"]
        count = f"{done:g}/{total:g}" if total else f"{done:g}"
        eta = f", eta {(total - done) * elapsed / done:.0f} s" if total and 0 < done < total else ""
        line = f"{state['description']}: {count} ({elapsed:.0f} s{eta})"
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # one line each, however long
        state["printed"] = now
        state["done"] = bool(total) and done >= total


class Silent(LogProgress):
    """``Progress``'s interface that shows nothing (``slimlm -q``)."""

    def _print(self, task: int, force: bool = False) -> None:
        pass


def progress_bar() -> Progress | LogProgress:
    """A rich progress bar on stderr with a description, count, elapsed time and ETA; plain timed lines
    when stderr is not a terminal (logs of batch jobs and CI); nothing when quiet."""
    if quiet():
        return Silent()
    if not console.is_terminal:
        return LogProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` while showing a progress bar labelled ``description``.

    Each item of a long step is a batch or a layer whose temporaries are gone when the next is asked
    for: their pages go back to the system then (``slimlm.allocator``), so a step's peak is what it
    holds, not what it has freed so far.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            release()
            bar.advance(task)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars and warnings inside the block (slimlm shows its own),
    and accelerate's warnings (a checkpoint of tied weights warns that it stores them once), unless verbose."""
    if verbose():
        yield
        return
    verbosity, accelerate = hf_logging.get_verbosity(), logging.getLogger("accelerate")
    accelerate_level = accelerate.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    accelerate.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        accelerate.setLevel(accelerate_level)


def optuna_verbosity() -> int:
    """Optuna's log level while slimlm searches: its per-trial lines only when verbose."""
    import optuna

    return optuna.logging.INFO if verbose() else optuna.logging.WARNING
