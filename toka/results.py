"""What runs produce: the structured task result, per-task outcomes, agent and pipeline reports.

:class:`TaskResult` is the input schema of the ``submit_result`` tool, so a
task's success is decided by what the model submits, never by words in its
free text. :meth:`PipelineSummary.to_dict` is the stable ``--json`` form.

What the model submits is text it chose, so it may hold a secret it read:
the step loop redacts a result once, when the model submits it
(:meth:`TaskResult.redacted`), and the writers of the ``--json`` summary,
reports and events redact what they write again.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .branches import AgentChanges, RunChanges
from .model import Usage
from .redact import redact_data, secret_values
from .spec import Priority

__all__ = [
    "COMPLETED_STATES",
    "SUMMARY_FORMAT",
    "AgentCalls",
    "AgentReport",
    "AgentRunOutcome",
    "AgentState",
    "PipelineState",
    "PipelineSummary",
    "TaskCalls",
    "TaskOutcome",
    "TaskRecord",
    "TaskResult",
    "TaskState",
    "current_agent_calls",
    "use_agent_calls",
]

SUMMARY_FORMAT = "toka-run/1"


class TaskResult(BaseModel):
    """The structured result a model submits for one task (the ``submit_result`` tool input)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["completed", "failed", "blocked"]
    """completed: the task is done; failed: it could not be done; blocked: it needs something first."""
    summary: str = Field(min_length=1)
    """What was found or done, in a few sentences."""
    deliverables: list[str] = []
    """What the task produced (findings, documents, decisions)."""
    files_changed: list[str] = []
    """Workspace-relative paths of files this task wrote or edited."""
    metrics: dict[str, float | int | str] = {}
    """Values for the spec's reporting metrics, keyed by metric name."""
    follow_ups: list[str] = []
    """Work the next tasks or agents should pick up."""

    def redacted(self, secrets: Iterable[str]) -> TaskResult:
        """This result with ``secrets`` and token-shaped strings replaced in every field."""
        return TaskResult.model_validate(redact_data(self.model_dump(), secrets))


class TaskOutcome(BaseModel):
    """What one finished Prefect task returns (and what is persisted for resume)."""

    model_config = ConfigDict(frozen=True)

    agent: str
    index: int
    """1-based position in the agent's task list."""
    description: str
    result: TaskResult
    usage: Usage = Usage()
    turns: int = 0
    tool_calls: int = 0
    """Every attempt's tool calls, when the task ran in an agent flow (else this attempt's)."""
    refused_calls: int = 0
    files_read: list[str] = []
    files_changed: list[str] = []
    """What its tool calls changed, and what the model reported changing."""
    model: str = ""
    duration_s: float = 0.0
    attempt: int = 1
    compactions: int = 0
    """Times the conversation was compacted into a summary to stay within the context window."""
    tokens_cleared: int = 0
    """Tokens of old tool output cleared from the conversation (estimated)."""
    replayed: int = 0
    """Recorded responses and tool results replayed from the task's journal (a resumed task)."""
    carried: Usage = Usage()
    """What the replayed responses cost when an earlier run asked for them (spent, not charged)."""


TaskState = Literal["completed", "cached", "failed", "not-run"]
AgentState = Literal["completed", "completed-with-failures", "failed", "not-run"]
"""``completed-with-failures``: every task ran, and some medium or low ones failed (the failure
policy lets the agent go on from those); it counts as completed for the agents that depend on it."""
PipelineState = Literal["completed", "completed-with-failures", "failed"]
COMPLETED_STATES = ("completed", "completed-with-failures")


class TaskRecord(BaseModel):
    """One row of an agent's report."""

    index: int
    description: str
    priority: Priority
    state: TaskState
    attempts: int = 0
    duration_s: float = 0.0
    usage: Usage = Usage()
    """Tokens charged by this run (zero for a task replayed from the cache)."""
    carried_usage: Usage = Usage()
    """For a replayed task: what it cost when it ran (spent, not charged again)."""
    files_touched: list[str] = []
    tool_calls: int = 0
    """Tool calls of every attempt of the task in this run, failed and retried ones included."""
    refused_calls: int = 0
    """Tool calls refused by the capability, path or approval checks."""
    compactions: int = 0
    """Times the conversation was compacted into a summary (context window)."""
    tokens_cleared: int = 0
    """Tokens of old tool output cleared from the conversation (estimated)."""
    replayed: int = 0
    """Steps replayed from the task's journal instead of asked for or run again."""
    error: str | None = None
    result: TaskResult | None = None


class AgentReport(BaseModel):
    """What one agent did in a run."""

    agent: str
    state: AgentState
    reason: str | None = None
    """Why the agent failed or did not run; for ``completed-with-failures``, which tasks failed."""
    fatal: str | None = None
    """An error that stops the whole run (e.g. the API key was rejected)."""
    tasks: list[TaskRecord] = []
    duration_s: float = 0.0
    flow_run_id: str | None = None
    changes: AgentChanges | None = None
    """What the agent's branch holds (None: it ran in place, or did not start)."""

    @property
    def usage(self) -> Usage:
        """Tokens charged by this run."""
        return sum((t.usage for t in self.tasks), Usage())

    @property
    def spent_tokens(self) -> int:
        """Tokens spent on this agent's tasks, counting replayed ones at their original cost."""
        return sum(t.usage.total_tokens + t.carried_usage.total_tokens for t in self.tasks)

    def count(self, *states: TaskState) -> int:
        return sum(1 for t in self.tasks if t.state in states)

    def is_completed(self) -> bool:
        """The agent ran to its end (failed medium or low tasks included): dependents may start."""
        return self.state in COMPLETED_STATES

    @property
    def results(self) -> list[dict[str, Any]]:
        """The finished tasks' results, as passed to dependent agents."""
        return [
            {"task": t.index, "description": t.description, **t.result.model_dump()}
            for t in self.tasks
            if t.result is not None and t.state in ("completed", "cached")
        ]


class PipelineSummary(BaseModel):
    """The outcome of one pipeline run; ``to_dict()`` is the documented ``--json`` form."""

    run_key: str
    model: str
    offline: bool
    state: PipelineState
    """``completed-with-failures`` when no agent failed but some have failed tasks."""
    agents: list[AgentReport]
    duration_s: float = 0.0
    flow_run_id: str | None = None
    charged: Usage | None = None
    """Every model request of this run, failed attempts included (None: the agents' sum)."""
    budget_tokens: int | None = None
    """The pipeline token budget, if one was set."""
    changes: RunChanges | None = None
    """The run's merged branch (None: the agents ran in place)."""

    @property
    def usage(self) -> Usage:
        return self.charged if self.charged is not None else sum((a.usage for a in self.agents), Usage())

    @property
    def spent_tokens(self) -> int:
        """Tokens spent by the logical run: this run's charges plus replayed tasks' original cost."""
        carried = sum(t.carried_usage.total_tokens for a in self.agents for t in a.tasks)
        return self.usage.total_tokens + carried

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form, redacted (results and errors hold text the model chose)."""
        return redact_data(self._dict(), secret_values())

    def _dict(self) -> dict[str, Any]:
        return {
            "format": SUMMARY_FORMAT,
            "run_key": self.run_key,
            "flow_run_id": self.flow_run_id,
            "model": self.model,
            "offline": self.offline,
            "state": self.state,
            "duration_s": round(self.duration_s, 3),
            "usage": _usage_dict(self.usage),
            "spent_tokens": self.spent_tokens,
            "budget_tokens": self.budget_tokens,
            "branch": None if self.changes is None else {
                "name": self.changes.branch, "commit": self.changes.commit, "base": self.changes.base,
                "merged": self.changes.merged, "not_merged": self.changes.not_merged,
                "files_changed": self.changes.files_changed, "patch": self.changes.patch,
                "pushed": self.changes.pushed,
            },
            "agents": [
                {
                    "name": a.agent,
                    "state": a.state,
                    "reason": a.reason,
                    "duration_s": round(a.duration_s, 3),
                    "tasks_total": len(a.tasks),
                    "tasks_done": a.count("completed", "cached"),
                    "tasks_cached": a.count("cached"),
                    "tasks_failed": a.count("failed"),
                    "tasks_not_run": a.count("not-run"),
                    "usage": _usage_dict(a.usage),
                    "spent_tokens": a.spent_tokens,
                    # From git, not from what the model said it changed.
                    "branch": a.changes.branch if a.changes else None,
                    "commit": a.changes.commit if a.changes else None,
                    "base": a.changes.base if a.changes else None,
                    "files_changed": a.changes.files_changed if a.changes else None,
                    "diffstat": a.changes.diffstat if a.changes else None,
                    "tasks": [
                        {
                            "index": t.index,
                            "description": t.description,
                            "priority": t.priority,
                            "state": t.state,
                            "attempts": t.attempts,
                            "duration_s": round(t.duration_s, 3),
                            "usage": _usage_dict(t.usage),
                            "carried_usage": _usage_dict(t.carried_usage),
                            "files_touched": t.files_touched,
                            "tool_calls": t.tool_calls,
                            "refused_calls": t.refused_calls,
                            "compactions": t.compactions,
                            "tokens_cleared": t.tokens_cleared,
                            "replayed": t.replayed,
                            "error": t.error,
                            "result": None if t.result is None else t.result.model_dump(),
                        }
                        for t in a.tasks
                    ],
                }
                for a in self.agents
            ],
        }


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {**usage.model_dump(), "total_tokens": usage.total_tokens}


# -- tool calls across a task's attempts -------------------------------------------------


@dataclass
class TaskCalls:
    """Tool calls of one task, over every attempt of it in this agent run."""

    calls: int = 0
    refused: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Names this count in the task's journal: a call replayed from it is counted once."""

    def add(self, calls: int, refused: int) -> None:
        self.calls += calls
        self.refused += refused


@dataclass
class AgentCalls:
    """Tool-call counts of one agent run, per task index, kept across Prefect retries.

    A failed attempt's calls are otherwise lost with it (Prefect keeps only the
    last attempt's exception), so reports counted none. The agent flow makes one
    (:func:`use_agent_calls`); each attempt of a task adds its calls to its entry,
    also when it fails or is timed out.
    """

    run_key: str
    agent: str
    tasks: dict[int, TaskCalls] = field(default_factory=dict)

    def task(self, run_key: str, agent: str, index: int) -> TaskCalls | None:
        """The entry of task ``index``, the same for every attempt; None if the key is not this run's."""
        if (run_key, agent) != (self.run_key, self.agent):
            return None
        return self.tasks.setdefault(index, TaskCalls())


_agent_calls: ContextVar[AgentCalls | None] = ContextVar("toka_agent_calls", default=None)


@contextmanager
def use_agent_calls(calls: AgentCalls) -> Iterator[AgentCalls]:
    """Count the tool calls of the tasks run in this context into ``calls``."""
    token = _agent_calls.set(calls)
    try:
        yield calls
    finally:
        _agent_calls.reset(token)


def current_agent_calls() -> AgentCalls | None:
    return _agent_calls.get()


@dataclass(frozen=True)
class AgentRunOutcome:
    """What a run of the agent-runner deployment leaves for the distributed pipeline that started it.

    ``report`` when the agent completed, else ``error`` (the agent's own exception, which holds
    its report when it has one); in both cases what the agent charged, so the pipeline's ledger
    stays exact across processes. It pickles (Prefect persists it as the run's result).
    """

    report: AgentReport | None = None
    error: BaseException | None = None
    charged: Usage = field(default_factory=Usage)
    """Every model request of the agent, failed attempts included."""
    spent: int = 0
    """Tokens the agent added to the pipeline budget's spending (replayed tasks included)."""
