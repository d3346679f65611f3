from __future__ import annotations

import compileall
import gc
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml

from toka.server import _PREFECT_SERVER, server_environment

from .ports import free_port

# Prefect state (results, the embedded servers' databases) of this test session lives
# in a fresh directory: a second session must not find cached results of the first.
# Set before any test module imports prefect.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="toka-tests-prefect-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(PREFECT_HOME / "results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
os.environ.pop("ANTHROPIC_API_KEY", None)  # tests never reach a real provider
# pytest keeps its assertion-rewritten test modules only where bytecode may be written; with
# PYTHONDONTWRITEBYTECODE set, every worker of every session rewrote all of them again (about
# 8 s of a worker's 20 s of CPU to collect). Cached beside them, as `compileall` does for toka's
# own modules below.
sys.dont_write_bytecode = False

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TOKA_SPECS = TESTS / "data" / "toka-specs"
AGENT_SPECS = ROOT / "agent_specs"
PREFECT = str(Path(sys.executable).with_name("prefect"))


def minimal_spec(
    name: str,
    *,
    priority: str = "medium",
    required: Any = None,
    optional: Any = None,
    tasks: int = 2,
    **extra: Any,
) -> dict[str, Any]:
    """The smallest valid spec, as a dict; dependencies in any accepted shape."""
    spec: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {"name": f"{name} agent", "domain": "testing", "priority": priority},
        "tasks": {"default": [{"description": f"{name} step {i + 1}"} for i in range(tasks)]},
        "dependencies": {"required": required or {}, "optional": optional or {}},
        "security": {"resource_limits": {"timeout": "10m"}},
    }
    spec.update(extra)
    return spec


@pytest.fixture
def write_specs(tmp_path: Path) -> Callable[..., Path]:
    """Write dict specs as YAML files into a fresh directory and return it."""

    def write(*specs: dict[str, Any], directory: str = "specs") -> Path:
        target = tmp_path / directory
        target.mkdir(exist_ok=True)
        for spec in specs:
            name = spec["metadata"]["name"]
            (target / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return target

    return write


#: How many times a CPU-time bound is measured before it fails: the best of them counts.
CPU_ATTEMPTS = 3


def least_cpu_seconds(call: Callable[[], object], *, bound: float, attempts: int = CPU_ATTEMPTS) -> float:
    """This thread's CPU seconds for ``call()``: the least of up to ``attempts`` runs, stopping at one under ``bound``.

    Thread CPU time already leaves out waiting and other threads, but not the slowdown of
    sharing a core: with two test workers and their servers on two (hyper-threaded) cores,
    an example that takes 0.3 s alone was measured at over 0.5 s. Such slowdowns come and
    go, so the best of three runs is near the code's own cost; a regression that makes the
    code several times slower is over the bound in every run and still fails.
    ``call`` may raise (the exception propagates from the first run that raises it).
    """
    best = float("inf")
    for _ in range(attempts):
        start = time.thread_time()
        try:
            call()
        finally:
            best = min(best, time.thread_time() - start)
        if best < bound:
            break
    return best


def stop_process(proc: subprocess.Popen[Any], grace: float = 15) -> None:
    """Stop a process started with start_new_session, and everything in its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


# -- one migrated database for the whole session -------------------------------------------------
#
# A Prefect server on a fresh home runs Prefect's database migrations before it answers: 22 s
# of CPU to start against 9.5 s on a migrated database (measured here, one core). The servers
# and homes of tests that are not about a fresh home start from a copy of one database that
# `prefect server database upgrade` migrated once for the session, for all xdist workers: the
# first process to configure (the xdist controller, or the only process) starts that in the
# background, and its path reaches the workers in their environment.

_TEMPLATE_ENV = "TOKA_TESTS_MIGRATED_DB"
_template_build: subprocess.Popen[bytes] | None = None
_DATABASE_URLS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def pytest_configure(config: pytest.Config) -> None:
    global _template_build
    if hasattr(config, "workerinput") or config.option.collectonly:
        return  # an xdist worker (its controller started the build), or nothing will run
    _compile_own_modules()
    folder = Path(tempfile.mkdtemp(prefix="toka-tests-db-"))
    os.environ[_TEMPLATE_ENV] = str(folder)
    # Migrated in place (its -wal file, if any, stays beside it for the copies); "ok" once it succeeded.
    script = ('PREFECT_HOME="$1" "$2" server database upgrade -y > "$1/upgrade.log" 2>&1 && touch "$1/ok"; '
              'touch "$1/done"')
    # Never a database the environment names (`upgrade -y` would migrate it unasked).
    env = {k: v for k, v in os.environ.items() if k not in _DATABASE_URLS}
    _template_build = subprocess.Popen(["sh", "-c", script, "sh", str(folder), PREFECT], start_new_session=True,
                                       env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})


def _compile_own_modules() -> None:
    """Bytecode for toka's own modules, written once for the session's processes.

    With PYTHONDONTWRITEBYTECODE set (as on some machines and images), every `toka`, server and
    flow-run process the tests start would compile them from source again (0.23 s of CPU each,
    some 170 processes a session); a process that does not write bytecode still reads it. A
    read-only checkout only goes without.
    """
    for package in ("toka", "flows", "tasks"):
        compileall.compile_dir(ROOT / package, maxlevels=0, quiet=2)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _template_build is not None:
        stop_process(_template_build, grace=5)  # still migrating when the session ended early
        shutil.rmtree(os.environ.pop(_TEMPLATE_ENV), ignore_errors=True)


def migrated_home(home: Path, timeout: float = 300) -> Path:
    """``home``, created if need be, with a copy of the session's migrated Prefect database unless it has one."""
    home.mkdir(parents=True, exist_ok=True)
    if (home / "prefect.db").exists():
        return home
    folder = Path(os.environ[_TEMPLATE_ENV])
    deadline = time.monotonic() + timeout
    while not (folder / "done").exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the session's migrated database was not made within {timeout:.0f} s")
        time.sleep(0.1)
    if not (folder / "ok").exists():
        pytest.fail(f"`prefect server database upgrade` failed:\n{(folder / 'upgrade.log').read_text()[-3000:]}")
    # SQLite's own copy (what a -wal file beside it holds included), whole or not at all.
    partial = home / "prefect.db.partial"
    with closing(sqlite3.connect(folder / "prefect.db")) as source, closing(sqlite3.connect(partial)) as copy:
        source.backup(copy)
    partial.replace(home / "prefect.db")
    return home


class PrefectServer:
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME.

    Its SQLite database starts as a copy of the session's migrated one (:func:`migrated_home`).
    The constructor only starts the process; :meth:`wait_healthy` waits until it answers.
    """

    def __init__(self, directory: Path, *, environ: dict[str, str] | None = None, **env: str) -> None:
        self.home = directory / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        if not set(_DATABASE_URLS) & env.keys():  # SQLite, in its home
            migrated_home(self.home)
        self.log = directory / "server.log"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        base = {k: v for k, v in (os.environ if environ is None else environ).items()
                if k not in ("ANTHROPIC_API_KEY", "PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH")
                and not k.startswith("TOKA_OFFLINE_")}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                # As `toka server start` runs it: SQLite transactions begun IMMEDIATE. The session's
                # flows and `toka run` processes share it; Prefect's DEFERRED transactions made a
                # small flow stand still for a minute behind "database is locked" retries.
                [sys.executable, "-c", _PREFECT_SERVER, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=server_environment({**base, "PREFECT_HOME": str(self.home),
                                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env}),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=directory)

    def wait_healthy(self, timeout: float = 120) -> PrefectServer:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2, verify=False).status_code == 200:  # no CA bundle loaded per poll
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"prefect server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        stop_process(self.proc)


_shared_api: PrefectServer | None = None
_shared_start: threading.Thread | None = None
_session_over = threading.Event()
_shared_api_error: list[BaseException] = []

# -- parallel runs (pytest-xdist: `-n 2 --dist load --maxschedchunk=1`, see pyproject.toml) ---------
#
# Each worker is its own process: it imports this file, so it has its own PREFECT_HOME (above)
# and its own `prefect_api` server on a free port (also its `prefect_server`); cgroups,
# workspaces and ports are per test. Workers take tests one at a time (`--maxschedchunk=1`),
# longest first, so that no worker is left with a long end-to-end run when the other is done.
# Without `--maxschedchunk=1`, xdist hands the first worker the first quarter of the collection
# at once: all the end-to-end tests, one after the other, while the second worker sat idle.
#
# Not `--dist loadgroup`: with pytest 9.2, xdist 3.8 cannot tag a test's node id with its
# group, so every test is scheduled alone; session fixtures (`deployed`, `unanswered`, the
# warm server) are then made once per worker that runs one of their tests. Costly fixtures
# shared by tests are session fixtures, not module ones: a worker takes a module's tests
# between other modules' (longest first), and pytest ends a module fixture at every change of
# module, so it was made again for each test.

#: Seconds the longest tests took on two workers on a 2-core machine (2026-12-01, a full run),
#: for the order in which workers take them: the longest first, so that the last ones to finish
#: are short.
LONGEST: dict[str, float] = {
    "test_distributed_mode_spreads_agents_over_two_workers": 174,
    "test_postgresql_backed_server": 138,
    "test_a_server_outlives_two_runs_and_stops_cleanly": 77,
    "test_kill_9_takes_the_embedded_server_with_it_and_resume_repeats_no_finished_task": 68,
    "test_a_warm_run_has_the_commands_directory_environment_streams_and_exit_status": 62,
    "test_pipeline_deployment_on_a_worker_then_a_ui_retry_resumes_it": 48,
    "test_a_dead_embedded_server_stops_the_run_within_seconds": 46,
    "test_offline_run_then_resume_replays_everything": 44,
    "test_code_changed_since_the_server_started_is_never_run_warm": 42,
    "test_a_hung_embedded_server_stops_the_run_and_is_killed": 42,
    "test_sigterm_ends_the_run_like_ctrl_c": 42,
    "test_toka_run_in_a_terminal": 55,  # on a fresh home
    "test_kill_9_of_the_command_ends_the_warm_run": 33,
    "test_sigint_to_a_background_runs_group_leaves_its_server_alone": 29,
    "test_injected_fault_fails_the_run_and_resume_finishes_it": 26,
    "test_kill_at_turn_30_then_resume_pays_for_at_most_one_request_again": 24,
    "test_a_prefect_api_that_never_answers_is_one_clear_line": 24,
    "test_kill_then_resume_reuses_the_worktree_and_commits_nothing_twice": 21,
    "test_per_agent_deployment_runs_the_agent_after_its_required_dependencies": 21,
    "test_sigterm_to_the_command_stops_the_warm_run_and_resume_finishes_it": 21,
}


def _cost(item: pytest.Item) -> float:
    """Rough seconds a test takes, for the order in which workers take them (longest first)."""
    name = getattr(item, "originalname", None) or item.name
    if name in LONGEST:
        return LONGEST[name]
    fixtures = set(getattr(item, "fixturenames", ()))
    if "deployed" in fixtures:
        return 30  # workers, deployments, a second server
    if item.get_closest_marker("slow"):
        return 20  # a real `toka run` or server
    if {"prefect_server", "prefect_api"} & fixtures:
        return 2  # a flow run in the test process
    return 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):
        # Under xdist only; every worker sorts the same collection the same way, as xdist requires.
        items.sort(key=_cost, reverse=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the shared server as soon as a collected test needs it: in the background, once the
    session's migrated database is made, while the tests that need no shared server run (a
    worker's first test may be one)."""
    if session.config.option.collectonly:
        return
    # What collection imported lives as long as the worker: out of the collector's way.
    gc.collect()
    gc.freeze()
    if _shared_start is None and any({"prefect_api", "prefect_server"} & set(getattr(item, "fixturenames", ()))
                                     for item in session.items):
        _start_shared_in_background()


def _start_shared_in_background() -> None:
    global _shared_start
    # The environment as it is now: the thread waits while tests run, and their monkeypatched
    # variables must not reach a server that outlives them.
    environ = dict(os.environ)
    _shared_start = threading.Thread(target=_start_shared_api, args=(environ,), name="shared-prefect-server",
                                     daemon=True)
    _shared_start.start()


def _start_shared_api(environ: dict[str, str]) -> None:
    global _shared_api
    try:
        directory = Path(tempfile.mkdtemp(prefix="toka-tests-api-"))
        migrated_home(directory / "home")
        if not _session_over.is_set():  # ended early, while the database was being made
            _shared_api = PrefectServer(directory, environ=environ)
    except BaseException as error:  # pytest.fail() included: reported by the first test that needs it
        _shared_api_error.append(error)


def pytest_sessionfinish(session: pytest.Session) -> None:
    _session_over.set()
    if _shared_start is not None:
        _shared_start.join(timeout=60)
    if _shared_api is not None:
        _shared_api.stop()
        shutil.rmtree(_shared_api.home.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api() -> PrefectServer:
    """One real `prefect server start` (SQLite) for the session's end-to-end processes.

    `toka run` processes that do not test the embedded server itself (set PREFECT_API_URL to
    its ``url``) and the deployment tests (`prefect deploy`, workers) share it: each embedded
    server costs a `toka run` 10-30 s, a standalone server about 15 s once. Runs, flows and
    deployments of different tests do not collide: each test reads back only its own runs.
    """
    if _shared_start is None:  # requested without having been collected (e.g. by a plugin)
        _start_shared_in_background()
    assert _shared_start is not None
    _shared_start.join()
    if _shared_api_error:
        error = _shared_api_error[0]
        pytest.fail(f"the session's shared Prefect server did not start: {type(error).__name__}: {error}")
    assert _shared_api is not None
    return _shared_api.wait_healthy()


@pytest.fixture(scope="session")
def prefect_server(prefect_api: PrefectServer) -> Iterator[None]:
    """The Prefect API for flows run in this process: the session's shared server (``prefect_api``).

    Prefect's own ``prefect_test_harness`` would start a second server per worker, on a fresh
    database: about 20 s of CPU, and over a minute before the first test that needed it when
    the other worker ran an end-to-end test. A worker runs one test at a time, so its flows
    and its `toka run` processes never load the one server at once.
    """
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api.url}):
        # Also the process-wide settings, as the harness does: code in a context copied
        # before this fixture (a thread, a copied contextvars context) uses this server too.
        with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            yield
            _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued in this process before the server stops (as the harness does)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


async def run_pipeline(folder: Path, *, run_key: str, **options: Any) -> tuple[Any, Any]:
    """Run the pipeline flow in-process on the specs in ``folder`` (also the workspace).

    Returns its final state and summary, also when the run failed.
    """
    from flows.pipeline import pipeline
    from toka.config import grouped
    from toka.errors import PipelineFailedError
    from toka.results import PipelineSummary

    options = {"retry_delay_seconds": 0, "workspace": str(folder), "run_key": run_key, **options}
    specs = options.pop("specs", [str(folder)])
    agents = options.pop("agents", [])
    state = await pipeline(specs=specs, agents=agents, return_state=True, **grouped(options))
    outcome = await state.aresult(raise_on_failure=False)
    summary = outcome.report if isinstance(outcome, PipelineFailedError) else outcome
    assert isinstance(summary, PipelineSummary), outcome
    return state, summary
