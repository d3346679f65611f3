"""Finding and loading a set of spec files from the paths a user names."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import Problem, SpecError
from .spec import AgentSpec, read_spec_text

__all__ = ["DEFAULT_SPEC_DIR", "find_spec_files", "load_spec_set", "load_specs"]

#: Where ``toka`` looks when no path is given.
DEFAULT_SPEC_DIR = Path("agent_specs")

_SUFFIXES = (".yaml", ".yml")


def find_spec_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (searched recursively, through linked directories) into spec
    files, sorted and unique.

    Raises:
        SpecError: a path does not exist, a directory holds no spec file, or a spec file in one is
            a link to nothing.
    """
    # Keyed by the file itself: one named twice (a directory and a file in it, a link or a hard
    # link beside its target) is read once, by the first name it was found under.
    found: dict[tuple[int, int], Path] = {}
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            known = len(problems)
            files = _spec_files_under(path, problems)
            if not files and len(problems) == known:  # a link to nothing is reported as that
                problems.append(Problem("no agent specs (*.yaml, *.yml) in this directory", source=str(path)))
            for file in files:
                st = file.stat()
                found.setdefault((st.st_dev, st.st_ino), file)
        elif path.is_file():
            st = path.stat()
            found.setdefault((st.st_dev, st.st_ino), path)
        elif path.exists():  # a FIFO, a device: reading it could block or never end
            problems.append(Problem("not a regular file or a directory", source=str(path)))
        else:
            hint = (" (the default spec directory, looked for in the current directory: give the spec files or "
                    "directories as arguments)") if path == DEFAULT_SPEC_DIR else ""
            problems.append(Problem(f"no such file or directory{hint}", source=str(path)))
    if problems:
        raise SpecError(problems)
    return list(found.values())


def _spec_files_under(root: Path, problems: list[Problem]) -> list[Path]:
    """The spec files under ``root``, hidden files and directories left out; linked directories
    are followed (each real directory once), and a spec file that links to nothing is a problem."""
    files: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or a second link to one directory
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            file = Path(dirpath, name)
            if name.startswith(".") or file.suffix.lower() not in _SUFFIXES:
                continue
            if file.is_file():
                files.append(file)
            elif file.is_symlink() and not file.exists():
                problems.append(Problem(f"a link to {os.readlink(file)}, which does not exist", source=str(file)))
    return sorted(files)


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
