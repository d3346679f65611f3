"""toka.background: report artifacts written while the run goes on, all of them before it ends."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import warnings

from toka.background import in_background, start_deferred, writes_finished


async def _write(log: list[str], name: str, delay: float = 0.05, fail: bool = False) -> None:
    await asyncio.sleep(delay)
    if fail:
        raise ConnectionError("the API went away")
    log.append(name)


def test_a_write_goes_on_in_the_background_and_is_done_when_the_block_ends() -> None:
    log: list[str] = []

    async def run() -> None:
        async with writes_finished():
            await in_background(_write(log, "report"), "the report")
            log.append("dependent started")  # before the write finished: it did not hold this up

    asyncio.run(run())
    assert log == ["dependent started", "report"]


def test_without_the_block_a_write_is_awaited_where_it_is_made() -> None:
    log: list[str] = []

    async def run() -> None:
        await in_background(_write(log, "report"), "the report")
        log.append("next")

    asyncio.run(run())
    assert log == ["report", "next"]


def test_a_failed_write_is_a_warning_and_the_others_are_still_waited_for() -> None:
    log: list[str] = []

    async def run() -> None:
        async with writes_finished():
            await in_background(_write(log, "x", delay=0.01, fail=True), "the report artifacts of survey")
            await in_background(_write(log, "results", delay=0.1), "the results")

    # Its own handler, not caplog's: Prefect's logging set-up (on the first run logger asked
    # for, here by the warning itself) replaces the root logger's handlers.
    warnings = _Records()
    logger = logging.getLogger("toka.background")
    logger.addHandler(warnings)
    try:
        asyncio.run(run())  # no error: the run's outcome stands
    finally:
        logger.removeHandler(warnings)
    assert log == ["results"]
    assert warnings.lines == ["the report artifacts of survey could not be written: ConnectionError: the API went away"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_write_from_another_event_loop_is_awaited_there() -> None:
    # A flow Prefect ran on a loop of its own (its context copied, the block's included) must
    # not leave a task that the block's loop cannot await.
    log: list[str] = []

    def elsewhere(context: contextvars.Context) -> None:
        context.run(asyncio.run, in_background(_write(log, "from the thread"), "the report"))
        log.append("thread done")

    async def run() -> None:
        async with writes_finished():
            thread = threading.Thread(target=elsewhere, args=(contextvars.copy_context(),))
            thread.start()
            await asyncio.to_thread(thread.join)

    asyncio.run(run())
    assert log == ["from the thread", "thread done"]


def test_blocks_nest_and_each_waits_for_its_own_writes() -> None:
    log: list[str] = []

    async def run() -> None:
        async with writes_finished():
            await in_background(_write(log, "outer", delay=0.2), "outer")
            async with writes_finished():
                await in_background(_write(log, "inner", delay=0.05), "inner")
            log.append("inner block ended")

    asyncio.run(run())
    assert log == ["inner", "inner block ended", "outer"]


_who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


async def _write_as(log: list[str], name: str) -> None:
    await asyncio.sleep(0.01)
    log.append(f"{name} (for {_who.get()})")  # Prefect attaches an artifact to the run in context


def test_a_deferred_write_starts_when_released_in_the_context_it_was_made_in() -> None:
    log: list[str] = []

    async def agent(name: str) -> None:
        _who.set(name)
        await in_background(_write_as(log, f"{name}'s report"), f"{name}'s report", deferred=True)

    async def run() -> None:
        async with writes_finished():
            await asyncio.create_task(agent("survey"))
            await asyncio.sleep(0.05)
            log.append("dependent started")  # the write waited for this
            _who.set("audit")  # released from the dependent's context: still written as survey's
            start_deferred()
            await asyncio.sleep(0.05)
            log.append("released")

    asyncio.run(run())
    assert log == ["dependent started", "survey's report (for survey)", "released"]


def test_deferred_writes_never_released_are_made_when_the_block_ends() -> None:
    log: list[str] = []

    async def run() -> None:
        async with writes_finished():
            _who.set("survey")
            await in_background(_write_as(log, "report"), "the report", deferred=True)
            log.append("last agent done")
        log.append("block ended")

    asyncio.run(run())
    assert log == ["last agent done", "report (for survey)", "block ended"]


def test_a_deferred_write_without_the_block_is_awaited_where_it_is_made() -> None:
    log: list[str] = []

    async def run() -> None:
        await in_background(_write(log, "report"), "the report", deferred=True)
        log.append("next")

    asyncio.run(run())
    assert log == ["report", "next"]


def test_a_deferred_write_goes_out_after_a_while_when_nothing_releases_it(monkeypatch) -> None:
    # The next agent waits for an approval before it begins: the finished one's report must
    # not wait out the approval with it.
    from toka import background

    monkeypatch.setattr(background, "DEFER_AT_MOST", 0.1)
    log: list[str] = []

    async def run() -> None:
        async with writes_finished():
            await in_background(_write(log, "report", delay=0), "the report", deferred=True)
            await asyncio.sleep(0.3)
            log.append("approval answered")

    asyncio.run(run())
    assert log == ["report", "approval answered"]


def test_a_block_that_does_not_hold_deferred_writes_starts_them_at_once() -> None:
    # A distributed agent run: nothing else starts after its agent, so nothing would release them.
    log: list[str] = []

    async def run() -> None:
        async with writes_finished(hold_deferred=False):
            await in_background(_write(log, "report", delay=0), "the report", deferred=True)
            await asyncio.sleep(0.05)
            log.append("flow state written")

    asyncio.run(run())
    assert log == ["report", "flow state written"]


def test_deferred_writes_of_a_block_cut_short_are_said_not_written() -> None:
    log: list[str] = []

    async def run() -> None:
        async with writes_finished():
            await in_background(_write(log, "slow", delay=10), "the slow write")
            await in_background(_write(log, "report"), "the report", deferred=True)
            asyncio.current_task().cancel()  # Ctrl-C while the block waits for its writes

    said = _Records()
    logger = logging.getLogger("toka.background")
    logger.addHandler(said)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "coroutine was never awaited"
            try:
                asyncio.run(run())
            except asyncio.CancelledError:
                pass
    finally:
        logger.removeHandler(said)
    assert log == []
    assert "the report could not be written: CancelledError: the run was stopped first" in said.lines


class _Overlap:
    """Writes that record when each starts and ends, and how many were under way at once."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.now = 0
        self.most = 0

    async def write(self, name: str, delay: float = 0.05) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        self.log.append(f"{name} started")
        await asyncio.sleep(delay)
        self.log.append(f"{name} done")
        self.now -= 1


def test_released_writes_go_out_one_after_another_in_the_order_they_were_made() -> None:
    # Released together, they would all reach the server just as the next agent makes its first
    # writes, which would wait behind every one of them.
    writes = _Overlap()

    async def run() -> None:
        async with writes_finished():
            for name in ("report", "results", "progress"):
                await in_background(writes.write(name), f"the {name}", deferred=True)
            start_deferred()
            await asyncio.sleep(0.5)  # the next agent at work: room for all three, one by one
            writes.log.append("next agent done")

    asyncio.run(run())
    assert writes.log == ["report started", "report done", "results started", "results done",
                          "progress started", "progress done", "next agent done"]
    assert writes.most == 1


def test_writes_still_queued_when_the_block_ends_all_start_then() -> None:
    # The run ends: nothing is left to keep clear of, and it waits for all of them.
    writes = _Overlap()

    async def run() -> None:
        async with writes_finished():
            for name in ("report", "results", "progress"):
                await in_background(writes.write(name, delay=0.2), f"the {name}", deferred=True)
            start_deferred()
            await asyncio.sleep(0)  # the first one under way, two queued
        writes.log.append("block ended")

    asyncio.run(run())
    assert writes.most == 3
    assert writes.log[-1] == "block ended" and writes.log.count("results done") == 1
