"""Loading a set of spec files: every file read afresh, every problem of every file located."""

from __future__ import annotations

from pathlib import Path

import pytest

from toka.errors import SpecError
from toka.spec import AgentSpec
from toka.specset import load_specs

from .conftest import TOKA_SPECS

BASE = (TOKA_SPECS / "build-system-stabilization.yaml").read_text(encoding="utf-8")
NAME = 'name: "build-system-stabilization"'


def named(name: str, text: str = BASE) -> str:
    assert text.count(NAME) == 1
    return text.replace(NAME, f'name: "{name}"')


def write_set(folder: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    folder.mkdir()
    for i in range(n):
        text = (bad or {}).get(i) or named(f"agent-{i:04d}")
        (folder / f"agent-{i:04d}.yaml").write_text(text, encoding="utf-8")
    return folder


def problems_of(folder: Path) -> list[tuple[str, int | None, str | None, str]]:
    with pytest.raises(SpecError) as info:
        load_specs([folder])
    return [(Path(p.source or "").name, p.line, p.field, p.message) for p in info.value.problems]


def test_problems_in_a_set_are_located_as_in_one_file(tmp_path: Path) -> None:
    bad_yaml = named("bad-yaml").replace('max_cpu: "75%"', 'max_cpu: [75%')
    bad_field = named("bad-field").replace('max_memory: "512MB"', 'max_memory: "lots"')
    duplicate = named("duplicate").replace('max_cpu: "75%"', 'max_cpu: "75%"\n    max_cpu: "50%"')
    folder = write_set(tmp_path / "specs", 12, bad={3: bad_yaml, 7: bad_field, 11: duplicate})
    problems = problems_of(folder)
    assert [p[0] for p in problems] == ["agent-0003.yaml", "agent-0007.yaml", "agent-0011.yaml"]
    assert all(isinstance(p[1], int) and p[1] > 1 for p in problems), problems
    assert "invalid YAML" in problems[0][3]
    assert problems[1][2] == "security.resource_limits.max_memory"
    assert "duplicate key 'max_cpu'" in problems[2][3]
    for (name, *where), text in zip(problems, (bad_yaml, bad_field, duplicate), strict=True):
        with pytest.raises(SpecError) as alone:
            AgentSpec.from_text(text, source=name)
        assert [(p.line, p.field, p.message) for p in alone.value.problems] == [tuple(where)]


def test_an_edited_file_is_read_again(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "specs", 2)
    first = load_specs([folder])
    edited = named("agent-0000").replace('max_cpu: "75%"', 'max_cpu: "65%"')  # same length
    (folder / "agent-0000.yaml").write_text(edited, encoding="utf-8")
    again = load_specs([folder])
    assert str(first[0].security.resource_limits.max_cpu) == "75%"
    assert str(again[0].security.resource_limits.max_cpu) == "65%"
    assert again[1].model_dump() == first[1].model_dump()


def test_a_bad_file_is_reported_on_every_load(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "specs", 1, bad={0: named("x").replace('max_memory: "512MB"', 'max_memory: "lots"')})
    for _ in range(2):
        with pytest.raises(SpecError, match="max_memory"):
            load_specs([folder])


def test_the_same_text_under_another_name_is_its_own_spec(tmp_path: Path) -> None:
    text = named("agent")
    a, b = AgentSpec.from_text(text, source="a.yaml"), AgentSpec.from_text(text, source="b.yaml")
    assert a.model_dump() == b.model_dump() and a.source == "a.yaml" and b.source == "b.yaml"


def test_a_file_named_twice_is_one_spec_not_a_duplicate(tmp_path: Path) -> None:
    """A directory and a file in it, or a link beside its target: the same agent, read once."""
    folder = write_set(tmp_path / "specs", 2)
    (folder / "link.yaml").symlink_to(folder / "agent-0000.yaml")
    specs = load_specs([folder, folder / "agent-0001.yaml", tmp_path / "specs" / ".." / "specs" / "agent-0000.yaml"])
    assert sorted(s.name for s in specs) == ["agent-0000", "agent-0001"]


def test_spec_suffixes_are_matched_whatever_their_case(tmp_path: Path) -> None:
    """A directory scan skipped `c.YAML` and `d.Yml` without a word."""
    folder = tmp_path / "specs"
    folder.mkdir()
    for i, suffix in enumerate([".yaml", ".YAML", ".Yml", ".txt"]):
        (folder / f"agent-{i:04d}{suffix}").write_text(named(f"agent-{i:04d}"), encoding="utf-8")
    assert sorted(s.name for s in load_specs([folder])) == ["agent-0000", "agent-0001", "agent-0002"]


def test_linked_directories_are_searched_once_and_a_link_to_nothing_is_named(tmp_path: Path) -> None:
    team = write_set(tmp_path / "team-a", 2)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "team-a").symlink_to(team)  # a team's specs kept elsewhere
    (specs / "again").symlink_to(team)  # the same directory twice: read once
    (team / "up").symlink_to(specs)  # a loop back up the tree ends
    (specs / "own.yaml").write_text(named("own"), encoding="utf-8")
    (specs / "hard.yaml").hardlink_to(specs / "own.yaml")  # one file under two names: one spec
    assert sorted(s.name for s in load_specs([specs])) == ["agent-0000", "agent-0001", "own"]
    (specs / "gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    assert problems_of(specs) == [("gone.yaml", None, None, f"a link to {tmp_path / 'nowhere.yaml'}, which does not exist")]


def test_each_directory_without_specs_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError) as info:
        load_specs([tmp_path / "missing", tmp_path / "empty"])
    assert [(Path(p.source or "").name, p.message) for p in info.value.problems] == [
        ("missing", "no such file or directory"), ("empty", "no agent specs (*.yaml, *.yml) in this directory")]
