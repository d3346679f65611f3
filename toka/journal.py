"""Durable turns: what a task's conversation received, recorded as it happens, replayed on resume.

Every model response and every tool result of a task is appended to the task's
journal (one JSON line each, in the file before the task goes on, so a killed process loses
none; fsynced in a thread after, not waited for: on a disk busy with the server's database an
fsync took 4 ms a model request), under
the run key, agent and task: ``.toka/journal/<run>/<agent>/<task>.jsonl``. When
the task runs again under the same run key (``toka run --resume`` after a kill,
a Prefect retry of the task, a retry of the pipeline run from the UI), the loop
replays the journal instead of asking the model and running the tools again:
recorded responses are not requested, recorded tool calls are not executed
(the workspace already holds their effects). Only what was in flight when the
task stopped is done again.

Each entry carries a fingerprint of what produced it: for a response, the whole
request it answered (system prompt, tools, messages, output limit, model); for a
tool result, the response that asked for it and the call itself. Replay goes on
while the fingerprints match; at the first mismatch (the spec, the prompt or the
tools changed) the rest of the journal is dropped and the task goes on live. A
recorded answer is never given to a different question.

A journal, not a Prefect task per turn: a line appended to a local file costs
well under a millisecond, a Prefect task run several API writes (measured by
``bench/long_task.py``), and 150 turns of a long task would add them all to the
critical path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .background import soon
from .errors import ReplayDiverged
from .model import ModelRequest, ModelResponse, ToolResultBlock
from .redact import redact_data, secret_values

__all__ = ["Journal", "Replay", "journal_path", "request_fingerprint", "tool_fingerprint"]

Kind = Literal["response", "tool", "too-long", "calling"]

#: Marks the entries this process recorded: a response replayed after a Prefect retry in the
#: same process was charged here already, one recorded by an earlier (killed) process was not.
PROCESS = uuid.uuid4().hex


def _digest(material: Any) -> str:
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def request_fingerprint(request: ModelRequest, model: dict[str, Any]) -> str:
    """What a response answered: the request as sent (metadata aside) and the model's settings."""
    sent = request.model_dump(mode="json", exclude={"metadata"})
    if sent["tool_choice"] is None:  # as before the field existed: journals of earlier runs still match
        del sent["tool_choice"]
    return _digest({"request": sent, "model": model})


def tool_fingerprint(response_fingerprint: str, tool_use_id: str, name: str, arguments: dict[str, Any]) -> str:
    """What a tool result answered: the call, and the response (so the whole conversation) it came from."""
    return _digest({"after": response_fingerprint, "id": tool_use_id, "tool": name, "input": arguments})


def journal_path(state_dir: Path, run_key: str, agent: str, task: int) -> Path:
    """Where task ``task`` of ``agent`` keeps its journal in run ``run_key``."""
    return journal_dir(state_dir, run_key) / agent / f"{task}.jsonl"


def journal_dir(state_dir: Path, run_key: str) -> Path:
    """Where the tasks of run ``run_key`` keep their journals."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_key).strip(".") or "_"
    return state_dir / "journal" / safe


def remove_empty_journals(state_dir: Path, run_key: str) -> None:
    """Remove run ``run_key``'s journal directories that no journal is left in (its tasks all
    finished): what stays is what a resume replays."""
    run_dir = journal_dir(state_dir, run_key)
    try:
        agents = list(run_dir.iterdir())
    except OSError:
        return
    for folder in [*agents, run_dir]:
        with contextlib.suppress(OSError):  # not empty, or not a directory: kept
            folder.rmdir()


@dataclass
class Entry:
    kind: Kind
    fingerprint: str
    data: dict[str, Any]
    by: str = PROCESS

    def line(self) -> str:
        # Redacted like everything else written to disk: a model may echo a secret, and a failed
        # task's journal stays. Replaying a redacted answer changes the next request, so replay
        # goes live from there: the rare cost of never keeping the secret.
        data = redact_data(self.data, secret_values())
        return json.dumps({"kind": self.kind, "fingerprint": self.fingerprint, "by": self.by, "data": data},
                          separators=(",", ":")) + "\n"


class Journal:
    """One task's recorded entries in a JSON-lines file.

    An append is in the file when it returns (a process killed then loses nothing) and on
    disk moments later: its fsync runs in a thread, not waited for, one at a time for each
    journal (lines written while one is queued are synced with it). A machine that fails
    in between loses the lines not yet synced; the turns they held are asked again.

    Args:
        path: The journal's file.
        logger: Where a failed fsync is reported (the task's run log); toka's own logger if None.
    """

    def __init__(self, path: Path, logger: Any = None) -> None:
        self.path = path
        self.logger = logger
        self._sync_queued = False
        self._sync_lock = threading.Lock()

    def unfinished_call(self) -> str | None:
        """The tool that changes files the journal ends in the middle of (its call recorded as
        begun, no result after it: the process stopped while it ran), else None. What it changed
        is not known: done again, an edit or an appending command would land twice."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                tail = f.read().splitlines()
        except OSError:
            return None
        for line in reversed(tail):  # the last whole line: one torn by a kill is no entry
            try:
                last = json.loads(line)
            except ValueError:
                continue
            if isinstance(last, dict) and last.get("kind") == "calling":
                return str((last.get("data") or {}).get("tool", "a tool"))
            return None
        return None

    def load(self) -> list[Entry]:
        """The entries recorded so far; a torn last line (the process died writing it) is dropped."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        entries: list[Entry] = []
        for line in text.splitlines():
            try:
                raw = json.loads(line)
                entries.append(Entry(raw["kind"], raw["fingerprint"], raw["data"], raw.get("by", "")))
            except (ValueError, KeyError, TypeError):
                break  # everything after a bad line is unusable: replay stops there
        return entries

    def append(self, entry: Entry) -> None:
        line = entry.line()
        try:
            f = open(self.path, "a", encoding="utf-8")
        except FileNotFoundError:  # the first entry: its directory is made then, not at every turn
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a", encoding="utf-8")
        with f:
            f.write(line)
        with self._sync_lock:
            if self._sync_queued:
                return
            self._sync_queued = True
        soon(self._sync_queued_lines, f"syncing the journal {self.path}", logger=self.logger)

    def _sync_queued_lines(self) -> None:
        with self._sync_lock:
            self._sync_queued = False  # a line written from now on queues the next fsync
        self._sync(self.path)

    @staticmethod
    def _sync(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return  # the task finished (or started afresh) meanwhile: nothing left to keep
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, entries: list[Entry]) -> None:
        """Keep only ``entries`` (atomically: a kill leaves the old journal or the new one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(e.line() for e in entries), encoding="utf-8")
        tmp.replace(self.path)

    def discard(self) -> None:
        """Forget the recorded turns: the next attempt starts afresh."""
        self.path.unlink(missing_ok=True)


@dataclass
class Replay:
    """Hands out a journal's entries in order while they match; records everything after.

    ``on_mismatch`` is called once, with the entry number, when replay stops before the
    end of the journal (the request or call differs from the recorded one).
    """

    journal: Journal | None
    on_mismatch: Callable[[int, Kind], None] = lambda index, kind: None
    entries: list[Entry] = field(default_factory=list)
    position: int = 0
    replayed: int = 0
    counter: str = ""
    """Which count of the task's tool calls this attempt adds to (:class:`toka.results.TaskCalls`);
    a replayed call recorded under another (a resume, a retried agent run) is counted again here."""
    strict: bool = False
    """Raise :class:`~toka.errors.ReplayDiverged` on a mismatch when a tool call not replayed yet
    had changed files (they are in the workspace, and would be changed again)."""

    def __post_init__(self) -> None:
        if self.journal is not None and not self.entries:
            # A call's "calling" marker only matters while no result follows it (unfinished_call).
            self.entries = [e for e in self.journal.load() if e.kind != "calling"]

    @property
    def live(self) -> bool:
        return self.position >= len(self.entries)

    def take(self, kind: Kind, fingerprint: str) -> Entry | None:
        """The recorded step, or None: then the step is done live (and recorded)."""
        if self.live:
            return None
        entry = self.entries[self.position]
        if entry.kind == kind and entry.fingerprint == fingerprint:
            self.position += 1
            self.replayed += 1
            return entry
        self.on_mismatch(self.position, kind)
        if self.strict and any(e.kind == "tool" and e.data.get("files_changed") for e in self.entries[self.position:]):
            raise ReplayDiverged(f"the task's recorded turns stop matching at step {self.position + 1} (a setting "
                                 "or the spec changed), after which recorded tool calls changed files")
        del self.entries[self.position:]
        if self.journal is not None:
            self.journal.rewrite(self.entries)
        return None

    async def record(self, kind: Kind, fingerprint: str, data: dict[str, Any]) -> None:
        """Append the step: in the file when this returns, on disk moments later (:class:`Journal`)."""
        entry = Entry(kind, fingerprint, data)
        self.entries.append(entry)
        self.position = len(self.entries)
        if self.journal is not None:
            # Here, not in a worker thread: a line to the page cache takes microseconds, the round
            # trip to a thread milliseconds on two cores busy with the server (waiting to be
            # scheduled there and back), on the critical path of every model request and tool
            # result. Eight paired rounds, twice (nine specs, PostgreSQL-backed server): 206 and
            # 150 ms less per run at the median. Nothing here waits for the disk: the fsync does,
            # in its own thread (a stalled one holds up no line), and no await means a cancelled
            # task (a Prefect timeout, Ctrl-C) cannot drop a line of a response already paid for.
            self.journal.append(entry)

    # -- what is recorded ---------------------------------------------------------

    def response(self, fingerprint: str) -> tuple[ModelResponse, bool] | None:
        """The recorded response, and whether this process paid for it (else it was paid before)."""
        entry = self.take("response", fingerprint)
        return None if entry is None else (ModelResponse.model_validate(entry.data), entry.by == PROCESS)

    async def record_response(self, fingerprint: str, response: ModelResponse) -> None:
        await self.record("response", fingerprint, response.model_dump(mode="json"))

    def too_long(self, fingerprint: str) -> str | None:
        """The server's message if it refused this very request as too long, when recorded next.

        Refused, the request left no response; the conversation went on from a compaction. A
        replay that asked for the refused request's response would meet the summary's and stop
        there, and the task would do again everything after it.
        """
        if self.live:
            return None
        entry = self.entries[self.position]
        if entry.kind != "too-long" or entry.fingerprint != fingerprint:
            return None  # a response, or a mismatch that `response` reports
        self.position += 1
        self.replayed += 1
        return str(entry.data.get("message", ""))

    async def record_too_long(self, fingerprint: str, message: str) -> None:
        await self.record("too-long", fingerprint, {"message": message})

    async def record_calling(self, fingerprint: str, tool: str) -> None:
        """Before a tool that changes files runs: a stop before its result is recorded leaves this."""
        await self.record("calling", fingerprint, {"tool": tool})

    def tool(self, fingerprint: str) -> RecordedTool | None:
        entry = self.take("tool", fingerprint)
        if entry is None:
            return None
        data = entry.data
        return RecordedTool(ToolResultBlock.model_validate(data["block"]), data["files_read"], data["files_changed"],
                            counted=bool(self.counter) and data.get("counted_in") == self.counter,
                            refused=bool(data.get("refused", False)))

    async def record_tool(self, fingerprint: str, block: ToolResultBlock, files_read: list[str],
                          files_changed: list[str], *, refused: bool = False) -> None:
        await self.record("tool", fingerprint, {"block": block.model_dump(mode="json"), "files_read": files_read,
                                                "files_changed": files_changed, "refused": refused,
                                                "counted_in": self.counter})


@dataclass(frozen=True)
class RecordedTool:
    """A tool call's recorded result; its effects are already in the workspace."""

    block: ToolResultBlock
    files_read: list[str]
    files_changed: list[str]
    counted: bool
    """Already in the tool-call count this attempt adds to (an earlier attempt of the task in the same
    agent run); otherwise (a resumed run, a retried agent run) it counts again, as the audit trail has it."""
    refused: bool
