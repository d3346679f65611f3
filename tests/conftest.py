from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Prefect state (database, results) of this test session lives in a fresh
# directory: the harness isolates the database but not result storage, and a
# second session must not find cached results of the first. Set before any
# test module imports prefect.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="toka-tests-prefect-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(PREFECT_HOME / "results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
os.environ.pop("ANTHROPIC_API_KEY", None)  # tests never reach a real provider

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


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A temporary Prefect API for the whole session (about 10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


async def run_pipeline(folder: Path, *, run_key: str, **options: Any) -> tuple[Any, Any]:
    """Run the pipeline flow in-process on the specs in ``folder`` (also the workspace).

    Returns its final state and summary, also when the run failed.
    """
    from flows.pipeline import pipeline
    from toka.config import grouped
    from toka.errors import PipelineFailedError
    from toka.results import PipelineSummary

    options = {"retry_delay_seconds": 0, "workspace": str(folder), "run_key": run_key, **options}
    specs = options.pop("specs", [str(folder)])
    agents = options.pop("agents", [])
    state = await pipeline(specs=specs, agents=agents, return_state=True, **grouped(options))
    outcome = await state.aresult(raise_on_failure=False)
    summary = outcome.report if isinstance(outcome, PipelineFailedError) else outcome
    assert isinstance(summary, PipelineSummary), outcome
    return state, summary
