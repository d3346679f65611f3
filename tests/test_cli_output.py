"""What a person sees of the command line: help, version, tables in a terminal and in a pipe, where
the run's outputs are, and a state directory git does not show."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from toka.audit import AuditLog, audit_path
from toka.cli import app
from toka.runs import RunRecord
from toka.workspace import Workspace

from .conftest import AGENT_SPECS

runner = CliRunner()
TOKA = str(Path(sys.executable).with_name("toka"))


def toka(*args: str | Path, **env: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args], env=env or None)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


# --- a terminal, small enough to read ------------------------------------------------------------


class Screen:
    """The VT100 subset rich uses (cursor up, erase line, auto-wrap), with scrollback.

    What a terminal shows after the output ran through it: a live table that was not erased
    properly is still there.
    """

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.lines: list[list[str]] = [[]]
        self.row = self.col = 0
        self.wrap_next = False

    def _line(self) -> list[str]:
        while len(self.lines) <= self.row:
            self.lines.append([])
        return self.lines[self.row]

    def _top(self) -> int:  # the cursor cannot move above the visible screen
        return max(0, len(self.lines) - self.height)

    def _put(self, char: str) -> None:
        if self.wrap_next:
            self.row, self.col, self.wrap_next = self.row + 1, 0, False
        line = self._line()
        line.extend(" " * (self.col + 1 - len(line)))
        line[self.col] = char
        if self.col == self.width - 1:
            self.wrap_next = True
        else:
            self.col += 1

    def feed(self, text: str) -> Screen:
        i = 0
        while i < len(text):
            char = text[i]
            if char == "\x1b":
                csi = re.match(r"\x1b\[([?0-9;]*)([A-Za-z])", text[i:])
                osc = re.match(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)", text[i:])
                if csi:
                    self._csi(csi.group(1), csi.group(2))
                i += csi.end() if csi else osc.end() if osc else 2
                continue
            if char == "\r":
                self.col, self.wrap_next = 0, False
            elif char == "\n":
                self.row, self.wrap_next = self.row + 1, False
                self._line()
            elif char >= " ":
                self._put(char)
            i += 1
        return self

    def _csi(self, params: str, op: str) -> None:
        if params.startswith("?"):  # cursor shown or hidden
            return
        n = int(params.split(";")[0] or 0) if params else 0
        self.wrap_next = False
        if op == "A":
            self.row = max(self._top(), self.row - max(n, 1))
        elif op == "B":
            self.row += max(n, 1)
            self._line()
        elif op == "C":
            self.col = min(self.width - 1, self.col + max(n, 1))
        elif op == "D":
            self.col = max(0, self.col - max(n, 1))
        elif op == "G":
            self.col = max(n, 1) - 1
        elif op == "K":
            line = self._line()
            if n == 0:
                del line[self.col:]
            elif n == 1:
                line[: self.col + 1] = [" "] * min(len(line), self.col + 1)
            else:
                line.clear()

    @property
    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.lines).strip("\n")


def run_in_pty(argv: list[str], *, cwd: Path, env: dict[str, str], width: int = 100, height: int = 40,
               timeout: float = 240) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal of ``width`` x ``height``; its exit code and final screen."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
        else:
            raise AssertionError(f"{argv} did not end within {timeout} s")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = b"".join(chunks).decode("utf-8", "replace")
    return proc.returncode, Screen(width, height).feed(text).text


def test_the_screen_keeps_what_was_not_erased() -> None:
    assert Screen(10, 5).feed("abc\r\ndef\r\n\x1b[2K\x1b[1A\x1b[2Kxy\r\n").text == "abc\nxy"
    assert Screen(4, 5).feed("abcdef\r\n").text == "abcd\nef"  # the terminal wraps a long line
    # A line the terminal wrapped takes two rows: moving up one row leaves the first behind.
    assert Screen(4, 5).feed("abcdef\r\n\x1b[1A\x1b[2K").text == "abcd"


# --- help and version ---------------------------------------------------------------------------

COMMANDS = [[], ["validate"], ["plan"], ["schema"], ["run"], ["doctor"], ["audit"], ["deployments"], ["limits"],
            ["limits", "apply"], ["limits", "check"]]


def test_version() -> None:
    code, out, _ = toka("--version")
    assert code == 0
    assert out.strip() == f"toka-runtime {version('toka-runtime')}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "toka")
def test_h_is_help_without_raw_type_labels(command: list[str]) -> None:
    code, short, _ = toka(*command, "-h", COLUMNS="200")
    assert code == 0, short
    assert short.lstrip().startswith("Usage: toka")
    assert short == toka(*command, "--help", COLUMNS="200")[1]
    labels = re.findall(r"<[A-Za-z][\w\[\], |]*>", short)
    assert not labels, f"raw type labels in `toka {' '.join(command)} -h`: {labels}"


def test_option_help_shows_metavars() -> None:
    _, out, _ = toka("run", "-h", COLUMNS="200")
    for option, metavar in [("--agent", "NAME"), ("--workspace", "DIR"), ("--json", "FILE"),
                            ("--request-timeout", "SECONDS"), ("--max-concurrency", "N"), ("--approve", "KEY")]:
        assert re.search(rf"{option}\b.*\b{metavar}\b", out), (option, metavar)


def test_plan_agent_help_says_plan() -> None:
    _, out, _ = toka("plan", "-h", COLUMNS="200")
    assert "Plan only this agent" in out and "Run only" not in out


# --- toka audit ---------------------------------------------------------------------------------

LONG_AGENT = "an-agent-whose-name-is-long-enough-to-be-cut-in-a-narrow-table-x"
LONG_TOOL = "a_tool_with_a_name_long_enough_to_be_folded_too"


@pytest.fixture
def audited(tmp_path: Path) -> Path:
    """A workspace whose last run (run-1) made three tool calls."""
    state = tmp_path / ".toka"
    RunRecord.start(specs=["agent_specs"], agents=[], model="offline", contexts=[], run_key="run-1").save(state)
    log = AuditLog(audit_path(state, "run-1"), run="run-1")
    log.record(agent="repo-survey", task=1, tool="read_file", arguments={"path": "README.md"}, decision="allowed",
               duration_s=0.01)
    log.record(agent="repo-survey", task=2, tool="run_command", arguments={"argv": ["git", "push"]},
               decision="refused", reason="git-push was not approved\nfor this run", duration_s=0.0)
    log.record(agent=LONG_AGENT, task=3, tool=LONG_TOOL, arguments={}, decision="allowed", duration_s=0.2)
    return tmp_path


def test_audit_names_an_unknown_run(audited: Path) -> None:
    code, out, err = toka("audit", "--workspace", audited, "--run", "run-2")
    assert code == 2, out + err
    assert "--run: unknown run 'run-2'; did you mean 'run-1'?" in err
    assert "runs with an audit trail here: run-1" in err


@pytest.mark.parametrize("scope", [["--run", "run-1"], [], ["--all"]], ids=["run", "last-run", "all"])
def test_audit_names_an_unknown_agent(audited: Path, scope: list[str]) -> None:
    code, out, err = toka("audit", "--workspace", audited, *scope, "--agent", "repo-survy")
    assert code == 2, out + err
    assert "--agent: unknown agent 'repo-survy'" in err and "did you mean 'repo-survey'?" in err
    assert f"agents with tool calls there: {LONG_AGENT}, repo-survey" in err


def test_audit_of_the_last_run_without_tool_calls_is_empty(audited: Path) -> None:
    RunRecord.start(specs=["agent_specs"], agents=[], model="offline", contexts=[], run_key="run-3").save(
        audited / ".toka")
    for args in [[], ["--run", "run-3"]]:
        code, out, err = toka("audit", "--workspace", audited, *args)
        assert code == 0, err
        assert "0 tool calls, 0 refused" in out


def test_audit_of_a_known_agent(audited: Path) -> None:
    code, out, _ = toka("audit", "--workspace", audited, "--agent", "repo-survey")
    assert code == 0
    assert "2 tool calls, 1 refused" in out


def test_audit_without_any_run_says_what_to_do(tmp_path: Path) -> None:
    code, _, err = toka("audit", "--workspace", tmp_path)
    assert code == 2
    assert "no run is recorded" in err and "--run KEY, or use --all" in err


def test_audit_in_a_pipe_prints_one_line_per_call_with_whole_names(audited: Path) -> None:
    code, out, _ = toka("audit", "--workspace", audited, COLUMNS="80")
    assert code == 0
    assert "…" not in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 3, out
    assert LONG_AGENT in rows[2] and LONG_TOOL in rows[2]
    assert "git-push was not approved for this run" in rows[1]  # a reason's lines joined


# --- the summary table --------------------------------------------------------------------------


def _summary(*, first: str = LONG_AGENT, then: str = "repo-survey", flow_run_id: str | None = None,
             run_key: str = "k1") -> Any:
    from toka.results import AgentReport, PipelineSummary

    return PipelineSummary(
        run_key=run_key, model="offline", offline=True, state="failed", flow_run_id=flow_run_id,
        agents=[AgentReport(agent=first, state="failed",
                            reason="task 2/4 (critical) failed: " + "the tool kept failing " * 6 + "\nat the end"),
                AgentReport(agent=then, state="not-run", reason=f"required dependency {first} failed")])


def test_summary_in_a_pipe_prints_one_line_per_agent_with_whole_names(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from toka.cli import _print_summary

    monkeypatch.setenv("COLUMNS", "80")
    _print_summary(_summary())
    out = capsys.readouterr().out
    assert "…" not in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 2, out
    assert LONG_AGENT in rows[0] and "the tool kept failing " * 6 + "at the end" in rows[0]
    assert out.splitlines()[0] == "run k1: failed"


# --- toka run in a terminal, without Prefect ------------------------------------------------------


@pytest.fixture
def restored_environment() -> Any:
    """`toka run` sets Prefect's environment variables (setdefault) for its process: undo that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_run_with_verbose_in_a_terminal_leaves_one_table_and_says_where_everything_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored_environment: None
) -> None:
    """Prefect's log lines (--verbose) reach the terminal behind rich's back, as its handler
    holds the terminal's stream: a live table drawn between them leaves copies behind."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings
    from rich.console import Console

    import toka.cli as cli
    from toka.progress import ProgressEvent, notify

    terminal = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=terminal, force_terminal=True, width=100, height=40,
                                            highlight=False, soft_wrap=True, emoji=False))
    monkeypatch.setattr(cli, "out", Console(file=terminal, force_terminal=True, width=100, height=40,
                                            highlight=False, soft_wrap=True, emoji=False))

    async def fake_execute(plan: Any, specs: list[str], agents: list[str], config: Any, *,
                           results_dir: Path, earlier: str | None = None) -> Any:
        for name in ["repo-survey", "dependency-audit"]:
            notify(ProgressEvent("agent-started", name))
            for task in (1, 2):
                notify(ProgressEvent("task-started", name, task=task, total=2, description="look around"))
                await asyncio.sleep(0.15)
                terminal.write(f"12:00:00.000 | INFO    | Task run '{name} - {task}/2' - Finished in state Completed()\n")
                notify(ProgressEvent("task-finished", name, state="completed", task=task, total=2))
            notify(ProgressEvent("agent-finished", name, state="completed"))
        return _summary(first="repo-survey", then="dependency-audit", flow_run_id="0b7e5c1d",
                        run_key=config.run_key)

    monkeypatch.setattr(cli, "_execute", fake_execute)
    monkeypatch.chdir(tmp_path)
    # A server that outlives the run (nothing listens there; the fake run never asks it).
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        code, _, _ = toka("run", AGENT_SPECS, "-a", "dependency-audit", "--model", "offline", "--run-key", "r1",
                          "--needs-approval", "none", "--json", "summary.json", "--verbose")
    assert code == 1  # the fake summary says failed
    screen = Screen(100, 40).feed(terminal.getvalue().replace("\n", "\r\n")).text
    live_tables = re.findall(r"^agent +state +tasks +current", screen, flags=re.M)
    assert len(live_tables) <= 1, screen
    assert len(re.findall(r"^run r1: failed$", screen, flags=re.M)) == 1, screen

    assert "reports:     .toka/reports/r1/ (pipeline.md, and <agent>.md for each agent)" in screen
    assert "audit trail: none (no tool calls)" in screen
    assert "summary:     summary.json" in screen
    assert "Prefect UI:  http://127.0.0.1:9/runs/flow-run/0b7e5c1d" in screen
    reports = tmp_path / ".toka" / "reports" / "r1"
    assert sorted(p.name for p in reports.iterdir()) == ["dependency-audit.md", "pipeline.md", "repo-survey.md"]
    assert (reports / "pipeline.md").read_text().startswith("# Pipeline: failed")
    assert (reports / "dependency-audit.md").read_text().startswith("# dependency-audit: not-run")


def test_run_on_the_embedded_server_says_it_is_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its first start takes 10-30 s: a line says what the person waits for."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    from toka import lifecycle

    class NoServer:  # Prefect keeps one server object per port: a class patch could miss it
        def start(self) -> None:
            raise RuntimeError("not started in this test")

    monkeypatch.setattr(lifecycle, "_EmbeddedServer", NoServer)
    said: list[str] = []
    guard = lifecycle.RunGuard(hint="", write=said.append, notice=said.append)
    # As on a fresh machine, whatever test ran before (a temporary API) set.
    plain = temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_ENABLED: True}, restore_defaults={PREFECT_API_URL})
    with plain, pytest.raises(RuntimeError, match="not started"):
        with guard:
            pass
    assert said == ["starting Prefect's embedded server (10-30 s the first time)..."]


# --- the state directory and git ----------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    (tmp_path / "README.md").write_text("# demo\n")
    return tmp_path


def test_the_state_directory_is_not_untracked_in_git(repo: Path) -> None:
    state = Workspace(repo).make_state_dir()
    RunRecord.start(specs=["agent_specs"], agents=[], model="offline", contexts=[], run_key="k").save(state)
    (state / "results").mkdir()
    (state / "results" / "x").write_text("{}")
    status = git(repo, "status", "--porcelain", "--untracked-files=all")
    assert ".toka" not in status and "README.md" in status
    assert not (repo / ".gitignore").exists()  # the person's own .gitignore is not touched


def test_a_state_directory_made_before_gets_its_gitignore(repo: Path) -> None:
    (repo / ".toka" / "runs").mkdir(parents=True)  # by an older toka, or a worker's first task
    (repo / ".toka" / "runs" / "last.json").write_text("{}")
    Workspace(repo)
    assert ".toka" not in git(repo, "status", "--porcelain", "--untracked-files=all")


def test_a_state_directory_of_the_callers_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "records").mkdir()
    Workspace(tmp_path, state_dir=tmp_path / "records").make_state_dir()
    assert not (tmp_path / "records" / ".gitignore").exists()
    Workspace(tmp_path, state_dir=tmp_path / "new-records").make_state_dir()
    assert (tmp_path / "new-records" / ".gitignore").read_text().splitlines()[-1] == "*"


# --- the real thing -----------------------------------------------------------------------------


@pytest.mark.slow
def test_toka_run_in_a_terminal(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`toka run` as a person sees it the first time (a fresh Prefect home): a line while the embedded
    server starts, the live table gone at the end, the summary table once, where everything is; git
    shows nothing of .toka."""
    shutil.copytree(AGENT_SPECS, repo / "agent_specs")
    home = tmp_path_factory.mktemp("fresh-prefect-home")
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "COLUMNS", "LINES")}
    env.update(PREFECT_HOME=str(home), NO_COLOR="1", TERM="xterm")
    code, screen = run_in_pty([TOKA, "run", "--json", "summary.json"], cwd=repo, env=env)
    assert code == 0, screen
    key = json.loads((repo / "summary.json").read_text())["run_key"]
    lines = screen.splitlines()
    assert "starting Prefect's embedded server (10-30 s the first time)..." in lines, screen
    assert lines.index("starting Prefect's embedded server (10-30 s the first time)...") < lines.index(
        f"run {key}: completed")
    assert not re.search(r"^agent +state +tasks +current", screen, flags=re.M), screen  # the live table
    for agent in ["repo-survey", "dependency-audit", "test-health", "docs-refresh", "release-notes"]:
        assert sum(line.startswith(f"│ {agent} ") for line in lines) == 1, screen
    assert lines.count(f"run {key}: completed") == 1
    assert f"reports:     .toka/reports/{key}/ (pipeline.md, and <agent>.md for each agent)" in lines
    assert f"audit trail: .toka/audit/{key}.jsonl (toka audit --run {key})" in lines
    assert "summary:     summary.json" in lines
    assert not any(line.startswith("Prefect UI:") for line in lines)  # the embedded server is gone
    assert (repo / ".toka" / "reports" / key / "release-notes.md").is_file()
    assert ".toka" not in git(repo, "status", "--porcelain", "--untracked-files=all")
    assert (home / "prefect.db").is_file()  # the embedded server made (and migrated) its database
