"""Running a tool's program so that a timeout really stops it.

The program starts in a new session (its own process group); on timeout the
whole group is killed, so its children and grandchildren go with it. Everything
is awaited, never blocking, so Prefect's task timeout can interrupt it too, and
cancellation kills the group as well. A program that deliberately leaves the
group (``setsid``) escapes this kill; only a cgroup can hold such processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ToolError, ToolTimeoutError

__all__ = ["ProcessResult", "process_state", "run_process"]


def as_text(text: str) -> str:
    """``text`` safe to send and write as UTF-8: a surrogate escape (a byte of a file name that is
    not UTF-8, as Python reads it) becomes U+FFFD, another lone surrogate ``?``; valid text is left
    as it is (the same object)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _escapes_only(text) else "replace").decode("utf-8", "replace")


def _escapes_only(text: str) -> bool:
    # Surrogate escapes stand for bytes 0x80-0xff; any other lone surrogate cannot be turned back.
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


@dataclass(frozen=True)
class ProcessResult:
    argv: tuple[str, ...]
    exit_code: int | None
    """None when the process was ended by a signal."""
    signal: int | None
    stdout: str
    stderr: str
    truncated: bool
    duration_s: float


async def run_process(
    argv: Sequence[str],
    *,
    cwd: str | Path,
    env: Mapping[str, str] | None = None,
    timeout: float,
    output_limit: int = 64_000,
    on_start: Callable[[int], None] | None = None,
    label: Sequence[str] | None = None,
) -> ProcessResult:
    """Run ``argv`` (no shell) with stdin closed; kill its process group when it ends, or after
    ``timeout`` s.

    Raises:
        ToolTimeoutError: the program ran past ``timeout``; it has been killed.
        ToolError: the program could not be started.
    """
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd),
            env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except (FileNotFoundError, PermissionError) as e:
        raise ToolError(f"cannot start {argv[0]!r}: {e.strerror}") from None
    if on_start is not None:
        on_start(proc.pid)  # also the process group id: the child leads a new session
    try:
        out, err, truncated = await asyncio.wait_for(_collect(proc, output_limit), timeout)
    except asyncio.TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise ToolTimeoutError(
            f"{' '.join(label or argv)!r} ran past its {timeout:g}s timeout; its process group was killed"
        ) from None
    except BaseException:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    # What it left running in its group (`cmd &`, nohup) goes with it: a command ends when it
    # returns. (Sandboxed, its PID namespace takes everything, `setsid` ones included.)
    _kill_group(proc)
    code = proc.returncode
    return ProcessResult(
        argv=tuple(argv),
        exit_code=code if code is not None and code >= 0 else None,
        signal=-code if code is not None and code < 0 else None,
        stdout=out,
        stderr=err,
        truncated=truncated,
        duration_s=time.monotonic() - started,
    )


async def _collect(proc: asyncio.subprocess.Process, limit: int) -> tuple[str, str, bool]:
    """Read both pipes to the end, keeping at most ``limit`` bytes of each."""

    async def drain(stream: asyncio.StreamReader | None) -> tuple[bytes, bool]:
        kept = bytearray()
        cut = False
        if stream is None:
            return b"", False
        while chunk := await stream.read(65536):
            room = limit - len(kept)
            if room > 0:
                kept += chunk[:room]
            cut = cut or len(chunk) > room
        return bytes(kept), cut

    (out, cut_out), (err, cut_err) = await asyncio.gather(drain(proc.stdout), drain(proc.stderr))
    await proc.wait()
    decode = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
    return decode(out), decode(err), cut_out or cut_err


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """The process's state letter from ``/proc`` (``R``, ``S``, ``T`` stopped, ``Z`` zombie...), or
    None where it cannot be read (gone, or no ``/proc``)."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def process_started(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None where it cannot be read.

    With its pid this names one process for good: a pid recorded in a file can belong to
    another process once the first has exited (pids wrap at 32768 on many machines).
    """
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def process_cpu(pid: int, *, reaped: bool = False) -> float | None:
    """CPU seconds the process has used so far (user and system), or None where it cannot be read.

    With ``reaped``, also what its children that ended and were waited for used (a server's
    finished workers)."""
    fields = _stat_fields(pid)
    try:
        return sum(int(f) for f in fields[11:15 if reaped else 13]) / os.sysconf("SC_CLK_TCK") if fields else None
    except (IndexError, ValueError):
        return None
