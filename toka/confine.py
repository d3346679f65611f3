"""Confine a sandboxed command before it starts: read-only host, no root powers.

Run as a program, not imported: the sandbox wrapper executes this file (standard
library only, ``python -I -S``) inside the command's fresh mount, PID (and
network) namespaces, as the last step before the command itself::

    python -I -S confine.py CONFIG_JSON -- argv...

Without it a command runs as the runtime's user, which is root here: root can
write ``/sys/fs/cgroup`` (and leave its cgroup with its memory and process
limits), unmount the private ``/proc`` and enter another network namespace, or
write anywhere on the host. So, in this order:

1. every mount becomes private (nothing propagates back to the host);
2. the workspace is bind-mounted onto itself and stays writable; the state
   directory inside it is read-only (the audit trail cannot be rewritten) except
   the command's private home; the workspace's git directory is pinned and its
   control files (config, hooks, info...) are read-only (see ``gitguard.py``);
3. every other mount is remounted read-only (keeping nosuid/nodev/noexec);
4. ``/tmp``, ``/var/tmp`` and ``/dev/shm`` become private tmpfs scratch space;
   ``/dev`` holds only null, zero, full, random, urandom and tty; the kernel
   knobs under ``/proc`` are read-only; configured secret paths are masked
   (credential files, homes, ``/run``), and so is every listening Unix socket
   outside the workspace (a network namespace does not cover path sockets);
5. every capability is dropped (bounding, inheritable, ambient) and
   ``no_new_privs`` is set, so neither the command nor a set-uid program it
   starts can undo the above (mounting, unmounting and ``setns`` need
   ``CAP_SYS_ADMIN``);
6. the working directory is entered again (through the new mounts) and the
   command is executed.

Any failure stops here with exit code 126 and one line on stderr: the command
never runs half-confined.

CONFIG_JSON keys: ``workspace``, ``cwd``, ``writable`` (directories inside the
state directory that stay writable), ``readonly`` (directories inside the
workspace made read-only), ``replace`` (file -> the text it shows instead, read-only), ``mask`` (paths hidden behind an empty tmpfs or
/dev/null), ``keep`` (paths that stay visible inside masked ones, e.g. the
PATH), ``pin`` (git directories bound onto themselves), ``protect`` (paths inside the
workspace made read-only), ``sockets`` (Unix socket paths to mask), ``tmpfs_size``
(bytes, or null for the kernel's default).
"""

import ctypes
import ctypes.util
import json
import os
import stat
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21

# statvfs f_flag bits -> the per-mount flags a read-only remount must keep (the
# kernel refuses, or silently clears, flags that a bind remount leaves out).
_KEEP = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
         (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "kallsyms")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


class Refused(Exception):
    pass


def _mount(source, target, fstype, flags, data=None):
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        errno = ctypes.get_errno()
        raise Refused(f"mount {target}: {os.strerror(errno)}")


def _b(value):
    return None if value is None else os.fsencode(value)


def _mount_points():
    """Mount points in mount order, from /proc/self/mountinfo (octal escapes decoded)."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split()[4]
            points.append(os.fsdecode(raw.decode("unicode_escape").encode("latin-1")))
    return points


def _inside(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _kept_flags(path):
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    flags = 0
    for bit, ms in _KEEP:
        if st.f_flag & bit:
            flags |= ms
    return flags


def _readonly(path, *, required):
    flags = _kept_flags(path)
    if flags is None:
        if required:
            raise Refused(f"cannot inspect mount {path}")
        return
    try:
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    except Refused:
        if required:
            raise


def _bind(source, target, *, readonly=False):
    _mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        _readonly(target, required=True)


def _tmpfs(target, size, mode="1777"):
    data = f"mode={mode}" + (f",size={size}" if size else "")
    _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, data)


def _private_dev():
    """A /dev with only harmless devices (as root, the host's block devices would be writable)."""
    # O_PATH handles reach the old nodes once the new /dev hides them.
    handles = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES if os.path.exists(f"/dev/{name}")}
    _tmpfs("/dev", 1 << 20, mode="755")
    for name, fd in handles.items():
        open(f"/dev/{name}", "w").close()
        _bind(f"/proc/self/fd/{fd}", f"/dev/{name}")
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")
    _readonly("/dev", required=True)


def _private(path, size, keep):
    """A fresh tmpfs on ``path``, with the ``keep`` paths inside it (and their mounts) put back."""
    inner = sorted({k for k in keep if _inside(k, path) and k != path})
    outermost = [k for k in inner if not any(_inside(k, o) and k != o for o in inner)]
    handles = {k: os.open(k, os.O_PATH) for k in outermost}
    _tmpfs(path, size)
    for target, handle in handles.items():
        if os.path.isdir(f"/proc/self/fd/{handle}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        _bind(f"/proc/self/fd/{handle}", target)
        os.close(handle)


def _mask(path, keep, writable):
    """Hide ``path`` behind an empty read-only tmpfs (or /dev/null), except the ``keep`` paths within it.

    With kept paths inside, a fresh read-only tmpfs holds just those (read-only too, unless
    writable): not even the names of the rest show.
    """
    if os.path.islink(path) or not os.path.exists(path):
        return
    inner = [k for k in keep if _inside(k, path)]
    if path in inner:
        return
    if inner and os.path.isdir(path):
        _private(path, 1 << 20, inner)
        _readonly(path, required=True)
        for k in inner:
            if os.path.exists(k) and not any(_inside(k, w) for w in writable):
                _readonly(k, required=False)
    elif os.path.isdir(path):
        _tmpfs(path, 4096, mode="700")
        _readonly(path, required=True)
    else:
        _bind("/dev/null", path, readonly=True)


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _drop_capabilities():
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise Refused(f"cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(_LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise Refused("cannot read capabilities")
    for d in data:  # keep the effective set for exec; nothing is inherited across it
        d.inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise Refused("cannot clear inheritable capabilities")
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise Refused("cannot set no_new_privs")


def confine(config):
    workspace = os.path.realpath(config["workspace"])
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _bind(workspace, workspace)
    for path in config.get("readonly", ()):
        if os.path.isdir(path):
            _bind(path, path, readonly=True)
    for path in config.get("writable", ()):
        if os.path.isdir(path):
            # A hole in the read-only state directory: a bind copies its source's read-only
            # flag, so it is remounted writable.
            _bind(path, path)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | (_kept_flags(path) or 0))
    for path in config.get("pin", ()):
        # The git directory becomes a mount point: it cannot be renamed, removed or replaced
        # by one holding other hooks; its control files inside turn read-only.
        if os.path.isdir(path):
            _bind(path, path)
    for path in config.get("protect", ()):
        if os.path.lexists(path) and not os.path.islink(path):
            _bind(path, path, readonly=True)
    writable = [workspace, *(os.path.realpath(p) for p in config.get("writable", ()))]
    for point in _mount_points():
        if _inside(point, "/proc") or any(_inside(point, w) for w in writable):
            continue
        # A mount hidden under another one is not reachable; every reachable one must turn read-only.
        _readonly(point, required=os.path.exists(point) and _kept_flags(point) is not None)
    for name in PROC_READONLY:
        path = f"/proc/{name}"
        if os.path.exists(path):
            _bind(path, path, readonly=True)
    for name in PROC_MASKED:
        if os.path.exists(f"/proc/{name}"):
            _bind("/dev/null", f"/proc/{name}", readonly=True)
    _private_dev()
    # What the command needs to reach stays visible inside masked and private places: the
    # workspace, its working directory and the programs on its PATH (a checkout in /tmp...).
    keep = [workspace, os.path.realpath(config["cwd"]),
            *(os.path.realpath(p) for p in [*config.get("keep", ()), *config.get("writable", ())] if p)]
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _private(path, config.get("tmpfs_size"), [k for k in keep if os.path.exists(k)])
    for path in dict.fromkeys(os.path.realpath(p) for p in config.get("mask", ())):
        _mask(path, keep, writable)
    for path in config.get("sockets", ()):
        # Host services listening on Unix sockets: a read-only mount does not stop connect().
        if not _inside(path, workspace) and _is_socket(path):
            _bind("/dev/null", path, readonly=True)
    replaced = config.get("replace") or {}
    if replaced:
        # Git's configuration with its credentials taken out (a token in a remote's URL, an
        # authorization header): the copy lives in the private /tmp, read-only over the original.
        os.makedirs("/tmp/.toka-replaced", exist_ok=True)
        for n, (target, content) in enumerate(sorted(replaced.items())):
            if os.path.isfile(target) and not os.path.islink(target):
                copy = f"/tmp/.toka-replaced/{n}"
                with open(copy, "w", encoding="utf-8", errors="surrogateescape") as f:
                    f.write(content)
                _bind(copy, target, readonly=True)
    _drop_capabilities()
    os.chdir(config["cwd"])  # through the new mounts, not the read-only one underneath


def main(argv):
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: confine.py CONFIG_JSON -- program [args...]\n")
        return 126
    config, command = json.loads(argv[0]), argv[2:]
    try:
        confine(config)
    except (Refused, OSError) as e:
        sys.stderr.write(f"toka sandbox: cannot confine the command: {e}\n")
        return 126
    try:
        os.execvp(command[0], command)
    except OSError as e:
        sys.stderr.write(f"toka sandbox: cannot run {command[0]!r}: {e.strerror}\n")
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
