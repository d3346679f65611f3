"""The ``toka`` command line.

Bad input (a malformed spec, an unknown agent, a cycle) prints located
messages and exits with code 2; it never shows a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from .errors import ConfigError, Problem, RunFailedError, TokaError
from .plan import Plan, limits_text, make_plan
from .policy import DEFAULT_NEEDS_APPROVAL, approval_keys, check_unsandboxed
from .progress import ProgressEvent, listen
from .config import RunConfig
from .limits import LimitSettings
from .providers import choose_model, describe_choice
from .results import PipelineSummary
from .runs import RunRecord
from .spec import AgentSpec
from .specset import DEFAULT_SPEC_DIR
from .workspace import Workspace

__all__ = ["app", "main"]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EMBEDDED_SERVER_TIMEOUT = 120

app = typer.Typer(
    name="toka",
    help="Run declarative Toka agent specs as Prefect flows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

PathsArg = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Spec files or directories (searched recursively). Default: agent_specs/.",
        show_default=False,
    ),
]
AgentOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--agent",
        "-a",
        help="Run only this agent and its required dependencies (repeatable).",
        show_default=False,
    ),
]


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print every problem of a TokaError, one per line, and exit 2."""
    try:
        yield
    except TokaError as e:
        for problem in e.problems:
            _print_problem(problem)
        n = len(e.problems)
        err.print(f"[red]{n} error{'s' if n != 1 else ''}[/red]")
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _print_problem(problem: Problem) -> None:
    colour = "red" if problem.level == "error" else "yellow"
    err.print(f"[{colour}]{problem.level}:[/{colour}] {escape(str(problem))}")


def _paths(paths: list[Path] | None) -> list[Path]:
    return list(paths) if paths else [DEFAULT_SPEC_DIR]


def _deps(names: list[str]) -> str:
    return ", ".join(names) if names else "-"


def _agent_line(plan: Plan, name: str) -> str:
    spec = plan.graph.agents[name]
    return (
        f"[bold]{name}[/bold]  {spec.priority}  {len(spec.tasks.default)} tasks"
        f"  requires: {_deps(plan.graph.upstream(name, 'required'))}"
        f"  optional: {_deps(plan.graph.upstream(name, 'optional'))}"
        f"  limits: {limits_text(spec)}"
    )


@app.command()
def validate(paths: PathsArg = None) -> None:
    """Check spec files and their dependencies; print one line per agent."""
    named = _paths(paths)
    with _user_errors():
        # Only some files of a set: their dependencies may live in the others.
        plan = make_plan(named, partial=all(Path(p).is_file() for p in named))
    from .capabilities import capability_status

    for name, spec in plan.graph.agents.items():
        out.print(f"[green]ok[/green] {_agent_line(plan, name)}")
        untooled = [c for c in spec.security.capabilities_required
                    if capability_status(c) == "declared, not tool-backed"]
        if untooled:
            out.print(f"   declared, not tool-backed: {escape(', '.join(untooled))}")
    for problem in plan.warnings:
        _print_problem(problem)
    n, w = len(plan.graph), len(plan.warnings)
    out.print(f"{n} agent{'s' if n != 1 else ''} valid, {w} warning{'s' if w != 1 else ''}")


@app.command()
def plan(
    paths: PathsArg = None,
    agent: AgentOpt = None,
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
    out.print(f"{len(graph)} agents in {len(result.waves)} waves")
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
                f"{len(spec.tasks.default)} tasks{extra}  {limits_text(spec)}"
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


@app.command()
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
    check: Annotated[
        Path | None,
        typer.Option("--check", help="Exit 1 if this file differs from the current schema."),
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


@app.command()
def run(
    paths: PathsArg = None,
    agent: AgentOpt = None,
    model: Annotated[
        str | None,
        typer.Option(envvar="TOKA_MODEL", help="'auto' (Anthropic if ANTHROPIC_API_KEY is set, else offline), "
                     "'offline', or a model id.  [default: auto; with --resume: the resumed run's]",
                     show_default=False),
    ] = None,
    workspace: Annotated[Path, typer.Option(help="Directory the agents work in.")] = Path("."),
    max_concurrency: Annotated[int, typer.Option(min=1, help="Most agents running at once.")] = 4,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the last run here: finished tasks are not redone.")
    ] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the run summary as JSON (format 'toka-run/1').")
    ] = None,
    context: Annotated[
        list[str] | None,
        typer.Option("--context", help="Switch on a context: its conditional tasks run too (repeatable)."),
    ] = None,
    run_key: Annotated[
        str | None, typer.Option(help="Run under this key (tasks finished under it are reused).")
    ] = None,
    max_turns: Annotated[int, typer.Option(min=1, help="Model requests per task attempt.")] = 20,
    request_timeout: Annotated[float, typer.Option(help="Seconds one model request may take.")] = 600.0,
    task_timeout: Annotated[
        float | None, typer.Option(help="Seconds one task attempt may take (default: the agent's timeout).")
    ] = None,
    retry_delay: Annotated[float, typer.Option(help="Base seconds between task retries.")] = 10.0,
    result_storage: Annotated[
        str | None,
        typer.Option(help="Prefect filesystem block slug for results (default: .toka/results in the workspace)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per model response.")] = 4096,
    temperature: Annotated[float | None, typer.Option(min=0, max=1, help="Sampling temperature.")] = None,
    max_attempts: Annotated[
        int, typer.Option(min=1, max=20, help="HTTP attempts per model request (transient failures).")
    ] = 5,
    max_retry_wait: Annotated[float, typer.Option(help="Seconds of waiting between attempts, in all.")] = 120.0,
    api_key_secret: Annotated[
        str | None, typer.Option(help="Prefect Secret block holding the Anthropic API key.")
    ] = None,
    requests_per_minute: Annotated[
        int | None, typer.Option(min=1, help="Shared request rate (a Prefect global limit; see toka limits).")
    ] = None,
    concurrent_requests: Annotated[
        int | None, typer.Option(min=1, help="Shared concurrent requests (a Prefect global limit).")
    ] = None,
    in_process_requests: Annotated[
        int | None, typer.Option(min=1, help="Concurrent model requests from this process.")
    ] = None,
    task_budget: Annotated[int | None, typer.Option(min=1, help="Tokens one task may spend.")] = None,
    agent_budget: Annotated[int | None, typer.Option(min=1, help="Tokens one agent may spend.")] = None,
    pipeline_budget: Annotated[int | None, typer.Option(min=1, help="Tokens the whole run may spend.")] = None,
    allow_unsandboxed: Annotated[
        bool, typer.Option("--allow-unsandboxed", help="Let agents whose spec says sandbox: false run commands.")
    ] = False,
    approve: Annotated[
        list[str] | None,
        typer.Option("--approve", help="Approve a use in advance: network-access, git-push, write-outside-paths."),
    ] = None,
    deny: Annotated[list[str] | None, typer.Option("--deny", help="Deny a use in advance (repeatable).")] = None,
    needs_approval: Annotated[
        list[str] | None,
        typer.Option("--needs-approval", help="Uses that need approval, replacing the default set "
                     "(network-access, git-push, write-outside-paths); 'none' for none (repeatable)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's log lines.")] = False,
) -> None:
    """Run the agents (default: all of agent_specs/) as Prefect flows, in dependency order."""
    with _user_errors():
        space = Workspace(workspace)
        if resume:
            # The resumed run's own selection: anything else would make different cache keys
            # (or a different set of agents) and redo, or newly do, work.
            record = RunRecord.load_last(space.state_dir)
            given = {"--run-key": run_key, "specs": [str(p) for p in paths] if paths else None,
                     "--agent": agent or None, "--context": context or None, "--model": model}
            for option, value in given.items():
                if value is not None and value != record.selection(option):
                    raise ConfigError(f"{option} {value!r} contradicts --resume: the last run here "
                                      f"({record.run_key}) used {record.selection(option)!r}")
            spec_paths, agent, context, model = record.specs, record.agents, record.contexts, record.model
        else:
            spec_paths = [str(p) for p in _paths(paths)]
            model = model or "auto"
            record = RunRecord.start(specs=spec_paths, agents=list(agent or ()), model=model,
                                     contexts=list(context or ()), run_key=run_key)
        plan = make_plan(spec_paths, agents=agent or ())
        options = dict(
            specs=spec_paths, agents=list(agent or ()), model=model, workspace=str(space.root),
            max_concurrency=max_concurrency, contexts=list(context or ()), run_key=record.run_key,
            max_turns=max_turns, request_timeout=request_timeout, task_timeout=task_timeout,
            retry_delay_seconds=retry_delay, result_storage=result_storage, max_tokens=max_tokens,
            temperature=temperature, max_attempts=max_attempts, max_retry_wait=max_retry_wait,
            api_key_secret=api_key_secret, requests_per_minute=requests_per_minute,
            concurrent_requests=concurrent_requests, in_process_requests=in_process_requests,
            task_token_budget=task_budget, agent_token_budget=agent_budget, pipeline_token_budget=pipeline_budget,
            allow_unsandboxed=allow_unsandboxed, needs_approval=_approval_set(needs_approval),
        )
        chosen = choose_model(_checked_config(options))
        check_unsandboxed(list(plan.graph.agents.values()), allowed=allow_unsandboxed)
        approve_list, deny_list = _settle_approvals(plan, list(approve or ()), list(deny or ()),
                                                    options["needs_approval"])
        options.update(approve=approve_list, deny=deny_list)
        if json_file is not None:
            _check_writable(json_file)
        record.save(space.state_dir)
    err.print(describe_choice(chosen))
    verb = "resuming run" if resume else "run"
    err.print(f"{verb} {record.run_key}: {len(plan.graph)} agents in {len(plan.waves)} waves, "
              f"workspace {space.root}")
    _prefect_environment(verbose=verbose)
    from .lifecycle import RunGuard, Stopped

    view = _LiveView(plan)
    guard = RunGuard(hint=f"continue with: toka run --resume (run {record.run_key})",
                     write=lambda line: _say_last(view, line))
    try:
        with _user_errors(), guard, listen(view.update), view:
            summary = guard.run(_execute(options, results_dir=space.state_dir / "results"))
    except Stopped as stop:  # SIGTERM, Ctrl-C, or the Prefect API died under the run
        guard.announce(stop)
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
    # completed-with-failures exits 0 as Prefect's Completed does: the failure policy let the agents
    # go on from their medium and low failures; the summary names them.
    raise typer.Exit(EXIT_FAILED if summary.state == "failed" else 0)


# RunConfig fields whose command-line option is not simply --field-name.
_OPTION_NAMES = {"retry_delay_seconds": "--retry-delay", "task_token_budget": "--task-budget",
                 "agent_token_budget": "--agent-budget", "pipeline_token_budget": "--pipeline-budget"}


def _checked_config(options: dict[str, Any]) -> RunConfig:
    """The run's settings, validated before anything starts; a bad value names its option."""
    from pydantic import ValidationError

    fields = set(RunConfig.model_fields)
    values = {k: v for k, v in options.items() if k in fields}
    values["contexts"] = tuple(values.get("contexts") or ())
    try:
        return RunConfig(**values)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            name = str(error["loc"][0]) if error["loc"] else "?"
            option = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
            problems.append(Problem(f"{option}: {error.get('input')!r}: {error['msg'].lower()}"))
        raise ConfigError(problems) from None


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
    unknown = sorted(set(keys) - set(DEFAULT_NEEDS_APPROVAL))
    if unknown:
        raise ConfigError(f"--needs-approval takes {', '.join(DEFAULT_NEEDS_APPROVAL)} or 'none'; "
                          f"got {', '.join(unknown)}")
    return keys


def _settle_approvals(plan: Plan, approve: list[str], deny: list[str],
                      needs_approval: list[str]) -> tuple[list[str], list[str]]:
    """Ask on a terminal about approvals the agents may need and nobody decided; else they are denied."""
    unknown = sorted(set(approve + deny) - set(DEFAULT_NEEDS_APPROVAL))
    if unknown:
        raise TokaError(f"--approve/--deny take {', '.join(DEFAULT_NEEDS_APPROVAL)}; got {', '.join(unknown)}")
    wanted: dict[str, list[str]] = {}
    for name, spec in plan.graph.agents.items():
        for key in approval_keys(spec, needs_approval):
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
    return approve, deny


@app.command()
def doctor() -> None:
    """Show which mechanism enforces each resource limit on this host."""
    from .sandbox import detect_host

    host = detect_host()
    rows = [("wall-clock timeout", "timeout"), ("max_memory", "memory"), ("max_cpu", "cpu"),
            ("max_processes", "processes"), ("max_disk_usage", "disk"), ("network denied", "network"),
            ("max_network_bandwidth", "bandwidth"), ("other processes", "processes-visible"),
            ("the host", "host"), ("unix sockets", "unix-sockets"), ("credential files", "credentials"),
            ("git control files", "git")]
    out.print(f"cgroups: {host.cgroup or 'not available'}"
              + (f" ({', '.join(sorted(host.cgroup_root))})" if host.cgroup_root else ""))
    for label, key in rows:
        how = host.mechanism(key)
        shown = how or "[red]none: commands of agents with sandbox: true that declare it are refused[/red]"
        out.print(f"  {label:<22} {shown}")


@app.command()
def audit(
    run_id: Annotated[str | None, typer.Option("--run", help="Run key (default: the last run here).")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's tool calls.")] = None,
    workspace: Annotated[Path, typer.Option(help="Workspace whose audit trail to read.")] = Path("."),
    all_runs: Annotated[bool, typer.Option("--all", help="Every recorded run.")] = False,
) -> None:
    """Print the tool-call audit trail as a table."""
    from rich.table import Table

    from .audit import read_audit

    with _user_errors():
        space = Workspace(workspace)
        key = None if all_runs else (run_id or RunRecord.load_last(space.state_dir).run_key)
    rows = list(read_audit(space.state_dir, run=key, agent=agent))
    table = Table(title=f"audit: run {key or 'all'}" + (f", agent {agent}" if agent else ""), title_justify="left")
    for column in ("time", "agent", "task", "tool", "decision", "arguments", "exit", "duration", "note"):
        table.add_column(column, overflow="fold")
    for r in rows:
        args = json.dumps(r.get("arguments", {}), ensure_ascii=False)
        table.add_row(r["ts"][11:23], str(r.get("agent", "")), str(r.get("task", "")), str(r.get("tool", "")),
                      str(r.get("decision", "")), escape(args[:80]),
                      "" if r.get("exit_code") is None else str(r["exit_code"]),
                      f"{r.get('duration_s', 0):.2f}s", escape(str(r.get("reason") or ""))[:80])
    out.print(table)
    out.print(f"{len(rows)} tool calls, {sum(r.get('decision') == 'refused' for r in rows)} refused")


@app.command()
def deployments(
    paths: PathsArg = None,
    prefect_yaml: Annotated[Path, typer.Option("--prefect-yaml", help="The file to update.")] = Path("prefect.yaml"),
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
                         no_args_is_help=True)
app.add_typer(limits_app, name="limits")

RpmOpt = Annotated[int | None, typer.Option(min=1, help="Model requests per minute, across all workers.")]
ConcOpt = Annotated[int | None, typer.Option(min=1, help="Model requests in flight at once, across all workers.")]


@limits_app.command("apply")
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


@limits_app.command("check")
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


async def _execute(options: dict[str, Any], *, results_dir: Path) -> PipelineSummary:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import pipeline

    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: results_dir}):
        state = await pipeline(**options, return_state=True)
        outcome = await state.aresult(raise_on_failure=False)
    if isinstance(outcome, RunFailedError) and isinstance(outcome.report, PipelineSummary):
        return outcome.report
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome  # type: ignore[no-any-return]


_STATE_STYLE = {"completed": "green", "completed-with-failures": "yellow", "cached": "green", "failed": "red",
                "not-run": "yellow", "running": "cyan", "waiting": "dim"}


class _LiveView:
    """Agents, their current task and done/total, live on a terminal; plain lines otherwise."""

    def __init__(self, plan: Plan) -> None:
        from rich.live import Live

        self.order = plan.order
        self.rows = {name: {"state": "waiting", "done": 0,
                            "total": len(plan.graph.agents[name].tasks.default), "task": ""}
                     for name in self.order}
        self.live: Live | None = Live(self._table(), console=err, refresh_per_second=8,
                                      transient=True) if err.is_terminal else None

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
        elif event.kind == "task-finished":
            row["done"] += 1
            if not self.live:
                note = f" ({event.reason})" if event.state == "failed" and event.reason else ""
                err.print(f"{event.agent}: task {event.task}/{event.total} {event.state}{escape(note)}")
        elif event.kind == "agent-finished":
            row["state"], row["task"] = event.state or "", escape(event.reason or "")
            if not self.live:
                why = f": {event.reason}" if event.reason else ""
                err.print(f"{event.agent}: [{_STATE_STYLE.get(event.state or '', 'white')}]"
                          f"{event.state}[/]{escape(why)}")
        if self.live:
            self.live.update(self._table())

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for column in ("agent", "state", "tasks", "current"):
            table.add_column(column)
        for name in self.order:
            row = self.rows[name]
            style = _STATE_STYLE.get(row["state"], "white")
            table.add_row(name, f"[{style}]{row['state']}[/]", f"{row['done']}/{row['total']}",
                          escape(str(row["task"]))[:70])
        return table


def _print_summary(summary: PipelineSummary) -> None:
    from rich.table import Table

    from .redact import redact, secret_values

    secrets = secret_values()
    table = Table(title=f"run {summary.run_key}: {summary.state}", title_justify="left")
    for column in ("agent", "state", "done", "failed", "not run", "duration", "tokens", "note"):
        table.add_column(column)
    for a in summary.agents:
        style = _STATE_STYLE.get(a.state, "white")
        table.add_row(
            a.agent, f"[{style}]{a.state}[/]", str(a.count("completed", "cached")),
            str(a.count("failed")), str(a.count("not-run")), f"{a.duration_s:.1f}s",
            str(a.usage.total_tokens), escape(redact(a.reason or "", secrets)),
        )
    out.print(table)
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
