"""Secrets in what the model writes: its submitted results never reach anything the runtime writes.

A model that read a secret (a file, a command's output) can put it into the
result it submits. The step loop redacts that result once, when it is
submitted; the writers of reports, the ``--json`` summary, events and the audit
trail redact what they write again. The end-to-end test runs ``toka run`` with
a scripted model that submits the API key in every field it can, and then looks
for the key everywhere the run wrote: Prefect's artifacts, events and logs (read
back through its API, and its database file), the ``--json`` summary, the
terminal, the audit trail, result storage and the workspace state directory.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from toka.audit import AuditLog, read_audit
from toka.errors import InvalidToolInputError, TaskReportedFailure
from toka.model import ModelRequest, ModelResponse, override_model
from toka.redact import REDACTED, redact, redact_data
from toka.report import agent_markdown
from toka.results import AgentReport, PipelineSummary, TaskRecord, TaskResult
from toka.step import run_step
from toka.testing import FunctionModel, ScriptedModel, submit, tool_call
from toka.tools import Toolbox, ToolContext, read_only_tools
from toka.workspace import Workspace

from .conftest import PREFECT_HOME, PrefectServer, minimal_spec

#: Not token-shaped: only known-value redaction (the variable's value) can catch it.
KEY = "toka-test-secret-7f3a9c2e51d8b604"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return KEY


def leaky_result(status: str = "completed") -> ModelResponse:
    """A submit_result with the key in every field the model fills in."""
    return submit(
        status=status,
        summary=f"the key is {KEY}",
        deliverables=[f"found {KEY} in .env"],
        files_changed=[f"notes/{KEY}.md"],
        metrics={"leaks": f"{KEY}"},
        follow_ups=[f"rotate {KEY}"],
    )


# -- the pieces -------------------------------------------------------------------------------


def test_redact_data_walks_keys_lists_and_tuples() -> None:
    data = {"a": [f"x {KEY}", (KEY, 3)], KEY: {"n": 1.5, "none": None}}
    assert redact_data(data, [KEY]) == {"a": [f"x {REDACTED}", (REDACTED, 3)], REDACTED: {"n": 1.5, "none": None}}
    assert redact_data("ghp_abcdefghijklmnopqrstuvwxyz0123", []) == REDACTED  # token-shaped: no value needed


def test_a_result_is_redacted_in_every_field() -> None:
    result = TaskResult(status="completed", summary=f"s {KEY}", deliverables=[KEY], files_changed=[KEY],
                        metrics={KEY: KEY, "n": 3}, follow_ups=[KEY])
    assert KEY not in result.redacted([KEY]).model_dump_json()
    assert result.redacted([KEY]).metrics == {REDACTED: REDACTED, "n": 3}


def test_the_step_redacts_the_submitted_result(tmp_path: Path, key: str) -> None:
    box = Toolbox(read_only_tools(), ToolContext(workspace=Workspace(tmp_path)))
    run = asyncio.run(run_step(model=ScriptedModel(leaky_result()), system="s", task_message="t", toolbox=box,
                               metric_names=["leaks"]))
    assert key not in run.result.model_dump_json()
    assert run.result.summary == f"the key is {REDACTED}" and run.result.follow_ups == [f"rotate {REDACTED}"]
    assert run.files_changed == [f"notes/{REDACTED}.md"]


def test_a_reported_failure_does_not_carry_the_secret(tmp_path: Path, key: str) -> None:
    box = Toolbox(read_only_tools(), ToolContext(workspace=Workspace(tmp_path)))
    with pytest.raises(TaskReportedFailure) as info:
        asyncio.run(run_step(model=ScriptedModel(leaky_result("failed")), system="s", task_message="t",
                             toolbox=box, metric_names=["leaks"]))
    assert key not in str(info.value) and key not in repr(info.value.args)
    assert f"the key is {REDACTED}" in str(info.value)


def test_malformed_results_quoting_the_secret_do_not_carry_it(tmp_path: Path, key: str) -> None:
    box = Toolbox(read_only_tools(), ToolContext(workspace=Workspace(tmp_path)))
    bad = submit(summary="x", metrics={key: 1})  # an unknown metric named after the secret
    with pytest.raises(InvalidToolInputError) as info:
        asyncio.run(run_step(model=ScriptedModel(bad, bad, bad), system="s", task_message="t", toolbox=box))
    assert key not in str(info.value) and REDACTED in str(info.value)


def test_writers_redact_what_they_write(key: str) -> None:
    leaked = TaskResult(status="completed", summary=f"{'x' * 195}{key}")  # cut at 200 characters in the table
    record = TaskRecord(index=1, description="d", priority="medium", state="completed", result=leaked,
                        error=None)
    failed = TaskRecord(index=2, description="d", priority="medium", state="failed", error=f"boom {key}")
    report = AgentReport(agent="a", state="completed-with-failures", reason=f"because {key}",
                         tasks=[record, failed])
    markdown = agent_markdown(report, model="m")
    assert key not in markdown and key[:5] not in markdown.replace("toka-test", "")
    assert REDACTED in markdown
    summary = PipelineSummary(run_key="k", model="m", offline=True, state="completed-with-failures",
                              agents=[report])
    assert key not in json.dumps(summary.to_dict())


def test_a_journal_keeps_no_secret_the_model_echoed(tmp_path: Path, key: str) -> None:
    # A failed task's journal stays on disk for the resume: what the model said is in it.
    from toka.journal import Entry, Journal

    journal = Journal(tmp_path / "1.jsonl")
    journal.append(Entry("response", "f", {"content": [{"type": "text", "text": f"the key is {key}"}]}))
    assert key not in journal.path.read_text()
    assert journal.load()[0].data["content"][0]["text"] == f"the key is {REDACTED}"


def test_the_audit_trail_redacts_values_json_would_escape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quoted = 'pa"ss\\word-1234'  # json.dumps escapes the quote and the backslash
    monkeypatch.setenv("DB_PASSWORD", quoted)
    audit = AuditLog(tmp_path / "audit" / "r.jsonl", run="r")
    audit.record(agent="a", task=1, tool="t", arguments={"value": f"x{quoted}y"})
    assert quoted not in (tmp_path / "audit" / "r.jsonl").read_text()
    assert json.dumps(quoted)[1:-1] not in (tmp_path / "audit" / "r.jsonl").read_text()
    [entry] = read_audit(tmp_path, run="r")
    assert entry["arguments"] == {"value": f"x{REDACTED}y"}


# -- a whole run ----------------------------------------------------------------------------------


def _answer(request: ModelRequest) -> ModelResponse:
    agent, task = request.metadata["agent"], int(request.metadata["task"])
    if agent == "broken":  # a high task: the agent fails, and the pipeline with it
        return leaky_result("failed")
    if task == 1:
        if len(request.messages) == 1:  # the model uses the key in a tool call first
            return tool_call("search_files", pattern=KEY)
        return leaky_result()
    if task == 2:
        return leaky_result("blocked")
    return submit(summary="x", metrics={KEY: 1})  # task 3: malformed (an unknown metric), retried, fails


async def _api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        response = await client._client.request(method, path, json=body)
        response.raise_for_status()
        return response.json()


async def _events_about(agents: list[str], *, wanted: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The toka events about ``agents`` the API has stored, once at least ``wanted`` arrived."""
    from prefect.events.worker import EventsWorker

    drained = EventsWorker.drain_all()
    if asyncio.iscoroutine(drained) or isinstance(drained, asyncio.Future):
        await drained
    deadline = time.monotonic() + timeout
    while True:
        page = await _api("POST", "/events/filter", {
            "filter": {"event": {"prefix": ["toka."]},
                       "resource": {"id_prefix": [f"toka.agent.{a}" for a in agents]}},
            "limit": 50})
        events = page["events"]
        if len(events) >= wanted or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.5)


@pytest.mark.usefixtures("prefect_server")
def test_a_secret_in_submitted_results_is_written_nowhere(write_specs: Any, key: str, prefect_api: PrefectServer) -> None:
    from prefect.logging.handlers import APILogWorker

    from toka.cli import app

    leaky = minimal_spec("leaky", tasks=3, reporting={"metrics": ["leaks"]})
    leaky["tasks"]["default"][2]["priority"] = "low"
    leaky["security"]["capabilities_required"] = ["filesystem-read"]
    broken = minimal_spec("broken", tasks=1)
    broken["tasks"]["default"][0]["priority"] = "high"
    folder = write_specs(leaky, broken)
    summary_file = folder / "summary.json"
    with override_model(FunctionModel(_answer, name="leaky-model")):
        shown = CliRunner().invoke(app, ["run", str(folder), "--workspace", str(folder), "--run-key", "leaky-run",
                                         "--retry-delay", "0", "--json", str(summary_file)],
                                   env={"COLUMNS": "250"})
    assert shown.exit_code == 1, shown.output  # broken failed
    assert key not in shown.output  # the terminal: progress lines, the summary table

    # The --json summary: the text is there, the key is not.
    data = json.loads(summary_file.read_text())
    assert key not in summary_file.read_text()
    leaky_tasks = next(a for a in data["agents"] if a["name"] == "leaky")["tasks"]
    assert [t["state"] for t in leaky_tasks] == ["completed", "failed", "failed"]
    assert leaky_tasks[0]["result"]["summary"] == f"the key is {REDACTED}"
    assert leaky_tasks[0]["result"]["metrics"] == {"leaks": REDACTED}
    assert f"the model reported the task blocked: the key is {REDACTED}" in leaky_tasks[1]["error"]
    assert "InvalidToolInputError" in leaky_tasks[2]["error"] and REDACTED in leaky_tasks[2]["error"]

    # Artifacts (each key's history, and the latest-per-key collection) and events, through the API.
    artifacts = asyncio.run(_api("POST", "/artifacts/filter", {
        "artifacts": {"key": {"any_": ["leaky-report", "broken-report", "toka-pipeline-report"]}}, "limit": 50}))
    latest = asyncio.run(_api("POST", "/artifacts/latest/filter", {
        "artifacts": {"key": {"any_": ["leaky-report", "broken-report", "toka-pipeline-report"]}}, "limit": 50}))
    assert {a["key"] for a in artifacts} == {a["key"] for a in latest} == {
        "leaky-report", "broken-report", "toka-pipeline-report"}
    for artifact in [*artifacts, *latest]:
        assert key not in json.dumps(artifact), artifact["key"]
    assert any(REDACTED in a["data"] for a in latest if a["key"] == "leaky-report")
    # 13: each agent started and finished, each task started and finished, one tool call.
    events = asyncio.run(_events_about(["leaky", "broken"], wanted=13))
    assert {e["event"] for e in events} >= {"toka.task.failed", "toka.tool.allowed", "toka.agent.failed",
                                            "toka.agent.completed.with.failures"}
    for event in events:
        assert key not in json.dumps(event), event["event"]
    assert any(REDACTED in json.dumps(e["payload"]) for e in events if e["event"] == "toka.tool.allowed")

    # Logs too (shipped in batches), and then everything on disk: Prefect's database, its home
    # (result storage of the test session), and the workspace (audit trail, results, run records).
    APILogWorker.instance().drain()
    audit = list(read_audit(folder / ".toka", run="leaky-run"))
    assert audit and audit[0]["arguments"] == {"pattern": REDACTED}
    assert list((folder / ".toka" / "results").iterdir()), "no persisted results to check"
    database = prefect_api.home / "prefect.db"  # the server's database (SQLite)
    assert database.is_file()
    for path in [*database.parent.iterdir(), *PREFECT_HOME.rglob("*"), *folder.rglob("*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"the key leaked into {path}"


@pytest.mark.usefixtures("prefect_server")
def test_a_key_from_a_prefect_secret_block_is_redacted_too() -> None:
    # Such a key is not in the environment: only the provider, which loads it, can name it.
    from prefect.blocks.system import Secret

    from toka.config import ProviderSettings
    from toka.providers import _api_key
    from toka.redact import secret_values

    block_key = "block-held-key-0d3f9a81c27e"  # not token-shaped
    Secret(value=block_key).save("toka-test-key", overwrite=True)
    assert asyncio.run(_api_key(ProviderSettings(api_key_secret="toka-test-key"), {})) == block_key
    written = redact_data({"summary": f"the key is {block_key}"}, secret_values())
    assert block_key not in json.dumps(written) and REDACTED in written["summary"]


@pytest.mark.parametrize("text", ["src/task-scheduler-implementation.py", "disk-usage-monitoring-agent",
                                  "risk-assessment-and-mitigation-plan", "desk-booking-service-frontend"])
def test_words_that_end_in_sk_before_a_hyphen_are_not_keys(text: str) -> None:
    """A file name the model must see and call again, a saved output's directory: redacted, the
    model could not name them, and a journal's recorded call no longer matched on resume."""
    assert redact(text) == text


@pytest.mark.parametrize("key", ["sk-ant-api03-abcdefghijklmnop", "sk-proj-AbC123dEf456GhI789jKl0",
                                 "sk-abcdefghij1234567890xyz"])
def test_keys_are_still_redacted_wherever_they_start(key: str) -> None:
    for text in (key, f"KEY={key}", f'"{key}"', f"token: {key}\n", f"-H 'x-api-key: {key}'"):
        assert key not in redact(text) and REDACTED in redact(text)
