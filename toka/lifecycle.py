"""How a ``toka run`` process ends, whatever ends it.

The run's event loop runs in a worker thread; the main thread starts the embedded
server, waits, and turns every way of stopping into one cancellation of the run:

- **SIGTERM** ends the run like Ctrl-C: one line, exit 143, ``toka run --resume`` goes on.
  Prefect installs its own SIGTERM handler only for flows in the main thread; that one
  raised TerminationSignal wherever the thread happened to be, and when asyncio caught it
  in a callback the run went on as if nothing had happened.
- **The Prefect API dies under the run** (its embedded server exited, or it stopped
  answering): Prefect's client and log worker used to retry for ever ("Error logging to
  API"). A watchdog thread notices and stops the run.
- **A stop that does not finish** (the cancelled run still talks to a dead API, or a
  second signal arrives) ends the process outright after a grace period: fail closed.
- **``kill -9`` of toka** must not leave the embedded server behind: the kernel kills it
  when its parent dies (``PR_SET_PDEATHSIG``, Linux). It also runs in its own session, so
  a SIGINT sent to toka's process group (Ctrl-C, or a script's ``cmd &`` where toka
  ignores SIGINT) no longer kills the server under a run that goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import httpx
from prefect.settings import get_current_settings

from .process import process_state

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

__all__ = ["EXIT_API_GONE", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "RunGuard", "Stopped"]

T = TypeVar("T")

EXIT_API_GONE = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT  # what a shell reports for a process a signal ended
EXIT_TERMINATED = 128 + signal.SIGTERM

POLL_SECONDS = 0.5
SILENCE_SECONDS = 15.0
#: How long a running API may leave its health check unanswered before it counts as hung.
HUNG_SECONDS = 120.0
"""An API that answered before and gives no answer for this long is dead; a short
restart of an external server, or one slow health answer under load, is not."""
GRACE_SECONDS = 20.0
"""How long a stopped run may take to wind down (Prefect records its states) and exit."""
API_GONE_GRACE_SECONDS = 5.0
"""The same once the API is dead: winding down then only retries that API."""
SERVER_START_HINT = "10-30 s the first time"
"""How long the embedded server takes to start: 6-12 s measured here, up to 30 s on a first
start (database migrations) on a busy machine."""

_PR_SET_PDEATHSIG = 1


class Stopped(BaseException):
    """The run was stopped (and cancelled) before it ended; ``reason`` says why.

    A BaseException, like KeyboardInterrupt: it is no error of the run.
    """

    def __init__(self, reason: str, exit_code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


def _EmbeddedServer() -> SubprocessASGIServer:  # noqa: N802 - it stands for the class (tests patch it)
    """Prefect's embedded server, started so that it cannot outlive ``toka run``.

    Prefect keeps one instance per port (``_instances``, shared with subclasses); once
    this one holds the default slot, every ``get_client()`` of the run reuses it.
    """
    return _embedded_server_class()()


@functools.cache
def _embedded_server_class() -> type[SubprocessASGIServer]:
    # Imported here, not at the top: ``prefect.server.api.server`` (the whole server
    # application) costs about 2.4 s, and a run on a lasting server or PREFECT_API_URL
    # never starts the embedded one (measured in bench/cold_start.py).
    import prefect
    from prefect.server.api.server import SubprocessASGIServer

    from .server import server_environment

    class EmbeddedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect 3.8's own command and environment; the process setup differs, and the
            # application is Prefect's with SQLite transactions begun IMMEDIATE (no lock stalls:
            # toka.server.create_app says why).
            settings = get_current_settings().to_environment_variables(exclude_unset=True)
            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                      "--factory", "toka.server:create_app", "--host", "127.0.0.1",
                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=server_environment({**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                                        "PREFECT__SERVER_FINAL": "1", **settings}, chosen=settings),
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()),
            )

    return EmbeddedServer


def _die_with(parent: int) -> Callable[[], None] | None:
    """Set up the child so the kernel kills it when ``parent`` dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it

    def setup() -> None:
        # SIGKILL, not SIGTERM: the only client is gone, a graceful shutdown could wait on
        # its requests, and SQLite's journal makes a kill safe for the next run.
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


class RunGuard:
    """One run: the embedded server, the API watchdog, signals, and the thread the run uses.

    Enter it in the main thread: the parent-death signal fires when the *thread* that
    started the server ends, and only the main thread lives as long as the process.

    Args:
        hint: what the user does next, appended to the one line that says why the run stopped.
        write: prints that line (called at most once, possibly from another thread just
            before the process ends).
        notice: prints what the person waits for before the run starts (the embedded server).
    """

    def __init__(self, *, hint: str, write: Callable[[str], None],
                 notice: Callable[[str], None] | None = None) -> None:
        self._hint = hint
        self._write = write
        self._notice = notice
        self._lock = threading.Lock()
        self._closed = False
        self._announced = False
        self._stop: Stopped | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._quiet = threading.Event()
        self._previous_sigterm: Any = None
        self._server: SubprocessASGIServer | None = None

    def __enter__(self) -> RunGuard:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        # None: a handler installed outside Python, which cannot be put back; the default can.
        self._previous_sigterm = signal.SIG_DFL if previous is None else previous
        settings = get_current_settings()
        api_url = settings.api.url
        if not api_url and settings.server.ephemeral.enabled:  # as Prefect's get_client() decides
            self._server = _EmbeddedServer()
            if self._notice is not None:  # else 10-30 s of silence look like a hang
                self._notice(f"starting Prefect's embedded server ({SERVER_START_HINT})...")
            try:
                self._server.start()
            except BaseException:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                raise
            api_url = self._server.api_url
        if api_url:  # else Prefect stops the run at once: it has no API at all
            threading.Thread(target=self._watch, args=(api_url,), name="toka-api-watchdog", daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._lock:
            self._closed = True  # from here on the server's stop (at exit) is not a death
        self._quiet.set()
        signal.signal(signal.SIGTERM, self._previous_sigterm)

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run ``main`` in a worker thread's event loop until it ends or the run is stopped.

        Raises:
            Stopped: SIGTERM, Ctrl-C or a dead API stopped the run; it has been cancelled.
        """
        outcome: list[Any] = []

        async def cancellable() -> T:
            with self._lock:
                self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
                if self._stop is not None:
                    raise asyncio.CancelledError
            return await main

        done = threading.Event()

        def work() -> None:
            try:
                outcome.append(asyncio.run(cancellable()))
            except BaseException as e:  # handed to the main thread, which decides
                outcome.append(e)
            finally:
                done.set()

        # The main thread's context (progress listeners, Prefect settings) goes along.
        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="toka-run", daemon=True)
        worker.start()
        # An Event, not join(): a KeyboardInterrupt inside join() can leave the thread
        # looking finished while it still runs (CPython 3.11).
        while not done.is_set():
            try:
                done.wait(POLL_SECONDS)
            except KeyboardInterrupt:
                self._request_stop(Stopped("interrupted", EXIT_INTERRUPTED))
        if self._stop is not None:
            raise self._stop
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return cast(T, outcome[0])

    def announce(self, stop: Stopped) -> None:
        """Print the one line for ``stop``, unless it was printed already."""
        with self._lock:
            if self._announced:
                return
            self._announced = True
        self._write(f"{stop.reason}; {self._hint}")

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._request_stop(Stopped("terminated", EXIT_TERMINATED))

    def _request_stop(self, stop: Stopped, *, grace: float = GRACE_SECONDS) -> None:
        with self._lock:
            first = self._stop
            if first is None:
                self._stop = stop
            loop, task = self._loop, self._task
        if first is not None:  # asked again: the graceful stop is taking too long
            self._hard_exit(first)
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                loop.call_soon_threadsafe(task.cancel)
        threading.Thread(target=self._exit_after, args=(stop, grace), name="toka-stop-deadline", daemon=True).start()

    def _exit_after(self, stop: Stopped, grace: float) -> None:
        # Runs on through interpreter exit (atexit handlers drain Prefect's workers, which
        # retry a dead API), until the process ends by itself or this ends it.
        time.sleep(grace)
        self._hard_exit(stop)

    def _hard_exit(self, stop: Stopped) -> NoReturn:
        self.announce(stop)
        os._exit(stop.exit_code)

    def _watch(self, api_url: str) -> None:
        process = self._server.server_process if self._server else None
        answered = time.monotonic() if process else None  # the embedded server answered at start
        # The CA bundle (55 ms of CPU to load) only where there is TLS: the embedded server is plain HTTP.
        with httpx.Client(timeout=POLL_SECONDS * 4, verify=httpx.URL(api_url).scheme == "https") as client:
            while not self._quiet.wait(POLL_SECONDS):
                if process is not None and process.poll() is not None:
                    return self._api_died(api_url, f"its embedded server {_how(process.returncode)}")
                try:
                    client.get(f"{api_url}/health")  # any HTTP answer means someone is there
                    answered = time.monotonic()
                    continue
                except httpx.ConnectError:  # nobody listens: gone, or restarting
                    limit, what = SILENCE_SECONDS, "it refused connections"
                except httpx.TransportError:
                    # Slow answers are what a busy SQLite-backed server gives on a loaded machine:
                    # only a stopped server, or a long silence, is a dead one.
                    if process is not None and _stopped(process.pid):
                        limit, what = SILENCE_SECONDS, "its embedded server is stopped"
                    else:
                        limit, what = HUNG_SECONDS, "it did not answer its health check"
                if answered is not None and time.monotonic() - answered > limit:
                    return self._api_died(api_url, f"{what} for {limit:.0f} s")

    def _api_died(self, api_url: str, why: str) -> None:
        with self._lock:
            if self._closed:
                return
        process = self._server.server_process if self._server else None
        if process is not None and process.poll() is None:
            process.kill()  # ours, hung: nothing will use it again
        _stop_api_logging()
        self._request_stop(Stopped(f"error: the Prefect API at {api_url} stopped answering: {why}", EXIT_API_GONE),
                           grace=API_GONE_GRACE_SECONDS)


def _stop_api_logging() -> None:
    """Send no more log lines to the API, which is gone: the runs stopping now log their ends, and
    Prefect's log worker would print "--- Error logging to API ---" for each batch it fails to send.

    Lines queued before (the tasks' last ones) still fail: Prefect prints that only while
    ``logging.raiseExceptions`` holds, so it is turned off too (the process is ending).
    """
    from prefect.logging.handlers import APILogHandler

    logging.raiseExceptions = False

    known = list(logging.root.manager.loggerDict.values())  # loggers, and placeholders for their parents
    for logger in [logging.getLogger(), *(k for k in known if isinstance(k, logging.Logger))]:
        for handler in list(logger.handlers):
            if isinstance(handler, APILogHandler):
                logger.removeHandler(handler)


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, a debugger), from its state in /proc."""
    return process_state(pid) in ("T", "t")


def _how(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"
