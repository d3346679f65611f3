"""Toka runtime: declarative agent specs compiled into Prefect flows.

The data flows through the modules in this order: YAML (:mod:`toka.yaml_source`)
-> validated spec (:mod:`toka.spec`, :mod:`toka.units`) -> a set of specs
(:mod:`toka.specset`) -> dependency graph (:mod:`toka.graph`) -> plan
(:mod:`toka.plan`). Every deliberate error derives from :class:`TokaError`.

The names below are imported on first use: the ``toka`` command imports this package
before it knows whether it will run here or hand the run to a warm process
(:mod:`toka.warm`), and must not pay for pydantic and the spec models in the second case.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from .errors import (
        DependencyCycleError,
        DuplicateAgentError,
        GraphError,
        Problem,
        SpecError,
        TokaError,
        UnknownAgentError,
    )
    from .graph import AgentGraph, Edge
    from .plan import Plan, make_plan
    from .spec import PRIORITIES, AgentSpec, Priority
    from .specset import DEFAULT_SPEC_DIR, find_spec_files, load_specs
    from .units import Bandwidth, ByteSize, CpuShare, Duration

_HOMES = {
    "errors": ("DependencyCycleError", "DuplicateAgentError", "GraphError", "Problem", "SpecError", "TokaError",
               "UnknownAgentError"),
    "graph": ("AgentGraph", "Edge"),
    "plan": ("Plan", "make_plan"),
    "spec": ("PRIORITIES", "AgentSpec", "Priority"),
    "specset": ("DEFAULT_SPEC_DIR", "find_spec_files", "load_specs"),
    "units": ("Bandwidth", "ByteSize", "CpuShare", "Duration"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "DEFAULT_SPEC_DIR",
    "PRIORITIES",
    "AgentGraph",
    "AgentSpec",
    "Bandwidth",
    "ByteSize",
    "CpuShare",
    "DependencyCycleError",
    "DuplicateAgentError",
    "Duration",
    "Edge",
    "GraphError",
    "Plan",
    "Priority",
    "Problem",
    "SpecError",
    "TokaError",
    "UnknownAgentError",
    "find_spec_files",
    "load_specs",
    "make_plan",
]


def __getattr__(name: str) -> object:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'toka' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
