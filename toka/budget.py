"""Token budgets: per task, per agent and per pipeline.

Spending is checked *before* each model request: a request that would start
after a budget is spent is refused with a :class:`BudgetExceededError`
naming the budget. Tasks replayed from the cache charge nothing to this run,
but what they cost earlier still counts as spent, so a resumed run carries
the total forward instead of getting a fresh allowance.

Prefect retries a failed task in the same process, inside the same agent
flow run, so the budgets of one agent run live in an :class:`AgentBudget`
that the agent flow creates and the task reads (:func:`current_agent_budget`):
its agent ledger and one task ledger per task index (for the run key and
agent it names) outlive the task's attempts, and a retry spends what is left
of its budgets instead of a fresh allowance. Nothing is kept beyond the agent
run: a later run (a resume) starts from what its replayed tasks carry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import BudgetExceededError
from .model import Usage

T = TypeVar("T")

__all__ = ["AgentBudget", "Ledger", "current_agent_budget", "current_ledger", "use_agent_budget", "use_ledger"]


@dataclass
class Ledger:
    """Tokens spent under one budget; ``limit`` None means unlimited."""

    name: str
    limit: int | None = None
    scope: str = ""
    """task, agent or pipeline: what a spent budget stops."""
    spent: int = 0
    charged: Usage = field(default_factory=Usage)
    carried: Usage = field(default_factory=Usage)
    """What replayed steps cost when they were first paid for (counted in ``spent``)."""

    def check(self) -> None:
        if self.limit is not None and self.spent >= self.limit:
            raise BudgetExceededError(
                f"the {self.name} token budget of {self.limit:,} is spent ({self.spent:,} used); "
                "no further model request may start",
                scope=self.scope,
            )

    def charge(self, usage: Usage) -> None:
        """A request made in this run."""
        self.spent += usage.total_tokens
        self.charged = self.charged + usage

    def carry(self, usage: Usage) -> None:
        """A task replayed from an earlier attempt: spent then, charged nothing now."""
        self.spent += usage.total_tokens
        self.carried = self.carried + usage


@dataclass
class AgentBudget:
    """The budgets of one agent run: its agent ledger and a ledger per task, across task attempts.

    A task ledger is found by (run key, agent, task index); the run key and
    agent must be this object's, so a step of another run or agent (which
    should never see this object) gets no ledger rather than a shared one.
    """

    run_key: str
    agent: str
    ledger: Ledger
    """The agent budget: every attempt of every task of this agent run, plus replayed tasks."""
    tasks: dict[int, Ledger] = field(default_factory=dict)
    """Task index -> its ledger, shared by all of the task's attempts."""

    def task_ledger(self, run_key: str, agent: str, index: int, *, name: str, limit: int | None) -> Ledger | None:
        """The ledger of task ``index``, the same for every attempt; None if the key is not this run's."""
        if (run_key, agent) != (self.run_key, self.agent):
            return None
        if index not in self.tasks:
            self.tasks[index] = Ledger(name, limit, scope="task")
        return self.tasks[index]


_pipeline: ContextVar[Ledger | None] = ContextVar("toka_pipeline_ledger", default=None)
_agent: ContextVar[AgentBudget | None] = ContextVar("toka_agent_budget", default=None)


@contextmanager
def _bound(var: ContextVar[T | None], value: T) -> Iterator[T]:
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def use_ledger(ledger: Ledger) -> AbstractContextManager[Ledger]:
    """Make ``ledger`` the pipeline budget for runs started in this context."""
    return _bound(_pipeline, ledger)


def current_ledger() -> Ledger | None:
    return _pipeline.get()


def use_agent_budget(budget: AgentBudget) -> AbstractContextManager[AgentBudget]:
    """Make ``budget`` the agent and task budgets for the tasks run in this context."""
    return _bound(_agent, budget)


def current_agent_budget() -> AgentBudget | None:
    return _agent.get()
