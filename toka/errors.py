"""The one exception tree of the project.

Every error a user can cause with bad input derives from :class:`TokaError`;
the CLI turns it into readable lines and exit code 2, never a traceback::

    TokaError
    ├── SpecError              a spec file (or several) is malformed
    ├── GraphError             the set of specs does not form a runnable graph
    │   ├── DuplicateAgentError
    │   ├── UnknownAgentError
    │   └── DependencyCycleError
    ├── ConfigError            a run option or setting is unusable
    ├── ModelError             the model provider failed
    │   ├── ModelTimeoutError      no answer within the request timeout (retryable)
    │   ├── TransientModelError    429, 529, 5xx, dropped connection (retryable)
    │   ├── ModelRetriesExhausted  transient failures outlasted their retries (final)
    │   └── PermanentModelError    bad request, authentication, permission
    │       └── ProviderAccessError    key rejected, no permission, no such model (fatal)
    ├── StepError              the LLM-assisted loop could not finish a task
    │   ├── NoResultError          the model stopped without submitting a result
    │   ├── TurnLimitError         the task used all its turns
    │   ├── InvalidToolInputError  the model kept sending malformed input (retryable)
    │   └── TaskReportedFailure    the model submitted status failed/blocked
    ├── ToolError              a tool could not run (refusals go back to the model)
    │   ├── ToolTimeoutError       a tool process outlived its timeout and was killed
    │   └── SandboxViolation       a command changed what it may never change (fatal)
    ├── BudgetExceededError    a token budget is spent
    └── RunFailedError         a run ended Failed; carries its report
        ├── AgentFailedError       one agent
        └── PipelineFailedError    the pipeline (some agent failed)

``retryable`` on each class tells Prefect's ``retry_condition_fn`` whether
re-running the whole task can help; permanent errors are never retried.

Errors carry a list of :class:`Problem` so that several defects found in one
pass are reported together. They pickle (Prefect ships exceptions between
processes), because ``args`` holds exactly what ``__init__`` takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AgentFailedError",
    "BudgetExceededError",
    "ConfigError",
    "DependencyCycleError",
    "DuplicateAgentError",
    "GraphError",
    "InvalidToolInputError",
    "ModelError",
    "ModelRetriesExhausted",
    "ModelTimeoutError",
    "NoResultError",
    "PermanentModelError",
    "PipelineFailedError",
    "Problem",
    "ProviderAccessError",
    "RunFailedError",
    "SandboxViolation",
    "SpecError",
    "StepError",
    "TaskReportedFailure",
    "TokaError",
    "ToolError",
    "ToolTimeoutError",
    "TransientModelError",
    "TurnLimitError",
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

    #: Whether re-running the whole Prefect task may succeed.
    retryable: bool = False
    #: Whether the whole run must stop: no other task could succeed either.
    fatal: bool = False

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


class ConfigError(TokaError):
    """A run option, environment variable or setting is unusable."""


class ModelError(TokaError):
    """The model provider failed; subclasses say whether trying again can help."""


class ModelTimeoutError(ModelError):
    """The model did not answer within the request timeout."""

    retryable = True


class TransientModelError(ModelError):
    """Rate limited, overloaded, a server error or a dropped connection."""

    retryable = True


class ModelRetriesExhausted(ModelError):
    """Transient failures went on after every attempt the provider's retry policy allows.

    Not retryable: the provider already owned those retries, and a Prefect
    retry on top would multiply the attempts.
    """


class PermanentModelError(ModelError):
    """Invalid request, authentication or permission failure: fix the cause, do not retry."""


class ProviderAccessError(PermanentModelError):
    """Every request would fail: the credentials were rejected, access refused, or the model does not exist."""

    fatal = True


class StepError(TokaError):
    """The LLM-assisted loop could not produce a result for a task."""


class NoResultError(StepError):
    """The model stopped without calling ``submit_result``, even after a reminder."""


class TurnLimitError(StepError):
    """The task used its whole turn budget without submitting a result."""


class InvalidToolInputError(StepError):
    """The model kept sending input that does not match a tool's schema."""

    retryable = True


class TaskReportedFailure(StepError):
    """The model submitted a result whose status is ``failed`` or ``blocked``."""


class ToolError(TokaError):
    """A tool could not run at all (refusals are returned to the model instead)."""


class ToolTimeoutError(ToolError):
    """A tool's process outlived its timeout; its whole process group was killed."""

    retryable = True


class SandboxViolation(ToolError):
    """A command changed what no command may change (the workspace's git hooks or configuration).

    The change is undone before this is raised, and the whole run stops: whatever made the
    agent try (a prompt injection in a file it read) may still be in its context.
    """

    fatal = True

    def __init__(self, problems: Iterable[Problem] | str, paths: Iterable[str] = ()) -> None:
        super().__init__(problems)
        self.paths: list[str] = list(paths)
        self.args = (self.problems, self.paths)


class BudgetExceededError(TokaError):
    """A token budget is spent; no further model request may start.

    ``scope`` is ``task``, ``agent`` or ``pipeline``.
    """

    def __init__(self, problems: Iterable[Problem] | str, scope: str = "") -> None:
        super().__init__(problems)
        self.args = (self.problems, scope)
        self.scope = scope


class RunFailedError(TokaError):
    """A flow run ended Failed; ``report`` holds what it did before that.

    Raised from flows so that Prefect marks the run Failed while the report
    still reaches the caller (the exception is the run's persisted result).
    """

    #: The most characters ``str()`` gives: it is a run's state message in the Prefect UI.
    MAX_LINE = 300

    def __init__(self, problems: Iterable[Problem] | str, report: object = None) -> None:
        super().__init__(problems)
        self.args = (self.problems, report)
        self.report = report

    def __str__(self) -> str:
        """One short line (whitespace collapsed, cut at :attr:`MAX_LINE`); the report holds the detail."""
        line = " ".join(super().__str__().split())
        return line if len(line) <= self.MAX_LINE else line[: self.MAX_LINE - 3].rstrip() + "..."


class AgentFailedError(RunFailedError):
    """An agent ended Failed (a critical or high task failed, or it timed out)."""


class PipelineFailedError(RunFailedError):
    """At least one agent of the pipeline failed or could not run; ``report`` is the summary."""
