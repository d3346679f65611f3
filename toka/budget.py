"""Token budgets: per task, per agent and per pipeline.

Spending is checked *before* each model request: a request that would start
after a budget is spent is refused with a :class:`BudgetExceededError`
naming the budget. Tasks replayed from the cache charge nothing to this run,
but what they cost earlier still counts as spent, so a resumed run carries
the total forward instead of getting a fresh allowance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from .errors import BudgetExceededError
from .model import Usage

__all__ = ["Ledger", "current_ledger", "use_ledger"]


@dataclass
class Ledger:
    """Tokens spent under one budget; ``limit`` None means unlimited."""

    name: str
    limit: int | None = None
    scope: str = ""
    """task, agent or pipeline: what a spent budget stops."""
    spent: int = 0
    charged: Usage = field(default_factory=Usage)

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


_pipeline: ContextVar[Ledger | None] = ContextVar("toka_pipeline_ledger", default=None)


@contextmanager
def use_ledger(ledger: Ledger) -> Iterator[Ledger]:
    """Make ``ledger`` the pipeline budget for runs started in this context."""
    token = _pipeline.set(ledger)
    try:
        yield ledger
    finally:
        _pipeline.reset(token)


def current_ledger() -> Ledger | None:
    return _pipeline.get()
