"""The prompt a model sees: the whole spec in the system prompt, one task with its inputs in the task message.

Snapshot tests compare full prompts with files in tests/snapshots/. After an
intended change, rewrite them with::

    TOKA_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_prompt.py

and review the diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from toka.capabilities import grant_tools
from toka.prompt import system_prompt, task_message
from toka.spec import AgentSpec

from .conftest import AGENT_SPECS, TOKA_SPECS, minimal_spec

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE_ENV = "TOKA_UPDATE_SNAPSHOTS"
READ_TOOLS = ["read_file", "list_dir", "search_files"]

ALL_SPECS = sorted([*TOKA_SPECS.glob("*.yaml"), *AGENT_SPECS.glob("*.yaml")])


def load(path: Path) -> AgentSpec:
    return AgentSpec.from_file(path)


def granted_tools(spec: AgentSpec) -> list[str]:
    return [t.name for t in grant_tools(spec.security.capabilities_required)[0]]


def check_snapshot(name: str, actual: str, *, directory: Path = SNAPSHOTS) -> None:
    """Compare ``actual`` with the snapshot ``name``; write it instead when TOKA_UPDATE_SNAPSHOTS=1."""
    path = directory / name
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(actual.encode("utf-8"))
        return
    if not path.exists():
        pytest.fail(
            f"snapshot {path} does not exist; create it by running "
            f"{UPDATE_ENV}=1 python -m pytest tests/test_prompt.py, then review the new file",
            pytrace=False,
        )
    expected = path.read_bytes().decode("utf-8")
    assert actual == expected, (
        f"output differs from snapshot {path}; if the change is intended, "
        f"rerun with {UPDATE_ENV}=1 and review the diff"
    )


def yaml_block(prompt: str) -> str:
    match = re.search(r"## Domain context \(from the spec\)\n```yaml\n(.*?)\n```\n", prompt, re.S)
    assert match, "no domain context block"
    return match.group(1)


def json_blocks(message: str) -> list[Any]:
    return [json.loads(m) for m in re.findall(r"```json\n(.*?)\n```", message, re.S)]


PRIOR = [
    {
        "task": 1,
        "description": "First task",
        "status": "completed",
        "summary": "Found two crates with conflicting versions.",
        "deliverables": ["conflict list"],
        "files_changed": [],
        "metrics": {"dependency-conflicts": 2},
        "follow_ups": ["Pin base64ct"],
    },
    {
        "task": 2,
        "description": "Second task",
        "status": "completed",
        "summary": "Edition 2024 needs Rust 1.85 — «unicode» kept as is.",
        "deliverables": [],
        "files_changed": ["Cargo.toml"],
        "metrics": {},
        "follow_ups": [],
    },
]
UPSTREAM = {
    "test-health": [{"task": 1, "status": "completed", "summary": "3 failing tests", "metrics": {"tests-failed": 3}}],
    "repo-survey": [
        {"task": 1, "status": "completed", "summary": "One package, src layout"},
        {"task": 2, "status": "completed", "summary": "CI runs pytest"},
    ],
}


# -- snapshots ---------------------------------------------------------------------------------


SNAPSHOT_SPECS = [
    (TOKA_SPECS / "build-system-stabilization.yaml", (), 3),
    (AGENT_SPECS / "docs-refresh.yaml", ("publish",), 3),
]
SNAPSHOT_IDS = [path.stem for path, _, _ in SNAPSHOT_SPECS]


@pytest.mark.parametrize(("path", "contexts", "index"), SNAPSHOT_SPECS, ids=SNAPSHOT_IDS)
def test_system_prompt_snapshot(path: Path, contexts: tuple[str, ...], index: int) -> None:
    spec = load(path)
    check_snapshot(f"{spec.name}.system.txt", system_prompt(spec, tools=granted_tools(spec)))


@pytest.mark.parametrize(("path", "contexts", "index"), SNAPSHOT_SPECS, ids=SNAPSHOT_IDS)
def test_task_message_snapshot(path: Path, contexts: tuple[str, ...], index: int) -> None:
    spec = load(path)
    tasks = spec.task_list(contexts)
    message = task_message(spec, tasks, index, prior=PRIOR, upstream=UPSTREAM)
    check_snapshot(f"{spec.name}.task-{index}.txt", message)


def test_a_missing_snapshot_fails_explaining_how_to_create_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UPDATE_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match=rf"does not exist; create it by running {UPDATE_ENV}=1"):
        check_snapshot("nothing.txt", "text\n", directory=tmp_path)
    assert not (tmp_path / "nothing.txt").exists()


def test_update_mode_writes_the_snapshot_and_then_it_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(UPDATE_ENV, "1")
    check_snapshot("new.txt", "héllo\n", directory=tmp_path / "snaps")
    assert (tmp_path / "snaps" / "new.txt").read_bytes() == "héllo\n".encode()
    monkeypatch.delenv(UPDATE_ENV)
    check_snapshot("new.txt", "héllo\n", directory=tmp_path / "snaps")
    with pytest.raises(AssertionError, match="differs from snapshot"):
        check_snapshot("new.txt", "hello\n", directory=tmp_path / "snaps")


# -- the system prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: p.stem)
def test_system_prompt_contains_every_part_of_the_spec(path: Path) -> None:
    spec = load(path)
    tools = granted_tools(spec)
    prompt = system_prompt(spec, tools=tools)
    s, m = spec.spec, spec.metadata
    assert prompt.startswith(f"You are {s.name} (agent id: {m.name}), run by the toka runtime.\n")
    assert f"Domain: {s.domain}. Workstream: {m.workstream or '-'}. Priority: {s.priority}.\n" in prompt
    # objectives, in order, each with its deliverable and validation
    positions = []
    for i, o in enumerate(spec.objectives, 1):
        prio = f" (priority: {o.priority})" if o.priority else ""
        entry = f"{i}. {o.description}{prio}\n   Deliverable: {o.deliverable}\n   Validation: {o.validation}\n"
        assert entry in prompt
        positions.append(prompt.index(entry))
    assert positions == sorted(positions)
    for skill in [*spec.capabilities.primary, *spec.capabilities.secondary]:
        assert f"- {skill}\n" in prompt
    d = spec.behavioral_directives
    for items in (d.operational_focus, d.error_handling, d.coordination):
        for item in items:
            assert f"- {item}\n" in prompt
    for risk in spec.risk_mitigation.high_priority_risks:
        assert f"- Risk: {risk.risk}" in prompt
        assert f"  Mitigation: {risk.mitigation}\n" in prompt
    for item in spec.risk_mitigation.monitoring:
        assert f"- {item}\n" in prompt
    for criteria in spec.success_criteria.model_dump().values():
        for item in criteria:
            assert f"- {item}\n" in prompt
    for metric in spec.reporting.metrics:
        assert f"- {metric.name}" in prompt
        if metric.description:
            assert metric.description in prompt
    if spec.context_blocks:
        assert yaml.safe_load(yaml_block(prompt)) == spec.context_blocks
    else:
        assert "## Domain context" not in prompt
    caps = spec.security.capabilities_required
    assert f"Declared capabilities: {', '.join(caps) if caps else 'none'}.\n" in prompt
    assert f"Tools you may call: {', '.join([*tools, 'submit_result'])}.\n" in prompt
    assert prompt.endswith("\n") and not prompt.endswith("\n\n")


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: p.stem)
def test_prompts_are_deterministic(path: Path) -> None:
    one, two = load(path), load(path)
    tools = granted_tools(one)
    assert system_prompt(one, tools=tools).encode() == system_prompt(two, tools=tools).encode()
    tasks_one, tasks_two = one.task_list(), two.task_list()
    for i in range(1, len(tasks_one) + 1):
        a = task_message(one, tasks_one, i, prior=PRIOR, upstream=UPSTREAM)
        # equal inputs built in another order give the same bytes
        b = task_message(two, tasks_two, i, prior=[dict(reversed(r.items())) for r in PRIOR],
                         upstream=dict(reversed(list(UPSTREAM.items()))))
        assert a.encode() == b.encode()


def test_identity_of_build_system_stabilization() -> None:
    prompt = system_prompt(load(TOKA_SPECS / "build-system-stabilization.yaml"), tools=READ_TOOLS)
    assert prompt.splitlines()[:2] == [
        "You are Build System Stabilization Agent (agent id: build-system-stabilization), run by the toka runtime.",
        "Domain: infrastructure. Workstream: Build System Stabilization. Priority: critical.",
    ]
    assert "1. Resolve base64ct dependency conflict\n" in prompt
    assert "   Deliverable: Fixed base64ct edition2024 compatibility across workspace\n" in prompt
    assert "   Validation: cargo check && cargo test passes without dependency conflicts\n" in prompt
    assert "- build-success-rate: Percentage of successful builds across workspace\n" in prompt
    assert "- Risk: Breaking changes to existing build processes\n" \
           "  Mitigation: Test all changes in isolated environment before applying\n" in prompt
    assert ("Declared capabilities: filesystem-read, filesystem-write, cargo-execution, "
            "git-access, ci-integration.\n") in prompt
    assert "Tools you may call: read_file, list_dir, search_files, submit_result.\n" in prompt


def test_sections_come_in_a_fixed_order() -> None:
    prompt = system_prompt(load(TOKA_SPECS / "storage-advancement.yaml"), tools=READ_TOOLS)
    headings = [line for line in prompt.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Objectives",
        "## Skills",
        "## Directives: operational focus",
        "## Directives: error handling",
        "## Directives: coordination",
        "## Risks and mitigations",
        "## Success criteria",
        "## Metrics to report (submit_result.metrics, keyed by name)",
        "## Domain context (from the spec)",
        "## Permissions",
        "## How to work",
    ]


def test_domain_context_of_storage_advancement() -> None:
    spec = load(TOKA_SPECS / "storage-advancement.yaml")
    prompt = system_prompt(spec, tools=READ_TOOLS)
    block = yaml_block(prompt)
    assert block.startswith("storage_enhancements:\n  wal_implementation:\n")
    assert yaml.safe_load(block) == {"storage_enhancements": spec.context_blocks["storage_enhancements"]}
    assert "backend: PostgreSQL" in block


def test_context_blocks_keep_file_order() -> None:
    spec = load(TOKA_SPECS / "llm-credentials-setup.yaml")
    names = list(spec.context_blocks)
    assert names == ["llm_provider_options", "integration_configuration", "orchestration_integration"]
    block = yaml_block(system_prompt(spec, tools=READ_TOOLS))
    top_level = [line[:-1] for line in block.splitlines() if re.fullmatch(r"\w+:", line)]
    assert top_level == names


def test_context_blocks_keep_file_order_even_when_not_alphabetical() -> None:
    data = minimal_spec("ordered", zeta_notes={"b": 2, "a": 1}, alpha_notes=["x", "y"])
    prompt = system_prompt(AgentSpec.from_dict(data), tools=[])
    assert yaml_block(prompt) == "zeta_notes:\n  b: 2\n  a: 1\nalpha_notes:\n- x\n- y"


def test_optional_parts_are_rendered() -> None:
    data = minimal_spec(
        "full",
        objectives=[{"description": "Do X", "deliverable": "X done", "validation": "X checked", "priority": "high"}],
        risk_mitigation={"high_priority_risks": [
            {"risk": "R1", "mitigation": "M1", "probability": "low", "impact": "high"},
            {"risk": "R2", "mitigation": "M2", "impact": "medium"},
        ]},
        reporting={"metrics": [{"name": "plain"}, {"name": "described", "description": "How much"}]},
    )
    data["spec"]["description"] = "  Looks after the demo.\n"
    data["metadata"]["workstream"] = "Care"
    prompt = system_prompt(AgentSpec.from_dict(data), tools=["list_dir"])
    assert "Workstream: Care." in prompt
    assert "\n\nLooks after the demo.\n\n## Objectives\n" in prompt
    assert "1. Do X (priority: high)\n   Deliverable: X done\n   Validation: X checked\n" in prompt
    assert "- Risk: R1 (probability: low, impact: high)\n  Mitigation: M1\n" in prompt
    assert "- Risk: R2 (impact: medium)\n  Mitigation: M2\n" in prompt
    assert "- plain\n- described: How much\n" in prompt
    assert "Tools you may call: list_dir, submit_result.\n" in prompt


def test_a_minimal_spec_has_no_empty_sections() -> None:
    prompt = system_prompt(AgentSpec.from_dict(minimal_spec("bare")), tools=[])
    assert "Workstream: -." in prompt
    for heading in ("## Objectives", "## Skills", "## Directives", "## Risks", "## Success criteria",
                    "## Metrics", "## Domain context"):
        assert heading not in prompt
    assert "Declared capabilities: none.\nTools you may call: submit_result.\n" in prompt


def test_only_the_tools_line_depends_on_the_tools() -> None:
    spec = load(AGENT_SPECS / "docs-refresh.yaml")
    a = system_prompt(spec, tools=READ_TOOLS).splitlines()
    b = system_prompt(spec, tools=[]).splitlines()
    assert [x for x, y in zip(a, b, strict=True) if x != y] == [
        "Tools you may call: read_file, list_dir, search_files, submit_result."
    ]


def test_success_criteria_phases_keep_the_spec_order() -> None:
    data = minimal_spec("phased", success_criteria={
        "phase_1": ["one"], "phase_2": ["two"], "phase_3": ["three"], "final_validation": ["last"],
    })
    prompt = system_prompt(AgentSpec.from_dict(data), tools=[])
    phases = [line for line in prompt.splitlines() if line.endswith(":") and line[0].isupper()]
    assert phases == ["Phase 1:", "Phase 2:", "Phase 3:", "Final validation:"]


def test_metric_descriptions_are_shown_verbatim() -> None:
    data = minimal_spec("metric", reporting={"metrics": [{"name": "ratio", "description": "Passed tests per run:"}]})
    prompt = system_prompt(AgentSpec.from_dict(data), tools=[])
    assert "- ratio: Passed tests per run:\n" in prompt


# -- the task message ------------------------------------------------------------------------------


def test_task_message_of_the_first_task() -> None:
    spec = load(TOKA_SPECS / "build-system-stabilization.yaml")
    message = task_message(spec, spec.task_list(), 1)
    assert message == (
        "# Task 1 of 8: Analyze current base64ct dependency conflict in workspace\n"
        "Priority: high.\n"
        "\n"
        "## Results of this agent's earlier tasks\n"
        "None: this is the first task.\n"
        "\n"
        "## Results of the agents this one depends on\n"
        "None.\n"
        "\n"
        "When the task is done (or cannot be done), call submit_result.\n"
    )


def test_task_message_numbers_and_priorities() -> None:
    spec = load(TOKA_SPECS / "build-system-stabilization.yaml")
    tasks = spec.task_list()
    for i, task in enumerate(tasks, 1):
        lines = task_message(spec, tasks, i).splitlines()
        assert lines[0] == f"# Task {i} of {len(tasks)}: {task.description}"
        assert lines[1] == f"Priority: {task.priority}."


def test_task_message_carries_earlier_and_upstream_results_as_json() -> None:
    spec = load(AGENT_SPECS / "docs-refresh.yaml")
    tasks = spec.task_list(["publish"])
    message = task_message(spec, tasks, 3, prior=PRIOR, upstream=UPSTREAM)
    assert message.startswith(
        "# Task 3 of 5: Correct outdated documentation passages with minimal edits\n"
        "Priority: medium.\n"
        "The spec expects these tools to help: edit_file.\n"
    )
    prior, repo_survey, test_health = json_blocks(message)
    assert prior == PRIOR
    assert repo_survey == UPSTREAM["repo-survey"]
    assert test_health == UPSTREAM["test-health"]
    # upstream agents in name order, each under its own heading
    assert message.index("### repo-survey\n") < message.index("### test-health\n")
    assert "Edition 2024 needs Rust 1.85 — «unicode» kept as is." in message  # not \\u-escaped
    assert "None: this is the first task." not in message
    assert message.endswith("\nWhen the task is done (or cannot be done), call submit_result.\n")


def test_task_message_shows_the_task_prerequisites() -> None:
    data = minimal_spec("pre")
    data["tasks"]["default"][1].update(tools_required=["cargo", "git"], dependencies=["task 1 done", "CI green"])
    spec = AgentSpec.from_dict(data)
    message = task_message(spec, spec.task_list(), 2)
    assert "The spec expects these tools to help: cargo, git.\n" in message
    assert "Prerequisites named in the spec: task 1 done; CI green.\n" in message
