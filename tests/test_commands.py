"""``run_command``'s gate: which argv each capability allows, argument injection, and the scrubbed env.

The table-driven tests call :func:`toka.commands.check_command` directly; the
injection cases go through ``Toolbox.call`` (as the model's calls do) and check
the audit record of each. Cases named ``was-bug-*`` were real escapes, found by these tests and fixed; they assert the
correct behaviour.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest

from toka.audit import AuditLog, read_audit
from toka.commands import COMMAND_CAPABILITIES, CommandRefused, RunCommand, check_command, scrubbed_env
from toka.tools import ToolContext, Toolbox
from toka.workspace import Workspace

from .test_sandbox import FILE_TOOLS, MakeAgent, _git_repo, make_agent, outside  # noqa: F401 (fixtures)

ALL = frozenset(COMMAND_CAPABILITIES) | {"network-access"}


def cases(rows: list[Any]) -> list[Any]:
    """pytest params with readable ids: ``capabilities: argv`` (``all`` for every command capability)."""
    params = []
    for row in rows:
        if hasattr(row, "marks"):  # already a pytest.param
            params.append(row)
            continue
        caps = {row[0]} if isinstance(row[0], str) else set(row[0])
        who = "all" if caps >= set(COMMAND_CAPABILITIES) else ",".join(sorted(caps)) or "none"
        params.append(pytest.param(*row, id=f"{who}: {' '.join(row[1])[:60] or '[]'}"))
    return params


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace with a script, a Python tool, a database, and links pointing out of it."""
    root = (tmp_path / "ws").resolve()
    (root / "tools").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("outside\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "tools" / "x.py").write_text("print('x')\n")
    (root / "data.db").write_bytes(b"")
    (root / "README.md").write_text("# readme\n")
    (root / "link.db").symlink_to(tmp_path / "outside" / "secret.txt")
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "shell").symlink_to("/bin/sh")
    return root


def check(argv: list[str], capabilities: set[str] | frozenset[str], ws: Path) -> Any:
    return check_command(argv, capabilities=set(capabilities), workspace=ws)


# -- what each capability allows ---------------------------------------------------------------------------

ALLOWED: list[tuple[str, list[str], bool]] = [
    # capability, argv, pushes
    ("cargo-execution", ["cargo", "build"], False),
    ("cargo-execution", ["cargo", "run", "--release"], False),
    ("cargo-execution", ["cargo", "test"], False),
    ("cargo-execution", ["cargo", "clippy", "--", "-D", "warnings"], False),
    ("cargo-test-execution", ["cargo", "test"], False),
    ("cargo-test-execution", ["cargo", "-q", "test", "--", "--nocapture"], False),
    ("cargo-test-execution", ["cargo", "test", "--workspace", "--target-dir=target/t"], False),
    ("git-access", ["git", "status"], False),
    ("git-access", ["git", "log", "-5", "--oneline"], False),
    ("git-access", ["git", "--no-pager", "diff", "HEAD~1"], False),
    ("git-access", ["git", "config", "--get", "user.name"], False),
    ("git-access", ["git", "config", "--list"], False),
    ("git-access", ["git", "config", "-l"], False),
    ("git-access", ["git", "config", "--show-origin", "--get-regexp", "^alias\\."], False),
    ("git-access", ["git", "config", "get", "user.email"], False),
    ("git-access", ["git", "config", "--file", "setup.cfg", "--list"], False),
    # one-letter options bundled, as git reads them
    ("git-access", ["git", "config", "-lz"], False),
    ("git-access", ["git", "config", "-zl", "--show-origin"], False),
    ("git-access", ["git", "config", "-zf", "setup.cfg", "--get", "metadata.name"], False),
    ("git-access", ["git", "commit", "-m", "message"], False),
    ("git-access", ["git", "grep", "-c", "TODO"], False),  # -c refused for clone only
    ("git-access", ["git", "log", "-S", "fix", "--", "-x"], False),  # after `--`: paths
    ("git-access", ["git", "log", "--exclude=tmp", "--all"], False),  # no refused option starts so
    ("git-push", ["git", "push"], True),
    ("git-push", ["git", "push", "origin", "main"], True),
    ("git-push", ["git", "send-pack", "origin"], True),
    ("git-push", ["git", "send-email", "patch.txt"], True),
    ("script-execution", ["./run.sh"], False),
    ("script-execution", ["./run.sh", "--flag", "value"], False),
    ("script-execution", ["tools/x.py"], False),
    ("script-execution", ["python3", "tools/x.py", "--out=out.txt"], False),
    ("script-execution", ["python", "-u", "tools/x.py"], False),
    ("script-execution", ["bash", "run.sh"], False),
    ("script-execution", ["sh", "-e", "run.sh"], False),
    ("python-test-execution", ["pytest"], False),
    ("python-test-execution", ["pytest", "-q", "tests/"], False),
    ("python-test-execution", ["python", "-m", "pytest", "-x"], False),
    ("python-test-execution", ["python3", "-m", "pytest"], False),
    ("database-access", ["sqlite3", "data.db", "select 1"], False),
    ("database-access", ["sqlite3", "new.db", "create table t(a)"], False),  # may not exist yet
    ("database-access", ["sqlite3", "-json", "data.db", "select 1"], False),
    ("database-access", ["sqlite3"], False),  # an in-memory database
]


@pytest.mark.parametrize(("capability", "argv", "pushes"), cases(ALLOWED))
def test_each_capability_allows_its_programs(ws: Path, capability: str, argv: list[str], pushes: bool) -> None:
    grant = check(argv, {capability}, ws)
    assert grant.capability == capability
    assert grant.pushes is pushes
    # ... and the same argv with every capability still names a capability that allows it
    assert check(argv, ALL, ws).capability in ALL


@pytest.mark.parametrize(("capability", "argv", "pushes"), cases(ALLOWED))
def test_nothing_is_allowed_without_its_capability(ws: Path, capability: str, argv: list[str], pushes: bool) -> None:
    cargo = {"cargo-execution", "cargo-test-execution"}
    others = ALL - {capability} - (cargo if argv[0] == "cargo" else set())
    with pytest.raises(CommandRefused, match="needs the capability") as refused:
        check(argv, others, ws)
    if argv[0] != "cargo":  # `cargo test` without either cargo capability asks for the narrower one
        assert f"needs the capability {capability!r}" in str(refused.value)


def test_cargo_execution_covers_cargo_test_too(ws: Path) -> None:
    assert check(["cargo", "test"], {"cargo-execution", "cargo-test-execution"}, ws).capability == "cargo-execution"


def test_the_table_names_every_command_capability() -> None:
    assert COMMAND_CAPABILITIES == {
        "cargo-execution": ("cargo",),
        "cargo-test-execution": ("cargo test",),
        "git-access": ("git",),
        "git-push": ("git push",),
        "script-execution": ("workspace scripts",),
        "python-test-execution": ("pytest", "python -m pytest"),
        "database-access": ("sqlite3",),
    }


# -- what is refused, and why -----------------------------------------------------------------------------

MUST_BE_A_SCRIPT = "may only run a script file inside the workspace"
OUTSIDE_ARG = "points outside the workspace"
GIT_GLOBAL = "git options before the subcommand"
GIT_RUNS = "git options that run other programs"
SQLITE = "sqlite3 dot-commands, -cmd, -init and the file and program functions"
CARGO = "cargo options that change its configuration"







REFUSED: list[Any] = [
    # capabilities, argv, the reason (a regex)
    (set(), [], "argv must name a program"),
    (set(), [""], "argv must name a program"),
    (set(), ["curl", "https://example.com"], r"the program 'curl' is not granted .*this agent may run: nothing"),
    (ALL, ["rm", "-rf", "."], r"'rm' is not granted"),
    (ALL, ["env", "sh"], r"'env' is not granted"),
    ({"git-access", "database-access"}, ["wget", "x"], r"this agent may run: git, sqlite3$"),
    # interpreters: only a script file inside the workspace
    ({"script-execution"}, ["sh"], re.escape(MUST_BE_A_SCRIPT)),
    ({"script-execution"}, ["sh", "-c", "id"], re.escape(MUST_BE_A_SCRIPT)),
    ({"script-execution"}, ["bash", "-c", "id", "run.sh"], re.escape(MUST_BE_A_SCRIPT)),
    ({"script-execution"}, ["python", "-c", "print(1)"], re.escape(MUST_BE_A_SCRIPT)),
    ({"script-execution"}, ["python3", "-c", "print(1)", "tools/x.py"], re.escape(MUST_BE_A_SCRIPT)),
    ({"script-execution"}, ["python3", "-m", "http.server"], re.escape(MUST_BE_A_SCRIPT)),
    ({"python-test-execution", "script-execution"}, ["python", "-m", "pip", "install", "evil"],
     re.escape(MUST_BE_A_SCRIPT)),
    ({"script-execution"}, ["python3", "missing.py"], r"the script 'missing.py' does not exist in the workspace"),
    ({"script-execution"}, ["python3", "tools"], r"the script 'tools' does not exist"),
    ({"script-execution"}, ["./missing.sh"], r"does not exist in the workspace"),
    ({"script-execution"}, ["/bin/sh", "run.sh"], r"the script '/bin/sh' is outside the workspace"),
    ({"script-execution"}, ["../outside/secret.txt"], r"the script '../outside/secret.txt' is outside"),
    ({"script-execution"}, ["./shell", "-c", "id"], r"the script './shell' is outside the workspace"),
    ({"script-execution"}, ["sh", "shell"], r"the argument 'shell' points outside the workspace"),
    ({"script-execution"}, ["python3", "../x.py"], OUTSIDE_ARG),
    ({"python-test-execution"}, ["./run.sh"], r"needs the capability 'script-execution'"),
    ({"python-test-execution"}, ["python", "tools/x.py"], r"needs the capability 'script-execution'"),
    # arguments that leave the workspace, for every program
    ({"script-execution"}, ["./run.sh", "../../etc/passwd"], OUTSIDE_ARG),
    ({"script-execution"}, ["./run.sh", "--file=../../etc/passwd"], OUTSIDE_ARG),
    ({"script-execution"}, ["./run.sh", "/etc/passwd"], OUTSIDE_ARG),
    ({"script-execution"}, ["./run.sh", "--in=/proc/self/environ"], OUTSIDE_ARG),
    ({"script-execution"}, ["./run.sh", "/proc/self/environ"], OUTSIDE_ARG),
    ({"script-execution"}, ["./run.sh", "~/.ssh/id_rsa"], OUTSIDE_ARG),
    ({"script-execution"}, ["./run.sh", "tools/../../x"], OUTSIDE_ARG),
    ({"script-execution"}, ["./run.sh", "tools/../.."], OUTSIDE_ARG),
    ({"python-test-execution"}, ["pytest", "--rootdir=.."], OUTSIDE_ARG),
    ({"python-test-execution"}, ["pytest", "-c", "/etc/pytest.ini"], OUTSIDE_ARG),
    ({"git-access"}, ["git", "log", "--output=../../x"], OUTSIDE_ARG),
    ({"git-access"}, ["git", "diff", "--no-index", "/etc/passwd", "README.md"], OUTSIDE_ARG),
    pytest.param({"git-access"}, ["git", "diff", "--no-index", "escape/secret.txt", "README.md"], "outside", id="was-bug-symlink-argument"),
    pytest.param({"git-access"}, ["git", "archive", "-o/tmp/toka-dump.tar", "HEAD"], "outside", id="was-bug-attached-short-option-path"),
    # git: options that run programs or change where it works
    ({"git-access"}, ["git", "-c", "core.sshCommand=touch pwned", "status"], GIT_GLOBAL),
    ({"git-access"}, ["git", "-c", "core.pager=sh", "log"], GIT_GLOBAL),
    ({"git-access"}, ["git", "--config-env=core.pager=EVIL", "log"], GIT_GLOBAL),
    ({"git-access"}, ["git", "-C", "sub", "status"], GIT_GLOBAL),
    ({"git-access"}, ["git", "-C", "/", "status"], OUTSIDE_ARG),
    ({"git-access"}, ["git", "--git-dir=.git", "status"], GIT_GLOBAL),
    ({"git-access"}, ["git", "--work-tree", "sub", "status"], GIT_GLOBAL),
    ({"git-access"}, ["git", "--exec-path=tools", "status"], GIT_GLOBAL),
    ({"git-access"}, ["git", "fetch", "--upload-pack=touch pwned", "origin"], GIT_RUNS),
    ({"git-access"}, ["git", "clone", "--upload-pack", "touch pwned", "src", "dst"], GIT_RUNS),
    ({"git-access"}, ["git", "ls-remote", "--upload-pack=touch pwned", "origin"], GIT_RUNS),
    ({"git-access", "git-push"}, ["git", "push", "--receive-pack=touch pwned"], GIT_RUNS),
    ({"git-access"}, ["git", "archive", "--remote=origin", "--exec=touch pwned", "HEAD"], GIT_RUNS),
    ({"git-access"}, ["git", "rebase", "--exec", "touch pwned", "HEAD~1"], GIT_RUNS),
    ({"git-access"}, ["git", "clone", "--config", "core.fsmonitor=touch pwned", "src", "dst"], GIT_RUNS),
    ({"git-access"}, ["git", "init", "--template=tpl"], GIT_RUNS),
    ({"git-access"}, ["git", "config", "core.pager", "evil"], r"git config may only be read"),
    ({"git-access"}, ["git", "config", "--add", "alias.x", "!sh"], r"git config may only be read"),
    ({"git-access"}, ["git", "config", "--edit"], r"git config may only be read"),
    ({"git-access"}, ["git", "config", "set", "core.fsmonitor", "touch pwned"], r"git config may only be read"),
    # A read action as an operand (after `--`, or a value pattern) does not make the call a read.
    pytest.param({"git-access"}, ["git", "config", "--global", "--", "alias.pwn", "!sh", "--list"],
                 r"git config may only be read", id="was-bug-git-config-list-as-value-pattern"),
    ({"git-access"}, ["git", "config", "--global", "alias.pwn", "!sh", "--list"], r"git config may only be read"),
    ({"git-access"}, ["git", "config", "--get", "--unset", "alias.x"], r"git config may only be read"),
    ({"git-access"}, ["git", "config", "--file", "--list", "alias.x", "!sh"], r"git config may only be read"),
    ({"git-access"}, ["git", "config", "--replace-all", "core.pager", "sh", "--get"], r"git config may only be read"),
    ({"git-access"}, ["git", "config", "-le"], r"git config may only be read"),  # -e: --edit
    ({"git-access"}, ["git", "config", "-lf", "--list", "alias.x", "!sh"], r"git config may only be read"),
    ({"git-access"}, ["git", "config", "-zf/etc/gitconfig", "-l"], OUTSIDE_ARG),
    pytest.param({"git-access"}, ["git", "grep", "-Otouch pwned", "hello"], "program", id="was-bug-git-grep-O"),
    pytest.param({"git-access"}, ["git", "grep", "--open-files-in-pager=touch pwned", "hello"], "program", id="was-bug-git-grep-open-files-in-pager"),
    # git takes any unambiguous prefix of a long option, and short options bundled with their value
    pytest.param({"git-access"}, ["git", "grep", "--open-files=sh -c 'id > x'", "hello"], GIT_RUNS, id="was-bug-git-abbreviated-open-files"),
    pytest.param({"git-access"}, ["git", "ls-remote", "--upload-pac=touch pwned", "."], GIT_RUNS, id="was-bug-git-abbreviated-upload-pack"),
    pytest.param({"git-access"}, ["git", "archive", "--remote=.", "--exe=touch pwned", "HEAD"], GIT_RUNS, id="was-bug-git-abbreviated-exec"),
    pytest.param({"git-access"}, ["git", "clone", "--conf", "core.fsmonitor=touch pwned", "src", "dst"], GIT_RUNS, id="was-bug-git-abbreviated-config"),
    pytest.param({"git-access"}, ["git", "grep", "-nOtouch", "hello"], GIT_RUNS, id="was-bug-git-bundled-O"),
    pytest.param({"git-access"}, ["git", "rebase", "-ix", "touch pwned", "HEAD~1"], GIT_RUNS, id="was-bug-git-bundled-x"),
    pytest.param({"git-access"}, ["git", "clone", "-c", "core.sshCommand=touch pwned", "ssh://h/r", "dst"], GIT_RUNS, id="was-bug-git-clone-c"),
    pytest.param({"git-access"}, ["git", "clone", "-qc", "core.sshCommand=touch pwned", "ssh://h/r", "dst"], GIT_RUNS, id="was-bug-git-clone-bundled-c"),
    # git: narrow scopes
    ({"git-access"}, ["git", "push"], r"git push needs the capability 'git-push'"),
    ({"git-access"}, ["git", "push", "--force", "origin", "main"], r"git push needs the capability 'git-push'"),
    ({"git-access"}, ["git", "send-pack", "origin"], r"git send-pack needs the capability 'git-push'"),
    # git's other ways to send: WebDAV push (reached a host server with git-access alone), the
    # transport helpers a push runs, mail, LFS, svn and p4
    pytest.param({"git-access"}, ["git", "http-push", "http://h/r.git/", "main"],
                 r"git http-push needs the capability 'git-push'", id="was-bug-git-http-push"),
    ({"git-access"}, ["git", "remote-https", "origin", "https://h/r"], r"git remote-https needs the capability"),
    ({"git-access"}, ["git", "imap-send"], r"git imap-send needs the capability 'git-push'"),
    ({"git-access"}, ["git", "lfs", "push", "origin"], r"git lfs push needs the capability 'git-push'"),
    ({"git-access"}, ["git", "lfs", "pre-push", "origin", "https://h/r"], r"git lfs pre-push needs the capability"),
    ({"git-access"}, ["git", "subtree", "push", "-P", "lib", "https://h/r", "main"], r"git subtree needs the capability"),
    ({"git-access"}, ["git", "svn", "dcommit"], r"git svn needs the capability 'git-push'"),
    ({"git-push"}, ["git", "status"], r"git status needs the capability 'git-access'"),
    ({"git-push"}, ["git"], r"git needs the capability 'git-access'"),
    # cargo
    ({"cargo-test-execution"}, ["cargo", "build"], r"cargo build needs the capability 'cargo-execution'"),
    ({"cargo-test-execution"}, ["cargo", "run"], r"cargo run needs the capability 'cargo-execution'"),
    ({"cargo-test-execution"}, ["cargo", "install", "evil"], r"needs the capability 'cargo-execution'"),
    ({"cargo-test-execution"}, ["cargo"], r"cargo needs the capability 'cargo-execution'"),
    ({"cargo-execution"}, ["cargo", "--config", "build.rustc-wrapper='sh'", "build"], CARGO),
    ({"cargo-execution"}, ["cargo", "build", "--config=target.x.runner='sh'"], CARGO),
    ({"cargo-test-execution"}, ["cargo", "test", "--config", "x=1"], CARGO),
    ({"cargo-execution"}, ["cargo", "-Zunstable-options", "build"], CARGO),
    ({"cargo-execution"}, ["cargo", "build", "--manifest-path", "tools/Cargo.toml"], CARGO),
    ({"cargo-execution"}, ["cargo", "build", "--manifest-path=../x/Cargo.toml"], OUTSIDE_ARG),
    ({"cargo-execution"}, ["cargo", "build", "--target-dir", "/tmp/t"], OUTSIDE_ARG),
    # sqlite3
    ({"database-access"}, ["sqlite3", "data.db", ".shell id"], SQLITE),
    ({"database-access"}, ["sqlite3", "data.db", ".system id"], SQLITE),
    ({"database-access"}, ["sqlite3", "data.db", ".output /tmp/x"], SQLITE),
    ({"database-access"}, ["sqlite3", "-cmd", ".shell id", "data.db"], SQLITE),
    ({"database-access"}, ["sqlite3", "-init", "tools/x.py", "data.db"], SQLITE),
    ({"database-access"}, ["sqlite3", "data.db", "SELECT LOAD_EXTENSION('evil')"], SQLITE),
    ({"database-access"}, ["sqlite3", "../other.db"], OUTSIDE_ARG),
    ({"database-access"}, ["sqlite3", "/tmp/other.db"], OUTSIDE_ARG),
    ({"database-access"}, ["sqlite3", "link.db", "select 1"], r"the argument 'link.db' points outside the workspace"),
    pytest.param({"database-access"}, ["sqlite3", "data.db", "select readfile('/etc/passwd')"], "readfile", id="was-bug-sqlite-readfile"),
    pytest.param({"database-access"}, ["sqlite3", "data.db", "select edit('x', 'touch pwned')"], "edit", id="was-bug-sqlite-edit"),
    # interpreters: -c hidden behind an option value or glued to its code
    pytest.param({"script-execution"}, ["python3", "-W", "README.md", "-c", "print(1)"], "-c", id="was-bug-python-W-file-c"),
    pytest.param({"script-execution"}, ["python3", "-cprint(1)", "README.md"], "-c", id="was-bug-python-glued-c"),
    pytest.param({"script-execution"}, ["bash", "--rcfile", "README.md", "-c", "id"], "-c", id="was-bug-bash-rcfile-c"),
]


@pytest.mark.parametrize(("capabilities", "argv", "reason"), cases(REFUSED))
def test_refused_commands_say_why(ws: Path, capabilities: set[str], argv: list[str], reason: str) -> None:
    with pytest.raises(CommandRefused, match=reason):
        check(argv, capabilities, ws)


# -- the scrubbed environment ---------------------------------------------------------------------------


def test_scrubbed_env_keeps_only_harmless_variables(tmp_path: Path) -> None:
    home = tmp_path / ".toka" / "home" / "agent"
    user_home = tmp_path / "user"
    (user_home / ".rustup").mkdir(parents=True)  # rustup's toolchains stay reachable
    source = {
        "PATH": "/opt/bin:/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC", "VIRTUAL_ENV": "/venv",
        "ANTHROPIC_API_KEY": "sk-ant-x", "GITHUB_TOKEN": "ghp_x", "AWS_SECRET_ACCESS_KEY": "aws",
        "SSH_AUTH_SOCK": "/run/ssh", "LD_PRELOAD": "/evil.so", "PYTHONPATH": "/evil", "GIT_CONFIG_GLOBAL": "/evil",
        "GIT_SSH_COMMAND": "touch pwned", "HOME": str(user_home), "TMPDIR": "/tmp", "PROMPT_COMMAND": "id",
        "BASH_ENV": "/evil.sh", "PAGER": "sh", "EDITOR": "sh",
    }
    env = scrubbed_env(home, source)
    assert env == {
        "PATH": "/opt/bin:/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC", "VIRTUAL_ENV": "/venv",
        "HOME": str(home), "TMPDIR": str(home / "tmp"), "TERM": "dumb", "NO_COLOR": "1", "GIT_TERMINAL_PROMPT": "0",
        "RUSTUP_HOME": str(user_home / ".rustup"),
        "PYTHONNOUSERSITE": "1",  # no usercustomize.py from the private HOME, which outlives the call
        # git reads no system or global configuration (the private HOME's ~/.gitconfig is the
        # agent's to write) and runs no hook, bare repository or ext:: helper
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_COUNT": "3",
        "GIT_CONFIG_KEY_0": "core.hooksPath", "GIT_CONFIG_VALUE_0": "/dev/null",
        "GIT_CONFIG_KEY_1": "safe.bareRepository", "GIT_CONFIG_VALUE_1": "explicit",
        "GIT_CONFIG_KEY_2": "protocol.ext.allow", "GIT_CONFIG_VALUE_2": "never",
    }
    assert home.is_dir() and (home / "tmp").is_dir()


def test_scrubbed_env_has_a_default_path_and_reads_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert scrubbed_env(tmp_path / "h", {})["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-secretsecretsecret")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secretsecretsecretsecret")
    monkeypatch.setenv("TZ", "Europe/Berlin")
    env = scrubbed_env(tmp_path / "h")
    assert "ANTHROPIC_API_KEY" not in env and "GITHUB_TOKEN" not in env
    assert not any("secret" in v for v in env.values())
    assert env["TZ"] == "Europe/Berlin" and env["PATH"] == os.environ["PATH"]
    assert scrubbed_env(tmp_path / "h") == env  # a second call finds its directories and changes nothing


# -- injection and scope cases through the toolbox (refused, nothing ran, audited) --------------------------


INJECTIONS: list[tuple[tuple[str, ...], list[str], str]] = [
    (("git-access",), ["git", "-c", "core.sshCommand=touch pwned", "status"], GIT_GLOBAL),
    (("git-access",), ["git", "fetch", "--upload-pack=touch pwned", "origin"], GIT_RUNS),
    (("git-access",), ["git", "-C", "/", "status"], "the argument '/' points outside the workspace"),
    (("git-access",), ["git", "config", "core.pager", "touch pwned"], "git config may only be read"),
    (("cargo-execution",), ["cargo", "--config", "build.rustc-wrapper='touch pwned'", "build"], CARGO),
    (("database-access",), ["sqlite3", "data.db", ".shell touch pwned"], "sqlite3 dot-commands"),
    (("database-access",), ["sqlite3", "-cmd", ".system touch pwned", "data.db"], "sqlite3 dot-commands"),
    (("script-execution",), ["python", "-c", "open('pwned', 'w')"], MUST_BE_A_SCRIPT),
    (("script-execution",), ["python3", "-c", "open('pwned', 'w')", "tools/x.py"], MUST_BE_A_SCRIPT),
    (("script-execution",), ["bash", "-c", "touch pwned"], MUST_BE_A_SCRIPT),
    (("script-execution",), ["sh"], MUST_BE_A_SCRIPT),
    (("script-execution", "git-access"), ["curl", "-o", "pwned", "https://example.com"], "'curl' is not granted"),
    (("script-execution", "git-access"), ["rm", "-rf", "."], "'rm' is not granted"),
    (("cargo-test-execution",), ["cargo", "build"], "cargo build needs the capability 'cargo-execution'"),
    (("git-access",), ["git", "push", "origin", "main"], "git push needs the capability 'git-push'"),
]


@pytest.mark.parametrize(("capabilities", "argv", "reason"), cases(INJECTIONS))
def test_injection_through_the_toolbox_is_refused_and_audited(
    make_agent: MakeAgent, capabilities: tuple[str, ...], argv: list[str], reason: str
) -> None:
    agent = make_agent(*capabilities, files={"data.db": "", "tools/x.py": "print('x')\n", "keep.txt": "keep\n"})
    out = agent.run(*argv)
    assert out.is_error and out.text.startswith("refused: ") and reason in out.text
    record = agent.audited("run_command", "refused", reason)
    assert record["arguments"] == {"argv": argv}
    assert record["exit_code"] is None and record["usage"] is None and record["sandbox"] is None
    assert not (agent.root / "pwned").exists() and (agent.root / "keep.txt").exists()


class TestGitPushApproval:
    def test_git_push_without_approval_is_refused_with_how_to_approve(self, make_agent: MakeAgent) -> None:
        agent = make_agent("git-access", "git-push")
        out = agent.run("git", "push", "origin", "main")
        assert out.is_error
        assert ("git push needs approval ('git-push') and nobody approved it for this run; a person can allow it "
                "with `toka run --approve git-push`") in out.text
        agent.audited("run_command", "refused", "needs approval ('git-push')")

    def test_a_denied_push_stays_refused(self, make_agent: MakeAgent) -> None:
        agent = make_agent("git-push", approvals=("git-push",), denials=("git-push",))
        out = agent.run("git", "send-pack", "origin")
        assert out.is_error and "git send-pack needs approval ('git-push') and it was denied" in out.text
        agent.audited("run_command", "refused", "it was denied")

    def test_an_approved_push_runs_in_the_sandbox(self, make_agent: MakeAgent) -> None:
        agent = make_agent("git-access", "git-push", approvals=("git-push",))
        out = agent.run("git", "push")  # no repository, no network: git itself fails
        assert out.is_error and "exit code: 128" in out.text
        record = agent.audited("run_command", "allowed")
        assert record["exit_code"] == 128 and "timeout" in record["sandbox"]


def test_run_command_outside_an_agent_policy_is_refused(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    audit = AuditLog(workspace.state_dir / "audit" / "test.jsonl", run="test")
    toolbox = Toolbox([RunCommand()], ToolContext(workspace=workspace, agent="anon", audit=audit))
    out = asyncio.run(toolbox.call("run_command", {"argv": ["git", "status"]}))
    assert out.is_error and "commands are not available in this context" in out.text
    [record] = read_audit(workspace.state_dir, run="test")
    assert record["tool"] == "run_command" and record["decision"] == "refused"


# -- bugs: allowed programs that run other programs or reach outside -------------------------------------


def test_git_grep_cannot_run_a_pager_program(make_agent: MakeAgent) -> None:
    agent = make_agent("git-access", files={"README.md": "hello\n"})
    _git_repo(agent.root)
    agent.run("git", "grep", "--open-files-in-pager=touch pwned", "hello")
    assert not (agent.root / "pwned").exists()
    agent.audited("run_command", "refused")


def test_git_clone_cannot_run_a_program_through_its_own_configuration(make_agent: MakeAgent) -> None:
    agent = make_agent("git-access", files={"README.md": "hello\n"})
    _git_repo(agent.root)
    agent.run("git", "clone", "-qc", "core.sshCommand=touch pwned", "ssh://localhost/repo", "copy")
    agent.run("git", "grep", "-nOtouch pwned", "hello")
    assert not (agent.root / "pwned").exists()
    assert [r["decision"] for r in agent.records() if r["tool"] == "run_command"] == ["refused", "refused"]


def test_sqlite3_cannot_run_a_program_through_edit(make_agent: MakeAgent) -> None:
    agent = make_agent("database-access", files={"data.db": ""})
    agent.run("sqlite3", "data.db", "select edit('text', 'touch pwned')")
    assert not (agent.root / "pwned").exists()
    agent.audited("run_command", "refused")


def test_sqlite3_cannot_read_files_outside_the_workspace(make_agent: MakeAgent, outside: Path) -> None:
    secret = (outside / "secret.txt").read_text().strip()
    agent = make_agent("database-access", files={"data.db": ""})
    out = agent.run("sqlite3", "data.db", f"select readfile('{outside / 'secret.txt'}')")
    assert secret not in out.text
    agent.audited("run_command", "refused")


def test_python_c_cannot_hide_behind_an_option_value(make_agent: MakeAgent) -> None:
    agent = make_agent("script-execution", files={"README.md": "# readme\n"})
    agent.run("python3", "-W", "README.md", "-c", "open('pwned', 'w')")
    assert not (agent.root / "pwned").exists()
    agent.audited("run_command", "refused", "no -c or -m code")


def test_git_config_cannot_be_rewritten_through_write_file(make_agent: MakeAgent) -> None:
    agent = make_agent("git-access", *FILE_TOOLS, files={"README.md": "hello\n"})
    _git_repo(agent.root)
    agent.call("write_file", path=".git/config", content="[core]\n\tfsmonitor = touch pwned\n")
    agent.run("git", "status")
    assert [r["tool"] for r in agent.records()] == ["write_file", "run_command"]
    assert not (agent.root / "pwned").exists()


def test_git_reads_no_configuration_from_the_agents_private_home(make_agent: MakeAgent) -> None:
    """The private HOME outlives each call: a ~/.gitconfig there (written by the agent's own commands in
    an earlier call or run) must not name an alias or program that a later git call runs."""
    agent = make_agent("git-access", files={"README.md": "hello\n"})
    _git_repo(agent.root)
    home = agent.state_dir / "home" / "tester"
    home.mkdir(parents=True, exist_ok=True)
    (home / ".gitconfig").write_text("[alias]\n\tpwn = !touch pwned\n[core]\n\tpager = touch paged\n")
    out = agent.run("git", "pwn")
    assert out.is_error and "pwn" in out.text
    agent.run("git", "-p", "log")  # -p: the pager, were it configured
    assert not (agent.root / "pwned").exists() and not (agent.root / "paged").exists()
    assert not list(agent.root.rglob("pwned")) and not list(agent.root.rglob("paged"))
