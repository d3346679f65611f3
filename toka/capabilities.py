"""Which tools a declared capability grants.

``security.capabilities_required`` names permissions; this table is the only
place that turns them into tools. A capability with no tool behind it is
accepted and reported as "declared, not tool-backed".
"""

from __future__ import annotations

from collections.abc import Iterable

from .tools import Tool, read_only_tools

__all__ = ["CAPABILITY_TOOLS", "capability_status", "grant_tools"]

#: Capability name -> the tools it grants.
CAPABILITY_TOOLS: dict[str, tuple[str, ...]] = {
    "filesystem-read": ("read_file", "list_dir", "search_files"),
}


def _all_tools() -> list[Tool]:
    return read_only_tools()


def grant_tools(capabilities: Iterable[str]) -> tuple[list[Tool], dict[str, str]]:
    """The tools ``capabilities`` grant, and for every other tool why it is withheld."""
    declared = set(capabilities)
    granted: list[Tool] = []
    withheld: dict[str, str] = {}
    for tool in _all_tools():
        needs = [c for c, tools in CAPABILITY_TOOLS.items() if tool.name in tools]
        if declared.intersection(needs):
            granted.append(tool)
        else:
            withheld[tool.name] = (
                f"{tool.name} needs the capability {' or '.join(map(repr, needs))}, "
                "which this agent's spec does not declare in security.capabilities_required"
            )
    return granted, withheld


def capability_status(capability: str) -> str:
    """``tool-backed: read_file, ...`` or ``declared, not tool-backed``."""
    tools = CAPABILITY_TOOLS.get(capability)
    return f"tool-backed: {', '.join(tools)}" if tools else "declared, not tool-backed"
