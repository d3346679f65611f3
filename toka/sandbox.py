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
import json
import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ToolError, ToolTimeoutError
from .gitguard import protected_paths
from .process import ProcessResult, run_process
from .spec import ResourceLimits

__all__ = [
    "CommandUsage",
    "HostSupport",
    "SandboxPlan",
    "SandboxRefused",
    "changed_files",
    "detect_host",
    "disk_usage",
    "run_sandboxed",
    "snapshot",
    "workspace_growth_baseline",
]


class SandboxRefused(ToolError):
    """The host cannot enforce a limit the spec declares, so the command may not run."""


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

    def mechanism(self, limit: str) -> str | None:
        c = self.cgroup_root
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
    """Probe cgroups, network namespaces and prlimit by using them."""
    cgroup, roots = _probe_cgroups()
    return HostSupport(cgroup=cgroup, cgroup_root=roots, netns=_probe_unshare("-n"),
                       pidns=_probe_unshare("-p", "-f", "--mount-proc"), prlimit=shutil.which("prlimit") is not None,
                       mountns=_probe_confinement())


def _probe_cgroups() -> tuple[str | None, dict[str, Path]]:
    mounts = Path("/proc/self/mounts").read_text().splitlines() if Path("/proc/self/mounts").exists() else []
    v2 = [line.split()[1] for line in mounts if line.split()[2:3] == ["cgroup2"]]
    for mount in v2:
        root = Path(mount)
        try:
            controllers = set((root / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        wanted = {"memory", "cpu", "pids"} & controllers
        if not wanted:
            continue
        parent = root / CGROUP_PARENT
        try:
            parent.mkdir(exist_ok=True)
            (root / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
        except OSError:
            continue
        return "v2", {c: parent for c in sorted(wanted)}
    roots: dict[str, Path] = {}
    for line in mounts:
        parts = line.split()
        if len(parts) < 4 or parts[2] != "cgroup":
            continue
        options = set(parts[3].split(","))
        for controller in ("memory", "cpu", "pids", "cpuacct"):
            if controller in options and controller not in roots:
                parent = Path(parts[1]) / CGROUP_PARENT
                try:
                    parent.mkdir(exist_ok=True)
                    probe = parent / f"probe-{uuid.uuid4().hex[:8]}"
                    probe.mkdir()
                    probe.rmdir()
                except OSError:
                    continue
                roots[controller] = parent
    return ("v1", roots) if roots else (None, {})


def _probe_unshare(*flags: str) -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=10).returncode == 0
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
                env: Mapping[str, str], tmpfs_size: int | None, network: bool = False) -> list[str]:
    """The argv prefix that confines a command (see ``confine.py``); run it inside a new mount namespace."""
    # The command's own programs stay reachable inside what is hidden.
    path_dirs = [d for d in env.get("PATH", "").split(os.pathsep) if d]
    keep = sorted({*path_dirs, *(str(Path(d).parent) for d in path_dirs), sys.prefix, sys.base_prefix,
                   *(env[k] for k in ("VIRTUAL_ENV", "RUSTUP_HOME") if env.get(k))})
    if network and os.path.islink("/etc/resolv.conf"):  # a resolver stub under /run
        keep.append(os.path.realpath("/etc/resolv.conf"))
    pinned, protected = protected_paths(workspace)
    config = {"workspace": str(workspace), "cwd": str(cwd), "writable": [str(p) for p in writable],
              "readonly": [str(p) for p in readonly], "mask": [*hidden_host_paths()], "keep": keep,
              "pin": [str(p) for p in pinned], "protect": [str(p) for p in protected],
              "sockets": [] if network else host_unix_sockets(), "tmpfs_size": tmpfs_size}
    return [sys.executable, "-I", "-S", str(CONFINE), json.dumps(config), "--"]


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
    dirs: dict[str, Path]

    @classmethod
    def create(cls, host: HostSupport, limits: ResourceLimits) -> _Cgroups:
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
    return _tree_size(workspace, state_dir) + sum(_tree_size(d, Path("/nonexistent")) for d in extra_dirs)


def snapshot(root: Path, skip: Sequence[Path]) -> dict[str, tuple[int, int]]:
    """Relative path -> (mtime_ns, size) of the files under ``root``, outside ``skip``."""
    return {os.path.relpath(path, root): (st.st_mtime_ns, st.st_size) for path, st in _files(root, skip)}


def changed_files(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Files created, modified or deleted between two snapshots, sorted."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _tree_size(root: Path, skip: Path) -> int:
    return sum(st.st_blocks * 512 for _, st in _files(root, [skip]) if stat.S_ISREG(st.st_mode))


def _files(root: Path, skip: Sequence[Path]) -> Iterator[tuple[str, os.stat_result]]:
    """Every non-directory under ``root`` (links not followed, ``skip`` directories left out)."""
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
                else:
                    yield entry.path, entry.stat(follow_symlinks=False)
            except OSError:
                continue


async def _watch_disk(measured: list[tuple[Path, Path]], start: int, limit: int, proc_pgid: list[int],
                      tripped: list[str]) -> None:
    while True:
        await asyncio.sleep(0.5)
        grown = sum([await asyncio.to_thread(_tree_size, r, k) for r, k in measured]) - start
        if grown > limit:
            tripped.append("disk")
            for pgid in proc_pgid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            return


def _group_cpu_seconds(pgid: int) -> float:
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


async def _throttle(pgid: int, fraction: float, window: float = 0.2) -> None:
    """Hold a process group to ``fraction`` of one CPU by stopping it when it ran ahead."""
    allowed = 0.0
    used_before = _group_cpu_seconds(pgid)
    while True:
        await asyncio.sleep(window)
        allowed += window * fraction
        used = _group_cpu_seconds(pgid) - used_before
        ahead = used - allowed
        if ahead > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGSTOP)
            await asyncio.sleep(ahead / fraction)
            allowed += (ahead / fraction) * fraction  # time stopped also earns allowance
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)


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
) -> tuple[ProcessResult | None, CommandUsage, SandboxPlan]:
    """Run ``argv`` with every declared limit enforced; return its result and measured usage.

    ``disk_baseline`` is the size ``max_disk_usage`` counts growth from (the agent run's
    start, see :func:`workspace_growth_baseline`); without it, this command's start.

    A command that outlives ``timeout`` is killed with everything it started; that is a
    result (no output, ``usage.killed_for == "timeout"``), not an error.

    Raises:
        SandboxRefused: ``sandbox`` is set and a declared limit cannot be enforced here.
    """
    host = host or detect_host()
    plan = plan_limits(limits, network=network, host=host)
    if not sandbox:  # only the timeout applies: say so in the audit record, claim nothing else
        plan = SandboxPlan(enforced={"timeout": "process-group kill"}, missing=[], network=True)
    if sandbox and plan.missing:
        raise SandboxRefused(
            "this host cannot enforce " + ", ".join(plan.missing)
            + " (the spec sets sandbox: true, so the command may not run unconfined); see `toka doctor`"
        )
    grown = 0  # what the workspace has grown in this agent run, before this command
    if sandbox and limits.max_disk_usage is not None and disk_baseline is not None:
        grown = disk_usage(workspace, state_dir, extra_disk_dirs) - disk_baseline
        if grown >= limits.max_disk_usage.bytes:
            raise SandboxRefused(f"the workspace has already grown {grown} bytes in this run, past its "
                                 f"max_disk_usage of {limits.max_disk_usage.bytes}; free space first")
    wrapped: list[str] = []
    namespaces = []
    if sandbox and not network and host.netns:
        namespaces.append("-n")
    if sandbox and host.pidns:
        # Own PID namespace and /proc: the command cannot read the runtime's environment
        # through /proc/<ppid>/environ, and everything in it dies with its first process.
        namespaces += ["-p", "-f", "--mount-proc"]
    if sandbox and not host.pidns:
        namespaces.append("-m")  # --mount-proc brings a mount namespace; without it, ask for one
    if namespaces:
        wrapped += ["unshare", *namespaces, "--"]
    groups: _Cgroups | None = None
    if sandbox and host.cgroup:
        try:
            groups = _Cgroups.create(host, limits)
        except OSError as e:
            raise SandboxRefused(f"cannot set up the command's cgroup: {e}") from None
    prlimits: list[str] = []
    if sandbox and host.prlimit:
        if limits.max_memory is not None and "memory" not in host.cgroup_root:
            prlimits.append(f"--as={limits.max_memory.bytes}")
        if limits.max_disk_usage is not None:
            # No single file may take the workspace past its limit: what this run has left.
            prlimits.append(f"--fsize={limits.max_disk_usage.bytes - grown}")
    confine: list[str] = []
    if sandbox:
        # Writable: the workspace and the command's home; the rest of the state directory
        # (audit trail, results, run records) is read-only to it.
        writable = [d for d in extra_disk_dirs if d.is_relative_to(state_dir)]
        confine = confinement(workspace, cwd, writable=writable, readonly=[state_dir], env=env, network=network,
                              tmpfs_size=limits.max_disk_usage.bytes if limits.max_disk_usage else None)
    if groups is not None or prlimits or confine:
        joins = "".join(f'echo $$ > "{f}" && ' for f in (groups.procs_files if groups else []))
        inner = ["prlimit", *prlimits, "--"] if prlimits else []
        wrapped += ["sh", "-c", f'{joins}exec "$@"', "toka-sandbox", *confine, *inner]
    full = [*wrapped, *argv]

    measured = [(workspace, state_dir), *((d, Path("/nonexistent")) for d in extra_disk_dirs)]
    disk_start = None
    if limits.max_disk_usage is not None:
        disk_start = disk_baseline if disk_baseline is not None else disk_usage(workspace, state_dir, extra_disk_dirs)
    tripped: list[str] = []
    watchers: list[asyncio.Task[None]] = []
    pgid_box: list[int] = []
    started = time.monotonic()
    rusage_before = os.times()
    result: ProcessResult | None = None
    timed_out: ToolTimeoutError | None = None
    try:
        proc_task = asyncio.create_task(
            run_process(full, cwd=cwd, env=env, timeout=timeout, output_limit=output_limit,
                        on_start=pgid_box.append, label=argv)
        )
        while not pgid_box and not proc_task.done():
            await asyncio.sleep(0.005)
        if pgid_box and sandbox:
            if limits.max_disk_usage is not None and disk_start is not None:
                watchers.append(asyncio.create_task(
                    _watch_disk(measured, disk_start, limits.max_disk_usage.bytes, pgid_box, tripped)))
            if limits.max_cpu is not None and "cpu" not in host.cgroup_root:
                watchers.append(asyncio.create_task(_throttle(pgid_box[0], limits.max_cpu.fraction)))
        try:
            result = await proc_task
        except ToolTimeoutError as e:
            tripped.append("timeout")
            timed_out = e
    finally:
        for w in watchers:
            w.cancel()
        for pgid in pgid_box:  # a throttled group must not stay stopped
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)
        usage_cpu = groups.cpu_seconds(host) if groups else None
        peak = groups.peak_memory(host) if groups else None
        if groups is not None and groups.oom_killed(host):
            tripped.append("memory")
        if groups is not None:
            groups.kill_all()  # whatever left the process group (setsid) dies here
            groups.remove()
        after = os.times()
        if usage_cpu is None:  # approximate: every child this process reaped meanwhile
            usage_cpu = (after.children_user - rusage_before.children_user) + (
                after.children_system - rusage_before.children_system)
        grown = (sum(_tree_size(r, k) for r, k in measured) - disk_start) if disk_start is not None else None
        usage = CommandUsage(
            wall_s=time.monotonic() - started,
            cpu_s=usage_cpu,
            peak_memory_bytes=peak,
            disk_growth_bytes=grown,
            # Under a PID namespace the kernel's kill shows up as unshare's own exit;
            # the cgroup knows what really happened.
            exit_code=None if "memory" in tripped else (result.exit_code if result else None),
            signal=signal.SIGKILL if "memory" in tripped else (result.signal if result else None),
            killed_for=tripped[0] if tripped else None,
        )
    if timed_out is not None:
        # The command's own timeout is a result the caller hands back to the model, not an error
        # that fails the task (``usage.killed_for`` says "timeout"); what it printed died with it.
        return ProcessResult(argv=tuple(full), exit_code=None, signal=signal.SIGKILL, stdout="", stderr="",
                             truncated=False, duration_s=usage.wall_s), usage, plan
    return result, usage, plan
