"""Settings of one run, passed to every compiled flow and task.

Everything here is plain data (it crosses process boundaries as flow
parameters in distributed runs); live objects such as the model are built
from it where they are used.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_RETRIES", "RunConfig"]

#: Prefect task retries by task priority: critical work is worth more attempts.
DEFAULT_RETRIES: dict[str, int] = {"critical": 3, "high": 2, "medium": 1, "low": 1}


class RunConfig(BaseModel):
    """How to run: which model, where, with which bounds, under which run key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_key: str = Field(min_length=1)
    """Identifies a logical run; tasks finished under the same key are not redone."""
    model: str = "auto"
    """``auto`` (Anthropic when a key is set, else offline), ``offline``, or a model id."""
    workspace: str = "."
    """Directory the agents work in."""
    contexts: tuple[str, ...] = ()
    """Switched-on contexts: their ``tasks.conditional`` tasks run after the default ones."""
    max_turns: int = Field(default=20, ge=1)
    """Model requests per task attempt."""
    request_timeout: float = Field(default=600.0, gt=0)
    """Seconds one model request may take."""
    task_timeout: float | None = Field(default=None, gt=0)
    """Seconds one task attempt may take (default: the agent's timeout)."""
    retries: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_RETRIES))
    """Prefect task retries by task priority."""
    retry_delay_seconds: float = Field(default=10.0, ge=0)
    """Base delay between task retries (Prefect adds jitter)."""
    result_storage: str | None = None
    """A Prefect filesystem block slug (e.g. ``local-file-system/shared``); default: local path."""
