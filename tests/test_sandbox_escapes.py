"""Escapes an attack on the sandbox found, each attempted as root through ``Toolbox.call``.

A command an agent runs must not leave anything behind that runs on the host later
(git hooks and configuration), reach host services through Unix sockets, or read the
host's credentials. Each test makes the attempt the way an injected prompt would have a
model make it, then checks from the host that nothing got out.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from toka.commands import scrubbed_env
from toka.errors import SandboxViolation
from toka.gitguard import git_argv, run_git
from toka.sandbox import config_without_credentials, confinement, detect_host, git_configs_without_credentials

from .conftest import ROOT
from .test_sandbox import Agent, MakeAgent, _git_repo, make_agent, marker, processes_matching  # noqa: F401  (fixture)

HOST = detect_host()
needs_confinement = pytest.mark.skipif(not HOST.mountns, reason="needs a mount namespace (unshare -m)")
GIT_SCRIPT = ("script-execution", "git-access")


def person_uses_git(repo: Path, mark: Path) -> None:
    """What a person does the next morning: plain git, with the repository's own configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    for argv in (["git", "status"], ["git", "diff"], ["git", "x"], ["git", "checkout", "-q", "-b", "morning"],
                 ["git", "add", "-A"], ["git", "log", "-1"]):
        subprocess.run(argv, cwd=repo, env=env, capture_output=True, timeout=30)
    assert not mark.exists(), f"git ran a program an agent planted: {mark.read_text()}"


PLANT = """\
#!/bin/sh
# Everything a command could do to make the person's next git run a program.
M="{mark}"
printf '[core]\\n\\tfsmonitor = "echo fsmonitor >> $M; false"\\n\\tpager = "echo pager >> $M; cat"\\n[alias]\\n\\tx = "!echo alias >> $M"\\n[filter "e"]\\n\\tclean = "echo filter >> $M; cat"\\n' >> .git/config && echo CONFIG
git config core.sshCommand "echo ssh >> $M" 2>/dev/null && echo GITCONFIG
printf '#!/bin/sh\\necho hook >> "$M"\\n' > .git/hooks/post-checkout && chmod +x .git/hooks/post-checkout && echo HOOK
mkdir -p .git/hooks/x 2>/dev/null && echo HOOKDIR
echo '* filter=e' > .git/info/attributes && echo ATTRIBUTES
mv .git .git-old 2>/dev/null && echo RENAMED-GIT
rmdir .git/hooks .git/info 2>/dev/null && echo RMDIR
echo '* filter=e' > .gitattributes
echo done
"""


@needs_confinement
class TestGitControlFilesInTheSandbox:
    def test_a_script_cannot_plant_hooks_or_configuration(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        agent = make_agent(*GIT_SCRIPT, files={"README.md": "hello\n"})
        _git_repo(agent.root)
        config_before = (agent.root / ".git" / "config").read_bytes()
        mark = tmp_path / "host-ran-it"
        out = agent.run(agent.script("plant.sh", PLANT.format(mark=mark)))
        assert "done" in out.text, out.text
        for planted in ("CONFIG", "GITCONFIG", "HOOK\n", "HOOKDIR", "ATTRIBUTES", "RENAMED-GIT", "RMDIR"):
            assert planted not in out.text, out.text
        assert (agent.root / ".git" / "config").read_bytes() == config_before
        assert not (agent.root / ".git" / "hooks" / "post-checkout").exists()
        agent.audited("run_command", "allowed")
        person_uses_git(agent.root, mark)

    def test_git_add_and_commit_still_work_and_git_changes_are_reported(self, make_agent: MakeAgent) -> None:
        agent = make_agent(*GIT_SCRIPT, files={"README.md": "hello\n"})
        _git_repo(agent.root)
        (agent.root / "new.txt").write_text("x\n")
        assert not agent.run("git", "add", "new.txt").is_error
        out = agent.run("git", "commit", "-qm", "agent commit", "--author", "a <a@b.c>")
        assert not out.is_error, out.text
        log = subprocess.run(["git", "log", "--format=%s"], cwd=agent.root, capture_output=True, text=True)
        assert log.stdout.splitlines()[0] == "agent commit"
        record = agent.audited("run_command", "allowed")
        assert any(f.startswith(".git/") for f in record["files_changed"]), record["files_changed"]
        assert ".git/index" in record["files_changed"]

    def test_a_new_commondir_is_undone_and_stops_the_run(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        agent = make_agent(*GIT_SCRIPT, files={"README.md": "hello\n"})
        _git_repo(agent.root)
        mark = tmp_path / "host-ran-it"
        redirect = agent.script("redirect.sh", f"""\
            #!/bin/sh
            mkdir -p evil/hooks && cp -r .git/objects .git/refs .git/HEAD evil/
            printf '[core]\\n\\tfsmonitor = "echo x >> {mark}; false"\\n' > evil/config
            echo ../evil > .git/commondir && echo REDIRECTED
            """)
        with pytest.raises(SandboxViolation) as caught:
            agent.run(redirect)
        assert ".git/commondir" in str(caught.value) and caught.value.fatal
        assert not (agent.root / ".git" / "commondir").exists()
        record = agent.audited("run_command", "refused", "git control files")
        assert ".git/commondir" in record["files_changed"]
        person_uses_git(agent.root, mark)

    def test_pytest_conftest_cannot_plant_a_hook(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        mark = tmp_path / "host-ran-it"
        conftest = (f"import pathlib\np = pathlib.Path('.git/hooks/post-checkout')\n"
                    f"try:\n    p.write_text('#!/bin/sh\\necho x >> {mark}\\n'); p.chmod(0o755); print('PLANTED')\n"
                    f"except OSError as e:\n    print('refused', e)\n")
        agent = make_agent("python-test-execution", "git-access",
                           files={"conftest.py": conftest, "test_x.py": "def test_x():\n    pass\n"})
        _git_repo(agent.root)
        out = agent.run("python3", "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider")
        assert "PLANTED" not in out.text and "1 passed" in out.text, out.text
        person_uses_git(agent.root, mark)


def host_directory(path: Path) -> Path:
    """A directory of the host shaped like a git directory's control files, which no run may change."""
    for rel, text in {"hooks/keep-me": "a file of the host\n", "remotes/also-mine": "another\n",
                      "config": "[core]\n\tbare = true\n", "unrelated.txt": "untouched\n",
                      # a host repository (as under .git/modules), and a directory as under .git/worktrees
                      "alpha/HEAD": "ref: refs/heads/main\n", "alpha/objects/.keep": "", "alpha/refs/.keep": "",
                      "alpha/config": "[remote \"origin\"]\n\turl = https://example.com/alpha.git\n",
                      "alpha/hooks/keep-me": "", "app/config": "setting = 1\n"}.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def tree_of(path: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under ``path``: its mode and content (None for a directory)."""
    return {str(p.relative_to(path)): (p.lstat().st_mode, None if p.is_dir() else p.read_bytes())
            for p in sorted(path.rglob("*"))}


def violation(agent: Agent, name: str, body: str) -> SandboxViolation:
    """What a workspace script ``name`` that must stop the run raised."""
    with pytest.raises(SandboxViolation) as caught:
        agent.run(agent.script(name, body))
    return caught.value


def unsandboxed_repo(make_agent: MakeAgent) -> Agent:
    """An agent whose spec says ``sandbox: false`` (allowed by the run), in a git repository."""
    agent = make_agent(*GIT_SCRIPT, sandbox=False, allow_unsandboxed=True, files={"README.md": "hello\n"})
    _git_repo(agent.root)
    return agent


class TestGitControlFilesWithoutTheSandbox:
    """``sandbox: false`` (allowed by the run): the check after the command is the only layer."""

    def test_planted_hooks_and_config_are_undone_and_the_run_stops(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        agent = unsandboxed_repo(make_agent)
        config_before = (agent.root / ".git" / "config").read_bytes()
        mark = tmp_path / "host-ran-it"
        with pytest.raises(SandboxViolation) as caught:
            agent.run(agent.script("plant.sh", PLANT.replace("mv .git", "true")
                                   .format(mark=mark)))
        for path in (".git/config", ".git/hooks/post-checkout", ".git/info/attributes"):
            assert path in caught.value.paths
        assert (agent.root / ".git" / "config").read_bytes() == config_before
        assert not (agent.root / ".git" / "hooks" / "post-checkout").exists()
        assert not (agent.root / ".git" / "info" / "attributes").exists()
        record = agent.audited("run_command", "refused", "the change was undone")
        assert ".git/config" in record["files_changed"]
        person_uses_git(agent.root, mark)

    def test_a_command_cut_short_by_the_task_timeout_is_still_checked(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        agent = unsandboxed_repo(make_agent)
        mark = tmp_path / "host-ran-it"
        slow = agent.script("slow.sh", f"#!/bin/sh\nprintf '#!/bin/sh\\necho x >> {mark}\\n' > .git/hooks/post-checkout\n"
                                       "chmod +x .git/hooks/post-checkout\nsleep 30\n")

        async def cut_short() -> None:  # what the task's own timeout does to a running tool call
            await asyncio.wait_for(agent.toolbox.call("run_command", {"argv": [slow]}), timeout=1.5)

        with pytest.raises(SandboxViolation):
            asyncio.run(cut_short())
        assert not (agent.root / ".git" / "hooks" / "post-checkout").exists()
        person_uses_git(agent.root, mark)

    def test_a_nested_repository_may_hold_only_what_git_init_writes(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        agent = unsandboxed_repo(make_agent)
        fine = agent.script("fine.sh", "#!/bin/sh\nmkdir -p sub && cd sub && git init -q && echo ok\n")
        assert "ok" in agent.run(fine).text
        mark = tmp_path / "host-ran-it"
        caught = violation(agent, "evil.sh", f"#!/bin/sh\nprintf '[alias]\\n\\tx = !echo x >> {mark}\\n' >> sub/.git/config\n")
        assert "sub/.git/config" in caught.paths
        person_uses_git(agent.root / "sub", mark)

    def test_a_bare_repository_made_clean_then_armed_in_a_later_command_is_undone(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        # No path of the second command has a part named .git: the directory a .git file points
        # to is a git directory whatever its name, checked like the workspace's own from then on.
        agent = unsandboxed_repo(make_agent)
        mark = tmp_path / "host-ran-it"
        clean = agent.script("clean.sh", "#!/bin/sh\ngit init -q --bare evil && mkdir sub && "
                                         "echo 'gitdir: ../evil' > sub/.git && echo ok\n")
        assert "ok" in agent.run(clean).text
        caught = violation(agent, "arm.sh", f"""\
            #!/bin/sh
            printf '[core]\\n\\tfsmonitor = "echo fsmonitor >> {mark}; false"\\n\\tbare = false\\n\\tworktree = ../sub\\n' >> evil/config
            printf '[alias]\\n\\tx = "!echo alias >> {mark}"\\n' >> evil/config
            printf '#!/bin/sh\\necho hook >> {mark}\\n' > evil/hooks/post-checkout && chmod +x evil/hooks/post-checkout
            """)
        assert {"evil/config", "evil/hooks/post-checkout"} <= set(caught.paths)
        agent.audited("run_command", "refused", "changed git control files")
        assert "fsmonitor" not in (agent.root / "evil" / "config").read_text()
        assert not (agent.root / "evil" / "hooks" / "post-checkout").exists()
        person_uses_git(agent.root / "sub", mark)

    def test_a_git_directory_whose_head_comes_last_is_held_to_what_git_init_writes(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        # The armed config comes first, while the directory is not yet one git would use; the
        # command that makes it one changes no file of it but HEAD.
        agent = unsandboxed_repo(make_agent)
        mark = tmp_path / "host-ran-it"
        first = agent.script("first.sh", f"#!/bin/sh\nmkdir -p e/objects e/refs && "
                                         f"printf '[alias]\\n\\tx = \"!echo alias >> {mark}\"\\n' > e/config\n")
        assert agent.run(first).text.startswith("exit code: 0")
        caught = violation(agent, "last.sh", "#!/bin/sh\necho 'ref: refs/heads/main' > e/HEAD\n")
        assert "e/config" in caught.paths
        assert not (agent.root / "e" / "config").exists()
        person_uses_git(agent.root / "e", mark)

    @pytest.mark.parametrize("where", ["$HOME/evil", "/tmp/evil-outside"])
    def test_a_git_file_pointing_out_of_the_workspace_is_removed(
        self, make_agent: MakeAgent, tmp_path: Path, where: str
    ) -> None:
        # No check would see a git directory there (the private home is toka's state, kept from
        # one command to the next), so the pointer itself may not be.
        agent = unsandboxed_repo(make_agent)
        caught = violation(agent, "point.sh", f"#!/bin/sh\nmkdir -p sub && echo \"gitdir: {where}\" > sub/.git\n")
        assert caught.paths == ["sub/.git"]
        assert not (agent.root / "sub" / ".git").exists()

    def test_a_nested_repository_keeps_what_everyday_git_writes_and_loses_the_rest(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        agent = unsandboxed_repo(make_agent)
        mark = tmp_path / "host-ran-it"
        made = agent.script("made.sh", "#!/bin/sh\ngit init -q sub && git clone -q --mirror . build/upstream.git\n")
        assert agent.run(made).text.startswith("exit code: 0")
        configured = agent.script("configure.sh", "#!/bin/sh\ngit -C sub config user.name bob && "
                                                  "git -C sub remote add origin ../build/upstream.git && echo ok\n")
        assert "ok" in agent.run(configured).text
        assert "bob" in (agent.root / "sub" / ".git" / "config").read_text()
        caught = violation(agent, "arm.sh", f"#!/bin/sh\ngit -C sub config alias.x '!echo alias >> {mark}'\n")
        assert caught.paths == ["sub/.git/config"]
        config = (agent.root / "sub" / ".git" / "config").read_text()
        assert "alias" not in config and "bob" in config  # back to what it was before the command
        person_uses_git(agent.root / "sub", mark)

    def test_a_git_file_holding_a_nul_byte_does_not_stop_the_check_halfway(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        # The guard crashed on it (ValueError: embedded null byte) before it looked at the nested
        # repository the same command armed: its fsmonitor and alias ran on the person's `git status`.
        agent = unsandboxed_repo(make_agent)
        mark = tmp_path / "host-ran-it"
        caught = violation(agent, "arm.sh", f"""\
            #!/bin/sh
            git init -q tool && git -C tool config alias.st '!echo alias >> {mark}'
            git -C tool config core.fsmonitor 'echo fsmonitor >> {mark}; false'
            printf '#!/bin/sh\\necho hook >> {mark}\\n' > tool/.git/hooks/post-checkout
            chmod +x tool/.git/hooks/post-checkout
            mkdir -p zz && printf 'gitdir: x\\000y\\n' > zz/.git
            """)
        assert {"tool/.git/config", "tool/.git/hooks/post-checkout"} <= set(caught.paths)
        person_uses_git(agent.root / "tool", mark)

    def test_a_link_whose_target_is_not_utf8_does_not_stop_the_check(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        # The snapshot of the nested repository raised UnicodeEncodeError on the link: the run
        # stopped, but its armed fsmonitor stayed and ran on the person's `git status`.
        agent = unsandboxed_repo(make_agent)
        mark = tmp_path / "host-ran-it"
        assert agent.run(agent.script("init.sh", "#!/bin/sh\ngit init -q tool\n")).text.startswith("exit code: 0")
        caught = violation(agent, "arm.sh", f"""\
            #!/bin/sh
            git -C tool config core.fsmonitor 'echo fsmonitor >> {mark}; false'
            {sys.executable} -c "import os; os.symlink(b'\\xff', b'tool/.git/hooks/x')"
            """)
        assert "tool/.git/config" in caught.paths
        assert not os.path.lexists(agent.root / "tool" / ".git" / "hooks" / "x")
        person_uses_git(agent.root / "tool", mark)

    def test_a_sparse_git_file_is_not_read_whole(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        # A gigabyte of zeros costs the command nothing; read whole (twice, decoded), it took the
        # runtime 5 GB.
        import resource

        agent = unsandboxed_repo(make_agent)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = agent.run(agent.script("sparse.sh", "#!/bin/sh\nmkdir -p sub e/hooks && truncate -s 1G sub/.git && "
                                                  "git init -q nested && truncate -s 1G nested/.git/hooks/pre-push.sample"
                                                  " && echo made\n")).text
        assert "made" in out, out
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300 * 1024  # KiB: not the gigabyte

    def test_a_persons_nested_clone_used_by_a_command_keeps_its_config_and_hooks(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        # A clone the person had in the workspace before the run: a command's `git add` in it made
        # the guard take it for a new repository and strip it to what `git init` writes.
        agent = unsandboxed_repo(make_agent)
        upstream = tmp_path / "upstream"
        subprocess.run(["git", "init", "-q", str(upstream)], check=True)
        lib = agent.root / "vendor" / "lib"
        subprocess.run(["git", "clone", "-q", str(upstream), str(lib)], check=True, capture_output=True)
        subprocess.run(["git", "-C", str(lib), "config", "user.name", "Person"], check=True)
        hook = lib / ".git" / "hooks" / "pre-commit"
        hook.write_text("#!/bin/sh\nexit 0\n")
        hook.chmod(0o755)
        config = (lib / ".git" / "config").read_text()
        (lib / "new.txt").write_text("new\n")
        out = agent.run(agent.script("add.sh", "#!/bin/sh\ngit -C vendor/lib add -A && echo added\n")).text
        assert "added" in out, out
        assert (lib / ".git" / "config").read_text() == config
        assert hook.read_text() == "#!/bin/sh\nexit 0\n"

    def test_a_nested_git_directory_swapped_for_a_link_changes_nothing_where_it_points(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        # The guard compared the nested repository's control files through the link, then "put
        # them back" there: writing a config and setuid hooks into a host directory, and
        # deleting the host's own files.
        agent = unsandboxed_repo(make_agent)
        host = host_directory(tmp_path / "host")
        before = tree_of(host)
        assert agent.run(agent.script("init.sh", "#!/bin/sh\ngit init -q sub\n")).text.startswith("exit code: 0")
        caught = violation(agent, "swap.sh", f"#!/bin/sh\nrm -rf sub/.git && ln -s {host} sub/.git\n")
        assert "sub/.git" in caught.paths
        assert not os.path.lexists(agent.root / "sub" / ".git")
        assert tree_of(host) == before
        # Removing a nested repository is no violation: nothing runs from a git directory that is gone.
        agent.run(agent.script("again.sh", "#!/bin/sh\ngit init -q sub2\n"))
        assert agent.run(agent.script("rm.sh", "#!/bin/sh\nrm -rf sub2/.git\n")).text.startswith("exit code: 0")

    @pytest.mark.parametrize("name", ["modules", "worktrees"])
    def test_control_directories_made_links_out_change_nothing_where_they_point(
        self, make_agent: MakeAgent, tmp_path: Path, name: str
    ) -> None:
        agent = unsandboxed_repo(make_agent)
        host = host_directory(tmp_path / "host")
        before = tree_of(host)
        caught = violation(agent, "link.sh", f"#!/bin/sh\nln -s {host} .git/{name}\n")
        assert f".git/{name}" in caught.paths
        assert not os.path.lexists(agent.root / ".git" / name)
        assert tree_of(host) == before

    def test_a_git_file_in_a_plain_workspace_pointing_out_changes_nothing_where_it_points(
        self, make_agent: MakeAgent, tmp_path: Path
    ) -> None:
        agent = make_agent(*GIT_SCRIPT, sandbox=False, allow_unsandboxed=True, files={"README.md": "hello\n"})
        outside = tmp_path / "outside.git"
        subprocess.run(["git", "init", "-q", "--bare", str(outside)], check=True)
        (outside / "hooks" / "pre-receive").write_text("#!/bin/sh\n")
        (outside / "modules").mkdir()
        before = tree_of(outside)
        caught = violation(agent, "point.sh", f"#!/bin/sh\necho 'gitdir: {outside}' > .git\n")
        assert caught.paths == [".git"]
        assert not (agent.root / ".git").exists()
        assert tree_of(outside) == before

    def test_a_rebase_todo_with_exec_lines_is_removed(self, make_agent: MakeAgent, tmp_path: Path) -> None:
        agent = unsandboxed_repo(make_agent)
        mark = tmp_path / "host-ran-it"
        todo = agent.script("todo.sh", f"#!/bin/sh\nmkdir -p .git/rebase-merge\n"
                                       f"echo 'exec echo x >> {mark}' > .git/rebase-merge/git-rebase-todo\n")
        with pytest.raises(SandboxViolation):
            agent.run(todo)
        assert not (agent.root / ".git" / "rebase-merge" / "git-rebase-todo").exists()


def test_file_tools_write_into_no_git_directory_whatever_its_name(make_agent: MakeAgent) -> None:
    # A bare repository the model writes piece by piece: the write that would make the directory
    # one git uses (its HEAD, or objects beside a HEAD) is refused like any write inside one.
    agent = make_agent("filesystem-read", "filesystem-write", files={"README.md": "hello\n"})
    subprocess.run(["git", "init", "-q", "--bare", str(agent.root / "bare")], check=True)
    for path in ("bare/config", "bare/hooks/post-checkout", "bare/notes.txt"):
        out = agent.call("write_file", path=path, content="[alias]\n\tx = !echo x\n")
        assert out.is_error and "inside a git directory (bare)" in out.text
        agent.audited("write_file", "refused", "inside a git directory")
    assert "alias" not in (agent.root / "bare" / "config").read_text()
    assert not agent.call("write_file", path="armed/HEAD", content="ref: refs/heads/main\n").is_error
    assert not agent.call("write_file", path="armed/config", content="[alias]\n\tx = !echo x\n").is_error
    assert not agent.call("write_file", path="armed/objects/keep", content="").is_error
    out = agent.call("write_file", path="armed/refs/heads/keep", content="")  # HEAD, objects and refs: git's
    assert out.is_error and "inside a git directory (armed)" in out.text
    (agent.root / "objects-first" / "refs").mkdir(parents=True)
    (agent.root / "objects-first" / "objects").mkdir()
    assert agent.call("write_file", path="objects-first/HEAD", content="ref: refs/heads/main\n").is_error
    (agent.root / "docs" / "refs").mkdir(parents=True)
    assert not agent.call("write_file", path="docs/HEAD", content="a file named HEAD beside refs/\n").is_error


def test_the_runtimes_own_git_runs_nothing_the_repository_configures(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "f.txt").write_text("a\n")
    _git_repo(repo)
    mark = tmp_path / "ran"
    with (repo / ".git" / "config").open("a") as f:
        f.write(f'[core]\n\tfsmonitor = "echo fsmonitor >> {mark}; false"\n\tpager = "echo pager >> {mark}; cat"\n'
                f'[filter "e"]\n\tclean = "echo clean >> {mark}; cat"\n\tsmudge = "echo smudge >> {mark}; cat"\n'
                f'[diff "e"]\n\ttextconv = "echo textconv >> {mark}; cat"\n'
                f'[diff]\n\texternal = "sh -c \'echo external >> {mark}\'"\n')
    for hook in ("post-checkout", "pre-commit", "post-commit", "reference-transaction"):
        path = repo / ".git" / "hooks" / hook
        path.write_text(f"#!/bin/sh\necho {hook} >> {mark}\n")
        path.chmod(0o755)
    (repo / ".gitattributes").write_text("* filter=e diff=e\n")
    (repo / "f.txt").write_text("b\n")
    for args in (("status",), ("diff",), ("add", "-A"), ("diff", "--cached"),
                 ("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x"),
                 ("checkout", "-q", "-b", "other"), ("log", "-p", "-1")):
        done = run_git(repo, *args)
        assert done.returncode == 0, (args, done.stderr)
    assert not mark.exists(), mark.read_text()
    argv = git_argv(repo, "status")
    assert "core.hooksPath=/dev/null" in argv and "filter.e.clean=" in argv and "diff.e.textconv=" in argv


def test_drivers_of_files_the_repository_configuration_includes_do_not_run_but_the_persons_own_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file the repository's configuration includes may lie where a command can write it; the
    # person's global configuration is theirs (git-lfs's filter), as for their own git.
    home, mark = tmp_path / "home", tmp_path / "ran"
    home.mkdir()
    (home / ".gitconfig").write_text(f'[filter "g"]\n\tclean = "echo g >> {mark}; cat"\n')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "f.txt").write_text("a\n")
    _git_repo(repo)
    (tmp_path / "more.inc").write_text(f'[filter "i"]\n\tclean = "echo i >> {mark}; cat"\n\trequired = true\n')
    with (repo / ".git" / "config").open("a") as f:
        f.write(f"[include]\n\tpath = {tmp_path / 'more.inc'}\n")
    (repo / ".gitattributes").write_text("f.txt filter=i\ng.txt filter=g\n")
    (repo / "f.txt").write_text("b\n")
    (repo / "g.txt").write_text("g\n")
    done = run_git(repo, "add", "-A")
    assert done.returncode == 0, done.stderr  # the included filter, neutralised, is not required either
    assert mark.read_text() == "g\n"  # the person's own filter ran; the included one did not
    assert "filter.i.required=false" in git_argv(repo, "status")


# -- host services through Unix sockets ----------------------------------------------------------


@pytest.fixture
def host_socket() -> Iterator[tuple[Path, list[bytes]]]:
    """A host service listening on a Unix socket at a path visible read-only in the sandbox."""
    # Not under /tmp (private in the sandbox anyway): where services keep sockets, world-readable.
    parent = next((Path(p) for p in ("/var/lib", "/opt", "/usr/local") if os.access(p, os.W_OK)), ROOT)
    directory = parent / f"toka-test-socket-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    directory.chmod(0o755)
    path = directory / "service.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    hits: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    hits.append(conn.recv(100) or b"connected")
                    conn.sendall(b"SERVICE-ANSWERED")
                except OSError:
                    hits.append(b"connected")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, hits
    server.close()
    path.unlink(missing_ok=True)
    directory.rmdir()


CONNECT = """\
import socket
import stat
for path in {paths!r}:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(b"hello")
        print("CONNECTED", path, s.recv(100))
    except OSError as e:
        print("refused", path, e)
print("done")
"""


@needs_confinement
def test_host_unix_sockets_are_unreachable_without_network_access(
    make_agent: MakeAgent, host_socket: tuple[Path, list[bytes]]
) -> None:
    path, hits = host_socket
    known = [str(p) for p in (Path("/run/dbus/system_bus_socket"), Path("/var/run/postgresql/.s.PGSQL.5432"),
                              Path("/var/run/docker.sock")) if p.exists()]
    agent = make_agent("script-execution", files={"connect.py": CONNECT.format(paths=[str(path), *known])})
    out = agent.run("python3", "connect.py")
    assert "done" in out.text and "CONNECTED" not in out.text, out.text
    assert hits == []
    # A socket the command makes in its own workspace still works.
    own = agent.script("own.py", """\
        import os, socket
        s = socket.socket(socket.AF_UNIX); s.bind("own.sock"); s.listen(1)
        c = socket.socket(socket.AF_UNIX); c.connect("own.sock"); print("OWN-OK")
        os.unlink("own.sock")
        """)
    assert "OWN-OK" in agent.run("python3", own.removeprefix("./")).text


@needs_confinement
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs a system Python (a virtualenv's has no user site)")
def test_python_code_planted_in_the_private_home_does_not_run_in_later_commands(
    make_agent: MakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's private HOME outlives each command: a ``usercustomize.py`` written into its
    user site directory would otherwise run before every later Python command of the agent."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the system Python, as on a host without a virtualenv
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    agent = make_agent("script-execution", files={"plant.py": (
        "import os, site\n"
        "os.makedirs(site.getusersitepackages(), exist_ok=True)\n"
        "open(os.path.join(site.getusersitepackages(), 'usercustomize.py'), 'w').write(\"print('PLANTED')\\n\")\n"
        "print('written', site.getusersitepackages())\n"), "later.py": "print('later')\n"})
    assert "written" in agent.run("python3", "plant.py").text
    later = agent.run("python3", "later.py").text
    assert "later" in later and "PLANTED" not in later


def test_run_is_hidden_and_no_credential_file_is_readable(make_agent: MakeAgent) -> None:
    candidates = ["/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
                  "/etc/security/opasswd", *map(str, Path("/etc/ssh").glob("ssh_host_*key"))]
    present = [c for c in candidates if Path(c).exists()]
    assert present, "no credential file on this host to try"
    agent = make_agent("script-execution")
    snoop = agent.script("snoop.sh", "#!/bin/sh\n" + "".join(
        f'head -c 64 "{c}" 2>/dev/null | grep -q . && echo "READ {c}"\n' for c in present) + """\
for d in /run /var/run /root; do echo "$d: $(ls -A $d 2>/dev/null | tr '\\n' ' ')"; done
ls -A /etc/ssl/private 2>/dev/null | grep -q . && echo "LISTED /etc/ssl/private"
echo done
""")
    out = agent.run(snoop)
    assert "done" in out.text and "READ" not in out.text and "LISTED" not in out.text, out.text
    listed = dict(line.split(":", 1) for line in out.text.splitlines() if line.startswith("/"))
    assert listed["/run"].split() == listed["/var/run"].split() == [], out.text
    # Only what holds the command's own programs (a Python under ~/.pyenv) stays in a home.
    env = scrubbed_env(agent.state_dir / "probe-home")
    kept = {Path(k).parts[2] for k in (*env["PATH"].split(os.pathsep), env.get("RUSTUP_HOME", ""), sys.prefix,
                                        sys.base_prefix) if k.startswith("/root/") and len(Path(k).parts) > 2}
    assert set(listed["/root"].split()) <= kept, out.text


@needs_confinement
def test_a_program_directory_in_a_home_does_not_show_the_home(
    make_agent: MakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`~/bin` on PATH (Ubuntu's .profile adds it) kept its parent, the whole home, visible; and
    `~/.cargo/bin` the files beside it (a registry token in ~/.cargo/credentials.toml)."""
    import toka.sandbox

    home = tmp_path / "person"
    for name in ("bin", ".cargo/bin", ".cargo/registry", ".ssh"):
        (home / name).mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("SSH-KEY-CANARY\n")
    (home / "notes.txt").write_text("NOTES-CANARY\n")
    (home / ".cargo" / "credentials.toml").write_text("token = 'CARGO-TOKEN-CANARY'\n")
    (home / ".cargo" / "registry" / "index.txt").write_text("REGISTRY-OK\n")
    hidden = toka.sandbox.hidden_host_paths()
    monkeypatch.setattr(toka.sandbox, "hidden_host_paths", lambda: (*hidden, str(home)))
    monkeypatch.setenv("PATH", f"{home / 'bin'}{os.pathsep}{home / '.cargo' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    agent = make_agent("script-execution")
    snoop = agent.script("snoop.sh", f"""\
        #!/bin/sh
        cat {home}/.ssh/id_ed25519 {home}/notes.txt {home}/.cargo/credentials.toml {home}/.cargo/registry/index.txt 2>/dev/null
        echo "listed: $(ls -A {home} 2>/dev/null | tr '\\n' ' ')"
        """)
    out = agent.run(snoop)
    assert "listed:" in out.text, out.text
    assert "CANARY" not in out.text, out.text
    assert "REGISTRY-OK" in out.text, out.text  # a program's own directories stay
    assert set(out.text.split("listed:")[1].split()) <= {"bin", ".cargo"}, out.text


def test_doctor_says_which_mechanism_holds_for_sockets_and_git() -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "toka"), "doctor"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    sockets = next(line for line in done.stdout.splitlines() if "unix sockets" in line)
    git = next(line for line in done.stdout.splitlines() if "git control files" in line)
    if HOST.mountns:
        assert "masked" in sockets and "Landlock" in sockets
        assert "read-only" in git
    assert "checked and restored after every command" in git


# -- through a whole run --------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_a_violation_in_a_run_stops_it_and_the_planted_hook_is_gone(write_specs, tmp_path: Path) -> None:
    from toka.model import override_model
    from toka.testing import ScriptedModel, submit, tool_call

    from .conftest import minimal_spec, run_pipeline

    planter = minimal_spec("planter", tasks=2, priority="low")
    planter["security"].update(capabilities_required=["script-execution", "git-access"], sandbox=False)
    later = minimal_spec("later", tasks=1, required={"planter": ""})
    folder = write_specs(planter, later)
    mark = tmp_path / "host-ran-it"
    # The agent works in its own worktree: the hook goes where git keeps the repository's hooks.
    (folder / "plant.sh").write_text("#!/bin/sh\nhooks=\"$(git rev-parse --git-common-dir)/hooks\"\n"
                                     f"printf '#!/bin/sh\\necho x >> {mark}\\n' > \"$hooks/post-checkout\"\n"
                                     "chmod +x \"$hooks/post-checkout\"\necho planted\n")
    (folder / "plant.sh").chmod(0o755)
    _git_repo(folder)
    model = ScriptedModel(tool_call("run_command", argv=["./plant.sh"]), default=submit())

    async def go() -> tuple[object, object]:
        with override_model(model):
            return await run_pipeline(folder, run_key="violation", allow_unsandboxed=True)

    _, summary = asyncio.run(go())
    reports = {a.agent: a for a in summary.agents}
    assert reports["planter"].state == "failed"
    assert "git control files" in (reports["planter"].fatal or "") and ".git/hooks/post-checkout" in reports["planter"].fatal
    assert reports["planter"].tasks[0].attempts == 1  # a violation is never retried
    assert reports["later"].state != "completed"
    assert len(model.history) == 1  # nothing asked the model again after the violation
    assert not (folder / ".git" / "hooks" / "post-checkout").exists()
    person_uses_git(folder, mark)


_RUNTIME = """
import asyncio, sys
from pathlib import Path
from toka.audit import AuditLog
from toka.capabilities import grant_tools
from toka.policy import AgentPolicy
from toka.spec import ResourceLimits
from toka.tools import Toolbox, ToolContext
from toka.workspace import Workspace

workspace = Workspace(sys.argv[1])
policy = AgentPolicy(capabilities=frozenset({"script-execution"}),
                     limits=ResourceLimits.model_validate({"timeout": "120s"}), sandbox=True)
tools, _ = grant_tools(["script-execution"])
audit = AuditLog(workspace.state_dir / "audit" / "run.jsonl", run="run")
box = Toolbox(tools, ToolContext(workspace=workspace, agent="a", task=1, policy=policy, audit=audit))
asyncio.run(box.call("run_command", {"argv": ["./loop.sh"]}))
"""


@pytest.mark.skipif(not HOST.orphans_die, reason="needs setpriv --pdeathsig and unshare --kill-child")
def test_a_command_dies_with_a_runtime_killed_with_9(tmp_path: Path) -> None:
    """Left running, it went on writing into the worktree while the resumed run did the task again."""
    mark = marker()
    ws = tmp_path / "ws"
    ws.mkdir()
    loop = ws / "loop.sh"
    loop.write_text(f"#!/bin/sh\n# {mark}\nsetsid sh -c 'while :; do date +%s%N >> beat-2; sleep 0.05; done' &\n"
                    "while :; do date +%s%N >> beat; sleep 0.05; done\n")
    loop.chmod(0o755)
    runtime = subprocess.Popen([sys.executable, "-c", _RUNTIME, str(ws)], cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ((ws / "beat").exists() and (ws / "beat-2").exists()):
            assert time.monotonic() < deadline and runtime.poll() is None, "the command did not start"
            time.sleep(0.05)
    finally:
        runtime.kill()
        runtime.wait()
    time.sleep(1)
    sizes = [(ws / name).stat().st_size for name in ("beat", "beat-2")]
    time.sleep(1)
    assert [(ws / name).stat().st_size for name in ("beat", "beat-2")] == sizes, "a command outlived the runtime"
    assert processes_matching(mark) == []


@needs_confinement
def test_credentials_in_the_git_configuration_are_not_readable(make_agent: MakeAgent) -> None:
    """Output redaction is no defence (`rev`, `base64`): the command must not read them at all."""
    agent = make_agent(*GIT_SCRIPT, files={"README.md": "hello\n"})
    _git_repo(agent.root)
    token = "ghp_" + "Z9" * 18
    subprocess.run(["git", "remote", "add", "origin", f"https://x-access-token:{token}@github.com/o/r.git"],
                   cwd=agent.root, check=True)
    subprocess.run(["git", "config", "http.https://github.com/.extraheader", "AUTHORIZATION: basic c2VjcmV0"],
                   cwd=agent.root, check=True)
    before = (agent.root / ".git" / "config").read_text()
    out = agent.run(agent.script("peek.sh", "#!/bin/sh\ncat .git/config | rev\ngit remote -v | rev\n")).text
    assert "exit code: 0" in out, out
    assert "moc.buhtig//:sptth" in out  # the remote is there, without its user and token
    for secret in (token, "c2VjcmV0", "x-access-token"):
        assert secret[::-1] not in out and secret not in out, out
    assert (agent.root / ".git" / "config").read_text() == before  # the runtime's own git still has them


@needs_confinement
def test_credentials_in_included_files_helpers_and_submodules_are_not_readable(make_agent: MakeAgent) -> None:
    """Git keeps credentials in more places than a remote's URL: a key on its section's line, a
    value continued on the next line, an inline credential helper, a credential store file, a
    file the configuration includes, a submodule's configuration, a URL's query."""
    agent = make_agent(*GIT_SCRIPT, files={"README.md": "hello\n"})
    _git_repo(agent.root)
    git = agent.root / ".git"
    secrets = {f"CANARY{n}" for n in range(1, 11)}
    with (git / "config").open("a") as f:
        f.write('[http] extraheader = AUTHORIZATION: basic CANARY1\n'
                '[http "https://github.com/"]\n\textraHeader = AUTHORIZATION: basic \\\nCANARY2\n'
                '[credential]\n\thelper = "!f() { echo password=CANARY3; }; f"\n'
                '[credential "https://other"]\n\thelper = store --file=.git/store\n'
                '[sendemail]\n\tsmtpPass = CANARY5\n\tsmtpUser = me@example.com\n'
                '[include]\n\tpath = more.inc\n')
    (git / "store").write_text("https://u:CANARY4@other\n")
    (git / "more.inc").write_text("[github]\n\toauth-token = CANARY6\n[http]\n\tcookieFile = .git/cookies\n")
    (git / "cookies").write_text("other\tFALSE\t/\tTRUE\t0\tsession\tCANARY7\n")
    (git / "modules" / "lib").mkdir(parents=True)
    (git / "modules" / "lib" / "config").write_text('[remote "origin"]\n\turl = https://u:CANARY8@h/lib.git\n')
    subprocess.run(["git", "remote", "add", "mirror", "https://h/r.git?access_token=CANARY9"], cwd=agent.root,
                   check=True)
    (git / "config.worktree").write_text("[user]\n\tapi-key = CANARY10\n")
    before = {p: p.read_bytes() for p in git.rglob("*") if p.is_file() and "objects" not in p.parts}
    out = agent.run(agent.script("peek.sh", (
        "#!/bin/sh\nfor f in $(find .git -type f ! -path '*/objects/*'); do rev \"$f\"; done\n"
        "git config --list | rev\ngit config sendemail.smtpuser\n"))).text
    assert "exit code: 0" in out, out
    assert "me@example.com" in out  # git still reads the configuration, its other keys kept
    assert "git/r.git" in out[::-1] or "tig.r/h//:sptth" in out  # the remote is there, without its token
    for secret in secrets:
        assert secret[::-1] not in out and secret not in out, (secret, out)
    after = {p: p.read_bytes() for p in before}
    assert after == before  # the runtime's own git still has them all


@pytest.mark.parametrize("text, kept, hidden", [
    ("[core]\n\teditor = vim\n[user]\n\tname = A\n", ["editor = vim", "name = A"], []),
    ("[http] extraheader = X: SECRET\n[core]\n\tbare = false\n", ["[http]", "bare = false"], ["SECRET"]),
    ("[sendemail]\n\tsmtppass = p\\\nSECRET\n\tsmtpuser = u\n", ["smtpuser = u"], ["SECRET", "p\\"]),
    ('[remote "o"]\n\turl = https://tok:SECRET@h/r\n', ["https://h/r"], ["SECRET", "tok"]),
    ("[credential]\n\tusername = SECRET\n", ["[credential]"], ["SECRET"]),
    ("[core] # bare = SECRETISH\n", ["# bare = SECRETISH"], []),  # a comment stays a comment
    # git's proxy form has no scheme; a BOM git skips; a URL's token cut by a continuation line
    ("[http]\n\tproxy = alice:SECRET@proxy.corp:3128\n", ["[http]"], ["SECRET", "alice"]),
    ("\ufeff[credential]\n\thelper = \"!f() { echo password=SECRET; }; f\"\n", ["[credential]"], ["SECRET"]),
    ('[remote "c"]\n\turl = https://u:SEC\\\nRET@host/x\n', ['[remote "c"]'], ["SEC", "RET@"]),
])
def test_git_configuration_keeps_its_keys_and_loses_its_credentials(text: str, kept: list[str],
                                                                   hidden: list[str], tmp_path: Path) -> None:
    clean, _, _ = config_without_credentials(text)
    for part in kept:
        assert part in clean
    for part in hidden:
        assert part not in clean
    (tmp_path / "config").write_text(clean)
    assert subprocess.run(["git", "config", "--file", str(tmp_path / "config"), "--list"],
                          capture_output=True).returncode == 0, clean


def test_an_approved_push_alone_sees_the_credentials_it_pushes_with(tmp_path: Path) -> None:
    """`git push` to a token remote needs the token; every other command sees the config without it."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "remote", "add", "origin", "https://u:CANARY@h/r.git"], cwd=tmp_path, check=True)

    def shown(**options: bool) -> dict[str, str]:
        argv = confinement(tmp_path, tmp_path, writable=[], readonly=[], env={}, tmpfs_size=None, **options)
        return json.loads(argv[argv.index("--") - 1])["replace"]

    assert [text for text in shown().values() if "https://h/r.git" in text and "CANARY" not in text]
    assert shown(network=True, credentials=True) == {}


def test_other_worktrees_configurations_lose_their_credentials_too(tmp_path: Path) -> None:
    repo, other = tmp_path / "repo", tmp_path / "other"
    repo.mkdir()
    (repo / "README.md").write_text("hello\n")
    _git_repo(repo)
    subprocess.run(["git", "worktree", "add", "-q", str(other)], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "config", "extensions.worktreeConfig", "true"], cwd=repo, check=True)
    subprocess.run(["git", "config", "--worktree", "http.extraheader", "AUTHORIZATION: basic CANARY"], cwd=other,
                   check=True)
    shown = git_configs_without_credentials(repo)
    (admin,) = [path for path in shown if path.endswith("config.worktree")]
    assert "CANARY" not in shown[admin] and "CANARY" in Path(admin).read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the guard as another user (needs root)")
@pytest.mark.parametrize("whose", ["made-by-the-command", "the-persons-clone"])
def test_a_hooks_directory_made_unlistable_hides_no_hook_from_the_guard(whose: str) -> None:
    """`chmod 0311 .git/hooks` (enterable, not listable): a walk saw no hook in it, and the armed one
    ran on the person's next checkout. Root reads it anyway: the guard runs here as a plain user."""
    import shutil
    import tempfile

    from toka.gitguard import GitGuard

    tmp_path = Path(tempfile.mkdtemp(prefix="toka-guard-"))  # pytest's own is root's alone
    os.chown(tmp_path, 1000, 1000)
    root, tool = tmp_path / "ws", tmp_path / "ws" / "tool"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as user 1000, the guard's check around what a command did
        try:
            os.setgid(1000)
            os.setuid(1000)
            os.environ["HOME"] = str(tmp_path)
            subprocess.run(["git", "init", "-q", str(root)], check=True, capture_output=True)
            if whose == "the-persons-clone":
                subprocess.run(["git", "init", "-q", str(tool)], check=True, capture_output=True)
            guard = GitGuard.capture(root, ["tool/.git/HEAD"] if tool.exists() else [])
            if not tool.exists():
                subprocess.run(["git", "init", "-q", str(tool)], check=True, capture_output=True)
            hook = tool / ".git" / "hooks" / "post-checkout"
            hook.write_text("#!/bin/sh\necho EVIL\n")
            hook.chmod(0o755)
            (tool / ".git" / "hooks").chmod(0o311)
            found = guard.check(["tool/.git/hooks/post-checkout"], ["tool/.git/HEAD"])
            os.write(write, repr((found, hook.exists())).encode())
        except BaseException as e:
            os.write(write, repr(e).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        said = f.read()
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert said == "(['tool/.git/hooks/post-checkout'], False)", said


@needs_confinement
def test_a_command_leaves_no_set_uid_program_behind(make_agent: MakeAgent) -> None:
    """Commands run as the runtime's user (root here) and `chmod 4755` needs no capability: a
    root-owned set-uid shell stayed in the workspace for any local account to run."""
    agent = make_agent(*GIT_SCRIPT, files={"README.md": "hello\n"})
    out = agent.run(agent.script("suid.sh", "#!/bin/sh\ncp /bin/sh ./rootsh && chmod 4755 ./rootsh && "
                                            "cp /bin/sh \"$HOME/rootsh\" && chmod 6755 \"$HOME/rootsh\"\n")).text
    assert "set-uid and set-gid bits were removed from: rootsh" in out, out
    assert stat.S_IMODE((agent.root / "rootsh").stat().st_mode) == 0o755
    homes = [p for p in agent.root.joinpath(".toka").rglob("rootsh")]
    assert homes and all(not p.stat().st_mode & (stat.S_ISUID | stat.S_ISGID) for p in homes)


def test_thousands_of_nested_repositories_or_sparse_control_files_cost_the_guard_little(
    make_agent: MakeAgent,
) -> None:
    """2,000 empty repositories made every later command take a minute in the guard (each compared
    with each); 200 sparse 4 MiB files in a nested info/ took 1.6 GB of the runtime at each."""
    import resource

    agent = unsandboxed_repo(make_agent)
    made = agent.run(agent.script("many.sh", "#!/bin/sh\nfor i in $(seq 1500); do mkdir -p r/$i/.git/objects "
                                             "r/$i/.git/refs && echo 'ref: refs/heads/main' > r/$i/.git/HEAD; done\n"
                                             "git init -q tool && for i in $(seq 60); do "
                                             "truncate -s 4194304 tool/.git/info/f$i; done; echo made\n")).text
    assert "made" in made, made
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    assert agent.run(agent.script("noop.sh", "#!/bin/sh\necho ok\n")).text.startswith("exit code: 0")
    assert time.monotonic() - started < 15
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 150 * 1024  # KiB


def test_hooks_and_included_configuration_the_repository_names_are_control_files(
    make_agent: MakeAgent, tmp_path: Path
) -> None:
    """husky's `core.hooksPath = .husky/_` (ignored: `git status` shows nothing) and a tracked
    `.gitconfig` the repository includes: a hook or an fsmonitor planted there ran on the person's
    next `git commit` or `git status`."""
    agent = make_agent(*GIT_SCRIPT, "filesystem-write", sandbox=False, allow_unsandboxed=True,
                       files={"README.md": "hello\n"})
    _git_repo(agent.root)
    mark = tmp_path / "host-ran-it"
    subprocess.run(["git", "config", "core.hooksPath", ".husky/_"], cwd=agent.root, check=True)
    subprocess.run(["git", "config", "include.path", "../.gitconfig"], cwd=agent.root, check=True)
    (agent.root / ".gitconfig").write_text("[user]\n\tname = Team\n")
    (agent.root / ".husky" / "_").mkdir(parents=True)
    (agent.root / ".husky" / "_" / ".gitignore").write_text("*\n")
    caught = violation(agent, "hook.sh", f"#!/bin/sh\nprintf '#!/bin/sh\\necho hook >> {mark}\\n' > .husky/_/pre-commit\n"
                                         "chmod +x .husky/_/pre-commit\n")
    assert ".husky/_/pre-commit" in caught.paths
    assert not (agent.root / ".husky" / "_" / "pre-commit").exists()
    written = agent.call("write_file", path=".gitconfig",
                                 content=f'[core]\n\tfsmonitor = "echo fsmonitor >> {mark}; false"\n')
    assert written.is_error and "git's configuration has git read or run" in written.text, written.text
    assert (agent.root / ".gitconfig").read_text() == "[user]\n\tname = Team\n"
    person_uses_git(agent.root, mark)


def test_a_command_that_leaves_too_many_files_stops_the_run(make_agent: MakeAgent,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing bounded the number of files: each command's checks keep two snapshots of them in the
    runtime (400,000 empty files: 357 MB and 8 s a command; a disk's free inodes allow millions)."""
    import toka.sandbox

    monkeypatch.setattr(toka.sandbox, "SNAPSHOT_FILES", 200)  # a million, as shipped
    agent = unsandboxed_repo(make_agent)
    caught = violation(agent, "many.sh", "#!/bin/sh\nmkdir many && cd many && for i in $(seq 300); do : > f$i; done\n")
    assert "left more than 200 files" in str(caught) and "the run stops" in str(caught)
    refused = agent.run(agent.script("more.sh", "#!/bin/sh\necho ok\n"))
    assert refused.is_error and "holds more than 200 files; commands are refused there" in refused.text
