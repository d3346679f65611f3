"""The dependency graph of a set of agents: validation, selection and run order.

Required edges must complete first, and a failure upstream stops the agents
below. Optional edges only order two agents that are both in the run; one
that would close a cycle is dropped with a warning, so optional links can
never make a set of specs unrunnable.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from typing import Literal

from .errors import DependencyCycleError, DuplicateAgentError, Problem, UnknownAgentError
from .spec import PRIORITIES, AgentSpec

__all__ = ["AgentGraph", "Edge"]


@dataclass(frozen=True, slots=True)
class Edge:
    """``dependency`` runs before ``dependent``."""

    dependency: str
    dependent: str
    kind: Literal["required", "optional"]
    reason: str = ""


def _known_list(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _unknown_message(name: str, known: Iterable[str], what: str, *, dependent: str | None = None) -> str:
    known = list(known)
    # The agent itself is never the one meant: depending on itself would be a cycle.
    close = difflib.get_close_matches(name, [k for k in known if k != dependent], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {what} {name!r}; {hint}known agents: {_known_list(known)}"


class AgentGraph:
    """Agents keyed by name, with the edges that order them.

    Build one with :meth:`build`; it is immutable afterwards, and
    :meth:`select` returns a new graph for a subset of agents.
    """

    def __init__(
        self,
        agents: Mapping[str, AgentSpec],
        edges: Iterable[Edge],
        *,
        warnings: Iterable[Problem] = (),
        dropped: Iterable[Edge] = (),
    ) -> None:
        self.agents: dict[str, AgentSpec] = dict(sorted(agents.items()))
        self.edges: tuple[Edge, ...] = tuple(
            sorted(edges, key=lambda e: (e.dependent, e.kind != "required", e.dependency))
        )
        self.warnings: tuple[Problem, ...] = tuple(warnings)
        self.dropped: tuple[Edge, ...] = tuple(dropped)
        self._upstream: dict[str, list[Edge]] = {name: [] for name in self.agents}
        for edge in self.edges:
            self._upstream[edge.dependent].append(edge)

    # -- building -----------------------------------------------------------

    @classmethod
    def build(cls, specs: Iterable[AgentSpec], *, partial: bool = False) -> AgentGraph:
        """Check names and dependencies of ``specs`` and order them.

        ``partial`` says the specs are only some files of a set (``toka validate a.yaml``):
        a required dependency on an agent not among them is then a warning, not an error.

        Raises:
            DuplicateAgentError: two files declare one name.
            UnknownAgentError: a required dependency names no agent in the set.
            DependencyCycleError: required dependencies form a cycle.
        """
        agents: dict[str, AgentSpec] = {}
        duplicates: list[Problem] = []
        for spec in specs:
            first = agents.get(spec.name)
            if first is not None:
                duplicates.append(
                    Problem(
                        f"agent {spec.name!r} is already defined in {first.source or '<string>'}",
                        source=spec.source,
                        line=spec.line_of("metadata", "name"),
                        field="metadata.name",
                    )
                )
                continue
            agents[spec.name] = spec
        if duplicates:
            raise DuplicateAgentError(duplicates)

        unknown: list[Problem] = []
        warnings: list[Problem] = [w for spec in agents.values() for w in spec.warnings]
        required: list[Edge] = []
        optional: list[Edge] = []
        for name, spec in sorted(agents.items()):
            for kind, deps in (
                ("required", spec.dependencies.required),
                ("optional", spec.dependencies.optional),
            ):
                for dep, reason in deps.items():
                    if kind == "optional" and dep in spec.dependencies.required:
                        warnings.append(
                            Problem(
                                f"{dep!r} is both a required and an optional dependency; "
                                "it is treated as required",
                                source=spec.source,
                                line=spec.line_of("dependencies", "optional", dep),
                                field="dependencies.optional",
                                level="warning",
                            )
                        )
                        continue
                    if dep in agents:
                        (required if kind == "required" else optional).append(
                            Edge(dep, name, kind, reason)  # type: ignore[arg-type]
                        )
                        continue
                    fatal = kind == "required" and not partial
                    problem = Problem(
                        _unknown_message(dep, agents, f"{kind} dependency", dependent=name)
                        + ("" if kind == "required" else " (ignored)")
                        + (" (not among the files named; check the whole set with `toka validate "
                           "DIRECTORY`)" if kind == "required" and partial else ""),
                        source=spec.source,
                        line=spec.line_of("dependencies", kind, dep),
                        field=f"dependencies.{kind}",
                        level="error" if fatal else "warning",
                    )
                    (unknown if fatal else warnings).append(problem)
        if unknown:
            raise UnknownAgentError(unknown)

        deps_of: dict[str, list[str]] = {name: [] for name in agents}
        for edge in required:
            deps_of[edge.dependent].append(edge.dependency)
        cycles = _find_cycles(deps_of)
        if cycles:
            raise DependencyCycleError(
                Problem(
                    "required dependencies form a cycle: " + " -> ".join(cycle),
                    source=agents[cycle[0]].source,
                    line=agents[cycle[0]].line_of("dependencies", "required", cycle[1]),
                    field="dependencies.required",
                )
                for cycle in cycles
            )

        kept, dropped = _add_optional_edges(deps_of, optional)
        for edge in dropped:
            spec = agents[edge.dependent]
            warnings.append(
                Problem(
                    f"optional dependency {edge.dependency!r} would close a cycle; "
                    "this ordering is dropped",
                    source=spec.source,
                    line=spec.line_of("dependencies", "optional", edge.dependency),
                    field="dependencies.optional",
                    level="warning",
                )
            )
        return cls(agents, required + kept, warnings=warnings, dropped=dropped)

    # -- querying -----------------------------------------------------------

    def upstream(self, name: str, kind: Literal["required", "optional"] | None = None) -> list[str]:
        """The agents ``name`` waits for (optionally of one kind), sorted."""
        return sorted(e.dependency for e in self._upstream[name] if kind in (None, e.kind))

    def select(self, names: Iterable[str]) -> AgentGraph:
        """The subgraph needed to run ``names``: each with its required dependencies, transitively.

        Optional dependencies join only when they are selected themselves (or
        pulled in as someone's required dependency).

        Raises:
            UnknownAgentError: a name is not in the graph.
        """
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in self.agents]
        if missing:
            raise UnknownAgentError(
                Problem(_unknown_message(n, self.agents, "agent"), field="--agent") for n in missing
            )
        chosen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in chosen:
                chosen.add(name)
                todo.extend(self.upstream(name, "required"))
        return AgentGraph(
            {n: self.agents[n] for n in chosen},
            (e for e in self.edges if e.dependent in chosen and e.dependency in chosen),
            warnings=self.warnings,
            dropped=self.dropped,
        )

    def waves(self) -> list[list[str]]:
        """Groups of agents that may run together, in order.

        Each agent is in the first wave after all its (kept) dependencies;
        within a wave, agents are sorted by priority, then name.
        """
        sorter = TopologicalSorter({name: [e.dependency for e in edges] for name, edges in self._upstream.items()})
        sorter.prepare()  # no CycleError: build() refuses required cycles and drops optional edges closing one
        waves: list[list[str]] = []
        while sorter.is_active():
            wave = sorted(sorter.get_ready(), key=self.sort_key)
            sorter.done(*wave)  # all of a wave at once: what is ready next is the next wave
            waves.append(wave)
        return waves

    def order(self) -> list[str]:
        """One deterministic run order: the waves, flattened."""
        return [name for wave in self.waves() for name in wave]

    def sort_key(self, name: str) -> tuple[int, str]:
        """Priority first (critical before low), then name."""
        return PRIORITIES.index(self.agents[name].priority), name

    def __len__(self) -> int:
        return len(self.agents)

    def __contains__(self, name: object) -> bool:
        return name in self.agents


def _find_cycles(deps_of: Mapping[str, list[str]]) -> list[list[str]]:
    """Every distinct cycle found by a depth-first walk, as ``[a, b, ..., a]``.

    Iterative, so a long chain of agents cannot hit the recursion limit.
    """
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for root in sorted(deps_of):
        if root in state:
            continue
        path: list[str] = [root]
        iters = [iter(sorted(deps_of[root]))]
        state[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    cycles.append(cycle)
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(deps_of[nxt])))
    return cycles


def _add_optional_edges(
    deps_of: dict[str, list[str]], optional: list[Edge]
) -> tuple[list[Edge], list[Edge]]:
    """Add optional orderings that keep the graph acyclic; return (kept, dropped).

    Usually no optional edge closes a cycle, and one topological sort of the
    whole graph proves it. Only when it does not are edges added one by one,
    each checked for a path back, so the edges dropped are deterministic.
    """
    ordered = sorted(optional, key=lambda e: (e.dependent, e.dependency))
    trial = {name: [*deps] for name, deps in deps_of.items()}
    for edge in ordered:
        trial[edge.dependent].append(edge.dependency)
    if _acyclic(trial):
        deps_of.update(trial)
        return ordered, []
    kept: list[Edge] = []
    dropped: list[Edge] = []
    for edge in ordered:
        if edge.dependency == edge.dependent or _depends_on(deps_of, edge.dependency, edge.dependent):
            dropped.append(edge)
            continue
        deps_of[edge.dependent].append(edge.dependency)
        kept.append(edge)
    return kept, dropped


def _acyclic(deps_of: Mapping[str, list[str]]) -> bool:
    try:
        TopologicalSorter(deps_of).prepare()
    except CycleError:
        return False
    return True


def _depends_on(deps_of: Mapping[str, list[str]], start: str, target: str) -> bool:
    """Whether ``start`` waits, directly or not, for ``target``."""
    seen = {start}
    todo = [start]
    while todo:
        for dep in deps_of[todo.pop()]:
            if dep == target:
                return True
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return False
