#!/usr/bin/env python
"""What provider faults and prompt caching do to a real-SDK run of the nine Toka specs.

Runs the nine Toka specs (``tests/data/toka-specs``) through
``toka.pipeline.pipeline_flow`` (what ``toka run`` runs) with the real Anthropic
provider (``toka.claude.AnthropicModel``, the official SDK) against the
loopback Messages API server of the test suite (``tests/anthropic_server.py``:
a real HTTP socket on 127.0.0.1, its default scripted agent answering
``list_dir`` then ``submit_result``, so a task is two model requests when the
agent may read files and one otherwise). Every reply, faults included, comes
after ``--latency`` seconds, in the connection's own thread, so concurrent
requests overlap as on the real API.

In one process, after a warm-up run (it also starts Prefect's embedded server;
not timed), for ``--repeat`` rounds, alternating:

(1) fault-free: latency only;
(2) faulty: the same latency, and each request has a ``--fault-rate`` chance
    (default 10%, ``random.Random(--seed + round)``) of one of: 429 with
    ``retry-after: 0.05``, 529, 500, a dropped connection (the server's default
    mix).

Each run has a fresh run key (nothing is replayed from Prefect's result
cache), a fresh loopback server (fresh prompt cache) and a fresh copy of a
two-file workspace; ``retry_delay_seconds=0``, ``max_concurrency`` 9,
``max_attempts`` ``--max-attempts`` (toka's default 5, the documented bound on
HTTP attempts for one logical call). Reported: best and median wall times, the
faulty/fault-free ratio (median of the per-round ratios, and best/best), the
mean task time (``TaskRecord.duration_s``, less exposed to scheduling noise
than the wall time) of both, and from the server's request log: HTTP requests, logical calls (requests answered
``ok``), HTTP attempts per logical call and the most attempts any one logical
call took. A retry resends the identical request body, so a logical call is
the run of requests with the same body (JSON, keys sorted) up to and including
its ``ok``; requests of one body that never got an ``ok`` are a call that gave
up. The time from a failed attempt to its retry (server clock: the reply
latency plus toka's backoff) is shown per kind of fault.

Prompt caching: the warm-up run is the run *without* caching: the model is an
``AnthropicModel`` subclass whose ``params()`` drops every ``cache_control``
(installed with ``toka.model.override_model``), otherwise the same requests.
The fault-free runs are the runs *with* caching (toka's breakpoints: end of the
system prompt, end of the conversation so far). Per task (``TaskRecord.usage``
from the ``PipelineSummary``): input, cache-write, cache-read and input-side
tokens, with and without caching, the share of input-side tokens served from
the cache, and an ESTIMATED input-side cost ratio from Anthropic's published
multipliers (cache write 1.25x, cache read 0.1x the base input price; 5-minute
cache). The loopback server estimates tokens (about 4 characters a token) and
emulates the cache without its minimum cacheable length (1024+ tokens on the
real API) or expiry, so the token figures are the shape of the real ones, not
a bill.

The embedded Prefect server uses SQLite; its contention adds noise to the wall
times of both kinds of run alike. The exit code is 0 when every run finished
(whatever the figures); a fault-free run that does not complete is an error.

Usage (from the repository root)::

    .venv/bin/python bench/provider_faults.py [--latency 0.1] [--fault-rate 0.1] [--repeat 2]
                                              [--seed 0] [--max-attempts 5] [--max-concurrency 9]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "toka" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # measure this checkout's toka (and use its tests/anthropic_server.py)

SPECS_DIR = _ROOT / "tests" / "data" / "toka-specs"
FAKE_KEY = "sk-ant-bench-loopback-0000000000000000"

# Isolation, before anything imports prefect (see bench/_isolation.py).
from bench._isolation import prefect_env, scratch  # noqa: E402

_TMP = scratch("toka-bench-faults-")
os.environ.update({
    **prefect_env(_TMP / "prefect-home"),
    "ANTHROPIC_API_KEY": FAKE_KEY,  # a fake key: only the loopback server ever sees it
})
os.environ.pop("ANTHROPIC_BASE_URL", None)  # set per run, to that run's loopback server
os.environ.pop("TOKA_MODEL", None)

_t0 = time.perf_counter()
import anthropic  # noqa: E402
import prefect  # noqa: E402

from toka.config import grouped  # noqa: E402
from toka.pipeline import pipeline_flow  # noqa: E402
from tests.anthropic_server import AnthropicServer, Fault, Recorded  # noqa: E402
from toka.claude import AnthropicModel, default_model  # noqa: E402
from toka.graph import AgentGraph  # noqa: E402
from toka.model import ModelRequest, Usage, override_model  # noqa: E402
from toka.plan import make_plan  # noqa: E402
from toka.results import PipelineSummary, TaskRecord  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _t0

FAULT_MIX = (Fault.status(429, retry_after=0.05), Fault.status(529), Fault.status(500), Fault.drop())
CACHE_WRITE_PRICE = 1.25  # x the base input price (5-minute cache), Anthropic's published multiplier
CACHE_READ_PRICE = 0.10


# -- the model without prompt caching ---------------------------------------------


def _strip_cache_control(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_strip_cache_control(v) for v in value]
    return value


class UncachedAnthropicModel(AnthropicModel):
    """Toka's Anthropic provider, minus every prompt-cache breakpoint."""

    def params(self, request: ModelRequest) -> dict[str, Any]:
        return _strip_cache_control(super().params(request))


# -- one run ------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    wall: float
    summary: PipelineSummary
    requests: list[Recorded]
    attempts: list[int] = field(default_factory=list)
    """HTTP attempts of each logical call that got an answer."""
    gave_up: list[int] = field(default_factory=list)
    """HTTP attempts of each logical call that never got one."""
    gaps: dict[str, list[float]] = field(default_factory=dict)
    """Failed attempt's outcome -> seconds from it to the retry (server clock): latency + backoff."""

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    @property
    def logical(self) -> int:
        return sum(r.outcome == "ok" for r in self.requests)

    @property
    def faults(self) -> collections.Counter[str]:
        return collections.Counter(r.outcome.removeprefix("fault:") for r in self.requests
                                   if r.outcome.startswith("fault:"))

    @property
    def tasks(self) -> list[TaskRecord]:
        return [t for a in self.summary.agents for t in a.tasks]

    @property
    def unfinished(self) -> list[str]:
        return [f"{a.agent} {t.index}: {t.state} {t.error or ''}".strip()
                for a in self.summary.agents for t in a.tasks if t.state != "completed"]


def logical_calls(requests: list[Recorded]) -> tuple[list[int], list[int], dict[str, list[float]]]:
    """(attempts of each answered logical call, attempts of each call that gave up, retry gaps).

    The requests are in the order the server read them, and a retry is sent only
    after its failed attempt was answered, so counting the requests of one body
    up to its ``ok`` counts the attempts of one logical call.
    """
    pending: dict[str, tuple[int, Recorded]] = {}
    answered: list[int] = []
    gaps: dict[str, list[float]] = collections.defaultdict(list)
    for r in requests:
        key = json.dumps(r.body, sort_keys=True)
        n, last = pending.get(key, (0, r))
        if n:
            gaps[last.outcome.removeprefix("fault:")].append(r.time - last.time)
        pending[key] = (n + 1, r)
        if r.outcome == "ok":
            answered.append(pending.pop(key)[0])
    return answered, [n for n, _ in pending.values()], dict(gaps)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.template = _TMP / "workspace-template"
        self.template.mkdir()
        (self.template / "README.md").write_text("# bench workspace\n\nA small project for the agents to look at.\n")
        (self.template / "pyproject.toml").write_text('[project]\nname = "bench-workspace"\nversion = "0.1.0"\n')

    async def run(self, label: str, *, fault_rate: float, seed: int, caching: bool = True) -> Run:
        args = self.args
        workspace = _TMP / f"workspace-{uuid.uuid4().hex[:8]}"
        shutil.copytree(self.template, workspace)
        server = AnthropicServer(latency=args.latency, fault_rate=fault_rate, fault_mix=FAULT_MIX, seed=seed)
        with server:
            os.environ["ANTHROPIC_BASE_URL"] = server.base_url
            model = None if caching else UncachedAnthropicModel(
                default_model(), api_key=FAKE_KEY, base_url=server.base_url,  # SDK retries off inside
                max_attempts=args.max_attempts, max_retry_wait=args.max_retry_wait,
            )
            t0 = time.perf_counter()
            with override_model(model) if model is not None else nullcontext():
                state = await pipeline_flow(specs=[str(SPECS_DIR)], return_state=True, **grouped({
                    "workspace": str(workspace), "run_key": f"bench-faults-{uuid.uuid4().hex}",
                    "max_concurrency": args.max_concurrency, "max_attempts": args.max_attempts,
                    "max_retry_wait": args.max_retry_wait, "retry_delay_seconds": 0,
                }))
            wall = time.perf_counter() - t0
            outcome = await state.aresult(raise_on_failure=False)
            requests = list(server.requests)
        os.environ.pop("ANTHROPIC_BASE_URL", None)
        shutil.rmtree(workspace, ignore_errors=True)
        summary = getattr(outcome, "report", outcome)  # PipelineFailedError carries the summary
        if not isinstance(summary, PipelineSummary):
            raise RuntimeError(f"{label}: the pipeline produced no summary: {state.name}: {outcome!r}"[:2000])
        run = Run(label, wall, summary, requests)
        run.attempts, run.gave_up, run.gaps = logical_calls(requests)
        if summary.usage.requests != run.logical:
            print(f"  note: {label}: the summary counts {summary.usage.requests} model requests, "
                  f"the server answered {run.logical}", flush=True)
        if run.unfinished and fault_rate == 0:
            raise RuntimeError(f"{label}: fault-free run did not complete: {run.unfinished[:5]}")
        return run


# -- figures ------------------------------------------------------------------------------


def per_request_chain(graph: AgentGraph, run: Run) -> tuple[int, list[str]]:
    """The dependency chain with the most model requests (answered ones, from a fault-free run)."""
    per_agent = {a.agent: a.usage.requests for a in run.summary.agents}
    best: dict[str, tuple[int, list[str]]] = {}
    for name in graph.order():
        ups = [best[dep] for dep in graph.upstream(name)]
        length, chain = max(ups, key=lambda x: x[0]) if ups else (0, [])
        best[name] = (length + per_agent.get(name, 0), [*chain, name])
    return max(best.values(), key=lambda x: x[0])


def token_means(tasks: list[TaskRecord]) -> dict[str, float]:
    n = len(tasks) or 1
    u = sum((t.usage for t in tasks), Usage())
    side = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
    return {
        "input": u.input_tokens / n,
        "write": u.cache_creation_input_tokens / n,
        "read": u.cache_read_input_tokens / n,
        "side": side / n,
        "output": u.output_tokens / n,
        "cost": (u.input_tokens + CACHE_WRITE_PRICE * u.cache_creation_input_tokens
                 + CACHE_READ_PRICE * u.cache_read_input_tokens) / n,
        "requests": u.requests / n,
    }


def _fmt(xs: list[float], spec: str = ".2f") -> str:
    return ", ".join(format(x, spec) for x in xs)


async def all_runs(bench: Bench, args: argparse.Namespace) -> tuple[Run, list[Run], list[Run]]:
    t0 = time.perf_counter()
    uncached = await bench.run("warm-up / no caching", fault_rate=0.0, seed=args.seed, caching=False)
    print(f"  warm-up = the run without prompt caching (starts the embedded server; not timed): "
          f"{uncached.wall:.2f} s, {uncached.n_requests} requests, {time.perf_counter() - t0:.1f} s in all",
          flush=True)
    clean: list[Run] = []
    faulty: list[Run] = []
    for i in range(args.repeat):
        clean.append(await bench.run(f"fault-free {i + 1}", fault_rate=0.0, seed=args.seed + i))
        faulty.append(await bench.run(f"faulty {i + 1}", fault_rate=args.fault_rate, seed=args.seed + i))
        a, b = clean[-1], faulty[-1]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(b.faults.items()))
        print(f"  round {i + 1}/{args.repeat}: fault-free {a.wall:.2f} s ({a.n_requests} requests), "
              f"faulty {b.wall:.2f} s ({b.n_requests} requests, {sum(b.faults.values())} faults: {kinds or '-'})",
              flush=True)
    return uncached, clean, faulty


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.1, help="seconds before every reply (default 0.1)")
    parser.add_argument("--fault-rate", type=float, default=0.1, help="fault probability per request (default 0.1)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of fault-free + faulty runs (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="fault seed of round 1; round i uses seed+i-1 (default 0)")
    parser.add_argument("--max-attempts", type=int, default=5, help="HTTP attempts per logical call (default 5)")
    parser.add_argument("--max-retry-wait", type=float, default=120.0,
                        help="seconds of retry waiting per logical call (default 120)")
    parser.add_argument("--max-concurrency", type=int, default=9, help="most agents at once (default 9)")
    args = parser.parse_args(argv)
    if args.latency < 0 or not 0 < args.fault_rate < 1 or args.repeat < 1 or args.max_attempts < 1 \
            or args.max_concurrency < 1:
        parser.error("--latency must be >= 0, --fault-rate in (0, 1); --repeat, --max-attempts and "
                     "--max-concurrency at least 1")

    plan = make_plan([str(SPECS_DIR)])
    graph = plan.graph
    n_tasks = sum(len(spec.task_list(())) for spec in graph.agents.values())
    api = os.environ.get("PREFECT_API_URL") or "embedded server (SQLite), fresh PREFECT_HOME"
    print(f"provider_faults: {len(graph)} agents, {n_tasks} tasks, {len(plan.waves)} waves; latency "
          f"{args.latency:g} s/reply, fault rate {args.fault_rate:.0%} (429 retry-after 0.05 s / 529 / 500 / "
          f"drop), seed {args.seed}, repeat {args.repeat}, max concurrency {args.max_concurrency}, "
          f"max attempts {args.max_attempts}")
    print(f"python {platform.python_version()}, prefect {prefect.__version__}, anthropic {anthropic.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; model id {default_model()} (loopback); API: {api}")
    print(f"import prefect + toka (once, not timed below): {IMPORT_SECONDS:.2f} s; 1-minute load average "
          f"{os.getloadavg()[0]:.2f}")
    print()
    print("runs (each: fresh run key, loopback server and workspace), alternating fault-free / faulty:", flush=True)
    uncached, clean, faulty = asyncio.run(all_runs(Bench(args), args))
    print()

    # -- wall time
    cw, fw = [r.wall for r in clean], [r.wall for r in faulty]
    ratios = [b / a for a, b in zip(cw, fw)]
    chain_requests, chain = per_request_chain(graph, clean[0])
    floor = chain_requests * args.latency
    width = 40
    print(f"{'wall time of the nine specs':<{width}} {'best s':>7} {'median s':>9}   per round (s)")
    print("-" * 86)
    print(f"{'(1) fault-free':<{width}} {min(cw):>7.2f} {statistics.median(cw):>9.2f}   {_fmt(cw)}")
    print(f"{f'(2) {args.fault_rate:.0%} faults':<{width}} {min(fw):>7.2f} {statistics.median(fw):>9.2f}   {_fmt(fw)}")
    print(f"{f'latency floor ({chain_requests} requests x {args.latency:g} s)':<{width}} {floor:>7.2f}"
          f"               on {' -> '.join(chain)}")
    ct = [statistics.mean(t.duration_s for t in r.tasks) for r in clean]
    ft = [statistics.mean(t.duration_s for t in r.tasks) for r in faulty]
    print(f"{'mean task time, fault-free':<{width}} {min(ct):>7.3f} {statistics.median(ct):>9.3f}   {_fmt(ct, '.3f')}")
    print(f"{'mean task time, faulty':<{width}} {min(ft):>7.3f} {statistics.median(ft):>9.3f}   {_fmt(ft, '.3f')}")
    print("-" * 86)
    ratio = statistics.median(ratios)
    print(f"faulty / fault-free: {ratio:.3f}x wall time, median of per-round ratios ({_fmt(ratios, '.3f')}), "
          f"{min(fw) / min(cw):.3f}x best/best; extra time {statistics.median(b - a for a, b in zip(cw, fw)):.2f} s "
          f"(median per round)")
    task_ratio = statistics.median(ft) / statistics.median(ct)
    print(f"faulty / fault-free mean task time (TaskRecord.duration_s; less exposed to scheduling noise): "
          f"{task_ratio:.3f}x")
    spread_c, spread_f = max(cw) / min(cw) - 1, max(fw) / min(fw) - 1
    load = os.getloadavg()[0]
    print(f"noise: wall times spread {spread_c:.0%} fault-free, {spread_f:.0%} faulty (max/min - 1); 1-minute load "
          f"average now {load:.2f} on {os.cpu_count()} CPUs" + (
              "; above 10%: the wall-time ratio is unreliable, try --repeat 4 on a quiet machine"
              if max(spread_c, spread_f) > 0.1 else ""))
    print()

    # -- HTTP attempts
    print(f"{'HTTP attempts':<{width}} {'requests':>9} {'logical':>8} {'faults':>7} {'rate':>6} {'att/call':>9} "
          f"{'max':>4}   attempts per call: calls")
    print("-" * 100)
    for r in [*clean, *faulty]:
        per_call = r.attempts + r.gave_up
        hist = collections.Counter(per_call)
        n_faults = sum(r.faults.values())
        print(f"{r.label:<{width}} {r.n_requests:>9} {r.logical:>8} {n_faults:>7} "
              f"{n_faults / max(1, r.n_requests):>6.1%} {r.n_requests / max(1, r.logical):>9.3f} "
              f"{max(per_call, default=0):>4}   {', '.join(f'{k}: {v}' for k, v in sorted(hist.items()))}"
              + (f"   ({len(r.gave_up)} gave up)" if r.gave_up else ""))
    print("-" * 100)
    total_req = sum(r.n_requests for r in faulty)
    total_ok = sum(r.logical for r in faulty)
    per_call_all = [n for r in faulty for n in r.attempts + r.gave_up]
    att = total_req / max(1, total_ok)
    worst = max(per_call_all, default=0)
    expected = (1 - args.fault_rate ** args.max_attempts) / (1 - args.fault_rate)
    gave_up = sum(len(r.gave_up) for r in faulty)
    print(f"faulty runs together: {total_req} HTTP requests for {total_ok} logical calls = {att:.3f} attempts per "
          f"call (expected {expected:.3f} = sum of {args.fault_rate:g}^k, k < {args.max_attempts}); most for one call: "
          f"{worst}; bound (max_attempts): {args.max_attempts}; calls that gave up: {gave_up}")
    gaps: dict[str, list[float]] = collections.defaultdict(list)
    for r in faulty:
        for kind, xs in r.gaps.items():
            gaps[kind].extend(xs)
    print("retry gap (failed attempt read -> its retry read, server clock; includes the reply latency "
          f"{args.latency:g} s): " + "; ".join(
              f"after {kind} x{len(xs)}: median {statistics.median(xs):.3f} s, max {max(xs):.3f} s"
              for kind, xs in sorted(gaps.items())))
    unfinished = [f"{r.label}: {u}" for r in faulty for u in r.unfinished]
    if unfinished:
        print(f"tasks not completed in faulty runs ({len(unfinished)}): " + "; ".join(unfinished[:5]))
    print()

    # -- prompt caching
    with_c = token_means(clean[0].tasks)
    without = token_means(uncached.tasks)
    same = {json.dumps(token_means(r.tasks), sort_keys=True) for r in clean}
    print(f"{'tokens per task (mean of ' + str(len(clean[0].tasks)) + ' tasks)':<{width}} {'input':>8} "
          f"{'cache wr':>9} {'cache rd':>9} {'input-side':>11} {'output':>7} {'req/task':>9} {'cost est.':>10}")
    print("-" * 108)
    rows = (("with caching (toka's breakpoints)", with_c), ("without caching (cache_control dropped)", without))
    for label, m in rows:
        print(f"{label:<{width}} {m['input']:>8.0f} {m['write']:>9.0f} {m['read']:>9.0f} {m['side']:>11.0f} "
              f"{m['output']:>7.0f} {m['requests']:>9.2f} {m['cost']:>10.0f}")
    print("-" * 108)
    share = with_c["read"] / with_c["side"] if with_c["side"] else 0.0
    cost_ratio = with_c["cost"] / without["cost"] if without["cost"] else 0.0
    side_diff = with_c["side"] / without["side"] - 1 if without["side"] else 0.0
    print(f"cost est. = input + {CACHE_WRITE_PRICE:g} x cache writes + {CACHE_READ_PRICE:g} x cache reads, in "
          f"base-input-token units (Anthropic's published multipliers; an ESTIMATE)")
    print(f"input-side tokens with / without caching differ by {side_diff:+.1%} (the same prompts: expected 0); "
          f"the {len(clean)} fault-free runs' token figures are {'identical' if len(same) == 1 else 'NOT identical'}")
    print("loopback token counts: ~4 characters a token; no minimum cacheable length (1024+ tokens on the real "
          "API), no expiry")
    agents_share = []
    for a in clean[0].summary.agents:
        m = token_means(a.tasks)
        agents_share.append((a.agent, len(a.tasks), m["read"] / m["side"] if m["side"] else 0.0))
    print("served from cache per agent: " + ", ".join(f"{n} ({k} tasks) {s:.0%}" for n, k, s in agents_share))
    print()

    print(f"faults: {args.fault_rate:.0%} fault rate costs {ratio:.2f}x wall time (mean task time {task_ratio:.2f}x); "
          f"{att:.2f} HTTP attempts per logical call (most {worst}, bound {args.max_attempts})")
    print(f"caching: {share:.0%} of input tokens served from cache; input-side cost {cost_ratio:.2f}x of uncached "
          f"(estimate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
