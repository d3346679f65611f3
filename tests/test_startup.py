"""Garbage collection around start-up imports (toka.startup), in fresh interpreters: it is process-wide."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import AGENT_SPECS, PrefectServer


def _python(code: str, *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=cwd,
                          env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_collection_waits_for_the_imports_then_never_walks_them_again() -> None:
    out = _python(
        "import gc; from toka.startup import startup_imports\n"
        "with startup_imports():\n"
        "    print(gc.isenabled())\n"
        "    import toka.spec\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 1000)\n"
    )
    assert out.splitlines() == ["False", "True True"]


def test_code_run_in_another_programs_process_leaves_its_collector_alone() -> None:
    # A test or an embedding program calls what `toka run` calls: settle_gc must not freeze its heap
    # nor switch on a collector it turned off.
    out = _python(
        "import gc; from toka.startup import settle_gc\n"
        "settle_gc(); print(gc.isenabled(), gc.get_freeze_count())\n"
        "gc.disable(); settle_gc(); print(gc.isenabled(), gc.get_freeze_count())\n"
    )
    assert out.splitlines() == ["True 0", "False 0"]


@pytest.mark.slow
def test_the_embedded_servers_application_is_built_with_collection_settled() -> None:
    out = _python("import gc; from toka.server import create_app; create_app()\n"
                  "print(gc.isenabled(), gc.get_freeze_count() > 10000)")
    assert out == "True True"


@pytest.mark.slow
def test_a_toka_run_collects_garbage_once_its_imports_are_done(tmp_path: Path, prefect_api: PrefectServer) -> None:
    # The `toka` console script defers collection; the run must switch it back on before its agents
    # work, or a long run would never collect at all.
    shutil.copytree(AGENT_SPECS, tmp_path / "agent_specs")
    env = {**{k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"},
           "PREFECT_API_URL": prefect_api.url, "TOKA_WARM": "0", "NO_COLOR": "1"}
    out = _python(
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('gc', gc.isenabled(), gc.get_freeze_count() > 10000, flush=True))\n"
        "sys.argv = ['toka', 'run', '--agent', 'repo-survey', '--model', 'offline']\n"
        "from toka.warm import main\n"
        "main()\n", cwd=tmp_path, env=env)
    assert "1/1 agents completed" in out and out.splitlines()[-1] == "gc True True"
