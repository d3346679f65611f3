"""`toka server start|stop|status`: a local Prefect server that outlives runs, used by `toka run`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from .conftest import AGENT_SPECS
from .test_cli_run import TOKA

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_server_outlives_two_runs_and_stops_cleanly(tmp_path: Path) -> None:
    home, workspace = tmp_path / "prefect-home", tmp_path / "ws"
    shutil.copytree(AGENT_SPECS, workspace / "agent_specs")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "ANTHROPIC_API_KEY")}
    env.update(PREFECT_HOME=str(home), NO_COLOR="1", COLUMNS="200")

    def toka(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TOKA, *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=timeout)

    port = _free_port()
    started = toka("server", "start", "--port", str(port))
    try:
        assert started.returncode == 0, started.stderr
        assert f"UI http://127.0.0.1:{port}" in started.stdout
        assert toka("server", "start", "--port", str(port)).stdout.startswith("Prefect server already running")
        status = toka("server", "status")
        assert status.returncode == 0 and f"http://127.0.0.1:{port}" in status.stdout

        keys = []
        for _ in range(2):
            run = toka("run", "--model", "offline", "--retry-delay", "0")
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
