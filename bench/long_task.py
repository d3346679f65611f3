#!/usr/bin/env python
"""A 60-turn task whose tool output is five times the context window: does it finish, what does it cost,
and what does a kill at turn 30 cost on resume.

The task runs through the normal pipeline (``toka.pipeline.pipeline_flow``, what ``toka run`` runs)
with the real Anthropic provider (``toka.claude.AnthropicModel``, the official SDK) against the
loopback Messages API server of the test suite (``tests/anthropic_server.py``), which here emulates a
``--window`` (default 40,000) token context window: a prompt longer than that, by the server's own
count (about 4 characters a token of the request's JSON), is refused with the real API's 400 "prompt
is too long". toka is told the window (setting ``context_window``) and manages the conversation
(``toka.context``: old tool output cleared, compaction into a summary, one long output cut to its head
and tail).

The model is scripted (:class:`ScriptedModel`, the server's responder): one agent, one task; each of
turns 1-59 calls one tool on a generated workspace (``read_file`` of a ~11 KB module most turns,
``search_files`` over all modules every tenth, ``read_file`` of a 64 KB log every fifteenth, which
toka cuts to ``tool_output_limit``); turn 60 submits the result. The full tool outputs add up to about
five windows. The model knows its turn from the conversation it is sent: every assistant message
starts with ``[turn N]``, and its summaries (a request holding ``toka.context.SUMMARY_INSTRUCTION``
gets a text summary) name the last turn, so it goes on right after a compaction or a resume.

Measured, run 1 (in this process, fresh Prefect home, embedded server): completed or not; requests
(turns and summary requests); input-side tokens sent (input + cache writes + cache reads, from the
run's usage) against what the unmanaged conversation would have sent (every turn carrying every full
output before it, the same system prompt, tools and model messages: computed from the scripted
outputs with the server's token count); share served from the prompt cache; largest prompt against
the window; compactions, tokens cleared, outputs saved.

Run 2, kill and resume: ``toka run`` in a child process (its own Prefect home, embedded server), killed
with SIGKILL (the whole process group) once the server has answered ``--kill-at`` (30) requests; then
``toka run --resume`` in the same workspace. A request re-sent is one whose messages (prompt-cache
markers aside) equal those of a request answered before the kill; its tokens are re-spent. A restart
of the task instead would send every request answered before the kill again.

Targets (printed next to the figures): completes with no over-long request; the resume re-sends at
most 1 request; input tokens at most 40% of the unmanaged conversation's. The exit code is 0 when the
runs finished, whether or not the targets are met.

Usage (from the repository root)::

    .venv/bin/python bench/long_task.py [--window 40000] [--turns 60] [--kill-at 30] [--latency 0.02]
                                        [--skip-kill]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "toka" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # measure this checkout's toka (and use its tests/anthropic_server.py)

FAKE_KEY = "sk-ant-bench-loopback-0000000000000000"

# Isolation, before anything imports prefect (see bench/_isolation.py).
from bench._isolation import prefect_env as _prefect_env, scratch  # noqa: E402

_TMP = scratch("toka-bench-long-")
os.environ.update({**_prefect_env(_TMP / "prefect-home"), "ANTHROPIC_API_KEY": FAKE_KEY})
for _name in ("ANTHROPIC_BASE_URL", "TOKA_MODEL", "PREFECT_API_URL", "TOKA_CONTEXT_WINDOW"):
    os.environ.pop(_name, None)  # the loopback server's URL is set per run

import anthropic  # noqa: E402
import prefect  # noqa: E402
import yaml  # noqa: E402

from tests.anthropic_server import (  # noqa: E402
    SUBMITTED,
    AnthropicServer,
    _canonical,
    _prompt_blocks,
    _tokens,
    conversation_key,
    scripted_responder,
    text_block,
    tool_use_block,
)
from toka.claude import default_model  # noqa: E402
from toka.config import grouped, settings  # noqa: E402
from toka.context import SUMMARY_INSTRUCTION  # noqa: E402
from toka.pipeline import pipeline_flow  # noqa: E402
from toka.results import PipelineSummary  # noqa: E402

NEEDED_SETTINGS = ("context_window", "max_turns")
MODULES = 60
TURN_MARK = re.compile(r"\[turn (\d+)\]")
SAVED_AT = re.compile(r"the whole output is saved at (.+?): read it with read_file")


# -- the workspace -----------------------------------------------------------------------------


def make_workspace(folder: Path, *, modules: int = MODULES) -> None:
    """One spec (one agent, one read-only task) and the files the scripted model reads."""
    spec = {
        "metadata": {"name": "reviewer"},
        "spec": {"name": "reviewer agent", "domain": "testing", "priority": "high",
                 "description": "Review every module of the service and report what needs fixing."},
        "tasks": {"default": [{"description": "Review src/ and logs/: list the defects worth fixing"}]},
        "dependencies": {"required": {}, "optional": {}},
        "security": {"capabilities_required": ["filesystem-read"], "resource_limits": {"timeout": "30m"}},
    }
    (folder / "specs").mkdir(parents=True)
    (folder / "specs" / "reviewer.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    rng = random.Random(0)
    words = ["request", "payload", "retry", "cursor", "ledger", "window", "buffer", "token", "record", "shard"]
    (folder / "src").mkdir()
    for m in range(1, modules + 1):
        lines = [f'"""Module {m}: handlers for the {rng.choice(words)} service."""', "", "import json", ""]
        for f in range(1, 31):
            a, b = rng.sample(words, 2)
            lines += [f"def handle_{a}_{m}_{f}({a}, {b}=None):",
                      f'    """Handle one {a} against the {b} (see module {m})."""',
                      f"    if {b} is None:",
                      f"        {b} = json.loads({a}.get('{b}', '{{}}'))",
                      f"    total = sum(len(str(v)) for v in {b}.values()) + {rng.randint(1, 999)}",
                      f"    return {{'{a}': {a}, '{b}': {b}, 'total': total}}", ""]
        (folder / "src" / f"module_{m:02d}.py").write_text("\n".join(lines) + "\n")
    (folder / "logs").mkdir()
    log = [f"2026-05-{1 + i // 2000:02d}T{(i // 60) % 24:02d}:{i % 60:02d}:00Z INFO worker-{rng.randint(1, 9)} "
           f"handled {rng.choice(words)} id={rng.randint(10**6, 10**7)} in {rng.randint(1, 900)} ms"
           for i in range(1200)]
    (folder / "logs" / "service.log").write_text("\n".join(log) + "\n")


# -- the scripted model -------------------------------------------------------------------------


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt's tokens as the loopback server counts them (what its ``usage`` reports in all)."""
    return sum(_tokens(js) for js, _ in _prompt_blocks(body))


def _texts(body: dict[str, Any]) -> list[str]:
    out = []
    for m in body.get("messages") or []:
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
            continue
        out += [b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]
    return out


def is_summary_request(body: dict[str, Any]) -> bool:
    last = (body.get("messages") or [{}])[-1]
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "text" and b.get("text") == SUMMARY_INSTRUCTION for b in content)


@dataclass
class Answered:
    key: str
    tokens: int
    summary: bool


@dataclass
class ScriptedModel:
    """The responder: tool calls for turns 1..turns-1, ``submit_result`` at ``turns``, summaries on request.

    Its turn is 1 + the highest ``[turn N]`` mark in the conversation it is sent (assistant messages,
    and its own earlier summary in the task message after a compaction), so it goes on where the
    conversation is, whatever was cleared, compacted or replayed.
    """

    turns: int
    answered: list[Answered] = field(default_factory=list)
    blocks: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    """Turn -> the content blocks answered for it (for the unmanaged conversation's size)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        done = max((int(n) for text in _texts(body) for n in TURN_MARK.findall(text)), default=0)
        summary = is_summary_request(body)
        if summary:
            reply = [text_block(
                f"[turn {done}] was the last turn before this summary. Done so far: read src/module_01.py "
                f"to src/module_{done:02d}.py in order, searched the handlers and read logs/service.log. "
                "Findings: handlers parse their second argument with json.loads without a fallback; totals "
                "add a constant offset that differs per handler; the log shows slow payload handling. "
                "Remaining: the modules after the last one read, then submit the list of defects. Open "
                "questions: whether the offsets are intentional.")]
        else:
            turn = done + 1
            reply = self.turn(turn)
            self.blocks[turn] = reply
        with self.lock:
            self.answered.append(Answered(conversation_key(body), prompt_tokens(body), summary))
        return scripted_responder(lambda _: reply)(body)

    def turn(self, turn: int) -> list[dict[str, Any]]:
        thought = (f"[turn {turn}] Continuing the review. The handlers seen so far share one pattern; "
                   "I check whether this part of the code follows it, note any handler that parses input "
                   "without a fallback or adds an unexplained offset, and keep a list for the final report.")
        if turn >= self.turns:
            result = dict(SUBMITTED, summary=f"reviewed {turn - 1} turns of files and logs")
            return [text_block(thought), tool_use_block("submit_result", result, id=f"toolu_bench_{turn:03d}")]
        if turn % 15 == 0:
            call = ("read_file", {"path": "logs/service.log"})
        elif turn % 10 == 5:
            call = ("search_files", {"pattern": r"def handle_(payload|ledger)_", "path": "src", "max_results": 120})
        else:
            call = ("read_file", {"path": f"src/module_{(turn - 1) % MODULES + 1:02d}.py"})
        return [text_block(thought), tool_use_block(*call, id=f"toolu_bench_{turn:03d}")]


# -- what the unmanaged conversation would have sent -------------------------------------------------


def unmanaged(model: ScriptedModel, bodies: list[dict[str, Any]], workspace: Path) -> tuple[int, int, int]:
    """(input tokens the unmanaged conversation would have sent over all turns, its last prompt, the full
    tool outputs' tokens): every turn's prompt carries the system prompt, the tools, the task and every
    earlier turn with its whole output (a cut output counted whole, from the file it was saved to)."""
    first = bodies[0]
    base = prompt_tokens({**first, "messages": first["messages"][:1]})
    results: dict[str, dict[str, Any]] = {}
    for body in bodies:
        for m in body["messages"]:
            for b in m["content"] if isinstance(m["content"], list) else []:
                if b.get("type") == "tool_result" and b["tool_use_id"] not in results:
                    results[b["tool_use_id"]] = {k: v for k, v in b.items() if k != "cache_control"}
    per_turn: list[int] = []
    outputs = 0
    for turn in sorted(model.blocks):
        blocks = model.blocks[turn]
        size = sum(_tokens(_canonical("message:assistant", b)) for b in blocks)
        result = results.get(f"toolu_bench_{turn:03d}")
        if result is not None:
            saved = SAVED_AT.search(result["content"])
            if saved is not None:
                tool = next(b["name"] for b in blocks if b["type"] == "tool_use")
                whole = (workspace / saved.group(1)).read_text(encoding="utf-8")
                result = {**result, "content": f'<tool_output tool="{tool}">\n{whole}\n</tool_output>'}
            tokens = _tokens(_canonical("message:user", result))
            outputs += tokens
            size += tokens
        per_turn.append(size)
    prompts = [base + sum(per_turn[:i]) for i in range(len(per_turn))]
    return sum(prompts), prompts[-1] if prompts else base, outputs


# -- run 1: the managed task, in this process ----------------------------------------------------------


@dataclass
class Managed:
    summary: PipelineSummary
    bodies: list[dict[str, Any]]
    outcomes: list[str]
    model: ScriptedModel
    workspace: Path
    wall: float


async def managed_run(args: argparse.Namespace, model_id: str) -> Managed:
    workspace = _TMP / "ws-managed"
    make_workspace(workspace)
    model = ScriptedModel(args.turns)
    with AnthropicServer(model, latency=args.latency, context_window=args.window) as server:
        os.environ["ANTHROPIC_BASE_URL"] = server.base_url
        t0 = time.perf_counter()
        try:
            state = await pipeline_flow(specs=[str(workspace / "specs")], return_state=True, **grouped({
                "workspace": str(workspace), "run_key": f"bench-long-{uuid.uuid4().hex[:8]}", "model": model_id,
                "context_window": args.window, "max_turns": args.max_turns, "retry_delay_seconds": 0,
            }))
            outcome = await state.aresult(raise_on_failure=False)
        finally:
            os.environ.pop("ANTHROPIC_BASE_URL", None)
        wall = time.perf_counter() - t0
        bodies = [r.body for r in server.requests if r.outcome == "ok"]
        outcomes = [r.outcome for r in server.requests]
    summary = getattr(outcome, "report", outcome)  # PipelineFailedError carries the summary
    if not isinstance(summary, PipelineSummary):
        raise RuntimeError(f"the pipeline produced no summary: {state.name}: {outcome!r}"[:2000])
    return Managed(summary, bodies, outcomes, model, workspace, wall)


# -- run 2: kill at turn 30, then resume ------------------------------------------------------------------


@dataclass
class Resumed:
    before: list[Answered]
    after: list[Answered]
    completed: bool
    replayed: int
    detail: str

    @property
    def resent(self) -> list[Answered]:
        seen = {a.key for a in self.before}
        return [a for a in self.after if a.key in seen]


def kill_and_resume(args: argparse.Namespace, model_id: str) -> Resumed:
    workspace = _TMP / "ws-kill"
    make_workspace(workspace)
    toka = str(Path(sys.executable).with_name("toka"))
    common = ["--context-window", str(args.window), "--max-turns", str(args.max_turns), "--retry-delay", "0",
              "--json", "out.json"]
    model = ScriptedModel(args.turns)
    with AnthropicServer(model, latency=args.latency, context_window=args.window) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({**_prefect_env(_TMP / "prefect-home-child"), "ANTHROPIC_BASE_URL": server.base_url,
                    "ANTHROPIC_API_KEY": FAKE_KEY, "NO_COLOR": "1"})
        log = _TMP / "killed-run.log"  # a file, not a pipe: a full pipe would stall the child
        with open(log, "w") as stderr:
            proc = subprocess.Popen([toka, "run", "specs", "--model", model_id, *common], cwd=workspace, env=env,
                                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + 600
        while len(model.answered) < args.kill_at:
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended before the kill: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("the run made no progress in 600 s")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.2)  # a request in flight at the kill is answered (to nobody) by now
        with model.lock:
            before = list(model.answered)
        resumed = subprocess.run([toka, "run", "--resume", *common], cwd=workspace, env=env,
                                 capture_output=True, text=True, timeout=1200)
        after = model.answered[len(before):]
    completed, replayed, detail = False, 0, resumed.stderr[-2000:]
    out = workspace / "out.json"
    if out.is_file():
        task = json.loads(out.read_text())["agents"][0]["tasks"][0]
        completed, replayed = task["state"] == "completed", int(task.get("replayed") or 0)
        detail = f"exit {resumed.returncode}, task {task['state']}"
        if task.get("error"):
            detail += f": {task['error']}"
    return Resumed(before, after, completed, replayed, detail)


# -- report --------------------------------------------------------------------------------------------------


async def recording_costs(steps: int = 60) -> tuple[float, float]:
    """Seconds per recorded step: a journal line appended (and fsynced) against a Prefect task run
    per model request (the alternative: each request and tool call its own task), side by side."""
    from prefect import flow, task

    from toka.journal import Entry, Journal

    journal = Journal(_TMP / "cost" / "journal.jsonl")
    data = {"content": [{"type": "text", "text": "x" * 2000}], "usage": {"input_tokens": 1000}}
    started = time.perf_counter()
    for i in range(steps):
        journal.append(Entry("response", f"{i:064x}", data))
    appended = (time.perf_counter() - started) / steps

    @task(persist_result=True)
    async def one_request(i: int) -> dict[str, Any]:
        return data

    @flow
    async def conversation(n: int) -> float:
        await one_request(-1)  # the first task run pays for registering the task
        t0 = time.perf_counter()
        for i in range(n):
            await one_request(i)
        return (time.perf_counter() - t0) / n

    return appended, await conversation(steps)


def _check(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=40_000, help="context window in tokens (default 40000)")
    parser.add_argument("--turns", type=int, default=60, help="turns of the task, the last submits (default 60)")
    parser.add_argument("--kill-at", type=int, default=30, help="answered requests before the kill (default 30)")
    parser.add_argument("--max-turns", type=int, default=150, help="toka's max_turns setting (default 150)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds before every reply (default 0.02)")
    parser.add_argument("--skip-kill", action="store_true", help="skip the kill-and-resume run")
    args = parser.parse_args(argv)
    if args.turns < 2 or not 1 <= args.kill_at < args.turns or args.window < 1000:
        parser.error("--turns at least 2, --kill-at in [1, turns), --window at least 1000")

    known = {s.name for s in settings()}
    missing = [name for name in NEEDED_SETTINGS if name not in known]
    if missing:
        print(f"long_task: toka.config has no setting {', '.join(missing)} yet: nothing to measure")
        return 2

    model_id = default_model()
    print(f"long_task: {args.turns} turns, {args.window:,}-token context window emulated by the loopback server; "
          f"model id {model_id}; latency {args.latency:g} s/reply")
    print(f"python {platform.python_version()}, prefect {prefect.__version__}, anthropic {anthropic.__version__}, "
          f"{os.cpu_count()} CPUs; tokens as the loopback server counts them (~4 characters a token)")
    print()

    run = asyncio.run(managed_run(args, model_id))
    task = run.summary.agents[0].tasks[0]
    u = run.summary.usage
    side = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
    sent = sum(prompt_tokens(b) for b in run.bodies)
    would, last_prompt, outputs = unmanaged(run.model, run.bodies, run.workspace)
    too_long = sum(o == "error:too-long" for o in run.outcomes)
    largest = max((prompt_tokens(b) for b in run.bodies), default=0)
    summaries = sum(a.summary for a in run.model.answered)
    outputs_dir = run.workspace / ".toka" / "outputs"
    saved = sum(1 for p in outputs_dir.rglob("*") if p.is_file()) if outputs_dir.is_dir() else 0
    completed = task.state == "completed"
    print(f"run 1 (in process, {run.wall:.1f} s): task {task.state}"
          + (f" ({task.error})" if task.error else "") + f" after {max(run.model.blocks, default=0)} turns")
    print(f"  requests: {len(run.outcomes)} sent, {len(run.bodies)} answered ({summaries} summary requests), "
          f"{too_long} refused as too long; the run counted {u.requests}")
    print(f"  tool output: {outputs:,} tokens in full = {outputs / args.window:.1f}x the window")
    print(f"  largest prompt: {largest:,} tokens of the {args.window:,} window ({largest / args.window:.0%}); "
          f"the unmanaged conversation's last prompt: {last_prompt:,} ({last_prompt / args.window:.1f}x)")
    print(f"  input-side tokens sent: {side:,} (server bodies: {sent:,}); unmanaged conversation: {would:,}; "
          f"ratio {side / max(1, would):.1%}")
    print(f"  served from the prompt cache: {u.cache_read_input_tokens / max(1, side):.0%} "
          f"(cache writes {u.cache_creation_input_tokens:,}, reads {u.cache_read_input_tokens:,}, "
          f"plain {u.input_tokens:,})")
    print(f"  compactions {task.compactions}, tokens cleared {task.tokens_cleared:,}, outputs saved whole {saved}")
    print()

    appended, as_task = asyncio.run(recording_costs())
    print(f"recording one step: a journal line {appended * 1000:.2f} ms, a Prefect task run per model request "
          f"{as_task * 1000:.1f} ms ({as_task / max(appended, 1e-9):.0f}x), on the critical path of every turn")
    print()

    resumed = None
    if not args.skip_kill:
        print(f"run 2: toka run in a child process, SIGKILL after {args.kill_at} answered requests, then "
              "toka run --resume (each child starts its own embedded Prefect server)", flush=True)
        resumed = kill_and_resume(args, model_id)
        resent = resumed.resent
        restart_tokens = sum(a.tokens for a in resumed.before)
        print(f"  answered before the kill: {len(resumed.before)}; after the resume: {len(resumed.after)}; "
              f"task {'completed' if resumed.completed else 'NOT completed'} ({resumed.detail}); "
              f"{resumed.replayed} steps replayed from the journal")
        print(f"  re-sent after the resume: {len(resent)} request(s), {sum(a.tokens for a in resent):,} tokens; "
              f"a restart of the task: {len(resumed.before)} requests, {restart_tokens:,} tokens")
        print()

    print("targets:")
    print(f"  completes with no over-long request: {_check(completed and too_long == 0)} "
          f"({task.state}, {too_long} refused)")
    if resumed is not None:
        print(f"  resume re-sends at most 1 request: {_check(resumed.completed and len(resumed.resent) <= 1)} "
              f"({len(resumed.resent)})")
    print(f"  input tokens at most 40% of the unmanaged conversation's: {_check(side <= 0.4 * would)} "
          f"({side / max(1, would):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
