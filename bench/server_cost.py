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
from contextlib import ExitStack
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # measure this checkout's toka, and reach tests/

from bench._isolation import prefect_env, scratch  # noqa: E402

_TMP = scratch("toka-bench-server-cost-")
os.environ.update(prefect_env(_TMP / "client-home"))

import prefect  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from bench._server import prefect_server, tree_cpu  # noqa: E402
from toka.server import SERVER_DEFAULTS  # noqa: E402

PREFECTS = {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "1",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "5"}
"""Prefect 3's defaults for what :data:`toka.server.SERVER_DEFAULTS` sets, set explicitly."""


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


def measure(url: str, pid: int, agents: int, tasks: int, settle: float) -> float:
    """The server's CPU seconds for the workload, run by a client process of its own (Prefect's
    events client is bound to one API), the server's last batch written."""
    time.sleep(settle)  # what an earlier workload left to write is not counted
    before = tree_cpu(pid)
    subprocess.run([sys.executable, __file__, "--client", str(agents), str(tasks)], check=True,
                   env={**os.environ, "PREFECT_API_URL": url})
    time.sleep(settle)
    return tree_cpu(pid) - before


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
    results: dict[str, list[tuple[float, float]]] = {"prefect": [], "toka": []}
    with ExitStack() as stack:
        servers = {name: stack.enter_context(prefect_server(scratch(f"toka-bench-server-cost-{name}-"), settings))
                   for name, settings in (("prefect", PREFECTS), ("toka", {}))}
        for url, server in servers.values():
            measure(url, server.pid, 2, 2, 0)  # warm-up: the flows registered
        for i in range(args.repeat):
            for name in ("prefect", "toka") if i % 2 == 0 else ("toka", "prefect"):
                url, server = servers[name]
                bare = measure(url, server.pid, args.agents, 0, args.settle)
                full = measure(url, server.pid, args.agents, args.tasks, args.settle)
                per_run, per_task = bare / args.agents, (full - bare) / (args.agents * args.tasks)
                results[name].append((per_run, per_task))
                print(f"  round {i + 1}/{args.repeat}, {name}'s settings: {1000 * per_run:.1f} ms per "
                      f"subflow run, {1000 * per_task:.1f} ms per task", flush=True)
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
