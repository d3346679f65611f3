"""Loading a set of spec files: many files on several cores, and specs remembered by their text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from toka.errors import SpecError
from toka.spec import AgentSpec
from toka.specset import load_specs
from toka.yaml_source import PARALLEL_MIN_FILES, _parse_workers

from .conftest import ROOT, TOKA_SPECS

BASE = (TOKA_SPECS / "build-system-stabilization.yaml").read_text(encoding="utf-8")
NAME = 'name: "build-system-stabilization"'
CORES = len(os.sched_getaffinity(0))


def named(name: str, text: str = BASE) -> str:
    assert text.count(NAME) == 1
    return text.replace(NAME, f'name: "{name}"')


def write_set(folder: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    folder.mkdir()
    for i in range(n):
        text = (bad or {}).get(i) or named(f"agent-{i:04d}")
        (folder / f"agent-{i:04d}.yaml").write_text(text, encoding="utf-8")
    return folder


# Run in a fresh interpreter: the test process has Prefect's threads, and with other threads
# running the loader (rightly) parses in-process. Records which processes parsed.
LOAD_TWICE = textwrap.dedent(
    """
    import json, os, sys
    import toka.yaml_source as ys
    from toka.errors import SpecError
    from toka.spec import forget_loaded_specs
    from toka.specset import load_specs

    parse_chunk, pids = ys._parse_chunk, sys.argv[2]

    def recording(named_texts):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\\n")
        if os.environ.get("DIE_IN_WORKER") and os.getpid() != int(os.environ["MAIN_PID"]):
            os._exit(3)
        return parse_chunk(named_texts)

    ys._parse_chunk = recording
    os.environ["MAIN_PID"] = str(os.getpid())

    def load():
        try:
            return {"specs": [s.model_dump(mode="json") for s in load_specs([sys.argv[1]])]}
        except SpecError as e:
            return {"problems": [[p.source, p.line, p.field, p.message] for p in e.problems]}

    first = load()
    forget_loaded_specs()
    ys.PARALLEL_MIN_FILES = 10**9  # the second load parses everything here
    print(json.dumps({"main": os.getpid(), "parallel": first, "serial": load()}))
    """
)


def load_twice(folder: Path, tmp_path: Path, **env: str) -> tuple[dict, dict, set[int], int]:
    pids = tmp_path / "pids.txt"
    pids.write_text("")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_TWICE, str(folder), str(pids)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    return out["parallel"], out["serial"], {int(p) for p in pids.read_text().split()}, out["main"]


@pytest.mark.skipif(CORES < 2, reason="needs two cores to parse on two")
def test_a_large_set_is_parsed_on_several_cores_with_the_same_specs(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "specs", PARALLEL_MIN_FILES + 40)
    parallel, serial, pids, main = load_twice(folder, tmp_path)
    assert len(pids - {main}) >= 2, "the parsing was not spread over worker processes"
    assert parallel == serial and len(parallel["specs"]) == PARALLEL_MIN_FILES + 40
    assert [s["metadata"]["name"] for s in parallel["specs"]][-1] == f"agent-{PARALLEL_MIN_FILES + 39:04d}"


@pytest.mark.skipif(CORES < 2, reason="needs two cores to parse on two")
def test_problems_in_a_large_set_are_located_as_in_a_small_one(tmp_path: Path) -> None:
    bad_yaml = named("bad-yaml").replace('max_cpu: "75%"', 'max_cpu: [75%')
    bad_field = named("bad-field").replace('max_memory: "512MB"', 'max_memory: "lots"')
    duplicate = named("duplicate").replace('max_cpu: "75%"', 'max_cpu: "75%"\n    max_cpu: "50%"')
    folder = write_set(tmp_path / "specs", PARALLEL_MIN_FILES + 40, bad={3: bad_yaml, 120: bad_field, 239: duplicate})
    parallel, serial, pids, main = load_twice(folder, tmp_path)
    assert len(pids - {main}) >= 2
    assert parallel == serial
    problems = parallel["problems"]
    assert [Path(p[0]).name for p in problems] == ["agent-0003.yaml", "agent-0120.yaml", "agent-0239.yaml"]
    assert all(isinstance(p[1], int) and p[1] > 1 for p in problems), problems
    assert "invalid YAML" in problems[0][3]
    assert problems[1][2] == "security.resource_limits.max_memory"
    assert "duplicate key 'max_cpu'" in problems[2][3]


@pytest.mark.skipif(CORES < 2, reason="needs two cores to parse on two")
def test_a_parsing_worker_that_dies_loses_no_file(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "specs", PARALLEL_MIN_FILES + 40)
    parallel, serial, pids, main = load_twice(folder, tmp_path, DIE_IN_WORKER="1")
    assert pids - {main}, "no worker process was started"
    assert parallel == serial and len(parallel["specs"]) == PARALLEL_MIN_FILES + 40


def test_with_other_threads_running_the_files_are_parsed_in_this_process() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert _parse_workers(10_000) == 1
    finally:
        stop.set()
        thread.join()
    assert _parse_workers(PARALLEL_MIN_FILES - 1) == 1


def test_an_edited_file_is_read_again_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "specs", 2)
    first = load_specs([folder])
    assert load_specs([folder])[0] is first[0]  # the same text: validated once
    edited = named("agent-0000").replace('max_cpu: "75%"', 'max_cpu: "65%"')  # same length
    (folder / "agent-0000.yaml").write_text(edited, encoding="utf-8")
    again = load_specs([folder])
    assert again[0] is not first[0] and again[1] is first[1]
    assert str(again[0].security.resource_limits.max_cpu) != str(first[0].security.resource_limits.max_cpu)


def test_a_bad_file_is_reported_on_every_load(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "specs", 1, bad={0: named("x").replace('max_memory: "512MB"', 'max_memory: "lots"')})
    for _ in range(2):
        with pytest.raises(SpecError, match="max_memory"):
            load_specs([folder])


def test_the_same_text_under_another_name_is_its_own_spec(tmp_path: Path) -> None:
    text = named("agent")
    a, b = AgentSpec.from_text(text, source="a.yaml"), AgentSpec.from_text(text, source="b.yaml")
    assert a.model_dump() == b.model_dump() and a.source == "a.yaml" and b.source == "b.yaml"
