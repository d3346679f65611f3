"""How a real `toka run` process ends: SIGTERM, a dead Prefect API, kill -9, a stray SIGINT.

Every run stopped here runs on its own embedded server, the thing under test. What a
resume then does is the same on any server: the resumes after SIGTERM and after a dead
server run on the session's shared server (``prefect_api``, no 10-30 s start each); the
resume after kill -9 runs on the embedded server again, on the database the killed one left.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import PrefectServer
from .test_cli_run import (
    TOKA, assert_answered_not_asked_again, env, log_lines, requested_tasks, summary, tasks_by_state, toka_run,
)
from .test_cli_run import workspace  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

#: Where a run is stopped midway, one agent (four tasks, about ten model requests at 0.3 s) is
#: enough: how the process ends does not depend on how many agents it runs; the kill -9 test
#: runs all five, for what a resume replays across agents.
ONE_AGENT = ("--agent", "repo-survey")
SERVER_APP = "toka.server:create_app"  # the embedded server's uvicorn factory (Prefect's app, IMMEDIATE SQLite)


class Run:
    """`toka run` in its own process group, slowed down so it can be hit midway; its stderr in err.txt."""

    def __init__(self, workspace: Path, *args: str, ignore_sigint: bool, **extra_env: str) -> None:
        self.workspace = workspace
        with open(workspace / "err.txt", "w") as stderr:
            self.proc = subprocess.Popen(
                [TOKA, "run", *args], cwd=workspace, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                env=env(TOKA_OFFLINE_LATENCY="0.3", TOKA_OFFLINE_REQUEST_LOG=str(workspace / "requests.jsonl"),
                        **extra_env),
                start_new_session=True,
                # What `cmd &` in a shell script does to its commands.
                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
            )
        self._server: int | None = None

    def server(self) -> int:
        """The pid of the Prefect server toka started (its child)."""
        if self._server is None:
            self._server = embedded_server(self.proc.pid)
        assert self._server is not None, "toka has no embedded server"
        return self._server

    def wait_for_results(self, count: int) -> None:
        deadline = time.monotonic() + 180
        while sum(1 for r in log_lines(self.workspace / "requests.jsonl") if r["answer"] == "submit_result") < count:
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> float:
        started = time.monotonic()
        self.proc.wait(timeout=timeout)
        return time.monotonic() - started

    def stderr(self) -> str:
        return (self.workspace / "err.txt").read_text()

    def last_line(self) -> str:
        return self.stderr().strip().splitlines()[-1]


@contextmanager
def started_run(workspace: Path, *args: str, ignore_sigint: bool = False, **extra_env: str) -> Iterator[Run]:
    run = Run(workspace, *args, ignore_sigint=ignore_sigint, **extra_env)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run._server = run._server or embedded_server(run.proc.pid)
            os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        if run._server is not None and alive(run._server):
            os.kill(run._server, signal.SIGKILL)


def embedded_server(parent: int) -> int | None:
    """The pid of the Prefect server `parent` started, if it is still its child."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and SERVER_APP.encode() in argv:
            return int(entry.name)
    return None


def server_port(pid: int) -> int:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return int(argv[argv.index("--port") + 1])


def alive(pid: int) -> bool:
    """Running or stopped; a zombie is dead (this container's init may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_resume_finishes(workspace: Path, api: PrefectServer) -> None:
    """The resume finishes the run, and no task the model answered before the stop asks it again
    (:func:`assert_answered_not_asked_again`)."""
    log = workspace / "requests.jsonl"
    stopped = log_lines(log)
    assert requested_tasks(stopped, answer="submit_result")
    out = workspace / "summary.json"
    resumed = toka_run(workspace, "--resume", "--json", str(out), PREFECT_API_URL=api.url,
                       TOKA_OFFLINE_REQUEST_LOG=str(log))
    assert resumed.returncode == 0, resumed.stderr
    data = summary(out)
    assert all(a["tasks_done"] == a["tasks_total"] for a in data["agents"])
    assert_answered_not_asked_again(stopped, log_lines(log)[len(stopped):], data)


def test_sigterm_ends_the_run_like_ctrl_c(workspace: Path, prefect_api: PrefectServer) -> None:
    with started_run(workspace, *ONE_AGENT) as run:
        run.wait_for_results(1)
        server = run.server()
        run.proc.send_signal(signal.SIGTERM)
        took = run.wait_exit(60)
    err = run.stderr()
    assert run.proc.returncode == 143, err
    assert "Traceback" not in err and "TerminationSignal" not in err
    key = re.search(r"^run (\w+): ", err, re.M)
    assert key, err
    assert run.last_line() == f"terminated; continue with: toka run --resume (run {key[1]})"
    assert took < 30
    assert not alive(server)
    assert_resume_finishes(workspace, prefect_api)


def runs_of(api: PrefectServer, key: str) -> list[dict[str, Any]]:
    """The pipeline runs of run ``key`` on ``api`` (every attempt), then their agents' runs."""
    pipelines = httpx.post(f"{api.url}/flow_runs/filter", timeout=30, json={
        "flows": {"name": {"any_": ["toka-pipeline"]}}, "sort": "START_TIME_DESC", "limit": 200, "offset": 0}).json()
    mine = [r for r in pipelines if (r["parameters"].get("run") or {}).get("run_key") == key]
    assert mine, f"no pipeline run of run {key}"
    return mine + httpx.post(f"{api.url}/flow_runs/filter", timeout=30, json={
        "flow_runs": {"parent_flow_run_id": {"any_": [r["id"] for r in mine]}}, "limit": 50, "offset": 0}).json()


def run_key(err: str) -> str:
    key = re.search(r"^(?:run|resuming run) (\w+): ", err, re.M)
    assert key, err
    return key[1]


def test_sigterm_on_a_lasting_server_leaves_no_agent_run_running(workspace: Path, prefect_api: PrefectServer) -> None:
    """On a server that outlives the run (`toka server`), the agents' runs end with it in the UI."""
    with started_run(workspace, "--max-concurrency", "4", PREFECT_API_URL=prefect_api.url) as run:
        run.wait_for_results(3)  # three tasks of the first agent done, its fourth under way
        run.proc.send_signal(signal.SIGTERM)
        run.wait_exit(60)
    assert run.proc.returncode == 143, run.stderr()
    key = run_key(run.stderr())
    runs = runs_of(prefect_api, key)
    assert [r["name"].split()[0] for r in runs] == ["toka-pipeline", "repo-survey"]
    assert {r["state"]["type"] for r in runs} <= {"CRASHED", "CANCELLED"}, [(r["name"], r["state"]["name"]) for r in runs]
    # The UI says what stopped it and how to go on (Prefect's own words were "Execution was
    # cancelled by the runtime environment"), and the run's name carries its key and workspace.
    assert runs[0]["state"]["message"] == (f"terminated (SIGTERM) in toka run; continue with: toka run --resume "
                                           f"(run {key}) in {workspace}")
    assert runs[0]["name"].endswith(f" {workspace.name} (run {key})")


@pytest.mark.parametrize("then", [("--resume",), ()], ids=["resumed", "a new run"])
def test_the_next_run_after_kill_9_on_a_lasting_server_ends_what_the_killed_one_left_running(
    workspace: Path, prefect_api: PrefectServer, then: tuple[str, ...]
) -> None:
    """kill -9 leaves no process to say the run ended: the next run in the workspace says it, in the UI."""
    with started_run(workspace, PREFECT_API_URL=prefect_api.url) as run:
        run.wait_for_results(3)
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
    key = run_key(run.stderr())
    left = runs_of(prefect_api, key)
    assert {r["state"]["type"] for r in left} == {"RUNNING"}, [(r["name"], r["state"]["name"]) for r in left]

    following = toka_run(workspace, *then, PREFECT_API_URL=prefect_api.url)
    assert following.returncode == 0, following.stderr
    # The two flow runs, the task run standing for the agent's in the pipeline's, and any task under way.
    assert re.search(f"run {key} here had ended without saying so \\(killed\\?\\): [3-9] of its runs left "
                     "Running in the Prefect API are marked Crashed", following.stderr), following.stderr
    ids = {r["id"] for r in left}
    earlier = [r for r in runs_of(prefect_api, key) if r["id"] in ids]
    assert {r["state"]["type"] for r in earlier} == {"CRASHED"}
    assert all("found by the next toka run in" in r["state"]["message"] for r in earlier)
    tasks = httpx.post(f"{prefect_api.url}/task_runs/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": sorted(ids)}}, "limit": 200, "offset": 0}).json()
    assert tasks and not [t["name"] for t in tasks if t["state"]["type"] in ("RUNNING", "PENDING")]
    # Said once: the run that completed left nothing Running.
    assert "without saying so" not in toka_run(workspace, "--resume", PREFECT_API_URL=prefect_api.url).stderr


def test_a_dead_embedded_server_stops_the_run_within_seconds(workspace: Path, prefect_api: PrefectServer) -> None:
    with started_run(workspace, *ONE_AGENT) as run:
        run.wait_for_results(1)
        url = f"http://127.0.0.1:{server_port(run.server())}/api"
        os.kill(run.server(), signal.SIGKILL)
        took = run.wait_exit(60)
    err = run.stderr()
    assert run.proc.returncode == 1, err
    assert "Traceback" not in err and err.count("stopped answering") == 1
    assert "failed to process item" not in err  # Prefect's services' errors, each a whole event
    assert run.last_line().startswith(f"error: the Prefect API at {url} stopped answering: its embedded server "
                                      "was killed by SIGKILL; continue with: toka run --resume (run ")
    assert took < 15
    assert_resume_finishes(workspace, prefect_api)


def test_a_hung_embedded_server_stops_the_run_and_is_killed(workspace: Path) -> None:
    with started_run(workspace, *ONE_AGENT) as run:
        run.wait_for_results(1)
        os.kill(run.server(), signal.SIGSTOP)  # alive, but answers nothing
        took = run.wait_exit(90)
        assert run.proc.returncode == 1, run.stderr()
        assert "stopped answering: its embedded server is stopped for 15 s; continue with" in run.last_line()
        assert took < 35
        deadline = time.monotonic() + 5
        while alive(run.server()):
            assert time.monotonic() < deadline, "the hung server was left behind"
            time.sleep(0.1)


def test_kill_9_takes_the_embedded_server_with_it_and_resume_repeats_no_finished_task(workspace: Path) -> None:
    with started_run(workspace) as run:
        # Killed once a few tasks have submitted results, well before the end (46 requests).
        run.wait_for_results(6)
        port = server_port(run.server())
        assert listening(port)
        os.kill(run.proc.pid, signal.SIGKILL)  # toka alone, not its process group
        run.proc.wait()
        deadline = time.monotonic() + 5
        while alive(run.server()) or listening(port):
            assert time.monotonic() < deadline, f"the embedded server (pid {run.server()}) outlived toka"
            time.sleep(0.1)
        try:  # anything else of the killed run goes too, before its requests are counted
            os.killpg(run.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = workspace / "requests.jsonl"
    killed_run = log_lines(log)
    assert len(killed_run) < 40

    # The resume starts an embedded server of its own, on the database the killed one left.
    out = workspace / "summary.json"
    resumed = toka_run(workspace, "--resume", "--json", str(out), TOKA_OFFLINE_REQUEST_LOG=str(log))
    assert resumed.returncode == 0, resumed.stderr
    assert "starting Prefect's embedded server" in resumed.stderr
    data = summary(out)
    assert data["state"] == "completed"
    assert all(a["tasks_done"] == a["tasks_total"] for a in data["agents"])

    replayed = tasks_by_state(data, "cached")
    assert replayed, "nothing finished before the kill was replayed"
    asked_again = requested_tasks(log_lines(log)[len(killed_run):])
    assert not replayed & asked_again, "a finished task's model requests were repeated"
    # Every task that submitted a result before the kill and was persisted is replayed, not redone.
    submitted_before = requested_tasks(killed_run, answer="submit_result")
    assert len(submitted_before - replayed) <= 1  # at most the one killed between submit and persist


def test_sigint_to_a_background_runs_group_leaves_its_server_alone(workspace: Path) -> None:
    # `toka run &` in a script ignores SIGINT; a Ctrl-C at the script's terminal reached the
    # whole process group and killed the embedded server under a run that went on.
    with started_run(workspace, *ONE_AGENT, ignore_sigint=True) as run:
        run.wait_for_results(1)
        os.killpg(run.proc.pid, signal.SIGINT)
        run.wait_exit(120)
    assert run.proc.returncode == 0, run.stderr()
