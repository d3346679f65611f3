"""A plan: the agents a run will execute, in which waves, under which limits.

:meth:`Plan.to_dict` is the stable machine-readable form printed by
``toka plan --json``; its layout is documented in the README and versioned by
the ``format`` field, which changes only when a field is removed or changes
meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .capabilities import capability_status
from .errors import ConfigError, GraphError, Problem, SpecError
from .graph import AgentGraph, Edge
from .spec import AgentSpec
from .specset import DEFAULT_SPEC_DIR, load_spec_set

__all__ = ["PLAN_FORMAT", "Plan", "make_plan"]

PLAN_FORMAT = "toka-plan/1"


@dataclass(frozen=True)
class Plan:
    """The selected subgraph with its waves, plus the warnings met on the way."""

    graph: AgentGraph
    waves: list[list[str]]

    @property
    def order(self) -> list[str]:
        """Agents in run order (the waves, flattened)."""
        return [name for wave in self.waves for name in wave]

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return self.graph.warnings

    def wave_of(self, name: str) -> int:
        """1-based wave number of ``name``."""
        return next(i for i, wave in enumerate(self.waves, 1) if name in wave)

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON form (``toka plan --json``)."""
        return {
            "format": PLAN_FORMAT,
            "agents": [self._agent_dict(name) for name in self.order],
            "waves": self.waves,
            "order": self.order,
            "edges": [_edge_dict(e) for e in self.graph.edges],
            "dropped_edges": [_edge_dict(e) for e in self.graph.dropped],
            "warnings": [_problem_dict(p) for p in self.warnings],
        }

    def _agent_dict(self, name: str) -> dict[str, Any]:
        spec = self.graph.agents[name]
        return {
            "name": name,
            "title": spec.spec.name,
            "source": spec.source,
            "priority": spec.priority,
            "domain": spec.spec.domain,
            "workstream": spec.metadata.workstream,
            "wave": self.wave_of(name),
            "tasks": len(spec.tasks.default),
            "conditional_tasks": {k: len(v) for k, v in spec.tasks.conditional.items()},
            "requires": self.graph.upstream(name, "required"),
            "optional": self.graph.upstream(name, "optional"),
            "capabilities": list(spec.security.capabilities_required),
            "capability_status": {c: capability_status(c) for c in spec.security.capabilities_required},
            "sandbox": spec.security.sandbox,
            "limits": limits_dict(spec),
        }


def limits_dict(spec: AgentSpec) -> dict[str, float | int | None]:
    """Resource limits as plain numbers in base units (None when not set)."""
    lim = spec.security.resource_limits
    return {
        "timeout_seconds": lim.timeout.seconds,
        "max_memory_bytes": lim.max_memory.bytes if lim.max_memory else None,
        "max_cpu_percent": lim.max_cpu.percent if lim.max_cpu else None,
        "max_disk_usage_bytes": lim.max_disk_usage.bytes if lim.max_disk_usage else None,
        "max_network_bandwidth_bps": (
            lim.max_network_bandwidth.bits_per_second if lim.max_network_bandwidth else None
        ),
        "max_processes": lim.max_processes,
    }


def limits_text(spec: AgentSpec) -> str:
    """Resource limits as the user wrote them, for one-line displays."""
    lim = spec.security.resource_limits
    parts = [f"timeout {lim.timeout}"]
    for label, value in (
        ("memory", lim.max_memory),
        ("cpu", lim.max_cpu),
        ("disk", lim.max_disk_usage),
        ("network", lim.max_network_bandwidth),
        ("processes", lim.max_processes),
    ):
        if value is not None:
            parts.append(f"{label} {value}")
    return ", ".join(parts)


def _edge_dict(edge: Edge) -> dict[str, str]:
    return {"from": edge.dependency, "to": edge.dependent, "kind": edge.kind, "reason": edge.reason}


def _problem_dict(problem: Problem) -> dict[str, Any]:
    return {
        "source": problem.source,
        "line": problem.line,
        "field": problem.field,
        "message": problem.message,
    }


def check_contexts(plan: Plan, contexts: Iterable[str]) -> None:
    """Refuse a context no selected agent has tasks for: misspelt, it would run no conditional
    task and say nothing.

    Raises:
        ConfigError: naming the contexts the agents do have.
    """
    known = sorted({c for spec in plan.graph.agents.values() for c in spec.tasks.conditional})
    unknown = [c for c in contexts if c not in known]
    if unknown:
        have = f"they have: {', '.join(known)}" if known else "they have no conditional tasks"
        raise ConfigError(f"context {', '.join(map(repr, unknown))}: no selected agent has tasks for it ({have})")


def make_plan(
    paths: Iterable[str | Path] = (DEFAULT_SPEC_DIR,),
    *,
    agents: Sequence[str] = (),
    specs: Iterable[AgentSpec] | None = None,
    partial: bool = False,
) -> Plan:
    """Load specs (or take ``specs``), build the graph, select ``agents`` and order them.

    Every problem comes out in one pass: when some files do not load, the graph of the
    ones that do is still checked and its problems are reported with theirs.
    ``partial``: the files are some of a set (see :meth:`AgentGraph.build`).

    Raises:
        SpecError: a spec file is malformed (with the graph's problems, if any).
        GraphError: the specs do not form a runnable graph, or a selected
            agent is unknown.
    """
    problems: list[Problem] = []
    if specs is None:
        specs, problems = load_spec_set(paths)
    try:
        graph = AgentGraph.build(specs, partial=partial)
        if agents and not problems:  # an agent of a file that did not load is not unknown
            graph = graph.select(agents)
    except GraphError as e:
        if not problems:
            raise
        problems += e.problems
    if problems:
        raise SpecError(problems)
    return Plan(graph=graph, waves=graph.waves())
