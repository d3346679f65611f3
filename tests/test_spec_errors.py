"""Malformed specs are rejected with located, readable problems; every real variant is accepted.

Each error case applies ONE text edit to a real Toka spec
(``build-system-stabilization.yaml``) so that line numbers are the ones a
user would see. Expected lines are computed from the edited text (the line
holding a marker string), never hard-coded, so the tests do not drift when
the base file changes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
import yaml

from toka.errors import Problem, SpecError
from toka.spec import AgentSpec
from toka.specset import load_specs
from toka.units import Bandwidth, ByteSize, CpuShare, Duration

from .conftest import ROOT, TOKA_SPECS

BASE_FILE = TOKA_SPECS / "build-system-stabilization.yaml"
BASE = BASE_FILE.read_text(encoding="utf-8")
SOURCE = "agent_specs/x.yaml"


# -- helpers -------------------------------------------------------------------


def replace(old: str, new: str) -> Callable[[str], str]:
    """An edit that replaces the single occurrence of ``old``."""

    def edit(text: str) -> str:
        assert text.count(old) == 1, f"edit anchor must occur exactly once: {old!r}"
        return text.replace(old, new, 1)

    return edit


def whole(new_text: str) -> Callable[[str], str]:
    """An edit that throws the file away and writes ``new_text`` instead."""
    return lambda _text: new_text


def line_of(text: str, marker: str) -> int:
    """1-based number of the only line of ``text`` containing ``marker``."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if marker in line]
    assert len(hits) == 1, f"marker {marker!r} is on lines {hits}, expected exactly one"
    return hits[0]


def load_error(text: str, source: str = SOURCE) -> SpecError:
    with pytest.raises(SpecError) as info:
        AgentSpec.from_text(text, source=source)
    return info.value


def problem_at(err: SpecError, field: str | None) -> Problem:
    found = [p for p in err.problems if p.field == field]
    assert found, f"no problem for field {field!r}; got:\n{err}"
    return found[0]


# -- one defect per file -------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    edit: Callable[[str], str]
    field: str | None
    match: str  # regex searched in the problem message
    marker: str | None  # the expected line is the one containing this; None: no line
    count: int = 1  # how many problems the single defect produces

    def param(self) -> object:
        return pytest.param(self, id=self.id)


LIMIT = "security.resource_limits"

CASES = [
    # -- resource limits: units ------------------------------------------------
    Case("cpu-150-percent", replace('max_cpu: "75%"', 'max_cpu: "150%"'),
         f"{LIMIT}.max_cpu", r"^'150%' is not a percentage between 1% and 100%$", "max_cpu:"),
    Case("cpu-0-percent", replace('max_cpu: "75%"', 'max_cpu: "0%"'),
         f"{LIMIT}.max_cpu", r"'0%' is not a percentage between 1% and 100%", "max_cpu:"),
    Case("cpu-word", replace('max_cpu: "75%"', 'max_cpu: "fast"'),
         f"{LIMIT}.max_cpu", r"'fast' is not a percentage between 1% and 100%", "max_cpu:"),
    Case("cpu-bare-int-over", replace('max_cpu: "75%"', "max_cpu: 150"),
         f"{LIMIT}.max_cpu", r"'150' is not a percentage between 1% and 100%", "max_cpu:"),
    Case("memory-word", replace('max_memory: "512MB"', 'max_memory: "lots"'),
         f"{LIMIT}.max_memory", r"'lots' is not a size; expected a number and a unit \(B, KB, MB, GB, TB, or KiB, Mi, G\.\.\.\)",
         "max_memory:"),
    Case("memory-zero", replace('max_memory: "512MB"', 'max_memory: "0MB"'),
         f"{LIMIT}.max_memory", r"'0MB' is not a positive size", "max_memory:"),
    Case("memory-negative", replace('max_memory: "512MB"', 'max_memory: "-1GB"'),
         f"{LIMIT}.max_memory", r"'-1GB' must be positive", "max_memory:"),
    Case("timeout-zero", replace('timeout: "2h"', 'timeout: "0s"'),
         f"{LIMIT}.timeout", r"'0s' is not a positive duration; it must be longer than zero", "timeout:"),
    Case("timeout-word", replace('timeout: "2h"', 'timeout: "forever"'),
         f"{LIMIT}.timeout", r"'forever' is not a duration; expected a number and a unit \(ms, s, m, h, d, w\)",
         "timeout:"),
    Case("timeout-negative", replace('timeout: "2h"', 'timeout: "-5m"'),
         f"{LIMIT}.timeout", r"'-5m' must be positive", "timeout:"),
    Case("timeout-negative-int", replace('timeout: "2h"', "timeout: -10"),
         f"{LIMIT}.timeout", r"'-10' must be positive", "timeout:"),
    Case("bandwidth-word", replace('timeout: "2h"', 'timeout: "2h"\n    max_network_bandwidth: "fast"'),
         f"{LIMIT}.max_network_bandwidth", r"'fast' is not a bandwidth; expected .*\(bps, Kbps, Mbps, Gbps\)",
         "max_network_bandwidth:"),
    Case("bandwidth-bytes-not-bits", replace('timeout: "2h"', 'timeout: "2h"\n    max_network_bandwidth: "100MB"'),
         f"{LIMIT}.max_network_bandwidth", r"'100MB' is not a bandwidth", "max_network_bandwidth:"),
    Case("bandwidth-zero", replace('timeout: "2h"', 'timeout: "2h"\n    max_network_bandwidth: "0Mbps"'),
         f"{LIMIT}.max_network_bandwidth", r"'0Mbps' is not a positive bandwidth", "max_network_bandwidth:"),
    Case("disk-word", replace('timeout: "2h"', 'timeout: "2h"\n    max_disk_usage: "huge"'),
         f"{LIMIT}.max_disk_usage", r"'huge' is not a size", "max_disk_usage:"),
    Case("disk-zero", replace('timeout: "2h"', 'timeout: "2h"\n    max_disk_usage: "0GB"'),
         f"{LIMIT}.max_disk_usage", r"'0GB' is not a positive size", "max_disk_usage:"),
    Case("processes-zero", replace('timeout: "2h"', 'timeout: "2h"\n    max_processes: 0'),
         f"{LIMIT}.max_processes", r"greater than or equal to 1", "max_processes:"),
    Case("processes-boolean", replace('timeout: "2h"', 'timeout: "2h"\n    max_processes: true'),
         f"{LIMIT}.max_processes", r"valid integer \(got a boolean \(true\)\)", "max_processes:"),
    # The typo also leaves the required timeout missing: one defect, one problem.
    Case("limits-typo-timout", replace('timeout: "2h"', 'timout: "2h"'),
         f"{LIMIT}.timout", r"unknown field 'timout'; did you mean 'timeout'\? expected one of: timeout, ",
         "timout:"),
    # In blocks that keep unknown fields, the missing field names the key that misspells it.
    Case("spec-priority-misspelt", replace('priority: "critical"', 'priorty: "critical"'),
         "spec.priority", r"^required field is missing; 'priorty' looks like a misspelling of it$", "priorty:"),
    Case("metadata-name-misspelt", replace('name: "build-system-stabilization"', 'nmae: "build-system-stabilization"'),
         "metadata.name", r"^required field is missing; 'nmae' looks like a misspelling of it$", "nmae:"),
    Case("task-description-misspelt",
         replace('    - description: "Analyze current', '    - descriptin: "Analyze current'),
         "tasks.default[0].description", r"^required field is missing; 'descriptin' looks like a misspelling",
         "descriptin:"),
    Case("limits-missing", replace('  resource_limits:\n    max_memory: "512MB"\n    max_cpu: "75%"\n    timeout: "2h"\n', ""),
         "security.resource_limits", r"required field is missing", "security:"),
    # -- priorities ------------------------------------------------------------
    Case("spec-priority-unknown", replace('priority: "critical"', 'priority: "urgent"'),
         "spec.priority", r"'urgent' is not one of 'critical', 'high', 'medium' or 'low'", '"urgent"'),
    Case("task-priority-unknown", replace('      priority: "low"', '      priority: "someday"'),
         "tasks.default[7].priority", r"'someday' is not one of 'critical', 'high', 'medium' or 'low'",
         '"someday"'),
    # -- metadata --------------------------------------------------------------
    Case("metadata-name-missing", replace('  name: "build-system-stabilization"\n', ""),
         "metadata.name", r"^required field is missing$", "metadata:"),  # located at the parent
    Case("metadata-name-not-kebab", replace('name: "build-system-stabilization"', 'name: "Build_System"'),
         "metadata.name", r"'Build_System' is not a kebab-case name", "Build_System"),
    Case("metadata-name-double-hyphen", replace('name: "build-system-stabilization"', 'name: "build--system"'),
         "metadata.name", r"'build--system' is not a kebab-case name", "build--system"),
    Case("created-not-a-date", replace('created: "2025-07-04"', 'created: "yesterday"'),
         "metadata.created", r"'yesterday' is not a date \(write YYYY-MM-DD, or an ISO 8601 date-time", "created:"),
    Case("spec-name-empty", replace('name: "Build System Stabilization Agent"', 'name: ""'),
         "spec.name", r"^must not be empty$", 'name: ""'),
    # -- tasks -----------------------------------------------------------------
    Case("tasks-missing", lambda t: re.sub(r"(?ms)^tasks:\n.*?(?=^dependencies:)", "", t),
         "tasks", r"required field is missing", "metadata:"),  # located at the document
    Case("tasks-default-empty", lambda t: re.sub(r"(?ms)^tasks:\n.*?(?=^dependencies:)", "tasks:\n  default: []\n\n", t),
         "tasks.default", r"needs at least 1 item\(s\), got a list \(\[\]\)", "default:"),
    Case("task-without-description",
         replace('    - description: "Add dependency audit to CI pipeline"\n      priority: "medium"',
                 '    - priority: "medium"'),
         "tasks.default[5].description", r"required field is missing", '    - priority: "medium"'),
    Case("conditional-not-mapping", replace('      priority: "low"\n', '      priority: "low"\n  conditional:\n    - "hotfix"\n'),
         "tasks.conditional", r"expected a mapping, got a list \(\[hotfix\]\)", "conditional:"),
    Case("conditional-task-bad-priority",
         replace('      priority: "low"\n',
                 '      priority: "low"\n  conditional:\n    hotfix:\n      - description: "Patch"\n        priority: "asap"\n'),
         "tasks.conditional.hotfix[0].priority", r"'asap' is not one of", '"asap"'),
    # -- security --------------------------------------------------------------
    Case("capabilities-required-string",
         replace('  capabilities_required:\n    - "filesystem-read"\n    - "filesystem-write"\n'
                 '    - "cargo-execution"\n    - "git-access"\n    - "ci-integration"\n',
                 '  capabilities_required: "filesystem-read"\n'),
         "security.capabilities_required", r"expected a list, got text \('filesystem-read'\)", "capabilities_required:"),
    Case("sandbox-not-bool", replace("sandbox: true", 'sandbox: "maybe"'),
         "security.sandbox", r"expected true or false, got text \('maybe'\)", "sandbox:"),
    # -- reporting -------------------------------------------------------------
    Case("frequency-unknown", replace('frequency: "daily"', 'frequency: "fortnightly"'),
         "reporting.frequency", r"'fortnightly' is not one of 'real-time', 'hourly', 'daily', 'weekly', "
         r"'on-milestone', 'on-completion' or 'continuous'", "frequency:"),
    Case("metrics-item-two-keys-no-name",
         replace('    - "ci-reliability": "CI pipeline success rate and stability"',
                 '    - ci-reliability: "CI pipeline success rate"\n      kind: "gauge"'),
         "reporting.metrics[3].name", r"required field is missing", "- ci-reliability:"),
    # ('ci-reliability' and 'kind' are kept, shown to the agent and listed as warnings)
    Case("metrics-not-a-list", lambda t: re.sub(r"(?ms)^  metrics:\n.*?(?=^security:)", '  metrics: "all of them"\n', t),
         "reporting.metrics", r"expected a list, got text", "metrics:"),
    # -- dependencies ----------------------------------------------------------
    Case("dependency-item-two-keys",
         replace("  required: {}", '  required:\n    - a-agent: "x"\n      b-agent: "y"'),
         "dependencies.required", r"item 0 is .*; each dependency entry must be one 'name: reason' pair",
         "  required:"),
    Case("dependency-listed-twice",
         replace("  required: {}", '  required:\n    - a-agent: "x"\n    - a-agent: "y"'),
         "dependencies.required", r"'a-agent' is listed twice", "  required:"),
    Case("dependency-reason-list-in-map",
         replace("  required: {}", '  required:\n    a-agent:\n      - "because"'),
         "dependencies.required.a-agent", r"expected text, got a list \(\[because\]\)", "a-agent:"),
    Case("dependency-reason-list-in-list",
         replace("  required: {}", '  required:\n    - a-agent:\n        - "because"'),
         "dependencies.required.a-agent", r"expected text, got a list \(\[because\]\)", "a-agent:"),
    # -- objectives and risks --------------------------------------------------
    Case("objective-missing-deliverable",
         replace('    deliverable: "CI pipeline with automated dependency conflict detection"\n', ""),
         "objectives[1].deliverable", r"required field is missing", "Establish automated dependency audit"),
    Case("objectives-not-a-list",
         lambda t: re.sub(r"(?ms)^objectives:\n.*?(?=^tasks:)", 'objectives: "fix the build"\n\n', t),
         "objectives", r"expected a list, got text \('fix the build'\)", "objectives:"),
    Case("risk-missing-mitigation",
         replace('      mitigation: "Staged rollout with fallback to previous CI configuration"\n', ""),
         "risk_mitigation.high_priority_risks[2].mitigation", r"required field is missing",
         "CI pipeline changes break existing workflows"),
    # -- whole-file and YAML-level defects -------------------------------------
    Case("block-misspelt-dependecies", replace("\ndependencies:\n", "\ndependecies:\n"),
         "dependecies", r"unknown block 'dependecies'; did you mean 'dependencies'\?", "dependecies:"),
    # Other frameworks' names for it: kept as context, the agent ran without waiting for its dependency.
    Case("block-named-depends-on", replace("\ndependencies:\n", "\ndepends_on:\n"),
         "depends_on", r"unknown block 'depends_on'; did you mean 'dependencies'\?", "depends_on:"),
    Case("block-named-dependency", replace("\ndependencies:\n", "\ndependency:\n"),
         "dependency", r"unknown block 'dependency'; did you mean 'dependencies'\?", "dependency:"),
    Case("yaml-syntax-mapping-in-value", replace('  domain: "infrastructure"', "  domain: infrastructure: core"),
         None, r"^invalid YAML: mapping values are not allowed", "infrastructure: core"),
    Case("yaml-syntax-tab-indent", replace('  domain: "infrastructure"', '\tdomain: "infrastructure"'),
         None, r"^invalid YAML: ", '\tdomain: "infrastructure"'),
    Case("empty-file", whole(""),
         None, r"a spec must be a mapping of blocks \(metadata, spec, tasks, \.\.\.\), got an empty file", None),
    Case("comments-only-file", whole("# nothing here yet\n"),
         None, r"got an empty file", None),
    Case("top-level-list", whole("- metadata: {name: a}\n- spec: {}\n"),
         None, r"a spec must be a mapping of blocks .*, got a list$", None),
    Case("top-level-text", whole("just some words\n"),
         None, r"a spec must be a mapping of blocks .*, got text$", None),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_one_defect_is_reported_located(case: Case) -> None:
    text = case.edit(BASE)
    assert text != BASE or case.marker is None
    err = load_error(text)

    assert len(err.problems) == case.count, str(err)
    assert all(p.source == SOURCE for p in err.problems), str(err)
    assert all(p.level == "error" for p in err.problems)
    problem = problem_at(err, case.field)
    assert re.search(case.match, problem.message), f"{problem.message!r} !~ {case.match!r}"
    expected_line = None if case.marker is None else line_of(text, case.marker)
    assert problem.line == expected_line, str(err)
    # The one-line rendering the CLI prints names file, line and field.
    where = SOURCE if expected_line is None else f"{SOURCE}:{expected_line}"
    prefix = f"{where}: {case.field}: " if case.field else f"{where}: "
    assert str(problem) == prefix + problem.message
    assert str(problem) in str(err).splitlines()


def test_at_least_32_cases() -> None:
    assert len(CASES) >= 32
    assert len({c.id for c in CASES}) == len(CASES)


def test_base_spec_is_valid() -> None:
    spec = AgentSpec.from_text(BASE, source=SOURCE)
    assert spec.name == "build-system-stabilization"
    assert spec.source == SOURCE


def test_duplicate_key_names_both_lines() -> None:
    text = replace('  version: "v0.3.0"\n', '  version: "v0.3.0"\n  version: "v0.4.0"\n')(BASE)
    err = load_error(text)
    (problem,) = err.problems
    first, second = line_of(text, '"v0.3.0"'), line_of(text, '"v0.4.0"')
    assert problem.source == SOURCE
    assert problem.field == "metadata.version"
    assert problem.line == second
    assert f"duplicate key 'version' (first defined on line {first})" in problem.message
    assert "silently keep only the last value" in problem.message


def test_duplicate_key_inside_a_list_item() -> None:
    text = replace('      priority: "low"\n', '      priority: "low"\n      priority: "urgent"\n')(BASE)
    (problem,) = load_error(text).problems
    assert problem.field == "tasks.default[7].priority"
    assert problem.line == line_of(text, '"urgent"')
    first = line_of(text, '"low"')
    assert f"duplicate key 'priority' (first defined on line {first})" in problem.message


def test_unterminated_flow_list_is_reported_near_its_line() -> None:
    # libyaml notices the missing ']' only when the next key starts, one line later.
    text = replace('  domain: "infrastructure"', "  domain: [infrastructure")(BASE)
    (problem,) = load_error(text).problems
    assert problem.message.startswith("invalid YAML: ")
    assert problem.field is None
    assert problem.line in (line_of(text, "[infrastructure"), line_of(text, "[infrastructure") + 1)


def test_non_string_top_level_key_is_located() -> None:
    text = BASE + "\n1: one\n"
    (problem,) = load_error(text).problems
    assert problem.line == line_of(text, "1: one")
    assert problem.message == "a field name must be text, got a number (1)" and problem.field == "1"


# -- several defects, several files ---------------------------------------------


def test_several_defects_in_one_file_are_reported_together() -> None:
    text = BASE
    for old, new in [
        ('priority: "critical"', 'priority: "urgent"'),
        ('frequency: "daily"', 'frequency: "fortnightly"'),
        ('max_cpu: "75%"', 'max_cpu: "150%"'),
        ('timeout: "2h"', 'timeout: "forever"'),
        ('created: "2025-07-04"', 'created: "yesterday"'),
    ]:
        text = replace(old, new)(text)
    err = load_error(text)
    expected = {
        "spec.priority": line_of(text, '"urgent"'),
        "reporting.frequency": line_of(text, "fortnightly"),
        f"{LIMIT}.max_cpu": line_of(text, "150%"),
        f"{LIMIT}.timeout": line_of(text, "forever"),
        "metadata.created": line_of(text, "yesterday"),
    }
    assert len(err.problems) >= 3
    assert {p.field: p.line for p in err.problems} == expected
    assert len({p.line for p in err.problems}) == len(err.problems)  # each its own line
    assert all(p.source == SOURCE for p in err.problems)
    assert len(str(err).splitlines()) == len(err.problems)


def test_misspelt_block_is_reported_with_the_validation_problems() -> None:
    text = replace("\ndependencies:\n", "\ndependecies:\n")(BASE)
    text = replace('max_cpu: "75%"', 'max_cpu: "0%"')(text)
    err = load_error(text)
    assert [p.field for p in err.problems] == ["dependecies", f"{LIMIT}.max_cpu"]


def test_load_specs_reports_every_bad_file_together(tmp_path: Path) -> None:
    specs = tmp_path / "agent_specs"
    specs.mkdir()
    bad_cpu = replace('max_cpu: "75%"', 'max_cpu: "150%"')(BASE)
    bad_prio = replace('name: "build-system-stabilization"', 'name: "other-agent"')(
        replace('priority: "critical"', 'priority: "urgent"')(BASE)
    )
    (specs / "a-bad-cpu.yaml").write_text(bad_cpu, encoding="utf-8")
    (specs / "b-bad-priority.yml").write_text(bad_prio, encoding="utf-8")
    (specs / "c-good.yaml").write_text(
        replace('name: "build-system-stabilization"', 'name: "good-agent"')(BASE), encoding="utf-8"
    )

    with pytest.raises(SpecError) as info:
        load_specs([specs])
    problems = info.value.problems
    assert [(p.source, p.field, p.line) for p in problems] == [
        (str(specs / "a-bad-cpu.yaml"), f"{LIMIT}.max_cpu", line_of(bad_cpu, "150%")),
        (str(specs / "b-bad-priority.yml"), "spec.priority", line_of(bad_prio, '"urgent"')),
    ]
    assert "a-bad-cpu.yaml:" in str(info.value) and "b-bad-priority.yml:" in str(info.value)


def test_from_file_names_the_path_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    text = replace('max_memory: "512MB"', 'max_memory: "lots"')(BASE)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as info:
        AgentSpec.from_file(path)
    (problem,) = info.value.problems
    assert problem.source == str(path)
    assert problem.line == line_of(text, "lots")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda d: d / "missing.yaml", "no such file", id="missing-file"),
        pytest.param(lambda d: d, "is a directory, not a spec file", id="directory"),
        pytest.param(
            lambda d: (d / "latin1.yaml", (d / "latin1.yaml").write_bytes(b"name: \xe9t\xe9\n"))[0],
            "cannot read",
            id="not-utf8",
        ),
    ],
)
def test_from_file_unreadable(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(SpecError) as info:
        AgentSpec.from_file(path)
    (problem,) = info.value.problems
    assert problem.source == str(path)
    assert message in problem.message


# -- inputs that once escaped the loader or confused it ------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param('created: "2025-07-04"', "created: 2025-13-45", id="unquoted-impossible-date"),
        pytest.param('created: "2025-07-04"', "created: 2025-02-30", id="unquoted-feb-30"),
        pytest.param('version: "v0.3.0"', 'version: !!int "v3"', id="bad-int-tag"),
        pytest.param('version: "v0.3.0"', 'version: !!timestamp "soon"', id="bad-timestamp-tag"),
    ],
)
def test_yaml_constructor_errors_are_spec_errors(old: str, new: str) -> None:
    text = replace(old, new)(BASE)
    err = load_error(text)
    (problem,) = err.problems
    assert problem.source == SOURCE
    assert problem.line == line_of(text, new)
    assert problem.field in ("metadata.created", "metadata.version")
    assert problem.message.startswith("cannot read ")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("max_disk_usage", "9" * 400 + "MB", id="size"),
        pytest.param("max_network_bandwidth", "9" * 400 + "Mbps", id="bandwidth"),
    ],
)
def test_huge_unit_numbers_are_spec_errors(key: str, value: str) -> None:
    text = replace('timeout: "2h"', f'timeout: "2h"\n    {key}: "{value}"')(BASE)
    (problem,) = load_error(text).problems
    assert problem.field == f"{LIMIT}.{key}"
    assert "is too large to be a" in problem.message


def test_yaml_merge_keys_are_accepted() -> None:
    text = replace(
        'spec:\n  name: "Build System Stabilization Agent"\n  domain: "infrastructure"\n',
        'spec:\n  <<: &common\n    domain: "infrastructure"\n  name: "Build System Stabilization Agent"\n',
    )(BASE)
    assert yaml.safe_load(text)["spec"]["domain"] == "infrastructure"  # plain PyYAML takes it
    spec = AgentSpec.from_text(text, source=SOURCE)
    assert spec.spec.domain == "infrastructure"


def test_yaml_merge_key_can_be_overridden_but_not_repeated() -> None:
    shared = "x_defaults: &limits\n  max_memory: \"256MB\"\n  timeout: \"1h\"\n\n"
    text = shared + replace(
        '  resource_limits:\n    max_memory: "512MB"\n',
        '  resource_limits:\n    <<: *limits\n    max_memory: "512MB"\n',
    )(BASE).replace('    timeout: "2h"\n', "", 1)
    limits = AgentSpec.from_text(text, source=SOURCE).security.resource_limits
    assert str(limits.max_memory) == "512MB"  # the explicit key wins over the merged one
    assert str(limits.timeout) == "1h"  # merged in

    repeated = replace('    max_cpu: "75%"\n', '    max_cpu: "75%"\n    max_cpu: "50%"\n')(text)
    (problem,) = load_error(repeated).problems
    assert problem.line == line_of(repeated, '"50%"')
    first = line_of(repeated, '"75%"')
    assert f"duplicate key 'max_cpu' (first defined on line {first})" in problem.message


def test_duplicate_key_with_recursive_alias_does_not_hang() -> None:
    text = "b:\n  c: 1\n  c: 2\na: &a [*a]\n"
    code = textwrap.dedent(
        f"""
        from toka.errors import SpecError
        from toka.spec import AgentSpec
        try:
            AgentSpec.from_text({text!r}, source="x.yaml")
        except SpecError as e:
            print(e)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=5
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading a 4-line file did not finish in 5 s")
    assert "x.yaml:3: b.c: duplicate key 'c'" in done.stdout


def test_unknown_field_in_conditional_task_suggests_a_fix() -> None:
    text = replace(
        '      priority: "low"\n',
        '      priority: "low"\n  conditional:\n    hotfix:\n      - description: "Patch"\n        prio: "high"\n',
    )(BASE)
    (problem,) = load_error(text).problems
    assert problem.field == "tasks.conditional.hotfix[0].prio"
    assert problem.line == line_of(text, "prio:")
    assert "did you mean 'priority'?" in problem.message
    assert "expected one of: description, priority" in problem.message


# -- accepted variants ---------------------------------------------------------------


def load(text: str) -> AgentSpec:
    return AgentSpec.from_text(text, source=SOURCE)


def with_block(block: str, body: str) -> str:
    """BASE with the whole top-level ``block`` replaced by ``body`` (written at column 0)."""
    pattern = rf"(?ms)^{block}:\n.*?(?=^\S)"
    assert re.search(pattern, BASE), block
    return re.sub(pattern, body.rstrip("\n") + "\n\n", BASE, count=1)


class TestVariants:
    """Every shape SPEC_FORMAT.md lists as written in the wild is accepted."""

    @pytest.mark.parametrize("path", sorted(TOKA_SPECS.glob("*.yaml")), ids=lambda p: p.stem)
    def test_real_spec_loads(self, path: Path) -> None:
        spec = AgentSpec.from_file(path)
        assert spec.name == path.stem
        assert spec.source == str(path)

    # dependencies --------------------------------------------------------------

    def test_dependencies_empty_maps(self) -> None:
        spec = load(BASE)
        assert spec.dependencies.required == {} and spec.dependencies.optional == {}

    def test_dependencies_plain_map(self) -> None:
        spec = load(with_block("dependencies", textwrap.dedent("""\
            dependencies:
              required:
                storage-advancement: "needs the new store"
                kernel-events: "emits events"
              optional:
                testing-infrastructure: "validates"
            """)))
        assert spec.dependencies.required == {
            "storage-advancement": "needs the new store",
            "kernel-events": "emits events",
        }
        assert spec.dependencies.optional == {"testing-infrastructure": "validates"}

    def test_dependencies_list_of_single_key_maps(self) -> None:
        spec = load(with_block("dependencies", textwrap.dedent("""\
            dependencies:
              required:
                - "storage-advancement": "needs the new store"
                - "kernel-events": "emits events"
              optional:
                - "testing-infrastructure": "validates"
            """)))
        assert list(spec.dependencies.required) == ["storage-advancement", "kernel-events"]
        assert spec.dependencies.required["kernel-events"] == "emits events"
        assert spec.dependencies.optional == {"testing-infrastructure": "validates"}

    @pytest.mark.parametrize(
        ("required", "optional"),
        [
            pytest.param('\n    - "a-agent": "first"', '\n    b-agent: "later"', id="list-then-map"),
            pytest.param('\n    a-agent: "first"', '\n    - "b-agent": "later"', id="map-then-list"),
            pytest.param(' {}', '\n    - "b-agent": "later"', id="empty-then-list"),
            pytest.param('\n    - "a-agent": "first"', " {}", id="list-then-empty"),
        ],
    )
    def test_dependencies_mixed_shapes(self, required: str, optional: str) -> None:
        spec = load(with_block("dependencies", f"dependencies:\n  required:{required}\n  optional:{optional}\n"))
        assert spec.dependencies.required == ({"a-agent": "first"} if "a-agent" in required else {})
        assert spec.dependencies.optional == ({"b-agent": "later"} if "b-agent" in optional else {})

    def test_dependencies_without_reasons(self) -> None:
        spec = load(with_block("dependencies", 'dependencies:\n  required:\n    - "a-agent"\n    - "b-agent":\n  optional:\n'))
        assert spec.dependencies.required == {"a-agent": "", "b-agent": ""}
        assert spec.dependencies.optional == {}
        spec = load(with_block("dependencies", "dependencies:\n  required:\n    c-agent:\n"))
        assert spec.dependencies.required == {"c-agent": ""}

    # reporting -----------------------------------------------------------------

    def test_metrics_as_single_key_maps(self) -> None:
        metrics = load(BASE).reporting.metrics
        assert [m.name for m in metrics] == [
            "dependency-conflicts", "build-success-rate", "setup-time", "ci-reliability",
        ]  # fmt: skip
        assert metrics[0].description == "Number of unresolved dependency conflicts"
        assert metrics[0].type is None and metrics[0].unit is None

    def test_metrics_as_objects(self) -> None:
        text = with_block("reporting", textwrap.dedent("""\
            reporting:
              frequency: "hourly"
              metrics:
                - name: "build-success-rate"
                  description: "Share of green builds"
                  type: "percentage"
                  unit: "%"
                - name: "open-conflicts"
                  type: "gauge"
            """))
        metrics = load(text).reporting.metrics
        assert [(m.name, m.description, m.type, m.unit) for m in metrics] == [
            ("build-success-rate", "Share of green builds", "percentage", "%"),
            ("open-conflicts", None, "gauge", None),
        ]

    @pytest.mark.parametrize(
        "frequency",
        ["real-time", "hourly", "daily", "weekly", "on-milestone", "on-completion", "continuous"],
    )
    def test_every_frequency(self, frequency: str) -> None:
        spec = load(replace('frequency: "daily"', f'frequency: "{frequency}"')(BASE))
        assert spec.reporting.frequency == frequency

    # tasks ---------------------------------------------------------------------

    def test_conditional_tasks(self) -> None:
        text = replace(
            '      priority: "low"\n',
            '      priority: "low"\n'
            "  conditional:\n"
            "    hotfix:\n"
            '      - description: "Patch the release branch"\n'
            '        priority: "critical"\n'
            '      - description: "Backport the fix"\n'
            "    audit: []\n",
        )(BASE)
        tasks = load(text).tasks
        assert list(tasks.conditional) == ["hotfix", "audit"]
        assert [t.description for t in tasks.conditional["hotfix"]] == ["Patch the release branch", "Backport the fix"]
        assert tasks.conditional["hotfix"][0].priority == "critical"
        assert tasks.conditional["hotfix"][1].priority == "medium"  # the default
        assert len(tasks.default) == 8

    def test_conditional_written_empty(self) -> None:
        spec = load(replace('      priority: "low"\n', '      priority: "low"\n  conditional:\n')(BASE))
        assert spec.tasks.conditional == {}

    def test_critical_task_priority(self) -> None:
        spec = load(replace('      priority: "low"', '      priority: "critical"')(BASE))
        assert spec.tasks.default[-1].priority == "critical"

    def test_optional_task_keys(self) -> None:
        text = replace(
            '      priority: "low"\n',
            '      priority: "low"\n'
            '      estimated_duration: "1d"\n'
            '    - description: "Write the migration notes"\n'
            '      estimated_time: "4h"\n'
            '      tools_required: ["cargo", "git"]\n'
            "      dependencies:\n"
            '        - "Cargo.toml files updated"\n',
        )(BASE)
        *_, docs, notes = load(text).tasks.default
        assert docs.estimated_duration == Duration(seconds=86400, text="1d")
        assert str(docs.estimated_duration) == "1d"
        assert notes.estimated_time is not None and notes.estimated_time.seconds == 4 * 3600
        assert notes.tools_required == ["cargo", "git"]
        assert notes.dependencies == ["Cargo.toml files updated"]
        assert notes.priority == "medium"

    # security ------------------------------------------------------------------

    def test_extra_resource_limits(self) -> None:
        text = replace(
            'timeout: "2h"',
            'timeout: "2h"\n    max_disk_usage: "1GB"\n    max_network_bandwidth: "100Mbps"\n    max_processes: 64',
        )(BASE)
        limits = load(text).security.resource_limits
        assert limits.max_disk_usage == ByteSize(bytes=1024**3, text="1GB")
        assert limits.max_network_bandwidth == Bandwidth(bits_per_second=100_000_000, text="100Mbps")
        assert limits.max_processes == 64

    def test_sandbox_and_capabilities_default(self) -> None:
        text = replace("  sandbox: true\n", "")(BASE)
        text = re.sub(r'(?m)^  capabilities_required:\n(    - ".*"\n)+', "", text)
        security = load(text).security
        assert security.sandbox is True
        assert security.capabilities_required == []

    # metadata ------------------------------------------------------------------

    def test_metadata_extras(self) -> None:
        text = replace(
            '  branch: "feature/build-system-stabilization"\n',
            '  branch: "feature/build-system-stabilization"\n'
            '  modified: 2025-07-10\n  schema_version: "1.2"\n  checksum: "sha256:abc123"\n',
        )(BASE)
        metadata = load(text).metadata
        assert metadata.created == date(2025, 7, 4)
        assert metadata.modified == date(2025, 7, 10)
        assert metadata.schema_version == "1.2"
        assert metadata.checksum == "sha256:abc123"

    def test_a_version_written_as_an_unquoted_date_is_that_text(self) -> None:
        text = replace('  version: "v0.3.0"\n', '  version: 2025-07-04\n  schema_version: 2024-12-31\n')(BASE)
        metadata = load(text).metadata
        assert (metadata.version, metadata.schema_version) == ("2025-07-04", "2024-12-31")

    # context blocks ---------------------------------------------------------------

    def test_unknown_blocks_kept_in_file_order(self) -> None:
        text = (
            "zeta_notes:\n  first: true\n"
            + replace("\ndependencies:\n", "\nalpha_scenarios:\n  - name: a\n    steps: [1, 2]\n\ndependencies:\n")(BASE)
            + "\n\nmiddle_block: {x: 1}\n"
        )
        spec = load(text)
        assert list(spec.context_blocks) == ["zeta_notes", "alpha_scenarios", "middle_block"]
        assert spec.context_blocks["alpha_scenarios"] == [{"name": "a", "steps": [1, 2]}]
        assert spec.context_blocks["zeta_notes"] == {"first": True}

    @pytest.mark.parametrize("path", sorted(TOKA_SPECS.glob("*.yaml")), ids=lambda p: p.stem)
    def test_real_context_blocks_in_file_order(self, path: Path) -> None:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        expected = [k for k in data if k not in AgentSpec._KNOWN_BLOCKS]
        spec = AgentSpec.from_file(path)
        assert list(spec.context_blocks) == expected
        assert all(spec.context_blocks[k] == data[k] for k in expected)

    # constructors and round trips -----------------------------------------------------

    def test_from_dict_without_line_numbers(self) -> None:
        data = yaml.safe_load(BASE)
        spec = AgentSpec.from_dict(data, source="dict.yaml")
        assert spec.name == "build-system-stabilization"
        assert spec.source == "dict.yaml"
        assert spec.line_of("security", "resource_limits", "timeout") is None

        data["security"]["resource_limits"]["max_cpu"] = "150%"
        with pytest.raises(SpecError) as info:
            AgentSpec.from_dict(data, source="dict.yaml")
        (problem,) = info.value.problems
        assert (problem.source, problem.line, problem.field) == ("dict.yaml", None, f"{LIMIT}.max_cpu")
        assert str(problem) == "dict.yaml: security.resource_limits.max_cpu: '150%' is not a percentage between 1% and 100%"

    def test_from_dict_without_source(self) -> None:
        with pytest.raises(SpecError) as info:
            AgentSpec.from_dict({"metadata": {"name": "x"}})
        assert all(p.source is None and p.line is None for p in info.value.problems)
        assert str(info.value).splitlines()[0] == "spec: required field is missing"

    def test_line_of_known_field(self) -> None:
        spec = load(BASE)
        assert spec.line_of("security", "resource_limits", "timeout") == line_of(BASE, 'timeout: "2h"')

    @pytest.mark.parametrize(
        ("key", "text", "kind"),
        [
            ("timeout", "1h30m", Duration),
            ("timeout", "90 m", Duration),
            ("max_memory", "1.5GB", ByteSize),
            ("max_memory", "512 MiB", ByteSize),
            ("max_cpu", "12.5%", CpuShare),
            ("max_network_bandwidth", "1.5Gbps", Bandwidth),
        ],
    )
    def test_unit_text_round_trips(self, key: str, text: str, kind: type) -> None:
        body = re.sub(rf"(?m)^    {key}: .*$", f'    {key}: "{text}"', BASE)
        if body == BASE:  # not in the base file yet: add it
            body = replace('timeout: "2h"', f'timeout: "2h"\n    {key}: "{text}"')(BASE)
        spec = load(body)
        value = getattr(spec.security.resource_limits, key)
        assert isinstance(value, kind)
        assert str(value) == text
        dumped = spec.model_dump(mode="json")
        assert dumped["security"]["resource_limits"][key] == text
        again = AgentSpec.from_dict(dumped)
        assert again.model_dump(mode="json") == dumped
        assert getattr(again.security.resource_limits, key) == value

    @pytest.mark.parametrize("path", sorted(TOKA_SPECS.glob("*.yaml")), ids=lambda p: p.stem)
    def test_real_spec_dump_round_trips(self, path: Path) -> None:
        spec = AgentSpec.from_file(path)
        dumped = spec.model_dump(mode="json")
        again = AgentSpec.from_text(yaml.safe_dump(dumped, sort_keys=False), source="again.yaml")
        assert again.model_dump(mode="json") == dumped
