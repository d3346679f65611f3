"""Workspace.resolve: every model-supplied path stays inside the workspace, or is refused with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toka.errors import ConfigError, ToolError
from toka.workspace import STATE_DIR_NAME, PathRefused, Workspace

#: Before Python 3.13, Path.resolve() raises RuntimeError on a symlink loop.


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the workspace, with a secret file in it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("top secret\n")
    return d


@pytest.fixture
def ws(tmp_path: Path, outside: Path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "README.md").write_text("# hello\n")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "src" / "pkg").mkdir()
    (root / STATE_DIR_NAME).mkdir()
    (root / STATE_DIR_NAME / "runs.json").write_text("{}")
    (root / "secret-link").symlink_to(outside / "secret.txt")
    (root / "outside-dir").symlink_to(outside, target_is_directory=True)
    (root / "inside-link").symlink_to(root / "src" / "main.py")
    return Workspace(root)


# -- refused ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/passwd", "/", "/proc/self/environ"])
def test_absolute_paths_are_refused(ws: Workspace, path: str) -> None:
    with pytest.raises(PathRefused, match=r"is absolute; use a path relative to the workspace root"):
        ws.resolve(path)


def test_an_absolute_path_inside_the_workspace_is_refused_too(ws: Workspace) -> None:
    with pytest.raises(PathRefused, match="is absolute"):
        ws.resolve(str(ws.root / "README.md"))


@pytest.mark.parametrize("path", ["~/x", "~", "~root/.ssh/id_rsa"])
def test_home_relative_paths_are_refused(ws: Workspace, path: str) -> None:
    with pytest.raises(PathRefused, match="is absolute"):
        ws.resolve(path)


@pytest.mark.parametrize("path", ["..", "../x", "../outside/secret.txt", "a/../../x", "src/../../outside"])
def test_dotdot_escapes_are_refused(ws: Workspace, path: str) -> None:
    with pytest.raises(PathRefused, match=r"resolves outside the workspace"):
        ws.resolve(path)


def test_dotdot_that_stays_inside_is_fine(ws: Workspace) -> None:
    assert ws.resolve("src/../README.md") == ws.root / "README.md"


@pytest.mark.parametrize("path", ["secret-link", "outside-dir", "outside-dir/secret.txt", "outside-dir/"])
def test_symlinks_pointing_outside_are_refused(ws: Workspace, path: str) -> None:
    with pytest.raises(PathRefused, match=r"resolves outside the workspace"):
        ws.resolve(path)


def test_a_symlink_to_a_device_inside_the_workspace_is_refused(ws: Workspace) -> None:
    (ws.root / "null").symlink_to("/dev/null")
    with pytest.raises(PathRefused, match="'null' resolves outside the workspace"):
        ws.resolve("null")
    with pytest.raises(PathRefused):
        ws.resolve("null", kind="file")


def test_a_fifo_is_refused(ws: Workspace) -> None:
    os.mkfifo(ws.root / "pipe")
    with pytest.raises(PathRefused, match="'pipe' is not a regular file or directory"):
        ws.resolve("pipe")
    with pytest.raises(PathRefused, match="not a regular file or directory"):
        ws.resolve("pipe", kind="file")


def test_a_symlink_to_a_fifo_inside_is_refused(ws: Workspace) -> None:
    os.mkfifo(ws.root / "pipe")
    (ws.root / "pipe-link").symlink_to(ws.root / "pipe")
    with pytest.raises(PathRefused, match="not a regular file or directory"):
        ws.resolve("pipe-link")


def test_nul_bytes_are_refused(ws: Workspace) -> None:
    with pytest.raises(PathRefused, match="must not contain NUL bytes"):
        ws.resolve("README.md\x00.txt")


@pytest.mark.parametrize("path", ["", "   ", "\n"])
def test_empty_paths_are_refused(ws: Workspace, path: str) -> None:
    with pytest.raises(PathRefused, match="a path must be a non-empty, workspace-relative string"):
        ws.resolve(path)


def test_a_non_string_path_is_refused(ws: Workspace) -> None:
    with pytest.raises(PathRefused, match="non-empty, workspace-relative string"):
        ws.resolve(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", [".toka", ".toka/runs.json", ".toka/not-yet", "src/../.toka/runs.json"])
def test_the_state_directory_is_refused(ws: Workspace, path: str) -> None:
    with pytest.raises(PathRefused, match="is inside toka's own state directory"):
        ws.resolve(path, kind="new")


def test_a_symlink_into_the_state_directory_is_refused(ws: Workspace) -> None:
    (ws.root / "state").symlink_to(ws.root / STATE_DIR_NAME)
    with pytest.raises(PathRefused, match="state directory"):
        ws.resolve("state/runs.json")


def test_the_state_directory_is_refused_before_it_exists(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    with pytest.raises(PathRefused, match="state directory"):
        ws.resolve(".toka/results.json", kind="new")


def test_a_custom_state_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "records").mkdir()
    ws = Workspace(tmp_path, state_dir=tmp_path / "records")
    with pytest.raises(PathRefused, match="state directory"):
        ws.resolve("records")


def test_a_missing_path_is_refused(ws: Workspace) -> None:
    with pytest.raises(PathRefused, match="'nope.txt' does not exist"):
        ws.resolve("nope.txt")


def test_refusals_are_tool_errors_that_are_not_retried(ws: Workspace) -> None:
    with pytest.raises(ToolError) as info:
        ws.resolve("../x")
    assert isinstance(info.value, PathRefused)
    assert info.value.retryable is False


# -- accepted ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("README.md", "README.md"),
        ("./README.md", "README.md"),
        ("src", "src"),
        ("src/", "src"),
        ("src//main.py", "src/main.py"),
        ("src/pkg", "src/pkg"),
        ("inside-link", "src/main.py"),
        (".", ""),
    ],
)
def test_normal_relative_paths_resolve_inside(ws: Workspace, path: str, expected: str) -> None:
    real = ws.resolve(path)
    assert real == (ws.root / expected if expected else ws.root)
    assert real.is_relative_to(ws.root)


def test_kind_file_refuses_a_directory(ws: Workspace) -> None:
    assert ws.resolve("README.md", kind="file") == ws.root / "README.md"
    with pytest.raises(PathRefused, match="'src' is a directory, not a file"):
        ws.resolve("src", kind="file")


def test_kind_dir_refuses_a_file(ws: Workspace) -> None:
    assert ws.resolve("src", kind="dir") == ws.root / "src"
    with pytest.raises(PathRefused, match="'README.md' is a file, not a directory"):
        ws.resolve("README.md", kind="dir")


def test_kind_new_allows_paths_that_do_not_exist_yet_inside(ws: Workspace) -> None:
    assert ws.resolve("notes.md", kind="new") == ws.root / "notes.md"
    assert ws.resolve("src/new/deep/file.py", kind="new") == ws.root / "src/new/deep/file.py"
    # an existing path is fine for 'new' too
    assert ws.resolve("README.md", kind="new") == ws.root / "README.md"


def test_kind_new_still_refuses_escapes(ws: Workspace) -> None:
    with pytest.raises(PathRefused, match="resolves outside"):
        ws.resolve("../new.txt", kind="new")
    with pytest.raises(PathRefused, match="resolves outside"):
        ws.resolve("outside-dir/new.txt", kind="new")
    with pytest.raises(PathRefused, match="is absolute"):
        ws.resolve("/tmp/new.txt", kind="new")


# -- relative() and the root ---------------------------------------------------------


def test_relative_gives_posix_paths_and_dot_for_the_root(ws: Workspace) -> None:
    assert ws.relative(ws.root) == "."
    assert ws.relative(ws.root / "src" / "main.py") == "src/main.py"
    assert ws.relative(ws.resolve("src/pkg")) == "src/pkg"


def test_the_root_is_stored_resolved(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    ws = Workspace(tmp_path / "alias")
    assert ws.root == (tmp_path / "real").resolve()
    assert ws.state_dir == ws.root / STATE_DIR_NAME
    (tmp_path / "real" / "a.txt").write_text("a")
    assert ws.resolve("a.txt") == ws.root / "a.txt"


def test_a_root_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"workspace '.*file\.txt' is not a directory"):
        Workspace(f)


def test_a_missing_root_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        Workspace(tmp_path / "missing")


# -- bugs -----------------------------------------------------------------------------


def test_a_symlink_loop_is_refused(ws: Workspace) -> None:
    (ws.root / "loop").symlink_to("loop")
    with pytest.raises(PathRefused):
        ws.resolve("loop")
