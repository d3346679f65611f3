"""A whole run where the model asks for allowed and forbidden tool calls."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.pipeline import pipeline
from toka.config import RunOptions
from toka.audit import read_audit
from toka.cli import app
from toka.errors import PipelineFailedError
from toka.results import PipelineSummary

from .anthropic_server import AnthropicServer, scripted_responder, tool_use_block
from .conftest import minimal_spec

pytestmark = pytest.mark.usefixtures("prefect_server")

KEY = "sk-ant-test-e2e-0123456789abcdef"

CALLS = [
    ("read_file", {"path": "README.md"}, "allowed"),
    ("read_file", {"path": "../../etc/passwd"}, "refused"),
    ("run_command", {"argv": ["curl", "https://example.com"]}, "refused"),
    ("run_command", {"argv": ["./hello.sh", "world"]}, "allowed"),
    ("write_file", {"path": "notes/summary.md", "content": "# notes\n"}, "allowed"),
    ("run_command", {"argv": ["git", "-c", "core.sshCommand=touch /tmp/pwned", "status"]}, "refused"),
    ("edit_file", {"path": "README.md", "old_text": "nonexistent", "new_text": "x"}, "allowed"),
    ("delete_everything", {}, "refused"),
]


def test_forbidden_calls_go_back_to_the_model_and_the_audit_matches(
    write_specs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = minimal_spec("worker", tasks=1)
    spec["security"]["capabilities_required"] = ["filesystem-read", "filesystem-write", "script-execution"]
    spec["security"]["resource_limits"].update({"max_memory": "256MB", "max_cpu": "50%", "max_processes": 32})
    folder = write_specs(spec)
    (folder / "README.md").write_text("# project\n")
    script = folder / "hello.sh"
    script.write_text('#!/bin/sh\necho "hello $1 from $(pwd)"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def script_turns(body: dict[str, Any]) -> list[dict[str, Any]]:
        last = body["messages"][-1]["content"]
        if isinstance(last, list) and any(b.get("type") == "tool_result" for b in last):
            return [tool_use_block("submit_result", {"status": "completed", "summary": "checked the workspace"})]
        return [tool_use_block(name, args) for name, args, _ in CALLS]

    with AnthropicServer(scripted_responder(script_turns)) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)

        async def go() -> PipelineSummary:
            state = await pipeline(specs=[str(folder)], run=RunOptions(workspace=str(folder), run_key="e2e-tools", in_place=True),
                                   return_state=True)
            outcome = await state.aresult(raise_on_failure=False)
            return outcome.report if isinstance(outcome, PipelineFailedError) else outcome

        summary = asyncio.run(go())
        assert summary.state == "completed"

        # What the model was offered: only the granted tools.
        offered = [t["name"] for t in server.requests[0].body["tools"]]
        assert offered == ["read_file", "list_dir", "search_files", "write_file", "edit_file", "run_command",
                           "submit_result"]
        # What went back to the model, one result per call, in order.
        results = [b for b in server.requests[1].body["messages"][-1]["content"] if b["type"] == "tool_result"]
        assert len(results) == len(CALLS)
        by_call = dict(zip([n + json.dumps(a) for n, a, _ in CALLS], results))

        def result(i: int) -> dict[str, Any]:
            name, args, _ = CALLS[i]
            return by_call[name + json.dumps(args)]

        assert not result(0).get("is_error") and "# project" in result(0)["content"]
        assert result(1)["is_error"] and "resolves outside the workspace" in result(1)["content"]
        assert result(2)["is_error"] and "'curl' is not granted" in result(2)["content"]
        assert not result(3).get("is_error") and f"hello world from {folder}" in result(3)["content"]
        assert not result(4).get("is_error") and (folder / "notes" / "summary.md").read_text() == "# notes\n"
        assert result(5)["is_error"] and "git options before the subcommand" in result(5)["content"]
        assert result(6)["is_error"] and "does not occur" in result(6)["content"]
        assert result(7)["is_error"] and "no tool named 'delete_everything'" in result(7)["content"]
        assert all(r["content"].startswith("<tool_output tool=") for r in results)
        assert not Path("/tmp/pwned").exists()

    # The audit trail matches, record for record.
    records = list(read_audit(folder / ".toka", run="e2e-tools"))
    assert [(r["tool"], r["decision"]) for r in records] == [(n, d) for n, _, d in CALLS]
    script_run = records[3]
    assert script_run["exit_code"] == 0 and script_run["arguments"] == {"argv": ["./hello.sh", "world"]}
    assert script_run["usage"]["wall_s"] > 0 and script_run["usage"]["peak_memory_bytes"]
    assert set(script_run["sandbox"]) >= {"timeout", "memory", "cpu", "processes", "network"}
    assert records[4]["files_changed"] == ["notes/summary.md"]
    assert all(r["agent"] == "worker" and r["task"] == 1 and r["run"] == "e2e-tools" for r in records)
    task = summary.agents[0].tasks[0]
    assert task.state == "completed"  # refusals are for the model to handle, not failures
    assert (task.tool_calls, task.refused_calls) == (8, 4)  # counted in the report

    # And `toka audit` shows it as a table.
    shown = CliRunner().invoke(app, ["audit", "--workspace", str(folder), "--run", "e2e-tools", "--agent", "worker"],
                               env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.stdout
    assert "8 tool calls, 4 refused" in shown.stdout
    assert "delete_everything" in shown.stdout
