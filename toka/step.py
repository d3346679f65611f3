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
    TokaError,
    TurnLimitError,
)
from .model import (
    Message,
    Model,
    ModelRequest,
    ModelResponse,
    TextBlock,
    ToolDefinition,
    ToolResultBlock,
    ToolUseBlock,
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

    Every :class:`~toka.errors.TokaError` it raises carries in ``usage`` what this attempt spent.
    """
    conversation = _Conversation(
        model=model, system=system, task_message=task_message, toolbox=toolbox, metric_names=metric_names,
        limits=limits, metadata=metadata, before_request=before_request, after_request=after_request,
    )
    try:
        return await conversation.run()
    except TokaError as e:
        e.usage = conversation.usage  # what the failed attempt spent, for its report
        raise


class _Conversation:
    """One task attempt's conversation: the messages so far and what they cost.

    :meth:`run` asks the model, answers the tools it calls, and repeats until it
    submits a result or a limit ends the attempt. The running totals live here so
    that :func:`run_step` can tell a failed attempt's usage.
    """

    def __init__(
        self,
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
    ) -> None:
        self.model = model
        self.system = system
        self.toolbox = toolbox
        self.limits = limits
        self.metadata = metadata or {}
        self.before_request = before_request
        self.after_request = after_request
        self.tools = [*toolbox.definitions(), submit_result_definition(metric_names)]
        self.known_metrics = set(metric_names)
        self.messages: list[Message] = [Message(role="user", content=[TextBlock(text=task_message)])]
        self.started = time.monotonic()
        self.usage = Usage()
        self.turn = 0
        self.files_read: list[str] = []
        self.files_changed: list[str] = []
        self.reminded = False
        self.invalid = 0

    async def run(self) -> StepRun:
        for turn in range(1, self.limits.max_turns + 1):
            self.turn = turn
            response = await self._request()
            self.messages.append(Message(role="assistant", content=list(response.content)))
            if not response.tool_uses:
                self._remind()
                continue
            done = await self._answer(response.tool_uses)
            if done is not None:
                return done
        raise TurnLimitError(f"no result after {self.limits.max_turns} model requests (the turn limit)")

    async def _request(self) -> ModelResponse:
        """One model request under the guard; its usage is added and reported."""
        if self.before_request is not None:
            self.before_request()
        request = ModelRequest(
            system=self.system,
            messages=self.messages,
            tools=self.tools,
            max_tokens=self.limits.max_tokens,
            metadata={**self.metadata, "turn": str(self.turn)},
        )
        try:
            response = await asyncio.wait_for(self.model.request(request), self.limits.request_timeout)
        except asyncio.TimeoutError:
            # Final, not retryable: the guard is set above everything the model call may do
            # (for Claude: every HTTP attempt timing out plus all the waiting between them), and
            # the model call owns its retries. A Prefect retry on top would make more than
            # max_attempts HTTP attempts for one logical request, past the documented bound.
            raise ModelRetriesExhausted(
                f"the model did not answer within {self.limits.request_timeout:g}s, the longest one request "
                "may take with its retries; not retried again"
            ) from None
        self.usage = self.usage + response.usage
        if self.after_request is not None:
            self.after_request(response.usage)
        return response

    def _remind(self) -> None:
        """The model stopped without submitting: remind it once, then give up."""
        if self.reminded:
            raise NoResultError("the model stopped without calling submit_result, even after a reminder")
        self.reminded = True
        self.messages.append(Message(role="user", content=[TextBlock(text=REMINDER)]))

    async def _answer(self, calls: Sequence[ToolUseBlock]) -> StepRun | None:
        """Answer each tool call in order; a valid submitted result ends the attempt at once."""
        replies: list[ToolResultBlock] = []
        for call in calls:
            if call.name != SUBMIT_RESULT:
                replies.append(await self._run_tool(call))
                continue
            outcome = self._submit(call)
            if isinstance(outcome, StepRun):
                return outcome
            replies.append(outcome)
        self.messages.append(Message(role="user", content=replies))
        return None

    async def _run_tool(self, call: ToolUseBlock) -> ToolResultBlock:
        output = await self.toolbox.call(call.name, call.input)
        self.files_read += output.files_read
        self.files_changed += output.files_changed
        return ToolResultBlock(tool_use_id=call.id, content=_delimit(call.name, output.text),
                               is_error=output.is_error)

    def _submit(self, call: ToolUseBlock) -> StepRun | ToolResultBlock:
        """The finished attempt for a valid result, or the reply that tells the model what is wrong.

        Raises:
            TaskReportedFailure: the result's status is not ``completed``.
            InvalidToolInputError: ``limits.max_invalid_inputs`` malformed results.
        """
        problem, result = _check_result(call.input, self.known_metrics)
        if result is None:
            self.invalid += 1
            problem = redact(problem, secret_values())  # it may quote what the model sent
            if self.invalid >= self.limits.max_invalid_inputs:
                raise InvalidToolInputError(
                    f"the model sent {self.invalid} malformed submit_result inputs; last: {problem}"
                )
            return ToolResultBlock(tool_use_id=call.id, content=f"invalid result: {problem}", is_error=True)
        result = result.redacted(secret_values())
        if result.status != "completed":
            raise TaskReportedFailure(f"the model reported the task {result.status}: {result.summary}")
        return StepRun(
            result=result,
            usage=self.usage,
            turns=self.turn,
            files_read=sorted(set(self.files_read)),
            files_changed=sorted(set(self.files_changed) | set(result.files_changed)),
            tool_calls=len(self.toolbox.calls),
            refused_calls=sum(1 for c in self.toolbox.calls if c.refused),
            duration_s=time.monotonic() - self.started,
        )


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
