"""`toka run` handed to the warm process of a running `toka server` (toka/warm.py).

The run must be the same run a `toka` process would make itself: its directory,
environment, streams and exit status; Ctrl-C, SIGTERM and kill -9 of the command reach
it; and code changed since the server started is never run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import AGENT_SPECS, free_port, migrated_home
from .test_cli_run import TOKA, assert_answered_not_asked_again, log_lines, summary

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, home: Path) -> None:
        self.home = home
        base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "ANTHROPIC_API_KEY")}
        self.env = {**base, "PREFECT_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"}

    def toka(self, *args: str, cwd: Path, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TOKA, *args], cwd=cwd, env={**self.env, **extra}, capture_output=True, text=True,
                              timeout=timeout)

    def forks(self) -> list[str]:
        """The runs the warm process forked, from the server's log."""
        return re.findall(r"^warm: pid \d+: toka \w+ in (.*)$", (self.home / "toka-server.log").read_text(), re.M)


# Session, not module: xdist hands a worker this module's tests between others (longest first),
# and a module fixture ends at every change of module: one server start per test.
@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A migrated database: a fresh home's `toka server start` is test_server.py's.
    home = migrated_home(tmp_path_factory.mktemp("warm") / "prefect-home")
    running = Server(home)
    started = running.toka("server", "start", "--port", str(free_port()), cwd=home.parent)
    assert started.returncode == 0, started.stderr
    assert "warm process: pid" in started.stdout, started.stdout
    yield running
    stopped = running.toka("server", "stop", cwd=home.parent)
    assert stopped.returncode == 0, stopped.stderr
    assert not (home / "toka-warm.sock").exists()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copytree(AGENT_SPECS, tmp_path / "agent_specs")
    (tmp_path / "README.md").write_text("# demo\n")
    return tmp_path


def test_a_warm_run_has_the_commands_directory_environment_streams_and_exit_status(
        server: Server, workspace: Path) -> None:
    before = len(server.forks())
    run = server.toka("run", "--agent", "repo-survey", "--model", "offline", "--retry-delay", "0", "--json", "out.json",
                      cwd=workspace, TOKA_OFFLINE_REQUEST_LOG=str(workspace / "requests.jsonl"))
    assert run.returncode == 0, run.stderr
    assert "warm start" in run.stderr and "using the toka server at" in run.stderr
    assert server.forks()[before:] == [str(workspace)]
    # Its output went to this command's pipes; relative paths are the command's own.
    assert "Prefect UI:  http://127.0.0.1:" in run.stdout
    assert all(a["tasks_done"] == a["tasks_total"] for a in summary(workspace / "out.json")["agents"])
    # The environment is the command's (the warm process never had this variable).
    assert log_lines(workspace / "requests.jsonl"), "the offline model did not see the command's environment"
    assert not (Path(server.home.parent) / "out.json").exists()

    # Bad input exits 2 with its located message, as in a process of its own.
    bad = server.toka("run", "no/such/specs", cwd=workspace)
    assert bad.returncode == 2, bad.stderr
    assert "no/such/specs" in bad.stderr and "Traceback" not in bad.stderr
    assert server.forks()[-1] == str(workspace)

    # TOKA_WARM=0 runs it in the command's own process.
    forks = len(server.forks())
    cold = server.toka("run", "--model", "offline", "--retry-delay", "0", "--resume", cwd=workspace, TOKA_WARM="0")
    assert cold.returncode == 0, cold.stderr
    assert "warm start" not in cold.stderr and len(server.forks()) == forks


def _started(server: Server, workspace: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TOKA, "run", "--agent", "repo-survey", "--model", "offline", "--retry-delay", "0"], cwd=workspace, stdout=subprocess.DEVNULL,
        stderr=open(workspace / "err.txt", "w"), text=True, start_new_session=True,
        env={**server.env, "TOKA_OFFLINE_LATENCY": "0.3", "TOKA_OFFLINE_REQUEST_LOG": str(workspace / "requests.jsonl")})


def _wait_for_requests(workspace: Path, proc: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 120
    while len(log_lines(workspace / "requests.jsonl")) < count:
        assert proc.poll() is None, (workspace / "err.txt").read_text()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def _processes_in(directory: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == directory:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_sigterm_to_the_command_stops_the_warm_run_and_resume_finishes_it(server: Server, workspace: Path) -> None:
    proc = _started(server, workspace)
    try:
        _wait_for_requests(workspace, proc, 3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (workspace / "err.txt").read_text()
    assert "warm start" in err
    assert proc.returncode == 143, err
    key = re.search(r"^run (\w+): ", err, re.M)
    assert key and err.strip().splitlines()[-1] == f"terminated; continue with: toka run --resume (run {key[1]})"
    assert "Traceback" not in err

    log = workspace / "requests.jsonl"
    stopped = log_lines(log)
    resumed = server.toka("run", "--resume", "--json", "out.json", cwd=workspace, TOKA_OFFLINE_REQUEST_LOG=str(log))
    assert resumed.returncode == 0, resumed.stderr
    assert "warm start" in resumed.stderr
    after = log_lines(log)[len(stopped):]
    assert after, "the resume asked the model nothing: the stop came after the run's end"
    data = summary(workspace / "out.json")
    assert all(a["tasks_done"] == a["tasks_total"] for a in data["agents"])
    assert_answered_not_asked_again(stopped, after, data)


def test_kill_9_of_the_command_ends_the_warm_run(server: Server, workspace: Path) -> None:
    proc = _started(server, workspace)
    try:
        _wait_for_requests(workspace, proc, 3)
        assert len(_processes_in(workspace)) >= 2, "no warm run next to the command"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _processes_in(workspace) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_in(workspace), "the run outlived its command"
        requests = len(log_lines(workspace / "requests.jsonl"))
        time.sleep(1.5)
        assert len(log_lines(workspace / "requests.jsonl")) == requests, "the run still asks the model"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_code_changed_since_the_server_started_is_never_run_warm(server: Server, workspace: Path) -> None:
    # Another import path stands for any change of the code (toka's files, the packages).
    forks = len(server.forks())
    run = server.toka("run", "--agent", "repo-survey", "--model", "offline", "--retry-delay", "0", cwd=workspace,
                      PYTHONPATH=str(workspace / "elsewhere"))
    assert run.returncode == 0, run.stderr
    assert "changed since `toka server start`" in run.stderr and "warm start" not in run.stderr
    assert len(server.forks()) == forks
    # That warm process is gone (its code is stale); `toka server start` starts a fresh one.
    deadline = time.monotonic() + 10
    while "no warm process" not in (status := server.toka("server", "status", cwd=workspace)).stdout:
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.2)
    restarted = server.toka("server", "start", cwd=workspace)
    assert "already running" in restarted.stdout and "warm process: pid" in restarted.stdout
    again = server.toka("run", "--model", "offline", "--retry-delay", "0", "--resume", cwd=workspace)
    assert again.returncode == 0 and "warm start" in again.stderr, again.stderr
