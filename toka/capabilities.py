"""Which tools a declared capability grants.

``security.capabilities_required`` names permissions; this table is the only
place that turns them into tools. The model is offered only the tools its
capabilities grant, and every call is checked again when it runs. A
capability with no tool behind it is accepted and reported as "declared, not
tool-backed"; one that is surely a misspelling of a name here (another case, a
typo) is refused when the spec loads (:mod:`toka.spec`).

=============================================  ===========================================
capability                                     grants
=============================================  ===========================================
``filesystem-read``, ``file-system-read``      ``read_file``, ``list_dir``, ``search_files``
``filesystem-write``, ``file-system-write``    ``write_file``, ``edit_file``
``cargo-execution``, ``cargo-test-execution``,  ``run_command`` for the programs in
``git-access``, ``git-push``,                  :data:`CAPABILITIES` lists (rules: :mod:`toka.commands`)
``script-execution``,
``python-test-execution``, ``database-access``
``network-access``                             commands may reach the network (approval)
=============================================  ===========================================

The table (:data:`CAPABILITIES`) is plain data, so that planning and the CLI
can describe capabilities without importing the tools or the sandbox; only
:func:`grant_tools` needs the tools themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tools import Tool

__all__ = [
    "CAPABILITIES",
    "CAPABILITY_TOOLS",
    "NOT_TOOL_BACKED",
    "READING_TOOLS",
    "Capability",
    "capability_status",
    "changes_files",
    "grant_tools",
    "use_tools",
]


@dataclass(frozen=True, slots=True)
class Capability:
    """What one capability name grants."""

    description: str
    """What it grants, in words: ``read_file, list_dir, search_files``, ``run_command (cargo test)``."""
    tools: tuple[str, ...] = ()
    """The tools it grants."""
    programs: tuple[str, ...] = ()
    """The programs ``run_command`` may start with it (the rules are in :mod:`toka.commands`)."""
    needs_sandbox: bool = False
    """It runs commands, confined by the sandbox: with ``sandbox: false`` the run must allow unsandboxed agents."""

    @property
    def label(self) -> str:
        """How ``toka plan`` shows it: ``tool-backed: ...``."""
        return f"tool-backed: {self.description}"


def _tools(*tools: str) -> Capability:
    return Capability(", ".join(tools), tools=tools)


def _command(*programs: str) -> Capability:
    return Capability(f"run_command ({', '.join(programs)})", tools=("run_command",), programs=programs,
                      needs_sandbox=True)


#: Capability name -> what it grants; a name not here is accepted and grants nothing.
CAPABILITIES: dict[str, Capability] = {
    "filesystem-read": _tools("read_file", "list_dir", "search_files"),
    "file-system-read": _tools("read_file", "list_dir", "search_files"),
    "filesystem-write": _tools("write_file", "edit_file"),
    "file-system-write": _tools("write_file", "edit_file"),
    "cargo-execution": _command("cargo"),
    "cargo-test-execution": _command("cargo test"),
    "git-access": _command("git"),
    "git-push": _command("git push"),
    "script-execution": _command("workspace scripts"),
    "python-test-execution": _command("pytest", "python -m pytest"),
    "database-access": _command("sqlite3"),
    # No tool of its own: it lets the commands another capability grants reach the network.
    "network-access": Capability("run_command may reach the network (needs approval)"),
}

#: Capability name -> the tools it grants (the capabilities that grant any).
CAPABILITY_TOOLS: dict[str, tuple[str, ...]] = {name: c.tools for name, c in CAPABILITIES.items() if c.tools}

#: The tools that only read files.
READING_TOOLS = frozenset({"read_file", "list_dir", "search_files"})


def changes_files(capabilities: Iterable[str]) -> bool:
    """Whether an agent with these capabilities gets a tool that can change a file: a writing
    tool, ``run_command``, or a tool added with :func:`use_tools` (it may do anything)."""
    declared = set(capabilities)
    if any(set(CAPABILITY_TOOLS.get(name, ())) - READING_TOOLS for name in declared):
        return True
    return any(tool.capability in declared for tool in _custom.get())


#: The status of a capability that grants nothing.
NOT_TOOL_BACKED = "declared, not tool-backed"

_custom: ContextVar[tuple[Tool, ...]] = ContextVar("toka_custom_tools", default=())


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@contextmanager
def use_tools(*tools: Tool) -> Iterator[None]:
    """Offer extra tools to agents run in this context (in this process).

    Each tool names the capability it needs in its ``capability`` attribute;
    only agents that declare it get the tool, like the built-in ones.
    """
    from .step import SUBMIT_RESULT

    names = [tool.name for tool in tools]
    taken = {SUBMIT_RESULT, *(tool.name for tool in _all_tools())}
    for tool in tools:
        if not tool.capability:
            raise TypeError(f"tool {tool.name!r} must name the capability it needs (capability = '...')")
        if not isinstance(tool.name, str) or not _TOOL_NAME.fullmatch(tool.name):
            raise TypeError(f"tool name {tool.name!r}: 1-64 letters, digits, '_' or '-' (what the model API takes)")
        if tool.name in taken or names.count(tool.name) > 1:
            # One name, one tool: another would answer the model's calls under the audited name.
            raise TypeError(f"tool name {tool.name!r} is taken (a built-in tool, {SUBMIT_RESULT}, or another "
                            "tool offered here); give the tool its own name")
    token = _custom.set((*_custom.get(), *tools))
    try:
        yield
    finally:
        _custom.reset(token)


def _all_tools() -> list[Tool]:
    # Imported here, not above: they bring in the sandbox, which describing a capability does not need.
    from .commands import RunCommand
    from .tools import read_only_tools, writing_tools

    return [*read_only_tools(), *writing_tools(), RunCommand(), *_custom.get()]


def _needs(tool: Tool) -> list[str]:
    custom = tool.capability
    return [custom] if custom else [c for c, tools in CAPABILITY_TOOLS.items() if tool.name in tools]


def grant_tools(capabilities: Iterable[str]) -> tuple[list[Tool], dict[str, str]]:
    """The tools ``capabilities`` grant, and for every other tool why it is withheld."""
    declared = set(capabilities)
    granted: list[Tool] = []
    withheld: dict[str, str] = {}
    for tool in _all_tools():
        needs = _needs(tool)
        if declared.intersection(needs):
            granted.append(tool)
        else:
            withheld[tool.name] = (
                f"{tool.name} needs one of the capabilities {', '.join(map(repr, needs))}, "
                "which this agent's spec does not declare in security.capabilities_required"
            )
    return granted, withheld


def capability_status(capability: str) -> str:
    """``tool-backed: read_file, ...`` or :data:`NOT_TOOL_BACKED`."""
    known = CAPABILITIES.get(capability)
    return NOT_TOOL_BACKED if known is None else known.label
