"""The ``toka`` command line.

Bad input (a malformed spec, an unknown agent, a cycle) prints located
messages and exits with code 2; it never shows a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from .errors import Problem, TokaError
from .plan import Plan, limits_text, make_plan
from .spec import AgentSpec
from .specset import DEFAULT_SPEC_DIR

__all__ = ["app", "main"]

EXIT_BAD_INPUT = 2

app = typer.Typer(
    name="toka",
    help="Run declarative Toka agent specs as Prefect flows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

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
    with _user_errors():
        plan = make_plan(_paths(paths))
    for name in plan.graph.agents:
        out.print(f"[green]ok[/green] {_agent_line(plan, name)}")
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
            caps = ", ".join(spec.security.capabilities_required) or "-"
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
