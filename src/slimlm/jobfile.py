"""Job files: a search job saved as ``job.toml`` in its run folder, with what produced it, and read back.

``slimlm compress --config RUN/job.toml`` reruns the job; options given on the command line override
the file. The ``[provenance]`` table (command, versions, the model's weights fingerprint, time) is a
record only: reading a job ignores it.
"""

from __future__ import annotations

import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

import tomli_w
import tomllib

from slimlm.errors import SlimlmError

JOB_FILE = "job.toml"
PACKAGES = ("slimlm", "torch", "transformers", "optuna", "safetensors", "gguf")


def provenance(fingerprint: str | None = None) -> dict:
    """What produced a run: the command line, package versions, Python, the weights' fingerprint, the time."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    program = "slimlm" if Path(sys.argv[0]).name == "slimlm" else sys.argv[0]
    record = {
        "command": shlex.join([program, *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "versions": versions,
    }
    return record | ({"model_fingerprint": fingerprint} if fingerprint else {})


def write_job_file(job: dict, folder: str | Path, fingerprint: str | None = None) -> Path:
    """Save ``job`` (a job's plain values) and its provenance as ``folder/job.toml``; return the path."""
    path = Path(folder) / JOB_FILE
    header = f"# slimlm job; rerun with: slimlm compress --config {shlex.quote(str(path))}\n"
    path.write_text(header + tomli_w.dumps({"job": job, "provenance": provenance(fingerprint)}), encoding="utf-8")
    return path


def read_job_file(path: str | Path) -> dict:
    """The job table of ``path`` (a ``job.toml`` slimlm wrote, or one written by hand)."""
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"job file {path} does not exist")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SlimlmError(f"job file {path} is not valid TOML: {error}") from None
    if not isinstance(document.get("job"), dict):
        raise SlimlmError(f"job file {path} has no [job] table")
    return document["job"]
