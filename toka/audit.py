"""The audit trail: one append-only JSON line per tool call, refusals included.

Records live in the workspace's state directory (``.toka/audit/<run>.jsonl``);
arguments and outputs are redacted before they are written. ``toka audit``
prints them; a hook (set by the Prefect task) mirrors each as a Prefect event.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .redact import redact, redact_data, secret_values

__all__ = ["AuditLog", "audit_path", "audit_records", "read_audit", "run_file_name"]


def run_file_name(run: str) -> str:
    """``run`` as a file name: characters unfit for one become ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run)


def audit_path(state_dir: Path, run: str) -> Path:
    """The audit trail file of run ``run``."""
    return state_dir / "audit" / f"{run_file_name(run)}.jsonl"


class AuditLog:
    """Appends records to ``path``; every write is one ``O_APPEND`` line, safe across processes."""

    def __init__(
        self,
        path: Path,
        *,
        run: str,
        secrets: Iterable[str] = (),
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.path = path
        self.run = run
        self.secrets = list(secrets)
        self.on_record = on_record
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, **fields: Any) -> dict[str, Any]:
        entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "run": self.run, **fields}
        # Each value first (a secret JSON would escape, e.g. one holding a quote, is still found),
        # then the line (values that only became text through ``default=str``).
        secrets = [*self.secrets, *secret_values()]  # read now: a key loaded later counts too
        entry = redact_data(entry, secrets)
        line = redact(json.dumps(entry, ensure_ascii=False, default=str, sort_keys=False), secrets)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # A file name that is not UTF-8 (a command made it) is a lone surrogate here: written as
            # its JSON escape, not lost with the whole record.
            os.write(fd, (line + "\n").encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)
        clean = json.loads(line)
        if self.on_record is not None:
            try:
                self.on_record(clean)
            except Exception:  # noqa: BLE001 - mirroring must never break the audited call
                pass
        return clean


def read_audit(state_dir: Path, *, run: str | None = None, agent: str | None = None) -> Iterator[dict[str, Any]]:
    """Records of one run (default: every run), optionally of one agent, in write order."""
    folder = state_dir / "audit"
    files = [audit_path(state_dir, run)] if run else sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    for file in files:
        if not file.exists():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                if agent is None or entry.get("agent") == agent:
                    yield entry


def audit_records(state_dir: Path, *, run: str | None = None, agent: str | None = None,
                  check_run: bool = True) -> list[dict[str, Any]]:
    """Like :func:`read_audit`, but a run or agent the trail does not know is an error, as in ``toka plan``.

    ``check_run=False`` accepts a run without a trail (the last run may have made no tool calls).

    Raises:
        ConfigError: naming the unknown run or agent, with the close matches and the known ones.
    """
    if run is not None and check_run and not audit_path(state_dir, run).is_file():
        runs = sorted(p.stem for p in (state_dir / "audit").glob("*.jsonl"))
        raise ConfigError(f"--run: unknown run {run!r}; {_known(run, runs, 'runs with an audit trail here')}")
    records = list(read_audit(state_dir, run=run))
    if agent is None:
        return records
    chosen = [r for r in records if r.get("agent") == agent]
    if not chosen:
        agents = sorted({str(r["agent"]) for r in records if r.get("agent")})
        where = f"run {run}" if run is not None else "any run"
        raise ConfigError(f"--agent: unknown agent {agent!r} in the audit trail of {where}; "
                          f"{_known(agent, agents, 'agents with tool calls there')}")
    return chosen


def _known(name: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(known[:12]) + (f", ... ({len(known) - 12} more)" if len(known) > 12 else "")
    return f"{hint}{what}: {shown or 'none'}"
