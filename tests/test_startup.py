"""Garbage collection around start-up imports (toka.startup), in fresh interpreters: it is process-wide."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_collection_waits_for_the_imports_then_never_walks_them_again() -> None:
    out = _python(
        "import gc; from toka.startup import defer_gc, settle_gc\n"
        "defer_gc(); print(gc.isenabled())\n"
        "import toka.spec\n"  # start-up imports
        "settle_gc(); print(gc.isenabled(), gc.get_freeze_count() > 1000)\n"
        "settle_gc(); print(gc.isenabled())\n"
    )
    assert out.splitlines() == ["False", "True True", "True"]


def test_code_run_in_another_programs_process_leaves_its_collector_alone() -> None:
    # A test or an embedding program calls what `toka run` calls: settle_gc must not freeze its heap
    # nor switch on a collector it turned off.
    out = _python(
        "import gc; from toka.startup import settle_gc\n"
        "settle_gc(); print(gc.isenabled(), gc.get_freeze_count())\n"
        "gc.disable(); settle_gc(); print(gc.isenabled(), gc.get_freeze_count())\n"
    )
    assert out.splitlines() == ["True 0", "False 0"]


def test_the_embedded_servers_application_is_built_with_collection_settled() -> None:
    out = _python("import gc; from toka.server import create_app; create_app()\n"
                  "print(gc.isenabled(), gc.get_freeze_count() > 10000)")
    assert out == "True True"
