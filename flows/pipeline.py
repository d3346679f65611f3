"""Deployment entrypoint ``flows/pipeline.py:pipeline``: every selected agent, in dependency order.

A thin flow over :func:`toka.pipeline.run_pipeline` (the same flow ``toka run``
runs, under the same name). Its parameters are the run settings of
:mod:`toka.config`, one group each: the Prefect UI shows them as a form in
sections, validated by the same models as ``toka run``'s options.
"""

from __future__ import annotations

from prefect import flow
from prefect.states import State

from toka.config import Approvals, Budgets, Limits, ProviderSettings, RunOptions
from toka.pipeline import DEFAULT_SPECS, PIPELINE_FLOW, run_pipeline
from toka.results import PipelineSummary

__all__ = ["pipeline"]


@flow(**PIPELINE_FLOW)
async def pipeline(
    specs: list[str] = DEFAULT_SPECS,
    agents: list[str] = [],  # noqa: B006 - Prefect shows defaults in the UI form
    run: RunOptions = RunOptions(),
    provider: ProviderSettings = ProviderSettings(),
    limits: Limits = Limits(),
    budgets: Budgets = Budgets(),
    approvals: Approvals = Approvals(),
) -> PipelineSummary | State[PipelineSummary]:
    """Run the agents described by the spec files (see toka.pipeline.run_pipeline).

    Args:
        specs: Spec files or directories, relative to the working directory.
        agents: Run only these agents and their required dependencies (empty: all).
        run: Which run (its key), the workspace, contexts, how many agents at once, result storage
            and the mode (in-process or distributed).
        provider: The model ('auto', 'offline' or a model id) and how it is called.
        limits: Turns, timeouts and retry delays of one task.
        budgets: Token budgets per task, agent and run.
        approvals: Uses that need approval, approved or denied in advance, and the sandbox.
    """
    return await run_pipeline(specs, agents, run, provider, limits, budgets, approvals)
