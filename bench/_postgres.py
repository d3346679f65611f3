"""A benchmark's PostgreSQL case: the same benchmark again, in a child process, against a
Prefect server backed by a throwaway PostgreSQL cluster.

A child, because Prefect reads its settings (the API URL among them) when it is first
imported, and the parent has already run its embedded-server case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench._isolation import descendants, prefect_env, scratch
from tests.ports import free_port
from tests.postgres import PostgresUnavailable, temporary_database
from toka.process import process_cpu
from toka.server import _PREFECT_SERVER, server_environment

#: Set in the child: the PostgreSQL case does not start another.
CHILD = "TOKA_BENCH_POSTGRES_CHILD"
#: Set in the child: the server's processes (Prefect's and PostgreSQL's), for their CPU time.
SERVER_PIDS = "TOKA_BENCH_SERVER_PIDS"


@contextmanager
def prefect_on_postgres(timeout: float = 180) -> Iterator[tuple[str, list[int]]]:
    """A Prefect server on a new PostgreSQL database (its schema made at start); yields its API
    URL and its processes (Prefect's server, PostgreSQL's)."""
    home = scratch("toka-bench-pg-home-")
    with temporary_database() as database:
        port = free_port()
        # `toka server start` on PostgreSQL: its command, and its settings (toka.server.SERVER_DEFAULTS)
        env = server_environment({**os.environ, **prefect_env(home),
                                  "PREFECT_SERVER_DATABASE_CONNECTION_URL": database.url})
        env.pop("PREFECT_API_URL", None)
        log = (home / "server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-c", _PREFECT_SERVER, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise PostgresUnavailable(f"the PostgreSQL-backed Prefect server did not start:\n"
                                              f"{(home / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            yield url, [server.pid, database.pid]
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2, verify=False).status_code == 200
    except httpx.TransportError:
        return False


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
