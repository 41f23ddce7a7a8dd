"""A throw-away PostgreSQL cluster for the tests (``conftest.postgres_url``) and the benchmarks
(``benchmarks/store_traffic.py``): one home for starting and stopping it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MISSING = "PostgreSQL server not installed (Debian: apt-get install postgresql; .ci/run installs it)"


def server_bin() -> Path | None:
    """The PostgreSQL server programs (Debian's ``postgresql`` package), or None when not installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary folder, on a Unix socket only (no TCP port), stopped and
    deleted afterwards; yields its SQLAlchemy URL (database ``slimlm``, user ``slimlm``, no password).
    Run as Debian's ``postgres`` user when this process is root (the server refuses root).

    Raises ``FileNotFoundError`` (with ``MISSING``) where the server is not installed."""
    bin_dir = server_bin()
    if bin_dir is None:
        raise FileNotFoundError(MISSING)
    folder = Path(tempfile.mkdtemp(prefix="slimlm-pg-"))
    data, socket = folder / "data", folder / "socket"
    socket.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        shutil.chown(folder, "postgres")
        shutil.chown(socket, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "slimlm", "--no-sync")
        options = f"-k {socket} -c listen_addresses='' -c fsync=off -c max_connections=100"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        try:
            run(str(bin_dir / "createdb"), "-h", str(socket), "-U", "slimlm", "slimlm")
            yield f"postgresql+psycopg2://slimlm@/slimlm?host={socket}"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
