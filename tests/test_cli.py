from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from toka import cli
from toka.cli import app

from .conftest import AGENT_SPECS, ROOT, TOKA_SPECS, minimal_spec

runner = CliRunner()


def toka(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


class TestValidate:
    def test_one_line_per_agent(self) -> None:
        code, out, _ = toka("validate", TOKA_SPECS)
        assert code == 0
        lines = [l for l in out.splitlines() if l.startswith("ok ")]
        assert len(lines) == 9
        bss = next(l for l in lines if "build-system-stabilization" in l)
        assert "critical" in bss and "8 tasks" in bss
        assert "timeout 2h, memory 512MB, cpu 75%" in bss
        doc = next(l for l in lines if "document-organization" in l)
        assert "requires: build-system-stabilization" in doc
        assert "optional: github-cicd-issues-resolution, testing-infrastructure" in doc
        assert out.rstrip().endswith("9 agents valid, 0 warnings")

    def test_one_file_of_a_set_names_the_dependencies_it_declares(self) -> None:
        """They are not among the files read: said so, not shown as none ("requires: -")."""
        code, out, _ = toka("validate", AGENT_SPECS / "docs-refresh.yaml")
        assert code == 0
        assert ("requires: repo-survey (not loaded)  optional: test-health (not loaded), "
                "dependency-audit (not loaded)") in out

    def test_default_is_agent_specs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(ROOT)
        code, out, _ = toka("validate")
        assert code == 0
        assert "5 agents valid" in out

    def test_bad_spec_exits_2_with_located_errors(self, write_specs) -> None:
        bad = minimal_spec("bad")
        bad["security"]["resource_limits"]["max_cpu"] = "150%"
        bad["spec"]["priority"] = "urgent"
        folder = write_specs(bad, minimal_spec("fine"))
        code, out, err = toka("validate", folder)
        assert code == 2
        assert f"{folder / 'bad.yaml'}:" in err
        assert "security.resource_limits.max_cpu: '150%' is not a percentage between 1% and 100%" in err
        assert "spec.priority: 'urgent' is not one of" in err
        assert "2 errors" in err
        assert "Traceback" not in out + err

    def test_warnings_are_shown(self, write_specs) -> None:
        folder = write_specs(minimal_spec("a", optional={"ghost": ""}))
        code, out, err = toka("validate", folder)
        assert code == 0
        assert "warning:" in err and "unknown optional dependency 'ghost'" in err
        assert "1 agent valid, 1 warning" in out

    def test_missing_path(self, tmp_path: Path) -> None:
        code, _, err = toka("validate", tmp_path / "nowhere")
        assert code == 2
        assert "nowhere: no such file or directory" in err

    def test_a_fifo_is_refused_without_reading_it(self, tmp_path: Path) -> None:
        os.mkfifo(tmp_path / "pipe.yaml")  # opening it to read would wait for a writer forever
        code, _, err = toka("validate", tmp_path / "pipe.yaml")
        assert code == 2
        assert "pipe.yaml: not a regular file or a directory" in err

    def test_a_file_of_several_yaml_documents_says_so(self, tmp_path: Path) -> None:
        (tmp_path / "two.yaml").write_text("metadata:\n  name: a\n---\nmetadata:\n  name: b\n")
        code, _, err = toka("validate", tmp_path / "two.yaml")
        assert code == 2
        assert "two.yaml:3: invalid YAML: a spec file holds one YAML document, and this one has another" in err

    def test_empty_directory(self, tmp_path: Path) -> None:
        code, _, err = toka("validate", tmp_path)
        assert code == 2
        assert "no agent specs" in err

    def test_cycle_exits_2(self, write_specs) -> None:
        folder = write_specs(minimal_spec("a", required={"b": ""}), minimal_spec("b", required={"a": ""}))
        code, _, err = toka("validate", folder)
        assert code == 2
        assert "a -> b -> a" in err


class TestPlan:
    def test_human_output_lists_waves(self) -> None:
        code, out, _ = toka("plan", TOKA_SPECS)
        assert code == 0
        assert out.startswith("9 agents in 6 waves")
        assert out.index("wave 1") < out.index("build-system-stabilization") < out.index("wave 2")
        assert "capabilities: filesystem-read, filesystem-write, cargo-execution, git-access, ci-integration" in out
        assert "build-system-stabilization -> storage-advancement  (required)" in out

    def test_json_is_stable(self) -> None:
        code, out, _ = toka("plan", TOKA_SPECS, "--json")
        assert code == 0
        plan = json.loads(out)
        assert plan["format"] == "toka-plan/1"
        assert list(plan) == ["format", "agents", "waves", "order", "edges", "dropped_edges", "warnings"]
        assert plan["waves"][0] == ["build-system-stabilization"]
        assert plan["order"] == [a["name"] for a in plan["agents"]]
        first = plan["agents"][0]
        assert list(first) == [
            "name", "title", "source", "priority", "domain", "workstream", "wave", "tasks",
            "conditional_tasks", "requires", "optional", "capabilities", "capability_status", "sandbox", "limits",
        ]
        assert first["capability_status"]["ci-integration"] == "declared, not tool-backed"
        assert first["capability_status"]["filesystem-read"] == "tool-backed: read_file, list_dir, search_files"
        assert first["limits"] == {
            "timeout_seconds": 7200.0,
            "max_memory_bytes": 512 * 1024**2,
            "max_cpu_percent": 75.0,
            "max_disk_usage_bytes": None,
            "max_network_bandwidth_bps": None,
            "max_processes": None,
        }
        assert {"from": "build-system-stabilization", "to": "testing-infrastructure",
                "kind": "required",
                "reason": "Stable build system required for reliable test execution"} in plan["edges"]

    def test_agent_selection(self) -> None:
        code, out, _ = toka("plan", TOKA_SPECS, "--json", "--agent", "storage-advancement")
        assert code == 0
        plan = json.loads(out)
        assert plan["order"] == ["build-system-stabilization", "storage-advancement"]
        assert plan["agents"][1]["optional"] == []

    def test_selecting_optional_dependency_too_orders_it(self) -> None:
        code, out, _ = toka(
            "plan", TOKA_SPECS, "--json", "-a", "storage-advancement", "-a", "kernel-events-enhancement"
        )
        plan = json.loads(out)
        assert plan["waves"] == [
            ["build-system-stabilization"], ["kernel-events-enhancement"], ["storage-advancement"]
        ]

    def test_unknown_agent_exits_2(self) -> None:
        code, _, err = toka("plan", TOKA_SPECS, "--agent", "storage-advancment")
        assert code == 2
        assert "did you mean 'storage-advancement'?" in err

    def test_selecting_an_agent_whose_file_does_not_load_names_only_the_file(self, write_specs) -> None:
        """The agent exists; its file is the problem, not the selection."""
        bad = minimal_spec("bad")
        bad["spec"]["priority"] = "urgent"
        folder = write_specs(bad, minimal_spec("fine"))
        code, _, err = toka("plan", folder, "--agent", "bad")
        assert code == 2
        assert "spec.priority: 'urgent' is not one of" in err
        assert "unknown agent" not in err


class TestSchema:
    def test_prints_json_schema_with_docstrings(self) -> None:
        code, out, _ = toka("schema")
        assert code == 0
        schema = json.loads(out)
        limits = schema["$defs"]["ResourceLimits"]["properties"]
        assert "Wall-clock limit" in limits["timeout"]["description"]

    @pytest.mark.parametrize("spec_file", sorted(TOKA_SPECS.glob("*.yaml")) + sorted(AGENT_SPECS.glob("*.yaml")),
                             ids=lambda p: p.name)
    def test_every_real_spec_validates_against_schema(self, spec_file: Path) -> None:
        schema = json.loads((AGENT_SPECS / "agent-spec.schema.json").read_text())
        jsonschema.validate(yaml.safe_load(spec_file.read_text()), schema)

    def test_committed_schema_is_current(self) -> None:
        code, out, err = toka("schema", "--check", AGENT_SPECS / "agent-spec.schema.json")
        assert code == 0, err

    def test_agent_specs_reference_the_schema(self) -> None:
        for spec_file in AGENT_SPECS.glob("*.yaml"):
            first = spec_file.read_text().splitlines()[0]
            assert first == "# yaml-language-server: $schema=./agent-spec.schema.json", spec_file


def test_console_script_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("metadata: {name: x}\nspec: [1, 2\n")
    exe = Path(sys.executable).with_name("toka")
    proc = subprocess.run(
        [str(exe), "validate", str(tmp_path)], capture_output=True, text=True,
        env={**os.environ, "NO_COLOR": "1"}, timeout=60,
    )
    assert proc.returncode == 2
    assert f"{tmp_path / 'x.yaml'}:" in proc.stderr and "invalid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr


class TestRunOptionsAreCheckedBeforeAnythingStarts:
    """Bad `toka run` options exit 2 naming the option, before Prefect starts and before a run is recorded."""

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--request-timeout", "-5"], "--request-timeout: -5.0: input should be greater than 0"),
            (["--task-timeout", "0"], "--task-timeout: 0.0: input should be greater than 0"),
            (["--retry-delay", "-1"], "--retry-delay: -1.0: input should be greater than or equal to 0"),
            (["--max-retry-wait", "-1"], "--max-retry-wait: -1.0: input should be greater than or equal to 0"),
            (["--json", "missing-dir/summary.json"], "the directory 'missing-dir' does not exist"),
            (["--json", "."], "is a directory; name a file"),
            (["--needs-approval", "rm-rf"], "--needs-approval takes network-access, git-push, write-outside-paths"),
            # Misspelt, it would run no conditional task and say nothing.
            (["--context", "publsh"], "context 'publsh': no selected agent has tasks for it (they have: publish)"),
            (["--agent", "repo-survey", "--context", "publish"],
             "context 'publish': no selected agent has tasks for it (they have no conditional tasks)"),
        ],
    )
    def test_bad_option(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                        message: str) -> None:
        monkeypatch.chdir(tmp_path)
        code, out, err = toka("run", AGENT_SPECS, *args)
        assert code == 2, out + err
        assert message in err and "Traceback" not in out + err
        assert not (tmp_path / ".toka" / "runs" / "last.json").exists()  # a later --resume is unaffected

    def test_resume_refuses_a_selection_the_last_run_did_not_make(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from toka.runs import RunRecord

        monkeypatch.chdir(tmp_path)
        RunRecord.start(specs=[str(AGENT_SPECS)], agents=["repo-survey"], model="offline", contexts=[],
                        run_key="k1").save(tmp_path / ".toka")
        for args, message in [
            (["--agent", "docs-refresh"], "--agent ['docs-refresh'] contradicts --resume"),
            (["--model", "claude-x"], "--model 'claude-x' contradicts --resume"),
            (["--run-key", "k2"], "--run-key 'k2' contradicts --resume"),
            ([str(ROOT / "tests")], "contradicts --resume"),
        ]:
            code, out, err = toka("run", "--resume", *args)
            assert code == 2 and message in err and "(k1) used" in err, err


class TestOneRunAtATime:
    def test_a_second_run_in_the_workspace_is_refused_naming_the_first(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two at once paid twice for the same tasks, and the one that ended last reset the run's branch."""
        from toka.runs import RunRecord, hold_workspace

        monkeypatch.chdir(tmp_path)
        RunRecord.start(specs=[str(AGENT_SPECS)], agents=[], model="offline", contexts=[], run_key="first").save(
            tmp_path / ".toka")
        held = hold_workspace(tmp_path / ".toka", "first")
        try:
            for args in (["run", AGENT_SPECS, "--model", "offline"], ["run", "--resume"]):
                code, out, err = toka(*args)
                assert code == 2 and "another toka run is running in this workspace (run first, pid " in err, err
            assert RunRecord.load_last(tmp_path / ".toka").run_key == "first"  # still the one --resume continues
        finally:
            held.close()
        hold_workspace(tmp_path / ".toka", "next").close()  # free again once the first has ended


class TestResumeKeepsTheRunsSettings:
    def test_a_resume_runs_with_the_settings_of_the_run(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """It went on in branch mode after an --in-place run, and paid again for tasks whose
        cache key holds --max-turns."""
        from toka.runs import RunRecord

        seen: list[Any] = []

        def capture(plan: Any, specs: Any, agents: Any, config: Any, *rest: Any, **kwargs: Any) -> Any:
            seen.append(config)  # the run is recorded by now; it would start here
            raise SystemExit(0)

        monkeypatch.setattr(cli, "_run_and_report", capture)
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no server is looked for
        monkeypatch.chdir(tmp_path)
        code, _, err = toka("run", AGENT_SPECS, "--model", "offline", "--in-place", "--max-turns", "20",
                            "--agent-budget", "9000")
        assert code == 0, err
        (first,) = seen
        assert RunRecord.load_last(tmp_path / ".toka").options["in_place"] is True
        code, _, err = toka("run", "--resume", "--agent-budget", "20000")  # a budget may be raised to finish
        assert code == 0, err
        resumed = seen[-1]
        assert resumed.in_place and resumed.limits.max_turns == 20 and resumed.run_key == first.run_key
        assert resumed.budgets.agent_token_budget == 20000
        code, _, err = toka("run", "--resume", "--max-turns", "30")
        assert code == 2 and "--max-turns 30 contradicts --resume" in err and "used 20" in err, err


def test_doctor_names_a_mechanism_or_the_refusal_for_every_limit() -> None:
    code, out, _ = toka("doctor")
    assert code == 0
    for label in ("wall-clock timeout", "max_memory", "max_cpu", "max_processes", "max_disk_usage",
                  "network denied", "max_network_bandwidth", "other processes", "the host"):
        line = next((l for l in out.splitlines() if l.strip().startswith(label)), None)
        assert line is not None, f"toka doctor does not mention {label}:\n{out}"
        assert line.strip() != label  # a mechanism, or what happens without one
    assert "max_network_bandwidth" in out and "refused" in out.split("max_network_bandwidth", 1)[1].splitlines()[0]
