"""Settings of one run, passed to every compiled flow and task.

Everything here is plain data (it crosses process boundaries as flow
parameters in distributed runs); live objects such as the model are built
from it where they are used.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .policy import DEFAULT_NEEDS_APPROVAL

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

    # -- provider ----------------------------------------------------------
    max_tokens: int = Field(default=4096, ge=1)
    """Output tokens per model response."""
    temperature: float | None = Field(default=None, ge=0, le=1)
    """Sampling temperature (default: the provider's)."""
    max_attempts: int = Field(default=5, ge=1, le=20)
    """HTTP attempts for one model request (transient failures only)."""
    max_retry_wait: float = Field(default=120.0, ge=0)
    """Seconds of waiting between those attempts, in all."""
    api_key_secret: str | None = None
    """Name of a Prefect Secret block holding the Anthropic API key (instead of ANTHROPIC_API_KEY)."""
    requests_per_minute: int | None = Field(default=None, ge=1)
    """Shared model request rate (a Prefect global concurrency limit; see ``toka limits``)."""
    concurrent_requests: int | None = Field(default=None, ge=1)
    """Shared concurrent model requests (a Prefect global concurrency limit)."""
    in_process_requests: int | None = Field(default=None, ge=1)
    """Concurrent model requests from one process."""

    # -- budgets (tokens; None: the spec's budget block, else unlimited) -----
    task_token_budget: int | None = Field(default=None, ge=1)
    """Tokens one task may spend; overrides the spec's ``budget.task_tokens``."""
    agent_token_budget: int | None = Field(default=None, ge=1)
    """Tokens one agent may spend; overrides the spec's ``budget.agent_tokens``."""
    pipeline_token_budget: int | None = Field(default=None, ge=1)
    """Tokens the whole pipeline may spend."""

    # -- sandbox and approvals ----------------------------------------------
    allow_unsandboxed: bool = False
    """Let agents whose spec says ``sandbox: false`` run commands without the sandbox."""
    approve: tuple[str, ...] = ()
    """Capabilities approved in advance for this run (no pause, no question)."""
    deny: tuple[str, ...] = ()
    """Capabilities denied in advance for this run."""
    approval_timeout: float = Field(default=3600.0, gt=0)
    """Seconds a deployment run waits for a person to approve; then it counts as a denial."""
    needs_approval: tuple[str, ...] = DEFAULT_NEEDS_APPROVAL
    """Uses that need a person's approval before the first one in a run."""
    pause_for_approval: bool = False
    """Pause the agent's flow run for undecided approvals (deployment runs); else they are denied."""
