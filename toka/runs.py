"""The record of the last run in a workspace, so ``toka run --resume`` can pick it up."""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from .errors import ConfigError

__all__ = ["RunRecord", "crash_left_running", "hold_workspace", "new_run_key"]


def hold_workspace(state_dir: Path, run_key: str) -> IO[str]:
    """Make this process the one ``toka run`` of the workspace until the returned file is closed
    (or the process ends, killed or not: the kernel drops the lock).

    Two at once paid twice for the same tasks, and the one that ended last reset the run's
    merged branch; a second run also took over the record ``--resume`` continues.

    Raises:
        ConfigError: another run holds it (its key and process are named).
    """
    path = state_dir / "runs" / "running.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    held = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.seek(0)
        holder = held.read().strip() or "another process"
        held.close()
        raise ConfigError(f"another toka run is running in this workspace ({holder}); wait for it to end, "
                          "or stop it, then run again (or resume)") from None
    held.seek(0)
    held.truncate()
    held.write(f"run {run_key}, pid {os.getpid()}")
    held.flush()
    return held


def refuse_if_running(state_dir: Path, run_key: str, doing: str) -> None:
    """Stop ``doing`` (a discard, an apply) to run ``run_key`` while a ``toka run`` of it holds the
    workspace: its agents' worktrees are in use, its branches not finished.

    Raises:
        ConfigError: it is running (its process is named).
    """
    path = state_dir / "runs" / "running.lock"
    try:
        held = open(path, encoding="utf-8")
    except OSError:
        return  # no run ever held it
    with held:
        try:
            fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = held.read().strip()
            if holder.startswith(f"run {run_key},"):
                raise ConfigError(f"run {run_key} is running ({holder.removeprefix(f'run {run_key}, ')}): "
                                  f"{doing} it when it has ended (or stop it first)") from None


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Settings as the record keeps them (JSON: tuples as lists, paths as text), so that given and
    recorded ones compare alike."""
    plain: dict[str, Any] = json.loads(json.dumps(options, default=str))
    return plain


def new_run_key() -> str:
    return uuid.uuid4().hex[:16]


class RunRecord(BaseModel):
    """What ``toka run`` writes before it starts (so a killed run can still be resumed)."""

    run_key: str
    started_at: str
    specs: list[str]
    agents: list[str]
    model: str
    contexts: list[str] = []
    options: dict[str, Any] = {}
    """The other run settings given (``in_place``, ``max_turns``, budgets...), by name: a resume
    runs with them too (it ran on in branch mode after an --in-place run, and paid again for
    tasks whose cache key holds --max-turns)."""

    @classmethod
    def start(cls, *, specs: list[str], agents: list[str], model: str, contexts: list[str],
              run_key: str | None = None, options: dict[str, Any] | None = None) -> RunRecord:
        return cls(
            run_key=run_key or new_run_key(),
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            specs=specs,
            agents=agents,
            model=model,
            contexts=contexts,
            options=_plain(options or {}),
        )

    def selection(self, option: str) -> object:
        """What this run used for a ``toka run`` option (to check a resume against it)."""
        return {"--run-key": self.run_key, "specs": self.specs, "--agent": self.agents,
                "--context": self.contexts, "--model": self.model}[option]

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / "runs" / "last.json"

    def options_for_resume(self, given: dict[str, Any], fixed: dict[str, str]) -> dict[str, Any]:
        """The settings of a resume of this run: the recorded ones, and those ``given`` on top.

        Raises:
            ConfigError: a ``fixed`` setting (name -> its option) given otherwise than recorded: it
                decides where the work is or what it replays (--in-place, --max-turns).
        """
        plain = _plain(given)
        for name, flag in fixed.items():
            if name in plain and plain[name] != self.options.get(name):
                raise ConfigError(f"{flag} {plain[name]!r} contradicts --resume: the last run here "
                                  f"({self.run_key}) used {self.options.get(name)!r}")
        return {**self.options, **given}

    def save(self, state_dir: Path) -> None:
        path = self.path(state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)  # atomic: a kill never leaves half a record

    @classmethod
    def load_last(cls, state_dir: Path) -> RunRecord:
        path = cls.path(state_dir)
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"nothing to resume: no earlier run is recorded in {path.parent}") from None
        except (ValueError, OSError) as e:
            raise ConfigError(f"cannot read the last run record {path}: {e}") from None


def _run_parameter(parameters: dict[str, Any]) -> dict[str, Any]:
    """The run key and workspace of a pipeline run's ``run`` parameter (a deployment's run may give
    none, or give it otherwise)."""
    run = parameters.get("run")
    return {k: run.get(k) for k in ("run_key", "workspace")} if isinstance(run, dict) else {}


#: Pipeline flow runs of one run key looked at by :func:`crash_left_running` (a run resumed that
#: many times over is not a case to pay more reads for).
_EARLIER_ATTEMPTS = 200


async def crash_left_running(run_key: str, workspace: str, *, pipeline: str) -> int:
    """Mark Crashed what run ``run_key`` in ``workspace`` left Running in the API; returns how many.

    ``pipeline``: the name of the pipeline's flow (``toka.pipeline.PIPELINE_FLOW``).

    A ``toka run`` killed outright (``kill -9``, a lost machine) cannot say it ended: on a server
    that outlives it, its pipeline run, the agents' runs and their task runs stayed Running in the
    UI for good. Called by the next ``toka run`` in the workspace (its resume: before it starts),
    while it holds the workspace (:func:`hold_workspace`): no process of that run lives then,
    whatever the API says.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Crashed

    unfinished = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]
    message = f"its process ended without saying so (killed?); found by the next toka run in {workspace}"
    async with get_client() as client:
        pipelines = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[pipeline])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))),
            sort=FlowRunSort.START_TIME_DESC, limit=_EARLIER_ATTEMPTS, offset=0)
        left = [r for r in pipelines if _run_parameter(r.parameters) == {"run_key": run_key, "workspace": workspace}]
        frontier = [r.id for r in left]
        while frontier:  # the agents' runs (and theirs: none today), still unfinished
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))),
                limit=_EARLIER_ATTEMPTS, offset=0)
            left += children
            frontier = [r.id for r in children]
        if not left:
            return 0
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in left])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))),
            limit=_EARLIER_ATTEMPTS, offset=0)
        for task in tasks:
            await client.set_task_run_state(task.id, Crashed(message=message), force=True)
        for run in reversed(left):  # the agents' before the pipeline's, as they would have ended
            await client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        return len(left) + len(tasks)


async def say_why_stopped(run_key: str, workspace: str, message: str, *, pipeline: str) -> bool:
    """Put ``message`` on the pipeline run of ``run_key`` in ``workspace`` that a stop just ended;
    returns whether there was one.

    Prefect marks a cancelled run Crashed with "Execution was cancelled by the runtime environment",
    which tells the person in the UI neither what happened (Ctrl-C, SIGTERM) nor what to do next.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Crashed

    async with get_client() as client:
        ended = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[pipeline])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.CRASHED, StateType.CANCELLED]))),
            sort=FlowRunSort.START_TIME_DESC, limit=20, offset=0)
        run = next((r for r in ended if _run_parameter(r.parameters) == {"run_key": run_key, "workspace": workspace}),
                   None)
        if run is None:
            return False
        await client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        return True

