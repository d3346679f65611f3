"""Specs as they are written in the wild: sensible values load (normalised, warned where a guess),
and every problem of a set comes out in one pass."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toka.errors import SpecError
from toka.plan import make_plan
from toka.prompt import system_prompt, task_message
from toka.spec import AgentSpec

from .conftest import AGENT_SPECS

TOKA = str(Path(sys.executable).parent / "toka")


def survey_text() -> str:
    return (AGENT_SPECS / "repo-survey.yaml").read_text()


def edited(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    "written",
    ["2025-07-06T03:24:55+00:00", "'2025-07-06T03:24:55+00:00'", "'2026-03-02T10:15:00Z'", "2026-03-02T10:15:00Z",
     "2026-03-02", "'2026-03-02'"],
)
def test_metadata_dates_accept_dates_and_iso_date_times_quoted_or_not(written: str) -> None:
    spec = AgentSpec.from_text(edited(survey_text(), '  created: "2026-11-24"', f"  created: {written}"))
    assert spec.metadata.created is not None
    assert spec.metadata.created.isoformat().startswith(written.strip("'")[:10])
    spec.digest()  # serialises


def test_a_bad_date_names_both_accepted_forms_without_a_python_repr() -> None:
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(edited(survey_text(), '  created: "2026-11-24"', "  created: last tuesday"),
                            source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.field == "metadata.created" and "datetime" not in problem.message
    assert "is not a date (write YYYY-MM-DD, or an ISO 8601 date-time" in problem.message


def wild_spec() -> str:
    text = survey_text()
    text = edited(text, '  created: "2026-11-24"', "  created: 2025-07-06T03:24:55+00:00\n  owner: platform-team")
    text = re.sub(r'priority: "critical"', 'priority: "Critical"', text, count=1)
    text = re.sub(r"timeout: \S+", "timeout: 1200", text, count=1)
    text = re.sub(r"max_cpu: \S+", "max_cpu: 50", text, count=1)
    text = edited(text, "  capabilities_required:", "  audit_level: full\n  capabilities_required:")
    text = edited(text, "    - description:", "    - ticket: OPS-12\n      description:")
    return re.sub(r"(?ms)^  metrics:\n.*?(?=^security:)", "  metrics: {}\n", text)


def test_sensible_values_load_normalised_with_warnings_where_guessed() -> None:
    spec = AgentSpec.from_text(wild_spec(), source="wild.yaml")
    limits = spec.security.resource_limits
    assert limits.timeout.seconds == 1200 and limits.max_cpu is not None and limits.max_cpu.percent == 50
    assert spec.priority == "critical" and spec.reporting.metrics == []
    warnings = {w.field: w for w in spec.warnings}
    assert "read as 1200 seconds" in warnings["security.resource_limits.timeout"].message
    assert "read as 50% of one CPU" in warnings["security.resource_limits.max_cpu"].message
    for field in ("metadata.owner", "security.audit_level", "tasks.default[0].ticket"):
        assert "not understood by the runtime" in warnings[field].message
        assert warnings[field].line is not None and warnings[field].level == "warning"
    # Kept and shown to the agent, like unknown top-level blocks.
    prompt = system_prompt(spec, tools=["read_file"])
    assert "owner: platform-team" in prompt and "audit_level: full" in prompt
    assert "ticket: OPS-12" in task_message(spec, spec.tasks.default, 1)


def test_a_misspelt_field_in_an_open_block_is_still_an_error() -> None:
    text = edited(survey_text(), "  sandbox: true", "  sandbx: false")
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text, source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.field == "security.sandbx" and "did you mean 'sandbox'?" in problem.message


def test_fields_toka_files_add_to_descriptive_blocks_load_as_warnings_and_reach_the_agent() -> None:
    text = survey_text()
    for old, new in (('  priority: "critical"\n', '  priority: "critical"\n  colour: teal\n'),
                     ("    - \"history-summarisation\"\n", "    - \"history-summarisation\"\n  tertiary: [\"triage\"]\n"),
                     ('    validation: "Every path in the inventory exists in the workspace"\n',
                      '    validation: "Every path in the inventory exists in the workspace"\n    weight: 3\n'),
                     ('  frequency: "daily"\n', '  frequency: "daily"\n  format: markdown\n'),
                     ('  operational_focus:\n', '  communication: ["terse"]\n  operational_focus:\n'),
                     ('      mitigation: "List vendored and generated directories separately"\n',
                      '      mitigation: "List vendored and generated directories separately"\n'
                      '      likelihood: medium\n      owner: platform-team\n')):
        text = edited(text, old, new)
    spec = AgentSpec.from_text(text, source="x.yaml")
    warned = {w.field: w.message for w in spec.warnings}
    assert set(warned) >= {"spec.colour", "capabilities.tertiary", "objectives[0].weight", "reporting.format",
                           "behavioral_directives.communication", "risk_mitigation.high_priority_risks[0].likelihood",
                           "risk_mitigation.high_priority_risks[0].owner"}
    assert "kept and shown to the agent" in warned["reporting.format"]
    assert "did you mean 'coordination'?" in warned["behavioral_directives.communication"]
    prompt = system_prompt(spec, tools=["read_file"])
    assert "owner: platform-team" in prompt and "weight: 3" in prompt and "format: markdown" in prompt


def test_metrics_written_as_a_map_are_a_list() -> None:
    text = re.sub(r"(?ms)^  metrics:\n.*?(?=^security:)", "  metrics:\n    coverage: share of lines run\n", survey_text())
    spec = AgentSpec.from_text(text)
    assert [(m.name, m.description) for m in spec.reporting.metrics] == [("coverage", "share of lines run")]


@pytest.fixture
def spec_set(tmp_path: Path) -> Path:
    folder = tmp_path / "specs"
    shutil.copytree(AGENT_SPECS, folder, ignore=shutil.ignore_patterns("*.json"))
    return folder


def test_field_errors_do_not_hide_the_dependency_errors_of_the_rest(spec_set: Path) -> None:
    health = spec_set / "test-health.yaml"
    health.write_text(health.read_text().replace('priority: "high"', 'priority: "urgent"', 1))
    docs = spec_set / "docs-refresh.yaml"
    docs.write_text(edited(docs.read_text(), "  required:\n", '  required:\n    - "ghost-agent": "needed"\n'))
    with pytest.raises(SpecError) as caught:
        make_plan([spec_set])
    messages = [str(p) for p in caught.value.problems]
    assert any("'urgent' is not one of" in m for m in messages), messages
    assert any("unknown required dependency 'ghost-agent'" in m for m in messages), messages
    done = subprocess.run([TOKA, "validate", str(spec_set)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "urgent" in done.stderr and "ghost-agent" in done.stderr, done.stderr


def test_validating_some_files_of_a_set_warns_about_dependencies_in_the_others(spec_set: Path) -> None:
    one = spec_set / "docs-refresh.yaml"
    done = subprocess.run([TOKA, "validate", str(one)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "unknown required dependency 'repo-survey'" in done.stderr
    assert "toka validate DIRECTORY" in done.stderr
    # A whole directory: the same missing dependency is an error.
    (spec_set / "repo-survey.yaml").unlink()
    done = subprocess.run([TOKA, "validate", str(spec_set)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown required dependency 'repo-survey'" in done.stderr


def test_validate_lists_what_the_runtime_does_not_understand(spec_set: Path) -> None:
    (spec_set / "repo-survey.yaml").write_text(wild_spec())
    done = subprocess.run([TOKA, "validate", str(spec_set)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"repo-survey\.yaml:\d+: metadata\.owner: not understood by the runtime", done.stderr)
    assert "tasks.default[0].ticket: not understood by the runtime" in done.stderr


# -- found by trying specs as teams write them ---------------------------------------------------


@pytest.mark.parametrize(("block", "field"), [
    ("capabilities_required: [filesystem-read, filesystem-write]", "security"),
    ("resource_limits: {max_memory: 64MB, max_cpu: 10%}", "security"),
    ("max_memory: 64MB", "security.resource_limits"),
    ("required: {repo-survey: the survey}", "dependencies"),
])
def test_a_setting_written_at_the_top_level_is_refused_naming_its_block(block: str, field: str) -> None:
    """Kept as a block of context it would do nothing: an agent without its tools, limits dropped."""
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(survey_text() + block + "\n", source="x.yaml")
    (problem,) = caught.value.problems
    key = block.split(":", 1)[0]
    assert problem.field == key and problem.line is not None
    assert f"{key!r} is a field of {field!r}, not a block: move it under {field}" in problem.message


@pytest.mark.parametrize(("written", "meant"), [
    ("Filesystem-Read", "filesystem-read"), ("filesytem-read", "filesystem-read"),
    (" filesystem-read ", "filesystem-read"), ("git_access", "git-access"), ("Script-Execution", "script-execution"),
])
def test_a_misspelt_capability_is_refused_with_the_name_meant(written: str, meant: str) -> None:
    text = re.sub(r"(?m)^  capabilities_required:\n", f'  capabilities_required:\n    - "{written}"\n', survey_text())
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text, source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.field == "security.capabilities_required[0]" and problem.line is not None
    assert f"unknown capability {written!r}; did you mean {meant!r}?" in problem.message


def test_capabilities_the_runtime_does_not_know_are_still_declared_and_file_system_read_is_read() -> None:
    text = re.sub(r"(?m)^  capabilities_required:\n",
                  "  capabilities_required:\n    - kernel-modification\n    - file-system-read\n", survey_text())
    spec = AgentSpec.from_text(text)
    assert spec.security.capabilities_required[:2] == ["kernel-modification", "file-system-read"]
    from toka.capabilities import grant_tools

    assert [t.name for t in grant_tools(["file-system-read"])[0]] == ["read_file", "list_dir", "search_files"]


@pytest.mark.parametrize("written", ["1", "2", "1.0", "16"])
def test_a_bare_small_cpu_number_is_refused_as_ambiguous(written: str) -> None:
    """"1" read as 1% of a CPU throttled an agent meant to have one CPU fifty- or a hundredfold."""
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(edited(survey_text(), 'max_cpu: "50%"', f"max_cpu: {written}"), source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.field == "security.resource_limits.max_cpu"
    assert f"{written!r} has no unit: a number of CPUs or a percentage? Write '{written}%'" in problem.message


def test_yaml_base_60_and_floats_are_read_as_written() -> None:
    """YAML 1.1 reads `1:30` as 90 and `1.10` as 1.1; the author wrote neither."""
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(re.sub(r"timeout: \S+", "timeout: 1:30", survey_text(), count=1), source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.message.startswith("'1:30' is not a duration")
    text = re.sub(r"(?m)^  version: .*$", "  version: 1.10\n  schema_version: 2.0", survey_text())
    spec = AgentSpec.from_text(re.sub(r"(?m)^    - description: .*$", "    - description: 3.10", text, count=1))
    assert (spec.metadata.version, spec.metadata.schema_version) == ("1.10", "2.0")
    assert spec.tasks.default[0].description == "3.10"


def test_binary_data_that_is_not_text_is_refused_where_it_is() -> None:
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(survey_text() + "blob: !!binary /w==\n", source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.line == survey_text().count("\n") + 1 and "not UTF-8 text" in problem.message
    spec = AgentSpec.from_text(survey_text() + "blob: !!binary aGVsbG8=\n")  # b"hello": text, kept
    spec.digest()


def test_a_blank_description_is_refused() -> None:
    text = re.sub(r"(?m)^    - description: .*$", '    - description: "   "', survey_text(), count=1)
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text, source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.field == "tasks.default[0].description" and problem.message == "must not be blank (only spaces)"


def test_a_closing_document_marker_is_not_a_second_document() -> None:
    assert AgentSpec.from_text(survey_text() + "---\n").name == "repo-survey"
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(survey_text() + "---\nmore: 1\n", source="x.yaml")
    assert "has another after '---'" in caught.value.problems[0].message


@pytest.mark.parametrize("indent, cause", [
    ("\t", "is indented with a tab: YAML indents with spaces only"),
    ("\u00a0\u00a0", "holds a non-breaking space, U+00A0, at column 1: YAML takes plain spaces only"),
])
def test_an_invisible_character_that_breaks_the_yaml_is_named(indent: str, cause: str) -> None:
    text = edited(survey_text(), "  sandbox: true", f"{indent}sandbox: true")
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text, source="x.yaml")
    (problem,) = caught.value.problems
    line = text.splitlines().index(f"{indent}sandbox: true") + 1
    assert problem.message.startswith("invalid YAML: ") and f"(line {line} {cause})" in problem.message


def test_messages_show_values_and_keys_as_yaml_writes_them() -> None:
    text = re.sub(r"(?ms)^tasks:\n.*?(?=^dependencies:)", "tasks:\n  - description: List the files\n    priority: high\n",
                  survey_text())
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text, source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.message == ("expected a mapping, got a list ([{description: List the files, priority: high}]); "
                               "a list of tasks goes under 'default:' (tasks: {default: [...]}), and "
                               "context-dependent ones under 'conditional:'")
    text = re.sub(r"(?ms)^dependencies:\n.*?(?=^reporting:)", "dependencies:\n  optional:\n    null: x\n    true: y\n",
                  survey_text())
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text, source="x.yaml")
    assert {p.field for p in caught.value.problems} >= {"dependencies.optional.null", "dependencies.optional.true"}
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(edited(survey_text(), "metadata:\n", "metadata:\n  null: 3\n  true: 1\n"), source="x.yaml")
    assert [(p.field, p.message) for p in caught.value.problems] == [
        ("metadata.null", "a field name must be text, got nothing"),
        ("metadata.true", "a field name must be text, got a boolean (true)")]


@pytest.mark.parametrize(("block", "field"), [
    ("priority: critical", "spec"),
    ("conditional: {hotfix: [{description: x}]}", "tasks"),
])
def test_a_field_of_spec_or_tasks_written_at_the_top_level_is_refused_naming_its_block(block: str, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(survey_text() + block + "\n", source="x.yaml")
    (problem,) = caught.value.problems
    key = block.split(":", 1)[0]
    assert problem.field == key and problem.line == survey_text().count("\n") + 1
    assert f"{key!r} is a field of {field!r}, not a block: move it under {field} ({field}.{key})" in problem.message


def test_another_case_of_a_block_beside_it_is_refused() -> None:
    """`Security: {sandbox: false}` beside `security:` was kept as context: the author's setting did nothing."""
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(survey_text() + "Security:\n  sandbox: false\n", source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.field == "Security" and problem.line == survey_text().count("\n") + 1
    assert problem.message.startswith("'Security' is another case of the block 'security'")
    assert "merge it into 'security'" in problem.message


@pytest.mark.parametrize(("block", "where"), [
    ("max_turns: 3", "toka run --max-turns"),
    ("model: claude-opus-4", "toka run --model"),
    ("tools: [run_command, write_file]", "security.capabilities_required"),
    ("llm_config: {model: gpt-4, temperature: 0.9}", "--temperature"),
])
def test_another_frameworks_run_setting_at_the_top_level_is_a_warning_naming_the_real_setting(
    block: str, where: str
) -> None:
    spec = AgentSpec.from_text(survey_text() + block + "\n", source="x.yaml")
    key = block.split(":", 1)[0]
    (warning,) = [w for w in spec.warnings if w.field == key]
    assert warning.level == "warning" and warning.line == survey_text().count("\n") + 1
    assert "kept and shown to the agent as context only, it changes nothing" in warning.message
    assert where in warning.message
    assert key in spec.context_blocks


def test_a_near_namesake_of_a_block_beside_it_is_a_warning() -> None:
    spec = AgentSpec.from_text(survey_text() + "task:\n  default:\n    - description: extra\n", source="x.yaml")
    (warning,) = [w for w in spec.warnings if w.field == "task"]
    assert "unknown block 'task', beside 'tasks'" in warning.message and warning.line is not None
    assert len(spec.tasks.default) == len(AgentSpec.from_text(survey_text()).tasks.default)


def test_a_permission_name_among_the_descriptive_capabilities_is_a_warning() -> None:
    text = re.sub(r"(?m)^  primary:\n", '  primary:\n    - "network-access"\n    - "filesystem-read"\n', survey_text())
    spec = AgentSpec.from_text(text, source="x.yaml")
    warned = {w.field: w.message for w in spec.warnings}
    assert "'network-access' is a permission name" in warned["capabilities.primary[0]"]
    assert "add it to security.capabilities_required" in warned["capabilities.primary[0]"]
    assert "capabilities.primary[1]" not in warned  # granted: filesystem-read is required too


def test_yaml_1_1_octal_hex_and_underscore_integers_are_text_as_written_where_text_is_meant() -> None:
    """YAML 1.1 reads `010` as 8, `0x10` as 16 and `1_000` as 1000: the agent was called 8, and the
    model was asked to do '493'."""
    text = edited(survey_text(), '  name: "repo-survey"', "  name: 010")
    text = re.sub(r"(?m)^  workstream: .*$", "  workstream: 1_000", text)
    text = re.sub(r"(?m)^  domain: .*$", "  domain: 0x10", text)
    text = re.sub(r"(?m)^    - description: .*$", "    - description: 0755\n      ticket: 0b11", text, count=1)
    spec = AgentSpec.from_text(text + "notes: {mode: 0o17, plain: 10, ratio: 1.10, sizes: [0x1f, -5]}\n")
    assert spec.name == "010" and spec.metadata.workstream == "1_000" and spec.spec.domain == "0x10"
    assert spec.tasks.default[0].description == "0755"
    prompt = system_prompt(spec, tools=["read_file"])
    assert "mode: 0o17" in prompt and "plain: 10" in prompt and "ratio: 1.10" in prompt and "- 0x1f" in prompt
    message = task_message(spec, spec.tasks.default, 1)
    assert message.startswith("# Task 1 of 4: 0755\n") and "ticket: 0b11" in message
    assert make_plan(specs=[spec]).to_dict()["agents"][0]["domain"] == "0x10"


@pytest.mark.parametrize(("field", "written", "read"), [
    ("max_processes", "1_000", 1000), ("max_processes", "0x10", 16), ("max_processes", "+8", 8),
    ("max_processes", "07", 7),  # a leading zero, but 7 in YAML 1.1 and 1.2 alike
    ("timeout", "1_800", "1800s"), ("max_cpu", "0x20", "32%"),
])
def test_underscore_hex_and_signed_integers_where_a_number_is_meant_are_the_numbers_yaml_reads(
    field: str, written: str, read: object
) -> None:
    """`1_000` is a common way to write a count, and loaded before YAML 1.1's other integers were
    refused; YAML 1.2 reads hex the same, and `1_000` as nothing else but text."""
    text = re.sub(rf"(?m)^    {field}: .*$", f"    {field}: {written}", survey_text(), count=1)
    value = getattr(AgentSpec.from_text(text, source="x.yaml").security.resource_limits, field)
    assert (value if isinstance(read, int) else str(value)) == read


@pytest.mark.parametrize(("field", "written", "yaml_1_2"), [
    ("max_cpu", "010", "as 10"), ("max_processes", "010", "as 10"), ("max_processes", "0_17", "as text"),
])
def test_a_leading_zero_octal_where_a_number_is_meant_is_refused_as_written(
    field: str, written: str, yaml_1_2: str
) -> None:
    text = re.sub(rf"(?m)^    {field}: .*$", f"    {field}: {written}", survey_text(), count=1)
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text, source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.field == f"security.resource_limits.{field}"
    assert problem.line == text.splitlines().index(f"    {field}: {written}") + 1
    assert problem.message == (f"{written!r} has a leading zero: YAML 1.1 reads it as the octal number "
                               f"{int(written.replace('_', ''), 8)}, YAML 1.2 {yaml_1_2} (which was meant is a "
                               "guess); write it in decimal digits without the leading zero")


def test_token_budgets_and_task_counts_take_underscores_and_hex_and_refuse_only_octal() -> None:
    text = re.sub(r"(?m)^    - description: .*$", r"\g<0>\n      max_turns: 010", survey_text(), count=1)
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text + "budget: {task_tokens: 100_000}\n", source="x.yaml")
    assert [p.field for p in caught.value.problems] == ["tasks.default[0].max_turns"]
    text = re.sub(r"(?m)^    - description: .*$", r"\g<0>\n      max_turns: 0x0a", survey_text(), count=1)
    spec = AgentSpec.from_text(text + "budget: {task_tokens: 100_000, agent_tokens: +5000}\n")
    assert spec.tasks.default[0].max_turns == 10 and spec.budget.task_tokens == 100_000
    assert spec.budget.agent_tokens == 5000
    assert not spec.warnings


@pytest.mark.parametrize("written", ["reporting\x1b[8m", "my-cap\x1b[31mRED\nok other", "notes\u202e"])
def test_a_capability_name_with_a_control_character_is_refused_escaped(written: str) -> None:
    """Printed by plan, `reporting\\e[8m` concealed the git-push listed after it."""
    quoted = json.dumps(written)  # a JSON string is a YAML double-quoted one, escapes included
    text = re.sub(r"(?m)^  capabilities_required:\n", lambda m: f"{m[0]}    - {quoted}\n    - git-push\n",
                  survey_text())
    with pytest.raises(SpecError) as caught:
        AgentSpec.from_text(text, source="x.yaml")
    (problem,) = caught.value.problems
    assert problem.field == "security.capabilities_required[0]" and problem.line is not None
    assert problem.message.startswith(f"capability name {written!r} holds a control character")
    assert "\x1b" not in str(problem) and "\n" not in str(problem)


def test_names_from_a_spec_reach_the_terminal_escaped(tmp_path: Path) -> None:
    """A key, a dependency or a file name with an escape sequence or a newline could colour, hide
    or forge lines of `toka validate` and `toka plan`."""
    text = edited(survey_text(), "metadata:\n", 'metadata:\n  "evil\\e[31m\\nkey": 1\n')
    text = re.sub(r"(?ms)^dependencies:\n.*?(?=^reporting:)",
                  lambda m: 'dependencies:\n  optional:\n    "ghost\\e[8m[bold]": x\n', text)
    (tmp_path / "survey\x1b[31m.yaml").write_text(text)
    (tmp_path / "broken\x1b[2K\n.yaml").write_text("x: [\n")
    for command in ("validate", "plan"):
        done = subprocess.run([TOKA, command, str(tmp_path)], capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        assert "\x1b" not in output and "\u202e" not in output, output
        assert "broken\\x1b[2K\\n.yaml:1: invalid YAML" in output
    (tmp_path / "broken\x1b[2K\n.yaml").unlink()
    done = subprocess.run([TOKA, "validate", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "\x1b" not in done.stdout + done.stderr
    assert "survey\\x1b[31m.yaml:3: metadata.evil\\x1b[31m\\nkey: not understood" in done.stderr
    assert "optional: ghost\\x1b[8m[bold] (not loaded)" in done.stdout


def test_an_api_key_pasted_into_a_spec_is_a_located_warning_and_never_reaches_the_model() -> None:
    openai, anthropic = "sk-proj-Abc123DEF456ghi789JKL012mno345PQR678stu901VWX", "sk-ant-api03-AAAABBBBCCCC-DDDD1234"
    text = survey_text() + (f"llm_config:\n  config_list:\n    - model: gpt-4\n      api_key: \"{openai}\"\n"
                            f"  anthropic_key: \"{anthropic}\"\n")
    text = re.sub(r"(?m)^    - description: .*$", rf"\g<0>\n      token: {anthropic}", text, count=1)
    spec = AgentSpec.from_text(text, source="x.yaml")
    warned = {w.field: w for w in spec.warnings if "API key or token" in w.message}
    lines = text.splitlines()
    assert {f: w.line for f, w in warned.items()} == {
        "llm_config.config_list[0].api_key": lines.index(f'      api_key: "{openai}"') + 1,
        "llm_config.anthropic_key": lines.index(f'  anthropic_key: "{anthropic}"') + 1,
        "tasks.default[0].token": lines.index(f"      token: {anthropic}") + 1}
    assert all(openai not in str(w) and anthropic not in str(w) for w in warned.values())
    prompt = system_prompt(spec, tools=["read_file"]) + task_message(spec, spec.tasks.default, 1)
    assert openai not in prompt and anthropic not in prompt and "api_key: [REDACTED]" in prompt


#: Real-looking keys (random, fixed here so that a failure is reproducible).
REAL_KEYS = [
    "sk-ant-api03-q8Zr2LkV0mWx5NcT7bYe3HdJ9fGa1SuP4oKi6RlE",
    "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    "ghp_7Hq2Vw9Lx4Bn0Ct6Rz1Ym8Ks3Dj5Fa2Ge9Pu",
    "sk-Tz8Qw2Er5Ty7Ui1Op4As6Df9Gh3Jk0Lz2Xc5Vb8Nm1Qa4Ws",
    "Bearer 550e8400-e29b-41d4-a716-446655440000",
]


@pytest.mark.parametrize("prose", [
    "Add Bearer token-authentication to the API gateway", "Document the bearer authentication_flow",
    "Check the Bearer authentication-headers.", "Port the sk-learn-compatible-pipelines-v2 notebooks",
    "Tag v2-sk-2024-release-candidate-1", "Plan sk-2024-release-candidate-1",
])
def test_prose_that_mentions_bearer_or_sk_is_not_taken_for_a_key(prose: str) -> None:
    """"Add Bearer token-authentication to the API gateway" was a warning, and the model was asked
    to "Add [REDACTED] to the API gateway"."""
    text = re.sub(r"(?m)^    - description: .*$", f'    - description: "{prose}"', survey_text(), count=1)
    spec = AgentSpec.from_text(text, source="x.yaml")
    assert not [w for w in spec.warnings if "API key or token" in w.message]
    assert task_message(spec, spec.tasks.default, 1).startswith(f"# Task 1 of 4: {prose}\n")


@pytest.mark.parametrize("key", REAL_KEYS, ids=lambda key: key[:6])
def test_a_real_looking_key_in_prose_is_still_warned_of_and_redacted(key: str) -> None:
    text = re.sub(r"(?m)^    - description: .*$", f'    - description: "Call the API with {key} and report"',
                  survey_text(), count=1)
    spec = AgentSpec.from_text(text, source="x.yaml")
    (warning,) = [w for w in spec.warnings if "API key or token" in w.message]
    assert (warning.field, warning.line) == ("tasks.default[0].description", 34)
    message = task_message(spec, spec.tasks.default, 1)
    assert message.startswith("# Task 1 of 4: Call the API with [REDACTED] and report\n") and key not in message


def test_a_key_used_as_a_mapping_key_is_not_printed_in_the_field_path() -> None:
    """`reporting.metrics[2].ghp_...: looks like an API key` printed the key it warned of."""
    github, anthropic = REAL_KEYS[2], REAL_KEYS[0]
    text = edited(survey_text(), '    - "config-files":', f'    - "{github}":')
    text = edited(text, "metadata:\n", f"metadata:\n  {github}: 1\n")
    text += f"notes:\n  {github}:\n    inner: {anthropic}\n"
    spec = AgentSpec.from_text(text, source="x.yaml")
    lines = text.splitlines()
    assert {(w.field, w.line) for w in spec.warnings} == {
        ("reporting.metrics[2].[REDACTED]", lines.index(f'    - "{github}": "Build and CI configuration files found"') + 1),
        ("metadata.[REDACTED]", 3),  # a token, and a field the runtime does not read: both warnings
        ("notes.[REDACTED]", lines.index(f"  {github}:") + 1),
        ("notes.[REDACTED].inner", lines.index(f"    inner: {anthropic}") + 1),
    }
    assert len(spec.warnings) == 5 and not any(github in str(w) or anthropic in str(w) for w in spec.warnings)


def test_a_key_that_is_not_text_is_shown_as_a_key_on_its_own_line() -> None:
    """`true:` in a block was shown as `notes[True]`, a list's index, at the block's line."""
    key = REAL_KEYS[2]
    text = survey_text() + f"notes:\n  true: {key}\n  null: {key}\n  5: {key}\n  plain: {key}\n"
    spec = AgentSpec.from_text(text, source="x.yaml")
    lines = text.splitlines()
    assert {(w.field, w.line) for w in spec.warnings} == {
        (f"notes.{written}", lines.index(f"  {written}: {key}") + 1) for written in ("true", "null", "5", "plain")}


def test_a_signed_integer_reaches_the_agent_as_written() -> None:
    """An unquoted `+5` in a context block reached the prompt as `5`."""
    text = re.sub(r"(?m)^    - description: .*$", "    - description: +5\n      points: +3", survey_text(), count=1)
    spec = AgentSpec.from_text(text + "notes: {delta: +5, drop: -5, plain: 5}\n", source="x.yaml")
    assert "delta: +5\n  drop: -5\n  plain: 5\n" in system_prompt(spec, tools=["read_file"])
    message = task_message(spec, spec.tasks.default, 1)
    assert message.startswith("# Task 1 of 4: +5\n") and "points: +3" in message


def test_a_key_used_through_aliases_is_warned_of_where_each_use_is() -> None:
    key = REAL_KEYS[3]
    text = edited(survey_text(), '  branch: "main"', f'  branch: &k "{key}"')
    spec = AgentSpec.from_text(text + "notes:\n  copy: *k\n  copies:\n    - *k\n    - *k\n", source="x.yaml")
    lines = text.splitlines()
    assert [(w.field, w.line) for w in spec.warnings] == [
        ("metadata.branch", 7), ("notes.copy", len(lines) + 2), ("notes.copies[0]", len(lines) + 4),
        ("notes.copies[1]", len(lines) + 5)]


def test_a_limit_under_a_second_is_a_warning_and_a_task_that_runs_out_of_time_names_its_limit() -> None:
    """A task's estimate is the limit of each attempt: `estimated_duration: 1ms` failed a task with
    'Scope timed out after 0.001 second(s).', naming neither the field nor the file."""
    import asyncio

    from prefect.states import Failed
    from prefect.task_engine import TaskRunTimeoutError

    from toka.compiler import _record, attempt_limit
    from toka.config import RunConfig

    text = re.sub(r"(?m)^    - description: .*$", r'\g<0>\n      estimated_duration: "1ms"', survey_text(), count=1)
    text = re.sub(r"timeout: \S+", 'timeout: "500ms"', text, count=1)
    spec = AgentSpec.from_text(text, source="x.yaml")
    warned = {w.field: w for w in spec.warnings}
    line = text.splitlines().index('      estimated_duration: "1ms"') + 1
    assert warned["tasks.default[0].estimated_duration"].line == line
    assert "'1ms' is under a second" in warned["tasks.default[0].estimated_duration"].message
    assert "'500ms' is under a second" in warned["security.resource_limits.timeout"].message
    assert not any("under a second" in w.message for w in AgentSpec.from_text(survey_text()).warnings)

    task = spec.tasks.default[0]
    seconds, limit = attempt_limit(spec, task, RunConfig(run_key="k"))
    assert (seconds, limit) == (0.001, f"1ms, tasks.default[0].estimated_duration in x.yaml:{line}")
    assert attempt_limit(spec, spec.tasks.default[1], RunConfig(run_key="k"))[1].startswith(
        "500ms, security.resource_limits.timeout in x.yaml:")
    state = Failed(data=TaskRunTimeoutError("Scope timed out after 0.001 second(s)."))
    record, _ = asyncio.run(_record(state, 1, task, 0, limit=limit))
    assert record.error == ("TaskRunTimeoutError: Scope timed out after 0.001 second(s). (the time limit of one "
                            f"attempt: 1ms, tasks.default[0].estimated_duration in x.yaml:{line})")


def test_an_unknown_dependency_is_never_said_to_mean_the_agent_itself() -> None:
    text = re.sub(r"(?ms)^dependencies:\n.*?(?=^reporting:)", 'dependencies:\n  optional:\n    "repo-surve": x\n',
                  survey_text())
    plan = make_plan(specs=[AgentSpec.from_text(text, source="x.yaml")])
    (warning,) = [w for w in plan.warnings if w.field == "dependencies.optional"]
    assert "unknown optional dependency 'repo-surve'" in warning.message and "did you mean" not in warning.message
