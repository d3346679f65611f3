"""The ``toka`` command line.

Bad input (a malformed spec, an unknown agent, a cycle) prints located
messages and exits with code 2; it never shows a traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup

from .errors import BranchError, ConfigError, Problem, RunFailedError, TokaError, printable
from .plan import Plan, check_contexts, limits_text, make_plan
from .policy import approval_keys, check_unsandboxed
from .progress import ProgressEvent, listen
from .config import APPROVAL_KEYS, DEFAULT_NEEDS_APPROVAL, GROUPS, RunConfig, RunOptions
from .config import settings as run_settings
from .limits import LimitSettings
from .providers import choose_model, describe_choice
from .results import PipelineSummary
from .runs import RunRecord, hold_workspace, refuse_if_running
from .spec import AgentSpec
from .specset import DEFAULT_SPEC_DIR
from .workspace import Workspace

__all__ = ["app", "main"]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EMBEDDED_SERVER_TIMEOUT = 120


def _help_types(params: list[Any]) -> list[Any]:
    """Show an option's metavar in help (``NAME``, ``SECONDS``), nothing for a flag or an argument.

    Typer otherwise prints raw annotations (``<list[Path]>``, ``<bool>``, ``<int range>``), and
    it has no setting for arguments: their name column shows the metavar already.
    """
    for param in params:
        if isinstance(param, TyperArgument) or getattr(param, "is_flag", False):
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        else:
            param.display_type_rich = lambda ctx, metavar=param.metavar: metavar  # type: ignore[method-assign]
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _help_types(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _help_types(super().get_params(ctx))


app = typer.Typer(
    name="toka",
    help="Run declarative Toka agent specs as Prefect flows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)

def consoles() -> tuple[Console, Console]:
    """The consoles for stdout and stderr. Rich reads the terminal and the environment
    (``NO_COLOR``, ``COLUMNS``) when one is made: a run forked from a warm process
    (:mod:`toka.warm`) makes its own."""
    return (Console(highlight=False, soft_wrap=True, emoji=False),
            Console(stderr=True, highlight=False, soft_wrap=True, emoji=False))


out, err = consoles()

PathsArg = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Spec files or directories (searched recursively). Default: agent_specs/.",
        show_default=False,
        metavar="PATH",
    ),
]
AgentOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--agent",
        "-a",
        help="Run only this agent and its required dependencies (repeatable).",
        show_default=False,
        metavar="NAME",
    ),
]
PlanAgentOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--agent",
        "-a",
        help="Plan only this agent and its required dependencies (repeatable).",
        show_default=False,
        metavar="NAME",
    ),
]


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"toka-runtime {version('toka-runtime')}")
        raise typer.Exit()


@app.callback()
def _toka(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_show_version)
    ] = False,
) -> None:
    """Run declarative Toka agent specs as Prefect flows."""


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print every problem of a TokaError, one per line, and exit with its code: 2 for bad input
    (a spec, the graph, a setting), 1 for a run that failed (see :mod:`toka.errors`)."""
    try:
        yield
    except TokaError as e:
        for problem in e.problems:
            _print_problem(problem)
        n = len(e.problems)
        err.print(f"[red]{n} error{'s' if n != 1 else ''}[/red]")
        raise typer.Exit(e.exit_code) from None


def _print_problem(problem: Problem) -> None:
    colour = "red" if problem.level == "error" else "yellow"
    err.print(f"[{colour}]{problem.level}:[/{colour}] {escape(str(problem))}")


def _paths(paths: list[Path] | None) -> list[Path]:
    return list(paths) if paths else [DEFAULT_SPEC_DIR]


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _deps(names: list[str]) -> str:
    # An optional dependency that is not loaded is named as the spec wrote it: any text.
    return escape(", ".join(printable(n) for n in names)) if names else "-"


def _agent_line(plan: Plan, name: str) -> str:
    spec = plan.graph.agents[name]

    def declared(kind: str) -> str:
        # As the spec declares them: one not among the files read (`toka validate a.yaml`, an
        # optional dependency that does not exist) or dropped (an optional edge closing a cycle)
        # is named, and said so.
        present = plan.graph.upstream(name, kind)
        absent = [f"{d} (dropped)" if d in plan.graph.agents else f"{d} (not loaded)"
                  for d in getattr(spec.dependencies, kind) if d not in present]
        return _deps([*present, *absent])

    return (
        f"[bold]{name}[/bold]  {spec.priority}  {_count(len(spec.tasks.default), 'task')}"
        f"  requires: {declared('required')}"
        f"  optional: {declared('optional')}"
        f"  limits: {limits_text(spec)}"
    )


@app.command(cls=_Command)
def validate(paths: PathsArg = None) -> None:
    """Check spec files and their dependencies; print one line per agent."""
    named = _paths(paths)
    with _user_errors():
        # Only some files of a set: their dependencies may live in the others.
        plan = make_plan(named, partial=all(Path(p).is_file() for p in named))
    from .capabilities import NOT_TOOL_BACKED, capability_status

    for name, spec in plan.graph.agents.items():
        out.print(f"[green]ok[/green] {_agent_line(plan, name)}")
        untooled = [c for c in spec.security.capabilities_required
                    if capability_status(c) == NOT_TOOL_BACKED]
        if untooled:
            out.print(f"   declared, not tool-backed: {escape(', '.join(untooled))}")
    for problem in plan.warnings:
        _print_problem(problem)
    n, w = len(plan.graph), len(plan.warnings)
    out.print(f"{n} agent{'s' if n != 1 else ''} valid, {w} warning{'s' if w != 1 else ''}")


@app.command(cls=_Command)
def plan(
    paths: PathsArg = None,
    agent: PlanAgentOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON (format 'toka-plan/1').")
    ] = False,
) -> None:
    """Show the run order: waves, edges, limits and capabilities of each agent."""
    with _user_errors():
        result = make_plan(_paths(paths), agents=agent or ())
    if as_json:
        out.print_json(json.dumps(result.to_dict()), highlight=False)
        return
    from .capabilities import capability_status

    graph = result.graph
    out.print(f"{_count(len(graph), 'agent')} in {_count(len(result.waves), 'wave')}")
    step = 0
    for i, wave in enumerate(result.waves, 1):
        out.print(f"[bold]wave {i}[/bold]")
        for name in wave:
            step += 1
            spec = graph.agents[name]
            conditional = sum(len(t) for t in spec.tasks.conditional.values())
            extra = f" (+{conditional} conditional)" if conditional else ""
            out.print(
                f"  {step}. [bold]{name}[/bold]  {spec.priority}  "
                f"{_count(len(spec.tasks.default), 'task')}{extra}  {limits_text(spec)}"
            )
            out.print(f"     requires: {_deps(graph.upstream(name, 'required'))}"
                      f"  optional: {_deps(graph.upstream(name, 'optional'))}")
            caps = ", ".join(
                c + ("" if capability_status(c).startswith("tool-backed") else " (declared, not tool-backed)")
                for c in spec.security.capabilities_required
            ) or "-"
            sandbox = "" if spec.security.sandbox else "  [yellow](sandbox: false)[/yellow]"
            out.print(f"     capabilities: {escape(caps)}{sandbox}")
    if graph.edges:
        out.print("[bold]edges[/bold] (first -> then)")
        for e in graph.edges:
            out.print(f"  {e.dependency} -> {e.dependent}  ({e.kind})")
    for problem in result.warnings:
        _print_problem(problem)


@app.command(cls=_Command)
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.", metavar="FILE")
    ] = None,
    check: Annotated[
        Path | None,
        typer.Option("--check", help="Exit 1 if this file differs from the current schema.", metavar="FILE"),
    ] = None,
) -> None:
    """Print the JSON Schema of agent specs (for editor validation)."""
    text = schema_text()
    if check is not None:
        current = check.read_text(encoding="utf-8") if check.exists() else ""
        if current != text:
            err.print(f"{check} is out of date; regenerate it with: toka schema -o {check}")
            raise typer.Exit(1)
        out.print(f"{check} is current")
        return
    if output is not None:
        output.write_text(text, encoding="utf-8")
        out.print(f"wrote {output}")
    else:
        typer.echo(text, nl=False)


def _setting_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` (which takes ``**settings``) one option per run setting of :mod:`toka.config`.

    The options are derived from the declarations: name (:class:`~toka.config.Cli` or
    ``--field-name``), help (the field's description), metavar, and the default shown. Each
    option's value is None unless given, so that only given values reach
    :meth:`RunConfig.from_flat`, which checks them with the same models the flows use.
    """
    signature = inspect.signature(command, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    last = [p for p in fixed if p.name == "verbose"]
    params = [p for p in fixed if p.name != "verbose"]
    annotations = {p.name: p.annotation for p in fixed}
    for setting in run_settings():
        if setting.cli.skip:
            continue
        default = setting.field.default
        flag = setting.field.annotation is bool
        many = typing.get_origin(setting.field.annotation) is tuple
        shown = ", ".join(default) if many and default else "" if many or default is None else str(default)
        text = setting.cli.help or " ".join((setting.field.description or "").split())
        if shown and not flag and "default" not in text:
            text += escape(f"  [default: {shown}]")
        option = typer.Option(setting.flag, help=text, metavar=setting.cli.metavar or None,
                              envvar=setting.cli.envvar, show_default=False)
        kind: Any = bool if flag else list[str] | None if many else _scalar(setting.field.annotation) | None
        annotation = Annotated[kind, option]
        params.append(inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=False if flag else None, annotation=annotation))
        annotations[setting.name] = annotation
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params + last])
    command.__annotations__ = {**annotations, "return": None}
    return command


def _scalar(annotation: Any) -> type:
    """The command-line type of a setting: int or float where the setting is a number, else str."""
    kinds = set(typing.get_args(annotation)) or {annotation}
    return next((k for k in (int, float) if k in kinds), str)


@app.command(cls=_Command)
@_setting_options
def run(
    paths: PathsArg = None,
    agent: AgentOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the last run here: finished tasks are not redone.")
    ] = False,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", help="Write the run summary as JSON (format 'toka-run/1').", metavar="FILE"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's log lines.")] = False,
    **options: Any,
) -> None:
    """Run the agents (default: all of agent_specs/) as Prefect flows, in dependency order."""
    from .branches import refuse_discarded

    given = {name: value for name, value in options.items() if value is not None and value is not False}
    with _user_errors():
        space = Workspace(Path(given.pop("workspace", ".")))
        run_key, model, contexts = given.pop("run_key", None), given.pop("model", None), given.pop("contexts", None)
        if resume:
            # The resumed run's own selection: anything else would make different cache keys
            # (or a different set of agents) and redo, or newly do, work.
            record = RunRecord.load_last(space.state_dir)
            selection = {"--run-key": run_key, "specs": [str(p) for p in paths] if paths else None,
                         "--agent": agent or None, "--context": contexts or None, "--model": model}
            for option, value in selection.items():
                if value is not None and value != record.selection(option):
                    raise ConfigError(f"{option} {value!r} contradicts --resume: the last run here "
                                      f"({record.run_key}) used {record.selection(option)!r}")
            refuse_discarded(space.state_dir, record.run_key)
            spec_paths, agent, contexts, model = record.specs, record.agents, record.contexts, record.model
            given = record.options_for_resume(given, _FIXED_ON_RESUME)
        else:
            spec_paths = [str(p) for p in _paths(paths)]
            model = model or "auto"
            if run_key:
                refuse_discarded(space.state_dir, run_key)
            record = RunRecord.start(specs=spec_paths, agents=list(agent or ()), model=model,
                                     contexts=list(contexts or ()), run_key=run_key, options=given)
        plan = make_plan(spec_paths, agents=agent or ())
        check_contexts(plan, contexts or ())
        given["needs_approval"] = _approval_set(given.get("needs_approval"))
        config = RunConfig.from_flat({**given, "run_key": record.run_key, "workspace": str(space.root),
                                      "contexts": tuple(contexts or ()), "model": model}, flags=True)
        chosen = choose_model(config.provider)
        check_unsandboxed(list(plan.graph.agents.values()), allowed=config.approvals.allow_unsandboxed)
        config = _settle_approvals(plan, config)
        if json_file is not None:
            _check_writable(json_file)
        space.make_state_dir()
        held = hold_workspace(space.state_dir, record.run_key)  # before the record: it is the held run's
        earlier = record.run_key if resume else _last_run_key(space.state_dir)
        record.save(space.state_dir)
    try:
        err.print(describe_choice(chosen))
        verb = "resuming run" if resume else "run"
        err.print(f"{verb} {record.run_key}: {_count(len(plan.graph), 'agent')} in {_count(len(plan.waves), 'wave')}, "
                  f"workspace {space.root}")
        if plan.warnings:  # one line: Toka's own files carry many fields kept as context
            files = len({w.source for w in plan.warnings})
            err.print(f"[yellow]warning:[/yellow] {_count(len(plan.warnings), 'spec warning')} in "
                      f"{_count(files, 'file')}; `toka validate` lists them")
        if config.in_place:
            err.print(f"[yellow]warning:[/yellow] in place: the agents edit {escape(str(space.root))} directly, all in "
                      "the same tree (no branches to review or undo)")
        else:
            from .branches import in_git_repository, load_run, ref_part

            if in_git_repository(space.root):
                start = " and your uncommitted work" if config.include_uncommitted else "; your checkout is not touched"
                base = escape(config.base)
                if resume:  # it goes on from where the run started, whatever was committed since
                    with suppress(BranchError):
                        base = f"{load_run(space.state_dir, record.run_key).base[:12]} ({base} when the run started)"
                err.print(f"branches: each agent works on toka/{escape(ref_part(record.run_key))}/<agent> in its own "
                          f"worktree, from {base}{start}")
            else:
                err.print("branches: the workspace is not a git repository: the agents work on branches of a private "
                          "copy of it (.toka/copies/); the run ends with a patch for `toka apply`; the workspace is "
                          "not touched")
        _prefect_environment(verbose=verbose)
        with _on_lasting_server():
            _run_and_report(plan, spec_paths, list(agent or ()), config, record, space, json_file, verbose=verbose,
                            earlier=earlier)
    finally:
        held.close()


#: Run settings a resume takes as recorded, never otherwise: where the work is and what the
#: finished tasks' cache keys hold (a change would do, and pay for, the work again).
_FIXED_ON_RESUME = {s.name: s.flag for s in run_settings() if s.name in (
    "in_place", "base", "include_uncommitted", "result_storage", "max_turns", "max_tokens", "temperature")}


def _run_and_report(plan: Plan, spec_paths: list[str], agents: list[str], config: RunConfig, record: RunRecord,
                    space: Workspace, json_file: Path | None, *, verbose: bool, earlier: str | None = None) -> None:
    """Run the pipeline under the run guard, then print the summary and where everything is; exits."""
    from .lifecycle import EXIT_API_GONE, RunGuard, Stopped

    # Prefect's log lines (--verbose) go straight to the terminal and would break a live table.
    view = _LiveView(plan, live=err.is_terminal and not verbose)
    guard = RunGuard(hint=f"continue with: toka run --resume (run {record.run_key})",
                     write=lambda line: _say_last(view, line), notice=lambda line: err.print(escape(line)))
    try:
        with _user_errors(), guard, listen(view.update), view:
            summary = guard.run(_execute(plan, spec_paths, agents, config, results_dir=space.state_dir / "results",
                                         earlier=earlier))
    except Stopped as stop:  # SIGTERM, Ctrl-C, or the Prefect API died under the run
        guard.announce(stop)
        if stop.exit_code != EXIT_API_GONE:
            _say_why_stopped(record.run_key, config.workspace, stop.reason)
        raise typer.Exit(stop.exit_code) from None
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/yellow]; continue with: toka run --resume (run {record.run_key})")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:
        problem = _prefect_unreachable(e)
        if problem is None:
            raise
        err.print(f"[red]error:[/red] {escape(problem)}")
        err.print(f"once it is fixed, continue with: toka run --resume (run {record.run_key})")
        raise typer.Exit(EXIT_FAILED) from None
    _print_summary(summary)
    fatal = next((a.fatal for a in summary.agents if a.fatal), None)
    if fatal:
        err.print(f"[red]error:[/red] {escape(fatal)}")
    if json_file is not None:
        json_file.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    _print_locations(summary, plan, space.state_dir, json_file)
    # completed-with-failures exits 0 as Prefect's Completed does: the failure policy let the agents
    # go on from their medium and low failures; the summary names them.
    raise typer.Exit(EXIT_FAILED if summary.state == "failed" else 0)


def _print_locations(summary: PipelineSummary, plan: Plan, state_dir: Path, json_file: Path | None) -> None:
    """Where the run's outputs are: its reports (written here, as Markdown), its audit trail, the
    ``--json`` summary, and the run in the Prefect UI when the server outlives the run."""
    from .audit import audit_path, run_file_name
    from .report import agent_markdown, pipeline_markdown

    name = run_file_name(summary.run_key)
    folder = state_dir / "reports" / (name if name.strip(".") else name.replace(".", "_"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pipeline.md").write_text(pipeline_markdown(summary, plan.graph), encoding="utf-8")
        for report in summary.agents:
            (folder / f"{report.agent}.md").write_text(agent_markdown(report, model=summary.model),
                                                       encoding="utf-8")
        out.print(f"reports:     {escape(_shown(folder))}/ (pipeline.md, and <agent>.md for each agent)")
    except OSError as e:
        err.print(f"[yellow]warning:[/yellow] the reports could not be written to {escape(_shown(folder))}: "
                  f"{escape(e.strerror or str(e))}")
    trail = audit_path(state_dir, summary.run_key)
    if trail.is_file():
        out.print(f"audit trail: {escape(_shown(trail))} (toka audit --run {escape(summary.run_key)})")
    else:
        out.print("audit trail: none (no tool calls)")
    if json_file is not None:
        out.print(f"summary:     {escape(str(json_file))}")
    _print_branches(summary)
    url = _ui_url(summary.flow_run_id)
    if url:
        out.print(f"Prefect UI:  {escape(url)}")


def _print_branches(summary: PipelineSummary) -> None:
    """Where the agents' work is, and how to look at it."""
    run = summary.changes
    if run is None:
        return
    count = len(run.files_changed)
    out.print(f"branch:      {escape(run.branch)} ({count} file{'' if count == 1 else 's'} changed; "
              f"agents' own: toka/.../<agent>)")
    for agent, reason in run.not_merged.items():
        err.print(f"[yellow]not merged:[/yellow] {escape(agent)}: {escape(reason)}")
    if run.patch:
        out.print(f"patch:       {escape(_shown(Path(run.patch)))}")
    if run.pushed:
        out.print(f"push:        {escape(run.pushed)}")
    key = escape(summary.run_key)
    if run.patch:  # the branches are in a private copy: the workspace has no git to look with
        out.print(f"review:      toka diff --run {key}   |   the patch above")
        out.print(f"then:        toka apply --run {key}  (apply it to the workspace)   |   toka discard --run {key}")
        return
    out.print(f"review:      toka diff --run {key}   |   git log {escape(run.base[:12])}..{escape(run.branch)}")
    out.print(f"then:        toka apply --run {key}  (merge into your checkout)   |   toka discard --run {key}")


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _ui_url(flow_run_id: str | None) -> str | None:
    """The run's page in the Prefect UI, when a server that outlives ``toka run`` holds it."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    api_url = settings.api.url  # None: the embedded server, gone with the run
    if not api_url or not flow_run_id:
        return None
    base = settings.ui_url or api_url.rstrip("/").removesuffix("/api")
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _check_writable(path: Path) -> None:
    """Fail before the run, not after it, when the summary could not be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"--json {str(path)!r}: is a directory; name a file")
    if not parent.is_dir():
        raise ConfigError(f"--json {str(path)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"--json {str(path)!r}: not writable")


def _approval_set(given: list[str] | None) -> list[str]:
    if not given:
        return list(DEFAULT_NEEDS_APPROVAL)
    keys = [] if given == ["none"] else given
    unknown = sorted(set(keys) - set(APPROVAL_KEYS))
    if unknown:
        raise ConfigError(f"--needs-approval takes {', '.join(APPROVAL_KEYS)} or 'none'; "
                          f"got {', '.join(unknown)}")
    return keys


def _settle_approvals(plan: Plan, config: RunConfig) -> RunConfig:
    """Ask on a terminal about approvals the agents may need and nobody decided; else they are denied."""
    approvals = config.approvals
    approve, deny = list(approvals.approve), list(approvals.deny)
    wanted: dict[str, list[str]] = {}
    for name, spec in plan.graph.agents.items():
        for key in approval_keys(spec, approvals.needs_approval):
            wanted.setdefault(key, []).append(name)
    for key, agents in sorted(wanted.items()):
        if key in approve or key in deny:
            continue
        if sys.stdin.isatty() and err.is_terminal:
            question = f"{', '.join(agents)} may use {key!r} in this run. Approve?"
            (approve if typer.confirm(question, default=False, err=True) else deny).append(key)
        else:
            err.print(f"[yellow]not approved:[/yellow] {key} (needed by {', '.join(agents)}); "
                      f"it is denied unless you pass --approve {key}")
    update = {"approve": tuple(approve), "deny": tuple(deny)}
    return config.model_copy(update={"approvals": approvals.model_copy(update=update)})


@app.command(cls=_Command)
def doctor() -> None:
    """Show which mechanism enforces each resource limit on this host."""
    from .sandbox import detect_host

    host = detect_host()
    rows = [("wall-clock timeout", "timeout"), ("max_memory", "memory"), ("max_cpu", "cpu"),
            ("max_processes", "processes"), ("max_disk_usage", "disk"), ("network denied", "network"),
            ("max_network_bandwidth", "bandwidth"), ("other processes", "processes-visible"),
            ("the host", "host"), ("unix sockets", "unix-sockets"), ("credential files", "credentials"),
            ("git control files", "git"), ("runtime killed (-9)", "orphans")]
    out.print(f"cgroups: {host.cgroup or 'not available'}"
              + (f" ({', '.join(sorted(host.cgroup_root))})" if host.cgroup_root else ""))
    for label, key in rows:
        how = host.mechanism(key)
        refused = ("a running command may outlive the runtime" if key == "orphans"
                   else "commands of agents with sandbox: true that declare it are refused")
        shown = how or f"[red]none: {refused}[/red]"
        out.print(f"  {label:<22} {shown}")


@app.command(cls=_Command)
def audit(
    run_id: Annotated[
        str | None, typer.Option("--run", help="Run key (default: the last run here).", metavar="KEY")
    ] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's tool calls.", metavar="NAME")] = None,
    workspace: Annotated[Path, typer.Option(help="Workspace whose audit trail to read.", metavar="DIR")] = Path("."),
    all_runs: Annotated[bool, typer.Option("--all", help="Every recorded run.")] = False,
) -> None:
    """Print the tool-call audit trail as a table."""
    from .audit import audit_records

    with _user_errors():
        space = Workspace(workspace)
        try:
            last: str | None = RunRecord.load_last(space.state_dir).run_key
        except ConfigError:
            if not (all_runs or run_id) and RunRecord.path(space.state_dir).exists():
                raise  # the record is unreadable: say so
            last = None
        if all_runs or run_id:
            key = None if all_runs else run_id
        elif last is not None:
            key = last
        else:
            raise ConfigError(f"no run is recorded in {space.state_dir}: name one with --run KEY, or use --all")
        # The last run may have made no tool calls; another run must have a trail to be known.
        rows = audit_records(space.state_dir, run=key, agent=agent, check_run=key != last)
    title = f"audit: run {key or 'all'}" + (f", agent {agent}" if agent else "")
    table = Table(title=escape(title), title_justify="left")
    for column in ("time", "agent", "task", "tool", "decision", "arguments", "exit", "duration", "note"):
        table.add_column(column, overflow="fold")
    for r in rows:
        args = json.dumps(r.get("arguments", {}), ensure_ascii=False)
        table.add_row(r["ts"][11:23], escape(str(r.get("agent", ""))), str(r.get("task", "")),
                      escape(str(r.get("tool", ""))), str(r.get("decision", "")), escape(args[:80]),
                      "" if r.get("exit_code") is None else str(r["exit_code"]),
                      f"{r.get('duration_s', 0):.2f}s", escape(_one_line(str(r.get("reason") or ""))[:80]))
    _print_table(table)
    out.print(f"{len(rows)} tool calls, {sum(r.get('decision') == 'refused' for r in rows)} refused")


RunOpt = Annotated[str | None, typer.Option("--run", help="Run key (default: the last run here).", metavar="KEY")]
BranchAgentOpt = Annotated[str | None, typer.Option("--agent", help="Only this agent's changes.", metavar="NAME")]
WorkspaceOpt = Annotated[Path, typer.Option(help="The workspace the run worked on.", metavar="DIR")]


def _run_branches(workspace: Path, run_key: str | None, agent: str | None) -> Any:
    """The branches of run ``run_key`` (default: the last run) in ``workspace``; checks ``agent``."""
    from .branches import load_run

    space = Workspace(workspace)
    key = run_key or _last_run_here(space.state_dir)
    branches = load_run(space.state_dir, key)
    if agent is not None and not branches.agent_record(agent).is_file():
        raise ConfigError(f"run {key} has no branch for an agent named {agent!r}")
    return branches


def _last_run_here(state_dir: Path) -> str:
    """The run that started last in the workspace, from ``toka run`` or a deployment (a nightly run).

    Raises:
        ConfigError: no run is recorded here.
    """
    from .branches import runs_with_branches

    newest = runs_with_branches(state_dir)[:1]
    last = RunRecord.path(state_dir)
    # The command line's record is written as its run starts, the branches' record just after:
    # a deployment's run, which only writes the latter, is the last one when its record is newer.
    if newest and (not last.exists() or newest[0][0] >= last.stat().st_mtime):
        return newest[0][1]
    return RunRecord.load_last(state_dir).run_key


@app.command(cls=_Command)
def diff(run_id: RunOpt = None, agent: BranchAgentOpt = None, workspace: WorkspaceOpt = Path("."),
         stat: Annotated[bool, typer.Option("--stat", help="Only the diffstat.")] = False) -> None:
    """Show the changes a run's agents made (the run's merged branch, or one agent's)."""
    from .branches import agent_changes, diff_text, diffstat, merged_tip

    with _user_errors():
        branches = _run_branches(workspace, run_id, agent)
        repo = Path(branches.repo)
        if agent is None:
            start, tip = branches.base, merged_tip(branches)
        else:
            changes = agent_changes(branches, agent)
            assert changes is not None
            start, tip = changes.base, changes.commit
        text = diffstat(repo, start, tip) if stat else diff_text(repo, start, tip)
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    if not text:
        err.print("no changes")


@app.command(cls=_Command)
def apply(run_id: RunOpt = None, agent: BranchAgentOpt = None, workspace: WorkspaceOpt = Path(".")) -> None:
    """Merge a run's changes (or one agent's) into your checkout; refused if that would overwrite your work."""
    from .branches import apply_changes

    with _user_errors():
        branches = _run_branches(workspace, run_id, agent)
        refuse_if_running(Path(branches.state_dir), branches.run_key, "apply")
        done = apply_changes(branches, agent)
    out.print(escape(done))


@app.command(cls=_Command)
def discard(run_id: RunOpt = None, workspace: WorkspaceOpt = Path(".")) -> None:
    """Remove a run's branches and worktrees (its reports and audit trail stay)."""
    from .branches import discard_run, unrecorded_run
    from .journal import journal_dir

    with _user_errors():
        try:
            branches = _run_branches(workspace, run_id, None)
        except BranchError:
            # Its record gone (.toka deleted midway), its branches may still be in the repository.
            space = Workspace(workspace)
            branches = unrecorded_run(space.root, space.state_dir, run_id) if run_id else None
            if branches is None:
                raise
        refuse_if_running(Path(branches.state_dir), branches.run_key, "discard")
        # Its journals would replay turns onto worktrees made anew without their edits; a run under
        # its key (a resume) is refused from now on (branches.refuse_discarded), from before anything
        # is removed: a discard cut short is no run to go on with. Its record stays: the next run
        # marks Crashed what a killed discarded run left Running.
        shutil.rmtree(journal_dir(Path(branches.state_dir), branches.run_key), ignore_errors=True)
        discarded = discard_run(branches)
    for worktree, left in discarded.uncommitted.items():
        files = f"{left} uncommitted file{'s' * (left != 1)}"
        err.print(f"[yellow]removed[/yellow] {escape(worktree)} (with {files}: gone)")
    worktrees = sum(not name.startswith("toka/") for name in discarded.removed)
    parts = [_count(n, noun, plural) for n, noun, plural in (
        (len(discarded.removed) - worktrees, "branch", "branches"), (worktrees, "worktree", None)) if n]
    what = f"{' and '.join(parts)} removed" if parts else "no branch or worktree was left"
    out.print(f"discarded run {escape(branches.run_key)}: {what}")


@app.command(cls=_Command)
def deployments(
    paths: PathsArg = None,
    prefect_yaml: Annotated[
        Path, typer.Option("--prefect-yaml", help="The file to update.", metavar="FILE")
    ] = Path("prefect.yaml"),
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if prefect.yaml is out of date; write nothing.")] = False,
) -> None:
    """Regenerate the per-agent deployments of prefect.yaml from the specs (the one source of truth)."""
    from .deployments import sync_deployments

    with _user_errors():
        changed = sync_deployments(prefect_yaml, [str(p) for p in _paths(paths)], check=check)
    if check:
        if changed:
            err.print(f"{prefect_yaml} is out of date with the specs; regenerate it with: toka deployments")
            raise typer.Exit(EXIT_FAILED)
        out.print(f"{prefect_yaml} is current")
    else:
        out.print(f"{'updated' if changed else 'unchanged'}: {prefect_yaml}")


limits_app = typer.Typer(help="Model request limits shared by every worker (Prefect global concurrency limits).",
                         no_args_is_help=True, cls=_Group)
app.add_typer(limits_app, name="limits")

RpmOpt = Annotated[int | None, typer.Option(min=1, help="Model requests per minute, across all workers.", metavar="N")]
ConcOpt = Annotated[
    int | None, typer.Option(min=1, help="Model requests in flight at once, across all workers.", metavar="N")
]


@limits_app.command("apply", cls=_Command)
def limits_apply(requests_per_minute: RpmOpt = None, concurrent_requests: ConcOpt = None) -> None:
    """Create or update the limits on the Prefect server (PREFECT_API_URL)."""
    settings = LimitSettings(requests_per_minute, concurrent_requests)
    if not settings.uses_server:
        err.print("nothing to apply: give --requests-per-minute and/or --concurrent-requests")
        raise typer.Exit(EXIT_BAD_INPUT)
    _prefect_environment(verbose=False)
    from .limits import apply_limits

    for line in asyncio.run(apply_limits(settings)):
        out.print(line)


@limits_app.command("check", cls=_Command)
def limits_check(requests_per_minute: RpmOpt = None, concurrent_requests: ConcOpt = None) -> None:
    """Exit 1 if limits a run would use are missing on the Prefect server."""
    settings = LimitSettings(requests_per_minute, concurrent_requests)
    _prefect_environment(verbose=False)
    from .limits import check_limits

    missing = asyncio.run(check_limits(settings))
    if missing:
        err.print(f"missing on the server: {', '.join(missing)}; create them with: toka limits apply ...")
        raise typer.Exit(EXIT_FAILED)
    out.print("all configured limits exist")


server_app = typer.Typer(help="A local Prefect server that outlives runs (UI and run history stay).",
                         no_args_is_help=True, cls=_Group)
app.add_typer(server_app, name="server")


@server_app.command("start", cls=_Command)
def server_start(
    host: Annotated[str, typer.Option(help="Address to listen on.", metavar="HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.", metavar="PORT")] = 4200,
) -> None:
    """Start Prefect's server in the background; `toka run` uses it from then on."""
    _prefect_environment(verbose=False)
    from .server import start_server

    with _user_errors():
        if os.environ.get("PREFECT_API_URL"):
            err.print(f"[yellow]note:[/yellow] PREFECT_API_URL={escape(os.environ['PREFECT_API_URL'])} is set; "
                      "`toka run` uses that API, not this server, while it is set")
        err.print("starting the Prefect server (10-30 s the first time)...")
        server, started = start_server(host, port)
    out.print(f"Prefect server {'started' if started else 'already running'}: UI {server.ui_url}, "
              f"API {server.api_url} (pid {server.pid}, log {server.log})")
    out.print(_warm_line(server))
    out.print("toka run uses it from now on; stop it with: toka server stop")


def _warm_line(server: Any) -> str:
    if not server.warm:
        return (f"no warm process (see {server.log}; `toka server start` starts one): runs start in their own "
                "processes")
    return f"warm process: pid {server.warm_pid} (runs start without importing Prefect again)"


@server_app.command("stop", cls=_Command)
def server_stop() -> None:
    """Stop the server `toka server start` started."""
    _prefect_environment(verbose=False)
    from .server import stop_server

    server = stop_server()
    out.print(f"stopped the Prefect server at {server.ui_url}" if server else "no toka server is running")


@server_app.command("status", cls=_Command)
def server_status() -> None:
    """Say whether the server runs, and where (exit 1 when it does not)."""
    _prefect_environment(verbose=False)
    from .server import recorded_server, running_server

    server = running_server()
    if server is not None:
        out.print(f"running: UI {server.ui_url}, API {server.api_url} (pid {server.pid})")
        out.print(_warm_line(server))
        return
    recorded = recorded_server()
    if recorded is not None:
        out.print(f"not answering: the server at {recorded.ui_url} (pid {recorded.pid}) does not answer its "
                  f"health check; see {recorded.log}")
    else:
        out.print("not running (start it with: toka server start)")
    raise typer.Exit(EXIT_FAILED)


@contextmanager
def _on_lasting_server() -> Iterator[None]:
    """Inside: Prefect talks to the running `toka server`, unless an API is configured already
    (PREFECT_API_URL in the environment or the profile keeps precedence) or none runs."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from .server import running_server

    server = None if get_current_settings().api.url else running_server()
    if server is None:
        yield
        return
    from .warm import forked

    warm = ", warm start" if forked() else ""
    err.print(f"using the toka server at {server.ui_url} (the run stays there after it ends{warm}; toka server stop)")
    # Prefect read its settings when imported: a changed environment would not reach it.
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _prefect_environment(*, verbose: bool) -> None:
    """Settings for Prefect that must be in place before it is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect waits 20 s for its embedded server; its first start on a fresh machine
    # (database migrations) took longer than that here when the machine was busy.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EMBEDDED_SERVER_TIMEOUT))
    if not verbose:
        # Failures are reported by our own summary; Prefect's console copies (with
        # tracebacks) only bury it. The API handler still ships every log to the UI.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        # Nor its services' errors: with the server gone, one 2 KB line per event it could not send
        # (the event whole, tool arguments included) came before toka's own line saying so.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL", "CRITICAL")
    # Prefect's client prints a telemetry notice on a first run in a terminal (possibly over the
    # live table) that asks for PREFECT_SERVER_ANALYTICS_ENABLED=false, which is set above.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from .warm import refresh_after_fork

    refresh_after_fork()  # Prefect was imported before these were set, in a warm process


def _say_last(view: _LiveView, line: str) -> None:
    """The line that says why a run stopped; the process may end right after it."""
    if view.live:  # else the table is drawn again below the line, and a hard exit leaves it there
        view.live.stop()
    err.print(escape(line))


def _prefect_unreachable(error: BaseException) -> str | None:
    """One line for a Prefect API that never answered, or None for any other error."""
    import httpx

    api_url = os.environ.get("PREFECT_API_URL")
    # Prefect raises bare RuntimeErrors for these; their text is the only handle.
    unreachable = isinstance(error, httpx.TransportError) or (
        isinstance(error, RuntimeError) and str(error).startswith("Failed to reach API"))
    if unreachable and api_url:
        return f"cannot reach the Prefect API at PREFECT_API_URL={api_url} (is the server running?)"
    if isinstance(error, RuntimeError) and "ephemeral Prefect API server" in str(error):
        timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
        return (f"Prefect's embedded server did not start within {timeout} s; raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start `prefect server start` and set "
                "PREFECT_API_URL")
    return None


async def _execute(plan: Plan, specs: list[str], agents: list[str], config: RunConfig, *,
                   results_dir: Path, earlier: str | None = None) -> PipelineSummary:
    """Run the pipeline; ``earlier``: the key of the workspace's last run (this one's, on a resume),
    whose runs its process may have left Running in the API (:func:`_tidy_earlier`)."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from .pipeline import pipeline_flow, use_plan
    from .startup import settle_gc
    from .warm import preload_prefect

    preload_prefect()  # now, not at the flow's first call: frozen with the rest of the start-up
    settle_gc()  # the `toka` command deferred garbage collection until here
    tidying = None
    if earlier == config.run_key:  # a resume: before its own runs exist, which would match
        await _tidy_earlier(earlier, config.workspace)
    elif earlier:  # another run's: beside this one, off its start
        tidying = asyncio.create_task(_tidy_earlier(earlier, config.workspace))
    groups = {name: getattr(config, name) for name in GROUPS if name != "run"}
    try:
        with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: results_dir}), \
                use_plan(plan, specs, agents):  # the specs are loaded and checked already
            state = await pipeline_flow(specs=specs, agents=agents, run=RunOptions(**config.model_dump(
                include=set(RunOptions.model_fields))), return_state=True, **groups)
            outcome = await state.aresult(raise_on_failure=False)
    except BaseException:
        if tidying is not None:
            tidying.cancel()
        raise
    if tidying is not None:
        await tidying
    if isinstance(outcome, RunFailedError) and isinstance(outcome.report, PipelineSummary):
        return outcome.report
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome  # type: ignore[no-any-return]


def _say_why_stopped(run_key: str, workspace: str, reason: str) -> None:
    """The stop's reason and the way on, as the state message of the run in the Prefect UI."""
    from .pipeline import PIPELINE_FLOW
    from .runs import say_why_stopped

    how = {"interrupted": "interrupted (Ctrl-C)", "terminated": "terminated (SIGTERM)"}.get(reason, reason)
    message = f"{how} in toka run; continue with: toka run --resume (run {run_key}) in {workspace}"
    try:
        asyncio.run(asyncio.wait_for(say_why_stopped(run_key, workspace, message,
                                                     pipeline=PIPELINE_FLOW["name"]), timeout=10))
    except Exception:  # the UI's wording: not worth more of the person's wait
        pass


def _last_run_key(state_dir: Path) -> str | None:
    try:
        return RunRecord.load_last(state_dir).run_key
    except ConfigError:  # none yet, or unreadable (the run records itself anew)
        return None


async def _tidy_earlier(run_key: str, workspace: str) -> None:
    """Mark Crashed what run ``run_key``'s killed process left Running in the API, and say so."""
    from .pipeline import PIPELINE_FLOW
    from .runs import crash_left_running

    try:
        if crashed := await crash_left_running(run_key, workspace, pipeline=PIPELINE_FLOW["name"]):
            err.print(f"run {escape(run_key)} here had ended without saying so (killed?): {crashed} of its runs left "
                      "Running in the Prefect API are marked Crashed")
    except Exception as e:  # the UI's tidiness: not worth failing a run over
        err.print(f"[yellow]warning:[/yellow] the runs of the last run here ({escape(run_key)}) could not be "
                  f"looked up in the Prefect API: {escape(str(e) or type(e).__name__)}")


_STATE_STYLE = {"completed": "green", "completed-with-failures": "yellow", "cached": "green", "failed": "red",
                "not-run": "yellow", "running": "cyan", "waiting": "dim"}


class _LiveView:
    """Agents, their current task and done/total, live on a terminal; plain lines otherwise."""

    def __init__(self, plan: Plan, *, live: bool) -> None:
        from rich.live import Live

        self.order = plan.order
        self.rows = {name: {"state": "waiting", "done": 0,
                            "total": len(plan.graph.agents[name].tasks.default), "task": ""}
                     for name in self.order}
        self.live: Live | None = Live(self._table(), console=err, refresh_per_second=8,
                                      transient=True) if live else None

    def __enter__(self) -> _LiveView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.__exit__(None, None, None)

    def update(self, event: ProgressEvent) -> None:
        row = self.rows.get(event.agent)
        if row is None:
            return
        if event.total is not None:
            row["total"] = event.total
        if event.kind == "agent-started":
            row["state"] = "running"
        elif event.kind == "task-started":
            row["task"] = f"{event.task}/{event.total} {event.description}"
            row["turn"] = None
        elif event.kind == "task-turn":
            if row.get("turn") == event.turn:
                return
            row["turn"] = event.turn
        elif event.kind == "task-finished":
            row["done"] += 1
            if not self.live:
                note = f" ({event.reason})" if event.state == "failed" and event.reason else ""
                err.print(f"{event.agent}: task {event.task}/{event.total} {event.state}{escape(note)}")
        elif event.kind == "branch-note":
            err.print(f"{event.agent}: {escape(event.reason or '')}")  # above the live table, when there is one
            return
        elif event.kind == "agent-finished":
            row["state"], row["task"] = event.state or "", escape(event.reason or "")
            if not self.live:
                why = f": {event.reason}" if event.reason else ""
                err.print(f"{event.agent}: [{_STATE_STYLE.get(event.state or '', 'white')}]"
                          f"{event.state}[/]{escape(why)}")
        if self.live:
            self.live.update(self._table())

    def _table(self) -> Any:
        table = Table(box=None, pad_edge=False)
        for column in ("agent", "state", "tasks", "current"):
            table.add_column(column)
        for name in self.order:
            row = self.rows[name]
            style = _STATE_STYLE.get(row["state"], "white")
            turn = f"turn {row['turn']}: " if row.get("turn") and row["state"] == "running" else ""
            table.add_row(name, f"[{style}]{row['state']}[/]", f"{row['done']}/{row['total']}",
                          escape(turn + str(row["task"]))[:70])
        return table


def _print_table(table: Table) -> None:
    """A table on stdout: fitted to a terminal; elsewhere (a pipe, a file, cron) one line per row
    with every cell whole, where rich would wrap or cut cells at 80 columns."""
    if out.is_terminal:
        out.print(table)
        return
    title, table.title = table.title, None  # a title wraps at the table's width
    if title:
        out.print(title)
    for column in table.columns:
        column.no_wrap = True
    width = out.measure(table, options=out.options.update_width(1_000_000)).maximum
    Console(file=out.file, width=width, color_system=out.color_system, highlight=False, emoji=False).print(table)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _print_summary(summary: PipelineSummary) -> None:
    from .redact import redact, secret_values

    secrets = secret_values()
    table = Table(title=escape(f"run {summary.run_key}: {summary.state}"), title_justify="left")
    for column in ("agent", "state", "done", "failed", "not run", "duration", "tokens", "note"):
        table.add_column(column)
    for a in summary.agents:
        style = _STATE_STYLE.get(a.state, "white")
        table.add_row(
            a.agent, f"[{style}]{a.state}[/]", str(a.count("completed", "cached")),
            str(a.count("failed")), str(a.count("not-run")), f"{a.duration_s:.1f}s",
            str(a.usage.total_tokens), escape(_one_line(redact(a.reason or "", secrets))),
        )
    _print_table(table)
    usage = summary.usage
    cached = sum(a.count("cached") for a in summary.agents)
    label = " (offline model: placeholder results)" if summary.offline else ""
    with_failures = [a for a in summary.agents if a.state == "completed-with-failures"]
    partly = (f", {len(with_failures)} completed with failed tasks ("
              + ", ".join(f"{a.agent}: {a.count('failed')} failed" for a in with_failures) + ")"
              if with_failures else "")
    out.print(
        f"{sum(a.state == 'completed' for a in summary.agents)}/{len(summary.agents)} agents completed"
        f"{partly}{label}; {usage.total_tokens} tokens in {usage.requests} model requests; "
        f"{cached} tasks replayed from cache; {summary.duration_s:.1f}s"
    )
    if summary.budget_tokens or cached:
        budget = f" of a {summary.budget_tokens:,}-token pipeline budget" if summary.budget_tokens else ""
        out.print(f"tokens spent by this logical run, replayed tasks included: {summary.spent_tokens:,}{budget}")


def schema_text() -> str:
    """The JSON Schema of :class:`AgentSpec`, as committed next to the specs."""
    document: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **AgentSpec.model_json_schema(),
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    """Console-script entry point."""
    app()
