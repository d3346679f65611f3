"""Agents change a repository only through git branches; the person's checkout is never touched.

When the workspace is in a git repository, every agent of a run works in its own
git worktree under ``.toka/worktrees/<run>/<agent>``, on the branch
``toka/<run>/<agent>``:

* it starts from the run's base (``HEAD`` when the run started, or ``--base
  REF``), or from the merge of the branches of the dependencies that ran before
  it (in plan order); a merge that conflicts keeps the agent from running;
* after each task the agent's changes are committed on its branch; a task that
  failed for good leaves its edits in a commit marked as failed, followed by a
  commit that sets them aside, so the next task starts clean and nothing is lost;
* when the run ends, ``toka/<run>/_merged`` merges every completed agent's branch.
  (Not ``toka/<run>`` itself: git cannot hold that branch next to branches
  under ``toka/<run>/``.)

Nothing here changes the person's working tree, index, ``HEAD`` or stash: new
branches are refs, worktrees live in the state directory (ignored by git through
its own ``.gitignore``), merges are computed with ``git merge-tree`` and written
with ``git commit-tree``, without a checkout. Uncommitted and untracked files
reach the agents only with ``--include-uncommitted``, which snapshots them into
a base commit through a private index file.

A workspace that is not in a git repository is copied once into
``.toka/copies/<run>`` and made a repository there; the agents branch from
that, and the run ends with a patch (``.toka/patches/<run>.patch``) that
``toka apply`` applies to the workspace.

Every git command goes through :func:`toka.gitguard.run_git`: hooks, and the filters and
other programs the repository's configuration names, never run.
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .audit import AuditLog, audit_path, run_file_name
from .errors import BranchError, ConfigError, MergeConflictError
from .gitguard import git_dirs, run_git
from .journal import journal_dir
from .process import as_text

__all__ = [
    "AgentChanges",
    "AgentCheckout",
    "Discarded",
    "RunBranches",
    "RunChanges",
    "agent_checkout",
    "agent_changes",
    "commit_task",
    "discard_run",
    "finish_run",
    "open_run",
    "tidy_worktrees",
]

#: The run's own branch, next to its agents' ones (an agent name never starts with "_").
MERGED = "_merged"
#: How much of a diff an agent's report shows.
DIFF_LIMIT = 60_000


def ref_part(text: str) -> str:
    """``text`` as one component of a branch name (git's check-ref-format rules)."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    part = re.sub(r"\.{2,}", ".", part).strip(".-")
    part = part.removesuffix(".lock")
    return part or "run"


def _identity(who: str) -> dict[str, str]:
    name, email = f"toka {who}", f"{who}@toka.invalid"
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
         timeout: float = 600.0) -> str:
    """stdout of the runtime's git command in ``repo``.

    Raises:
        BranchError: it failed (``check``), with git's own words.
    """
    try:
        done = run_git(repo, *args, env=env, timeout=timeout)
    except FileNotFoundError:
        raise ConfigError("git is not installed: agents work on branches when git is there "
                          "(or pass --in-place to let them edit the workspace directly)") from None
    if check and done.returncode != 0:
        said = [line.strip() for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        # The line naming a lock file, which git's last line ("remove the file manually") does not.
        lock = next((line for line in said[:-1] if ".lock'" in line), None)
        last = said[-1] if said else f"exit {done.returncode}"
        raise BranchError(f"git {args[0]} failed in {repo}: {f'{lock} ' if lock else ''}{last}")
    return done.stdout


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunBranches:
    """Where a run's branches live and what they start from; kept in ``.toka/branches/<run>.json``."""

    run_key: str
    workspace: str
    state_dir: str
    repo: str
    """The top of the repository holding the branches: the workspace's, or the private copy."""
    prefix: str
    """The workspace's place inside ``repo`` ('' at its top)."""
    base: str
    """The commit every agent without dependencies starts from."""
    base_ref: str
    private_copy: bool = False

    @property
    def run_dir(self) -> str:
        return run_file_name(self.run_key)

    @property
    def merged_branch(self) -> str:
        return f"toka/{ref_part(self.run_key)}/{MERGED}"

    def branch(self, agent: str) -> str:
        return f"toka/{ref_part(self.run_key)}/{agent}"

    @property
    def worktrees(self) -> Path:
        """Where the run's worktrees are."""
        return Path(self.state_dir) / "worktrees" / self.run_dir

    def worktree(self, agent: str) -> Path:
        return self.worktrees / agent

    def shared_worktree(self, start: str) -> Path:
        """Read-only agents' worktree at ``start`` (agent names never start with ``_``)."""
        return self.worktrees / f"_read-{start[:12]}"

    def patch_path(self) -> Path:
        return Path(self.state_dir) / "patches" / f"{self.run_dir}.patch"

    @property
    def record_path(self) -> Path:
        return record_path(Path(self.state_dir), self.run_key)

    def agent_record(self, agent: str) -> Path:
        return Path(self.state_dir) / "branches" / self.run_dir / f"{agent}.json"


def record_path(state_dir: Path, run_key: str) -> Path:
    return state_dir / "branches" / f"{run_file_name(run_key)}.json"


def _discarded_path(state_dir: Path, run_key: str) -> Path:
    return state_dir / "branches" / "discarded" / run_file_name(run_key)


def refuse_discarded(state_dir: Path, run_key: str) -> None:
    """Stop a run under the key of a discarded one.

    Prefect's cache still holds that run's finished tasks: run again, they would be replayed,
    and their changes, gone with its branches, reported as made.

    Raises:
        ConfigError: run ``run_key`` was discarded here.
    """
    if _discarded_path(state_dir, run_key).exists():
        raise ConfigError(f"run {run_key} was discarded (`toka discard`): under its key, its finished tasks "
                          "would be replayed from Prefect's cache without their changes; start a new run "
                          "(without --run-key, or with another key)")


def runs_with_branches(state_dir: Path) -> list[tuple[float, str]]:
    """The runs whose branches are recorded in ``state_dir``, newest record first: (its time, run key).

    Every run writes its record there, from ``toka run`` or from a deployment's flow run (which
    ``.toka/runs/last.json``, the command line's own record, does not know of).
    """
    found = []
    for path in (state_dir / "branches").glob("*.json"):
        try:
            found.append((path.stat().st_mtime, str(json.loads(path.read_text(encoding="utf-8"))["run_key"])))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # half-written or foreign: load_run names the problem when it is asked for
    return sorted(found, reverse=True)


def load_run(state_dir: Path, run_key: str) -> RunBranches:
    """The branches of run ``run_key``.

    Raises:
        BranchError: the run made none here (an in-place run, or another workspace).
    """
    try:
        return RunBranches(**json.loads(record_path(state_dir, run_key).read_text(encoding="utf-8")))
    except FileNotFoundError:
        others = [key for _, key in runs_with_branches(state_dir)]
        hint = f"; runs with branches here, newest first: {', '.join(others[:5])} (choose one with --run KEY)" \
            if others else ""
        raise BranchError(f"run {run_key!r} has no branches in {state_dir} (it ran --in-place, "
                          f"or elsewhere, or its branches were discarded){hint}") from None
    except (ValueError, TypeError) as e:
        raise BranchError(f"{record_path(state_dir, run_key)} is unreadable: {e}") from None


def open_run(workspace: Path, state_dir: Path, run_key: str, *, base: str = "HEAD",
             include_uncommitted: bool = False) -> RunBranches:
    """The run's branches: made now, or (on a resume) as the run first made them.

    Raises:
        ConfigError: ``base`` names no commit, or git cannot do this here.
        BranchError: git failed.
    """
    workspace, state_dir = workspace.resolve(), state_dir.resolve()
    refuse_discarded(state_dir, run_key)  # first: a discard cut short leaves the run's record
    try:
        found = load_run(state_dir, run_key)
        if Path(found.repo).is_dir():
            return found
    except BranchError:
        pass
    # The run starts with this: for a workspace in a repository, three git processes (two once
    # git's version is known) where there were five.
    top, common = _repository_of(workspace)
    resolved = None
    if top is not None:
        resolved = run_git(top, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}")
        if resolved.returncode != 0 and base == "HEAD":
            top = None  # a repository without a commit yet: its files are all untracked, so work on a copy
    if top is None or resolved is None:
        repo, prefix, private = _private_copy(workspace, state_dir, run_key), "", True
        base_commit = _git(repo, "rev-parse", "HEAD").strip()
    else:
        repo, prefix, private = top, workspace.relative_to(top).as_posix().strip("."), False
        _check_merge_tree(repo)
        if resolved.returncode != 0:
            raise ConfigError(f"--base {base!r}: no such commit in {repo}")
        base_commit = resolved.stdout.strip()
        if include_uncommitted:
            base_commit = _snapshot_uncommitted(repo, base_commit, state_dir, run_key)
        if prefix and run_git(repo, "cat-file", "-e", f"{base_commit}:{prefix}").returncode != 0:
            # Else each agent's worktree lacks it, and every task fails ("not a directory").
            how = "" if include_uncommitted else ", or pass --include-uncommitted"
            raise ConfigError(f"the workspace {prefix}/ is not in the commit the agents start from ({base}: "
                              f"{base_commit[:12]}), so their worktrees would not have it: commit it{how}")
        # Made now, before any agent runs a command: the git guard compares this directory
        # before and after each command, and another agent's worktree must not look like one.
        if common is None:
            common = Path(_git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir").strip())
        (common / "worktrees").mkdir(exist_ok=True)
    branches = RunBranches(run_key=run_key, workspace=str(workspace), state_dir=str(state_dir), repo=str(repo),
                           prefix=prefix, base=base_commit, base_ref=base, private_copy=private)
    _write_json(branches.record_path, asdict(branches))
    return branches


def in_git_repository(workspace: Path) -> bool:
    """Whether the agents' branches will be in the workspace's own repository (else in a private copy)."""
    return _toplevel(workspace) is not None


def _toplevel(workspace: Path) -> Path | None:
    try:
        done = run_git(workspace, "rev-parse", "--show-toplevel")
    except FileNotFoundError:
        return None
    if done.returncode != 0:
        return None
    return Path(done.stdout.strip()).resolve()


def _repository_of(workspace: Path) -> tuple[Path | None, Path | None]:
    """The top of the workspace's repository and its common git directory, asked of one git
    process: (None, None) outside a repository; the common directory None from a git that does
    not know ``--path-format`` (it says the option back), to be asked for on its own."""
    try:
        done = run_git(workspace, "rev-parse", "--show-toplevel", "--path-format=absolute", "--git-common-dir")
    except FileNotFoundError:
        return None, None
    lines = done.stdout.splitlines()
    if done.returncode != 0:
        return None, None
    if len(lines) != 2:
        return _toplevel(workspace), None
    return Path(lines[0]).resolve(), Path(lines[1])


_merge_tree_known = False  # git was new enough: not asked again in this process (a worker, the warm process)


def _check_merge_tree(repo: Path) -> None:
    global _merge_tree_known
    if _merge_tree_known:
        return
    version = _git(repo, "version").split()[-1]
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < (2, 38):
        raise ConfigError(f"git {version} is too old for agent branches (2.38 or newer merges without a "
                          "checkout); upgrade git, or pass --in-place")
    _merge_tree_known = True


def _snapshot_uncommitted(repo: Path, head: str, state_dir: Path, run_key: str) -> str:
    """A commit of the working tree as it is (tracked changes and untracked files, ignored ones
    left out), made through a private index: the person's own index is not touched."""
    index = state_dir / "tmp" / f"index-{run_file_name(run_key)}-{uuid.uuid4().hex[:8]}"
    index.parent.mkdir(parents=True, exist_ok=True)
    env = {"GIT_INDEX_FILE": str(index), **_identity("run")}
    try:
        _git(repo, "read-tree", head, env=env)
        _git(repo, "add", "-A", "--", ".", env=env)
        tree = _git(repo, "write-tree", env=env).strip()
        if tree == _git(repo, "rev-parse", f"{head}^{{tree}}").strip():
            return head
        return _git(repo, "commit-tree", tree, "-p", head, "-m",
                    f"toka: uncommitted work at the start of run {run_key}", env=env).strip()
    finally:
        index.unlink(missing_ok=True)


def _private_copy(workspace: Path, state_dir: Path, run_key: str) -> Path:
    """A copy of the workspace (its state directory left out) as a new repository with one commit."""
    copy = state_dir / "copies" / run_file_name(run_key)
    if not (copy / ".git").is_dir():
        # Made aside and put in place whole: killed between `git init` and the first commit, a
        # copy without a commit failed every resume ("git rev-parse failed").
        partial = copy.with_name(copy.name + ".partial")
        for leftover in (copy, partial):
            if leftover.exists():
                shutil.rmtree(leftover)
        skip = state_dir.resolve()

        def ignore(directory: str, names: list[str]) -> list[str]:
            return [n for n in names if Path(directory, n).resolve() == skip]

        shutil.copytree(workspace, partial, symlinks=True, ignore=ignore)
        _git(partial, "init", "-q")
        _git(partial, "add", "-A")
        _git(partial, "commit", "-q", "--allow-empty", "-m", f"toka: the workspace at the start of run {run_key}",
             env=_identity("run"))
        partial.rename(copy)
    return copy


# -- one agent -------------------------------------------------------------------------------


class AgentCheckout(BaseModel):
    """An agent's worktree: ``root`` is where its workspace is (the worktree, or the workspace's
    place inside it). Plain data: it travels in the run settings to the agent's flow."""

    model_config = ConfigDict(frozen=True)

    agent: str
    worktree: str
    root: str
    branch: str
    start: str
    shared: bool = False
    """A read-only agent's: one worktree per start commit, shared, never committed to."""
    reused: bool = False
    """Found as an earlier process of the run left it (a resume): it may hold a task's edits."""
    remade: bool = False
    """Made again for an agent the run had begun (its worktree removed: by hand, by a discard cut
    short): a task's uncommitted edits are not in it."""
    restarted: str | None = None
    """The commit that started it again from its dependencies' new work (:func:`_start_again`)."""
    start_tree: str = ""
    """The tree of ``start`` when it holds dependencies' work ('' when it is the run's base): part
    of its tasks' cache keys. Their work was made on those files: when the dependencies' files
    change while their results read the same, a task replayed would bring its old work onto
    files it never saw (restored on their new work, or left on their superseded one)."""


def agent_checkout(run: RunBranches, agent: str, deps: list[str], *, read_only: bool = False,
                   tasks: int = 0) -> AgentCheckout:
    """The agent's worktree on its branch, made from the base or its dependencies' merged work.

    ``deps``: the dependencies whose work it starts from, in plan order. A worktree that
    exists already (a resumed run) is used as it is, unless their branches moved since (they ran
    again): then the agent starts again from their work as it is now (:func:`_start_again`;
    ``tasks``, how many it has, names them there). A ``read_only`` agent (no tool of it can
    change a file) reads a worktree shared by every such agent with the same start, detached
    at it; its branch is made at that start, where it stays.

    Raises:
        MergeConflictError: the dependencies' branches conflict; the agent cannot start.
        BranchError: git failed.
    """
    repo, branch = Path(run.repo), run.branch(agent)
    record = run.agent_record(agent)
    recorded = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    own = None if recorded is None or recorded.get("shared") else recorded  # its own worktree's record
    if read_only:
        start = recorded["start"] if recorded else _start_of(run, agent, deps)
        if recorded and not _holds_dependencies(run, recorded.get("deps") or [], start):
            # A resume after its dependencies ran again (a spec edit): it reads their work as it is now.
            start, recorded = _start_of(run, agent, deps), None
        path = run.shared_worktree(start)
        with _worktrees_locked(run):
            if not (path / ".git").exists():
                _add_worktree(run, path, "--detach", str(path), start)
        _git(repo, "update-ref", f"refs/heads/{branch}", start)
        if recorded is None:
            _write_json(record, {"start": start, "deps": deps, "shared": True})
        return AgentCheckout(agent=agent, worktree=str(path), root=str(path / run.prefix), branch=branch,
                             start=start, shared=True, start_tree=_tree_of(repo, start, deps))
    path = run.worktree(agent)
    if (path / ".git").exists() and own is not None:
        _drop_stale_locks(path, branch)
        return _at_start(run, AgentCheckout(agent=agent, worktree=str(path), root=str(path / run.prefix),
                                             branch=branch, start=own["start"], reused=True), deps, tasks)
    exists = own is not None and run_git(repo, "rev-parse", "--verify", "--quiet",
                                         f"refs/heads/{branch}").returncode == 0
    if exists:
        # The branch is there (its worktree was removed): go on with it.
        start = own["start"]
        with _worktrees_locked(run):
            _add_worktree(run, path, str(path), branch)
    else:
        # Without a record the branch holds no work of the agent (its tasks commit only after the
        # record is written): -B makes it, or makes again at its start one a run killed before
        # the record left, with no git process to ask first. With one, -b: its branch was lost,
        # and git refuses rather than reset one it has after all.
        start = _start_of(run, agent, deps)
        with _worktrees_locked(run):
            _add_worktree(run, path, "-B" if own is None else "-b", branch, str(path), start)
        _write_json(record, {"start": start, "deps": deps})
    made = AgentCheckout(agent=agent, worktree=str(path), root=str(path / run.prefix), branch=branch, start=start,
                         remade=own is not None)
    # A branch found (its worktree made again) may have started from its dependencies' old work too.
    return _at_start(run, made, deps, tasks) if exists else made.model_copy(
        update={"start_tree": _tree_of(repo, start, deps)})


def _at_start(run: RunBranches, found: AgentCheckout, deps: list[str], tasks: int) -> AgentCheckout:
    """An agent's branch a resume found: started again from its dependencies' work when that moved
    since (:func:`_start_again`), else as it is; with its ``start_tree`` either way."""
    repo = Path(run.repo)
    if deps and not _holds_dependencies(run, deps, _head(repo, found.branch)):
        return _start_again(run, found, deps, tasks)
    return found.model_copy(update={"start_tree": _tree_of(repo, found.start, deps)})


def _tree_of(repo: Path, start: str, deps: list[str]) -> str:
    """The tree of an agent's ``start`` when it holds the work of ``deps`` (one git process an agent
    with dependencies); '' without them: the run's base, the same for the whole run."""
    return _git(repo, "rev-parse", f"{start}^{{tree}}").strip() if deps else ""


def _drop_journals(directory: Path) -> int | None:
    """Remove the task journals in ``directory`` (an agent's: their turns' effects are being set
    aside, and replayed they would be missing); return the highest task number among them, the
    task in flight when the run stopped (None: there were none). Removed before the set-aside,
    so that a kill in between leaves none."""
    found = [path for path in directory.glob("*.jsonl") if path.stem.isdigit()]
    for path in found:
        path.unlink(missing_ok=True)
    return max((int(path.stem) for path in found), default=None)


def _holds_dependencies(run: RunBranches, deps: list[str], commit: str) -> bool:
    """Whether ``commit`` holds the work of ``deps`` as their branches have it now."""
    repo = Path(run.repo)
    return all(_is_ancestor(repo, head, commit) for head in _heads(repo, [run.branch(d) for d in deps]))


def _start_again(run: RunBranches, checkout: AgentCheckout, deps: list[str], tasks: int) -> AgentCheckout:
    """The agent's branch, found by a resume, started from its dependencies' work as it was; they
    ran again since (their spec was edited, or undone): it starts again from their work as it is
    now, as a fresh run would. One commit on its branch takes its tree to theirs (its second parent)
    and says its own work is set aside (``Toka-Ran-Again: 1``): each of its tasks the resume
    replays from the cache gets its work back from the history (:func:`commit_task`), each that
    runs again starts from theirs. Uncommitted edits are set aside first, and its journals go (their
    tools' effects are set aside with them). Returns the checkout at its new start.

    Else it kept working, and ``toka apply --agent`` applied, on their superseded work while its
    prompt held their new results; and an agent whose tasks were all replayed stayed on it."""
    worktree, total = Path(checkout.worktree), str(tasks or "?")
    in_flight = _drop_journals(journal_dir(Path(run.state_dir), run.run_key) / checkout.agent)
    set_aside_edits(checkout, run_key=run.run_key, index=in_flight or 1, total=total,
                    why=f"The work of {', '.join(deps)} changed since the agent started; it starts again from it.")
    start = _start_of(run, checkout.agent, deps)
    _git(worktree, "read-tree", "-u", "--reset", start)
    tree = _git(worktree, "write-tree").strip()
    message = (f"{checkout.agent}: start again from the work of {', '.join(deps)} as it is now\n\n"
               f"{'They' if len(deps) > 1 else 'It'} ran again since {checkout.start[:12]}, where this branch started: "
               f"the agent's own work is set aside; a task replayed from the cache gets its work back.\n\n"
               f"Toka-Run: {run.run_key}\nToka-Agent: {checkout.agent}\n{_RAN_AGAIN}: 1/{total}\n")
    commit = _git(worktree, "commit-tree", tree, "-p", "HEAD", "-p", start, "-m", message,
                  env=_identity(checkout.agent)).strip()
    # The record first: killed before the branch moves, the next resume starts again anew; after
    # it, with the record's old start, the agent's changes would count its dependencies' as its own.
    record = run.agent_record(checkout.agent)
    _write_json(record, {**json.loads(record.read_text(encoding="utf-8")), "start": start, "deps": deps})
    _git(worktree, "update-ref", "HEAD", commit)
    return checkout.model_copy(update={"start": start, "restarted": commit, "start_tree": tree})


def _start_of(run: RunBranches, agent: str, deps: list[str]) -> str:
    repo = Path(run.repo)
    return _merged(repo, run.base, list(zip(deps, _heads(repo, [run.branch(d) for d in deps]), strict=True)),
                   message=f"toka: {agent} starts from the work of {', '.join(deps)}", who=agent)


@contextmanager
def _worktrees_locked(run: RunBranches) -> Iterator[None]:
    """One ``git worktree`` command at a time in the run's repository, across threads and processes.

    ``git worktree add`` reads every other worktree's administrative files, and fails on one
    another ``add`` is writing ("failed to read .git/worktrees/NAME/commondir"): 3 of 16
    concurrent adds failed here, and one of 50 agents in bench/many_agents.py.
    """
    lock = Path(run.state_dir) / "branches" / "worktrees.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when closed
        yield


def _add_worktree(run: RunBranches, path: Path, *args: str) -> None:
    """``git worktree add`` at ``path`` (under :func:`_worktrees_locked`), over whatever a killed
    run left there."""
    repo = Path(run.repo)
    if not path.exists():
        try:
            _git(repo, "worktree", "add", "-q", *args)
            return
        except BranchError:
            # Git may still have a record of a worktree there whose directory is gone (a killed
            # run, a person's rm -r): "missing but already registered", "missing but locked", or
            # its branch "already checked out at" it. Looked for only after a refusal, then the
            # add is tried once more (a refusal for another reason is raised by that try, in
            # git's words): listing the worktrees is a git process of its own, on every agent's
            # start, under the lock the other agents wait for.
            pass
    if path.exists():  # a killed run's, or what the refused add left
        shutil.rmtree(path)
    _forget_missing_worktrees(repo, path)  # the removed directory's administrative files
    _git(repo, "worktree", "add", "-q", *args)


def _forget_missing_worktrees(repo: Path, under: Path) -> None:
    """Drop git's records of the worktrees under ``under`` whose directories are gone. Not
    ``git worktree prune``: that forgets every missing worktree of the repository, the person's
    own on a drive not mounted just now too (with what they had staged there)."""
    under = under.resolve()
    for path in _worktrees_of(repo):
        if path.resolve().is_relative_to(under) and not path.exists():
            # Twice: a `worktree add` killed midway leaves its worktree locked.
            _git(repo, "worktree", "remove", "--force", "--force", str(path))


def _worktrees_of(repo: Path) -> list[Path]:
    """Every worktree git has a record of in ``repo`` (the main one first), there or not."""
    return [Path(line.removeprefix("worktree ")) for line in _git(repo, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")]


def _drop_stale_locks(worktree: Path, branch: str) -> None:
    """The locks a git command killed midway (a ``kill -9`` during a task's commit) left: the
    worktree's index and HEAD, its branch's ref. No git command of this run is running there
    now, and each failed every resume ("remove the file manually to continue")."""
    dirs = git_dirs(worktree)  # its own git directory, then the repository's
    if len(dirs) < 2:
        return
    for lock in (dirs[0] / "index.lock", dirs[0] / "HEAD.lock", dirs[1] / "refs" / "heads" / f"{branch}.lock"):
        lock.unlink(missing_ok=True)


def _heads(repo: Path, branches: list[str]) -> list[str]:
    """The commits of several branches, read by one git process."""
    if not branches:
        return []
    return _git(repo, "rev-parse", *(f"refs/heads/{b}" for b in branches)).split()


def _head(repo: Path, branch: str) -> str:
    return _heads(repo, [branch])[0]


def _is_ancestor(repo: Path, a: str, b: str) -> bool:
    # A commit is its own ancestor: a branch still at its start (read-only, or no edits) runs no git.
    return a == b or run_git(repo, "merge-base", "--is-ancestor", a, b).returncode == 0


def _merged(repo: Path, base: str, heads: list[tuple[str, str]], *, message: str, who: str,
            skip_conflicts: dict[str, str] | None = None) -> str:
    """The commit merging ``heads`` (name, commit: each descends from ``base``) into ``base``, in order.

    With ``skip_conflicts``, a head that conflicts is left out and its reason recorded there;
    otherwise the conflict is raised.
    """
    current = base
    merged: list[str] = []
    for name, head in heads:
        if _is_ancestor(repo, head, current):
            merged.append(name)
            continue
        if _is_ancestor(repo, current, head):
            current = head
            merged.append(name)
            continue
        done = run_git(repo, "merge-tree", "--write-tree", "--name-only", "--no-messages", current, head)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 1:
            files = sorted(set(lines[1:]))
            reason = (f"the work of {', '.join(merged) or 'the base'} and of {name} conflict in "
                      f"{', '.join(files) or 'some files'}")
            if skip_conflicts is None:
                raise MergeConflictError(reason, files)
            skip_conflicts[name] = reason
            continue
        if done.returncode != 0 or not lines:
            raise BranchError(f"git merge-tree failed in {repo}: {done.stderr.strip()}")
        current = _git(repo, "commit-tree", lines[0], "-p", current, "-p", head, "-m", message,
                       env=_identity(who)).strip()
        merged.append(name)
    return current


def commit_task(checkout: AgentCheckout, *, run_key: str, index: int, total: int, description: str,
                state: str, summary: str = "", files_changed: list[str] | tuple[str, ...] = (),
                audit: AuditLog | None = None, key: str | None = None,
                log: Callable[[str], None] | None = None, journals: Path | None = None) -> str | None:
    """Commit what the task left in the agent's worktree; return the commit (None: nothing changed).

    ``key``: the task's cache key (the result's), written in the commit (``Toka-Key``). A task
    replayed from the cache (``state="cached"``) leaves the branch holding the work that result
    made: when the branch holds another version of the task's work instead (the spec was
    edited, the task ran again, and the edit was undone before this resume), that work and the
    later tasks' are set aside and the cached result's commit is restored from the history;
    ``log`` is told. Uncommitted edits set aside then are another attempt's: the journals in
    ``journals`` (the agent's) go first, else that attempt's turns would replay without them.

    A task that failed for good: its edits are committed marked as failed, then set aside
    by a second commit that undoes them, so the next task starts from the last good state
    and the failed work stays in the history.

    Symbolic links the task made that lead out of the repository (an absolute target, one
    above its top, or into ``.git``) are never committed: a person who merges the branch
    would get a link to ``/`` or to their git configuration in their checkout. Each is
    removed from the worktree (a link that was in the start commit is put back as it was),
    named in the commit message, and recorded in ``audit`` as refused. So is a git repository
    made inside the worktree (git would commit only a pointer to a commit nobody else has); its
    files stay in the worktree.
    """
    worktree, env = Path(checkout.worktree), _identity(checkout.agent)
    if checkout.shared:
        return None  # a read-only agent's: nothing of it can have changed
    if state == "cached" and key:
        handled, restored = _replay_on_branch(checkout, run_key=run_key, index=index, total=total, key=key, log=log,
                                              journals=journals)
        if handled:
            return restored
    status = _git(worktree, "status", "--porcelain", "-z", "--untracked-files=all", "--ignore-submodules=none")
    if not files_changed and not status:
        # Nothing changed, and no file reported that the ignore rules keep out (named below): one
        # git process instead of the five the checks below take, for every task that only reads.
        return None
    live = None if state == "failed" else _committed(worktree, checkout, run_key, index, total)
    if live is not None and (not key or live[1].get(_KEY) in (None, key)):
        # Done and committed by an earlier process (replayed from Prefect's cache, or run again
        # where that cache is out of reach): what the worktree holds now is a later task's, in
        # flight when that process stopped, and goes to that task's commit. (A commit of another
        # version of the task, under another key, is not this one's: what it did now is committed.)
        return None
    # A git repository the task made inside (listed by git as "dir/") is not added: git would commit
    # a bare pointer to a commit nobody else has, or fail on one with no commit yet.
    nested = [d for d in _git(worktree, "ls-files", "-o", "-z", "--exclude-standard").split("\0") if d.endswith("/")]
    large = _too_large(worktree, status)
    _git(worktree, "add", "-A", "--", ".", *(f":(exclude,literal){d}" for d in [*nested, *large]))
    left_out = ([(as_text(d.rstrip("/")), _NESTED) for d in nested] + [(as_text(f), _LARGE) for f in large]
                + _leave_out(worktree) + _ignored(Path(checkout.root), files_changed))
    for path, why in left_out:
        if audit is not None:
            audit.record(agent=checkout.agent, task=index, tool="git-commit", arguments={"path": path},
                         decision="refused", is_error=True, reason=f"not committed: {path}: {why}")
    if run_git(worktree, "diff", "--cached", "--quiet", "--ignore-submodules=none").returncode == 0:
        return None
    failed = state == "failed"
    title = " ".join(description.split())
    title = title if len(title) <= 60 else title[:57].rstrip() + "..."
    lines = [f"{checkout.agent}: {'FAILED ' if failed else ''}task {index}/{total}: {title}", ""]
    if summary.strip():
        lines += [summary.strip(), ""]
    if failed:
        lines += ["The task failed: these are its partial edits, set aside by the next commit.", ""]
    if files_changed:
        lines += ["Files changed (as the agent reported them):", *(f"- {f}" for f in files_changed), ""]
    if left_out:
        lines += ["Not committed:", *(f"- {path}: {why}" for path, why in left_out), ""]
    lines += [f"Toka-Run: {run_key}", f"Toka-Agent: {checkout.agent}", f"Toka-Task: {index}/{total}",
              f"Toka-State: {'completed' if state == 'cached' else state}"] + ([f"{_KEY}: {key}"] if key else [])
    commit = _commit(worktree, "\n".join(lines) + "\n", env)
    if failed:
        _git(worktree, "revert", "--no-commit", "HEAD", env=env)
        _commit(worktree, f"{checkout.agent}: set aside the failed task {index}/{total}'s edits\n\n"
                          f"They stay in {commit[:12]}; the next task starts without them.\n\n"
                          f"Toka-Run: {run_key}\nToka-Agent: {checkout.agent}\n"
                          f"{_SET_ASIDE}: {index}/{total}\n", env)
    return commit


def set_aside_edits(checkout: AgentCheckout, *, run_key: str, index: int, total: int | str, why: str) -> str | None:
    """Commit what the worktree holds uncommitted, then take it back out in a second commit:
    task ``index`` starts over from the branch's last state, its edits kept in the history.
    Returns the commit holding them (None: there were none).

    For an attempt that starts afresh while an earlier one's edits are still in the worktree
    (its recorded turns dropped): done again on top of them, each change would land twice.
    """
    if checkout.shared:
        return None
    worktree, env = Path(checkout.worktree), _identity(checkout.agent)
    status = _git(worktree, "status", "--porcelain", "-z", "--untracked-files=all", "--ignore-submodules=none")
    if not status:
        return None
    _git(worktree, "add", "-A", "--", ".", *(f":(exclude,literal){f}" for f in _too_large(worktree, status)))
    _leave_out(worktree)  # links out and nested repositories: never committed (see commit_task)
    if run_git(worktree, "diff", "--cached", "--quiet", "--ignore-submodules=none").returncode == 0:
        return None
    trailers = f"Toka-Run: {run_key}\nToka-Agent: {checkout.agent}\n{_RESTARTED}: {index}/{total}\n"
    commit = _commit(worktree, f"{checkout.agent}: edits of an earlier attempt at task {index}/{total}\n\n"
                               f"{why}\n\n{trailers}", env)
    _git(worktree, "revert", "--no-commit", "HEAD", env=env)
    _commit(worktree, f"{checkout.agent}: set aside the edits of an earlier attempt at task {index}/{total}\n\n"
                      f"They stay in {commit[:12]}; the task starts over without them.\n\n{trailers}", env)
    return commit


#: The largest file a task's commit takes (GitHub refuses larger ones): git reads and compresses
#: the whole of a file it adds, and a command's 20 GB sparse file took the runtime two minutes.
COMMIT_FILE_LIMIT = 100 * 2**20
_LARGE = f"larger than {COMMIT_FILE_LIMIT // 2**20} MiB, the most a commit takes; left in the worktree"


def _too_large(worktree: Path, status: str) -> list[str]:
    """The files of ``git status --porcelain -z`` output too large to commit (by their length:
    a sparse file's zeros are read and compressed like any others)."""
    found = []
    entries = iter(status.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        if entry[0] in "RC":
            next(entries, None)  # the name it had
        path = entry[3:]
        try:
            info = os.lstat(worktree / path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_size > COMMIT_FILE_LIMIT:
            found.append(path)
    return found


_KEY = "Toka-Key"
_RESTORED = "Toka-Restored"
_SET_ASIDE = "Toka-Set-Aside"
_RAN_AGAIN = "Toka-Ran-Again"
_RESTARTED = "Toka-Restarted"
_NESTED = "a git repository of its own (made inside the worktree); its files are left in the worktree, not committed"
_LINK_MODE = "120000"
_GITLINK_MODE = "160000"


def _leave_out(worktree: Path) -> list[tuple[str, str]]:
    """Take out of the index what must not be committed (see :func:`commit_task`); return each
    path with why. A symbolic link leading out of the repository is removed from the worktree too
    (one that was in the start commit is put back as it was); a git repository an agent made
    inside the worktree is committed by git as a bare pointer to a commit the person's
    repository does not have, so it is left out, its files left in the worktree."""
    # --ignore-submodules=none: a .gitmodules the agent wrote (ignore = all) must not hide a gitlink.
    raw = _git(worktree, "diff", "--cached", "--raw", "-z", "--no-renames", "--diff-filter=AMT",
               "--ignore-submodules=none")
    fields = raw.split("\0")
    left_out = []
    # -z --raw: ":<old mode> <new mode> <old blob> <new blob> <status>" NUL "<path>" NUL, repeated.
    for meta, path in zip(fields[0::2], fields[1::2]):
        parts = meta.split()
        if len(parts) < 5 or parts[1] not in (_LINK_MODE, _GITLINK_MODE):
            continue
        literal, in_start = f":(literal){path}", parts[4] != "A"
        if parts[1] == _GITLINK_MODE:
            if in_start:
                _git(worktree, "reset", "-q", "HEAD", "--", literal)
            else:
                _git(worktree, "update-index", "--force-remove", "--", path)
            left_out.append((as_text(path), _NESTED))
            continue
        target = _git(worktree, "cat-file", "blob", parts[3])
        if not (leads_out(path, target) or _resolves_out(worktree, path)):
            continue
        if in_start:
            _git(worktree, "checkout", "-q", "HEAD", "--", literal)  # back to the start's version
        else:
            _git(worktree, "rm", "-q", "--cached", "--", literal)
            (worktree / path).unlink(missing_ok=True)
        left_out.append((as_text(path), f"a symbolic link leading out of the repository (to {as_text(target)!r}); "
                                        + ("put back as the start commit had it" if in_start else "removed")))
    return left_out


def _ignored(root: Path, reported: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """The files the task reported changing that the repository's ignore rules keep out of its
    commit, with why: said, not dropped in silence (the worktree goes at the run's end)."""
    present = [f for f in reported if f and not Path(f).is_absolute() and ".." not in Path(f).parts
               and (root / f).is_file()]
    if not present:
        return []
    # Without -z (git takes it with --stdin only): one path a line, as given (a name holding a
    # newline or a quote comes back quoted, and is not named here).
    found = set(run_git(root, "-c", "core.quotePath=off", "check-ignore", "--", *present).stdout.splitlines())
    return [(as_text(f), "ignored by the repository's ignore rules (.gitignore), so not committed; "
                         "it is lost with the worktree at the run's end") for f in present if f in found]


def leads_out(path: str, target: str) -> bool:
    """Whether a symbolic link at ``path`` (relative to the repository's top) to ``target``
    points outside the repository or into a ``.git`` (its own or a nested repository's).

    Only leading ``..`` are taken: after a name, ``..`` would climb out of wherever that name
    leads, and the name may be another link (``x -> d/up/..`` with ``d/up -> ..`` is the
    repository's parent). With every link held to that, a chain of links stays inside.
    """
    if not target or target.startswith("/") or "\0" in target:
        return True
    named = False
    for part in target.split("/"):
        if part == ".." and named:
            return True
        named = named or part not in ("", ".", "..")
    parts = posixpath.normpath(posixpath.join(posixpath.dirname(path), target)).split("/")
    return parts[0] == ".." or any(part.lower() == ".git" for part in parts)


def _resolves_out(worktree: Path, path: str) -> bool:
    """Whether the link at ``path`` resolves, on disk, outside the worktree or into a ``.git``:
    through a link of the start commit (``vendor -> /opt/vendor`` makes ``x -> vendor/lib`` lead out)."""
    top = worktree.resolve()
    where = Path(os.path.realpath(worktree / path))
    return not where.is_relative_to(top) or any(part.lower() == ".git" for part in where.relative_to(top).parts)


def reopen_task(checkout: AgentCheckout, *, run_key: str, index: int, total: int) -> bool:
    """Before task ``index`` runs again (a resume, a retry of the run): whether its recorded turns
    still match the worktree.

    When the branch ends with this task's set-aside edits (it failed last time, and nothing
    came after it), they are taken back out of the history, uncommitted, so the task goes on
    from them: True. When they were set aside under later tasks' work, the worktree no longer
    holds them and the task starts afresh: False. Nothing set aside: True, but for a worktree
    made again (``remade``), which holds no edits of the task.
    """
    if checkout.shared:
        return True
    worktree = Path(checkout.worktree)
    found = [commit for commit, trailers in _own_commits(checkout, run_key)
             if trailers.get(_SET_ASIDE) == f"{index}/{total}"]
    if not found:
        # Its edits, uncommitted, are in the worktree they were made in; not in one made again.
        return not checkout.remade
    head = _git(worktree, "rev-parse", "HEAD").strip()
    if found[0] != head or _git(worktree, "status", "--porcelain", "--untracked-files=all").strip():
        return False
    # HEAD~1 is the failed task's commit of its edits; HEAD~2 where the task started.
    _git(worktree, "reset", "-q", "--hard", "HEAD~1")
    _git(worktree, "reset", "-q", "--mixed", "HEAD~1")
    return True


def _committed(worktree: Path, checkout: AgentCheckout, run_key: str, index: int,
               total: int) -> tuple[str, dict[str, str]] | None:
    """The commit (with its trailers) of task ``index`` of run ``run_key`` the agent's branch holds
    finished already, if any (its edits set aside after a failure do not count, nor work set aside
    for a task that ran again: :func:`set_aside_from_task`)."""
    return _live(_own_commits(checkout, run_key), index, total)


def _live(commits: list[tuple[str, dict[str, str]]], index: int,
          total: int) -> tuple[str, dict[str, str]] | None:
    """:func:`_committed`, from the agent's own commits (:func:`_own_commits`)."""
    for commit, trailers in commits:  # newest first
        again = _task_number(trailers.get(_RAN_AGAIN))
        if again is not None and again <= index:
            return None  # this task's earlier commit, if any, is set aside below here
        if trailers.get("Toka-Task") == f"{index}/{total}" and trailers.get("Toka-State") == "completed":
            return commit, trailers
    return None


def _replay_on_branch(checkout: AgentCheckout, *, run_key: str, index: int, total: int, key: str,
                      log: Callable[[str], None] | None, journals: Path | None) -> tuple[bool, str | None]:
    """Task ``index``, replayed from the cache under ``key``: make the branch hold the work of that
    result. Returns whether that is done, and the commit restored (None: the branch holds that
    work already, or the result made none). Not done: no version of the task's work is on the
    branch or in its history, and what the worktree holds (if anything) is the result's to commit.

    A spec edited and undone between resumes replays the first version's results while the
    branch holds the second version's work (or, the second version's attempt killed midway, its
    half-done edits in the worktree): the report would show one thing and ``toka apply`` bring
    another."""
    worktree = Path(checkout.worktree)
    commits = _own_commits(checkout, run_key)
    live = _live(commits, index, total)
    if live is not None and live[1].get(_KEY) in (None, key):
        return True, None  # already there (a commit of before keys were written counts as this one's)
    made = next((commit for commit, trailers in commits
                 if trailers.get("Toka-Task") == f"{index}/{total}" and trailers.get("Toka-State") == "completed"
                 and trailers.get(_KEY) == key), None)
    if live is None and made is None:
        return False, None
    owner = index  # whose edits the worktree holds: the task in flight when the run stopped, by its journal
    if journals is not None and uncommitted_files(worktree):
        owner = _drop_journals(journals) or index
    why = (f"Task {index}/{total}'s result is replayed from the cache, and these edits are not that result's "
           f"(an attempt at another version of the tasks{', cut short' if live is None else ''}).")
    if set_aside_edits(checkout, run_key=run_key, index=owner, total=total, why=why) and log is not None:
        log(f"task {owner}/{total}'s uncommitted edits (of another version of the tasks) set aside on {checkout.branch}")
    # Another version's work of this task or of later ones (made since this task's was set aside)
    # goes first: the result's work is restored where it was made.
    set_aside_from_task(checkout, run_key=run_key, index=index, total=total,
                        why=f"Task {index}/{total} replays its result from the cache ({key}), and this is not that "
                            "result's work: the spec or settings changed back since.")
    if made is None:
        if log is not None:
            log(f"task {index}/{total}: replayed from the cache; the work of another version of it is set aside "
                f"on {checkout.branch} (the replayed result changed no file)")
        return True, None
    restored = _restore(checkout, made)
    if restored is None:
        return True, None  # its changes are on the branch already (another commit made the same)
    if log is not None:
        log(f"task {index}/{total}: replayed from the cache; its work ({made[:12]}) is restored on "
            f"{checkout.branch} as {restored[:12]}" + (", and another version's set aside" if live else ""))
    return True, restored


def _restore(checkout: AgentCheckout, commit: str) -> str | None:
    """Apply ``commit``'s changes (a task's, set aside since) on the branch and commit them under its
    message; return that commit (None: they change nothing there). Where they no longer apply as a
    patch, the files it changed are taken as it left them."""
    worktree, env = Path(checkout.worktree), _identity(checkout.agent)
    if run_git(worktree, "cherry-pick", "--no-commit", commit, env=env).returncode != 0:
        run_git(worktree, "cherry-pick", "--abort")
        _git(worktree, "reset", "-q", "--hard", "HEAD")
        fields = _git(worktree, "diff-tree", "-r", "-z", "--no-commit-id", "--name-status", "--no-renames",
                      f"{commit}^", commit).split("\0")
        # -z --name-status: "<status>" NUL "<path>" NUL, repeated.
        changed = list(zip(fields[0::2], fields[1::2]))
        kept = [f":(literal){path}" for status, path in changed if status != "D"]
        deleted = [f":(literal){path}" for status, path in changed if status == "D"]
        if kept:
            _git(worktree, "checkout", "-q", commit, "--", *kept)
        if deleted:
            _git(worktree, "rm", "-q", "-r", "--ignore-unmatch", "--", *deleted)
    if run_git(worktree, "diff", "--cached", "--quiet", "--ignore-submodules=none").returncode == 0:
        return None
    message = _git(worktree, "log", "-1", "--format=%B", commit).rstrip("\n")
    body, _, trailers = message.rpartition("\n\n")
    note = (f"Restored from {commit[:12]}: the run replays this task's result from the cache, and this is the "
            f"work that result made.")
    return _commit(worktree, f"{body}\n\n{note}\n\n{trailers}\n{_RESTORED}: {commit}\n", env)


def set_aside_from_task(checkout: AgentCheckout, *, run_key: str, index: int, total: int,
                        why: str = "") -> str | None:
    """Task ``index`` runs again (its cache key changed: the spec or a setting was edited before a
    resume; or it failed) though the branch holds its or a later task's finished commit of this
    run: their work is set aside by one commit (a revert of their commits when an earlier task's
    newer work lies above them, else a reset to before the oldest), so what the task does now
    lands where it did first (else its new edits were left out and the old ones kept, while its
    report showed the new; or it worked on top of the later tasks' old work). A later task that
    then replays from the cache gets its work back from the history (:func:`commit_task`).
    Returns that commit (None: nothing set aside; a failed task's own set-aside edits are
    :func:`reopen_task`'s)."""
    if checkout.shared:
        return None
    worktree = Path(checkout.worktree)
    oldest, finished, ours, lower_above, seen_lower = None, False, [], False, False
    for commit, trailers in _own_commits(checkout, run_key):  # newest first
        again = _task_number(trailers.get(_RAN_AGAIN))
        if again is not None and again <= index:
            break  # what is older was set aside already, when this task or an earlier one ran again
        number = _task_number(trailers.get("Toka-Task") or trailers.get(_SET_ASIDE) or trailers.get(_RESTARTED))
        if number is None:
            continue
        if number >= index:
            oldest = commit
            ours.append(commit)
            lower_above |= seen_lower  # an earlier task's newer work lies above (it made none the first time)
            finished |= trailers.get("Toka-State") == "completed"
        else:
            seen_lower = True
    if oldest is None or not finished:
        return None  # set-aside edits only: they change nothing
    if lower_above and run_git(worktree, "revert", "--no-commit", *ours).returncode != 0:
        _git(worktree, "revert", "--abort", check=False)
        lower_above = False
    if not lower_above:
        _git(worktree, "read-tree", "-u", "--reset", f"{oldest}^")
    trailers = f"Toka-Run: {run_key}\nToka-Agent: {checkout.agent}\n{_RAN_AGAIN}: {index}/{total}\n"
    why = why or (f"Its spec, settings or an earlier task's result changed since {oldest[:12]} was made; the "
                  "task starts over from before it.")
    return _commit(worktree, f"{checkout.agent}: set aside the work of task {index}/{total} and after: it runs "
                             f"again\n\n{why}\n\n{trailers}", _identity(checkout.agent))


def _task_number(trailer: str | None) -> int | None:
    """2 of a ``Toka-Task: 2/4`` trailer's value."""
    number = (trailer or "").partition("/")[0]
    return int(number) if number.isdigit() else None


def _own_commits(checkout: AgentCheckout, run_key: str) -> list[tuple[str, dict[str, str]]]:
    """The agent's own commits of run ``run_key`` on its branch since its start, newest first, with
    their trailers (a dependency's work merged in since is not the agent's)."""
    return [(commit, trailers) for commit, trailers in _trailers(Path(checkout.worktree), f"{checkout.start}..HEAD")
            if trailers.get("Toka-Run") == run_key and trailers.get("Toka-Agent") == checkout.agent]


def _trailers(worktree: Path, revisions: str) -> list[tuple[str, dict[str, str]]]:
    """Each commit of ``revisions`` (newest first) with its trailers. Only the message's last
    paragraph holds them: a task's summary, written by the model, cannot pass for one."""
    found = []
    for record in _git(worktree, "log", "--format=%H%x1f%(trailers:only,unfold)%x1e", revisions).split("\x1e"):
        commit, _, block = record.strip("\n").partition("\x1f")
        if commit:
            found.append((commit, dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)))
    return found


def _commit(worktree: Path, message: str, env: dict[str, str]) -> str:
    message_file = Path(worktree).parent / f".{Path(worktree).name}.message"
    message_file.write_text(message, encoding="utf-8", errors="replace")
    try:
        _git(worktree, "commit", "-q", "--no-verify", "--allow-empty-message", "-F", str(message_file), env=env)
    finally:
        message_file.unlink(missing_ok=True)
    return _git(worktree, "rev-parse", "HEAD").strip()


@dataclass(frozen=True)
class AgentChanges:
    """What an agent's branch holds beyond where it started, from git (not from the model)."""

    branch: str
    commit: str
    base: str
    files_changed: list[str] = field(default_factory=list)
    diffstat: str = ""


def agent_changes(run: RunBranches, agent: str) -> AgentChanges | None:
    """The agent's branch against its start; None when it has none."""
    if not run.agent_record(agent).is_file():
        return None
    repo = Path(run.repo)
    return changes_between(repo, run.branch(agent), _agent_start(run, agent), _head(repo, run.branch(agent)))


def _agent_start(run: RunBranches, agent: str) -> str:
    """The commit the agent's branch started from (its record's)."""
    return str(json.loads(run.agent_record(agent).read_text(encoding="utf-8"))["start"])


def changes_between(repo: Path, branch: str, start: str, head: str) -> AgentChanges:
    """What ``branch`` at ``head`` holds beyond ``start``."""
    return AgentChanges(branch=branch, commit=head, base=start,
                        files_changed=[as_text(f) for f in changed_files(repo, start, head)],
                        diffstat=diffstat(repo, start, head))


# A diff of a commit against itself is empty without asking git: most agents' branches and
# many runs' merged branches are still where they started.
def changed_files(repo: Path, a: str, b: str) -> list[str]:
    return [] if a == b else [f for f in _git(repo, "diff", "--name-only", "-z", a, b).split("\0") if f]


def diffstat(repo: Path, a: str, b: str) -> str:
    return "" if a == b else as_text(_git(repo, "diff", "--stat=100", a, b).rstrip())


def diff_text(repo: Path, a: str, b: str, *, limit: int | None = None) -> str:
    """The diff from ``a`` to ``b``; cut at ``limit`` characters with a note saying so."""
    text = "" if a == b else as_text(_git(repo, "diff", a, b))
    if limit is not None and len(text) > limit:
        return (text[:limit].rsplit("\n", 1)[0]
                + f"\n... (cut: {len(text) - limit} more characters; see `git diff {a[:12]} {b[:12]}`)\n")
    return text


# -- the run's end ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunChanges:
    """The run's merged branch: what it merged, and what it could not."""

    branch: str
    commit: str
    base: str
    merged: list[str]
    not_merged: dict[str, str]
    files_changed: list[str]
    patch: str | None = None
    """The patch file of a workspace that is not a git repository."""
    pushed: str | None = None
    """What became of ``--push`` (None: not asked)."""


def finish_run(run: RunBranches, agents: list[str], *, tidy: bool = True) -> RunChanges:
    """Merge the branches of ``agents`` (the completed ones, in plan order) into the run's branch.

    ``tidy=False`` leaves their worktrees for :func:`tidy_worktrees` (two git processes an agent:
    the pipeline removes them beside its summary and last writes, and waits for that at its end).
    """
    if _discarded_path(Path(run.state_dir), run.run_key).exists():
        raise BranchError(f"run {run.run_key} was discarded while it ran (`toka discard`): its branch is not made")
    repo = Path(run.repo)
    started = [a for a in agents if run.agent_record(a).is_file()]
    heads = list(zip(started, _heads(repo, [run.branch(a) for a in started]), strict=True))
    not_merged: dict[str, str] = {}
    commit = _merged(repo, run.base, heads, message=f"toka: run {run.run_key}: the work of {', '.join(agents)}",
                     who="run", skip_conflicts=not_merged)
    _git(repo, "update-ref", f"refs/heads/{run.merged_branch}", commit)
    patch = None
    if run.private_copy:
        path = run.patch_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_git(repo, "diff", "--binary", run.base, commit), encoding="utf-8", errors="surrogateescape")
        patch = str(path)
    merged = [a for a, _ in heads if a not in not_merged]
    if tidy:
        tidy_worktrees(run, [a for a, _ in heads])
    return RunChanges(branch=run.merged_branch, commit=commit, base=run.base, merged=merged,
                      not_merged=not_merged, files_changed=[as_text(f) for f in changed_files(repo, run.base, commit)],
                      patch=patch)


def tidy_worktrees(run: RunBranches, agents: list[str]) -> None:
    """Remove the worktrees that hold nothing uncommitted (their branches stay, and a resume
    makes them again); one holding edits no task committed (an agent cut short) stays."""
    repo = Path(run.repo)
    shared = sorted(run.worktrees.glob("_read-*"))
    with _worktrees_locked(run):
        for path in [*(run.worktree(agent) for agent in agents), *shared]:
            if not path.is_dir():
                continue
            # git refuses to remove a worktree with modified or untracked files (ignored ones go):
            # asked only then, git status says whether that is why. One git process a worktree,
            # not two: the run's end waits for this (10 worktrees, 94 ms of 155).
            try:
                _git(repo, "worktree", "remove", str(path))
            except BranchError:
                if _git(path, "status", "--porcelain", "--untracked-files=all").strip():
                    continue
                raise
        _forget_missing_worktrees(repo, run.worktrees)
        with suppress(OSError):  # the run's directory, when no worktree stayed
            run.worktrees.rmdir()


def merged_tip(run: RunBranches) -> str:
    """The commit of the run's merged branch.

    Raises:
        BranchError: the run has not finished (its merged branch is made at its end).
    """
    done = run_git(Path(run.repo), "rev-parse", "--verify", "--quiet", f"refs/heads/{run.merged_branch}")
    if done.returncode != 0:
        raise BranchError(f"run {run.run_key} has no {run.merged_branch} yet (it has not finished): "
                          "look at one agent's work with --agent NAME")
    return done.stdout.strip()


def push_run(run: RunBranches, changes: RunChanges, remote: str) -> str:
    """Push the run's merged branch to ``remote`` (audited as a git-push); return what happened."""
    ref = f"refs/heads/toka/{ref_part(run.run_key)}"
    done = run_git(Path(run.repo), "push", "--no-verify", remote, f"{changes.commit}:{ref}", timeout=300)
    said = (done.stderr or done.stdout).strip().splitlines()
    note = (f"pushed {changes.branch} to {remote} as toka/{ref_part(run.run_key)}" if done.returncode == 0
            else f"push to {remote} failed: {said[-1] if said else f'exit {done.returncode}'}")
    AuditLog(audit_path(Path(run.state_dir), run.run_key), run=run.run_key).record(
        agent=None, task=None, tool="git-push", arguments={"remote": remote, "ref": ref, "commit": changes.commit},
        decision="allowed", reason=note, is_error=done.returncode != 0, exit_code=done.returncode)
    return note


@dataclass(frozen=True)
class Discarded:
    """What :func:`discard_run` removed."""

    removed: list[str]
    """Worktrees and branches."""
    uncommitted: dict[str, int]
    """Worktree -> how many of its files no task had committed (an agent cut short, a repository
    it made inside): gone with it, and said so."""


def unrecorded_run(workspace: Path, state_dir: Path, run_key: str) -> RunBranches | None:
    """Run ``run_key``'s branches in ``workspace``'s repository when its record is gone (``.toka``
    deleted midway), for :func:`discard_run` to remove; None when it has none there either."""
    top = _toplevel(workspace)
    if top is None or not _git(top, "for-each-ref", "--format=%(refname)",
                               f"refs/heads/toka/{ref_part(run_key)}/").strip():
        return None
    return RunBranches(run_key=run_key, workspace=str(workspace), state_dir=str(state_dir), repo=str(top),
                       prefix="", base="", base_ref="")


def discard_run(run: RunBranches) -> Discarded:
    """Remove the run's worktrees, branches, private copy and records. From the start, a run under
    its key is refused (:func:`refuse_discarded`): one cut short is no run to go on with."""
    tombstone = _discarded_path(Path(run.state_dir), run.run_key)
    tombstone.parent.mkdir(parents=True, exist_ok=True)
    tombstone.touch()
    repo = Path(run.repo)
    removed: list[str] = []
    uncommitted: dict[str, int] = {}
    worktrees = run.worktrees
    if repo.is_dir():
        for path in _worktrees_of(repo):
            if path.is_relative_to(worktrees):
                if path.is_dir():
                    left = len(_git(path, "status", "--porcelain", "--untracked-files=all", check=False).splitlines())
                    if left:
                        uncommitted[str(path)] = left
                _git(repo, "worktree", "remove", "--force", "--force", str(path))
                removed.append(str(path))
        shutil.rmtree(worktrees, ignore_errors=True)
        _forget_missing_worktrees(repo, worktrees)
        prefix = f"refs/heads/toka/{ref_part(run.run_key)}/"
        for ref in _git(repo, "for-each-ref", "--format=%(refname)", prefix).split():
            _git(repo, "update-ref", "-d", ref)
            removed.append(ref.removeprefix("refs/heads/"))
    else:
        shutil.rmtree(worktrees, ignore_errors=True)
    if run.private_copy:
        shutil.rmtree(repo, ignore_errors=True)
        run.patch_path().unlink(missing_ok=True)
    shutil.rmtree(Path(run.state_dir) / "branches" / run.run_dir, ignore_errors=True)
    run.record_path.unlink(missing_ok=True)
    return Discarded(removed, uncommitted)


def uncommitted_files(repo: Path) -> set[str]:
    """Paths with changes not committed in ``repo``'s checkout (staged, unstaged, untracked)."""
    out = _git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    files: set[str] = set()
    entries = out.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            files.add(entry[3:])
            if entry[0] in "RC":  # a rename's source follows
                i += 1
                if i < len(entries) and entries[i]:
                    files.add(entries[i])
        i += 1
    return files


def apply_changes(run: RunBranches, agent: str | None = None) -> str:
    """Merge the run's (or one agent's) changes into the person's checkout; return what was done.

    Refused, with the files named, when that would overwrite uncommitted work or conflict
    with the checkout's commits; the checkout is then left exactly as it was.

    Raises:
        BranchError: refused, or git failed.
    """
    repo = Path(run.repo)
    branch = run.branch(agent) if agent else run.merged_branch
    if run_git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}").returncode != 0:
        raise BranchError(f"no branch {branch} (the run has not finished, or was discarded)")
    if run.private_copy:
        return _apply_patch(run, branch)
    present = _git_files_present(repo, [*_IN_PROGRESS, "index.lock"])
    if "index.lock" in present:
        raise BranchError(f"not applied: git's lock {present['index.lock']} exists: a git command is working in "
                          "your checkout, or one was killed midway; when none is running, remove the file, check "
                          "`git status`, and apply again")
    busy = next((what for name, what in _IN_PROGRESS.items() if name in present), None)
    if busy:
        raise BranchError(f"not applied: your checkout is in the middle of {busy}; finish it (or abort it) first")
    head = _git(repo, "rev-parse", "HEAD").strip()
    tip = _head(repo, branch)
    if _is_ancestor(repo, tip, head):
        return f"nothing to apply: {branch} is already in {head[:12]}"
    start = _git(repo, "merge-base", head, tip).strip()
    incoming = set(changed_files(repo, start, tip))
    touched = sorted(incoming & uncommitted_files(repo))
    if touched:
        raise BranchError(f"not applied: {branch} changes files you have uncommitted changes in: "
                          f"{as_text(', '.join(touched))}; commit or stash them first")
    # Git's merge overwrites ignored files (a `.env`, say) without a word: they are the person's too.
    tracked = set(_git(repo, "ls-files", "-z").split("\0"))
    in_the_way = sorted(p for p in incoming if p not in tracked and os.path.lexists(repo / p))
    if in_the_way:
        raise BranchError(f"not applied: {branch} brings files you have untracked or ignored copies of: "
                          f"{as_text(', '.join(in_the_way))}; move them aside first")
    if not _is_ancestor(repo, head, tip):
        # A merge commit (you committed since the run's start): git merges only onto an index as
        # HEAD has it, and said so naming the staged file as if the run would overwrite it.
        staged = sorted(f for f in _git(repo, "diff", "--cached", "--name-only", "-z").split("\0") if f)
        if staged:
            raise BranchError(f"not applied: {branch} needs a merge commit (your checkout has commits since the "
                              f"run's start) and you have staged changes: {as_text(', '.join(staged))}; "
                              "commit or unstage them first")
    done = run_git(repo, "merge-tree", "--write-tree", "--name-only", "--no-messages", head, tip)
    if done.returncode == 1:
        files = sorted(set(done.stdout.strip().splitlines()[1:]))
        raise MergeConflictError(f"not applied: {branch} conflicts with your checkout in "
                                 f"{as_text(', '.join(files))}; merge it yourself (`git merge {branch}`)", files)
    merge = run_git(repo, "merge", "--no-edit", "--no-verify", "-m", f"Merge {branch} (toka run {run.run_key})",
                    tip, env=_identity("run"), own_session=True)
    if merge.returncode != 0:
        run_git(repo, "merge", "--abort", own_session=True)
        raise BranchError(f"not applied: git merge {branch} failed: {(merge.stderr or merge.stdout).strip()}")
    built_on = ""
    if agent is not None and _agent_start(run, agent) != run.base:
        # Its branch starts from its dependencies' merged work: `toka diff --agent` shows its own.
        built_on = ", with the work of the dependencies it built on"
    files = f"{len(incoming)} file{'s' * (len(incoming) != 1)}"
    # git reset --keep: takes the merge back, and refuses rather than lose edits made since.
    return f"merged {branch} into your checkout ({files}{built_on}); undo with: git reset --keep {head[:12]}"


#: What git leaves in its directory while an operation waits for the person, and its name.
_IN_PROGRESS = {"MERGE_HEAD": "a merge", "rebase-merge": "a rebase", "rebase-apply": "a rebase or `git am`",
                "CHERRY_PICK_HEAD": "a cherry-pick", "REVERT_HEAD": "a revert", "BISECT_LOG": "a bisect",
                "sequencer": "a cherry-pick or revert of several commits"}


def _git_files_present(repo: Path, names: list[str]) -> dict[str, Path]:
    """Which of ``names`` (files in git's directory, one ``rev-parse`` for all) exist, and where.

    What the checkout is in the middle of (:data:`_IN_PROGRESS`: a merge on top would mix the
    run's changes into it, and a failed one would be aborted with it), or git's ``index.lock``
    (a git command at work, or one killed midway).
    """
    paths = _git(repo, "rev-parse", *(arg for name in names for arg in ("--git-path", name))).splitlines()
    found = {name: Path(path) if os.path.isabs(path) else repo / path for name, path in zip(names, paths)}
    return {name: path for name, path in found.items() if os.path.lexists(path)}


def _apply_patch(run: RunBranches, branch: str) -> str:
    repo, workspace = Path(run.repo), Path(run.workspace)
    start = run.base if branch == run.merged_branch else _agent_start(run, branch.rsplit("/", 1)[1])
    patch = _git(repo, "diff", "--binary", start, _head(repo, branch))
    if not patch:
        return f"nothing to apply: {branch} changes nothing"
    # Kept once applied: it is how the person takes the changes back.
    path = Path(run.state_dir) / "patches" / "applied" / f"{ref_part(branch.replace('/', '-'))}-{uuid.uuid4().hex[:8]}.patch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(patch, encoding="utf-8", errors="surrogateescape")
    try:
        for check in (["--check"], []):
            done = run_git(workspace, "apply", *check, str(path), own_session=True)
            if done.returncode != 0:
                raise BranchError(f"not applied: the patch of {branch} does not apply to {workspace} (files "
                                  f"changed since the run?): {done.stderr.strip()}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return f"applied the changes of {branch} to {workspace}; undo with: git -C {workspace} apply -R {path}"
