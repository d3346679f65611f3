"""Fuzz: whatever a spec file holds, ``toka validate`` and ``toka run`` exit 0 or 2 with a message.

Hypothesis writes random YAML documents to a spec file: real specs with a value
replaced by a structure that shares its parts (dumped as anchors and aliases,
up to "billion laughs" size), alias bombs, recursive aliases, deep nesting,
long values, many tasks, YAML token soup, and bytes that are not UTF-8. For each:

* ``toka validate FILE`` (in-process, through the CLI) exits 0, or 2 with one
  ``error: FILE...`` line per problem and the count, never a traceback;
* ``make_plan([FILE])``, which is all ``toka run`` does with the specs before
  it starts Prefect, agrees: it returns a plan (whose specs can then be hashed
  and put in a prompt, as the run does) or raises a located TokaError.

The whole fuzz runs under an address-space limit (RLIMIT_AS: what this process
had, plus 768 MiB), so an input that makes the loader grow fails the test with
MemoryError instead of taking the machine's memory; and each example must take
under a second of CPU (its own thread's, the best of three runs). A few generated hostile files are also given to the
real ``toka validate`` and ``toka run`` processes, whose exit code, stderr and
peak resident memory are checked.
"""

from __future__ import annotations

import copy
import re
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from toka.cli import app
from toka.errors import TokaError
from toka.plan import make_plan
from toka.prompt import system_prompt
from toka.yaml_source import MAX_DEPTH, MAX_TASKS, MAX_VALUE_CHARS

from .conftest import AGENT_SPECS, TOKA_SPECS, least_cpu_seconds
from .test_spec_limits import BOMB_AS_METADATA, BOMB_AS_TASKS, toka
from .test_spec_properties import random_documents, yaml_soup

TEXTS = [p.read_text(encoding="utf-8") for p in sorted([*TOKA_SPECS.glob("*.yaml"), *AGENT_SPECS.glob("*.yaml")])]
DATA = [yaml.safe_load(t) for t in TEXTS]
KNOWN_BLOCKS = ["metadata", "spec", "capabilities", "objectives", "tasks", "dependencies", "reporting",
                "security", "behavioral_directives", "risk_mitigation", "success_criteria"]  # fmt: skip
#: Where a generated value goes in a real spec: a new context block, or in place of a known field.
PLACES: list[tuple[str | int, ...]] = [
    ("laughs",), ("metadata",), ("metadata", "name"), ("spec",), ("spec", "priority"), ("tasks",),
    ("tasks", "default"), ("tasks", "default", 0), ("tasks", "default", 0, "description"),
    ("tasks", "conditional"), ("dependencies", "required"), ("reporting", "metrics"),
    ("security", "resource_limits"), ("security", "capabilities_required"), ("objectives",),
]  # fmt: skip

FUZZ = settings(
    max_examples=100,
    deadline=None,  # CPU time per example is checked below, without the noise of a loaded machine
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*File \".*\", line \d+", re.MULTILINE)
runner = CliRunner()


# -- documents -----------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=12),
    st.sampled_from(["critical", "2h", "150%", "512MB", "x"]),
)  # fmt: skip


@st.composite
def shared_structures(draw: st.DrawFn) -> Any:
    """A DAG: each new list or mapping holds earlier nodes, picked with repetition.

    YAML dumps a node met twice once, with an anchor, then as aliases; twelve levels
    of fanout twelve expand to 12**12 leaves from a file of a few hundred bytes.
    """
    pool: list[Any] = [draw(scalars) for _ in range(draw(st.integers(1, 3)))]
    for _ in range(draw(st.integers(1, 12))):
        picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=12))
        if draw(st.booleans()):
            pool.append([pool[i] for i in picks])
        else:
            pool.append({f"k{j}": pool[i] for j, i in enumerate(picks)})
    return pool[-1]


def put(data: Any, path: tuple[str | int, ...], value: Any) -> None:
    for part in path[:-1]:
        if isinstance(data, dict) and not isinstance(data.get(part), dict | list):
            data[part] = {}
        data = data[part]
    data[path[-1]] = value


@st.composite
def spec_holding(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> str:
    """A real spec with ``values`` put in one place, dumped (shared parts become aliases)."""
    data = copy.deepcopy(draw(st.sampled_from(DATA)))
    put(data, draw(st.sampled_from(PLACES)), draw(values))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=200)


@st.composite
def alias_bombs(draw: st.DrawFn, *, least: int = 1) -> str:
    """Anchors defined first, ``a{k}`` = ``fanout`` aliases of ``a{k-1}``; the last used in a real spec.

    ``least`` is the smallest fanout and number of levels.
    """
    fanout, levels = draw(st.integers(least, 12)), draw(st.integers(least, 12))
    leaf = draw(st.sampled_from(["lol", "{description: x}", "[x, y]", "{a: [1], b: {c: 2}}"]))
    lines = [f"  a0: &a0 [{', '.join([leaf] * fanout)}]"]
    lines += [f"  a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * fanout)}]" for k in range(1, levels)]
    if draw(st.booleans()):  # as a mapping: merge keys copy its pairs
        lines += [f"  m: &m {{{', '.join(f'k{i}: *a{levels - 1}' for i in range(fanout))}}}",
                  f"  mm: {{<<: [{', '.join(['*m'] * fanout)}]}}"]  # fmt: skip
    text = draw(st.sampled_from(TEXTS))
    block = draw(st.sampled_from([None, *KNOWN_BLOCKS]))
    if block is None:
        return "laughs:\n" + "\n".join(lines) + "\n" + text + f"\nmore: *a{levels - 1}\n"
    text = re.sub(rf"(?m)^{block}:", f"old_{block}:", text)
    return "laughs:\n" + "\n".join(lines) + "\n" + text + f"\n{block}: *a{levels - 1}\n"


@st.composite
def recursive_aliases(draw: st.DrawFn) -> str:
    shape = draw(st.sampled_from(["&r [x, *r]", "&r {a: *r}", "&r [[[*r]]]", "&r {<<: {a: 1}, b: [*r]}", "[&r [*r], *r]"]))
    key = draw(st.sampled_from(["loop", *KNOWN_BLOCKS]))
    text = re.sub(rf"(?m)^{key}:", f"old_{key}:", draw(st.sampled_from(TEXTS)))
    return text + f"\n{key}: {shape}\n"


@st.composite
def big_ones(draw: st.DrawFn) -> str:
    """Near and over a bound: nesting, one long value, many tasks."""
    text = draw(st.sampled_from(TEXTS))
    kind = draw(st.sampled_from(["flow", "block", "value", "tasks"]))
    if kind == "flow":
        n = draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3) | st.integers(1, 2000))
        return text + "\ndeep: " + "[" * n + "]" * n + "\n"
    if kind == "block":
        n = draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3))
        return text + "\ndeep:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, n)) + "  " * n + "end\n"
    if kind == "value":
        n = draw(st.integers(MAX_VALUE_CHARS - 2, MAX_VALUE_CHARS + 2))
        return text + "\nnotes: " + "x" * n + "\n"
    n = draw(st.integers(MAX_TASKS - 2, MAX_TASKS + 2))
    text = re.sub(r"(?m)^tasks:", "old_tasks:", text)
    return text + "\ntasks:\n  default:\n" + "    - {description: step}\n" * n


#: Half hostile, half the random documents of the property tests.
documents = st.one_of(
    alias_bombs(),
    recursive_aliases(),
    big_ones(),
    spec_holding(shared_structures()),
    spec_holding(random_documents.map(yaml.safe_load)),
    yaml_soup,
    random_documents,
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),  # written as UTF-8: valid bytes, odd text
)
not_utf8 = st.tuples(st.sampled_from(TEXTS), st.binary(min_size=1, max_size=8)).map(
    lambda t: t[0].encode() + b"\nx: " + t[1] + b"\n"
)


# -- the property --------------------------------------------------------------------


@pytest.fixture(scope="class")
def bounded_address_space() -> Iterator[None]:
    """RLIMIT_AS of this process, while the fuzz runs: what it has now plus 768 MiB."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (768 << 20), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_commands(raw: bytes, folder: Path) -> int:
    """Write ``raw`` as a spec; validate and plan it as ``toka validate`` and ``toka run`` do; the exit code."""
    path = folder / "fuzz.yaml"
    path.write_bytes(raw)
    codes: list[int] = []
    # This thread's CPU (Prefect's background threads may run too), the best of a few runs: another
    # test worker on the same cores slows every run down for a while. Each run checks everything.
    spent = least_cpu_seconds(lambda: codes.append(_validate_and_plan(path)), bound=1.0)
    assert spent < 1.0, f"one example took {spent:.2f} s of CPU"
    return codes[0]


def _validate_and_plan(path: Path) -> int:
    """``toka validate`` and what ``toka run`` does with ``path`` before Prefect starts; the exit code."""
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code in (0, 2), (result.exit_code, result.exception, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert not _TRACEBACK.search(result.output)
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert re.fullmatch(r"\d+ errors?", lines[-1]), result.stderr
        assert all(line.startswith(f"error: {path}") for line in lines[:-1] if line.startswith("error")), result.stderr
    try:
        # What `toka run` does with the specs before Prefect starts; validating one file of a
        # set takes its unknown dependencies as warnings (they may live in the other files).
        plan = make_plan([str(path)], partial=True)
    except TokaError as e:
        code = 2
        assert e.problems and all(p.message and not _TRACEBACK.search(str(p)) for p in e.problems)
        assert all(p.source == str(path) for p in e.problems if p.level == "error")
    else:
        code = 0
        for spec in plan.graph.agents.values():  # what the run then walks: the cache key and the prompt
            spec.digest()
            system_prompt(spec, tools=["read_file"])
    assert code == result.exit_code
    return code


@pytest.mark.usefixtures("bounded_address_space")
class TestFuzz:
    @FUZZ
    @given(documents)
    @example("laughs:\n  a0: &a0 [lol, lol]\n  a1: &a1 [*a0, *a0]\nmetadata: *a1\n")
    @example("a: &a [*a]\n")
    @example(BOMB_AS_METADATA)  # 10**10 leaves, where validation walks them
    @example(BOMB_AS_TASKS)
    def test_validate_and_run_exit_0_or_2_with_a_message(self, text: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            check_commands(text.encode("utf-8", "surrogatepass"), Path(folder))

    @settings(FUZZ, max_examples=30)
    @given(not_utf8)
    def test_bytes_that_are_not_utf8_exit_2(self, raw: bytes) -> None:
        with tempfile.TemporaryDirectory() as folder:
            code = check_commands(raw, Path(folder))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            assert code == 2


# -- the real processes ---------------------------------------------------------------


@settings(FUZZ, max_examples=2, phases=[Phase.generate])
@given(st.lists(st.one_of(alias_bombs(least=6), recursive_aliases()), min_size=3, max_size=3))
def test_the_real_commands_refuse_generated_hostile_files(texts: list[str]) -> None:
    """Three files over a bound (6**6 leaves at least, or an alias inside what it names) in one set."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "specs"
        folder.mkdir()
        for i, text in enumerate(texts):
            (folder / f"h{i}.yaml").write_text(text, encoding="utf-8")
        for command in (["validate", folder], ["run", folder, "--workspace", tmp]):
            code, err, seconds, peak_mb = toka(*command, cwd=Path(tmp))
            assert code == 2 and "Traceback" not in err, err
            for i in range(3):
                assert re.search(rf"^error: {re.escape(str(folder / f'h{i}.yaml'))}:\d+: \S+: alias \*", err, re.M), err
            assert err.rstrip().endswith("3 errors"), err
            assert seconds < 20 and peak_mb < 200, (seconds, peak_mb)
