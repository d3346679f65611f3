"""CPU seconds a benchmark run cost: the client's (this process) and the server's."""

from __future__ import annotations

import os
import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench._isolation import descendants
from bench._postgres import server_cpu
from toka.process import process_cpu


@dataclass(frozen=True)
class Cpu:
    """CPU seconds one run cost: this process (and the git commands it ran), and the server."""

    client: float
    server: float | None
    """The embedded server's process, or the PostgreSQL case's server (Prefect's and PostgreSQL's
    processes); None when the API is elsewhere (PREFECT_API_URL)."""

    def __sub__(self, other: Cpu) -> Cpu:
        server = None if self.server is None or other.server is None else self.server - other.server
        return Cpu(self.client - other.client, server)


def cpu_now() -> Cpu:
    """This process's CPU (and its finished children's), and its live descendants' (the embedded
    server: the only long-lived one). Linux only; elsewhere the server is not counted."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = own.ru_utime + own.ru_stime + done.ru_utime + done.ru_stime
    if os.environ.get("PREFECT_API_URL") or not Path("/proc/self/task").is_dir():
        return Cpu(client, server_cpu())  # the PostgreSQL case's server, else not counted
    # A git command that ended meanwhile reads as None (it counts with this process once reaped).
    server = sum(process_cpu(pid) or 0.0 for pid in descendants(os.getpid()))
    return Cpu(client, server)


class Timed(Protocol):
    """A run as the CPU table reads it."""

    wall: float
    cpu: Cpu


def cpu_table(toka_runs: Sequence[Timed], hw_runs: Sequence[Timed]) -> None:
    """CPU per run on each side (medians): the client's and the server's, and how busy the server was.

    The server handles every run's API writes (runs, states, events, artifacts, logs) one
    request at a time; when it is busy most of the wall time, the client waits on it.
    """
    print(f"{'CPU per run (median)':<30} {'here s':>7} {'server s':>9} {'server busy':>12}")
    for label, runs in (("(a) toka pipeline", toka_runs), ("(b) hand-written Prefect", hw_runs)):
        client = statistics.median(r.cpu.client for r in runs)
        servers = [r.cpu.server for r in runs if r.cpu.server is not None]
        if servers:
            busy = statistics.median(r.cpu.server / r.wall for r in runs if r.cpu.server is not None)
            print(f"{label:<30} {client:>7.2f} {statistics.median(servers):>9.2f} {100 * busy:>11.0f}%")
        else:
            print(f"{label:<30} {client:>7.2f} {'n/a':>9} {'':>12}  (the server is PREFECT_API_URL's)")
