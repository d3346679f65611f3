"""The one exception tree of the project.

Every error a user can cause with bad input derives from :class:`TokaError`;
the CLI turns it into readable lines and exit code 2, never a traceback::

    TokaError
    ├── SpecError          a spec file (or several) is malformed
    └── GraphError         the set of specs does not form a runnable graph
        ├── DuplicateAgentError
        ├── UnknownAgentError
        └── DependencyCycleError

Errors carry a list of :class:`Problem` so that several defects found in one
pass are reported together. They pickle (Prefect ships exceptions between
processes), because ``args`` holds exactly what ``__init__`` takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DependencyCycleError",
    "DuplicateAgentError",
    "GraphError",
    "Problem",
    "SpecError",
    "TokaError",
    "UnknownAgentError",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One located defect or warning: where it is and what is wrong.

    Attributes:
        message: What is wrong, naming the bad value with ``!r``.
        source: The file it came from, as the user named it (None for dicts).
        line: 1-based line in ``source`` when the YAML gives one.
        field: Dotted field path, e.g. ``security.resource_limits.max_cpu``.
        level: ``error`` stops the run; ``warning`` is reported and ignored.
    """

    message: str
    source: str | None = None
    line: int | None = None
    field: str | None = None
    level: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = ""
        if self.source is not None:
            where = self.source if self.line is None else f"{self.source}:{self.line}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"


class TokaError(Exception):
    """Root of every error this project raises on purpose."""

    def __init__(self, problems: Iterable[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        problems = tuple(problems)
        super().__init__(problems)
        self.problems: tuple[Problem, ...] = problems

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class SpecError(TokaError):
    """One or more spec files are malformed (syntax, fields, values)."""


class GraphError(TokaError):
    """The specs are individually valid but do not form a runnable graph."""


class DuplicateAgentError(GraphError):
    """Two spec files declare the same ``metadata.name``."""


class UnknownAgentError(GraphError):
    """A required dependency or a selected agent names no known agent."""


class DependencyCycleError(GraphError):
    """Required dependencies form a cycle, so no agent in it can start."""
