"""Workspace.resolve: every model-supplied path stays inside the workspace, or is refused with a reason."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
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


# -- opening what resolve() checked ------------------------------------------------------------


def test_open_reads_and_writes_the_checked_file_creating_directories(ws: Workspace) -> None:
    with ws.open(ws.resolve("src/main.py", kind="file"), "rb") as f:
        assert f.read() == b"print('hi')\n"
    target = ws.resolve_for_write("new/deep/file.txt")
    with ws.open(target, "wb") as f:
        f.write(b"made\n")
    assert (ws.root / "new" / "deep" / "file.txt").read_bytes() == b"made\n"


@pytest.mark.parametrize("mode", ["rb", "wb"])
def test_a_directory_swapped_for_a_link_after_the_check_is_not_followed(
    ws: Workspace, outside: Path, mode: str
) -> None:
    """Another agent's command may swap a directory for a link out of the workspace between the
    check and the open: what is opened is the checked file or nothing."""
    (ws.root / "d").mkdir()
    (ws.root / "d" / "secret.txt").write_text("inside\n")
    real = ws.resolve("d/secret.txt", kind="file")
    (ws.root / "d").rename(ws.root / "d-moved")
    (ws.root / "d").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathRefused, match="changed while in use"):
        ws.open(real, mode)  # type: ignore[arg-type]
    assert (outside / "secret.txt").read_text() == "top secret\n"


@pytest.mark.parametrize("mode", ["rb", "wb"])
def test_a_file_swapped_for_a_link_or_a_fifo_after_the_check_is_refused(ws: Workspace, outside: Path,
                                                                        mode: str) -> None:
    real = ws.resolve("README.md", kind="file")
    (ws.root / "README.md").unlink()
    (ws.root / "README.md").symlink_to(outside / "secret.txt")
    with pytest.raises(PathRefused, match="changed while in use"):
        ws.open(real, mode)  # type: ignore[arg-type]
    assert (outside / "secret.txt").read_text() == "top secret\n"
    (ws.root / "README.md").unlink()
    os.mkfifo(ws.root / "README.md")
    with pytest.raises(PathRefused):  # not a hang waiting for the other end
        ws.open(real, mode)  # type: ignore[arg-type]


def test_saved_outputs_read_back_are_named_as_the_model_names_them_and_only_the_agents_own(
    tmp_path: Path,
) -> None:
    """In a worktree the saved outputs are in the workspace's state directory, outside the root."""
    repo, worktree = tmp_path / "repo", tmp_path / "repo" / ".toka" / "worktrees" / "run-1" / "reader"
    worktree.mkdir(parents=True)
    state = repo / STATE_DIR_NAME
    own = state / "outputs" / "run-1" / "reader"
    (own / "1").mkdir(parents=True)
    (own / "1" / "0001.txt").write_text("saved\n")
    (state / "outputs" / "run-1" / "writer" / "1").mkdir(parents=True)
    (state / "outputs" / "run-1" / "writer" / "1" / "0001.txt").write_text("not yours\n")
    (state / "outputs" / "run-0" / "reader" / "1").mkdir(parents=True)
    (state / "outputs" / "run-0" / "reader" / "1" / "0001.txt").write_text("an earlier run's\n")
    ws = Workspace(worktree, state_dir=state, outputs=own)
    real = ws.resolve(".toka/outputs/run-1/reader/1/0001.txt", kind="file")
    assert ws.relative(real) == ".toka/outputs/run-1/reader/1/0001.txt"
    with ws.open(real, "rb") as f:
        assert f.read() == b"saved\n"
    for other in ("run-1/writer/1/0001.txt", "run-0/reader/1/0001.txt", "run-1/reader/../writer/1/0001.txt"):
        with pytest.raises(PathRefused, match="not one of this agent's saved outputs"):
            ws.resolve(f".toka/outputs/{other}", kind="file")


def test_a_file_rewritten_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    """Killed while edit_file rewrote a 6 MB file, the runtime left it empty (truncated in place,
    then written): the task, resumed, committed the emptied file as done."""
    root = tmp_path / "ws"
    root.mkdir()
    ledger = root / "ledger.txt"
    ledger.write_text("entry\n" * 1000)
    ledger.chmod(0o640)
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pathlib import Path
from toka.workspace import Workspace
ws = Workspace(Path({str(root)!r}))
with ws.open(ws.resolve("ledger.txt"), "wb") as f:
    f.write(b"new" * 1000)
    print("writing", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
    writer.kill()
    writer.wait()
    assert ledger.read_text() == "entry\n" * 1000  # the old text, whole
    assert sorted(p.name for p in root.iterdir()) == ["ledger.txt"]  # and nothing half-written beside it
    ws = Workspace(root)
    with ws.open(ws.resolve("ledger.txt"), "wb") as f:
        f.write(b"new\n")
    assert ledger.read_text() == "new\n" and stat.S_IMODE(ledger.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError), ws.open(ws.resolve("ledger.txt"), "wb") as f:
        f.write(b"half")
        raise RuntimeError("the write failed midway")
    assert ledger.read_text() == "new\n" and sorted(p.name for p in root.iterdir()) == ["ledger.txt"]


def test_a_replaced_file_keeps_its_owner_loses_set_id_bits_and_any_name_fits(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    ws = Workspace(root)
    tool = root / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o4755)
    if os.geteuid() == 0:
        os.chown(tool, 1000, 1000)
    with ws.open(ws.resolve("tool"), "wb") as f:
        f.write(b"#!/bin/sh\necho agent\n")
    info = tool.stat()
    assert stat.S_IMODE(info.st_mode) == 0o755  # a set-uid file rewritten by an agent is no set-uid file
    if os.geteuid() == 0:
        assert (info.st_uid, info.st_gid) == (1000, 1000)  # not handed to the runtime's user
    long_name = "n" * 250  # the temporary name beside it must fit too
    with ws.open(ws.resolve_for_write(long_name), "wb") as f:
        f.write(b"long\n")
    assert (root / long_name).read_text() == "long\n"
    with pytest.raises(RuntimeError), ws.open(ws.resolve_for_write("new.txt"), "wb") as f:
        f.write(b"half")
        raise RuntimeError("the write failed midway")
    assert not (root / "new.txt").exists()  # a new file appears whole or not at all
    assert sorted(p.name for p in root.iterdir()) == sorted(["tool", long_name])
