"""Tools the model may call, and the toolbox that offers and checks them.

Tool names are stable: ``read_file``, ``list_dir``, ``search_files``,
``write_file``, ``edit_file``, ``run_command``, ``submit_result``. Which ones
an agent gets is decided by its declared capabilities
(:mod:`toka.capabilities`); each call is checked again when it executes,
because the model can ask for anything. A refused or failed call goes back
to the model as a tool error it can adapt to; it does not fail the task.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import pathspec
import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .audit import AuditLog
from .errors import LimitRefused, PathRefused, Refusal, SandboxViolation, ToolError, ToolTimeoutError
from .model import ToolDefinition
from .policy import AgentPolicy
from .process import as_text
from .sandbox import CommandUsage
from .workspace import Workspace

__all__ = [
    "BlockingTool",
    "CommandOutput",
    "EditFile",
    "ListDir",
    "ReadFile",
    "SearchFiles",
    "Tool",
    "ToolCall",
    "ToolContext",
    "ToolOutput",
    "Toolbox",
    "WriteFile",
    "read_only_tools",
    "writing_tools",
]

_READ_LIMIT = 64_000
_BINARY_PROBE = 8192


@dataclass
class ToolContext:
    """What a tool may touch: the workspace, the agent's policy, and who is calling (for records)."""

    workspace: Workspace
    agent: str = ""
    task: int = 0
    policy: AgentPolicy | None = None
    audit: AuditLog | None = None


@dataclass
class ToolOutput:
    text: str
    is_error: bool = False
    files_read: list[str] = field(default_factory=list)
    files_changed: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class CommandOutput(ToolOutput):
    """What ``run_command`` returns: the text for the model, and the command's record for the audit trail."""

    usage: CommandUsage
    """What the command used, as measured."""
    sandbox: dict[str, str]
    """Limit -> the mechanism that enforced it."""
    output_bytes: int
    """What the command printed (stdout and stderr as kept), in characters."""


@dataclass(frozen=True)
class ToolCall:
    """One executed call, as counted in reports."""

    name: str
    refused: bool
    is_error: bool


@functools.cache
def _input_schema(model: type[BaseModel]) -> dict[str, Any]:
    # Made once: pydantic builds it anew on every call, about 14 ms a task with the full toolbox.
    schema = model.model_json_schema()
    schema.pop("title", None)
    return schema


@functools.lru_cache(maxsize=256)
def _definition(name: str, description: str, model: type[BaseModel]) -> ToolDefinition:
    # One for every request of every task, shared like the submit_result tool's (read, never
    # changed): copying the schemas for each request was 3% of the event loop's time in a run.
    return ToolDefinition(name=name, description=description, input_schema=_input_schema(model))


#: Work the workspace must finish before any tool may touch it: the agent's commit of its
#: previous task, made while this task's first model request is in flight (set by the agent
#: flow, :func:`toka.compiler._run_tasks`). Its outcome is the agent flow's business.
workspace_settling: ContextVar[asyncio.Future[Any] | None] = ContextVar("toka_workspace_settling", default=None)


class Tool(ABC):
    """A named operation with a pydantic input model; ``run`` gets validated input."""

    name: ClassVar[str]
    description: ClassVar[str]
    Input: ClassVar[type[BaseModel]]
    capability: ClassVar[str | None] = None
    """For tools added with :func:`toka.capabilities.use_tools`: the capability that grants it."""

    def definition(self) -> ToolDefinition:
        return _definition(self.name, self.description, self.Input)

    @abstractmethod
    async def run(self, args: Any, ctx: ToolContext) -> ToolOutput: ...


class BlockingTool(Tool):
    """A tool whose work is blocking file-system I/O: it runs in a worker thread, off the event loop.

    Reading, walking and searching a big workspace takes long enough to delay every other
    agent's model requests and tool calls if done on the loop.
    """

    async def run(self, args: Any, ctx: ToolContext) -> ToolOutput:
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self.run_blocking, args, ctx, cancelled)
        finally:
            cancelled.set()  # a thread cannot be cancelled: a long loop checks this to stop early

    @abstractmethod
    def run_blocking(self, args: Any, ctx: ToolContext, cancelled: threading.Event) -> ToolOutput:
        """The tool's work; ``cancelled`` is set once nobody waits for the result any more."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- read-only tools -----------------------------------------------------------


class ReadFileArgs(_Args):
    path: str = Field(description="File path relative to the workspace root.")
    start_line: int = Field(default=1, ge=1, description="First line to return (1-based).")
    end_line: int | None = Field(default=None, ge=1, description="Last line to return (inclusive).")


class ReadFile(BlockingTool):
    name = "read_file"
    description = (
        "Read a text file in the workspace, optionally a range of lines. "
        f"Returns at most {_READ_LIMIT} characters, each line prefixed with its number."
    )
    Input = ReadFileArgs

    def run_blocking(self, args: ReadFileArgs, ctx: ToolContext, cancelled: threading.Event) -> ToolOutput:
        path = ctx.workspace.resolve(args.path, kind="file")
        rel = ctx.workspace.relative(path)
        out: list[str] = []
        size = 0
        total = 0
        cut_at: int | None = None
        long_line: tuple[int, int] | None = None  # (number, characters) of a line shown only in part
        last = args.end_line or float("inf")
        # Lines end at '\n' only (as for grep and editors), whatever else the text holds;
        # the whole file is streamed so the line count and far ranges stay right.
        with ctx.workspace.open(path, "rb") as f:
            if b"\x00" in f.read(_BINARY_PROBE):
                return ToolOutput(f"{rel} is a binary file; it cannot be read as text", is_error=True)
            f.seek(0)
            for total, (raw, length) in enumerate(_capped_lines(f, _READ_LIMIT * 4, cancelled), 1):
                if total % 4096 == 0 and cancelled.is_set():
                    break
                if total < args.start_line or total > last or cut_at is not None:
                    continue
                line = f"{total:>5}  {raw.decode('utf-8', errors='replace').rstrip(chr(10)).rstrip(chr(13))}"
                if size + len(line) > _READ_LIMIT or length > len(raw):
                    if out:
                        cut_at = total
                        continue
                    # One line longer than a whole read (minified code, a one-line saved output): its
                    # start, and the reading goes on after it; "read on from" that line again went nowhere.
                    whole = len(line) - 7 if length == len(raw) else length - len(raw) + len(line) - 7
                    long_line = (total, whole)
                    line = line[:_READ_LIMIT]
                out.append(line)
                size += len(line) + 1
        end = min(args.end_line or total, total)
        if args.start_line > total:
            header = f"{rel}: has {total} lines; nothing at line {args.start_line}"
        else:
            header = f"{rel}: lines {args.start_line}-{end} of {total}"
        if long_line is not None:
            number, length = long_line
            out.append(f"[line {number} is {length} characters long: its first {_READ_LIMIT - 7} are shown; "
                       "the rest of it cannot be read with read_file (search_files finds text in it)]")
        if cut_at is not None:
            out.append(f"[cut at {_READ_LIMIT} characters; read on from line {cut_at}]")
        return ToolOutput("\n".join([header, *out]), files_read=[rel])


def _capped_lines(f: BinaryIO, cap: int, cancelled: threading.Event | None = None) -> Iterator[tuple[bytes, int]]:
    """The lines of ``f`` (ending at '\n'), each cut at ``cap`` bytes, with its whole length.

    A line is never held whole: one gigabyte without a line break (a sparse file costs a
    command nothing to make) would take the runtime's memory, which no agent limit bounds.
    """
    while raw := f.readline(cap):
        length = len(raw)
        if len(raw) == cap and not raw.endswith(b"\n"):
            while more := f.readline(1 << 20):
                length += len(more)
                if more.endswith(b"\n") or (cancelled is not None and cancelled.is_set()):
                    break  # cancelled: a sparse terabyte would be read on long after the task's end
        yield raw, length


class ListDirArgs(_Args):
    path: str = Field(default=".", description="Directory relative to the workspace root.")
    depth: int = Field(default=1, ge=1, le=4, description="How many levels to descend.")


class ListDir(BlockingTool):
    name = "list_dir"
    description = (
        "List a workspace directory (directories end with '/', files show their size), "
        "skipping version-control and ignored files."
    )
    Input = ListDirArgs
    limit: ClassVar[int] = 500

    def run_blocking(self, args: ListDirArgs, ctx: ToolContext, cancelled: threading.Event) -> ToolOutput:
        base = ctx.workspace.resolve(args.path, kind="dir")
        entries: list[str] = []
        stopped = False
        for path, _, depth in _walk(ctx.workspace, base, max_depth=args.depth, include_dirs=True):
            if len(entries) >= self.limit:
                stopped = True
                break
            rel = ctx.workspace.relative(path)
            indent = "  " * (depth - 1)
            entries.append(
                f"{indent}{rel}/" if path.is_dir() else f"{indent}{rel}  ({path.stat().st_size} bytes)"
            )
        header = f"{ctx.workspace.relative(base)}/: {len(entries)} entries"
        tail = [f"[stopped after {self.limit} entries]"] if stopped else []
        return ToolOutput("\n".join([header, *entries, *tail]))


class SearchFilesArgs(_Args):
    pattern: str = Field(description="Python regular expression to look for, line by line.")
    path: str = Field(default=".", description="Directory to search, relative to the workspace root.")
    glob: str | None = Field(default=None, description="Only files whose name matches, e.g. '*.py'.")
    max_results: int = Field(default=100, ge=1, le=1000)


class SearchFiles(BlockingTool):
    name = "search_files"
    description = (
        "Search text files under a workspace directory for a regular expression; "
        "returns 'path:line: text' for each match, skipping .git and ignored files."
    )
    Input = SearchFilesArgs
    file_size_limit: ClassVar[int] = 32_000_000
    time_limit: ClassVar[float] = 10.0

    def run_blocking(self, args: SearchFilesArgs, ctx: ToolContext, cancelled: threading.Event) -> ToolOutput:
        try:
            pattern = regex.compile(args.pattern)
        except regex.error as e:
            return ToolOutput(f"invalid regular expression {args.pattern!r}: {e}", is_error=True)
        base = ctx.workspace.resolve(args.path, kind="dir")
        matches: list[str] = []
        too_big: list[str] = []
        searched = 0
        stopped = False
        deadline = time.monotonic() + self.time_limit
        try:
            for path, real, _ in _walk(ctx.workspace, base, max_depth=64, include_dirs=False):
                if cancelled.is_set():  # the call was cancelled (a task timeout): nobody reads on
                    break
                if args.glob and not path.match(args.glob):
                    continue
                rel = ctx.workspace.relative(path)
                try:
                    with ctx.workspace.open(real, "rb") as f:
                        if os.fstat(f.fileno()).st_size > self.file_size_limit:
                            too_big.append(rel)  # said, or the model takes "0 matches" for "not there"
                            continue
                        if b"\x00" in f.read(_BINARY_PROBE):
                            continue
                        f.seek(0)
                        searched += 1
                        # Line by line, each cut at a megabyte: memory stays bounded whatever the file.
                        for number, (raw, _) in enumerate(_capped_lines(f, 1 << 20), 1):
                            if number % 1024 == 0 and (time.monotonic() > deadline or cancelled.is_set()):
                                raise TimeoutError  # short lines of a fast pattern never reach the regex's own
                            line = raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")
                            # A per-search time limit: a pathological pattern must not hang the search.
                            # `concurrent`: the GIL is released while matching, so the loop runs meanwhile.
                            if pattern.search(line, concurrent=True,
                                              timeout=max(0.001, deadline - time.monotonic())):
                                if len(matches) >= args.max_results:
                                    stopped = True
                                    break
                                matches.append(f"{rel}:{number}: {line[:300]}")
                except PathRefused:  # changed since the walk saw it: not searched
                    continue
                if stopped:
                    break
        except TimeoutError:
            return ToolOutput(
                f"search for {args.pattern!r} stopped after {self.time_limit:g}s "
                f"({len(matches)} matches so far); use a simpler pattern or a narrower path",
                is_error=True,
            )
        header = f"{len(matches)} matches for {args.pattern!r} in {searched} files"
        tail = [f"[stopped after {args.max_results} matches]"] if stopped else []
        if too_big:
            shown = ", ".join(too_big[:10]) + (f" and {len(too_big) - 10} more" if len(too_big) > 10 else "")
            tail.append(f"[not searched, over {self.file_size_limit // 1_000_000} MB: {shown}]")
        return ToolOutput("\n".join([header, *matches, *tail]))


# -- writing tools --------------------------------------------------------------


class WriteFileArgs(_Args):
    path: str = Field(description="File path relative to the workspace root.")
    content: str = Field(description="The whole new content of the file.")


class WriteFile(BlockingTool):
    name = "write_file"
    description = "Create or overwrite a text file in the workspace with the given content."
    Input = WriteFileArgs
    size_limit: ClassVar[int] = 2_000_000

    def run_blocking(self, args: WriteFileArgs, ctx: ToolContext, cancelled: threading.Event) -> ToolOutput:
        data = args.content.encode("utf-8")
        if len(data) > self.size_limit:
            raise LimitRefused(f"{len(data)} bytes is over the {self.size_limit}-byte limit of one write")
        path = ctx.workspace.resolve_for_write(args.path)
        if path.is_dir():
            return ToolOutput(f"{args.path!r} is a directory", is_error=True)
        rel = ctx.workspace.relative(path)
        if ctx.policy is not None:
            ctx.policy.check_write(rel)
        existed = path.exists()
        _check_disk_limit(ctx, len(data) - (path.stat().st_size if existed else 0))
        with ctx.workspace.open(path, "wb") as f:
            f.write(data)
        verb = "overwrote" if existed else "created"
        return ToolOutput(f"{verb} {rel} ({len(data)} bytes)", files_changed=[rel])


class EditFileArgs(_Args):
    path: str = Field(description="File path relative to the workspace root.")
    old_text: str = Field(min_length=1, description="Exact text to replace; must occur exactly once.")
    new_text: str = Field(description="Replacement text.")


class EditFile(BlockingTool):
    name = "edit_file"
    description = (
        "Replace one exact occurrence of old_text with new_text in a workspace file. "
        "Refused when old_text is missing or occurs more than once (add context to make it unique)."
    )
    Input = EditFileArgs
    size_limit: ClassVar[int] = 8_000_000

    def run_blocking(self, args: EditFileArgs, ctx: ToolContext, cancelled: threading.Event) -> ToolOutput:
        path = ctx.workspace.resolve_for_write(args.path)
        if not path.is_file():
            return ToolOutput(f"{args.path!r} is not an existing file", is_error=True)
        rel = ctx.workspace.relative(path)
        if ctx.policy is not None:
            ctx.policy.check_write(rel)
        with ctx.workspace.open(path, "rb") as f:
            data = f.read(self.size_limit + 1)  # never more: a sparse gigabyte costs a command nothing
        if len(data) > self.size_limit:
            raise LimitRefused(f"{rel} is over the {self.size_limit}-byte limit of a file edit_file changes")
        text = data.decode("utf-8", errors="strict")
        old, new = args.old_text, args.new_text
        if "\r\n" in text and "\r" not in old:  # the model reads lines without their '\r'
            old, new = old.replace("\n", "\r\n"), new.replace("\n", "\r\n")
        count = text.count(old)
        if count == 0 and _ESCAPED_TAG.search(old):
            # The model saw this file's `<tool_output` tags escaped (step._delimit) and copied them so.
            old, new = _ESCAPED_TAG.sub(r"<\1", old), _ESCAPED_TAG.sub(r"<\1", new)
            count = text.count(old)
        if count == 0:
            return ToolOutput(f"old_text does not occur in {rel}; nothing changed", is_error=True)
        if count > 1:
            return ToolOutput(
                f"old_text occurs {count} times in {rel}; include more context so it occurs once",
                is_error=True,
            )
        _check_disk_limit(ctx, len(new.encode()) - len(old.encode()))
        with ctx.workspace.open(path, "wb") as f:
            f.write(text.replace(old, new, 1).encode("utf-8"))
        return ToolOutput(f"edited {rel}: replaced 1 occurrence", files_changed=[rel])


_ESCAPED_TAG = regex.compile(r"&lt;(/?tool_output)", regex.IGNORECASE)


def _check_disk_limit(ctx: ToolContext, added: int) -> None:
    """Refuse a write of ``added`` more bytes that would take the workspace past ``max_disk_usage``.

    Blocking: it measures the workspace.

    Raises:
        LimitRefused: saying how much it has grown and may grow.
    """
    policy = ctx.policy
    if policy is None or policy.limits.max_disk_usage is None or added <= 0 or not policy.sandbox:
        return
    from .commands import command_home, disk_key
    from .sandbox import disk_usage, workspace_growth_baseline

    root, state = ctx.workspace.root, ctx.workspace.state_dir
    home = [command_home(ctx)]
    grown = disk_usage(root, state, home) - workspace_growth_baseline(root, state, disk_key(ctx), home)
    limit = policy.limits.max_disk_usage.bytes
    if grown + added > limit:
        raise LimitRefused(f"the workspace has grown {grown} bytes in this run and may grow {limit} "
                           f"(max_disk_usage); this write adds {added}")


def _ignore_spec(workspace: Workspace) -> pathspec.PathSpec:
    """The workspace's ``.gitignore`` rules (and .git and the state directory).

    The file is a command's to write: read as the workspace's files are (never through a link:
    one to ``/proc/kmsg`` blocked the tool's thread for ever; to a host file, made its lines the
    rules), at most its first MiB, and matched by RE2, whose time grows with the name, never
    exponentially (``a*a*a*...b`` held Python's regular expressions, and the GIL, for hours).
    """
    lines = [".git/", f"{workspace.state_dir.name}/"]
    try:
        with workspace.open(workspace.root / ".gitignore", "rb") as f:
            lines += f.read(_IGNORE_READ).decode("utf-8", errors="replace").splitlines()
    except (PathRefused, OSError):  # none, or not a plain file: no rules of its own
        pass
    # Rules no real .gitignore holds (thousands of characters, a dozen stars: RE2 gives up on them,
    # writing a line to the terminal for each) are left out: ignore rules only hide files.
    lines = [line for line in lines if len(line) <= _RULE_LENGTH and line.count("*") <= _RULE_STARS][:_RULES]
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines, backend="re2")
    except Exception:  # a rule git takes and pathspec or RE2 does not (`[[:alpha:]]`, `foo\`, a huge one)
        lines = [line for line in lines if _usable_rule(line)]
    while True:  # too many for one RE2 set (its memory bound): the first ones, as many as fit
        try:
            return pathspec.GitIgnoreSpec.from_lines(lines, backend="re2")
        except Exception:
            if len(lines) <= 2:
                raise
            lines = lines[:len(lines) // 2]


def _usable_rule(line: str) -> bool:
    """Whether one ignore rule compiles: those that do not are left out (they only hide files)."""
    try:
        pathspec.GitIgnoreSpec.from_lines([line], backend="re2")
    except Exception:
        return False
    return True


_IGNORE_READ = 2**20
_RULE_LENGTH, _RULE_STARS, _RULES = 4096, 8, 10_000


def _walk(
    workspace: Workspace, base: Path, *, max_depth: int, include_dirs: bool
) -> Iterator[tuple[Path, Path, int]]:
    """Entries under ``base`` depth-first in name order: as named, resolved, and their depth (1 = in ``base``).

    Skips .git, the state directory, ignored files and anything resolving
    outside the workspace; symlinked directories are listed, never entered,
    so a link loop cannot make a walk explode.
    """
    ignored = _ignore_spec(workspace)

    def visit(directory: Path, depth: int) -> Iterator[tuple[Path, Path, int]]:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                real = path.resolve()
                is_dir = entry.is_dir()
            except (RuntimeError, OSError):  # a symlink loop: nothing to list behind it
                continue
            if not real.is_relative_to(workspace.root) or workspace.is_state(real):
                continue
            rel = path.relative_to(workspace.root).as_posix()
            # RE2 takes UTF-8 only: a name that is not is matched as the rules were read (with U+FFFD).
            name = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            if ignored.match_file(name + "/" if is_dir else name):
                continue
            if is_dir:
                if include_dirs:
                    yield path, real, depth
                if depth < max_depth and not entry.is_symlink():
                    yield from visit(path, depth + 1)
            elif entry.is_file():
                yield path, real, depth

    yield from visit(base, 1)


def read_only_tools() -> list[Tool]:
    return [ReadFile(), ListDir(), SearchFiles()]


def writing_tools() -> list[Tool]:
    return [WriteFile(), EditFile()]


# -- the toolbox -----------------------------------------------------------------


class Toolbox:
    """The tools one agent was granted, bound to its workspace.

    Args:
        tools: The tools the agent may use.
        ctx: Workspace and caller identity.
        withheld: Tool name -> why the agent may not use it (told to the model
            when it asks anyway).
    """

    def __init__(
        self, tools: Iterable[Tool], ctx: ToolContext, *, withheld: Mapping[str, str] | None = None
    ) -> None:
        self.tools: dict[str, Tool] = {t.name: t for t in tools}
        self.ctx = ctx
        self.withheld = dict(withheld or {})
        self.calls: list[ToolCall] = []

    def definitions(self) -> list[ToolDefinition]:
        return [t.definition() for t in self.tools.values()]

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def count_replayed(self, name: str, *, refused: bool, is_error: bool) -> None:
        """Count a call an earlier attempt made (one this count has not seen: a resumed or retried
        agent run), whose recorded result is replayed instead of run."""
        self.calls.append(ToolCall(name, refused=refused, is_error=is_error))

    async def call(self, name: str, arguments: Mapping[str, Any]) -> ToolOutput:
        """Check, run and audit one call; every refusal or failure becomes an error output."""
        settling = workspace_settling.get()
        if settling is not None and not settling.done():
            await asyncio.wait([settling])  # shielded: a cancelled call must not cancel a commit
        started = time.monotonic()
        try:
            output, decision, reason = await self._call(name, arguments)
        except ToolError as e:
            # Retryable tool errors (timeouts) are the task's business; audit them first.
            violation = isinstance(e, SandboxViolation)
            # Counted like every other call, so the report's figures match the audit trail.
            self.calls.append(ToolCall(name, refused=violation, is_error=True))
            usage = e.command_usage if isinstance(e, ToolTimeoutError) else None
            self._audit(name, arguments, "refused" if violation else "allowed", str(e), started=started,
                        is_error=True, usage=usage if isinstance(usage, CommandUsage) else None,
                        files_changed=e.paths if isinstance(e, SandboxViolation) else None)
            raise
        except Exception as e:
            # A defect of the tool's own (it fails the task): the call is in the audit trail all the same.
            self.calls.append(ToolCall(name, refused=False, is_error=True))
            self._audit(name, arguments, "allowed", f"{name} failed: {type(e).__name__}: {as_text(str(e))}",
                        started=started, is_error=True)
            raise
        except asyncio.CancelledError:
            # Cut short (the task's timeout, a stop): what it did until then happened all the same.
            self.calls.append(ToolCall(name, refused=False, is_error=True))
            self._audit(name, arguments, "allowed", "cut short while it ran (the task's timeout, or the run "
                        "stopped)", started=started, is_error=True)
            raise
        # Whatever a tool read (a file name a command made that is not UTF-8) must reach the model
        # and the audit trail as text.
        text, files = as_text(output.text), [as_text(f) for f in output.files_changed]
        if text is not output.text or files != output.files_changed:
            output = replace(output, text=text, files_changed=files)
        self.calls.append(ToolCall(name, refused=decision == "refused", is_error=output.is_error))
        self._audit(name, arguments, decision, reason, started=started, is_error=output.is_error, output=output)
        return output

    def _audit(self, name: str, arguments: Mapping[str, Any], decision: str, reason: str | None, *,
               started: float, is_error: bool, usage: CommandUsage | None = None,
               output: ToolOutput | None = None, files_changed: list[str] | None = None) -> None:
        """One audit record; a command's usage comes from its :class:`CommandOutput` (or ``usage``)."""
        if self.ctx.audit is None:
            return
        command = output if isinstance(output, CommandOutput) else None
        if command is not None:
            usage = command.usage
        self.ctx.audit.record(
            agent=self.ctx.agent, task=self.ctx.task, tool=name, arguments=dict(arguments),
            decision=decision, reason=reason, is_error=is_error,
            exit_code=None if usage is None else usage.exit_code, signal=None if usage is None else usage.signal,
            duration_s=round(time.monotonic() - started, 4),
            bytes=None if output is None else command.output_bytes if command else len(output.text),
            files_changed=files_changed or ([] if output is None else output.files_changed),
            usage=None if usage is None else {
                "wall_s": round(usage.wall_s, 4), "cpu_s": usage.cpu_s,
                "peak_memory_bytes": usage.peak_memory_bytes, "disk_growth_bytes": usage.disk_growth_bytes,
                "killed_for": usage.killed_for,
            },
            sandbox=None if command is None else command.sandbox,
        )

    async def _call(self, name: str, arguments: Mapping[str, Any]) -> tuple[ToolOutput, str, str | None]:
        """Run one call; return its output, the decision (allowed/refused/invalid) and why."""
        tool = self.tools.get(name)
        if tool is None:
            why = self.withheld.get(name) or (
                f"there is no tool named {name!r}; available: {', '.join(self.tools) or 'none'}"
            )
            return ToolOutput(f"refused: {why}", is_error=True), "refused", why
        try:
            args = tool.Input.model_validate(dict(arguments))
        except ValidationError as e:
            why = f"invalid input for {name}: {_brief(e)}"
            return ToolOutput(why, is_error=True), "invalid", why
        try:
            output = await tool.run(args, self.ctx)
        except ToolError as e:
            if e.retryable or e.fatal:  # the task's (or the run's) business, not the model's
                raise
            detail = f"\n{e.detail}" if isinstance(e, Refusal) and e.detail else ""
            return ToolOutput(f"refused: {e}{detail}", is_error=True), "refused", str(e)
        except (OSError, UnicodeDecodeError) as e:
            why = f"{name} failed: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
            return ToolOutput(why, is_error=True), "allowed", why
        return output, "allowed", None


def _brief(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in error.errors()
    )
