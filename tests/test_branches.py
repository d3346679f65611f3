"""Agents change a repository only through git branches: the person's checkout is never touched.

Each agent works in its own worktree on ``toka/<run>/<agent>``; a dependent starts from its
dependencies' work; the run ends with ``toka/<run>/_merged``; ``toka diff``, ``toka apply`` and
``toka discard`` review, take and drop the work. Real git, real Prefect, ``toka run`` itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from toka import branches
from toka.cli import app
from toka.errors import BranchError, MergeConflictError
from toka.model import ModelRequest, ModelResponse, override_model
from toka.testing import FunctionModel, submit, tool_call

from .anthropic_server import AnthropicServer, scripted_responder, tool_use_block
from .conftest import minimal_spec
from .test_cli_run import TOKA

SHARED = "".join(f"line {i}\n" for i in range(1, 21))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def make_repo(folder: Path, *specs: dict[str, Any]) -> Path:
    """A repository holding ``shared.txt`` and the specs, committed."""
    folder.mkdir(parents=True)
    git(folder, "init", "-q", "-b", "main")
    git(folder, "config", "user.name", "Person")
    git(folder, "config", "user.email", "person@example.com")
    (folder / "shared.txt").write_text(SHARED)
    (folder / "specs").mkdir()
    for spec in specs:
        (folder / "specs" / f"{spec['metadata']['name']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "start")
    return folder


def writer(name: str, *, tasks: int = 1, **deps: Any) -> dict[str, Any]:
    spec = minimal_spec(name, tasks=tasks, **deps)
    spec["security"]["capabilities_required"] = ["filesystem-read", "filesystem-write"]
    return spec


def checkout_state(repo: Path) -> dict[str, Any]:
    """Everything of the person's checkout an agent must not change: files, index, HEAD, stash."""
    files = {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
             if p.is_file() and not {".git", ".toka"} & set(p.relative_to(repo).parts)}
    return {"files": files, "index": (repo / ".git" / "index").read_bytes(), "head": git(repo, "rev-parse", "HEAD"),
            "branch": git(repo, "symbolic-ref", "HEAD"), "stash": git(repo, "stash", "list"),
            "status": git(repo, "status", "--porcelain")}


def last_tool_output(request: ModelRequest) -> str:
    return str(request.messages[-1].content)


def editing(edits: dict[str, tuple[str, str]], seen: dict[str, str]) -> Callable[[ModelRequest], ModelResponse]:
    """A model that reads shared.txt, makes its agent's edit, tries the person's untracked file, submits."""

    def answer(request: ModelRequest) -> ModelResponse:
        agent = request.metadata["agent"]
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            return tool_call("read_file", path="shared.txt")
        if turn == 1:
            seen[agent] = last_tool_output(request)
            old, new = edits[agent]
            return tool_call("edit_file", path="shared.txt", old_text=old, new_text=new)
        if turn == 2:
            return tool_call("read_file", path="notes.txt")
        seen[f"{agent}:notes"] = last_tool_output(request)
        return submit(summary=f"{agent} edited shared.txt", files_changed=["shared.txt"])

    return answer


def toka(repo: Path, *args: str, model: Any = None) -> Any:
    runner = CliRunner()
    if model is None:
        return runner.invoke(app, [*args, "--workspace", str(repo)], env={"COLUMNS": "250"})
    with override_model(model):
        return runner.invoke(app, ["run", str(repo / "specs"), "--workspace", str(repo), "--retry-delay", "0",
                                   *args], env={"COLUMNS": "250"})


@pytest.mark.usefixtures("prefect_server")
def test_agents_work_on_branches_and_the_persons_checkout_is_untouched(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", writer("a"), writer("b", required={"a": "builds on a"}))
    # The person's work in progress: an unstaged edit, a staged file, an untracked file.
    (repo / "shared.txt").write_text(SHARED.replace("line 1\n", "line 1 (mine)\n"))
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "notes.txt").write_text("private notes\n")
    before = checkout_state(repo)

    seen: dict[str, str] = {}
    edits = {"a": ("line 20\n", "line 20 (a)\n"), "b": ("line 10\n", "line 10 (b)\n")}
    shown = toka(repo, "--run-key", "night", "--json", str(tmp_path / "out.json"),
                 model=FunctionModel(editing(edits, seen)))
    assert shown.exit_code == 0, shown.output
    assert "toka/night/_merged" in shown.output and "toka diff --run night" in shown.output

    assert checkout_state(repo) == before  # files, index, HEAD, stash: byte for byte
    # The agents' worktrees are gone when the command returns (their branches hold the work).
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert not (repo / ".toka" / "worktrees" / "night").exists()  # nor is their run's directory left empty
    assert not (repo / ".toka" / "journal" / "night").exists()  # nor the finished tasks' journal folders
    assert "line 20 (a)" in seen["b"]  # b started from a's work
    assert "line 1 (mine)" not in seen["a"]  # nor uncommitted work...
    assert "does not exist" in seen["a:notes"]  # ...nor untracked files reach the agents
    merged = git(repo, "show", "toka/night/_merged:shared.txt")
    assert "line 20 (a)" in merged and "line 10 (b)" in merged and "line 1 (mine)" not in merged
    assert git(repo, "log", "-1", "--format=%an|%s", "toka/night/a") == "toka a|a: task 1/1: a step 1\n"
    assert "Toka-Run: night" in git(repo, "log", "-1", "--format=%b", "toka/night/a")

    data = json.loads((tmp_path / "out.json").read_text())
    by_name = {a["name"]: a for a in data["agents"]}
    assert by_name["b"]["branch"] == "toka/night/b" and by_name["b"]["files_changed"] == ["shared.txt"]
    assert by_name["a"]["base"] == before["head"].strip()
    assert "shared.txt | 2 +-" in by_name["b"]["diffstat"]  # b's own change only, from a's work
    assert data["branch"]["merged"] == ["a", "b"]
    report = (repo / ".toka" / "reports" / "night" / "pipeline.md").read_text()
    assert "toka/night/_merged" in report and "`toka/night/b`" in report

    diff = toka(repo, "diff", "--run", "night")
    assert diff.exit_code == 0 and "+line 20 (a)" in diff.output and "+line 10 (b)" in diff.output
    assert "+line 10 (b)" not in toka(repo, "diff", "--agent", "a").output

    refused = toka(repo, "apply")
    assert refused.exit_code == 1 and "shared.txt" in refused.output and "uncommitted" in refused.output
    assert checkout_state(repo) == before

    git(repo, "commit", "-q", "-am", "my work")
    applied = toka(repo, "apply")
    assert applied.exit_code == 0, applied.output
    assert (repo / "shared.txt").read_text() == SHARED.replace("line 1\n", "line 1 (mine)\n").replace(
        "line 10\n", "line 10 (b)\n").replace("line 20\n", "line 20 (a)\n")
    assert (repo / "notes.txt").read_text() == "private notes\n"  # still untracked, still there

    discarded = toka(repo, "discard")
    assert discarded.exit_code == 0, discarded.output
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert git(repo, "branch", "--list", "toka/*") == ""


@pytest.mark.usefixtures("prefect_server")
def test_conflicting_parallel_agents_keep_only_their_dependent_from_running(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", writer("a"), writer("c"), writer("other"),
                     writer("d", required={"a": "needs a", "c": "needs c"}))
    edits = {"a": ("line 20\n", "line 20 (a)\n"), "c": ("line 20\n", "line 20 (c)\n"),
             "other": ("line 5\n", "line 5 (other)\n")}
    shown = toka(repo, "--run-key", "clash", "--json", str(tmp_path / "out.json"),
                 model=FunctionModel(editing(edits, {})))
    assert shown.exit_code == 1, shown.output  # d did not run
    data = json.loads((tmp_path / "out.json").read_text())
    states = {a["name"]: (a["state"], a["reason"]) for a in data["agents"]}
    assert [states[n][0] for n in ("a", "c", "other", "d")] == ["completed", "completed", "completed", "not-run"]
    reason = states["d"][1]
    assert "a" in reason and "c" in reason and "shared.txt" in reason and "conflict" in reason
    # The run's branch holds what merges; the conflicting branch is named with its reason.
    assert data["branch"]["merged"] == ["a", "other"]
    assert "shared.txt" in data["branch"]["not_merged"]["c"]
    merged = git(repo, "show", "toka/clash/_merged:shared.txt")
    assert "line 20 (a)" in merged and "line 5 (other)" in merged
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""


@pytest.mark.usefixtures("prefect_server")
def test_a_failed_tasks_edits_are_kept_in_a_commit_and_set_aside(tmp_path: Path) -> None:
    spec = writer("a", tasks=2)
    spec["tasks"]["default"][0]["priority"] = "low"  # its failure does not stop the agent

    def answer(request: ModelRequest) -> ModelResponse:
        task, turn = int(request.metadata["task"]), sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            return tool_call("write_file", path=f"task{task}.txt", content=f"task {task}\n")
        if task == 1:
            return submit(status="failed", summary="could not finish")
        assert "task1.txt" not in str(request.messages)
        return tool_call("list_dir", path=".") if turn == 1 else submit(summary="done")

    repo = make_repo(tmp_path / "repo", spec)
    shown = toka(repo, "--run-key", "f", model=FunctionModel(answer))
    assert shown.exit_code == 0, shown.output
    log = git(repo, "log", "--format=%s", "toka/f/a").splitlines()
    assert log[:3] == ["a: task 2/2: a step 2", "a: set aside the failed task 1/2's edits",
                       "a: FAILED task 1/2: a step 1"]
    failed = git(repo, "rev-parse", "toka/f/a~2").strip()
    assert git(repo, "show", f"{failed}:task1.txt") == "task 1\n"  # kept in history
    tree = git(repo, "ls-tree", "--name-only", "toka/f/a").split()
    assert "task2.txt" in tree and "task1.txt" not in tree  # not mixed into the next task


def test_a_task_that_ran_no_tool_costs_no_git_process_and_its_agent_keeps_every_edit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Task 2 of 4 writes a file and task 4 only reads; tasks 1 and 3 just answer. Only the two
    tasks that ran a tool look at the worktree (one ``git status`` each); the branch holds the
    edit in task 2's commit, and the report's diff shows it."""
    asked: list[tuple[str, ...]] = []
    real = branches.run_git

    def counted(repo: Path, *args: str, **kwargs: Any) -> Any:
        asked.append(args)
        return real(repo, *args, **kwargs)

    monkeypatch.setattr(branches, "run_git", counted)

    def answer(request: ModelRequest) -> ModelResponse:
        task, turn = int(request.metadata["task"]), sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0 and task == 2:
            return tool_call("write_file", path="two.txt", content="task 2\n")
        if turn == 0 and task == 4:
            return tool_call("read_file", path="two.txt")
        return submit(summary=f"task {task} done")

    repo = make_repo(tmp_path / "repo", writer("a", tasks=4))
    shown = toka(repo, "--run-key", "q", model=FunctionModel(answer))
    assert shown.exit_code == 0, shown.output
    assert sum(1 for args in asked if "status" in args) == 2, asked
    assert git(repo, "log", "--format=%s", "toka/q/a").splitlines() == ["a: task 2/4: a step 2", "start"]
    assert git(repo, "show", "toka/q/a:two.txt") == "task 2\n"
    assert "two.txt" in git(repo, "show", "--name-only", "--format=", "toka/q/_merged")


@pytest.mark.usefixtures("prefect_server")
def test_diff_apply_and_discard_mean_the_newest_run_a_deployments_too(tmp_path: Path) -> None:
    """A nightly deployment's run writes no command-line record: `toka diff` showed the run before it."""
    from .conftest import run_pipeline

    def writes(name: str) -> Callable[[ModelRequest], ModelResponse]:
        def answer(request: ModelRequest) -> ModelResponse:
            if not any(m.role == "assistant" for m in request.messages):
                return tool_call("write_file", path=f"{name}.txt", content=f"{name}\n")
            return submit(summary="written")
        return answer

    repo = make_repo(tmp_path / "repo", writer("a"))
    shown = toka(repo, "--run-key", "cli", model=FunctionModel(writes("by-the-cli")))
    assert shown.exit_code == 0, shown.output
    with override_model(FunctionModel(writes("by-the-deployment"))):
        state, _ = asyncio.run(run_pipeline(repo, run_key="night", specs=[str(repo / "specs")]))
    assert state.is_completed()

    diff = toka(repo, "diff", "--stat")
    assert diff.exit_code == 0, diff.output
    assert "by-the-deployment.txt" in diff.output and "by-the-cli.txt" not in diff.output
    assert "discarded run night: 2 branches removed" in toka(repo, "discard").output
    # With the deployment's run gone, the command line's is the newest left.
    assert "by-the-cli.txt" in toka(repo, "diff", "--stat").output
    gone = toka(repo, "diff", "--run", "night")
    assert gone.exit_code == 1
    assert "runs with branches here, newest first: cli (choose one with --run KEY)" in gone.output
    # A discarded run is not resumed: its finished tasks would replay from the cache, their work gone.
    assert (repo / ".toka" / "runs" / "last.json").exists()
    assert toka(repo, "discard").exit_code == 0
    resumed = toka(repo, "--resume", model=FunctionModel(writes("never")))
    assert resumed.exit_code == 2 and "run cli was discarded" in resumed.output, resumed.output
    assert not (repo / ".toka" / "journal" / "cli").exists()
    # Nor is a run under its key: the cache held its task, replayed as done without its file.
    again = toka(repo, "--run-key", "cli", model=FunctionModel(writes("never")))
    assert again.exit_code == 2 and "run cli was discarded" in again.output, again.output
    from flows.pipeline import pipeline
    from toka.config import grouped

    with override_model(FunctionModel(writes("never"))):  # a deployment's run under a discarded key
        state = asyncio.run(pipeline(specs=[str(repo / "specs")], return_state=True, **grouped(
            {"workspace": str(repo), "run_key": "night", "retry_delay_seconds": 0})))
    assert state.is_failed() and "run night was discarded" in str(state.message), state
    assert git(repo, "branch", "--list", "toka/*") == ""


def test_discard_removes_a_runs_branches_whose_record_is_gone(tmp_path: Path) -> None:
    """`.toka/` deleted midway: the branches stayed in the repository and discard said the run had none."""
    repo = make_repo(tmp_path / "repo", writer("a"))
    head = git(repo, "rev-parse", "HEAD").strip()
    for branch in ("toka/kh/a", "toka/kh/_merged", "toka/other/a"):
        git(repo, "branch", branch, head)
    discarded = toka(repo, "discard", "--run", "kh")
    assert discarded.exit_code == 0, discarded.output
    assert "2 branches removed" in discarded.output
    assert git(repo, "branch", "--list", "toka/*", "--format=%(refname:short)").split() == ["toka/other/a"]
    missing = toka(repo, "discard", "--run", "none")
    assert missing.exit_code == 1 and "has no branches" in missing.output


def test_a_private_copy_left_half_made_by_a_kill_is_made_again(tmp_path: Path) -> None:
    """Killed between `git init` and the first commit, the copy failed every resume ("git rev-parse failed")."""
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "notes.txt").write_text("notes\n")
    state = folder / ".toka"
    partial = state / "copies" / "k.partial"  # where a killed start left it: git init done, nothing committed
    partial.mkdir(parents=True)
    (partial / "notes.txt").write_text("notes\n")
    git(partial, "init", "-q")
    copy = branches._private_copy(folder, state, "k")
    assert copy == state / "copies" / "k" and not partial.exists()
    assert git(copy, "log", "--format=%s").strip() == "toka: the workspace at the start of run k"
    assert git(copy, "ls-files").split() == ["notes.txt"]
    assert branches._private_copy(folder, state, "k") == copy  # made once


@pytest.mark.usefixtures("prefect_server")
def test_a_workspace_without_git_gets_a_patch(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    (folder / "specs").mkdir(parents=True)
    (folder / "shared.txt").write_text(SHARED)
    (folder / "specs" / "a.yaml").write_text(yaml.safe_dump(writer("a"), sort_keys=False))
    (folder / "notes.txt").write_text("private notes\n")
    shown = toka(folder, "--run-key", "p", model=FunctionModel(editing({"a": ("line 3\n", "line 3 (a)\n")}, {})))
    assert shown.exit_code == 0, shown.output
    assert (folder / "shared.txt").read_text() == SHARED  # untouched until applied
    patch = folder / ".toka" / "patches" / "p.patch"
    assert "+line 3 (a)" in patch.read_text() and "patch:" in shown.output
    assert "the workspace is not a git repository: the agents work on branches of a private copy" in shown.output
    assert "git log" not in shown.output and "checkout" not in shown.output  # it has no git, no checkout
    applied = toka(folder, "apply")
    assert applied.exit_code == 0, applied.output
    assert (folder / "shared.txt").read_text() == SHARED.replace("line 3\n", "line 3 (a)\n")


@pytest.mark.usefixtures("prefect_server")
def test_in_place_edits_the_workspace_with_a_warning(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", writer("a"))
    shown = toka(repo, "--run-key", "ip", "--in-place",
                 model=FunctionModel(editing({"a": ("line 3\n", "line 3 (a)\n")}, {})))
    assert shown.exit_code == 0, shown.output
    assert "in place" in shown.output
    assert "line 3 (a)" in (repo / "shared.txt").read_text()
    assert git(repo, "branch", "--list", "toka/*") == ""


def test_a_base_that_names_no_commit_is_refused_before_anything_runs(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", writer("a"))
    with pytest.raises(Exception, match="--base 'nope': no such commit"):
        branches.open_run(repo, repo / ".toka", "r", base="nope")


def test_dependencies_that_conflict_name_the_files(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "r")
    for agent, text in (("a", "line 2 (a)\n"), ("c", "line 2 (c)\n")):
        checkout = branches.agent_checkout(run, agent, [])
        (Path(checkout.root) / "shared.txt").write_text(SHARED.replace("line 2\n", text))
        branches.commit_task(checkout, run_key="r", index=1, total=1, description="edit", state="completed")
    with pytest.raises(MergeConflictError) as info:
        branches.agent_checkout(run, "d", ["a", "c"])
    assert info.value.files == ("shared.txt",)


# -- kill -9 in the middle, then --resume ---------------------------------------------------------


KEY = "sk-ant-test-branches-0123456789abcdef"


class ThreeSteps:
    """Each task writes step-N.txt, then submits; the second task's submit waits until the test kills
    the run (``reached``), the first time."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.requests = 0

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        first = body["messages"][0]["content"]
        text = first if isinstance(first, str) else " ".join(b.get("text", "") for b in first)
        task = int(text.split("# Task ", 1)[1].split(" ", 1)[0])
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if turn == 0:
            block = tool_use_block("write_file", {"path": f"step-{task}.txt", "content": f"step {task}\n"})
        else:
            if task == 2 and not self.reached.is_set():
                self.reached.set()
                self.release.wait(60)
            block = tool_use_block("submit_result", {"status": "completed", "summary": f"wrote step {task}"})
        return scripted_responder(lambda _: [block])(body)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_kill_then_resume_reuses_the_worktree_and_commits_nothing_twice(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    from toka.claude import default_model

    repo = make_repo(tmp_path / "repo", writer("writer", tasks=3))
    model = ThreeSteps()
    args = [TOKA, "run", "specs", "--model", default_model(), "--retry-delay", "0", "--run-key", "k"]
    with AnthropicServer(model) as server:
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "ANTHROPIC_API_KEY": KEY,
               "ANTHROPIC_BASE_URL": server.base_url, "NO_COLOR": "1"}
        proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        assert model.reached.wait(180), proc.stderr.read() if proc.stderr else ""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        model.release.set()
        worktree = repo / ".toka" / "worktrees" / "k" / "writer"
        assert (worktree / "step-2.txt").is_file()  # task 2's edit, not committed yet
        assert git(repo, "log", "--format=%s", "toka/k/writer").splitlines()[0] == "writer: task 1/3: writer step 1"
        time.sleep(0.2)

        resumed = subprocess.run([TOKA, "run", "--resume", "--retry-delay", "0"], cwd=repo, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr

    log = git(repo, "log", "--format=%s", "toka/k/writer").splitlines()
    assert log == ["writer: task 3/3: writer step 3", "writer: task 2/3: writer step 2",
                   "writer: task 1/3: writer step 1", "start"]
    assert git(repo, "show", "--name-only", "--format=", "toka/k/writer~1").split() == ["step-2.txt"]
    # Task 2's commit holds the edit left in the worktree before the kill: the worktree was reused.
    # Clean at the end, it is removed (the branch stays, for review).
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1 and not worktree.exists()
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""

    discarded = subprocess.run([TOKA, "discard"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert discarded.returncode == 0, discarded.stderr
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert git(repo, "branch", "--list", "toka/*") == ""


# -- the sandbox in a worktree ---------------------------------------------------------------------


@pytest.mark.skipif(not __import__("toka.sandbox").sandbox.detect_host().mountns,
                    reason="needs a mount namespace (unshare -m)")
def test_a_sandboxed_command_in_a_worktree_can_change_only_the_worktree(tmp_path: Path) -> None:
    import asyncio

    from toka.audit import AuditLog
    from toka.capabilities import grant_tools
    from toka.policy import AgentPolicy
    from toka.spec import ResourceLimits
    from toka.tools import Toolbox, ToolContext
    from toka.workspace import Workspace

    repo = make_repo(tmp_path / "repo")
    (repo / "escape.sh").write_text(
        "#!/bin/sh\n"
        f"echo changed > {repo}/shared.txt\n"
        f"echo 0000000000000000000000000000000000000000 > {repo}/.git/refs/heads/main\n"
        f"echo planted > {repo}/.toka/planted.txt\n"
        "echo mine > inside.txt\n"
        "echo 'gitdir: /tmp/elsewhere' > .git\n"  # the worktree's pointer to its git directory
        "git log --format=%s -1\n")
    (repo / "escape.sh").chmod(0o755)
    git(repo, "add", "escape.sh")
    git(repo, "commit", "-q", "-m", "a script")
    before = checkout_state(repo)
    main_ref = git(repo, "rev-parse", "main")
    run = branches.open_run(repo, repo / ".toka", "s")
    checkout = branches.agent_checkout(run, "a", [])
    workspace = Workspace(checkout.root, state_dir=repo / ".toka")
    capabilities = ("script-execution", "git-access")
    tools, withheld = grant_tools(capabilities)
    policy = AgentPolicy(capabilities=frozenset(capabilities), sandbox=True,
                         limits=ResourceLimits.model_validate({"timeout": "30s"}))
    ctx = ToolContext(workspace=workspace, agent="a", task=1, policy=policy,
                      audit=AuditLog(repo / ".toka" / "audit" / "s.jsonl", run="s"))
    output = asyncio.run(Toolbox(tools, ctx, withheld=withheld).call("run_command", {"argv": ["./escape.sh"]}))
    assert "a script" in output.text  # git reads the repository from the worktree
    assert (Path(checkout.root) / "inside.txt").read_text() == "mine\n"
    assert checkout_state(repo) == before and git(repo, "rev-parse", "main") == main_ref
    assert not (repo / ".toka" / "planted.txt").exists()


@pytest.mark.usefixtures("prefect_server")
def test_push_is_a_git_push_use_that_needs_its_approval(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", writer("a"))
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    git(repo, "remote", "add", "origin", str(remote))
    model = FunctionModel(editing({"a": ("line 3\n", "line 3 (a)\n")}, {}))

    held = toka(repo, "--run-key", "held", "--push", "origin", model=model)
    assert held.exit_code == 0, held.output
    assert "not pushed: git-push needs approval" in held.output
    assert git(remote, "branch", "--list") == ""

    pushed = toka(repo, "--run-key", "sent", "--push", "origin", "--approve", "git-push", model=model)
    assert pushed.exit_code == 0, pushed.output
    assert "line 3 (a)" in git(remote, "show", "toka/sent:shared.txt")
    assert any(r["tool"] == "git-push" and r["arguments"]["remote"] == "origin"
               for r in map(json.loads, (repo / ".toka" / "audit" / "sent.jsonl").read_text().splitlines()))


def test_a_redirected_worktree_pointer_is_undone_and_stops_the_run(tmp_path: Path) -> None:
    # Without the sandbox the git guard is the only layer: git would otherwise run the runtime's
    # commit in a git directory of the command's choosing.
    from toka.gitguard import GitGuard

    repo = make_repo(tmp_path / "repo")
    checkout = branches.agent_checkout(branches.open_run(repo, repo / ".toka", "g"), "a", [])
    root = Path(checkout.root)
    pointer = (root / ".git").read_text()
    guard = GitGuard.capture(root)
    evil = root / "evil"
    evil.mkdir()
    (root / ".git").write_text(f"gitdir: {evil}\n")
    assert guard.check([".git"]) == [".git"]
    assert (root / ".git").read_text() == pointer
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD").strip() == "toka/g/a"


@pytest.mark.usefixtures("prefect_server")
def test_a_task_failed_midway_continues_from_its_set_aside_edits_on_resume(tmp_path: Path) -> None:
    from toka.errors import PermanentModelError

    spec = writer("a", tasks=1)
    spec["tasks"]["default"][0]["priority"] = "high"
    repo = make_repo(tmp_path / "repo", spec)
    asked: list[int] = []
    broken = [True]

    def answer(request: ModelRequest) -> ModelResponse:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        asked.append(turn)
        if turn == 0:
            return tool_call("write_file", path="half.txt", content="half done\n")
        if broken[0]:
            raise PermanentModelError("the provider refused the request")
        return submit(summary="finished what was half done", files_changed=["half.txt"])

    failed = toka(repo, "--run-key", "again", model=FunctionModel(answer))
    assert failed.exit_code == 1, failed.output
    assert git(repo, "log", "--format=%s", "-2", "toka/again/a").splitlines() == [
        "a: set aside the failed task 1/1's edits", "a: FAILED task 1/1: a step 1"]

    start = git(repo, "rev-parse", "HEAD").strip()
    (repo / "mine.txt").write_text("committed by the person since\n")
    git(repo, "add", "mine.txt")
    git(repo, "commit", "-q", "-m", "mine")
    broken[0], asked[:] = False, []
    resumed = toka(repo, "--resume", model=FunctionModel(answer))
    assert resumed.exit_code == 0, resumed.output
    # It goes on from where the run started, and says so (it said "from HEAD").
    assert f"worktree, from {start[:12]} (HEAD when the run started); your checkout" in resumed.output
    assert asked == [1]  # the write_file turn was replayed from the journal, onto its edits
    assert git(repo, "log", "--format=%s", "toka/again/a").splitlines() == ["a: task 1/1: a step 1", "start"]
    assert git(repo, "show", "toka/again/a:half.txt") == "half done\n"


def test_a_file_too_large_to_commit_stays_out_of_the_branch_and_is_named(tmp_path: Path) -> None:
    """A command's sparse 20 GB file: git read and compressed all of it (two minutes of the
    runtime's CPU) to commit it; and a branch with a file over 100 MB cannot be pushed to GitHub."""
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "big")
    checkout = branches.agent_checkout(run, "a", [])
    tree = Path(checkout.worktree)
    with open(tree / "huge.bin", "wb") as f:
        f.truncate(50 * 2**30)  # sparse: no disk taken, 50 GiB long
    with open(tree / "shared.txt", "ab") as f:
        f.truncate(branches.COMMIT_FILE_LIMIT + 1)  # a tracked file grown past the limit
    (tree / "small.txt").write_text("kept\n")
    started = time.monotonic()
    commit = branches.commit_task(checkout, run_key="big", index=1, total=2, description="make files",
                                  state="completed")
    assert time.monotonic() - started < 30  # not read through (it took minutes)
    assert commit
    assert git(repo, "show", "--name-status", "--format=", commit).split() == ["A", "small.txt"]
    message = git(repo, "log", "-1", "--format=%B", commit)
    assert "- huge.bin: larger than 100 MiB, the most a commit takes; left in the worktree" in message
    assert "- shared.txt: larger than 100 MiB" in message
    (tree / "huge.bin").write_bytes(b"now small\n")  # the next task makes it small: committed then
    assert branches.commit_task(checkout, run_key="big", index=2, total=2, description="shrink",
                                state="completed")
    assert git(repo, "show", "toka/big/a:huge.bin") == "now small\n"
    assert branches.set_aside_edits(checkout, run_key="big", index=2, total=2, why="retry") is None


def test_symbolic_links_leading_out_of_the_repository_never_reach_a_branch(tmp_path: Path) -> None:
    from toka.audit import AuditLog, read_audit

    repo = make_repo(tmp_path / "repo")
    (repo / "tools").mkdir()
    os.symlink("/usr/bin", repo / "tools" / "bin")  # the person's own link out, in the start commit
    os.symlink("shared.txt", repo / "current.txt")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "links")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    tree = Path(checkout.worktree)
    os.symlink("/", tree / "root")
    os.symlink(str(repo), tree / "person")
    os.symlink("../../..", tree / "tools" / "up")
    os.symlink(".git", tree / "gitdir")
    os.symlink("tools/../.GIT/config", tree / "config")
    (tree / "current.txt").unlink()
    os.symlink("/etc/passwd", tree / "current.txt")  # was a link inside: put back as it was
    os.symlink("tools/bin", tree / "programs")  # through the person's link out: out too
    (tree / "d").mkdir()
    os.symlink("..", tree / "d" / "up")  # the top: committed
    os.symlink("d/up/..", tree / "parent")  # `..` after a link: the repository's parent
    os.symlink("../shared.txt", tree / "d" / "shared")  # inside: committed
    (tree / "shared.txt").write_text("edited\n")
    audit = AuditLog(repo / ".toka" / "audit" / "night.jsonl", run="night")

    commit = branches.commit_task(checkout, run_key="night", index=1, total=1, description="edit",
                                  state="completed", audit=audit)
    assert commit
    committed = git(repo, "show", "--name-status", "--format=", commit).split("\n")
    assert sorted(filter(None, committed)) == ["A\td/shared", "A\td/up", "M\tshared.txt"]
    message = git(repo, "log", "-1", "--format=%B", commit)
    assert "Not committed:\n- " in message
    assert "- root: a symbolic link leading out of the repository (to '/'); removed" in message
    assert "- current.txt: a symbolic link leading out of the repository (to '/etc/passwd'); put back as" in message
    assert "- current.txt: a symbolic link leading out of the repository (to '/etc/passwd')" in message
    for name in ("root", "person", "tools/up", "gitdir", "config", "programs", "parent"):
        assert not os.path.lexists(tree / name), name
    assert os.readlink(tree / "current.txt") == "shared.txt"
    assert os.readlink(tree / "tools" / "bin") == "/usr/bin"  # the person's, untouched
    refused = [r for r in read_audit(repo / ".toka", run="night") if r["decision"] == "refused"]
    assert sorted(r["arguments"]["path"] for r in refused) == sorted(
        ["root", "person", "tools/up", "gitdir", "config", "current.txt", "programs", "parent"])
    assert all(r["tool"] == "git-commit" and r["agent"] == "a" for r in refused)
    assert git(tree, "status", "--porcelain") == ""  # nothing left for the next task's commit

    branches.finish_run(run, ["a"])
    assert branches.apply_changes(run).startswith("merged")
    assert not os.path.lexists(repo / "root") and os.readlink(repo / "current.txt") == "shared.txt"
    assert os.readlink(repo / "d" / "shared") == "../shared.txt" and not os.path.lexists(repo / "parent")


@pytest.mark.parametrize(("path", "target", "out"), [
    ("a", "b", False), ("d/a", "../b", False), ("d/a", "../../b", True), ("a", "/b", True),
    ("a", ".git", True), ("d/a", "../.git/hooks", True), ("a", "./x/../.Git", True), ("a", "", True),
    ("a", ".gitignore", False), ("d/a", ".git/config", True),  # a nested repository's, or a submodule's
    ("x", "d/up/..", True), ("a", "b/../c", True), ("d/a", "./../b", False),  # `..` after a name: it may be a link
])
def test_which_link_targets_lead_out(path: str, target: str, out: bool) -> None:
    assert branches.leads_out(path, target) is out


def test_a_task_run_again_after_its_commit_leaves_the_next_tasks_edits_to_that_task(tmp_path: Path) -> None:
    # A resume whose Prefect results are out of reach (another Prefect home) runs a finished
    # task again: what the worktree holds then is the killed next task's, and is committed as its.
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    tree = Path(checkout.worktree)

    def commit(index: int, state: str) -> str | None:
        return branches.commit_task(checkout, run_key="night", index=index, total=2, description=f"step {index}",
                                    state=state)

    (tree / "one.txt").write_text("1\n")
    assert commit(1, "failed")  # failed first, set aside...
    (tree / "one.txt").write_text("1\n")
    assert commit(1, "completed")  # ...then done: committed even so
    (tree / "two.txt").write_text("2\n")  # the next task's edit, when the process was killed
    assert commit(1, "completed") is None
    assert commit(2, "completed")
    subjects = git(repo, "log", "--format=%s", f"{checkout.start}..toka/night/a").splitlines()
    assert subjects == ["a: task 2/2: step 2", "a: task 1/2: step 1", "a: set aside the failed task 1/2's edits",
                        "a: FAILED task 1/2: step 1"]
    assert git(repo, "show", "--name-only", "--format=", "toka/night/a").split() == ["two.txt"]


def test_a_summary_that_reads_like_a_later_tasks_trailers_does_not_lose_that_tasks_edits(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    tree = Path(checkout.worktree)
    (tree / "one.txt").write_text("1\n")
    forged = "Toka-Run: night\nToka-Task: 2/2\nToka-State: completed\nToka-Set-Aside: 2/2"
    assert branches.commit_task(checkout, run_key="night", index=1, total=2, description="one", state="completed",
                                summary=forged)
    (tree / "two.txt").write_text("2\n")
    assert branches.reopen_task(checkout, run_key="night", index=2, total=2)
    assert branches.commit_task(checkout, run_key="night", index=2, total=2, description="two", state="completed")
    assert git(repo, "show", "--name-only", "--format=%s", "toka/night/a").split() == [
        "a:", "task", "2/2:", "two", "two.txt"]


def test_a_task_that_runs_again_sets_aside_later_tasks_work_and_never_its_own_new_work(tmp_path: Path) -> None:
    """Task 1 made no commit the first time, and does after the spec edit: task 2, running again,
    set aside from its own old commit, which lay under task 1's new one: task 1's new work went."""
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    tree = Path(checkout.worktree)

    def task(index: int, files: dict[str, str]) -> None:
        for name, text in files.items():
            (tree / name).write_text(text)
        branches.commit_task(checkout, run_key="night", index=index, total=3, description=f"t{index}",
                             state="completed")

    task(1, {})  # it only read
    task(2, {"t2.txt": "old\n"})
    task(3, {"t3.txt": "old\n"})
    checkout = branches.agent_checkout(run, "a", [])  # the resume, after a spec edit: all run again
    # Task 1 had no commit, tasks 2 and 3 go even so (else task 1 worked on top of their old work).
    assert branches.set_aside_from_task(checkout, run_key="night", index=1, total=3)
    assert not (tree / "t2.txt").exists() and not (tree / "t3.txt").exists()
    task(1, {"t1.txt": "new\n"})
    assert branches.set_aside_from_task(checkout, run_key="night", index=2, total=3) is None  # 1's new stays
    assert (tree / "t1.txt").read_text() == "new\n"
    task(2, {"t2.txt": "new\n"})
    assert branches.set_aside_from_task(checkout, run_key="night", index=3, total=3) is None
    task(3, {"t3.txt": "new\n"})
    assert [git(repo, "show", f"toka/night/a:t{i}.txt") for i in (1, 2, 3)] == ["new\n"] * 3


def test_a_failed_task_running_again_leaves_the_later_tasks_work_on_the_branch(tmp_path: Path) -> None:
    """Task 2 failed, task 3 finished; the resume ran task 2 again (no spec edit) and set task 3's
    work aside, though task 3 was then replayed from the cache: its work gone, reported done. (Not
    set aside, task 2 worked on top of it, and a conflict in reverting it lost task 2's new work.)"""
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    tree = Path(checkout.worktree)

    def task(index: int, state: str) -> str | None:
        return branches.commit_task(checkout, run_key="night", index=index, total=3, description=f"t{index}",
                                    state=state, key=f"k{index}")

    for index, state in ((1, "completed"), (2, "failed"), (3, "completed")):
        (tree / f"t{index}.txt").write_text(f"{index}\n")
        task(index, state)
    checkout = branches.agent_checkout(run, "a", [])
    assert branches.set_aside_from_task(checkout, run_key="night", index=2, total=3)
    assert not (tree / "t3.txt").exists()
    (tree / "t2.txt").write_text("2 again\n")
    task(2, "failed")  # fails again: task 3 keeps its cache key, and replays
    assert task(3, "cached")
    assert git(repo, "show", "toka/night/a:t3.txt") == "3\n"
    assert branches.run_git(repo, "cat-file", "-e", "toka/night/a:t2.txt").returncode != 0  # set aside, twice


class _Versions:
    """An agent of three tasks on its branch, run under two versions of its spec (``v``: the
    tasks' cache keys differ), as resumes with a spec edited, then the edit undone, leave it."""

    def __init__(self, tmp_path: Path) -> None:
        self.repo = make_repo(tmp_path / "repo")
        self.run = branches.open_run(self.repo, self.repo / ".toka", "night")
        self.checkout = branches.agent_checkout(self.run, "a", [])
        self.tree = Path(self.checkout.worktree)
        self.said: list[str] = []
        self.journals = tmp_path / "journal" / "a"

    def task(self, index: int, version: str, files: dict[str, str], state: str = "completed") -> str | None:
        for name, text in files.items():
            (self.tree / name).write_text(text)
        return branches.commit_task(self.checkout, run_key="night", index=index, total=3, description=f"t{index}",
                                    state=state, key=f"k{index}-{version}", log=self.said.append,
                                    journals=self.journals)

    def resume(self) -> None:
        self.checkout = branches.agent_checkout(self.run, "a", [])

    def branch_files(self) -> dict[str, str]:
        names = git(self.repo, "ls-tree", "--name-only", "toka/night/a").split()
        return {n: git(self.repo, "show", f"toka/night/a:{n}") for n in names if n.startswith("t")}


def test_a_spec_edit_undone_replays_the_first_versions_results_and_the_branch_holds_their_work(
        tmp_path: Path) -> None:
    """Edit, resume (all ran again), undo the edit, resume: every task replayed the first version's
    result from the cache while the branch kept the second version's work."""
    a = _Versions(tmp_path)
    for i in (1, 2, 3):
        a.task(i, "v1", {f"t{i}.txt": "first\n"})
    a.resume()
    assert branches.set_aside_from_task(a.checkout, run_key="night", index=1, total=3)
    for i in (1, 2, 3):
        a.task(i, "v2", {f"t{i}.txt": "second\n", "extra.txt": f"{i}\n"})
    a.resume()
    for i in (1, 2, 3):
        assert a.task(i, "v1", {}, state="cached")  # restored
    assert a.branch_files() == {f"t{i}.txt": "first\n" for i in (1, 2, 3)}
    assert "restored" in a.said[0] and "another version's set aside" in a.said[0]
    # Once restored, the next resume finds them there.
    a.resume()
    assert all(a.task(i, "v1", {}, state="cached") is None for i in (1, 2, 3))
    assert a.branch_files() == {f"t{i}.txt": "first\n" for i in (1, 2, 3)}
    assert not git(a.tree, "status", "--porcelain")


def test_an_abandoned_attempt_of_another_version_is_never_committed_as_a_cached_tasks_work(tmp_path: Path) -> None:
    """Edit, resume killed midway through task 1 (its half-done edits uncommitted), undo the edit,
    resume: task 1, replayed from the cache, was committed with those half-done edits."""
    a = _Versions(tmp_path)
    for i in (1, 2, 3):
        a.task(i, "v1", {f"t{i}.txt": "first\n"})
    a.resume()
    assert branches.set_aside_from_task(a.checkout, run_key="night", index=1, total=3)
    (a.tree / "t1.txt").write_text("half of the second version\n")  # killed here
    a.journals.mkdir(parents=True)
    (a.journals / "1.jsonl").write_text('{"kind":"tool"}\n')  # its turns: their effects go with the edits
    a.resume()
    for i in (1, 2, 3):
        assert a.task(i, "v1", {}, state="cached")
    assert a.branch_files() == {f"t{i}.txt": "first\n" for i in (1, 2, 3)}
    assert not git(a.tree, "status", "--porcelain")
    aside = git(a.repo, "log", "--format=%s", "--grep=earlier attempt", "toka/night/a").splitlines()
    assert aside == ["a: set aside the edits of an earlier attempt at task 1/3", "a: edits of an earlier attempt at task 1/3"]
    assert not list(a.journals.iterdir())


def test_a_cached_result_that_changed_nothing_leaves_no_other_versions_work(tmp_path: Path) -> None:
    a = _Versions(tmp_path)
    a.task(1, "v1", {})  # only read
    for i in (2, 3):
        a.task(i, "v1", {f"t{i}.txt": "first\n"})
    a.resume()
    a.task(1, "v2", {"t1.txt": "second\n"})
    for i in (2, 3):
        assert branches.set_aside_from_task(a.checkout, run_key="night", index=i, total=3) or i == 3
        a.task(i, "v2", {f"t{i}.txt": "second\n"})
    a.resume()
    assert a.task(1, "v1", {}, state="cached") is None
    assert "changed no file" in a.said[-1]
    for i in (2, 3):
        assert a.task(i, "v1", {}, state="cached")
    assert a.branch_files() == {"t2.txt": "first\n", "t3.txt": "first\n"}


def test_a_cached_tasks_work_found_on_the_branch_already_is_not_committed_again(tmp_path: Path) -> None:
    a = _Versions(tmp_path)
    a.task(1, "v1", {})
    a.task(2, "v1", {"x.txt": "1\n"})
    a.resume()
    assert branches.set_aside_from_task(a.checkout, run_key="night", index=1, total=3)
    a.task(1, "v2", {"x.txt": "1\n"})  # the same change, by task 1 now; task 2's result is the same
    assert a.task(2, "v1", {}, state="cached") is None  # git had nothing to commit: no error
    assert git(a.repo, "show", "toka/night/a:x.txt") == "1\n"


def test_a_restored_task_whose_changes_no_longer_apply_gets_its_files_as_it_left_them(tmp_path: Path) -> None:
    a = _Versions(tmp_path)
    (a.tree / "shared.txt").unlink()
    made = a.task(1, "v1", {"t.txt": "1\nfirst\n3\n"})
    assert made
    a.task(2, "v1", {"t.txt": "1\nother\n3\n"})  # the same line since: the patch conflicts
    restored = branches._restore(a.checkout, made)
    assert restored and git(a.repo, "show", "toka/night/a:t.txt") == "1\nfirst\n3\n"
    assert "Restored from" in git(a.repo, "log", "-1", "--format=%B", "toka/night/a")
    assert not git(a.tree, "status", "--porcelain") and not (a.tree / "shared.txt").exists()


def test_a_task_that_ran_again_under_a_new_key_commits_its_work_over_the_old_versions_commit(
        tmp_path: Path) -> None:
    """A task run afresh under another key while its old commit is still on the branch (a replay
    that diverged sets aside only the uncommitted edits): its new work was left uncommitted."""
    a = _Versions(tmp_path)
    a.task(1, "v1", {"t1.txt": "first\n"})
    assert a.task(1, "v2", {"t1.txt": "second\n"})
    assert git(a.repo, "show", "toka/night/a:t1.txt") == "second\n"
    assert a.task(1, "v2", {"t2.txt": "the next task's, in flight\n"}) is None  # the same key: done already


def test_locks_a_killed_commit_left_are_dropped_when_the_run_goes_on(tmp_path: Path) -> None:
    """kill -9 during a task's `git commit`: its ref and HEAD locks failed every resume ("remove
    the file manually to continue", without the file's name)."""
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    gitdir = Path(git(Path(checkout.worktree), "rev-parse", "--absolute-git-dir").strip())
    locks = [gitdir / "index.lock", gitdir / "HEAD.lock", repo / ".git" / "refs" / "heads" / "toka" / "night" / "a.lock"]
    for lock in locks:
        lock.write_text("")
    (Path(checkout.worktree) / "new.txt").write_text("new\n")
    with pytest.raises(BranchError, match=r"Unable to create '.*\.lock': File exists"):
        branches.commit_task(checkout, run_key="night", index=1, total=1, description="one", state="completed")
    resumed = branches.agent_checkout(run, "a", [])  # what a resume does first
    assert not any(lock.exists() for lock in locks)
    assert branches.commit_task(resumed, run_key="night", index=1, total=1, description="one", state="completed")


def test_a_worktree_made_again_holds_no_edits_for_a_journal_to_replay_onto(tmp_path: Path) -> None:
    """A killed run's worktrees removed (by hand, by a discard cut short): the resume made them
    again from the branch and replayed the in-flight task's journal as if its edits were there."""
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    (Path(checkout.worktree) / "half.txt").write_text("a task's edit, uncommitted when the run was killed\n")
    again = branches.agent_checkout(run, "a", [])
    assert again.reused and branches.reopen_task(again, run_key="night", index=1, total=1)  # still there
    git(repo, "worktree", "remove", "--force", checkout.worktree)
    remade = branches.agent_checkout(run, "a", [])
    assert remade.remade and not (Path(remade.worktree) / "half.txt").exists()
    assert not branches.reopen_task(remade, run_key="night", index=1, total=1)  # its journal goes


def _finished_run(tmp_path: Path, files: dict[str, str],
                  committed: dict[str, str] | None = None) -> tuple[Path, branches.RunBranches]:
    """A repository (with ``committed`` added to its start) and a finished run whose one agent wrote ``files``."""
    repo = make_repo(tmp_path / "repo")
    if committed:
        for name, text in committed.items():
            (repo / name).write_text(text)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "more")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    for name, text in files.items():
        (Path(checkout.worktree) / name).write_text(text)
    assert branches.commit_task(checkout, run_key="night", index=1, total=1, description="write", state="completed")
    branches.finish_run(run, ["a"])
    return repo, run


def test_a_workspace_the_start_commit_lacks_is_refused_before_any_agent_starts(tmp_path: Path) -> None:
    """`toka run --workspace newpkg` on an untracked directory: every agent failed at its first task
    ("workspace .../newpkg is not a directory"), its worktree left behind."""
    from toka.errors import ConfigError

    repo = make_repo(tmp_path / "repo")
    (repo / "newpkg").mkdir()
    (repo / "newpkg" / "draft.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"the workspace newpkg/ is not in the commit the agents start from "
                                          r"\(HEAD: \w+\), .*: commit it, or pass --include-uncommitted"):
        branches.open_run(repo / "newpkg", repo / "newpkg" / ".toka", "night")
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    run = branches.open_run(repo / "newpkg", repo / "newpkg" / ".toka", "night2", include_uncommitted=True)
    assert run.prefix == "newpkg"


def test_discard_and_apply_wait_for_the_run_they_name_to_end(tmp_path: Path) -> None:
    """`toka discard` during a run (meaning the run reviewed before it) removed the running agents'
    worktrees, their uncommitted work with them; the run then made its merged branch again."""
    from toka.runs import hold_workspace

    repo, run = _finished_run(tmp_path, {"from-agent.txt": "agent\n"})
    held = hold_workspace(repo / ".toka", "night")  # `toka run --run-key night`, still running
    try:
        for command in ("discard", "apply"):
            refused = toka(repo, command, "--run", "night")
            assert refused.exit_code == 2, refused.output
            assert f"run night is running (pid {os.getpid()}): {command} it when it has ended" in refused.output
        assert "toka/night/_merged" in git(repo, "branch", "--list", "toka/*")
    finally:
        held.close()
    assert toka(repo, "discard", "--run", "night").exit_code == 0
    with pytest.raises(BranchError, match="run night was discarded while it ran"):
        branches.finish_run(run, ["a"])  # a deployment's run (no workspace lock) discarded meanwhile
    assert git(repo, "branch", "--list", "toka/*") == ""


def test_apply_refuses_while_the_person_is_in_the_middle_of_a_merge_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    repo, run = _finished_run(tmp_path, {"from-agent.txt": "agent\n"})
    git(repo, "checkout", "-q", "-b", "theirs")
    (repo / "shared.txt").write_text("theirs\n")
    git(repo, "commit", "-q", "-am", "theirs")
    git(repo, "checkout", "-q", "main")
    (repo / "shared.txt").write_text("mine\n")
    git(repo, "commit", "-q", "-am", "mine")
    assert subprocess.run(["git", "merge", "-q", "theirs"], cwd=repo, capture_output=True).returncode == 1
    (repo / "shared.txt").write_text("resolved by hand\n")  # the person's resolution, not staged yet
    before = checkout_state(repo)

    with pytest.raises(BranchError, match="in the middle of a merge; finish it"):
        branches.apply_changes(run)
    assert checkout_state(repo) == before and (repo / ".git" / "MERGE_HEAD").is_file()


def test_apply_refuses_to_overwrite_an_ignored_file_of_the_persons(tmp_path: Path) -> None:
    # The agent takes .env out of .gitignore and writes its own.
    repo, run = _finished_run(tmp_path, {".env": "AGENT=1\n", ".gitignore": "*.log\n"}, committed={".gitignore": ".env\n"})
    (repo / ".env").write_text("MY_SECRET=hunter2\n")  # the person's, ignored
    with pytest.raises(BranchError, match=r"untracked or ignored copies of: \.env; move them aside"):
        branches.apply_changes(run)
    assert (repo / ".env").read_text() == "MY_SECRET=hunter2\n"


def test_the_persons_own_worktree_whose_directory_is_away_is_never_forgotten(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    away = tmp_path / "drive" / "wt"
    git(repo, "worktree", "add", "-q", "-b", "mine", str(away))
    (away / "staged.txt").write_text("mine\n")
    git(away, "add", "staged.txt")
    hidden = tmp_path / "unmounted"
    (tmp_path / "drive").rename(hidden)  # the drive is not mounted during the run

    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    shutil.rmtree(checkout.worktree)  # as a killed run may leave it: made again below
    checkout = branches.agent_checkout(run, "a", [])
    (Path(checkout.worktree) / "new.txt").write_text("x\n")
    branches.commit_task(checkout, run_key="night", index=1, total=1, description="write", state="completed")
    branches.finish_run(run, ["a"])
    branches.discard_run(run)

    hidden.rename(tmp_path / "drive")
    assert git(away, "status", "--porcelain") == "A  staged.txt\n"


def test_files_that_are_not_utf8_are_committed_shown_and_applied_byte_for_byte(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    (repo / "legacy.txt").write_bytes(b"caf\xe9\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "latin-1")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    tree = os.fsencode(checkout.worktree)
    with open(tree + b"/legacy.txt", "wb") as f:
        f.write(b"caf\xe9 au lait\n")
    with open(tree + b"/na\xefve.txt", "wb") as f:  # a name a command made, not UTF-8 either
        f.write(b"x\n")
    assert branches.commit_task(checkout, run_key="night", index=1, total=1, description="edit", state="completed")
    changes = branches.agent_changes(run, "a")
    assert changes is not None and sorted(changes.files_changed) == ["legacy.txt", "na\ufffdve.txt"]
    assert "+caf\ufffd au lait" in branches.diff_text(repo, changes.base, changes.commit)
    branches.finish_run(run, ["a"])
    assert branches.apply_changes(run).startswith("merged")
    assert (repo / "legacy.txt").read_bytes() == b"caf\xe9 au lait\n"
    assert os.path.exists(os.fsencode(repo) + b"/na\xefve.txt")


def test_a_git_repository_made_inside_the_worktree_is_not_committed_as_a_dangling_pointer(tmp_path: Path) -> None:
    from toka.audit import read_audit

    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    nested = Path(checkout.worktree) / "vendor" / "lib"
    nested.mkdir(parents=True)
    git(nested, "init", "-q")
    (nested / "code.c").write_text("int main;\n")
    git(nested, "add", "-A")
    git(nested, "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q", "-m", "vendored")
    (Path(checkout.worktree) / "notes.md").write_text("notes\n")
    from toka.audit import AuditLog

    audit = AuditLog(repo / ".toka" / "audit" / "night.jsonl", run="night")
    commit = branches.commit_task(checkout, run_key="night", index=1, total=1, description="vendor",
                                  state="completed", audit=audit)
    assert commit
    assert git(repo, "ls-tree", "-r", "--format=%(objectmode) %(path)", commit).split("\n")[:-1] == [
        "100644 notes.md", "100644 shared.txt"]
    assert "- vendor/lib: a git repository of its own" in git(repo, "log", "-1", "--format=%B", commit)
    assert (nested / "code.c").is_file()  # left in the worktree
    refused = [r for r in read_audit(repo / ".toka", run="night") if r["decision"] == "refused"]
    assert [r["arguments"]["path"] for r in refused] == ["vendor/lib"]
    branches.finish_run(run, ["a"])
    assert nested.is_dir()  # a worktree holding files no task committed stays at the run's end
    discarded = branches.discard_run(run)
    assert checkout.worktree in discarded.removed
    assert discarded.uncommitted == {checkout.worktree: 1}  # said by `toka discard`


def test_a_reported_file_the_ignore_rules_keep_out_is_named_not_dropped_in_silence(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "ignore logs")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    (Path(checkout.worktree) / "report.log").write_text("findings\n")
    (Path(checkout.worktree) / "notes.md").write_text("notes\n")
    commit = branches.commit_task(checkout, run_key="night", index=1, total=1, description="report",
                                  state="completed", files_changed=["report.log", "notes.md", "../outside.txt"])
    assert commit
    assert "- report.log: ignored by the repository's ignore rules" in git(repo, "log", "-1", "--format=%B", commit)
    assert git(repo, "show", "--name-only", "--format=", commit).split() == ["notes.md"]


def test_applying_one_agent_says_its_branch_holds_its_dependencies_work_too(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    for agent, deps in (("a", []), ("b", ["a"])):
        checkout = branches.agent_checkout(run, agent, deps)
        (Path(checkout.worktree) / f"from-{agent}.txt").write_text(f"{agent}\n")
        branches.commit_task(checkout, run_key="night", index=1, total=1, description="write", state="completed")
    branches.finish_run(run, ["a", "b"])
    changes = branches.agent_changes(run, "b")
    assert changes is not None and changes.files_changed == ["from-b.txt"]  # what `toka diff --agent b` shows
    done = branches.apply_changes(run, "b")
    assert done.startswith("merged toka/night/b into your checkout (2 files, with the work of the dependencies "
                           "it built on); undo with: git reset --keep ")
    assert (repo / "from-a.txt").is_file() and (repo / "from-b.txt").is_file()


@pytest.mark.parametrize("kind", ["repository", "plain folder"])
def test_apply_says_how_to_take_it_back_and_that_works(tmp_path: Path, kind: str) -> None:
    """The person's edits made since stay; what the run brought goes."""
    folder = tmp_path / "work"
    if kind == "repository":
        make_repo(folder)
    else:
        folder.mkdir()
        (folder / "shared.txt").write_text(SHARED)
    run = branches.open_run(folder, folder / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    (Path(checkout.worktree) / "from-agent.txt").write_text("agent\n")
    assert branches.commit_task(checkout, run_key="night", index=1, total=1, description="write", state="completed")
    branches.finish_run(run, ["a"])
    head = git(folder, "rev-parse", "HEAD") if kind == "repository" else None

    done = branches.apply_changes(run)
    assert (folder / "from-agent.txt").read_text() == "agent\n"
    (folder / "mine.txt").write_text("written after the apply\n")
    undo = done.split("; undo with: ")[1]
    subprocess.run(undo, shell=True, cwd=folder, check=True, capture_output=True)
    assert not (folder / "from-agent.txt").exists()
    assert (folder / "mine.txt").read_text() == "written after the apply\n"
    assert (folder / "shared.txt").read_text() == SHARED
    if head is not None:
        assert git(folder, "rev-parse", "HEAD") == head


def test_apply_needing_a_merge_commit_says_why_staged_changes_stop_it(tmp_path: Path) -> None:
    repo, run = _finished_run(tmp_path, {"from-agent.txt": "agent\n"})
    (repo / "mine.txt").write_text("mine\n")
    git(repo, "add", "mine.txt")
    git(repo, "commit", "-q", "-m", "my commit since the run")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    before = checkout_state(repo)
    with pytest.raises(BranchError, match=r"needs a merge commit .* you have staged changes: staged\.txt; commit or "
                                          r"unstage them first"):
        branches.apply_changes(run)
    assert checkout_state(repo) == before


def test_an_empty_repository_or_a_gitmodules_hiding_one_does_not_stop_or_fool_the_commit(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    checkout = branches.agent_checkout(run, "a", [])
    tree = Path(checkout.worktree)
    (tree / "empty").mkdir()
    git(tree / "empty", "init", "-q")  # no commit yet: `git add -A` failed on it
    hidden = tree / "n"
    hidden.mkdir()
    git(hidden, "init", "-q")
    git(hidden, "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q", "--allow-empty", "-m", "x")
    (tree / ".gitmodules").write_text('[submodule "n"]\n\tpath = n\n\turl = https://example.invalid/x.git\n'
                                      "\tignore = all\n")
    commit = branches.commit_task(checkout, run_key="night", index=1, total=1, description="x", state="completed")
    assert commit
    modes = git(repo, "ls-tree", "-r", "--format=%(objectmode) %(path)", commit).split("\n")[:-1]
    assert modes == ["100644 .gitmodules", "100644 shared.txt"]  # no gitlink, whatever .gitmodules says
    message = git(repo, "log", "-1", "--format=%B", commit)
    assert "- empty: a git repository of its own" in message and "- n: a git repository of its own" in message


def test_a_crlf_file_in_a_workspace_without_git_is_patched_byte_for_byte(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "dos.txt").write_bytes(b"one\r\ntwo\r\n")
    run = branches.open_run(folder, folder / ".toka", "p")
    checkout = branches.agent_checkout(run, "a", [])
    (Path(checkout.root) / "dos.txt").write_bytes(b"one\r\nTWO\r\n")
    assert branches.commit_task(checkout, run_key="p", index=1, total=1, description="edit", state="completed")
    branches.finish_run(run, ["a"])
    assert branches.apply_changes(run).startswith("applied")  # the patch kept its \r: it applies
    assert (folder / "dos.txt").read_bytes() == b"one\r\nTWO\r\n"


def test_apply_killed_with_its_process_group_leaves_no_half_done_merge(tmp_path: Path) -> None:
    """`kill -9` of `toka apply`'s process group (a closed terminal) while git merged: git finishes
    on its own, so no index.lock is left and the checkout holds the whole merge."""
    repo, run = _finished_run(tmp_path, {"slow.txt": "agent\n"}, committed={".gitattributes": "*.txt filter=slow\n"})
    home, started = tmp_path / "home", tmp_path / "smudging"
    home.mkdir()
    # The person's own filter (their global configuration runs, as for their git): slow to check out.
    (home / ".gitconfig").write_text(f'[filter "slow"]\n\tsmudge = "touch {started}; sleep 1; cat"\n')
    script = (f"from pathlib import Path; from toka import branches; "
              f"print(branches.apply_changes(branches.load_run(Path({str(repo / '.toka')!r}), 'night')))")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "HOME": str(home)},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "git never checked the file out"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    lock = repo / ".git" / "index.lock"
    deadline = time.monotonic() + 30
    while lock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # a git still running would have taken the lock again by now
    assert not lock.exists(), "a half-done merge: git's index.lock is left"
    assert (repo / "slow.txt").read_text() == "agent\n"
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert branches.apply_changes(run).startswith("nothing to apply")


def test_apply_with_gits_lock_in_the_checkout_says_what_it_is_and_changes_nothing(tmp_path: Path) -> None:
    repo, run = _finished_run(tmp_path, {"from-agent.txt": "agent\n"})
    (repo / ".git" / "index.lock").write_text("")  # a git command killed midway, or one at work
    before = checkout_state(repo)
    with pytest.raises(BranchError, match=r"git's lock .*index\.lock exists: a git command is working in your "
                                          r"checkout, or one was killed midway; when none is running, remove"):
        branches.apply_changes(run)
    assert checkout_state(repo) == before
    (repo / ".git" / "index.lock").unlink()
    assert branches.apply_changes(run).startswith("merged")



def test_worktrees_a_killed_add_left_registered_and_locked_are_made_again(tmp_path: Path) -> None:
    # Killed during `git worktree add`: git keeps the worktree's record, locked, and the branch;
    # the agent's own record was not written yet; the directory is gone (tidied away).
    repo = make_repo(tmp_path / "repo")
    run = branches.open_run(repo, repo / ".toka", "night")
    first = branches.agent_checkout(run, "a", [])
    run.agent_record("a").unlink()
    reader = branches.agent_checkout(run, "reader", [], read_only=True)
    for worktree in (first.worktree, reader.worktree):
        git(repo, "worktree", "lock", "--reason", "initializing", worktree)
        shutil.rmtree(worktree)

    again = branches.agent_checkout(run, "a", [])
    assert again.worktree == first.worktree and (Path(again.worktree) / "shared.txt").read_text() == SHARED
    assert git(Path(again.worktree), "rev-parse", "HEAD").strip() == run.base
    assert json.loads(run.agent_record("a").read_text())["start"] == run.base
    shared = branches.agent_checkout(run, "reader", [], read_only=True)
    assert shared.worktree == reader.worktree and (Path(shared.worktree) / "shared.txt").read_text() == SHARED


def test_a_sigint_the_runtime_ignores_does_not_reach_the_git_committing_for_it(tmp_path: Path) -> None:
    # `toka run &` in a script ignores SIGINT, and a Ctrl-C at the terminal reaches its whole
    # process group. git, holding the index lock, handles SIGINT over the ignored one: it dropped
    # the lock, then wrote on through it and failed the agent's commit.
    import signal
    import sys

    repo = make_repo(tmp_path / "repo")
    (repo / "shared.txt").write_text("changed\n")
    child = (
        "import os, signal, sys, threading, time\n"
        "from pathlib import Path\n"
        "from toka.gitguard import run_git\n"
        "threading.Timer(0.7, lambda: os.killpg(os.getpgid(0), signal.SIGINT)).start()\n"
        # The editor holds the commit open (and the index lock taken) past the Ctrl-C.
        "done = run_git(Path(sys.argv[1]), 'commit', '-a', env={'GIT_EDITOR': 'sleep 2; echo edited >'})\n"
        "print(done.returncode, done.stderr.strip())\n"
    )
    done = subprocess.run([sys.executable, "-c", child, str(repo)], capture_output=True, text=True, timeout=60,
                          start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("0 "), done.stdout
    assert git(repo, "log", "-1", "--format=%s").strip() == "edited"


def _appending(attempts: list[int], *, fail_first: bool) -> Callable[[ModelRequest], ModelResponse]:
    """A model that adds a line to shared.txt, then submits; on the first attempt (``fail_first``)
    its results are malformed until the attempt ends (InvalidToolInputError: retried)."""

    def answer(request: ModelRequest) -> ModelResponse:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            attempts.append(1)
            return tool_call("edit_file", path="shared.txt", old_text="line 20\n", new_text="line 20\nadded\n")
        if fail_first and len(attempts) == 1:
            return tool_call("submit_result", status="not-a-status", summary="x")
        return submit(summary="added a line", files_changed=["shared.txt"])

    return answer


@pytest.mark.usefixtures("prefect_server")
def test_a_retry_that_starts_afresh_sets_the_earlier_attempts_edits_aside(tmp_path: Path) -> None:
    """Its journal dropped (malformed results), attempt 2 redid attempt 1's edit on top of it: twice."""
    repo = make_repo(tmp_path / "repo", writer("a"))
    attempts: list[int] = []
    shown = toka(repo, "--run-key", "twice", model=FunctionModel(_appending(attempts, fail_first=True)))
    assert shown.exit_code == 0, shown.output
    assert len(attempts) == 2
    assert git(repo, "show", "toka/twice/_merged:shared.txt").count("added") == 1
    log = git(repo, "log", "--format=%s", "toka/twice/a").splitlines()
    assert log == ["a: task 1/1: a step 1", "a: set aside the edits of an earlier attempt at task 1/1",
                   "a: edits of an earlier attempt at task 1/1", "start"]


def _adds_a_line_then_fails(tmp_path: Path) -> tuple[Path, list[int], list[bool], Callable[..., ModelResponse]]:
    """A repository whose one agent (one high-priority task) adds a line to shared.txt, and a model
    that fails the request after it while the returned flag holds (the run fails, its journal kept)."""
    from toka.errors import PermanentModelError

    spec = writer("a", tasks=1)
    spec["tasks"]["default"][0]["priority"] = "high"
    repo = make_repo(tmp_path / "repo", spec)
    failing = [True]
    attempts: list[int] = []
    appending = _appending(attempts, fail_first=False)

    def answer(request: ModelRequest) -> ModelResponse:
        if failing[0] and any(m.role == "assistant" for m in request.messages):
            raise PermanentModelError("the provider refused the request")
        return appending(request)

    return repo, attempts, failing, answer


@pytest.mark.usefixtures("prefect_server")
def test_a_resume_whose_journal_stops_matching_after_edits_starts_the_task_over(tmp_path: Path) -> None:
    """The spec edited between the runs: replay stopped at the first request and the task went on
    live on top of its recorded edits, which it then made again."""
    repo, attempts, broken, answer = _adds_a_line_then_fails(tmp_path)
    assert toka(repo, "--run-key", "edited", model=FunctionModel(answer)).exit_code == 1
    spec_file = repo / "specs" / "a.yaml"
    spec_file.write_text(spec_file.read_text().replace("a agent", "a renamed agent"))
    broken[0] = False
    resumed = toka(repo, "--resume", model=FunctionModel(answer))
    assert resumed.exit_code == 0, resumed.output
    assert len(attempts) == 2  # started over: the edit was asked for again...
    assert git(repo, "show", "toka/edited/_merged:shared.txt").count("added") == 1  # ...and made once


@pytest.mark.usefixtures("prefect_server")
def test_a_resume_after_a_stop_in_the_middle_of_an_edit_does_not_make_it_twice(tmp_path: Path) -> None:
    """SIGTERM while edit_file ran in its thread: the edit was made, its result never recorded;
    the resume replayed the model's request for it and made it again (the line twice, "completed")."""
    repo, attempts, stopped, answer = _adds_a_line_then_fails(tmp_path)  # the run ends, its journal kept
    assert toka(repo, "--run-key", "cut", model=FunctionModel(answer)).exit_code == 1
    # What the stop left: the edit made (set aside with the failed task, put back by the resume),
    # its journal ending before the tool's result (the process died while the thread wrote).
    (journal,) = (repo / ".toka" / "journal" / "cut" / "a").glob("*.jsonl")
    lines = journal.read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "tool"
    journal.write_text("\n".join(lines[:-1]) + "\n")
    stopped[0] = False
    resumed = toka(repo, "--resume", model=FunctionModel(answer))
    assert resumed.exit_code == 0, resumed.output
    assert len(attempts) == 2  # started over: what the cut call changed was not known
    assert git(repo, "show", "toka/cut/_merged:shared.txt").count("added") == 1


def _careful_writer(tmp_path: Path, *, fails_after_writing: bool
                    ) -> tuple[Path, list[bool], Callable[[ModelRequest], ModelResponse]]:
    """A repository whose agent's two (high-priority) tasks each write t<N>.txt, "careful" when its
    spec says so, else "plain"; task 2's model request fails while the returned flag holds (before
    it writes, or after: ``fails_after_writing``)."""
    from toka.errors import PermanentModelError

    spec = writer("a", tasks=2)
    for task in spec["tasks"]["default"]:
        task["priority"] = "high"
    repo = make_repo(tmp_path / "repo", spec)
    broken = [True]

    def answer(request: ModelRequest) -> ModelResponse:
        careful = "carefully" in (request.system or "")
        step = int(request.metadata["task"])
        wrote = any(m.role == "assistant" for m in request.messages)
        if step == 2 and broken[0] and wrote == fails_after_writing:
            raise PermanentModelError("the provider refused the request")
        if not wrote:
            return tool_call("write_file", path=f"t{step}.txt", content="careful\n" if careful else "plain\n")
        return submit(summary=f"wrote t{step}.txt")

    return repo, broken, answer


@pytest.mark.usefixtures("prefect_server")
def test_a_task_that_runs_again_after_its_spec_changed_leaves_its_new_work_on_the_branch(tmp_path: Path) -> None:
    """Resumed after the spec was edited, task 1 ran again (a new cache key) and was reported with
    its new result, but its new edits were set aside and the branch kept the old ones."""
    repo, broken, answer = _careful_writer(tmp_path, fails_after_writing=False)
    assert toka(repo, "--run-key", "again", model=FunctionModel(answer)).exit_code == 1
    assert git(repo, "show", "toka/again/a:t1.txt") == "plain\n"
    spec_file = repo / "specs" / "a.yaml"
    spec_file.write_text(spec_file.read_text().replace("a agent", "a agent that works carefully"))
    broken[0] = False
    resumed = toka(repo, "--resume", model=FunctionModel(answer))
    assert resumed.exit_code == 0, resumed.output
    assert git(repo, "show", "toka/again/_merged:t1.txt") == "careful\n"  # what the report says it did
    assert git(repo, "show", "toka/again/_merged:t2.txt") == "careful\n"
    log = git(repo, "log", "--format=%s", "toka/again/a").splitlines()
    assert log[:3] == ["a: task 2/2: a step 2", "a: task 1/2: a step 1",
                       "a: set aside the work of task 1/2 and after: it runs again"], log


@pytest.mark.usefixtures("prefect_server")
def test_a_spec_edit_undone_before_the_next_resume_leaves_the_replayed_results_work_on_the_branch(
        tmp_path: Path) -> None:
    """Edited, resumed (both tasks ran again), the edit undone, resumed: both tasks replayed their
    first results from the cache while the branch (and so `toka apply`) kept the edited spec's work.
    And the edited resume set the in-flight task 2's leftover edits aside as task 1's."""
    repo, broken, answer = _careful_writer(tmp_path, fails_after_writing=True)
    assert toka(repo, "--run-key", "undo", model=FunctionModel(answer)).exit_code == 1
    broken[0] = False
    assert toka(repo, "--resume", model=FunctionModel(answer)).exit_code == 0
    assert [git(repo, "show", f"toka/undo/_merged:t{i}.txt") for i in (1, 2)] == ["plain\n"] * 2
    # As a kill in task 2 leaves it: its edit uncommitted, its journal begun.
    worktree = repo / ".toka" / "worktrees" / "undo" / "a"
    git(repo, "worktree", "add", "-q", str(worktree), "toka/undo/a")  # the finished run removed it
    (worktree / "t2.txt").write_text("half\n")
    journal = repo / ".toka" / "journal" / "undo" / "a" / "2.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text('{"kind":"response"}\n')
    spec_file = repo / "specs" / "a.yaml"
    plain = spec_file.read_text()
    spec_file.write_text(plain.replace("a agent", "a agent that works carefully"))
    edited = toka(repo, "--resume", model=FunctionModel(answer))
    assert edited.exit_code == 0, edited.output
    assert [git(repo, "show", f"toka/undo/_merged:t{i}.txt") for i in (1, 2)] == ["careful\n"] * 2
    # On the terminal, as it happens.
    assert "a: task 2/2's uncommitted edits set aside" in edited.output
    assert "a: task 1/2 runs again (its spec, settings or an earlier task's result changed): its earlier work and the later " \
           "tasks' set aside" in edited.output
    assert git(repo, "show", "--format=%s", "--name-only", "toka/undo/a~4").split() == [
        "a:", "edits", "of", "an", "earlier", "attempt", "at", "task", "2/2", "t2.txt"]
    spec_file.write_text(plain)  # the edit undone
    undone = toka(repo, "--resume", model=FunctionModel(answer))
    assert undone.exit_code == 0, undone.output
    assert "2 tasks replayed from cache" in undone.output
    assert [git(repo, "show", f"toka/undo/_merged:t{i}.txt") for i in (1, 2)] == ["plain\n"] * 2
    assert "a: task 1/2: replayed from the cache; its work (" in undone.output
    # Restored from the history, where both versions' work stays.
    bodies = git(repo, "log", "-2", "--format=%B%x00", "toka/undo/a").split("\0")
    assert all("Restored from" in body for body in bodies[:2]), bodies


def probe_output(workspace: Path, script: str, *, run_key: str) -> str:
    """What the shell ``script``, run by an agent in its worktree of ``workspace``, printed."""
    outputs: list[str] = []

    def answer(request: ModelRequest) -> ModelResponse:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            return tool_call("write_file", path="probe.sh", content=script + "\n")
        if turn == 1:
            return tool_call("run_command", argv=["sh", "probe.sh"])
        outputs.append(last_tool_output(request))
        return submit(summary="looked around")

    shown = toka(workspace, "--run-key", run_key, model=FunctionModel(answer))
    assert shown.exit_code == 0, shown.output
    (seen,) = outputs
    return seen


@pytest.mark.skipif(not __import__("toka.sandbox").sandbox.detect_host().mountns,
                    reason="needs a mount namespace (unshare -m)")
@pytest.mark.parametrize("on_path", ["", "bin", "node_modules/.bin"], ids=["plain", "bin-on-PATH", "npm-bin-on-PATH"])
@pytest.mark.usefixtures("prefect_server")
def test_a_sandboxed_command_in_a_worktree_reads_nothing_of_the_persons_checkout(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, on_path: str
) -> None:
    """Only homes and /tmp-like places (fresh in the sandbox) were hidden: from a checkout elsewhere
    (here /opt), a command read the person's .env, their uncommitted files and the run's state.
    With the checkout's `bin` on the runtime's PATH, its parent (the checkout) was kept visible."""
    import tempfile

    if not os.access("/opt", os.W_OK):
        pytest.skip("needs a writable directory outside /tmp and the homes (/opt)")
    tmp_path = Path(tempfile.mkdtemp(dir="/opt", prefix="toka-test-"))
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    spec = writer("a")
    spec["security"]["capabilities_required"].append("script-execution")
    repo = make_repo(tmp_path / "repo", spec)
    (repo / ".env").write_text("TOKEN=person-secret\n")
    (repo / "draft.txt").write_text("uncommitted draft\n")
    (repo / "node_modules").mkdir()
    (repo / "node_modules" / ".env.local").write_text("TOKEN=person-secret\n")
    if on_path:
        (repo / on_path).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("PATH", f"{repo / on_path}{os.pathsep}{os.environ['PATH']}")
    probe = (f"for f in {repo}/.env {repo}/draft.txt {repo}/.toka/runs/last.json {repo}/node_modules/.env.local; do "
             "cat $f 2>/dev/null && echo READ $f; done; ls -A " + str(repo) + "; cat shared.txt | head -1")
    seen = probe_output(repo, probe, run_key="peek")
    assert "line 1" in seen, seen  # the worktree itself is there
    assert "READ" not in seen and "person-secret" not in seen and "uncommitted draft" not in seen, seen


@pytest.mark.usefixtures("prefect_server")
def test_a_tasks_files_touched_holds_what_its_tools_wrote_not_only_what_it_reported(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", writer("a"))

    def answer(request: ModelRequest) -> ModelResponse:
        if not any(m.role == "assistant" for m in request.messages):
            return tool_call("write_file", path="notes.md", content="notes\n")
        return submit(summary="wrote notes")  # and did not say so

    shown = toka(repo, "--run-key", "touched", "--json", str(tmp_path / "out.json"), model=FunctionModel(answer))
    assert shown.exit_code == 0, shown.output
    (task,) = json.loads((tmp_path / "out.json").read_text())["agents"][0]["tasks"]
    assert "notes.md" in task["files_touched"]


@pytest.mark.skipif(not __import__("toka.sandbox").sandbox.detect_host().mountns,
                    reason="needs a mount namespace (unshare -m)")
@pytest.mark.parametrize("sub", ["", "app"], ids=["repository-top", "subdirectory"])
@pytest.mark.usefixtures("prefect_server")
def test_git_works_in_a_sandboxed_worktree_and_shows_no_credential_or_checkout(
    sub: str, request: pytest.FixtureRequest
) -> None:
    """A run on a repository's subdirectory: git in the worktree failed ("not a git repository"),
    and the checkout and the remote's token stayed readable."""
    import tempfile

    if not os.access("/opt", os.W_OK):
        pytest.skip("needs a writable directory outside /tmp and the homes (/opt)")
    base = Path(tempfile.mkdtemp(dir="/opt", prefix="toka-test-"))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    repo = base / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "P")
    git(repo, "config", "user.email", "p@example.com")
    git(repo, "remote", "add", "origin", "https://x-access-token:SECRETTOKEN@github.com/o/r.git")
    ws = repo / sub if sub else repo
    ws.mkdir(exist_ok=True)
    (ws / "shared.txt").write_text("line 1\n")
    (repo / "top.env").write_text("TOPSECRET\n")
    spec = writer("a")
    spec["security"]["capabilities_required"].append("script-execution")
    (ws / "specs").mkdir()
    (ws / "specs" / "a.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "start")
    (repo / "draft.txt").write_text("DRAFT\n")
    # The person's stash and staged files: in the repository's git directory, which stays visible.
    (ws / "shared.txt").write_text("STASHEDWIP\n")
    git(repo, "stash", "-q")
    git(repo, "pack-refs", "--all")  # as `git gc` does: the stash a line of packed-refs
    (repo / "staged.env").write_text("STAGEDKEY\n")
    git(repo, "add", "staged.env")
    probe = ("git branch --show-current; git status --short | head -5; "
             f"cat {repo}/top.env {repo}/draft.txt; cat {repo}/.git/config | rev; "
             "git stash show -p 2>&1 | rev; git log --all --oneline >/dev/null && echo LOGALL; "
             f"for b in $(GIT_INDEX_FILE={repo}/.git/index git ls-files -s | cut -d' ' -f2); do "
             "git cat-file -p $b | rev; done; echo END\n")
    seen = probe_output(ws, probe, run_key="peek")
    assert "toka/peek/a" in seen and "END" in seen and "LOGALL" in seen, seen  # git works in the worktree
    assert "NEKOTTERCES" not in seen and "TOPSECRET" not in seen and "DRAFT" not in seen, seen
    assert "PIWDEHSATS" not in seen and "YEKDEGATS" not in seen, seen
