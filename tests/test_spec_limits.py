"""Bad specs cannot hurt: what one file may hold is bounded, and each bound is named in its error.

Hostile files (an alias bomb, a 12 MB file, 100,000 tasks, a list nested a
thousand deep) are refused quickly, in little memory, with a located message,
on every path a spec is loaded by: one file, a set of files, a file edited
between two loads, and the ``validate``, ``plan`` and ``run`` commands as real
processes (under an address-space limit, so that a
regression fails the test instead of filling the machine's memory).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import toka.yaml_source as ys
from toka.errors import SpecError
from toka.spec import AgentSpec
from toka.specset import load_specs
from toka.yaml_source import (
    MAX_DEPTH,
    MAX_EXPANDED_CHARS,
    MAX_NODES,
    MAX_PROBLEMS,
    MAX_SPEC_BYTES,
    MAX_TASKS,
    MAX_VALUE_CHARS,
)

from .conftest import AGENT_SPECS, TOKA_SPECS, least_cpu_seconds
from .test_specset import named, problems_of, write_set

BASE = (AGENT_SPECS / "repo-survey.yaml").read_text(encoding="utf-8")
TOKA = str(Path(sys.executable).with_name("toka"))


def line_of(text: str, marker: str) -> int:
    """1-based number of the first line of ``text`` containing ``marker``."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if marker in line)


def bomb(levels: int = 10, fanout: int = 10) -> list[str]:
    """Lines of a "billion laughs" block: ``a{k}`` is ``fanout`` aliases of ``a{k-1}``."""
    lines = [f"  a0: &a0 [{', '.join(['lol'] * fanout)}]"]
    lines += [f"  a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * fanout)}]" for k in range(1, levels)]
    return lines


#: fanout 10, 10 levels: a9 expands to 10**10 leaves. As a context block...
BOMB_IN_CONTEXT = BASE + "laughs:\n" + "\n".join(bomb()) + "\n"
#: ...and as the value of a known block, which validation walks: this hung `toka validate`, so
#: it is only loaded by the commands below, in processes with a bounded address space.
BOMB_AS_METADATA = (
    "laughs:\n" + "\n".join(bomb()) + "\n" + BASE.replace("metadata:", "old_metadata:", 1) + "metadata: *a9\n"
)
BOMB_AS_TASKS = "laughs:\n" + "\n".join(bomb()) + "\n" + BASE.replace("tasks:", "old_tasks:", 1) + "tasks: {default: *a9}\n"


def bomb_line(text: str) -> int:
    """The line of the first level of the bomb that takes the file over MAX_NODES (each is ten times the last)."""
    size, total, level = 11, 11, 0  # a0: a list of ten leaves
    while total <= MAX_NODES:
        level += 1
        size = 1 + 10 * size
        total += size
    return line_of(text, f"a{level}: &a{level} ")


def bounded(call: Callable[[], object], *, seconds: float, megabytes: float) -> Exception:
    """The exception ``call`` raises; fail unless it raised within ``seconds`` of CPU and ``megabytes`` of Python memory.

    Timed and measured in two runs: tracing allocations slows Python code several times over.
    The CPU time is this thread's: Prefect's background threads (log and event workers, once a
    flow test ran in this session) count in the process's, and once took a bound over. It is
    the best of a few runs (see ``least_cpu_seconds``): another test worker on the same cores
    slows every run down for a while.
    """
    caught: list[pytest.ExceptionInfo[Exception]] = []

    def attempt() -> None:
        with pytest.raises(Exception) as info:
            call()
        caught.append(info)

    spent = least_cpu_seconds(attempt, bound=seconds)
    tracemalloc.start()
    try:
        with pytest.raises(Exception):
            call()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert spent < seconds, f"took {spent:.2f} s of CPU (bound {seconds} s)"
    assert peak < megabytes, f"peak Python memory {peak:.1f} MB (bound {megabytes} MB)"
    return caught[0].value


def refused(text: str, source: str = "agent_specs/x.yaml", *, seconds: float = 0.5, megabytes: float = 32) -> SpecError:
    """The SpecError loading ``text`` raises, within the given CPU time and Python memory."""
    error = bounded(lambda: AgentSpec.from_text(text, source=source), seconds=seconds, megabytes=megabytes)
    assert isinstance(error, SpecError), repr(error)
    return error


# -- alias bombs ---------------------------------------------------------------------


def test_an_alias_bomb_is_refused_at_the_alias_that_crosses_the_bound() -> None:
    (problem,) = refused(BOMB_IN_CONTEXT).problems
    assert problem.line == bomb_line(BOMB_IN_CONTEXT)
    assert problem.field is not None and problem.field.startswith("laughs.a")
    assert re.search(rf"alias \*a\d stands for [\d,]+ nodes, which makes more than {MAX_NODES:,}", problem.message)
    assert f"the limit for a spec is {MAX_NODES:,}" in problem.message
    assert str(problem).startswith(f"agent_specs/x.yaml:{problem.line}: laughs.a")


def test_aliases_count_what_they_stand_for_even_without_nesting() -> None:
    """Not only bombs: one anchor of 21 nodes, used 1,000 times, is 21,000 nodes."""
    text = BASE + "one: &one [" + ", ".join(["x"] * 20) + "]\nmany: [" + ", ".join(["*one"] * 1000) + "]\n"
    (problem,) = refused(text).problems
    assert problem.line == line_of(text, "many:") and problem.field and problem.field.startswith("many[")


def test_small_aliases_and_merge_keys_still_work() -> None:
    text = BASE + "shared: &s {a: 1, b: [x, y]}\nuses: [*s, *s, {<<: *s, c: 2}]\n"
    spec = AgentSpec.from_text(text, source="x.yaml")
    assert spec.context_blocks["uses"][2] == {"a": 1, "b": ["x", "y"], "c": 2}


def test_a_merge_key_bomb_is_refused() -> None:
    """``<<`` copies the pairs it merges: each level merging the last one ten times is a bomb too.

    Five levels (100,000 pairs once merged) are enough to cross the bound and few enough
    that a loader without it is merely slow, not out of memory.
    """
    lines = ["  m0: &m0 {" + ", ".join(f"k{i}: v" for i in range(10)) + "}"]
    lines += [f"  m{k}: &m{k} {{<<: [{', '.join([f'*m{k - 1}'] * 10)}]}}" for k in range(1, 5)]
    text = BASE + "merges:\n" + "\n".join(lines) + "\n"
    (problem,) = refused(text).problems
    assert "alias *m" in problem.message and problem.field and problem.field.startswith("merges.m")


def test_an_alias_inside_what_it_names_is_refused() -> None:
    """The data would contain itself: harmless to build, fatal to hash (``toka run``) or print."""
    text = BASE + "loop: &loop [x, *loop]\n"
    (problem,) = refused(text).problems
    assert (problem.line, problem.field) == (line_of(text, "loop:"), "loop")
    assert "alias *loop is inside the collection it names" in problem.message


def test_an_anchor_defined_twice_names_both_lines() -> None:
    text = BASE + "one: &same [x]\ntwo: &same [y]\n"
    (problem,) = refused(text).problems
    assert problem.line == line_of(text, "two:")
    assert problem.message == f"invalid YAML: anchor &same is defined twice (first on line {line_of(text, 'one:')})"


def test_aliases_count_towards_the_depth() -> None:
    deep = "[" * 40 + "]" * 40
    text = BASE + f"deep: &deep {deep}\ndeeper: {'[' * 30}*deep{']' * 30}\n"
    (problem,) = refused(text).problems
    assert problem.line == line_of(text, "deeper:")
    assert f"alias *deep nests mappings and lists 71 levels deep here; the limit for a spec is {MAX_DEPTH}" in (
        problem.message
    )


# -- size, depth, values, tasks ------------------------------------------------------


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    with path.open("wb") as f:
        f.truncate(12 * 2**20)  # sparse: 12 MiB that cost nothing to write
    error = bounded(lambda: AgentSpec.from_file(path), seconds=0.1, megabytes=1)
    assert isinstance(error, SpecError)
    (problem,) = error.problems
    assert str(problem) == f"{path}: file is 12,582,912 bytes; the limit for a spec file is 1 MiB"


def test_a_file_just_within_the_size_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    padding = "# " + "x" * 78 + "\n"
    path.write_text(BASE + padding * ((MAX_SPEC_BYTES - len(BASE)) // len(padding)), encoding="utf-8")
    assert path.stat().st_size <= MAX_SPEC_BYTES
    assert AgentSpec.from_file(path).name == "repo-survey"


def test_a_10_mb_string_is_refused_quickly_from_a_file_or_a_text(tmp_path: Path) -> None:
    text = BASE + "notes: '" + "x" * 10_000_000 + "'\n"
    path = tmp_path / "x.yaml"
    path.write_text(text, encoding="utf-8")
    error = bounded(lambda: AgentSpec.from_file(path), seconds=0.1, megabytes=1)
    assert re.fullmatch(rf"{path}: file is 10,00\d,\d{{3}} bytes; the limit for a spec file is 1 MiB", str(error))
    assert re.fullmatch(r"x.yaml: spec is 10,00\d,\d{3} bytes; the limit for a spec file is 1 MiB",
                        str(refused(text, "x.yaml", seconds=0.1, megabytes=1)))
    wide = text.replace("'x", "'\u00e9", 1)  # not ASCII: counted in slices, not copied whole
    assert "spec is 10,00" in str(refused(wide, "x.yaml", seconds=0.2, megabytes=1))


def test_a_value_over_the_length_limit_is_located() -> None:
    text = BASE + "notes:\n  long: '" + "x" * (MAX_VALUE_CHARS + 1) + "'\n"
    (problem,) = refused(text).problems
    assert (problem.line, problem.field) == (line_of(text, "long:"), "notes.long")
    assert problem.message == f"a value of {MAX_VALUE_CHARS + 1:,} characters; the limit for one value is {MAX_VALUE_CHARS:,}"


def test_nesting_over_the_depth_limit_is_located() -> None:
    ok = BASE + "deep: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"  # the root mapping is one level
    assert AgentSpec.from_text(ok, source="x.yaml").context_blocks["deep"]
    text = BASE + "deep:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)) + "  " * 200 + "end\n"
    (problem,) = refused(text).problems
    assert problem.line == line_of(text, f" k{MAX_DEPTH}:")
    assert problem.field == "deep.k1.k2.k3.k4.k5.k6.k7..."
    assert problem.message == f"mappings and lists nested more than {MAX_DEPTH} levels deep; the limit for a spec is {MAX_DEPTH}"


def test_thousands_of_nested_lists_are_refused_quickly() -> None:
    text = BASE + "deep: " + "[" * 5000 + "]" * 5000 + "\n"
    (problem,) = refused(text).problems  # libyaml's scanner stops at 1,000 levels, before the composer
    assert problem.line == line_of(text, "deep:") and "nest" in problem.message


def test_more_nodes_than_the_limit_are_refused_while_composing() -> None:
    text = BASE + "wide: [" + "1," * 400_000 + "1]\n"  # 800 kB, 400,000 nodes
    assert len(text) < MAX_SPEC_BYTES
    # About 0.3 s of CPU here; 0.5 s was crossed (0.54 s) on a machine busy with other suites.
    (problem,) = refused(text, seconds=1.5).problems
    assert problem.line == line_of(text, "wide:") and problem.field and problem.field.startswith("wide[")
    assert problem.message == (
        f"more than {MAX_NODES:,} nodes (keys, values and list items); the limit for a spec is {MAX_NODES:,}"
    )


def test_100_000_tasks_are_refused_quickly() -> None:
    block = BASE.replace("tasks:", "old_tasks:", 1)
    as_aliases = block + "t: &t {description: step}\ntasks:\n  default: [" + ", ".join(["*t"] * 100_000) + "]\n"
    (problem,) = refused(as_aliases).problems
    assert "alias *t stands for 3 nodes" in problem.message and problem.field and problem.field.startswith("tasks.default[")
    written_out = block + "tasks:\n  default:\n" + "    - description: step\n" * 100_000
    (problem,) = refused(written_out).problems
    assert problem.message.startswith("spec is 2,")


def test_tasks_over_the_limit_are_counted_across_default_and_conditional() -> None:
    block = BASE.replace("tasks:", "old_tasks:", 1)
    tasks = "".join(f"    - {{description: step {i}}}\n" for i in range(MAX_TASKS))
    exactly = block + "tasks:\n  default:\n" + tasks
    assert len(AgentSpec.from_text(exactly, source="x.yaml").tasks.default) == MAX_TASKS
    one_more = exactly + "  conditional:\n    release:\n      - {description: one more}\n"
    (problem,) = refused(one_more).problems
    assert (problem.line, problem.field) == (one_more.splitlines().index("tasks:") + 1, "tasks")
    assert problem.message == (
        f"{MAX_TASKS + 1:,} tasks (default and conditional together); the limit for an agent is {MAX_TASKS:,}"
    )


def test_at_most_max_problems_are_listed_for_one_file() -> None:
    text = BASE.replace("objectives:", "old_objectives:", 1) + "objectives:\n" + "  - {x: 1}\n" * 1000
    problems = refused(text, seconds=1).problems
    assert len(problems) == MAX_PROBLEMS + 1
    # Three per item (its missing fields; the unknown one is kept and warned of).
    assert problems[-1].message == f"2,900 more problems not listed (the first {MAX_PROBLEMS} of a file are)"


def test_a_long_value_in_a_message_is_abridged() -> None:
    text = BASE.replace('priority: "critical"', "priority: " + "x" * 10_000, 1)
    (problem,) = refused(text).problems
    assert problem.field == "spec.priority" and len(problem.message) < 400


# -- values shaped against the token check ----------------------------------------------

#: About 65,000 characters each, shaped against the check for API keys (a warning at load, redacted
#: from the prompt): a pattern that looked ahead to the end of the run at each `sk-` of the first
#: took 4 s for it; the others are thousands of candidates found not random (`Bearer a-a-...`).
TOKEN_RUNS = [
    "sk-" * 21_800, "Bearer " + "a-" * 32_500, "x" + " sk-a-a-a-a-a-a-a-a-a-a" * 2_800, "ghp_" * 16_000,
]
TOKEN_RUNS_SPEC = BASE.replace('      priority: "critical"', '      priority: "critical"\n      notes: *n1', 1).replace(
    "tasks:", "runs:\n" + "".join(f"  n{i}: &n{i} '{run}'\n" for i, run in enumerate(TOKEN_RUNS)) + "tasks:", 1)
#: One value of 65,000 characters and 18,000 aliases of it: checked at each alias, it took 17.5 s;
#: written into the prompt, 1.2 GB.
ALIASES_OF_A_LONG_VALUE = BASE + "notes:\n  big: &a " + "a" * 65_000 + "\n  copies:\n" + "    - *a\n" * 18_000
#: As many aliases, of a value short enough for the text they expand to to stay within the limit.
ALIASES_OF_A_VALUE = BASE + "notes:\n  big: &a " + "sk-a1" * 20 + "\n  copies:\n" + "    - *a\n" * 18_000


def test_aliases_that_expand_to_more_text_than_the_limit_are_refused_at_the_alias() -> None:
    (problem,) = refused(ALIASES_OF_A_LONG_VALUE, seconds=2).problems
    assert re.search(rf"alias \*a stands for 65,000 characters, which makes more than {MAX_EXPANDED_CHARS:,} "
                     r"characters of text in all", problem.message), problem.message
    assert problem.line == line_of(ALIASES_OF_A_LONG_VALUE, "- *a") + MAX_EXPANDED_CHARS // 65_000 - 1


@pytest.mark.parametrize("text", [TOKEN_RUNS_SPEC, ALIASES_OF_A_VALUE], ids=["token-runs", "aliases"])
def test_values_shaped_against_the_token_check_load_quickly(text: str) -> None:
    assert 100_000 < len(text.encode()) < MAX_SPEC_BYTES
    spent = least_cpu_seconds(lambda: AgentSpec.from_text(text, source="x.yaml").warnings, bound=2)
    assert spent < 2, f"took {spent:.2f} s of CPU to load and list the warnings"


def test_the_prompts_redact_values_shaped_against_the_token_check_quickly() -> None:
    """`toka run` redacts the system prompt and each task's message, where these values go."""
    import toka.prompt
    from toka.prompt import system_prompt, task_message

    spec = AgentSpec.from_text(TOKEN_RUNS_SPEC, source="x.yaml")

    def prompts() -> str:
        toka.prompt._PROMPTS.clear()  # built once per spec: each run builds it anew
        return system_prompt(spec, tools=["read_file"]) + task_message(spec, spec.tasks.default, 1)

    spent = least_cpu_seconds(prompts, bound=2)
    assert spent < 2, f"took {spent:.2f} s of CPU to build and redact the prompts"
    text = prompts()
    assert TOKEN_RUNS[0] in text and "[REDACTED]" not in text  # none of them is a key


def test_every_real_spec_is_far_within_every_limit() -> None:
    for path in [*TOKA_SPECS.glob("*.yaml"), *AGENT_SPECS.glob("*.yaml")]:
        text = path.read_text(encoding="utf-8")
        assert len(text.encode()) * 100 < MAX_SPEC_BYTES
        assert len(AgentSpec.from_text(text, source=str(path)).tasks.default) * 100 < MAX_TASKS
        node = yaml.compose(text)
        count, depth, longest = _measure(node)
        assert count * 40 < MAX_NODES and depth * 10 < MAX_DEPTH and longest * 100 < MAX_VALUE_CHARS


def _measure(node: yaml.Node, level: int = 0) -> tuple[int, int, int]:
    if isinstance(node, yaml.ScalarNode):
        return 1, level, len(node.value)
    children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
    parts = [_measure(c, level + 1) for c in children]
    return 1 + sum(p[0] for p in parts), max([level + 1, *(p[1] for p in parts)]), max([0, *(p[2] for p in parts)])


def test_the_limits_hold_without_libyaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyYAML's own parser feeds the same composer when libyaml is missing."""

    class PurePython(yaml.SafeLoader):
        get_single_node = ys._Loader.get_single_node
        _node = ys._Loader._node
        _alias = ys._Loader._alias
        _check_chars = ys._Loader._check_chars

    monkeypatch.setattr(ys, "_Loader", PurePython)
    assert AgentSpec.from_text(BASE, source="x.yaml").name == "repo-survey"
    assert refused(BOMB_IN_CONTEXT, seconds=2).problems[0].line == bomb_line(BOMB_IN_CONTEXT)
    assert "alias *loop is inside" in str(refused(BASE + "loop: &loop [*loop]\n"))
    assert f"nested more than {MAX_DEPTH}" in str(refused(BASE + "deep: " + "[" * 500 + "]" * 500 + "\n"))


# -- not UTF-8 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "line", "message"),
    [
        pytest.param(b"name: caf\xe9\n", 94, "byte 0xe9 at column 10 is not UTF-8 (invalid continuation byte)", id="latin-1"),
        pytest.param(b"n\xc3\xa4me: \xff\n", 94, "byte 0xff at column 7 is not UTF-8 (invalid start byte)", id="after-a-wide-char"),
        pytest.param(b"x: a\r\ny: \xe2\x82", 95, "byte 0xe2 0x82 at column 4 is not UTF-8 (unexpected end of data)", id="cut-short"),
    ],
)
def test_bytes_that_are_not_utf8_are_located_by_line_and_column(
    tmp_path: Path, raw: bytes, line: int, message: str
) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(BASE.encode() + raw)
    assert BASE.count("\n") == 93
    with pytest.raises(SpecError) as info:
        AgentSpec.from_file(path)
    (problem,) = info.value.problems
    assert problem.line == line
    assert problem.message == f"cannot read: {message}; save the file as UTF-8"


def test_line_endings_are_read_as_text_mode_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(BASE.replace("\n", "\r\n").encode())
    spec = AgentSpec.from_file(path)
    assert spec.name == "repo-survey" and spec.line_of("security") == line_of(BASE, "security:")


# -- every path: a set of files, a file edited between loads -------------------------


def test_limits_hold_in_a_set_of_files(tmp_path: Path) -> None:
    bad = {
        2: named("agent-0002") + "\nlaughs:\n" + "\n".join(bomb()) + "\n",
        5: named("agent-0005") + "\ndeep: " + "[" * 100 + "]" * 100 + "\n",
        9: named("agent-0009") + "\nloop: &l [*l]\n",
    }
    problems = problems_of(write_set(tmp_path / "specs", 10, bad=bad))
    assert [p[0] for p in problems] == ["agent-0002.yaml", "agent-0005.yaml", "agent-0009.yaml"]
    assert "alias *a" in problems[0][3] and f"the limit for a spec is {MAX_NODES:,}" in problems[0][3]
    assert f"nested more than {MAX_DEPTH} levels" in problems[1][3]
    assert "alias *l is inside the collection it names" in problems[2][3]
    assert all(isinstance(p[1], int) for p in problems)


def test_a_file_edited_into_a_bomb_is_refused_on_the_next_load(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "specs", 1)
    load_specs([folder])
    path = folder / "agent-0000.yaml"
    path.write_text(named("agent-0000") + "\nlaughs:\n" + "\n".join(bomb()) + "\n", encoding="utf-8")
    for _ in range(2):
        with pytest.raises(SpecError, match=r"alias \*a\d stands for"):
            load_specs([folder])


# -- the commands, as real processes ------------------------------------------------

#: Address space for one command: it needs about 100 MB (45 MB resident); a bomb needed gigabytes.
ADDRESS_SPACE = 1 << 30


# Linux keeps a process's peak resident size across exec, starting from its parent's at fork:
# a child of a busy pytest (300 MB) would report that. A small fresh interpreter starts the
# command instead, applies the address-space cap, and reports the command's own peak.
_MEASURE = """
import os, resource, signal, subprocess, sys, threading
limit, timeout, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
proc = subprocess.Popen(sys.argv[4:], preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
killer = threading.Timer(timeout, lambda: os.kill(proc.pid, signal.SIGKILL))
killer.start()
_, status, usage = os.wait4(proc.pid, 0)
killer.cancel()
open(out, "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def toka(*args: str | Path, cwd: Path, timeout: float = 60) -> tuple[int, str, float, float]:
    """Run the real ``toka`` under RLIMIT_AS; its exit code, stderr, wall seconds and peak RSS in MB."""
    err, peak = cwd / "stderr.txt", cwd / "peak.txt"
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "400", "TOKA_MODEL": "offline"}
    start = time.monotonic()
    with err.open("w") as stderr:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _MEASURE, str(ADDRESS_SPACE), str(timeout),
                               str(peak), TOKA, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=stderr, timeout=timeout + 30)
    text = err.read_text()
    assert "\U0001f4af" not in text  # ':100:' once rendered as an emoji: 'x.yaml💯 field: ...'
    return done.returncode, text, time.monotonic() - start, int(peak.read_text()) / 1024


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
@pytest.mark.parametrize("text", [BOMB_IN_CONTEXT, BOMB_AS_METADATA], ids=["in-a-context-block", "as-metadata"])
def test_every_command_refuses_an_alias_bomb_quickly_in_little_memory(tmp_path: Path, command: str, text: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text, encoding="utf-8")
    args = ["--workspace", tmp_path] if command == "run" else []
    code, err, seconds, peak_mb = toka(command, path, *args, cwd=tmp_path)
    assert code == 2, err
    assert f"{path}:{bomb_line(text)}: laughs.a" in err and "alias *a" in err, err
    assert "Traceback" not in err
    assert seconds < 20 and peak_mb < 200, (seconds, peak_mb)
    assert not (tmp_path / ".toka").exists()  # refused before a run was recorded


def test_every_command_names_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate(12 * 2**20)
    for command in ("validate", "plan", "run"):
        code, err, _, peak_mb = toka(command, path, cwd=tmp_path)
        assert code == 2 and f"{path}: file is 12,582,912 bytes; the limit for a spec file is 1 MiB" in err, err
        assert peak_mb < 200
