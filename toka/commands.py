"""``run_command``: which programs a capability allows, and running them in the sandbox.

The command is an argv list, never a shell line. Its program must be granted
by a declared capability (table below); arguments may not point outside the
workspace, and options known to run other programs (``git -c``, ``cargo
--config``, sqlite3 dot-commands...) are refused. The environment is scrubbed:
no API keys or other secrets reach the command.

=========================  ==============================================================
capability                 programs
=========================  ==============================================================
``cargo-execution``        ``cargo`` (any subcommand)
``cargo-test-execution``   ``cargo test`` only
``git-access``             ``git`` without pushing and without rewriting its configuration
``git-push``               ``git push`` (also needs approval)
``script-execution``       scripts inside the workspace (``./x.sh``, ``python tools/x.py``)
``python-test-execution``  ``pytest``, ``python -m pytest``
``database-access``        ``sqlite3`` on databases inside the workspace
``network-access``         commands may reach the network (needs approval)
=========================  ==============================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from .capabilities import CAPABILITIES
from .errors import ApprovalDenied, CommandRefused, LimitRefused, SandboxViolation
from .gitguard import GitGuard, run_git
from .redact import redact, secret_values
from .sandbox import (
    Snapshot,
    changed_files,
    run_sandboxed,
    snapshot,
    workspace_growth_baseline,
)
from .tools import CommandOutput, Tool, ToolContext, _Args

__all__ = ["COMMAND_CAPABILITIES", "CommandRefused", "RunCommand", "check_command", "scrubbed_env"]

#: Capability -> the programs it grants (declared in the capability table; the rules are below).
COMMAND_CAPABILITIES: dict[str, tuple[str, ...]] = {n: c.programs for n, c in CAPABILITIES.items() if c.programs}

_INTERPRETERS = {"python", "python3", "bash", "sh"}
# Flags that take no value and carry no code; anything else before the script is refused.
_PY_FLAGS = {"-u", "-B", "-E", "-s", "-S", "-I", "-O", "-OO", "-q", "-b", "-bb"}
_SH_FLAGS = {"-e", "-u", "-x", "-v", "-n", "-eu", "-ue", "-ex", "-xe", "-eux", "-exu", "-ux", "-xu"}
_HARMLESS_FLAGS = {"python": _PY_FLAGS, "python3": _PY_FLAGS, "bash": _SH_FLAGS, "sh": _SH_FLAGS}
_GIT_GLOBAL_REFUSED = ("-c", "--exec-path", "-C", "--git-dir", "--work-tree", "--namespace", "--config-env",
                       "--super-prefix", "--list-cmds")
# Options of subcommands that run another program or configure the git they run. Git takes any
# unambiguous prefix of a long option (`--upload-pac`, `--exe`), so a prefix of one is refused
# too; and it takes short options bundled with their value attached (`-nO<program>`), so a
# cluster holding one of these letters is refused wherever it is in the cluster.
_GIT_LONG_REFUSED = ("--upload-pack", "--receive-pack", "--exec", "--config", "--template",
                     "--open-files-in-pager", "--ext-diff", "--textconv", "--extcmd")
_GIT_SHORT_REFUSED = "uOx"  # -u: --upload-pack (ls-remote, fetch, clone); -O: grep's pager; -x: rebase --exec
#: Short options refused for one subcommand only (elsewhere the letter means something harmless).
_GIT_SHORT_REFUSED_IN = {"clone": "c"}  # clone -c core.sshCommand=...: the clone runs it at once
# Subcommands whose purpose is to run another program (or push where `git push` is not granted).
_GIT_SUBCOMMANDS_REFUSED = {"filter-branch": "runs arbitrary commands",
                            "filter-repo": "runs arbitrary commands",
                            "difftool": "runs another program", "mergetool": "runs another program",
                            "daemon": "serves the repository", "instaweb": "starts a web server",
                            "upload-pack": "is the server side of a fetch",
                            "receive-pack": "is the server side of a push"}
_GIT_NESTED_REFUSED = {("bisect", "run"), ("submodule", "foreach")}
# What sends the repository's commits (or mail) elsewhere: git-push, as `git push` is. The
# transport helpers (`git remote-https`...) are what a push runs.
_GIT_SENDING = ("push", "send-email", "send-pack", "http-push", "imap-send")


def _git_sends(sub: str | None, operands: Sequence[str]) -> bool:
    if sub is None:
        return False
    if sub in _GIT_SENDING or sub.startswith("remote-"):
        return True
    if sub == "lfs":
        return bool(operands) and operands[0] in ("push", "pre-push")
    if sub == "subtree":  # git subtree push: a push of a directory's history
        return bool(operands) and operands[0] == "push"
    if sub in ("svn", "p4"):  # git svn dcommit, git p4 submit
        return bool(operands) and operands[0] in ("dcommit", "submit", "set-tree")
    return False
_SQLITE_FUNCTIONS_REFUSED = ("readfile", "writefile", "edit(", "load_extension", "fts3_tokenizer")
_CARGO_REFUSED = ("--config", "-Z", "--manifest-path")


@dataclass(frozen=True)
class CommandGrant:
    capability: str
    """The capability that allows it."""
    pushes: bool = False


def _first_operand(args: Sequence[str]) -> tuple[int, str | None]:
    for i, a in enumerate(args):
        if not a.startswith("-"):
            return i, a
    return len(args), None


# `git config` reads: each action and how many operands it takes (old syntax, then the
# subcommands of git 2.46 on); options that only choose where to read and how to print.
_GIT_CONFIG_READS = {"--get": (1, 2), "--get-all": (1, 2), "--get-regexp": (1, 2), "--get-urlmatch": (2, 2),
                     "--get-color": (1, 2), "--get-colorbool": (1, 2), "--list": (0, 0), "-l": (0, 0)}
_GIT_CONFIG_READ_SUBCOMMANDS = {"get": (1, 1), "list": (0, 0)}
_GIT_CONFIG_WITH_VALUE = {"-f", "--file", "--blob", "--type", "--default", "--value", "--url"}
_GIT_CONFIG_MODIFIERS = {"--global", "--system", "--local", "--worktree", "--show-origin", "--show-scope",
                         "-z", "--null", "--name-only", "--bool", "--int", "--bool-or-int", "--path",
                         "--expiry-date", "--no-type", "--includes", "--no-includes", "--all", "--regexp",
                         "--fixed-value", "--show-names", "--no-show-names", *_GIT_CONFIG_WITH_VALUE}


def _git_config_reads(args: Sequence[str]) -> bool:
    """Whether ``git config <args>`` only reads: one read action with its operands, known options.

    Read as git reads it: what follows ``--`` are operands (``--list`` there is a value pattern
    and the call writes), and an option given with its value apart takes that value along.
    ``args`` come with their bundles of one-letter options apart (:func:`_git_config_short_options`).
    """
    actions: list[str] = []
    operands: list[str] = []
    items = iter(args)
    for arg in items:
        if arg == "--":
            operands.extend(items)
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        name = arg.split("=", 1)[0]
        if name in _GIT_CONFIG_READS:
            actions.append(name)
        elif name not in _GIT_CONFIG_MODIFIERS:
            return False  # a write action (--add, --unset, --edit...) or one not known to be harmless
        elif name in _GIT_CONFIG_WITH_VALUE and "=" not in arg:
            next(items, None)
    if not actions and operands and operands[0] in _GIT_CONFIG_READ_SUBCOMMANDS:
        low, high = _GIT_CONFIG_READ_SUBCOMMANDS[operands[0]]
        return low <= len(operands) - 1 <= high
    if len(actions) != 1:
        return False
    low, high = _GIT_CONFIG_READS[actions[0]]
    return low <= len(operands) <= high


#: git config's one-letter options: which take a value (the rest of the bundle, or the next argument).
_GIT_CONFIG_SHORT = {"l": False, "z": False, "f": True}


def _git_config_short_options(args: Sequence[str]) -> list[str]:
    """``args`` with bundles of one-letter options apart, as git's option parser reads them:
    ``-lz`` is ``-l -z``, ``-zfFILE`` is ``-z -f FILE``. A bundle with a letter not known here
    is kept whole (and refused as an unknown option)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        if not arg.startswith("-") or arg.startswith("--") or len(arg) <= 2:
            out.append(arg)
            continue
        split: list[str] = []
        for j, letter in enumerate(arg[1:], 1):
            if letter not in _GIT_CONFIG_SHORT:
                split = [arg]
                break
            split.append(f"-{letter}")
            if _GIT_CONFIG_SHORT[letter]:
                if arg[j + 1:]:
                    split.append(arg[j + 1:])
                break
        out.extend(split)
    return out


def _git_option_refused(args: Sequence[str], short: str) -> str | None:
    """The first of a git subcommand's ``args`` that is a refused option (see :data:`_GIT_LONG_REFUSED`)."""
    for arg in args:
        if arg == "--":
            return None  # what follows are paths
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            if any(option.startswith(name) for option in _GIT_LONG_REFUSED):
                return arg
        elif arg.startswith("-") and any(letter in short for letter in arg[1:]):
            return arg
    return None


def check_command(argv: Sequence[str], *, capabilities: set[str], workspace: Path) -> CommandGrant:
    """Which capability allows ``argv``.

    Raises:
        CommandRefused: no declared capability allows it (the reason says what would).
    """
    if not argv or not argv[0]:
        raise CommandRefused("argv must name a program")
    program, args = argv[0], list(argv[1:])
    _check_paths(args, workspace)

    def need(capability: str, what: str) -> CommandGrant:
        if capability not in capabilities:
            raise CommandRefused(
                f"{what} needs the capability {capability!r}, which this agent's spec does not declare"
            )
        return CommandGrant(capability)

    if "/" in program:
        _inside(program, workspace, "the script")
        return need("script-execution", f"running the workspace script {program!r}")
    if program in ("python", "python3") and args[:2] == ["-m", "pytest"]:
        return need("python-test-execution", "python -m pytest")
    if program == "pytest":
        return need("python-test-execution", "pytest")
    if program in _INTERPRETERS:
        # Only `interpreter script.ext [args...]`: options before the script could carry
        # code (-c, -m, --rcfile, -W...), so the script must come first.
        flags = 0
        while flags < len(args) and args[flags] in _HARMLESS_FLAGS[program]:
            flags += 1
        script = args[flags] if flags < len(args) else None
        if script is None or script.startswith("-"):
            raise CommandRefused(
                f"{program} may only run a script file inside the workspace (`{program} path/to/script ...`); "
                "no -c or -m code, and no options before the script other than plain flags like -u or -e"
            )
        _inside(script, workspace, "the script")
        return need("script-execution", f"running the workspace script {script!r}")
    if program == "cargo":
        if any(a.startswith(_CARGO_REFUSED) for a in args):
            raise CommandRefused("cargo options that change its configuration (--config, -Z, --manifest-path) "
                                 "are not allowed")
        _, sub = _first_operand(args)
        if "cargo-execution" in capabilities:
            return CommandGrant("cargo-execution")
        if sub == "test":
            return need("cargo-test-execution", "cargo test")
        return need("cargo-execution", f"cargo {sub or ''}".strip())
    if program == "git":
        i, sub = _first_operand(args)
        if any(a.split("=")[0] in _GIT_GLOBAL_REFUSED for a in args[:i]):
            raise CommandRefused("git options before the subcommand (-c, -C, --git-dir, --exec-path...) "
                                 "are not allowed")
        rest = args[i + 1:]
        refused = _git_option_refused(rest, _GIT_SHORT_REFUSED + _GIT_SHORT_REFUSED_IN.get(sub or "", ""))
        if refused is not None:
            raise CommandRefused(
                f"git options that run other programs or set git's configuration are not allowed: {refused!r} "
                "(--upload-pack, --exec, --config, -O, -x, -u, clone -c, or an abbreviation of one; give an "
                "option's value as a separate argument: `-S text`, not `-Stext`)")
        if sub in _GIT_SUBCOMMANDS_REFUSED:
            raise CommandRefused(f"git {sub} is not allowed: it {_GIT_SUBCOMMANDS_REFUSED[sub]}")
        operands = [a for a in rest if not a.startswith("-")]
        if sub is not None and (sub, operands[0] if operands else None) in _GIT_NESTED_REFUSED:
            raise CommandRefused(f"git {sub} {operands[0]} is not allowed: it runs arbitrary commands")
        if sub == "config":
            options = _git_config_short_options(rest)
            _check_paths(options, workspace)  # `-zfFILE`: the file apart
            if not _git_config_reads(options):
                raise CommandRefused("git config may only be read (--get NAME, --get-all, --get-regexp, --list; "
                                     "`git config get NAME`, `git config list`): writing it could make git "
                                     "run other programs")
        if _git_sends(sub, operands):
            grant = need("git-push", f"git {' '.join([sub or '', *operands[:1]]) if sub == 'lfs' else sub}")
            return CommandGrant(grant.capability, pushes=True)
        return need("git-access", f"git {sub or ''}".strip())
    if program == "sqlite3":
        if any(a.startswith(".") or a in ("-cmd", "-init", "-unsafe-testing")
               or any(f in a.lower() for f in _SQLITE_FUNCTIONS_REFUSED) for a in args):
            raise CommandRefused("sqlite3 dot-commands, -cmd, -init and the file and program functions "
                                 "(readfile, writefile, edit, load_extension) are not allowed")
        _, database = _first_operand(args)
        if database is not None:
            _inside(database, workspace, "the database", must_exist=False)
        return need("database-access", "sqlite3")
    granted = sorted(p for c in capabilities for p in COMMAND_CAPABILITIES.get(c, ()))
    raise CommandRefused(
        f"the program {program!r} is not granted by any declared capability; "
        f"this agent may run: {', '.join(granted) or 'nothing'}"
    )


def _inside(path: str, workspace: Path, what: str, *, must_exist: bool = True) -> None:
    candidate = (workspace / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
    if not candidate.is_relative_to(workspace):
        raise CommandRefused(f"{what} {path!r} is outside the workspace")
    if must_exist and not candidate.is_file():
        raise CommandRefused(f"{what} {path!r} does not exist in the workspace")


def _check_paths(args: Sequence[str], workspace: Path) -> None:
    """No argument may name a place outside the workspace.

    Checked: the argument itself, ``--opt=value`` and ``-ovalue`` forms; a value
    that looks like a path, or names something that exists, is resolved (so a
    symlink inside the workspace that points out is caught too).
    """
    for arg in args:
        values = [arg]
        if arg.startswith("-"):
            if "=" in arg:
                values.append(arg.split("=", 1)[1])
            if not arg.startswith("--") and len(arg) > 2:
                values.append(arg[2:])
        for value in values:
            if not value or value.startswith("-"):
                continue
            if value.startswith("file:") or "::" in value:  # git's file:// and transport::address forms
                raise CommandRefused(
                    f"the argument {arg!r} names a local or helper URL; use a path in the workspace")
            pathlike = value.startswith(("/", "~", "..")) or "/" in value or value == ".."
            target = Path(os.path.expanduser(value))
            candidate = target if target.is_absolute() else workspace / target
            try:
                exists = candidate.exists() or candidate.is_symlink()
                resolved = candidate.resolve()
            except (OSError, RuntimeError):
                raise CommandRefused(f"the argument {arg!r} cannot be resolved") from None
            if (pathlike or exists) and not resolved.is_relative_to(workspace):
                raise CommandRefused(f"the argument {arg!r} points outside the workspace")


_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV")


def scrubbed_env(home: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: a few harmless variables, a private HOME and TMPDIR, no secrets."""
    env = os.environ if env is None else env
    kept = {k: env[k] for k in _ENV_KEEP if k in env}
    home.mkdir(parents=True, exist_ok=True)
    (home / "tmp").mkdir(exist_ok=True)
    return {**kept, "HOME": str(home), "TMPDIR": str(home / "tmp"), "TERM": "dumb", "NO_COLOR": "1",
            "GIT_TERMINAL_PROMPT": "0", "PATH": kept.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            # The private HOME outlives the call: a usercustomize.py planted in its user site
            # directory would run in every later Python command of the agent.
            "PYTHONNOUSERSITE": "1",
            **_GIT_GUARDS, **_rust_toolchain(env)}


# Configuration git reads before any repository's own: a repository inside the workspace
# (the model may write one) cannot bring hooks, and git never runs one found by accident. No
# global configuration either: the private HOME outlives the call (its ~/.gitconfig is writable
# by the agent's commands), and an alias or program named there would run in every later call.
_GIT_GUARDS = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_COUNT": "3",
    "GIT_CONFIG_KEY_0": "core.hooksPath", "GIT_CONFIG_VALUE_0": "/dev/null",
    "GIT_CONFIG_KEY_1": "safe.bareRepository", "GIT_CONFIG_VALUE_1": "explicit",
    "GIT_CONFIG_KEY_2": "protocol.ext.allow", "GIT_CONFIG_VALUE_2": "never",
}


def git_identity(agent: str) -> dict[str, str]:
    """Who an agent's commits are by: its own name (its commands cannot write git's configuration)."""
    name, email = f"toka {agent}", f"{agent}@toka.invalid"
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email}


def _rust_toolchain(env: Mapping[str, str]) -> dict[str, str]:
    """Where rustup keeps the toolchains: cargo cannot pick one under the private HOME otherwise."""
    rustup = env.get("RUSTUP_HOME") or os.path.join(env.get("HOME", ""), ".rustup")
    found = {"RUSTUP_HOME": rustup} if env.get("HOME") and os.path.isdir(rustup) else {}
    if env.get("RUSTUP_TOOLCHAIN"):
        found["RUSTUP_TOOLCHAIN"] = env["RUSTUP_TOOLCHAIN"]
    return found


_CHANGES_SHOWN = 50  # in the tool result the model reads
_CHANGES_KEPT = 1000  # in the audit record and the task report


def command_home(ctx: ToolContext) -> Path:
    """The private HOME of the agent's commands (inside the state directory)."""
    return ctx.workspace.state_dir / "home" / (ctx.agent or "agent")


def disk_key(ctx: ToolContext) -> str:
    """Names the agent run whose workspace growth ``max_disk_usage`` bounds."""
    return f"{ctx.audit.run if ctx.audit else 'run'}-{ctx.agent or 'agent'}"


class RunCommandArgs(_Args):
    argv: list[str] = Field(min_length=1, max_length=256,
                            description="Program and arguments, e.g. ['git', 'log', '-5']. No shell.")
    cwd: str = Field(default=".", description="Directory to run in, relative to the workspace root.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds before the command is killed.")


class RunCommand(Tool):
    name = "run_command"
    description = (
        "Run a program granted by the agent's capabilities, inside the workspace and the sandbox "
        "(resource limits enforced; no network unless granted). Returns exit code, stdout and stderr."
    )
    Input = RunCommandArgs
    default_timeout: ClassVar[float] = 600.0

    async def run(self, args: RunCommandArgs, ctx: ToolContext) -> CommandOutput:
        policy = ctx.policy
        if policy is None:
            raise CommandRefused("commands are not available in this context")
        grant = check_command(args.argv, capabilities=set(policy.capabilities), workspace=ctx.workspace.root)
        cwd = ctx.workspace.resolve(args.cwd, kind="dir")
        if grant.pushes:
            policy.require_approval("git-push", f"{' '.join(args.argv[:2])}")
        if not policy.sandbox and not policy.allow_unsandboxed:
            raise CommandRefused(
                "this agent's spec sets sandbox: false; its commands run only when the run allows it "
                "(toka run --allow-unsandboxed)"
            )
        network = "network-access" in policy.capabilities and policy.approved("network-access")
        limit = policy.limits.timeout.seconds
        timeout = min(args.timeout or self.default_timeout, limit)
        home = command_home(ctx)
        argv = list(args.argv)
        if grant.capability == "database-access":
            argv.insert(1, "-safe")  # sqlite3's own guard against file and program functions
        env = {**scrubbed_env(home), **git_identity(ctx.agent or "agent")}
        root, state = ctx.workspace.root, ctx.workspace.state_dir
        baseline = (await asyncio.to_thread(workspace_growth_baseline, root, state, disk_key(ctx), [home])
                    if policy.sandbox and policy.limits.max_disk_usage is not None else None)
        skip = [state]  # .git included: a change there is reported like any other
        before = await asyncio.to_thread(snapshot, root, skip)
        guard = await asyncio.to_thread(GitGuard.capture, root, before, state)
        bounded = bool(policy.write_paths) and not policy.approved("write-outside-paths")
        head = await asyncio.to_thread(_head, root) if bounded else None
        try:
            result, usage, plan = await run_sandboxed(
                argv, cwd=cwd, workspace=root, state_dir=state, env=env, limits=policy.limits,
                timeout=timeout, network=network, sandbox=policy.sandbox, extra_disk_dirs=[home],
                disk_baseline=baseline, git_credentials=grant.pushes and network,
            )
        except BaseException as e:
            # Cut short (refused, failed, or cancelled by the task's own timeout): what the command
            # planted in git is still undone. A cancelled task is cancelled again at every await
            # (Prefect's timeouts), so after a cancellation that happens here and now, blocking.
            if isinstance(e, Exception):
                undone = await asyncio.to_thread(_checked, _undo_git_changes, args.argv, guard, before, root, skip)
            else:
                undone = _checked(_undo_git_changes, args.argv, guard, before, root, skip)
            if undone:
                raise SandboxViolation(_violation(args.argv, undone), paths=undone) from e
            raise
        assert result is not None
        try:
            after = await asyncio.to_thread(snapshot, root, skip)
        except LimitRefused as e:
            # Left too many files for the checks to look at each: its own git directories are still
            # checked (they need no list of files), and the run stops.
            undone = await asyncio.to_thread(_checked, guard.check, args.argv, [], [])
            raise SandboxViolation(f"the command {' '.join(args.argv)!r} {str(e).replace('the workspace holds', 'left')}"
                                   f"{'; undone in git: ' + ', '.join(undone) if undone else ''}; the run stops "
                                   "(look before using git there)", paths=undone) from None
        changed = changed_files(before, after)
        violations = await asyncio.to_thread(_checked, guard.check, args.argv, changed, after)
        set_id = await asyncio.to_thread(_drop_set_id_bits, root, changed, home)
        if violations:
            raise SandboxViolation(_violation(args.argv, violations), paths=violations)
        secrets = secret_values()
        text = [f"exit code: {usage.exit_code}" if usage.exit_code is not None
                else f"killed by signal {usage.signal}" + (f" ({usage.killed_for})" if usage.killed_for else "")]
        if usage.killed_for == "timeout":  # the command's own timeout: the model's to act on
            longer = (f"{limit:g} s is the longest this agent's commands may run"
                      if timeout >= limit else f"a timeout of up to {limit:g} s may be asked for")
            text = [f"killed after {timeout:g} s (timeout): the command ran past its timeout and was killed "
                    f"with everything it started; its output is lost; {longer}"]
        over = (policy.limits.max_disk_usage is not None and usage.disk_growth_bytes is not None
                and usage.disk_growth_bytes > policy.limits.max_disk_usage.bytes)
        if usage.killed_for == "disk":
            text.append("the workspace grew past max_disk_usage; the command was killed")
        elif over:  # it finished between two checks of the growth watch
            text.append("the workspace grew past max_disk_usage during this command; "
                        "further commands and writes are refused")
        if usage.killed_for == "memory":
            text.append("the command used more than max_memory and was killed")
        if result.stdout:
            text += ["--- stdout ---", redact(result.stdout, secrets)]
        if result.stderr:
            text += ["--- stderr ---", redact(result.stderr, secrets)]
        if result.truncated:
            text.append("[output cut at 64000 bytes per stream]")
        if bounded:
            outside = await asyncio.to_thread(_undo_outside_write_paths, ctx, changed, head)
            if outside:
                shown_out = ", ".join(outside[:_CHANGES_SHOWN]) + (
                    f" and {len(outside) - _CHANGES_SHOWN} more" if len(outside) > _CHANGES_SHOWN else "")
                try:
                    policy.require_approval(
                        "write-outside-paths",
                        f"the command {' '.join(args.argv)!r} changed {shown_out} (outside the declared paths "
                        f"{', '.join(policy.write_paths)}; those changes were undone): that",
                    )
                except ApprovalDenied as e:  # the model still sees what the command printed (a test run)
                    e.detail = "\n".join(["--- what the command printed ---", *text])
                    raise
        if set_id:
            text.append("set-uid and set-gid bits were removed from: " + ", ".join(set_id[:_CHANGES_SHOWN])
                        + (" ..." if len(set_id) > _CHANGES_SHOWN else "")
                        + " (a program the command left must not run as its owner for whoever starts it)")
        if changed:
            shown = changed[:_CHANGES_SHOWN] + ([f"... and {len(changed) - _CHANGES_SHOWN} more"]
                                                if len(changed) > _CHANGES_SHOWN else [])
            text.append("--- files changed in the workspace ---\n" + "\n".join(shown))
        return CommandOutput("\n".join(text), is_error=usage.exit_code != 0 or over,
                             files_changed=changed[:_CHANGES_KEPT], usage=usage, sandbox=plan.enforced,
                             output_bytes=len(result.stdout) + len(result.stderr))


def _undo_git_changes(guard: GitGuard, before: Snapshot, root: Path,
                      skip: Sequence[Path]) -> list[str]:
    """Undo what a command changed in git control files; return those paths (blocking: walks the workspace)."""
    after = snapshot(root, skip)
    return guard.check(changed_files(before, after), after)


def _head(root: Path) -> str | None:
    """The commit checked out in ``root`` (None: no git repository, or no commit yet)."""
    done = run_git(root, "rev-parse", "--verify", "-q", "HEAD")
    return done.stdout.strip() or None if done.returncode == 0 else None


def _undo_outside_write_paths(ctx: ToolContext, changed: Sequence[str], head: str | None) -> list[str]:
    """Undo what a command changed outside the spec's ``write_paths``; return those paths (blocking).

    Outside means: a file the command changed that git would commit (one it ignores, build
    output or a cache, is left), or one a commit it made changed. ``head``: the commit checked
    out before the command.

    In an agent's own worktree everything outside the paths is as ``head`` had it (the writes
    there need the approval this run lacks), so that is what is restored, and a commit the
    command made is taken back (what it changed inside the paths stays, uncommitted). Anywhere
    else (``--in-place``, a workspace that is no git repository) restoring could take a person's
    own changes: the files are left for review and the run stops.

    Raises:
        SandboxViolation: the changes could not be undone.
    """
    policy = ctx.policy
    assert policy is not None
    root = ctx.workspace.root

    def outside_paths(paths: Iterable[str]) -> list[str]:
        return [rel for rel in paths if ".git" not in Path(rel).parts
                and not any(fnmatch.fnmatch(rel, g) for g in policy.write_paths)]

    def stop(paths: list[str], why: str) -> SandboxViolation:
        return SandboxViolation(f"the command changed {', '.join(paths[:_CHANGES_SHOWN])} outside the declared "
                                f"paths {', '.join(policy.write_paths)} without approval; {why}", paths=paths)

    candidates = outside_paths(changed)
    now = _head(root) if head is not None else None
    if head is not None and now != head:  # it committed: what the commits changed counts too
        committed = run_git(root, "diff", "--name-only", "-z", "--relative", "--no-renames", head, "HEAD")
        candidates = sorted({*candidates, *outside_paths(p for p in committed.stdout.split("\0") if p)})
    if not candidates:
        return []
    if head is None:
        raise stop(candidates, "the workspace is no git repository (or has no commit) to undo them from; they "
                               "are left for review and the run stops")
    in_worktree = root.is_relative_to(ctx.workspace.state_dir)  # an agent's own: undone there
    # The ignore rules the command changed go back first: judged by its own rules, a file it
    # wrote outside the paths was "ignored" and left, then committed once they were undone.
    rules = [rel for rel in candidates if Path(rel).name == ".gitignore"] if in_worktree else []
    if rules:
        failed = _restore_from(root, head, rules)
        if failed:
            raise stop(rules, f"undoing it failed ({failed}); the run stops")
    rest = [rel for rel in candidates if rel not in rules]
    ignored = run_git(root, "check-ignore", "-z", "--stdin", input="\0".join(rest) + "\0") if rest else None
    skipped = ({p for p in ignored.stdout.split("\0") if p}
               if ignored is not None and ignored.returncode in (0, 1) else set())
    outside = [*rules, *(rel for rel in rest if rel not in skipped)]
    if not outside:
        return []
    if not in_worktree:
        raise stop(outside, "in this workspace that cannot be undone without a person's own changes, so "
                            "they are left for review and the run stops")
    if now != head:  # the branch back; the files stay as they are
        done = run_git(root, "reset", "-q", "--mixed", head)
        if done.returncode != 0:
            raise stop(outside, f"undoing it failed ({done.stderr.strip()}); the run stops")
    failed = _restore_from(root, head, [rel for rel in outside if rel not in rules])
    if failed:
        raise stop(outside, f"undoing it failed ({failed}); the run stops")
    return outside


def _restore_from(root: Path, head: str, paths: Sequence[str]) -> str | None:
    """Put ``paths`` back as commit ``head`` has them (removed when it has none); git's complaint
    when that failed."""
    literal = {"GIT_LITERAL_PATHSPECS": "1"}  # a file named '*' is that file, not every file
    existed = {p for i in range(0, len(paths), 500)
               for p in run_git(root, "ls-tree", "-r", "-z", "--name-only", head, "--", *paths[i:i + 500],
                                env=literal).stdout.split("\0") if p}
    for rel in paths:  # new ones go first: a path may have turned from a file into a directory
        if rel not in existed:
            _remove_new(root, rel)
    rest = [rel for rel in paths if rel in existed]
    for i in range(0, len(rest), 500):
        done = run_git(root, "checkout", head, "--", *rest[i:i + 500], env=literal)
        if done.returncode != 0:
            return done.stderr.strip()
    return None


def _remove_new(root: Path, rel: str) -> None:
    """Remove a path a command made, and the directories it leaves empty (up to ``root``)."""
    path = root / rel
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    for parent in path.parents:
        if parent == root or not parent.is_relative_to(root):
            break
        try:
            parent.rmdir()
        except OSError:  # not empty, or gone
            break


def _drop_set_id_bits(root: Path, changed: Sequence[str], home: Path) -> list[str]:
    """Clear the set-uid and set-gid bits of what a command changed in the workspace, and of
    anything in its home (blocking). Commands run as the runtime's user (root, often), and a
    `chmod 4755` needs no capability: the host was left root-owned set-uid copies of a shell that
    any local account could run. Returns the workspace's paths that had them."""
    found: list[str] = []

    def clear(path: Path) -> bool:
        try:
            if not path.lstat().st_mode & (stat.S_ISUID | stat.S_ISGID):
                return False
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # never through a link
        except OSError:
            return False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return False
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            return True
        finally:
            os.close(fd)

    found += [rel for rel in changed if clear(root / rel)]
    for folder, _, files in os.walk(home):
        for name in files:
            clear(Path(folder, name))
    return found


def _checked(check: Callable[..., list[str]], argv: Sequence[str], *args: Any) -> list[str]:
    """``check(*args)``, the git guard's check after a command; one that fails midway (what the
    command left tripped it) is a violation: what it had not looked at yet is not trusted."""
    try:
        return check(*args)
    except Exception as e:
        raise SandboxViolation(
            f"the git control files could not all be checked after the command {' '.join(argv)!r} "
            f"({type(e).__name__}: {e}); the run stops (what it left in git may run as whoever uses "
            "the repository next: look before using git there)") from e


def _violation(argv: Sequence[str], paths: Sequence[str]) -> str:
    return (f"the command {' '.join(argv)!r} changed git control files, which no command may change: "
            f"{', '.join(paths)}; the change was undone and the run stops (git would run what they "
            "name as whoever uses the repository next)")
