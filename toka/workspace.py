"""The directory an agent works in, and the rule that every path stays inside it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO, Literal, NoReturn

from .errors import ConfigError, PathRefused
from .gitguard import config_named_paths, looks_like_gitdir

__all__ = ["STATE_DIR_NAME", "PathRefused", "Workspace"]

#: Where toka keeps run records, results and audit logs inside a workspace.
STATE_DIR_NAME = ".toka"

# "*" matches the .gitignore itself too: git shows nothing of the state directory, and the
# person's own .gitignore is never edited.
_GITIGNORE = "# written by toka: its run state is not part of the repository\n*\n"


class Workspace:
    """A root directory; :meth:`resolve` maps model-supplied paths into it or refuses them.

    The state directory (``.toka``) holds a ``.gitignore`` of ``*``, so it never shows up as
    untracked in the workspace's repository: :meth:`make_state_dir` writes it, and a ``.toka``
    found without one (made by an older toka, or by a Prefect worker's first task) gets it here.
    """

    def __init__(self, root: str | Path, *, state_dir: str | Path | None = None,
                 outputs: str | Path | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"workspace {str(root)!r} is not a directory")
        self.root = root.resolve()
        self.state_dir = (Path(state_dir) if state_dir else self.root / STATE_DIR_NAME).resolve()
        #: The saved outputs the model may read back: an agent's own in its run (``outputs``), or all.
        self.outputs = Path(outputs).resolve() if outputs else self.state_dir / "outputs"
        if self.state_dir.name == STATE_DIR_NAME and self.state_dir.is_dir():
            self._keep_out_of_git()

    def make_state_dir(self) -> Path:
        """Create the state directory (if needed), kept out of git; return it."""
        created = not self.state_dir.exists()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # A state directory named by the caller may be a folder of theirs: only ours is ignored.
        if created or self.state_dir.name == STATE_DIR_NAME:
            self._keep_out_of_git()
        return self.state_dir

    def _keep_out_of_git(self) -> None:
        ignore = self.state_dir / ".gitignore"
        try:
            if not ignore.exists():
                ignore.write_text(_GITIGNORE, encoding="utf-8")
        except OSError:  # read-only here (another user's workspace, inside a sandbox): nothing to fix
            pass

    def resolve(self, path: str, *, kind: str = "any") -> Path:
        """The real path of workspace-relative ``path``.

        Refused: absolute paths, ``..`` escapes, symlinks that resolve
        outside, the state directory, and anything that is not a regular file
        or directory (devices, sockets, FIFOs). ``kind`` may demand ``file``
        or ``dir``; ``new`` allows a path that does not exist yet.

        Raises:
            PathRefused: with a reason the model can act on.
        """
        if not isinstance(path, str) or not path.strip():
            raise PathRefused("a path must be a non-empty, workspace-relative string")
        if "\x00" in path:
            raise PathRefused("a path must not contain NUL bytes")
        if os.path.isabs(path) or path.startswith("~"):
            raise PathRefused(f"{path!r} is absolute; use a path relative to the workspace root")
        # Saved tool outputs (too long for the model at once) may be read back as files, nothing
        # more, and only the agent's own (``outputs``); they are named ".toka/outputs/..." also
        # where the root is an agent's worktree.
        parts = Path(path).parts
        saved = kind == "file" and parts[:2] == (STATE_DIR_NAME, "outputs")
        try:
            real = ((self.state_dir / "outputs").joinpath(*parts[2:]) if saved else self.root / path).resolve()
        except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise PathRefused(f"{path!r} cannot be resolved: {e}") from None
        if saved and not real.is_relative_to(self.outputs):
            raise PathRefused(f"{path!r} is not one of this agent's saved outputs in this run")
        if not saved and not real.is_relative_to(self.root):
            raise PathRefused(f"{path!r} resolves outside the workspace")
        if not saved and self.is_state(real):
            raise PathRefused(f"{path!r} is inside toka's own state directory")
        if not real.exists():
            if kind == "new":
                return real
            raise PathRefused(f"{path!r} does not exist")
        try:
            mode = real.stat().st_mode
        except OSError as e:  # a symlink loop on Python 3.13+, where resolve() no longer raises
            raise PathRefused(f"{path!r} cannot be resolved: {e.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise PathRefused(f"{path!r} is not a regular file or directory")
        if kind == "file" and not stat.S_ISREG(mode):
            raise PathRefused(f"{path!r} is a directory, not a file")
        if kind == "dir" and not stat.S_ISDIR(mode):
            raise PathRefused(f"{path!r} is a file, not a directory")
        return real

    def resolve_for_write(self, path: str) -> Path:
        """Like :meth:`resolve` for a file to write; version-control internals are refused too.

        Writing ``.git/config`` or ``.git/hooks`` would make later git commands run
        programs of the model's choosing.
        """
        real = self.resolve(path, kind="new")
        if any(part == ".git" for part in real.relative_to(self.root).parts):
            raise PathRefused(f"{path!r} is inside .git; version-control internals are not writable")
        for parent in real.parents:  # a bare repository, or what a .git file points to, under any name
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            if looks_like_gitdir(parent, adding=real.relative_to(parent).parts[0]):
                raise PathRefused(f"{path!r} is inside a git directory ({self.relative(parent)}); "
                                  "version-control internals are not writable")
        for named in config_named_paths(self.root):
            if real == named or real.is_relative_to(named):
                raise PathRefused(f"{path!r} is a file git's configuration has git read or run "
                                  f"({self.relative(named)}: its hooks or an included configuration); "
                                  "not writable, like .git/hooks")
        return real

    def is_state(self, real: Path) -> bool:
        """Whether resolved ``real`` is toka's state, off limits to the model. The root may be inside
        the state directory (an agent's worktree): then only the rest of it is."""
        return real.is_relative_to(self.state_dir) and not self.root.is_relative_to(self.state_dir)

    def saved_output_name(self, path: Path) -> str:
        """How the model names a saved output (under the state directory's ``outputs``) to read it."""
        return f"{STATE_DIR_NAME}/outputs/{path.relative_to(self.state_dir / 'outputs').as_posix()}"

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, with forward slashes (``.`` for the root); a saved output
        by the name the model reads it with."""
        if not path.is_relative_to(self.root) and path.is_relative_to(self.state_dir / "outputs"):
            return self.saved_output_name(path)
        rel = path.relative_to(self.root).as_posix()
        return rel or "."

    def open(self, real: Path, mode: Literal["rb", "wb"]) -> BinaryIO:
        """Open ``real``, a path :meth:`resolve` returned, without following a symbolic link on the way.

        :meth:`resolve` returns a path with every link resolved, so a link met now was put there
        since: another agent's command swapping a directory for a link out of the workspace while
        this call ran. Each directory is opened below the one before (``O_NOFOLLOW``), so what is
        opened is the checked file or nothing. ``wb`` creates missing directories and the file.

        A file with more than one name (hard links) is not written: another name may be outside
        the workspace (a link the person made; a sandboxed command cannot make one across the
        sandbox's mounts), and writing through it would change that file too. It is read: what
        it holds is what the person put in the workspace.

        Raises:
            PathRefused: a link or something other than a regular file is in the way, or a file to
                write has other names.
        """
        saved = not real.is_relative_to(self.root) and real.is_relative_to(self.outputs)
        anchor = self.outputs if saved else self.root
        try:
            parts = real.relative_to(anchor).parts
        except ValueError:
            raise PathRefused(f"{str(real)!r} is outside the workspace") from None
        if not parts:
            raise PathRefused(f"{self.relative(real)!r} is a directory, not a file")
        name = self.relative(real)
        writing = mode == "wb"
        directory = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                inner = self._enter(directory, part, name, create=writing)
                os.close(directory)
                directory = inner
            # Non-blocking: a FIFO swapped in must fail the open, not hang it (cleared below).
            flags = (os.O_WRONLY if writing else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                fd = os.open(parts[-1], flags, dir_fd=directory)
            except FileNotFoundError as e:
                if not writing:
                    raise self._changed(name, e) from None
                fd = -1  # a new file: made whole when written (see _Replacing)
            except OSError as e:
                raise self._changed(name, e) from None
            if fd == -1:
                return _Replacing(os.dup(directory), parts[-1], name, 0o666 & ~_umask(), None)  # type: ignore[return-value]
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                raise PathRefused(f"{name!r} is not a regular file")
            if not writing:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                return os.fdopen(fd, mode)
            if info.st_nlink > 1:
                os.close(fd)
                raise PathRefused(f"{name!r} has {info.st_nlink} names (hard links), and another may be outside "
                                  "the workspace: it is not written")
            # Never truncated: the new text replaces it whole (see _Replacing); its owner and mode stay,
            # but for the set-id bits (a file rewritten by another loses them, as the kernel does).
            owner = (info.st_uid, info.st_gid)
            os.close(fd)
            return _Replacing(os.dup(directory), parts[-1], name,  # type: ignore[return-value]
                              stat.S_IMODE(info.st_mode) & ~(stat.S_ISUID | stat.S_ISGID), owner)
        finally:
            os.close(directory)

    def _enter(self, directory: int, part: str, name: str, *, create: bool) -> int:
        """The directory ``part`` below open ``directory``, opened without following a link."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                return os.open(part, flags, dir_fd=directory)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o777, dir_fd=directory)
                except FileExistsError:
                    pass
                return os.open(part, flags, dir_fd=directory)
        except OSError as e:
            raise self._changed(name, e) from None

    @staticmethod
    def _changed(name: str, error: OSError) -> PathRefused:
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            return PathRefused(f"{name!r} changed while in use: a symbolic link or special file is now in its way")
        return PathRefused(f"{name!r}: {error.strerror or error}")

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"


class _Replacing:
    """A file written beside ``name`` in ``directory`` (an open descriptor, owned) that takes its
    place when closed: a kill while it is written leaves the old text whole (an agent's 6 MB file,
    truncated then killed, was committed empty), and a new file appears whole or not at all.
    Nameless while written (``O_TMPFILE``) where the file system allows it, so a kill leaves
    nothing behind; named ``.toka-write-*`` for the moment it takes the old one's place, else.
    Where the directory may not be written (only the file), the file is written in place."""

    def __init__(self, directory: int, name: str, shown: str, mode: int, owner: tuple[int, int] | None) -> None:
        self._directory, self._name, self._shown, self._temp = directory, name, shown, ""
        self._fd = -1
        try:
            try:
                if not _PROC_FDS:  # the nameless file is given its name through /proc/self/fd
                    raise OSError("no /proc")
                self._fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=directory)
            except (OSError, AttributeError):  # no O_TMPFILE there
                self._temp = _temp_name()
                self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   mode, dir_fd=directory)
        except PermissionError:
            if owner is None:
                self._fail(f"{shown!r} cannot be made: its directory may not be written")
            # The file may be written, its directory not: in place, as before (not whole on a kill).
            self._fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_TRUNC, dir_fd=directory)
            self._temp = None  # type: ignore[assignment]
            return
        except OSError as e:
            self._fail(f"{shown!r}: {e.strerror or e}")
        os.fchmod(self._fd, mode)  # as the file had it (the umask aside)
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            with contextlib.suppress(PermissionError):  # only root may give a file away
                os.fchown(self._fd, *owner)

    def _fail(self, message: str) -> NoReturn:
        with contextlib.suppress(OSError):
            os.close(self._directory)
        self._directory = -1
        raise PathRefused(message)

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        return len(data)

    def __enter__(self) -> _Replacing:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        if self._directory == -1:
            return
        try:
            if self._temp == "":  # given a name for the moment it takes the other's place
                self._temp = _temp_name()
                os.link(f"/proc/self/fd/{self._fd}", self._temp, dst_dir_fd=self._directory, follow_symlinks=True)
            if self._temp is not None:
                os.rename(self._temp, self._name, src_dir_fd=self._directory, dst_dir_fd=self._directory)
        except OSError as e:
            self.abort()
            raise PathRefused(f"{self._shown!r} was not written: {e.strerror or e}") from None
        self._end()

    def abort(self) -> None:
        if self._directory == -1:
            return
        if self._temp:
            with contextlib.suppress(OSError):
                os.unlink(self._temp, dir_fd=self._directory)
        self._end()

    def _end(self) -> None:
        for fd in (self._fd, self._directory):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._directory = -1


_PROC_FDS = os.path.isdir("/proc/self/fd")


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _temp_name() -> str:
    # Short: beside a name of 255 bytes (the most a file system allows), a longer one would not fit.
    return f".toka-write-{os.urandom(4).hex()}"
