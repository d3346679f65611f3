#!/usr/bin/env python
"""How long ``toka validate`` + ``toka plan`` take over a large set of specs.

Generates ``--agents`` realistic agent specs (``--tasks`` tasks each, a random
DAG of required and optional dependencies, deterministic for ``--seed``) into
a temporary directory, then times, in this one process, what the two commands
do with them:

* ``toka validate DIR`` = ``make_plan(DIR)``: load every file
  (``load_specs``), build the graph (``AgentGraph.build``), compute the waves;
* ``toka plan --json DIR`` = the same again, plus ``Plan.to_dict()`` and
  ``json.dumps``.

Each command is its own process and loads the specs itself, so nothing is
shared between the two passes: "validate + plan" is their sum, the target.
Each run also times ``make_plan(DIR, agents=[<last agent>])`` (a selection,
pulling in its transitive required dependencies). The floor for parsing is
plain ``yaml.load(text, Loader=yaml.CSafeLoader)`` of the same files.

Then, side by side in rounds (``--rounds``; every variant once a round, in
rotating order; these machines are noisy, so the ratio of each round is
printed and their median is the figure), two mechanisms that were removed from
the loader because they did not pay, re-created here from the same public
pieces so that they can be re-measured:

* a forked parser: files parsed in forked worker processes, one per core,
  from 200 files on (in-process below), validated here as chunks arrive;
* a spec cache: valid specs remembered by ``(file name, text)``, so a second
  load of the same files in one process skips parsing and validation. Only
  ``toka run`` loaded twice (the CLI planned, then the pipeline again); the
  plain alternative is to load once and pass the plan on.

Each is measured on the generated set and on the real ones
(``tests/data/toka-specs``, ``agent_specs``). Measured 2026-12-01 on two cores
shared with other work, ``--rounds 7``, medians of per-round ratios: forked /
in-process 1.19 on 1,000 files (0.92 with the original forked code, before it
was removed; the real sets never reach 200 files); cache / none 0.89-1.10 for
one load, 0.50-0.56 for two; one load passed on / two loads with the cache
0.91-1.01. Neither passed the bar of a clear gain (15%) on a real workload.

Generation is not timed, nor is importing toka (printed once for reference),
nor the CLI's terminal output. Each figure of the first table is the best and
the median of ``--repeat`` runs. The exit code is 0 whether or not the target is met.

Usage (from the repository root)::

    .venv/bin/python bench/plan_scale.py [--agents 1000] [--tasks 10] [--seed 0] [--repeat 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "toka" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # measure this checkout's toka

_t0 = time.perf_counter()
import pydantic  # noqa: E402

from toka.graph import AgentGraph  # noqa: E402
from toka.plan import Plan, make_plan  # noqa: E402
from toka.spec import AgentSpec, read_spec_text  # noqa: E402
from toka.specset import find_spec_files, load_specs  # noqa: E402
from toka.yaml_source import YamlSource, load_yaml  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _t0

TARGET_SECONDS = 2.0

# -- generating specs ---------------------------------------------------------

PRIORITIES = ("critical", "high", "medium", "low")
TOPICS = (
    "build-system", "storage", "kernel-events", "security", "testing", "ci-pipeline",
    "docs", "observability", "credentials", "packaging", "release", "api-gateway",
    "scheduler", "cache-layer", "search-index", "billing", "auth", "frontend",
    "data-migration", "dependency-audit", "telemetry", "plugin-system",
)  # fmt: skip
AIMS = (
    "stabilization", "advancement", "enhancement", "hardening", "cleanup", "refactor",
    "migration", "resolution", "setup", "optimisation",
)  # fmt: skip
VERBS = (
    "Audit", "Design", "Implement", "Refactor", "Document", "Benchmark", "Migrate",
    "Validate", "Harden", "Instrument", "Review", "Simplify", "Test", "Profile",
)  # fmt: skip
THINGS = (
    "the write-ahead log", "workspace dependency versions", "the event bus schema",
    "CI workflow conditionals", "storage backend adapters", "credential loading",
    "the plugin interface", "retry and backoff policies", "the public API surface",
    "release packaging scripts", "cache invalidation", "test fixtures and utilities",
    "error reporting paths", "configuration defaults", "metrics exporters",
)  # fmt: skip
SKILLS = (
    "dependency-analysis", "build-optimization", "rust-toolchain", "schema-validation",
    "concurrency-handling", "performance-optimization", "technical-writing",
    "workflow-debugging", "threat-modelling", "test-design", "data-migration",
    "observability", "api-design", "static-analysis", "release-engineering",
)  # fmt: skip
PERMISSIONS = (
    "filesystem-read", "filesystem-write", "cargo-execution", "git-access",
    "database-access", "network-access", "cargo-test-execution", "storage-modification",
)  # fmt: skip
CHANNELS = ("main-agent", "kernel-events", "prefect-artifacts", "github-issues", "slack")
FREQUENCIES = ("daily", "weekly", "hourly", "on-milestone", "on-completion")
SENTENCES = (
    "Maintain backward compatibility with existing formats",
    "Fail fast on integrity violations and report the exact cause",
    "Prefer small, reviewable changes over sweeping rewrites",
    "Coordinate with dependent agents before changing shared interfaces",
    "Record every assumption in the final report",
    "Keep the build green at every intermediate step",
    "Escalate to the main agent when a decision needs a human",
    "Measure before and after every optimisation",
)  # fmt: skip
DURATIONS = ("30m", "1h", "2h", "4h", "1d", "1h30m")
MEMORY = ("256MB", "512MB", "1GB", "2GB")
CPU = ("25%", "30%", "50%", "60%", "75%", "80%")
TIMEOUTS = ("30m", "1h", "2h", "3h", "4h")


class Flow(list):  # type: ignore[type-arg]
    """A list of scalars written in flow style, ``["a", "b"]``, as real files do."""


_BARE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # an ASCII JSON string is a valid double-quoted YAML scalar


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _emit(obj: Any, indent: int, out: list[str]) -> None:
    """Block-style YAML in the house style of the real Toka files."""
    pad = "  " * indent
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, Flow):
                out.append(f"{pad}{_key(k)}: [{', '.join(_scalar(x) for x in v)}]")
            elif isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{_key(k)}:")
                _emit(v, indent + 1, out)
            elif isinstance(v, dict):
                out.append(f"{pad}{_key(k)}: {{}}")
            elif isinstance(v, list):
                out.append(f"{pad}{_key(k)}: []")
            else:
                out.append(f"{pad}{_key(k)}: {_scalar(v)}")
    else:
        for item in obj:
            if isinstance(item, dict):
                sub: list[str] = []
                _emit(item, indent + 1, sub)
                sub[0] = f"{pad}- {sub[0][len(pad) + 2:]}"
                out.extend(sub)
            else:
                out.append(f"{pad}- {_scalar(item)}")


def to_yaml(spec: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, value in spec.items():
        _emit({key: value}, 0, lines)
        lines.append("")
    return "\n".join(lines)


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(VERBS)} {rng.choice(THINGS)}"


def _dep_block(names: list[str], rng: random.Random, list_shape: bool) -> Any:
    reasons = {n: f"{rng.choice(SENTENCES)} ({n})" for n in names}
    if not reasons:
        return {}
    if list_shape:  # [{name: reason}, ...], as in most real files
        return [{n: r} for n, r in reasons.items()]
    return reasons  # {name: reason}


def make_spec(i: int, names: list[str], n_tasks: int, rng: random.Random) -> dict[str, Any]:
    """One agent spec, shaped like tests/data/toka-specs/*.yaml; depends only on lower indices."""
    name = names[i]
    topic = name.rsplit("-", 1)[0]
    title = topic.replace("-", " ").title()

    n_req = min(rng.randint(0, 3), i)
    required = rng.sample(range(i), n_req)
    candidates = [j for j in range(i) if j not in required]
    optional = rng.sample(candidates, min(rng.randint(0, 3), len(candidates)))
    list_shape = rng.random() < 0.5

    if rng.random() < 0.5:  # the two shapes of reporting.metrics
        metrics: list[Any] = [
            {f"{topic}-metric-{k}": f"{rng.choice(THINGS).capitalize()} per run"}
            for k in range(rng.randint(3, 5))
        ]
    else:
        metrics = [
            {
                "name": f"{topic}-metric-{k}",
                "description": f"{rng.choice(THINGS).capitalize()} per run",
                "type": rng.choice(("gauge", "counter", "percentage")),
                "unit": rng.choice(("count", "seconds", "percent")),
            }
            for k in range(rng.randint(3, 5))
        ]

    limits: dict[str, Any] = {
        "max_memory": rng.choice(MEMORY),
        "max_cpu": rng.choice(CPU),
        "timeout": rng.choice(TIMEOUTS),
    }
    if rng.random() < 0.3:
        limits["max_disk_usage"] = rng.choice(("100MB", "1GB", "5GB"))
    if rng.random() < 0.2:
        limits["max_processes"] = rng.choice((32, 64, 256))
    if rng.random() < 0.2:
        limits["max_network_bandwidth"] = rng.choice(("10Mbps", "100Mbps"))

    tasks = []
    for _ in range(n_tasks):
        task: dict[str, Any] = {
            "description": f"{_sentence(rng)} for the {topic} workstream",
            "priority": rng.choice(PRIORITIES),
        }
        if rng.random() < 0.3:
            task["estimated_duration"] = rng.choice(DURATIONS)
        if rng.random() < 0.2:
            task["tools_required"] = rng.sample(("cargo", "git", "pytest", "grep", "jq"), 2)
        tasks.append(task)

    extra_key = f"{topic.replace('-', '_')}_details"
    return {
        "metadata": {
            "name": name,
            "version": f"v0.{rng.randint(1, 9)}.{rng.randint(0, 9)}",
            "created": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "workstream": f"{title} {rng.choice(AIMS).title()}",
            "branch": f"feature/{name}",
        },
        "spec": {
            "name": f"{title} Agent {i}",
            "domain": f"{topic}-engineering",
            "priority": rng.choice(PRIORITIES),
        },
        "capabilities": {
            "primary": rng.sample(SKILLS, rng.randint(3, 5)),
            "secondary": rng.sample(SKILLS, rng.randint(2, 4)),
        },
        "objectives": [
            {
                "description": _sentence(rng),
                "deliverable": f"{rng.choice(THINGS).capitalize()} updated and documented",
                "validation": f"{rng.choice(SENTENCES)}; checked in CI",
            }
            for _ in range(rng.randint(2, 4))
        ],
        "tasks": {"default": tasks},
        "dependencies": {
            "required": _dep_block([names[j] for j in required], rng, list_shape),
            "optional": _dep_block([names[j] for j in optional], rng, list_shape),
        },
        "reporting": {
            "frequency": rng.choice(FREQUENCIES),
            "channels": rng.sample(CHANNELS, 2),
            "metrics": metrics,
        },
        "security": {
            "sandbox": True,
            "capabilities_required": rng.sample(PERMISSIONS, rng.randint(2, 5)),
            "resource_limits": limits,
        },
        "behavioral_directives": {
            "operational_focus": rng.sample(SENTENCES, 4),
            "error_handling": rng.sample(SENTENCES, 3),
            "coordination": rng.sample(SENTENCES, 3),
        },
        "risk_mitigation": {
            "high_priority_risks": [
                {"risk": f"Regression in {rng.choice(THINGS)}", "mitigation": rng.choice(SENTENCES)}
                for _ in range(rng.randint(2, 3))
            ],
            "monitoring": rng.sample(SENTENCES, 3),
        },
        "success_criteria": {
            "phase_1": rng.sample(SENTENCES, 3),
            "phase_2": rng.sample(SENTENCES, 3),
            "final_validation": rng.sample(SENTENCES, 3),
        },
        extra_key: {
            "components": [
                {
                    "component": rng.choice(THINGS),
                    "features": Flow(rng.sample(("logging", "retries", "metrics", "caching", "tracing"), 3)),
                    "validation": rng.choice(SENTENCES),
                }
                for _ in range(3)
            ],
            "notes": rng.sample(SENTENCES, 2),
        },
    }


def generate(directory: Path, n_agents: int, n_tasks: int, seed: int) -> tuple[list[Path], dict[str, Any]]:
    rng = random.Random(seed)
    names = [f"{rng.choice(TOPICS)}-{i:04d}" for i in range(n_agents)]
    paths, n_bytes, n_req, n_opt, list_shaped = [], 0, 0, 0, 0
    for i in range(n_agents):
        spec = make_spec(i, names, n_tasks, rng)
        text = to_yaml(spec)
        if i < 25:  # the emitter must write what we meant
            assert yaml.safe_load(text) == json.loads(json.dumps(spec)), names[i]
        deps = spec["dependencies"]
        n_req += len(deps["required"])
        n_opt += len(deps["optional"])
        list_shaped += isinstance(deps["required"], list) or isinstance(deps["optional"], list)
        path = directory / f"{names[i]}.yaml"
        path.write_text(text, encoding="utf-8")
        n_bytes += len(text)
        paths.append(path)
    stats = {"bytes": n_bytes, "required": n_req, "optional": n_opt, "list_shaped": list_shaped,
             "last": names[-1]}  # fmt: skip
    return paths, stats


# -- timing ---------------------------------------------------------------------

Timings = dict[str, float]


def _timed(timings: Timings, key: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    result = fn()
    timings[key] = time.perf_counter() - t0
    return result


def one_pass(paths: list[str], prefix: str, timings: Timings, *, as_json: bool) -> tuple[Plan, str]:
    """What one ``toka validate`` (or, with ``as_json``, ``toka plan --json``) does.

    ``make_plan(paths)`` is exactly load + build + waves; it is split here to
    time each phase (``main`` checks the result against ``make_plan``).
    """
    specs = _timed(timings, f"{prefix}.load", lambda: load_specs(paths))
    graph = _timed(timings, f"{prefix}.graph", lambda: AgentGraph.build(specs))
    waves = _timed(timings, f"{prefix}.waves", graph.waves)
    plan = Plan(graph=graph, waves=waves)
    text = _timed(timings, f"{prefix}.json", lambda: json.dumps(plan.to_dict())) if as_json else ""
    return plan, text


def one_run(paths: list[str], files: list[Path], last: str) -> tuple[Timings, dict[str, Any]]:
    timings: Timings = {}
    one_pass(paths, "validate", timings, as_json=False)
    plan, text = one_pass(paths, "plan", timings, as_json=True)
    info = {"agents": len(plan.graph), "waves": len(plan.waves), "edges": len(plan.graph.edges),
            "dropped": len(plan.graph.dropped), "warnings": len(plan.warnings), "json": text}  # fmt: skip
    del plan
    sel = _timed(timings, "select.make_plan", lambda: make_plan(paths, agents=[last]))
    _timed(timings, "select.json", lambda: json.dumps(sel.to_dict()))
    info.update(sel_agents=len(sel.graph), sel_waves=len(sel.waves))
    del sel

    def raw_yaml() -> None:
        for f in files:
            yaml.load(f.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)  # noqa: S506

    _timed(timings, "raw_yaml", raw_yaml)
    timings["validate.total"] = sum(timings[f"validate.{k}"] for k in ("load", "graph", "waves"))
    timings["plan.total"] = sum(timings[f"plan.{k}"] for k in ("load", "graph", "waves", "json"))
    timings["total"] = timings["validate.total"] + timings["plan.total"]
    timings["select.total"] = timings["select.make_plan"] + timings["select.json"]
    return timings, info


ROWS = (
    ("validate pass  (= toka validate DIR)", None),
    ("  load      load_specs(DIR)", "validate.load"),
    ("  graph     AgentGraph.build(specs)", "validate.graph"),
    ("  waves     graph.waves()", "validate.waves"),
    ("  = validate pass", "validate.total"),
    ("plan pass  (= toka plan --json DIR)", None),
    ("  load      load_specs(DIR)", "plan.load"),
    ("  graph     AgentGraph.build(specs)", "plan.graph"),
    ("  waves     graph.waves()", "plan.waves"),
    ("  plan-json json.dumps(plan.to_dict())", "plan.json"),
    ("  = plan pass", "plan.total"),
    ("validate + plan  [the target]", "total"),
    ("selection  (= toka plan --json --agent LAST DIR)", None),
    ("  make_plan(DIR, agents=[LAST])", "select.make_plan"),
    ("  plan-json", "select.json"),
    ("  = selection", "select.total"),
    ("floor: read + yaml.load(CSafeLoader), all files", "raw_yaml"),
)


def report(runs: list[Timings], info: dict[str, Any]) -> None:
    def best(key: str) -> float:
        return min(r[key] for r in runs)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    width = 52
    print(f"{'phase':<{width}} {'best s':>8} {'median s':>9}")
    print("-" * (width + 19))
    for label, key in ROWS:
        if key is None:
            print(label)
        else:
            print(f"{label:<{width}} {best(key):>8.3f} {median(key):>9.3f}")
    print("-" * (width + 19))
    load_keys = ("validate.load", "plan.load")
    ratio_best = min(best(k) for k in load_keys) / best("raw_yaml")
    ratio_median = statistics.median(r[k] / r["raw_yaml"] for r in runs for k in load_keys)
    print(f"load_specs / raw yaml: {ratio_best:.2f}x (best vs best), "
          f"{ratio_median:.2f}x (median of per-run ratios)")  # fmt: skip
    per_file_ms = 1000 * min(best(k) for k in load_keys) / info["agents"]
    print(f"load per spec file: {per_file_ms:.2f} ms")
    print("validate+plan per run (s): " + ", ".join(f"{r['total']:.3f}" for r in runs))
    total = best("total")
    verdict = "OK" if total < TARGET_SECONDS else "OVER TARGET"
    print()
    print(f"validate+plan of {info['agents']} specs: {total:.2f} s (target < {TARGET_SECONDS:g} s): "
          f"{verdict}   [median {median('total'):.2f} s]")  # fmt: skip


# -- the removed mechanisms, side by side with the plain loader -----------------------

#: The removed forked parser's rules: in-process below this many files, chunks of 50, at most 8 workers.
FORK_MIN_FILES = 200
_CHUNK = 50


def _parse_chunk(named_texts: list[tuple[str, str]]) -> list[Any]:
    """In a worker: the data of each text (the generated and real specs are all valid)."""
    return [load_yaml(YamlSource(name, text)) for name, text in named_texts]


def forked_plan(paths: Sequence[str | Path]) -> Plan:
    """``make_plan(paths)``, the files parsed in forked workers as the removed parser did."""
    named = [(str(f), read_spec_text(f)) for f in find_spec_files(paths)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, len(named) // (FORK_MIN_FILES // 2), 8)
    if len(named) < FORK_MIN_FILES or workers < 2:
        return make_plan(specs=AgentSpec.from_texts(named))
    chunks = [named[i : i + _CHUNK] for i in range(0, len(named), _CHUNK)]
    specs: list[AgentSpec] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for chunk, parsed in zip(chunks, pool.map(_parse_chunk, chunks)):
            for (name, text), data in zip(chunk, parsed):
                # What AgentSpec.load_texts does with the data of one file (private: this is a bench).
                specs.append(AgentSpec._validate_located(data, YamlSource(name, text)))
    return make_plan(specs=specs)


class SpecCache:
    """The removed spec cache: valid specs remembered by ``(file name, text)``."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], AgentSpec] = {}

    def plan(self, paths: Sequence[str | Path]) -> Plan:
        named = [(str(f), read_spec_text(f)) for f in find_spec_files(paths)]
        new = [key for key in named if key not in self._specs]
        self._specs.update(zip(new, AgentSpec.from_texts(new), strict=True))
        return make_plan(specs=[self._specs[key] for key in named])


def _loads(n: int, paths: Sequence[str | Path], *, cached: bool) -> Callable[[], None]:
    """``n`` plans of ``paths`` in a fresh process, with or without the spec cache."""

    def run() -> None:
        cache = SpecCache()  # a fresh process: nothing remembered yet
        for _ in range(n):
            if cached:
                cache.plan(paths)
            else:
                make_plan(paths)

    return run


#: label, mechanism, plain: each line of the comparison is the per-round ratio of two variants.
COMPARISONS = (
    ("forked parse / in-process, one load", "forked", "plain"),
    ("spec cache / none, one load (validate, plan)", "cache", "plain"),
    ("spec cache / none, two loads (run, as it was)", "cache x2", "plain x2"),
    ("one load passed on / two loads with the cache", "plain", "cache x2"),
)


def compare(rounds: int, workloads: list[tuple[str, list[str], int]]) -> None:
    """Print the removed mechanisms against the plain loader, on each workload.

    In each round every variant runs once (the best of ``inner`` calls, for small
    sets), in an order that rotates from round to round, and each comparison is
    the ratio of two variants of the same round.
    """
    print(f"side by side, {rounds} rounds; ratio = mechanism / plain in each round, and their median "
          f"(< 1: the mechanism is faster)")  # fmt: skip
    width = 50
    print(f"{'workload':<{width}} {'mech. s':>8} {'plain s':>8} {'median':>7}  per round")
    for name, paths, inner in workloads:
        make_plan(paths)  # warm: the first load of a set pays for things a process does once
        variants: dict[str, Callable[[], Any]] = {
            "plain": _loads(1, paths, cached=False),
            "cache": _loads(1, paths, cached=True),
            "plain x2": _loads(2, paths, cached=False),
            "cache x2": _loads(2, paths, cached=True),
        }
        forks = len(find_spec_files(paths)) >= FORK_MIN_FILES
        if forks:
            variants["forked"] = lambda: forked_plan(paths)
        times: dict[str, list[float]] = {key: [] for key in variants}
        keys = list(variants)
        for r in range(rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                gc.collect()
                best = float("inf")
                for _ in range(inner):
                    t0 = time.perf_counter()
                    variants[key]()
                    best = min(best, time.perf_counter() - t0)
                times[key].append(best)
        print(name)
        for label, mechanism, plain in COMPARISONS:
            if mechanism not in times:
                print(f"  {label:<{width - 2}} (fewer than {FORK_MIN_FILES} files: never forked, the same code)")
                continue
            ratios = [m / p for m, p in zip(times[mechanism], times[plain], strict=True)]
            print(f"  {label:<{width - 2}} {statistics.median(times[mechanism]):>8.3f} "
                  f"{statistics.median(times[plain]):>8.3f} {statistics.median(ratios):>7.2f}  "
                  + " ".join(f"{r:.2f}" for r in ratios))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000, help="number of agent specs (default 1000)")
    parser.add_argument("--tasks", type=int, default=10, help="tasks per agent (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; best and median are shown (default 3)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds comparing the removed forked parser and spec cache "
                             "with the plain loader; 0 skips them (default 5)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.agents < 1 or args.tasks < 1 or args.repeat < 1 or args.rounds < 0:
        parser.error("--agents, --tasks and --repeat must be at least 1, --rounds at least 0")

    print(f"plan_scale: {args.agents} agents x {args.tasks} tasks, seed {args.seed}, repeat {args.repeat}, "
          f"rounds {args.rounds}")  # fmt: skip
    print(f"python {platform.python_version()}, pydantic {pydantic.VERSION}, PyYAML {yaml.__version__} "
          f"(libyaml: {yaml.__with_libyaml__}), {platform.machine()}")  # fmt: skip
    print(f"import toka (once, not timed below): {IMPORT_SECONDS:.3f} s")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cores: {cores}")

    with tempfile.TemporaryDirectory(prefix="toka-plan-scale-") as tmp:
        t0 = time.perf_counter()
        files, stats = generate(Path(tmp), args.agents, args.tasks, args.seed)
        print(f"generated {len(files)} specs in {time.perf_counter() - t0:.2f} s (not timed below): "
              f"{stats['bytes'] / 1024:.0f} KiB of YAML, {stats['required']} required + "
              f"{stats['optional']} optional edges, {stats['list_shaped']} files with list-of-maps "
              f"dependencies (the rest plain maps), last agent {stats['last']!r}")  # fmt: skip
        paths = [tmp]
        found = find_spec_files(paths)  # the same files, for the raw-yaml floor
        assert len(found) == len(files)

        runs: list[Timings] = []
        info: dict[str, Any] = {}
        for _ in range(args.repeat):
            gc.collect()
            timings, info = one_run(paths, found, stats["last"])
            runs.append(timings)

        # Not timed: the phased plan, and the plans of the removed mechanisms, are the very plan make_plan builds.
        expected = json.dumps(make_plan(paths).to_dict())
        assert expected == info["json"], "phased plan differs from make_plan"
        if args.rounds:
            assert json.dumps(forked_plan(paths).to_dict()) == expected, "forked plan differs from make_plan"
            cache = SpecCache()
            assert json.dumps(cache.plan(paths).to_dict()) == json.dumps(cache.plan(paths).to_dict()) == expected

        print(f"plan: {info['agents']} agents in {info['waves']} waves, {info['edges']} edges kept, "
              f"{info['dropped']} dropped, {info['warnings']} warnings; selection of {stats['last']!r}: "
              f"{info['sel_agents']} agents in {info['sel_waves']} waves")  # fmt: skip
        print()
        report(runs, info)
        if args.rounds:
            print()
            # Small sets: a round is the best of several calls, or it is a few milliseconds of noise.
            compare(args.rounds, [
                (f"generated ({len(found)} files)", paths, 1),
                ("tests/data/toka-specs (9 files)", [str(_ROOT / "tests" / "data" / "toka-specs")], 20),
                ("agent_specs (5 files)", [str(_ROOT / "agent_specs")], 20),
            ])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
