"""A warm process next to the lasting server, so that ``toka run`` starts in about a second.

Importing Prefect and the anthropic SDK costs about 5 s of CPU on a 2-core machine
(``python -X importtime``: Prefect 2.5 s, anthropic 2.3 s, mostly building pydantic
models), on every ``toka run``, before toka does anything. ``toka server start`` therefore
also starts a warm process, which imports them and toka once and then waits on a Unix
socket in the Prefect home (:data:`SOCKET_NAME`, mode 0600).

The ``toka`` command (:func:`main`, which imports only the standard library before this
choice) connects and sends its arguments, working directory, environment, umask,
resource limits and its standard streams themselves (file descriptors, ``SCM_RIGHTS``).
The warm process forks a child that becomes that command: it takes over the streams,
directory, environment and limits, leaves the warm process's session, reads Prefect's
settings and logging set-up again from the new environment, and runs ``toka.cli``.
Output goes straight to the caller's terminal or pipes; the exit status comes back over
the socket.

Signals: the child is in its own session, so a Ctrl-C in the terminal reaches only the
``toka`` command, which forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the child. When
the command dies without a word (kill -9), the warm process kills the child's process
group: the run stops as if it had been killed in the command's own process. A child
ended by a signal ends the command with the same signal.

The command runs everything in its own process, as without a warm process, when: none
answers on the socket, ``TOKA_WARM=0``, or the warm process was started from other code
(toka's files, the Python, the installed packages or ``PYTHONPATH`` changed since: it
then also exits, and says so; ``toka server start`` starts a fresh one). Only ``toka
run`` is handed over: it is the command whose start-up matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .startup import defer_gc, startup_imports

__all__ = ["SOCKET_NAME", "fingerprint", "forked", "main", "preload", "preload_prefect", "refresh_after_fork", "serve",
           "serve_command", "serve_main", "socket_path"]

SOCKET_NAME = "toka-warm.sock"
HANDED_OVER = ("run",)
"""The subcommands a warm process runs."""
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
STOP_GRACE_SECONDS = 20.0
_LIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_MEMLOCK",
           "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_STACK")
_HEADER = struct.Struct("!Q")
_forked = False


def forked() -> bool:
    """Whether this process is a run forked from a warm process."""
    return _forked


def socket_path(env: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """Where the warm process listens: in the Prefect home (``PREFECT_HOME``, else ``~/.prefect``).

    Read from the environment alone, without Prefect's settings (importing them is what a
    warm start saves). A home Prefect takes from elsewhere (a profile, ``prefect.toml``) is
    not looked at: the command then finds no socket, and runs in its own process.
    """
    env = os.environ if env is None else env
    return Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser() / SOCKET_NAME


def fingerprint() -> str:
    """What the code of a run is made of: the Python, toka's own files, the installed packages."""
    package = Path(__file__).resolve().parent
    parts: list[object] = [sys.executable, sys.version, str(package), os.environ.get("PYTHONPATH", "")]
    for path in sorted(package.glob("*.py")):
        stat = path.stat()
        parts.append((path.name, stat.st_mtime_ns, stat.st_size))
    for entry in sys.path:
        if entry.endswith(("site-packages", "dist-packages")) and os.path.isdir(entry):
            parts.append((entry, os.stat(entry).st_mtime_ns))  # a package installed or removed
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


# -- the toka command's side -------------------------------------------------------------


def main() -> None:
    """The ``toka`` console script: a warm process runs the command when it can, else this one."""
    # Until a run's imports are done (toka.cli._execute settles it). Other commands are short
    # and end with it deferred, as does this process when a warm process runs the command.
    defer_gc()
    code = _hand_over(sys.argv)
    if code is None:
        from .cli import main as run_here

        run_here()
        return
    sys.exit(code)


def _hand_over(argv: list[str]) -> int | None:
    """The exit code of the command run by a warm process, or None to run it here."""
    if len(argv) < 2 or argv[1] not in HANDED_OVER or os.environ.get("TOKA_WARM", "1") == "0":
        return None
    path = socket_path()
    if len(os.fsencode(path)) >= 100 or not path.exists():  # 108 bytes is the limit of a socket's path
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.fspath(path))
        _send(conn, {
            "fingerprint": fingerprint(), "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
            "umask": _umask(), "limits": {name: resource.getrlimit(getattr(resource, name))
                                          for name in _LIMITS if hasattr(resource, name)},
        })
        reply = _lines(conn)
        first = next(reply, "")
    except OSError:
        conn.close()
        return None
    if not first.startswith("pid "):
        conn.close()
        if first.startswith("decline "):
            sys.stderr.write(f"note: {first.removeprefix('decline ')}; this run starts in its own process\n")
        return None
    child = int(first.split()[1])
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: _forward(child, signum))
    last = next(reply, "")
    conn.close()
    if last.startswith("exit "):
        code = int(last.split()[1])
        if code < 0:
            _die_by(-code)
        return code
    # The warm process died under the run (it was killed, or the server stopped): wait for
    # the run, whose own output says how it ended, without its exit status.
    _wait_gone(child)
    sys.stderr.write("error: the warm process of the toka server ended during the run; its exit status is lost\n")
    return 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _forward(child: int, signum: int) -> None:
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass


def _die_by(signum: int) -> NoReturn:
    sys.stdout.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)  # a signal whose default is not to end the process


def _wait_gone(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return
    try:
        import select

        select.select([fd], [], [])
    finally:
        os.close(fd)


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    payload = json.dumps(message).encode()
    data = _HEADER.pack(len(payload)) + payload
    sent = socket.send_fds(conn, [data], [0, 1, 2])
    if sent < len(data):  # (an empty send to a peer that declined and hung up already fails)
        conn.sendall(data[sent:])


def _lines(conn: socket.socket) -> Any:
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()
        chunk = conn.recv(4096)
        if not chunk:
            return
        buffer += chunk


# -- the warm process --------------------------------------------------------------------


def serve(path: Path) -> None:
    """Import everything a run needs, then fork a run for each command that connects.

    Returns only in a forked child, after it became the command; the caller then runs it.
    """
    with startup_imports():  # the children share what it imported, and never collect it
        preload()
    own = fingerprint()
    path.unlink(missing_ok=True)  # a socket left by a warm process that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)  # the socket is created 0600: only this user may hand it a command
    try:
        listener.bind(os.fspath(path))
    finally:
        os.umask(old_mask)
    listener.listen(16)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    stopping: list[int] = []
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_read, selectors.EVENT_READ, "wake")
    print(f"warm: ready on {path} (pid {os.getpid()})", flush=True)
    stop_at: float | None = None
    while True:
        if stopping and stop_at is None:
            stop_at = time.monotonic() + STOP_GRACE_SECONDS
            selector.unregister(listener)
            listener.close()
            path.unlink(missing_ok=True)
            for pid in children:  # a run stopped as `toka run` stops on SIGTERM
                _forward(pid, signal.SIGTERM)
        if stop_at is not None and (not children or time.monotonic() > stop_at):
            for pid in children:
                _kill_group(pid)
            return _exit_warm("stopped")
        for key, _ in selector.select(timeout=1.0 if stop_at is not None else None):
            if key.data == "wake":
                os.read(wake_read, 4096)
                _reap(children, selector)
            elif key.data == "accept":
                conn, _ = listener.accept()
                request = _receive(conn)
                if request is None:
                    conn.close()
                    continue
                message, fds = request
                if message.get("fingerprint") != own:
                    conn.sendall(b"decline toka or its Python changed since `toka server start` (run it again to "
                                 b"warm up the new code)\n")
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    path.unlink(missing_ok=True)
                    return _exit_warm("its code changed on disk")
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    for other in children.values():
                        other.close()
                    os.close(wake_read)
                    os.close(wake_write)
                    _become(message, fds, conn)
                    return None
                for fd in fds:
                    os.close(fd)
                print(f"warm: pid {pid}: toka {message['argv'][1]} in {message['cwd']}", flush=True)
                children[pid] = conn
                selector.register(conn, selectors.EVENT_READ, pid)
                try:
                    conn.sendall(f"pid {pid}\n".encode())
                except OSError:
                    _kill_group(pid)
            else:
                # The command's end of the socket: it says nothing after its request, so this
                # is its end (kill -9, or it was closed): the run goes with it.
                pid = key.data
                try:
                    gone = not key.fileobj.recv(1, socket.MSG_PEEK)  # type: ignore[union-attr]
                except OSError:
                    gone = True
                if gone:
                    selector.unregister(key.fileobj)
                    _kill_group(pid)


def _exit_warm(why: str) -> NoReturn:
    print(f"warm: exiting: {why}", flush=True)
    os._exit(0)


def preload_prefect() -> None:
    """What Prefect imports at a run's first flow and task call: in the warm process, and before a
    `toka run` lets garbage collection start (:func:`toka.startup.settle_gc`)."""
    import prefect  # noqa: F401
    import prefect.client.orchestration  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401
    import prefect.utilities.visualization  # noqa: F401  (imported by every flow call)
    from fastapi import encoders  # noqa: F401  (Prefect's serialisation of flow parameters: 0.6 s)


def preload() -> None:
    """What a run imports, imported once in the warm process (each child has it for free)."""
    import anthropic  # noqa: F401

    preload_prefect()
    from . import branches, claude, cli, compiler, lifecycle, llm_step, offline, pipeline, server  # noqa: F401


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    conn.settimeout(10)
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        if uid != os.getuid() or len(fds) != 3 or len(data) < _HEADER.size:
            for fd in fds:
                os.close(fd)
            return None
        (size,) = _HEADER.unpack_from(data)
        payload = data[_HEADER.size:]
        while len(payload) < size:
            chunk = conn.recv(size - len(payload))
            if not chunk:
                raise ConnectionError("the command hung up")
            payload += chunk
        conn.settimeout(None)
        return json.loads(payload), fds
    except (OSError, ValueError):
        return None


def _reap(children: dict[int, socket.socket], selector: Any) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        try:
            conn.sendall(f"exit {code}\n".encode())
        except OSError:
            pass
        conn.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _become(message: dict[str, Any], fds: list[int], conn: socket.socket) -> None:
    """Turn this forked child into the command that connected (see the module's docstring)."""
    global _forked
    _forked = True
    conn.close()
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()  # its own process group: the warm process can end it, with everything it started
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(message["cwd"])
    os.umask(message["umask"])
    os.environ.clear()
    os.environ.update(message["env"])
    for name, (soft, hard) in message["limits"].items():
        _set_limit(getattr(resource, name), soft, hard)
    sys.argv = list(message["argv"])
    sys.stdin = sys.__stdin__ = _stream(0, "r")
    sys.stdout = sys.__stdout__ = _stream(1, "w")
    sys.stderr = sys.__stderr__ = _stream(2, "w", errors="backslashreplace")


def _set_limit(which: int, soft: int, hard: int) -> None:
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):  # a hard limit above the warm process's own cannot be raised
        current_hard = resource.getrlimit(which)[1]
        capped = soft if current_hard == resource.RLIM_INFINITY or 0 <= soft <= current_hard else current_hard
        try:
            resource.setrlimit(which, (capped, current_hard))
        except (ValueError, OSError):
            pass


def _stream(fd: int, mode: str, errors: str = "strict") -> Any:
    """A standard stream on ``fd``, buffered as Python buffers it at start-up: by line on a
    terminal, and always for stderr."""
    import io

    raw = io.FileIO(fd, mode, closefd=False)
    buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    encoding = os.environ.get("PYTHONIOENCODING", "").partition(":")[0] or "utf-8"
    return io.TextIOWrapper(buffered, encoding=encoding, errors=errors,
                            line_buffering=os.isatty(fd) or errors != "strict")


def refresh_after_fork() -> None:
    """In a forked run: let Prefect read its settings and logging set-up from this environment.

    Prefect reads both when imported, which happened in the warm process, under its
    environment. Call once the command has put its own Prefect settings in the environment.
    """
    if not _forked:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    refresh_global_settings_context()
    setup_logging(incremental=False)


def serve_command(path: Path) -> list[str]:
    """The command line of a warm process on ``path``.

    ``-c``, not ``-m``: run as ``__main__`` the module would be a second copy of itself,
    whose :func:`forked` the run could not see. ``-P``: the directory it is started from
    stays off the import path.
    """
    return [sys.executable, "-P", "-c", "from toka.warm import serve_main; serve_main()", os.fspath(path)]


def serve_main() -> None:
    """The warm process's entry point (:func:`serve_command`)."""
    if len(sys.argv) != 2:
        sys.exit("usage: python -c 'from toka.warm import serve_main; serve_main()' SOCKET")
    serve(Path(sys.argv[1]))
    # Here only in a forked child that became a `toka` command: run it, then exit as a fresh
    # process would (atexit handlers, non-daemon threads joined, streams flushed).
    from . import cli

    cli.out, cli.err = cli.consoles()
    cli.main()
