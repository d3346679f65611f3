"""The offline model: deterministic, no network, the same loop as a real model.

It looks at the workspace through the read-only tools its task is granted
(list the directory, read a file the task points at, search for tests when
the task is about tests), then submits a structured result whose summary says
plainly that no language model was involved. Same request, same response.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import PermanentModelError
from .model import ModelRequest, ModelResponse, TextBlock, ToolResultBlock, ToolUseBlock, Usage
from .prompt import REMINDER

__all__ = ["OFFLINE_LABEL", "OfflineModel"]

OFFLINE_LABEL = "[offline model: no language model was used; this is a placeholder result]"

# Words in a task -> files worth reading first, in order of preference.
_HINTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("depend", "requirement", "version", "python", "build", "install"),
     ("pyproject.toml", "setup.cfg", "setup.py", "requirements.txt")),
    (("readme", "doc", "command", "setup"), ("README.md", "README.rst", "README.txt", "README")),
    (("release", "change", "history", "tag"), ("CHANGELOG.md", "CHANGES.md", "HISTORY.md")),
    (("test", "ci"), ("pytest.ini", "tox.ini", "noxfile.py", "pyproject.toml")),
)  # fmt: skip


class OfflineModel:
    """Deterministic stand-in for a provider; the default when no API key is set.

    Args:
        latency: Seconds to wait per request (benchmarks, kill-and-resume tests).
        request_log: Append one JSON line per request (agent, task, turn,
            digest, the tool answered with), flushed at once, so a test can
            see exactly what was asked.
        faults_file: While this file exists, requests for the tasks it lists
            (one ``agent:task`` per line) fail with a permanent model error:
            fault injection for failure, retry and resume tests.
    """

    name = "offline"
    offline = True

    def __init__(
        self,
        *,
        latency: float = 0.0,
        request_log: str | Path | None = None,
        faults_file: str | Path | None = None,
    ) -> None:
        self.latency = latency
        self.request_log = Path(request_log) if request_log else None
        self.faults_file = Path(faults_file) if faults_file else None

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "offline", "version": 1}

    def worst_case_seconds(self) -> float | None:
        return None  # no retries of its own: the run's request timeout bounds each request

    async def request(self, request: ModelRequest) -> ModelResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        self._inject_fault(request)
        blocks = self._decide(request)
        self._log(request, blocks)
        return ModelResponse(
            content=blocks,
            stop_reason="tool_use" if any(isinstance(b, ToolUseBlock) for b in blocks) else "end_turn",
            # No language model ran: no tokens were spent, and none count against a budget.
            usage=Usage(input_tokens=0, output_tokens=0, requests=1),
            model=self.name,
        )

    # -- the deterministic policy ---------------------------------------------

    def _decide(self, request: ModelRequest) -> list[TextBlock | ToolUseBlock]:
        tools = {t.name for t in request.tools}
        task = _first_text(request)
        turn = sum(1 for m in request.messages if m.role == "assistant")
        results = [
            b for m in request.messages if m.role == "user" for b in m.content
            if isinstance(b, ToolResultBlock)
        ]
        last_user = request.messages[-1]
        reminded = any(
            getattr(b, "text", "") == REMINDER for b in last_user.content
        )
        call_id = f"offline-{turn}"
        if not reminded:
            if turn == 0 and "list_dir" in tools:
                return [ToolUseBlock(id=call_id, name="list_dir", input={"path": "."})]
            if turn == 1 and "read_file" in tools and results:
                target = _pick_file(task, results[-1].content)
                if target:
                    return [ToolUseBlock(id=call_id, name="read_file",
                                         input={"path": target, "end_line": 60})]
            if turn <= 2 and "search_files" in tools and "test" in task.lower() and not any(
                "matches for" in r.content for r in results
            ):
                return [ToolUseBlock(id=call_id, name="search_files",
                                     input={"pattern": r"^\s*(async )?def test_", "glob": "*.py",
                                            "max_results": 50})]
        return [
            TextBlock(text=f"{OFFLINE_LABEL} Submitting the result."),
            ToolUseBlock(id=call_id, name="submit_result", input=_result(task, results)),
        ]

    def _inject_fault(self, request: ModelRequest) -> None:
        if self.faults_file is None or not self.faults_file.exists():
            return
        here = f"{request.metadata.get('agent')}:{request.metadata.get('task')}"
        faults = {line.strip() for line in self.faults_file.read_text(encoding="utf-8").splitlines()}
        if here in faults:
            raise PermanentModelError(f"injected fault for {here} (listed in {self.faults_file})")

    def _log(self, request: ModelRequest, blocks: list[TextBlock | ToolUseBlock]) -> None:
        if self.request_log is None:
            return
        digest = hashlib.sha256(
            json.dumps(request.model_dump(mode="json", exclude={"metadata"}), sort_keys=True).encode()
        ).hexdigest()[:16]
        answer = next((b.name for b in blocks if isinstance(b, ToolUseBlock)), None)
        line = json.dumps(
            {**request.metadata, "digest": digest, "answer": answer, "pid": os.getpid()}, sort_keys=True
        )
        with self.request_log.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


def _first_text(request: ModelRequest) -> str:
    for block in request.messages[0].content:
        if isinstance(block, TextBlock):
            return block.text.splitlines()[0]
    return ""


_LISTED_FILE = re.compile(r"^\s*(\S+)\s+\(\d+ bytes\)$", re.MULTILINE)


def _pick_file(task: str, listing: str) -> str | None:
    present = set(_LISTED_FILE.findall(listing))
    words = task.lower()
    for keys, files in _HINTS:
        if any(k in words for k in keys):
            for name in files:
                if name in present:
                    return name
    return None


def _headline(content: str) -> str:
    """The first line of a tool's output, inside the runtime's delimiters."""
    lines = [line for line in content.splitlines() if not line.startswith(("<tool_output", "</tool_output"))]
    return lines[0] if lines else ""


def _result(task: str, results: list[ToolResultBlock]) -> dict[str, Any]:
    looked = [_headline(r.content) for r in results if r.content and not r.is_error]
    title = re.sub(r"^# Task \d+ of \d+: ", "", task)
    summary = f"{OFFLINE_LABEL} Task: {title}."
    if looked:
        summary += " Looked at: " + "; ".join(looked) + "."
    return {
        "status": "completed",
        "summary": summary,
        "deliverables": [],
        "files_changed": [],
        "metrics": {},
        "follow_ups": ["Run with a real model (set ANTHROPIC_API_KEY) for an actual analysis."],
    }
