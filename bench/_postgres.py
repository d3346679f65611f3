"""A benchmark's PostgreSQL case: the same benchmark again, in a child process, against a
Prefect server backed by a throwaway PostgreSQL cluster.

A child, because Prefect reads its settings (the API URL among them) when it is first
imported, and the parent has already run its embedded-server case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench._isolation import descendants, scratch
from bench._server import ServerDidNotStart, prefect_server
from tests.postgres import PostgresUnavailable, temporary_database
from toka.process import process_cpu

#: Set in the child: the PostgreSQL case does not start another.
CHILD = "TOKA_BENCH_POSTGRES_CHILD"
#: Set in the child: the server's processes (Prefect's and PostgreSQL's), for their CPU time.
SERVER_PIDS = "TOKA_BENCH_SERVER_PIDS"


@contextmanager
def prefect_on_postgres(timeout: float = 180) -> Iterator[tuple[str, list[int]]]:
    """A Prefect server on a new PostgreSQL database (its schema made at start), as ``toka server
    start`` runs it (:func:`bench._server.prefect_server`); yields its API URL and its processes
    (Prefect's server, PostgreSQL's)."""
    home = scratch("toka-bench-pg-home-")
    with temporary_database() as database, ExitStack() as stack:
        try:
            url, server = stack.enter_context(prefect_server(
                home, {"PREFECT_SERVER_DATABASE_CONNECTION_URL": database.url}, timeout=timeout))
        except ServerDidNotStart as e:
            raise PostgresUnavailable(f"on PostgreSQL, {e}") from None
        yield url, [server.pid, database.pid]


def run_on_postgres(script: Path, argv: list[str]) -> None:
    """Run ``script argv`` again against a PostgreSQL-backed server, or say why it cannot."""
    print()
    try:
        with prefect_on_postgres() as (url, pids):
            print(f"PostgreSQL-backed case: a Prefect server on a throwaway cluster ({url})", flush=True)
            env = {**os.environ, "PREFECT_API_URL": url, CHILD: "1", SERVER_PIDS: " ".join(map(str, pids))}
            subprocess.run([sys.executable, str(script), *argv], env=env, check=False)
    except PostgresUnavailable as e:
        print(f"PostgreSQL-backed case: skipped ({e})")


def server_cpu() -> float | None:
    """CPU seconds the PostgreSQL case's server has used so far: its processes, their live
    descendants and the children they reaped (PostgreSQL's backends); None outside that case."""
    pids = os.environ.get(SERVER_PIDS)
    if not pids:
        return None
    return sum((process_cpu(root, reaped=True) or 0.0) + sum(process_cpu(pid) or 0.0 for pid in descendants(root))
               for root in map(int, pids.split()))
