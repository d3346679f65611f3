"""The LLM-assisted step: ask the model, run the tools it calls, repeat until it submits.

Success is what the model submits through ``submit_result`` (validated
against :class:`~toka.results.TaskResult`), never words in its text. A model
that stops without submitting gets one reminder; a model that keeps sending
malformed input or runs out of turns fails the task with a clear error.

What the model submits is redacted here, once, before anything keeps it
(the task's persisted outcome, the next tasks' prompts, reports, the error
of a reported failure): it is text the model chose, after reading files and
command output that may hold a secret.

Long tasks: every response and tool result is recorded in the task's journal
as it arrives and replayed when the task runs again (:mod:`toka.journal`), and
a conversation about to outgrow the context window has its old tool output
cleared, then is compacted into a summary (:mod:`toka.context`).
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from .capabilities import READING_TOOLS
from .context import (
    BYTES_PER_TOKEN,
    ContextBudget,
    ContextStats,
    clear_old_tool_results,
    compacted,
    compaction_request,
    head_and_tail,
    summary_text,
)
from .errors import (
    ContextOverflowError,
    InvalidToolInputError,
    StepError,
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
from .journal import Journal, Replay, request_fingerprint, tool_fingerprint
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

    max_turns: int = 100
    """Model requests per task attempt, replayed ones included."""
    max_invalid_inputs: int = 3
    """Malformed ``submit_result`` inputs tolerated before the attempt fails (retryable)."""
    request_timeout: float = 600.0
    """Seconds one model request may take, its retries included (a guard above the provider's
    own timeouts and retries; exceeding it is final)."""
    max_tokens: int = 4096
    context_window: int | None = None
    """Tokens the model's context holds; None: no client-side context management."""
    context_threshold: float = 0.7
    """Share of the window a request may fill before the conversation is shrunk."""
    keep_turns: int = 4
    """The last turns that clearing and compaction never touch."""
    tool_output_limit: int | None = None
    """Bytes of one tool output the model gets (the rest saved, see ``save_output``); None: all."""
    server_context: bool = False
    """The provider's own context editing is on: toka clears and compacts only when a response
    does not confirm it (or the server still finds the prompt too long)."""


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
    context: ContextStats = field(default_factory=ContextStats)
    replayed: int = 0
    """Journal entries replayed (responses and tool results not asked for or run again)."""
    carried: Usage = field(default_factory=Usage)
    """What the replayed responses cost when an earlier process asked for them."""


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
    on_replayed: Callable[[Usage], None] | None = None,
    journal: Journal | None = None,
    save_output: Callable[[str], str] | None = None,
    log: Callable[[str], None] | None = None,
    on_context: Callable[[str, dict[str, int]], None] | None = None,
    calls_counter: str = "",
    restart_on_divergence: bool = False,
    on_turn: Callable[[int], None] | None = None,
) -> StepRun:
    """Run the loop for one task attempt.

    Args:
        before_request: Called before each model request; raise to refuse it
            (budgets).
        after_request: Called with each response's usage (accounting).
        on_replayed: Called with the usage of each response replayed from the journal
            (paid for before: carried, not charged again).
        journal: Where the task's turns are recorded and replayed from.
        save_output: Keeps a tool output too long for the model; returns the workspace path
            the model can read it from.
        log: Where one-line notices go (replay, clearing, compaction).
        on_context: Told of every clearing (``"cleared"``) and compaction (``"compacted"``), with
            the turn and the tokens involved (for events).
        calls_counter: The tool-call count this attempt adds to (``TaskCalls.token``): a call
            replayed from the journal counts in ``toolbox.calls`` unless recorded under it.
        on_turn: Called with each turn's number before its model request (progress).
        restart_on_divergence: Raise :class:`~toka.errors.ReplayDiverged` when the journal stops
            matching before recorded tool calls that changed files (the caller can set their
            edits aside and start over); else the task goes on live from there.

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
        on_replayed=on_replayed, journal=journal, save_output=save_output, log=log, on_context=on_context,
        calls_counter=calls_counter, strict=restart_on_divergence, on_turn=on_turn,
    )
    try:
        return await conversation.run()
    except TokaError as e:
        e.usage = conversation.usage  # what the failed attempt spent, for its report
        if isinstance(e, StepError) and journal is not None:
            # The model's own doing (no result, turn limit, malformed results): replaying the
            # same conversation would end the same way, so a retry starts afresh.
            journal.discard()
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
        on_replayed: Callable[[Usage], None] | None = None,
        journal: Journal | None = None,
        save_output: Callable[[str], str] | None = None,
        log: Callable[[str], None] | None = None,
        on_context: Callable[[str, dict[str, int]], None] | None = None,
        calls_counter: str = "",
        strict: bool = False,
        on_turn: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.on_turn = on_turn or (lambda turn: None)
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
        self.cut = False  # the last response stopped at the output limit (max_tokens)
        self.on_replayed = on_replayed
        self.save_output = save_output
        self.log = log or (lambda line: None)
        self.on_context = on_context or (lambda kind, data: None)
        self.model_fingerprint = model.fingerprint()
        self.replay = Replay(journal, on_mismatch=self._mismatch, counter=calls_counter, strict=strict)
        if self.replay.entries:
            self.log(f"resuming the task from its journal: {len(self.replay.entries)} recorded steps "
                     "(model responses and tool results) are replayed, not asked for or run again")
        self.context = ContextStats()
        self.budget = (ContextBudget(limits.context_window, limits.context_threshold, limits.keep_turns)
                       if limits.context_window else None)
        self.response_fingerprint = ""
        self.carried = Usage()
        self.server_context = limits.server_context

    async def run(self) -> StepRun:
        for turn in range(1, self.limits.max_turns + 1):
            self.turn = turn
            self.on_turn(turn)
            response = await self._request()
            self.messages.append(Message(role="assistant", content=_sendable(response.content)))
            self.cut = response.stop_reason == "max_tokens"
            if not response.tool_uses:
                self._remind()
                continue
            if any(call.name != SUBMIT_RESULT for call in response.tool_uses):
                # Working again: a later stop, or malformed result, is met afresh (one reminder, three
                # tries per stretch of work, not per attempt: a 100-turn task may stop twice).
                self.reminded, self.invalid = False, 0
            done = await self._answer(response.tool_uses)
            if done is not None:
                return done
        raise TurnLimitError(f"no result after {self.limits.max_turns} model requests (the turn limit: a new run "
                             "with --max-turns N, or the task's own max_turns in its spec, gives it more; on an "
                             "agent's branch, its edits so far are kept in a commit marked FAILED)")

    def _mismatch(self, index: int, kind: str) -> None:
        self.log(f"replay stopped at recorded step {index + 1}: the {kind} differs from the recorded one "
                 "(the spec, the prompt or the tools changed); the task goes on live from here")

    def _build(self, messages: list[Message] | None = None) -> ModelRequest:
        return ModelRequest(
            system=self.system,
            messages=self.messages if messages is None else messages,
            tools=self.tools,
            max_tokens=self.limits.max_tokens,
            metadata={**self.metadata, "turn": str(self.turn)},
        )

    async def _request(self) -> ModelResponse:
        """The next response: replayed from the journal, or asked for (and recorded)."""
        request = await self._fit(self._build())
        try:
            return await self._answered(request)
        except ContextOverflowError:
            # The server counts differently from our estimate (or toka does not manage the context):
            # shrink once, clearing first so that the summary request itself fits, then it must fit.
            self.log("the model's server says the prompt is too long: clearing old tool output and "
                     "compacting the conversation")
            self._clear()
            return await self._answered(await self._compact())

    async def _answered(self, request: ModelRequest) -> ModelResponse:
        fingerprint = request_fingerprint(request, self.model_fingerprint)
        self.response_fingerprint = fingerprint
        refused = self.replay.too_long(fingerprint)
        if refused is not None:
            raise ContextOverflowError(refused)  # as the server said before: compacted again, alike
        recorded = self.replay.response(fingerprint)
        if recorded is not None:
            response, paid_here = recorded
            if not paid_here:  # paid for by the process that asked first: spent, not charged again
                self.carried = self.carried + response.usage
                if self.on_replayed is not None:
                    self.on_replayed(response.usage)
        else:
            try:
                response = await self._send(request)
            except ContextOverflowError as e:
                await self.replay.record_too_long(fingerprint, str(e))
                raise
            await self.replay.record_response(fingerprint, response)
        if self.budget is not None:
            self.budget.calibrate(request, response.usage)
        self._check_server_context(response)
        return response

    def _check_server_context(self, response: ModelResponse) -> None:
        if not self.server_context:
            return
        if response.server_cleared is None:
            self.server_context = False
            self.log("the model's server did not confirm its context editing (no report in the response): "
                     "toka keeps the conversation within the context window itself from here")
        elif response.server_cleared:
            # The server clears the same old outputs from every request again and reports each time:
            # the most it cleared at once is what its editing kept out (the sum counted them again and again).
            self.context.tokens_cleared = max(self.context.tokens_cleared, response.server_cleared)

    async def _send(self, request: ModelRequest) -> ModelResponse:
        """One model request under the guard; its usage is added and reported."""
        if self.before_request is not None:
            self.before_request()
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

    async def _fit(self, request: ModelRequest) -> ModelRequest:
        """``request``, or a smaller one when it would fill too much of the context window:
        old tool output cleared first, then, if still too big, the conversation compacted."""
        if self.budget is None or self.server_context or not self.budget.too_big(request):
            return request
        if self._clear():
            request = self._build()
            if not self.budget.too_big(request):
                return request
        return await self._compact()

    def _clear(self) -> bool:
        """Replace old tool output with stubs; whether anything was cleared."""
        messages, cleared = clear_old_tool_results(self.messages, self.limits.keep_turns)
        if not cleared:
            return False
        self.messages = messages
        self.context.tokens_cleared += cleared
        window = f"the {self.budget.window}-token context window" if self.budget else "the context window"
        self._notice("cleared", {"turn": self.turn, "tokens_cleared": cleared},
                     f"turn {self.turn}: cleared old tool output (about {cleared} tokens) to stay within "
                     f"{self.limits.context_threshold:.0%} of {window}")
        return True

    def _notice(self, kind: str, data: dict[str, int], line: str) -> None:
        """A clearing or compaction, told once: not again when a resumed task replays it."""
        if self.replay.live:
            self.on_context(kind, data)
            self.log(line)

    async def _compact(self) -> ModelRequest:
        """Ask the model to summarise the work so far, and go on from the task and that summary."""
        summary_request = compaction_request(self._build())
        response = await self._answered(summary_request)
        summary = summary_text(response) or "(the model gave no summary)"
        before = len(self.messages)
        fits = self.budget.limit // 2 if self.budget is not None else None  # room for the turns after it
        self.messages = compacted(self.messages[0], summary, self.messages, self.limits.keep_turns, max_tokens=fits)
        self.context.compactions += 1
        self._notice("compacted", {"turn": self.turn, "messages_before": before, "messages_after": len(self.messages)},
                     f"turn {self.turn}: compacted the conversation ({before} messages) into a summary; "
                     "the task and the last turns are kept")
        return self._build()

    def _remind(self) -> None:
        """The model stopped without submitting: remind it once, then give up."""
        if self.reminded:
            raise NoResultError("the model stopped without calling submit_result, even after a reminder")
        self.reminded = True
        self.messages.append(Message(role="user", content=[TextBlock(text=REMINDER)]))

    async def _answer(self, calls: Sequence[ToolUseBlock]) -> StepRun | None:
        """Answer each tool call in order; a valid submitted result ends the attempt at once."""
        replies: list[ToolResultBlock] = []
        limit = self._output_limit(sum(1 for call in calls if call.name != SUBMIT_RESULT))
        for call in calls:
            if call.name != SUBMIT_RESULT:
                replies.append(await self._run_tool(call, limit))
                continue
            outcome = self._submit(call)
            if isinstance(outcome, StepRun):
                return outcome
            replies.append(outcome)
        self.messages.append(Message(role="user", content=replies))
        return None

    def _output_limit(self, calls: int) -> int | None:
        """Bytes each of ``calls`` tool outputs of one turn may bring before it is saved and cut.

        ``tool_output_limit``, and with a context window also a share of half of what a prompt may
        fill, so that one turn's outputs together fit: thirty 16 KB reads at once went past a
        200,000-token window, and the summary request that was to shrink them too.
        """
        limit = self.limits.tool_output_limit
        if not limit or self.budget is None or calls < 1:
            return limit
        per_turn = int(self.budget.limit * BYTES_PER_TOKEN) // 2
        return max(1024, min(limit, per_turn // calls))

    async def _run_tool(self, call: ToolUseBlock, limit: int | None) -> ToolResultBlock:
        """The tool's result: replayed from the journal (the workspace already holds its effects),
        or the tool run now, its output cut to the limit, and recorded."""
        fingerprint = tool_fingerprint(self.response_fingerprint, call.id, call.name, call.input)
        recorded = self.replay.tool(fingerprint)
        if recorded is not None:
            block, files_read, files_changed = recorded.block, recorded.files_read, recorded.files_changed
            if not recorded.counted:
                self.toolbox.count_replayed(call.name, refused=recorded.refused, is_error=block.is_error)
        else:
            calls_before = len(self.toolbox.calls)
            if call.name not in READING_TOOLS:
                await self.replay.record_calling(fingerprint, call.name)
            output = await self.toolbox.call(call.name, call.input)
            text = output.text
            if limit and self.save_output is not None and len(text.encode()) > limit:
                text = head_and_tail(text, limit, self.save_output(text))
                self.context.outputs_saved += 1
            block = ToolResultBlock(tool_use_id=call.id, content=_delimit(call.name, text),
                                    is_error=output.is_error)
            files_read, files_changed = list(output.files_read), list(output.files_changed)
            refused = any(c.refused for c in self.toolbox.calls[calls_before:])
            await self.replay.record_tool(fingerprint, block, files_read, files_changed, refused=refused)
        self.files_read += files_read
        self.files_changed += files_changed
        return block

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
            if self.cut:
                problem = (f"the response was cut off at the output limit ({self.limits.max_tokens} tokens) "
                           f"before the result was complete; submit a shorter result ({problem})")
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
            context=self.context,
            replayed=self.replay.replayed,
            carried=self.carried,
        )


def _sendable(content: Sequence[TextBlock | ToolUseBlock]) -> list[TextBlock | ToolUseBlock]:
    """The response's content as it may be sent back: the API refuses a text block of only
    whitespace ("\\n\\n" before a tool call) and an assistant message with no content."""
    kept = [b for b in content if not (isinstance(b, TextBlock) and not b.text.strip())]
    return kept or [TextBlock(text="(no text)")]


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

    Every tool's output passes here: a file the model reads may hold a token too. A file or a
    command may also print the closing tag, and what follows would read as no tool's output:
    the tags inside are written ``&lt;tool_output``.
    """
    inner = _TAG.sub(lambda tag: "&lt;" + tag[0][1:], redact(text, secret_values()))
    return f'<tool_output tool="{tool}">\n{inner}\n</tool_output>'


_TAG = re.compile(r"</?tool_output", re.IGNORECASE)
