"""Property tests: whatever the input, the loader returns a spec or raises SpecError.

The bases are the nine real Toka specs. Strategies break them the ways users
do (a dropped key, a value of the wrong type, a bad unit string, a mangled
line) and also feed the loader text that is not a spec at all. The contract
checked every time:

* ``AgentSpec.from_text`` returns an :class:`AgentSpec` or raises
  :class:`SpecError`; no other exception ever escapes;
* a SpecError holds at least one problem, and each problem has a non-empty
  message with no Python traceback in it, names the source it was given, and
  points at a line that exists.

The tests at the bottom pin inputs that once crashed the loader (impossible
dates, numbers too large for a float).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from toka.errors import SpecError
from toka.spec import AgentSpec
from toka.yaml_source import YamlSource, load_yaml

from .conftest import TOKA_SPECS

SOURCE = "agent_specs/prop.yaml"

BASE_TEXTS: dict[str, str] = {
    p.stem: p.read_text(encoding="utf-8") for p in sorted(TOKA_SPECS.glob("*.yaml"))
}
BASES: dict[str, Any] = {name: yaml.safe_load(text) for name, text in BASE_TEXTS.items()}

FAST = settings(
    # Hypothesis's default: 200 took 35 s of the suite for the same properties (all shapes of
    # breakage are drawn well within 100); each run draws new examples (no database).
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*File \".*\", line \d+", re.MULTILINE)


# -- the contract ------------------------------------------------------------------


def check_contract(text: str, source: str = SOURCE) -> AgentSpec | SpecError:
    """Load ``text``; fail the test unless the result keeps the loader's contract."""
    try:
        spec = AgentSpec.from_text(text, source=source)
    except SpecError as err:
        # A problem found at the end of the input (an unclosed '{', a key with no
        # ':') is reported on the line after the last one: "end of file".
        check_problems(err, source, max_line=max(1, len(text.splitlines())))
        return err
    assert isinstance(spec, AgentSpec)
    check_accepted(spec)
    assert spec.source == source
    return spec


def check_problems(err: SpecError, source: str | None, max_line: int | None) -> None:
    assert len(err.problems) >= 1
    for problem in err.problems:
        assert isinstance(problem.message, str)
        assert problem.message.strip(), f"empty message in {problem!r}"
        assert not _TRACEBACK.search(problem.message), problem.message
        assert problem.source == source
        assert problem.level in ("error", "warning")
        if problem.line is not None:
            assert max_line is not None, f"a dict has no lines, got {problem!r}"
            assert 1 <= problem.line <= max_line, f"line {problem.line} outside 1..{max_line}: {problem!r}"
        assert problem.field is None or (isinstance(problem.field, str) and problem.field)
    rendered = str(err)
    assert rendered and len(rendered.splitlines()) >= len(err.problems)


def check_accepted(spec: AgentSpec) -> None:
    """An accepted spec is usable and survives its own serialisation."""
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", spec.name)
    assert spec.tasks.default
    assert spec.security.resource_limits.timeout.seconds > 0
    dumped = spec.model_dump(mode="json")
    again = AgentSpec.from_dict(dumped)
    assert again.name == spec.name


def check_text_and_dict_agree(data: Any) -> None:
    """The same data, as YAML text and as a dict, gets the same verdict on the same fields."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    from_text = check_contract(text)
    try:
        # The data as toka reads YAML (not yaml.safe_load: no base 60, numbers kept as written).
        from_dict = AgentSpec.from_dict(load_yaml(YamlSource(SOURCE, text)), source=SOURCE)
    except SpecError as err:
        check_problems(err, SOURCE, max_line=None)
        assert isinstance(from_text, SpecError), "from_dict refused what from_text accepted"
        assert [(p.field, p.message) for p in err.problems] == [
            (p.field, p.message) for p in from_text.problems
        ]
        return
    assert isinstance(from_dict, AgentSpec)
    assert isinstance(from_text, AgentSpec), "from_text refused what from_dict accepted"


# -- strategies ---------------------------------------------------------------------


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``node`` (dict keys and list indexes)."""
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


# Paths per base, grouped by depth, so that "a random depth" is uniform over depths
# rather than dominated by the deep, numerous leaves.
ALL_PATHS = {name: _paths(data) for name, data in BASES.items()}
KEY_PATHS_BY_DEPTH: dict[str, dict[int, list[tuple[Any, ...]]]] = {}
for _name, _data in BASES.items():
    by_depth: dict[int, list[tuple[Any, ...]]] = {}
    for _path in ALL_PATHS[_name]:
        if isinstance(_parent(_data, _path), dict):
            by_depth.setdefault(len(_path), []).append(_path)
    KEY_PATHS_BY_DEPTH[_name] = by_depth

base_names = st.sampled_from(sorted(BASES))

scalars = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=30),
)
wrong_values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=10), scalars, max_size=3),
    st.lists(st.dictionaries(st.text(max_size=10), scalars, max_size=2), max_size=2),
)


@st.composite
def dropped_key(draw: st.DrawFn) -> Any:
    name = draw(base_names)
    by_depth = KEY_PATHS_BY_DEPTH[name]
    depth = draw(st.sampled_from(sorted(by_depth)))
    path = draw(st.sampled_from(by_depth[depth]))
    data = copy.deepcopy(BASES[name])
    del _parent(data, path)[path[-1]]
    return data


@st.composite
def wrong_typed_value(draw: st.DrawFn) -> Any:
    name = draw(base_names)
    path = draw(st.sampled_from(ALL_PATHS[name]))
    data = copy.deepcopy(BASES[name])
    _parent(data, path)[path[-1]] = draw(wrong_values)
    return data


LIMIT_KEYS = ["timeout", "max_memory", "max_cpu", "max_disk_usage", "max_network_bandwidth", "max_processes"]
UNIT_SUFFIXES = ["ms", "s", "m", "h", "d", "w", "B", "KB", "MB", "GB", "TB", "KiB", "k", "%", "bps", "Kbps",
                 "Mbps", "Gbps", "x", "", " ", "%%", "sec", "mins", "PB", "Tbps"]  # fmt: skip
bad_unit_values = st.one_of(
    st.sampled_from(
        ["150%", "0%", "fast", "0s", "forever", "10", "-1GB", "0MB", "lots", "100MB", "1Tbps", "", " ", "%",
         "1e3MB", "NaN", "inf", "-inf", ".5h", "1h-", "1,5GB", "∞s", "１h", "1h\n30m", "0x10MB", "1_000MB"]  # fmt: skip
    ),
    # Numbers from tiny to past float's range (which must be a message, not a crash).
    st.builds(
        lambda sign, digits, frac, space, unit: f"{sign}{digits}{frac}{space}{unit}",
        st.sampled_from(["", "-", "+"]),
        st.one_of(st.integers(0, 10), st.integers(0, 10**30), st.integers(10**300, 10**400)).map(str),
        st.sampled_from(["", ".0", ".5", ".000001"]),
        st.sampled_from(["", " ", "\t"]),
        st.sampled_from(UNIT_SUFFIXES),
    ),
    st.text(max_size=20),
    wrong_values,
)


@st.composite
def bad_resource_limits(draw: st.DrawFn) -> Any:
    name = draw(base_names)
    data = copy.deepcopy(BASES[name])
    limits = data["security"]["resource_limits"]
    for key in draw(st.permutations(LIMIT_KEYS))[: draw(st.integers(1, 3))]:
        limits[key] = draw(bad_unit_values)
    return data


@st.composite
def mangled_lines(draw: st.DrawFn) -> str:
    """A real spec's text with one line-level accident: lost, doubled, shifted, swapped or scribbled."""
    lines = BASE_TEXTS[draw(base_names)].splitlines(keepends=True)
    i = draw(st.integers(0, len(lines) - 1))
    op = draw(st.sampled_from(["delete", "duplicate", "indent", "dedent", "swap", "insert", "truncate"]))
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(i, lines[i])
    elif op == "indent":
        lines[i] = draw(st.sampled_from([" ", "  ", "    ", "\t"])) + lines[i]
    elif op == "dedent":
        lines[i] = lines[i][draw(st.integers(1, 4)) :] or "\n"
    elif op == "swap":
        j = draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "insert":
        lines.insert(i, draw(st.text(alphabet=st.characters(exclude_characters="*!"), max_size=40)) + "\n")
    else:
        text = "".join(lines)
        return text[: draw(st.integers(0, len(text)))]
    return "".join(lines)


# Tokens that YAML gives meaning to, glued at random, aliases and tags included.
YAML_TOKENS = [
    "metadata:", "spec:", "tasks:", "default:", "security:", "resource_limits:", "dependencies:",
    "required:", "reporting:", "metrics:", "conditional:", "name:", " name", " x", "description:",
    "priority:", " high", " urgent", "timeout:", " 2h", " 150%", " 0s", " lots", "max_cpu:",
    "\n", "\n  ", "\n    ", "  ", "- ", " - ", ": ", ":", "{", "}", "[", "]", ",", "'", '"', "#",
    "|", ">", "---", "...", "? ", " null", " ~", " true", " no", " 2025-07-04", " 0x1F", " 1e3",
    " .inf", " -1", " 10", "&a ", "*a", " !!int", " !!timestamp", " 2025-13-45", "<<: ", "<<", "%YAML 1.1\n", "\t", "\\", "@", "`", "é", "\u00a0", "\ufeff",
]  # fmt: skip
yaml_soup = st.lists(st.sampled_from(YAML_TOKENS), max_size=60).map("".join)

random_documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(list(AgentSpec._KNOWN_BLOCKS))),
                        children, max_size=4),
    ),
    max_leaves=20,
).map(lambda doc: yaml.safe_dump(doc, allow_unicode=True))


# -- the properties -------------------------------------------------------------------


@FAST
@given(dropped_key())
def test_dropping_any_key_keeps_the_contract(data: Any) -> None:
    check_text_and_dict_agree(data)


@FAST
@given(wrong_typed_value())
def test_any_value_of_a_wrong_type_keeps_the_contract(data: Any) -> None:
    check_text_and_dict_agree(data)


@FAST
@given(bad_resource_limits())
@example(
    {**BASES["build-system-stabilization"],
     "security": {"resource_limits": {"timeout": "0s", "max_cpu": "150%", "max_memory": "lots"}}}  # fmt: skip
)
@example(  # a float YAML writes otherwise than Python (1.0e-05): the message quotes it as written
    {**BASES["build-system-stabilization"], "security": {"resource_limits": {"timeout": 1e-05, "max_cpu": 1e-05}}}
)
def test_bad_unit_strings_keep_the_contract(data: Any) -> None:
    check_text_and_dict_agree(data)


@FAST
@given(mangled_lines())
def test_mangled_spec_text_keeps_the_contract(text: str) -> None:
    check_contract(text)


@FAST
@given(st.one_of(yaml_soup, random_documents))
@example("")
@example("metadata:\n  name: x\n  name: y\n")
@example("- a\n- b\n")
@example("1: x\n2025-07-04: y\nnull: z\n")
@example("? [a, b]\n: c\n")
@example("a: " + "[" * 3000 + "]" * 3000)
@example("<<: {metadata: {name: a}}\nmetadata: {name: b}\n")
@example("<<: 5\n")
def test_random_yaml_text_keeps_the_contract(text: str) -> None:
    check_contract(text)


@FAST
@given(st.one_of(st.text(max_size=200), st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")),
                 st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))  # fmt: skip
@example("\x00")
@example("\ufeffmetadata: {}")
def test_random_text_and_bytes_keep_the_contract(text: str) -> None:
    check_contract(text)


def test_every_base_is_valid() -> None:
    assert len(BASES) == 9  # the properties above break all nine real specs
    for name, text in BASE_TEXTS.items():
        result = check_contract(text, source=f"{name}.yaml")
        assert isinstance(result, AgentSpec), str(result)


# -- inputs that once crashed the loader ----------------------------------------------


@FAST
@given(
    st.sampled_from(["max_memory", "max_disk_usage", "max_network_bandwidth"]),
    st.integers(309, 400),
)
@example("max_memory", 400)
def test_huge_unit_numbers_keep_the_contract(key: str, digits: int) -> None:
    unit = "Mbps" if key == "max_network_bandwidth" else "MB"
    data = copy.deepcopy(BASES["build-system-stabilization"])
    data["security"]["resource_limits"][key] = "9" * digits + unit
    check_contract(yaml.safe_dump(data))


@FAST
@given(st.integers(13, 99), st.integers(32, 99))
@example(13, 45)
def test_impossible_unquoted_dates_keep_the_contract(month: int, day: int) -> None:
    text = BASE_TEXTS["build-system-stabilization"].replace('created: "2025-07-04"', f"created: 2025-{month}-{day}")
    check_contract(text)
