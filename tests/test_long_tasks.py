"""Long tasks survive their process: a 60-turn conversation killed at turn 30 continues from its
journal (``toka run --resume``, ``prefect flow-run retry``), paying again for at most the request in
flight; a spec edited in between replays nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from toka.branches import AgentCheckout
from toka.claude import default_model
from toka.journal import Journal, Replay, journal_path, request_fingerprint
from toka.model import Message, ModelRequest, ModelResponse, TextBlock, Usage

from .anthropic_server import AnthropicServer, conversation_key, scripted_responder, tool_use_block
from .conftest import ROOT, minimal_spec, run_pipeline
from .test_cli_run import TOKA

KEY = "sk-ant-test-long-0123456789abcdef"
MODEL = default_model()
TURNS = 60


class LongTask:
    """A scripted model that works ``turns`` turns (a read_file each), then submits.

    Its turn is counted from the conversation it is sent (assistant messages so far), so a resumed
    conversation goes on where it was. ``answered`` holds the messages of every request it answered,
    in order; ``fail_at`` answers that turn with an error once (a 400 the step loop does not retry).
    """

    def __init__(self, turns: int = TURNS, fail_at: int | None = None) -> None:
        self.turns = turns
        self.fail_at = fail_at
        self.answered: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant") + 1
        if turn == self.fail_at:
            self.fail_at = None
            raise_bad_request()
        with self.lock:
            self.answered.append(conversation_key(body))
        if turn < self.turns:
            return scripted_responder(lambda _: [tool_use_block("read_file", {"path": f"notes/{turn % 7}.md"})])(body)
        return scripted_responder(lambda _: [tool_use_block(
            "submit_result", {"status": "completed", "summary": f"read {turn - 1} notes"})])(body)


def raise_bad_request() -> None:
    raise BadRequest()


class BadRequest(Exception):
    """The responder's way of making the server answer 500 (the step loop sees a failed request)."""


def _workspace(tmp_path: Path, *, objective: str = "Read the notes.") -> Path:
    spec = minimal_spec("reader", tasks=1)
    spec["tasks"]["default"][0]["priority"] = "high"  # its failure fails the run
    spec["spec"]["description"] = objective
    spec["security"]["capabilities_required"] = ["filesystem-read"]
    folder = tmp_path / "ws"
    (folder / "specs").mkdir(parents=True, exist_ok=True)
    import yaml

    (folder / "specs" / "reader.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "notes").mkdir(exist_ok=True)
    for i in range(7):
        (folder / "notes" / f"{i}.md").write_text(f"# note {i}\n" + "a line of notes\n" * 20)
    return folder


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the test harness sets PREFECT_API_URL"
    return str(url)


def _env(server: AnthropicServer, **extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": _api_url(), "ANTHROPIC_API_KEY": KEY,
            "ANTHROPIC_BASE_URL": server.base_url, "NO_COLOR": "1", "COLUMNS": "200", **extra}


def _resent(before: list[str], after: list[str]) -> int:
    seen = set(before)
    return sum(1 for key in after if key in seen)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_kill_at_turn_30_then_resume_pays_for_at_most_one_request_again(tmp_path: Path) -> None:
    folder = _workspace(tmp_path)
    model = LongTask()
    args = [TOKA, "run", "specs", "--model", MODEL, "--retry-delay", "0", "--json", "out.json"]
    with AnthropicServer(model, latency=0.02) as server:
        proc = subprocess.Popen(args, cwd=folder, env=_env(server), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 240
        while len(model.answered) < 30:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = list(model.answered)
        assert len(before) < TURNS

        resumed = subprocess.run([TOKA, "run", "--resume", "--retry-delay", "0", "--json", "out.json"],
                                 cwd=folder, env=_env(server), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        after = model.answered[len(before):]

    assert _resent(before, after) <= 1, "requests answered before the kill were sent again"
    # The conversation went on: the first request after the resume carries the earlier turns.
    first = json.loads(after[0])
    assert sum(1 for m in first if m["role"] == "assistant") >= len(before) - 1
    assert len(before) + len(after) <= TURNS + 1
    task = json.loads((folder / "out.json").read_text())["agents"][0]["tasks"][0]
    assert task["state"] == "completed" and task["result"]["summary"] == f"read {TURNS - 1} notes"
    assert task["replayed"] >= 2 * (len(before) - 1)  # responses and tool results
    # Every note was read once, before or after the kill: the replayed reads count too, as audited.
    assert task["tool_calls"] == TURNS - 1
    assert task["carried_usage"]["requests"] >= len(before) - 1  # paid before the kill: spent, not charged
    assert task["usage"]["requests"] <= len(after)


async def _retry(flow_run_id: str) -> Any:
    """What ``prefect flow-run retry ID --entrypoint flows/pipeline.py:pipeline`` does: the same flow
    run, scheduled again and run from the entrypoint with its parameters. (Prefect 3.8's command
    never awaits an async flow, so it cannot be used here; deployment runs are retried by a worker,
    see tests/test_deployments.py.)"""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow_async
    from prefect.flows import load_flow_from_entrypoint
    from prefect.states import Scheduled

    flow = load_flow_from_entrypoint(str(ROOT / "flows" / "pipeline.py") + ":pipeline")
    async with get_client() as client:
        await client.set_flow_run_state(flow_run_id, Scheduled(message="Retried"), force=True)
        flow_run = await client.read_flow_run(flow_run_id)
    return await run_flow_async(flow, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_failed_run_retried_from_prefect_continues_the_task(tmp_path: Path) -> None:
    folder = _workspace(tmp_path)
    model = LongTask(fail_at=30)
    with AnthropicServer(model) as server:
        os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"] = KEY, server.base_url
        try:
            state, summary = asyncio.run(run_pipeline(folder, run_key=None, specs=[str(folder / "specs")],
                                                      model=MODEL, max_attempts=1))
        finally:
            del os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"]
        assert state.is_failed() and summary.agents[0].tasks[0].state == "failed"
        before = list(model.answered)
        assert len(before) == 29
        flow_run_id = str(state.state_details.flow_run_id)

        os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"] = KEY, server.base_url
        try:
            retried = asyncio.run(_retry(flow_run_id))
        finally:
            del os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"]
        assert retried.is_completed(), retried
        after = model.answered[len(before):]

    assert _resent(before, after) == 0  # the failed request was never answered: nothing is paid twice
    assert len(after) == TURNS - len(before)
    first = json.loads(after[0])
    assert sum(1 for m in first if m["role"] == "assistant") == len(before)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_spec_edited_between_runs_replays_nothing_after_the_first_difference(tmp_path: Path) -> None:
    folder = _workspace(tmp_path)
    model = LongTask(turns=12, fail_at=8)
    with AnthropicServer(model) as server:
        os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"] = KEY, server.base_url
        try:
            options = dict(specs=[str(folder / "specs")], model=MODEL, max_attempts=1)
            state, _ = asyncio.run(run_pipeline(folder, run_key="edited", **options))
            assert state.is_failed()
            before = list(model.answered)
            _workspace(tmp_path, objective="Read the notes, then count them.")  # the system prompt changes
            state, summary = asyncio.run(run_pipeline(folder, run_key="edited", **options))
        finally:
            del os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"]
    assert state.is_completed()
    after = model.answered[len(before):]
    assert len(after) == 12  # every turn asked again: no recorded answer to a different question
    task = summary.agents[0].tasks[0]
    assert task.replayed == 0 and task.carried_usage == Usage()


def test_replay_stops_at_the_first_mismatch_and_drops_the_rest(tmp_path: Path) -> None:
    journal = Journal(journal_path(tmp_path, "run-1", "agent", 1))
    requests = [ModelRequest(system="s", messages=[Message(role="user", content=[TextBlock(text=f"q{i}")])])
                for i in range(3)]
    recording = Replay(journal)
    for i, request in enumerate(requests):
        asyncio.run(recording.record_response(request_fingerprint(request, {"m": 1}),
                                              ModelResponse(content=[TextBlock(text=f"a{i}")], usage=Usage(requests=1))))
    mismatches: list[int] = []
    replay = Replay(Journal(journal.path), on_mismatch=lambda index, kind: mismatches.append(index))
    first = replay.response(request_fingerprint(requests[0], {"m": 1}))
    assert first is not None and first[0].content == [TextBlock(text="a0")]
    changed = requests[1].model_copy(update={"system": "s2"})
    assert replay.response(request_fingerprint(changed, {"m": 1})) is None and mismatches == [1]
    assert replay.live and len(Journal(journal.path).load()) == 1  # the rest is gone for good
    # A different model setting is a different question too.
    again = Replay(Journal(journal.path))
    assert again.response(request_fingerprint(requests[0], {"m": 2})) is None


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.jsonl")
    request = ModelRequest(system="s", messages=[Message(role="user", content=[TextBlock(text="q")])])
    asyncio.run(Replay(journal).record_response(request_fingerprint(request, {}),
                                                ModelResponse(content=[TextBlock(text="a")])))
    with open(journal.path, "a") as f:
        f.write('{"kind": "response", "finger')  # the process died writing
    assert len(journal.load()) == 1


def test_turn_limits_and_timeouts_for_real_work() -> None:
    from toka.compiler import step_task
    from toka.config import RunConfig
    from toka.llm_step import StepInput
    from toka.spec import AgentSpec

    data = minimal_spec("worker", tasks=3)  # the agent's timeout: 10m
    data["tasks"]["default"][0].update({"estimated_duration": "2m", "max_turns": 7})
    data["tasks"]["default"][1]["estimated_duration"] = "2h"
    spec = AgentSpec.from_dict(data)
    tasks = spec.task_list()
    run = RunConfig.from_flat({"run_key": "k"})
    timeouts = [step_task(spec, i, 3, t, run).timeout_seconds for i, t in enumerate(tasks, 1)]
    assert timeouts == [120, 600, 600]  # the estimate, never past the agent's timeout; else the agent's
    assert step_task(spec, 1, 3, tasks[0], RunConfig.from_flat({"run_key": "k", "task_timeout": 30})).timeout_seconds == 30

    def turns(index: int) -> int:
        return StepInput(spec=spec, spec_digest=spec.digest(), index=index, run=run).max_turns

    assert (turns(1), turns(2)) == (7, 100)  # the task's own limit, else the run's default
    fewer = RunConfig.from_flat({"run_key": "k", "max_turns": 5})

    def key(index: int, config: RunConfig) -> str:
        return StepInput(spec=spec, spec_digest="d", index=index, run=config).cache_key()

    assert key(2, run) != key(2, fewer)  # a different limit may give a different answer
    assert key(1, run) == key(1, fewer)  # task 1 keeps its own limit

    # On a branch: the files its dependencies left are part of what its work was made on.
    def on(tree: str) -> RunConfig:
        checkout = AgentCheckout(agent="worker", worktree="w", root="w", branch="b", start="s", start_tree=tree)
        return run.model_copy(update={"checkout": checkout})

    assert key(1, on("")) == key(1, run)  # from the run's base: as without a branch
    assert key(1, on("t1")) != key(1, on("t2")) and key(1, on("t1")) == key(1, on("t1"))
