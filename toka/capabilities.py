"""Which tools a declared capability grants.

``security.capabilities_required`` names permissions; this table is the only
place that turns them into tools. The model is offered only the tools its
capabilities grant, and every call is checked again when it runs. A
capability with no tool behind it is accepted and reported as "declared, not
tool-backed".

=============================================  ===========================================
capability                                     grants
=============================================  ===========================================
``filesystem-read``                            ``read_file``, ``list_dir``, ``search_files``
``filesystem-write``, ``file-system-write``    ``write_file``, ``edit_file``
``cargo-execution``, ``cargo-test-execution``,  ``run_command`` for the programs in
``git-access``, ``git-push``,                  :data:`toka.commands.COMMAND_CAPABILITIES`
``script-execution``,
``python-test-execution``, ``database-access``
``network-access``                             commands may reach the network (approval)
=============================================  ===========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .commands import COMMAND_CAPABILITIES, RunCommand
from .tools import Tool, read_only_tools, writing_tools

__all__ = ["CAPABILITY_TOOLS", "capability_status", "grant_tools", "use_tools"]

#: Capability name -> the tools it grants.
CAPABILITY_TOOLS: dict[str, tuple[str, ...]] = {
    "filesystem-read": ("read_file", "list_dir", "search_files"),
    "filesystem-write": ("write_file", "edit_file"),
    "file-system-write": ("write_file", "edit_file"),
    **{capability: ("run_command",) for capability in COMMAND_CAPABILITIES},
}

_custom: ContextVar[tuple[Tool, ...]] = ContextVar("toka_custom_tools", default=())


@contextmanager
def use_tools(*tools: Tool) -> Iterator[None]:
    """Offer extra tools to agents run in this context (in this process).

    Each tool names the capability it needs in its ``capability`` attribute;
    only agents that declare it get the tool, like the built-in ones.
    """
    for tool in tools:
        if not getattr(tool, "capability", None):
            raise TypeError(f"tool {tool.name!r} must name the capability it needs (capability = '...')")
    token = _custom.set((*_custom.get(), *tools))
    try:
        yield
    finally:
        _custom.reset(token)


def _all_tools() -> list[Tool]:
    return [*read_only_tools(), *writing_tools(), RunCommand(), *_custom.get()]


def _needs(tool: Tool) -> list[str]:
    custom = getattr(tool, "capability", None)
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
    """``tool-backed: read_file, ...`` or ``declared, not tool-backed``."""
    if capability == "network-access":
        return "tool-backed: run_command may reach the network (needs approval)"
    tools = CAPABILITY_TOOLS.get(capability)
    if not tools:
        return "declared, not tool-backed"
    programs = COMMAND_CAPABILITIES.get(capability)
    return f"tool-backed: {', '.join(tools)}" + (f" ({', '.join(programs)})" if programs else "")
