"""Keeping a long task's conversation inside the model's context window.

A task of 30-150 turns reads far more than a context window holds. Three
measures, cheapest first, each a pure function of the conversation (the step
loop, :mod:`toka.step`, decides when to apply them):

1. **Cut** one tool output that is too long on its own: the model gets its head
   and tail and where the whole is saved (:func:`head_and_tail`).
2. **Clear** old tool output: results older than the last few turns are
   replaced by a one-line stub naming the call that produced them, so the
   model can ask again (:func:`clear_old_tool_results`). The model's own
   words and tool calls stay; the task message is never touched.
3. **Compact**: when clearing is not enough, the model summarises the work so
   far (:func:`compaction_request`) and the conversation starts again from the
   task, that summary and the last turns (:func:`compacted`).

When to act is :class:`ContextBudget`'s question: the prompt's size is
estimated before each request (:func:`estimate_tokens`, on the high side) and
corrected by what the provider reports it counted (:meth:`ContextBudget.calibrate`).

Prompt caching: clearing or compacting changes the conversation from the first
changed message on, so the provider's cached prefix stops there. The budget's
threshold makes both happen in batches (once the prompt fills ``threshold`` of
the window, everything old is cleared at once), not a little every turn; the
prefix up to the earliest newly cleared result, earlier stubs included, is
still read from the cache.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .model import (
    ContentBlock,
    Message,
    ModelRequest,
    ModelResponse,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)

__all__ = [
    "CONTEXT_WINDOWS",
    "DEFAULT_CONTEXT_WINDOW",
    "SUMMARY_INSTRUCTION",
    "ContextBudget",
    "ContextStats",
    "clear_old_tool_results",
    "compacted",
    "compaction_request",
    "context_window",
    "estimate_tokens",
    "head_and_tail",
    "summary_text",
]

DEFAULT_CONTEXT_WINDOW = 200_000
"""For a model id not in :data:`CONTEXT_WINDOWS` (a proxy's alias, a compatible server, the
offline model): the smallest window of a current Claude model, so an unknown model is managed
too early rather than too late. Set ``context_window`` for anything else."""

CONTEXT_WINDOWS: dict[str, int] = {
    # Native 1M-token windows (Anthropic's model pages, 2026): the 5.x generation, Opus 4.6-4.8,
    # Sonnet 4.6. toka's default model (toka.claude.default_model) is one of these.
    "claude-fable-5": 1_000_000,
    "claude-mythos-5": 1_000_000,
    "claude-opus-5": 1_000_000,
    "claude-sonnet-5": 1_000_000,
    "claude-haiku-5": 1_000_000,
    "claude-opus-4-8": 1_000_000,
    "claude-opus-4-7": 1_000_000,
    "claude-opus-4-6": 1_000_000,
    "claude-sonnet-4-6": 1_000_000,
    # 200K: Sonnet 4 and 4.5 reach 1M only with a beta header toka does not send.
    "claude-opus-4": 200_000,
    "claude-sonnet-4": 200_000,
    "claude-haiku-4": 200_000,
    "claude-3-7-sonnet": 200_000,
    "claude-3-5-": 200_000,
}
"""Model id prefix -> context window in tokens; the longest matching prefix wins, so
``claude-opus-4-6`` is 1M while ``claude-opus-4-5`` falls to ``claude-opus-4`` (200K)."""

BYTES_PER_TOKEN = 3.5
"""Claude's tokenizer gives about 4 characters a token on English and 3-3.5 on code; 3.5 of
UTF-8 bytes over-estimates both (non-ASCII text counts each extra byte), which is the safe side:
an over-estimate compacts a little early, an under-estimate fails the request."""
_MESSAGE_OVERHEAD = 4  # role and framing tokens per message
_BLOCK_OVERHEAD = 3  # type and id framing per content block

_STUB_SIZE = 300
"""Tool results at most this long (characters) are left as they are: a stub would save nothing."""
_STUB = re.compile(r"^\[output of \S+ cleared to save context")
_SAVED_AT = re.compile(r"the whole output is saved at (.+?): read it with read_file")
_ARGS_SHOWN = 200  # characters of a call's arguments repeated in its stub

NOT_RUN = "not run: the conversation is being summarised; call it again afterwards if you still need it"
"""The answer to tool calls pending when the conversation is summarised (the API wants every
tool_use answered before the next user text)."""

SUMMARY_INSTRUCTION = """\
The conversation is about to outgrow the context window. Summarise the work on this task so far, \
for yourself to continue from; the conversation will be replaced by the task, this summary and the \
last few turns. Write, in at most about 1,500 words:

1. What was done, in order, and what each step found.
2. Files read, created or changed, with why, and what you learned from each that matters \
(names, line numbers, values, decisions).
3. Findings and conclusions so far.
4. What remains to be done to finish the task, as a list of next steps.
5. Open questions and anything uncertain or not yet verified.

Answer with text only: do not call any tool now."""
"""The user message that asks for a summary of the work so far (see :func:`compaction_request`)."""

_WORK_SO_FAR = "<work_so_far>"
_CONTINUE = ("Continue the task from here. The work so far is summarised above; files may have changed "
             "since you read them, so read them again before relying on their content.")


# -- the window and the estimate ------------------------------------------------------


def context_window(model: str, override: int | None = None) -> int:
    """The context window of ``model`` in tokens.

    Args:
        model: The model id, e.g. ``claude-sonnet-4-5`` (dated ids match by prefix).
        override: The configured window (``context_window`` setting); wins when given.

    Unknown ids (proxies' aliases, compatible servers, ``offline``) get
    :data:`DEFAULT_CONTEXT_WINDOW`, 200,000 tokens.
    """
    if override is not None:
        return override
    matches = [prefix for prefix in CONTEXT_WINDOWS if model.startswith(prefix)]
    return CONTEXT_WINDOWS[max(matches, key=len)] if matches else DEFAULT_CONTEXT_WINDOW


def _text_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", errors="replace")) / BYTES_PER_TOKEN)


def _block_tokens(block: ContentBlock) -> int:
    if isinstance(block, TextBlock):
        body = _text_tokens(block.text)
    elif isinstance(block, ToolUseBlock):
        body = _text_tokens(block.id + block.name + json.dumps(block.input, ensure_ascii=False))
    else:
        body = _text_tokens(block.tool_use_id + block.content)
    return body + _BLOCK_OVERHEAD


def _messages_tokens(messages: Sequence[Message]) -> int:
    return sum(_MESSAGE_OVERHEAD + sum(_block_tokens(b) for b in m.content) for m in messages)


def estimate_tokens(request: ModelRequest) -> int:
    """A conservative estimate of the prompt's tokens: UTF-8 bytes / 3.5 over the system prompt,
    the tool definitions' JSON and every content block, plus a little framing per block.

    It over-estimates English and code rather than under-estimates them; the provider's
    count, when known, corrects it (:meth:`ContextBudget.calibrate`).
    """
    tools = sum(_text_tokens(t.json_text) for t in request.tools)
    return _text_tokens(request.system) + tools + _messages_tokens(request.messages)


@dataclass
class ContextBudget:
    """How much of the context window a request may fill, and whether a request does.

    Args:
        window: The model's context window in tokens (:func:`context_window`).
        threshold: Share of the window a prompt may fill before the conversation is shrunk;
            the rest is room for the reply and for the estimate's error.
        keep_turns: The last assistant turns (and their tool results) clearing and
            compaction never touch.
    """

    window: int
    threshold: float = 0.7
    keep_turns: int = 4
    ratio: float = 1.0
    """Tokens the provider counted per estimated token, from the last response (never below 1:
    the heuristic is the floor)."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"context window must be at least 1 token, not {self.window!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], not {self.threshold!r}")
        if self.keep_turns < 0:
            raise ValueError(f"keep_turns must be at least 0, not {self.keep_turns!r}")

    @classmethod
    def for_model(cls, model: str, *, override: int | None = None, threshold: float = 0.7,
                  keep_turns: int = 4) -> ContextBudget:
        """The budget of ``model`` (its window from :func:`context_window`)."""
        return cls(context_window(model, override), threshold, keep_turns)

    @property
    def limit(self) -> int:
        """Most tokens a prompt may have before the conversation is shrunk."""
        return int(self.window * self.threshold)

    def estimate(self, request: ModelRequest) -> int:
        """The prompt's tokens: the heuristic scaled by what the provider last counted."""
        return math.ceil(estimate_tokens(request) * self.ratio)

    def calibrate(self, request: ModelRequest, usage: Usage) -> None:
        """Learn from a response how the provider counts: ``usage`` is what it counted for
        ``request``'s prompt (plain, cache-written and cache-read input tokens).

        A replayed or synthetic response with no input count teaches nothing.
        """
        measured = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
        estimated = estimate_tokens(request)
        if measured > 0 and estimated > 0:
            self.ratio = max(1.0, measured / estimated)

    def too_big(self, request: ModelRequest) -> bool:
        """Whether ``request`` fills more than ``threshold`` of the window, or leaves no room in it
        for ``request.max_tokens`` of reply (the API refuses both)."""
        tokens = self.estimate(request)
        return tokens > self.limit or tokens + request.max_tokens > self.window


@dataclass
class ContextStats:
    """What context management did in one task attempt (for reports)."""

    compactions: int = 0
    """Times the conversation was replaced by a summary."""
    tokens_cleared: int = 0
    """Estimated tokens of old tool output replaced by stubs."""
    outputs_saved: int = 0
    """Tool outputs too long for the model, saved whole and shown as head and tail."""


# -- clearing old tool output ----------------------------------------------------------


def _protected_from(messages: Sequence[Message], keep_turns: int) -> int:
    """Index of the first message of the last ``keep_turns`` assistant turns (len: none kept)."""
    if keep_turns <= 0:
        return len(messages)
    assistants = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if not assistants:
        return len(messages)
    return assistants[-min(keep_turns, len(assistants))]


def _inner(content: str) -> str:
    """A tool output without the ``<tool_output>`` delimiters the step loop adds."""
    if content.startswith("<tool_output") and content.endswith("</tool_output>"):
        first = content.find("\n")
        return content[first + 1:-len("</tool_output>")].removesuffix("\n") if first >= 0 else content
    return content


def _shown_args(arguments: dict[str, object]) -> str:
    shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
    return shown if len(shown) <= _ARGS_SHOWN else shown[:_ARGS_SHOWN - 3] + "..."


def _stub(content: str, call: ToolUseBlock | None) -> str:
    """The one line that replaces a cleared tool output: what it was and how to see it again."""
    text = _inner(content)
    size = f"{text.count(chr(10)) + 1:,} lines, {len(text):,} characters"
    name = call.name if call is not None else "tool"
    saved = _SAVED_AT.search(text)
    if saved is not None:
        where = saved.group(1)
        how = (f"the whole output is saved at {where}: "
               f"read it with read_file (path={json.dumps(where)}, start_line, end_line)")
    elif call is None:
        how = "the call that produced it is no longer in the conversation"
    else:
        again = f"call {call.name} again ({_shown_args(call.input)}) to see it"
        if call.name == "read_file":
            again += "; start_line/end_line read a part"
        elif call.name == "run_command":
            again += " (this runs the command again)"
        how = again
    return f"[output of {name} cleared to save context: {size}; {how}]"


def clear_old_tool_results(messages: list[Message], keep_turns: int) -> tuple[list[Message], int]:
    """Replace tool output older than the last ``keep_turns`` assistant turns by one-line stubs.

    A stub says which tool produced the output, how big it was and how to see it again, e.g.
    ``[output of read_file cleared to save context: 412 lines, 18,204 characters; call
    read_file again (path="src/app.py") to see it; start_line/end_line read a part]``.
    Results of at most 300 characters, the first message (the task) and results already
    stubbed are left as they are, so clearing twice changes nothing more. Roles, blocks and
    tool-use ids stay the same: the conversation is as valid for the Messages API as before.

    Returns:
        The new messages (unchanged ones are the same objects) and the estimated tokens removed.
    """
    calls = {b.id: b for m in messages if m.role == "assistant" for b in m.content if isinstance(b, ToolUseBlock)}
    protected = _protected_from(messages, keep_turns)
    out: list[Message] = []
    removed = 0
    for index, message in enumerate(messages):
        if index == 0 or index >= protected or message.role != "user":
            out.append(message)
            continue
        blocks: list[ContentBlock] = []
        changed = False
        for block in message.content:
            if (isinstance(block, ToolResultBlock) and len(block.content) > _STUB_SIZE
                    and not _STUB.match(block.content)):
                stub = _stub(block.content, calls.get(block.tool_use_id))
                removed += _text_tokens(block.content) - _text_tokens(stub)
                block = block.model_copy(update={"content": stub})
                changed = True
            blocks.append(block)
        out.append(Message(role=message.role, content=blocks) if changed else message)
    return out, max(0, removed)


# -- compaction --------------------------------------------------------------------------


def compaction_request(base: ModelRequest) -> ModelRequest:
    """The request that asks the model to summarise the conversation of ``base``.

    The system prompt, the tools and the conversation are ``base``'s, so the provider's
    cached prefix is reused; :data:`SUMMARY_INSTRUCTION` is added at the end. When the
    conversation ends with the model's tool calls, they are answered first ("not run"),
    as the API requires every tool_use to be answered in the next message.

    Pass the conversation after :func:`clear_old_tool_results`: the summary request must
    itself fit in the window.
    """
    messages = list(base.messages)
    instruction = TextBlock(text=SUMMARY_INSTRUCTION)
    last = messages[-1] if messages else None
    if last is None or last.role == "assistant":
        pending = [] if last is None else [b for b in last.content if isinstance(b, ToolUseBlock)]
        answers: list[ContentBlock] = [ToolResultBlock(tool_use_id=b.id, content=NOT_RUN) for b in pending]
        messages.append(Message(role="user", content=[*answers, instruction]))
    else:
        # Tool results must come first in a user message; the instruction goes after them.
        messages[-1] = Message(role="user", content=[*last.content, instruction])
    # tool_choice none: a model that answered with a tool call instead lost the whole work so far.
    return base.model_copy(update={"messages": messages, "tool_choice": "none",
                                   "metadata": {**base.metadata, "purpose": "summary"}})


def summary_text(response: ModelResponse) -> str:
    """The summary in a response to :func:`compaction_request`: its text, tool calls ignored."""
    return "\n".join(b.text for b in response.content if isinstance(b, TextBlock)).strip()


def _without_summary_request(messages: list[Message]) -> list[Message]:
    """``messages`` without what :func:`compaction_request` added, if the caller passed it."""
    if not messages or messages[-1].role != "user":
        return messages
    last = messages[-1]
    kept = [b for b in last.content if not (isinstance(b, TextBlock) and b.text == SUMMARY_INSTRUCTION)]
    if len(kept) == len(last.content):
        return messages
    if all(isinstance(b, ToolResultBlock) and b.content == NOT_RUN for b in kept):
        return messages[:-1]  # a message of our own making: the conversation ended with the calls
    return [*messages[:-1], Message(role="user", content=kept)]


def _task_with_summary(task: Message, summary: str) -> Message:
    # A task message that already carries a summary (a second compaction) keeps only the new one.
    original = [b for b in task.content if not (isinstance(b, TextBlock) and b.text.startswith(_WORK_SO_FAR))]
    note = TextBlock(text=f"{_WORK_SO_FAR}\n{summary.strip()}\n</work_so_far>\n\n{_CONTINUE}")
    return Message(role="user", content=[*original, note])


def compacted(
    task: Message,
    summary: str,
    messages: list[Message],
    keep_turns: int,
    *,
    max_tokens: int | None = None,
) -> list[Message]:
    """The conversation after compaction: the task with the summary, then the last turns as they were.

    The first message is ``task``'s blocks unchanged plus one text block holding the summary
    between ``<work_so_far>`` tags and a note to continue (files may have changed since they
    were read). A summary an earlier compaction added to ``task`` is replaced, not repeated.
    Then the last ``keep_turns`` turns, starting at an assistant message, untouched: roles
    alternate and every tool result answers a tool call in the message before it.

    Args:
        task: The task message (the conversation's first message).
        summary: The model's summary (:func:`summary_text`).
        messages: The conversation so far (what :func:`compaction_request` added, if present,
            is dropped).
        keep_turns: Turns to keep; at least the last assistant message and what follows it
            are kept, whatever this says.
        max_tokens: When given, fewer turns are kept while the kept ones would estimate more
            than this (never fewer than one).
    """
    messages = _without_summary_request(messages)
    head = _task_with_summary(task, summary)
    starts = [i for i, m in enumerate(messages) if m.role == "assistant" and i > 0]
    if not starts:
        return [head]
    starts = starts[-max(1, keep_turns):]
    for start in starts:
        tail = messages[start:]
        if max_tokens is None or start == starts[-1] or _messages_tokens(tail) <= max_tokens:
            return [head, *tail]
    raise AssertionError("unreachable")  # pragma: no cover - the last start always returns


# -- one output too long -----------------------------------------------------------------


def head_and_tail(text: str, limit: int, where: str) -> str:
    """``text`` when it is at most ``limit`` bytes (UTF-8); else its head and tail around a note.

    The head is about 3/4 of ``limit`` and the tail 1/4, both cut at line boundaries where a
    line boundary is in reach; the note in between says how much was left out and how to read
    the whole, which the caller has saved at ``where``.
    """
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    head_budget = limit * 3 // 4
    tail_budget = limit - head_budget
    head = data[:head_budget]
    newline = head.rfind(b"\n")
    if newline >= 0:
        head = head[:newline + 1]  # whole lines only
    tail = data[len(data) - tail_budget:]
    newline = tail.find(b"\n")
    if 0 <= newline < len(tail) - 1:
        tail = tail[newline + 1:]
    omitted = data[len(head):len(data) - len(tail)]
    lines = omitted.count(b"\n") + (0 if omitted.endswith(b"\n") else 1)
    first_line = head.count(b"\n") + 1
    note = (f"[... {lines:,} lines / {len(omitted):,} bytes omitted (from line {first_line:,}); the whole output "
            f"is saved at {where}: read it with read_file (path={json.dumps(where)}, start_line, end_line) ...]")
    # errors="ignore": a cut inside a multi-byte character drops the partial character.
    head_text = head.decode("utf-8", errors="ignore")
    tail_text = tail.decode("utf-8", errors="ignore")
    return f"{head_text}{'' if head_text.endswith(chr(10)) else chr(10)}{note}\n{tail_text}"
