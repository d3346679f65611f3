"""The audit trail: one append-only JSON line per tool call, refusals included.

Records live in the workspace's state directory (``.toka/audit/<run>.jsonl``);
arguments and outputs are redacted before they are written. ``toka audit``
prints them; a hook (set by the Prefect task) mirrors each as a Prefect event.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .redact import redact, redact_data, secret_values

__all__ = ["AuditLog", "read_audit"]


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
            os.write(fd, (line + "\n").encode("utf-8"))
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
    files = [folder / f"{run}.jsonl"] if run else sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    for file in files:
        if not file.exists():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                if agent is None or entry.get("agent") == agent:
                    yield entry
