"""Progress in logs: a piped stderr gets plain timed lines while a long step runs, not only at its end."""

from __future__ import annotations

import os
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


def test_quiet_and_verbose_reach_the_library_and_a_real_command(tmp_path):
    """``slimlm -q`` prints results without progress lines; ``-v`` lets transformers' own logs through."""
    from .conftest import save_tiny, tiny_loaded

    folder = save_tiny(tiny_loaded("llama"), tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    command = [sys.executable, "-m", "slimlm"]
    args = ["eval", str(folder), "--data", str(text), "--seq-len", "16", "--windows", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("SLIMLM_QUIET", "SLIMLM_VERBOSE")}
    runs = {
        flag: subprocess.run([*command, *flag, *args], capture_output=True, text=True, timeout=300, env=env)
        for flag in ((), ("-q",))
    }
    for done in runs.values():
        assert done.returncode == 0, done.stderr
        assert "perplexity" in done.stdout
    assert f"perplexity on {text}: 1/1 (" in runs[()].stderr.splitlines()[-1]  # a progress line, unwrapped
    assert runs[("-q",)].stderr.strip() == ""
    both = subprocess.run([*command, "-q", "-v", *args], capture_output=True, text=True, timeout=300, env=env)
    assert both.returncode == 1 and both.stderr.strip().endswith("not both")


def test_verbose_lets_transformers_speak_and_quiet_silences_progress(monkeypatch, capsys):
    from transformers.utils import logging as hf_logging

    from slimlm import progress

    level = hf_logging.get_verbosity()
    with progress.quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    monkeypatch.setenv(progress.VERBOSE, "1")
    with progress.quiet_transformers():
        assert hf_logging.get_verbosity() == level and hf_logging.is_progress_bar_enabled()
    monkeypatch.delenv(progress.VERBOSE)
    monkeypatch.setenv(progress.QUIET, "1")
    for _ in progress.track(range(3), "silent step"):
        pass
    assert "silent step" not in capsys.readouterr().err
