"""Deployment entrypoints that run agents one at a time.

* ``agent`` (flow ``toka-agent``): one agent of ``agent_specs/`` together with
  its required dependencies, exactly as ``pipeline(agents=[agent])`` would. The
  per-agent deployments of ``prefect.yaml`` (``toka-agent/<agent>``, generated
  by ``toka deployments``) run it.
* ``agent_runner`` (flow ``toka-agent-runner``): exactly ONE agent, given the
  results of its dependencies. A pipeline in distributed mode starts one run of
  this deployment per agent (``run_deployment``) instead of a subflow, so agents
  spread over every worker of the pool; the run returns the agent's report,
  which the pipeline reads from result storage.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from prefect import flow, tags
from prefect.states import State

from flows.compiler import agent_tags, compile_agent, failed, finished, run_name
from flows.pipeline import Mode, NeedsApproval, pipeline
from toka.budget import Ledger, use_ledger
from toka.config import RunConfig
from toka.deployments import AGENT_RUNNER_DEPLOYMENT, AgentRunOutcome
from toka.errors import AgentFailedError, ConfigError, TokaError, UnknownAgentError
from toka.plan import make_plan
from toka.results import AgentReport, PipelineSummary

__all__ = ["agent", "agent_runner"]


def _agent_run_name() -> str:
    from prefect.runtime import flow_run

    return run_name(f"toka-agent {flow_run.parameters.get('agent', '')}".rstrip())


@flow(
    name="toka-agent",
    flow_run_name=_agent_run_name,
    description="Run one Toka agent together with its required dependencies.",
    persist_result=True,
)
async def agent(
    agent: str,
    specs: list[str] = ["agent_specs"],  # noqa: B006 - Prefect shows defaults in the UI form
    model: str = "auto",
    workspace: str = ".",
    max_concurrency: Annotated[int, Field(ge=1)] = 4,
    contexts: list[str] = [],  # noqa: B006
    run_key: str | None = None,
    max_turns: Annotated[int, Field(ge=1)] = 20,
    request_timeout: Annotated[float, Field(gt=0)] = 600.0,
    task_timeout: Annotated[float | None, Field(gt=0)] = None,
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 10.0,
    result_storage: str | None = None,
    api_key_secret: str | None = None,
    requests_per_minute: int | None = None,
    concurrent_requests: int | None = None,
    task_token_budget: int | None = None,
    agent_token_budget: int | None = None,
    pipeline_token_budget: int | None = None,
    allow_unsandboxed: bool = False,
    approve: list[str] = [],  # noqa: B006
    deny: list[str] = [],  # noqa: B006
    approval_timeout: Annotated[float, Field(gt=0)] = 3600.0,
    needs_approval: list[NeedsApproval] | None = None,
    mode: Mode = "in-process",
    agent_deployment: str = AGENT_RUNNER_DEPLOYMENT,
) -> PipelineSummary | State[PipelineSummary]:
    """Run one agent and the agents it requires, in dependency order.

    Args:
        agent: The agent to run (its `metadata.name`); its required dependencies run first.
        specs: Spec files or directories, relative to the working directory.
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
        api_key_secret: Name of a Prefect Secret block holding the Anthropic API key.
        requests_per_minute: Shared model request rate (needs `toka limits apply`).
        concurrent_requests: Shared concurrent model requests (needs `toka limits apply`).
        task_token_budget: Tokens one task may spend (overrides the specs' budget blocks).
        agent_token_budget: Tokens one agent may spend (overrides the specs' budget blocks).
        pipeline_token_budget: Tokens the whole run may spend.
        allow_unsandboxed: Let agents whose spec says `sandbox: false` run commands unsandboxed.
        approve: Capabilities approved in advance (no pause for approval).
        deny: Capabilities denied in advance.
        approval_timeout: Seconds to wait for a person to approve in the UI; then it is a denial.
        needs_approval: Uses that pause for approval (empty: network-access, git-push and
            write-outside-paths; [] for none).
        mode: 'in-process' (agents are subflows) or 'distributed' (agents are agent-runner runs).
        agent_deployment: The agent-runner deployment used in distributed mode.
    """
    return await pipeline.fn(
        specs=specs, agents=[agent], model=model, workspace=workspace, max_concurrency=max_concurrency,
        contexts=contexts, run_key=run_key, max_turns=max_turns, request_timeout=request_timeout,
        task_timeout=task_timeout, retry_delay_seconds=retry_delay_seconds, result_storage=result_storage,
        api_key_secret=api_key_secret, requests_per_minute=requests_per_minute,
        concurrent_requests=concurrent_requests, task_token_budget=task_token_budget,
        agent_token_budget=agent_token_budget, pipeline_token_budget=pipeline_token_budget,
        allow_unsandboxed=allow_unsandboxed, approve=approve, deny=deny, approval_timeout=approval_timeout,
        needs_approval=needs_approval,
        mode=mode, agent_deployment=agent_deployment,
    )


@flow(
    name="toka-agent-runner",
    description="Run exactly one Toka agent for a distributed pipeline, given its dependencies' results.",
    persist_result=True,
)
async def agent_runner(
    agent: str,
    run: RunConfig,
    specs: list[str] = ["agent_specs"],  # noqa: B006
    spec_digest: str | None = None,
    upstream: dict[str, dict[str, Any]] = {},  # noqa: B006
    pipeline_spent: int = 0,
) -> AgentRunOutcome | State[AgentRunOutcome]:
    """Run one agent (not its dependencies) and return its report.

    Args:
        agent: The agent to run (its `metadata.name`).
        run: The pipeline's run settings (run key, model, workspace, limits, budgets).
        specs: Spec files or directories, relative to the working directory.
        spec_digest: The agent spec's digest as the pipeline saw it; a different spec here is an error.
        upstream: Results of the agent's dependencies, as the pipeline passes them.
        pipeline_spent: Tokens the pipeline had spent when this agent started (for its budget).
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
    with use_ledger(Ledger("pipeline", run.pipeline_token_budget, scope="pipeline", spent=pipeline_spent)) as ledger:
        with tags(*agent_tags(spec)):
            state = await compile_agent(spec)(run=run, upstream=upstream, return_state=True)
        outcome = await state.aresult(raise_on_failure=False)
    charged, spent = ledger.charged, ledger.spent - pipeline_spent
    if state.is_completed() and isinstance(outcome, AgentReport):
        # Named like the agent's own flow run when some of its tasks failed.
        failures = outcome.reason if outcome.state == "completed-with-failures" else None
        return finished(AgentRunOutcome(report=outcome, charged=charged, spent=spent), failures=failures)
    if not isinstance(outcome, BaseException):
        outcome = AgentFailedError(f"{agent}: {state.message or state.name}")
    # The pipeline reads this run's result: the agent's own exception (its report, a timeout, ...)
    # with what the agent charged attached (exception attributes survive pickling).
    outcome.toka_charged = charged  # type: ignore[attr-defined]
    outcome.toka_spent = spent  # type: ignore[attr-defined]
    if isinstance(outcome, TokaError):
        return failed(outcome)  # raised, Prefect would log its repr: an AgentFailedError's holds the report
    raise outcome
