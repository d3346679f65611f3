#!/usr/bin/env python
"""What a person sees in the Prefect UI after a run: screenshots from headless Chromium.

Starts a Prefect server (``prefect server start`` on a free loopback port, a
fresh ``PREFECT_HOME``), or uses the one in ``PREFECT_API_URL``; runs a small
pipeline offline (``toka run <specs> --model offline``, default the project's
``agent_specs/``, in a scratch workspace holding a copy of the specs, README.md
and pyproject.toml, so the checkout is not touched); then screenshots, with
headless Chromium (Debian package ``chromium``):

* ``pipeline-report.png``: the pipeline report artifact (the DAG, the agents table);
* ``agent-results.png``: the first agent's results table artifact;
* ``flow-run.png``: the pipeline's flow run page (its name, the run graph of
  its agents, the state message);
* ``agent-flow-run.png``: the first agent's flow run page (the run graph with
  its task names).

Look at the PNGs: text that the UI does not render (a mermaid block), boxes
for characters its graph font lacks, or an unreadable DAG show there and
nowhere else. The script prints the pages' URLs and the PNGs' paths; with
``--keep-server`` a server it started stays up for a look in a real browser
(stop it with the printed command).

    .venv/bin/python bench/ui_screenshot.py [--out DIR] [--agent NAME ...] [--specs DIR] [--fault AGENT:TASK]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # reach tests/

from tests.ports import free_port  # noqa: E402


def _start_server(home: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            sys.exit(f"prefect server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _api(url: str, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, url + path, timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


def _artifacts(url: str, run_ids: list[str]) -> list[dict[str, Any]]:
    return _api(url, "POST", "/artifacts/filter", json={  # type: ignore[no-any-return]
        "artifacts": {"flow_run_id": {"any_": run_ids}}, "sort": "CREATED_DESC", "limit": 200, "offset": 0})


def _children(url: str, run_id: str) -> list[dict[str, Any]]:
    return _api(url, "POST", "/flow_runs/filter", json={  # type: ignore[no-any-return]
        "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}, "sort": "START_TIME_ASC", "limit": 200,
        "offset": 0})


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium found: apt-get install -y chromium")


def screenshot(page: str, png: Path, *, size: str = "1400,1800", budget_ms: int = 15000) -> None:
    """One headless Chromium screenshot of ``page`` (a fresh profile every time)."""
    with tempfile.TemporaryDirectory(prefix="toka-chromium-") as profile:
        args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
                f"--window-size={size}", f"--virtual-time-budget={budget_ms}", page]
        result = subprocess.run(args, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not png.exists():
        sys.exit(f"chromium failed ({result.returncode}):\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "toka-ui-screenshots",
                        help="directory for the PNGs (default: %(default)s)")
    parser.add_argument("--specs", type=Path, default=ROOT / "agent_specs", help="spec directory to run")
    parser.add_argument("--agent", action="append", default=[], help="run only this agent (repeatable)")
    parser.add_argument("--fault", action="append", default=[], metavar="AGENT:TASK",
                        help="make this task fail (TOKA_OFFLINE_FAULTS), to see a failed run (repeatable)")
    parser.add_argument("--keep-server", action="store_true", help="leave a server this script started running")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="toka-ui-"))

    server = None
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        (scratch / "home").mkdir()
        started = time.monotonic()
        server, url = _start_server(scratch / "home", scratch / "server.log")
        print(f"prefect server at {url} in {time.monotonic() - started:.1f}s (log: {scratch / 'server.log'})")
    ui = url.removesuffix("/").removesuffix("/api")
    try:
        workspace = scratch / "workspace"
        shutil.copytree(args.specs, workspace / "specs")
        for name in ("README.md", "pyproject.toml"):
            if (ROOT / name).exists():
                shutil.copy(ROOT / name, workspace / name)
        summary_file = scratch / "summary.json"
        command = [str(BIN / "toka"), "run", str(workspace / "specs"), "--workspace", str(workspace),
                   "--model", "offline", "--retry-delay", "0", "--json", str(summary_file),
                   *(f"--agent={a}" for a in args.agent)]
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "COLUMNS": "160"}
        if server is not None:
            env["PREFECT_HOME"] = str(scratch / "home")
        if args.fault:
            (scratch / "faults.txt").write_text("".join(f"{f}\n" for f in args.fault))
            env["TOKA_OFFLINE_FAULTS"] = str(scratch / "faults.txt")
        for attempt in range(3):
            started = time.monotonic()
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            print(f"toka run: exit {run.returncode} in {time.monotonic() - started:.1f}s")
            # A busy machine can starve a SQLite-backed server past toka's 15 s health check:
            # then the run stops, and `--resume` continues it (what a person would do).
            if summary_file.exists() or "stopped answering" not in run.stderr or attempt == 2:
                break
            print("  " + run.stderr.strip().splitlines()[-1] + "; resuming")
            command = [str(BIN / "toka"), "run", "--resume", "--workspace", str(workspace), "--retry-delay", "0",
                       "--json", str(summary_file)]
        if not summary_file.exists():
            sys.exit(f"toka run wrote no summary:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        summary = json.loads(summary_file.read_text())
        run_id = summary["flow_run_id"]
        agent_runs = _children(url, run_id)
        artifacts = {a["key"]: a for a in _artifacts(url, [run_id, *(r["id"] for r in agent_runs)]) if a.get("key")}
        first_agent = summary["agents"][0]["name"]
        pages = {
            "pipeline-report": f"{ui}/artifacts/artifact/{artifacts['toka-pipeline-report']['id']}",
            "flow-run": f"{ui}/runs/flow-run/{run_id}",
        }
        # The agents' runs start in run order: the first is the first agent's.
        first_run = next((r for r in agent_runs if r["name"].startswith(first_agent)), None) or (
            agent_runs[0] if agent_runs else None)
        if first_run is not None:
            pages["agent-flow-run"] = f"{ui}/runs/flow-run/{first_run['id']}"
        results_key = f"{first_agent}-results"
        if results_key in artifacts:
            pages["agent-results"] = f"{ui}/artifacts/artifact/{artifacts[results_key]['id']}"
        for name, page in pages.items():
            png = args.out / f"{name}.png"
            started = time.monotonic()
            screenshot(page, png)
            print(f"{name}: {page}\n  -> {png} ({time.monotonic() - started:.1f}s)")
        print("flow runs: " + ", ".join(
            repr(r["name"]) for r in [_api(url, "GET", f"/flow_runs/{run_id}"), *agent_runs]))
    finally:
        if server is not None:
            if args.keep_server:
                print(f"server left running: PREFECT_API_URL={url}; stop it with: kill -- -{server.pid}")
            else:
                _stop(server)


if __name__ == "__main__":
    main()
