"""Deployment entrypoints that run agents one at a time.

* ``agent`` (flow ``toka-agent``): one agent of ``agent_specs/`` together with
  its required dependencies, exactly as ``pipeline(agents=[agent])`` would. The
  per-agent deployments of ``prefect.yaml`` (``toka-agent/<agent>``, generated
  by ``toka deployments``) run it.
* ``agent_runner`` (flow ``toka-agent-runner``): exactly ONE agent, given the
  results of its dependencies. A pipeline in distributed mode starts one run of
  this deployment per agent (``run_deployment``) instead of a subflow, so agents
  spread over every worker of the pool; the run's result is an
  ``AgentRunOutcome``, which the pipeline reads from result storage.

Both are thin flows over :mod:`toka.pipeline`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import State

from toka.compiler import run_name
from toka.config import Approvals, Budgets, Limits, ProviderSettings, RunConfig, RunOptions
from toka.pipeline import DEFAULT_SPECS, run_one_agent, run_pipeline
from toka.results import AgentRunOutcome, PipelineSummary

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
    specs: list[str] = DEFAULT_SPECS,
    run: RunOptions = RunOptions(),
    provider: ProviderSettings = ProviderSettings(),
    limits: Limits = Limits(),
    budgets: Budgets = Budgets(),
    approvals: Approvals = Approvals(),
) -> PipelineSummary | State[PipelineSummary]:
    """Run one agent and the agents it requires, in dependency order.

    Args:
        agent: The agent to run (its `metadata.name`); its required dependencies run first.
        specs: Spec files or directories, relative to the working directory.
        run: Which run (its key), the workspace, contexts, how many agents at once, result storage
            and the mode (in-process or distributed).
        provider: The model ('auto', 'offline' or a model id) and how it is called.
        limits: Turns, timeouts and retry delays of one task.
        budgets: Token budgets per task, agent and run.
        approvals: Uses that need approval, approved or denied in advance, and the sandbox.
    """
    return await run_pipeline(specs, [agent], run, provider, limits, budgets, approvals)


@flow(
    name="toka-agent-runner",
    description="Run exactly one Toka agent for a distributed pipeline, given its dependencies' results.",
    persist_result=True,
)
async def agent_runner(
    agent: str,
    run: RunConfig,
    specs: list[str] = DEFAULT_SPECS,
    spec_digest: str | None = None,
    upstream: dict[str, dict[str, Any]] = {},  # noqa: B006
    pipeline_spent: int = 0,
) -> AgentRunOutcome | State[AgentRunOutcome]:
    """Run one agent (not its dependencies) and return its report.

    Args:
        agent: The agent to run (its `metadata.name`).
        run: The pipeline's resolved run settings (run key, model, workspace, limits, budgets).
        specs: Spec files or directories, relative to the working directory.
        spec_digest: The agent spec's digest as the pipeline saw it; a different spec here is an error.
        upstream: Results of the agent's dependencies, as the pipeline passes them.
        pipeline_spent: Tokens the pipeline had spent when this agent started (for its budget).
    """
    return await run_one_agent(agent, run, specs, spec_digest, upstream, pipeline_spent)
