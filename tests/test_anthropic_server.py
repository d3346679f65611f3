"""The loopback Anthropic server, exercised through the real ``anthropic`` SDK.

These tests also pin what this SDK version makes of each failure, which the
runtime's error translation (``toka.claude.translate_error``) relies on.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import re
import threading
import time
from typing import Any

import anthropic
import pytest
from anthropic.types import Message, TextBlock, ToolUseBlock

from .anthropic_server import (
    DEFAULT_FAULT_MIX,
    SUBMITTED,
    AnthropicServer,
    Fault,
    message,
    scripted_responder,
    text_block,
    tool_use_block,
)

KEY = "sk-ant-test-loopback-0123456789abcdef"
TOOLS = [
    {"name": "list_dir", "description": "List a directory.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}},
    {"name": "submit_result", "description": "Finish the task.",
     "input_schema": {"type": "object", "properties": {"status": {"type": "string"}}}},
]
HELLO = [{"role": "user", "content": "hello"}]


def client(server: AnthropicServer, *, timeout: float = 5.0, max_retries: int = 0) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.base_url, api_key=KEY, max_retries=max_retries, timeout=timeout)


async def create(server: AnthropicServer, *, timeout: float = 5.0, max_retries: int = 0, **params: Any) -> Any:
    params = {"model": "claude-test", "max_tokens": 64, "messages": HELLO, **params}
    async with client(server, timeout=timeout, max_retries=max_retries) as c:
        return await c.messages.create(**params)


def call(server: AnthropicServer, **kwargs: Any) -> Any:
    return asyncio.run(create(server, **kwargs))


def post(server: AnthropicServer, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    host, port = server.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# -- normal replies -----------------------------------------------------------------


def test_default_script_plays_a_tool_using_agent_through_the_sdk() -> None:
    with AnthropicServer() as server:
        first = call(server, tools=TOOLS)
        assert isinstance(first, Message)
        assert first.id.startswith("msg_") and first.role == "assistant" and first.model == "claude-test"
        assert first.stop_reason == "tool_use"
        [use] = first.content
        assert isinstance(use, ToolUseBlock)
        assert (use.name, use.input) == ("list_dir", {"path": "."})
        assert use.id.startswith("toolu_")
        assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
        assert first.usage.cache_creation_input_tokens == 0 and first.usage.cache_read_input_tokens == 0

        turn_2 = [*HELLO, {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "a.py"}]}]
        second = call(server, tools=TOOLS, messages=turn_2)
        [submit] = second.content
        assert isinstance(submit, ToolUseBlock) and submit.name == "submit_result"
        assert submit.input == SUBMITTED and submit.input["status"] == "completed"
        assert second.stop_reason == "tool_use"

        without_tools = call(server)
        assert [type(b) for b in without_tools.content] == [TextBlock]
        assert without_tools.stop_reason == "end_turn"
    assert [r.outcome for r in server.requests] == ["ok", "ok", "ok"]
    assert server.requests[1].body["messages"][-1]["content"][0]["type"] == "tool_result"


def test_scripted_replies_parse_into_sdk_types_and_given_usage_is_kept() -> None:
    def script(request: dict[str, Any]) -> Any:
        if request["messages"][0]["content"] == "full":
            return message(text_block("as is"), stop_reason="max_tokens", model="claude-other",
                           usage={"input_tokens": 7, "output_tokens": 3})
        return [text_block("let me look"), tool_use_block("read_file", {"path": "a.py"}, id="toolu_fixed")]

    with AnthropicServer(scripted_responder(script)) as server:
        blocks = call(server, model="claude-echo")
        assert [type(b) for b in blocks.content] == [TextBlock, ToolUseBlock]
        assert blocks.content[0].text == "let me look"
        assert (blocks.content[1].id, blocks.content[1].input) == ("toolu_fixed", {"path": "a.py"})
        assert blocks.stop_reason == "tool_use" and blocks.model == "claude-echo"

        full = call(server, messages=[{"role": "user", "content": "full"}])
        assert full.stop_reason == "max_tokens" and full.model == "claude-other"
        assert (full.usage.input_tokens, full.usage.output_tokens) == (7, 3)
        assert full.usage.cache_read_input_tokens is None


def test_a_failing_responder_is_a_500_and_is_recorded() -> None:
    def broken(request: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("nope")

    with AnthropicServer(broken) as server, pytest.raises(anthropic.InternalServerError):
        call(server)
    assert server.requests[0].outcome == "error:responder"
    assert server.requests[0].error == "KeyError: 'nope'"


def test_requests_are_checked_like_the_real_api() -> None:
    good = {"model": "m", "max_tokens": 5, "messages": HELLO}
    auth = {"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01",
            "content-type": "application/json"}
    with AnthropicServer() as server:
        assert post(server, "/v1/messages", json.dumps(good).encode(), auth)[0] == 200
        assert post(server, "/v1/nothing", json.dumps(good).encode(), auth)[0] == 404
        assert post(server, "/v1/messages", json.dumps(good).encode(), {"anthropic-version": "x"})[0] == 401
        assert post(server, "/v1/messages", b"{not json", auth)[0] == 400
        status, body = post(server, "/v1/messages", json.dumps({"model": "m", "messages": HELLO}).encode(), auth)
        assert (status, body["error"]["type"]) == (400, "invalid_request_error")
        assert "max_tokens" in body["error"]["message"]
        assert post(server, "/v1/messages", json.dumps({**good, "stream": True}).encode(), auth)[0] == 400
    assert [r.outcome for r in server.requests] == ["ok", "error:404", "error:401", "error:400", "error:400",
                                                    "error:400"]
    assert server.requests[3].body is None


# -- faults, as the SDK sees them ------------------------------------------------------

STATUS_FAULTS = [
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (401, anthropic.AuthenticationError, "authentication_error"),
    (403, anthropic.PermissionDeniedError, "permission_error"),
    (404, anthropic.NotFoundError, "not_found_error"),
    (413, anthropic.ContentTooLargeError, "request_too_large"),
    (422, anthropic.UnprocessableEntityError, "invalid_request_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (500, anthropic.InternalServerError, "api_error"),
    (529, anthropic.OverloadedError, "overloaded_error"),
]


@pytest.mark.parametrize(("code", "error_class", "error_type"), STATUS_FAULTS)
def test_status_faults_become_the_sdk_exception_of_the_real_api(code: int, error_class: type, error_type: str) -> None:
    with AnthropicServer(faults=[Fault.status(code, message="try later")]) as server:
        with pytest.raises(anthropic.APIStatusError) as caught:
            call(server)
    e = caught.value
    assert type(e) is error_class
    assert e.status_code == code
    assert e.type == error_type and e.api_message == "try later"
    assert e.body == {"type": "error", "error": {"type": error_type, "message": "try later"}}
    assert e.request_id == "req_loopback_000001"
    assert "retry-after" not in e.response.headers
    assert [r.outcome for r in server.requests] == [f"fault:{code}"]


def test_sdk_class_facts_this_suite_relies_on() -> None:
    assert issubclass(anthropic.OverloadedError, anthropic.InternalServerError)
    assert anthropic.RequestTooLargeError is anthropic.ContentTooLargeError
    assert issubclass(anthropic.APITimeoutError, anthropic.APIConnectionError)


def test_429_carries_retry_after_and_a_custom_error_type() -> None:
    faults = [Fault.status(429, retry_after=0.05), Fault.status(400, error_type="my_error", retry_after=2)]
    with AnthropicServer(faults=faults) as server:
        with pytest.raises(anthropic.RateLimitError) as caught:
            call(server)
        assert caught.value.response.headers["retry-after"] == "0.05"
        with pytest.raises(anthropic.BadRequestError) as caught:
            call(server)
        assert caught.value.type == "my_error"
        assert caught.value.response.headers["retry-after"] == "2"
        assert call(server).stop_reason == "end_turn"  # the queue is used up
    assert [r.outcome for r in server.requests] == ["fault:429", "fault:400", "ok"]


def test_a_dropped_connection_is_an_api_connection_error_and_is_recorded() -> None:
    with AnthropicServer(faults=[Fault.drop()]) as server:
        with pytest.raises(anthropic.APIConnectionError) as caught:
            call(server, tools=TOOLS)
        assert type(caught.value) is anthropic.APIConnectionError  # not the timeout subclass
        assert call(server).content  # the next request gets a new connection
    assert [r.outcome for r in server.requests] == ["fault:drop", "ok"]
    assert server.requests[0].body["tools"] == TOOLS


def test_slow_reply_beyond_the_client_timeout_is_an_api_timeout_error() -> None:
    # A reply 60 s late: the bounds below are far from both the 0.5 s timeout and the 60 s,
    # so that a busy machine cannot break them.
    with AnthropicServer(faults=[Fault.slow(60)]) as server:
        start = time.monotonic()
        with pytest.raises(anthropic.APITimeoutError):
            call(server, timeout=0.5)
        assert time.monotonic() - start < 20  # the client gave up; it did not wait for the reply
    assert time.monotonic() - start < 20  # stopping cut the 60 s wait short
    assert server.count("fault:slow") == 1


def test_slow_reply_within_the_timeout_arrives_and_does_not_block_others() -> None:
    async def both(server: AnthropicServer) -> tuple[list[Any], list[float]]:
        async def timed() -> tuple[Any, float]:
            start = time.monotonic()
            reply = await create(server, timeout=30)
            return reply, time.monotonic() - start

        results = await asyncio.gather(timed(), timed())
        return [r for r, _ in results], sorted(t for _, t in results)

    with AnthropicServer(faults=[Fault.slow(1.5)]) as server:
        replies, (fast, slow) = asyncio.run(both(server))
    assert all(isinstance(r, Message) for r in replies)
    # The other request was answered while the slow one waited (blocked, it would have taken
    # 1.5 s too), and the slow one arrived after its wait, within the client's timeout.
    assert fast < 1.5 <= slow < 30
    assert sorted(r.outcome for r in server.requests) == ["fault:slow", "ok"]


def test_latency_delays_every_reply_and_concurrent_requests_overlap() -> None:
    async def four(server: AnthropicServer) -> tuple[list[Any], float]:
        async def one() -> Any:
            try:
                return await create(server)
            except anthropic.APIStatusError as e:
                return e

        start = time.monotonic()
        replies = await asyncio.gather(*(one() for _ in range(4)))
        return list(replies), time.monotonic() - start

    latency = 1.0
    with AnthropicServer(latency=latency, faults=[Fault.status(529)]) as server:
        replies, elapsed = asyncio.run(four(server))
        single_start = time.monotonic()
        call(server)
        single = time.monotonic() - single_start
    assert latency <= single < 2 * latency
    # Four requests at once (one of them a fault, which waits too) overlap: the server had
    # read all four before it answered the first, and together they took far less than
    # four latencies (sequential). Generous bounds: this machine may be busy.
    arrivals = [r.time for r in server.requests[:4]]
    assert max(arrivals) - min(arrivals) < latency, arrivals
    assert latency <= elapsed < 4 * latency, elapsed
    assert sum(isinstance(r, Message) for r in replies) == 3
    assert sum(isinstance(r, anthropic.OverloadedError) for r in replies) == 1
    assert sorted(r.outcome for r in server.requests) == ["fault:529", "ok", "ok", "ok", "ok"]
    with pytest.raises(ValueError):
        AnthropicServer(latency=-1)


def test_malformed_bodies_are_not_sdk_errors() -> None:
    """What anthropic 2.12.0 does with a 200 whose body is broken (no strict validation)."""
    faults = [Fault.malformed(), Fault.malformed("html"), Fault.malformed("shape")]
    with AnthropicServer(faults=faults) as server:
        # invalid JSON under application/json: the decoder's own error escapes the SDK
        with pytest.raises(json.JSONDecodeError) as caught:
            call(server)
        assert not isinstance(caught.value, anthropic.AnthropicError)
        # a non-JSON content type: the body comes back as a str instead of a Message
        html = call(server)
        assert isinstance(html, str) and "Bad Gateway" in html
        # valid JSON of the wrong shape: a Message built without validation
        shape = call(server)
        assert isinstance(shape, Message)
        assert shape.content == "not a list of blocks" and shape.usage is None
    assert [r.outcome for r in server.requests] == ["fault:malformed", "fault:malformed-html",
                                                    "fault:malformed-shape"]


def test_strict_validation_turns_a_wrong_shape_into_a_validation_error() -> None:
    async def strict(server: AnthropicServer) -> Any:
        async with anthropic.AsyncAnthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=5,
                                            _strict_response_validation=True) as c:
            return await c.messages.create(model="m", max_tokens=5, messages=HELLO)

    with AnthropicServer(faults=[Fault.malformed("shape")]) as server:
        with pytest.raises(anthropic.APIResponseValidationError):
            asyncio.run(strict(server))


def test_sdk_retries_are_separate_http_requests() -> None:
    faults = [Fault.status(500, retry_after=0.01), Fault.status(500, retry_after=0.01)]
    with AnthropicServer(faults=faults) as server:
        reply = call(server, max_retries=2)
    assert isinstance(reply, Message)
    assert [r.outcome for r in server.requests] == ["fault:500", "fault:500", "ok"]
    assert [r.headers["x-stainless-retry-count"] for r in server.requests] == ["0", "1", "2"]
    assert server.count() == 3 and server.count("fault:") == 2


# -- prompt-cache emulation --------------------------------------------------------------

SYSTEM = [{"type": "text", "text": "You are a careful agent. " * 40, "cache_control": {"type": "ephemeral"}}]


def test_prompt_cache_is_written_once_then_read() -> None:
    with AnthropicServer() as server:
        first = call(server, system=SYSTEM).usage
        second = call(server, system=SYSTEM).usage
        other_model = call(server, system=SYSTEM, model="claude-other").usage
    assert first.cache_creation_input_tokens > 0 and first.cache_read_input_tokens == 0
    assert second.cache_creation_input_tokens == 0
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert first.input_tokens == second.input_tokens > 0  # the uncached message
    assert first.cache_creation.ephemeral_5m_input_tokens == first.cache_creation_input_tokens
    assert other_model.cache_read_input_tokens == 0  # caches are per model


def test_without_cache_control_everything_is_input_tokens() -> None:
    plain = [{"type": "text", "text": SYSTEM[0]["text"]}]
    with AnthropicServer() as server:
        usages = [call(server, system=plain).usage for _ in range(2)]
    cached = usages[0]
    assert cached.cache_creation_input_tokens == cached.cache_read_input_tokens == 0
    assert cached.input_tokens > 200  # ~ len(json of system + message) / 4
    assert usages[1].input_tokens == cached.input_tokens


def test_a_changed_prefix_misses_and_message_breakpoints_are_found_by_lookback() -> None:
    tools = [*TOOLS[:-1], {**TOOLS[-1], "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    turn_1 = [{"role": "user", "content": [{"type": "text", "text": "task " * 50,
                                            "cache_control": {"type": "ephemeral"}}]}]
    turn_2 = [{"role": "user", "content": [{"type": "text", "text": "task " * 50}]},
              {"role": "assistant", "content": [{"type": "text", "text": "working " * 50}]},
              {"role": "user", "content": [{"type": "text", "text": "go on", "cache_control": {"type": "ephemeral"}}]}]
    with AnthropicServer() as server:
        one = call(server, tools=tools, messages=turn_1).usage
        two = call(server, tools=tools, messages=turn_2).usage
        changed = call(server, tools=tools[:1], messages=turn_1).usage
    assert one.cache_read_input_tokens == 0
    assert one.cache_creation.ephemeral_1h_input_tokens > 0 and one.cache_creation.ephemeral_5m_input_tokens > 0
    # turn 2 reads tools + turn 1 and writes only what is new
    assert two.cache_read_input_tokens == one.cache_creation_input_tokens
    assert 0 < two.cache_creation_input_tokens < one.cache_creation_input_tokens
    assert two.cache_creation.ephemeral_1h_input_tokens == 0
    assert changed.cache_read_input_tokens == 0 and changed.cache_creation_input_tokens > 0


def test_a_prompt_longer_than_the_context_window_is_refused_like_the_real_api() -> None:
    calls: list[Any] = []
    respond = scripted_responder()

    def counting(body: dict[str, Any]) -> dict[str, Any]:
        calls.append(body)
        return respond(body)

    long = [{"role": "user", "content": "word " * 400}]  # ~500 tokens at 4 characters a token
    with AnthropicServer(counting, context_window=300) as server:
        fits = call(server).usage
        with pytest.raises(anthropic.BadRequestError) as caught:
            call(server, messages=long)
    assert fits.input_tokens <= 300
    assert caught.value.status_code == 400
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 300 maximum", caught.value.body["error"]["message"])
    assert [r.outcome for r in server.requests] == ["ok", "error:too-long"]
    assert len(calls) == 1  # the responder never sees the refused request


# -- random faults --------------------------------------------------------------------------


def test_random_faults_are_seeded_and_plausible() -> None:
    async def fifty(server: AnthropicServer) -> list[str]:
        seen = []
        async with client(server, timeout=5) as c:
            for _ in range(50):
                try:
                    await c.messages.create(model="m", max_tokens=5, messages=HELLO)
                    seen.append("ok")
                except anthropic.APIStatusError as e:
                    seen.append(f"fault:{e.status_code}")
                except anthropic.APIConnectionError:
                    seen.append("fault:drop")
        return seen

    runs = []
    for seed in (7, 7, 8):
        with AnthropicServer(fault_rate=0.3, seed=seed) as server:
            seen = asyncio.run(fifty(server))
        assert seen == [r.outcome for r in server.requests]  # the SDK saw what the server did
        runs.append(seen)
    assert runs[0] == runs[1] and runs[0] != runs[2]
    faults = sum(o != "ok" for o in runs[0])
    assert 5 <= faults <= 25
    assert set(runs[0]) - {"ok"} <= {"fault:429", "fault:529", "fault:500", "fault:drop"}

    rng = random.Random(7)  # the documented draw
    expected = [rng.choice(DEFAULT_FAULT_MIX).outcome if rng.random() < 0.3 else "ok" for _ in range(50)]
    assert runs[0] == expected


def test_queued_faults_come_before_random_ones() -> None:
    with AnthropicServer(fault_rate=1.0, fault_mix=[Fault.status(529)], faults=[Fault.drop()]) as server:
        server.enqueue_faults(Fault.status(401))
        for expected in (anthropic.APIConnectionError, anthropic.AuthenticationError, anthropic.OverloadedError):
            with pytest.raises(expected):
                call(server)
    assert [r.outcome for r in server.requests] == ["fault:drop", "fault:401", "fault:529"]
    assert server.count("fault:") == 3 and server.count("ok") == 0
    assert len(server.requests_for(lambda r: r.outcome == "fault:529")) == 1


def test_fault_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        AnthropicServer(fault_rate=1.5)
    with pytest.raises(ValueError):
        AnthropicServer(fault_rate=0.5, fault_mix=[])
    with pytest.raises(ValueError):
        Fault.malformed("xml")  # type: ignore[arg-type]


# -- hygiene ------------------------------------------------------------------------------------


def test_the_key_stays_in_the_recorded_headers(capfd: pytest.CaptureFixture[str]) -> None:
    faults = [Fault.status(401), Fault.drop(), Fault.malformed("shape")]
    bodies = []
    with AnthropicServer(faults=faults) as server:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            call(server)
        bodies.append(caught.value.response.text)
        with pytest.raises(anthropic.APIConnectionError):
            call(server)
        call(server)
        bodies.append(call(server, tools=TOOLS).model_dump_json())
        post(server, "/v1/nothing", b"{}", {"x-api-key": KEY})
        assert server.leaks(KEY) == []
        assert KEY not in repr(server.requests)
        call(server, messages=[{"role": "user", "content": f"my key is {KEY}"}])
        assert server.leaks(KEY) == ["request 5: body"]
    out, err = capfd.readouterr()
    assert KEY not in out + err
    assert not any(KEY in b for b in bodies)
    # anthropic 2.x sends the key as a bearer token; other clients may use x-api-key
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests if r.path == "/v1/messages")
    assert server.requests[4].headers["x-api-key"] == KEY


def test_threads_stop_even_with_idle_and_waiting_connections() -> None:
    before = threading.active_count()

    async def leave_open(server: AnthropicServer) -> None:
        c = client(server, timeout=0.3)  # never closed: its keep-alive connection stays open
        await c.messages.create(model="m", max_tokens=5, messages=HELLO)
        server.enqueue_faults(Fault.slow(60))  # still waiting when the server stops
        with pytest.raises(anthropic.APITimeoutError):
            await c.messages.create(model="m", max_tokens=5, messages=HELLO)

    with AnthropicServer(faults=[Fault.status(529)]) as server:
        with pytest.raises(anthropic.OverloadedError):
            call(server)
        asyncio.run(leave_open(server))
        assert threading.active_count() > before
        start = time.monotonic()
    assert time.monotonic() - start < 20  # the 60 s wait was cut short (a thread it missed: 60 s or an error)
    assert threading.active_count() == before
    assert [r.outcome for r in server.requests] == ["fault:529", "ok", "fault:slow"]
