"""Progress in logs: a piped stderr gets plain timed lines while a long step runs, not only at its end."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from slimlm import progress
    with progress.LogProgress(interval=0.05) as bar:
        task = bar.add_task("library", total=4)
        for _ in range(4):
            time.sleep(0.1)
            bar.advance(task)
            sys.stderr.flush()
    for _ in progress.track(range(2), "pass"):
        pass
    """
)


def test_a_piped_log_shows_progress_while_the_step_runs():
    lines = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    ).stderr.splitlines()
    library = [line for line in lines if line.startswith("library: ")]
    assert [line.split()[1] for line in library] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
    assert "eta" in library[2]
    assert any(line.startswith("pass: 2/2") for line in lines)  # ``track`` too: stderr is a pipe here


def test_a_log_counts_steps_given_as_update_advance(capsys):
    """The training loop advances with ``update(task, advance=1, description=...)``, as rich allows."""
    from slimlm import progress

    with progress.LogProgress(interval=0.0) as bar:
        task = bar.add_task("healing", total=3)
        for step in range(3):
            bar.update(task, advance=1, description=f"healing (loss {3 - step})")
    counts = [line.split(": ")[1].split()[0] for line in capsys.readouterr().err.splitlines()]
    assert counts == ["0/3", "1/3", "2/3", "3/3"]
