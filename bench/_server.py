"""A benchmark's own Prefect server, started as ``toka server start`` starts one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench._isolation import descendants, prefect_env
from tests.ports import free_port
from toka.process import process_cpu
from toka.server import _PREFECT_SERVER, server_environment


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not answer in time; the message ends with its log's end."""


@contextmanager
def prefect_server(home: Path, env: Mapping[str, str] | None = None, *,
                   timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Prefect server in the Prefect home ``home``, as ``toka server start`` runs it (its command,
    and its settings: :func:`toka.server.server_environment`), with ``env`` added; yields its API
    URL and its process, and stops it at exit.

    Raises:
        ServerDidNotStart: it exited or did not answer within ``timeout`` seconds.
    """
    port = free_port()
    server_env = server_environment({**os.environ, **prefect_env(home), **(env or {})})
    server_env.pop("PREFECT_API_URL", None)
    url = f"http://127.0.0.1:{port}/api"
    with (home / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-c", _PREFECT_SERVER, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise ServerDidNotStart(f"the Prefect server in {home} did not start:\n"
                                            f"{(home / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            yield url, server
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2, verify=False).status_code == 200
    except httpx.TransportError:
        return False


def tree_cpu(pid: int) -> float:
    """CPU seconds process ``pid`` and its live descendants have used so far."""
    return sum(process_cpu(p) or 0.0 for p in (pid, *descendants(pid)))
