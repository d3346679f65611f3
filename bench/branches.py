#!/usr/bin/env python
"""What agent branches cost: the git work around each agent, against the agent's own run.

In a copy of a repository (default: this checkout's committed files), for ``--agents``
agents in a chain (each requires the one before, so each start merges its dependency's
branch), it times what the runtime adds per agent: making the worktree, committing each
task's edit (``--tasks`` a agent, one file changed each), and at the end the run's merged
branch with the worktrees' removal. Printed side by side with a typical offline agent's
run time measured on this machine by ``toka run`` (``--agent-seconds``, default 0.4 s), and
with a real model's task (tens of seconds), so the ratio says what branches add.

    .venv/bin/python bench/branches.py [--repo DIR] [--agents 5] [--tasks 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._isolation import scratch  # noqa: E402
from toka import branches  # noqa: E402


def one_round(source: Path, agents: int, tasks: int) -> dict[str, float]:
    repo = scratch("toka-bench-branches-") / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(source), str(repo)], check=True)
    times: dict[str, list[float]] = {"worktree": [], "commit": [], "finish": []}
    run = branches.open_run(repo, repo / ".toka", "bench")
    names = [f"agent-{i}" for i in range(agents)]
    for i, name in enumerate(names):
        started = time.perf_counter()
        checkout = branches.agent_checkout(run, name, names[i - 1:i])
        times["worktree"].append(time.perf_counter() - started)
        for task in range(1, tasks + 1):
            (Path(checkout.root) / f"{name}-{task}.txt").write_text(f"{name} task {task}\n")
            started = time.perf_counter()
            branches.commit_task(checkout, run_key="bench", index=task, total=tasks, description=f"task {task}",
                                 state="completed", summary="wrote a file", files_changed=[f"{name}-{task}.txt"])
            times["commit"].append(time.perf_counter() - started)
    started = time.perf_counter()
    branches.finish_run(run, names)
    times["finish"].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agent-seconds", type=float, default=0.4,
                        help="an offline agent's run time on this machine (toka run's summary)")
    args = parser.parse_args()
    files = len(subprocess.run(["git", "-C", str(args.repo), "ls-files"], capture_output=True, text=True,
                               check=True).stdout.splitlines())
    rounds = [one_round(args.repo, args.agents, args.tasks) for _ in range(args.rounds)]
    worktree = statistics.median(r["worktree"] for r in rounds)
    commit = statistics.median(r["commit"] for r in rounds)
    finish = statistics.median(r["finish"] for r in rounds)
    per_agent = worktree + args.tasks * commit + finish / args.agents
    print(f"repository: {args.repo} ({files} tracked files); {args.agents} agents in a chain, "
          f"{args.tasks} tasks each; median of {args.rounds} rounds")
    print(f"  worktree (start from the dependency's branch): {worktree * 1000:7.1f} ms per agent")
    print(f"  commit after a task:                           {commit * 1000:7.1f} ms per task")
    print(f"  merged run branch + worktree removal:          {finish * 1000:7.1f} ms per run")
    print(f"  per agent in all:                              {per_agent * 1000:7.1f} ms")
    print(f"  against an offline agent's run ({args.agent_seconds:.1f} s): {per_agent / args.agent_seconds:.2f}x; "
          f"against one 30 s model task: {per_agent / 30:.3f}x")


if __name__ == "__main__":
    main()
