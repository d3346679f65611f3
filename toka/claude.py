"""The Anthropic provider: Claude behind the model interface, through the official SDK.

Retry ownership (each failure class has exactly one owner):

- transient failures (429 honouring ``retry-after``, 529, other 5xx, dropped
  connections, read timeouts, a malformed body) are retried **here**, with
  tenacity, up to ``max_attempts`` HTTP attempts and ``max_retry_wait`` seconds
  of waiting in all; the SDK's own retries are off (``max_retries=0``) so
  attempts never multiply;
- when those attempts are spent, the error is final: Prefect does not retry it
  again (:class:`~toka.errors.ModelRetriesExhausted` is not retryable);
- permanent failures (400, 401, 403, 404, 413, 422, a prompt too long for the
  context window) are never retried by anyone; 401, 403 and 404 (a rejected
  key, no permission, an unknown model id or a wrong base URL) also stop the
  run, since every other request would fail the same way.

Provider errors become the project's own errors in exactly one place,
:func:`translate_error`. The API key never appears in a message.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from typing import Any

import anthropic
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.wait import wait_random_exponential

from .errors import (
    ContextOverflowError,
    ModelError,
    ModelRetriesExhausted,
    ModelTimeoutError,
    PermanentModelError,
    ProviderAccessError,
    TransientModelError,
)
from .limits import RequestLimiter
from .model import ModelRequest, ModelResponse, TextBlock, ToolUseBlock, Usage
from .redact import redact

__all__ = ["AnthropicModel", "default_model", "translate_error"]

_CACHE = {"type": "ephemeral"}
_STOP_REASONS = {"end_turn", "tool_use", "max_tokens", "stop_sequence", "pause_turn", "refusal"}


def default_model() -> str:
    """A current Claude model from the SDK's own list: the newest Sonnet that is not deprecated."""
    from anthropic.resources.messages.messages import DEPRECATED_MODELS
    from anthropic.types.model_param import ModelParam

    literal = next(a for a in typing.get_args(ModelParam) if typing.get_origin(a) is typing.Literal)
    names = [n for n in typing.get_args(literal) if n not in DEPRECATED_MODELS]
    sonnets = [n for n in names if n.startswith("claude-sonnet-") and not n[-8:].isdigit()]
    return (sonnets or names)[0]


class AnthropicModel:
    """Claude through ``anthropic.AsyncAnthropic``, with this project's retry policy.

    Args:
        model: Model id, e.g. ``claude-sonnet-4-5``.
        api_key: The key (from ``ANTHROPIC_API_KEY`` or a Prefect Secret block).
        base_url: For proxies and compatible servers (default: the SDK's, which
            honours ``ANTHROPIC_BASE_URL``).
        request_timeout: Seconds one HTTP attempt may take.
        max_attempts: HTTP attempts for one logical request (1 = no retry).
        max_retry_wait: Seconds of waiting between attempts, in all.
        limiter: Shared request limits (concurrency, rate), if any.
        context_edit_trigger: Switch on the API's own context editing (clearing old tool results
            once a prompt passes this many tokens); its report comes back in each response.
    """

    offline = False

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        max_tokens: int = 4096,
        temperature: float | None = None,
        request_timeout: float = 600.0,
        max_attempts: int = 5,
        max_retry_wait: float = 120.0,
        limiter: RequestLimiter | None = None,
        context_edit_trigger: int | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.name = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.request_timeout = request_timeout
        self.max_attempts = max_attempts
        self.max_retry_wait = max_retry_wait
        self.limiter = limiter
        self.context_edit_trigger = context_edit_trigger
        self._secrets = (api_key,)
        self.http_attempts = 0
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,  # tenacity below is the only retry owner
            timeout=request_timeout,
            # Validate response bodies: without it a body of the wrong shape becomes a
            # half-empty Message instead of an error.
            _strict_response_validation=True,
        )

    def fingerprint(self) -> dict[str, Any]:
        return {"provider": "anthropic", "model": self.name, "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def worst_case_seconds(self) -> float:
        """Longest one logical request can take: every attempt timing out, plus all waiting."""
        return self.max_attempts * self.request_timeout + self.max_retry_wait

    async def request(self, request: ModelRequest) -> ModelResponse:
        params = self.params(request)
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, ModelError) and e.retryable),
            wait=self._wait,
            stop=self._stop,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(params)
        except ModelError as e:
            if e.retryable:  # the retry owner gave up: final for everyone above
                state = retrying.statistics
                raise ModelRetriesExhausted(
                    f"{e} (gave up after {state.get('attempt_number', 1)} attempts and "
                    f"{state.get('idle_for', 0.0):.1f}s of waiting)"
                ) from e
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, params: dict[str, Any]) -> ModelResponse:
        self.http_attempts += 1
        try:
            if self.limiter is not None:
                async with self.limiter.slot():
                    message = await self._client.messages.create(**params)
            else:
                message = await self._client.messages.create(**params)
        except (anthropic.AnthropicError, json.JSONDecodeError) as e:
            # JSONDecodeError: the SDK lets a 200 body that is not JSON escape undecorated
            # (pinned by tests/test_anthropic_server.py). Any other ValueError is our own bug
            # (e.g. a NaN in the request) and must not be retried as if the API had failed.
            raise translate_error(e, secrets=self._secrets, model=self.name) from None
        try:
            return _to_response(message)
        except (AttributeError, TypeError, ValueError):
            raise TransientModelError("the Anthropic API sent a malformed response") from None

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, TransientModelError) and error.retry_after is not None:
            return error.retry_after
        return float(wait_random_exponential(multiplier=0.5, max=30)(state))

    def _stop(self, state: RetryCallState) -> bool:
        return (
            state.attempt_number >= self.max_attempts
            or state.idle_for + state.upcoming_sleep > self.max_retry_wait
        )

    def params(self, request: ModelRequest) -> dict[str, Any]:
        """The Messages API parameters, with prompt-cache breakpoints on the stable prefix.

        Breakpoint 1 ends the system prompt: tools and system (the spec) are the
        same for every turn and every task of an agent. Breakpoint 2 ends the
        conversation so far, so the next turn of the task reuses it.
        """
        messages = [_message(m.role, m.content) for m in request.messages]
        if messages and messages[-1]["content"]:
            last = dict(messages[-1]["content"][-1])
            last["cache_control"] = _CACHE
            messages[-1]["content"] = [*messages[-1]["content"][:-1], last]
        params: dict[str, Any] = {
            "model": self.name,
            "max_tokens": min(request.max_tokens, self.max_tokens),
            "system": [{"type": "text", "text": request.system, "cache_control": _CACHE}],
            "messages": messages,
        }
        if request.tools:
            params["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.input_schema}
                for t in request.tools
            ]
            if request.tool_choice is not None:
                params["tool_choice"] = {"type": request.tool_choice}
        extra: dict[str, Any] = {}
        if self.temperature is not None:
            # Recent SDKs (2.x) dropped `temperature` from messages.create: send it in the body,
            # where the API accepts it for the models that still take it.
            extra["temperature"] = self.temperature
        if self.context_edit_trigger is not None:
            extra["context_management"] = {"edits": [{
                "type": "clear_tool_uses_20250919",
                "trigger": {"type": "input_tokens", "value": self.context_edit_trigger},
                "keep": {"type": "tool_uses", "value": 4},
            }]}
            params["extra_headers"] = {"anthropic-beta": CONTEXT_MANAGEMENT_BETA}
        if extra:
            params["extra_body"] = extra
        return params


def _message(role: str, blocks: Sequence[Any]) -> dict[str, Any]:
    content = []
    for b in blocks:
        if b.type == "text":
            content.append({"type": "text", "text": b.text})
        elif b.type == "tool_use":
            content.append({"type": "tool_use", "id": b.id, "name": b.name, "input": b.input})
        else:
            content.append({"type": "tool_result", "tool_use_id": b.tool_use_id, "content": b.content,
                            "is_error": b.is_error})
    return {"role": role, "content": content}


#: The beta of the API's own context editing.
CONTEXT_MANAGEMENT_BETA = "context-management-2025-06-27"


def _server_cleared(message: Any) -> int | None:
    """Input tokens the API's context editing cleared, from the response's report (None: no report).

    The SDK's Message model does not declare the field; it keeps it among the extra fields.
    """
    report = (getattr(message, "model_extra", None) or {}).get("context_management")
    if not isinstance(report, dict):
        return None
    edits = report.get("applied_edits") or []
    return sum(int(e.get("cleared_input_tokens") or 0) for e in edits if isinstance(e, dict))


def _to_response(message: Any) -> ModelResponse:
    blocks: list[TextBlock | ToolUseBlock] = []
    for b in message.content:
        if b.type == "text":
            blocks.append(TextBlock(text=b.text))
        elif b.type == "tool_use":
            blocks.append(ToolUseBlock(id=b.id, name=b.name, input=dict(b.input or {})))
    u = message.usage
    stop = message.stop_reason
    return ModelResponse(
        server_cleared=_server_cleared(message),
        content=blocks,
        stop_reason=stop if stop in _STOP_REASONS else None,
        usage=Usage(
            input_tokens=u.input_tokens or 0,
            output_tokens=u.output_tokens or 0,
            cache_creation_input_tokens=getattr(u, "cache_creation_input_tokens", None) or 0,
            cache_read_input_tokens=getattr(u, "cache_read_input_tokens", None) or 0,
            requests=1,
        ),
        model=message.model,
    )


_PERMANENT_HINTS = {
    400: "the request was invalid",
    401: "the API key was rejected: check ANTHROPIC_API_KEY (or the Secret block named with --api-key-secret)",
    403: "the API key may not use this model or feature",
    404: "not found: check the model id (--model / TOKA_MODEL) and ANTHROPIC_BASE_URL",
    413: "the request is too large for the API",
    422: "the API could not process the request",
}


def translate_error(
    error: BaseException, *, secrets: Sequence[str] = (), model: str | None = None
) -> ModelError:
    """The one boundary where SDK errors become this project's errors.

    Args:
        error: What the SDK raised.
        secrets: Values to scrub from messages (the API key).
        model: The model id requested, named in the message of a 404.
    """

    def say(text: str) -> str:
        return redact(text, secrets)

    if isinstance(error, anthropic.APITimeoutError):
        return ModelTimeoutError("the Anthropic API did not answer within the request timeout")
    if isinstance(error, anthropic.APIConnectionError):
        return TransientModelError(say(f"connection to the Anthropic API failed: {error}"))
    if isinstance(error, anthropic.APIResponseValidationError):
        return TransientModelError("the Anthropic API sent a malformed response")
    if isinstance(error, anthropic.APIStatusError):
        status = error.status_code
        kind, detail = _error_body(error)
        where = f"Anthropic API {status}" + (f" {kind}" if kind else "")
        if status == 429 or status == 408 or status == 409 or status >= 500:
            return TransientModelError(say(f"{where}: {detail or 'temporarily unavailable'}"),
                                       retry_after=_retry_after(error))
        if status == 400 and "prompt is too long" in detail.lower():
            return ContextOverflowError(say(f"{where}: the prompt is too long for the model's context window"))
        hint = _PERMANENT_HINTS.get(status, "the request was refused")
        if status == 404 and model:
            hint = (f"model {model!r} not found: check the model id (--model / TOKA_MODEL); "
                    "if it is right, check ANTHROPIC_BASE_URL")
        # Fatal (the run stops): no other request could succeed with this key, model id or URL.
        kind_of = ProviderAccessError if status in (401, 403, 404) else PermanentModelError
        return kind_of(say(f"{where}: {hint}" + (f" ({detail})" if detail else "")))
    if isinstance(error, json.JSONDecodeError):
        return TransientModelError("the Anthropic API sent a body that is not JSON")
    if isinstance(error, anthropic.AnthropicError):
        # E.g. the SDK could not parse a body: transient, like a garbled proxy answer.
        return TransientModelError(say(f"Anthropic SDK error: {type(error).__name__}: {error}"))
    return PermanentModelError(say(f"unexpected error from the Anthropic SDK: {type(error).__name__}"))


def _error_body(error: anthropic.APIStatusError) -> tuple[str, str]:
    body = error.body if isinstance(error.body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    return str(inner.get("type", "") or ""), str(inner.get("message", "") or "")


def _retry_after(error: anthropic.APIStatusError) -> float | None:
    try:
        value = error.response.headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (ValueError, AttributeError):
        return None

