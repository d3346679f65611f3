"""A throwaway PostgreSQL cluster on a loopback port, for the tests and benchmarks of a
PostgreSQL-backed Prefect server (the README's scale-out set-up)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .ports import free_port


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here; the message says why (a test skips with it)."""


def _bin() -> Path | None:
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))  # Debian keeps them off PATH
        pg_ctl = str(found[-1]) if found else None
    folder = Path(pg_ctl).resolve().parent if pg_ctl else None
    return folder if folder and (folder / "initdb").exists() else None


@dataclass(frozen=True)
class Database:
    url: str
    """SQLAlchemy URL of the database ``prefect`` (asyncpg, as Prefect's server wants it)."""
    pid: int
    """The cluster's server process (its backends are its children)."""


@contextmanager
def temporary_database() -> Iterator[Database]:
    """A new cluster with a database ``prefect``; yields where it is, removes it all after.

    Raises :class:`PostgresUnavailable` when the server binaries are missing or, as root,
    there is no ``runuser`` to drop to the ``postgres`` user (PostgreSQL refuses root).
    """
    folder = _bin()
    if folder is None:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            raise PostgresUnavailable("running as root without runuser: cannot start PostgreSQL")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="toka-pg-"))
    try:
        if as_user:
            shutil.chown(root, "postgres", "postgres")
        port = free_port()
        data = root / "data"
        subprocess.run([*as_user, str(folder / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True, timeout=120)
        # fsync off: the cluster is thrown away, and the tests measure Prefect, not the disk.
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*as_user, str(folder / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "pg.log"),
                        "-w", "start"], check=True, capture_output=True, timeout=120)
        try:
            subprocess.run([*as_user, str(folder / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                            "prefect"], check=True, capture_output=True, timeout=60)
            pid = int((data / "postmaster.pid").read_text().split()[0])
            yield Database(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", pid)
        finally:
            subprocess.run([*as_user, str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
