"""The workspace's git control files, which code an agent runs may never change.

Git runs programs named in its configuration (``core.fsmonitor``, aliases, filters,
``core.sshCommand``, pagers...) and in hooks, as whoever runs git next: a person
typing ``git status`` in the workspace after the run, as root. A command an agent
runs (a workspace script, a ``conftest.py`` under pytest) could plant them. So:

1. inside the sandbox the workspace's git directory is pinned (bind-mounted onto
   itself: it cannot be moved or replaced) and its control files are read-only
   (``confine.py``); objects, refs, the index and logs stay writable, so ``git add``
   and ``git commit`` work;
2. after every command, sandboxed or not, the control files are compared with a
   snapshot taken before it (:class:`GitGuard`); a change is undone and stops the
   run (:class:`~toka.errors.SandboxViolation`). Without the sandbox this is the
   only layer;
3. a git directory a command created elsewhere in the workspace (a nested
   repository, ``.git`` where there was none, or a bare repository under any name,
   which a ``.git`` file elsewhere may point to) may hold only what ``git init``
   writes: sample hooks and plain configuration keys (:data:`INIT_CONFIG_KEYS`).
   Otherwise its control files are removed and the run stops. In one the workspace
   held before the command, a command may change what everyday git writes (the same
   keys, sample hooks, ``info/exclude``); anything else is put back and stops the run.
   Whether a directory is one is decided after each command, whatever it was named
   and in whatever order its parts were made. A ``.git`` file or link pointing out of
   the workspace, or into the runtime's state, is removed and stops the run. A rebase
   or cherry-pick left in progress may not carry ``exec`` lines either.

The runtime's own git calls go through :func:`git_argv`, which switches hooks,
fsmonitor, pagers, editors, external diff, and the filters, textconv and merge drivers
the repository's configuration (or a file it includes) names off on the command line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CONTROL_DIRS", "CONTROL_FILES", "GitGuard", "git_argv", "git_dirs", "git_env", "looks_like_gitdir",
           "run_git"]

#: Files of a git directory that name programs git runs, or where it finds them.
CONTROL_FILES = ("config", "config.worktree", "commondir", "gitdir")
#: Directories of a git directory whose every file is a control file.
CONTROL_DIRS = ("hooks", "info", "modules", "worktrees", "branches", "remotes")
# Todo lists of an operation in progress: `git rebase --continue` runs their exec lines.
_TODO_FILES = ("rebase-merge/git-rebase-todo", "rebase-merge/done", "sequencer/todo")
_EXEC_LINE = re.compile(rb"^\s*(x|exec)\s", re.MULTILINE)

#: Configuration keys ``git init`` (and harmless everyday use) writes; a git directory
#: a command creates may hold only these. ``*`` stands for one subsection name.
INIT_CONFIG_KEYS = (
    "core.repositoryformatversion", "core.filemode", "core.bare", "core.logallrefupdates",
    "core.ignorecase", "core.precomposeunicode", "core.symlinks", "core.autocrlf", "core.eol",
    "core.quotepath", "extensions.objectformat", "init.defaultbranch", "user.name", "user.email",
    "branch.*.remote", "branch.*.merge", "branch.*.rebase", "remote.*.url", "remote.*.fetch",
    "remote.*.pushurl", "remote.*.mirror", "remote.*.tagopt", "remote.*.prune", "fetch.prune", "pull.rebase",
    "core.sharedrepository", "gc.auto", "receive.denycurrentbranch", "submodule.*.url", "submodule.*.active",
)
_INIT_KEY = re.compile("^(" + "|".join(re.escape(k).replace(r"\*", r"[^\n]+") for k in INIT_CONFIG_KEYS) + ")$")

# Settings that make git run another program, switched off for the runtime's own calls.
_SAFE_CONFIG = (
    "core.hooksPath=/dev/null", "core.fsmonitor=false", "core.pager=cat", "core.editor=false",
    "sequence.editor=false", "core.askPass=", "credential.helper=",
    "core.sshCommand=ssh", "safe.bareRepository=explicit", "protocol.ext.allow=never",
    "protocol.file.allow=user", "uploadpack.packObjectsHook=", "gpg.program=gpg",
)
# Per-driver settings that name programs; each driver the repository defines is neutralised.
_DRIVER_KEY = re.compile(r"^(filter\.[^\n]+\.(clean|smudge|process)|diff\.[^\n]+\.(textconv|command)"
                         r"|merge\.[^\n]+\.driver)$")


def git_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the runtime's git: no system config, no pager, editor, prompt or helper."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("GIT_") and k not in ("PAGER", "EDITOR", "VISUAL")}
    return {**env, "GIT_CONFIG_NOSYSTEM": "1", "GIT_PAGER": "cat", "PAGER": "cat", "GIT_EDITOR": "false",
            "GIT_TERMINAL_PROMPT": "0", "GIT_ATTR_NOSYSTEM": "1"}


# Commands that would run diff.external or textconv programs; an empty diff.external is an error,
# so these get --no-ext-diff --no-textconv after the subcommand instead.
_DIFFING = {"diff", "log", "show", "whatchanged", "format-patch", "diff-tree", "diff-index", "diff-files"}


def git_argv(repo: Path, *args: str) -> list[str]:
    """``git -C repo <safe -c options> args...``: nothing the repository configures can run."""
    options = [*_SAFE_CONFIG]
    for key in dict.fromkeys(_config_keys(repo)):
        if _DRIVER_KEY.match(key):
            options.append(f"{key}=")
            if key.startswith("filter."):  # a required filter left without a program fails every add
                options.append(f"{key.rsplit('.', 1)[0]}.required=false")
    rest = list(args)
    i = 0
    while i < len(rest) and rest[i].startswith("-"):
        i += 2 if rest[i] in ("-c", "-C") else 1
    if i < len(rest) and rest[i] in _DIFFING:
        rest[i + 1:i + 1] = ["--no-ext-diff", "--no-textconv"]
    return ["git", "-C", str(repo), *(x for o in options for x in ("-c", o)), *rest]


def run_git(repo: Path, *args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None,
            own_session: bool = False, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the runtime's own git command in ``repo`` (see :func:`git_argv`); never raises for exit codes.

    ``env`` adds variables (an author, an index file) to :func:`git_env`'s environment.

    ``own_session``: git runs in a session of its own, so a signal to the runtime's process
    group (Ctrl-C, a closed terminal, ``kill -9`` of the group) stops the runtime, not git
    halfway through a write: for what writes the person's own checkout (``toka apply``), where a
    merge killed midway left its ``index.lock`` and a checkout half updated. A timeout still
    kills git. The run's own git work (worktrees, commits) stops with the run, and a resume
    finds what it left.
    """
    # While git holds a lock it handles SIGINT itself (it removes the lock, then raises the signal
    # again), over a SIGINT it inherited ignored: in a runtime that ignores SIGINT (`toka run &` in
    # a script), a Ctrl-C at the terminal reached git through the process group, and git wrote on
    # through the lock it had closed ("index.lock write error: Bad file descriptor"), failing the
    # agent whose task it was committing. A SIGINT the runtime ignores does not reach its git.
    apart = not own_session and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    done = subprocess.run(git_argv(repo, *args), capture_output=True, env={**git_env(), **(env or {})},
                          timeout=timeout, check=False, start_new_session=own_session,
                          process_group=0 if apart else None,
                          **({"stdin": subprocess.DEVNULL} if input is None
                             else {"input": input.encode("utf-8", "surrogateescape")}))
    # Paths and contents need not be UTF-8 (a Latin-1 file, a name made by a command), nor end
    # lines with \n alone (a CRLF file's patch): kept as the bytes they are (surrogate escapes, no
    # newline translation), so a path read here names the same file in argv and a patch applies.
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "surrogateescape"),
                                       done.stderr.decode("utf-8", "surrogateescape"))


def _config_keys(repo: Path) -> list[str]:
    """Every key of the repository's own configuration files and of every file they include (read
    as files: nothing is run). The person's global configuration is theirs, as for their own git:
    its filters (git-lfs's) keep working in the agents' commits and in ``toka apply``."""
    files = [gitdir / name for gitdir in git_dirs(repo) for name in ("config", "config.worktree")]
    keys: list[str] = []
    read: set[Path] = set()
    while files and len(read) < 64:  # includes may include each other
        path = files.pop()
        if path in read:
            continue
        read.add(path)
        for key, value in _pairs_of(path):
            keys.append(key)
            if key == "include.path" or (key.startswith("includeif.") and key.endswith(".path")):
                included = Path(os.path.expanduser(value))
                files.append(included if included.is_absolute() else path.parent / included)
    return keys


# path -> (what its stat said, its pairs): the runtime runs git many times in a row on one repository.
_PAIRS: dict[Path, tuple[tuple[int, int, int], list[tuple[str, str]]]] = {}


def _pairs_of(path: Path) -> list[tuple[str, str]]:
    """The (key, value) pairs of one config file, read again only when it changed (size, mtime, inode)."""
    try:
        st = path.stat()
    except OSError:
        return []
    seen = (st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _PAIRS.get(path)
    if cached is not None and cached[0] == seen:
        return cached[1]
    pairs = _read_config(path) or []
    if len(_PAIRS) > 512:
        _PAIRS.clear()
    _PAIRS[path] = (seen, pairs)
    return pairs


def _read_config(path: Path) -> list[tuple[str, str]] | None:
    """(key, value) pairs of one config file, includes not followed; None when it cannot be parsed."""
    if not path.is_file():
        return []
    try:
        done = subprocess.run(["git", "config", "--file", str(path), "--no-includes", "--list", "-z"],
                              capture_output=True, env=git_env(), timeout=30, stdin=subprocess.DEVNULL,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    pairs = []
    for item in done.stdout.split(b"\0"):
        if item:
            key, _, value = item.partition(b"\n")
            pairs.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return pairs


def git_dirs(workspace: Path) -> list[Path]:
    """The git directories of the repository the workspace is the top of: its git dir and common dir."""
    dot = workspace / ".git"
    if dot.is_dir() and not dot.is_symlink():
        gitdir = dot
    else:
        pointed = _pointed_to(dot)
        if pointed is None or not pointed.is_dir():
            return []
        gitdir = pointed
    found = [gitdir]
    named = pointer_text(gitdir / "commondir")
    if named:
        try:
            common = (gitdir / named).resolve()
        except (OSError, RuntimeError, ValueError):
            return found
        if common.is_dir() and common != gitdir:
            found.append(common)
    return found


def config_named_paths(workspace: Path) -> list[Path]:
    """Files and directories of the workspace that the repository's git configuration has git
    read as configuration or run: ``core.hooksPath``'s directory (husky's ``.husky/_``, ignored,
    so `git status` shows nothing), ``include.path`` and ``includeIf.*.path`` targets (a tracked
    ``.gitconfig``), ``core.fsmonitor``'s program. A person's next `git status` or `git commit`
    runs what is in them: they are control files like ``.git/hooks``.

    A path the configuration names in the person's checkout is taken at the same place in the
    workspace (an agent's worktree: where its branch, merged, would put it).
    """
    found: list[Path] = []
    try:
        done = subprocess.run(["git", "-C", str(workspace), "config", "--null", "--show-origin", "--show-scope",
                               "--get-regexp", r"^(core\.hookspath|core\.fsmonitor|include\.path|includeif\..*\.path)$"],
                              capture_output=True, env=git_env(), timeout=30, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return found
    fields = done.stdout.decode("utf-8", "surrogateescape").split("\0")
    # Where hooks run: the top of the worktree the workspace is in (a run may be on a subdirectory).
    here = next((p for p in (workspace, *workspace.parents) if os.path.lexists(p / ".git")), workspace)
    dirs = git_dirs(here)
    top = dirs[-1].parent if dirs and dirs[-1].name == ".git" else here  # the person's checkout
    for scope, origin, pair in zip(fields[0::3], fields[1::3], fields[2::3]):
        key, _, value = pair.partition("\n")
        if scope == "command" or not value or value in ("true", "false"):
            continue
        if value.startswith("~"):
            continue  # in a home: hidden from commands, not the workspace's
        if key.endswith(".path"):  # relative to the file that includes it
            base = (here / origin.removeprefix("file:")).parent if origin.startswith("file:") else here
        else:
            base = here  # where hooks run
        try:
            path = Path(os.path.normpath(base / value))
            rel = path.relative_to(top) if path.is_relative_to(top) else path.relative_to(here)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] != ".git" and (here / rel).is_relative_to(workspace):
            found.append(here / rel)
    return found


def pointer_text(dot: Path) -> str | None:
    """The text of a ``.git`` file as git takes it (None: not a regular file, or unreadable):
    its first 8 KiB at most (a sparse gigabyte costs a command nothing, and would cost the guard
    its memory; git refuses a pointer that long), up to a NUL (where git's C string ends)."""
    try:
        fd = os.open(dot, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 8192)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def _pointed_to(dot: Path) -> Path | None:
    """Where a ``.git`` link, or a ``.git`` file's ``gitdir:`` line, sends git (None: it is
    neither, or cannot be read)."""
    try:
        if dot.is_symlink():
            return dot.resolve()
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop
        return None
    text = pointer_text(dot)
    if text is None or not text.startswith("gitdir:"):
        return None
    try:
        return (dot.parent / text.removeprefix("gitdir:").strip()).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop
        return None


def looks_like_gitdir(path: Path, adding: str | None = None) -> bool:
    """Whether git would take ``path`` for a git directory (a bare repository, or what a ``.git``
    file points to): a ``HEAD`` beside ``objects`` and ``refs``, or beside a ``commondir`` naming
    them (git's own test, but for whether ``HEAD`` parses). ``adding``: the name of an entry
    about to be made in ``path``."""
    def has(name: str) -> bool:
        return name == adding or os.path.lexists(path / name)
    return has("HEAD") and (has("commondir") or (has("objects") and has("refs")))


def _gitdirs_among(workspace: Path, files: Iterable[str], own: Sequence[Path]) -> list[Path]:
    """The git directories other than ``own`` (and those inside them) holding one of ``files``
    (paths relative to ``workspace``, as :func:`toka.sandbox.snapshot` lists them)."""
    found: list[Path] = []
    roots = set(own)  # a set: with thousands of nested repositories, comparing each to each took minutes
    for rel in files:
        if rel != "HEAD" and not rel.endswith("/HEAD"):
            continue
        gitdir = (workspace / rel).parent
        try:
            if not looks_like_gitdir(gitdir):
                continue
            real = gitdir.resolve()
        except (OSError, RuntimeError, ValueError):  # a link loop on the way
            continue
        if real in roots or not roots.isdisjoint(real.parents):
            continue
        found.append(gitdir)
    return sorted(found)


@dataclass(frozen=True)
class _Entry:
    mode: int
    content: bytes | None
    """None for a directory."""


def _control_snapshot(gitdir: Path, budget: list[int] | None = None) -> dict[Path, _Entry]:
    """The control files of ``gitdir``. A link among them is an entry of its own, never followed:
    a command may have made one (``modules`` -> a directory of the host), and what the guard reads
    there it would also put back, or remove, there."""
    budget = [_SNAPSHOT_KEPT] if budget is None else budget  # bytes of content it may still keep
    found: dict[Path, _Entry] = {}
    for name in CONTROL_FILES:
        _add(found, budget, gitdir / name)
    for name in CONTROL_DIRS:
        root = gitdir / name
        if name == "modules":  # submodules' own git directories: only their control files
            if _real_dir(root):
                for sub in _nested_gitdirs(root):
                    found.update(_control_snapshot(sub, budget))
            else:
                _add(found, budget, root)
            continue
        if name == "worktrees":  # linked worktrees' git directories: their index and refs move
            _add(found, budget, root)
            if _real_dir(root):
                for sub in sorted(root / n for n in _listing(root)):
                    if not _real_dir(sub):
                        _add(found, budget, sub)
                    elif not _agent_worktree(sub):
                        for control in CONTROL_FILES:
                            _add(found, budget, sub / control)
            continue
        _add_tree(found, budget, root)
    return found


def _add_tree(found: dict[Path, _Entry], budget: list[int], root: Path) -> None:
    """``root``'s entry and, for a directory (not a link to one), every entry under it."""
    _add(found, budget, root)
    if _real_dir(root):
        for dirpath, dirnames, filenames in _walk(root):  # links inside are listed, not followed
            for n in (*dirnames, *filenames):
                _add(found, budget, Path(dirpath, n))


def _named_snapshot(workspace: Path, named: Sequence[Path], budget: list[int]) -> dict[Path, _Entry]:
    """The entries of the workspace's files and directories git's configuration names; none read
    through a link (one is an entry of its own)."""
    found: dict[Path, _Entry] = {}
    for path in named:
        if not _linked_between(workspace, path.parent):
            _add_tree(found, budget, path)
    return found


def _listing(directory: Path) -> list[str]:
    """The names in ``directory``; one its owner made unreadable (``chmod 0311 hooks``: enterable,
    not listable, so a walk saw no hook in it) is made readable to its owner first."""
    try:
        return os.listdir(directory)
    except PermissionError:
        info = directory.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise
        os.chmod(directory, stat.S_IMODE(info.st_mode) | stat.S_IRWXU)  # raises if not ours: the check fails
        return os.listdir(directory)


def _walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root)`` (links listed, never followed), where no directory is skipped unseen:
    one made unreadable is made readable (:func:`_listing`), one that stays so fails the check."""
    pending = [root]
    while pending:
        directory = pending.pop()
        dirnames, filenames = [], []
        for name in sorted(_listing(directory)):
            path = directory / name
            (dirnames if stat.S_ISDIR(path.lstat().st_mode) else filenames).append(name)
        yield str(directory), dirnames, filenames
        pending += [directory / d for d in reversed(dirnames)]


def _real_dir(path: Path) -> bool:
    """A directory, not a link to one."""
    return path.is_dir() and not path.is_symlink()


def _linked_between(root: Path, path: Path) -> bool:
    """Whether ``path`` is outside ``root``, or a link stands between them (``path`` included):
    what the guard would read or change there is elsewhere, perhaps on the host."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return True
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            return True
    return False


def _agent_worktree(admin: Path) -> bool:
    """Whether ``admin`` (under ``worktrees/``) is the git directory of an agent's worktree, which
    the runtime adds and removes while other agents' commands run (see :mod:`toka.branches`)."""
    return "/.toka/worktrees/" in (pointer_text(admin / "gitdir") or "")


def _nested_gitdirs(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in _walk(root):  # not into links: they are listed as names
        if "HEAD" in filenames and "objects" in dirnames:
            yield Path(dirpath)
            dirnames[:] = [d for d in dirnames if d == "modules"]


def _add(found: dict[Path, _Entry], budget: list[int] | None, path: Path) -> None:
    """``path``'s entry: a directory's mode, a link's target, a file's content while ``budget``
    (bytes the snapshot may still keep; None: no bound) lasts."""
    try:
        st = path.lstat()
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        found[path] = _Entry(stat.S_IMODE(st.st_mode), None)
    elif stat.S_ISLNK(st.st_mode):
        found[path] = _Entry(st.st_mode, os.fsencode(os.readlink(path)))  # any bytes, UTF-8 or not
    elif stat.S_ISREG(st.st_mode) and (st.st_size > _CONTENT_KEPT or (budget is not None and st.st_size > budget[0])):
        # Not read: a sparse gigabyte, or two hundred sparse files of 4 MiB, cost a command nothing.
        # Known by its size, time and inode; one a command changed cannot be put back, and goes
        # (see _restore).
        found[path] = _Entry(st.st_mode, b"%s%d:%d:%d" % (_LARGE, st.st_size, st.st_mtime_ns, st.st_ino))
    else:
        try:
            found[path] = _Entry(st.st_mode, path.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
        except OSError:
            found[path] = _Entry(st.st_mode, b"")
        if budget is not None:
            budget[0] -= st.st_size


#: The most of a control file the guard keeps to put back (hooks and configs are a few KB).
_CONTENT_KEPT = 4 * 2**20
#: The most content one snapshot keeps in all (hooks and configs of a few repositories: far less).
_SNAPSHOT_KEPT = 32 * 2**20
_LARGE = b"\0toka-large-file:"


@dataclass
class GitGuard:
    """The workspace's git control files before a command, to check (and restore) after it."""

    workspace: Path
    dirs: list[Path]
    """The workspace's own git directories."""
    before: dict[Path, _Entry] = field(default_factory=dict)
    nested: dict[Path, dict[Path, _Entry]] = field(default_factory=dict)
    """The control files of the other git directories the workspace held (nested repositories)."""
    state: Path | None = None
    """The runtime's state directory, where no git directory of the workspace may be."""
    named: list[Path] = field(default_factory=list)
    """The workspace's files git's configuration names (:func:`config_named_paths`)."""

    @classmethod
    def capture(cls, workspace: Path, files: Iterable[str] = (), state: Path | None = None) -> GitGuard:
        """The control files now. ``files``: the workspace's files (relative paths), among which
        the git directories other than its own are found."""
        dirs = git_dirs(workspace)
        budget = [_SNAPSHOT_KEPT]  # for all of them: thousands of nested repositories cost nothing to make
        before: dict[Path, _Entry] = {}
        for d in dirs:
            before.update(_control_snapshot(d, budget))
        if (workspace / ".git").is_file():  # a worktree's pointer to its git directory
            _add(before, None, workspace / ".git")
        nested = {d: _control_snapshot(d, budget)
                  for d in _gitdirs_among(workspace, files, [d.resolve() for d in dirs])}
        named = config_named_paths(workspace)
        before.update(_named_snapshot(workspace, named, budget))
        return cls(workspace, dirs, before, nested, state, named)

    def check(self, changed: Sequence[str], files: Iterable[str] = ()) -> list[str]:
        """Undo what the command changed in git control files; return those paths (empty: nothing).

        ``changed`` lists the workspace files the command changed and ``files`` those there are
        now (relative paths): git directories that are new among them are held to what ``git
        init`` writes.
        """
        files = list(files)
        violations: list[str] = []
        failed: list[BaseException] = []
        # Each part runs whatever the others met: one tripped by what the command left (a link
        # git never wrote) must not leave the rest unchecked. The own git directories come first;
        # pointers out before anything is read in nested git directories (one may now be a link
        # out of the workspace).
        budget = [_SNAPSHOT_KEPT]
        for part in (lambda: self._check_own(budget), lambda: self._pointers_out(files),
                     lambda: self._check_nested(failed, budget),
                     lambda: self._check_todos(changed), lambda: self._check_new(changed, files)):
            try:
                violations += part()
            except Exception as e:
                failed.append(e)
        if failed:
            undone = f"; undone: {', '.join(sorted(set(violations)))}" if violations else ""
            raise RuntimeError(f"{type(failed[0]).__name__}: {failed[0]}{undone}") from failed[0]
        return sorted(set(violations))

    def _check_own(self, budget: list[int]) -> list[str]:
        after: dict[Path, _Entry] = {}
        replaced = [d for d in self.dirs if d.is_symlink()]  # the git directory itself, moved away for a link
        for d in self.dirs:
            if d not in replaced:
                after.update(_control_snapshot(d, budget))
        if self.workspace / ".git" in self.before:
            _add(after, None, self.workspace / ".git")
        after.update(_named_snapshot(self.workspace, self.named, budget))
        violations = [self._shown(path) for path in _differing(self.before, after)]
        for d in replaced:  # nothing is read or put back through the link: it goes, and the run stops
            violations.append(self._shown(d))
            d.unlink()
        if violations:
            # Each control file once, under the first of its roots: an agent worktree's git directory
            # lies inside the repository's, and the worktree's .git pointer in the workspace. Those of a
            # git directory replaced by a link are not put back (the link is gone; the run stops).
            roots = [*self.dirs, self.workspace]

            def under(root: Path, entries: dict[Path, _Entry]) -> dict[Path, _Entry]:
                return {p: e for p, e in entries.items()
                        if next((r for r in roots if p.is_relative_to(r)), None) == root}

            for root in roots:
                if root not in replaced:
                    _restore(under(root, self.before), under(root, after), root=root)
        return violations

    def _check_nested(self, failed: list[BaseException], budget: list[int]) -> list[str]:
        """The git directories the workspace held before: what git init (or everyday use) writes
        is theirs to change. One that cannot be compared is left as it is (a person's clone: its
        hooks, config and submodules are theirs), and the check fails naming it."""
        violations: list[str] = []
        for gitdir, was in self.nested.items():
            try:
                if not os.path.lexists(gitdir):  # removed (a nested clone deleted): nothing runs from it
                    continue
                if _linked_between(self.workspace, gitdir):  # nothing is read or put back through a link
                    if gitdir.is_symlink():
                        violations.append(self._shown(gitdir))
                        _remove(gitdir, root=self.workspace)
                    continue
                now = _control_snapshot(gitdir, budget)
                unsafe = [path for path in _differing(was, now)
                          if not _harmless(gitdir, path, was.get(path), now.get(path))]
                if unsafe:
                    violations += [self._shown(path) for path in unsafe]
                    _restore(was, now, root=gitdir)
            except Exception as e:
                failed.append(RuntimeError(f"{self._shown(gitdir)}: {type(e).__name__}: {e}"))
        return violations

    def _check_todos(self, changed: Sequence[str]) -> list[str]:
        violations: list[str] = []
        for gitdir in self._todo_dirs(changed):
            for name in _TODO_FILES:
                todo = gitdir / name
                try:
                    if _linked_between(gitdir, todo) or not todo.is_file():
                        continue
                    # A todo list of a real rebase is small; one too large to read is no less a threat.
                    if todo.stat().st_size > _CONTENT_KEPT or _EXEC_LINE.search(todo.read_bytes()):
                        violations.append(self._shown(todo))
                        _remove(todo, root=gitdir)
                except OSError:
                    continue
        return violations

    def _check_new(self, changed: Sequence[str], files: list[str]) -> list[str]:
        # Those there before the command (a person's clone in the workspace) are checked against
        # what they held (_check_nested): not held to what `git init` writes, which would strip them.
        known = {d.resolve() for d in (*self.dirs, *self.nested)}
        new = {d for d in self._new_gitdirs(changed) if d.resolve() not in known}
        new |= set(_gitdirs_among(self.workspace, files, list(known)))
        violations: list[str] = []
        for gitdir in sorted(new):
            violations += self._untrusted(gitdir)
        return violations

    def _shown(self, path: Path) -> str:
        return os.path.relpath(path, self.workspace) if path.is_relative_to(self.workspace) else str(path)

    def _pointers_out(self, files: Iterable[str]) -> list[str]:
        """``.git`` files and links in the workspace (its own aside) that point outside it, or into
        the runtime's state: git would use a directory there, which no check here sees. Removed."""
        root = self.workspace.resolve()
        own = [d.resolve() for d in self.dirs]
        found: list[str] = []
        for rel in files:
            if rel != ".git" and not rel.endswith("/.git"):
                continue
            dot = self.workspace / rel
            if dot in self.before:  # the worktree's own pointer: compared with the control files
                continue
            target = _pointed_to(dot)
            if target is None:
                continue
            if any(target.is_relative_to(d) for d in own):  # a submodule's, inside the repository's own
                continue
            if not target.is_relative_to(root) or (self.state is not None and target.is_relative_to(self.state.resolve())):
                found.append(rel)
                _remove(dot, root=self.workspace)
        return found

    def _todo_dirs(self, changed: Sequence[str]) -> list[Path]:
        found = {*self.dirs}
        for rel in changed:
            parts = Path(rel).parts
            for i, part in enumerate(parts):
                if part in ("rebase-merge", "sequencer") and i > 0:
                    found.add(self.workspace.joinpath(*parts[:i]))
        return sorted(found)

    def _new_gitdirs(self, changed: Sequence[str]) -> list[Path]:
        """Git directories (``.git`` anywhere, or what a new ``.git`` file points to) the command touched."""
        own = {d.resolve() for d in self.dirs}
        found: set[Path] = set()
        for rel in changed:
            parts = Path(rel).parts
            for i, part in enumerate(parts):
                if part != ".git":
                    continue
                dot = self.workspace.joinpath(*parts[:i + 1])
                target = dot
                if dot.is_file() and not dot.is_symlink():
                    target = dot.parent / (pointer_text(dot) or "").removeprefix("gitdir:").strip()
                try:
                    real = target.resolve()
                except (OSError, RuntimeError, ValueError):  # a link loop: no git directory, no crash of the check
                    break
                # One outside the workspace (or reached through a link), or inside the repository's own
                # git directories (a submodule's, a linked worktree's: read-only to commands, and the
                # person's), is no directory a command made: nothing there is read or removed.
                if (not any(real.is_relative_to(d) for d in own) and target.is_dir()
                        and not _linked_between(self.workspace, Path(os.path.normpath(target)))):
                    found.add(Path(os.path.normpath(target)))
                break
        return sorted(found)

    def _untrusted(self, gitdir: Path) -> list[str]:
        """What in a command-made git directory goes beyond ``git init``; removed as it is found."""
        if _linked_between(self.workspace, gitdir):
            return []  # not the workspace's: reached through a link, whose pointer _pointers_out removes
        bad: list[str] = []
        hooks = gitdir / "hooks"
        if hooks.is_symlink():
            bad.append(self._shown(hooks))
            _remove(hooks, root=gitdir)
        elif hooks.is_dir():
            for dirpath, _, filenames in _walk(hooks):
                for n in filenames:
                    if not n.endswith(".sample") or Path(dirpath, n).is_symlink():
                        bad.append(self._shown(Path(dirpath, n)))
                        _remove(Path(dirpath, n), root=gitdir)
        for name in ("config", "config.worktree"):
            path = gitdir / name
            pairs = None if path.is_symlink() else _read_config(path)
            if path.is_symlink() or pairs is None or any(not _INIT_KEY.match(k) for k, _ in pairs):
                bad.append(self._shown(path))
                _remove(path, root=gitdir)
        for name in ("commondir", "info/attributes"):
            if os.path.lexists(gitdir / name):
                bad.append(self._shown(gitdir / name))
                _remove(gitdir / name, root=gitdir)
        for sub in (gitdir / "modules", gitdir / "worktrees"):
            if os.path.lexists(sub):
                bad.append(self._shown(sub))
                _remove(sub, root=gitdir)
        return bad


def _remove(path: Path, *, root: Path) -> None:
    """Remove ``path`` (a link itself, never what it points to), when it is inside ``root`` with
    no link on the way: the guard changes nothing outside what it watches."""
    if _linked_between(root, path.parent):
        return
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _differing(before: dict[Path, _Entry], after: dict[Path, _Entry]) -> list[Path]:
    """The control files that differ between two snapshots, shallowest first."""
    return [path for path in sorted(before.keys() | after.keys(), key=lambda p: (len(p.parts), str(p)))
            if before.get(path) != after.get(path)]


def _restore(before: dict[Path, _Entry], after: dict[Path, _Entry], *, root: Path) -> None:
    """Put the control files ``after`` lists back as ``before`` had them, inside ``root`` only.

    Shallowest first: a directory a command replaced with a link is a directory again before
    anything is written in it; a path a link still stands before is left alone.
    """
    for path in sorted(after.keys() - before.keys(), key=lambda p: -len(p.parts)):
        _remove(path, root=root)
    for path, entry in sorted(before.items(), key=lambda kv: len(kv[0].parts)):
        if after.get(path) == entry or _linked_between(root, path.parent):
            continue
        if entry.content is None:
            if not path.is_dir() or path.is_symlink():
                _remove(path, root=root)
            path.mkdir(exist_ok=True)
            os.chmod(path, entry.mode)
        elif stat.S_ISLNK(entry.mode):
            _remove(path, root=root)
            os.symlink(os.fsdecode(entry.content), path)
        elif entry.content.startswith(_LARGE):  # not kept: what the command left goes
            _remove(path, root=root)
        else:
            _remove(path, root=root)
            path.parent.mkdir(parents=True, exist_ok=True)  # no link on the way: checked above
            path.write_bytes(entry.content)
            os.chmod(path, stat.S_IMODE(entry.mode))


def _harmless(gitdir: Path, path: Path, was: _Entry | None, now: _Entry | None) -> bool:
    """Whether a change to a control file of a nested repository is what ``git init``, ``git
    config user.name``, ``git remote add`` or a sample hook would make: nothing git runs."""
    rel = path.relative_to(gitdir)
    if rel.parts and rel.parts[0] == "hooks":
        return now is None or now.content is None or rel.name.endswith(".sample")
    if rel.as_posix() == "info/exclude" or (rel.as_posix() == "info" and now is not None and now.content is None):
        return True
    if rel.name in ("config", "config.worktree") and len(rel.parts) == 1:
        pairs = _read_config(path)
        if pairs is None:
            return False
        before = set(_pairs_from(was.content)) if was is not None and was.content else set()
        return all(_INIT_KEY.match(k) for k, v in pairs if (k, v) not in before)
    return False


def _pairs_from(content: bytes) -> list[tuple[str, str]]:
    """The (key, value) pairs of config file content (as :func:`_read_config` reads a file)."""
    with tempfile.NamedTemporaryFile(suffix=".config") as f:
        f.write(content)
        f.flush()
        return _read_config(Path(f.name)) or []


def protected_paths(workspace: Path) -> tuple[list[Path], list[Path]]:
    """For the sandbox: (git directories to pin, control paths to make read-only) inside the workspace.

    Missing ``hooks`` and ``info`` directories are created first (``git init`` makes them
    too): a missing one could otherwise be created by the command.
    """
    pinned: list[Path] = []
    readonly: list[Path] = []
    if (workspace / ".git").is_file() and not (workspace / ".git").is_symlink():
        readonly.append(workspace / ".git")  # a worktree's pointer: redirected, git would run elsewhere
    for gitdir in git_dirs(workspace):
        if not gitdir.resolve().is_relative_to(workspace.resolve()):
            continue  # outside the workspace the whole host is read-only already
        pinned.append(gitdir)
        for name in ("hooks", "info"):
            try:
                (gitdir / name).mkdir(exist_ok=True)
            except OSError:
                pass
        readonly += [gitdir / n for n in (*CONTROL_FILES, *CONTROL_DIRS) if (gitdir / n).exists()]
    return pinned, readonly
