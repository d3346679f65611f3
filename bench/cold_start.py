#!/usr/bin/env python
"""How long ``toka run`` takes to make its first model request, against a bare Prefect flow.

Three set-ups, each measured for both sides, from the parent's clock just before the
child process is spawned to the moment the fake model receives the first request:

(a) embedded server, fresh ``PREFECT_HOME`` (a new database: migrations at start);
(b) embedded server, existing ``PREFECT_HOME`` (each side's home was used once before,
    untimed);
(c) a running ``toka server`` (started once, untimed): toka finds it in its Prefect home
    by itself; the bare flow is pointed at it with ``PREFECT_API_URL``.

The two sides:

* toka: the real CLI (``toka run agent_specs/ --model <a Claude model>``, the project's
  own five agents, a scratch workspace), this checkout's ``toka`` (``PYTHONPATH``), with
  ``ANTHROPIC_API_KEY`` (fake) and ``ANTHROPIC_BASE_URL`` pointing at the loopback Messages
  API server of ``tests/anthropic_server.py`` running in this process;
* bare: a hand-written script, one async ``@flow`` calling one async ``@task`` that sends
  one request with the ``anthropic`` SDK to the same loopback server (``BARE_SCRIPT``).

The loopback server records each request's arrival (``time.monotonic()``), which is the
measurement. Once it arrived the child's process group is terminated (SIGTERM, then
SIGKILL) and waited for, so no two runs overlap. Within a round the order of the two
sides alternates. The machine may be busy with other work: compare the ratios (measured
side by side, round by round), not the absolute seconds with another day's.

Targets (issue 15): (c) at most 3 s on a 2-core machine; (a) and (b) at most 1.1x the
bare flow. The exit code is 0 whether or not they are met.

Usage (from the repository root)::

    .venv/bin/python bench/cold_start.py [--repeat 3] [--setups abc]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # measure this checkout's toka, and reach tests/

from bench._isolation import prefect_env, scratch  # noqa: E402
from tests.anthropic_server import AnthropicServer  # noqa: E402
from tests.ports import free_port  # noqa: E402

SPECS = _ROOT / "agent_specs"
KEY = "sk-ant-bench-cold-start-0123456789"
RATIO_TARGET = 1.1
LASTING_TARGET_SECONDS = 3.0
FIRST_REQUEST_TIMEOUT = 240.0

BARE_SCRIPT = '''
import asyncio, os
import anthropic
from prefect import flow, task

@task
async def ask(prompt: str) -> str:
    client = anthropic.AsyncAnthropic()  # ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL from the environment
    reply = await client.messages.create(model=os.environ["BENCH_MODEL"], max_tokens=1024,
                                         messages=[{"role": "user", "content": prompt}])
    return str(reply.content)

@flow
async def bare(prompt: str) -> str:
    return await ask(prompt)

asyncio.run(bare("Survey the repository."))
'''

TOKA_MAIN = "import sys; sys.argv[0] = 'toka'; from toka.warm import main; sys.exit(main())"  # the console script

SETUPS = {
    "a": "(a) embedded server, fresh home",
    "b": "(b) embedded server, existing home",
    "c": "(c) running `toka server`",
}


@dataclass
class Side:
    """One side (toka or bare) of one set-up: its Prefect home and its measurements."""

    home: Path | None = None
    times: list[float] = field(default_factory=list)


def _env(home: Path, server: AnthropicServer, model: str, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "TOKA_", "ANTHROPIC_"))}
    env.update(prefect_env(home))
    env.update({"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": server.base_url, "BENCH_MODEL": model,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
                "NO_COLOR": "1"})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End the child's process group and wait for it (an embedded server goes with toka)."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # anything left in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def first_request(cmd: list[str], env: dict[str, str], cwd: Path, server: AnthropicServer) -> float:
    """Seconds from spawning ``cmd`` to the first request the loopback server received."""
    seen = len(server.requests)
    log = cwd / "child.log"
    with log.open("wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = t0 + FIRST_REQUEST_TIMEOUT
            while len(server.requests) == seen:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    raise RuntimeError(f"no model request from {cmd[:4]} (exit {proc.returncode}):\n"
                                       + "\n".join(tail))
                time.sleep(0.01)
            return server.requests[seen].time - t0
        finally:
            _stop_group(proc)


class Bench:
    def __init__(self, args: argparse.Namespace, server: AnthropicServer, model: str) -> None:
        self.args = args
        self.server = server
        self.model = model
        self.tmp = scratch("toka-bench-cold-")
        self.sides = {(s, who): Side() for s in args.setups for who in ("bare", "toka")}
        self.lasting_home = self.tmp / "server-home"
        self.api_url: str | None = None
        self._runs = 0

    def _dir(self) -> Path:
        self._runs += 1
        path = self.tmp / f"run-{self._runs}"
        (path / "workspace").mkdir(parents=True)
        return path

    def run(self, setup: str, who: str) -> float:
        side = self.sides[(setup, who)]
        cwd = self._dir()
        if setup == "a":
            home = cwd / "home"  # new every time
        elif setup == "b":
            home = side.home or cwd / "home"
        else:
            home = self.lasting_home
        api_url = self.api_url if (setup == "c" and who == "bare") else None
        env = _env(home, self.server, self.model, api_url)
        if who == "bare":
            cmd = [sys.executable, "-c", BARE_SCRIPT]
        else:
            cmd = [sys.executable, "-c", TOKA_MAIN, "run", str(SPECS), "--model", self.model,
                   "--workspace", str(cwd / "workspace"), "--retry-delay", "0"]
        seconds = first_request(cmd, env, cwd, self.server)
        side.home = home
        return seconds

    def start_lasting_server(self) -> None:
        port = free_port()
        env = _env(self.lasting_home, self.server, self.model, None)
        cmd = [sys.executable, "-c", TOKA_MAIN, "server", "start", "--port", str(port)]
        t0 = time.monotonic()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=180)
        self.api_url = f"http://127.0.0.1:{port}/api"
        print(f"  `toka server start` (untimed set-up): {time.monotonic() - t0:.1f} s, port {port}", flush=True)

    def stop_lasting_server(self) -> None:
        env = _env(self.lasting_home, self.server, self.model, None)
        subprocess.run([sys.executable, "-c", TOKA_MAIN, "server", "stop"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per set-up (default 3)")
    parser.add_argument("--setups", default="abc", help="which set-ups, any of 'abc' (default all)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or not args.setups or set(args.setups) - set(SETUPS):
        parser.error("--repeat must be at least 1; --setups a non-empty subset of 'abc'")
    args.setups = "".join(s for s in SETUPS if s in args.setups)

    from toka.claude import default_model

    model = default_model()
    import prefect

    print(f"cold start: time from the command to the first model request; {args.repeat} rounds per set-up")
    print(f"python {platform.python_version()}, prefect {prefect.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; toka: `toka run agent_specs/ --model {model}` "
          f"(fake key, loopback Messages API); bare: one @flow, one @task, one request")
    with AnthropicServer() as server:
        bench = Bench(args, server, model)
        try:
            if "c" in args.setups:
                bench.start_lasting_server()
            if "b" in args.setups:  # each side's home used once, untimed
                for who in ("bare", "toka"):
                    print(f"  warm-up of (b) {who} (untimed): {bench.run('b', who):.2f} s", flush=True)
            for i in range(args.repeat):
                for setup in args.setups:
                    order = ("bare", "toka") if i % 2 == 0 else ("toka", "bare")
                    got = {who: bench.run(setup, who) for who in order}
                    print(f"  round {i + 1}/{args.repeat} {SETUPS[setup]:<36} bare {got['bare']:6.2f} s   "
                          f"toka {got['toka']:6.2f} s   {got['toka'] / got['bare']:5.2f}x", flush=True)
                    for who in order:
                        bench.sides[(setup, who)].times.append(got[who])
        finally:
            if "c" in args.setups:
                bench.stop_lasting_server()

    print()
    width = 38
    print(f"{'set-up':<{width}} {'bare s':>7} {'toka s':>7} {'toka/bare':>10}   target        verdict")
    print("-" * (width + 58))
    for setup in args.setups:
        bare, toka = bench.sides[(setup, "bare")].times, bench.sides[(setup, "toka")].times
        ratio = statistics.median(t / b for t, b in zip(toka, bare))
        if setup == "c":
            value, target = statistics.median(toka), f"<= {LASTING_TARGET_SECONDS:g} s"
            ok = value <= LASTING_TARGET_SECONDS
        else:
            target, ok = f"<= {RATIO_TARGET:g}x", ratio <= RATIO_TARGET
        print(f"{SETUPS[setup]:<{width}} {statistics.median(bare):>7.2f} {statistics.median(toka):>7.2f} "
              f"{ratio:>9.2f}x   {target:<13} {'OK' if ok else 'NOT MET'}")
    print("-" * (width + 58))
    print("medians over the rounds; toka/bare is the median of the per-round ratios")
    return 0


if __name__ == "__main__":
    sys.exit(main())
