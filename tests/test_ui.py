"""What a person sees in the Prefect UI: reports that render, results per task, readable run
names, one-line failures, and a nightly deployment that does not overlap itself.

Everything is read back through the real (temporary) Prefect API. What the UI draws from it was
checked with ``bench/ui_screenshot.py`` (headless Chromium); these tests pin the forms it drew.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from toka.errors import AgentFailedError, PipelineFailedError
from toka.graph import AgentGraph
from toka.model import ModelRequest, override_model
from toka.plan import make_plan
from toka.redact import REDACTED
from toka.report import dag_svg, pipeline_markdown
from toka.results import AgentReport, PipelineSummary, TaskRecord
from toka.spec import AgentSpec
from toka.testing import FunctionModel, submit

from .anthropic_server import AnthropicServer, Fault
from .conftest import ROOT, minimal_spec, run_pipeline

pytestmark = pytest.mark.usefixtures("prefect_server")

SVG = "{http://www.w3.org/2000/svg}"
DATE = r"\d{4}-\d\d-\d\d \d\d:\d\d"


def _svg_of(markdown: str) -> ET.Element:
    """The DAG picture of a pipeline report: a markdown image with an SVG data URI."""
    match = re.search(r"!\[DAG: [^\]]*\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown[:500]
    return ET.fromstring(base64.b64decode(match.group(1)))


def _texts(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{SVG}text")]


def _boxes(svg: ET.Element) -> dict[str, tuple[float, float]]:
    """Each agent's box in the picture: its top and bottom (a box is a rect, then its name)."""
    children = list(svg)
    return {
        (label.text or ""): (float(box.get("y", 0)), float(box.get("y", 0)) + float(box.get("height", 0)))
        for box, label in zip(children, children[1:])
        if box.tag == f"{SVG}rect" and label.tag == f"{SVG}text" and label.get("font-weight")
    }


def _graph(*specs: dict[str, Any]) -> AgentGraph:
    return AgentGraph.build([AgentSpec.from_dict(s) for s in specs])


# -- the DAG, drawn (no Prefect) -------------------------------------------------------------------


def test_dag_picture_has_every_agent_and_edge() -> None:
    graph = make_plan([ROOT / "agent_specs"]).graph
    states = dict.fromkeys(graph.agents, "completed") | {"test-health": "failed", "docs-refresh": "not-run"}
    svg = ET.fromstring(dag_svg(graph, states, {"test-health": "1/4 tasks"}))  # type: ignore[arg-type]
    texts = _texts(svg)
    assert {"wave 1", "wave 2", "wave 3", "wave 4"} <= set(texts)
    assert set(graph.agents) <= set(texts)
    assert "failed, 1/4 tasks" in texts and "not-run" in texts
    arrows = [p for p in svg.iter(f"{SVG}path") if p.get("marker-end")]
    assert len(arrows) == len(graph.edges) + 2  # one per edge, two in the legend
    dashed = [p for p in arrows if p.get("stroke-dasharray")]
    assert len(dashed) == sum(e.kind == "optional" for e in graph.edges) + 1


def test_an_edge_that_skips_waves_runs_through_a_lane_not_behind_a_box() -> None:
    graph = _graph(minimal_spec("a"), minimal_spec("b", required=["a"]), minimal_spec("c", required=["a", "b"]))
    svg = ET.fromstring(dag_svg(graph, dict.fromkeys(graph.agents, "completed")))  # type: ignore[arg-type]
    boxes = _boxes(svg)
    assert set(boxes) == {"a", "b", "c"}
    top, bottom = boxes["b"]
    # a -> c crosses wave 2 (where b is) along a horizontal lane ("H"), above or below b.
    [skip] = [p.get("d", "") for p in svg.iter(f"{SVG}path") if p.get("marker-end") and " H" in p.get("d", "")]
    lane_y = float(re.search(r"C[\d.,\s]+?,([\d.]+) H", skip).group(1))  # type: ignore[union-attr]
    assert not top <= lane_y <= bottom


def test_the_picture_survives_redaction_and_its_text_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hunter2-but-longer"
    monkeypatch.setenv("DEPLOY_TOKEN", secret)
    graph = _graph(minimal_spec("a"), minimal_spec("b", required=["a"]))
    summary = PipelineSummary(run_key="k", model="offline", offline=True, state="failed", agents=[
        AgentReport(agent="a", state="failed", reason=f"the key {secret} and sk-ant-api03-abcdefghijklmnop",
                    tasks=[TaskRecord(index=1, description="x", priority="high", state="failed", error="boom")]),
        AgentReport(agent="b", state="not-run", reason="required dependency 'a' failed"),
    ])
    text = pipeline_markdown(summary, graph)
    assert secret not in text and "sk-ant-api03" not in text and REDACTED in text
    assert "```mermaid" not in text
    svg = _svg_of(text)  # still decodes: redaction did not touch the base64
    assert {"a", "b", "failed, 0/1 tasks", "not-run, 0/0 tasks"} <= set(_texts(svg))
    assert "| 1 | a | ❌ failed | - | - |" in text and "| 2 | b | ⏭️ not-run | a | - |" in text


def test_control_characters_reach_a_report_as_escapes_not_as_terminal_codes() -> None:
    """A spec's description or a model's words with ESC in them, read with `cat report.md`."""
    from toka.report import agent_markdown

    graph = _graph(minimal_spec("a"))
    task = TaskRecord(index=1, description="clear\x1b[2J\x1b]0;title\x07 the \x00screen", priority="high",
                      state="failed", error="boom\x9b31m")
    report = AgentReport(agent="a", state="failed", reason="red \x1b[31mtext", tasks=[task])
    summary = PipelineSummary(run_key="k", model="offline", offline=True, state="failed", agents=[report])
    for text in (agent_markdown(report, model="m"), pipeline_markdown(summary, graph)):
        assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", text), repr(text)
        assert "red \\x1b[31mtext" in text
    assert "clear\\x1b[2J\\x1b]0;title\\x07 the \\x00screen" in agent_markdown(report, model="m")


def test_a_big_run_gets_the_table_without_a_picture() -> None:
    from toka.report import MAX_DRAWN_AGENTS

    graph = _graph(*(minimal_spec(f"a{i}") for i in range(MAX_DRAWN_AGENTS + 1)))
    summary = PipelineSummary(run_key="k", model="m", offline=True, state="completed", agents=[])
    text = pipeline_markdown(summary, graph)
    assert "data:image" not in text and "<!--" not in text
    assert text.count("| 1 | a") == MAX_DRAWN_AGENTS + 1


# -- what a run writes to the Prefect API ----------------------------------------------------------


async def _api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        response = await client._client.request(method, path, json=body)
        response.raise_for_status()
        return response.json()


async def _artifact(key: str, flow_run_ids: list[str]) -> dict[str, Any]:
    [artifact] = await _api("POST", "/artifacts/filter", {
        "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": flow_run_ids}},
        "sort": "CREATED_DESC", "limit": 1, "offset": 0})
    return artifact  # type: ignore[no-any-return]


async def _children(flow_run_id: str) -> list[dict[str, Any]]:
    return await _api("POST", "/flow_runs/filter", {  # type: ignore[no-any-return]
        "flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}, "sort": "START_TIME_ASC", "limit": 50,
        "offset": 0})


async def _logs(flow_run_ids: list[str]) -> list[str]:
    from prefect.logging.handlers import APILogWorker

    # Logs are shipped in batches. In a running event loop `drain` returns an awaitable: not awaited,
    # the logs were read before they were sent, at random ("no logs shipped").
    drained = APILogWorker.instance().drain()
    if inspect.isawaitable(drained):
        await drained
    logs = await _api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids}},
                                               "sort": "TIMESTAMP_ASC", "limit": 200, "offset": 0})
    return [entry["message"] for entry in logs]


def _run(folder: Path, fake: Any, **options: Any) -> tuple[Any, PipelineSummary | None, Any]:
    """Run the pipeline in-process (on the ``fake`` model, if any); its final state, summary (None
    when it never ran) and result."""

    async def go() -> tuple[Any, Any]:
        from flows.pipeline import pipeline
        from toka.config import grouped

        with override_model(fake) if fake is not None else nullcontext():
            state = await pipeline(specs=[str(folder)], return_state=True,
                                   **grouped({"workspace": str(folder), "retry_delay_seconds": 0, **options}))
        return state, await state.aresult(raise_on_failure=False)

    state, outcome = asyncio.run(go())
    summary = outcome.report if isinstance(outcome, PipelineFailedError) else outcome
    return state, summary if isinstance(summary, PipelineSummary) else None, outcome


def _answers(request: ModelRequest) -> Any:
    agent, task = request.metadata["agent"], int(request.metadata["task"])
    if (agent, task) == ("alpha", 1):
        return submit(summary="mapped the repository", deliverables=["a map of the packages", "entry points"],
                      files_changed=["NOTES.md"], follow_ups=["check the CLI docs"])
    if (agent, task) == ("alpha", 2):
        return submit(status="blocked", summary="needs the token ghp_abcdefghijklmnopqrstuvwx to go on")
    return submit(summary=f"{agent} task {task}: <img src=https://example.com/x.png> ![x](https://e.com/y.png)")


def test_results_table_per_agent_and_readable_names(write_specs: Any) -> None:
    folder = write_specs(minimal_spec("alpha", tasks=3), minimal_spec("beta", required=["alpha"], tasks=1))
    state, summary, _ = _run(folder, FunctionModel(_answers, name="fake"), run_key="ui-results")
    assert state.is_completed() and summary is not None
    run_id = str(summary.flow_run_id)

    # The pipeline run and the agents' runs are named for what ran and when.
    pipeline_run = asyncio.run(_api("GET", f"/flow_runs/{run_id}"))
    assert re.fullmatch(fr"toka-pipeline {DATE} {folder.name} \(run ui-results\)", pipeline_run["name"]), \
        pipeline_run["name"]
    agent_runs = {r["name"].split(" ")[0]: r for r in asyncio.run(_children(run_id))}
    assert set(agent_runs) == {"alpha", "beta"}
    assert all(re.fullmatch(f"{name} {DATE}", r["name"]) for name, r in agent_runs.items())
    # Task runs: plain ASCII names (the UI's run graph draws nothing else). The server records
    # them in batches, at least once a second (toka.server.SERVER_DEFAULTS).
    deadline = time.monotonic() + 10
    while True:
        tasks = asyncio.run(_api("POST", "/task_runs/filter", {
            "flow_runs": {"id": {"any_": [agent_runs["alpha"]["id"]]}}, "sort": "EXPECTED_START_TIME_ASC",
            "limit": 50, "offset": 0}))
        if len(tasks) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [t["name"] for t in tasks] == [f"alpha - {i}/3 - alpha step {i}" for i in (1, 2, 3)]

    # What each task produced, as a table artifact of the agent's run.
    artifact = asyncio.run(_artifact("alpha-results", [agent_runs["alpha"]["id"]]))
    assert artifact["type"] == "table"
    rows = json.loads(artifact["data"])
    assert [r["task"] for r in rows] == ["1/3", "2/3", "3/3"]
    assert list(rows[0]) == ["task", "state", "status", "summary", "deliverables", "files changed", "follow-ups",
                             "description"]
    first, blocked, third = rows
    assert first["state"] == "✅ completed" and first["status"] == "completed"
    assert first["summary"] == "mapped the repository"
    assert first["deliverables"] == "- a map of the packages\n- entry points"
    assert first["files changed"] == "- NOTES.md" and first["follow-ups"] == "- check the CLI docs"
    # A failed task: its error, redacted like every report.
    assert blocked["state"] == "❌ failed" and blocked["status"] == ""
    assert "needs the token [REDACTED] to go on" in " ".join(blocked["summary"].split())
    assert "ghp_" not in artifact["data"]
    # The UI does not wrap a cell: long text comes in lines; an empty list is an empty cell.
    assert all(len(line) <= 72 for line in blocked["summary"].splitlines()) and "\n" in blocked["summary"]
    assert blocked["deliverables"] == ""
    # Model text is shown as text: no image is fetched, no HTML drawn, in the reader's browser.
    assert "<img" not in third["summary"] and "&lt;img" in third["summary"]
    assert "![x]" not in third["summary"] and "!\\[x]" in third["summary"]

    # The pipeline report draws its DAG as an image the UI renders (not a mermaid block).
    report = asyncio.run(_artifact("toka-pipeline-report", [run_id]))["data"]
    assert "```mermaid" not in report
    assert {"alpha", "beta", "completed-with-failures, 2/3 tasks"} <= set(_texts(_svg_of(report)))


def test_a_per_agent_deployment_run_is_named_for_its_agent(write_specs: Any) -> None:
    from flows.agent import agent
    from toka.config import ProviderSettings, RunOptions

    folder = write_specs(minimal_spec("alpha", tasks=1), minimal_spec("beta", required=["alpha"], tasks=1))

    async def go() -> Any:
        state = await agent(agent="beta", specs=[str(folder)], run=RunOptions(workspace=str(folder)),
                            provider=ProviderSettings(model="offline"), return_state=True)
        return await _api("GET", f"/flow_runs/{state.state_details.flow_run_id}")

    run = asyncio.run(go())
    assert re.fullmatch(f"toka-agent beta {DATE}", run["name"]), run["name"]
    assert {r["name"].split(" ")[0] for r in asyncio.run(_children(run["id"]))} == {"alpha", "beta"}


def test_a_failing_agent_is_one_line_in_the_ui_not_its_report(write_specs: Any) -> None:
    spec = minimal_spec("alpha", tasks=2)
    spec["tasks"]["default"][0]["priority"] = "high"
    folder = write_specs(spec, minimal_spec("beta", required=["alpha"]))

    def answer(request: ModelRequest) -> Any:
        return submit(status="failed", summary="cannot find the build file\n\nat all")

    state, summary, outcome = _run(folder, FunctionModel(answer), run_key="ui-one-line")
    assert state.is_failed() and summary is not None
    assert isinstance(outcome, PipelineFailedError)
    assert state.message == (
        "2 of 2 agents did not complete; failed: alpha; not run: beta. alpha: task 1/2 (high) failed: "
        "TaskReportedFailure: the model reported the task failed: cannot find the build file at all")
    run_id = str(summary.flow_run_id)
    [alpha_run] = [r for r in asyncio.run(_children(run_id)) if r["name"].startswith("alpha ")]
    message = alpha_run["state"]["message"]
    assert message.startswith("alpha: task 1/2 (high) failed: TaskReportedFailure") and "\n" not in message
    logs = asyncio.run(_logs([run_id, alpha_run["id"]]))
    assert logs, "no logs shipped"
    text = "\n".join(logs)
    assert "Traceback" not in text and "AgentReport(" not in text and "TaskRecord(" not in text
    assert "Encountered exception" not in text
    assert any(line.startswith("Finished in state Failed('alpha: task 1/2 (high) failed") for line in logs)


def test_run_failed_errors_are_one_short_line() -> None:
    report = AgentReport(agent="a", state="failed", tasks=[
        TaskRecord(index=i, description="x" * 200, priority="high", state="failed", error="y" * 500)
        for i in range(50)])
    error = AgentFailedError("a: task 1/50 (high) failed:\n" + "z " * 400, report=report)
    assert "\n" not in str(error) and len(str(error)) <= AgentFailedError.MAX_LINE
    assert str(error).startswith("a: task 1/50 (high) failed: z z") and str(error).endswith("...")
    assert str(PipelineFailedError("short", report=None)) == "short"


def test_a_model_without_an_api_key_fails_the_run_with_one_line(write_specs: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    folder = write_specs(minimal_spec("alpha", tasks=1))
    state, summary, outcome = _run(folder, None, run_key="ui-no-key", model="claude-nope-1")
    assert state.is_failed() and summary is None
    assert state.message == (
        "model 'claude-nope-1' needs an Anthropic API key: set ANTHROPIC_API_KEY, name a Prefect Secret block "
        "with --api-key-secret, or use --model offline")
    assert type(outcome).__name__ == "ConfigError"
    logs = asyncio.run(_logs([str(state.state_details.flow_run_id)]))
    assert "Traceback" not in "\n".join(logs)


def test_an_unknown_model_fails_the_run_with_one_line(write_specs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_specs(minimal_spec("alpha", priority="critical", tasks=2), minimal_spec("beta", tasks=1),
                         minimal_spec("gamma", required=["alpha"], tasks=1))
    with AnthropicServer(fault_rate=1.0, fault_mix=[Fault.status(404, message="model: claude-nope-1")]) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789abcdefSECRET")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        state, summary = asyncio.run(run_pipeline(folder, run_key="ui-unknown-model", model="claude-nope-1",
                                                  max_concurrency=1))
    assert state.is_failed()
    line = ("Anthropic API 404 not_found_error: model 'claude-nope-1' not found: check the model id "
            "(--model / TOKA_MODEL); if it is right, check ANTHROPIC_BASE_URL (model: claude-nope-1)")
    assert state.message == f"stopped by alpha: {line}. 3 of 3 agents did not complete; failed: alpha; " \
                            "not run: beta, gamma"
    logs = asyncio.run(_logs([str(summary.flow_run_id)]))
    assert "Traceback" not in "\n".join(logs)


# -- the nightly deployment ------------------------------------------------------------------------


def test_the_nightly_deployment_never_runs_twice_at_once(tmp_path: Path) -> None:
    """`prefect deploy` of the real prefect.yaml to the suite's API; a second run is cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelled, Pending

    async def pool() -> None:
        template = json.loads((ROOT / "deployments" / "process-pool.json").read_text())
        async with get_client() as client:
            try:
                await client.create_work_pool(WorkPoolCreate(name="toka-local", type="process",
                                                             base_job_template=template))
            except ObjectAlreadyExists:
                pass

    asyncio.run(pool())
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PWD": str(ROOT), "NO_COLOR": "1"}
    before = (ROOT / "prefect.yaml").read_bytes()
    deploy = subprocess.run([str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--name",
                             "toka-nightly"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert (ROOT / "prefect.yaml").read_bytes() == before

    async def check() -> tuple[Any, Any, Any]:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("toka-pipeline/toka-nightly")
            try:
                runs = [await client.create_flow_run_from_deployment(deployment.id, parameters={
                    "workspace": str(tmp_path)}) for _ in range(2)]
                # What a worker does with each run it picks up: Pending, then it starts the process.
                first = await client.set_flow_run_state(runs[0].id, Pending())
                second = await client.set_flow_run_state(runs[1].id, Pending())
                await client.set_flow_run_state(runs[0].id, Cancelled(), force=True)  # frees the slot
                return deployment, first, second
            finally:
                await client.delete_deployment(deployment.id)

    deployment, first, second = asyncio.run(check())
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options is not None
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert first.status.value == "ACCEPT"
    assert second.status.value == "REJECT" and second.state.type.value == "CANCELLED"
    assert second.state.message == "Deployment concurrency limit reached."
