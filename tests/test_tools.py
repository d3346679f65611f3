"""The read-only tools and the toolbox, as the model sees them: outputs, refusals and errors."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from toka.capabilities import CAPABILITY_TOOLS, capability_status, grant_tools
from toka.errors import ToolError, ToolTimeoutError
from toka.tools import (
    ListDir,
    ReadFile,
    SearchFiles,
    Tool,
    ToolCall,
    ToolContext,
    ToolOutput,
    Toolbox,
    read_only_tools,
)
from toka.workspace import Workspace

#: Before Python 3.13, Path.resolve() raises RuntimeError on a symlink loop.

NOTES = "".join(f"note {i}\n" for i in range(1, 11))  # 10 lines
BIG_LINE = "y" * 99  # 100 bytes a line with its newline
BIG_LINES = 1000  # 100 000 bytes: past the 64 000-character cap, below the read buffer


@pytest.fixture
def root(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "secret.txt").write_text("outside the workspace\n")
    files = {
        "README.md": "# Demo\nTODO: write docs\n",
        "notes.txt": NOTES,
        "src/app.py": "# TODO refactor\ndef main():\n    return 42\n",
        "src/util.py": "def helper():\n    return 'todo'  # not matched: lower case\n",
        "src/pkg/__init__.py": "",
        "src/pkg/deep.py": "TODO = 1\n",
        "src/trace.log": "TODO ignored log\n",
        "tests/test_app.py": "def test_main():\n    assert True  # TODO\n",
        ".gitignore": "build/\n*.log\n",
        ".git/config": "[core]\n\tTODO = hidden\n",
        "build/out.txt": "TODO built output\n",
        "debug.log": "TODO debug\n",
        ".toka/state.json": '{"TODO": "state"}\n',
        "big.txt": "".join(f"{BIG_LINE}\n" for _ in range(BIG_LINES)),
    }
    for name, content in files.items():
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (ws / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00TODO\x00binary")
    return ws


@pytest.fixture
def toolbox(root: Path) -> Toolbox:
    return Toolbox(read_only_tools(), ToolContext(workspace=Workspace(root)))


def call(toolbox: Toolbox, name: str, **args: Any) -> ToolOutput:
    return asyncio.run(toolbox.call(name, args))


def entry(root: Path, rel: str, depth: int = 1) -> str:
    """A list_dir line for a file: indent, workspace path and its real size."""
    return f"{'  ' * (depth - 1)}{rel}  ({(root / rel).stat().st_size} bytes)"


def body(output: ToolOutput) -> list[str]:
    """The output's lines after the header."""
    return output.text.splitlines()[1:]


# -- read_file -------------------------------------------------------------------------


class TestReadFile:
    def test_whole_file_is_numbered_with_a_header(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "read_file", path="notes.txt")
        assert not out.is_error
        lines = out.text.splitlines()
        assert lines[0] == "notes.txt: lines 1-10 of 10"
        assert lines[1] == "    1  note 1"
        assert lines[-1] == "   10  note 10"
        assert len(lines) == 11

    def test_a_line_range(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "read_file", path="notes.txt", start_line=3, end_line=5)
        assert out.text == "notes.txt: lines 3-5 of 10\n    3  note 3\n    4  note 4\n    5  note 5"

    def test_end_beyond_the_file_stops_at_its_last_line(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "read_file", path="notes.txt", start_line=9, end_line=500)
        assert out.text.splitlines() == ["notes.txt: lines 9-10 of 10", "    9  note 9", "   10  note 10"]

    def test_start_beyond_the_end_says_so(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "read_file", path="notes.txt", start_line=11)
        assert out.text == "notes.txt: has 10 lines; nothing at line 11"
        assert not out.is_error

    def test_output_is_capped_with_a_marker_telling_where_to_go_on(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "read_file", path="big.txt")
        lines = out.text.splitlines()
        assert lines[0] == f"big.txt: lines 1-{BIG_LINES} of {BIG_LINES}"
        marker = re.fullmatch(r"\[cut at 64000 characters; read on from line (\d+)\]", lines[-1])
        assert marker, lines[-1]
        next_line = int(marker.group(1))
        shown = lines[1:-1]
        assert len(shown) == next_line - 1
        assert shown[-1] == f"{next_line - 1:>5}  {BIG_LINE}"
        assert sum(len(line) + 1 for line in shown) <= 64_000
        # going on from the marker's line gives the rest
        rest = call(toolbox, "read_file", path="big.txt", start_line=next_line)
        assert rest.text.splitlines()[1] == f"{next_line:>5}  {BIG_LINE}"
        assert rest.text.splitlines()[-1] == f"{BIG_LINES:>5}  {BIG_LINE}"
        assert "[cut at" not in rest.text

    def test_a_line_longer_than_a_read_is_shown_in_part_and_the_reading_goes_on_after_it(
        self, root: Path, toolbox: Toolbox
    ) -> None:
        """Minified code, a one-line saved output: "read on from line 1" pointed at the same line forever."""
        (root / "app.min.js").write_text("x" * 200_000 + "\nsecond\nthird\n")
        lines = call(toolbox, "read_file", path="app.min.js").text.splitlines()
        assert lines[1] == "    1  " + "x" * 63_993
        assert lines[2].startswith("[line 1 is 200000 characters long: its first 63993 are shown")
        assert lines[3] == "[cut at 64000 characters; read on from line 2]"
        rest = call(toolbox, "read_file", path="app.min.js", start_line=2).text.splitlines()
        assert rest[1:] == ["    2  second", "    3  third"]

    def test_a_gigabyte_without_a_line_break_costs_the_runtime_no_gigabyte(self, root: Path, toolbox: Toolbox) -> None:
        """A sparse file costs a command nothing to make; read whole, one line of it took 4 GB of the
        runtime's memory (no agent limit bounds the runtime), and edit_file 2 GB."""
        size = 1 << 30
        with (root / "huge.txt").open("wb") as f:
            f.write(b"x" * 9000)
            f.truncate(size)  # the rest reads as NUL bytes, past the binary probe
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lines = call(toolbox, "read_file", path="huge.txt").text.splitlines()
        assert lines[0] == "huge.txt: lines 1-1 of 1"
        assert lines[2].startswith(f"[line 1 is {size} characters long")
        writer = Toolbox(grant_tools(["filesystem-write"])[0], ToolContext(workspace=Workspace(root)))
        edited = call(writer, "edit_file", path="huge.txt", old_text="xx", new_text="y")
        assert edited.is_error and "over the 8000000-byte limit of a file edit_file changes" in edited.text
        assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 200_000_000

    def test_a_binary_file_is_refused_as_an_error_output(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "read_file", path="image.bin")
        assert out.is_error
        assert out.text == "image.bin is a binary file; it cannot be read as text"
        assert out.files_read == []

    def test_a_directory_is_refused(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "read_file", path="src")
        assert out.is_error
        assert out.text == "refused: 'src' is a directory, not a file"

    @pytest.mark.parametrize(
        ("path", "reason"),
        [
            ("../secret.txt", "resolves outside the workspace"),
            ("src/../../secret.txt", "resolves outside the workspace"),
            ("/etc/passwd", "is absolute"),
            (".git/../.toka/state.json", "state directory"),
            ("missing.txt", "does not exist"),
        ],
    )
    def test_bad_paths_are_refused_without_failing_the_call(
        self, toolbox: Toolbox, path: str, reason: str
    ) -> None:
        out = call(toolbox, "read_file", path=path)
        assert out.is_error
        assert out.text.startswith("refused: ")
        assert reason in out.text
        assert "outside the workspace\n" not in out.text  # the secret's content
        assert out.files_read == []

    def test_files_read_are_recorded_as_workspace_paths(self, toolbox: Toolbox) -> None:
        assert call(toolbox, "read_file", path="./src/app.py").files_read == ["src/app.py"]
        assert call(toolbox, "read_file", path="src/pkg/../app.py", end_line=1).files_read == ["src/app.py"]

    def test_an_empty_file(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "read_file", path="src/pkg/__init__.py")
        assert out.text == "src/pkg/__init__.py: has 0 lines; nothing at line 1"
        assert out.files_read == ["src/pkg/__init__.py"]

    def test_line_numbers_are_the_files_newline_lines(self, root: Path, toolbox: Toolbox) -> None:
        # a form feed line (allowed by PEP 8) and a U+2028 inside a string literal
        (root / "mod.py").write_text('import os\n\x0c\ndef f():\n    return "a\u2028b"\nTARGET = 1\n')
        out = call(toolbox, "read_file", path="mod.py")
        assert out.text.splitlines()[0] == "mod.py: lines 1-5 of 5"
        assert "    5  TARGET = 1" in out.text

    def test_lines_beyond_the_read_buffer_are_reachable(self, root: Path, toolbox: Toolbox) -> None:
        (root / "huge.txt").write_text("".join(f"{i:06d} {'z' * 93}\n" for i in range(1, 5001)))
        head = call(toolbox, "read_file", path="huge.txt", end_line=1)
        assert head.text.splitlines()[0] == "huge.txt: lines 1-1 of 5000"
        out = call(toolbox, "read_file", path="huge.txt", start_line=4000, end_line=4000)
        assert out.text.splitlines()[1:] == [f" 4000  004000 {'z' * 93}"]


# -- list_dir -----------------------------------------------------------------------------


class TestListDir:
    def test_root_listing_is_sorted_with_sizes_and_skips_vcs_ignored_and_state(
        self, root: Path, toolbox: Toolbox
    ) -> None:
        out = call(toolbox, "list_dir")
        assert not out.is_error
        assert body(out) == [
            entry(root, ".gitignore"),
            entry(root, "README.md"),
            entry(root, "big.txt"),
            entry(root, "image.bin"),
            entry(root, "notes.txt"),
            "src/",
            "tests/",
        ]
        assert out.text.splitlines()[0] == "./: 7 entries"
        assert f"big.txt  ({BIG_LINES * 100} bytes)" in body(out)
        assert "image.bin  (21 bytes)" in body(out)
        for hidden in (".git/", ".toka", "build", "debug.log"):
            assert hidden not in out.text

    def test_depth_is_respected(self, root: Path, toolbox: Toolbox) -> None:
        one = body(call(toolbox, "list_dir", path="src", depth=1))
        assert one == [entry(root, "src/app.py"), "src/pkg/", entry(root, "src/util.py")]
        two = body(call(toolbox, "list_dir", path="src", depth=2))
        assert two == [
            entry(root, "src/app.py"),
            "src/pkg/",
            entry(root, "src/pkg/__init__.py", 2),
            entry(root, "src/pkg/deep.py", 2),
            entry(root, "src/util.py"),
        ]
        assert "src/trace.log" not in "\n".join(two)  # ignored by '*.log' anywhere

    def test_root_depth_two_lists_nested_entries_indented(self, root: Path, toolbox: Toolbox) -> None:
        out = call(toolbox, "list_dir", depth=2)
        assert entry(root, "src/app.py", 2) in body(out)
        assert entry(root, "tests/test_app.py", 2) in body(out)
        assert entry(root, "src/pkg/deep.py", 3) not in body(out)
        assert all(".git/" not in line and "build/" not in line for line in body(out))

    def test_a_file_is_refused(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "list_dir", path="README.md")
        assert out.is_error
        assert out.text == "refused: 'README.md' is a file, not a directory"

    def test_listing_the_state_dir_or_outside_is_refused(self, toolbox: Toolbox) -> None:
        assert call(toolbox, "list_dir", path=".toka").text.startswith("refused: ")
        assert call(toolbox, "list_dir", path="..").text == "refused: '..' resolves outside the workspace"

    def test_depth_above_four_is_invalid_input(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "list_dir", depth=5)
        assert out.is_error
        assert out.text == "invalid input for list_dir: depth: Input should be less than or equal to 4"

    def test_a_symlinked_dir_is_listed_but_not_entered(self, root: Path, toolbox: Toolbox) -> None:
        (root / "alias").symlink_to(root / "src", target_is_directory=True)
        lines = body(call(toolbox, "list_dir", depth=3))
        assert "alias/" in lines
        assert not any(line.strip().startswith("alias/") and line.strip() != "alias/" for line in lines)

    def test_a_symlink_loop_terminates_and_does_not_repeat(self, root: Path, toolbox: Toolbox) -> None:
        (root / "loop").symlink_to(".")
        out = call(toolbox, "list_dir", depth=4)
        lines = body(out)
        assert lines.count("loop/") == 1
        assert not any("loop/loop" in line or line.strip().startswith("loop/") and line != "loop/"
                       for line in lines)
        stripped = [line.strip() for line in lines]
        assert len(stripped) == len(set(stripped))  # nothing listed twice
        assert entry(root, "src/pkg/deep.py", 3) in lines  # the real tree is still walked to depth 3

    def test_a_symlink_pointing_outside_is_not_listed(self, root: Path, toolbox: Toolbox) -> None:
        (root / "escape").symlink_to(root.parent / "secret.txt")
        (root / "escape-dir").symlink_to(root.parent, target_is_directory=True)
        text = call(toolbox, "list_dir", depth=2).text
        assert "escape" not in text

    def test_the_listing_stops_at_its_limit(self, root: Path) -> None:
        tool = ListDir()
        tool.limit = 3  # type: ignore[misc]
        box = Toolbox([tool], ToolContext(workspace=Workspace(root)))
        lines = body(call(box, "list_dir"))
        assert lines == [entry(root, ".gitignore"), entry(root, "README.md"),
                         entry(root, "big.txt"), "[stopped after 3 entries]"]

    def test_the_header_of_a_capped_listing_counts_entries_only(self, root: Path) -> None:
        tool = ListDir()
        tool.limit = 3  # type: ignore[misc]
        box = Toolbox([tool], ToolContext(workspace=Workspace(root)))
        assert call(box, "list_dir").text.splitlines()[0] == "./: 3 entries"

    def test_a_dangling_symlink_cycle_does_not_break_the_listing(self, root: Path, toolbox: Toolbox) -> None:
        (root / "a").symlink_to("b")
        (root / "b").symlink_to("a")
        out = call(toolbox, "list_dir")
        assert entry(root, "README.md") in body(out)


# -- search_files -------------------------------------------------------------------------


class TestSearchFiles:
    def test_a_big_file_is_searched_and_one_over_the_limit_is_named(
        self, root: Path, toolbox: Toolbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Files over a megabyte were skipped without a word: "0 matches" read as "not there"."""
        (root / "data").mkdir()
        (root / "data" / "big.txt").write_text("noise\n" * 230_000 + "the needle\n")  # 1.4 MB
        out = call(toolbox, "search_files", pattern="needle", path="data")
        assert out.text.splitlines() == ["1 matches for 'needle' in 1 files", "data/big.txt:230001: the needle"]
        monkeypatch.setattr(SearchFiles, "file_size_limit", 1_000_000)
        out = call(toolbox, "search_files", pattern="needle", path="data")
        assert out.text.splitlines() == ["0 matches for 'needle' in 0 files", "[not searched, over 1 MB: data/big.txt]"]

    def test_matches_are_path_line_text_and_skip_vcs_ignored_binary_and_state(
        self, toolbox: Toolbox
    ) -> None:
        out = call(toolbox, "search_files", pattern="TODO")
        assert not out.is_error
        assert body(out) == [
            "README.md:2: TODO: write docs",
            "src/app.py:1: # TODO refactor",
            "src/pkg/deep.py:1: TODO = 1",
            "tests/test_app.py:2:     assert True  # TODO",
        ]
        header = out.text.splitlines()[0]
        assert header.startswith("4 matches for 'TODO' in ")
        for hidden in (".git/", "build/", "debug.log", "trace.log", "image.bin", ".toka"):
            assert hidden not in out.text

    def test_regex_syntax(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "search_files", pattern=r"^def \w+\(\):$")
        assert body(out) == ["src/app.py:2: def main():", "src/util.py:1: def helper():",
                             "tests/test_app.py:1: def test_main():"]

    def test_no_match(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "search_files", pattern="no such text anywhere")
        assert out.text.startswith("0 matches for 'no such text anywhere' in ")
        assert body(out) == []
        assert not out.is_error

    def test_an_invalid_regex_is_an_error_output(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "search_files", pattern="(unclosed")
        assert out.is_error
        assert out.text.startswith("invalid regular expression '(unclosed': missing )")

    def test_glob_filters_file_names(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "search_files", pattern="TODO", glob="*.py")
        assert body(out) == [
            "src/app.py:1: # TODO refactor",
            "src/pkg/deep.py:1: TODO = 1",
            "tests/test_app.py:2:     assert True  # TODO",
        ]
        assert out.text.splitlines()[0] == "3 matches for 'TODO' in 5 files"

    def test_path_limits_the_search(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "search_files", pattern="TODO", path="src/pkg")
        assert body(out) == ["src/pkg/deep.py:1: TODO = 1"]

    def test_max_results_caps_with_a_marker(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "search_files", pattern="note", max_results=3)
        assert body(out) == ["notes.txt:1: note 1", "notes.txt:2: note 2", "notes.txt:3: note 3",
                             "[stopped after 3 matches]"]

    def test_the_header_of_a_capped_search_counts_matches_only(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "search_files", pattern="note", max_results=3)
        assert out.text.splitlines()[0].startswith("3 matches for 'note'")

    def test_line_numbers_match_the_files_newline_lines(self, root: Path, toolbox: Toolbox) -> None:
        (root / "mod.py").write_text('import os\n\x0c\ndef f():\n    return "a\u2028b"\nTARGET = 1\n')
        assert body(call(toolbox, "search_files", pattern="TARGET", glob="mod.py")) == ["mod.py:5: TARGET = 1"]

    def test_searching_outside_is_refused(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "search_files", pattern="secret", path="..")
        assert out.is_error
        assert out.text == "refused: '..' resolves outside the workspace"

    def test_a_symlinked_file_pointing_outside_is_not_searched(self, root: Path, toolbox: Toolbox) -> None:
        (root / "escape.txt").symlink_to(root.parent / "secret.txt")
        assert body(call(toolbox, "search_files", pattern="outside")) == []


# -- the toolbox -----------------------------------------------------------------------------


class Slow(Tool):
    name = "slow"
    description = "Times out."

    class Input(BaseModel):
        pass

    async def run(self, args: Any, ctx: ToolContext) -> ToolOutput:
        raise ToolTimeoutError("slow ran past its 1s timeout")


class Broken(Tool):
    name = "broken"
    description = "Fails."

    class Input(BaseModel):
        kind: str

    async def run(self, args: Any, ctx: ToolContext) -> ToolOutput:
        if args.kind == "tool":
            raise ToolError("cannot run here")
        if args.kind == "defect":
            raise ValueError("a defect of the tool's own")
        raise PermissionError(13, "Permission denied")


class TestToolbox:
    def test_an_unknown_tool_is_refused_naming_the_available_ones(self, toolbox: Toolbox) -> None:
        out = call(toolbox, "write_file", path="x", content="y")
        assert out.is_error
        assert out.text == (
            "refused: there is no tool named 'write_file'; available: read_file, list_dir, search_files"
        )

    def test_an_empty_toolbox_says_none_are_available(self, root: Path) -> None:
        box = Toolbox([], ToolContext(workspace=Workspace(root)))
        assert call(box, "nope").text == "refused: there is no tool named 'nope'; available: none"

    def test_a_withheld_tool_is_refused_with_the_reason(self, root: Path) -> None:
        granted, withheld = grant_tools([])
        assert granted == []
        box = Toolbox(granted, ToolContext(workspace=Workspace(root)), withheld=withheld)
        out = call(box, "read_file", path="README.md")
        assert out.is_error
        assert out.text == (
            "refused: read_file needs one of the capabilities 'filesystem-read', 'file-system-read', which this "
            "agent's spec does not declare in security.capabilities_required"
        )
        assert "filesystem-read" in call(box, "search_files", pattern="x").text
        assert box.calls == [ToolCall("read_file", refused=True, is_error=True),
                             ToolCall("search_files", refused=True, is_error=True)]

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            ({"path": 3}, "invalid input for read_file: path: Input should be a valid string"),
            ({"path": "README.md", "bogus": 1}, "invalid input for read_file: bogus: Extra inputs are not permitted"),
            ({}, "invalid input for read_file: path: Field required"),
            ({"path": "README.md", "start_line": 0},
             "invalid input for read_file: start_line: Input should be greater than or equal to 1"),
        ],
    )
    def test_invalid_input_is_an_error_output(self, toolbox: Toolbox, args: dict[str, Any], message: str) -> None:
        out = asyncio.run(toolbox.call("read_file", args))
        assert out.is_error
        assert out.text == message
        assert toolbox.calls == [ToolCall("read_file", refused=False, is_error=True)]

    def test_calls_record_refused_and_ok(self, toolbox: Toolbox) -> None:
        call(toolbox, "read_file", path="README.md")
        call(toolbox, "read_file", path="../secret.txt")
        call(toolbox, "nope")
        call(toolbox, "read_file", path="image.bin")
        call(toolbox, "list_dir", depth=9)
        call(toolbox, "search_files", pattern="TODO")
        assert toolbox.calls == [
            ToolCall("read_file", refused=False, is_error=False),
            ToolCall("read_file", refused=True, is_error=True),
            ToolCall("nope", refused=True, is_error=True),
            ToolCall("read_file", refused=False, is_error=True),
            ToolCall("list_dir", refused=False, is_error=True),
            ToolCall("search_files", refused=False, is_error=False),
        ]
        assert sum(c.refused for c in toolbox.calls) == 2

    def test_definitions_have_stable_names_and_json_schemas(self, toolbox: Toolbox) -> None:
        defs = toolbox.definitions()
        assert [d.name for d in defs] == ["read_file", "list_dir", "search_files"]
        assert toolbox.names == ["read_file", "list_dir", "search_files"]
        by_name = {d.name: d for d in defs}
        read = by_name["read_file"].input_schema
        assert read["type"] == "object"
        assert read["required"] == ["path"]
        assert set(read["properties"]) == {"path", "start_line", "end_line"}
        assert read["additionalProperties"] is False
        assert "title" not in read
        assert read["properties"]["start_line"]["minimum"] == 1
        assert set(by_name["list_dir"].input_schema["properties"]) == {"path", "depth"}
        assert by_name["list_dir"].input_schema["properties"]["depth"]["maximum"] == 4
        assert by_name["search_files"].input_schema["required"] == ["pattern"]
        assert set(by_name["search_files"].input_schema["properties"]) == {"pattern", "path", "glob", "max_results"}
        assert "64000 characters" in by_name["read_file"].description
        for d in defs:
            assert d.description

    def test_a_tool_timeout_is_not_swallowed(self, root: Path) -> None:
        box = Toolbox([Slow()], ToolContext(workspace=Workspace(root)))
        with pytest.raises(ToolTimeoutError, match="ran past its 1s timeout"):
            call(box, "slow")

    def test_tool_errors_and_os_errors_become_error_outputs(self, root: Path) -> None:
        box = Toolbox([Broken()], ToolContext(workspace=Workspace(root)))
        assert call(box, "broken", kind="tool").text == "refused: cannot run here"
        assert call(box, "broken", kind="os").text == "broken failed: Permission denied"
        assert box.calls == [ToolCall("broken", refused=True, is_error=True),
                             ToolCall("broken", refused=False, is_error=True)]

    def test_a_tools_own_defect_fails_the_call_and_is_audited_all_the_same(self, root: Path) -> None:
        from toka.audit import AuditLog, audit_path, read_audit

        workspace = Workspace(root)
        audit = AuditLog(audit_path(workspace.state_dir, "run-1"), run="run-1")
        box = Toolbox([Broken()], ToolContext(workspace=workspace, agent="a", task=1, audit=audit))
        with pytest.raises(ValueError, match="a defect of the tool's own"):
            call(box, "broken", kind="defect")
        [record] = read_audit(workspace.state_dir, run="run-1")
        assert record["tool"] == "broken" and record["is_error"] and record["decision"] == "allowed"
        assert record["reason"] == "broken failed: ValueError: a defect of the tool's own"
        assert box.calls == [ToolCall("broken", refused=False, is_error=True)]

    def test_a_saved_output_read_back_from_a_worktree_is_read_and_audited(self, tmp_path: Path) -> None:
        """In a worktree (the default), saved outputs are outside the root: reading one back failed the task."""
        from toka.audit import AuditLog, audit_path, read_audit

        state = tmp_path / "repo" / ".toka"
        tree = state / "worktrees" / "run-1" / "reader"
        tree.mkdir(parents=True)
        saved = state / "outputs" / "run-1" / "reader" / "1"
        saved.mkdir(parents=True)
        (saved / "0001.txt").write_text("line one\nline two\n")
        workspace = Workspace(tree, state_dir=state, outputs=state / "outputs" / "run-1" / "reader")
        audit = AuditLog(audit_path(state, "run-1"), run="run-1")
        box = Toolbox(read_only_tools(), ToolContext(workspace=workspace, agent="reader", task=1, audit=audit))
        out = call(box, "read_file", path=".toka/outputs/run-1/reader/1/0001.txt", start_line=2)
        assert not out.is_error and out.text.splitlines() == [
            ".toka/outputs/run-1/reader/1/0001.txt: lines 2-2 of 2", "    2  line two"]
        assert out.files_read == [".toka/outputs/run-1/reader/1/0001.txt"]
        [record] = read_audit(state, run="run-1")
        assert record["tool"] == "read_file" and record["decision"] == "allowed" and not record["is_error"]

    def test_a_symlink_loop_path_is_refused_not_raised(self, root: Path, toolbox: Toolbox) -> None:
        (root / "loop.txt").symlink_to("loop.txt")
        out = call(toolbox, "read_file", path="loop.txt")
        assert out.is_error and out.text.startswith("refused: ")


# -- capabilities ----------------------------------------------------------------------------


def test_filesystem_read_grants_exactly_the_three_read_tools() -> None:
    granted, withheld = grant_tools(["filesystem-read"])
    assert [t.name for t in granted] == ["read_file", "list_dir", "search_files"]
    assert [type(t) for t in granted] == [ReadFile, ListDir, SearchFiles]
    assert set(withheld) == {"write_file", "edit_file", "run_command"}
    assert CAPABILITY_TOOLS["filesystem-read"] == ("read_file", "list_dir", "search_files")


def test_each_capability_grants_its_tools() -> None:
    def names(*caps: str) -> list[str]:
        return [t.name for t in grant_tools(caps)[0]]

    assert names("filesystem-write") == names("file-system-write") == ["write_file", "edit_file"]
    for cap in ("cargo-execution", "cargo-test-execution", "git-access", "script-execution",
                "database-access", "python-test-execution"):
        assert names(cap) == ["run_command"], cap
    assert names("ci-integration", "kernel-modification") == []


def test_capability_status() -> None:
    assert capability_status("ci-integration") == "declared, not tool-backed"
    assert capability_status("filesystem-read") == "tool-backed: read_file, list_dir, search_files"
    assert capability_status("cargo-test-execution") == "tool-backed: run_command (cargo test)"
    assert capability_status("network-access").startswith("tool-backed: run_command may reach the network")


def test_an_added_tool_needs_its_own_well_formed_name() -> None:
    from toka.capabilities import changes_files, use_tools
    from toka.tools import ReadFile

    def tool(name: str, capability: str = "lookup-access") -> ReadFile:
        made = ReadFile()
        made.name, made.capability = name, capability  # type: ignore[misc]
        return made

    # A tool called read_file would answer the model's read_file calls, unchecked, audited as read_file.
    for taken in ("read_file", "submit_result", "run_command"):
        with pytest.raises(TypeError, match=f"tool name '{taken}' is taken"):
            with use_tools(tool(taken)):
                pass
    with pytest.raises(TypeError, match="'lookup' is taken"):
        with use_tools(tool("lookup"), tool("lookup", "other-access")):
            pass
    with pytest.raises(TypeError, match="1-64 letters, digits"):
        with use_tools(tool("bad name/with spaces\n")):
            pass
    with pytest.raises(TypeError, match="must name the capability"):
        with use_tools(tool("lookup", "")):
            pass
    with use_tools(tool("lookup")):
        assert changes_files(["lookup-access"])


def test_a_file_name_that_is_not_utf8_reaches_the_model_and_the_audit_trail_as_text(root: Path) -> None:
    import json

    from toka.audit import AuditLog

    with open(os.fsencode(root) + b"/caf\xe9.txt", "w") as f:  # as a command may make it
        f.write("TODO: latin\n")
    audit = AuditLog(root / ".toka" / "audit" / "r.jsonl", run="r")
    box = Toolbox(read_only_tools(), ToolContext(workspace=Workspace(root), agent="a", task=1, audit=audit))
    for name, args in (("list_dir", {"path": "."}), ("search_files", {"pattern": "latin"})):
        out = asyncio.run(box.call(name, args))
        assert "caf\ufffd.txt" in out.text.encode("utf-8").decode("utf-8"), out.text
    records = [json.loads(line) for line in audit.path.read_text(encoding="utf-8").splitlines()]
    assert [r["tool"] for r in records] == ["list_dir", "search_files"]


@pytest.mark.parametrize(("text", "shown"), [
    ("plain é", "plain é"), ("caf\udce9", "caf\ufffd"), ("caf\udcc3\udca9", "café"), ("x\ud800y", "x?y")])
def test_as_text_turns_what_is_not_utf8_into_replacement_characters(text: str, shown: str) -> None:
    from toka.process import as_text

    assert as_text(text) == shown


def test_a_gitignore_that_is_a_link_is_not_read(toolbox: Toolbox, root: Path, tmp_path: Path) -> None:
    """A command's `ln -s /etc/shadow .gitignore`: the runtime read the host file, as root, and used
    its lines as rules (a file named like one vanished from list_dir: an oracle on any host file);
    one to /proc/kmsg blocked the tool's thread for ever."""
    (tmp_path / "host-file").write_text("README.md\nnotes.txt\n")
    (root / ".gitignore").unlink()
    (root / ".gitignore").symlink_to(tmp_path / "host-file")
    listed = call(toolbox, "list_dir", path=".").text
    assert "README.md" in listed and "notes.txt" in listed
    assert "build/" in listed  # the workspace's own rules are gone with the file: none apply


def test_gitignore_rules_cannot_stall_the_runtime(toolbox: Toolbox, root: Path) -> None:
    """Python's regular expressions backtrack on `a*a*a*...b`, holding the GIL: the event loop, the
    task's timeout and every other agent stopped (12 stars against a 100-character name: years)."""
    (root / ".gitignore").write_text("a*" * 12 + "b\n")
    (root / ("a" * 100)).write_text("x\n")
    started = time.monotonic()
    listed = call(toolbox, "list_dir", path=".").text
    assert "a" * 100 in listed
    found = call(toolbox, "search_files", pattern="x").text
    assert "a" * 100 in found
    assert time.monotonic() - started < 5


def test_an_ignore_rule_that_does_not_compile_is_left_out_not_fatal(toolbox: Toolbox, root: Path) -> None:
    """`[[:alpha:]]` (git takes it; RE2 and pathspec did not) failed every list_dir and search."""
    (root / ".gitignore").write_text("*.log\n[[:alpha:]]\nfoo\\\n" + "a" * 200_000 + "\n")
    listed = call(toolbox, "list_dir", path=".")
    assert not listed.is_error and "README.md" in listed.text and "debug.log" not in listed.text
    assert not call(toolbox, "search_files", pattern="TODO").is_error


def test_a_gitignore_of_thousands_of_odd_rules_neither_fails_nor_floods_the_terminal(
    toolbox: Toolbox, root: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """840 KB of `*a*a*...b` rules: RE2 could not compile the set (list_dir failed) and wrote
    55,000 lines to the runtime's terminal on the way."""
    (root / ".gitignore").write_text("*.log\n" + ("*a" * 20 + "b\n") * 20_000)
    started = time.monotonic()
    listed = call(toolbox, "list_dir", path=".")
    assert not listed.is_error and "README.md" in listed.text and "debug.log" not in listed.text
    assert time.monotonic() - started < 5
    assert capfd.readouterr().err.count("\n") < 10
