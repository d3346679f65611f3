from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TOKA_SPECS = TESTS / "data" / "toka-specs"
AGENT_SPECS = ROOT / "agent_specs"


def minimal_spec(
    name: str,
    *,
    priority: str = "medium",
    required: Any = None,
    optional: Any = None,
    tasks: int = 2,
    **extra: Any,
) -> dict[str, Any]:
    """The smallest valid spec, as a dict; dependencies in any accepted shape."""
    spec: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {"name": f"{name} agent", "domain": "testing", "priority": priority},
        "tasks": {"default": [{"description": f"{name} step {i + 1}"} for i in range(tasks)]},
        "dependencies": {"required": required or {}, "optional": optional or {}},
        "security": {"resource_limits": {"timeout": "10m"}},
    }
    spec.update(extra)
    return spec


@pytest.fixture
def write_specs(tmp_path: Path) -> Callable[..., Path]:
    """Write dict specs as YAML files into a fresh directory and return it."""

    def write(*specs: dict[str, Any], directory: str = "specs") -> Path:
        target = tmp_path / directory
        target.mkdir(exist_ok=True)
        for spec in specs:
            name = spec["metadata"]["name"]
            (target / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return target

    return write
