"""`toka run` as users run it: a real process.

What the run does and records is checked on the session's shared Prefect server
(``prefect_api``: PREFECT_API_URL, as with a server that outlives runs); the embedded
server's own path (starting it, killing it, resuming after a kill) is checked in
test_run_lifecycle.py and, on a terminal, in test_cli_output.py.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import AGENT_SPECS, PREFECT_HOME, PrefectServer, migrated_home

pytestmark = pytest.mark.slow

TOKA = str(Path(sys.executable).with_name("toka"))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small Python repository with the project's own agent specs."""
    shutil.copytree(AGENT_SPECS, tmp_path / "agent_specs")
    (tmp_path / "README.md").write_text("# demo\n\nRun `pytest`.\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\ndependencies = ["requests>=2"]\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_demo.py").write_text("def test_ok():\n    assert True\n")
    return tmp_path


def env(**extra: str) -> dict[str, str]:
    # One Prefect home for every CLI run of the session, from the session's migrated database:
    # the embedded server starts faster with an existing one.
    base = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    home = extra.get("PREFECT_HOME") or str(migrated_home(PREFECT_HOME / "cli"))
    return {**base, "PREFECT_HOME": home, "NO_COLOR": "1", "COLUMNS": "200", **extra}


def toka_run(cwd: Path, *args: str, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOKA, "run", *args], cwd=cwd, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


def summary(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def tasks_by_state(data: dict[str, Any], state: str) -> set[tuple[str, int]]:
    return {(a["name"], t["index"]) for a in data["agents"] for t in a["tasks"] if t["state"] == state}


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def requested_tasks(requests: list[dict[str, Any]], *, answer: str | None = None) -> set[tuple[str, int]]:
    """(agent, task) of the offline model's logged ``requests`` (only those it answered with ``answer``)."""
    return {(r["agent"], int(r["task"])) for r in requests if answer is None or r["answer"] == answer}


def assert_answered_not_asked_again(stopped: list[dict[str, Any]], resumed: list[dict[str, Any]],
                                    data: dict[str, Any]) -> None:
    """No task the model answered before a stop (``stopped``: its logged requests) asks it again in
    the resume (``resumed``; ``data`` its summary): one whose result Prefect had persisted is
    replayed from the cache, one stopped between its answer and that (milliseconds) from its journal."""
    answered = requested_tasks(stopped, answer="submit_result")
    assert not answered & requested_tasks(resumed), "a task answered before the stop asked the model again"
    rows = {(a["name"], t["index"]): t for a in data["agents"] for t in a["tasks"]}
    assert all(rows[key]["state"] == "cached" or rows[key]["replayed"] for key in answered)


@pytest.fixture
def api(prefect_api: PrefectServer) -> dict[str, str]:
    """Environment for a `toka run` on the session's shared Prefect server (no embedded server)."""
    return {"PREFECT_API_URL": prefect_api.url}


def test_offline_run_then_resume_replays_everything(workspace: Path, api: dict[str, str]) -> None:
    # On the shared server; the embedded server's own lines ("starting Prefect's embedded
    # server", no "Prefect UI:") are checked on a real terminal in test_cli_output.py.
    out = workspace / "summary.json"
    survey = workspace / "agent_specs" / "repo-survey.yaml"
    survey.write_text(survey.read_text().replace("\nspec:\n", "\nspec:\n  colour: blue\n", 1))
    first = toka_run(workspace, "--json", str(out), **api)
    assert first.returncode == 0, first.stderr
    assert "model: offline (no ANTHROPIC_API_KEY set)" in first.stderr
    # A field the runtime does not read is kept; the run says there is something to look at.
    assert "warning: 1 spec warning in 1 file; `toka validate` lists them" in first.stderr
    assert "5/5 agents completed (offline model: placeholder results)" in first.stdout
    data = summary(out)
    assert data["format"] == "toka-run/1" and data["state"] == "completed" and data["offline"]
    assert [a["name"] for a in data["agents"]] == [
        "repo-survey", "dependency-audit", "test-health", "docs-refresh", "release-notes"]
    assert all(a["tasks_done"] == a["tasks_total"] == 4 for a in data["agents"])
    # No language model ran: requests are counted, tokens are not made up.
    assert re.search(r"\b0 tokens in [1-9]\d* model requests", first.stdout), first.stdout
    assert all(a["usage"]["total_tokens"] == 0 < a["usage"]["requests"] for a in data["agents"])
    # The offline model really used the read-only tools on the workspace.
    survey = data["agents"][0]["tasks"]
    assert any("pyproject.toml" in t["files_touched"] for a in data["agents"] for t in a["tasks"])
    assert survey[0]["result"]["summary"].startswith("[offline model")
    assert (workspace / ".toka" / "results").is_dir()
    # It says where everything is; the reports are Markdown files.
    assert "starting Prefect's embedded server" not in first.stderr  # PREFECT_API_URL named a server
    key = data["run_key"]
    reports = workspace / ".toka" / "reports" / key
    assert f"reports:     .toka/reports/{key}/ (pipeline.md, and <agent>.md for each agent)" in first.stdout
    assert sorted(p.name for p in reports.iterdir()) == sorted(
        ["pipeline.md", *(f"{a['name']}.md" for a in data["agents"])])
    assert (reports / "pipeline.md").read_text().startswith("# Pipeline: completed")
    assert (reports / "repo-survey.md").read_text().startswith("# repo-survey: completed")
    assert f"audit trail: .toka/audit/{key}.jsonl (toka audit --run {key})" in first.stdout
    assert (workspace / ".toka" / "audit" / f"{key}.jsonl").is_file()
    assert f"summary:     {out}" in first.stdout
    # The server outlives the run: the run's page in its UI.
    ui = api["PREFECT_API_URL"].removesuffix("/api")
    assert f"Prefect UI:  {ui}/runs/flow-run/{data['flow_run_id']}" in first.stdout
    assert (workspace / ".toka" / ".gitignore").read_text().splitlines()[-1] == "*"

    again = toka_run(workspace, "--resume", "--json", str(out), **api)
    assert again.returncode == 0, again.stderr
    assert "resuming run " + data["run_key"] in again.stderr
    assert "20 tasks replayed from cache" in again.stdout
    assert tasks_by_state(summary(out), "cached") == tasks_by_state(data, "completed")

    # A new run (nightly) redoes the work: here of one agent, chosen on the command line...
    fresh = toka_run(workspace, "--agent", "repo-survey", "--model", "offline", "--json", str(out), **api)
    assert fresh.returncode == 0, fresh.stderr
    selected = summary(out)
    assert selected["run_key"] != data["run_key"]
    assert tasks_by_state(selected, "cached") == set()
    # ...and its resume runs what it selected, with no selection repeated (one agent, not all five).
    resumed = toka_run(workspace, "--resume", "--json", str(out), **api)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run " + selected["run_key"] in resumed.stderr
    data = summary(out)
    assert [a["name"] for a in data["agents"]] == ["repo-survey"]
    assert tasks_by_state(data, "cached") == {("repo-survey", i) for i in range(1, 5)}


def test_injected_fault_fails_the_run_and_resume_finishes_it(workspace: Path, api: dict[str, str]) -> None:
    faults = workspace / "faults.txt"
    faults.write_text("docs-refresh:1\n")
    log = workspace / "requests.jsonl"
    out = workspace / "summary.json"
    failed = toka_run(workspace, "--json", str(out), TOKA_OFFLINE_FAULTS=str(faults),
                      TOKA_OFFLINE_REQUEST_LOG=str(log), **api)
    assert failed.returncode == 1, failed.stderr
    data = summary(out)
    docs = next(a for a in data["agents"] if a["name"] == "docs-refresh")
    assert docs["state"] == "failed" and "injected fault for docs-refresh:1" in docs["reason"]
    notes = next(a for a in data["agents"] if a["name"] == "release-notes")
    assert notes["state"] == "completed"  # docs-refresh is only an optional dependency of it
    assert "Traceback" not in failed.stderr + failed.stdout
    first_requests = len(log_lines(log))

    faults.unlink()
    resumed = toka_run(workspace, "--resume", "--json", str(out), TOKA_OFFLINE_REQUEST_LOG=str(log), **api)
    assert resumed.returncode == 0, resumed.stderr
    later = log_lines(log)[first_requests:]
    # Only docs-refresh had unfinished work... and release-notes, whose inputs
    # (docs-refresh's results) changed, so its cached answers no longer apply.
    assert {r["agent"] for r in later} == {"docs-refresh", "release-notes"}
    data = summary(out)
    assert data["state"] == "completed"
    for name in ("repo-survey", "dependency-audit", "test-health"):
        assert all(t["state"] == "cached" for t in next(a for a in data["agents"] if a["name"] == name)["tasks"])


def test_bad_input_exits_2_without_starting_prefect(tmp_path: Path) -> None:
    (tmp_path / "agent_specs").mkdir()
    (tmp_path / "agent_specs" / "x.yaml").write_text("metadata: {name: x}\n")
    home = tmp_path / "prefect-home"  # an embedded server would create its database here
    result = toka_run(tmp_path, PREFECT_HOME=str(home))
    assert result.returncode == 2
    assert "x.yaml" in result.stderr and "spec: required field is missing" in result.stderr
    assert "Traceback" not in result.stderr
    # Checked by what it leaves, not by a wall-clock bound a busy machine could break.
    assert not (home / "prefect.db").exists()
    assert "starting Prefect's embedded server" not in result.stderr

    nothing = toka_run(tmp_path / "agent_specs", "--resume", str(AGENT_SPECS))
    assert nothing.returncode == 2
    assert "nothing to resume" in nothing.stderr


def test_a_prefect_api_that_never_answers_is_one_clear_line(workspace: Path) -> None:
    # Nothing listens on the discard port: the run cannot start, and says why.
    down = toka_run(workspace, "--agent", "repo-survey", PREFECT_API_URL="http://127.0.0.1:9/api")
    assert down.returncode == 1
    assert "cannot reach the Prefect API at PREFECT_API_URL=http://127.0.0.1:9/api" in down.stderr
    assert "toka run --resume" in down.stderr and "Traceback" not in down.stderr

    # An embedded server that cannot start in time (1 s) is named, with the setting to raise.
    slow = toka_run(workspace, "--agent", "repo-survey", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1",
                    PREFECT_HOME=str(workspace / "fresh-prefect-home"))
    assert slow.returncode == 1
    assert "embedded server did not start within 1 s" in slow.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in slow.stderr and "Traceback" not in slow.stderr
