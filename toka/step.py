"""The LLM-assisted step: ask the model, run the tools it calls, repeat until it submits.

Success is what the model submits through ``submit_result`` (validated
against :class:`~toka.results.TaskResult`), never words in its text. A model
that stops without submitting gets one reminder; a model that keeps sending
malformed input or runs out of turns fails the task with a clear error.

What the model submits is redacted here, once, before anything keeps it
(the task's persisted outcome, the next tasks' prompts, reports, the error
of a reported failure): it is text the model chose, after reading files and
command output that may hold a secret.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from .errors import (
    InvalidToolInputError,
    ModelRetriesExhausted,
    NoResultError,
    TaskReportedFailure,
    TurnLimitError,
)
from .model import (
    Message,
    Model,
    ModelRequest,
    TextBlock,
    ToolDefinition,
    ToolResultBlock,
    Usage,
)
from .prompt import REMINDER
from .redact import redact, secret_values
from .results import TaskResult
from .tools import Toolbox

__all__ = ["SUBMIT_RESULT", "StepLimits", "StepRun", "run_step", "submit_result_definition"]

SUBMIT_RESULT = "submit_result"


@functools.lru_cache(maxsize=64)
def _submit_result_definition(metric_names: tuple[str, ...]) -> ToolDefinition:
    schema = TaskResult.model_json_schema()
    schema.pop("title", None)
    description = (
        "Finish the current task by submitting its structured result. Call it exactly once, "
        "as the last action of the task."
    )
    if metric_names:
        description += f" Metric names: {', '.join(metric_names)}."
    return ToolDefinition(name=SUBMIT_RESULT, description=description, input_schema=schema)


def submit_result_definition(metric_names: Sequence[str] = ()) -> ToolDefinition:
    """The ``submit_result`` tool, its description naming the spec's metrics."""
    return _submit_result_definition(tuple(metric_names))


@dataclass(frozen=True)
class StepLimits:
    """Bounds of one task's conversation."""

    max_turns: int = 20
    """Model requests per task attempt."""
    max_invalid_inputs: int = 3
    """Malformed ``submit_result`` inputs tolerated before the attempt fails (retryable)."""
    request_timeout: float = 600.0
    """Seconds one model request may take, its retries included (a guard above the provider's
    own timeouts and retries; exceeding it is final)."""
    max_tokens: int = 4096


@dataclass
class StepRun:
    """What one attempt produced."""

    result: TaskResult
    usage: Usage
    turns: int
    files_read: list[str] = field(default_factory=list)
    files_changed: list[str] = field(default_factory=list)
    tool_calls: int = 0
    refused_calls: int = 0
    duration_s: float = 0.0


async def run_step(
    *,
    model: Model,
    system: str,
    task_message: str,
    toolbox: Toolbox,
    metric_names: Sequence[str] = (),
    limits: StepLimits = StepLimits(),
    metadata: dict[str, str] | None = None,
    before_request: Callable[[], None] | None = None,
    after_request: Callable[[Usage], None] | None = None,
) -> StepRun:
    """Run the loop for one task attempt.

    Args:
        before_request: Called before each model request; raise to refuse it
            (budgets).
        after_request: Called with each response's usage (accounting).

    Raises:
        TaskReportedFailure: the model submitted ``failed`` or ``blocked``.
        NoResultError: the model stopped without submitting, even after a reminder.
        TurnLimitError: ``limits.max_turns`` requests without a result.
        InvalidToolInputError: too many malformed ``submit_result`` inputs.
        ModelRetriesExhausted: one request (with the model's own retries) took longer than
            ``limits.request_timeout``; final, Prefect does not retry it.
    """
    usage_box: list[Usage] = [Usage()]
    try:
        return await _loop(model=model, system=system, task_message=task_message, toolbox=toolbox,
                           metric_names=metric_names, limits=limits, metadata=metadata,
                           before_request=before_request, after_request=after_request, usage_box=usage_box)
    except Exception as e:
        e.toka_usage = usage_box[0]  # type: ignore[attr-defined]  # what the failed attempt spent
        raise


async def _loop(
    *,
    model: Model,
    system: str,
    task_message: str,
    toolbox: Toolbox,
    metric_names: Sequence[str],
    limits: StepLimits,
    metadata: dict[str, str] | None,
    before_request: Callable[[], None] | None,
    after_request: Callable[[Usage], None] | None,
    usage_box: list[Usage],
) -> StepRun:
    started = time.monotonic()
    tools = [*toolbox.definitions(), submit_result_definition(metric_names)]
    messages: list[Message] = [Message(role="user", content=[TextBlock(text=task_message)])]
    usage = Usage()
    files_read: list[str] = []
    files_changed: list[str] = []
    reminded = False
    invalid = 0
    known_metrics = set(metric_names)

    for turn in range(1, limits.max_turns + 1):
        if before_request is not None:
            before_request()
        request = ModelRequest(
            system=system,
            messages=messages,
            tools=tools,
            max_tokens=limits.max_tokens,
            metadata={**(metadata or {}), "turn": str(turn)},
        )
        try:
            response = await asyncio.wait_for(model.request(request), limits.request_timeout)
        except asyncio.TimeoutError:
            # Final, not retryable: the guard is set above everything the model call may do
            # (for Claude: every HTTP attempt timing out plus all the waiting between them), and
            # the model call owns its retries. A Prefect retry on top would make more than
            # max_attempts HTTP attempts for one logical request, past the documented bound.
            raise ModelRetriesExhausted(
                f"the model did not answer within {limits.request_timeout:g}s, the longest one request "
                "may take with its retries; not retried again"
            ) from None
        usage = usage + response.usage
        usage_box[0] = usage
        if after_request is not None:
            after_request(response.usage)
        messages.append(Message(role="assistant", content=list(response.content)))

        calls = response.tool_uses
        if not calls:
            if reminded:
                raise NoResultError(
                    "the model stopped without calling submit_result, even after a reminder"
                )
            reminded = True
            messages.append(Message(role="user", content=[TextBlock(text=REMINDER)]))
            continue

        replies: list[ToolResultBlock] = []
        for call in calls:
            if call.name == SUBMIT_RESULT:
                problem, result = _check_result(call.input, known_metrics)
                if result is not None:
                    result = result.redacted(secret_values())
                    run = StepRun(
                        result=result,
                        usage=usage,
                        turns=turn,
                        files_read=sorted(set(files_read)),
                        files_changed=sorted(set(files_changed) | set(result.files_changed)),
                        tool_calls=len(toolbox.calls),
                        refused_calls=sum(1 for c in toolbox.calls if c.refused),
                        duration_s=time.monotonic() - started,
                    )
                    if result.status != "completed":
                        raise TaskReportedFailure(
                            f"the model reported the task {result.status}: {result.summary}",
                        )
                    return run
                invalid += 1
                problem = redact(problem, secret_values())  # it may quote what the model sent
                if invalid >= limits.max_invalid_inputs:
                    raise InvalidToolInputError(
                        f"the model sent {invalid} malformed submit_result inputs; last: {problem}"
                    )
                replies.append(
                    ToolResultBlock(tool_use_id=call.id, content=f"invalid result: {problem}", is_error=True)
                )
                continue
            output = await toolbox.call(call.name, call.input)
            files_read += output.files_read
            files_changed += output.files_changed
            replies.append(
                ToolResultBlock(
                    tool_use_id=call.id,
                    content=_delimit(call.name, output.text),
                    is_error=output.is_error,
                )
            )
        messages.append(Message(role="user", content=list(replies)))

    raise TurnLimitError(f"no result after {limits.max_turns} model requests (the turn limit)")


def _check_result(data: object, known_metrics: set[str]) -> tuple[str, TaskResult | None]:
    try:
        result = TaskResult.model_validate(data)
    except ValidationError as e:
        return "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'input'}: {err['msg']}" for err in e.errors()
        ), None
    unknown = sorted(set(result.metrics) - known_metrics)
    if unknown:
        expected = ", ".join(sorted(known_metrics)) or "none (this spec declares no metrics)"
        return f"unknown metric(s) {', '.join(map(repr, unknown))}; expected: {expected}", None
    return "", result


def _delimit(tool: str, text: str) -> str:
    """Mark tool output as data, so it is not mistaken for instructions, with secrets redacted.

    Every tool's output passes here: a file the model reads may hold a token too.
    """
    return f'<tool_output tool="{tool}">\n{redact(text, secret_values())}\n</tool_output>'
