"""The record of the last run in a workspace, so ``toka run --resume`` can pick it up."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from .errors import ConfigError

__all__ = ["RunRecord", "new_run_key"]


def new_run_key() -> str:
    return uuid.uuid4().hex[:16]


class RunRecord(BaseModel):
    """What ``toka run`` writes before it starts (so a killed run can still be resumed)."""

    run_key: str
    started_at: str
    specs: list[str]
    agents: list[str]
    model: str
    contexts: list[str] = []

    @classmethod
    def start(cls, *, specs: list[str], agents: list[str], model: str, contexts: list[str],
              run_key: str | None = None) -> RunRecord:
        return cls(
            run_key=run_key or new_run_key(),
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            specs=specs,
            agents=agents,
            model=model,
            contexts=contexts,
        )

    def selection(self, option: str) -> object:
        """What this run used for a ``toka run`` option (to check a resume against it)."""
        return {"--run-key": self.run_key, "specs": self.specs, "--agent": self.agents,
                "--context": self.contexts, "--model": self.model}[option]

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / "runs" / "last.json"

    def save(self, state_dir: Path) -> None:
        path = self.path(state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)  # atomic: a kill never leaves half a record

    @classmethod
    def load_last(cls, state_dir: Path) -> RunRecord:
        path = cls.path(state_dir)
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"nothing to resume: no earlier run is recorded in {path.parent}") from None
        except (ValueError, OSError) as e:
            raise ConfigError(f"cannot read the last run record {path}: {e}") from None
