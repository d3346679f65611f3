"""Agents' worktrees made at once, and read-only agents sharing one (toka/branches.py)."""

from __future__ import annotations

import threading
from pathlib import Path

from toka import branches
from toka.capabilities import changes_files, use_tools
from toka.tools import ReadFile

from .test_branches import git, make_repo


def _open(tmp_path: Path) -> branches.RunBranches:
    repo = make_repo(tmp_path / "repo")
    return branches.open_run(repo, repo / ".toka", "night")


def test_sixteen_agents_get_their_worktrees_at_the_same_moment(tmp_path: Path) -> None:
    # `git worktree add` reads the other worktrees' files while another add writes them:
    # unserialised, some of sixteen concurrent adds failed.
    run = _open(tmp_path)
    made: dict[str, branches.AgentCheckout] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def checkout(agent: str) -> None:
        start.wait()
        try:
            made[agent] = branches.agent_checkout(run, agent, [])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=checkout, args=(f"agent-{i:02d}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for agent, checkout in made.items():
        assert git(Path(checkout.worktree), "rev-parse", "--abbrev-ref", "HEAD").strip() == f"toka/night/{agent}"
        assert (Path(checkout.worktree) / "shared.txt").is_file()


def test_read_only_agents_share_one_worktree_and_their_branches_stay_at_their_start(tmp_path: Path) -> None:
    run = _open(tmp_path)
    a = branches.agent_checkout(run, "reader-a", [], read_only=True)
    b = branches.agent_checkout(run, "reader-b", [], read_only=True)
    assert a.shared and b.shared and a.worktree == b.worktree
    assert (Path(a.worktree) / "shared.txt").read_text() == (Path(run.repo) / "shared.txt").read_text()
    assert git(Path(run.repo), "rev-parse", "toka/night/reader-a", "toka/night/reader-b").split() == [run.base] * 2
    assert branches.commit_task(a, run_key="night", index=1, total=1, description="read", state="completed") is None

    # A writer's work moves the next reader's start: a reader that depends on it reads it.
    w = branches.agent_checkout(run, "writer", [])
    (Path(w.worktree) / "shared.txt").write_text("changed\n")
    assert branches.commit_task(w, run_key="night", index=1, total=1, description="write", state="completed")
    c = branches.agent_checkout(run, "reader-c", ["writer"], read_only=True)
    assert c.worktree != a.worktree and (Path(c.worktree) / "shared.txt").read_text() == "changed\n"

    # A resume finds the readers where they were; the run's end removes the shared worktrees.
    assert branches.agent_checkout(run, "reader-a", [], read_only=True) == a
    changes = branches.finish_run(run, ["reader-a", "reader-b", "writer", "reader-c"])
    assert changes.files_changed == ["shared.txt"]
    assert not Path(a.worktree).exists() and not Path(c.worktree).exists()
    assert "_read-" not in git(Path(run.repo), "worktree", "list")


def test_only_agents_without_a_tool_that_changes_files_are_read_only() -> None:
    assert not changes_files([])
    assert not changes_files(["filesystem-read", "network-access", "some-declared-permission"])
    assert changes_files(["filesystem-read", "filesystem-write"])
    assert changes_files(["python-test-execution"])

    class Lookup(ReadFile):
        name = "lookup"
        capability = "lookup-access"

    with use_tools(Lookup()):  # an added tool may do anything
        assert changes_files(["lookup-access"])
    assert not changes_files(["lookup-access"])


def test_a_dependent_resumed_after_its_dependency_ran_again_starts_again_from_its_new_work(tmp_path: Path) -> None:
    """alpha -> beta ran to the end; alpha's spec edited; the resume ran both again, beta in its old
    worktree on alpha's old work (while its prompt held alpha's new results), and `toka apply
    --agent beta` applied alpha's superseded work. A dependent whose tasks all replay from the cache
    stayed on it too."""
    run = _open(tmp_path)

    def task(checkout: branches.AgentCheckout, name: str, text: str, state: str = "completed") -> str | None:
        if text:
            (Path(checkout.worktree) / name).write_text(text)
        return branches.commit_task(checkout, run_key="night", index=1, total=1, description="t", state=state,
                                    key=f"k-{name}")

    alpha = branches.agent_checkout(run, "alpha", [])
    task(alpha, "alpha.txt", "old\n")
    beta = branches.agent_checkout(run, "beta", ["alpha"])
    reader = branches.agent_checkout(run, "reader", ["alpha"], read_only=True)
    task(beta, "beta.txt", "beta's\n")
    (Path(beta.worktree) / "half.txt").write_text("a later task's, in flight\n")
    again = branches.agent_checkout(run, "beta", ["alpha"], tasks=1)
    assert again.reused and not again.restarted  # alpha has not moved
    alpha = branches.agent_checkout(run, "alpha", [])  # the resume: alpha runs again
    assert branches.set_aside_from_task(alpha, run_key="night", index=1, total=1)
    assert task(alpha, "alpha.txt", "new\n")
    beta = branches.agent_checkout(run, "beta", ["alpha"], tasks=1)
    assert beta.restarted and (Path(beta.worktree) / "alpha.txt").read_text() == "new\n"
    assert beta.start_tree and again.start_tree and beta.start_tree != again.start_tree  # its tasks' cache keys
    assert not (Path(beta.worktree) / "beta.txt").exists() and not (Path(beta.worktree) / "half.txt").exists()
    assert task(beta, "beta.txt", "", state="cached")  # replayed: its work comes back, on alpha's new work
    assert git(Path(run.repo), "show", "toka/night/beta:beta.txt") == "beta's\n"
    assert git(Path(run.repo), "show", "toka/night/beta:alpha.txt") == "new\n"
    changes = branches.agent_changes(run, "beta")
    assert changes is not None and changes.files_changed == ["beta.txt"]  # its own, against its new start
    assert branches.agent_checkout(run, "beta", ["alpha"], tasks=1).restarted is None  # once
    # A read-only dependent, on the resume, reads alpha's work as it is now.
    reread = branches.agent_checkout(run, "reader", ["alpha"], read_only=True)
    assert reread.start != reader.start and (Path(reread.worktree) / "alpha.txt").read_text() == "new\n"
