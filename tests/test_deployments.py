"""Deployments as users run them: `prefect.yaml`, a real server, `prefect deploy --all`, workers.

The fast tests check `prefect.yaml` and its generator. The slow ones use the session's
real `prefect server start` (conftest's ``prefect_api``: a loopback port, its own
PREFECT_HOME, the session's migrated database; the `toka run` processes of other tests share it), create the
process work pool from `deployments/process-pool.json`, run `prefect --no-prompt
deploy --all` from the repository root, and drive runs with the `prefect` CLI and
workers, reading states, results and artifacts back through the REST API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from toka.deployments import (
    AGENT_ENTRYPOINT,
    AGENT_RUNNER_DEPLOYMENT,
    BEGIN_MARKER,
    END_MARKER,
    render_deployments,
    sync_deployments,
)
from toka.errors import ConfigError
from toka.plan import make_plan

from .conftest import AGENT_SPECS, PREFECT, ROOT, PrefectServer, minimal_spec, stop_process
from .postgres import PostgresUnavailable, temporary_database

PREFECT_YAML = ROOT / "prefect.yaml"
AGENTS = ["repo-survey", "dependency-audit", "test-health", "docs-refresh", "release-notes"]
#: The distributed run's agents: three waves, the second two agents ready at once (one per
#: worker), and in the third an agent whose optional dependency (test-health) failed. Each agent
#: is a flow run process of its own; release-notes would add a fourth wave and nothing more.
DISTRIBUTED = AGENTS[:4]


# -- prefect.yaml and its generator (fast) ------------------------------------------------------


def test_committed_prefect_yaml_is_current() -> None:
    """`toka deployments --check` in CI: the per-agent deployments match agent_specs/."""
    assert sync_deployments(PREFECT_YAML, [AGENT_SPECS], check=True) is False, (
        "prefect.yaml is out of date with agent_specs/; regenerate it with: toka deployments"
    )


def test_prefect_yaml_declares_the_documented_deployments() -> None:
    document = yaml.safe_load(PREFECT_YAML.read_text())
    assert document["definitions"]["work_pools"]["toka"]["name"] == "toka-local"
    nightly_schedule = document["definitions"]["schedules"]["nightly"]
    assert nightly_schedule["cron"] == "0 2 * * *" and nightly_schedule["timezone"]
    deployments = {d["name"]: d for d in document["deployments"]}
    assert set(deployments) == {"toka-pipeline", "toka-nightly", "distributed", *AGENTS}
    pipeline, nightly = deployments["toka-pipeline"], deployments["toka-nightly"]
    assert pipeline["entrypoint"] == nightly["entrypoint"] == "flows/pipeline.py:pipeline"
    assert nightly["schedules"] == [nightly_schedule] and not pipeline["schedules"]
    for name in ("toka-pipeline", *AGENTS):  # a fresh clone runs with no API key
        assert deployments[name]["parameters"]["provider"]["model"] == "offline"
    assert deployments["distributed"]["entrypoint"] == "flows/agent.py:agent_runner"
    for agent in AGENTS:
        d = deployments[agent]
        assert d["entrypoint"] == AGENT_ENTRYPOINT and d["parameters"]["agent"] == agent
        assert d["work_pool"] == pipeline["work_pool"]
    # `{{ $PWD }}` is filled in by `prefect deploy`: the checkout it ran in.
    assert document["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}
    ]


def test_entrypoints_are_the_flows_the_deployments_name() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.agent import agent, agent_runner
    from flows.pipeline import pipeline

    assert (pipeline.name, agent.name, agent_runner.name) == ("toka-pipeline", "toka-agent", "toka-agent-runner")
    # Prefect validates parameters against these schemas and shows them as a form in the UI.
    for fl in (pipeline, agent, agent_runner):
        schema = parameter_schema(fl.fn).model_dump_for_openapi()
        missing = [name for name, prop in schema["properties"].items() if not prop.get("description")]
        assert not missing, f"{fl.name}: parameters without a description: {missing}"
    # The run settings are one section (object) each, with their constraints and descriptions.
    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    groups = {name: schema["definitions"][name] for name in ("RunOptions", "ProviderSettings", "Limits")}
    run, provider, limits = (g["properties"] for g in groups.values())
    assert run["mode"]["enum"] == ["in-process", "distributed"]
    assert run["max_concurrency"]["type"] == "integer" and run["max_concurrency"]["minimum"] == 1
    assert provider["max_attempts"]["maximum"] == 20 and limits["task_timeout"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert provider["model"]["description"].startswith("'auto'")


def test_process_pool_template_is_the_process_worker_template() -> None:
    template = json.loads((ROOT / "deployments" / "process-pool.json").read_text())
    assert template["job_configuration"]["command"] == "{{ command }}"
    assert {"env", "working_dir", "command"} <= set(template["variables"]["properties"])


def test_sync_rewrites_only_the_generated_block(tmp_path: Path, write_specs: Any) -> None:
    specs = write_specs(minimal_spec("alpha", priority="high"), minimal_spec("beta", required=["alpha"]))
    target = tmp_path / "prefect.yaml"
    target.write_text(PREFECT_YAML.read_text())
    before, after = PREFECT_YAML.read_text().split(BEGIN_MARKER)[0], PREFECT_YAML.read_text().split(END_MARKER)[1]

    assert sync_deployments(target, [specs], check=True) is True
    assert target.read_text() == PREFECT_YAML.read_text()  # --check writes nothing
    assert sync_deployments(target, [specs]) is True
    text = target.read_text()
    assert text.startswith(before) and text.endswith(after)
    deployments = {d["name"]: d for d in yaml.safe_load(text)["deployments"]}
    assert {"alpha", "beta"} <= set(deployments) and not set(AGENTS) & set(deployments)
    assert deployments["beta"]["parameters"]["specs"] == ["specs"]  # relative to prefect.yaml's directory
    assert "requires" not in deployments["beta"]["parameters"]
    assert "(alpha)" in deployments["beta"]["description"]
    assert sync_deployments(target, [specs]) is False  # idempotent
    assert sync_deployments(target, [specs], check=True) is False


def test_sync_needs_the_markers(tmp_path: Path) -> None:
    target = tmp_path / "prefect.yaml"
    target.write_text("deployments: []\n")
    with pytest.raises(ConfigError, match="expected one '# BEGIN toka deployments"):
        sync_deployments(target, [AGENT_SPECS])
    with pytest.raises(ConfigError, match="no such file"):
        sync_deployments(tmp_path / "missing.yaml", [AGENT_SPECS])


def test_render_is_deterministic_and_names_every_agent() -> None:
    specs = list(make_plan([AGENT_SPECS]).graph.agents.values())
    block = render_deployments(specs)
    assert block == render_deployments(list(reversed(specs)))
    assert [line.split('"')[1] for line in block.splitlines() if line.strip().startswith("- name:")] == sorted(AGENTS)



def test_spec_text_in_prefect_yaml_holds_no_placeholder_prefect_deploy_expands(
    tmp_path: Path, write_specs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prefect deploy` fills `{{ $VAR }}` (and variables, blocks) in anywhere: a spec title must not
    publish the deploying machine's secrets in a description, nor a path move the deployment."""
    from prefect.utilities.templating import apply_values, find_placeholders

    title = "Demo (key {{ $TOKA_TEST_SECRET }}, db {{ prefect.blocks.secret.db }}, {{{ $TOKA_TEST_SECRET }}})"
    specs = write_specs(minimal_spec("alpha", spec={"name": title, "domain": "testing", "priority": "high"}))
    target = tmp_path / "prefect.yaml"
    target.write_text(PREFECT_YAML.read_text())
    assert sync_deployments(target, [specs]) is True
    (alpha,) = [d for d in yaml.safe_load(target.read_text())["deployments"] if d["name"] == "alpha"]
    monkeypatch.setenv("TOKA_TEST_SECRET", "wJalrXUtnFEMI-EXAMPLE")
    assert apply_values(alpha, dict(os.environ)) == alpha
    assert not find_placeholders(alpha)
    assert alpha["description"].startswith("Demo (key { { $TOKA_TEST_SECRET }}, db { { prefect.blocks")

    templated = tmp_path / "q {{ $HOME }}"
    shutil.copytree(specs, templated)
    with pytest.raises(ConfigError, match=r"spec path 'q \{\{ \$HOME \}\}' contains '\{\{'"):
        sync_deployments(target, [templated])


def test_a_key_pasted_into_a_spec_title_is_not_published_in_the_deployments_description(
        tmp_path: Path, write_specs: Any) -> None:
    key = "ghp_" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7c"
    specs = write_specs(minimal_spec("alpha", spec={"name": f"Demo {key}", "domain": "testing", "priority": "high"}))
    target = tmp_path / "prefect.yaml"
    target.write_text(PREFECT_YAML.read_text())
    assert sync_deployments(target, [specs]) is True
    assert key not in target.read_text()
    (alpha,) = [d for d in yaml.safe_load(target.read_text())["deployments"] if d["name"] == "alpha"]
    assert alpha["description"].startswith("Demo [REDACTED]: runs alpha")

# -- a real server ------------------------------------------------------------------------------


def _check_server_dependencies() -> None:
    """Fail with the cause, not with a confusing 422 or a scheduler traceback."""
    from importlib.metadata import version

    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:3])

    problems = []
    if parts(version("fastapi")) >= (0, 151):
        problems.append(f"fastapi {version('fastapi')} (>= 0.151 rejects the nulls Prefect 3.8's client sends: "
                        "`prefect deploy` fails with 422)")
    if parts(version("sqlalchemy")) >= (2, 1):
        problems.append(f"sqlalchemy {version('sqlalchemy')} (2.1 breaks the Prefect 3.8 scheduler: "
                        "no scheduled runs are created)")
    if problems:
        pytest.fail("the Prefect 3.8 server cannot run with " + "; ".join(problems))


@dataclass
class Server:
    """A `prefect server start` on loopback, with the project deployed to it."""

    url: str
    home: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items()
                if k not in ("ANTHROPIC_API_KEY", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "TOKA_OFFLINE_FAULTS",
                             "TOKA_OFFLINE_REQUEST_LOG", "TOKA_OFFLINE_LATENCY")}
        return {**base, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_COLOR": "1", "COLUMNS": "200",
                "PWD": str(ROOT), **extra}

    def cli(self, *args: str, timeout: float = 120, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([PREFECT, *args], cwd=ROOT, env=self.env(**env), capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One read of the REST API, tried again (as Prefect's own client does) while the server is busy.

        A SQLite-backed server under a burst of writes from several processes held a read
        for over 30 s once in CI: that is the database, not what these tests check.
        """
        deadline = time.monotonic() + 120
        while True:
            try:
                # Plain HTTP on loopback: verify=False spares loading the CA bundle per request (43 ms of CPU,
                # in loops that poll several times a second).
                response = httpx.request(method, self.url + path, timeout=30, verify=False, **kwargs)
                if response.status_code != 503:
                    response.raise_for_status()
                    return response.json()
            except httpx.TimeoutException:
                pass
            assert time.monotonic() < deadline, f"{method} {path}: the server stayed busy for 120 s"
            time.sleep(1)

    def run_deployment(self, name: str, job_variables: dict[str, Any] | None = None, **params: Any) -> str:
        args = [f"--param={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()]
        args += [f"--job-variable={k}={json.dumps(v)}" for k, v in (job_variables or {}).items()]
        out = self.cli("deployment", "run", name, *args).stdout
        match = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert match, out
        return match.group(1)

    def worker_once(self, log: Path, timeout: float = 240, **env: str) -> None:
        """`prefect worker start --run-once`: run what is scheduled now, then exit."""
        with log.open("a") as out:
            result = subprocess.run([PREFECT, "worker", "start", "--pool", "toka-local", "--run-once"], cwd=ROOT,
                                    env=self.env(**env), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        assert result.returncode == 0, log.read_text()[-3000:]

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/flow_runs/{run_id}")  # type: ignore[no-any-return]

    def wait_final(self, run_id: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            assert time.monotonic() < deadline, f"flow run {run_id} still {run['state']['name']}"
            time.sleep(0.5)

    def children(self, run_id: str) -> list[dict[str, Any]]:
        """Flow runs started from ``run_id`` (subflows and deployment runs), recursively."""
        found: list[dict[str, Any]] = []
        frontier = [run_id]
        while frontier:
            runs = self.api("POST", "/flow_runs/filter", json={
                "flow_runs": {"parent_flow_run_id": {"any_": frontier}},
                "sort": "START_TIME_ASC", "limit": 200, "offset": 0})
            found += runs
            frontier = [r["id"] for r in runs]
        return found

    def artifacts(self, run_ids: list[str]) -> list[dict[str, Any]]:
        # Explicit sort and limit: this server rejects the nulls `client.read_artifacts` sends.
        return self.api("POST", "/artifacts/filter", json={  # type: ignore[no-any-return]
            "artifacts": {"flow_run_id": {"any_": run_ids}}, "sort": "CREATED_DESC", "limit": 200, "offset": 0})


def _start_server(tmp: Path, **env: str) -> tuple[PrefectServer, Server]:
    started = PrefectServer(tmp, **env).wait_healthy()
    return started, Server(url=started.url, home=started.home, log=started.log)


def _deploy(server: Server) -> None:
    server.cli("work-pool", "create", "toka-local", "--type", "process",
               "--base-job-template", str(ROOT / "deployments" / "process-pool.json"))
    before = PREFECT_YAML.read_bytes()
    out = server.cli("--no-prompt", "deploy", "--all", timeout=240).stdout
    assert PREFECT_YAML.read_bytes() == before, "prefect deploy rewrote prefect.yaml"
    for name in ("toka-pipeline/toka-pipeline", "toka-pipeline/toka-nightly", AGENT_RUNNER_DEPLOYMENT,
                 *(f"toka-agent/{a}" for a in AGENTS)):
        assert f"Deployment '{name}' successfully created" in out, out


@pytest.fixture(scope="session")
def deployed(prefect_api: PrefectServer) -> Server:
    """The session's shared server (SQLite) with the work pool created and `prefect deploy --all` done.

    `toka run` processes of other tests share it; they create runs of the same flows but no
    deployments, and every test here reads back only the runs it started.
    """
    _check_server_dependencies()
    started = time.monotonic()
    server = Server(url=prefect_api.url, home=prefect_api.home, log=prefect_api.log)
    _deploy(server)
    print(f"deployed in {time.monotonic() - started:.1f}s")
    return server


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small Python repository with the project's own agent specs (absolute paths in parameters)."""
    ws = tmp_path / "workspace"
    shutil.copytree(AGENT_SPECS, ws / "agent_specs")
    (ws / "README.md").write_text("# demo\n\nRun `pytest`.\n")
    (ws / "pyproject.toml").write_text('[project]\nname = "demo"\ndependencies = ["requests>=2"]\n')
    (ws / "tests").mkdir()
    (ws / "tests" / "test_demo.py").write_text("def test_ok():\n    assert True\n")
    return ws


def _params(ws: Path, *, mode: str = "in-process", **extra: Any) -> dict[str, Any]:
    return {"run": {"workspace": str(ws), "mode": mode}, "specs": [str(ws / "agent_specs")], **extra}


def _result(run: dict[str, Any], storage: Path | None = None) -> Any:
    """The persisted result of a flow run: a file path (local storage) or a key in ``storage`` (a block)."""
    from prefect._internal.result_records import ResultRecord
    from prefect.serializers import PickleSerializer

    key = run["state"]["data"]["storage_key"]
    data = (Path(key) if storage is None else storage / key).read_bytes()
    return ResultRecord.deserialize(data, backup_serializer=PickleSerializer()).result


def _summary(run: dict[str, Any], storage: Path | None = None) -> Any:
    from toka.errors import PipelineFailedError
    from toka.results import PipelineSummary

    outcome = _result(run, storage)
    if isinstance(outcome, PipelineFailedError):
        outcome = outcome.report
    assert isinstance(outcome, PipelineSummary), outcome
    return outcome


def _shared_storage_block(server: Server, basepath: Path) -> str:
    """A LocalFileSystem block (on one machine, a directory stands in for a shared mount).

    Saved from this process (a client of ``server`` for the moment), not from a new one that
    would spend 3 s importing Prefect.
    """
    from prefect.filesystems import LocalFileSystem
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        LocalFileSystem(basepath=str(basepath)).save("toka-results", overwrite=True)
    return "local-file-system/toka-results"


def _requests(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _task_states(summary: Any) -> dict[tuple[str, int], str]:
    return {(a.agent, t.index): t.state for a in summary.agents for t in a.tasks}


def _assert_test_health_failed_midway(summary: Any, run_id: str, agents: list[str] = AGENTS) -> None:
    """The summary of a pipeline run of ``agents`` with the fault `test-health:2`: every agent ran;
    test-health failed at its second task and the others completed."""
    assert summary.offline and summary.run_key == run_id
    assert [a.agent for a in summary.agents] == agents
    health = summary.agents[agents.index("test-health")]
    assert health.state == "failed" and "injected fault for test-health:2" in (health.reason or "")
    assert [t.state for t in health.tasks] == ["completed", "failed", "not-run", "not-run"]
    assert all(a.state == "completed" and a.count("completed") == len(a.tasks) == 4
               for a in summary.agents if a is not health)


def _artifact_keys(server: Server, run_id: str) -> set[str]:
    ids = [run_id, *(r["id"] for r in server.children(run_id))]
    return {a["key"] for a in server.artifacts(ids) if a.get("key")}


def _expected_artifacts(agents: list[str] = AGENTS) -> set[str]:
    return {"toka-pipeline-report", "toka-pipeline-progress",
            *(f"{a}-report" for a in agents), *(f"{a}-progress" for a in agents)}


@pytest.mark.slow
def test_pipeline_deployment_on_a_worker_then_a_ui_retry_resumes_it(
    deployed: Server, workspace: Path, tmp_path: Path
) -> None:
    log, faults = tmp_path / "requests.jsonl", tmp_path / "faults.txt"
    worker_env = {"TOKA_OFFLINE_REQUEST_LOG": str(log), "TOKA_OFFLINE_FAULTS": str(faults)}

    # Results on storage every worker reaches (a filesystem block), so that the retry
    # below may land on another worker: here one with a different local results path.
    shared = tmp_path / "shared-results"
    slug = _shared_storage_block(deployed, shared)
    on_block = {"env": {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": slug}}

    # A run of the pipeline deployment with its defaults (the offline model, in-process), by one
    # worker, with a fault midway: test-health's second (high) task fails, so test-health fails.
    faults.write_text("test-health:2\n")
    run_id = deployed.run_deployment("toka-pipeline/toka-pipeline", job_variables=on_block, **_params(workspace))
    deployed.worker_once(tmp_path / "worker.log", **{**worker_env, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(
        tmp_path / "worker-1-results")})
    run = deployed.flow_run(run_id)
    assert run["state"]["type"] == "FAILED", run["state"]
    assert run["parameters"]["provider"]["model"] == "offline" and run["parameters"]["run"]["mode"] == "in-process"
    assert "test-health" in run["state"]["message"]
    assert run["state"]["data"]["storage_block_id"]
    failed = _summary(run, shared)
    _assert_test_health_failed_midway(failed, run_id)
    assert _expected_artifacts() <= _artifact_keys(deployed, run_id)
    assert len(_requests(log)) == failed.usage.requests
    before_retry = len(_requests(log))

    # Retried as from the UI: the same flow run again, picked up by another worker.
    faults.unlink()
    deployed.cli("flow-run", "retry", run_id)
    assert deployed.flow_run(run_id)["state"]["type"] == "SCHEDULED"
    deployed.worker_once(tmp_path / "worker.log", **{**worker_env, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(
        tmp_path / "worker-2-results")})
    run = deployed.flow_run(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["run_count"] == 2
    assert not (tmp_path / "worker-1-results").exists() and not (tmp_path / "worker-2-results").exists()
    summary = _summary(run, shared)
    assert summary.state == "completed" and summary.run_key == run_id
    # Only the unfinished tasks asked the model again; test-health's first task was replayed.
    asked = {(r["agent"], int(r["task"])) for r in _requests(log)[before_retry:]}
    assert asked == {("test-health", 2), ("test-health", 3), ("test-health", 4)}
    states = _task_states(summary)
    assert states[("test-health", 1)] == "cached"
    assert all(states[("test-health", i)] == "completed" for i in (2, 3, 4))


@pytest.mark.slow
def test_nightly_deployment_is_scheduled(deployed: Server) -> None:
    deployment = deployed.api("GET", "/deployments/name/toka-pipeline/toka-nightly")
    [schedule] = deployment["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert deployed.api("GET", "/deployments/name/toka-pipeline/toka-pipeline")["schedules"] == []
    # The server's scheduler creates the upcoming runs (at deployment time, then every 60 s).
    deadline = time.monotonic() + 90
    while True:
        runs = deployed.api("POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC", "limit": 10, "offset": 0})
        if runs or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert runs, "no scheduled runs of toka-nightly"
    now = datetime.now(timezone.utc)
    for run in runs:
        start = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))
        assert start > now and (start.hour, start.minute) == (2, 0)
        assert run["parameters"]["provider"]["model"] == "auto" and "auto-scheduled" in run["tags"]


@pytest.mark.slow
def test_parameters_are_validated_against_the_flow_signature(deployed: Server) -> None:
    deployment = deployed.api("GET", "/deployments/name/toka-pipeline/toka-pipeline")
    assert deployment["enforce_parameter_schema"] is True
    sections = deployment["parameter_openapi_schema"]["definitions"]
    run, provider = sections["RunOptions"]["properties"], sections["ProviderSettings"]["properties"]
    assert run["mode"]["enum"] == ["in-process", "distributed"] and run["max_concurrency"]["description"]
    assert run["max_concurrency"]["minimum"] == 1 and provider["request_timeout"]["exclusiveMinimum"] == 0
    # The CLI refuses a bad value before creating a run...
    result = deployed.cli("deployment", "run", "toka-pipeline/toka-pipeline", '--param=run={"mode": "sideways"}',
                          check=False)
    assert result.returncode != 0 and "UUID" not in result.stdout, result.stdout
    assert "Validation" in result.stdout + result.stderr or "valid" in result.stdout + result.stderr
    # ...and so does the server, whatever the client (the UI's form, the API, another CLI).
    bad = [{"run": {"max_concurrency": "lots"}}, {"run": {"max_concurrency": 0}}, {"run": {"mode": "sideways"}},
           {"provider": {"max_attempts": 99}}]
    for parameters in bad:
        response = httpx.post(f"{deployed.url}/deployments/{deployment['id']}/create_flow_run",
                              json={"parameters": parameters}, timeout=30)
        assert response.status_code in (409, 422), (parameters, response.status_code, response.text)
        assert "validation" in response.text.lower(), response.text
    runs = deployed.api("POST", "/flow_runs/filter", json={
        "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 200, "offset": 0})
    assert not [r for r in runs if r["parameters"] in bad], "a run was created with bad parameters"


@pytest.mark.slow
def test_per_agent_deployment_runs_the_agent_after_its_required_dependencies(
    deployed: Server, workspace: Path, tmp_path: Path
) -> None:
    log, results = tmp_path / "requests.jsonl", tmp_path / "results"
    run_id = deployed.run_deployment("toka-agent/docs-refresh", **_params(workspace))
    deployed.worker_once(tmp_path / "worker.log", PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(results),
                         TOKA_OFFLINE_REQUEST_LOG=str(log))
    run = deployed.flow_run(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["agent"] == "docs-refresh"
    summary = _summary(run)
    # repo-survey is required; test-health and dependency-audit are optional, so not pulled in.
    assert [a.agent for a in summary.agents] == ["repo-survey", "docs-refresh"]
    assert summary.state == "completed" and summary.run_key == run_id
    assert {r["agent"] for r in _requests(log)} == {"repo-survey", "docs-refresh"}
    assert len(_requests(log)) == summary.usage.requests
    assert any(results.iterdir())  # results went to the worker's storage, not into the checkout


@pytest.mark.slow
def test_distributed_mode_spreads_agents_over_two_workers(
    deployed: Server, workspace: Path, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.txt"
    logs = {"a": tmp_path / "requests-a.jsonl", "b": tmp_path / "requests-b.jsonl"}
    # As on two machines: each worker has its own local results directory; the run names
    # shared storage (a block) as a job variable, and the pipeline hands it to its agent runs.
    shared = tmp_path / "shared-results"
    on_block = {"env": {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": _shared_storage_block(deployed, shared)}}
    workers = []
    try:
        def start_worker(name: str, limit: int) -> None:
            env = deployed.env(PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp_path / f"local-results-{name}"),
                               TOKA_OFFLINE_REQUEST_LOG=str(logs[name]),
                               TOKA_OFFLINE_FAULTS=str(faults), TOKA_OFFLINE_LATENCY="0.2",
                               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="INFO")
            with (tmp_path / f"worker-{name}.log").open("w") as out:
                workers.append(subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", "toka-local", "--name", f"worker-{name}",
                     "--limit", str(limit)],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

        def worker_logs() -> str:
            return "\n".join(f"{path.name}: {line[:160]}" for path in sorted(tmp_path.glob("worker-*.log"))
                             for line in path.read_text().splitlines()
                             if "submitting flow run" in line or "Aborted submission" in line)

        def wait_for(what: str, ready: Callable[[], bool], timeout: float = 90) -> None:
            deadline = time.monotonic() + timeout
            while not ready():
                assert time.monotonic() < deadline, f"{what}\n{worker_logs()}"
                time.sleep(0.2)

        runner = deployed.api("GET", f"/deployments/name/{AGENT_RUNNER_DEPLOYMENT}")

        def agent_run_taken() -> bool:
            return any(r["deployment_id"] == runner["id"] and r["state"]["type"] != "SCHEDULED"
                       for r in deployed.children(first))

        # Worker a alone takes the pipeline run and, in its one other slot, the first agent
        # (repo-survey). Worker b (one slot) starts while that agent runs; the two agents of
        # wave 2 (dependency-audit, test-health) are then ready together and a has room for one.
        # test-health fails midway (an injected fault); the agents after it go on, as in-process.
        faults.write_text("test-health:2\n")
        start_worker("a", 2)
        first = deployed.run_deployment("toka-pipeline/toka-pipeline", job_variables=on_block,
                                        **_params(workspace, mode="distributed", agents=DISTRIBUTED))
        wait_for("worker a did not pick up the first agent run", agent_run_taken)
        start_worker("b", 1)
        wait_for("worker b did not start",
                 lambda: "Worker 'worker-b' started" in (tmp_path / "worker-b.log").read_text())
        run = deployed.wait_final(first)
        assert run["state"]["type"] == "FAILED", (run["state"], [(r["parameters"].get("agent"), r["state"])
                                                                 for r in deployed.children(first)], worker_logs())
        failed = _summary(run, shared)
        _assert_test_health_failed_midway(failed, first, DISTRIBUTED)
        assert failed.usage.requests == len(_requests(logs["a"])) + len(_requests(logs["b"]))

        # Each agent was a run of the agent-runner deployment, on both workers.
        ran_on = {name: {r["agent"] for r in _requests(log)} for name, log in logs.items()}
        assert "repo-survey" in ran_on["a"] and ran_on["b"], (ran_on, worker_logs())
        assert ran_on["a"] | ran_on["b"] == set(DISTRIBUTED), ran_on
        agent_runs = {r["parameters"]["agent"]: r for r in deployed.children(first)
                      if r["deployment_id"] == runner["id"]}
        assert set(agent_runs) == set(DISTRIBUTED)
        # Dependency order: an agent starts after every agent it depends on has finished.
        graph = make_plan([workspace / "agent_specs"]).graph
        for edge in (e for e in graph.edges if e.dependent in DISTRIBUTED):
            assert agent_runs[edge.dependency]["end_time"] <= agent_runs[edge.dependent]["start_time"], edge
        assert _expected_artifacts(DISTRIBUTED) <= _artifact_keys(deployed, first)
        before_retry = {name: len(_requests(log)) for name, log in logs.items()}

        # A retry from the UI: as in-process, only the failed agent's unfinished tasks run again.
        faults.unlink()
        deployed.cli("flow-run", "retry", first)
        run = deployed.wait_final(first)
        assert run["state"]["type"] == "COMPLETED", (run["state"], worker_logs())
        summary = _summary(run, shared)
        assert summary.state == "completed"
        assert all(a.state == "completed" and a.count("completed") + a.count("cached") == 4 for a in summary.agents)
        # Every agent run's result went to the shared block, none to a worker's own directory.
        assert not any((tmp_path / f"local-results-{name}").exists() for name in logs)
        asked = {(r["agent"], int(r["task"])) for name, log in logs.items()
                 for r in _requests(log)[before_retry[name]:]}
        assert asked == {("test-health", 2), ("test-health", 3), ("test-health", 4)}
        assert _task_states(summary)[("test-health", 1)] == "cached"
        # As Prefect does with subflows: the completed agent runs were reused, the failed one redone.
        started = [r["parameters"]["agent"] for r in deployed.children(first) if r["deployment_id"] == runner["id"]]
        assert sorted(started) == sorted([*DISTRIBUTED, "test-health"])
    finally:
        for proc in workers:
            # An idle Prefect 3.8 worker took over 20 s to act on SIGTERM/SIGINT here; its
            # flow-run processes (all finished by now) run in their own sessions anyway.
            stop_process(proc, grace=3)


# -- PostgreSQL ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a loopback port; yields its SQLAlchemy URL."""
    try:
        with temporary_database() as database:
            yield database.url
    except PostgresUnavailable as e:
        pytest.skip(str(e))


def _concurrent_creations(server: Server, n: int) -> tuple[float, int]:
    """Create ``n`` runs of a deployment at once; wall time and how often the server said busy."""
    import asyncio

    async def main() -> tuple[float, int]:
        busy = 0
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            deployment = (await client.get("/deployments/name/toka-pipeline/toka-pipeline")).json()["id"]

            async def create(i: int) -> None:
                nonlocal busy
                while True:  # what Prefect's client does: on 503, wait Retry-After and try again
                    try:
                        r = await client.post(f"/deployments/{deployment}/create_flow_run", json={
                            "name": f"concurrent-{i}",
                            "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}},
                        })
                    except httpx.TransportError:
                        busy += 1
                        await asyncio.sleep(1)
                        continue
                    if r.status_code != 503:
                        r.raise_for_status()
                        return
                    busy += 1
                    await asyncio.sleep(float(r.headers.get("Retry-After", 2)))

            started = time.monotonic()
            await asyncio.gather(*(create(i) for i in range(n)))
            return time.monotonic() - started, busy

    return asyncio.run(main())


@pytest.mark.slow
def test_postgresql_backed_server(
    postgres: str, deployed: Server, workspace: Path, tmp_path: Path
) -> None:
    """The README's scale-out server: deploy, run on a worker, and concurrent run creation."""
    (tmp_path / "pg-server").mkdir()
    started = time.monotonic()
    pg_server, server = _start_server(tmp_path / "pg-server", PREFECT_SERVER_DATABASE_CONNECTION_URL=postgres)
    print(f"PostgreSQL-backed server healthy after {time.monotonic() - started:.1f}s")
    try:
        _deploy(server)
        results = tmp_path / "results"
        run_id = server.run_deployment("toka-pipeline/toka-pipeline", **_params(workspace, agents=["repo-survey"]))
        server.worker_once(tmp_path / "worker.log", PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(results))
        run = server.flow_run(run_id)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        assert [a.agent for a in _summary(run).agents] == ["repo-survey"]

        n = 20
        pg_seconds, pg_busy = _concurrent_creations(server, n)
        sqlite_seconds, sqlite_busy = _concurrent_creations(deployed, n)
        print(f"{n} concurrent run creations: PostgreSQL {pg_seconds:.2f}s ({pg_busy} busy answers), "
              f"SQLite {sqlite_seconds:.2f}s ({sqlite_busy} busy answers)")
        assert pg_busy == 0, "a PostgreSQL-backed server should not answer 'busy' to concurrent writes"
    finally:
        pg_server.stop()


# -- distributed mode without a server's deployment ----------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_distributed_mode_needs_the_agent_runner_deployment(write_specs: Any) -> None:
    import asyncio

    from flows.pipeline import pipeline
    from toka.config import ProviderSettings, RunOptions

    specs = write_specs(minimal_spec("alpha"))

    async def go() -> Any:
        # A deployment name no server of this session has (the shared server may have the default).
        state = await pipeline(specs=[str(specs)], provider=ProviderSettings(model="offline"),
                               run=RunOptions(mode="distributed", agent_deployment="toka-agent-runner/not-deployed"),
                               return_state=True)
        return await state.aresult(raise_on_failure=False)

    error = asyncio.run(go())
    assert isinstance(error, ConfigError)
    assert "needs the deployment 'toka-agent-runner/not-deployed'" in str(error) and "prefect deploy --all" in str(error)


@pytest.mark.usefixtures("prefect_server")
def test_agent_runner_runs_exactly_one_agent_with_the_given_upstream(write_specs: Any, tmp_path: Path) -> None:
    import asyncio

    from flows.agent import agent_runner
    from toka.config import RunConfig
    from toka.results import AgentRunOutcome

    specs = write_specs(minimal_spec("alpha", priority="high"), minimal_spec("beta", required=["alpha"]))
    digest = make_plan([specs]).graph.agents["beta"].digest()
    upstream = {"alpha": {"kind": "required", "state": "completed",
                          "results": [{"task": 1, "summary": "alpha found things"}]}}

    async def go(**kwargs: Any) -> tuple[str, Any]:
        run = RunConfig.from_flat({"run_key": f"runner-{kwargs.pop('key')}", "workspace": str(tmp_path),
                                   **kwargs.pop("run", {})})
        state = await agent_runner(agent="beta", run=run, specs=[str(specs)], upstream=upstream, return_state=True,
                                   **kwargs)
        return state.name, await state.aresult(raise_on_failure=False)

    name, outcome = asyncio.run(go(key=1, spec_digest=digest, run={"model": "offline"}))
    assert name == "Completed" and isinstance(outcome, AgentRunOutcome)
    assert outcome.report.agent == "beta" and outcome.report.state == "completed"  # alpha did not run again
    assert outcome.charged.requests > 0 and outcome.spent == outcome.charged.total_tokens

    name, error = asyncio.run(go(key=2, spec_digest="0" * 64, run={"model": "offline"}))
    assert name == "Failed" and isinstance(error, ConfigError) and "every worker needs the same checkout" in str(error)

    # A model id and no key: the agent fails (it does not fall back to offline), charging nothing.
    name, outcome = asyncio.run(go(key=3, run={"model": "claude-sonnet-4-5"}))
    assert name == "Failed" and isinstance(outcome, AgentRunOutcome) and outcome.report is None
    assert "needs an Anthropic API key" in str(outcome.error)
    assert outcome.charged.requests == 0 and outcome.spent == 0
