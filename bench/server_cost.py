#!/usr/bin/env python
"""The server's CPU per agent run and per task: Prefect's server settings against toka's.

Every agent's runs wait on one Prefect server process; on two cores a run of many short
agents keeps it busy most of its wall time (``bench/many_agents.py`` prints how busy), so
its CPU per run is what bounds such a run. Two servers, started as ``toka server start``
starts one (``toka.server``'s command, SQLite, each in a fresh Prefect home of its own):

(a) Prefect's settings: the task-run recorder writes each task-run event in a transaction of
    its own (batch size 1, Prefect 3's default);
(b) toka's settings (``toka.server.SERVER_DEFAULTS``): in batches of up to 100, at least
    once a second.

The same workload runs against each, alternating within each of ``--repeat`` rounds, each
time in a process of its own: a flow that calls ``--agents`` (20) subflows one after the other, first with no task,
then with ``--tasks`` (10) no-op tasks each (what Prefect records of an agent's run without
toka's own artifacts and events). After each workload it waits until the server's last
batch is written (``--settle``, 3 s), then reads the server process's CPU time (Linux /proc).

Printed: the server's CPU per subflow run (the workload without tasks), per task (the slope
between the two workloads) and their ratio (b)/(a), medians over the rounds.

Usage (from the repository root)::

    .venv/bin/python bench/server_cost.py [--repeat 3] [--agents 20] [--tasks 10] [--settle 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # measure this checkout's toka, and reach tests/

from bench._isolation import descendants, prefect_env, scratch  # noqa: E402

_TMP = scratch("toka-bench-server-cost-")
os.environ.update(prefect_env(_TMP / "client-home"))

import httpx  # noqa: E402
import prefect  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tests.ports import free_port  # noqa: E402
from toka.process import process_cpu  # noqa: E402
from toka.server import _PREFECT_SERVER, SERVER_DEFAULTS, server_environment  # noqa: E402

PREFECTS = {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "1",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "5"}
"""Prefect 3's defaults for what :data:`toka.server.SERVER_DEFAULTS` sets, set explicitly."""


class Server:
    def __init__(self, name: str, settings: dict[str, str]) -> None:
        self.name = name
        home = scratch(f"toka-bench-server-cost-{name}-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = server_environment({**os.environ, **prefect_env(home), **settings})
        env.pop("PREFECT_API_URL", None)
        self.log = (home / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PREFECT_SERVER, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server {self.name} did not start; its log: {self.log.name}")
            time.sleep(0.25)

    def cpu(self) -> float:
        return sum(process_cpu(pid) or 0.0 for pid in (self.proc.pid, *descendants(self.proc.pid)))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@task(persist_result=False, cache_policy=NO_CACHE)
async def step() -> None:
    """Nothing: what the server records of a task is the measurement."""


@flow(persist_result=False)
async def agent(tasks: int) -> None:
    for _ in range(tasks):
        await step()


@flow(persist_result=False)
async def workload(agents: int, tasks: int) -> None:
    for i in range(agents):
        await agent.with_options(name=f"agent-{i:02d}")(tasks)


def measure(server: Server, agents: int, tasks: int, settle: float) -> float:
    """The server's CPU seconds for the workload, run by a client process of its own (Prefect's
    events client is bound to one API), the server's last batch written."""
    time.sleep(settle)  # what an earlier workload left to write is not counted
    before = server.cpu()
    subprocess.run([sys.executable, __file__, "--client", str(agents), str(tasks)], check=True,
                   env={**os.environ, "PREFECT_API_URL": server.url})
    time.sleep(settle)
    return server.cpu() - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--agents", type=int, default=20, help="subflow runs per workload (default 20)")
    parser.add_argument("--tasks", type=int, default=10, help="tasks per subflow in the second workload (default 10)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait for the server's last batch before and after (default 3)")
    parser.add_argument("--client", nargs=2, type=int, metavar=("AGENTS", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:  # a workload's own process (measure)
        asyncio.run(workload(*args.client))
        return 0
    if min(args.repeat, args.agents, args.tasks) < 1 or args.settle < 0:
        parser.error("--repeat, --agents and --tasks must be at least 1, --settle not negative")
    print(f"server cost: {args.agents} subflow runs without tasks, then with {args.tasks} tasks each, "
          f"{args.repeat} rounds")
    print(f"python {platform.python_version()}, prefect {prefect.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; toka's settings: "
          + ", ".join(f"{k}={v}" for k, v in SERVER_DEFAULTS.items()))
    servers = [Server("prefect", PREFECTS), Server("toka", {})]
    results: dict[str, list[tuple[float, float]]] = {s.name: [] for s in servers}
    try:
        for server in servers:
            server.wait_healthy()
            measure(server, 2, 2, 0)  # warm-up: the flows registered, the client's imports done
        for i in range(args.repeat):
            for server in servers if i % 2 == 0 else servers[::-1]:
                bare = measure(server, args.agents, 0, args.settle)
                full = measure(server, args.agents, args.tasks, args.settle)
                per_run, per_task = bare / args.agents, (full - bare) / (args.agents * args.tasks)
                results[server.name].append((per_run, per_task))
                print(f"  round {i + 1}/{args.repeat}, {server.name}'s settings: {1000 * per_run:.1f} ms per "
                      f"subflow run, {1000 * per_task:.1f} ms per task", flush=True)
    finally:
        for server in servers:
            server.stop()
    print()
    print(f"{'server CPU (median)':<32} {'per subflow run':>16} {'per task':>10}")
    medians = {}
    for name, label in (("prefect", "(a) Prefect's settings"), ("toka", "(b) toka's settings")):
        run = statistics.median(r for r, _ in results[name])
        each = statistics.median(t for _, t in results[name])
        medians[name] = each
        print(f"{label:<32} {1000 * run:>13.1f} ms {1000 * each:>7.1f} ms")
    ratios = [t[1] / p[1] for t, p in zip(results["toka"], results["prefect"]) if p[1] > 0]
    if ratios:
        print(f"per task, toka's / Prefect's: {statistics.median(ratios):.2f}x (median of per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
