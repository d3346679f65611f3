"""The pipeline: every selected agent, in dependency order, as Prefect subflows.

:func:`run_pipeline` is the body of the ``toka-pipeline`` flow: the deployment
entrypoint ``flows/pipeline.py:pipeline`` calls it, and ``toka run`` runs it
as :data:`pipeline_flow` (the same flow name, so both kinds of runs are one
flow in the UI). Agents whose dependencies are done start at once, up to
``max_concurrency`` at a time; when slots are short, priority (critical
first) then name decides. An agent whose required dependency failed does not
run, and its report says which one. The run is Failed when any agent failed
or could not run; when agents completed but some of their (medium or low)
tasks failed, it is ``completed-with-failures``, a Completed flow run named
``CompletedWithFailures``.

Two modes share everything but the step that runs one agent: ``in-process``
(the default) calls the compiled agent flow as a subflow; ``distributed``
starts it as a run of the agent-runner deployment (``run_deployment``), so
agents spread over every worker of the pool, and reads its persisted result
(an :class:`~toka.results.AgentRunOutcome`, made by :func:`run_one_agent`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.artifacts import acreate_markdown_artifact
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK
from prefect.states import Cancelled, State
from pydantic import BaseModel

from .background import in_background, start_deferred, to_the_end, writes_finished
from .branches import (
    RunBranches,
    RunChanges,
    agent_checkout,
    finish_run,
    open_run,
    push_run,
    ref_part,
    tidy_worktrees,
)
from .budget import Ledger, use_ledger
from .capabilities import changes_files
from .compiler import (
    Progress,
    agent_tags,
    announce,
    ask_approval,
    compile_agent,
    failed,
    finished,
    result_storage,
    run_name,
)
from .config import AGENT_RUNNER_DEPLOYMENT, GROUPS, Approvals, Budgets, Limits, ProviderSettings, RunConfig, RunOptions
from .errors import (
    AgentFailedError,
    BranchError,
    ConfigError,
    MergeConflictError,
    PipelineFailedError,
    RunFailedError,
    TokaError,
    UnknownAgentError,
)
from .graph import AgentGraph
from .journal import remove_empty_journals
from .limits import LimitSettings, check_limits
from .plan import Plan, check_contexts, make_plan
from .policy import check_unsandboxed
from .progress import ProgressEvent, listen, tell_branch
from .providers import choose_model, get_model
from .redact import redact, secret_values
from .report import pipeline_markdown
from .results import AgentReport, AgentRunOutcome, PipelineSummary, TaskRecord
from .specset import DEFAULT_SPEC_DIR
from .spec import AgentSpec
from .workspace import Workspace

__all__ = [
    "DEFAULT_SPECS",
    "PIPELINE_FLOW",
    "Distributed",
    "pipeline_flow",
    "run_agents",
    "run_one_agent",
    "run_pipeline",
    "use_plan",
]

#: The ``specs`` parameter's default.
DEFAULT_SPECS: list[str] = [str(DEFAULT_SPEC_DIR)]


def _pipeline_run_name() -> str:
    """``toka-pipeline <date> <workspace> (run <key>)``: runs of several repositories tell apart in
    the UI, and a resumed run names the run it goes on with (the workspace and key as given)."""
    from prefect.runtime import flow_run

    run = flow_run.parameters.get("run")
    if isinstance(run, BaseModel):
        run = run.model_dump()
    if not isinstance(run, dict):
        return run_name("toka-pipeline")
    workspace = Path(str(run.get("workspace") or ".")).resolve().name
    key = run.get("run_key")
    return run_name("toka-pipeline") + (f" {workspace}" if workspace else "") + (f" (run {key})" if key else "")


#: The options of the ``toka-pipeline`` flow, wherever it is defined.
PIPELINE_FLOW: dict[str, Any] = {
    "name": "toka-pipeline",
    "flow_run_name": _pipeline_run_name,
    "description": "Run Toka agent specs in dependency order, each agent as a subflow.",
    "persist_result": True,
}

# A plan the caller already made (``toka run`` validates the specs before the run starts):
# the pipeline uses it instead of loading the same files again.
_given_plan: ContextVar[tuple[tuple[str, ...], tuple[str, ...], Plan] | None] = ContextVar(
    "toka_given_plan", default=None
)


@contextmanager
def use_plan(plan: Plan, specs: list[str], agents: list[str]) -> Iterator[None]:
    """Pipelines run in this context on ``specs`` and ``agents`` use ``plan`` as it is."""
    token = _given_plan.set((tuple(specs), tuple(agents), plan))
    try:
        yield
    finally:
        _given_plan.reset(token)


def _plan(specs: list[str], agents: list[str]) -> Plan:
    given = _given_plan.get()
    if given is not None and given[:2] == (tuple(specs), tuple(agents)):
        return given[2]
    return make_plan(specs, agents=agents)


async def run_pipeline(
    specs: list[str], agents: list[str], run: RunOptions, provider: ProviderSettings, limits: Limits,
    budgets: Budgets, approvals: Approvals,
) -> PipelineSummary | State[PipelineSummary]:
    """Run the agents of ``specs`` (all, or ``agents`` with their required dependencies).

    Returns the summary (in a Completed state named ``CompletedWithFailures`` when some agent's
    medium or low tasks failed). When an agent failed or did not run, or a setting is unusable (a
    model without an API key), returns a Failed state whose message is one line and whose result is
    the error (PipelineFailedError, with the summary; ConfigError, ...). Runs are named
    ``toka-pipeline <date>``. The parameters are those of ``flows/pipeline.py:pipeline``.
    """
    try:
        if not run.run_key:
            ctx = FlowRunContext.get()
            run_key = str(ctx.flow_run.id) if ctx and ctx.flow_run else uuid.uuid4().hex
            run = run.model_copy(update={"run_key": run_key})
        config = RunConfig.of(run, provider=provider, limits=limits, budgets=budgets, approvals=approvals)
        plan = _plan(list(specs), list(agents))
        check_contexts(plan, config.contexts)
        check_unsandboxed(list(plan.graph.agents.values()), allowed=approvals.allow_unsandboxed)
        # A model id without an API key, a Secret block that does not exist: said here, once,
        # before any agent starts (each would fail the same way).
        await get_model(provider)
        await result_storage(config.result_storage)
        ctx = FlowRunContext.get()
        if ctx and ctx.flow_run and ctx.flow_run.deployment_id is not None:
            config = config.model_copy(update={"pause_for_approval": True})  # a person can answer in the UI
        await _check_request_limits(provider)
        distributed = None
        if run.mode == "distributed":
            distributed = Distributed(specs=[str(s) for s in specs], deployment=run.agent_deployment)
            await _check_deployment(run.agent_deployment)
        branches = None
        if not run.in_place:
            branches = await asyncio.to_thread(
                open_run, Path(run.workspace), Workspace(run.workspace).make_state_dir(), config.run_key,
                base=run.base, include_uncommitted=run.include_uncommitted)
        else:
            get_run_logger().warning("in place: the agents edit %s directly, all in the same tree (no branches)",
                                     run.workspace)
        async with writes_finished():  # the agents' report artifacts, written in the background
            summary = await run_agents(plan.graph, config, distributed=distributed, branches=branches)
        remove_empty_journals(Workspace(run.workspace).state_dir, config.run_key)  # finished tasks' are gone
        return finished(summary, failures=_failures(summary))
    except TokaError as e:  # a bad setting, a missing API key, failed agents: one line in the UI
        return failed(e)


def _flow_parameters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the deployment entrypoint's parameters and defaults: specs, agents, one per group."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [inspect.Parameter("specs", kind, default=DEFAULT_SPECS, annotation=list[str]),
         inspect.Parameter("agents", kind, default=[], annotation=list[str]),
         *(inspect.Parameter(name, kind, default=model(), annotation=model) for name, model in GROUPS.items())],
        return_annotation=inspect.signature(fn).return_annotation,
    )

    @functools.wraps(fn)
    async def with_defaults(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return await fn(**bound.arguments)

    with_defaults.__signature__ = signature  # type: ignore[attr-defined]
    return with_defaults


#: ``toka-pipeline`` as ``toka run`` runs it: the same name, parameters and defaults as the
#: deployment entrypoint ``flows/pipeline.py:pipeline``, whose literal definition Prefect reads.
pipeline_flow = flow(_flow_parameters(run_pipeline), **PIPELINE_FLOW)


async def _check_request_limits(provider: ProviderSettings) -> None:
    limits = LimitSettings(provider.requests_per_minute, provider.concurrent_requests)
    if not limits.uses_server or choose_model(provider).offline:
        return
    missing = await check_limits(limits)
    if missing:
        raise ConfigError(
            f"model request limits are configured but missing on the Prefect server: "
            f"{', '.join(missing)}; create them with: toka limits apply"
            + (f" --requests-per-minute {provider.requests_per_minute}" if provider.requests_per_minute else "")
            + (f" --concurrent-requests {provider.concurrent_requests}" if provider.concurrent_requests else "")
        )


@dataclass(frozen=True)
class Distributed:
    """Run each agent as a run of ``deployment`` (see ``flows/agent.py:agent_runner``)."""

    specs: list[str]
    """The spec paths, as the runner (in the deployment's working directory) finds them."""
    deployment: str = AGENT_RUNNER_DEPLOYMENT
    poll_interval: float = 1.0
    """Seconds between reads of a running agent's state."""


#: Runs one agent with its upstream results; returns the run's result (an
#: AgentReport or the exception it failed with) and its state message.
AgentExecutor = Callable[[str, dict[str, dict[str, Any]], RunConfig], Awaitable[tuple[Any, str]]]


async def run_agents(
    graph: AgentGraph, run: RunConfig, *, distributed: Distributed | None = None,
    branches: RunBranches | None = None,
) -> PipelineSummary:
    """Schedule the agents of ``graph`` (subflows, or deployment runs when ``distributed``), each on
    its own branch of ``branches`` (None: in the workspace itself).

    Returns the summary or raises PipelineFailedError.
    """
    with use_ledger(Ledger("pipeline", run.budgets.pipeline_token_budget, scope="pipeline")) as ledger:
        if distributed is None:
            execute = _in_process(graph, run)
        else:
            execute = _distributed(graph, run, distributed, ledger)
        return await _schedule(graph, run, ledger=ledger, execute=execute, branches=branches)


def _in_process(graph: AgentGraph, run: RunConfig) -> AgentExecutor:
    flows = {name: compile_agent(spec) for name, spec in graph.agents.items()}

    async def execute(name: str, upstream: dict[str, dict[str, Any]], run: RunConfig) -> tuple[Any, str]:
        with tags(*agent_tags(graph.agents[name])):
            state: State[Any] = await flows[name](run=run, upstream=upstream, return_state=True)
        return await state.aresult(raise_on_failure=False), state.message or state.name or ""

    return execute


def _distributed(graph: AgentGraph, run: RunConfig, settings: Distributed, ledger: Ledger) -> AgentExecutor:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.deployments import arun_deployment

    chosen = choose_model(run.provider)
    if run.provider.model == "auto" and chosen.provider != "override":
        # Decide here, once: a worker without the key must fail, not quietly run offline.
        run = run.model_copy(update={"provider": run.provider.model_copy(update={"model": chosen.model})})
    earlier: dict[str, Any] | None = None
    lookup = asyncio.Lock()

    async def earlier_run(client: Any, name: str) -> Any:
        """This agent's run from an earlier attempt of this pipeline run (a UI retry), if any."""
        nonlocal earlier
        ctx = FlowRunContext.get()
        if not ctx or not ctx.flow_run or ctx.flow_run.run_count <= 1:
            return None
        async with lookup:
            if earlier is None:
                earlier = {}
                deployment = await client.read_deployment_by_name(settings.deployment)
                # limit and sort given explicitly: the server rejects nulls for them.
                runs = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[ctx.flow_run.id])
                    ),
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=0,
                )
                for r in sorted(runs, key=lambda r: r.created or r.expected_start_time):
                    earlier[str(r.parameters.get("agent"))] = r  # the newest wins
        return earlier.get(name)

    async def execute(name: str, upstream: dict[str, dict[str, Any]], run: RunConfig) -> tuple[Any, str]:
        try:
            return await run_remote(name, upstream, run)
        except Exception as e:  # the API failed us: this agent failed, the pipeline goes on and reports it
            return e, f"{type(e).__name__}: {e}"

    async def run_remote(name: str, upstream: dict[str, dict[str, Any]], run: RunConfig) -> tuple[Any, str]:
        spec = graph.agents[name]
        async with get_client() as client:
            # As Prefect does with subflows when a run is retried: an agent that completed in an
            # earlier attempt is not run again, one still running is waited for, others start afresh.
            child = await earlier_run(client, name)
            paid = child is not None and child.state is not None and child.state.is_completed()
            reused = paid or (child is not None and child.state is not None and not child.state.is_final())
            if not reused:
                parameters = {
                    "agent": name,
                    "specs": settings.specs,
                    "spec_digest": spec.digest(),
                    "run": run.model_dump(mode="json"),
                    "upstream": upstream,
                    "pipeline_spent": ledger.spent,
                }
                job_variables = None
                # The runner's own result (the report read below) goes where the tasks' go, and
                # where this run's goes when its storage came from a job variable of its own.
                storage = run.result_storage or PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK.value()
                if storage:
                    job_variables = {"env": {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": storage}}
                child = await arun_deployment(
                    settings.deployment, client=client, parameters=parameters, timeout=0, as_subflow=True,
                    tags=agent_tags(spec), flow_run_name=run_name(name), job_variables=job_variables,
                )
            get_run_logger().info(
                "agent %s: %s flow run %s of deployment %s", name,
                "reusing" if reused else "started", child.id, settings.deployment,
            )
            try:
                while child.state is None or not child.state.is_final():
                    await asyncio.sleep(settings.poll_interval)
                    child = await client.read_flow_run(child.id)
            except asyncio.CancelledError:
                # The pipeline was cancelled or timed out: do not leave the agent running.
                await asyncio.shield(_cancel(client, child.id))
                raise
        state = child.state
        outcome = await state.aresult(raise_on_failure=False)
        if isinstance(outcome, AgentRunOutcome):
            if not paid:  # a reused result was paid for by an earlier attempt
                ledger.charged = ledger.charged + outcome.charged
                ledger.spent += outcome.spent
            outcome = outcome.error if outcome.error is not None else outcome.report
        return outcome, state.message or state.name or ""

    return execute


async def _check_deployment(name: str) -> None:
    """Distributed mode needs the agent-runner deployment on the server this run talks to."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        async with get_client() as client:
            await client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ConfigError(
            f"distributed mode needs the deployment {name!r}, which this Prefect server does not have; "
            "create it with `prefect deploy --all` from the repository root"
        ) from None
    except ValueError as e:  # a name without '/'
        raise ConfigError(f"agent_deployment must be 'flow-name/deployment-name', got {name!r}: {e}") from None


async def _cancel(client: Any, flow_run_id: Any) -> None:
    """Cancel a deployment run: directly if no worker runs it yet, else through its worker."""
    from prefect.states import Cancelled, Cancelling

    current = (await client.read_flow_run(flow_run_id)).state
    if current is not None and current.is_final():
        return
    # A run no process executes yet would stay Cancelling for ever (measured): cancel it outright.
    waiting = current is None or current.is_scheduled() or current.is_pending()
    await client.set_flow_run_state(flow_run_id, Cancelled() if waiting else Cancelling(), force=True)


async def _schedule(
    graph: AgentGraph, run: RunConfig, *, ledger: Ledger, execute: AgentExecutor, branches: RunBranches | None,
) -> PipelineSummary:
    started = time.monotonic()
    chosen = choose_model(run.provider)
    max_concurrency = run.max_concurrency
    reports: dict[str, AgentReport] = {}
    pending = set(graph.agents)
    running: dict[asyncio.Task[AgentReport], str] = {}
    # Made and updated in the background: the next agents start without waiting for the API.
    progress = Progress(key="toka-pipeline-progress", description="Agents finished")

    async def run_one(name: str) -> AgentReport:
        upstream = {
            dep: {"kind": kind, "state": reports[dep].state, "results": reports[dep].results}
            for kind in ("required", "optional")
            for dep in graph.upstream(name, kind)  # type: ignore[arg-type]
            if dep in reports
        }
        agent_run = run
        if branches is not None:
            # Its branch starts from the work of its dependencies that ran, merged in plan order.
            deps = [d for d in graph.order() if d in upstream and reports[d].is_completed()]
            try:
                spec = graph.agents[name]
                read_only = not changes_files(spec.security.capabilities_required)
                checkout = await asyncio.to_thread(agent_checkout, branches, name, deps, read_only=read_only,
                                                   tasks=len(spec.task_list(run.contexts)))
                if checkout.restarted:
                    said = (f"its dependencies ran again: it starts again from their work as it is now "
                            f"({checkout.restarted[:12]}); its own work is set aside, a task replayed from the cache "
                            "gets its work back")
                    get_run_logger().warning("%s: %s", name, said)
                    tell_branch(name, said)
            except MergeConflictError as e:
                reason = f"not started: {e}"
                await _show_not_run(graph.agents[name], reason)
                return AgentReport(agent=name, state="not-run", reason=reason, tasks=task_rows(name, reason, {}))
            except BranchError as e:  # git failed: this agent cannot start, the others go on
                reason = f"its worktree could not be made: {e}"
                return AgentReport(agent=name, state="failed", reason=reason, tasks=task_rows(name, reason, {}))
            agent_run = run.model_copy(update={"checkout": checkout})
        outcome, message = await execute(name, upstream, agent_run)
        if isinstance(outcome, AgentReport):
            return outcome
        if isinstance(outcome, RunFailedError) and isinstance(outcome.report, AgentReport):
            return outcome.report
        reason = str(outcome) if isinstance(outcome, BaseException) and str(outcome) else message
        if isinstance(outcome, TimeoutError):
            reason = f"timed out after {graph.agents[name].security.resource_limits.timeout}"
        # The agent flow ended without its report (a timeout, a crash): its tasks as far as
        # this process saw them finish, the rest not run.
        reason = redact(reason, secret_values()) if reason else reason
        return AgentReport(agent=name, state="failed", reason=reason or "failed",
                           tasks=task_rows(name, reason or "failed", seen_tasks.get(name, {})))

    def task_rows(name: str, reason: str, states: dict[int, str]) -> list[TaskRecord]:
        tasks = graph.agents[name].task_list(run.contexts)
        return [
            TaskRecord(index=i, description=t.description, priority=t.priority,
                       state=states.get(i, "not-run"),  # type: ignore[arg-type]
                       error=None if i in states else f"not run: {reason}")
            for i, t in enumerate(tasks, 1)
        ]

    async def skip(name: str, reason: str) -> None:
        """``name`` will not run: its report, its marker run in the UI, and the event."""
        reports[name] = AgentReport(agent=name, state="not-run", reason=reason, tasks=task_rows(name, reason, {}))
        await _show_not_run(graph.agents[name], reason)
        announce(ProgressEvent("agent-finished", name, state="not-run", reason=reason), run_key=run.run_key)

    seen_tasks: dict[str, dict[int, str]] = {}  # agent -> task index -> state, from progress events

    def remember(event: ProgressEvent) -> None:
        if event.kind == "task-finished" and event.task is not None and event.state:
            seen_tasks.setdefault(event.agent, {})[event.task] = event.state
        elif event.kind == "agent-started":
            start_deferred()  # the reports of the agents that finished before it, now it is under way

    stop: str | None = None  # a fatal error: start nothing new
    try:
        with listen(remember):
            while pending or running:
                if stop is not None:
                    for name in sorted(pending):
                        await skip(name, f"not started: {stop}")
                    pending.clear()
                changed = True
                while changed:  # a skipped agent may make its own dependents skippable
                    changed = False
                    for name in sorted(pending):
                        if not all(dep in reports for dep in graph.upstream(name)):
                            continue
                        failed = [d for d in graph.upstream(name, "required") if not reports[d].is_completed()]
                        if failed:
                            verb = "failed" if reports[failed[0]].state == "failed" else "did not run"
                            pending.discard(name)
                            await skip(name, f"required dependency {failed[0]!r} {verb}")
                            changed = True
                ready = sorted(
                    (n for n in pending if all(dep in reports for dep in graph.upstream(n))),
                    key=graph.sort_key,
                )
                starting = ready[: max(0, max_concurrency - len(running))]
                for name in starting:
                    pending.discard(name)
                    running[asyncio.create_task(run_one(name))] = name
                if not starting:  # no agent's start to keep clear of: the reports go now
                    start_deferred()
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for ended in done:
                    name = running.pop(ended)
                    reports[name] = ended.result()
                    stop = stop or reports[name].fatal
                    announce(ProgressEvent("agent-finished", name, state=reports[name].state,
                                           reason=reports[name].reason), run_key=run.run_key)
                progress.set(100.0 * len(reports) / len(graph))
    except BaseException:
        progress.discard()  # cancelled, or a bug: nothing left waiting out its interval
        # Nor an agent left at work (and paying for requests) on its own: each is stopped, and
        # its run ends, before the pipeline's does (a distributed one's run is cancelled).
        for agent in running:
            agent.cancel()
        if running:
            await asyncio.wait(running)
        raise
    await in_background(progress.close(), "the run's progress")
    changes = None
    if branches is not None:
        completed = [n for n in graph.order() if reports[n].is_completed()]
        try:
            changes = await asyncio.to_thread(finish_run, branches, completed, tidy=False)
        except BranchError as e:  # the agents' branches hold their work all the same: say so, report the run
            get_run_logger().error("the run's branch could not be made (each agent's branch has its work): %s", e)
        else:
            await in_background(_tidy(branches, completed), "the removal of the run's worktrees")
        if changes is not None and run.push:
            changes = await _push(branches, changes, run)
    return await _summarise(graph, run, reports, chosen, ledger, started, changes)


async def _tidy(branches: RunBranches, agents: list[str]) -> None:
    """Remove the agents' worktrees (their branches hold the work); the run ends when this has."""
    try:
        await to_the_end(lambda: tidy_worktrees(branches, agents))
    except (BranchError, OSError) as e:  # disk left used, nothing lost: a resume of the run or `toka discard` tidies
        get_run_logger().warning("the run's worktrees were not all removed: %s", e)


async def _push(branches: RunBranches, changes: RunChanges, run: RunConfig) -> RunChanges:
    """Push the run's branch to ``run.push``, when git-push is approved for this run (it is a git-push use)."""
    approvals = run.approvals
    approved = "git-push" not in approvals.deny and (
        "git-push" not in approvals.needs_approval or "git-push" in approvals.approve)
    if not approved and "git-push" not in approvals.deny and run.pause_for_approval:
        approved = await ask_approval(
            f"Push the run's branch **{changes.branch}** ({len(changes.files_changed)} files changed) to "
            f"**{run.push}** as `toka/{ref_part(run.run_key)}`?", key="approve-push",
            timeout=approvals.approval_timeout)
    if approved:
        note = await asyncio.to_thread(push_run, branches, changes, run.push or "")
    else:
        note = "not pushed: git-push needs approval (--approve git-push)"
    get_run_logger().info("%s", note)
    return dataclasses.replace(changes, pushed=note)


async def _summarise(graph: AgentGraph, run: RunConfig, reports: dict[str, AgentReport], chosen: Any,
                     ledger: Ledger, started: float, changes: RunChanges | None = None) -> PipelineSummary:
    """The pipeline's summary and report artifact; raises PipelineFailedError when an agent failed."""
    if not all(r.is_completed() for r in reports.values()):
        state = "failed"
    elif any(r.state == "completed-with-failures" for r in reports.values()):
        state = "completed-with-failures"
    else:
        state = "completed"
    summary = PipelineSummary(
        run_key=run.run_key,
        model=chosen.model,
        offline=chosen.offline,
        state=state,
        agents=[reports[name] for name in graph.order()],
        duration_s=time.monotonic() - started,
        flow_run_id=_flow_run_id(),
        charged=ledger.charged,
        budget_tokens=ledger.limit,
        changes=changes,
    )
    await in_background(acreate_markdown_artifact(  # beside the run's last writes, all waited for at its end
        key="toka-pipeline-report", markdown=pipeline_markdown(summary, graph),
        description="Pipeline summary",
    ), "the pipeline's report artifact")
    if summary.state == "failed":
        raise PipelineFailedError(redact(_failure_line(summary), secret_values()), report=summary)
    return summary


def _failure_line(summary: PipelineSummary) -> str:
    """Why the pipeline failed, in one line (its run's state message): what stopped the run, which
    agents failed and which did not run, then the first failure's reason (the part cut when long)."""
    bad = [a for a in summary.agents if not a.is_completed()]
    failed_agents = [a for a in bad if a.state == "failed"]
    fatal = next((a for a in summary.agents if a.fatal), None)
    parts = [f"{len(bad)} of {len(summary.agents)} agents did not complete"]
    if failed_agents:
        parts.append(f"failed: {', '.join(a.agent for a in failed_agents)}")
    if len(failed_agents) < len(bad):
        parts.append(f"not run: {', '.join(a.agent for a in bad if a.state != 'failed')}")
    line = "; ".join(parts)
    if fatal is not None:  # e.g. the API key was rejected, or no such model: the one thing to fix
        return f"stopped by {fatal.agent}: {fatal.fatal}. {line}"
    first = failed_agents[0] if failed_agents else bad[0]
    return f"{line}. {first.agent}: {first.reason or first.state}"


def _failures(summary: PipelineSummary) -> str | None:
    """For a pipeline completed with failures: which agents had failed tasks (its state's message)."""
    if summary.state != "completed-with-failures":
        return None
    return "failed tasks in: " + "; ".join(
        f"{a.agent} ({a.reason})" for a in summary.agents if a.state == "completed-with-failures")


async def _show_not_run(spec: AgentSpec, reason: str) -> None:
    """A run of the agent's flow that ends at once, Cancelled with the reason: the UI shows why it did not run."""

    async def not_run() -> State[None]:
        return Cancelled(name="NotRun", message=reason)

    marker = flow(not_run, name=spec.name, flow_run_name=f"{spec.name} (not run)", persist_result=False,
                  description=f"{spec.name} did not run")
    with tags(*agent_tags(spec)):
        await marker(return_state=True)


def _flow_run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


async def run_one_agent(
    agent: str,
    run: RunConfig,
    specs: list[str],
    spec_digest: str | None = None,
    upstream: dict[str, dict[str, Any]] | None = None,
    pipeline_spent: int = 0,
) -> AgentRunOutcome | State[AgentRunOutcome]:
    """The body of the agent-runner flow: one agent (not its dependencies) for a distributed pipeline.

    Returns what the pipeline reads from the run's result: an :class:`AgentRunOutcome` with the
    agent's report, or the error it failed with, and what it charged (in a Failed state when it failed).
    """
    try:
        graph = make_plan(specs).graph
        spec = graph.agents.get(agent)
        if spec is None:
            raise UnknownAgentError(f"no agent named {agent!r} in {', '.join(specs)}")
        if spec_digest and spec.digest() != spec_digest:
            raise ConfigError(
                f"the spec of {agent!r} differs from the one the pipeline started with (digest "
                f"{spec.digest()} here, {spec_digest} there): every worker needs the same checkout"
            )
    except TokaError as e:  # one line in the UI, not a traceback
        return failed(e)
    budget = run.budgets.pipeline_token_budget
    with use_ledger(Ledger("pipeline", budget, scope="pipeline", spent=pipeline_spent)) as ledger:
        with tags(*agent_tags(spec)):
            async with writes_finished(hold_deferred=False):  # no other agent's start to wait for
                state = await compile_agent(spec)(run=run, upstream=upstream or {}, return_state=True)
        result = await state.aresult(raise_on_failure=False)
    charged, spent = ledger.charged, ledger.spent - pipeline_spent
    if state.is_completed() and isinstance(result, AgentReport):
        # Named like the agent's own flow run when some of its tasks failed.
        failures = result.reason if result.state == "completed-with-failures" else None
        return finished(AgentRunOutcome(report=result, charged=charged, spent=spent), failures=failures)
    if not isinstance(result, BaseException):
        result = AgentFailedError(f"{agent}: {state.message or state.name}")
    outcome = AgentRunOutcome(error=result, charged=charged, spent=spent)
    error = result if isinstance(result, TokaError) else AgentFailedError(f"{agent}: {type(result).__name__}: {result}")
    return failed(error, data=outcome)
