"""Model request limits shared by every process and worker of a deployment.

Requests per minute and concurrent requests are Prefect *global concurrency
limits* on the server, so several workers on several machines draw from one
quota. ``toka limits apply`` creates or updates them; a run configured to use
them when they are missing stops with a message saying so, instead of
running unlimited. An in-process semaphore caps concurrent requests of one
process on top (it also works with no server limits at all).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["CONCURRENCY_LIMIT", "RATE_LIMIT", "LimitSettings", "RequestLimiter", "apply_limits", "check_limits"]

#: Names of the Prefect global concurrency limits.
RATE_LIMIT = "toka-model-requests-per-minute"
CONCURRENCY_LIMIT = "toka-model-concurrent-requests"


@dataclass(frozen=True)
class LimitSettings:
    requests_per_minute: int | None = None
    """Enforce a shared request rate through the server's ``RATE_LIMIT`` limit."""
    concurrent_requests: int | None = None
    """Enforce shared concurrency through the server's ``CONCURRENCY_LIMIT`` limit."""
    in_process: int | None = None
    """Most requests in flight from this process."""

    @property
    def uses_server(self) -> bool:
        return bool(self.requests_per_minute or self.concurrent_requests)


class RequestLimiter:
    """Acquire every configured limit around one HTTP attempt."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self._local = asyncio.Semaphore(settings.in_process) if settings.in_process else None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._local is not None:
            async with self._local:
                async with self._server_slot():
                    yield
        else:
            async with self._server_slot():
                yield

    @asynccontextmanager
    async def _server_slot(self) -> AsyncIterator[None]:
        if not self.settings.uses_server:
            yield
            return
        from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, concurrency, rate_limit

        try:
            if self.settings.requests_per_minute:
                await rate_limit(RATE_LIMIT, occupy=1, strict=True)
            if self.settings.concurrent_requests:
                async with concurrency(CONCURRENCY_LIMIT, occupy=1, strict=True):
                    yield
            else:
                yield
        except ConcurrencySlotAcquisitionError as e:
            raise ConfigError(
                f"model request limits are configured but the Prefect server lacks them ({e}); "
                "create them with: toka limits apply"
            ) from None


async def apply_limits(settings: LimitSettings) -> list[str]:
    """Create or update the server's limits to match ``settings``; return what was done."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    wanted: list[tuple[str, int, float | None]] = []
    if settings.requests_per_minute:
        # A rate limit is a limit whose slots decay: N per minute = N/60 per second.
        wanted.append((RATE_LIMIT, settings.requests_per_minute, settings.requests_per_minute / 60))
    if settings.concurrent_requests:
        wanted.append((CONCURRENCY_LIMIT, settings.concurrent_requests, None))
    done: list[str] = []
    async with get_client() as client:
        for name, limit, decay in wanted:
            try:
                await client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True,
                                                 slot_decay_per_second=decay or 0.0)
                )
                done.append(f"created {name} = {limit}" + (f" ({decay:g}/s decay)" if decay else ""))
            else:
                await client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=limit, active=True,
                                                       slot_decay_per_second=decay or 0.0)
                )
                done.append(f"updated {name} = {limit}" + (f" ({decay:g}/s decay)" if decay else ""))
    return done


async def check_limits(settings: LimitSettings) -> list[str]:
    """The configured limits missing on the server (empty when all are there)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    names = [n for n, on in ((RATE_LIMIT, settings.requests_per_minute),
                             (CONCURRENCY_LIMIT, settings.concurrent_requests)) if on]
    missing = []
    async with get_client() as client:
        for name in names:
            try:
                await client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                missing.append(name)
    return missing
