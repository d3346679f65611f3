"""`toka server start|stop|status`: a local Prefect server that outlives runs, used by `toka run`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import AGENT_SPECS, free_port
from .test_cli_run import TOKA


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_a_server_outlives_two_runs_and_stops_cleanly(tmp_path: Path) -> None:
    home, workspace = tmp_path / "prefect-home", tmp_path / "ws"  # a fresh home, as a new user's
    shutil.copytree(AGENT_SPECS, workspace / "agent_specs")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "ANTHROPIC_API_KEY")}
    env.update(PREFECT_HOME=str(home), NO_COLOR="1", COLUMNS="200")

    def toka(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TOKA, *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=timeout)

    port = free_port()
    started = toka("server", "start", "--port", str(port))
    try:
        assert started.returncode == 0, started.stderr
        assert f"UI http://127.0.0.1:{port}" in started.stdout
        assert toka("server", "start", "--port", str(port)).stdout.startswith("Prefect server already running")
        status = toka("server", "status")
        assert status.returncode == 0 and f"http://127.0.0.1:{port}" in status.stdout

        keys = []
        for _ in range(2):
            run = toka("run", "--agent", "repo-survey", "--model", "offline", "--retry-delay", "0")
            assert run.returncode == 0, run.stderr
            assert f"using the toka server at http://127.0.0.1:{port}" in run.stderr
            assert "starting Prefect's embedded server" not in run.stderr
            assert f"Prefect UI:  http://127.0.0.1:{port}/runs/flow-run/" in run.stdout
            keys.append(run.stdout.split("/runs/flow-run/")[1].split()[0])

        # Both runs are still there, after their processes ended.
        for flow_run_id in keys:
            found = httpx.get(f"http://127.0.0.1:{port}/api/flow_runs/{flow_run_id}", timeout=10).json()
            assert found["state"]["type"] == "COMPLETED" and found["name"].startswith("toka-pipeline")

        # PREFECT_API_URL keeps precedence: a run given another API does not use the server.
        elsewhere = subprocess.run([TOKA, "run", "--model", "offline"], cwd=workspace, capture_output=True, text=True,
                                   env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}, timeout=240)
        assert "using the toka server" not in elsewhere.stderr
        assert "cannot reach the Prefect API at PREFECT_API_URL=http://127.0.0.1:9/api" in elsewhere.stderr
    finally:
        stopped = toka("server", "stop")
    assert stopped.returncode == 0 and f"stopped the Prefect server at http://127.0.0.1:{port}" in stopped.stdout
    assert not _listening(port), "something still listens on the server's port"
    after = toka("server", "status")
    assert after.returncode == 1 and "not running" in after.stdout
    assert toka("server", "stop").stdout.strip() == "no toka server is running"


@pytest.mark.parametrize("which", ["server", "warm process"])
def test_a_pid_taken_over_by_another_process_is_never_signalled(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recorded process exited long ago and its pid now belongs to another program (pids
    # wrap at 32768 on many machines): `toka server stop` and `status` must leave that alone.
    from toka import server as local

    monkeypatch.setattr(local, "prefect_home", lambda: tmp_path)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        me = os.getpid()
        ours = local.process_started(other.pid)
        assert ours is not None
        record = {"pid": other.pid, "started": ours - 1} if which == "server" else \
            {"pid": me, "started": local.process_started(me), "warm_pid": other.pid, "warm_started": ours - 1}
        state = tmp_path / local.STATE_FILE
        state.write_text(json.dumps({"host": "127.0.0.1", "port": 9, "log": "x", **record}))
        if which == "server":
            assert local.recorded_server() is None and not state.exists()
            assert local.stop_server() is None
        else:
            recorded = local.recorded_server()
            assert recorded is not None and not recorded.warm
            monkeypatch.setattr(local, "_terminate", _terminate_only_warm(local._terminate, other.pid))
            local.stop_server(timeout=1)
        assert other.poll() is None, f"the other program's process was signalled ({other.returncode})"
    finally:
        other.kill()
        other.wait()


def _terminate_only_warm(terminate, warm_pid):  # type: ignore[no-untyped-def]
    """`_terminate` as is for the warm pid; the test's own process (the recorded server) is spared."""
    def only_warm(pid: int, **kwargs):  # type: ignore[no-untyped-def]
        if pid == warm_pid:
            terminate(pid, **kwargs)
    return only_warm


def test_status_and_stop_find_the_home_prefect_would_without_importing_prefect(tmp_path: Path) -> None:
    # `toka server status` and `stop` only need the home; importing Prefect for it cost 3 s.
    home = tmp_path / "home"
    home.mkdir()
    probe = (
        "import sys\n"
        "from toka.warm import main\n"
        "sys.argv = ['toka', 'server', sys.argv[1]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code)\n"
        "print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    for command, said, code in (("status", "not running", "exit 1"), ("stop", "no toka server is running", "exit 0")):
        done = subprocess.run([sys.executable, "-c", probe, command], env={**env, "PREFECT_HOME": str(home)},
                              capture_output=True, text=True, timeout=60)
        assert said in done.stdout and code in done.stdout, (done.stdout, done.stderr)
        assert "prefect not imported" in done.stdout

    # The same directory as Prefect's own settings give, "~" included.
    check = ("import os; from pathlib import Path; from toka.server import prefect_home; "
             "from prefect.settings import get_current_settings; "
             "print(prefect_home() == Path(get_current_settings().home).expanduser() == Path(os.environ['HOME'], 'ph'))")
    same = subprocess.run([sys.executable, "-c", check], env={**env, "HOME": str(tmp_path), "PREFECT_HOME": "~/ph"},
                          capture_output=True, text=True, timeout=60)
    assert same.stdout.strip() == "True", same.stderr


def test_toka_servers_record_task_runs_in_batches_unless_the_person_chose_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect writes each task-run event in a transaction of its own; toka's servers batch them
    (the server's CPU per task, shared by every agent), but a setting of the person's wins."""
    from toka.server import SERVER_DEFAULTS, server_environment

    batch = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"
    monkeypatch.delenv(batch, raising=False)
    assert server_environment({"PREFECT_HOME": "x"})[batch] == SERVER_DEFAULTS[batch] == "100"
    assert server_environment({"PREFECT_HOME": "x", batch: "7"})[batch] == "7"  # the environment's

    # A Prefect profile's (read from the process's settings, not the environment) wins too.
    from prefect.settings import PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE as setting
    from prefect.settings import temporary_settings

    with temporary_settings({setting: 9}):
        assert batch not in server_environment({"PREFECT_HOME": "x"})  # the server reads the profile itself


@pytest.mark.slow
def test_every_task_run_of_a_run_on_the_embedded_server_is_recorded(tmp_path: Path) -> None:
    """Recorded in batches, the run's last task runs are written when its embedded server stops:
    a person who starts `toka server` afterwards sees every one of them in the UI."""
    home, workspace = tmp_path / "prefect-home", tmp_path / "ws"
    shutil.copytree(AGENT_SPECS, workspace / "agent_specs")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "ANTHROPIC_API_KEY")}
    env.update(PREFECT_HOME=str(home), NO_COLOR="1", COLUMNS="200")

    def toka(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TOKA, *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=240)

    run = toka("run", "--agent", "repo-survey", "--model", "offline", "--retry-delay", "0")
    assert run.returncode == 0, run.stderr
    assert "starting Prefect's embedded server" in run.stderr
    port = free_port()
    assert toka("server", "start", "--port", str(port)).returncode == 0
    try:
        task_runs = httpx.post(f"http://127.0.0.1:{port}/api/task_runs/filter", timeout=10, json={
            "task_runs": {"name": {"like_": "repo-survey - "}}, "limit": 50, "offset": 0}).json()
    finally:
        toka("server", "stop")
    names = sorted(t["name"].split(" - ")[1] for t in task_runs)
    assert names == ["1/4", "2/4", "3/4", "4/4"], [t["name"] for t in task_runs]
    assert all(t["state"]["type"] == "COMPLETED" for t in task_runs), [t["state"] for t in task_runs]


def test_a_killed_servers_warm_process_goes_with_its_record(tmp_path: Path) -> None:
    """The server killed, its warm process (~150 MB) lived on, unseen by `toka server stop`."""
    import signal
    import time

    from toka.server import STATE_FILE

    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), NO_COLOR="1")

    def toka(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TOKA, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)

    started = toka("server", "start", "--port", str(free_port()))
    assert started.returncode == 0, started.stderr
    record = json.loads((home / STATE_FILE).read_text())
    assert record["warm_pid"]
    try:
        os.killpg(record["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{record['pid']}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = toka("server", "status")
        assert status.returncode == 1 and "not running" in status.stdout
        deadline = time.monotonic() + 10
        while _alive(record["warm_pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(record["warm_pid"]), "the warm process outlived its server's record"
    finally:
        for pid in (record["pid"], record["warm_pid"]):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return False
