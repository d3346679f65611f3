"""The one exception tree of the project.

Every error raised on purpose derives from :class:`TokaError`; the CLI turns
it into readable lines, never a traceback, and exits with the class's
``exit_code``::

    TokaError                  exit 1 unless marked "exit 2"
    ├── SpecError              a spec file (or several) is malformed (exit 2)
    ├── GraphError             the set of specs does not form a runnable graph (exit 2)
    │   ├── DuplicateAgentError
    │   ├── UnknownAgentError
    │   └── DependencyCycleError
    ├── ConfigError            a run option or setting is unusable (exit 2)
    ├── ModelError             the model provider failed
    │   ├── ModelTimeoutError      no answer within the request timeout (retryable)
    │   ├── TransientModelError    429, 529, 5xx, dropped connection (retryable)
    │   ├── ModelRetriesExhausted  transient failures outlasted their retries (final)
    │   └── PermanentModelError    bad request, authentication, permission
    │       ├── ProviderAccessError    key rejected, no permission, no such model (fatal)
    │       └── ContextOverflowError   the prompt is longer than the context window
    ├── StepError              the LLM-assisted loop could not finish a task
    │   ├── NoResultError          the model stopped without submitting a result
    │   ├── TurnLimitError         the task used all its turns
    │   ├── InvalidToolInputError  the model kept sending malformed input (retryable)
    │   └── TaskReportedFailure    the model submitted status failed/blocked
    ├── ReplayDiverged         a task's journal stopped matching after edits: it starts over
    ├── ToolError              a tool could not run
    │   ├── Refusal                a decision, not a failure: goes back to the model
    │   │   ├── CommandRefused         no declared capability allows the command
    │   │   ├── ApprovalDenied         a use needing approval was denied or not approved
    │   │   ├── SandboxRefused         the host cannot enforce a declared limit
    │   │   ├── PathRefused            a path outside what the workspace allows
    │   │   └── LimitRefused           a write past the size of one write or max_disk_usage
    │   ├── ToolTimeoutError       a tool process outlived its timeout and was killed
    │   └── SandboxViolation       a command changed what it may never change (fatal)
    ├── BudgetExceededError    a token budget is spent
    ├── BranchError            the run's git branches cannot be made, merged or applied
    │   └── MergeConflictError     two changes touch the same lines (names the files)
    └── RunFailedError         a run ended Failed; carries its report
        ├── AgentFailedError       one agent
        └── PipelineFailedError    the pipeline (some agent failed)

``exit_code`` says whose fault it is: 2 for bad input only (:class:`SpecError`,
:class:`GraphError` and its subclasses, :class:`ConfigError`: fix the specs or
the options), 1 for everything else (a run that started and failed).

``retryable`` on each class tells Prefect's ``retry_condition_fn`` whether
re-running the whole task can help; permanent errors are never retried.
``fatal`` says the whole run must stop.

:class:`SandboxViolation` is not a :class:`Refusal`: a refusal stops a call
before it runs and the model is told why; a violation is found after a command
ran, is undone, and stops the run (the model is not asked to carry on).

Errors carry a list of :class:`Problem` so that several defects found in one
pass are reported together. They pickle (Prefect ships exceptions between
processes): ``args`` holds exactly what ``__init__`` takes positionally, and
the declared fields (``usage``, ``attempt``, ``carried``, ``command_usage``) are
plain instance attributes, which pickle restores with the instance's
``__dict__``. Set them at construction or by assignment on an existing error
(``e.usage = ...``); never attach undeclared attributes.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the model module imports pydantic; errors stay importable without it
    from .model import Usage

__all__ = [
    "AgentFailedError",
    "ApprovalDenied",
    "BranchError",
    "BudgetExceededError",
    "CommandRefused",
    "ConfigError",
    "ContextOverflowError",
    "DependencyCycleError",
    "DuplicateAgentError",
    "GraphError",
    "InvalidToolInputError",
    "LimitRefused",
    "MergeConflictError",
    "ModelError",
    "ModelRetriesExhausted",
    "ModelTimeoutError",
    "NoResultError",
    "PathRefused",
    "PermanentModelError",
    "PipelineFailedError",
    "Problem",
    "ProviderAccessError",
    "Refusal",
    "ReplayDiverged",
    "RunFailedError",
    "SandboxRefused",
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


#: Characters a terminal acts on instead of showing (besides C0/C1 controls): line separators, and
#: the bidirectional overrides that reorder what follows them.
_INVISIBLE = frozenset("\u2028\u2029\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def has_control(text: str) -> bool:
    """Whether ``text`` holds a character a terminal would act on rather than show."""
    return any(c in _INVISIBLE or unicodedata.category(c) == "Cc" for c in text)


def printable(text: str) -> str:
    """``text`` with every control character escaped as Python writes it (``\\x1b``, ``\\n``).

    Names from a spec file (a key, a file name) are printed on a terminal: raw, an escape
    sequence could colour, hide or overwrite the rest of a line, and a newline forge one.
    """
    if not has_control(text):
        return text
    return "".join(repr(c)[1:-1] if c in _INVISIBLE or unicodedata.category(c) == "Cc" else c for c in text)


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
            source = printable(self.source)
            where = source if self.line is None else f"{source}:{self.line}"
            where += ": "
        field = f"{printable(self.field)}: " if self.field else ""
        return f"{where}{field}{self.message}"


class TokaError(Exception):
    """Root of every error this project raises on purpose."""

    #: Whether re-running the whole Prefect task may succeed.
    retryable: bool = False
    #: Whether the whole run must stop: no other task could succeed either.
    fatal: bool = False
    #: The CLI's exit status: 2 for bad input (specs, graph, options), 1 for a run that failed.
    exit_code: int = 1

    def __init__(
        self, problems: Iterable[Problem] | str, *, usage: Usage | None = None, attempt: int | None = None
    ) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        problems = tuple(problems)
        super().__init__(problems)
        self.problems: tuple[Problem, ...] = problems
        #: Tokens the failed attempt (or every attempt so far) spent, for reports; None if unknown.
        self.usage: Usage | None = usage
        #: Which attempt of the Prefect task raised it (1-based), for reports; None if unknown.
        self.attempt: int | None = attempt
        #: Tokens paid in an earlier process for the steps this task replayed from its journal
        #: (spent, not charged again), for reports; None if unknown.
        self.carried: Usage | None = None

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class SpecError(TokaError):
    """One or more spec files are malformed (syntax, fields, values)."""

    exit_code = 2


class GraphError(TokaError):
    """The specs are individually valid but do not form a runnable graph."""

    exit_code = 2


class DuplicateAgentError(GraphError):
    """Two spec files declare the same ``metadata.name``."""


class UnknownAgentError(GraphError):
    """A required dependency or a selected agent names no known agent."""


class DependencyCycleError(GraphError):
    """Required dependencies form a cycle, so no agent in it can start."""


class ConfigError(TokaError):
    """A run option, environment variable or setting is unusable."""

    exit_code = 2


class ModelError(TokaError):
    """The model provider failed; subclasses say whether trying again can help."""


class ModelTimeoutError(ModelError):
    """The model did not answer within the request timeout."""

    retryable = True


class TransientModelError(ModelError):
    """Rate limited, overloaded, a server error or a dropped connection.

    ``retry_after`` is the seconds the provider asked to wait (its ``retry-after``
    header), or None; the provider's retry loop honours it.
    """

    retryable = True

    def __init__(
        self,
        problems: Iterable[Problem] | str,
        *,
        retry_after: float | None = None,
        usage: Usage | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(problems, usage=usage, attempt=attempt)
        self.retry_after: float | None = retry_after


class ModelRetriesExhausted(ModelError):
    """Transient failures went on after every attempt the provider's retry policy allows.

    Not retryable: the provider already owned those retries, and a Prefect
    retry on top would multiply the attempts.
    """


class PermanentModelError(ModelError):
    """Invalid request, authentication or permission failure: fix the cause, do not retry."""


class ContextOverflowError(PermanentModelError):
    """The prompt is longer than the model's context window (400 "prompt is too long").

    The step loop compacts the conversation once and sends the request again; only a
    compacted request that is still too long fails the task.
    """


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


class ReplayDiverged(TokaError):
    """A task's recorded turns stopped matching its requests (a setting or the spec changed) after
    recorded tool calls had changed files: going on live would do those changes again on top of
    themselves. The attempt's edits are set aside and the task starts over (:mod:`toka.llm_step`)."""


class TaskReportedFailure(StepError):
    """The model submitted a result whose status is ``failed`` or ``blocked``."""


class ToolError(TokaError):
    """A tool could not run at all (a :class:`Refusal` is returned to the model instead)."""


class Refusal(ToolError):
    """A refusal is a decision, not a failure.

    A check (capability, approval, sandbox, path) decided that a call may not run. The
    Toolbox returns the reason to the model as the call's tool result, audits the call
    with decision ``refused``, and nobody retries it: the same call would be refused again.
    """

    retryable = False
    fatal = False
    detail: str = ""
    """More for the model than the reason the audit records (what a refused command printed)."""


class CommandRefused(Refusal):
    """The command is not allowed for this agent; the model is told why."""


class ApprovalDenied(Refusal):
    """A use that needs approval was denied, or nobody approved it; the model is told why."""


class SandboxRefused(Refusal):
    """The host cannot enforce a limit the spec declares, so the command may not run."""


class PathRefused(Refusal):
    """A tool was asked for a path outside what the workspace allows; the model is told why."""


class LimitRefused(Refusal):
    """A write would go past a limit (the size of one write, the spec's ``max_disk_usage``)."""


class ToolTimeoutError(ToolError):
    """A tool's process outlived its timeout; its whole process group was killed.

    ``command_usage`` is what the command used before it was killed (the sandbox's
    ``CommandUsage``), for the audit trail; None when nothing measured it.
    """

    retryable = True

    def __init__(
        self,
        problems: Iterable[Problem] | str,
        *,
        command_usage: object | None = None,
        usage: Usage | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(problems, usage=usage, attempt=attempt)
        #: The sandbox's ``CommandUsage`` (typed loosely: the sandbox imports this module).
        self.command_usage: object | None = command_usage


class SandboxViolation(ToolError):
    """A command changed what no command may change (the workspace's git hooks or configuration).

    The change is undone before this is raised, and the whole run stops: whatever made the
    agent try (a prompt injection in a file it read) may still be in its context. Not a
    :class:`Refusal`: the command already ran, and the Toolbox re-raises this instead of
    handing it to the model.
    """

    fatal = True

    def __init__(
        self,
        problems: Iterable[Problem] | str,
        paths: Iterable[str] = (),
        *,
        usage: Usage | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(problems, usage=usage, attempt=attempt)
        self.paths: list[str] = list(paths)
        self.args = (self.problems, self.paths)


class BudgetExceededError(TokaError):
    """A token budget is spent; no further model request may start.

    ``scope`` is ``task``, ``agent`` or ``pipeline``.
    """

    def __init__(
        self,
        problems: Iterable[Problem] | str,
        scope: str = "",
        *,
        usage: Usage | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(problems, usage=usage, attempt=attempt)
        self.args = (self.problems, scope)
        self.scope = scope


class BranchError(TokaError):
    """The run's git branches or worktrees cannot be made, merged, applied or removed."""


class MergeConflictError(BranchError):
    """Merging two branches conflicts; ``files`` are the conflicting paths."""

    def __init__(self, problems: Iterable[Problem] | str, files: Iterable[str] = ()) -> None:
        super().__init__(problems)
        self.files: tuple[str, ...] = tuple(files)
        self.args = (self.problems, self.files)


class RunFailedError(TokaError):
    """A flow run ended Failed; ``report`` holds what it did before that.

    Raised from flows so that Prefect marks the run Failed while the report
    still reaches the caller (the exception is the run's persisted result).
    """

    #: The most characters ``str()`` gives: it is a run's state message in the Prefect UI.
    MAX_LINE = 300

    def __init__(
        self,
        problems: Iterable[Problem] | str,
        report: object = None,
        *,
        usage: Usage | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(problems, usage=usage, attempt=attempt)
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
