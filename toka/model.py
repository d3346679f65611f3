"""The provider-agnostic model interface used by the LLM-assisted step.

The shapes mirror the Anthropic Messages API (content blocks, tool use,
stop reasons, usage) because that is the richest provider we speak; other
providers and the offline model translate to and from them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ContentBlock",
    "Message",
    "Model",
    "ModelRequest",
    "ModelResponse",
    "TextBlock",
    "ToolDefinition",
    "ToolResultBlock",
    "ToolUseBlock",
    "Usage",
    "current_model_override",
    "override_model",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Usage(_Frozen):
    """Tokens and requests spent; adds up across requests, tasks and agents."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_creation_input_tokens=self.cache_creation_input_tokens
            + other.cache_creation_input_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            requests=self.requests + other.requests,
        )

    @property
    def total_tokens(self) -> int:
        """Every token billed: input (plain, cache writes, cache reads) and output."""
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )


class TextBlock(_Frozen):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(_Frozen):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Frozen):
    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: str
    is_error: bool = False


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(_Frozen):
    role: Literal["user", "assistant"]
    content: list[ContentBlock]


class ToolDefinition(_Frozen):
    """A tool offered to the model: its stable name, what it does, its JSON input schema."""

    name: str
    description: str
    input_schema: dict[str, Any]

    @functools.cached_property
    def json_text(self) -> str:
        """The definition as JSON, made once: a definition is shared by every request that offers
        its tool (:mod:`toka.tools`), and the context estimate reads its size twice a request."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False)


class ModelRequest(_Frozen):
    """One request: the stable prefix (system, tools) first, then the conversation."""

    system: str
    messages: list[Message]
    tools: list[ToolDefinition] = []
    max_tokens: int = 4096
    tool_choice: Literal["none"] | None = None
    """``none``: the model must answer in text (a summary of the work so far); the tools are still
    listed, so the provider's cached prefix (system and tools) is reused."""
    metadata: dict[str, str] = {}
    """Where the request comes from (agent, task, turn); never sent to providers."""


StopReason = Literal["end_turn", "tool_use", "max_tokens", "stop_sequence", "pause_turn", "refusal"]


class ModelResponse(_Frozen):
    content: list[TextBlock | ToolUseBlock]
    stop_reason: StopReason | None = "end_turn"
    usage: Usage = Usage()
    model: str = ""
    server_cleared: int | None = None
    """With the provider's own context editing on: the input tokens it cleared for this request
    (0: none needed); None: the server said nothing about it (not on, or not supported)."""

    @property
    def tool_uses(self) -> list[ToolUseBlock]:
        return [b for b in self.content if isinstance(b, ToolUseBlock)]


@runtime_checkable
class Model(Protocol):
    """What the step loop needs from a model."""

    @property
    def name(self) -> str:
        """Shown in reports, e.g. ``offline`` or ``claude-sonnet-4-5``."""
        ...

    @property
    def offline(self) -> bool:
        """True for models that never reach a provider (their results are placeholders)."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change answers (model id, temperature...); part of task cache keys."""
        ...

    def worst_case_seconds(self) -> float | None:
        """Longest one :meth:`request` can take, its own retries and waits included.

        The step loop's guard around one request is set to it, so that the guard never cuts
        short retries the model owns. None: the model has no timeout or retries of its own,
        and the run's request timeout alone bounds a request.
        """
        ...

    async def request(self, request: ModelRequest) -> ModelResponse:
        """Send one request and return the response, or raise a ModelError."""
        ...


_override: ContextVar[Model | None] = ContextVar("toka_model_override", default=None)


@contextmanager
def override_model(model: Model) -> Iterator[Model]:
    """Use ``model`` for every step run in this context (tests, embedding, benchmarks).

    Flows and tasks started in the context inherit it, as long as they run in
    this process.
    """
    token = _override.set(model)
    try:
        yield model
    finally:
        _override.reset(token)


def current_model_override() -> Model | None:
    """The model set by :func:`override_model`, if any."""
    return _override.get()
