"""The settings of a run, declared once.

Five groups, each a pydantic model: :class:`RunOptions` (which run, where),
:class:`ProviderSettings` (the model and how it is called), :class:`Limits`,
:class:`Budgets` and :class:`Approvals` (approvals and the sandbox). The same
declarations are

* the parameters of the ``toka-pipeline`` and ``toka-agent`` flows (the
  Prefect UI draws a form with one section per group, validated by these
  models; ``prefect.yaml`` sets them the same way),
* the options of ``toka run``, derived from the fields (:func:`cli_options`),
  checked by the same models, and
* :class:`RunConfig`, the resolved settings every compiled flow and task gets.

A field's docstring is its description in the UI form and its help on the
command line; :class:`Cli` says how it is spelled there when that is not
``--field-name``. Field names are unique across groups, so a flat mapping of
option values routes to its groups (:meth:`RunConfig.from_flat`).

Everything here is plain data (it crosses process boundaries as flow
parameters in distributed runs); live objects such as the model are built
from it where they are used.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from .branches import AgentCheckout
from .errors import ConfigError, Problem

__all__ = [
    "AGENT_RUNNER_DEPLOYMENT",
    "APPROVAL_KEYS",
    "DEFAULT_NEEDS_APPROVAL",
    "DEFAULT_RETRIES",
    "GROUPS",
    "Approvals",
    "Budgets",
    "Cli",
    "Limits",
    "ProviderSettings",
    "RunConfig",
    "RunOptions",
    "Setting",
    "grouped",
    "settings",
]

#: Prefect task retries by task priority: critical work is worth more attempts.
DEFAULT_RETRIES: dict[str, int] = {"critical": 3, "high": 2, "medium": 1, "low": 1}

#: The deployment that runs one agent for a pipeline in distributed mode (``flows/agent.py:agent_runner``).
AGENT_RUNNER_DEPLOYMENT = "toka-agent-runner/distributed"

ApprovalKey = Literal["network-access", "git-push", "write-outside-paths"]
#: Uses that may need a person's approval.
APPROVAL_KEYS: tuple[str, ...] = ("network-access", "git-push", "write-outside-paths")
#: Uses that pause for a person before the first one in a run (configurable per run).
DEFAULT_NEEDS_APPROVAL: tuple[str, ...] = APPROVAL_KEYS


@dataclass(frozen=True)
class Cli:
    """How a setting is spelled on ``toka run``, when not simply ``--field-name METAVAR``."""

    metavar: str = ""
    flag: str | None = None
    """The option's name (``--retry-delay`` for ``retry_delay_seconds``)."""
    envvar: str | None = None
    help: str | None = None
    """Help text when the field's description does not suit a command line."""
    skip: str | None = None
    """Why the setting has no option (it only means something in deployment runs)."""


_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")


def _run_key(value: str | None) -> str | None:
    # It names git branches (toka/<key>/...) and files (.toka/.../<key>.json) as it is: two keys
    # that only became one there would share branches and records. Empty (a form's blank field)
    # is no key: the flow run's id, as for None.
    if value == "":
        return None
    if value is not None and (not _RUN_KEY.fullmatch(value) or len(value) > 100 or value.endswith(".lock")):
        raise PydanticCustomError("run_key", "not a run key: letters, digits, '-', '_' and single dots inside "
                                  "(e.g. nightly-2026-12-02), at most 100 characters; it names git branches and files")
    return value


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class RunOptions(_Group):
    """Which run, on which workspace, how many agents at once."""

    run_key: Annotated[str | None, AfterValidator(_run_key),
                       Cli(metavar="KEY", help="Run under this key (tasks finished under it are reused).")] = None
    """Tasks finished under this key are not redone. Empty: this flow run's id, so a retry of this run
    resumes it while a new run starts fresh."""
    workspace: Annotated[str, Cli(metavar="DIR")] = "."
    """Directory the agents work in."""
    contexts: Annotated[tuple[str, ...], Cli(metavar="NAME", flag="--context",
                                             help="Switch on a context: its conditional tasks run too (repeatable).")] = ()
    """Switched-on contexts: their conditional tasks run after the default ones."""
    max_concurrency: Annotated[int, Field(ge=1), Cli(metavar="N")] = 4
    """Most agents running at once."""
    result_storage: Annotated[str | None, Cli(metavar="SLUG")] = None
    """A Prefect filesystem block slug for results shared between workers (empty: Prefect's local
    result storage, which `toka run` points at .toka/results in the workspace; elsewhere the
    process's PREFECT_RESULTS_LOCAL_STORAGE_PATH, by default in the Prefect home)."""
    base: Annotated[str, Cli(metavar="REF")] = "HEAD"
    """The git commit (branch, tag...) the agents' branches start from, in a workspace that is a git
    repository."""
    include_uncommitted: Annotated[bool, Cli()] = False
    """Let the agents start from the workspace's uncommitted and untracked files too (they are
    snapshotted into the base commit; the checkout itself is not touched)."""
    in_place: Annotated[bool, Cli()] = False
    """Let the agents edit the workspace directly, all in the same tree, instead of each on its own
    git branch and worktree."""
    push: Annotated[str | None, Cli(metavar="REMOTE")] = None
    """Push the run's merged branch to this git remote at the end (a git-push use: it needs its
    approval). Empty: nothing is pushed."""
    mode: Annotated[Literal["in-process", "distributed"], Cli(skip="a deployment setting")] = "in-process"
    """'in-process': each agent is a subflow of the pipeline run. 'distributed': each agent is a run of
    the agent-runner deployment, picked up by any worker of its pool (results must be on storage every
    worker reaches: see result_storage)."""
    agent_deployment: Annotated[str, Cli(skip="a deployment setting")] = AGENT_RUNNER_DEPLOYMENT
    """The agent-runner deployment ('flow/deployment') used in distributed mode."""


class ProviderSettings(_Group):
    """The model and how it is called."""

    model: Annotated[str, Cli(metavar="MODEL", envvar="TOKA_MODEL", help=(
        "'auto' (Anthropic if ANTHROPIC_API_KEY is set, else offline), 'offline', or a model id.  "
        "[default: auto; with --resume: the resumed run's]"))] = "auto"
    """'auto' (Anthropic when ANTHROPIC_API_KEY is set, else offline), 'offline', or a model id."""
    max_tokens: Annotated[int, Field(ge=1), Cli(metavar="N")] = 4096
    """Output tokens per model response."""
    temperature: Annotated[float | None, Field(ge=0, le=1), Cli(metavar="NUMBER")] = None
    """Sampling temperature (empty: the provider's default)."""
    request_timeout: Annotated[float, Field(gt=0), Cli(metavar="SECONDS")] = 600.0
    """Seconds one model request may take."""
    max_attempts: Annotated[int, Field(ge=1, le=20), Cli(metavar="N")] = 5
    """HTTP attempts for one model request when failures are transient."""
    max_retry_wait: Annotated[float, Field(ge=0), Cli(metavar="SECONDS")] = 120.0
    """Seconds of waiting between those attempts, in all."""
    api_key_secret: Annotated[str | None, Cli(metavar="SLUG")] = None
    """Name of a Prefect Secret block holding the Anthropic API key (instead of ANTHROPIC_API_KEY)."""
    requests_per_minute: Annotated[int | None, Field(ge=1), Cli(metavar="N")] = None
    """Shared model request rate, across workers (a Prefect global concurrency limit: toka limits apply)."""
    concurrent_requests: Annotated[int | None, Field(ge=1), Cli(metavar="N")] = None
    """Shared concurrent model requests, across workers (a Prefect global concurrency limit)."""
    in_process_requests: Annotated[int | None, Field(ge=1), Cli(metavar="N")] = None
    """Concurrent model requests from one process."""
    context_window: Annotated[int | None, Field(ge=1000), Cli(metavar="TOKENS", envvar="TOKA_CONTEXT_WINDOW")] = None
    """The model's context window in tokens (empty: known for Claude models; set it for proxies and
    compatible servers)."""
    context_management: Annotated[Literal["client", "server", "off"], Cli(metavar="WHERE")] = "client"
    """How long conversations are kept inside the context window: 'client' (toka clears old tool
    output and compacts, against any Messages API server), 'server' (the Anthropic API's own context
    editing), or 'off'."""
    context_threshold: Annotated[float, Field(gt=0.1, le=1), Cli(metavar="FRACTION")] = 0.7
    """Share of the context window a request may fill before old tool output is cleared and, if
    still too big, the conversation is compacted into a summary."""


class Limits(_Group):
    """How long and how far one task may go."""

    max_turns: Annotated[int, Field(ge=1), Cli(metavar="N")] = 100
    """Model requests per task (a spec task's own max_turns wins); the token budgets bound the cost."""
    task_timeout: Annotated[float | None, Field(gt=0), Cli(metavar="SECONDS")] = None
    """Seconds one task attempt may take (empty: the task's estimated_duration, else the agent's
    timeout; never more than the agent's timeout)."""
    tool_output_limit: Annotated[int, Field(ge=1024), Cli(metavar="BYTES")] = 16_384
    """Bytes of one tool output the model gets; the rest is saved under .toka/outputs and the model
    gets its head and tail, with how to read the whole."""
    retry_delay_seconds: Annotated[float, Field(ge=0), Cli(metavar="SECONDS", flag="--retry-delay")] = 10.0
    """Base seconds between task retries (Prefect adds jitter)."""


class Budgets(_Group):
    """Token budgets (empty: the spec's budget block, else unlimited)."""

    task_token_budget: Annotated[int | None, Field(ge=1), Cli(metavar="TOKENS", flag="--task-budget")] = None
    """Tokens one task may spend (overrides the specs' budget.task_tokens)."""
    agent_token_budget: Annotated[int | None, Field(ge=1), Cli(metavar="TOKENS", flag="--agent-budget")] = None
    """Tokens one agent may spend (overrides the specs' budget.agent_tokens)."""
    pipeline_token_budget: Annotated[int | None, Field(ge=1), Cli(metavar="TOKENS", flag="--pipeline-budget")] = None
    """Tokens the whole run may spend."""


class Approvals(_Group):
    """What needs a person's approval, and the sandbox."""

    allow_unsandboxed: Annotated[bool, Cli()] = False
    """Let agents whose spec says `sandbox: false` run commands without the sandbox."""
    approve: Annotated[tuple[ApprovalKey, ...], Cli(metavar="KEY", help=(
        "Approve a use in advance: network-access, git-push, write-outside-paths (repeatable)."))] = ()
    """Uses approved in advance for this run (no pause, no question)."""
    deny: Annotated[tuple[ApprovalKey, ...], Cli(metavar="KEY", help="Deny a use in advance (repeatable).")] = ()
    """Uses denied in advance for this run."""
    needs_approval: Annotated[tuple[ApprovalKey, ...], Cli(metavar="KEY", help=(
        "Uses that need approval, replacing the default set (network-access, git-push, "
        "write-outside-paths); 'none' for none (repeatable)."))] = DEFAULT_NEEDS_APPROVAL
    """Uses that need a person's approval before the first one in a run ([] for none)."""
    approval_timeout: Annotated[float, Field(gt=0), Cli(skip="only deployment runs pause for approval")] = 3600.0
    """Seconds a deployment run waits for a person to approve in the UI; then it counts as a denial."""


#: The groups, by the name of the flow parameter that holds each.
GROUPS: dict[str, type[_Group]] = {
    "run": RunOptions,
    "provider": ProviderSettings,
    "limits": Limits,
    "budgets": Budgets,
    "approvals": Approvals,
}


@dataclass(frozen=True)
class Setting:
    """One declared setting: its group, field and command-line spelling."""

    group: str
    name: str
    field: FieldInfo
    cli: Cli

    @property
    def flag(self) -> str:
        return self.cli.flag or "--" + self.name.replace("_", "-")


def settings() -> Iterator[Setting]:
    """Every declared setting, group by group."""
    for group, model in GROUPS.items():
        for name, field in model.model_fields.items():
            cli = next((m for m in field.metadata if isinstance(m, Cli)), Cli())
            yield Setting(group, name, field, cli)


class RunConfig(RunOptions):
    """The resolved settings of one run, as every agent flow and task receives them."""

    run_key: Annotated[str, Field(min_length=1), AfterValidator(_run_key)]  # type: ignore[assignment]  # resolved
    """Identifies a logical run; tasks finished under the same key are not redone."""
    provider: ProviderSettings = ProviderSettings()
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    approvals: Approvals = Approvals()
    retries: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_RETRIES))
    """Prefect task retries by task priority."""
    checkout: AgentCheckout | None = None
    """The agent's own worktree (set per agent by the pipeline; None: the workspace itself)."""
    pause_for_approval: bool = False
    """Pause the agent's flow run for undecided approvals (set for deployment runs, where a person can
    answer in the UI); else undecided approvals are denied."""

    @classmethod
    def of(cls, run: RunOptions, **groups: _Group | None) -> RunConfig:
        """The settings of ``run`` with the given groups (the others at their defaults)."""
        given = {name: value for name, value in groups.items() if value is not None}
        return cls(**run.model_dump(), **given)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], *, flags: bool = False) -> RunConfig:
        """Settings from one flat mapping of field names (as the command line has them); ``run_key``
        is required. Raises ConfigError naming every bad value (by its option when ``flags``)."""
        groups = grouped(values, flags=flags)
        return cls.of(groups.pop("run"), **groups)  # type: ignore[arg-type]


def grouped(values: Mapping[str, Any], *, flags: bool = False) -> dict[str, BaseModel]:
    """One flat mapping of setting names to values, as the flow parameters: group name -> settings.

    Raises ConfigError naming every bad value (by its command-line option when ``flags``).
    """
    by_name = {s.name: s for s in settings()}
    given: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for name, value in values.items():
        if name not in by_name:
            raise ConfigError(f"unknown run setting {name!r}")
        given[by_name[name].group][name] = value
    problems: list[Problem] = []
    built: dict[str, BaseModel] = {}
    for group, model in GROUPS.items():
        try:
            built[group] = model(**given[group])
        except ValidationError as e:
            for error in e.errors():
                name = str(error["loc"][0]) if error["loc"] else group
                where = by_name[name].flag if flags and name in by_name else f"{group}.{name}"
                problems.append(Problem(f"{where}: {error.get('input')!r}: {error['msg'].lower()}"))
    if problems:
        raise ConfigError(problems)
    return built
