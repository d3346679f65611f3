"""The one generic Prefect task: an LLM-assisted step for one spec task.

The compiler (:mod:`toka.compiler`) specialises it per spec task with ``.with_options(name=...,
retries=..., timeout_seconds=...)``. Results are persisted under a cache key
made from what determines the answer (spec content, task position, earlier
and upstream results, model settings) plus the run key, so a retried or
resumed run replays finished tasks instead of paying for them again, while a
new run (new key) does the work afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.events import emit_event
from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ConfigDict

from .audit import AuditLog, audit_path, run_file_name
from .branches import AgentCheckout, set_aside_edits, set_aside_from_task
from .budget import Ledger, current_agent_budget, current_ledger
from .capabilities import grant_tools
from .config import RunConfig
from .context import context_window
from .errors import ReplayDiverged, TokaError
from .journal import Journal, journal_path
from .model import Usage
from .policy import AgentPolicy
from .progress import ProgressEvent, notify, tell_branch
from .prompt import system_prompt, task_message
from .providers import get_model
from .results import TaskOutcome, current_agent_calls
from .spec import AgentSpec
from .step import StepLimits, run_step
from .tools import Toolbox, ToolContext, workspace_settling
from .workspace import Workspace

__all__ = ["StepCachePolicy", "StepInput", "is_retryable", "llm_step"]


class StepInput(BaseModel):
    """Everything one task needs; plain data, so it survives persistence and processes."""

    model_config = ConfigDict(frozen=True)

    spec: AgentSpec
    spec_digest: str
    index: int
    """1-based position in the agent's task list."""
    prior: list[dict[str, Any]] = []
    """Results of the agent's earlier tasks in this run."""
    upstream: dict[str, dict[str, Any]] = {}
    """Dependency name -> {'kind': ..., 'results': [...]} for the agents this one depends on."""
    run: RunConfig
    model_fingerprint: dict[str, Any] = {}
    agent_spent: int = 0
    """Tokens the agent had spent when this task started (budget accounting when the task runs
    outside an agent flow; not part of the cache key)."""

    @property
    def max_turns(self) -> int:
        """The task's own turn limit, else the run's."""
        own = self.spec.task_list(self.run.contexts)[self.index - 1].max_turns
        return own or self.run.limits.max_turns

    def cache_key(self) -> str:
        material = {
            "spec": self.spec_digest,
            "task": self.index,
            "contexts": list(self.run.contexts),
            "prior": self.prior,
            "upstream": self.upstream,
            "model": self.model_fingerprint,
            "max_turns": self.max_turns,
            "run": self.run.run_key,
        }
        if self.run.checkout is not None and self.run.checkout.start_tree:
            # The files its dependencies left, which the task's work was made on (see AgentCheckout).
            material["start"] = self.run.checkout.start_tree
        blob = json.dumps(material, sort_keys=True, default=str).encode()
        return f"toka-{self.spec.name}-{self.index}-{hashlib.sha256(blob).hexdigest()[:32]}"


@dataclass
class StepCachePolicy(CachePolicy):
    """Cache key = :meth:`StepInput.cache_key` (what matters for the answer, and the run key)."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        step = inputs.get("step")
        if isinstance(step, quote):  # the compiler passes it quoted (not walked by Prefect)
            step = step.unquote()
        return step.cache_key() if isinstance(step, StepInput) else None


def is_retryable(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry timeouts and errors marked retryable, nothing else.

    Permanent failures (invalid request, authentication, permission, budget,
    spec errors) and programming errors are never retried.
    """
    exc = state.data if isinstance(state.data, BaseException) else None
    if isinstance(exc, TokaError):
        return exc.retryable
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError))


def _mirror_as_event(record: dict[str, Any]) -> None:
    """Each audit record is also a Prefect event (already redacted)."""
    emit_event(
        event=f"toka.tool.{record.get('decision', 'called')}",
        resource={
            "prefect.resource.id": f"toka.agent.{record.get('agent')}.task.{record.get('task')}",
            "prefect.resource.name": str(record.get("agent")),
        },
        related=[{"prefect.resource.id": f"toka.tool.{record.get('tool')}", "prefect.resource.role": "tool"}],
        payload=record,
    )


def _has_entries(journal: Journal) -> bool:
    try:
        return journal.path.stat().st_size > 0
    except FileNotFoundError:
        return False


async def _set_aside(checkout: AgentCheckout, run_key: str, index: int, total: int, why: str,
                     logger: Any) -> str | None:
    """Set the worktree's uncommitted edits (task ``index``'s) aside on the agent's branch
    (:func:`set_aside_edits`), so the task starting now starts from its last commit; return the
    commit holding them (None: there were none). The previous task's commit lands first."""
    settling = workspace_settling.get()
    if settling is not None and not settling.done():
        await asyncio.wait([settling])  # shielded: a cancelled attempt must not cancel a commit
    commit = await asyncio.to_thread(set_aside_edits, checkout, run_key=run_key, index=index, total=total, why=why)
    if commit is not None:
        logger.warning("task %d/%d's uncommitted edits are set aside on %s (in %s). %s",
                       index, total, checkout.branch, commit[:12], why)
        tell_branch(checkout.agent, f"task {index}/{total}'s uncommitted edits set aside (in {commit[:12]})")
    return commit


async def _set_aside_earlier_work(checkout: AgentCheckout, run_key: str, index: int, total: int,
                                  logger: Any) -> None:
    """A task of a resumed run that runs again though the branch holds its or a later task's
    finished commit (its cache key changed: the spec was edited, or an earlier task's result;
    or it failed): that work is set aside (:func:`set_aside_from_task`), so what it does now is
    what the branch holds."""
    settling = workspace_settling.get()
    if settling is not None and not settling.done():
        await asyncio.wait([settling])
    commit = await asyncio.to_thread(set_aside_from_task, checkout, run_key=run_key, index=index, total=total)
    if commit is not None:
        logger.warning("task %d/%d runs again (its spec, settings or an earlier task's result changed since it was "
                       "done): its earlier work and the later tasks' are set aside on %s (in %s)",
                       index, total, checkout.branch, commit[:12])
        tell_branch(checkout.agent, f"task {index}/{total} runs again (its spec, settings or an earlier task's result "
                                    f"changed): its earlier work and the later tasks' set aside (in {commit[:12]})")


def _budgets(step: StepInput, total: int) -> tuple[Ledger, Ledger]:
    """The task's and the agent's ledgers for this attempt.

    Inside an agent flow they are the agent run's (:class:`toka.budget.AgentBudget`),
    so a Prefect retry, which runs in the same process and agent run, goes on
    from what the earlier attempts spent. Run on its own, the task gets fresh
    ledgers: its budget covers this attempt, the agent's starts from ``agent_spent``.
    """
    spec, run = step.spec, step.run
    name = f"task ({spec.name} {step.index}/{total})"
    limit = run.budgets.task_token_budget or spec.budget.task_tokens
    budget = current_agent_budget()
    if budget is not None:
        task_ledger = budget.task_ledger(run.run_key, spec.name, step.index, name=name, limit=limit)
        if task_ledger is not None:
            return task_ledger, budget.ledger
    return Ledger(name, limit, scope="task"), agent_ledger(spec, run, spent=step.agent_spent)


def agent_ledger(spec: AgentSpec, run: RunConfig, *, spent: int = 0) -> Ledger:
    """The agent budget of ``spec`` in ``run``: the run's override, else the spec's own."""
    return Ledger(f"agent ({spec.name})", run.budgets.agent_token_budget or spec.budget.agent_tokens,
                  spent=spent, scope="agent")


@task(
    name="llm-step",
    persist_result=True,
    cache_policy=StepCachePolicy(),
    retry_condition_fn=is_retryable,
)
async def llm_step(step: StepInput) -> TaskOutcome:
    """Run the model loop for task ``step.index`` of ``step.spec`` and return its outcome."""
    # The body lives in a plain function: Prefect reads this function's source every time
    # the compiler specialises it (.with_options), about 8 ms for the whole body.
    return await _run_llm_step(step)


async def _run_llm_step(step: StepInput) -> TaskOutcome:
    spec, run = step.spec, step.run
    tasks = spec.task_list(run.contexts)
    model = await get_model(run.provider)
    granted, withheld = grant_tools(spec.security.capabilities_required)
    workspace = Workspace(run.workspace)
    if run.checkout is not None:  # the agent's own worktree; the run's state stays in the workspace's
        workspace = Workspace(run.checkout.root, state_dir=workspace.state_dir)
    # The model may read back its own saved outputs in this run, no other agent's or run's.
    workspace.outputs = workspace.state_dir / "outputs" / run_file_name(run.run_key) / spec.name
    approvals = run.approvals
    policy = AgentPolicy.for_spec(
        spec, allow_unsandboxed=approvals.allow_unsandboxed, needs_approval=frozenset(approvals.needs_approval),
        approvals=frozenset(approvals.approve), denials=frozenset(approvals.deny),
    )
    workspace.make_state_dir()  # on a worker too: .toka ignores itself before anything is written
    audit = AuditLog(audit_path(workspace.state_dir, run.run_key), run=run.run_key, on_record=_mirror_as_event)
    ctx = ToolContext(workspace=workspace, agent=spec.name, task=step.index, policy=policy, audit=audit)
    toolbox = Toolbox(granted, ctx, withheld=withheld)
    upstream_results = {name: dep["results"] for name, dep in step.upstream.items()}
    ctx_run = TaskRunContext.get()
    attempt = ctx_run.task_run.run_count if ctx_run and ctx_run.task_run else 1
    task_ledger, agent_ledger = _budgets(step, len(tasks))
    agent_calls = current_agent_calls()  # the agent run's tool-call counts, across this task's attempts
    calls = agent_calls.task(run.run_key, spec.name, step.index) if agent_calls is not None else None
    ledgers = [task_ledger, agent_ledger]
    pipeline_ledger = current_ledger()
    if pipeline_ledger is not None:
        ledgers.append(pipeline_ledger)
    logger = get_run_logger()

    def before_request() -> None:
        for ledger in ledgers:
            ledger.check()

    def after_request(usage: Usage) -> None:
        for ledger in ledgers:
            ledger.charge(usage)
        logger.info(
            "model request: %d input, %d output, %d cache-write, %d cache-read tokens",
            usage.input_tokens, usage.output_tokens, usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens,
        )

    def on_replayed(usage: Usage) -> None:
        for ledger in ledgers:
            ledger.carry(usage)

    # The guard around one logical request must leave room for the provider's own retries.
    guard = model.worst_case_seconds() or run.provider.request_timeout
    managed = run.provider.context_management
    window = None if managed == "off" else context_window(model.name, run.provider.context_window)
    outputs = workspace.outputs / str(step.index)

    def save_output(text: str) -> str:
        outputs.mkdir(parents=True, exist_ok=True)
        path = outputs / f"{len(list(outputs.iterdir())) + 1:04d}.txt"
        path.write_text(text, encoding="utf-8")
        return workspace.saved_output_name(path)

    journal = Journal(journal_path(workspace.state_dir, run.run_key, spec.name, step.index), logger=logger)
    checkout = run.checkout
    cut_short = journal.unfinished_call() if checkout is not None else None
    if checkout is not None and cut_short is not None:
        # Stopped while a tool that changes files ran (SIGTERM with an edit in its thread, a full
        # disk): done or not, its result was not recorded; replayed, it would be done again.
        await _set_aside(checkout, run.run_key, step.index, len(tasks),
                         f"The attempt before stopped while {cut_short} ran, so what it changed is not "
                         "known; this one starts over.", logger)
        journal.discard()
    if checkout is not None and (attempt > 1 or checkout.reused) and not _has_entries(journal):
        # An attempt that starts afresh where an earlier one left edits: a retry whose journal was
        # dropped (the model's malformed results end an attempt so), or a resume of such a task. Done
        # again on top of them, each change would land twice. On a resume that runs an earlier task
        # again (its spec was edited), they are the later task's that was in flight, named so.
        later = [j for j in (Journal(journal_path(workspace.state_dir, run.run_key, spec.name, i), logger=logger)
                             for i in range(step.index + 1, len(tasks) + 1)) if _has_entries(j)]
        owner = int(later[-1].path.stem) if later and attempt == 1 else step.index
        why = ("An earlier attempt ended without a result and its turns were not kept; this one starts over."
               if owner == step.index else
               f"Task {owner}/{len(tasks)} was in flight when the run stopped; task {step.index}/{len(tasks)} runs "
               "again before it, from the last commit.")
        if owner != step.index:
            for stale in later:  # their tools' effects go with the edits: replayed, they would be missing
                stale.discard()  # (first: a kill after the set-aside must not leave them)
        await _set_aside(checkout, run.run_key, owner, len(tasks), why, logger)
    if checkout is not None and (checkout.reused or checkout.remade) and not _has_entries(journal):
        await _set_aside_earlier_work(checkout, run.run_key, step.index, len(tasks), logger)
    step_args: dict[str, Any] = dict(
        model=model,
        system=system_prompt(spec, tools=toolbox.names, on_branch=run.checkout is not None),
        task_message=task_message(spec, tasks, step.index, prior=step.prior, upstream=upstream_results),
        toolbox=toolbox,
        metric_names=[m.name for m in spec.reporting.metrics],
        limits=StepLimits(max_turns=step.max_turns, request_timeout=guard, max_tokens=run.provider.max_tokens,
                          context_window=window, context_threshold=run.provider.context_threshold,
                          server_context=managed == "server",
                          tool_output_limit=run.limits.tool_output_limit),
        metadata={"agent": spec.name, "task": str(step.index), "run": run.run_key},
        before_request=before_request,
        after_request=after_request,
        on_replayed=on_replayed,
        journal=journal,
        calls_counter=calls.token if calls is not None else "",
        save_output=save_output,
        log=lambda line: logger.info("%s", line),
        on_turn=lambda turn: notify(ProgressEvent("task-turn", spec.name, task=step.index, total=len(tasks),
                                                  turn=turn)),
        on_context=lambda kind, data: emit_event(
            event=f"toka.context.{kind}",
            resource={"prefect.resource.id": f"toka.agent.{spec.name}.task.{step.index}",
                      "prefect.resource.name": spec.name},
            payload={"run_key": run.run_key, **data},
        ),
    )
    try:
        try:
            result = await run_step(**step_args, restart_on_divergence=checkout is not None)
        except ReplayDiverged as diverged:
            assert checkout is not None
            journal.discard()
            await _set_aside(checkout, run.run_key, step.index, len(tasks),
                             f"{str(diverged)[:1].upper()}{str(diverged)[1:]}: done again on top of their own "
                             "effects, they would land twice.", logger)
            result = await run_step(**step_args)
    except TokaError as e:
        e.attempt = attempt  # for reports: a retried task's failure says how many attempts it took
        e.usage = task_ledger.charged  # every attempt so far
        e.carried = task_ledger.carried
        raise
    finally:
        # Every attempt's calls count: failed ones, and timed-out ones (Prefect's timeout cancels
        # this coroutine, and the cancellation passes here too).
        if calls is not None:
            calls.add(len(toolbox.calls), sum(1 for c in toolbox.calls if c.refused))
    # Done. The journal stays until Prefect has persisted the result (the agent flow removes it
    # then): a kill in between would otherwise leave neither, and the task would be paid again.
    tool_calls, refused_calls = (calls.calls, calls.refused) if calls is not None else (
        result.tool_calls, result.refused_calls)
    return TaskOutcome(
        agent=spec.name,
        index=step.index,
        description=tasks[step.index - 1].description,
        result=result.result,
        # Every attempt of the task, not just this one, so the task's figure (and, on a
        # resume, what it carries forward) matches what the pipeline was charged.
        usage=task_ledger.charged,
        turns=result.turns,
        tool_calls=tool_calls,
        refused_calls=refused_calls,
        files_read=result.files_read,
        files_changed=result.files_changed,
        model=model.name,
        duration_s=result.duration_s,
        attempt=attempt,
        compactions=result.context.compactions,
        tokens_cleared=result.context.tokens_cleared,
        replayed=result.replayed,
        carried=result.carried,
    )
