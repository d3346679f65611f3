"""A local Prefect server that outlives runs: ``toka server start|stop|status``.

``toka run`` on Prefect's embedded server pays for starting and stopping it on
every run (10-30 s), and its runs cannot be looked at afterwards. ``toka server
start`` runs Prefect's own server (``prefect server start``) in the background,
in its own session, on this project's Prefect home, and records it in
``<PREFECT_HOME>/toka-server.json``; ``toka run`` uses it when it answers (and
says so), unless ``PREFECT_API_URL`` names another API, which keeps precedence.

Next to the server it starts a warm process (:mod:`toka.warm`) that has imported
Prefect, the anthropic SDK and toka once, so that ``toka run`` starts in about a
second instead of paying about 5 s of imports each time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, TokaError
from .process import process_started, process_state
from .startup import startup_imports

__all__ = ["SERVER_DEFAULTS", "LocalServer", "create_app", "immediate_sqlite_transactions", "prefect_cli",
           "running_server", "server_environment", "start_server", "stop_server"]

STATE_FILE = "toka-server.json"
LOG_FILE = "toka-server.log"
START_TIMEOUT = 120.0
WARM_TIMEOUT = 60.0
_PREFECT_SERVER = "from toka.server import prefect_cli; prefect_cli()"
"""``python -c`` code: the ``prefect`` command as toka runs its server (:func:`prefect_cli`)."""

SERVER_DEFAULTS = {
    # Prefect's server writes each task-run event in a transaction of its own (a batch of one):
    # about 31 ms of its CPU per task, on the one process every agent's runs wait on (busy 95%
    # of a 50-agent run). In batches, at least once a second, about 9 ms (bench/server_cost.py).
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}
"""Prefect server settings toka's servers (the embedded one, ``toka server``) start with when
neither the environment nor the Prefect profile sets them (:func:`server_environment`)."""


@dataclass(frozen=True)
class LocalServer:
    """The server ``toka server start`` left running."""

    pid: int
    host: str
    port: int
    log: str
    warm_pid: int | None = None
    """The warm process (:mod:`toka.warm`), if one was started."""
    started: int | None = None
    warm_started: int | None = None
    """When each process started (:func:`toka.process.process_started`): once one has exited, its
    pid may be another process's, which must not be taken for it, let alone signalled."""

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    @property
    def warm(self) -> bool:
        """Whether its warm process lives (it exits when toka's code changed on disk)."""
        return self.warm_pid is not None and _alive(self.warm_pid, self.warm_started)


def prefect_home() -> Path:
    """Prefect's home directory, where the server's record lives.

    ``PREFECT_HOME`` when set, without importing Prefect (3 s of CPU that `toka server status`
    and `stop` need for nothing else): Prefect ranks the environment above every other settings
    source. Else as Prefect's settings resolve it (a profile, ``prefect.toml``, the default).
    """
    if home := os.environ.get("PREFECT_HOME"):
        return Path(home).expanduser()
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def _state_path() -> Path:
    return prefect_home() / STATE_FILE


def _alive(pid: int, started: int | None = None) -> bool:
    """Whether the process lives; with ``started``, whether that very process does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return started is None
    if started is not None and process_started(pid) != started:
        return False
    return process_state(pid) != "Z"  # a zombie is dead: an init that never reaps (some containers) keeps it


def _healthy(server: LocalServer, timeout: float = 2.0) -> bool:
    import httpx

    try:
        # Plain HTTP on this machine: verify=False spares building a TLS context (50-100 ms).
        return httpx.get(f"{server.api_url}/health", timeout=timeout, verify=False).status_code == 200
    except httpx.HTTPError:
        return False


def recorded_server() -> LocalServer | None:
    """The server recorded in this Prefect home, if its process still lives (a stale record goes)."""
    path = _state_path()
    try:
        server = LocalServer(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if not _alive(server.pid, server.started):
        if server.warm:  # the server was killed, its warm process not: it serves nothing now
            _terminate(server.warm_pid, timeout=5.0, started=server.warm_started)  # type: ignore[arg-type]
        path.unlink(missing_ok=True)
        return None
    return server


def running_server() -> LocalServer | None:
    """The recorded server when it answers its health check."""
    server = recorded_server()
    return server if server is not None and _healthy(server) else None


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def start_server(host: str = "127.0.0.1", port: int = 4200, *, timeout: float = START_TIMEOUT) -> tuple[LocalServer, bool]:
    """Start the server in the background, or find it running; returns it and whether it was started.

    Raises:
        ConfigError: the port is taken by something else.
        TokaError: the server exited or did not answer within ``timeout`` (the log's last lines say why).
    """
    current = running_server()
    if current is not None:
        if not current.warm:
            current = _with_warm(current, _start_warm())
            _state_path().write_text(json.dumps(asdict(current)) + "\n", encoding="utf-8")
        return current, False
    if _port_in_use(host, port):
        raise ConfigError(f"port {port} on {host} is in use by another program; choose one with --port")
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log = home / LOG_FILE
    env = server_environment({**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    env.pop("PREFECT_API_URL", None)  # the server itself talks to no other API
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            # `prefect server start`, in a process whose server begins SQLite transactions IMMEDIATE
            [sys.executable, "-c", _PREFECT_SERVER, "server", "start", "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # a Ctrl-C in the terminal that started it does not reach it
        )
    warm = _start_warm()  # imports while the server starts: two cores, two processes
    server = LocalServer(pid=proc.pid, host=host, port=port, log=str(log), started=process_started(proc.pid))
    deadline = time.monotonic() + timeout
    while not _healthy(server, timeout=1.0):
        if proc.poll() is not None:
            raise TokaError(f"the Prefect server exited (code {proc.returncode}) before it answered: "
                            f"{_tail(log)} (the whole log: {log})")
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            _terminate(warm.pid)
            raise TokaError(f"the Prefect server did not answer within {timeout:g} s; its log: {log}")
        time.sleep(0.25)
    server = _with_warm(server, warm)
    _state_path().write_text(json.dumps(asdict(server)) + "\n", encoding="utf-8")
    return server, True


def _start_warm() -> subprocess.Popen[bytes]:
    """Start the warm process (:mod:`toka.warm`) in its own session, logging to the server's log."""
    from .warm import serve_command

    env = {**os.environ, "PREFECT_HOME": str(prefect_home())}  # where `toka run` looks for its socket
    env.pop("PREFECT_API_URL", None)
    with open(prefect_home() / LOG_FILE, "ab") as out:
        return subprocess.Popen(serve_command(_warm_socket()), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _warm_socket() -> Path:
    from .warm import socket_path

    return socket_path({"PREFECT_HOME": str(prefect_home())})


def _with_warm(server: LocalServer, warm: subprocess.Popen[bytes], timeout: float = WARM_TIMEOUT) -> LocalServer:
    """The server with its warm process, once that listens; without it if it failed (runs then
    start in their own processes, as without it: a slower start, nothing else lost)."""
    path = _warm_socket()
    deadline = time.monotonic() + timeout
    while not path.exists():
        if warm.poll() is not None or time.monotonic() > deadline:
            _terminate(warm.pid, timeout=5.0)
            return server
        time.sleep(0.1)
    return LocalServer(**{**asdict(server), "warm_pid": warm.pid, "warm_started": process_started(warm.pid)})


def stop_server(*, timeout: float = 20.0) -> LocalServer | None:
    """Stop the recorded server (and everything it started); returns it, or None if none ran."""
    server = recorded_server()
    if server is None:
        return None
    if server.warm_pid is not None:  # first: it stops the runs it holds as SIGTERM stops `toka run`
        _terminate(server.warm_pid, timeout=timeout, started=server.warm_started)
    _terminate(server.pid, timeout=timeout, started=server.started)
    _state_path().unlink(missing_ok=True)
    return server


def _terminate(pid: int, *, timeout: float = 20.0, started: int | None = None) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after ``timeout``.

    With ``started``, a pid now held by another process is left alone: the group it led is
    gone then (Linux does not give a pid to a new process while a group of that id exists).
    """
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if started is not None and process_started(pid) not in (None, started):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
            except ChildProcessError:
                pass
            if not _alive(pid):
                try:  # anything it started and left behind in its group
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.1)


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(an empty log)"


def server_environment(env: dict[str, str], *, chosen: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` for a Prefect server process, with :data:`SERVER_DEFAULTS` for what neither ``env``
    nor the Prefect profile sets.

    ``chosen``: the settings set (``to_environment_variables(exclude_unset=True)`` of the current
    settings), when the caller has them already: making them takes about 25 ms.
    """
    if chosen is None:
        from prefect.settings import get_current_settings

        chosen = get_current_settings().to_environment_variables(exclude_unset=True)
    return {**{k: v for k, v in SERVER_DEFAULTS.items() if k not in chosen and k not in env}, **env}


def create_app() -> Any:
    """Prefect's server application with :func:`immediate_sqlite_transactions`, made before any
    garbage collection (:mod:`toka.startup`): the ``uvicorn --factory`` of the embedded server's
    own process, which it leaves with its start-up frozen."""
    with startup_imports():
        from prefect.server.api.server import create_app as prefect_app

        immediate_sqlite_transactions()
        return prefect_app()


def prefect_cli() -> NoReturn:
    """The ``prefect`` command (``prefect server start ...``) with :func:`immediate_sqlite_transactions`,
    and the server imported before any garbage collection (:mod:`toka.startup`)."""
    with startup_imports():
        immediate_sqlite_transactions()
        import prefect.server.api.server  # noqa: F401  (what `prefect server start` runs)
        from prefect.cli import app
    sys.exit(app())


def immediate_sqlite_transactions() -> None:
    """Make the Prefect server of this process begin its SQLite transactions IMMEDIATE.

    Prefect begins the server's write transactions DEFERRED on SQLite: a transaction reads,
    then writes, and when another connection wrote in between SQLite refuses the upgrade at
    once (SQLITE_BUSY_SNAPSHOT, "database is locked"); no busy timeout helps, the server
    answers 503 and the client retries after about 2 s, and gives up after a few: 50
    concurrent agents stalled for minutes, then failed, that way (bench/many_agents.py).
    Begun IMMEDIATE (what Prefect itself does for ``with_for_update``), a transaction takes
    the write lock first and waits for it (``busy_timeout``, 60 s) instead: writers queue,
    readers go on (WAL). PostgreSQL is left alone.
    """
    import inspect

    from prefect.server.database.configurations import AioSqliteConfiguration

    deferred = getattr(AioSqliteConfiguration, "begin_transaction", None)
    if deferred is None or getattr(deferred, "toka_immediate", False):
        return
    if "with_for_update" not in inspect.signature(deferred).parameters:
        return  # another Prefect than the one pinned: its own transactions, as they are

    @asynccontextmanager
    async def begin_immediate(self: AioSqliteConfiguration, session: Any,
                              with_for_update: bool = False) -> AsyncIterator[Any]:
        async with deferred(self, session, with_for_update=True) as transaction:
            yield transaction

    begin_immediate.toka_immediate = True  # type: ignore[attr-defined]
    AioSqliteConfiguration.begin_transaction = begin_immediate  # type: ignore[method-assign]
