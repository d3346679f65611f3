"""Task accounting: what reports say a task did matches what it did.

* Tool calls are counted over every attempt of a task (failed attempts, timed-out
  ones, ones Prefect retried), as the audit trail records them; before, a failed
  task reported none and a retried one only its last attempt's.
* A command's own timeout is a tool result the model acts on, not a failure of
  the task (which Prefect would retry, repeating every turn and side effect).
* An agent whose medium or low tasks failed says so: ``completed-with-failures``
  in its report, the ``--json`` summary, the terminal and Prefect's UI.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from toka.audit import read_audit
from toka.errors import TransientModelError
from toka.model import ModelRequest, ModelResponse, ToolResultBlock, override_model
from toka.results import PipelineSummary
from toka.testing import FunctionModel, submit, tool_call
from toka.tools import ToolCall

from .conftest import minimal_spec, run_pipeline
from .test_sandbox import MakeAgent, make_agent  # noqa: F401 (fixture)


def run(folder: Path, model: Any, *, run_key: str, **options: Any) -> tuple[Any, PipelineSummary]:
    async def go() -> tuple[Any, PipelineSummary]:
        with override_model(model):
            return await run_pipeline(folder, run_key=run_key, **options)

    return asyncio.run(go())


def several(*calls: tuple[str, dict[str, Any]]) -> ModelResponse:
    """One response asking for several tool calls."""
    responses = [tool_call(name, **args) for name, args in calls]
    return responses[0].model_copy(update={"content": [b for r in responses for b in r.content]})


THREE_CALLS = several(("list_dir", {"path": "."}), ("read_file", {"path": "../outside.txt"}),
                      ("delete_everything", {}))  # one allowed, two refused
MALFORMED = submit(status="finished")  # not a status: the loop refuses it; three fail the attempt (retryable)


def last_tool_results(request: ModelRequest) -> list[ToolResultBlock]:
    return [b for b in request.messages[-1].content if isinstance(b, ToolResultBlock)]


async def _newest_artifact(key: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        response = await client._client.post(
            "/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1})
        response.raise_for_status()
        return response.json()[0]


def audited(folder: Path, run_key: str, agent: str) -> tuple[int, int]:
    records = [r for r in read_audit(folder / ".toka", run=run_key, agent=agent)]
    return len(records), sum(1 for r in records if r["decision"] == "refused")


# -- tool calls over every attempt ------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
class TestToolCallCounts:
    def test_a_failed_task_counts_the_calls_of_every_attempt(self, write_specs: Any) -> None:
        spec = minimal_spec("counter", tasks=1)  # medium: one Prefect retry
        spec["security"]["capabilities_required"] = ["filesystem-read"]
        folder = write_specs(spec)

        def answer(request: ModelRequest) -> ModelResponse:
            return THREE_CALLS if len(request.messages) == 1 else MALFORMED

        model = FunctionModel(answer)
        _, summary = run(folder, model, run_key="count-failed")
        task = summary.agents[0].tasks[0]
        assert (task.state, task.attempts) == ("failed", 2) and "InvalidToolInputError" in task.error
        assert len(model.history) == 8  # per attempt: the calls, then three malformed results
        # Both attempts' calls, as audited (it said 0 and 0).
        assert (task.tool_calls, task.refused_calls) == (6, 4) == audited(folder, "count-failed", "counter")
        row = summary.to_dict()["agents"][0]["tasks"][0]
        assert (row["tool_calls"], row["refused_calls"]) == (6, 4)
        report = asyncio.run(_newest_artifact("counter-report"))["data"]
        assert "| 6 (4) |" in report

    def test_a_completed_task_counts_the_calls_of_its_retried_attempts(self, write_specs: Any) -> None:
        spec = minimal_spec("retried", tasks=1)
        spec["security"]["capabilities_required"] = ["filesystem-read"]
        folder = write_specs(spec)
        replies: list[Any] = [
            several(("list_dir", {"path": "."}), ("delete_everything", {})),  # attempt 1: 2 calls, 1 refused
            TransientModelError("529 overloaded"),  # ... then the attempt fails; Prefect retries it
            tool_call("list_dir", path="."),  # attempt 2: 1 call
            submit(summary="listed"),
        ]

        def answer(request: ModelRequest) -> ModelResponse:
            reply = replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply

        _, summary = run(folder, FunctionModel(answer), run_key="count-retried")
        task = summary.agents[0].tasks[0]
        assert (task.state, task.attempts) == ("completed", 2)
        assert (task.tool_calls, task.refused_calls) == (3, 1) == audited(folder, "count-retried", "retried")

    def test_a_timed_out_attempt_counts_its_calls(self, write_specs: Any) -> None:
        spec = minimal_spec("sleepy", tasks=1, priority="low")
        spec["security"]["capabilities_required"] = ["filesystem-read"]
        folder = write_specs(spec)

        async def answer(request: ModelRequest) -> ModelResponse:
            if len(request.messages) == 1:
                return tool_call("list_dir", path=".")
            await asyncio.sleep(120)  # Prefect's task timeout cancels the attempt here
            raise AssertionError("not reached")

        model = FunctionModel(answer)
        _, summary = run(folder, model, run_key="count-timeout", task_timeout=1.0)
        task = summary.agents[0].tasks[0]
        assert task.state == "failed" and "timed out" in task.error.lower() and task.attempts == 2
        # The timed-out attempt's call counts; the retry replays it from the task's journal
        # (its first response too) instead of running it again, and asks only what was in flight.
        assert (task.tool_calls, task.refused_calls) == (1, 0) == audited(folder, "count-timeout", "sleepy")
        assert len(model.history) == 3


# -- a command's own timeout is the model's to handle ----------------------------------------------


def test_a_command_timeout_is_an_error_result_with_its_usage(make_agent: MakeAgent) -> None:
    agent = make_agent("script-execution", limits={"timeout": "30s"})
    script = agent.script("slow.sh", "#!/bin/sh\nsleep 30\n")
    out = agent.run(script, timeout=0.5)
    assert out.is_error
    assert out.text == ("killed after 0.5 s (timeout): the command ran past its timeout and was killed with "
                        "everything it started; its output is lost; a timeout of up to 30 s may be asked for")
    record = agent.audited("run_command", "allowed")
    assert record["is_error"] is True and record["exit_code"] is None
    assert record["usage"]["killed_for"] == "timeout" and 0.5 <= record["usage"]["wall_s"] < 2.5
    assert agent.toolbox.calls == [ToolCall("run_command", refused=False, is_error=True)]


@pytest.mark.usefixtures("prefect_server")
def test_a_command_timeout_does_not_fail_or_retry_the_task(write_specs: Any) -> None:
    spec = minimal_spec("runner", tasks=1)
    spec["security"]["capabilities_required"] = ["script-execution"]
    folder = write_specs(spec)
    script = folder / "slow.sh"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(0o755)
    seen: list[ToolResultBlock] = []

    def answer(request: ModelRequest) -> ModelResponse:
        if len(request.messages) == 1:
            return tool_call("run_command", argv=["./slow.sh"], timeout=0.5)
        seen.extend(last_tool_results(request))
        return submit(summary="the slow command timed out; used the cached figures instead")

    model = FunctionModel(answer)
    _, summary = run(folder, model, run_key="command-timeout")
    task = summary.agents[0].tasks[0]
    # The model got the timeout as a tool error and went on; nothing was retried.
    [result] = seen
    assert result.is_error and "killed after 0.5 s (timeout)" in result.content
    assert (task.state, task.attempts, len(model.history)) == ("completed", 1, 2)
    assert (task.tool_calls, task.refused_calls) == (1, 0)
    [record] = read_audit(folder / ".toka", run="command-timeout")
    assert record["decision"] == "allowed" and record["usage"]["killed_for"] == "timeout"


# -- an agent whose medium or low tasks failed -----------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_an_agent_whose_only_task_failed_completes_with_failures(write_specs: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from toka.cli import app

    folder = write_specs(minimal_spec("lonely", tasks=1),  # medium
                         minimal_spec("after", tasks=1, required={"lonely": "uses what it found"}))

    def answer(request: ModelRequest) -> ModelResponse:
        if request.metadata["agent"] == "lonely":
            return submit(status="failed", summary="the changelog is missing")
        return submit(summary="done")

    out = folder / "summary.json"
    with override_model(FunctionModel(answer)):
        shown = CliRunner().invoke(app, ["run", str(folder), "--workspace", str(folder), "--run-key", "partial",
                                         "--retry-delay", "0", "--json", str(out)], env={"COLUMNS": "250"})
    # The failure policy let it go on, so the run is not failed; but nothing says "completed" alone.
    assert shown.exit_code == 0, shown.output
    assert "1/2 agents completed, 1 completed with failed tasks (lonely: 1 failed)" in shown.stdout
    assert "run partial: completed-with-failures" in shown.stdout
    data = json.loads(out.read_text())
    assert data["state"] == "completed-with-failures"
    lonely, after = data["agents"]
    assert (lonely["name"], lonely["state"], lonely["tasks_failed"]) == ("lonely", "completed-with-failures", 1)
    assert lonely["reason"] == "task 1/1 (medium) failed; the agent went on (medium and low failures do not stop it)"
    assert (after["name"], after["state"]) == ("after", "completed")  # a required dependency that went on

    # The Prefect UI: the agent's flow run (Completed, named so), its report, the pipeline's.
    async def runs() -> tuple[Any, Any]:
        async with get_client() as client:
            [agent_run] = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["lonely"])),
                sort=FlowRunSort.START_TIME_DESC, limit=1, offset=0)
            return agent_run, await client.read_flow_run(data["flow_run_id"])

    agent_run, pipeline_run = asyncio.run(runs())
    assert (agent_run.state.type.value, agent_run.state.name) == ("COMPLETED", "CompletedWithFailures")
    assert "task 1/1 (medium) failed" in agent_run.state.message
    assert (pipeline_run.state.type.value, pipeline_run.state.name) == ("COMPLETED", "CompletedWithFailures")
    report = asyncio.run(_newest_artifact("lonely-report"))["data"]
    assert report.startswith("# lonely: completed-with-failures\n")
    assert "**Why:** task 1/1 (medium) failed" in report
    pipeline_report = asyncio.run(_newest_artifact("toka-pipeline-report"))["data"]
    assert pipeline_report.startswith("# Pipeline: completed-with-failures")
    assert "| lonely | ⚠️ completed-with-failures |" in pipeline_report
