#!/usr/bin/env python
"""Fifty small agents at once: is the concurrency real on the default (embedded SQLite) server?

``--agents`` (50) generated specs, two tasks each, each agent requiring 0-2 earlier agents
chosen at random (``--seed``), run with ``--max-concurrency`` (16) against the loopback
Messages API server of ``tests/anthropic_server.py`` answering every request after
``--latency`` (0.2) seconds. The agents declare no capabilities, so each task is one model
request (the model submits its result at once).

Two sides, in this process, on Prefect's embedded server (a fresh ``PREFECT_HOME``; a
``PREFECT_API_URL`` in the environment is used instead), alternating for ``--repeat`` rounds
after one untimed warm-up of each (it also starts the server):

(a) toka: ``toka.pipeline.pipeline_flow`` (what ``toka run`` runs), the Anthropic provider with
    a fake key against the loopback server, a fresh run key per round;
(b) hand-written: the floor, a minimal Prefect 3 pipeline with the same scheduling policy: one
    async subflow per agent once its upstream agents are done, at most ``--max-concurrency`` at
    a time, each running two async tasks that each send one request to the same loopback server.

Printed per side: wall time of the pipeline flow call, that over the critical-path bound
(latency x requests on the longest dependency chain), the peak and mean number of model
requests in flight (from the server's arrival times: each request is in flight for the
latency after it arrived), how many API requests Prefect's client had to retry (503s
from a locked SQLite database and the like), and the CPU per run of this process and of the
server (``bench/_cpu.py``), with how busy the server was over the run's wall time.

Then, when PostgreSQL is installed (``initdb`` and ``pg_ctl`` on PATH or under
``/usr/lib/postgresql``) and ``PREFECT_API_URL`` is not set, the same rounds again in a child
process against a Prefect server on a throwaway PostgreSQL cluster (``--no-postgres`` skips it).

Targets (issue 15): embedded server <= 3x the bound with >= 10 requests in flight at peak;
a PostgreSQL-backed server <= 2x. The exit code is 0 whether or not they are met.

Usage (from the repository root)::

    .venv/bin/python bench/many_agents.py [--agents 50] [--max-concurrency 16] [--latency 0.2]
                                          [--repeat 2] [--seed 15] [--no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # measure this checkout's toka, and reach tests/

from bench._cpu import Cpu, cpu_now, cpu_table  # noqa: E402
from bench._isolation import prefect_env, scratch, stop_embedded  # noqa: E402
from bench._postgres import CHILD, run_on_postgres  # noqa: E402

_TMP = scratch("toka-bench-many-")
if not os.environ.get("PREFECT_API_URL"):
    os.environ.update(prefect_env(_TMP / "prefect-home"))
KEY = "sk-ant-bench-many-agents-0123456789"

import httpx  # noqa: E402
import prefect  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tests.anthropic_server import AnthropicServer, Recorded  # noqa: E402
from toka.claude import default_model  # noqa: E402
from toka.config import grouped  # noqa: E402
from toka.pipeline import pipeline_flow  # noqa: E402
from toka.results import PipelineSummary  # noqa: E402

BOUND_TARGET = 3.0
PG_BOUND_TARGET = 2.0
PEAK_TARGET = 10
TASKS = 2


# -- the agents -----------------------------------------------------------------------


def make_dag(n: int, seed: int) -> dict[str, list[str]]:
    """Agent name -> the earlier agents it requires (0-2 of them, at random)."""
    rng = random.Random(seed)
    names = [f"agent-{i:02d}" for i in range(n)]
    return {name: sorted(rng.sample(names[:i], k=min(i, rng.randint(0, 2)))) for i, name in enumerate(names)}


def write_specs(dag: dict[str, list[str]], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, requires in dag.items():
        spec = {
            "metadata": {"name": name},
            "spec": {"name": f"{name} agent", "domain": "benchmark", "priority": "medium"},
            "tasks": {"default": [{"description": f"{name} step {i + 1}"} for i in range(TASKS)]},
            "dependencies": {"required": {dep: "its result" for dep in requires}, "optional": {}},
            "security": {"resource_limits": {"timeout": "10m"}},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def longest_chain(dag: dict[str, list[str]]) -> list[str]:
    best: dict[str, list[str]] = {}
    for name, requires in dag.items():  # dependencies come first
        best[name] = [*max((best[d] for d in requires), key=len, default=[]), name]
    return max(best.values(), key=len)


# -- (b) the hand-written Prefect equivalent --------------------------------------------

_BASE_URL = ""


@task(name="hw-request", persist_result=False, cache_policy=NO_CACHE)
async def hw_request(agent: str, step: int) -> None:
    """One model request to the loopback server."""
    async with httpx.AsyncClient(base_url=_BASE_URL, timeout=60) as client:
        reply = await client.post("/v1/messages", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                                  json={"model": "hand-written", "max_tokens": 64,
                                        "messages": [{"role": "user", "content": f"{agent} step {step}"}]})
        reply.raise_for_status()


@flow(name="hw-agent", persist_result=False)
async def hw_agent(name: str) -> int:
    for step in range(1, TASKS + 1):
        await hw_request(name, step)
    return TASKS


@flow(name="hw-pipeline", persist_result=False)
async def hw_pipeline(dag: dict[str, list[str]], max_concurrency: int) -> int:
    """Start each agent's subflow once its upstream agents are done (by name, as toka's ties)."""
    agents = {name: hw_agent.with_options(name=name) for name in dag}
    done: dict[str, int] = {}
    pending = set(dag)
    running: dict[asyncio.Task[int], str] = {}
    while pending or running:
        ready = sorted(n for n in pending if all(d in done for d in dag[n]))
        for name in ready[: max(0, max_concurrency - len(running))]:
            pending.discard(name)
            running[asyncio.create_task(agents[name](name))] = name
        finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for f in finished:
            done[running.pop(f)] = f.result()
    return sum(done.values())


# -- measuring ----------------------------------------------------------------------------


class RetryCounter(logging.Handler):
    """Counts the Prefect client's retries of API requests (503 'database is locked' and the like)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Received response with retryable status code", "Encountered retryable exception")):
            self.count += 1

    def take(self) -> int:
        taken, self.count = self.count, 0
        return taken


RETRIES = RetryCounter()


@dataclass
class Run:
    wall: float
    requests: int
    peak: int
    mean: float
    retries: int
    cpu: Cpu
    failed: str = ""


def in_flight(records: list[Recorded], latency: float, span: float) -> tuple[int, float]:
    """Peak and mean number of requests in flight (each for ``latency`` after it arrived)."""
    edges = sorted([(r.time, 1) for r in records] + [(r.time + latency, -1) for r in records],
                   key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak, len(records) * latency / span if span > 0 else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, dag: dict[str, list[str]], specs: Path,
                 server: AnthropicServer) -> None:
        self.args = args
        self.dag = dag
        self.specs = specs
        self.server = server
        self.model = default_model()
        self.workspace = _TMP / "workspace"
        self.workspace.mkdir(exist_ok=True)

    async def _measure(self, side: str) -> Run:
        before = len(self.server.requests)
        RETRIES.take()
        c0 = cpu_now()
        t0 = time.monotonic()
        if side == "toka":
            state = await pipeline_flow(specs=[str(self.specs)], return_state=True, **grouped({
                "model": self.model, "workspace": str(self.workspace), "run_key": f"bench-{uuid.uuid4().hex}",
                "max_concurrency": self.args.max_concurrency, "retry_delay_seconds": 0}))
        else:
            state = await hw_pipeline(self.dag, self.args.max_concurrency, return_state=True)
        wall = time.monotonic() - t0
        cpu = cpu_now() - c0
        records = self.server.requests[before:]
        outcome = await state.aresult(raise_on_failure=False)
        failed = ""
        if side == "toka" and (not isinstance(outcome, PipelineSummary) or outcome.state != "completed"):
            failed = f"{state.name}: {outcome!r}"[:300]
        elif side == "hand" and state.is_failed():
            failed = f"{state.name}: {outcome!r}"[:300]
        expected = len(self.dag) * TASKS
        if not failed and (len(records) != expected or any(r.outcome != "ok" for r in records)):
            raise RuntimeError(f"{side}: {len(records)} requests ({sorted({r.outcome for r in records})}), "
                               f"expected {expected} answered ones")
        if failed:
            print(f"  {side} run FAILED after {wall:.1f} s: {failed}", flush=True)
        return Run(wall, len(records), *in_flight(records, self.args.latency, wall), RETRIES.take(), cpu, failed)

    async def rounds(self) -> dict[str, list[Run]]:
        logger = logging.getLogger("prefect.client")
        logger.addHandler(RETRIES)
        if logger.getEffectiveLevel() > logging.DEBUG:
            logger.setLevel(logging.DEBUG)  # retries are logged at DEBUG
        t0 = time.monotonic()
        warm = {side: (await self._measure(side)).wall for side in ("toka", "hand")}
        print(f"  warm-up (not counted; starts the server): toka {warm['toka']:.2f} s, hand-written "
              f"{warm['hand']:.2f} s, {time.monotonic() - t0:.1f} s in all", flush=True)
        runs: dict[str, list[Run]] = {"toka": [], "hand": []}
        for i in range(self.args.repeat):
            order = ("toka", "hand") if i % 2 == 0 else ("hand", "toka")
            for side in order:
                runs[side].append(await self._measure(side))
            a, b = runs["toka"][-1], runs["hand"][-1]
            print(f"  round {i + 1}/{self.args.repeat}: toka {a.wall:.2f} s (peak {a.peak} in flight, "
                  f"{a.retries} API retries), hand-written {b.wall:.2f} s (peak {b.peak}, {b.retries} retries)",
                  flush=True)
        return runs


def main(argv: list[str] | None = None) -> int:
    global _BASE_URL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=50, help="how many agents (default 50)")
    parser.add_argument("--max-concurrency", type=int, default=16, help="most agents at once (default 16)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per model request (default 0.2)")
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds of each, after a warm-up (default 2)")
    parser.add_argument("--seed", type=int, default=15, help="seed of the random dependencies (default 15)")
    parser.add_argument("--server", choices=("toka", "prefect"), default="toka",
                        help="which embedded server: toka's (what `toka run` starts, default) or Prefect's own")
    parser.add_argument("--no-postgres", action="store_true",
                        help="skip the PostgreSQL-backed case (run when PostgreSQL is installed)")
    args = parser.parse_args(argv)
    if args.agents < 1 or args.max_concurrency < 1 or args.latency <= 0 or args.repeat < 1:
        parser.error("--agents, --max-concurrency and --repeat must be at least 1, --latency positive")

    dag = make_dag(args.agents, args.seed)
    specs = _TMP / "specs"
    write_specs(dag, specs)
    chain = longest_chain(dag)
    bound = args.latency * TASKS * len(chain)
    api = os.environ.get("PREFECT_API_URL") or "embedded server (SQLite), fresh PREFECT_HOME"
    postgres = bool(os.environ.get(CHILD))  # the PostgreSQL case, run by bench/_postgres.py
    if postgres:
        api += " (PostgreSQL-backed)"
    print(f"many agents: {len(dag)} agents x {TASKS} tasks, {sum(map(len, dag.values()))} required edges "
          f"(seed {args.seed}), max concurrency {args.max_concurrency}, {args.latency:g} s per model request, "
          f"{args.repeat} rounds")
    print(f"python {platform.python_version()}, prefect {prefect.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; API: {api}")
    print(f"longest chain: {len(chain)} agents ({' -> '.join(chain)}); critical-path bound "
          f"{args.latency:g} s x {TASKS * len(chain)} requests = {bound:.2f} s")

    embedded = None
    if not os.environ.get("PREFECT_API_URL") and args.server == "toka":
        # What `toka run` starts; once it holds Prefect's default slot, get_client() uses it.
        from toka.lifecycle import _EmbeddedServer

        embedded = _EmbeddedServer()
        embedded.start()
    print(f"embedded server: {args.server}'s" if not os.environ.get("PREFECT_API_URL") else "")
    try:
        with AnthropicServer(latency=args.latency) as server:
            os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"] = KEY, server.base_url
            _BASE_URL = server.base_url
            runs = asyncio.run(Bench(args, dag, specs, server).rounds())
    finally:
        if embedded is not None:
            stop_embedded(embedded)

    print()
    width = 28
    print(f"{'side':<{width}} {'wall s':>7} {'/ bound':>8} {'peak':>5} {'mean':>6} {'retries':>8}   per round (s)")
    print("-" * (width + 60))
    for side, label in (("toka", "(a) toka pipeline"), ("hand", "(b) hand-written Prefect")):
        rs = runs[side]
        wall = statistics.median(r.wall for r in rs)
        print(f"{label:<{width}} {wall:>7.2f} {wall / bound:>7.2f}x {max(r.peak for r in rs):>5} "
              f"{statistics.median(r.mean for r in rs):>6.1f} {statistics.median(r.retries for r in rs):>8g}   "
              + ", ".join(f"{r.wall:.2f}" + (" FAILED" if r.failed else "") for r in rs))
    print("-" * (width + 60))
    ratio = statistics.median(a.wall / b.wall for a, b in zip(runs["toka"], runs["hand"]))
    print(f"toka / hand-written: {ratio:.2f}x (median of per-round ratios); wall and mean are medians, "
          f"peak the highest, over the rounds")
    print()
    cpu_table(runs["toka"], runs["hand"])
    toka = runs["toka"]
    over = statistics.median(r.wall for r in toka) / bound
    peak = statistics.median(r.peak for r in toka)
    if any(r.failed for r in toka):
        print(f"toka: {sum(bool(r.failed) for r in toka)} of {len(toka)} timed runs FAILED (see above)")
    if postgres:
        print(f"target (PostgreSQL): toka <= {PG_BOUND_TARGET:g}x the bound: {over:.2f}x "
              f"{'OK' if over <= PG_BOUND_TARGET else 'NOT MET'}")
    else:
        print(f"target: toka <= {BOUND_TARGET:g}x the bound: {over:.2f}x {'OK' if over <= BOUND_TARGET else 'NOT MET'}; "
              f">= {PEAK_TARGET} requests in flight at peak (median over rounds): {peak:g} "
              f"{'OK' if peak >= PEAK_TARGET else 'NOT MET'}")
    if not os.environ.get("PREFECT_API_URL") and not args.no_postgres:
        run_on_postgres(Path(__file__), sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
