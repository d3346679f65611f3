"""What every benchmark sets before anything imports prefect: a fresh Prefect home of its own.

The home (database, results) is a temporary directory removed at exit; the cleanup is
registered before Prefect's own atexit hook, so it runs after the embedded server stopped.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any


def scratch(prefix: str) -> Path:
    """A temporary directory for this process, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def prefect_env(home: Path) -> dict[str, str]:
    """Environment for a Prefect process whose home (database, results) is ``home``."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
        # A loaded machine may need more than Prefect's default 20 s (the same for every side).
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }


def stop_embedded(server: Any) -> None:
    """Stop a benchmark's embedded server once the run's log lines have reached it (Prefect
    sends them in the background; one sent to a stopped server prints an error later)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    server.stop()


def descendants(pid: int) -> list[int]:
    """The live descendants of process ``pid`` (Linux: /proc; elsewhere none)."""
    found: list[int] = []
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found  # ended meanwhile, or no /proc
    for thread in threads:
        try:
            children = (thread / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found
