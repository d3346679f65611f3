"""The Anthropic provider through the real SDK, against a loopback Messages API server."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import typing
from pathlib import Path
from typing import Any

import pytest
from tenacity import AsyncRetrying

import toka.claude
from flows.pipeline import pipeline
from toka.claude import AnthropicModel, default_model
from toka.config import ProviderSettings, RunOptions
from toka.errors import (
    ModelRetriesExhausted,
    PermanentModelError,
)
from toka.limits import LimitSettings, RequestLimiter
from toka.model import Message, ModelRequest, TextBlock, ToolDefinition, ToolUseBlock
from toka.providers import choose_model, describe_choice
from toka.results import PipelineSummary

from .anthropic_server import (
    AnthropicServer,
    Fault,
    Recorded,
    scripted_responder,
    text_block,
    tool_use_block,
)
from .conftest import PREFECT_HOME, PrefectServer, minimal_spec, run_pipeline

KEY = "sk-ant-test-0123456789abcdefSECRET"


def request(text: str = "hello") -> ModelRequest:
    return ModelRequest(
        system="You are a test agent. " * 20,
        messages=[Message(role="user", content=[TextBlock(text=text)])],
        tools=[ToolDefinition(name="submit_result", description="submit", input_schema={"type": "object"})],
        metadata={"agent": "a", "task": "1"},
    )


def model(server: AnthropicServer, **options: Any) -> AnthropicModel:
    defaults = {"request_timeout": 2.0, "max_attempts": 4, "max_retry_wait": 10.0}
    return AnthropicModel("claude-test", api_key=KEY, base_url=server.base_url, **{**defaults, **options})


def call(m: AnthropicModel, req: ModelRequest | None = None) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        result: Any = asyncio.run(m.request(req or request()))
    except Exception as e:  # noqa: BLE001 - the outcome under test
        result = e
    return result, time.monotonic() - started


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The provider's waits between attempts, recorded instead of slept (the retry owner's
    tenacity loop is given this sleep): what a test checks is what it asked to wait, which a
    busy machine cannot change, and the retries cost no wall-clock time.
    """
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(toka.claude, "AsyncRetrying", functools.partial(AsyncRetrying, sleep=sleep))
    return waited


def test_default_model_is_current_and_from_the_sdk() -> None:
    from anthropic.resources.messages.messages import DEPRECATED_MODELS
    from anthropic.types.model_param import ModelParam

    listed = typing.get_args(typing.get_args(ModelParam)[0])
    chosen = default_model()
    assert chosen in listed and chosen not in DEPRECATED_MODELS
    assert chosen.startswith("claude-")


class TestFaults:
    """For each fault: the outcome, the HTTP attempts, and the time waited."""

    @pytest.mark.parametrize(
        ("fault", "outcome"),
        [
            (Fault.status(429, retry_after=0.3), "fault:429"),
            (Fault.status(529), "fault:529"),
            (Fault.status(500), "fault:500"),
            (Fault.drop(), "fault:drop"),
            (Fault.malformed("json"), "fault:malformed"),
            (Fault.malformed("html"), "fault:malformed-html"),
            (Fault.malformed("shape"), "fault:malformed-shape"),
        ],
        ids=["429-retry-after", "529-overloaded", "500", "dropped-connection", "malformed-json",
             "malformed-html", "malformed-shape"],
    )
    def test_transient_fault_is_retried_once_then_succeeds(self, fault: Fault, outcome: str,
                                                           sleeps: list[float]) -> None:
        with AnthropicServer(faults=[fault]) as server:
            m = model(server)
            result, _ = call(m)
            assert result.tool_uses or result.content, result
            assert [r.outcome for r in server.requests] == [outcome, "ok"]
            assert m.http_attempts == 2
            if outcome == "fault:429":
                assert sleeps == [0.3]  # honoured retry-after
            else:  # one short randomised backoff (the first step of multiplier 0.5)
                assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.5, sleeps

    def test_response_slower_than_the_timeout_is_a_retried_read_timeout(self, sleeps: list[float]) -> None:
        with AnthropicServer(faults=[Fault.slow(3)]) as server:
            m = model(server, request_timeout=0.5)
            result, elapsed = call(m)
            assert not isinstance(result, Exception), result
            # Retried: the client gave up on the slow reply (had it waited the 3 s, that
            # reply would have been the answer, with no second request).
            assert [r.outcome for r in server.requests] == ["fault:slow", "ok"]
            assert m.http_attempts == 2 and len(sleeps) == 1
            assert elapsed >= 0.5  # the read timeout really ran out

    @pytest.mark.parametrize(
        ("status", "error_type", "message_text", "expected"),
        [
            (400, None, "messages: bad", "the request was invalid"),
            (400, None, "prompt is too long: 250000 tokens > 200000 maximum", "context window"),
            (401, None, "invalid x-api-key", "check ANTHROPIC_API_KEY"),
            (403, None, "no access", "may not use this model"),
            (404, None, "model: claude-nope", "model 'claude-test' not found: check the model id"),
            (413, None, "too big", "too large"),
            (422, None, "unprocessable", "could not process"),
        ],
        ids=["400", "400-context-window", "401", "403", "404", "413", "422"],
    )
    def test_permanent_fault_is_never_retried(self, status: int, error_type: str | None,
                                              message_text: str, expected: str, sleeps: list[float]) -> None:
        with AnthropicServer(faults=[Fault.status(status, error_type=error_type, message=message_text)]) as server:
            m = model(server)
            result, _ = call(m)
            assert isinstance(result, PermanentModelError)
            assert not result.retryable
            # These stop the run: every other request would fail the same way.
            assert result.fatal is (status in (401, 403, 404))
            assert expected in str(result)
            assert f"Anthropic API {status}" in str(result)
            assert KEY not in str(result) and "SECRET" not in repr(result.args)
            assert len(server.requests) == 1
            assert sleeps == []  # nothing waited for

    def test_attempts_are_capped_and_the_final_error_is_not_retryable(self, sleeps: list[float]) -> None:
        with AnthropicServer(faults=[Fault.status(529)] * 10) as server:
            m = model(server, max_attempts=3)
            result, _ = call(m)
            assert isinstance(result, ModelRetriesExhausted)
            assert not result.retryable  # Prefect must not multiply the attempts
            assert "gave up after 3 attempts" in str(result)
            assert len(server.requests) == 3
            assert len(sleeps) == 2  # between the attempts, not after the last

    def test_total_waiting_is_capped(self, sleeps: list[float]) -> None:
        with AnthropicServer(faults=[Fault.status(429, retry_after=30)] * 3) as server:
            m = model(server, max_retry_wait=1.0)
            result, _ = call(m)
            assert isinstance(result, ModelRetriesExhausted)
            assert sleeps == []  # did not sleep the 30 s the server asked for
            assert len(server.requests) == 1


def test_a_local_value_error_is_ours_and_not_retried() -> None:
    """Only a body that is not JSON counts as the API's fault; our own ValueError is a bug."""
    req = request()
    nan = ModelRequest(system=req.system, tools=req.tools, metadata=req.metadata, messages=[
        *req.messages,
        Message(role="assistant", content=[ToolUseBlock(id="toolu_1", name="submit_result",
                                                        input={"score": float("nan")})]),
    ])
    with AnthropicServer() as server:
        m = model(server)
        result, _ = call(m, nan)
        assert type(result) is ValueError and "not JSON compliant" in str(result)
        assert m.http_attempts == 1  # not retried as a malformed answer (it was 4 attempts)
        assert server.requests == []  # the body could not even be encoded


class TestRequests:
    def test_prompt_cache_breakpoints_on_the_stable_prefix(self) -> None:
        with AnthropicServer() as server:
            m = model(server)
            params = m.params(request())
            assert params["system"][-1]["cache_control"] == {"type": "ephemeral"}
            assert params["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
            first, _ = call(m)
            second, _ = call(m, request("a different task"))
            assert first.usage.cache_creation_input_tokens > 0
            assert second.usage.cache_read_input_tokens > 0  # system + tools reused
            body = server.requests[0].body
            assert "cache_control" in json.dumps(body["system"])

    def test_temperature_reaches_the_api(self) -> None:
        # The SDK's messages.create no longer takes it as an argument: it travels in the body.
        with AnthropicServer() as server:
            result, _ = call(model(server, temperature=0.3))
            assert not isinstance(result, BaseException), result
            assert server.requests[0].body["temperature"] == 0.3
            call(model(server))
            assert "temperature" not in server.requests[1].body

    def test_the_summary_request_asks_for_text_only(self) -> None:
        """Answered with a tool call, a summary request lost the whole work so far."""
        from toka.context import compaction_request

        with AnthropicServer() as server:
            result, _ = call(model(server), compaction_request(request()))
            assert not isinstance(result, BaseException), result
            summary = server.requests[0].body
            assert summary["tool_choice"] == {"type": "none"} and summary["tools"]  # the cached prefix kept
            assert not result.tool_uses and "summary" in result.content[0].text
            call(model(server))
            assert "tool_choice" not in server.requests[1].body

    def test_tool_use_round_trip(self) -> None:
        replies = iter([[tool_use_block("list_dir", {"path": "."})], [text_block("ok")]])
        with AnthropicServer(scripted_responder(lambda body: next(replies))) as server:
            result, _ = call(model(server))
            assert result.stop_reason == "tool_use"
            assert result.tool_uses[0].name == "list_dir" and result.tool_uses[0].input == {"path": "."}
            assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"

    def test_sdk_retries_are_off(self) -> None:
        with AnthropicServer(faults=[Fault.status(500)] * 10) as server:
            m = model(server, max_attempts=1)
            result, _ = call(m)
            assert isinstance(result, ModelRetriesExhausted)
            assert len(server.requests) == 1  # the SDK itself did not try again


def test_in_process_cap_limits_concurrency() -> None:
    limiter = RequestLimiter(LimitSettings(in_process=2))
    active = peak = 0

    async def one() -> None:
        nonlocal active, peak
        async with limiter.slot():
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.05)
            active -= 1

    async def many() -> None:
        await asyncio.gather(*(one() for _ in range(8)))

    asyncio.run(many())
    assert peak == 2


def test_choice_is_announced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    offline = choose_model(ProviderSettings())
    assert describe_choice(offline).startswith("model: offline (no ANTHROPIC_API_KEY set)")
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    online = choose_model(ProviderSettings())
    assert online.provider == "anthropic" and online.model == default_model()
    assert describe_choice(online) == f"model: {default_model()} (anthropic, key from ANTHROPIC_API_KEY)"
    assert KEY not in describe_choice(online)


# -- pipelines on the loopback server --------------------------------------------------


def run_against(server: AnthropicServer, folder: Path, monkeypatch: pytest.MonkeyPatch, *,
                run_key: str, **options: Any) -> tuple[Any, PipelineSummary]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)

    return asyncio.run(run_pipeline(folder, run_key=run_key, **options))


def logical_calls(requests: list[Recorded]) -> list[list[Recorded]]:
    """The server's requests grouped into logical calls (as bench/provider_faults.py does).

    A retry resends the identical body, so a logical call is the run of
    consecutive requests with one body up to and including its ``ok``. (The
    test pipelines below run one request at a time: survey, then audit, then
    notes, each task's turns in order.)
    """
    calls: list[list[Recorded]] = []
    for r in requests:
        last = calls[-1] if calls else None
        if last is not None and last[-1].outcome != "ok" and last[-1].body == r.body:
            last.append(r)
        else:
            calls.append([r])
    return calls


def three_agents(write_specs: Any) -> Path:
    specs = [
        minimal_spec("survey", priority="critical", tasks=3),
        minimal_spec("audit", required={"survey": ""}, tasks=3),
        minimal_spec("notes", required={"survey": ""}, optional={"audit": ""}, tasks=3),
    ]
    for spec in specs:
        spec["security"]["capabilities_required"] = ["filesystem-read"]
    return write_specs(*specs)


@pytest.mark.usefixtures("prefect_server")
class TestPipelineOnTheLoopbackServer:
    def test_thirty_percent_faults_still_complete_within_the_attempt_bound(
        self, write_specs: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = three_agents(write_specs)
        max_attempts = ProviderSettings().max_attempts  # toka's default (5): the documented bound
        with AnthropicServer(fault_rate=0.3, seed=7,
                             fault_mix=[Fault.status(429, retry_after=0.01), Fault.status(529),
                                        Fault.status(500), Fault.drop()]) as server:
            state, summary = run_against(server, folder, monkeypatch, run_key="faulty")
            assert state.is_completed(), [(a.agent, a.reason) for a in summary.agents]
            assert all(t.state == "completed" and t.result is not None for a in summary.agents for t in a.tasks)
            assert sum(len(a.tasks) for a in summary.agents) == 9
            assert server.count("fault:") > 0
            calls = logical_calls(server.requests)
            assert len(calls) == server.count("ok") == summary.usage.requests == 18  # list_dir, submit per task
            assert sum(len(c) for c in calls) == len(server.requests)
            assert all(c[-1].outcome == "ok" for c in calls)  # no call gave up
            attempts = [len(c) for c in calls]
            assert max(attempts) <= max_attempts, attempts  # the bound holds for every logical call
            assert max(attempts) > 1  # and retries did happen
            assert summary.model == default_model()

    def test_worst_case_attempts_for_one_call_is_max_attempts(
        self, write_specs: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = write_specs(minimal_spec("doomed", priority="critical", tasks=1))
        with AnthropicServer(fault_rate=1.0, fault_mix=[Fault.status(529)]) as server:
            _, summary = run_against(server, folder, monkeypatch, run_key="doomed", max_attempts=3,
                                     max_retry_wait=5)
            task = summary.agents[0].tasks[0]
            assert task.state == "failed" and "ModelRetriesExhausted" in task.error
            # A critical task has 3 Prefect retries, yet the HTTP attempts stay at
            # max_attempts: exhausted transient failures are final for Prefect.
            assert len(server.requests) == 3
            assert task.attempts == 1

    @pytest.mark.parametrize(
        ("fault", "model_id", "line"),
        [
            (Fault.status(401, message="invalid x-api-key"), "claude-test",
             "Anthropic API 401 authentication_error: the API key was rejected: check ANTHROPIC_API_KEY "
             "(or the Secret block named with --api-key-secret) (invalid x-api-key)"),
            (Fault.status(404, message="model: claude-sonet-4-5"), "claude-sonet-4-5",
             "Anthropic API 404 not_found_error: model 'claude-sonet-4-5' not found: check the model id "
             "(--model / TOKA_MODEL); if it is right, check ANTHROPIC_BASE_URL (model: claude-sonet-4-5)"),
        ],
        ids=["bad-key", "unknown-model"],
    )
    def test_access_errors_stop_the_run_with_one_clear_line(
        self, write_specs: Any, monkeypatch: pytest.MonkeyPatch, fault: Fault, model_id: str, line: str
    ) -> None:
        folder = three_agents(write_specs)  # medium tasks: a normal failure would not stop them
        with AnthropicServer(fault_rate=1.0, fault_mix=[fault]) as server:
            state, summary = run_against(server, folder, monkeypatch, run_key=f"access-{model_id}", model=model_id)
            assert state.is_failed()
            survey = summary.agents[0]
            assert survey.fatal == line
            assert survey.tasks[0].error == f"ProviderAccessError: {line}"
            assert [t.state for t in survey.tasks] == ["failed", "not-run", "not-run"]
            assert [a.reason for a in summary.agents[1:]] == [f"not started: {line}"] * 2
            assert len(server.requests) == 1  # no retry, no further request
            assert server.requests[0].body["model"] == model_id

    def test_prompt_caching_across_tasks_of_an_agent(
        self, write_specs: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = three_agents(write_specs)
        with AnthropicServer() as server:
            _, summary = run_against(server, folder, monkeypatch, run_key="cache")
            survey = summary.agents[0]
            assert survey.tasks[0].usage.cache_creation_input_tokens > 0
            assert all(t.usage.cache_read_input_tokens > 0 for t in survey.tasks[1:])
            data = summary.to_dict()
            assert data["usage"]["cache_read_input_tokens"] > 0

    def test_budgets(self, write_specs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        folder = three_agents(write_specs)
        with AnthropicServer() as server:
            state, summary = run_against(server, folder, monkeypatch, run_key="budget-task",
                                         task_token_budget=1)
            survey = summary.agents[0]
            first = survey.tasks[0]
            assert first.state == "failed"
            assert "BudgetExceededError: the task (survey 1/3) token budget of 1 is spent" in first.error
            assert first.attempts == 1  # a budget error is never retried
            # Each task may start one request, then its own budget is spent; other
            # tasks have budgets of their own.
            assert all(t.state == "failed" for a in summary.agents for t in a.tasks)
            assert len(server.requests) == 9

        with AnthropicServer() as server:
            _, summary = run_against(server, folder, monkeypatch, run_key="budget-pipeline",
                                     pipeline_token_budget=1)
            assert summary.budget_tokens == 1
            survey = summary.agents[0]
            # The first request may start; the second (the same task's submit) may not.
            assert "pipeline token budget of 1 is spent" in survey.tasks[0].error
            assert [t.state for t in survey.tasks] == ["failed", "not-run", "not-run"]
            assert survey.state == "failed" and survey.reason.startswith("budget spent: ")
            assert [a.state for a in summary.agents[1:]] == ["not-run", "not-run"]
            assert len(server.requests) == 1

    def test_resume_charges_nothing_for_replayed_tasks_and_carries_the_total(
        self, write_specs: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = three_agents(write_specs)
        with AnthropicServer() as server:
            _, first = run_against(server, folder, monkeypatch, run_key="resume-spend")
            spent = first.spent_tokens
            assert spent > 0 and first.usage.total_tokens == spent
            n = len(server.requests)
            _, again = run_against(server, folder, monkeypatch, run_key="resume-spend")
            assert len(server.requests) == n  # nothing asked again
            assert again.usage.total_tokens == 0  # replayed tasks charge nothing...
            assert again.spent_tokens == spent  # ...but what they cost is carried forward
            assert all(t.state == "cached" and t.carried_usage.total_tokens > 0
                       for a in again.agents for t in a.tasks)


@pytest.mark.usefixtures("prefect_server")
def test_configured_limits_missing_on_the_server_say_so(write_specs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_specs(minimal_spec("a", tasks=1))
    with AnthropicServer() as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)

        async def go() -> Any:
            state = await pipeline(specs=[str(folder)], run=RunOptions(workspace=str(folder), run_key="limits-missing"),
                                   provider=ProviderSettings(concurrent_requests=2), return_state=True)
            return await state.aresult(raise_on_failure=False)

        outcome = asyncio.run(go())
        assert "toka-model-concurrent-requests" in str(outcome)
        assert "toka limits apply" in str(outcome)
        assert server.requests == []

        from toka.limits import apply_limits

        done = asyncio.run(apply_limits(LimitSettings(requests_per_minute=600, concurrent_requests=2)))
        assert any("toka-model-concurrent-requests = 2" in line for line in done)

        async def again() -> Any:
            state = await pipeline(specs=[str(folder)], run=RunOptions(workspace=str(folder), run_key="limits-there"),
                                   provider=ProviderSettings(concurrent_requests=2, requests_per_minute=600),
                                   return_state=True)
            return state

        assert asyncio.run(again()).is_completed()
        assert server.count("ok") == 1  # no tools granted: the model submits at once


@pytest.mark.usefixtures("prefect_server")
def test_api_key_never_written_anywhere(write_specs: Any, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture, prefect_api: PrefectServer) -> None:
    folder = three_agents(write_specs)
    with AnthropicServer(faults=[Fault.status(401, message=f"bad key {KEY}")]) as server:
        _, summary = run_against(server, folder, monkeypatch, run_key="hygiene-1")
        assert "[REDACTED]" in summary.agents[0].tasks[0].error  # the echoed key was scrubbed
        assert KEY not in json.dumps(summary.to_dict())
    with AnthropicServer() as server:
        _, summary = run_against(server, folder, monkeypatch, run_key="hygiene-2")
        assert server.leaks(KEY) == []  # sent only as the authorization header
        assert KEY not in json.dumps(summary.to_dict())
    assert KEY not in caplog.text
    # Everything Prefect and toka wrote: the API database (logs, artifacts,
    # parameters, states), persisted results, and the workspace state directory.
    database = prefect_api.home / "prefect.db"  # the server's database (SQLite)
    assert database.is_file()
    for path in [database, *PREFECT_HOME.rglob("*"), *folder.rglob("*")]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"
