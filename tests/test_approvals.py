"""Approvals end to end: a compiled agent flow pauses for a person, on a real Prefect API.

A concurrent coroutine plays the person: it finds the Paused flow run through the
API (as the UI would) and resumes it with an answer. A function model then asks
to write outside the spec's ``write_paths``, which only an approval allows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.flow_runs import aresume_flow_run
from prefect.states import State

from toka.compiler import compile_agent
from toka import AgentSpec
from toka.audit import read_audit
from toka.config import RunConfig
from toka.model import ModelRequest, ModelResponse, ToolResultBlock, override_model
from toka.results import AgentReport
from toka.testing import FunctionModel, submit, tool_call

from .conftest import minimal_spec

pytestmark = pytest.mark.usefixtures("prefect_server")

KEY = "write-outside-paths"
OUTSIDE = "notes/outside.md"  # not matched by the declared docs/*
# apause_flow_run first checks after min(timeout / 2, 10 s): 4 s lets a prompt answer land in ~2 s.
ANSWER_TIMEOUT = 4.0


def writer_spec() -> AgentSpec:
    # A unique name per test: the flow is named after the agent, so the watcher finds only this run.
    spec = minimal_spec(f"approver-{uuid.uuid4().hex[:8]}", tasks=2)
    spec["security"].update(capabilities_required=["filesystem-read", "filesystem-write"], write_paths=["docs/*"])
    return AgentSpec.from_dict(spec)


def tool_results(request: ModelRequest) -> list[ToolResultBlock]:
    return [b for b in request.messages[-1].content if isinstance(b, ToolResultBlock)]


def writer_model() -> FunctionModel:
    """Task 1 writes outside docs/ once, then submits; task 2 just submits (the agent goes on)."""

    def answer(request: ModelRequest) -> ModelResponse:
        if request.metadata["task"] == "1" and not tool_results(request):
            return tool_call("write_file", path=OUTSIDE, content="# outside\n")
        return submit(summary=f"task {request.metadata['task']} done")

    return FunctionModel(answer, name="writer")


async def find_paused(flow_name: str, *, within: float) -> FlowRun:
    """Poll the API for the agent's flow run in a Paused state, as a person's UI would."""
    only_paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + within
    async with get_client() as client:
        while time.monotonic() < deadline:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                               flow_run_filter=only_paused)
            if runs:
                return runs[0]
            await asyncio.sleep(0.1)
    raise AssertionError(f"flow {flow_name!r} never paused within {within} s")


@dataclass
class Outcome:
    result: AgentReport | BaseException
    states: list[State]  # the flow run's whole state history, from the API
    model: FunctionModel
    seconds: float  # wall time of the agent flow
    paused: FlowRun | None  # the run as the person saw it when it was paused


async def run_agent(
    spec: AgentSpec, workspace: Path, *, answer: dict[str, Any] | None = None, limit: float = 30.0,
    as_subflow: bool = False, **options: Any,
) -> Outcome:
    """Run the compiled agent flow with pause_for_approval; answer the pause with ``answer`` if given.

    ``as_subflow`` runs it inside a parent flow, as the pipeline does; ``limit`` bounds the whole
    run, so a flow that never leaves Paused fails the test instead of hanging it.
    """
    model = writer_model()
    run = RunConfig.from_flat({"run_key": f"k-{spec.name}", "workspace": str(workspace), "retry_delay_seconds": 0,
                               **options}).model_copy(update={"pause_for_approval": True})
    agent_flow = compile_agent(spec)

    async def agent() -> State:
        with override_model(model):
            if not as_subflow:
                return await agent_flow(run, return_state=True)
            states: list[State] = []

            @flow(name=f"pipeline-{spec.name}")
            async def parent() -> None:
                states.append(await agent_flow(run, return_state=True))

            await parent()
            return states[0]

    async def person() -> FlowRun | None:
        if answer is None:
            return None
        paused = await find_paused(spec.name, within=limit)
        await aresume_flow_run(paused.id, run_input=answer)
        return paused

    started = time.monotonic()
    state, paused = await asyncio.wait_for(asyncio.gather(agent(), person()), timeout=limit)
    seconds = time.monotonic() - started
    async with get_client() as client:
        states = await client.read_flow_run_states(state.state_details.flow_run_id)
    return Outcome(await state.aresult(raise_on_failure=False), states, model, seconds, paused)


def write_result(outcome: Outcome) -> ToolResultBlock:
    """What went back to the model for its write_file call (task 1, second request)."""
    follow_up = [r for r in outcome.model.history if r.metadata["task"] == "1" and tool_results(r)]
    assert len(follow_up) == 1, outcome.model.history
    return tool_results(follow_up[0])[0]


def audit_decisions(workspace: Path, spec: AgentSpec) -> list[tuple[str, str, Any]]:
    return [(r["tool"], r["decision"], r["arguments"].get("path"))
            for r in read_audit(workspace / ".toka", run=f"k-{spec.name}", agent=spec.name)]


def assert_paused_for(outcome: Outcome, spec: AgentSpec, *, timeout: int) -> State:
    """The run was Paused under the agent's key, waiting for input, with the expected timeout."""
    paused = [s for s in outcome.states if s.type == StateType.PAUSED]
    assert len(paused) == 1, [s.name for s in outcome.states]
    details = paused[0].state_details
    assert details.pause_key == f"approve-{spec.name}"
    assert details.run_input_keyset  # the UI shows the ApprovalInput form
    assert details.pause_timeout is not None
    assert round((details.pause_timeout - paused[0].timestamp).total_seconds()) == timeout
    return paused[0]


def assert_went_on(outcome: Outcome) -> AgentReport:
    """A refusal is the model's to handle: both tasks complete either way."""
    report = outcome.result
    assert isinstance(report, AgentReport), report
    assert report.state == "completed"
    assert [t.state for t in report.tasks] == ["completed", "completed"]
    return report


def test_approved_pause_allows_the_write_outside_paths(tmp_path: Path) -> None:
    spec = writer_spec()
    outcome = asyncio.run(run_agent(spec, tmp_path, answer={"approve": True, "note": "ok"},
                                    approval_timeout=ANSWER_TIMEOUT))

    assert outcome.paused is not None and outcome.paused.state is not None
    assert outcome.paused.state.is_paused()  # seen Paused by the person before any task ran
    assert_paused_for(outcome, spec, timeout=int(ANSWER_TIMEOUT))
    result = write_result(outcome)
    assert not result.is_error and f"created {OUTSIDE}" in result.content
    assert (tmp_path / OUTSIDE).read_text() == "# outside\n"
    assert audit_decisions(tmp_path, spec) == [("write_file", "allowed", OUTSIDE)]
    report = assert_went_on(outcome)
    assert report.tasks[0].refused_calls == 0


def test_denied_pause_refuses_the_write_and_the_agent_goes_on(tmp_path: Path) -> None:
    spec = writer_spec()
    outcome = asyncio.run(run_agent(spec, tmp_path, answer={"approve": False, "note": "no"},
                                    approval_timeout=ANSWER_TIMEOUT))

    assert_paused_for(outcome, spec, timeout=int(ANSWER_TIMEOUT))
    result = write_result(outcome)
    assert result.is_error and f"needs approval ({KEY!r}) and it was denied" in result.content
    assert not (tmp_path / OUTSIDE).exists()
    assert audit_decisions(tmp_path, spec) == [("write_file", "refused", OUTSIDE)]
    report = assert_went_on(outcome)
    assert report.tasks[0].refused_calls == 1


@pytest.fixture(scope="session")  # not module: see the warm server's fixture (test_warm.py)
def unanswered(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[AgentSpec, Path, Outcome]:
    """One run shared by the two tests below: nobody answers, the 2 s pause times out."""
    spec, workspace = writer_spec(), tmp_path_factory.mktemp("unanswered")
    # ``limit`` stops a flow that would never get out of Paused instead of hanging the session.
    return spec, workspace, asyncio.run(run_agent(spec, workspace, approval_timeout=2, limit=25.0))


def test_no_answer_within_the_timeout_is_a_denial(unanswered: tuple[AgentSpec, Path, Outcome]) -> None:
    spec, workspace, outcome = unanswered
    assert_paused_for(outcome, spec, timeout=2)
    # The pause ended within its timeout plus a small margin (the whole agent run included).
    assert outcome.seconds < 2 + 4, outcome.seconds
    result = write_result(outcome)
    assert result.is_error and f"needs approval ({KEY!r}) and it was denied" in result.content
    assert not (workspace / OUTSIDE).exists()
    assert audit_decisions(workspace, spec) == [("write_file", "refused", OUTSIDE)]
    # Both tasks ran to completion after the denial.
    assert len([r for r in outcome.model.history if r.metadata["task"] == "2"]) == 1


def test_after_a_timeout_the_agent_run_completes(unanswered: tuple[AgentSpec, Path, Outcome]) -> None:
    _, _, outcome = unanswered
    assert_went_on(outcome)


def test_pause_works_for_an_agent_subflow(tmp_path: Path) -> None:
    # Deployment runs pause agents as subflows of the pipeline; a non-rescheduling pause is allowed there.
    spec = writer_spec()
    outcome = asyncio.run(run_agent(spec, tmp_path, answer={"approve": True}, as_subflow=True,
                                    approval_timeout=ANSWER_TIMEOUT))
    assert outcome.paused is not None and outcome.paused.parent_task_run_id is not None  # really a subflow
    assert_paused_for(outcome, spec, timeout=int(ANSWER_TIMEOUT))
    assert (tmp_path / OUTSIDE).read_text() == "# outside\n"
    assert_went_on(outcome)


def test_approval_given_in_advance_never_pauses(tmp_path: Path) -> None:
    spec = writer_spec()
    outcome = asyncio.run(run_agent(spec, tmp_path, approve=(KEY,), approval_timeout=ANSWER_TIMEOUT))

    assert [s for s in outcome.states if s.type == StateType.PAUSED] == []
    assert not write_result(outcome).is_error
    assert (tmp_path / OUTSIDE).read_text() == "# outside\n"
    assert audit_decisions(tmp_path, spec) == [("write_file", "allowed", OUTSIDE)]
    assert_went_on(outcome)
