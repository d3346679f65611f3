"""Work beside the event loop: blocking work run to its end in a thread, and API writes that
need not hold up the run (an agent's report artifacts).

An agent's dependents start when its flow returns. Its report and results artifacts and the
last update of its progress (round trips to the one server that every run of the machine
writes to) are only for the UI, so they go out in the background while the dependents start,
and the flow that ran the agents (the pipeline, or a distributed agent run) waits for all of
them before it ends. `bench/overhead.py`, nine specs on the embedded SQLite server, three
rounds each way one after the other: 1.41x the hand-written pipeline before (an agent's exit
379 ms on the critical chain), 1.38x after (253 ms), no API request retried in either; ten
rounds after: median 1.31x, worst 1.40x (1.33x and 1.42x before, another day).

They wait a little longer: until the next agent the pipeline starts has begun
(:func:`start_deferred`), or until a scheduling pass starts none, and never more than
:data:`DEFER_AT_MOST` seconds (an agent that waits for an approval before it begins must not
keep the report a person wants to read first out of the UI). On the one SQLite writer they
went ahead of the agent's own Completed state and its dependents' new flow runs, the
critical path's next writes. Ten rounds each way, alternating in one process (nine specs,
embedded SQLite): the agents' exits took 0.98 s of the critical chain before, 0.54 s after;
the run 1.201x the hand-written pipeline before, 1.163x after.

Once released they go out one after another, not all at once: then the next agent's first
writes wait behind one of them at most, not behind three or six. Eight rounds each way,
alternating in one process (nine specs): 109 ms less per run at the median on a
PostgreSQL-backed server (1.114x the hand-written pipeline before, 1.099x after), 129 ms on
the embedded SQLite one (1.098x, 1.092x). At the block's end, what is still queued starts
at once: the run waits for all of it.

Outside :func:`writes_finished` (an agent flow called on its own), once that block has
ended, or from another event loop than the one that opened it, a write is awaited where it
is made, as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["in_background", "soon", "start_deferred", "to_the_end", "writes_finished"]

_logger = logging.getLogger("toka.background")


_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()

DEFER_AT_MOST = 2.0
"""Seconds a deferred write waits at most for :func:`start_deferred`."""


def _pool(name: str = "toka-to-the-end", threads: int = 64) -> concurrent.futures.ThreadPoolExecutor:
    # Made at first use and kept. Threads are made only when every one is busy: by default room
    # for each of many concurrent agents' sandbox clean-ups and journal removals, so that none
    # waits behind another's.
    with _pool_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        return pool


def soon(work: Callable[[], None], what: str, *, logger: Any = None) -> None:
    """Run blocking ``work`` in a thread, not waited for; a failure is logged to ``logger``.

    For what need not hold anything up: the fsync of a journal line already in the file (a
    killed process loses nothing the OS holds), which took 4 ms on a disk the server's
    database was syncing to, on the critical path of every model request. A few threads of
    their own: work a slow disk holds up must not take the threads :func:`to_the_end` needs.
    """

    def run() -> None:
        try:
            work()
        except Exception as e:
            (logger or _logger).warning("%s failed: %s: %s", what, type(e).__name__, e)

    _pool("toka-soon", 4).submit(run)


async def to_the_end(work: Callable[[], None]) -> None:
    """Run blocking ``work`` in a thread and wait for it, also when the waiting task is cancelled.

    ``asyncio.to_thread`` is no good here: cancelling it before a worker picks the call up
    drops the call, and Prefect's timeouts cancel again at every await. Here the call is
    queued before the first await, and a cancelled caller waits for it (briefly blocking
    the loop) so that the work is complete when the cancellation propagates. The threads
    are a pool of their own, kept between calls: a thread started for each call (journal
    lines were written here then) held the event loop in ``Thread.start`` for about a
    millisecond a model request on a busy machine.
    """
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def settle(done: concurrent.futures.Future[None]) -> None:
        if not finished.done():  # not cancelled meanwhile
            error = done.exception()
            finished.set_exception(error) if error else finished.set_result(None)

    def relay(done: concurrent.futures.Future[None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the caller waited
            loop.call_soon_threadsafe(settle, done)

    done = _pool().submit(work)
    done.add_done_callback(relay)
    try:
        await finished
    except asyncio.CancelledError:
        concurrent.futures.wait([done])
        raise


class _Writes:
    def __init__(self, *, hold: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.pending: list[asyncio.Future[Any]] = []
        self.deferred: list[tuple[Coroutine[Any, Any, Any], str, contextvars.Context]] = []
        self.hold = hold  # deferred writes wait for start_deferred (the pipeline's scheduler releases them)
        self.release: asyncio.TimerHandle | None = None  # DEFER_AT_MOST after the first one held
        self.closed = False  # agents still running when the block ended (it failed) write inline
        # Released deferred writes, started one at a time by ``lane_runner``.
        self.lane: deque[tuple[Coroutine[Any, Any, Any], str, contextvars.Context]] = deque()
        self.lane_runner: asyncio.Task[None] | None = None


_open: ContextVar[_Writes | None] = ContextVar("toka_background_writes", default=None)


async def in_background(write: Coroutine[Any, Any, Any], what: str, *, deferred: bool = False) -> None:
    """Start ``write`` and return; the innermost open :func:`writes_finished` waits for it.

    Args:
        write: The API call (a coroutine).
        what: What it writes, for the warning logged if it fails.
        deferred: Start it only at the next :func:`start_deferred`, the block's end, or
            :data:`DEFER_AT_MOST` seconds later, whichever comes first: for what only the UI
            shows, held back from the critical path's next writes.
    """
    writes = _open.get()
    if writes is None or writes.closed or writes.loop is not asyncio.get_running_loop():
        await write
        return
    if deferred and writes.hold:
        # Started later from another task: it must still run in this one's context (the run it
        # belongs to: where Prefect attaches an artifact, whose log a failure goes to).
        writes.deferred.append((write, what, contextvars.copy_context()))
        if writes.release is None:
            writes.release = writes.loop.call_later(DEFER_AT_MOST, start_deferred_of, writes)
        return
    _start(writes, write, what, contextvars.copy_context())


def _start(writes: _Writes, write: Coroutine[Any, Any, Any], what: str,
           context: contextvars.Context) -> asyncio.Future[Any]:
    future = writes.loop.create_task(write, context=context)
    future.add_done_callback(lambda done: _warn_if_failed(done, what), context=context)
    writes.pending.append(future)
    return future


def start_deferred() -> None:
    """Start the deferred writes of the innermost open :func:`writes_finished` (none open: nothing)."""
    writes = _open.get()
    if writes is not None and not writes.closed:
        start_deferred_of(writes)


def start_deferred_of(writes: _Writes) -> None:
    """Queue the held writes on the block's lane, where they start one after another."""
    writes.lane.extend(_take_deferred(writes))  # those queued already first, in their order
    if writes.lane and (writes.lane_runner is None or writes.lane_runner.done()):
        writes.lane_runner = writes.loop.create_task(_run_lane(writes))
        writes.pending.append(writes.lane_runner)


async def _run_lane(writes: _Writes) -> None:
    # One at a time: released together (an agent's report, results and progress, maybe another
    # agent's too), they reached the server at once, just as the next agent made its first
    # writes, and its task and state changes waited behind all of them.
    while writes.lane:
        write, what, context = writes.lane.popleft()
        await asyncio.wait([_start(writes, write, what, context)])


def _start_all(writes: _Writes) -> None:
    """Start every write still held or queued at once: the block is ending, and waits for them all."""
    for write, what, context in _take_deferred(writes):
        _start(writes, write, what, context)


def _take_deferred(writes: _Writes) -> list[tuple[Coroutine[Any, Any, Any], str, contextvars.Context]]:
    """The writes not started yet, queued on the lane then held, now neither (the time limit of
    those held cancelled)."""
    if writes.release is not None:
        writes.release.cancel()
        writes.release = None
    waiting = [*writes.lane, *writes.deferred]
    writes.lane.clear()
    writes.deferred = []
    return waiting


def _warn_if_failed(done: asyncio.Future[Any], what: str) -> None:
    if done.cancelled():
        error: BaseException = asyncio.CancelledError("the run was stopped first")
    elif done.exception() is None:
        return
    else:
        error = done.exception()  # type: ignore[assignment]
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:  # the run that made the write (the callback runs in its context): its log, in the UI too
        logger: Any = get_run_logger()
    except MissingContextError:
        logger = _logger
    logger.warning("%s could not be written: %s: %s", what, type(error).__name__, error)


@asynccontextmanager
async def writes_finished(*, hold_deferred: bool = True) -> AsyncIterator[None]:
    """Inside, :func:`in_background` writes run in the background; on the way out, all of them
    are waited for. A write that failed was logged as a warning and the run's outcome stands;
    one that ended with a BaseException that is not an Exception (Prefect's TerminationSignal
    for SIGTERM) raises it here.

    ``hold_deferred=False`` starts deferred writes at once, as others: for a block that starts
    no agent after the one inside (a distributed agent run), where nothing would release them
    before its end.
    """
    writes = _Writes(hold=hold_deferred)
    token = _open.set(writes)
    try:
        yield
    finally:
        _open.reset(token)
        try:
            while writes.pending or writes.deferred or writes.lane:  # a write may start another
                _start_all(writes)
                pending, writes.pending = writes.pending, []
                results = await asyncio.gather(*pending, return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException) and not isinstance(result, Exception):
                        raise result
        finally:
            writes.closed = True
            _drop_deferred(writes)


def _drop_deferred(writes: _Writes) -> None:
    """The block's end was cut short (cancelled, or a write raised): what was still held or queued is
    dropped, and said so, not left to Python's "never awaited" warning."""
    for write, what, _ in _take_deferred(writes):
        write.close()
        _logger.warning("%s was not written: the run was stopped first", what)
