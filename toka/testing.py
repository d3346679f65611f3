"""Fake models for tests of specs and of toka itself.

``ScriptedModel`` answers from a queue and records every request;
``FunctionModel`` answers by calling a function. Both satisfy
:class:`toka.model.Model`, so they run through the real loop, tools and
Prefect tasks; install one with :func:`toka.model.override_model`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from .model import ModelRequest, ModelResponse, TextBlock, ToolUseBlock, Usage

__all__ = ["FunctionModel", "ScriptedModel", "submit", "text", "tool_call"]

_ids = itertools.count(1)


def tool_call(name: str, /, **arguments: Any) -> ModelResponse:
    """A response asking for one tool call."""
    return ModelResponse(
        content=[ToolUseBlock(id=f"call-{next(_ids)}", name=name, input=arguments)],
        stop_reason="tool_use",
        usage=Usage(input_tokens=10, output_tokens=5, requests=1),
    )


def submit(status: str = "completed", summary: str = "done", **fields: Any) -> ModelResponse:
    """A response submitting a structured result."""
    return tool_call("submit_result", status=status, summary=summary, **fields)


def text(content: str) -> ModelResponse:
    """A response with text only (no tool call)."""
    return ModelResponse(
        content=[TextBlock(text=content)],
        stop_reason="end_turn",
        usage=Usage(input_tokens=10, output_tokens=5, requests=1),
    )


Reply = ModelResponse | Exception | Callable[[ModelRequest], Awaitable[ModelResponse]]


class ScriptedModel:
    """Answers requests from a queue; ``history`` holds every request received.

    Queue entries are responses, exceptions (raised), or async callables of
    the request. With ``default`` set, an empty queue keeps answering with it.
    """

    name = "scripted"
    offline = True

    def __init__(self, *replies: Reply, default: Reply | None = None) -> None:
        self.queue: list[Reply] = list(replies)
        self.default = default
        self.history: list[ModelRequest] = []

    def enqueue(self, *replies: Reply) -> None:
        self.queue.extend(replies)

    def fingerprint(self) -> dict[str, Any]:
        return {"model": self.name}

    def worst_case_seconds(self) -> float | None:
        return None  # no retries of its own: the run's request timeout bounds each request

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.history.append(request)
        if self.queue:
            reply = self.queue.pop(0)
        elif self.default is not None:
            reply = self.default
        else:
            raise AssertionError(f"ScriptedModel has no reply left for request {len(self.history)}")
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):
            return await reply(request)
        return reply


class FunctionModel:
    """Answers each request by calling ``fn(request)`` (sync or async)."""

    offline = True

    def __init__(
        self,
        fn: Callable[[ModelRequest], ModelResponse | Awaitable[ModelResponse]],
        *,
        name: str = "function",
    ) -> None:
        self.fn = fn
        self.name = name
        self.history: list[ModelRequest] = []

    def fingerprint(self) -> dict[str, Any]:
        return {"model": self.name}

    def worst_case_seconds(self) -> float | None:
        return None  # no retries of its own: the run's request timeout bounds each request

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.history.append(request)
        reply = self.fn(request)
        if asyncio.iscoroutine(reply) or isinstance(reply, Awaitable):
            reply = await reply
        return reply  # type: ignore[return-value]
