"""The compiler: one agent spec becomes one async Prefect flow.

Each spec task becomes a run of the generic :func:`toka.llm_step.llm_step`,
specialised with ``.with_options`` (name, retries, timeout). Tasks run in the
listed order, each seeing the results before it and those of the agent's
dependencies. A critical or high task that fails (after its retries) ends the
agent Failed and the rest do not run; a medium or low failure is recorded and
the agent goes on, and ends ``completed-with-failures`` (a Completed flow run
named ``CompletedWithFailures`` in the UI).

Task records are redacted when they are made (:func:`_record`): results and
errors hold text the model chose, and everything the agent writes (its report
and results artifacts, events, its result, the pipeline's summary) is made from them.

What the Prefect UI shows: flow runs named ``<agent> <date>`` (:func:`run_name`),
task runs named ``<agent> - 3/9 - <description>`` (:func:`task_title`: ASCII only,
the UI's run graph draws no other characters), and a failed run's state message
is one line (:func:`failed`), not a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import Flow, Task, flow, get_run_logger
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.blocks.core import Block
from prefect.context import FlowRunContext, TagsContext
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout, MissingContextError
from prefect.filesystems import WritableFileSystem
from prefect.flow_runs import apause_flow_run
from prefect.input import RunInput
from prefect.states import Completed, Failed, State
from prefect.task_engine import TaskRunTimeoutError
from prefect.utilities.annotations import quote

from .audit import AuditLog, audit_path
from .background import in_background, to_the_end
from .branches import (
    DIFF_LIMIT,
    AgentChanges,
    AgentCheckout,
    changes_between,
    commit_task,
    diff_text,
    reopen_task,
)
from .budget import AgentBudget, current_ledger, use_agent_budget
from .config import RunConfig
from .errors import AgentFailedError, BudgetExceededError, ConfigError, TokaError
from .gitguard import run_git
from .journal import Journal, journal_path
from .llm_step import StepInput, agent_ledger, is_retryable, llm_step
from .model import Usage
from .policy import approval_keys
from .progress import ProgressEvent, notify, tell_branch
from .providers import get_model
from .redact import redact, redact_data, secret_values
from .report import agent_markdown, agent_results_table
from .results import AgentCalls, AgentReport, TaskCalls, TaskOutcome, TaskRecord, use_agent_calls
from .spec import AgentSpec, Task as SpecTask
from .tools import workspace_settling
from .workspace import Workspace

__all__ = [
    "WITH_FAILURES",
    "agent_tags",
    "announce",
    "compile_agent",
    "failed",
    "finished",
    "run_name",
    "step_task",
    "task_title",
]

_STOPPING = ("critical", "high")


def task_title(spec: AgentSpec, index: int, total: int, task: SpecTask, width: int = 48) -> str:
    """``<agent> - 3/9 - <short description>``: unique within a run, readable in the UI.

    Plain ASCII: the UI's run graph draws task names with a font that has no
    ``·`` or ``…`` (they showed as nothing, or as boxes), so the cut is ``...``.
    """
    text = " ".join(task.description.split())
    short = text
    if len(text) > width:
        cut = text[: width - 3]
        short = (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:-") + "..."
    return f"{spec.name} - {index}/{total} - {short}"


def run_name(prefix: str) -> str:
    """A flow run's name: ``<prefix> <date>`` in UTC, e.g. ``repo-survey 2026-12-01 03:04``.

    Prefect names runs at random (``archetypal-markhor``) unless the flow sets
    ``flow_run_name``; this says what ran and when, in the UI's run lists.
    """
    return f"{prefix} {datetime.now(timezone.utc):%Y-%m-%d %H:%M}"


def failed(error: TokaError, *, data: Any = None) -> State[Any]:
    """What a flow returns instead of raising ``error``: a Failed state whose message is one line.

    Raised, ``error`` would reach the UI as a traceback logged with its ``repr``
    (a RunFailedError's holds its whole report) and a state message prefixed
    "Flow run encountered an exception". Returned, the message is the error's
    own line (Prefect logs it once: "Finished in state Failed(...)"), and
    ``state.result()`` raises ``error`` all the same: it is the state's data.
    An error of several lines (several problems) keeps the first in the
    message and logs them all. ``data``: the state's result instead of ``error``.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    if len(lines) > 1:
        message += f" (and {len(lines) - 1} more: see the log)"
        get_run_logger().error("%s", "\n".join(lines))
    return Failed(message=message, data=error if data is None else data)


def step_task(spec: AgentSpec, index: int, total: int, task: SpecTask, run: RunConfig, *,
              storage: WritableFileSystem | None = None) -> Task[..., Any]:
    """The generic step specialised for task ``index`` of ``spec`` under ``run``.

    ``storage``: the block ``run.result_storage`` names, already loaded (:func:`result_storage`);
    without it the slug is given, which Prefect loads from the API for every task run.
    """
    title = task_title(spec, index, total, task)
    options: dict[str, Any] = {}
    if run.result_storage:
        options["result_storage"] = storage or run.result_storage
    return llm_step.with_options(
        name=title,
        # Prefect formats a run name with the task's parameters: a description's `{topic}` (CrewAI's
        # placeholders) failed the agent with KeyError 'topic'.
        task_run_name=title.replace("{", "{{").replace("}", "}}"),
        retries=run.retries.get(task.priority, 1),
        retry_delay_seconds=run.limits.retry_delay_seconds,
        retry_jitter_factor=0.5 if run.limits.retry_delay_seconds else None,
        retry_condition_fn=is_retryable,
        timeout_seconds=attempt_limit(spec, task, run)[0],
        **options,
    )


def attempt_limit(spec: AgentSpec, task: SpecTask, run: RunConfig) -> tuple[float, str]:
    """The seconds one attempt of ``task`` may take, and what set them, as a person finds it:
    ``--task-timeout``, or the spec's field with its file and line (a task's estimate is its limit)."""
    agent_timeout = spec.security.resource_limits.timeout
    path: tuple[str | int, ...] = ("security", "resource_limits", "timeout")
    seconds, text = agent_timeout.seconds, agent_timeout.text
    estimate_field = "estimated_duration" if task.estimated_duration is not None else "estimated_time"
    estimate = getattr(task, estimate_field)
    if run.limits.task_timeout is not None:
        if run.limits.task_timeout < seconds:
            return run.limits.task_timeout, f"{run.limits.task_timeout:g}s, --task-timeout"
    elif estimate is not None and estimate.seconds < seconds:
        seconds, text = estimate.seconds, estimate.text
        path = (*_task_path(spec, task), estimate_field)
    line = spec.line_of(*path)
    where = f" in {spec.source}{'' if line is None else f':{line}'}" if spec.source else ""
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return seconds, f"{text}, {field}{where}"


def _task_path(spec: AgentSpec, task: SpecTask) -> tuple[str | int, ...]:
    for i, candidate in enumerate(spec.tasks.default):
        if candidate is task:
            return ("tasks", "default", i)
    for context, tasks in spec.tasks.conditional.items():
        for i, candidate in enumerate(tasks):
            if candidate is task:
                return ("tasks", "conditional", context, i)
    return ("tasks",)


def announce(event: ProgressEvent, *, run_key: str) -> None:
    """Tell in-process listeners and Prefect's event stream (the reason redacted)."""
    if event.reason:
        event = dataclasses.replace(event, reason=redact(event.reason, secret_values()))
    notify(event)
    kind = event.kind if event.state is None else f"{event.kind.split('-')[0]}-{event.state}"
    resource = {"prefect.resource.id": f"toka.agent.{event.agent}", "prefect.resource.name": event.agent}
    if event.task is not None:
        resource["prefect.resource.id"] += f".task.{event.task}"
    emit_event(
        event=f"toka.{kind.replace('-', '.')}",
        resource=resource,
        payload=redact_data({
            "run_key": run_key,
            "task": event.task,
            "total": event.total,
            "description": event.description,
            "reason": event.reason,
        }, secret_values()),
    )


#: The name of a Completed agent (or pipeline) flow run whose medium or low tasks failed.
WITH_FAILURES = "CompletedWithFailures"


def finished(data: Any, *, failures: str | None) -> Any:
    """What a flow returns: ``data``, or when some tasks failed (``failures`` says which) a
    Completed state named :data:`WITH_FAILURES` holding it.

    Prefect makes a flow run Completed whatever tasks of it failed (its return
    value decides); the state's name shows the failures in the UI's run lists,
    and ``state.result()`` is ``data`` all the same.
    """
    if failures is None:
        return data
    return Completed(name=WITH_FAILURES, message=failures, data=data)


async def _record(
    state: State[Any], index: int, task: SpecTask, retries: int, charged: Usage | None = None,
    calls: TaskCalls | None = None, limit: str | None = None,
) -> tuple[TaskRecord, BaseException | None]:
    """The task's report row, redacted; ``charged`` is what all its attempts in this run cost (its
    ledger), ``calls`` the tool calls all its attempts made, ``limit`` the time limit of one attempt
    and what set it (:func:`attempt_limit`), named when the attempt ran out of time.

    The ledger is the figure of record: it also counts attempts that Prefect
    timed out, which leave no usage on their error. So are ``calls``: a failed
    attempt's calls leave no trace on the task's final state.
    """
    secrets = secret_values()
    base = {"index": index, "description": task.description, "priority": task.priority}
    counts = {} if calls is None else {"tool_calls": calls.calls, "refused_calls": calls.refused}
    if state.is_completed():
        outcome: TaskOutcome = await state.aresult()
        cached = state.name == "Cached"
        return TaskRecord(
            **base,
            state="cached" if cached else "completed",
            attempts=0 if cached else outcome.attempt,
            duration_s=0.0 if cached else outcome.duration_s,
            usage=Usage() if cached else charged if charged is not None else outcome.usage,
            carried_usage=outcome.usage if cached else outcome.carried,
            files_touched=sorted({*outcome.files_read, *outcome.files_changed, *outcome.result.files_changed}),
            tool_calls=0 if cached else outcome.tool_calls,
            refused_calls=0 if cached else outcome.refused_calls,
            compactions=0 if cached else outcome.compactions,
            tokens_cleared=0 if cached else outcome.tokens_cleared,
            replayed=0 if cached else outcome.replayed,
            # Redacted when submitted; again here for results persisted before that was so.
            result=outcome.result.redacted(secrets),
        ), None
    exc = await state.aresult(raise_on_failure=False)
    if not isinstance(exc, BaseException):
        return TaskRecord(**base, state="failed", attempts=1,
                          error=redact(state.message or state.name or "failed", secrets), **counts), None
    text = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)
    if isinstance(exc, TaskRunTimeoutError) and limit is not None:
        # Prefect's message gives the seconds only; a short estimate in the spec is the usual cause.
        text += f" (the time limit of one attempt: {limit})"
    retryable = isinstance(exc, TimeoutError) or (isinstance(exc, TokaError) and exc.retryable)
    return TaskRecord(
        **base,
        state="failed",
        attempts=(exc.attempt if isinstance(exc, TokaError) else None) or (retries + 1 if retryable else 1),
        usage=charged if charged is not None else (exc.usage if isinstance(exc, TokaError) else None) or Usage(),
        carried_usage=(exc.carried if isinstance(exc, TokaError) else None) or Usage(),
        error=redact(f"{type(exc).__name__}: {text}", secrets),
        **counts,
    ), exc


class Progress:
    """A progress artifact (an agent's tasks, the pipeline's agents), written without waiting for the API.

    It is made one ``interval`` after the work starts, with the value then (or at
    ``close``, with the last value, when the work ends sooner); updates go out from a
    background task, newest value wins, at most one every ``interval`` seconds after
    the write before; ``close`` sends the last value at once and waits for it.
    Each write is an API call and a database write on the server every agent's
    runs share (a keyed artifact about 10 ms of its CPU, the SQLite writer held while
    the runs on the critical path wait to change state): an agent done within the
    interval makes one write instead of two. Five seconds: a task of a real agent takes
    longer, so each still shows as it finishes; quicker ones (replayed from the cache,
    small agents by the dozen) show in steps a person watching the UI can follow.
    """

    def __init__(self, key: str, description: str, *, interval: float = 5.0) -> None:
        self._key = key
        self._description = description
        self._value = 0.0
        self._sent: float | None = None
        self._interval = interval
        self._last = time.monotonic()  # of the last write; the start counts as one
        self._closing = asyncio.Event()
        self._artifact: UUID | None = None
        self._pushing = asyncio.create_task(self._push())  # makes the artifact after the interval

    def set(self, value: float) -> None:
        self._value = value
        if self._pushing.done():
            self._pushing = asyncio.create_task(self._push())

    async def _push(self) -> None:
        while self._artifact is None or self._sent != self._value:
            wait = self._last + self._interval - time.monotonic()
            if wait > 0 and not self._closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), wait)
            value = self._value
            self._last = time.monotonic()
            if self._artifact is None:
                self._artifact = await acreate_progress_artifact(
                    progress=value, key=self._key, description=self._description)
            else:
                await aupdate_progress_artifact(self._artifact, progress=value)
            self._sent = value

    async def close(self) -> None:
        self._closing.set()
        await self._pushing

    def discard(self) -> None:
        """Write nothing more (the work was cancelled or crashed: its run's state says so)."""
        self._pushing.cancel()


async def result_storage(slug: str | None) -> WritableFileSystem | None:
    """The filesystem block ``slug`` names (``--result-storage``), loaded once for an agent's tasks.

    Given the slug, Prefect reads the block from the API again for each task run: a request on
    the way of every task, which a run on shared storage (distributed workers) pays most.

    Raises:
        ConfigError: no such block, or it is not a filesystem results can be written to.
    """
    if not slug:
        return None
    try:
        block = await Block.aload(slug)
    except (ValueError, KeyError) as e:  # Prefect: "Unable to find block document named ..."
        raise ConfigError(f"--result-storage {slug!r}: {e}") from None
    if not isinstance(block, WritableFileSystem):
        raise ConfigError(f"--result-storage {slug!r}: a {type(block).__name__} block holds no files; expected "
                          "a filesystem block (local-file-system/NAME, remote-file-system/NAME...)")
    return block


def agent_tags(spec: AgentSpec) -> list[str]:
    """Prefect tags for the agent's runs (flows take tags at call time, via ``prefect.tags``)."""
    tags = ["toka", f"domain:{spec.spec.domain}", f"priority:{spec.priority}"]
    if spec.metadata.workstream:
        tags.append(f"workstream:{spec.metadata.workstream}")
    return tags


async def _run_tasks(
    spec: AgentSpec,
    tasks: list[SpecTask],
    run: RunConfig,
    upstream: dict[str, dict[str, Any]],
    progress: Progress,
    budget: AgentBudget,
    calls: AgentCalls,
) -> tuple[list[TaskRecord], str | None, str | None, bool]:
    """Run the agent's tasks in order; return their records, why the agent failed, a fatal error, and
    whether a task's commit was tried (the agent's branch may have moved).

    ``budget`` must be the agent budget in effect (:func:`toka.budget.use_agent_budget`): the
    tasks charge it, and each task's ledger there is what the task cost. ``calls`` must be the
    tool-call counts in effect (:func:`toka.results.use_agent_calls`), likewise.
    """
    total = len(tasks)
    fingerprint, digest = (await get_model(run.provider)).fingerprint(), spec.digest()
    storage = await result_storage(run.result_storage)
    fatal: str | None = None
    state_dir: Path | None = None  # the workspace's, found at the first task
    ledger = current_ledger()
    records: list[TaskRecord] = []
    committing: asyncio.Task[None] | None = None
    moved = False  # whether a commit was tried: else the agent's branch is where it started
    prior: list[dict[str, Any]] = []
    failure: str | None = None
    skipped: str | None = None  # a spent agent or pipeline budget: later tasks cannot start
    try:
        for index, task in enumerate(tasks, 1):
            if failure is not None or skipped is not None:
                records.append(TaskRecord(index=index, description=task.description, priority=task.priority,
                                          state="not-run", error=f"not run: {failure or skipped}"))
                continue
            announce(ProgressEvent("task-started", spec.name, task=index, total=total,
                                   description=task.description), run_key=run.run_key)
            if committing is not None and committing.done():
                committing.result()  # a commit that failed stops the agent here, as it would have at once
            state_dir = state_dir or Workspace(run.workspace).state_dir
            journal = Journal(journal_path(state_dir, run.run_key, spec.name, index))
            journalled = run.checkout is not None and journal.path.exists()  # an earlier attempt's turns
            if journalled:
                await _settled(committing)
                await asyncio.to_thread(_reopen, run, journal, index, total)
            step = StepInput(spec=spec, spec_digest=digest, index=index, prior=prior,
                             upstream=upstream, run=run, model_fingerprint=fingerprint,
                             agent_spent=budget.ledger.spent)
            # quote: Prefect would otherwise walk the whole spec inside the input looking for
            # futures, about 40 ms a task (measured by bench/overhead.py); it holds none.
            settling = workspace_settling.set(committing)
            try:
                state = await step_task(spec, index, total, task, run, storage=storage)(quote(step), return_state=True)
            finally:
                workspace_settling.reset(settling)
            charged = budget.tasks[index].charged if index in budget.tasks else None
            record, exc = await _record(state, index, task, run.retries.get(task.priority, 1), charged,
                                        calls.tasks.get(index), attempt_limit(spec, task, run)[1])
            records.append(record)
            if state.is_completed():  # its result is persisted now: what a resume replays
                # Off the loop, not waited for here (an unlink took a millisecond on a disk busy with
                # the server's database); the run waits for it at its end. Nothing writes this
                # journal again: the task is done.
                await in_background(_forget(journal), f"the removal of {journal.path}")
            if run.checkout is not None and not _left_no_changes(record, calls.tasks.get(index), journalled):
                # In the background: the next task's first model request need not wait for git; its
                # tools do (workspace_settling), and so does each commit for the one before it.
                committing = asyncio.create_task(_commit_after(committing, run, record, total, step.cache_key()))
                moved = True
            if record.state == "cached":  # its earlier cost counts as spent (a replaying step carries its own)
                for book in (budget.ledger, ledger):
                    if book is not None:
                        book.carry(record.carried_usage)
            if record.result is not None:
                prior.append({"task": index, "description": task.description, **record.result.model_dump()})
            elif isinstance(exc, TokaError) and exc.fatal:
                failure = fatal = str(exc)
            elif task.priority in _STOPPING:
                failure = f"task {index}/{total} ({task.priority}) failed: {record.error}"
            elif isinstance(exc, BudgetExceededError) and exc.scope != "task":
                skipped = f"budget spent: {exc}"
            announce(ProgressEvent("task-finished", spec.name, state=record.state, task=index, total=total,
                                   description=task.description, reason=record.error), run_key=run.run_key)
            progress.set(100.0 * index / total)
    finally:  # an agent stopped midway (cancelled, timed out): its last commit still lands
        if committing is not None and not committing.done():
            await asyncio.wait([committing])
    await _settled(committing)
    return records, failure or skipped, fatal, moved


def _left_no_changes(record: TaskRecord, calls: TaskCalls | None, journalled: bool) -> bool:
    """Whether the task cannot have changed its worktree, so there is nothing to commit.

    Only tools change files, and a tool runs after the response that asked for it is in the
    task's journal: a task that found no journal when it began (``journalled``: an earlier
    process's tools would have left one), ran no tool in any attempt and replayed none, and
    reports no file changed, left the worktree as it found it. Its commit would have run a ``git status``
    (a process, and a thread hop, on the way of every task that only thinks) to find nothing.
    A task replayed from the cache is not known to have been committed; a failed one may have
    edits to set aside: both still go through :func:`toka.branches.commit_task`.
    """
    return (not journalled and record.state == "completed" and record.replayed == 0
            and (calls is None or calls.calls == 0)
            and not (record.result is not None and record.result.files_changed))


async def _settled(committing: asyncio.Task[None] | None) -> None:
    """Wait for the commit in flight; a commit that failed raises here."""
    if committing is not None:
        await committing


async def _commit_after(previous: asyncio.Task[None] | None, run: RunConfig, record: TaskRecord,
                        total: int, key: str) -> None:
    await _settled(previous)
    await asyncio.to_thread(_commit, run, record, total, key)


def _commit(run: RunConfig, record: TaskRecord, total: int, key: str) -> None:
    """Commit what the task left in the agent's worktree (blocking: git), under its cache key; a
    task that failed for good has its edits set aside, one replayed from the cache gets the work
    of that result back on the branch (:func:`toka.branches.commit_task`)."""
    assert run.checkout is not None
    result, agent = record.result, run.checkout.agent
    state_dir = Workspace(run.workspace).state_dir
    audit = AuditLog(audit_path(state_dir, run.run_key), run=run.run_key, on_record=_warn_refused_commit)
    commit_task(run.checkout, run_key=run.run_key, index=record.index, total=total,
                description=record.description, state=record.state,
                summary=result.summary if result else record.error or "",
                files_changed=result.files_changed if result else (), audit=audit, key=key,
                log=lambda line: _tell(agent, line), journals=journal_path(state_dir, run.run_key, agent, 1).parent)


def _warn_refused_commit(entry: dict[str, Any]) -> None:
    # In the run's log (the UI), beside the audit trail's record.
    _warn(entry["reason"])


def _tell(agent: str, line: str) -> None:
    """What a commit did to the branch besides committing (a resume's restore): in the run's log
    and on the terminal."""
    _warn(line)
    tell_branch(agent, line)


def _warn(line: str) -> None:
    try:
        get_run_logger().warning("%s", line)
    except MissingContextError:  # committed outside a Prefect run: the audit trail, the history hold it
        pass


async def _forget(journal: Journal) -> None:
    """Remove a finished task's journal; one left behind is never replayed (its result is)."""
    try:
        await to_the_end(journal.discard)
    except OSError as e:
        get_run_logger().warning("the journal of a finished task was left behind: %s", e)


def _reopen(run: RunConfig, journal: Journal, index: int, total: int) -> None:
    """Before a task with a journal runs: edits it left set aside when it failed come back for its
    journal to replay onto; where they cannot, its journal goes (its tool calls' effects are not there)."""
    assert run.checkout is not None
    if not reopen_task(run.checkout, run_key=run.run_key, index=index, total=total):
        journal.discard()


class ApprovalInput(RunInput):
    """What a person answers when an agent pauses for approval in the Prefect UI."""

    approve: bool = False
    note: str = ""


async def _resume_after_timeout() -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    async with get_client() as client:
        await client.set_flow_run_state(ctx.flow_run.id, Running(message="approval timed out: denied"), force=True)


async def ask_approval(question: str, *, key: str, timeout: float) -> bool:
    """Pause this flow run until a person answers ``question`` in the Prefect UI; silence until
    ``timeout`` seconds is a denial."""
    limit = max(1, int(timeout))
    form = ApprovalInput.with_initial_data(
        description=f"{question} (no answer within {limit} s counts as a denial)")
    try:
        answer = await apause_flow_run(wait_for_input=form, timeout=limit, key=key,
                                       poll_interval=max(1, min(5, limit // 4)))
        return bool(answer and answer.approve)
    except FlowPauseTimeout:
        # Only a resume takes the run out of Paused on the server; left there, its final
        # Completed would be refused ("completed and never resumed") and the run failed.
        await _resume_after_timeout()
        return False


async def _ask_approvals(spec: AgentSpec, run: RunConfig) -> RunConfig:
    """Before the agent's first task: settle the approvals its capabilities may need.

    Decided in advance (--approve/--deny) they stand; in deployment runs a
    person is asked through a paused flow run, and silence until the timeout
    is a denial; otherwise (in-process runs) undecided means denied.
    """
    approvals = run.approvals
    keys = [k for k in approval_keys(spec, approvals.needs_approval)
            if k not in approvals.approve and k not in approvals.deny]
    if not keys:
        return run
    approved = False
    if run.pause_for_approval:
        # The pause counts against the agent's own timeout, so it must end well before it.
        approved = await ask_approval(
            f"Agent **{spec.name}** may use: **{', '.join(keys)}**. Approve for this run?", key=f"approve-{spec.name}",
            timeout=min(approvals.approval_timeout, spec.security.resource_limits.timeout.seconds / 2))
    update = {"approve": (*approvals.approve, *keys)} if approved else {"deny": (*approvals.deny, *keys)}
    return run.model_copy(update={"approvals": approvals.model_copy(update=update)})


def compile_agent(spec: AgentSpec) -> Flow[..., Any]:
    """One async Prefect flow for ``spec``, named after ``metadata.name``.

    The flow takes the run settings and the results of the agent's
    dependencies, returns an :class:`AgentReport` (inside a Completed state
    named :data:`WITH_FAILURES` when some tasks failed), and when it fails a
    Failed state (:func:`failed`) whose result is an :class:`AgentFailedError`
    carrying the report, or the error that stopped it before its tasks (a
    missing API key). Its runs are named ``<agent> <date>``. Call it inside
    ``prefect.tags(*agent_tags(spec))`` to tag its runs.
    """

    # ``run`` is annotated Any: Prefect builds a flow's parameter schema from its signature
    # when the flow is made, and RunConfig's took 27 ms a flow, every agent of every run, before
    # any agent started (an agent flow is a subflow: no form in the UI shows that schema). It is
    # checked here instead (a RunConfig passes as it is; its callers pass one).
    async def run_agent(
        run: Any, upstream: dict[str, dict[str, Any]] | None = None
    ) -> AgentReport | State[AgentReport]:
        run = RunConfig.model_validate(run)
        try:
            return await _run_agent(spec, run, upstream)
        except TokaError as e:  # one line in the UI, not a traceback with the report's repr
            return failed(e)

    # Prefect knows a subflow run again (a retry of the pipeline reuses the completed ones) by
    # its function's name and code, then by call order: one shared function made the agents,
    # started concurrently in any order, take each other's earlier runs (and reports) on a retry.
    run_agent.__qualname__ = f"{run_agent.__qualname__.rsplit('.', 1)[0]}.{spec.name}"
    return flow(
        run_agent,
        name=spec.name,
        flow_run_name=lambda: run_name(spec.name),
        description=spec.spec.description or spec.spec.name,
        timeout_seconds=spec.security.resource_limits.timeout.seconds,
        persist_result=True,
        # ``run`` is checked above, ``upstream`` made by the pipeline or the agent runner (whose own
        # parameters Prefect checks): Prefect's check here builds a pydantic model of the
        # signature when the flow is made (2 ms of its 5.5) and again at every call (2 ms more
        # each time an agent starts).
        validate_parameters=False,
    )


def _changes(checkout: AgentCheckout, moved: bool) -> tuple[AgentChanges, str]:
    """The agent's branch against its start, and the diff for its report (cut when long); ``moved``:
    whether a task's commit was tried (:func:`_run_tasks`)."""
    repo = Path(checkout.worktree)
    # A read-only agent's branch stays at its start; no other's moves unless a task committed.
    moved = moved and not checkout.shared
    head = run_git(repo, "rev-parse", "HEAD").stdout.strip() if moved else checkout.start
    return (changes_between(repo, checkout.branch, checkout.start, head),
            diff_text(repo, checkout.start, head, limit=DIFF_LIMIT))


async def _run_agent(
    spec: AgentSpec, run: RunConfig, upstream: dict[str, dict[str, Any]] | None
) -> AgentReport | State[AgentReport]:
    """The body of the agent's flow; raises AgentFailedError (with the report) when the agent fails."""
    started = time.monotonic()
    run = await _ask_approvals(spec, run)
    tasks = spec.task_list(run.contexts)
    announce(ProgressEvent("agent-started", spec.name, total=len(tasks)), run_key=run.run_key)
    progress = Progress(key=f"{spec.name}-progress", description=f"{spec.name}: tasks done")
    # The flow run carries the agent's tags; its task runs must not inherit them:
    # Prefect takes a tag concurrency slot (API writes) for every tagged task run,
    # and on a SQLite-backed server those writes stall runs for seconds.
    # The budgets of this agent run: a task's attempts (Prefect retries it here, in this
    # process) share its ledger and the agent's, so a retry cannot refill them.
    budget = AgentBudget(run.run_key, spec.name, agent_ledger(spec, run))
    calls = AgentCalls(run.run_key, spec.name)
    with TagsContext(current_tags=set()), use_agent_budget(budget), use_agent_calls(calls):
        try:
            records, failure, fatal, moved = await _run_tasks(spec, tasks, run, upstream or {}, progress, budget,
                                                              calls)
            if run.checkout is None:
                changes, diff = None, None
            elif moved:
                changes, diff = await asyncio.to_thread(_changes, run.checkout, True)
            else:  # no git to wait for: not worth a thread
                changes, diff = _changes(run.checkout, False)
        except BaseException:
            progress.discard()  # not left waiting out its interval after the flow run ended
            raise
    failed_tasks = [r for r in records if r.state == "failed"]
    if failure is None and failed_tasks:
        total = len(records)
        which = ", ".join(f"{r.index}/{total} ({r.priority})" for r in failed_tasks)
        failure_note: str | None = (f"task{'s' if len(failed_tasks) > 1 else ''} {which} failed; the agent "
                                    "went on (medium and low failures do not stop it)")
    else:
        failure_note = None
    report = AgentReport(
        agent=spec.name,
        state="failed" if failure else "completed-with-failures" if failed_tasks else "completed",
        reason=failure or failure_note,
        fatal=fatal,
        tasks=records,
        duration_s=time.monotonic() - started,
        changes=changes,
    )
    # For the UI only: written once the next agent the pipeline starts has begun, or soon
    # (toka.background), each on its own, so that one that fails leaves none unwaited for.
    await in_background(progress.close(), f"the progress of {spec.name}", deferred=True)
    await in_background(acreate_markdown_artifact(
        key=f"{spec.name}-report",
        markdown=agent_markdown(report, model=(await get_model(run.provider)).name, diff=diff),
        description=f"{spec.name}: task report",
    ), f"the report artifact of {spec.name}", deferred=True)
    await in_background(acreate_table_artifact(
        key=f"{spec.name}-results",
        table=agent_results_table(report),
        description=f"{spec.name}: what each task produced",
    ), f"the results artifact of {spec.name}", deferred=True)
    if failure is not None:
        raise AgentFailedError(f"{spec.name}: {failure}", report=report)
    return finished(report, failures=failure_note)
