"""Escape and abuse cases, each made through ``Toolbox.call`` (the path the model uses).

Every case asserts two things: the call was refused or contained (limits,
kills, no leftover processes), and it left exactly one audit record saying so.
Containment cases use the real mechanisms of this host (cgroups, ``unshare
-n``, ``prlimit``); cases that need one the host lacks are skipped.

Escapes these tests found were fixed; their tests assert the
correct behaviour.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from toka import sandbox as sandbox_module
from toka.audit import AuditLog, read_audit
from toka.capabilities import grant_tools
from toka.commands import scrubbed_env
from toka.errors import ConfigError, SandboxViolation
from toka.policy import AgentPolicy, approval_keys, check_unsandboxed
from toka.sandbox import HostSupport, SandboxRefused, detect_host, plan_limits, run_sandboxed, sandbox_argv
from toka.spec import AgentSpec, ResourceLimits
from toka.tools import ToolContext, ToolOutput, Toolbox
from toka.workspace import Workspace

from .conftest import ROOT, minimal_spec

HOST = detect_host()
MB = 1024 * 1024
AGENT = "tester"
RUN = "test"

needs_cgroups = pytest.mark.skipif(
    not {"memory", "cpu", "cpuacct", "pids"} <= set(HOST.cgroup_root),
    reason="needs memory, cpu, cpuacct and pids cgroups (see `toka doctor`)",
)
needs_netns = pytest.mark.skipif(not HOST.netns, reason="needs network namespaces (unshare -n)")
needs_prlimit = pytest.mark.skipif(not HOST.prlimit, reason="needs prlimit")

FILE_TOOLS = ("filesystem-read", "filesystem-write")


# -- the helper: an agent's toolbox over a tmp workspace, with its audit trail ------------------


@dataclass
class Agent:
    """A Toolbox for one agent; every call goes through ``Toolbox.call`` and must be audited once."""

    root: Path
    toolbox: Toolbox
    audit_file: Path

    @property
    def state_dir(self) -> Path:
        return self.toolbox.ctx.workspace.state_dir

    def call(self, tool: str, **arguments: Any) -> ToolOutput:
        before = len(self.records())
        try:
            return asyncio.run(self.toolbox.call(tool, arguments))
        finally:
            after = self.records()
            assert len(after) == before + 1, f"{tool} left {len(after) - before} audit records, not 1"

    def run(self, *argv: str, **extra: Any) -> ToolOutput:
        return self.call("run_command", argv=list(argv), **extra)

    def records(self) -> list[dict[str, Any]]:
        return list(read_audit(self.state_dir, run=RUN))

    def audited(self, tool: str, decision: str, reason: str | None = None) -> dict[str, Any]:
        """The last audit record, checked: its tool, decision and (a part of) its reason."""
        record = self.records()[-1]
        assert record["tool"] == tool, record
        assert record["decision"] == decision, record
        assert record["agent"] == AGENT and record["run"] == RUN and record["task"] == 1
        if reason is not None:
            assert reason in (record["reason"] or ""), record
        return record

    def script(self, name: str, body: str) -> str:
        """An executable workspace script; returns how to call it (``./name``)."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body).lstrip())
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return f"./{name}"


MakeAgent = Callable[..., Agent]


@pytest.fixture
def make_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MakeAgent:
    """``make_agent(*capabilities, limits=..., sandbox=..., ...)`` -> an :class:`Agent`.

    Commands find this test run's Python first on PATH (``python3`` in a command
    is the venv's interpreter, whatever the caller's PATH holds).
    """
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def make(
        *capabilities: str,
        limits: dict[str, Any] | None = None,
        sandbox: bool = True,
        allow_unsandboxed: bool = False,
        write_paths: tuple[str, ...] = (),
        approvals: tuple[str, ...] = (),
        denials: tuple[str, ...] = (),
        files: dict[str, str] | None = None,
        root: str = "ws",
        state_dir: Path | None = None,
    ) -> Agent:
        ws = tmp_path / root
        ws.mkdir(exist_ok=True)
        for name, content in (files or {}).items():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            (ws / name).write_text(content)
        policy = AgentPolicy(
            capabilities=frozenset(capabilities),
            limits=ResourceLimits.model_validate({"timeout": "30s", **(limits or {})}),
            sandbox=sandbox,
            allow_unsandboxed=allow_unsandboxed,
            write_paths=tuple(write_paths),
            approvals=frozenset(approvals),
            denials=frozenset(denials),
        )
        workspace = Workspace(ws, state_dir=state_dir)
        tools, withheld = grant_tools(capabilities)
        audit = AuditLog(workspace.state_dir / "audit" / f"{RUN}.jsonl", run=RUN)
        ctx = ToolContext(workspace=workspace, agent=AGENT, task=1, policy=policy, audit=audit)
        return Agent(workspace.root, Toolbox(tools, ctx, withheld=withheld), audit.path)

    return make


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the workspace holding a secret file."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text(f"OUTSIDE-SECRET-{uuid.uuid4().hex}\n")
    return folder


@pytest.fixture
def cgroups(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The cgroups the sandbox creates during the test (to check their processes are gone)."""
    made: list[Any] = []
    original = sandbox_module._Cgroups.create

    def create(cls: type, host: HostSupport, limits: ResourceLimits) -> Any:
        group = original(host, limits)
        made.append(group)
        return group

    monkeypatch.setattr(sandbox_module._Cgroups, "create", classmethod(create))
    return made


def marker() -> str:
    return f"toka-test-{uuid.uuid4().hex[:12]}"


def processes_matching(mark: str, wait: float = 2.0) -> list[str]:
    """Processes whose command line holds ``mark``, after waiting up to ``wait`` s for them to go."""
    deadline = time.monotonic() + wait
    while True:
        found = subprocess.run(["pgrep", "-af", mark], capture_output=True, text=True).stdout.splitlines()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_groups_gone(groups: list[Any]) -> None:
    assert groups, "the command ran without a cgroup"
    for group in groups:
        for path in group.dirs.values():
            assert not path.exists(), f"cgroup {path} was left behind"


# -- 1-4: paths out of the workspace through the file tools ---------------------------------------


class TestFileToolEscapes:
    @pytest.mark.parametrize(
        ("tool", "args"),
        [
            ("read_file", {"path": "../../etc/passwd"}),
            ("read_file", {"path": "../outside/secret.txt"}),
            ("write_file", {"path": "../../etc/toka-pwned", "content": "x"}),
            ("write_file", {"path": "../outside/new.txt", "content": "x"}),
            ("write_file", {"path": "sub/../../outside/new.txt", "content": "x"}),
            ("edit_file", {"path": "../outside/secret.txt", "old_text": "OUTSIDE", "new_text": "PWNED"}),
            ("list_dir", {"path": ".."}),
            ("search_files", {"pattern": "OUTSIDE", "path": "../outside"}),
        ],
    )
    def test_parent_traversal_is_refused_and_audited(
        self, make_agent: MakeAgent, outside: Path, tool: str, args: dict[str, Any]
    ) -> None:
        secret = (outside / "secret.txt").read_text()
        agent = make_agent(*FILE_TOOLS)
        out = agent.call(tool, **args)
        assert out.is_error and "resolves outside the workspace" in out.text
        record = agent.audited(tool, "refused", "resolves outside the workspace")
        assert record["arguments"] == args and record["files_changed"] == []
        assert secret not in out.text
        assert (outside / "secret.txt").read_text() == secret
        assert not (outside / "new.txt").exists() and not Path("/etc/toka-pwned").exists()

    @pytest.mark.parametrize(
        ("tool", "args"),
        [
            ("read_file", {"path": "/etc/passwd"}),
            ("read_file", {"path": "/proc/self/environ"}),
            ("read_file", {"path": "~/.bashrc"}),
            ("write_file", {"path": "/etc/toka-pwned", "content": "x"}),
            ("write_file", {"path": "/proc/self/environ", "content": "x"}),
            ("edit_file", {"path": "/etc/passwd", "old_text": "root", "new_text": "toor"}),
            ("list_dir", {"path": "/etc"}),
            ("search_files", {"pattern": "root", "path": "/etc"}),
        ],
    )
    def test_absolute_paths_are_refused_and_audited(
        self, make_agent: MakeAgent, tool: str, args: dict[str, Any]
    ) -> None:
        agent = make_agent(*FILE_TOOLS)
        out = agent.call(tool, **args)
        assert out.is_error and "is absolute; use a path relative to the workspace root" in out.text
        agent.audited(tool, "refused", "is absolute")
        assert "root:x:0:0" not in out.text and not Path("/etc/toka-pwned").exists()

    def test_proc_self_environ_through_a_symlink_is_refused(self, make_agent: MakeAgent) -> None:
        agent = make_agent(*FILE_TOOLS)
        (agent.root / "environ").symlink_to("/proc/self/environ")
        out = agent.call("read_file", path="environ")
        assert out.is_error
        agent.audited("read_file", "refused", "resolves outside the workspace")
        assert "PATH=" not in out.text

    def test_symlinked_directory_pointing_out_cannot_be_read_or_written_through(
        self, make_agent: MakeAgent, outside: Path
    ) -> None:
        secret = (outside / "secret.txt").read_text()
        agent = make_agent(*FILE_TOOLS)
        (agent.root / "link").symlink_to(outside)

        out = agent.call("read_file", path="link/secret.txt")
        assert out.is_error and secret not in out.text
        agent.audited("read_file", "refused", "'link/secret.txt' resolves outside the workspace")

        out = agent.call("write_file", path="link/planted.txt", content="planted")
        assert out.is_error
        agent.audited("write_file", "refused", "resolves outside the workspace")
        assert not (outside / "planted.txt").exists()

        out = agent.call("edit_file", path="link/secret.txt", old_text="OUTSIDE", new_text="PWNED")
        assert out.is_error
        agent.audited("edit_file", "refused", "resolves outside the workspace")
        assert (outside / "secret.txt").read_text() == secret

        out = agent.call("search_files", pattern="OUTSIDE")  # the walk skips the link, no refusal
        assert secret.strip() not in out.text and out.text.startswith("0 matches")
        agent.audited("search_files", "allowed")

    def test_symlinked_file_pointing_out_cannot_be_overwritten(self, make_agent: MakeAgent, outside: Path) -> None:
        secret = (outside / "secret.txt").read_text()
        agent = make_agent(*FILE_TOOLS)
        (agent.root / "notes.txt").symlink_to(outside / "secret.txt")
        out = agent.call("write_file", path="notes.txt", content="overwritten")
        assert out.is_error
        agent.audited("write_file", "refused", "'notes.txt' resolves outside the workspace")
        assert (outside / "secret.txt").read_text() == secret

    def test_a_hard_link_to_a_file_outside_is_read_but_not_written(self, make_agent: MakeAgent, outside: Path) -> None:
        """A hard link the person made (the sandbox's mounts keep commands from making one): writing
        through it would change the file outside too."""
        secret = (outside / "secret.txt").read_text()
        agent = make_agent(*FILE_TOOLS)
        try:
            os.link(outside / "secret.txt", agent.root / "linked.txt")
        except OSError as e:
            pytest.skip(f"no hard link across these directories: {e}")
        assert secret.strip() in agent.call("read_file", path="linked.txt").text
        for tool, args in (("write_file", {"content": "overwritten"}),
                           ("edit_file", {"old_text": "OUTSIDE", "new_text": "PWNED"})):
            out = agent.call(tool, path="linked.txt", **args)
            assert out.is_error
            agent.audited(tool, "refused", "'linked.txt' has 2 names (hard links)")
            assert (outside / "secret.txt").read_text() == secret
        assert not agent.call("write_file", path="fresh.txt", content="new\n").is_error  # one name: written

    @pytest.mark.parametrize(
        ("tool", "args"),
        [
            ("write_file", {"path": f".toka/audit/{RUN}.jsonl", "content": "{}\n"}),
            ("read_file", {"path": f".toka/audit/{RUN}.jsonl"}),
            ("edit_file", {"path": f".toka/audit/{RUN}.jsonl", "old_text": "refused", "new_text": "allowed"}),
        ],
    )
    def test_the_audit_trail_cannot_be_read_or_tampered_with(
        self, make_agent: MakeAgent, tool: str, args: dict[str, Any]
    ) -> None:
        agent = make_agent(*FILE_TOOLS)
        agent.call("read_file", path="../nope")  # something refused in the trail
        before = agent.audit_file.read_text()
        out = agent.call(tool, **args)
        assert out.is_error and "inside toka's own state directory" in out.text
        agent.audited(tool, "refused", "state directory")
        assert agent.audit_file.read_text().startswith(before)

    def test_a_tool_the_capabilities_do_not_grant_is_refused(self, make_agent: MakeAgent) -> None:
        agent = make_agent("filesystem-read")
        out = agent.call("write_file", path="x.txt", content="x")
        assert out.is_error and "write_file needs one of the capabilities" in out.text
        agent.audited("write_file", "refused", "filesystem-write")
        out = agent.run("git", "status")
        assert out.is_error
        agent.audited("run_command", "refused", "run_command needs one of the capabilities")
        assert not (agent.root / "x.txt").exists()


# -- 17, 18: write paths and edit ambiguity ---------------------------------------------------------


def worktree_agent(make_agent: MakeAgent, tmp_path: Path, files: dict[str, str], **options: Any) -> Agent:
    """An agent whose workspace is its own worktree of a repository holding ``files`` (and a
    .gitignore of build/), may write docs/* only, and runs scripts."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, content in {**files, ".gitignore": "build/\n.toka/\n"}.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(content)
    _git_repo(repo)
    subprocess.run(["git", "worktree", "add", "-q", "--detach", ".toka/worktrees/a"], cwd=repo, check=True)
    return make_agent("script-execution", *FILE_TOOLS, write_paths=("docs/*",), root="repo/.toka/worktrees/a",
                      state_dir=repo / ".toka", **options)


class TestWritePolicy:
    def test_writes_outside_write_paths_need_approval(self, make_agent: MakeAgent) -> None:
        agent = make_agent(*FILE_TOOLS, write_paths=("docs/*",), files={"src/app.py": "x = 1\n"})
        out = agent.call("write_file", path="src/evil.py", content="import os\n")
        assert out.is_error and "needs approval ('write-outside-paths')" in out.text
        agent.audited("write_file", "refused", "outside the declared paths docs/*")
        assert not (agent.root / "src" / "evil.py").exists()

        out = agent.call("edit_file", path="src/app.py", old_text="x = 1", new_text="x = 2")
        assert out.is_error
        agent.audited("edit_file", "refused", "write-outside-paths")
        assert (agent.root / "src" / "app.py").read_text() == "x = 1\n"

        # docs/../src/... is judged by where it lands, not how it is spelt
        out = agent.call("write_file", path="docs/../src/evil.py", content="x")
        assert out.is_error
        agent.audited("write_file", "refused", "'src/evil.py'")

        out = agent.call("write_file", path="docs/guide.md", content="# guide\n")
        assert not out.is_error
        assert agent.audited("write_file", "allowed")["files_changed"] == ["docs/guide.md"]

    def test_a_commands_changes_outside_write_paths_are_undone_in_an_agents_worktree(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        agent = worktree_agent(make_agent, tmp_path, {"src/app.py": "x = 1\n", "src/old.py": "old\n",
                                                      "d*": "a file named d*\n", "docs/guide.md": "old guide\n"})
        # 'd*' as a pathspec would name docs/guide.md too.
        agent.script("docs/w.sh", "#!/bin/sh\necho evil > src/app.py && rm src/old.py && echo new > src/new.py\n"
                                  "echo staged > src/staged.py; git add src/staged.py; echo x >> 'd*'\n"
                                  "mkdir -p build && echo obj > build/out.o && echo guide > docs/guide.md\n"
                                  "echo '3 tests passed'\n")
        out = agent.run("sh", "docs/w.sh")
        assert out.is_error and "needs approval ('write-outside-paths')" in out.text
        assert "--- what the command printed ---\nexit code: 0\n--- stdout ---\n3 tests passed" in out.text
        assert "changed d*, src/app.py, src/new.py, src/old.py, src/staged.py (outside the declared paths docs/*" in out.text
        agent.audited("run_command", "refused", "those changes were undone")
        assert (agent.root / "src" / "app.py").read_text() == "x = 1\n"
        assert (agent.root / "src" / "old.py").read_text() == "old\n"
        assert not (agent.root / "src" / "new.py").exists() and not (agent.root / "src" / "staged.py").exists()
        assert (agent.root / "d*").read_text() == "a file named d*\n"
        # Inside the paths, and what git ignores (build output), stay.
        assert (agent.root / "docs" / "guide.md").read_text() == "guide\n"
        assert (agent.root / "build" / "out.o").is_file()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=agent.root, capture_output=True, text=True)
        assert status.stdout.splitlines() == [" M docs/guide.md", "?? docs/w.sh"]  # the index as last committed
        # Within the paths only: allowed.
        agent.script("docs/more.sh", "#!/bin/sh\necho more >> docs/guide.md\n")
        assert not agent.run("sh", "docs/more.sh").is_error
        agent.audited("run_command", "allowed")

    @pytest.mark.parametrize("attack", [
        # A commit: git status would show nothing (unsandboxed: in the sandbox the git directory is read-only).
        "echo evil > src/app.py && git add -A && git -c user.name=a -c user.email=a@b commit -qm sneak",
        # The old modification time put back: the change time still moves.
        "python3 -c \"import os; p='src/app.py'; st=os.stat(p); open(p, 'r+').write('x = 9'); "
        "os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))\"",
        "rm -rf src && ln -s docs src",  # a directory turned into a link
        "rm src/app.py && mkdir src/app.py && echo x > src/app.py/f",  # a file turned into a directory
        # Ignored by the rules the command wrote, the workflow was left, then committed once they were undone.
        "mkdir -p .github/workflows && echo evil > .github/workflows/ci.yml && echo .github/ >> .gitignore",
    ], ids=["commit", "mtime-set-back", "dir-to-link", "file-to-dir", "ignore-rules-rewritten"])
    def test_a_change_outside_write_paths_is_undone_however_it_is_made(
        self, make_agent: MakeAgent, tmp_path: Path, attack: str
    ) -> None:
        agent = worktree_agent(make_agent, tmp_path, {"src/app.py": "x = 1\n", "docs/a.md": "a\n"},
                               sandbox=False, allow_unsandboxed=True)
        start = subprocess.run(["git", "rev-parse", "HEAD"], cwd=agent.root, capture_output=True, text=True).stdout
        agent.script("docs/w.sh", f"#!/bin/sh\n{attack}\n")
        out = agent.run("sh", "docs/w.sh")
        assert out.is_error and "needs approval ('write-outside-paths')" in out.text, out.text
        agent.audited("run_command", "refused", "those changes were undone")
        assert (agent.root / "src" / "app.py").read_text() == "x = 1\n"
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=agent.root, capture_output=True, text=True).stdout
        assert head == start
        status = subprocess.run(["git", "status", "--porcelain"], cwd=agent.root, capture_output=True, text=True)
        assert status.stdout.splitlines() == ["?? docs/w.sh"]

    def test_outside_write_paths_a_command_in_a_persons_own_tree_stops_the_run(
        self, make_agent: MakeAgent
    ) -> None:
        # --in-place (or no git at all): undoing could take the person's own changes with it.
        agent = make_agent("script-execution", *FILE_TOOLS, write_paths=("docs/*",), files={"src/app.py": "x = 1\n"})
        _git_repo(agent.root)
        (agent.root / "src" / "app.py").write_text("the person's own edit\n")
        agent.script("docs/w.sh", "#!/bin/sh\necho evil >> src/app.py\n")
        with pytest.raises(SandboxViolation) as caught:
            agent.run("sh", "docs/w.sh")
        assert caught.value.paths == ["src/app.py"] and "left for review and the run stops" in str(caught.value)
        assert (agent.root / "src" / "app.py").read_text() == "the person's own edit\nevil\n"

    def test_approved_a_command_may_change_files_outside_write_paths(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution", *FILE_TOOLS, write_paths=("docs/*",),
                           approvals=("write-outside-paths",), files={"src/app.py": "x = 1\n"})
        _git_repo(agent.root)
        agent.script("docs/w.sh", "#!/bin/sh\necho more >> src/app.py\n")
        assert not agent.run("sh", "docs/w.sh").is_error
        assert (agent.root / "src" / "app.py").read_text() == "x = 1\nmore\n"

    def test_a_write_over_the_size_of_one_write_is_refused_and_audited(self, make_agent: MakeAgent) -> None:
        agent = make_agent(*FILE_TOOLS)
        out = agent.call("write_file", path="big.txt", content="x" * 2_000_001)
        assert out.is_error and "over the 2000000-byte limit of one write" in out.text
        agent.audited("write_file", "refused", "2000001 bytes")
        assert not (agent.root / "big.txt").exists()

    @pytest.mark.parametrize("capabilities, asked", [
        (["filesystem-write"], True), (["script-execution"], True), (["filesystem-read"], False)])
    def test_write_outside_paths_is_asked_for_whatever_may_write(self, capabilities: list[str], asked: bool) -> None:
        spec = AgentSpec.model_validate(minimal_spec("a", security={
            "capabilities_required": capabilities, "write_paths": ["docs/*"], "resource_limits": {"timeout": "10m"}}))
        assert approval_keys(spec, ("write-outside-paths",)) == (["write-outside-paths"] if asked else [])

    def test_approval_allows_writes_outside_and_a_denial_wins(self, make_agent: MakeAgent) -> None:
        approved = make_agent(*FILE_TOOLS, write_paths=("docs/*",), approvals=("write-outside-paths",))
        out = approved.call("write_file", path="src/ok.py", content="ok\n")
        assert not out.is_error and (approved.root / "src" / "ok.py").read_text() == "ok\n"
        approved.audited("write_file", "allowed")

        denied = make_agent(*FILE_TOOLS, write_paths=("docs/*",), approvals=("write-outside-paths",),
                            denials=("write-outside-paths",), root="ws2")
        out = denied.call("write_file", path="src/no.py", content="no\n")
        assert out.is_error and "it was denied" in out.text
        denied.audited("write_file", "refused", "it was denied")

    def test_edit_with_ambiguous_old_text_changes_nothing(self, make_agent: MakeAgent) -> None:
        agent = make_agent(*FILE_TOOLS, files={"a.txt": "same\nsame\n"})
        out = agent.call("edit_file", path="a.txt", old_text="same", new_text="other")
        assert out.is_error and "old_text occurs 2 times in a.txt; include more context" in out.text
        record = agent.audited("edit_file", "allowed")
        assert record["is_error"] is True and record["files_changed"] == []
        assert (agent.root / "a.txt").read_text() == "same\nsame\n"

    def test_edit_keeps_a_files_crlf_line_endings(self, make_agent: MakeAgent) -> None:
        """The model reads lines without their '\\r'; its edit matches them, and only its lines change
        (the whole file was rewritten with LF endings: a diff of every line)."""
        agent = make_agent(*FILE_TOOLS)
        (agent.root / "win.txt").write_bytes(b"one\r\ntwo\r\nthree\r\n")
        out = agent.call("edit_file", path="win.txt", old_text="two\nthree", new_text="2\n3")
        assert not out.is_error, out.text
        assert (agent.root / "win.txt").read_bytes() == b"one\r\n2\r\n3\r\n"

    def test_edit_with_missing_or_empty_old_text(self, make_agent: MakeAgent) -> None:
        agent = make_agent(*FILE_TOOLS, files={"a.txt": "text\n"})
        out = agent.call("edit_file", path="a.txt", old_text="absent", new_text="x")
        assert out.is_error and "old_text does not occur in a.txt; nothing changed" in out.text
        assert agent.audited("edit_file", "allowed")["is_error"] is True
        out = agent.call("edit_file", path="a.txt", old_text="", new_text="x")
        assert out.is_error
        agent.audited("edit_file", "invalid", "old_text")
        assert (agent.root / "a.txt").read_text() == "text\n"


# -- 19: unsandboxed agents need the run's consent ----------------------------------------------------


def _spec(name: str, *, sandbox: bool, capabilities: list[str]) -> AgentSpec:
    data = minimal_spec(name)
    data["security"].update({"sandbox": sandbox, "capabilities_required": capabilities})
    return AgentSpec.from_dict(data)


def test_check_unsandboxed_names_the_agents_that_would_run_commands_unconfined() -> None:
    specs = [
        _spec("builder", sandbox=False, capabilities=["cargo-execution"]),
        _spec("reader", sandbox=False, capabilities=["filesystem-read"]),  # no commands: no risk
        _spec("scripter", sandbox=False, capabilities=["script-execution", "filesystem-read"]),
        _spec("boxed", sandbox=True, capabilities=["script-execution"]),
    ]
    with pytest.raises(ConfigError) as caught:
        check_unsandboxed(specs, allowed=False)
    message = str(caught.value)
    assert message.startswith("builder, scripter: the spec sets sandbox: false and grants commands")
    assert "--allow-unsandboxed" in message
    assert message.split(":")[0].split(", ") == ["builder", "scripter"]  # not reader (no commands), not boxed
    check_unsandboxed(specs, allowed=True)
    check_unsandboxed(specs[1:2] + specs[3:], allowed=False)


# -- 5: secrets in the environment ---------------------------------------------------------------------

ANTHROPIC_KEY = "sk-ant-api03-" + "A1b2C3d4E5f6G7h8" * 3
GITHUB_TOKEN = "ghp_" + "Zy9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe" + "dcba"
DB_PASSWORD = "correct-horse-battery-staple"


class TestSecrets:
    @pytest.fixture(autouse=True)
    def secrets(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
        monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)
        monkeypatch.setenv("DB_PASSWORD", DB_PASSWORD)
        monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")

    def test_a_granted_script_sees_no_secret_and_a_private_home(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution", limits={"max_memory": "128MB", "max_processes": 16})
        env_sh = agent.script("env.sh", "#!/bin/sh\nenv\n")
        out = agent.run(env_sh)
        assert not out.is_error, out.text
        record = agent.audited("run_command", "allowed")
        assert record["exit_code"] == 0
        audit_text = agent.audit_file.read_text()
        for value in (ANTHROPIC_KEY, GITHUB_TOKEN, DB_PASSWORD, "/tmp/evil.so"):
            assert value not in out.text
            assert value not in audit_text
        assert "ANTHROPIC_API_KEY" not in out.text and "GITHUB_TOKEN" not in out.text
        env = dict(line.split("=", 1) for line in out.text.split("--- stdout ---\n", 1)[1].splitlines() if "=" in line)
        home = Path(env["HOME"])
        assert home.is_relative_to(agent.state_dir) and home == agent.state_dir / "home" / AGENT
        assert Path(env["TMPDIR"]).is_relative_to(agent.state_dir)
        assert env["GIT_TERMINAL_PROMPT"] == "0"

    def test_secrets_a_command_prints_are_redacted_in_output_and_audit(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution", files={"leak.txt": f"{GITHUB_TOKEN}\n{DB_PASSWORD}\n"})
        show = agent.script("show.sh", "#!/bin/sh\ncat leak.txt\necho \"$1\" >&2\n")
        out = agent.run(show, ANTHROPIC_KEY)  # the model even passes a key as an argument
        assert "[REDACTED]" in out.text
        for value in (ANTHROPIC_KEY, GITHUB_TOKEN, DB_PASSWORD):
            assert value not in out.text
            assert value not in agent.audit_file.read_text()
        assert agent.audited("run_command", "allowed")["arguments"] == {"argv": [show, "[REDACTED]"]}

    def test_a_script_cannot_read_the_runtimes_environment_through_proc(self, tmp_path: Path) -> None:
        ws = tmp_path / "ws"
        ws.mkdir()
        (ws / "peek.py").write_text(
            "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read()[::-1].decode(errors='replace'))\n"
        )
        runtime = textwrap.dedent(
            """
            import asyncio, sys
            from pathlib import Path
            from toka.audit import AuditLog
            from toka.capabilities import grant_tools
            from toka.policy import AgentPolicy
            from toka.spec import ResourceLimits
            from toka.tools import ToolContext, Toolbox
            from toka.workspace import Workspace

            ws = Workspace(sys.argv[1])
            caps = ["script-execution"]
            policy = AgentPolicy(capabilities=frozenset(caps), limits=ResourceLimits.model_validate({"timeout": "20s"}))
            tools, withheld = grant_tools(caps)
            audit = AuditLog(ws.state_dir / "audit" / "test.jsonl", run="test")
            box = Toolbox(tools, ToolContext(workspace=ws, agent="tester", task=1, policy=policy, audit=audit))
            print(asyncio.run(box.call("run_command", {"argv": ["python3", "peek.py"]})).text)
            """
        )
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "ANTHROPIC_API_KEY": ANTHROPIC_KEY, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", runtime, str(ws)], env=env, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        # In its own PID namespace the script has no parent to read: /proc/0/environ.
        assert "exit code: 1" in done.stdout and "/proc/0/environ" in done.stdout
        assert ANTHROPIC_KEY[::-1] not in done.stdout


# -- 8-14: containment -------------------------------------------------------------------------------


@needs_cgroups
def test_fork_bomb_is_held_to_max_processes_and_leaves_nothing_behind(
    make_agent: MakeAgent, cgroups: list[Any]
) -> None:
    mark = marker()
    agent = make_agent("script-execution", limits={"max_processes": 20, "timeout": "2s"})
    # The script stays alive: in the sandbox's PID namespace everything dies with it.
    bomb = agent.script(f"bomb-{mark}.sh", "#!/bin/bash\nf(){ f|f& }; f; sleep 5\n")
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # how many processes the bomb's cgroup held, while it ran
        while not stop.is_set():
            for group in cgroups:
                try:
                    seen.append(int((group.dirs["pids"] / "pids.current").read_text()))
                except (OSError, ValueError):
                    pass
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        out = agent.run(bomb)
        timed_out = out.text.startswith("killed after 2 s (timeout)")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        watcher.join()
    assert elapsed < 2 + 1.5
    record = agent.audited("run_command", "allowed")
    if timed_out:
        assert record["is_error"] and record["usage"]["killed_for"] == "timeout"
    assert seen and max(seen) <= 20, max(seen)
    assert max(seen) >= 10  # it really was a bomb, stopped by pids.max
    assert processes_matching(mark) == []
    assert_groups_gone(cgroups)


@needs_cgroups
def test_memory_hog_is_killed_at_max_memory(make_agent: MakeAgent) -> None:
    agent = make_agent("script-execution", limits={"max_memory": "64MB", "timeout": "20s"})
    agent.script("hog.py", "data = 'x' * (300 * 1024 * 1024)\nprint('SURVIVED', len(data))\n")
    started = time.monotonic()
    out = agent.run("python3", "hog.py")
    assert time.monotonic() - started < 10
    assert "SURVIVED" not in out.text and out.is_error
    assert "unshare:" not in out.text  # the sandbox's own noise is not the command's output
    record = agent.audited("run_command", "allowed")
    assert record["signal"] == 9 or "MemoryError" in out.text, out.text
    peak = record["usage"]["peak_memory_bytes"]
    assert peak is not None and 8 * MB < peak <= 66 * MB
    assert record["sandbox"]["memory"].startswith("cgroup")


@needs_prlimit
def test_memory_hog_without_a_memory_cgroup_hits_rlimit_as(tmp_path: Path) -> None:
    host = HostSupport(cgroup=None, cgroup_root={}, netns=HOST.netns, prlimit=True, mountns=HOST.mountns)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hog.py").write_text("data = 'x' * (300 * 1024 * 1024)\nprint('SURVIVED')\n")
    limits = ResourceLimits.model_validate({"timeout": "20s", "max_memory": "64MB"})
    result, usage, plan = asyncio.run(run_sandboxed(
        [sys.executable, "hog.py"], cwd=ws, workspace=ws, state_dir=ws / ".toka",
        env=scrubbed_env(ws / ".toka" / "home"), limits=limits, timeout=20, network=False, sandbox=True, host=host))
    assert plan.enforced["memory"] == "RLIMIT_AS (prlimit)"
    assert result is not None and "SURVIVED" not in result.stdout
    assert "MemoryError" in result.stderr or result.signal is not None


def _spin_script(agent_root: Path) -> None:
    (agent_root / "spin.py").write_text(
        "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
    )


@needs_cgroups
def test_cpu_hog_is_held_to_max_cpu_by_the_cgroup_quota(make_agent: MakeAgent) -> None:
    agent = make_agent("script-execution", limits={"max_cpu": "25%", "timeout": "20s"})
    _spin_script(agent.root)
    out = agent.run("python3", "spin.py", "2")
    assert not out.is_error, out.text
    record = agent.audited("run_command", "allowed")
    assert record["sandbox"]["cpu"].endswith("CPU quota")
    usage = record["usage"]
    assert usage["wall_s"] >= 2 and usage["cpu_s"] is not None
    assert usage["cpu_s"] / usage["wall_s"] <= 0.4, usage


@pytest.mark.skipif("cpuacct" not in HOST.cgroup_root, reason="measures CPU time with the cpuacct cgroup")
def test_cpu_hog_without_a_cpu_cgroup_is_held_by_the_measured_throttle(tmp_path: Path) -> None:
    host = HostSupport(cgroup=HOST.cgroup, cgroup_root={k: v for k, v in HOST.cgroup_root.items() if k != "cpu"},
                       netns=HOST.netns, prlimit=HOST.prlimit, mountns=HOST.mountns)
    ws = tmp_path / "ws"
    ws.mkdir()
    _spin_script(ws)
    limits = ResourceLimits.model_validate({"timeout": "20s", "max_cpu": "25%"})
    result, usage, plan = asyncio.run(run_sandboxed(
        [sys.executable, "spin.py", "2"], cwd=ws, workspace=ws, state_dir=ws / ".toka",
        env=scrubbed_env(ws / ".toka" / "home"), limits=limits, timeout=20, network=False, sandbox=True, host=host))
    assert plan.enforced["cpu"] == "measured throttle (SIGSTOP/SIGCONT)"
    assert result is not None and result.exit_code == 0
    assert usage.cpu_s is not None and usage.wall_s >= 2
    assert usage.cpu_s / usage.wall_s <= 0.5, usage


def test_a_command_past_its_timeout_is_killed_and_the_timeout_goes_to_the_model(make_agent: MakeAgent) -> None:
    mark = marker()
    agent = make_agent("script-execution", limits={"timeout": "1s"})
    sleeper = agent.script("sleeper.sh", f"#!/bin/bash\nexec -a {mark} sleep 60\n")
    started = time.monotonic()
    out = agent.run(sleeper, timeout=30)  # asking for more than the spec allows does not help
    assert out.is_error and out.text.startswith("killed after 1 s (timeout)")
    assert "1 s is the longest this agent's commands may run" in out.text
    assert time.monotonic() - started < 1 + 1.5
    record = agent.audited("run_command", "allowed")
    assert record["is_error"] is True
    assert record["usage"]["killed_for"] == "timeout" and 1 <= record["usage"]["wall_s"] < 2.5
    assert processes_matching(mark) == []


@needs_cgroups
def test_a_setsid_escapee_is_killed_with_the_cgroup(make_agent: MakeAgent, cgroups: list[Any]) -> None:
    mark = marker()
    agent = make_agent("script-execution", limits={"max_processes": 16})
    escape = agent.script("escape.sh", f"""\
        #!/bin/bash
        setsid bash -c 'echo $$ > escapee.pid; exec -a {mark} sleep 60' </dev/null >/dev/null 2>&1 &
        for _ in $(seq 100); do [ -s escapee.pid ] && break; sleep 0.02; done
        echo launched
        """)
    out = agent.run(escape)
    assert "exit code: 0" in out.text and "launched" in out.text
    agent.audited("run_command", "allowed")
    # The pid it wrote is the one inside the sandbox's PID namespace: look it up by its marker.
    assert (agent.root / "escapee.pid").read_text().strip()
    deadline = time.monotonic() + 2
    while processes_matching(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_matching(mark) == []
    assert_groups_gone(cgroups)


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on the host's loopback; yields its URL and the paths it was asked for."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            body = b"HELLO-FROM-THE-HOST"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/probe", hits
    finally:
        server.shutdown()
        server.server_close()


NET_SCRIPT = """\
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())
except Exception as e:
    print("NETWORK-FAILED", type(e).__name__, e)
    sys.exit(3)
"""


class TestNetwork:
    @needs_netns
    @pytest.mark.parametrize(
        ("capabilities", "approvals"),
        [
            (("script-execution",), ()),
            (("script-execution", "network-access"), ()),  # declared, but nobody approved it
            (("script-execution", "network-access"), ("git-push",)),
        ],
        ids=["not-granted", "not-approved", "other-approval"],
    )
    def test_without_approved_network_access_even_host_loopback_is_unreachable(
        self, make_agent: MakeAgent, http_server: tuple[str, list[str]],
        capabilities: tuple[str, ...], approvals: tuple[str, ...],
    ) -> None:
        url, hits = http_server
        agent = make_agent(*capabilities, approvals=approvals)
        agent.script("net.py", NET_SCRIPT)
        out = agent.run("python3", "net.py", url)
        assert out.is_error and "NETWORK-FAILED" in out.text and "HELLO-FROM-THE-HOST" not in out.text
        record = agent.audited("run_command", "allowed")
        assert record["exit_code"] == 3
        assert record["sandbox"]["network"] == "network namespace (unshare -n)"
        assert hits == []

    def test_approved_network_access_reaches_the_server(
        self, make_agent: MakeAgent, http_server: tuple[str, list[str]]
    ) -> None:
        url, hits = http_server
        agent = make_agent("script-execution", "network-access", approvals=("network-access",))
        agent.script("net.py", NET_SCRIPT)
        out = agent.run("python3", "net.py", url)
        assert not out.is_error and "HELLO-FROM-THE-HOST" in out.text, out.text
        record = agent.audited("run_command", "allowed")
        assert record["exit_code"] == 0 and "network" not in record["sandbox"]
        assert hits == ["/probe"]


def test_huge_output_is_capped_and_returns_promptly(make_agent: MakeAgent) -> None:
    agent = make_agent("script-execution", limits={"max_memory": "256MB"})
    agent.script("loud.py", "import sys\nsys.stdout.write('A' * 10_000_000)\nsys.stderr.write('E' * 3_000_000)\n")
    started = time.monotonic()
    out = agent.run("python3", "loud.py")
    assert time.monotonic() - started < 5
    assert "[output cut at 64000 bytes per stream]" in out.text
    assert out.text.count("A") == 64_000 and out.text.count("E") <= 64_000
    assert len(out.text) < 140_000
    record = agent.audited("run_command", "allowed")
    assert record["exit_code"] == 0 and record["bytes"] <= 128_000


class TestDiskGrowth:
    @needs_prlimit
    def test_one_big_file_is_stopped_by_rlimit_fsize(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution", limits={"max_disk_usage": "1MB"})
        agent.script("fill.py", "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (5 * 1024 * 1024))\n"
                                "print('WROTE IT ALL')\n")
        out = agent.run("python3", "fill.py")
        assert out.is_error and "WROTE IT ALL" not in out.text
        assert "File too large" in out.text or "signal 25" in out.text, out.text
        assert (agent.root / "big.bin").stat().st_size <= MB
        record = agent.audited("run_command", "allowed")
        assert record["sandbox"]["disk"].startswith("RLIMIT_FSIZE")
        growth = record["usage"]["disk_growth_bytes"]
        assert growth is not None and growth <= MB + 64 * 1024

    def test_many_small_files_are_stopped_by_the_growth_watch(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution", limits={"max_disk_usage": "1MB"})
        agent.script("fill.py", textwrap.dedent("""\
            import time
            for i in range(20):
                with open(f'part{i}.bin', 'wb') as f:
                    f.write(b'x' * (512 * 1024))
                    f.flush()
                time.sleep(0.1)
            print('WROTE IT ALL')
            """))
        started = time.monotonic()
        out = agent.run("python3", "fill.py")
        assert time.monotonic() - started < 5
        assert "WROTE IT ALL" not in out.text
        assert "killed by signal 9 (disk)" in out.text
        assert "the workspace grew past max_disk_usage; the command was killed" in out.text
        record = agent.audited("run_command", "allowed")
        assert record["signal"] == 9 and record["usage"]["killed_for"] == "disk"
        assert record["usage"]["disk_growth_bytes"] > MB
        assert len(list(agent.root.glob("part*.bin"))) < 20

    def test_growth_counts_over_the_whole_agent_run(self, make_agent: MakeAgent) -> None:
        """max_disk_usage bounds the run's growth: commands and file writes add up."""
        agent = make_agent("script-execution", "filesystem-write", limits={"max_disk_usage": "1MB"})
        agent.script("grow.py", "import sys\nopen(sys.argv[1], 'wb').write(b'x' * (400 * 1024))\nprint('OK')\n")
        assert "OK" in agent.run("python3", "grow.py", "a.bin").text  # 400 KB of 1 MB
        assert "OK" in agent.run("python3", "grow.py", "b.bin").text  # 800 KB
        big = agent.call("write_file", path="c.txt", content="y" * (400 * 1024))  # would make 1.2 MB
        assert big.is_error and "may grow 1048576 (max_disk_usage)" in big.text
        agent.audited("write_file", "refused", "max_disk_usage")  # counted with the run's refusals
        assert not (agent.root / "c.txt").exists()
        small = agent.call("write_file", path="d.txt", content="z" * 1024)
        assert not small.is_error
        # One file bigger than what is left (about 220 KB): stopped by RLIMIT_FSIZE.
        third = agent.run("python3", "grow.py", "e.bin")
        assert third.is_error and "OK" not in third.text
        (agent.root / "e.bin").unlink()
        # Several files, each under what is left, written faster than the watch looks: the
        # growth is found when the command ends, and said.
        agent.script("burst.py", "for i in range(3):\n    open(f'burst{i}.bin', 'wb').write(b'x' * (200 * 1024))\n")
        burst = agent.run("python3", "burst.py")
        assert burst.is_error and "grew past max_disk_usage" in burst.text, burst.text
        # Once over, no command starts at all.
        refused = agent.run("python3", "grow.py", "f.bin")
        assert refused.is_error and "already grown" in refused.text and not (agent.root / "f.bin").exists()
        agent.audited("run_command", "refused", "max_disk_usage")

    @pytest.mark.parametrize("fill", [
        "import os\nfor i in range(4000): os.symlink('x' * 4000, f'l{i}')\n",  # 4 KB each, no file
        "for i in range(4000): open(f'e{i}', 'w').close()\n",  # empty files: no block at all
        # Sparse files, each under the limit of one file (RLIMIT_FSIZE): 2.7 MB of nothing on disk.
        "for i in range(3):\n    f = open(f's{i}.bin', 'wb'); f.truncate(900_000); f.close()\n",
        "import os\nfor i in range(4000): os.mkdir(f'd{i}')\n",  # empty directories
    ], ids=["links", "empty-files", "sparse-file", "directories"])
    def test_growth_counts_what_blocks_alone_miss(self, make_agent: MakeAgent, fill: str) -> None:
        """Only regular files' blocks counted: 40,000 links grew a workspace 158 MB past a 10 MB limit."""
        agent = make_agent("script-execution", limits={"max_disk_usage": "1MB"})
        agent.script("fill.py", fill)
        out = agent.run("python3", "fill.py")
        assert out.is_error and "max_disk_usage" in out.text, out.text
        assert agent.audited("run_command", "allowed")["usage"]["disk_growth_bytes"] > MB

    def test_files_a_command_changed_are_reported_and_audited(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution", files={"old.txt": "old\n", "gone.txt": "bye\n"})
        change = agent.script("change.sh", "#!/bin/sh\necho new > new.txt\necho more >> old.txt\nrm gone.txt\n")
        out = agent.run(change)
        assert "--- files changed in the workspace ---" in out.text
        record = agent.audited("run_command", "allowed")
        assert record["files_changed"] == ["gone.txt", "new.txt", "old.txt"]


# -- 15, 16: what the host cannot enforce, and unsandboxed agents ------------------------------------


class TestSandboxRefusals:
    LIMITS = ResourceLimits.model_validate({"timeout": "10s", "max_memory": "64MB", "max_processes": 10})
    WEAK = HostSupport(cgroup=None, cgroup_root={}, netns=False, prlimit=False)

    def test_plan_names_each_limit_the_host_cannot_enforce(self) -> None:
        plan = plan_limits(self.LIMITS, network=False, host=self.WEAK)
        assert plan.missing == ["memory", "processes", "network", "host confinement"]
        assert set(plan.enforced) == {"timeout"}
        assert plan_limits(self.LIMITS, network=True, host=self.WEAK).missing == [
            "memory", "processes", "host confinement"]

    def test_bandwidth_cannot_be_shaped_so_a_networked_command_is_refused(self) -> None:
        limits = ResourceLimits.model_validate({"timeout": "10s", "max_network_bandwidth": "10Mbps"})
        assert "bandwidth" in plan_limits(limits, network=True, host=HOST).missing
        assert "bandwidth" not in plan_limits(limits, network=False, host=HOST).missing  # no network at all

    def test_run_sandboxed_refuses_before_starting_anything(self, tmp_path: Path) -> None:
        refused = r"this host cannot enforce memory, processes, network, host confinement .*sandbox: true"
        with pytest.raises(SandboxRefused, match=refused):
            asyncio.run(run_sandboxed(
                ["touch", "ran"], cwd=tmp_path, workspace=tmp_path, state_dir=tmp_path / ".toka",
                env=scrubbed_env(tmp_path / ".toka" / "home"), limits=self.LIMITS, timeout=5, network=False,
                sandbox=True, host=self.WEAK))
        assert not (tmp_path / "ran").exists()

    def test_through_the_toolbox_the_command_is_refused_and_audited(
        self, make_agent: MakeAgent, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        weak = HostSupport(cgroup=HOST.cgroup, cgroup_root={k: v for k, v in HOST.cgroup_root.items() if k != "memory"},
                           netns=HOST.netns, prlimit=False, mountns=HOST.mountns)
        monkeypatch.setattr(sandbox_module, "detect_host", lambda: weak)
        agent = make_agent("script-execution", limits={"max_memory": "64MB"})
        touch = agent.script("touch.sh", "#!/bin/sh\ntouch ran\n")
        out = agent.run(touch)
        assert out.is_error and "this host cannot enforce memory" in out.text and "toka doctor" in out.text
        agent.audited("run_command", "refused", "this host cannot enforce memory")
        assert not (agent.root / "ran").exists()

    def test_sandbox_false_without_consent_is_refused(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution", sandbox=False)
        touch = agent.script("touch.sh", "#!/bin/sh\ntouch ran\n")
        out = agent.run(touch)
        assert out.is_error and "toka run --allow-unsandboxed" in out.text
        agent.audited("run_command", "refused", "sets sandbox: false")
        assert not (agent.root / "ran").exists()

    def test_sandbox_false_with_consent_runs_without_limits(
        self, make_agent: MakeAgent, cgroups: list[Any], http_server: tuple[str, list[str]]
    ) -> None:
        url, hits = http_server
        agent = make_agent("script-execution", sandbox=False, allow_unsandboxed=True,
                           limits={"max_memory": "64MB", "max_processes": 5})
        agent.script("net.py", NET_SCRIPT)
        out = agent.run("python3", "net.py", url)
        assert not out.is_error and "HELLO-FROM-THE-HOST" in out.text, out.text
        assert agent.audited("run_command", "allowed")["exit_code"] == 0
        assert cgroups == [] and hits == ["/probe"]

    def test_the_audit_of_an_unsandboxed_command_claims_no_enforcement(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution", sandbox=False, allow_unsandboxed=True,
                           limits={"max_memory": "64MB", "max_processes": 5})
        ok = agent.script("ok.sh", "#!/bin/sh\necho ok\n")
        agent.run(ok)
        enforced = agent.audited("run_command", "allowed")["sandbox"] or {}
        assert not {"memory", "processes", "network", "cpu", "disk"} & set(enforced), enforced


# -- arguments the model controls that leave the workspace through a command ---------------------------


class TestCommandEscapesThroughTheToolbox:
    @pytest.mark.parametrize(
        "args",
        [
            ["../../etc/passwd"],
            ["--file=../../etc/passwd"],
            ["/etc/passwd"],
            ["--input=/etc/shadow"],
            ["/proc/self/environ"],
            ["~/.ssh/id_rsa"],
            ["sub/../../outside/secret.txt"],
        ],
    )
    def test_arguments_pointing_out_are_refused_before_anything_runs(
        self, make_agent: MakeAgent, args: list[str]
    ) -> None:
        agent = make_agent("script-execution")
        cat = agent.script("cat.sh", "#!/bin/sh\ntouch ran\ncat \"$@\"\n")
        out = agent.run(cat, *args)
        assert out.is_error and f"the argument {args[0]!r} points outside the workspace" in out.text
        record = agent.audited("run_command", "refused", "points outside the workspace")
        assert record["exit_code"] is None and record["usage"] is None
        assert not (agent.root / "ran").exists() and "root:" not in out.text

    def test_cwd_outside_or_in_the_state_dir_is_refused(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution")
        agent.script("x.py", "print('ran')\n")
        for cwd, why in [("../..", "resolves outside the workspace"), ("/", "is absolute"),
                         (".toka", "state directory")]:
            out = agent.call("run_command", argv=["python3", "x.py"], cwd=cwd)
            assert out.is_error
            agent.audited("run_command", "refused", why)

    def test_a_program_outside_the_workspace_or_linked_out_is_refused(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution")
        (agent.root / "shell").symlink_to("/bin/sh")
        for argv, why in [(["/bin/sh", "-c", "id"], "'/bin/sh' is outside the workspace"),
                          (["./shell", "-c", "id"], "'./shell' is outside the workspace"),
                          (["python3", "shell"], "'shell' points outside the workspace")]:
            out = agent.run(*argv)
            assert out.is_error and "uid=" not in out.text
            agent.audited("run_command", "refused", why)

    @pytest.mark.parametrize(
        ("arguments", "why"),
        [
            ({"argv": "rm -rf /"}, "argv"),  # a shell line instead of an argv list
            ({"argv": ["./x.sh"], "shell": True}, "shell"),
            ({"argv": []}, "argv"),
            ({"argv": ["./x.sh"], "timeout": -1}, "timeout"),
        ],
    )
    def test_malformed_command_input_is_invalid(self, make_agent: MakeAgent, arguments: dict[str, Any],
                                               why: str) -> None:
        agent = make_agent("script-execution")
        before = len(agent.records())
        out = asyncio.run(agent.toolbox.call("run_command", arguments))
        assert out.is_error and out.text.startswith("invalid input for run_command")
        assert len(agent.records()) == before + 1
        agent.audited("run_command", "invalid", why)

    def test_an_argument_through_a_symlink_pointing_out_is_refused(self, make_agent: MakeAgent, outside: Path) -> None:
        secret = (outside / "secret.txt").read_text().strip()
        agent = make_agent("git-access", files={"README.md": "hello\n"})
        (agent.root / "escape").symlink_to(outside)
        out = agent.run("git", "diff", "--no-index", "escape/secret.txt", "README.md")
        assert secret not in out.text
        agent.audited("run_command", "refused", "outside the workspace")

    def test_a_path_attached_to_a_short_option_is_refused(self, make_agent: MakeAgent, outside: Path) -> None:
        agent = make_agent("git-access", files={"README.md": "hello\n"})
        _git_repo(agent.root)
        target = outside / "dump.tar"
        agent.run("git", "archive", f"-o{target}", "HEAD")
        assert not target.exists()
        agent.audited("run_command", "refused", "outside the workspace")


def _git_repo(root: Path) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)


# -- a command runs as root: it must not be able to undo its own sandbox ------------------------------

needs_confinement = pytest.mark.skipif(not HOST.mountns, reason="needs a mount namespace (unshare -m)")


@needs_confinement
class TestRootCannotUndoTheSandbox:
    """A granted script is root here; each case is what root could do without the confinement."""

    def test_it_cannot_move_itself_out_of_its_cgroup(self, make_agent: MakeAgent, cgroups: list[Any]) -> None:
        if not HOST.cgroup_root:
            pytest.skip("no cgroups to leave")
        agent = make_agent("script-execution", limits={"max_processes": 8, "max_memory": "64MB"})
        targets = sorted({str(Path(p).parent / "cgroup.procs") for p in HOST.cgroup_root.values()})
        leave = agent.script("leave.sh", "#!/bin/sh\n" + "".join(
            f'echo $$ > "{t}" 2>/dev/null && echo "MOVED {t}"\n' for t in targets) + "echo done\n")
        out = agent.run(leave)
        assert "done" in out.text and "MOVED" not in out.text, out.text
        agent.audited("run_command", "allowed")
        assert_groups_gone(cgroups)

    @needs_netns
    def test_it_cannot_unmount_its_proc_or_enter_the_hosts_network(
        self, make_agent: MakeAgent, http_server: tuple[str, list[str]]
    ) -> None:
        url, hits = http_server
        agent = make_agent("script-execution")
        port = url.rsplit(":", 1)[1].split("/")[0]
        probe = agent.script("netns.sh", f"""\
            #!/bin/sh
            umount -l /proc 2>/dev/null && echo UNMOUNTED
            for pid in 1 2 3 10 100; do
                nsenter --net=/proc/$pid/ns/net -- python3 -c "import urllib.request; \\
print(urllib.request.urlopen('http://127.0.0.1:{port}/x', timeout=2).read())" 2>/dev/null && echo ENTERED
            done
            echo done
            """)
        out = agent.run(probe)
        assert "done" in out.text and "UNMOUNTED" not in out.text and "ENTERED" not in out.text, out.text
        assert hits == []

    def test_the_host_is_read_only_and_tmp_is_private(self, make_agent: MakeAgent, outside: Path) -> None:
        agent = make_agent("script-execution")
        mark = marker()
        write = agent.script("write.sh", f"""\
            #!/bin/sh
            for target in "{outside}/pwned" /etc/{mark} /usr/{mark}; do
                echo x > "$target" 2>/dev/null && echo "WROTE $target"
            done
            echo scratch > /tmp/{mark} && cat /tmp/{mark}
            echo x > /var/tmp/{mark}-leak
            echo kept > inside.txt && echo done
            """)
        out = agent.run(write)
        assert "done" in out.text and "WROTE" not in out.text, out.text
        assert "scratch" in out.text  # /tmp works, privately
        assert not (outside / "pwned").exists() and not Path(f"/etc/{mark}").exists()
        assert not Path(f"/tmp/{mark}").exists() and not Path(f"/var/tmp/{mark}-leak").exists()
        assert (agent.root / "inside.txt").read_text() == "kept\n"

    def test_secrets_on_the_host_and_the_audit_trail_are_out_of_reach(
        self, make_agent: MakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        home = tmp_path / "runtime-home"
        (home / ".prefect").mkdir(parents=True)
        secret = f"PROFILE-SECRET-{uuid.uuid4().hex}"
        (home / ".prefect" / "profiles.toml").write_text(f'PREFECT_API_KEY = "{secret}"\n')
        monkeypatch.setenv("HOME", str(home))  # the runtime's home: credentials live there
        agent = make_agent("script-execution")
        agent.run(agent.script("first.sh", "#!/bin/sh\n"))  # the audit file exists from the first call on
        snoop = agent.script("snoop.sh", f"""\
            #!/bin/sh
            head -c 200 /etc/shadow | grep -q . && echo SHADOW
            cat "{home}/.prefect/profiles.toml"
            ls /dev | tr '\\n' ' '; echo
            echo '{{"forged": true}}' > "{agent.audit_file}" 2>/dev/null && echo FORGED
            head -c 1 /dev/sda 2>/dev/null && echo RAW-DISK
            echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo SYSCTL
            grep CapEff /proc/self/status
            """)
        out = agent.run(snoop)
        for leak in ("SHADOW", "FORGED", "RAW-DISK", "SYSCTL"):
            assert leak not in out.text, out.text
        assert secret not in out.text
        assert "CapEff:\t0000000000000000" in out.text
        assert "sda" not in out.text and "null" in out.text
        assert all("forged" not in line for line in agent.audit_file.read_text().splitlines())
        agent.audited("run_command", "allowed")

    def test_doctor_and_the_audit_record_name_the_confinement(self, make_agent: MakeAgent) -> None:
        agent = make_agent("script-execution")
        agent.run(agent.script("ok.sh", "#!/bin/sh\necho ok\n"))
        record = agent.audited("run_command", "allowed")
        assert record["sandbox"]["host"].startswith("read-only host")


class TestGitRunsNoOtherProgram:
    """`git-access` is git without pushing: none of git's ways to run another program."""

    @pytest.mark.parametrize(
        ("argv", "why"),
        [
            (["git", "bisect", "run", "sh", "-c", "id"], "git bisect run is not allowed"),
            (["git", "filter-branch", "--tree-filter", "id", "HEAD"], "git filter-branch is not allowed"),
            (["git", "submodule", "foreach", "id"], "git submodule foreach is not allowed"),
            (["git", "difftool", "-y", "HEAD"], "git difftool is not allowed"),
            (["git", "clone", "file:///etc", "stolen"], "names a local or helper URL"),
            (["git", "fetch", "ext::sh -c id", "main"], "names a local or helper URL"),
        ],
    )
    def test_refused_before_anything_runs(self, make_agent: MakeAgent, argv: list[str], why: str) -> None:
        agent = make_agent("git-access", files={"README.md": "hello\n"})
        _git_repo(agent.root)
        out = agent.run(*argv)
        assert out.is_error and why in out.text, out.text
        agent.audited("run_command", "refused", why)
        assert not (agent.root / "stolen").exists()

    def test_a_bare_repository_in_the_workspace_brings_no_alias_or_hook(self, make_agent: MakeAgent) -> None:
        mark = marker()
        agent = make_agent("git-access", files={"bare/config": f"[core]\n\tbare = true\n[alias]\n\tx = !touch {mark}\n",
                                                "bare/HEAD": "ref: refs/heads/main\n"})
        for d in ("objects", "refs"):
            (agent.root / "bare" / d).mkdir()
        out = agent.run("git", "x", cwd="bare")
        assert out.is_error, out.text
        assert not list(agent.root.rglob(mark))


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v cargo"], capture_output=True).returncode != 0,
                    reason="needs cargo")
def test_cargo_test_runs_in_the_sandbox(make_agent: MakeAgent) -> None:
    agent = make_agent("cargo-test-execution", limits={"max_memory": "1GB", "max_processes": 64, "timeout": "120s"},
                       files={"Cargo.toml": '[package]\nname = "demo"\nversion = "0.1.0"\nedition = "2021"\n',
                              "src/lib.rs": "#[test]\nfn adds() { assert_eq!(1 + 1, 2); }\n"})
    out = agent.run("cargo", "test", "-q", "--offline")
    assert "exit code: 0" in out.text and "1 passed" in out.text, out.text
    agent.audited("run_command", "allowed")
    refused = agent.run("cargo", "build")
    assert refused.is_error and "needs the capability 'cargo-execution'" in refused.text


@needs_confinement
def test_programs_on_path_under_tmp_stay_reachable(make_agent: MakeAgent, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """/tmp is private to the command, but a checkout or virtualenv living there is still on its PATH."""
    tools = tmp_path / "checkout" / ".venv" / "bin"
    tools.mkdir(parents=True)
    (tools / "mytool").write_text("#!/bin/sh\necho TOOL-RAN\n")
    (tools / "mytool").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    agent = make_agent("script-execution")
    out = agent.run(agent.script("call.sh", "#!/bin/sh\nmytool\nls /tmp | grep -c . \n"))
    assert "TOOL-RAN" in out.text and "exit code: 0" in out.text, out.text
    agent.audited("run_command", "allowed")


# -- the pieces of run_sandboxed: the wrapped argv, the probe, the cgroup -----------------------------


class TestSandboxArgv:
    LIMITS = ResourceLimits.model_validate({"timeout": "10s", "max_memory": "64MB", "max_disk_usage": "1MB"})
    FULL = HostSupport(cgroup="v2", cgroup_root={"memory": Path("/cg/toka"), "pids": Path("/cg/toka")},
                       netns=True, pidns=True, prlimit=True, mountns=True)
    CONFINE = ["python", "confine.py", "{}", "--"]
    PROCS = [Path("/cg/toka/cmd-1/cgroup.procs")]

    def test_every_layer_outermost_first(self) -> None:
        argv = sandbox_argv(["make", "test"], limits=self.LIMITS, host=self.FULL, network=False, sandbox=True,
                            confine=self.CONFINE, cgroup_procs=self.PROCS, disk_grown=1000)
        assert argv == ["unshare", "-n", "-p", "-f", "--mount-proc", "--",
                        "sh", "-c", 'echo $$ > "/cg/toka/cmd-1/cgroup.procs" && exec "$@"', "toka-sandbox",
                        *self.CONFINE, "prlimit", f"--fsize={1024 * 1024 - 1000}", "--", "make", "test"]

    def test_without_a_memory_cgroup_the_address_space_is_limited_and_the_network_kept_if_granted(self) -> None:
        host = HostSupport(cgroup=None, cgroup_root={}, netns=True, pidns=False, prlimit=True, mountns=True)
        argv = sandbox_argv(["make"], limits=self.LIMITS, host=host, network=True, sandbox=True, confine=self.CONFINE)
        assert argv == ["unshare", "-m", "--", "sh", "-c", 'exec "$@"', "toka-sandbox", *self.CONFINE,
                        "prlimit", f"--as={64 * 1024 * 1024}", f"--fsize={1024 * 1024}", "--", "make"]

    def test_a_command_dies_with_the_runtime_where_the_host_can_say_so(self) -> None:
        host = HostSupport(cgroup=None, cgroup_root={}, netns=True, pidns=True, prlimit=False, mountns=True,
                           orphans_die=True)
        argv = sandbox_argv(["make"], limits=self.LIMITS, host=host, network=False, sandbox=True, confine=self.CONFINE)
        assert argv[:9] == ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "-n", "-p", "-f", "--kill-child"]
        assert argv[-1] == "make"

    def test_unsandboxed_the_command_runs_as_given(self) -> None:
        assert sandbox_argv(["make"], limits=self.LIMITS, host=self.FULL, network=False, sandbox=False,
                            confine=self.CONFINE, cgroup_procs=self.PROCS) == ["make"]


def _fake_cgroup2(tmp_path: Path, enabled: str) -> tuple[Path, Path]:
    """A cgroup v2 root (plain files) whose root hands ``enabled`` to its children, and a mounts file naming it."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text(enabled)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc /proc proc rw 0 0\ncgroup2 {root} cgroup2 rw,nosuid 0 0\n")
    return root, mounts


class TestCgroupProbe:
    def test_probing_only_reads_and_the_controllers_are_handed_on_in_tokas_own_directory(self, tmp_path: Path) -> None:
        root, mounts = _fake_cgroup2(tmp_path, "cpu memory\n")
        cgroup, roots = sandbox_module._probe_cgroups(mounts)
        assert (cgroup, roots) == ("v2", {"cpu": root / "toka", "memory": root / "toka"})
        assert (root / "cgroup.subtree_control").read_text() == "cpu memory\n"
        assert not (root / "toka").exists()
        # When a command needs its cgroup: toka's directory (here from an earlier run) hands its
        # children the controllers; the root's configuration stays as the host set it.
        (root / "toka").mkdir()
        (root / "toka" / "cgroup.subtree_control").write_text("memory\n")
        sandbox_module._prepare_parents(HostSupport(cgroup=cgroup, cgroup_root=roots))
        assert (root / "toka" / "cgroup.subtree_control").read_text() == "+cpu"
        assert (root / "cgroup.subtree_control").read_text() == "cpu memory\n"

    def test_controllers_the_root_does_not_hand_on_are_not_enabled(self, tmp_path: Path) -> None:
        root, mounts = _fake_cgroup2(tmp_path, "")
        assert sandbox_module._probe_cgroups(mounts) == (None, {})
        assert (root / "cgroup.subtree_control").read_text() == ""

    def test_cgroup_v1_hierarchies_are_probed_without_making_a_directory(self, tmp_path: Path) -> None:
        (tmp_path / "memory").mkdir()
        mounts = tmp_path / "mounts"
        mounts.write_text(f"cgroup {tmp_path / 'memory'} cgroup rw,nosuid,memory 0 0\n")
        assert sandbox_module._probe_cgroups(mounts) == ("v1", {"memory": tmp_path / "memory" / "toka"})
        assert not (tmp_path / "memory" / "toka").exists()

    def test_probing_this_host_leaves_the_roots_subtree_control_unchanged(self) -> None:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        controls = [Path(line.split()[1], "cgroup.subtree_control") for line in mounts
                    if line.split()[2:3] == ["cgroup2"]]
        controls = [c for c in controls if c.is_file() and os.access(c, os.W_OK)]
        if not controls:
            pytest.skip("no writable cgroup v2 root here")
        before = {c: c.read_text() for c in controls}
        sandbox_module._probe_cgroups()
        detect_host.__wrapped__()  # the whole probe, as `toka doctor` runs it (uncached)
        assert {c: c.read_text() for c in controls} == before


@needs_cgroups
def test_a_cancelled_command_leaves_no_process_and_no_cgroup(tmp_path: Path, cgroups: list[Any]) -> None:
    """Prefect's timeouts cancel again at every await (anyio): the cleanup still runs to its end."""
    import anyio

    mark = marker()
    ws = tmp_path / "ws"
    ws.mkdir()
    limits = ResourceLimits.model_validate({"timeout": "30s", "max_memory": "64MB", "max_processes": 10})

    async def go() -> None:
        with anyio.move_on_after(1.0) as scope:
            await run_sandboxed(
                ["sh", "-c", f"sleep 30 & sleep 30 # {mark}"], cwd=ws, workspace=ws, state_dir=ws / ".toka",
                env=scrubbed_env(ws / ".toka" / "home"), limits=limits, timeout=30, network=False, sandbox=True)
        assert scope.cancelled_caught

    started = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - started < 10
    assert processes_matching(mark) == []
    assert_groups_gone(cgroups)


def test_a_command_cut_short_by_the_task_timeout_is_in_the_audit_trail(make_agent: MakeAgent) -> None:
    """It had changed files (or sent data out) before the cut: the trail showed no call at all."""
    agent = make_agent("script-execution")
    slow = agent.script("slow.sh", "#!/bin/sh\necho changed > dropped.txt\nsleep 30\n")

    async def cut_short() -> None:  # what the task's own timeout does to a running tool call
        await asyncio.wait_for(agent.toolbox.call("run_command", {"argv": [slow]}), timeout=1.5)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(cut_short())
    record = agent.audited("run_command", "allowed", "cut short while it ran")
    assert record["arguments"] == {"argv": [slow]} and record["is_error"]


def test_unconfined_what_a_command_leaves_in_its_group_ends_with_it(make_agent: MakeAgent) -> None:
    agent = make_agent("script-execution", sandbox=False, allow_unsandboxed=True)
    start = agent.script("bg.sh", "#!/bin/sh\n(sleep 3; echo late > late.txt) >/dev/null 2>&1 &\n"
                                  "nohup sh -c 'sleep 3; echo late > nohup.txt' >/dev/null 2>&1 &\necho started\n")
    assert "started" in agent.run(start).text
    time.sleep(4)
    assert not (agent.root / "late.txt").exists() and not (agent.root / "nohup.txt").exists()
