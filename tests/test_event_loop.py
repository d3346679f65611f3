"""A slow tool in one agent does not hold up another: blocking work stays off the event loop.

Two agents share one event loop (the pipeline runs agents as concurrent async tasks), so
a tool that reads, walks or searches files on the loop stops every other agent's model
requests and tool calls until it is done.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from toka.audit import AuditLog
from toka.capabilities import grant_tools
from toka.tools import ToolContext, Toolbox
from toka.workspace import Workspace

# 960 kB of 3-byte lines (the search reads files up to 1 MB): one file takes the search
# about 2 s here, and on the loop it would block for all of that at once.
BIG_FILE = "ab\n" * 320_000


def agent(root: Path, name: str) -> Toolbox:
    """The toolbox of an agent granted the file-reading tools, with its audit trail."""
    root.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(root)
    tools, withheld = grant_tools(["filesystem-read"])
    audit = AuditLog(workspace.state_dir / "audit" / "loop.jsonl", run="loop")
    return Toolbox(tools, ToolContext(workspace=workspace, agent=name, task=1, audit=audit), withheld=withheld)


def test_a_slow_search_does_not_delay_another_agents_tool_calls(tmp_path: Path) -> None:
    searcher = agent(tmp_path / "big", "searcher")
    (tmp_path / "big" / "haystack.txt").write_text(BIG_FILE)
    other = agent(tmp_path / "small", "other")
    (tmp_path / "small" / "notes.txt").write_text("one line\n")

    async def go() -> tuple[float, list[float]]:
        done = asyncio.Event()

        async def search() -> float:
            started = time.monotonic()
            out = await searcher.call("search_files", {"pattern": "needle"})
            assert out.text.startswith("0 matches for 'needle' in 1 files"), out.text
            done.set()
            return time.monotonic() - started

        async def keep_reading(since: float) -> list[float]:
            finished = [since]
            while not done.is_set():
                out = await other.call("read_file", {"path": "notes.txt"})
                assert not out.is_error, out.text
                finished.append(time.monotonic())
                await asyncio.sleep(0.005)
            return finished

        took, finished = await asyncio.gather(search(), keep_reading(time.monotonic()))
        return took, [b - a for a, b in zip(finished, finished[1:])]

    took, gaps = asyncio.run(go())
    assert took >= 0.5, f"the search took {took:.2f} s: too fast to show anything"
    # On the loop, the other agent would wait for the whole search (one file) at once.
    assert max(gaps) < took / 3, f"another agent's call waited {max(gaps):.2f} s during a {took:.2f} s search"
    assert len(gaps) > 10


def test_a_cancelled_search_stops_reading(tmp_path: Path) -> None:
    searcher = agent(tmp_path / "big", "searcher")
    for i in range(8):  # about 0.5 s each
        (tmp_path / "big" / f"haystack{i}.txt").write_text(BIG_FILE[: len(BIG_FILE) // 4])

    async def go() -> float:
        try:
            await asyncio.wait_for(searcher.call("search_files", {"pattern": "needle"}), 0.2)
        except TimeoutError:
            pass
        else:
            raise AssertionError("the search finished before it could be cancelled")
        stopped = time.monotonic()
        await asyncio.get_running_loop().shutdown_default_executor()  # waits for the worker thread
        return time.monotonic() - stopped

    # The thread stops at the next file instead of reading the other seven.
    assert asyncio.run(go()) < 1.5


def test_a_slow_journal_fsync_holds_up_nothing_and_the_line_is_in_the_file_at_once(tmp_path: Path) -> None:
    # A journal line is in the file when its task goes on (a killed process loses nothing);
    # its fsync, 0.4 s on the busy disk stood in for here, holds up neither the task nor the loop.
    import threading

    from toka import journal as journals
    from toka.model import ModelResponse, TextBlock

    synced = threading.Event()

    class SlowDisk(journals.Journal):
        """A journal whose fsyncs take 0.4 s (a busy disk's), in whatever thread makes them."""

        @staticmethod
        def _sync(path: Path) -> None:
            time.sleep(0.4)
            journals.Journal._sync(path)
            synced.set()

    replay = journals.Replay(SlowDisk(tmp_path / "task.jsonl"))

    async def go() -> tuple[float, int, int]:
        ticks = 0

        async def other_agent() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        other = asyncio.create_task(other_agent())
        await asyncio.sleep(0)
        began = time.monotonic()
        await replay.record_response("fp", ModelResponse(content=[TextBlock(text="a")]))
        took = time.monotonic() - began
        in_file = len(journals.Journal(tmp_path / "task.jsonl").load())  # before its fsync
        await asyncio.sleep(0.5)
        other.cancel()
        return took, in_file, ticks

    took, in_file, ticks = asyncio.run(go())
    assert in_file == 1, "the line was not in the file when the task went on"
    assert took < 0.2, f"recording waited {took:.2f} s for the fsync"
    assert ticks >= 20, f"the other agent ran {ticks} times in 0.5 s: the fsync held up the event loop"
    assert synced.wait(5), "the line was never fsynced"


def test_a_stalled_disk_holds_up_no_journal_line_and_each_journal_queues_one_fsync_at_a_time(tmp_path: Path) -> None:
    # 80 agents' journals on a disk whose fsyncs hang until released: every line still goes
    # into its file at once (the fsyncs do not take the threads the lines are written in), and
    # a journal written to many times while its fsync waits queues no more than one more.
    import threading

    from toka import journal as journals
    from toka.model import ModelResponse, TextBlock

    disk = threading.Event()
    syncs: list[Path] = []

    class StalledDisk(journals.Journal):
        @staticmethod
        def _sync(path: Path) -> None:
            disk.wait(30)
            syncs.append(path)
            journals.Journal._sync(path)

    replays = [journals.Replay(StalledDisk(tmp_path / f"task{i}.jsonl")) for i in range(80)]

    async def go() -> None:
        for turn in range(5):
            await asyncio.wait_for(asyncio.gather(*(
                r.record_response(f"fp{turn}", ModelResponse(content=[TextBlock(text=str(turn))]))
                for r in replays)), 10)

    asyncio.run(go())  # before the fix: the 65th line waited for a thread that a hung fsync held
    assert all(len(journals.Journal(tmp_path / f"task{i}.jsonl").load()) == 5 for i in range(80))
    disk.set()
    deadline = time.monotonic() + 10
    while len(set(syncs)) < 80 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(set(syncs)) == 80, "some journal was never fsynced"
    time.sleep(0.2)
    assert len(syncs) <= 160, f"{len(syncs)} fsyncs for 80 journals of 5 lines each: not one queued at a time"


def test_work_run_to_the_end_finishes_before_a_cancellation_passes_and_off_the_loop() -> None:
    """A journal line for a response already paid for must be on disk when a Prefect timeout or
    Ctrl-C cancels the task that wrote it; meanwhile the loop runs the other agents."""
    import threading

    from toka.background import to_the_end

    started, written, ticks = threading.Event(), [], []

    def slow_write() -> None:
        started.set()
        time.sleep(0.3)
        written.append("line")

    async def main() -> None:
        async def ticker() -> None:
            while not written:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        other = asyncio.create_task(ticker())
        writer = asyncio.create_task(to_the_end(slow_write))
        while not started.is_set():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        writer.cancel()
        try:
            await writer
        except asyncio.CancelledError:
            assert written == ["line"], "the cancellation passed before the work was done"
        else:
            raise AssertionError("the cancellation was swallowed")
        other.cancel()

    asyncio.run(main())
    assert len(ticks) >= 3  # the loop went on while the work ran

    async def failing() -> None:
        await to_the_end(lambda: 1 / 0)

    try:
        asyncio.run(failing())
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("the work's error was lost")
