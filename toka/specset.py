"""Finding and loading a set of spec files from the paths a user names."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import Problem, SpecError
from .spec import AgentSpec, read_spec_text

__all__ = ["DEFAULT_SPEC_DIR", "find_spec_files", "load_spec_set", "load_specs"]

#: Where ``toka`` looks when no path is given.
DEFAULT_SPEC_DIR = Path("agent_specs")

_SUFFIXES = (".yaml", ".yml")


def find_spec_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (searched recursively) into spec files, sorted and unique.

    Raises:
        SpecError: a path does not exist, or a directory holds no spec file.
    """
    # Keyed by the file itself: one named twice (a directory and a file in it, a link beside its
    # target) is read once, by the first name it was found under.
    found: dict[Path, Path] = {}
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                problems.append(Problem("no agent specs (*.yaml, *.yml) in this directory", source=str(path)))
            for file in files:
                found.setdefault(file.resolve(), file)
        elif path.is_file():
            found.setdefault(path.resolve(), path)
        elif path.exists():  # a FIFO, a device: reading it could block or never end
            problems.append(Problem("not a regular file or a directory", source=str(path)))
        else:
            problems.append(Problem("no such file or directory", source=str(path)))
    if problems:
        raise SpecError(problems)
    return list(found.values())


def load_specs(paths: Iterable[str | Path] = (DEFAULT_SPEC_DIR,)) -> list[AgentSpec]:
    """Load every spec under ``paths``, reporting the problems of all files together.

    Raises:
        SpecError: with every problem of every bad file, each located.
    """
    specs, problems = load_spec_set(paths)
    if problems:
        raise SpecError(problems)
    return specs


def load_spec_set(paths: Iterable[str | Path] = (DEFAULT_SPEC_DIR,)) -> tuple[list[AgentSpec], list[Problem]]:
    """The specs under ``paths`` that load, and the problems of those that do not.

    Raises:
        SpecError: a path does not exist, or a directory holds no spec file.
    """
    named_texts: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for file in find_spec_files(paths):
        try:
            named_texts.append((str(file), read_spec_text(file)))
        except SpecError as e:
            problems.extend(e.problems)
    specs, bad = AgentSpec.load_texts(named_texts)
    return specs, [*problems, *bad]
