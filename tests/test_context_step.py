"""Context management in the step loop: a long task's conversation kept inside the context window.

run_step with fake models and a real toolbox over a temporary workspace (a big file read a chunk a
turn), and the Anthropic provider against the loopback Messages API server for the server-side mode.
The pure functions (estimate, stubs, compaction) are tested in tests/test_context.py; here is what
a task's conversation goes through.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from toka.capabilities import grant_tools
from toka.claude import CONTEXT_MANAGEMENT_BETA, AnthropicModel
from toka.context import SUMMARY_INSTRUCTION, ContextBudget, estimate_tokens
from toka.errors import ContextOverflowError
from toka.journal import Journal
from toka.model import (
    Message,
    ModelRequest,
    ModelResponse,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from toka.step import StepLimits, StepRun, run_step
from toka.testing import FunctionModel, ScriptedModel, submit, text, tool_call
from toka.tools import Toolbox, ToolContext
from toka.workspace import Workspace

from .anthropic_server import AnthropicServer, message, tool_use_block

TASK = "# Task 1 of 1: Read big.txt from the start, a chunk at a time"
CHUNK = 90
"""Lines of big.txt read a turn: about 5 KB of read_file output (58 characters a numbered line)."""
LINES = 3_000
USAGE = Usage(input_tokens=100, output_tokens=20, requests=1)
KEY = "sk-ant-test-context-0123456789abcdef"
STUB = re.compile(
    r'\[output of read_file cleared to save context: \d+ lines, [\d,]+ characters; call read_file again '
    r'\(path="big\.txt", start_line=\d+, end_line=\d+\) to see it; start_line/end_line read a part\]'
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "big.txt").write_text("".join(f"line {i:05d} {'x' * 40}\n" for i in range(1, LINES + 1)))
    return ws


def toolbox(root: Path, *capabilities: str) -> Toolbox:
    tools, withheld = grant_tools(capabilities or ("filesystem-read",))
    return Toolbox(tools, ToolContext(workspace=Workspace(root), agent="reader", task=1), withheld=withheld)


def step(model: Any, box: Toolbox, limits: StepLimits, **kwargs: Any) -> StepRun:
    return asyncio.run(run_step(model=model, system="SYSTEM PROMPT", task_message=TASK, toolbox=box,
                                limits=limits, **kwargs))


def asks_for_summary(request: ModelRequest) -> bool:
    last = request.messages[-1].content[-1]
    return isinstance(last, TextBlock) and last.text == SUMMARY_INSTRUCTION


def chunks_read(request: ModelRequest) -> int:
    """Chunks of big.txt the conversation has asked for: the highest one its read_file calls name."""
    starts = [b.input["start_line"] for m in request.messages for b in m.content
              if isinstance(b, ToolUseBlock) and b.name == "read_file"]
    return max(((s - 1) // CHUNK + 1 for s in starts), default=0)


def read_chunk(k: int) -> dict[str, Any]:
    return {"path": "big.txt", "start_line": k * CHUNK + 1, "end_line": (k + 1) * CHUNK}


class ChunkReader:
    """A model that reads big.txt a chunk a turn, then submits; it summarises when asked.

    Its answer is a function of the request alone (what the conversation has read so far), so a
    conversation resumed from a journal, or compacted, goes on where it was.
    """

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    def __call__(self, request: ModelRequest) -> ModelResponse:
        done = chunks_read(request)
        if asks_for_summary(request):
            return ModelResponse(content=[TextBlock(text=f"SUMMARY: read big.txt chunks 0-{done - 1}")],
                                 usage=USAGE)
        if done >= self.chunks:
            call = ToolUseBlock(id="submit", name="submit_result",
                                input={"status": "completed", "summary": f"read {done} chunks"})
        else:
            call = ToolUseBlock(id=f"read-{done}", name="read_file", input=read_chunk(done))
        return ModelResponse(content=[call], stop_reason="tool_use", usage=USAGE)


def tool_results(request: ModelRequest) -> list[str]:
    return [b.content for m in request.messages for b in m.content if isinstance(b, ToolResultBlock)]


# -- client-side: clearing, then compaction -----------------------------------------------------


def test_a_long_task_stays_inside_the_window_by_clearing_then_compacting(root: Path) -> None:
    # 12,000 tokens: the last 4 turns (about 6,000) fit under the threshold (8,400), so clearing
    # suffices for a while and compaction comes when the stubs of ~20 turns add up.
    window = 12_000
    limits = StepLimits(context_window=window, context_threshold=0.7, keep_turns=4, max_turns=40, max_tokens=1024)
    model = FunctionModel(ChunkReader(24))
    lines: list[str] = []
    events: list[tuple[str, dict[str, int]]] = []
    run = step(model, toolbox(root), limits, log=lines.append,
               on_context=lambda kind, data: events.append((kind, data)))

    assert run.result.summary == "read 24 chunks"
    sent = model.history
    assert all(estimate_tokens(r) + r.max_tokens <= window for r in sent), [estimate_tokens(r) for r in sent]

    # Old results became stubs that say which call made them and how to read them again.
    stubs = {c for r in sent for c in tool_results(r) if c.startswith("[output of")}
    assert stubs and all(STUB.fullmatch(s) for s in stubs), sorted(stubs)[:3]
    assert any('(path="big.txt", start_line=1, end_line=90)' in s for s in stubs)

    # Clearing was not enough once: a summary was asked for, and the conversation went on from it.
    summaries = [i for i, r in enumerate(sent) if asks_for_summary(r)]
    assert len(summaries) == run.context.compactions >= 1
    i = summaries[0]
    summary = ChunkReader(24)(sent[i]).content[0].text  # type: ignore[union-attr]
    after = sent[i + 1]
    head, *tail = after.messages
    assert head.role == "user" and head.content[0] == TextBlock(text=TASK)
    assert head.content[1].text.startswith(f"<work_so_far>\n{summary}\n</work_so_far>")  # type: ignore[union-attr]
    # The last turns (at most keep_turns, at least one) are kept as they were: full output, no
    # stub; only the instruction is gone.
    asked = sent[i].messages
    last = Message(role="user", content=asked[-1].content[:-1])
    assert tail[0].role == "assistant" and tail == [*asked[len(asked) - len(tail):-1], last]
    assert 1 <= sum(m.role == "assistant" for m in tail) <= 4
    kept = [b.content for m in tail for b in m.content if isinstance(b, ToolResultBlock)]
    assert kept and all(c.startswith('<tool_output tool="read_file">\nbig.txt: lines ') for c in kept)
    assert not asks_for_summary(after) and estimate_tokens(after) < estimate_tokens(sent[i])

    # Reported: the stats, one event and one log line per clearing or compaction, nothing else.
    assert run.context.tokens_cleared > 0
    assert run.context.tokens_cleared == sum(d["tokens_cleared"] for k, d in events if k == "cleared")
    assert [k for k, _ in events].count("compacted") == run.context.compactions
    assert len(lines) == len(events)
    assert [("cleared" if "cleared old tool output" in line else "compacted" if "compacted the conversation"
             in line else line) for line in lines] == [k for k, _ in events]
    assert all(f"of the {window}-token context window" in line for line in lines if "cleared" in line)


def test_compaction_keeps_fewer_turns_when_the_kept_turns_alone_are_too_big(root: Path) -> None:
    # 8,000 tokens, 4 kept turns of ~1,500 tokens each: the kept turns alone pass 70% (5,600), so
    # clearing cannot help and compaction must keep fewer than keep_turns for the request to fit.
    window = 8_000
    limits = StepLimits(context_window=window, context_threshold=0.7, keep_turns=4, max_turns=40, max_tokens=1024)
    model = FunctionModel(ChunkReader(12))
    run = step(model, toolbox(root), limits)
    assert run.result.summary == "read 12 chunks" and run.context.compactions >= 1
    assert all(estimate_tokens(r) + r.max_tokens <= window for r in model.history)
    budget = ContextBudget(window, 0.7, 4)
    after_summaries = [model.history[i + 1] for i, r in enumerate(model.history) if asks_for_summary(r)]
    # What compaction hands on fits the budget: under the threshold, with room for the reply.
    assert [estimate_tokens(r) for r in after_summaries if budget.too_big(r)] == []
    assert all(any(isinstance(b, ToolUseBlock) for m in r.messages for b in m.content) for r in after_summaries)


# -- one output too long ------------------------------------------------------------------------------


def test_a_long_output_is_cut_to_head_and_tail_and_saved_readable_not_writable(root: Path) -> None:
    box = toolbox(root, "filesystem-read", "filesystem-write")
    workspace = box.ctx.workspace
    outputs = workspace.state_dir / "outputs" / "run-1" / "reader" / "1"

    def save_output(whole: str) -> str:  # what toka.llm_step does
        outputs.mkdir(parents=True, exist_ok=True)
        path = outputs / f"{len(list(outputs.iterdir())) + 1:04d}.txt"
        path.write_text(whole, encoding="utf-8")
        return workspace.relative(path)

    def saved_path(request: ModelRequest) -> str:
        found = re.search(r"the whole output is saved at (\S+): read it with read_file", tool_results(request)[0])
        assert found, tool_results(request)[0][-600:]
        return found.group(1)

    async def read_saved(request: ModelRequest) -> ModelResponse:
        return tool_call("read_file", path=saved_path(request), start_line=150, end_line=152)

    async def overwrite_saved(request: ModelRequest) -> ModelResponse:
        return tool_call("write_file", path=saved_path(request), content="forged")

    limit = 2_000
    model = ScriptedModel(
        tool_call("read_file", path="big.txt", start_line=1, end_line=300),
        read_saved,
        overwrite_saved,
        tool_call("list_dir", path=".toka/outputs"),
        submit(),
    )
    run = step(model, box, StepLimits(tool_output_limit=limit), save_output=save_output)
    assert run.result.status == "completed"
    assert run.context.outputs_saved == 1  # the part read back is short

    whole = "\n".join(["big.txt: lines 1-300 of 3000",
                       *(f"{i:>5}  line {i:05d} {'x' * 40}" for i in range(1, 301))])
    path = saved_path(model.history[1])
    assert re.fullmatch(r"\.toka/outputs/run-1/reader/1/0001\.txt", path)
    assert (root / path).read_text() == whole

    shown = tool_results(model.history[1])[0]
    inner = shown.removeprefix('<tool_output tool="read_file">\n').removesuffix("\n</tool_output>")
    assert inner.startswith("big.txt: lines 1-300 of 3000\n    1  line 00001 ")
    assert inner.endswith(f"  300  line 00300 {'x' * 40}")
    assert "  150  line 00150" not in inner  # the middle is left out...
    assert re.search(r"\[\.\.\. [\d,]+ lines / [\d,]+ bytes omitted \(from line \d+\); the whole output is saved "
                     rf"at {re.escape(path)}: read it with read_file \(path=\"{re.escape(path)}\", start_line, "
                     r"end_line\) \.\.\.\]", inner)
    assert len(inner.encode()) < limit + 400  # ...and what the model gets is about the limit

    # The saved output reads back as a file (line 1 is the header, so line 150 holds line 149)...
    read_back = model.history[2].messages[-1].content[0]
    assert isinstance(read_back, ToolResultBlock) and not read_back.is_error
    assert f"{path}: lines 150-152 of 301" in read_back.content
    assert "  149  line 00149" in read_back.content and "  151  line 00151" in read_back.content
    # ...but is not writable, nor listable.
    write = model.history[3].messages[-1].content[0]
    assert isinstance(write, ToolResultBlock) and write.is_error
    assert "inside toka's own state directory" in write.content
    assert (root / path).read_text() == whole
    listing = model.history[4].messages[-1].content[0]
    assert isinstance(listing, ToolResultBlock) and listing.is_error
    assert "inside toka's own state directory" in listing.content
    assert [c.refused for c in box.calls] == [False, False, True, True]


# -- the server says the prompt is too long ------------------------------------------------------------


TOO_LONG = "Anthropic API 400 invalid_request_error: the prompt is too long for the model's context window"


def test_a_prompt_too_long_for_the_server_is_compacted_and_sent_again(root: Path) -> None:
    read = tool_call("read_file", path="big.txt", start_line=1, end_line=90)
    model = ScriptedModel(read, ContextOverflowError(TOO_LONG), text("SUMMARY: read lines 1-90"), submit())
    lines: list[str] = []
    run = step(model, toolbox(root), StepLimits(), log=lines.append)

    assert run.result.status == "completed" and run.context.compactions == 1
    refused, summary_request, again = model.history[1:]
    assert asks_for_summary(summary_request) and summary_request.messages[:-1] == refused.messages[:-1]
    assert again.messages[0].content == [TextBlock(text=TASK), again.messages[0].content[1]]
    assert "SUMMARY: read lines 1-90" in again.messages[0].content[1].text  # type: ignore[union-attr]
    assert again.messages[1:] == refused.messages[1:]  # the one turn is kept as it was
    assert len(lines) == 2
    assert lines[0].startswith("the model's server says the prompt is too long")
    assert "compacted the conversation" in lines[1]
    assert run.usage.requests == 3  # the refused request cost nothing


def test_a_prompt_still_too_long_after_compaction_fails_the_task(root: Path) -> None:
    model = ScriptedModel(tool_call("read_file", path="big.txt", start_line=1, end_line=90),
                          ContextOverflowError(TOO_LONG), text("SUMMARY"), ContextOverflowError(TOO_LONG))
    with pytest.raises(ContextOverflowError, match="prompt is too long") as failed:
        step(model, toolbox(root), StepLimits())
    assert len(model.history) == 4  # compacted once, not again
    assert failed.value.usage is not None and failed.value.usage.requests == 2


def long_reader(turns: int) -> Any:
    """A loopback responder that reads big.txt a chunk a turn, then submits (summarises when asked)."""
    def respond(body: dict[str, Any]) -> dict[str, Any]:
        last = body["messages"][-1]["content"]
        if isinstance(last, list) and last and last[-1].get("text") == SUMMARY_INSTRUCTION:
            return message({"type": "text", "text": "SUMMARY: reading big.txt"}, model=body["model"])
        starts = [b["input"]["start_line"] for m in body["messages"] for b in m["content"]
                  if isinstance(b, dict) and b.get("type") == "tool_use"]
        done = max(((s - 1) // CHUNK + 1 for s in starts), default=0)
        if done >= turns:
            block = tool_use_block("submit_result", {"status": "completed", "summary": f"read {done} chunks"})
        else:
            block = tool_use_block("read_file", read_chunk(done))
        return message(block, stop_reason="tool_use", model=body["model"])
    return respond


def test_a_server_that_counts_more_than_the_estimate_does_not_fail_the_task(root: Path) -> None:
    # The configured window (40,000) is larger than the server's (6,000): the server refuses first.
    limits = StepLimits(context_window=40_000, keep_turns=2, max_turns=40, max_tokens=1024)
    with AnthropicServer(long_reader(10), context_window=6_000) as server:
        model = AnthropicModel("claude-test", api_key=KEY, base_url=server.base_url, max_attempts=1,
                               request_timeout=5.0)
        try:
            run = step(model, toolbox(root), limits)
        finally:
            assert server.count("error:too-long") >= 1
    assert run.result.summary == "read 10 chunks" and run.context.compactions >= 1


# -- server-side context editing -------------------------------------------------------------------------


def _request() -> ModelRequest:
    return ModelRequest(system="SYSTEM PROMPT", messages=[Message(role="user", content=[TextBlock(text=TASK)])])


def test_context_editing_is_asked_for_with_its_beta_header() -> None:
    model = AnthropicModel("claude-test", api_key=KEY, context_edit_trigger=5_600)
    params = model.params(_request())
    assert params["extra_body"]["context_management"] == {"edits": [{
        "type": "clear_tool_uses_20250919",
        "trigger": {"type": "input_tokens", "value": 5_600},
        "keep": {"type": "tool_uses", "value": 4},
    }]}
    assert params["extra_headers"] == {"anthropic-beta": "context-management-2025-06-27"}
    assert CONTEXT_MANAGEMENT_BETA == "context-management-2025-06-27"
    plain = AnthropicModel("claude-test", api_key=KEY).params(_request())
    assert "extra_body" not in plain and "extra_headers" not in plain


def _report(cleared: int) -> dict[str, Any]:
    edits = [{"type": "clear_tool_uses_20250919", "cleared_tool_uses": 3, "cleared_input_tokens": cleared}]
    return {"applied_edits": edits if cleared else []}


@pytest.mark.parametrize(("report", "cleared"), [(_report(5_000), 5_000), (_report(0), 0), (None, None)])
def test_the_servers_report_of_what_it_cleared_reaches_the_response(report: Any, cleared: int | None) -> None:
    def respond(body: dict[str, Any]) -> dict[str, Any]:
        reply = message({"type": "text", "text": "ok"}, model=body["model"])
        if report is not None:
            reply["context_management"] = report
        return reply

    with AnthropicServer(respond) as server:
        model = AnthropicModel("claude-test", api_key=KEY, base_url=server.base_url, max_attempts=1,
                               request_timeout=5.0, context_edit_trigger=5_600)
        response = asyncio.run(model.request(_request()))
    assert response.server_cleared == cleared
    (sent,) = server.requests
    assert CONTEXT_MANAGEMENT_BETA in sent.headers["anthropic-beta"].split(",")
    assert sent.body["context_management"]["edits"][0]["type"] == "clear_tool_uses_20250919"


def test_a_server_that_stops_confirming_its_editing_hands_the_context_to_toka(root: Path) -> None:
    # Requests 1-8 get a report (the 7th says 5,000 tokens were cleared); from the 8th response on
    # none: toka manages request 9 on itself. Requests 7 and 8 are over the threshold already.
    window = 12_000
    reader = long_reader(14)

    def respond(body: dict[str, Any]) -> dict[str, Any]:
        reply = reader(body)
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant") + 1
        if turn <= 7:
            reply["context_management"] = _report(5_000 if turn == 7 else 0)
        return reply

    limits = StepLimits(context_window=window, context_threshold=0.7, keep_turns=4, max_turns=40,
                        max_tokens=1024, server_context=True)
    lines: list[str] = []
    with AnthropicServer(respond) as server:
        model = AnthropicModel("claude-test", api_key=KEY, base_url=server.base_url, max_attempts=1,
                               request_timeout=5.0, context_edit_trigger=int(window * 0.7))
        run = step(model, toolbox(root), limits, log=lines.append)
    assert run.result.summary == "read 14 chunks"

    bodies = [json.dumps(r.body) for r in server.requests]
    stubbed = [i + 1 for i, b in enumerate(bodies) if "[output of read_file cleared" in b]
    assert stubbed and stubbed[0] == 9  # the server's editing was trusted while it was confirmed
    outputs = [b["content"] for m in server.requests[7].body["messages"] for b in m["content"]
               if b["type"] == "tool_result"]
    assert len(outputs) == 7 and not any(o.startswith("[output of") for o in outputs)
    assert sum(len(o) for o in outputs) / 3.5 > ContextBudget(window, 0.7, 4).limit  # over it, untouched

    notices = [line for line in lines if "did not confirm its context editing" in line]
    assert len(notices) == 1
    cleared = [n for n, line in enumerate(lines) if "cleared old tool output" in line]
    assert cleared and cleared[0] > lines.index(notices[0])
    assert run.context.tokens_cleared > 5_000  # the server's report plus toka's own clearing
    assert all(CONTEXT_MANAGEMENT_BETA in r.headers.get("anthropic-beta", "") for r in server.requests)


# -- the journal and compaction together ---------------------------------------------------------------


class Killed(BaseException):
    """The process dies (like SIGKILL, nothing below catches it)."""


def test_a_compacted_task_killed_and_resumed_replays_its_summary_and_asks_only_from_the_kill(
    root: Path, tmp_path: Path
) -> None:
    limits = StepLimits(context_window=12_000, context_threshold=0.7, keep_turns=4, max_turns=40, max_tokens=1024)
    reference = FunctionModel(ChunkReader(24), name="reader")
    expected = step(reference, toolbox(root), limits)
    summary_at = next(i for i, r in enumerate(reference.history) if asks_for_summary(r))
    kill_at = summary_at + 3  # three requests after the summary: the 4th one after it never comes back

    reader = ChunkReader(24)

    def dies(request: ModelRequest) -> ModelResponse:
        if len(first.history) > kill_at:
            raise Killed()
        return reader(request)

    journal = tmp_path / "journal" / "run-1" / "reader" / "1.jsonl"
    first = FunctionModel(dies, name="reader")
    with pytest.raises(Killed):
        step(first, toolbox(root), limits, journal=Journal(journal))
    assert len(first.history) == kill_at + 1
    # What the killed process recorded was paid for by it, not by the next one.
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    journal.write_text("".join(json.dumps({**e, "by": "the-killed-process"}) + "\n" for e in entries))

    resumed = FunctionModel(ChunkReader(24), name="reader")
    charged: list[Usage] = []
    carried: list[Usage] = []
    lines: list[str] = []
    run = step(resumed, toolbox(root), limits, journal=Journal(journal), after_request=charged.append,
               on_replayed=carried.append, log=lines.append)

    assert run.result == expected.result and run.turns == expected.turns
    # Asked from the request in flight at the kill on, nothing before it, the summary included.
    assert resumed.history[0] == first.history[-1]
    assert resumed.history[0].metadata["turn"] == reference.history[kill_at].metadata["turn"]
    assert resumed.history == reference.history[kill_at:]
    assert "<work_so_far>\nSUMMARY: " in resumed.history[0].messages[0].content[1].text  # type: ignore[union-attr]
    assert not any(asks_for_summary(r) for r in resumed.history[:1])
    # Paid before the kill: carried, not charged again.
    assert len(carried) == kill_at and run.carried == Usage(input_tokens=100 * kill_at,
                                                            output_tokens=20 * kill_at, requests=kill_at)
    assert len(charged) == len(resumed.history) and run.usage.requests == len(resumed.history)
    assert run.replayed == len(entries) == 2 * kill_at - 1  # responses and tool results; the summary has none
    assert lines[0].startswith(f"resuming the task from its journal: {len(entries)} recorded steps")
    # Replay rebuilds the same conversation: the recorded summary is used, not asked for.
    assert run.context.compactions == expected.context.compactions


def test_a_task_killed_after_a_prompt_refused_as_too_long_resumes_from_the_kill(root: Path, tmp_path: Path) -> None:
    """The refused request left no response: replay met the summary where it asked for that one,
    stopped there, and the task did again (and paid again for) everything after it."""
    read = tool_call("read_file", path="big.txt", start_line=1, end_line=90)
    again = tool_call("read_file", path="big.txt", start_line=91, end_line=100)
    journal = tmp_path / "1.jsonl"
    script = ScriptedModel(read, ContextOverflowError(TOO_LONG), text("SUMMARY: read lines 1-90"), again)

    async def dies(request: ModelRequest) -> ModelResponse:
        if len(first.history) > 4:
            raise Killed()
        return await script.request(request)

    first = FunctionModel(dies, name="reader")
    with pytest.raises(Killed):
        step(first, toolbox(root), StepLimits(), journal=Journal(journal))
    assert len(first.history) == 5
    lines: list[str] = []
    resumed = FunctionModel(lambda request: submit(summary="done"), name="reader")
    run = step(resumed, toolbox(root), StepLimits(), journal=Journal(journal), log=lines.append)
    assert run.result.summary == "done"
    assert len(resumed.history) == 1  # only the request in flight at the kill
    assert resumed.history[0] == first.history[-1]
    assert not any("replay stopped" in line for line in lines), lines
    # The first read and its result, the refusal, the summary, the second read and its result.
    assert run.replayed == 6


def test_one_turns_tool_outputs_together_fit_the_window(root: Path, tmp_path: Path) -> None:
    """Each output was cut to tool_output_limit alone: thirty at once went past the window, and so did
    the summary request that was to shrink them. Now a turn's outputs share half of what a prompt may fill."""
    for i in range(12):
        (root / f"part-{i}.txt").write_text(f"part {i}\n" + f"{'y' * 49}\n" * 400)  # 20 KB
    reads = ModelResponse(content=[ToolUseBlock(id=f"r{i}", name="read_file", input={"path": f"part-{i}.txt"})
                                   for i in range(12)], stop_reason="tool_use")
    model = ScriptedModel(reads, submit(summary="read them all"))
    saved: list[str] = []

    def save_output(whole: str) -> str:
        saved.append(whole)
        return f"saved/{len(saved)}.txt"

    limits = StepLimits(context_window=40_000, context_threshold=0.7, tool_output_limit=16_384, max_tokens=1024)
    run = step(model, toolbox(root), limits, save_output=save_output)
    assert run.result.summary == "read them all" and run.context.compactions == 0
    per_call = int(40_000 * 0.7 * 3.5) // 2 // 12  # 4,083 bytes each
    results = tool_results(model.history[1])
    assert len(results) == 12 and len(saved) == 12
    assert all(len(r.encode()) < per_call + 400 for r in results), [len(r) for r in results]
    assert ContextBudget(40_000, 0.7).estimate(model.history[1]) < 28_000


def test_what_the_server_clears_again_every_turn_is_counted_once(root: Path) -> None:
    """It clears the same old outputs from each request and reports them each time: summed, a run
    reported 17.8 times what was cleared."""
    reader = long_reader(6)

    def respond(body: dict[str, Any]) -> dict[str, Any]:
        reply = reader(body)
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant") + 1
        reply["context_management"] = _report(3_000 if turn >= 3 else 0)
        return reply

    limits = StepLimits(context_window=200_000, max_turns=20, max_tokens=1024, server_context=True)
    with AnthropicServer(respond) as server:
        model = AnthropicModel("claude-test", api_key=KEY, base_url=server.base_url, max_attempts=1,
                               request_timeout=5.0, context_edit_trigger=140_000)
        run = step(model, toolbox(root), limits)
    assert run.result.summary == "read 6 chunks" and len(server.requests) == 7
    assert run.context.tokens_cleared == 3_000
