"""run_process: what a tool's program leaves behind (output, exit status) and that timeouts really stop it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from toka.errors import ToolError, ToolTimeoutError
from toka.process import ProcessResult, process_cpu, run_process


def run(argv: list[str], cwd: Path, **kwargs) -> ProcessResult:
    kwargs.setdefault("timeout", 10)
    return asyncio.run(run_process(argv, cwd=cwd, **kwargs))


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs.

    A killed orphan is reparented to PID 1 and stays a zombie until PID 1 reaps
    it; in some containers PID 1 does that only every second or two. A zombie
    no longer runs anything, so it counts as gone.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def gone_within(pid: int, seconds: float = 1.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


def grandchild(pidfile: Path) -> list[str]:
    """A shell that starts a long sleep in the background, notes its pid, and waits."""
    return ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"]


def read_pid(pidfile: Path) -> int:
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            return int(pidfile.read_text())
        time.sleep(0.01)
    raise AssertionError("the grandchild never wrote its pid")


def test_stdout_stderr_and_exit_code_are_captured(tmp_path: Path) -> None:
    result = run(["sh", "-c", "echo out; echo err >&2; exit 3"], tmp_path)
    assert result.exit_code == 3
    assert result.signal is None
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.truncated is False
    assert result.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")
    assert 0 <= result.duration_s < 5


def test_success_is_exit_code_zero(tmp_path: Path) -> None:
    result = run(["true"], tmp_path)
    assert (result.exit_code, result.signal, result.stdout, result.stderr) == (0, None, "", "")


def test_cwd_and_env_are_used(tmp_path: Path) -> None:
    result = run(["sh", "-c", "pwd; echo $TOKA_TEST_VAR"], tmp_path,
                 env={"TOKA_TEST_VAR": "hello", "PATH": os.environ["PATH"]})
    assert result.stdout.splitlines() == [str(tmp_path.resolve()), "hello"]


def test_argv_is_not_run_through_a_shell(tmp_path: Path) -> None:
    result = run(["echo", "$HOME", "a;b", "*"], tmp_path)
    assert result.stdout == "$HOME a;b *\n"


def test_an_exit_by_signal_is_reported_as_the_signal(tmp_path: Path) -> None:
    result = run(["sh", "-c", "kill -TERM $$"], tmp_path)
    assert result.exit_code is None
    assert result.signal == signal.SIGTERM


def test_stdin_is_closed(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run(["cat"], tmp_path, timeout=5)
    assert time.monotonic() - started < 2
    assert result.exit_code == 0
    assert result.stdout == ""


def test_output_beyond_the_limit_is_cut_and_flagged(tmp_path: Path) -> None:
    result = run(["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' a; echo short >&2"], tmp_path,
                 output_limit=1000)
    assert result.stdout == "a" * 1000
    assert result.stderr == "short\n"
    assert result.truncated is True
    assert result.exit_code == 0


def test_output_on_stderr_beyond_the_limit_is_flagged_too(tmp_path: Path) -> None:
    result = run(["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' e >&2"], tmp_path, output_limit=100)
    assert result.stderr == "e" * 100
    assert result.stdout == ""
    assert result.truncated is True


def test_output_exactly_at_the_limit_is_not_truncated(tmp_path: Path) -> None:
    result = run(["sh", "-c", "printf 0123456789"], tmp_path, output_limit=10)
    assert result.stdout == "0123456789"
    assert result.truncated is False


def test_a_timeout_kills_the_program_and_its_grandchildren(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(ToolTimeoutError, match=r"ran past its 0\.5s timeout; its process group was killed"):
        run(grandchild(pidfile), tmp_path, timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 1.0
    pid = read_pid(pidfile)
    assert gone_within(pid, 1.0), f"grandchild {pid} outlived the timeout"


def test_a_timeout_is_retryable(tmp_path: Path) -> None:
    with pytest.raises(ToolTimeoutError) as info:
        run(["sleep", "30"], tmp_path, timeout=0.2)
    assert info.value.retryable is True
    assert "'sleep 30'" in str(info.value)


def test_a_missing_program_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"cannot start 'no-such-program-xyz': No such file or directory"):
        run(["no-such-program-xyz", "--help"], tmp_path)


def test_a_file_that_is_not_executable_cannot_start(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(ToolError, match=r"cannot start '.*script\.sh': Permission denied"):
        run([str(script)], tmp_path)


def test_cancellation_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    async def main() -> None:
        await asyncio.wait_for(run_process(grandchild(pidfile), cwd=tmp_path, timeout=30), 0.5)

    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - started < 0.5 + 1.0
    pid = read_pid(pidfile)
    assert gone_within(pid, 1.0), f"grandchild {pid} outlived the cancellation"


def test_task_cancel_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    async def main() -> None:
        task = asyncio.create_task(run_process(grandchild(pidfile), cwd=tmp_path, timeout=30))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    pid = read_pid(pidfile)
    assert gone_within(pid, 1.0)


def test_process_cpu_counts_what_a_busy_process_used_and_nothing_for_a_gone_one() -> None:
    import subprocess
    import sys

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.5: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while (used := process_cpu(busy.pid) or 0.0) < 0.5:
            assert time.monotonic() < deadline, f"only {used:.2f} s of CPU read for a busy process"
            time.sleep(0.05)
        assert used < 10  # seconds, not clock ticks
    finally:
        busy.kill()
        busy.wait()
    assert process_cpu(busy.pid) is None  # gone (reaped)
