"""API writes that need not hold up the run: an agent's report artifacts.

An agent's dependents start when its flow returns. Its report and results artifacts (a
round trip to the one server that every run of the machine writes to) are only for the
UI, so they go out in the background while the dependents start, and the flow that ran
the agents (the pipeline, or a distributed agent run) waits for all of them before it
ends: its Completed state still means every artifact is written.

Outside :func:`writes_finished` (an agent flow called on its own), or from another
event loop than the one that opened it, a write is awaited where it is made, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["in_background", "writes_finished"]

_logger = logging.getLogger("toka.background")


class _Writes:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pending: list[asyncio.Future[Any]] = []


_open: ContextVar[_Writes | None] = ContextVar("toka_background_writes", default=None)


async def in_background(write: Awaitable[Any], what: str) -> None:
    """Start ``write`` and return; the innermost :func:`writes_finished` waits for it.

    ``what`` names it in the warning logged if it fails.
    """
    writes = _open.get()
    if writes is None or writes.loop is not asyncio.get_running_loop():
        await write
        return
    future = asyncio.ensure_future(write)
    future.add_done_callback(lambda done: _warn_if_failed(done, what))
    writes.pending.append(future)


def _warn_if_failed(done: asyncio.Future[Any], what: str) -> None:
    if done.cancelled() or done.exception() is None:
        return
    error = done.exception()
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:  # the run that made the write (the callback runs in its context): its log, in the UI too
        logger: Any = get_run_logger()
    except MissingContextError:
        logger = _logger
    logger.warning("%s could not be written: %s: %s", what, type(error).__name__, error)


@asynccontextmanager
async def writes_finished() -> AsyncIterator[None]:
    """Inside, :func:`in_background` writes run in the background; on the way out, all of them
    are waited for (a failed one was logged as a warning: the run's outcome stands)."""
    writes = _Writes()
    token = _open.set(writes)
    try:
        yield
    finally:
        _open.reset(token)
        while writes.pending:  # a write may start another
            pending, writes.pending = writes.pending, []
            await asyncio.gather(*pending, return_exceptions=True)
