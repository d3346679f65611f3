"""The compiled flows and the pipeline, run on a real (temporary) Prefect API."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from toka.compiler import compile_agent, step_task, task_title
from toka.llm_step import is_retryable
from toka import AgentSpec
from toka.capabilities import use_tools
from toka.config import RunConfig
from toka.errors import PermanentModelError, TransientModelError
from toka.model import ModelRequest, ModelResponse, TextBlock, override_model
from toka.process import run_process
from toka.progress import ProgressEvent, listen
from toka.report import agent_markdown
from toka.results import PipelineSummary, TaskOutcome
from toka.testing import FunctionModel, submit, tool_call
from toka.tools import Tool, ToolContext, ToolOutput

from .conftest import minimal_spec, run_pipeline

pytestmark = pytest.mark.usefixtures("prefect_server")

Behaviour = Callable[[ModelRequest], Any]


def where(request: ModelRequest) -> tuple[str, int]:
    return request.metadata["agent"], int(request.metadata["task"])


def first_text(request: ModelRequest) -> str:
    return "".join(b.text for b in request.messages[0].content if isinstance(b, TextBlock))


class Recorder:
    """A model that submits '<agent> task <n> done' unless told otherwise for a task."""

    def __init__(self, **overrides: Behaviour) -> None:
        self.overrides = {tuple(k.rsplit("_", 1)): v for k, v in overrides.items()}
        self.model = FunctionModel(self._answer, name="recorder")

    async def _answer(self, request: ModelRequest) -> ModelResponse:
        agent, task = where(request)
        special = self.overrides.get((agent.replace("-", "_"), str(task)))
        if special is not None:
            reply = special(request)
            if asyncio.iscoroutine(reply):
                reply = await reply
            if isinstance(reply, BaseException):
                raise reply
            if reply is not None:
                return reply
        return submit(summary=f"{agent} task {task} done")

    def calls(self, agent: str, task: int | None = None) -> list[ModelRequest]:
        return [r for r in self.model.history
                if where(r)[0] == agent and (task is None or where(r)[1] == task)]


def run(
    specs_dir: Path,
    model: Any,
    *,
    run_key: str,
    events: list[ProgressEvent] | None = None,
    **options: Any,
) -> tuple[Any, PipelineSummary]:
    """Run the pipeline flow in-process; return its final state and summary."""

    async def go() -> tuple[Any, PipelineSummary]:
        with override_model(model), listen((events if events is not None else []).append):
            return await run_pipeline(specs_dir, run_key=run_key, **options)

    return asyncio.run(go())


def agent(summary: PipelineSummary, name: str) -> Any:
    return next(a for a in summary.agents if a.agent == name)


async def _flow_runs_named(names: list[str]) -> list[Any]:
    """The newest flow run of each name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)),
                                           sort=FlowRunSort.START_TIME_DESC, limit=50, offset=0)
    newest: dict[str, Any] = {}
    for r in runs:
        newest.setdefault(r.name, r)
    return list(newest.values())


async def _flow_ids(flow_name: str) -> list[Any]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return [(await client.read_flow_by_name(flow_name)).id]


# -- the compiler ---------------------------------------------------------------


class TestCompiler:
    def test_flow_named_after_agent_with_spec_timeout(self) -> None:
        spec = AgentSpec.from_dict(minimal_spec("build-system", tasks=3))
        compiled = compile_agent(spec)
        assert compiled.name == "build-system"
        assert compiled.timeout_seconds == 600
        assert compiled.isasync

    def test_task_options_come_from_the_spec(self) -> None:
        spec = AgentSpec.from_dict({
            **minimal_spec("docs"),
            "tasks": {"default": [
                {"description": "Check the README commands against the real entry points of the project",
                 "priority": "critical"},
                {"description": "Summarise", "priority": "low"},
            ]},
        })
        run_config = RunConfig.from_flat({"run_key": "k", "task_timeout": 30, "retry_delay_seconds": 2})
        tasks = spec.task_list()
        first = step_task(spec, 1, 2, tasks[0], run_config)
        second = step_task(spec, 2, 2, tasks[1], run_config)
        assert first.name == "docs - 1/2 - Check the README commands against the real..."
        assert first.task_run_name == first.name
        assert second.name == "docs - 2/2 - Summarise"
        assert (first.retries, second.retries) == (3, 1)
        assert first.retry_delay_seconds == 2
        assert first.timeout_seconds == 30
        assert first.retry_condition_fn is is_retryable

    def test_a_description_with_braces_names_its_run_as_written(self) -> None:
        """CrewAI's `{topic}` placeholders: Prefect formats a run name with the task's parameters,
        and the agent failed with KeyError 'topic' before its first request."""
        spec = AgentSpec.from_dict({**minimal_spec("docs"),
                                    "tasks": {"default": [{"description": "Research {topic} for {0} {"}]}})
        task = step_task(spec, 1, 1, spec.task_list()[0], RunConfig.from_flat({"run_key": "k"}))
        assert task.task_run_name.format(step="the step's input") == task.name == "docs - 1/1 - Research {topic} for {0} {"

    def test_task_timeout_never_exceeds_agent_timeout(self) -> None:
        spec = AgentSpec.from_dict(minimal_spec("a"))
        task = spec.task_list()[0]
        assert step_task(spec, 1, 2, task, RunConfig.from_flat({"run_key": "k", "task_timeout": 10_000})).timeout_seconds == 600
        assert step_task(spec, 1, 2, task, RunConfig(run_key="k")).timeout_seconds == 600

    def test_titles_unique_within_agent(self) -> None:
        spec = AgentSpec.from_dict({**minimal_spec("a"), "tasks": {"default": [
            {"description": "Same words here"}, {"description": "Same words here"}]}})
        titles = {task_title(spec, i, 2, t) for i, t in enumerate(spec.task_list(), 1)}
        assert len(titles) == 2


# -- ordering, results and failure policy ----------------------------------------------


class TestPipeline:
    def test_dependency_order_and_results_flow(self, write_specs) -> None:
        folder = write_specs(
            minimal_spec("base", priority="critical"),
            minimal_spec("mid", required={"base": "needs base"}),
            minimal_spec("top", required=[{"mid": ""}], optional={"side": ""}),
            minimal_spec("side", priority="low"),
        )
        rec = Recorder()
        events: list[ProgressEvent] = []
        state, summary = run(folder, rec.model, run_key="order", events=events)
        assert state.is_completed()
        assert summary.state == "completed"
        started = [e.agent for e in events if e.kind == "agent-started"]
        finished = [e.agent for e in events if e.kind == "agent-finished"]
        # Each model request of a task is told to the terminal's live view (turn 1: one request).
        assert [(e.task, e.turn) for e in events if e.kind == "task-turn" and e.agent == "base"] == [(1, 1), (2, 1)]
        assert finished.index("base") < started.index("mid")
        assert finished.index("mid") < started.index("top")
        assert finished.index("side") < started.index("top")
        # Each task sees the earlier tasks' results; each agent its dependencies' results.
        assert "base task 1 done" in first_text(rec.calls("base", 2)[0])
        mid_prompt = first_text(rec.calls("mid", 1)[0])
        assert "### base" in mid_prompt and "base task 2 done" in mid_prompt
        top_prompt = first_text(rec.calls("top", 1)[0])
        assert "side task 1 done" in top_prompt and "mid task 2 done" in top_prompt
        assert [a.agent for a in summary.agents] == ["base", "side", "mid", "top"]
        assert all(a.count("completed") == 2 for a in summary.agents)
        assert summary.usage.requests == 8

    def test_high_failure_stops_agent_and_required_dependents(self, write_specs) -> None:
        folder = write_specs(
            {**minimal_spec("a", tasks=3)},
            minimal_spec("b", required={"a": ""}),
            minimal_spec("c", required={"b": ""}),
            minimal_spec("d", optional={"a": ""}),
        )
        spec_a = folder / "a.yaml"
        spec_a.write_text(spec_a.read_text().replace("a step 2", "a step 2\n    priority: high", 1))
        rec = Recorder(a_2=lambda r: submit(status="failed", summary="cannot find the build file"))
        state, summary = run(folder, rec.model, run_key="fail-high")
        assert state.is_failed()
        assert "did not complete" in state.message
        a = agent(summary, "a")
        assert a.state == "failed"
        assert [t.state for t in a.tasks] == ["completed", "failed", "not-run"]
        assert "cannot find the build file" in a.tasks[1].error
        assert a.reason.startswith("task 2/3 (high) failed")
        assert agent(summary, "b").state == "not-run"
        assert agent(summary, "b").reason == "required dependency 'a' failed"
        assert agent(summary, "c").reason == "required dependency 'b' did not run"
        assert rec.calls("b") == [] and rec.calls("c") == []
        # In the UI too: each of them has a run of its own flow, Cancelled, saying why.
        shown = asyncio.run(_flow_runs_named(["b (not run)", "c (not run)"]))
        assert {r.name: (r.state.type.value, r.state.message) for r in shown} == {
            "b (not run)": ("CANCELLED", "required dependency 'a' failed"),
            "c (not run)": ("CANCELLED", "required dependency 'b' did not run"),
        }
        assert {r.flow_id for r in shown if r.name.startswith("b ")} == set(asyncio.run(_flow_ids("b")))
        # Optional dependency failed: d still runs, and sees what a managed to do.
        d = agent(summary, "d")
        assert d.state == "completed"
        assert "a task 1 done" in first_text(rec.calls("d", 1)[0])

    def test_medium_failure_is_recorded_and_agent_goes_on(self, write_specs) -> None:
        folder = write_specs(minimal_spec("a", tasks=3))
        rec = Recorder(a_2=lambda r: submit(status="blocked", summary="waiting on credentials"))
        state, summary = run(folder, rec.model, run_key="fail-medium")
        a = agent(summary, "a")
        assert [t.state for t in a.tasks] == ["completed", "failed", "completed"]
        assert a.state == "completed-with-failures"  # it went on, and says what failed
        assert state.is_completed() and state.name == "CompletedWithFailures"

    def test_transient_errors_retried_permanent_not(self, write_specs) -> None:
        folder = write_specs(minimal_spec("flaky", tasks=1), minimal_spec("broken", tasks=1))
        attempts: dict[str, int] = {"flaky": 0}

        def flaky(request: ModelRequest) -> Any:
            attempts["flaky"] += 1
            return TransientModelError("529 overloaded") if attempts["flaky"] == 1 else None

        rec = Recorder(flaky_1=flaky, broken_1=lambda r: PermanentModelError("401 invalid x-api-key"))
        state, summary = run(folder, rec.model, run_key="retries")
        flaky_task = agent(summary, "flaky").tasks[0]
        assert (flaky_task.state, flaky_task.attempts) == ("completed", 2)
        broken_task = agent(summary, "broken").tasks[0]
        assert broken_task.state == "failed"
        assert broken_task.attempts == 1
        assert len(rec.calls("broken")) == 1  # a permanent error is never retried
        assert "PermanentModelError: 401 invalid x-api-key" in broken_task.error

    def test_priority_breaks_ties_when_slots_are_short(self, write_specs) -> None:
        folder = write_specs(
            minimal_spec("low-one", priority="low", tasks=1),
            minimal_spec("crit-one", priority="critical", tasks=1),
            minimal_spec("high-one", priority="high", tasks=1),
        )
        rec = Recorder()
        events: list[ProgressEvent] = []
        run(folder, rec.model, run_key="slots", events=events, max_concurrency=1)
        order = [e.agent for e in events if e.kind in ("agent-started", "agent-finished")]
        assert order == ["crit-one", "crit-one", "high-one", "high-one", "low-one", "low-one"]

    def test_conditional_tasks_run_when_context_switched_on(self, write_specs) -> None:
        spec = minimal_spec("docs", tasks=1)
        spec["tasks"]["conditional"] = {"publish": [{"description": "Regenerate the API pages"}]}
        folder = write_specs(spec)
        _, without = run(folder, Recorder().model, run_key="ctx-off")
        _, with_ctx = run(folder, Recorder().model, run_key="ctx-on", contexts=["publish"])
        assert len(agent(without, "docs").tasks) == 1
        assert [t.description for t in agent(with_ctx, "docs").tasks] == [
            "docs step 1", "Regenerate the API pages"]

    def test_summary_json_form(self, write_specs) -> None:
        folder = write_specs(minimal_spec("a", tasks=1))
        _, summary = run(folder, Recorder().model, run_key="json")
        data = summary.to_dict()
        assert data["format"] == "toka-run/1"
        assert list(data) == ["format", "run_key", "flow_run_id", "model", "offline", "state",
                              "duration_s", "usage", "spent_tokens", "budget_tokens", "branch", "agents"]
        (a,) = data["agents"]
        assert (a["name"], a["state"], a["tasks_done"], a["tasks_total"]) == ("a", "completed", 1, 1)
        # Not a git repository: the agent worked on a private copy, on its own branch there.
        assert (a["branch"], a["files_changed"]) == ("toka/json/a", [])
        assert data["branch"]["name"] == "toka/json/_merged" and data["branch"]["merged"] == ["a"]
        assert a["tasks"][0]["result"]["summary"] == "a task 1 done"
        assert data["usage"]["requests"] == 1


# -- budgets and usage across Prefect retries ------------------------------------------------


def malformed(request: ModelRequest) -> ModelResponse:
    """A submit_result the loop refuses (15 tokens a response, like every fake reply)."""
    return tool_call("submit_result", status="finished", summary="?")


class TestRetriesAndBudgets:
    @pytest.mark.parametrize(
        ("budget", "refusal"),
        [({"task_tokens": 40}, "the task (spender 1/2) token budget of 40 is spent (45 used)"),
         ({"agent_tokens": 40}, "the agent (spender) token budget of 40 is spent (45 used)")],
        ids=["task-budget", "agent-budget"],
    )
    def test_a_retry_spends_what_is_left_of_the_budgets(self, write_specs, budget, refusal) -> None:
        spec = minimal_spec("spender", tasks=2, budget=budget)
        spec["tasks"]["default"][0]["priority"] = "critical"  # 3 Prefect retries
        folder = write_specs(spec)
        rec = Recorder(spender_1=malformed)
        state, summary = run(folder, rec.model, run_key=f"retry-budget-{next(iter(budget))}")
        task = agent(summary, "spender").tasks[0]
        # Attempt 1: three malformed results (45 tokens), retryable. Attempt 2 (a Prefect retry)
        # finds the budget spent and is refused before its first request; without the shared
        # ledgers each of the 4 attempts got a fresh allowance: 12 requests, 180 tokens.
        assert len(rec.calls("spender", 1)) == 3
        assert task.state == "failed" and task.attempts == 2
        assert f"BudgetExceededError: {refusal}" in task.error
        assert task.usage.total_tokens == summary.usage.total_tokens == 45
        assert [t.state for t in agent(summary, "spender").tasks] == ["failed", "not-run"]
        assert state.is_failed()

    def test_a_tasks_usage_counts_every_attempt(self, write_specs) -> None:
        folder = write_specs(minimal_spec("retried", tasks=1))
        calls = {"n": 0}

        def flaky(request: ModelRequest) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                return malformed(request)  # charged: 15 tokens
            if calls["n"] == 2:
                return TransientModelError("529 overloaded")  # the attempt fails; Prefect retries
            return None  # submits

        _, summary = run(folder, Recorder(retried_1=flaky).model, run_key="usage-every-attempt")
        task = agent(summary, "retried").tasks[0]
        assert (task.state, task.attempts) == ("completed", 2)
        assert (task.usage.requests, task.usage.total_tokens) == (2, 30)
        assert agent(summary, "retried").usage == summary.usage == task.usage
        assert summary.to_dict()["agents"][0]["tasks"][0]["usage"]["total_tokens"] == 30
        # A resume carries the whole cost forward, not the last attempt's.
        _, again = run(folder, Recorder().model, run_key="usage-every-attempt")
        assert again.agents[0].tasks[0].carried_usage.total_tokens == 30 == again.spent_tokens

    @staticmethod
    def _fails_after_three_turns(failures: int) -> Callable[[ModelRequest], Any]:
        """Task behaviour: two refused results (journalled, 15 tokens each), then ``failures``
        times an error the step does not retry, then a submit."""
        state = {"failures": failures}

        def answer(request: ModelRequest) -> Any:
            turns = sum(1 for m in request.messages if m.role == "assistant")
            if turns < 2:
                return malformed(request)
            if state["failures"]:
                state["failures"] -= 1
                return PermanentModelError("400 the request is malformed")
            return None  # submits

        return answer

    def test_a_resumed_task_counts_what_it_replays_once_against_the_agent_budget(self, write_specs, monkeypatch) -> None:
        # 30 tokens paid before the resume and replayed, 15 for task 1's last request, 15 for task 2:
        # 60 spent, under 70. Counted twice (by the step as it replays, by the agent after the
        # task), the replayed 30 made it 75 before task 2's request, which was refused.
        spec = minimal_spec("resumer", tasks=2, budget={"agent_tokens": 70})
        spec["tasks"]["default"][0]["priority"] = "high"  # its failure stops the agent
        folder = write_specs(spec)
        answer = self._fails_after_three_turns(failures=1)
        state, _ = run(folder, Recorder(resumer_1=answer).model, run_key="resume-budget")
        assert state.is_failed()
        monkeypatch.setattr("toka.journal.PROCESS", "a later process")  # the resume: `toka run --resume`
        rec = Recorder(resumer_1=answer)
        state, summary = run(folder, rec.model, run_key="resume-budget")
        tasks = agent(summary, "resumer").tasks
        assert [t.state for t in tasks] == ["completed", "completed"], [t.error for t in tasks]
        assert len(rec.calls("resumer", 1)) == 1  # the two answered turns came from the journal
        assert tasks[0].carried_usage.total_tokens == 30 and tasks[0].usage.total_tokens == 15
        assert summary.spent_tokens == 60

    def test_a_task_that_fails_again_after_a_resume_reports_what_it_carried(self, write_specs, monkeypatch) -> None:
        spec = minimal_spec("refailer", tasks=1)
        spec["tasks"]["default"][0]["priority"] = "high"
        folder = write_specs(spec)
        answer = self._fails_after_three_turns(failures=2)
        run(folder, Recorder(refailer_1=answer).model, run_key="refail")
        monkeypatch.setattr("toka.journal.PROCESS", "a later process")
        state, summary = run(folder, Recorder(refailer_1=answer).model, run_key="refail")
        task = agent(summary, "refailer").tasks[0]
        assert state.is_failed() and task.state == "failed"
        # Paid in the first run, replayed in this one: carried, not charged again, and counted in the run's total.
        assert task.carried_usage.total_tokens == 30 and task.usage.total_tokens == 0
        assert summary.spent_tokens == 30
        assert "30 tokens carried, not paid again" in agent_markdown(agent(summary, "refailer"), model="recorder")

    def test_a_request_past_the_step_guard_is_not_retried(self, write_specs) -> None:
        spec = minimal_spec("stuck", tasks=1)
        spec["tasks"]["default"][0]["priority"] = "critical"  # 3 Prefect retries
        folder = write_specs(spec)

        async def hang(request: ModelRequest) -> None:
            await asyncio.sleep(120)

        rec = Recorder(stuck_1=hang)
        # The guard (request_timeout for a model without retries of its own) fires first;
        # a critical task has 3 Prefect retries, none of which may run.
        _, summary = run(folder, rec.model, run_key="step-guard", request_timeout=0.5)
        task = agent(summary, "stuck").tasks[0]
        assert task.state == "failed" and "ModelRetriesExhausted" in task.error
        assert task.attempts == 1
        assert len(rec.calls("stuck")) == 1


# -- timeouts that really stop work -----------------------------------------------------


class SleeperTool(Tool):
    """Starts a process that hangs and writes its grandchild's pid."""

    name = "hang"
    description = "Run a command that never finishes."
    capability = "script-execution"
    pidfile: ClassVar[Path]
    timeout: ClassVar[float] = 120.0

    class Input(BaseModel):
        pass

    async def run(self, args: Any, ctx: ToolContext) -> ToolOutput:
        await run_process(["sh", "-c", f"sleep 120 & echo $! > {self.pidfile}; wait"],
                          cwd=ctx.workspace.root, timeout=self.timeout)
        return ToolOutput("finished")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class TestTimeouts:
    def test_hanging_model_call_stopped_by_task_timeout_and_retried(self, write_specs) -> None:
        folder = write_specs(minimal_spec("slow", tasks=1, priority="low"))

        async def hang(request: ModelRequest) -> None:
            await asyncio.sleep(120)

        rec = Recorder(slow_1=hang)
        started = time.monotonic()
        state, summary = run(folder, rec.model, run_key="hang-model", task_timeout=1.0)
        elapsed = time.monotonic() - started
        task = agent(summary, "slow").tasks[0]
        assert task.state == "failed"
        assert "timed out" in task.error.lower()
        assert task.attempts == 2  # medium/low tasks get one retry
        assert len(rec.calls("slow")) == 2
        assert elapsed < 2 * 1.0 + 8  # two attempts of 1 s, plus Prefect's own overhead

    def test_hanging_tool_process_group_killed_on_task_timeout(self, write_specs, tmp_path: Path) -> None:
        spec = minimal_spec("runner", tasks=1, priority="low")
        spec["security"]["capabilities_required"] = ["script-execution"]
        folder = write_specs(spec)
        SleeperTool.pidfile = tmp_path / "grandchild.pid"
        rec = Recorder(runner_1=lambda r: tool_call("hang"))
        with use_tools(SleeperTool()):
            started = time.monotonic()
            _, summary = run(folder, rec.model, run_key="hang-tool", task_timeout=1.0)
        task = agent(summary, "runner").tasks[0]
        assert task.state == "failed" and "timed out" in task.error.lower()
        assert task.attempts == 2
        assert time.monotonic() - started < 2 * 1.0 + 8
        pid = int(SleeperTool.pidfile.read_text())
        deadline = time.monotonic() + 3
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the tool's grandchild outlived the task timeout"

    def test_tool_process_timeout_is_a_clear_retryable_error(self, write_specs, tmp_path: Path) -> None:
        spec = minimal_spec("runner", tasks=1, priority="low")
        spec["security"]["capabilities_required"] = ["script-execution"]
        folder = write_specs(spec)

        class QuickTimeout(SleeperTool):
            timeout = 0.5

        QuickTimeout.pidfile = tmp_path / "pid"
        rec = Recorder(runner_1=lambda r: tool_call("hang"))
        with use_tools(QuickTimeout()):
            _, summary = run(folder, rec.model, run_key="tool-timeout")
        task = agent(summary, "runner").tasks[0]
        assert task.state == "failed"
        assert "ToolTimeoutError" in task.error and "0.5s timeout" in task.error
        assert task.attempts == 2


# -- resume ---------------------------------------------------------------------------


class TestResume:
    def test_a_finished_tasks_journal_stays_until_its_result_is_persisted(
        self, write_specs, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Removed as the task returned, before Prefect wrote its result, a kill in between left
        neither: the resume paid for every turn of a finished task again."""
        from prefect.results import ResultStore

        folder = write_specs(minimal_spec("a", tasks=2))
        journals = folder / ".toka" / "journal"
        at_persist: dict[int, list[str]] = {}  # task -> the journals there when its result was written
        persist = ResultStore.apersist_result_record

        async def spy(self: ResultStore, *args: Any, **kwargs: Any) -> Any:
            record = kwargs["result_record"] if "result_record" in kwargs else args[0]
            if isinstance(record.result, TaskOutcome):
                at_persist[record.result.index] = sorted(p.name for p in journals.rglob("*.jsonl"))
            return await persist(self, *args, **kwargs)

        monkeypatch.setattr(ResultStore, "apersist_result_record", spy)
        state, summary = run(folder, Recorder().model, run_key="journal-kept")
        assert summary.state == "completed"
        assert sorted(at_persist) == [1, 2], at_persist
        # Task 1's may linger a moment (it is removed in the background): never task 2's before it.
        assert "1.jsonl" in at_persist[1] and "2.jsonl" not in at_persist[1], at_persist
        assert "2.jsonl" in at_persist[2], at_persist
        assert not list(journals.rglob("*.jsonl"))  # and gone once the result is safe

    def test_same_run_key_replays_without_model_calls(self, write_specs) -> None:
        folder = write_specs(minimal_spec("a"), minimal_spec("b", required={"a": ""}))
        first = Recorder()
        run(folder, first.model, run_key="resume-same")
        assert len(first.model.history) == 4
        again = Recorder()
        state, summary = run(folder, again.model, run_key="resume-same")
        assert again.model.history == []
        assert state.is_completed()
        assert all(t.state == "cached" and t.usage.total_tokens == 0
                   for a in summary.agents for t in a.tasks)
        assert agent(summary, "a").tasks[0].result.summary == "a task 1 done"

    def test_new_run_key_does_the_work_again(self, write_specs) -> None:
        folder = write_specs(minimal_spec("a"))
        run(folder, Recorder().model, run_key="nightly-1")
        fresh = Recorder()
        _, summary = run(folder, fresh.model, run_key="nightly-2")
        assert len(fresh.model.history) == 2
        assert all(t.state == "completed" for t in agent(summary, "a").tasks)

    def test_failed_run_resumes_only_unfinished_tasks(self, write_specs) -> None:
        folder = write_specs(
            minimal_spec("a", tasks=2),
            minimal_spec("b", tasks=3, required={"a": ""}, priority="high"),
        )
        spec_b = folder / "b.yaml"
        spec_b.write_text(spec_b.read_text().replace("b step 2", "b step 2\n    priority: critical", 1))
        broken = Recorder(b_2=lambda r: PermanentModelError("injected"))
        state, summary = run(folder, broken.model, run_key="resume-failed")
        assert state.is_failed()
        assert [t.state for t in agent(summary, "b").tasks] == ["completed", "failed", "not-run"]

        healthy = Recorder()
        state, summary = run(folder, healthy.model, run_key="resume-failed")
        assert state.is_completed()
        assert [where(r) for r in healthy.model.history] == [("b", 2), ("b", 3)]
        assert [t.state for t in agent(summary, "a").tasks] == ["cached", "cached"]
        assert [t.state for t in agent(summary, "b").tasks] == ["cached", "completed", "completed"]

    def test_changed_spec_invalidates_its_tasks(self, write_specs) -> None:
        folder = write_specs(minimal_spec("a", tasks=1))
        run(folder, Recorder().model, run_key="spec-change")
        path = folder / "a.yaml"
        path.write_text(path.read_text().replace("a step 1", "a step one, reworded"))
        rec = Recorder()
        run(folder, rec.model, run_key="spec-change")
        assert len(rec.model.history) == 1


# -- what the Prefect UI shows ------------------------------------------------------------


def test_artifacts_for_agents_and_pipeline(write_specs) -> None:
    from prefect.client.orchestration import get_client

    folder = write_specs(minimal_spec("alpha"), minimal_spec("beta", required={"alpha": ""}))
    _, summary = run(folder, Recorder().model, run_key="artifacts")

    async def newest(key: str) -> Any:
        # The REST endpoint directly: this Prefect client's read_artifacts sends
        # nulls that its own server rejects.
        async with get_client() as client:
            response = await client._client.post(
                "/artifacts/filter",
                json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
            )
            response.raise_for_status()
            return response.json()[0]

    text = asyncio.run(newest("toka-pipeline-report"))["data"]
    assert "](data:image/svg+xml;base64," in text and "| 2 | beta | ✅ completed | alpha | - |" in text
    assert "| alpha | ✅ completed |" in text
    assert summary.run_key in text
    # Tokens broken down: total | input | output | cache write | cache read (each fake reply: 10 in, 5 out).
    assert "| duration | tokens | input | output | cache write | cache read | note |" in text
    assert re.search(r"\| alpha \| ✅ completed \| 2 \| 0 \| 0 \| [\d.]+s \| 30 \| 20 \| 10 \| 0 \| 0 \|", text)
    assert "60 tokens (input 40, output 20, cache write 0, cache read 0) in 4 requests" in text
    report = asyncio.run(newest("beta-report"))["data"]
    assert "| 1 | beta step 1 | medium | ✅ completed |" in report
    assert "| attempts | tokens | input | output | cache write | cache read | tool calls (refused) |" in report
    assert re.search(r"\| 1 \| beta step 1 \| medium \| ✅ completed \| [\d.]+s \| 1 \| 15 \| 10 \| 5 \| 0 \| 0 \|",
                     report)
    assert "Tokens: 30 (input 20, output 10, cache write 0, cache read 0)." in report
    for key in ("beta-progress", "toka-pipeline-progress"):
        progress = asyncio.run(newest(key))
        assert progress["type"] == "progress" and progress["data"] == 100.0, key

    async def flow_of(artifact: dict[str, Any]) -> str:
        async with get_client() as client:
            flow_run = await client.read_flow_run(artifact["flow_run_id"])
            return (await client.read_flow(flow_run.flow_id)).name

    # alpha's are written once beta has started (toka.background), still on alpha's run.
    for name in ("alpha", "beta"):
        for kind in ("report", "results", "progress"):
            assert asyncio.run(flow_of(asyncio.run(newest(f"{name}-{kind}")))) == name, (name, kind)


def test_an_agents_report_is_in_the_ui_while_its_dependent_works(write_specs, monkeypatch) -> None:
    # Held back from the critical path's writes only until the dependent has begun: a person
    # reading alpha's report before beta's work ends must find it, long before the run ends.
    from prefect.client.orchestration import get_client

    from toka import background

    monkeypatch.setattr(background, "DEFER_AT_MOST", 60.0)  # released by beta's start, not by the clock
    seen: list[float] = []

    async def wait_for_alpha_report(request: ModelRequest) -> None:
        began = time.monotonic()
        async with get_client() as client:
            while time.monotonic() - began < 15:
                response = await client._client.post(
                    "/artifacts/filter", json={"artifacts": {"key": {"any_": ["alpha-report"]}}, "limit": 1})
                response.raise_for_status()
                if response.json():
                    seen.append(time.monotonic() - began)
                    return None
                await asyncio.sleep(0.05)

    folder = write_specs(minimal_spec("alpha"), minimal_spec("beta", required={"alpha": ""}))
    _, summary = run(folder, Recorder(beta_1=wait_for_alpha_report).model, run_key="report-early")
    assert summary.state == "completed"
    assert seen, "alpha's report artifact was not written while beta worked"


def test_progress_is_written_at_most_once_an_interval_and_its_last_value_at_once_on_close(monkeypatch) -> None:
    """Each write is an API call on the server every agent shares; a person watching needs no more than
    one every few seconds."""
    import toka.compiler as compiler

    sent: list[tuple[float, str, float]] = []

    async def create(*, progress: float, **kwargs: Any) -> str:
        sent.append((time.monotonic(), "made", progress))
        return "artifact-id"

    async def update(artifact: str, *, progress: float) -> None:
        assert artifact == "artifact-id"
        sent.append((time.monotonic(), "updated", progress))

    monkeypatch.setattr(compiler, "acreate_progress_artifact", create)
    monkeypatch.setattr(compiler, "aupdate_progress_artifact", update)

    async def quick() -> float:
        progress = compiler.Progress(key="k", description="d", interval=0.5)
        for value in range(1, 11):
            progress.set(float(value))
            await asyncio.sleep(0.03)
        started = time.monotonic()
        await progress.close()
        return time.monotonic() - started

    closing = asyncio.run(quick())
    # Done within the interval: one write, the artifact made with the last value, on close.
    assert [(kind, value) for _, kind, value in sent] == [("made", 10.0)]
    assert closing < 0.3  # close did not wait out the interval

    sent.clear()

    async def slow() -> None:
        progress = compiler.Progress(key="k", description="d", interval=0.2)
        await asyncio.sleep(0.3)  # long work: the artifact is there after an interval, at 0
        for value in (1.0, 2.0, 3.0):
            progress.set(value)
            await asyncio.sleep(0.3)
        await progress.close()

    asyncio.run(slow())
    assert [(kind, value) for _, kind, value in sent] == [
        ("made", 0.0), ("updated", 1.0), ("updated", 2.0), ("updated", 3.0)]  # far enough apart: each is sent
    assert all(b - a >= 0.19 for (a, _, _), (b, _, _) in zip(sent, sent[1:])), sent

    sent.clear()

    async def nothing_set() -> None:
        progress = compiler.Progress(key="k", description="d", interval=0.5)
        await progress.close()

    asyncio.run(nothing_set())
    assert [(kind, value) for _, kind, value in sent] == [("made", 0.0)]  # the artifact is there all the same

    sent.clear()

    async def crashed() -> None:
        progress = compiler.Progress(key="k", description="d", interval=0.1)
        progress.set(50.0)
        progress.discard()  # the agent's flow raised: nothing is left pending to write later
        await asyncio.sleep(0.3)

    asyncio.run(crashed())
    assert sent == []


def test_a_pipeline_cancelled_midway_leaves_no_progress_write_waiting(monkeypatch, write_specs) -> None:
    """Its progress would otherwise be written an interval later, over a run already ended."""
    import functools

    import toka.compiler as compiler
    import toka.pipeline as pipeline
    from toka.budget import Ledger
    from toka.plan import make_plan

    sent: list[float] = []

    async def create(*, progress: float, **kwargs: Any) -> str:
        sent.append(progress)
        return "artifact-id"

    monkeypatch.setattr(compiler, "acreate_progress_artifact", create)
    monkeypatch.setattr(pipeline, "Progress", functools.partial(compiler.Progress, interval=0.2))
    specs = write_specs(minimal_spec("alpha"), minimal_spec("beta"))
    plan = make_plan([str(specs)])
    run = RunConfig.from_flat({"run_key": "cancelled", "workspace": str(specs)})

    async def execute(name: str, upstream: dict[str, Any], run: RunConfig) -> tuple[Any, str]:
        await asyncio.sleep(5)  # an agent at work
        raise AssertionError("not reached")

    async def cancelled_midway() -> None:
        scheduling = asyncio.create_task(pipeline._schedule(
            plan.graph, run, ledger=Ledger("pipeline", None, scope="pipeline"), execute=execute, branches=None))
        await asyncio.sleep(0.05)
        scheduling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await scheduling
        await asyncio.sleep(0.4)  # past the interval

    asyncio.run(cancelled_midway())
    assert sent == []


def test_a_pipeline_cancelled_midway_stops_its_running_agents_first(write_specs) -> None:
    """Left running, an agent would go on asking the model (and paying) after its pipeline ended."""
    import toka.pipeline as pipeline
    from toka.budget import Ledger
    from toka.plan import make_plan

    specs = write_specs(minimal_spec("alpha"), minimal_spec("beta"), minimal_spec("gamma", required={"alpha": "x"}))
    plan = make_plan([str(specs)])
    run = RunConfig.from_flat({"run_key": "cancelled-agents", "workspace": str(specs), "max_concurrency": 4})
    started: list[str] = []
    stopped: list[str] = []

    async def execute(name: str, upstream: dict[str, Any], run: RunConfig) -> tuple[Any, str]:
        started.append(name)
        try:
            await asyncio.sleep(30)  # an agent at work
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # its run ending
            stopped.append(name)
            raise
        raise AssertionError("not reached")

    async def cancelled_midway() -> None:
        scheduling = asyncio.create_task(pipeline._schedule(
            plan.graph, run, ledger=Ledger("pipeline", None, scope="pipeline"), execute=execute, branches=None))
        while len(started) < 2:
            await asyncio.sleep(0.01)
        scheduling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await scheduling
        assert sorted(stopped) == ["alpha", "beta"]  # before the pipeline's own end, not after

    asyncio.run(asyncio.wait_for(cancelled_midway(), 10))
    assert sorted(started) == ["alpha", "beta"]


def test_an_agent_whose_branch_cannot_be_read_leaves_no_progress_write_waiting(monkeypatch, write_specs) -> None:
    """Its flow run has ended (failed); its progress is not written an interval later."""
    import functools

    import toka.compiler as compiler
    from toka.errors import BranchError

    writes: list[tuple[float, str]] = []
    failed_at: list[float] = []

    async def create(*, key: str, **kwargs: Any) -> str:
        writes.append((time.monotonic(), key))
        return key

    async def update(artifact: str, **kwargs: Any) -> None:
        writes.append((time.monotonic(), artifact))

    def unreadable(checkout: Any, moved: bool) -> Any:
        failed_at.append(time.monotonic())
        raise BranchError("git diff failed in the agent's worktree")

    monkeypatch.setattr(compiler, "acreate_progress_artifact", create)
    monkeypatch.setattr(compiler, "aupdate_progress_artifact", update)
    monkeypatch.setattr(compiler, "Progress", functools.partial(compiler.Progress, interval=0.3))
    monkeypatch.setattr(compiler, "_changes", unreadable)
    folder = write_specs(minimal_spec("alpha", tasks=1))

    async def run_then_wait() -> Any:
        _, summary = await run_pipeline(folder, run_key="unreadable-branch", specs=[str(folder)])
        await asyncio.sleep(0.6)  # past the interval
        return summary

    summary = asyncio.run(run_then_wait())
    assert summary.agents[0].state == "failed" and "git diff failed" in (summary.agents[0].reason or "")
    assert failed_at and not [key for at, key in writes if key == "alpha-progress" and at > failed_at[0]]


def test_each_agents_flow_is_its_own_subflow_to_prefect_whatever_order_agents_start_in() -> None:
    # Prefect finds a subflow's earlier run (a retried pipeline reuses completed ones) by the
    # flow function's name and code, then by call order; agents start in any order, so each
    # agent's flow must be told apart by the first two, or a retry hands one agent another's run.
    from prefect.tasks import _generate_task_key

    flows = [compile_agent(AgentSpec.model_validate(minimal_spec(name))) for name in ("alpha", "beta", "gamma")]
    keys = [_generate_task_key(f.fn) for f in flows]
    assert len(set(keys)) == 3
    assert [k.rsplit("-", 1)[0] for k in keys] == ["alpha", "beta", "gamma"]


def test_task_results_go_to_the_result_storage_block_loaded_once_per_agent(write_specs, tmp_path, monkeypatch) -> None:
    """Given as a slug, Prefect would read the block from the API again for every task run."""
    from prefect.blocks.core import Block
    from prefect.filesystems import LocalFileSystem

    shared = tmp_path / "shared-results"
    LocalFileSystem(basepath=str(shared)).save("toka-runtime-results", overwrite=True)
    loads: list[str] = []
    load = Block.aload.__func__  # type: ignore[attr-defined]

    async def counted(cls: type[Block], name: str, *args: Any, **kwargs: Any) -> Block:
        loads.append(name)
        return await load(cls, name, *args, **kwargs)

    monkeypatch.setattr(Block, "aload", classmethod(counted))
    specs = write_specs(minimal_spec("alpha", tasks=3), minimal_spec("beta", tasks=2, required={"alpha": "x"}))
    state, summary = run(specs, Recorder().model, run_key="on-a-block",
                         result_storage="local-file-system/toka-runtime-results")
    assert state.is_completed(), state
    assert [a.state for a in summary.agents] == ["completed", "completed"]
    assert loads == ["local-file-system/toka-runtime-results"] * 3  # the run's check, then once per agent
    assert len([p for p in shared.rglob("*") if p.is_file()]) >= 5  # the five tasks' results
    assert not (specs / ".toka" / "results").exists() or not any((specs / ".toka" / "results").iterdir())


@pytest.mark.parametrize(("slug", "said"), [
    ("local-file-system/no-such-block", "Unable to find block document named no-such-block"),
    ("no-slash", "--result-storage 'no-slash'"),
])
def test_an_unusable_result_storage_stops_the_run_before_any_agent(write_specs, slug: str, said: str) -> None:
    from flows.pipeline import pipeline
    from toka.config import grouped
    from toka.errors import ConfigError

    specs = write_specs(minimal_spec("alpha"))
    recorder = Recorder()

    async def go() -> Any:
        with override_model(recorder.model):
            return await pipeline(specs=[str(specs)], return_state=True, **grouped({
                "workspace": str(specs), "run_key": "bad-storage", "result_storage": slug}))

    state = asyncio.run(go())
    assert state.is_failed()
    assert f"--result-storage {slug!r}" in state.message and said in state.message, state.message
    assert isinstance(asyncio.run(state.aresult(raise_on_failure=False)), ConfigError)
    assert recorder.model.history == []


def test_only_the_runs_of_that_run_key_in_that_workspace_are_marked_crashed() -> None:
    """What a killed run left Running, and nothing of another workspace's run or a deployment's."""
    import functools
    from uuid import uuid4

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from toka.pipeline import PIPELINE_FLOW
    from toka.runs import crash_left_running

    @flow(name=PIPELINE_FLOW["name"])
    def pipeline(run: Any = None) -> None: ...

    @flow(name="repo-survey")
    def agent() -> None: ...

    @task(name="repo-survey")
    def agent_in_pipeline() -> None: ...

    key = uuid4().hex[:16]

    async def go() -> dict[str, str]:
        async with get_client() as client:
            made = {}
            for label, run in [("killed", {"run_key": key, "workspace": "/w/here"}),
                               ("elsewhere", {"run_key": key, "workspace": "/w/there"}),
                               ("other key", {"run_key": uuid4().hex[:16], "workspace": "/w/here"}),
                               ("deployment", "not a mapping")]:
                made[label] = await client.create_flow_run(pipeline, parameters={"run": run}, state=Running())
            parent = await client.create_task_run(agent_in_pipeline, flow_run_id=made["killed"].id, dynamic_key="0",
                                                  state=Running())  # the pipeline's task run for its agent
            made["its agent"] = await client.create_flow_run(agent, parent_task_run_id=parent.id, state=Running())
            tidy = functools.partial(crash_left_running, key, "/w/here", pipeline=PIPELINE_FLOW["name"])
            assert await tidy() == 3  # two flow runs, one task run
            assert await tidy() == 0
            states = {label: (await client.read_flow_run(r.id)).state.type.value for label, r in made.items()}
            states["its task run"] = (await client.read_task_run(parent.id)).state.type.value
            return states

    assert asyncio.run(go()) == {"killed": "CRASHED", "elsewhere": "RUNNING", "other key": "RUNNING",
                                 "deployment": "RUNNING", "its agent": "CRASHED", "its task run": "CRASHED"}
