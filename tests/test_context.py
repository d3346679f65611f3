"""Context management building blocks: real messages in, what the model would see out."""

from __future__ import annotations

import pytest

from toka.context import (
    SUMMARY_INSTRUCTION,
    ContextBudget,
    ContextStats,
    clear_old_tool_results,
    compacted,
    compaction_request,
    context_window,
    estimate_tokens,
    head_and_tail,
    summary_text,
)
from toka.model import (
    Message,
    ModelRequest,
    ModelResponse,
    TextBlock,
    ToolDefinition,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)

TASK = Message(role="user", content=[TextBlock(text="Fix the parser bug in src/parse.py.")])
TOOLS = [ToolDefinition(name="read_file", description="Read a file.",
                        input_schema={"type": "object", "properties": {"path": {"type": "string"}}})]


def _output(turn: int, lines: int = 60) -> str:
    body = "\n".join(f"{n:>5}  def function_{turn}_{n}(x): return x + {n}" for n in range(1, lines + 1))
    return f'<tool_output tool="read_file">\n{body}\n</tool_output>'


def conversation(turns: int, *, lines: int = 60, end_with_results: bool = True) -> list[Message]:
    """The task, then ``turns`` turns of: the model reads a file, the file comes back."""
    messages = [TASK]
    for turn in range(1, turns + 1):
        call = ToolUseBlock(id=f"toolu_{turn:03d}", name="read_file", input={"path": f"src/mod{turn}.py"})
        messages.append(Message(role="assistant", content=[TextBlock(text=f"Reading module {turn}."), call]))
        if turn < turns or end_with_results:
            messages.append(Message(role="user", content=[
                ToolResultBlock(tool_use_id=call.id, content=_output(turn, lines))]))
    return messages


def assert_valid(messages: list[Message]) -> None:
    """What the Messages API checks: alternating roles from a user message, every tool_result
    answering a tool_use of the message just before it, and every tool_use answered."""
    assert messages[0].role == "user"
    for before, after in zip(messages, messages[1:]):
        assert before.role != after.role
    for i, message in enumerate(messages):
        results = [b.tool_use_id for b in message.content if isinstance(b, ToolResultBlock)]
        if results:
            asked = [b.id for b in messages[i - 1].content if isinstance(b, ToolUseBlock)]
            assert results == asked
        if message.role == "assistant" and i + 1 < len(messages):
            asked = [b.id for b in message.content if isinstance(b, ToolUseBlock)]
            answered = [b.tool_use_id for b in messages[i + 1].content if isinstance(b, ToolResultBlock)]
            assert answered == asked


def results(messages: list[Message]) -> list[ToolResultBlock]:
    return [b for m in messages for b in m.content if isinstance(b, ToolResultBlock)]


# -- windows and estimates ------------------------------------------------------------


@pytest.mark.parametrize(("model", "window"), [
    ("claude-sonnet-4-5", 200_000),
    ("claude-sonnet-4-5-20250929", 200_000),
    ("claude-opus-4-5", 200_000),
    ("claude-haiku-4-5", 200_000),
    ("claude-3-7-sonnet-latest", 200_000),
    ("claude-3-5-haiku-20241022", 200_000),
    ("claude-opus-4-6", 1_000_000),
    ("claude-sonnet-4-6", 1_000_000),
    ("claude-sonnet-5-5", 1_000_000),
])
def test_known_models_have_their_window(model: str, window: int) -> None:
    assert context_window(model) == window


def test_unknown_and_offline_models_get_200k_and_the_override_wins() -> None:
    assert context_window("my-proxy-alias") == 200_000
    assert context_window("offline") == 200_000
    assert context_window("claude-opus-4-6", override=40_000) == 40_000
    assert context_window("my-proxy-alias", override=32_000) == 32_000


def test_the_estimate_is_on_the_high_side_for_english_and_code() -> None:
    prose = "The parser fails when a quoted string contains an escaped delimiter. " * 200
    code = "def parse(text: str) -> list[str]:\n    return [t.strip() for t in text.split(',')]\n" * 200
    for text in (prose, code):
        request = ModelRequest(system="", messages=[Message(role="user", content=[TextBlock(text=text)])])
        assert estimate_tokens(request) >= len(text) / 3.5  # Claude: ~4 chars/token English, 3-3.5 code


def test_the_estimate_counts_system_tools_and_every_block() -> None:
    bare = ModelRequest(system="", messages=[TASK])
    full = ModelRequest(system="You are careful. " * 50, tools=TOOLS, messages=conversation(3))
    assert estimate_tokens(full) > estimate_tokens(bare) + 3 * len(_output(1)) / 3.5


# -- the budget ----------------------------------------------------------------------------


def test_the_budget_says_too_big_past_the_threshold_or_without_room_for_the_reply() -> None:
    budget = ContextBudget(window=10_000, threshold=0.5)
    small = ModelRequest(system="s", messages=conversation(1, lines=10))
    big = ModelRequest(system="s", messages=conversation(12, lines=40))
    assert 5_000 < estimate_tokens(big) < 10_000
    assert not budget.too_big(small)
    assert budget.too_big(big)
    no_room = ModelRequest(system="s", messages=conversation(1, lines=10), max_tokens=9_900)
    assert ContextBudget(window=10_000, threshold=1.0).too_big(no_room)


def test_calibration_uses_the_providers_count_but_never_goes_below_the_heuristic() -> None:
    budget = ContextBudget(window=100_000)
    request = ModelRequest(system="s", messages=conversation(3))
    estimate = estimate_tokens(request)
    budget.calibrate(request, Usage(input_tokens=10, cache_creation_input_tokens=estimate,
                                    cache_read_input_tokens=estimate))
    assert budget.estimate(request) >= 2 * estimate  # the provider counted twice as many
    budget.calibrate(request, Usage(input_tokens=estimate // 3))
    assert budget.estimate(request) == estimate  # fewer than estimated: the heuristic stays
    budget.calibrate(request, Usage())  # a response without counts teaches nothing
    assert budget.estimate(request) == estimate


def test_the_budget_is_built_for_a_model() -> None:
    budget = ContextBudget.for_model("claude-haiku-4-5")
    assert (budget.window, budget.limit, budget.keep_turns) == (200_000, 140_000, 4)
    assert ContextBudget.for_model("claude-haiku-4-5", override=40_000).limit == 28_000
    with pytest.raises(ValueError, match="threshold"):
        ContextBudget(window=1000, threshold=1.5)
    assert ContextStats() == ContextStats(compactions=0, tokens_cleared=0, outputs_saved=0)


# -- clearing ---------------------------------------------------------------------------------


def test_clearing_stubs_old_results_and_keeps_the_task_and_the_last_turns() -> None:
    messages = conversation(10)
    cleared, removed = clear_old_tool_results(messages, keep_turns=4)

    assert cleared[0] is messages[0]
    assert cleared[-8:] == messages[-8:]  # the last 4 turns: 4 assistant messages, 4 results
    assert all(a is b for a, b in zip(cleared[-8:], messages[-8:]))
    old = results(cleared)[:6]
    assert all(r.content.startswith("[output of read_file cleared to save context") for r in old)
    assert_valid(cleared)
    assert [m.role for m in cleared] == [m.role for m in messages]
    assert removed > 6 * len(_output(1)) / 3.5 * 0.9
    before = estimate_tokens(ModelRequest(system="", messages=messages))
    after = estimate_tokens(ModelRequest(system="", messages=cleared))
    assert before - after == pytest.approx(removed, rel=0.05)


def test_a_stub_names_the_tool_the_size_and_how_to_read_again() -> None:
    cleared, _ = clear_old_tool_results(conversation(6), keep_turns=1)
    stub = results(cleared)[1].content
    assert "\n" not in stub
    assert stub.startswith("[output of read_file cleared to save context: 60 lines, ")
    assert 'call read_file again (path="src/mod2.py")' in stub
    assert "start_line/end_line" in stub


def test_clearing_twice_changes_nothing_more() -> None:
    once, removed = clear_old_tool_results(conversation(8), keep_turns=2)
    twice, again = clear_old_tool_results(once, keep_turns=2)
    assert removed > 0 and again == 0
    assert twice == once


def test_small_results_and_error_flags_are_left_alone() -> None:
    messages = conversation(6, lines=2)  # outputs well under 300 characters
    cleared, removed = clear_old_tool_results(messages, keep_turns=1)
    assert (cleared, removed) == (messages, 0)
    error = Message(role="user", content=[ToolResultBlock(tool_use_id="toolu_001", content="x" * 1000,
                                                          is_error=True)])
    messages = [*conversation(1, end_with_results=False), error, *conversation(3)[1:]]
    cleared, _ = clear_old_tool_results(messages, keep_turns=1)
    assert cleared[2].content[0].is_error and "cleared" in cleared[2].content[0].content


def test_clearing_points_to_a_saved_output() -> None:
    saved = head_and_tail("line\n" * 10_000, 2_000, ".toka/outputs/t1/3.txt")
    messages = conversation(3)
    messages[2] = Message(role="user", content=[ToolResultBlock(tool_use_id="toolu_001", content=saved)])
    stub = results(clear_old_tool_results(messages, keep_turns=1)[0])[0].content
    assert 'read_file (path=".toka/outputs/t1/3.txt"' in stub


def test_keep_turns_larger_than_the_conversation_clears_nothing() -> None:
    messages = conversation(3)
    assert clear_old_tool_results(messages, keep_turns=4) == (messages, 0)


# -- compaction ---------------------------------------------------------------------------------


def test_the_summary_request_reuses_the_prefix_and_asks_for_text() -> None:
    base = ModelRequest(system="spec", tools=TOOLS, messages=conversation(5), max_tokens=2048)
    request = compaction_request(base)
    assert (request.system, request.tools, request.max_tokens) == (base.system, base.tools, base.max_tokens)
    assert request.tool_choice == "none" and base.tool_choice is None  # text only; tools kept for the cache
    assert request.messages[:-1] == base.messages[:-1]
    last = request.messages[-1]
    assert last.content[:-1] == base.messages[-1].content  # the results first, as they were
    assert last.content[-1] == TextBlock(text=SUMMARY_INSTRUCTION)
    for word in ("Files", "remains", "Open questions", "do not call any tool"):
        assert word in SUMMARY_INSTRUCTION
    assert_valid(request.messages)


def test_the_summary_request_answers_pending_tool_calls() -> None:
    base = ModelRequest(system="spec", messages=conversation(3, end_with_results=False))
    request = compaction_request(base)
    assert request.messages[:-1] == base.messages
    answers = results(request.messages[-1:])
    assert [a.tool_use_id for a in answers] == ["toolu_003"] and "not run" in answers[0].content
    assert_valid(request.messages)


def test_compaction_keeps_the_task_the_summary_and_the_last_turns() -> None:
    messages = conversation(10)
    new = compacted(TASK, "Read modules 1-10; the bug is in mod7.", messages, keep_turns=3)

    first = new[0]
    assert first.role == "user" and first.content[0] == TASK.content[0]
    note = first.content[-1].text
    assert "<work_so_far>\nRead modules 1-10; the bug is in mod7.\n</work_so_far>" in note
    assert "Continue the task" in note and "files may have changed" in note
    assert new[1:] == messages[-6:]
    assert new[1].role == "assistant"
    assert_valid(new)


def test_compaction_ending_with_pending_calls_stays_valid() -> None:
    messages = conversation(6, end_with_results=False)
    new = compacted(TASK, "summary", messages, keep_turns=2)
    assert new[1:] == messages[-3:] and new[-1].role == "assistant"
    assert_valid(new)


def test_compaction_drops_the_summary_request_it_is_given() -> None:
    messages = conversation(6)
    asked = compaction_request(ModelRequest(system="s", messages=messages)).messages
    assert compacted(TASK, "s", asked, keep_turns=2) == compacted(TASK, "s", messages, keep_turns=2)
    pending = conversation(6, end_with_results=False)
    asked = compaction_request(ModelRequest(system="s", messages=pending)).messages
    assert compacted(TASK, "s", asked, keep_turns=2)[1:] == pending[-3:]


def test_a_second_compaction_replaces_the_first_summary() -> None:
    first = compacted(TASK, "first summary", conversation(8), keep_turns=2)
    more = [*first, *conversation(12)[-8:]]
    second = compacted(first[0], "second summary", more, keep_turns=2)
    texts = [b.text for b in second[0].content if isinstance(b, TextBlock)]
    assert texts[0] == TASK.content[0].text
    assert sum("<work_so_far>" in t for t in texts) == 1 and "second summary" in texts[-1]
    assert_valid(second)


def test_compaction_keeps_fewer_turns_when_they_are_too_big_but_never_none() -> None:
    messages = conversation(8, lines=200)
    one_turn = estimate_tokens(ModelRequest(system="", messages=messages[-2:]))
    new = compacted(TASK, "s", messages, keep_turns=4, max_tokens=int(one_turn * 2.5))
    assert new[1:] == messages[-4:]
    new = compacted(TASK, "s", messages, keep_turns=4, max_tokens=1)
    assert new[1:] == messages[-2:]
    assert_valid(new)
    assert compacted(TASK, "s", [TASK], keep_turns=4)[1:] == []


def test_the_summary_is_the_responses_text() -> None:
    response = ModelResponse(content=[TextBlock(text=" Done: A. "), ToolUseBlock(id="t", name="x", input={})])
    assert summary_text(response) == "Done: A."


# -- one long output ----------------------------------------------------------------------------------


def test_head_and_tail_keeps_both_ends_and_says_where_the_rest_is() -> None:
    text = "".join(f"line {n}: {'x' * 40}\n" for n in range(1, 2001))
    out = head_and_tail(text, 4_000, ".toka/outputs/a/1.txt")
    assert out.startswith("line 1: ")
    assert out.rstrip().endswith(f"line 2000: {'x' * 40}")
    assert len(out.encode()) < 4_000 + 300
    lines = out.splitlines()
    note = next(line for line in lines if line.startswith("[..."))
    assert "lines / " in note and "bytes omitted" in note
    assert 'saved at .toka/outputs/a/1.txt: read it with read_file (path=".toka/outputs/a/1.txt"' in note
    kept = [line for line in lines if line.startswith("line ")]
    assert all(line.endswith("x" * 40) for line in kept)  # cut at line boundaries
    head = [line for line in lines[:lines.index(note)]]
    assert 2_700 < sum(len(line) + 1 for line in head) <= 3_000
    omitted = int(note.split()[1].replace(",", ""))
    assert omitted + len(kept) == 2000


def test_head_and_tail_leaves_short_output_alone_and_copes_with_one_long_line() -> None:
    assert head_and_tail("short\n", 1_024, "x") == "short\n"
    out = head_and_tail("é" * 10_000, 1_024, "saved.txt")  # 2 bytes a character, no newline
    assert out.startswith("é") and out.endswith("é") and "saved.txt" in out
    assert len(out.encode()) < 1_024 + 300
