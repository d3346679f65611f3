"""Garbage collection around a process's start-up imports.

Importing Prefect's server builds thousands of classes and pydantic schemas, and
CPython's cyclic collector runs over the growing heap again and again while it
happens: ``import prefect.server.api.server`` in a fresh interpreter took 7.6 s
of CPU on a 2-core machine, 6.0 s with the collector off. Nothing those imports
make is garbage worth looking for, so the processes toka starts for long work
(its Prefect servers, the ``toka`` command, the warm process) run their start-up
imports with the collector off (:func:`defer_gc`, :func:`startup_imports`), then
freeze what the imports left (:func:`settle_gc`): later collections no longer
walk it, and forked children share it unchanged.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["defer_gc", "settle_gc", "startup_imports"]

_deferred = False


def defer_gc() -> None:
    """No cyclic garbage collection until :func:`settle_gc` (call it first thing in a process)."""
    global _deferred
    if gc.isenabled():
        gc.disable()
        _deferred = True


def settle_gc() -> None:
    """After the start-up imports: collect once, freeze what is left, and collect as usual from here.

    Does nothing unless :func:`defer_gc` turned collection off, so code that is also run inside
    someone else's process (a test, an embedding program) leaves its collector alone.
    """
    global _deferred
    if not _deferred:
        return
    _deferred = False
    gc.collect()
    gc.freeze()
    gc.enable()


@contextmanager
def startup_imports() -> Iterator[None]:
    """The imports (and set-up) of a process toka started: :func:`defer_gc` before, :func:`settle_gc` after."""
    defer_gc()
    try:
        yield
    finally:
        settle_gc()
