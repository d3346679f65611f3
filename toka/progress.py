"""In-process progress notifications (the CLI's live view listens to them).

Prefect events and artifacts carry progress to the UI; these callbacks carry
it to whoever started the run in this process, without a round trip
through the API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

__all__ = ["ProgressEvent", "listen", "notify", "tell_branch"]

EventKind = Literal["agent-started", "agent-finished", "task-started", "task-finished", "task-turn", "branch-note"]


@dataclass(frozen=True)
class ProgressEvent:
    kind: EventKind
    agent: str
    state: str | None = None
    """For *-finished events: completed, cached, failed or not-run."""
    task: int | None = None
    total: int | None = None
    description: str = ""
    reason: str | None = None
    turn: int | None = None
    """For task-turn events (told to listeners in this process only, never to Prefect): the
    model request the task is at."""


def tell_branch(agent: str, text: str) -> None:
    """Tell listeners in this process (the terminal) what a resume did to the agent's branch: work
    set aside, restored, merged in. The run's log holds it too; the history, in full."""
    notify(ProgressEvent("branch-note", agent, reason=text))


Listener = Callable[[ProgressEvent], None]
_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("toka_progress_listeners", default=())


@contextmanager
def listen(callback: Listener) -> Iterator[None]:
    """Call ``callback`` with every progress event of runs started in this context."""
    token = _listeners.set((*_listeners.get(), callback))
    try:
        yield
    finally:
        _listeners.reset(token)


def notify(event: ProgressEvent) -> None:
    for callback in _listeners.get():
        callback(event)
