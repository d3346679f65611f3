"""The pipeline: every selected agent, in dependency order, as Prefect subflows.

This module's ``pipeline`` is the deployment entrypoint
(``flows/pipeline.py:pipeline``). Agents whose dependencies are done start at
once, up to ``max_concurrency`` at a time; when slots are short, priority
(critical first) then name decides. An agent whose required dependency failed
does not run, and its report says which one. The run is Failed when any agent
failed or could not run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from prefect import flow, tags
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    aupdate_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.states import State

from flows.compiler import agent_tags, announce, compile_agent
from toka.config import DEFAULT_RETRIES, RunConfig
from toka.errors import ConfigError, PipelineFailedError, RunFailedError
from toka.graph import AgentGraph
from toka.limits import LimitSettings, check_limits
from toka.plan import make_plan
from toka.progress import ProgressEvent
from toka.budget import Ledger, use_ledger
from toka.providers import choose_model
from toka.report import pipeline_markdown
from toka.results import AgentReport, PipelineSummary, TaskRecord

__all__ = ["pipeline", "run_agents"]


@flow(
    name="toka-pipeline",
    description="Run Toka agent specs in dependency order, each agent as a subflow.",
    persist_result=True,
)
async def pipeline(
    specs: list[str] = ["agent_specs"],  # noqa: B006 - Prefect shows defaults in the UI form
    agents: list[str] = [],  # noqa: B006
    model: str = "auto",
    workspace: str = ".",
    max_concurrency: int = 4,
    contexts: list[str] = [],  # noqa: B006
    run_key: str | None = None,
    max_turns: int = 20,
    request_timeout: float = 600.0,
    task_timeout: float | None = None,
    retry_delay_seconds: float = 10.0,
    result_storage: str | None = None,
    max_tokens: int = 4096,
    temperature: float | None = None,
    max_attempts: int = 5,
    max_retry_wait: float = 120.0,
    api_key_secret: str | None = None,
    requests_per_minute: int | None = None,
    concurrent_requests: int | None = None,
    in_process_requests: int | None = None,
    task_token_budget: int | None = None,
    agent_token_budget: int | None = None,
    pipeline_token_budget: int | None = None,
    allow_unsandboxed: bool = False,
    approve: list[str] = [],  # noqa: B006
    deny: list[str] = [],  # noqa: B006
    approval_timeout: float = 3600.0,
) -> PipelineSummary:
    """Run the agents described by the spec files.

    Args:
        specs: Spec files or directories, relative to the working directory.
        agents: Run only these agents and their required dependencies (empty: all).
        model: 'auto' (Anthropic when ANTHROPIC_API_KEY is set, else offline), 'offline', or a model id.
        workspace: Directory the agents work in.
        max_concurrency: Most agents running at once.
        contexts: Switch on these contexts: their conditional tasks run too.
        run_key: Tasks finished under this key are not redone. Empty: this flow run's id, so a retry
            of this run resumes it while a new run starts fresh.
        max_turns: Model requests per task attempt.
        request_timeout: Seconds one model request may take.
        task_timeout: Seconds one task attempt may take (empty: the agent's timeout).
        retry_delay_seconds: Base delay between task retries.
        result_storage: A Prefect filesystem block slug for results shared between workers
            (empty: the local results directory).
        max_tokens: Output tokens per model response.
        temperature: Sampling temperature (empty: the provider's default).
        max_attempts: HTTP attempts for one model request when failures are transient.
        max_retry_wait: Seconds of waiting between those attempts, in all.
        api_key_secret: Name of a Prefect Secret block holding the Anthropic API key.
        requests_per_minute: Shared model request rate (needs `toka limits apply`).
        concurrent_requests: Shared concurrent model requests (needs `toka limits apply`).
        in_process_requests: Concurrent model requests from one process.
        task_token_budget: Tokens one task may spend (overrides the specs' budget blocks).
        agent_token_budget: Tokens one agent may spend (overrides the specs' budget blocks).
        pipeline_token_budget: Tokens the whole run may spend.
        allow_unsandboxed: Let agents whose spec says `sandbox: false` run commands unsandboxed.
        approve: Capabilities approved in advance (no pause for approval).
        deny: Capabilities denied in advance.
        approval_timeout: Seconds to wait for a person to approve in the UI; then it is a denial.
    """
    if max_concurrency < 1:
        raise ConfigError(f"max_concurrency must be at least 1, got {max_concurrency}")
    if not run_key:
        ctx = FlowRunContext.get()
        run_key = str(ctx.flow_run.id) if ctx and ctx.flow_run else uuid.uuid4().hex
    run = RunConfig(
        run_key=run_key,
        model=model,
        workspace=workspace,
        contexts=tuple(contexts),
        max_turns=max_turns,
        request_timeout=request_timeout,
        task_timeout=task_timeout,
        retries=dict(DEFAULT_RETRIES),
        retry_delay_seconds=retry_delay_seconds,
        result_storage=result_storage,
        max_tokens=max_tokens,
        temperature=temperature,
        max_attempts=max_attempts,
        max_retry_wait=max_retry_wait,
        api_key_secret=api_key_secret,
        requests_per_minute=requests_per_minute,
        concurrent_requests=concurrent_requests,
        in_process_requests=in_process_requests,
        task_token_budget=task_token_budget,
        agent_token_budget=agent_token_budget,
        pipeline_token_budget=pipeline_token_budget,
        allow_unsandboxed=allow_unsandboxed,
        approve=tuple(approve),
        deny=tuple(deny),
        approval_timeout=approval_timeout,
    )
    plan = make_plan(specs, agents=agents)
    limits = LimitSettings(run.requests_per_minute, run.concurrent_requests)
    if limits.uses_server and not choose_model(run).offline:
        missing = await check_limits(limits)
        if missing:
            raise ConfigError(
                f"model request limits are configured but missing on the Prefect server: "
                f"{', '.join(missing)}; create them with: toka limits apply"
                + (f" --requests-per-minute {run.requests_per_minute}" if run.requests_per_minute else "")
                + (f" --concurrent-requests {run.concurrent_requests}" if run.concurrent_requests else "")
            )
    return await run_agents(plan.graph, run, max_concurrency=max_concurrency)


async def run_agents(graph: AgentGraph, run: RunConfig, *, max_concurrency: int) -> PipelineSummary:
    """Schedule the agents of ``graph`` as subflows; return the summary or raise PipelineFailedError."""
    with use_ledger(Ledger("pipeline", run.pipeline_token_budget, scope="pipeline")) as ledger:
        return await _schedule(graph, run, max_concurrency=max_concurrency, ledger=ledger)


async def _schedule(graph: AgentGraph, run: RunConfig, *, max_concurrency: int, ledger: Ledger) -> PipelineSummary:
    started = time.monotonic()
    chosen = choose_model(run)
    flows = {name: compile_agent(spec) for name, spec in graph.agents.items()}
    reports: dict[str, AgentReport] = {}
    pending = set(graph.agents)
    running: dict[asyncio.Task[AgentReport], str] = {}
    progress = await acreate_progress_artifact(
        progress=0.0, key="toka-pipeline-progress", description="Agents finished"
    )

    async def run_one(name: str) -> AgentReport:
        upstream = {
            dep: {"kind": kind, "state": reports[dep].state, "results": reports[dep].results}
            for kind in ("required", "optional")
            for dep in graph.upstream(name, kind)  # type: ignore[arg-type]
            if dep in reports
        }
        with tags(*agent_tags(graph.agents[name])):
            state: State[Any] = await flows[name](run=run, upstream=upstream, return_state=True)
        if state.is_completed():
            report: AgentReport = await state.aresult()
            return report
        exc = await state.aresult(raise_on_failure=False)
        if isinstance(exc, RunFailedError) and isinstance(exc.report, AgentReport):
            return exc.report
        reason = str(exc) if isinstance(exc, BaseException) and str(exc) else (state.message or state.name)
        if isinstance(exc, TimeoutError):
            reason = f"timed out after {graph.agents[name].security.resource_limits.timeout}"
        return AgentReport(agent=name, state="failed", reason=reason)

    def not_run(name: str, reason: str) -> AgentReport:
        spec = graph.agents[name]
        tasks = spec.task_list(run.contexts)
        return AgentReport(
            agent=name,
            state="not-run",
            reason=reason,
            tasks=[
                TaskRecord(index=i, description=t.description, priority=t.priority,
                           state="not-run", error=f"not run: {reason}")
                for i, t in enumerate(tasks, 1)
            ],
        )

    stop: str | None = None  # a fatal error: start nothing new
    while pending or running:
        if stop is not None:
            for name in sorted(pending):
                reports[name] = not_run(name, f"not started: {stop}")
                announce(ProgressEvent("agent-finished", name, state="not-run", reason=reports[name].reason),
                         run_key=run.run_key)
            pending.clear()
        changed = True
        while changed:  # a skipped agent may make its own dependents skippable
            changed = False
            for name in sorted(pending):
                if not all(dep in reports for dep in graph.upstream(name)):
                    continue
                failed = [d for d in graph.upstream(name, "required") if reports[d].state != "completed"]
                if failed:
                    verb = "failed" if reports[failed[0]].state == "failed" else "did not run"
                    reports[name] = not_run(name, f"required dependency {failed[0]!r} {verb}")
                    pending.discard(name)
                    announce(ProgressEvent("agent-finished", name, state="not-run",
                                           reason=reports[name].reason), run_key=run.run_key)
                    changed = True
        ready = sorted(
            (n for n in pending if all(dep in reports for dep in graph.upstream(n))),
            key=graph.sort_key,
        )
        for name in ready[: max(0, max_concurrency - len(running))]:
            pending.discard(name)
            running[asyncio.create_task(run_one(name))] = name
        if not running:
            break
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for finished in done:
            name = running.pop(finished)
            reports[name] = finished.result()
            stop = stop or reports[name].fatal
            announce(ProgressEvent("agent-finished", name, state=reports[name].state,
                                   reason=reports[name].reason), run_key=run.run_key)
        await aupdate_progress_artifact(progress, progress=100.0 * len(reports) / len(graph))

    summary = PipelineSummary(
        run_key=run.run_key,
        model=chosen.model,
        offline=chosen.offline,
        state="completed" if all(r.state == "completed" for r in reports.values()) else "failed",
        agents=[reports[name] for name in graph.order()],
        duration_s=time.monotonic() - started,
        flow_run_id=_flow_run_id(),
        charged=ledger.charged,
        budget_tokens=ledger.limit,
    )
    await acreate_markdown_artifact(
        key="toka-pipeline-report", markdown=pipeline_markdown(summary, graph),
        description="Pipeline summary",
    )
    if summary.state == "failed":
        bad = [a for a in summary.agents if a.state != "completed"]
        raise PipelineFailedError(
            f"{len(bad)} of {len(summary.agents)} agents did not complete: "
            + "; ".join(f"{a.agent} ({a.state}: {a.reason})" for a in bad),
            report=summary,
        )
    return summary


def _flow_run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None
