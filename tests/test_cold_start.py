"""What makes ``toka run`` start fast and its SQLite server not stall (issue 15); timings are in
bench/cold_start.py and bench/many_agents.py, not here."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_run_guard_does_not_import_prefects_server_application() -> None:
    """It costs seconds, and a run on a lasting server or PREFECT_API_URL never starts one."""
    out = _python("import sys, toka.lifecycle, toka.cli, toka.server; "
                  "print(sorted(m for m in sys.modules if m.startswith('prefect.server.api.server')))")
    assert out == "[]"


def test_the_embedded_server_is_prefects_own_kind_and_begins_sqlite_transactions_immediate() -> None:
    """What the servers toka starts (embedded and `toka server start`) do; in a child process, so
    this process's Prefect is left as it is (one child: each imports Prefect's server)."""
    out = _python("""
from prefect.server.api.server import SubprocessASGIServer
from toka.lifecycle import _embedded_server_class as c
print(issubclass(c(), SubprocessASGIServer), c() is c())

import asyncio, contextlib
from prefect.server.database.configurations import AioSqliteConfiguration, SQLITE_BEGIN_MODE
from toka.server import immediate_sqlite_transactions

class Session:
    @contextlib.asynccontextmanager
    async def begin(self):
        yield SQLITE_BEGIN_MODE.get()

async def modes():
    config = AioSqliteConfiguration(connection_url="sqlite+aiosqlite:///unused.db")
    async with config.begin_transaction(Session()) as plain, \\
            config.begin_transaction(Session(), with_for_update=True) as for_update:
        return plain, for_update

print(*asyncio.run(modes()))
immediate_sqlite_transactions()
immediate_sqlite_transactions()  # twice: patched once
print(*asyncio.run(modes()))
""")
    assert out.splitlines() == ["True True", "DEFERRED IMMEDIATE", "IMMEDIATE IMMEDIATE"]
