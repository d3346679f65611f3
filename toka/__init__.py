"""Toka runtime: declarative agent specs compiled into Prefect flows.

The data flows through the modules in this order: YAML (:mod:`toka.yaml_source`)
-> validated spec (:mod:`toka.spec`, :mod:`toka.units`) -> a set of specs
(:mod:`toka.specset`) -> dependency graph (:mod:`toka.graph`) -> plan
(:mod:`toka.plan`). Every deliberate error derives from :class:`TokaError`.
"""

from __future__ import annotations

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
