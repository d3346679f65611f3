"""Running a tool's command under the spec's resource limits.

Each limit is enforced by the strongest mechanism this host offers, and only
limits the spec declares are enforced (no invented numbers):

========================  ===========================================================
limit                     mechanism, strongest first
========================  ===========================================================
wall-clock timeout        kill of the process group, and of every process in the cgroup
``max_memory``            cgroup v2 ``memory.max`` / cgroup v1 ``memory.limit_in_bytes``
                          / ``RLIMIT_AS`` (``prlimit``)
``max_cpu``               cgroup v2 ``cpu.max`` / cgroup v1 ``cpu.cfs_quota_us``
                          / a measured throttle (SIGSTOP/SIGCONT on the process group)
``max_processes``         cgroup ``pids.max``
``max_disk_usage``        ``RLIMIT_FSIZE`` (what the run has left) plus a watch of the
                          workspace's growth since the agent run started
``max_network_bandwidth`` none: a command granted the network is refused under ``sandbox:
                          true`` (without the network, there is nothing to shape)
network (not granted)     a new, empty network namespace (``unshare -n``)
other processes           a PID namespace with its own ``/proc`` (``unshare -p``): the
                          runtime's environment (API keys) is out of sight
the host                  a mount namespace where every mount but the workspace is
                          read-only, ``/tmp`` and ``/dev`` are private, the runtime's
                          home is hidden, and the command holds no capabilities
                          (``confine.py``): root cannot leave its cgroup, unmount its
                          ``/proc``, enter another namespace or write the host
========================  ===========================================================

With ``sandbox: true`` a command runs only when every declared limit (and the
network denial) has a mechanism; otherwise it is refused. The wrapper is made
of real programs (``unshare``, ``sh``, ``confine.py`` run by a fresh interpreter,
``prlimit``), not Python code run in the child between fork and exec, which is
unsafe in a threaded process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .background import to_the_end
from .errors import LimitRefused, SandboxRefused, ToolTimeoutError
from .gitguard import git_dirs, pointer_text as _pointer_text, protected_paths
from .process import ProcessResult, run_process
from .spec import ResourceLimits

__all__ = [
    "CommandUsage",
    "HostSupport",
    "SandboxPlan",
    "SandboxRefused",
    "changed_files",
    "command_cgroup",
    "detect_host",
    "disk_usage",
    "run_sandboxed",
    "sandbox_argv",
    "snapshot",
    "workspace_growth_baseline",
]


@dataclass(frozen=True)
class HostSupport:
    """Which mechanisms work on this host (probed once per process)."""

    cgroup: str | None = None
    """``v2`` or ``v1`` when cgroups can be created and written here."""
    cgroup_root: dict[str, Path] = field(default_factory=dict)
    """Controller -> directory toka creates its cgroups in."""
    netns: bool = False
    pidns: bool = False
    """A PID namespace with its own /proc: commands cannot see (or read the environment of) the runtime."""
    prlimit: bool = False
    mountns: bool = False
    """A mount namespace in which commands are confined (read-only host, no capabilities)."""
    orphans_die: bool = False
    """A command dies with the runtime (``setpriv --pdeathsig``, ``unshare --kill-child``): killed
    with -9, the runtime leaves no command writing into the workspace under its resumed run."""

    def mechanism(self, limit: str) -> str | None:
        c = self.cgroup_root
        if limit == "orphans":
            return ("parent-death signal, the command's PID namespace killed with it" if self.orphans_die
                    else None)
        if limit == "timeout":
            return "process-group kill" + (" + cgroup kill" if self.cgroup else "")
        if limit == "memory":
            if "memory" in c:
                return f"cgroup {self.cgroup} memory limit"
            return "RLIMIT_AS (prlimit)" if self.prlimit else None
        if limit == "cpu":
            return f"cgroup {self.cgroup} CPU quota" if "cpu" in c else "measured throttle (SIGSTOP/SIGCONT)"
        if limit == "processes":
            return f"cgroup {self.cgroup} pids.max" if "pids" in c else None
        if limit == "disk":
            return "RLIMIT_FSIZE (prlimit) + workspace growth watch" if self.prlimit else "workspace growth watch"
        if limit == "network":
            return "network namespace (unshare -n)" if self.netns else None
        if limit == "bandwidth":
            return None  # no traffic shaping here: a command granted the network could not be held to it
        if limit == "processes-visible":
            return "PID namespace with its own /proc (unshare -p --mount-proc)" if self.pidns else None
        if limit == "host":
            return ("read-only host, private /tmp and /dev, no capabilities (mount namespace)"
                    if self.mountns else None)
        if limit == "unix-sockets":
            if not self.mountns:
                return None
            abi = landlock_abi()
            return ("without network-access: /run hidden and every listening path socket outside the workspace masked (from "
                    "/proc/net/unix, per command); abstract sockets stay in the network namespace"
                    + (f"; Landlock ABI {abi} present, but it has no rule for connecting to path sockets"
                       if abi else "; no Landlock"))
        if limit == "credentials":
            return (f"hidden: homes, /run, account and key files, and {len(hidden_host_paths())} paths in all "
                    "(everything under /etc and /var only root may read)" if self.mountns else None)
        if limit == "git":
            return ("git directory pinned, its config, hooks and info read-only (mount namespace); "
                    "checked and restored after every command" if self.mountns
                    else "checked and restored after every command")
        raise ValueError(limit)


CGROUP_PARENT = "toka"


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none), from ``landlock_create_ruleset(NULL, 0, VERSION)``."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        version = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(0, int(version))


@functools.cache
def detect_host() -> HostSupport:
    """Probe namespaces, prlimit and the confinement by using them, and cgroups by reading (no side effect)."""
    cgroup, roots = _probe_cgroups()
    # One probe where unshare knows --kill-child (util-linux 2.32 on): it makes a PID namespace too.
    kill_child = _probe_unshare("-p", "-f", "--kill-child", "--mount-proc")
    pidns = kill_child or _probe_unshare("-p", "-f", "--mount-proc")
    orphans_die = (kill_child and shutil.which("setpriv") is not None
                   and _succeeds(["setpriv", "--pdeathsig", "KILL", "--", "true"]))
    return HostSupport(cgroup=cgroup, cgroup_root=roots, netns=_probe_unshare("-n"), pidns=pidns,
                       prlimit=shutil.which("prlimit") is not None, mountns=_probe_confinement(),
                       orphans_die=orphans_die)


def _probe_cgroups(mounts_file: Path = Path("/proc/self/mounts")) -> tuple[str | None, dict[str, Path]]:
    """Where toka can make cgroups, and with which controllers, found by reading only.

    Nothing is created or enabled here (``toka doctor`` probes too): toka's own directory
    is made, and handed its controllers, when a command first needs it
    (:func:`_prepare_parents`). Under cgroup v2 only the controllers the root already hands
    to its children count: enabling one in the root's ``cgroup.subtree_control`` would change
    every other cgroup of the host, so toka leaves that to the host (systemd does it).
    """
    try:
        mounts = [line.split() for line in mounts_file.read_text().splitlines()]
    except OSError:
        mounts = []
    for parts in mounts:
        if parts[2:3] != ["cgroup2"]:
            continue
        root = Path(parts[1])
        try:
            enabled = set((root / "cgroup.subtree_control").read_text().split()) & {"memory", "cpu", "pids"}
        except OSError:
            continue
        parent = root / CGROUP_PARENT
        if enabled and _may_create(root, parent):
            return "v2", {c: parent for c in sorted(enabled)}
    roots: dict[str, Path] = {}
    for parts in mounts:
        if len(parts) < 4 or parts[2] != "cgroup":
            continue
        options = set(parts[3].split(","))
        parent = Path(parts[1]) / CGROUP_PARENT
        for controller in ("memory", "cpu", "pids", "cpuacct"):
            if controller in options and controller not in roots and _may_create(Path(parts[1]), parent):
                roots[controller] = parent
    return ("v1", roots) if roots else (None, {})


def _may_create(root: Path, parent: Path) -> bool:
    """Whether toka may make cgroups in ``parent`` (made in ``root`` when missing), as far as modes tell."""
    where = parent if parent.is_dir() else root
    return os.access(where, os.W_OK | os.X_OK)  # EROFS too: a read-only cgroup mount says no


def _prepare_parents(host: HostSupport) -> None:
    """Make toka's own cgroup directories and, under v2, hand their children the controllers.

    Runs when a command needs its cgroup, never while probing; only toka's own directories
    are written (see :func:`_probe_cgroups`).
    """
    controllers: dict[Path, set[str]] = {}
    for controller, parent in host.cgroup_root.items():
        controllers.setdefault(parent, set()).add(controller)
    for parent, wanted in controllers.items():
        parent.mkdir(exist_ok=True)
        if host.cgroup == "v2":
            control = parent / "cgroup.subtree_control"
            missing = sorted(wanted - set(control.read_text().split()))
            if missing:
                control.write_text(" ".join(f"+{c}" for c in missing))


def _probe_unshare(*flags: str) -> bool:
    return shutil.which("unshare") is not None and _succeeds(["unshare", *flags, "true"])


def _succeeds(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


CONFINE = Path(__file__).with_name("confine.py")


def _probe_confinement() -> bool:
    """Confine a real ``true`` in a scratch workspace, exactly as commands are confined."""
    if shutil.which("unshare") is None:
        return False
    import tempfile

    with tempfile.TemporaryDirectory(prefix="toka-probe-") as scratch:
        config = confinement(Path(scratch), Path(scratch), writable=[], readonly=[], env={}, tmpfs_size=None)
        try:
            done = subprocess.run(["unshare", "-m", "--", *config, "true"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0


def confinement(workspace: Path, cwd: Path, *, writable: Sequence[Path], readonly: Sequence[Path],
                env: Mapping[str, str], tmpfs_size: int | None, network: bool = False,
                private: Sequence[Path] = (), credentials: bool = False) -> list[str]:
    """The argv prefix that confines a command (see ``confine.py``); run it inside a new mount namespace.

    ``private``: directories hidden like the host's secrets, but for what the command needs in
    them (its workspace, the worktree's git directories, its home): the person's checkout an
    agent's worktree was made from. ``credentials``: the command sees git's credentials (an
    approved ``git push``, which needs them); other commands see its configuration without them.
    """
    # The command's own programs stay reachable inside what is hidden.
    path_dirs = [d for d in env.get("PATH", "").split(os.pathsep) if d]
    # Not a private directory itself (PATH holding the checkout's `bin`: its parent is the checkout).
    private_dirs = {os.path.realpath(p) for p in private}
    keep = sorted(d for d in {*program_dirs(path_dirs, sorted(private_dirs)), sys.prefix, sys.base_prefix,
                              *(env[k] for k in ("VIRTUAL_ENV", "RUSTUP_HOME") if env.get(k))}
                  - set(hidden_host_paths()) if os.path.realpath(d) not in private_dirs)
    if network and os.path.islink("/etc/resolv.conf"):  # a resolver stub under /run
        keep.append(os.path.realpath("/etc/resolv.conf"))
    # A worktree's git directories are outside it (in the repository it was made from): they stay
    # visible, read-only like the rest of the host, so git works in the worktree. The workspace
    # may be a directory inside the worktree (a run on a repository's subdirectory): its top too.
    top = _git_top(workspace)
    if top != workspace:
        keep.append(str(top))
    keep += [str(d) for d in git_dirs(top) if not d.resolve().is_relative_to(top.resolve())]
    pinned, protected = protected_paths(workspace)
    config = {"workspace": str(workspace), "cwd": str(cwd), "writable": [str(p) for p in writable],
              "replace": {**({} if credentials else git_configs_without_credentials(top)),
                          **(_persons_git_state(top) if private else {})},
              "readonly": [str(p) for p in readonly], "mask": [*hidden_host_paths(), *map(str, private)], "keep": keep,
              "pin": [str(p) for p in pinned], "protect": [str(p) for p in protected],
              "sockets": [] if network else host_unix_sockets(), "tmpfs_size": tmpfs_size}
    return [sys.executable, "-I", "-S", str(CONFINE), json.dumps(config), "--"]


# A remote's URL with a user and password or token (https://x-access-token:ghp_...@github.com/...),
# and a token in a URL's query (?access_token=...): hidden wherever they stand in a config file.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@\"]+@")
_URL_QUERY_SECRET = re.compile(r"(?i)([?&][\w.-]*(?:token|key|secret|password|sig)[\w.-]*=)[^&\s\"#;]+")
# The keys that hold credentials: passwords (sendemail.smtpPass), tokens, authorization headers
# (actions/checkout keeps one in http.<url>.extraheader), cookies; every key of a [credential]
# section (an inline helper can print a password).
_SECRET_KEY = re.compile(r"(?i)pass|token|secret|extraheader|cookie|api-?key|auth")
_SECTION = re.compile(r'^(\s*\[\s*([A-Za-z0-9.-]+)(?:\s+"(?:[^"\\]|\\.)*")?\s*\])(.*)$', re.S)
_KEY = re.compile(r"^\s*([A-Za-z][A-Za-z0-9-]*)\s*(?:=(.*))?$", re.S)
_HIDDEN_KEY = "# (a credential: hidden from the agent)"
_FILE_OPTION = re.compile(r"--file(?:=|\s+)[\"']?([^\"'\s]+)")
_IDENTITY_OPTION = re.compile(r"(?:^|\s)-i\s*[\"']?([^\"'\s]+)")
# A user and password before an @, with or without a scheme (git's proxy form: user:pass@host:port).
_USERINFO_ANY = re.compile(r"(?:^|[\s\"'=/])[^/@\s:\"']+:[^/@\s\"']*@")
# Keys naming files that hold a key or a password (a client key, an SSH identity, a signing key).
_KEY_FILE_NAMES = ("sslkey", "sslcert", "signingkey")


def _continues(line: str) -> bool:
    """A value that goes on to the next line: it ends in an odd number of backslashes."""
    body = line.rstrip("\r\n")
    return (len(body) - len(body.rstrip("\\"))) % 2 == 1


def _config_value(raw: str) -> str:
    value = raw.strip()
    if value.startswith('"'):
        end = value.find('"', 1)
        return value[1:end] if end > 0 else value[1:]
    return re.split(r"\s[#;]|^[#;]", value, maxsplit=1)[0].strip()


def config_without_credentials(text: str) -> tuple[str, list[str], list[str]]:
    """``text`` (a git config file) with its credentials taken out, the files it includes
    (``include.path``, ``includeIf.*.path``) and the files holding credentials it names (a
    ``store --file`` helper's, ``http.cookieFile``), both as written."""
    out: list[str] = []
    includes: list[str] = []
    secret_files: list[str] = []
    section = ""
    lines = iter(text.removeprefix("\ufeff").splitlines(keepends=True))  # git skips a BOM
    for line in lines:
        head, body = "", line
        header = _SECTION.match(line)
        if header:  # a key may follow a section's header on its line
            head, section, body = header.group(1), header.group(2).lower(), header.group(3)
        key = _KEY.match(body)
        if key is None or body.lstrip()[:1] in ("#", ";"):
            out.append(line)
            continue
        entry = [line]
        while _continues(entry[-1]):  # the value goes on: hidden or kept whole
            more = next(lines, "")
            if not more:
                break
            entry.append(more)
        name = key.group(1).lower()
        value = _config_value("".join([key.group(2) or "", *entry[1:]]).replace("\\\n", ""))
        if name == "path" and (section == "include" or section.startswith("includeif")):
            includes.append(value)
        if section.startswith("credential") and name == "helper":
            secret_files += _FILE_OPTION.findall(value)
        if (name == "cookiefile" or name in _KEY_FILE_NAMES) and value:
            secret_files.append(value)
        if name == "sshcommand":
            secret_files += _IDENTITY_OPTION.findall(value)
        # A user and password in the value as git reads it: a proxy's (no scheme), or a URL's cut by
        # a continuation line (the URL pattern below sees the text, not the joined value).
        joined_userinfo = (name == "proxy" or len(entry) > 1) and _USERINFO_ANY.search(value)
        if (section == "credential" or section.startswith("credential.") or _SECRET_KEY.search(name)
                or joined_userinfo):
            newline = "\n" if entry[-1].endswith("\n") else ""
            out.append(f"{head} {_HIDDEN_KEY}{newline}" if head else f"\t{_HIDDEN_KEY}{newline}")
        else:
            out += entry
    clean = _URL_USERINFO.sub(r"\1", "".join(out))
    return _URL_QUERY_SECRET.sub(r"\1***", clean), includes, secret_files


def _config_files(workspace: Path) -> list[Path]:
    """The git configuration files of the workspace's repository: its git directories' own, its
    other worktrees', its submodules' (under ``modules``, nested ones too)."""
    found: list[Path] = [Path("/etc/gitconfig")]  # the system's, which every git reads
    for gitdir in git_dirs(workspace):
        found += [gitdir / "config", gitdir / "config.worktree"]
        worktrees = gitdir / "worktrees"
        if worktrees.is_dir() and not worktrees.is_symlink():
            with contextlib.suppress(OSError):
                found += [admin / "config.worktree" for admin in worktrees.iterdir()]
        modules = gitdir / "modules"
        if modules.is_dir() and not modules.is_symlink():
            for n, (folder, _, files) in enumerate(os.walk(modules)):  # links are not followed
                if n > 10_000:
                    break
                found += [Path(folder, name) for name in files if name in ("config", "config.worktree")]
    return found


def git_configs_without_credentials(workspace: Path) -> dict[str, str]:
    """The git configuration files a command in ``workspace`` could read that hold credentials,
    each with the text it sees instead (the credentials out; a credential store, nothing). Those it
    includes are followed, as git does. Redaction of what a command prints cannot stop ``rev`` or
    ``base64``: the command must not read them at all."""
    replaced: dict[str, str] = {}
    pending = [(path, 0) for path in _config_files(workspace)]
    seen: set[Path] = set()
    while pending:
        path, depth = pending.pop()
        try:
            path = path.resolve()
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            text = path.read_text(encoding="utf-8", errors="replace")
        except (OSError, RuntimeError):  # unreadable, or a link loop
            continue
        clean, includes, secret_files = config_without_credentials(text)
        if clean != text:
            replaced[str(path)] = clean
        for name in secret_files:  # relative: to where git runs (the top, mostly) or beside the file
            for held in {_config_path(name, path), _config_path(name, workspace / ".git")}:
                with contextlib.suppress(OSError, RuntimeError):
                    if held.is_file():
                        replaced[str(held.resolve())] = ""
        if depth < 10:  # git's own limit on nested includes
            pending += [(_config_path(name, path), depth + 1) for name in includes if name]
    return replaced


def _config_path(name: str, config: Path) -> Path:
    """A path as git reads it in ``config``: ``~`` is the home, a relative one is beside the file."""
    return Path(os.path.expanduser(name)) if name.startswith("~") else config.parent / name


def _persons_git_state(worktree: Path) -> dict[str, str]:
    """What an agent's worktree shares of the person's uncommitted work through the repository's
    git directory, each with what a command sees instead: the index (staged files, a `.env` added
    by mistake; and other worktrees' indexes) shown empty, the stash as the worktree's own branch,
    its reflog empty. Git in the worktree reads none of them; `git stash show` and
    `GIT_INDEX_FILE=.../index git ls-files` did. (Their objects stay in the object database, by
    hash, as git keeps every object.)"""
    dirs = git_dirs(worktree)
    if len(dirs) < 2:
        return {}
    own, common = dirs[0], dirs[1]
    shown: dict[str, str] = {}
    head = _pointer_text(own / "HEAD") or ""
    for path, text in ((common / "index", ""), (common / "logs" / "refs" / "stash", ""),
                       (common / "refs" / "stash", head if head.startswith("ref: refs/heads/") else "")):
        shown[str(path)] = text + ("\n" if text else "")
    packed = common / "packed-refs"  # after `git gc` the stash is a line there
    with contextlib.suppress(OSError):
        if packed.stat().st_size <= 64 * 2**20:
            lines = packed.read_bytes().splitlines(keepends=True)
            kept = [line for i, line in enumerate(lines)
                    if not line.rstrip().endswith(b" refs/stash")
                    and not (line.startswith(b"^") and i and lines[i - 1].rstrip().endswith(b" refs/stash"))]
            if len(kept) != len(lines):
                shown[str(packed)] = b"".join(kept).decode("utf-8", "surrogateescape")
    with contextlib.suppress(OSError):
        for other in (common / "worktrees").iterdir():
            if other.resolve() != own.resolve():
                shown[str(other / "index")] = ""
    return shown


def _git_top(path: Path) -> Path:
    """The top of the git worktree ``path`` is in, when a ``.git`` file (a worktree's, as an
    agent's is) is found above it; else ``path``. A ``.git`` directory above (a home kept in git)
    is no reason to show more of the host."""
    for candidate in (path, *path.parents):
        dot = candidate / ".git"
        if os.path.lexists(dot):
            return candidate if candidate == path or (dot.is_file() and not dot.is_symlink()) else path
    return path


def _checkout_of(worktree: Path, state_dir: Path) -> list[Path]:
    """What an agent's worktree was made from: the run's workspace (whose state directory holds
    the worktree), and the top of the repository it is in when that is above it."""
    found = [state_dir.resolve().parent]
    for gitdir in git_dirs(_git_top(worktree)):  # the worktree's own git directory, then the common one
        top = gitdir.resolve().parent
        if gitdir.name == ".git" and not any(top.is_relative_to(f) for f in found):
            found.append(top)
    return [f for f in found if f != Path(f.anchor)]  # a repository at / would hide the host


def program_dirs(path_dirs: Sequence[str], private: Sequence[str] = ()) -> list[str]:
    """What stays visible of PATH's directories: each one, and the prefix it is the ``bin`` of (its
    parent: a virtual environment's or /usr/local's libraries). ``private`` directories (a person's
    checkout: ``node_modules/.bin`` on PATH) count as hidden places.

    A parent that is a hidden place itself (``~/bin`` on PATH: the home) is not kept, and one inside a
    hidden place (``~/.cargo/bin``: ``~/.cargo``) keeps only its directories whose names do not start
    with a dot, and a virtual environment's ``pyvenv.cfg``: not the files beside them
    (``~/.cargo/credentials.toml``).
    """
    hidden = [*hidden_host_paths(), *private]
    kept: list[str] = []
    for directory in path_dirs:
        kept.append(directory)
        parent = os.path.dirname(os.path.normpath(directory))
        if parent in ("/", directory) or parent in hidden:
            continue
        if not any(_under(parent, h) for h in hidden):
            kept.append(parent)
            continue
        with contextlib.suppress(OSError):
            for entry in os.scandir(parent):
                visible_dir = entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
                if visible_dir or entry.name == "pyvenv.cfg":
                    kept.append(entry.path)
    return kept


def _under(path: str, place: str) -> bool:
    return path == place or path.startswith(place.rstrip("/") + "/")


# Places that hold credentials or host services whatever their modes say: the homes (Prefect
# profiles, SSH and cloud keys), /run (daemon sockets), backups of the account databases.
_HIDDEN = ("/root", "/run", "/var/run", "/var/backups", "/var/mail", "/var/spool", "/srv", "/mnt", "/media",
           "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers", "/etc/sudoers.d",
           "/etc/ssl/private", "/etc/security/opasswd")
# Walked for anything only its owner (root) may read: that is a secret by its own account.
_WALKED = ("/etc", "/var")


@functools.cache
def hidden_host_paths() -> tuple[str, ...]:
    """What of the host a sandboxed command may not see (computed once per process)."""
    hidden = [p for p in (*_HIDDEN, str(Path.home()), os.environ.get("PREFECT_HOME") or "") if p]
    with contextlib.suppress(OSError):
        hidden += sorted(str(p) for p in Path("/home").iterdir())
    with contextlib.suppress(OSError):
        hidden += sorted(str(p) for p in Path("/etc/ssh").glob("ssh_host_*key"))
    for root in _WALKED:
        hidden += _private_entries(Path(root))
    return tuple(dict.fromkeys(hidden))


def _private_entries(root: Path) -> list[str]:
    """Files not readable by others, directories not searchable by others, and sockets, under ``root``."""
    found: list[str] = []
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if stat.S_ISLNK(mode):
                continue
            if stat.S_ISDIR(mode):
                if mode & 0o005 != 0o005:
                    found.append(entry.path)
                else:
                    stack.append(Path(entry.path))
            elif not mode & 0o004 or stat.S_ISSOCK(mode):
                found.append(entry.path)
    return found


def host_unix_sockets() -> list[str]:
    """Paths of the Unix sockets bound on this host (``/proc/net/unix``; abstract ones need no mask)."""
    try:
        lines = Path("/proc/net/unix").read_text(errors="replace").splitlines()[1:]
    except OSError:
        return []
    paths = {fields[7] for fields in (line.split(maxsplit=7) for line in lines)
             if len(fields) == 8 and fields[7].startswith("/")}
    return sorted(paths)


@dataclass(frozen=True)
class SandboxPlan:
    """What will be enforced for one command, and how."""

    enforced: dict[str, str]
    """Limit -> mechanism."""
    missing: list[str]
    """Declared limits with no mechanism on this host."""
    network: bool


def plan_limits(limits: ResourceLimits, *, network: bool, host: HostSupport) -> SandboxPlan:
    declared = {"timeout": True, "memory": limits.max_memory is not None, "cpu": limits.max_cpu is not None,
                "processes": limits.max_processes is not None, "disk": limits.max_disk_usage is not None,
                "network": not network, "bandwidth": network and limits.max_network_bandwidth is not None}
    enforced: dict[str, str] = {}
    missing: list[str] = []
    for name, wanted in declared.items():
        if not wanted:
            continue
        how = host.mechanism(name)
        if how is None:
            missing.append(name)
        else:
            enforced[name] = how
    if host.pidns:  # hardening where available; no spec limit depends on it
        enforced["processes-visible"] = host.mechanism("processes-visible") or ""
    # Without it the limits above are a suggestion to a command running as root.
    host_how = host.mechanism("host")
    if host_how is None:
        missing.append("host confinement")
    else:
        enforced["host"] = host_how
    return SandboxPlan(enforced=enforced, missing=missing, network=network)


@dataclass(frozen=True)
class CommandUsage:
    """What one command used, as measured (goes into its audit record)."""

    wall_s: float
    cpu_s: float | None
    peak_memory_bytes: int | None
    disk_growth_bytes: int | None
    exit_code: int | None
    signal: int | None
    killed_for: str | None = None
    """timeout, memory, disk, or None."""


@dataclass
class _Cgroups:
    """One command's cgroup: a directory per controller hierarchy (one under v2)."""

    dirs: dict[str, Path]

    @classmethod
    def create(cls, host: HostSupport, limits: ResourceLimits) -> _Cgroups:
        _prepare_parents(host)
        name = f"cmd-{uuid.uuid4().hex[:12]}"
        dirs: dict[str, Path] = {}
        for controller, parent in host.cgroup_root.items():
            path = parent / name
            if path not in dirs.values():
                path.mkdir()
            dirs[controller] = path
        group = cls(dirs)
        try:
            group._configure(host, limits)
        except OSError:
            group.remove()
            raise
        return group

    def _configure(self, host: HostSupport, limits: ResourceLimits) -> None:
        d = self.dirs
        period = 100_000
        if limits.max_memory is not None and "memory" in d:
            if host.cgroup == "v2":
                (d["memory"] / "memory.max").write_text(str(limits.max_memory.bytes))
                with contextlib.suppress(OSError):
                    (d["memory"] / "memory.swap.max").write_text("0")
            else:
                (d["memory"] / "memory.limit_in_bytes").write_text(str(limits.max_memory.bytes))
                with contextlib.suppress(OSError):  # absent without swap accounting
                    (d["memory"] / "memory.memsw.limit_in_bytes").write_text(str(limits.max_memory.bytes))
        if limits.max_cpu is not None and "cpu" in d:
            quota = max(1000, int(period * limits.max_cpu.fraction))
            if host.cgroup == "v2":
                (d["cpu"] / "cpu.max").write_text(f"{quota} {period}")
            else:
                (d["cpu"] / "cpu.cfs_period_us").write_text(str(period))
                (d["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
        if limits.max_processes is not None and "pids" in d:
            (d["pids"] / "pids.max").write_text(str(limits.max_processes))

    @property
    def procs_files(self) -> list[Path]:
        return sorted({p / "cgroup.procs" for p in self.dirs.values()})

    def pids(self) -> set[int]:
        found: set[int] = set()
        for f in self.procs_files:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(x) for x in f.read_text().split())
        return found

    def kill_all(self) -> None:
        """Kill every process in the group, including any that left the process group."""
        for _ in range(20):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def cpu_seconds(self, host: HostSupport) -> float | None:
        try:
            if host.cgroup == "v2":
                stat = dict(line.split() for line in (self.dirs["cpu"] / "cpu.stat").read_text().splitlines())
                return int(stat["usage_usec"]) / 1e6
            if "cpuacct" in self.dirs:
                return int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
        except (OSError, KeyError, ValueError):
            return None
        return None

    def oom_killed(self, host: HostSupport) -> bool:
        """Whether the memory limit killed a process of the group."""
        if "memory" not in self.dirs:
            return False
        name = "memory.events" if host.cgroup == "v2" else "memory.oom_control"
        try:
            fields = dict(line.split() for line in (self.dirs["memory"] / name).read_text().splitlines())
            return int(fields.get("oom_kill", "0")) > 0
        except (OSError, ValueError):
            return False

    def peak_memory(self, host: HostSupport) -> int | None:
        if "memory" not in self.dirs:
            return None
        name = "memory.peak" if host.cgroup == "v2" else "memory.max_usage_in_bytes"
        try:
            return int((self.dirs["memory"] / name).read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Kill what is left in the group, then remove it (blocking: waits for the kernel)."""
        self.kill_all()
        self.remove()

    def remove(self) -> None:
        for path in set(self.dirs.values()):
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def workspace_growth_baseline(workspace: Path, state_dir: Path, key: str, extra_dirs: Sequence[Path] = ()) -> int:
    """The workspace's size when this agent's run first measured it (``max_disk_usage`` is growth per run).

    Kept in the state directory under ``key`` (run key and agent), so every command and
    file write of the run, a resumed run and other processes measure against one start.
    """
    path = state_dir / "disk" / f"{key}.json"
    try:
        return int(json.loads(path.read_text())["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    size = disk_usage(workspace, state_dir, extra_dirs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps({"bytes": size}))
    try:
        os.link(tmp, path)  # first writer wins: a concurrent measurement cannot move the start
    except FileExistsError:
        size = int(json.loads(path.read_text())["bytes"])
    finally:
        tmp.unlink()
    return size


def disk_usage(workspace: Path, state_dir: Path, extra_dirs: Sequence[Path] = ()) -> int:
    """Bytes on disk under the workspace (its state directory aside) and ``extra_dirs``."""
    return _measured_size(_measured_dirs(workspace, state_dir, extra_dirs))


def _measured_dirs(workspace: Path, state_dir: Path, extra_dirs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """What :func:`disk_usage` counts: (root, directory left out) pairs."""
    return [(workspace, state_dir), *((d, Path("/nonexistent")) for d in extra_dirs)]


def _measured_size(measured: Sequence[tuple[Path, Path]]) -> int:
    """Bytes on disk under each (root, directory left out) pair (blocking: a walk)."""
    return sum(_tree_size(root, skip) for root, skip in measured)


Snapshot = dict[str, tuple[int, int, int]]


#: The most files a workspace may hold for commands to run in it: each command's checks keep two
#: snapshots of them in the runtime's memory (about 0.9 KB and 21 µs a file: 400,000 empty files
#: took 357 MB and 8 s per command, and a disk's free inodes allow tens of millions).
SNAPSHOT_FILES = 1_000_000


def snapshot(root: Path, skip: Sequence[Path]) -> Snapshot:
    """Relative path -> (mtime_ns, size, ctime_ns) of the files under ``root``, outside ``skip``.
    The change time too: a command can set a file's modification time back, not its change time.

    Raises:
        LimitRefused: there are more than :data:`SNAPSHOT_FILES`.
    """
    found: Snapshot = {}
    for path, st in _files(root, skip):
        if len(found) >= SNAPSHOT_FILES:
            raise LimitRefused(f"the workspace holds more than {SNAPSHOT_FILES:,} files; commands are refused "
                               "there (the checks around each command look at every file): remove some first")
        found[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size, st.st_ctime_ns)
    return found


def changed_files(before: Snapshot, after: Snapshot) -> list[str]:
    """Files created, modified or deleted between two snapshots, sorted."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _tree_size(root: Path, skip: Path) -> int:
    """What the files under ``root`` take, as max_disk_usage counts it: every entry (a link, an
    empty file, a directory) at least 512 bytes, and a file its length when that is more than its blocks. Blocks
    alone let 40,000 links grow a workspace 158 MB past a 10 MB limit, half a million empty files
    count nothing, and a sparse file of gigabytes cost the runtime's own `git add` minutes of CPU."""
    return sum(max(st.st_blocks * 512, st.st_size if stat.S_ISREG(st.st_mode) else 0, _ENTRY_BYTES)
               for _, st in _files(root, [skip], dirs=True))


#: What one directory entry counts for at the least (an inode, a directory slot).
_ENTRY_BYTES = 512


def _files(root: Path, skip: Sequence[Path], *, dirs: bool = False) -> Iterator[tuple[str, os.stat_result]]:
    """Every non-directory under ``root`` (links not followed, ``skip`` directories left out);
    with ``dirs``, the directories too."""
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if Path(entry.path) not in skip:
                        stack.append(Path(entry.path))
                        if dirs:
                            yield entry.path, entry.stat(follow_symlinks=False)
                else:
                    yield entry.path, entry.stat(follow_symlinks=False)
            except OSError:
                continue


# -- the cgroup of one command --------------------------------------------------------------


@contextlib.asynccontextmanager
async def command_cgroup(host: HostSupport, limits: ResourceLimits) -> AsyncIterator[_Cgroups]:
    """A new cgroup for one command, with the spec's limits set.

    The command joins it itself (:func:`sandbox_argv` writes its pid to the group's
    ``cgroup.procs`` files); read the group's usage inside the block. On leaving, whatever
    is still in the group (also a process that left the process group with ``setsid``) is
    killed and the group removed, in a worker thread that runs to its end even when the
    block was cancelled.

    Raises:
        SandboxRefused: the group cannot be made or limited here.
    """
    try:
        # Not in a thread: cgroupfs lives in memory (a few mkdir and writes, no disk), and a
        # cancellation can then not come between making the group and owning it.
        group = _Cgroups.create(host, limits)
    except OSError as e:
        raise SandboxRefused(f"cannot set up the command's cgroup: {e}") from None
    try:
        yield group
    finally:
        await to_the_end(group.close)


# -- the argv that is executed ----------------------------------------------------------------


def sandbox_argv(
    argv: Sequence[str],
    *,
    limits: ResourceLimits,
    host: HostSupport,
    network: bool,
    sandbox: bool,
    confine: Sequence[str] = (),
    cgroup_procs: Sequence[Path] = (),
    disk_grown: int = 0,
) -> list[str]:
    """The argv that runs ``argv`` under the limits (the environment is passed on unchanged).

    Pure: it reads and starts nothing. What the host supports comes in ``host``, the
    confinement prefix from :func:`confinement`, the ``cgroup.procs`` files from
    :func:`command_cgroup`, and ``disk_grown`` is what the workspace has grown in this agent
    run already (no single file may take it past ``max_disk_usage``).

    The layers, outermost first: ``unshare`` (network, PID and mount namespaces), ``sh``
    moving itself into the cgroup, the confinement, ``prlimit``, the command.
    """
    if not sandbox:
        return list(argv)
    namespaces = []
    if not network and host.netns:
        namespaces.append("-n")
    if host.pidns:
        # Own PID namespace and /proc: the command cannot read the runtime's environment
        # through /proc/<ppid>/environ, and everything in it dies with its first process.
        namespaces += ["-p", "-f", *(["--kill-child"] if host.orphans_die else []), "--mount-proc"]
    else:
        namespaces.append("-m")  # --mount-proc brings a mount namespace; without it, ask for one
    wrapped = ["unshare", *namespaces, "--"]
    if host.orphans_die:
        # The runtime killed with -9 takes the command with it: unshare gets SIGKILL when its parent
        # dies, and its first process (then every process of the namespace) when unshare does. A
        # command left running kept writing into the worktree under the resumed run.
        wrapped = ["setpriv", "--pdeathsig", "KILL", "--", *wrapped]
    prlimits: list[str] = []
    if host.prlimit:
        if limits.max_memory is not None and "memory" not in host.cgroup_root:
            prlimits.append(f"--as={limits.max_memory.bytes}")
        if limits.max_disk_usage is not None:
            prlimits.append(f"--fsize={limits.max_disk_usage.bytes - disk_grown}")
    if cgroup_procs or prlimits or confine:
        joins = "".join(f'echo $$ > "{f}" && ' for f in cgroup_procs)
        inner = ["prlimit", *prlimits, "--"] if prlimits else []
        wrapped += ["sh", "-c", f'{joins}exec "$@"', "toka-sandbox", *confine, *inner]
    return [*wrapped, *argv]


# -- the watchers -----------------------------------------------------------------------------

#: Started on a command's process group as soon as it exists; appends the limit it enforced
#: by killing the group to the list (the second argument).
Watcher = Callable[[int, list[str]], Awaitable[None]]


async def _watch_disk(measured: Sequence[tuple[Path, Path]], start: int, limit: int, pgid: int,
                      tripped: list[str]) -> None:
    # RLIMIT_FSIZE bounds each file, but a command that makes many (fallocate in a loop: 3 GB in
    # 0.6 s here) outgrows the limit by what it writes between two looks. Each look walks the
    # whole workspace, so looks are 50 ms apart at least, and at most a tenth of the time is
    # spent looking (a walk of a workspace holding a virtualenv took a second).
    interval = 0.05
    while True:
        await asyncio.sleep(interval)
        began = time.monotonic()
        size = await asyncio.to_thread(_measured_size, measured)
        interval = max(0.05, 9 * (time.monotonic() - began))
        if size - start > limit:
            tripped.append("disk")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            return


def _group_cpu_seconds(pgid: int) -> float:
    """CPU seconds of the processes in group ``pgid`` (blocking: reads every process's stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after ')' start at state; pgrp is the 3rd
            total += int(fields[11]) + int(fields[12])
    return total / ticks


async def _throttle(pgid: int, tripped: list[str], *, fraction: float, window: float = 0.2) -> None:
    """Hold a process group to ``fraction`` of one CPU by stopping it when it ran ahead."""
    allowed = 0.0
    used_before = await asyncio.to_thread(_group_cpu_seconds, pgid)
    while True:
        await asyncio.sleep(window)
        allowed += window * fraction
        used = await asyncio.to_thread(_group_cpu_seconds, pgid) - used_before
        ahead = used - allowed
        if ahead > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGSTOP)
            await asyncio.sleep(ahead / fraction)
            allowed += (ahead / fraction) * fraction  # time stopped also earns allowance
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)


def _watchers(limits: ResourceLimits, host: HostSupport, *, measured: Sequence[tuple[Path, Path]],
              disk_start: int | None) -> list[Watcher]:
    """The watchers a sandboxed command needs: disk growth, and the CPU throttle without a cpu cgroup."""
    found: list[Watcher] = []
    if limits.max_disk_usage is not None and disk_start is not None:
        found.append(functools.partial(_watch_disk, measured, disk_start, limits.max_disk_usage.bytes))
    if limits.max_cpu is not None and "cpu" not in host.cgroup_root:
        found.append(functools.partial(_throttle, fraction=limits.max_cpu.fraction))
    return found


async def _run_watched(
    full: Sequence[str], *, label: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float,
    output_limit: int, watchers: Sequence[Watcher],
) -> tuple[ProcessResult | None, list[str]]:
    """Run ``full`` with ``watchers`` on its process group; return its result and the limits that stopped it.

    The timeout and the output cap are :func:`run_process`'s; after the timeout the result
    is None and the limits name ``timeout``.
    """
    tripped: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    groups: list[int] = []

    def started(pgid: int) -> None:  # called the moment the process exists: nothing polls for it
        groups.append(pgid)
        tasks.extend(asyncio.create_task(watch(pgid, tripped)) for watch in watchers)

    try:
        result = await run_process(full, cwd=cwd, env=env, timeout=timeout, output_limit=output_limit,
                                   on_start=started, label=label)
    except ToolTimeoutError:
        tripped.append("timeout")
        return None, tripped
    finally:
        for task in tasks:
            task.cancel()
        for pgid in groups:  # a throttled group must not stay stopped
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)
    return result, tripped


# -- one command ------------------------------------------------------------------------------


def _checked_plan(limits: ResourceLimits, *, network: bool, sandbox: bool, host: HostSupport) -> SandboxPlan:
    """What will be enforced.

    Raises:
        SandboxRefused: ``sandbox`` is set and a declared limit has no mechanism here.
    """
    if not sandbox:  # only the timeout applies: say so in the audit record, claim nothing else
        return SandboxPlan(enforced={"timeout": "process-group kill"}, missing=[], network=True)
    plan = plan_limits(limits, network=network, host=host)
    if plan.missing:
        raise SandboxRefused(
            "this host cannot enforce " + ", ".join(plan.missing)
            + " (the spec sets sandbox: true, so the command may not run unconfined); see `toka doctor`"
        )
    return plan


async def run_sandboxed(
    argv: Sequence[str],
    *,
    cwd: Path,
    workspace: Path,
    state_dir: Path,
    env: Mapping[str, str],
    limits: ResourceLimits,
    timeout: float,
    network: bool,
    sandbox: bool,
    host: HostSupport | None = None,
    output_limit: int = 64_000,
    extra_disk_dirs: Sequence[Path] = (),
    disk_baseline: int | None = None,
    git_credentials: bool = False,
) -> tuple[ProcessResult | None, CommandUsage, SandboxPlan]:
    """Run ``argv`` with every declared limit enforced; return its result and measured usage.

    ``git_credentials``: the command may read git's credentials (an approved ``git push``).

    ``disk_baseline`` is the size ``max_disk_usage`` counts growth from (the agent run's
    start, see :func:`workspace_growth_baseline`); without it, this command's start.

    A command that outlives ``timeout`` is killed with everything it started; that is a
    result (no output, ``usage.killed_for == "timeout"``), not an error.

    Raises:
        SandboxRefused: ``sandbox`` is set and a declared limit cannot be enforced here.
    """
    host = host or await asyncio.to_thread(detect_host)
    plan = _checked_plan(limits, network=network, sandbox=sandbox, host=host)
    measured = _measured_dirs(workspace, state_dir, extra_disk_dirs)
    grown = 0  # what the workspace has grown in this agent run, before this command
    if sandbox and limits.max_disk_usage is not None and disk_baseline is not None:
        grown = await asyncio.to_thread(_measured_size, measured) - disk_baseline
        if grown >= limits.max_disk_usage.bytes:
            raise SandboxRefused(f"the workspace has already grown {grown} bytes in this run, past its "
                                 f"max_disk_usage of {limits.max_disk_usage.bytes}; free space first")
    disk_start = None
    if limits.max_disk_usage is not None:
        disk_start = disk_baseline if disk_baseline is not None else await asyncio.to_thread(_measured_size, measured)
    cgroup: contextlib.AbstractAsyncContextManager[_Cgroups | None] = (
        command_cgroup(host, limits) if sandbox and host.cgroup else contextlib.nullcontext())
    async with cgroup as group:
        confine: list[str] = []
        if sandbox:
            # Writable: the workspace and the command's home; the rest of the state directory
            # (audit trail, results, run records) is read-only to it.
            in_worktree = workspace.resolve().is_relative_to(state_dir.resolve())
            confine = await asyncio.to_thread(
                confinement, workspace, cwd, writable=[d for d in extra_disk_dirs if d.is_relative_to(state_dir)],
                # An agent's worktree lies inside the state directory: there the rest of the host,
                # the state directory included, is read-only already; binding it would cover the worktree.
                readonly=[] if in_worktree else [state_dir],
                env=env, network=network, credentials=git_credentials,
                tmpfs_size=limits.max_disk_usage.bytes if limits.max_disk_usage else None,
                # The person's checkout (their uncommitted and ignored files, .env...) and the run's
                # state (other agents' worktrees, audit trails, journals) are no agent's to read.
                private=_checkout_of(workspace, state_dir) if in_worktree else ())
        full = sandbox_argv(argv, limits=limits, host=host, network=network, sandbox=sandbox, confine=confine,
                            cgroup_procs=group.procs_files if group else (), disk_grown=grown)
        started, times_before = time.monotonic(), os.times()
        result, tripped = await _run_watched(
            full, label=argv, cwd=cwd, env=env, timeout=timeout, output_limit=output_limit,
            watchers=_watchers(limits, host, measured=measured, disk_start=disk_start) if sandbox else [])
        cpu = group.cpu_seconds(host) if group else None  # cgroupfs: read from memory, no disk
        peak = group.peak_memory(host) if group else None
        if group is not None and group.oom_killed(host):
            tripped.append("memory")
    wall = time.monotonic() - started
    if cpu is None:  # approximate: every child this process reaped meanwhile
        times_after = os.times()
        cpu = (times_after.children_user - times_before.children_user) + (
            times_after.children_system - times_before.children_system)
    usage = CommandUsage(
        wall_s=wall,
        cpu_s=cpu,
        peak_memory_bytes=peak,
        disk_growth_bytes=(await asyncio.to_thread(_measured_size, measured) - disk_start
                           if disk_start is not None else None),
        # Under a PID namespace the kernel's kill shows up as unshare's own exit;
        # the cgroup knows what really happened.
        exit_code=None if "memory" in tripped else (result.exit_code if result else None),
        signal=signal.SIGKILL if "memory" in tripped else (result.signal if result else None),
        killed_for=tripped[0] if tripped else None,
    )
    if result is None:
        # The command's own timeout is a result the caller hands back to the model, not an error
        # that fails the task (``usage.killed_for`` says "timeout"); what it printed died with it.
        return ProcessResult(argv=tuple(full), exit_code=None, signal=signal.SIGKILL, stdout="", stderr="",
                             truncated=False, duration_s=wall), usage, plan
    if "memory" in tripped:
        # unshare's own complaint when the kernel killed its child, not the command's output.
        result = replace(result, stderr="".join(
            line for line in result.stderr.splitlines(keepends=True) if not line.startswith("unshare: ")))
    return result, usage, plan
