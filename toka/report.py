"""Markdown reports for the Prefect UI: one per agent, one for the pipeline.

Reports quote results and errors, text the model chose: each report is redacted
as a whole before it is returned (:func:`toka.redact.redact`).
"""

from __future__ import annotations

from .graph import AgentGraph
from .model import Usage
from .redact import redact, secret_values
from .results import AgentReport, PipelineSummary, TaskRecord

__all__ = ["agent_markdown", "pipeline_markdown"]

_ICONS = {"completed": "✅", "completed-with-failures": "⚠️", "cached": "♻️", "failed": "❌", "not-run": "⏭️"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_TOKEN_COLUMNS = "tokens | input | output | cache write | cache read"


def _tokens(u: Usage) -> str:
    """The cells of :data:`_TOKEN_COLUMNS`: the total, then what it is made of."""
    return (f"{u.total_tokens} | {u.input_tokens} | {u.output_tokens} | {u.cache_creation_input_tokens} "
            f"| {u.cache_read_input_tokens}")


def _breakdown(u: Usage) -> str:
    return (f"input {u.input_tokens}, output {u.output_tokens}, cache write {u.cache_creation_input_tokens}, "
            f"cache read {u.cache_read_input_tokens}")


def _task_row(t: TaskRecord) -> str:
    files = ", ".join(t.files_touched) or "-"
    # Redacted before it is cut: a secret cut in half would no longer be recognised.
    note = redact(t.error or (t.result.summary if t.result else ""), secret_values())
    return (
        f"| {t.index} | {_cell(t.description)} | {t.priority} | {_ICONS[t.state]} {t.state} "
        f"| {t.duration_s:.1f}s | {t.attempts} | {_tokens(t.usage)} | {t.tool_calls} ({t.refused_calls}) "
        f"| {_cell(files)} | {_cell(note[:200])} |"
    )


def agent_markdown(report: AgentReport, *, model: str) -> str:
    """The agent's task report (redacted)."""
    lines = [
        f"# {report.agent}: {report.state}",
        "",
        f"Model: `{model}`. Duration: {report.duration_s:.1f}s. "
        f"Tasks: {report.count('completed', 'cached')} done "
        f"({report.count('cached')} replayed from cache), {report.count('failed')} failed, "
        f"{report.count('not-run')} not run. Tokens: {report.usage.total_tokens} ({_breakdown(report.usage)}).",
    ]
    if report.reason:
        lines += ["", f"**Why:** {report.reason}"]
    lines += [
        "",
        f"| # | task | priority | state | duration | attempts | {_TOKEN_COLUMNS} | tool calls (refused) "
        "| files | result / error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_task_row(t) for t in report.tasks),
    ]
    return redact("\n".join(lines) + "\n", secret_values())


def pipeline_markdown(summary: PipelineSummary, graph: AgentGraph) -> str:
    """The pipeline's report: the DAG and a table of agents (redacted)."""
    ids = {name: f"a{i}" for i, name in enumerate(graph.agents)}
    states = {a.agent: a.state for a in summary.agents}
    mermaid = ["```mermaid", "graph LR"]
    for name, node in ids.items():
        mermaid.append(f'  {node}["{name}"]:::{states.get(name, "not-run").replace("-", "")}')
    for e in graph.edges:
        arrow = "-->" if e.kind == "required" else "-.->"
        mermaid.append(f"  {ids[e.dependency]} {arrow} {ids[e.dependent]}")
    mermaid += [
        "  classDef completed fill:#d1fadf,stroke:#12b76a",
        "  classDef completedwithfailures fill:#fef0c7,stroke:#f79009",
        "  classDef failed fill:#fee4e2,stroke:#f04438",
        "  classDef notrun fill:#f2f4f7,stroke:#98a2b3",
        "```",
    ]
    usage = summary.usage
    lines = [
        f"# Pipeline: {summary.state}",
        "",
        f"Run key `{summary.run_key}`, model `{summary.model}`"
        + (" (offline: placeholder results)" if summary.offline else "")
        + f", {summary.duration_s:.1f}s, {usage.total_tokens} tokens ({_breakdown(usage)}) "
        f"in {usage.requests} requests.",
        "",
        *mermaid,
        "",
        f"| agent | state | done | failed | not run | duration | {_TOKEN_COLUMNS} | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in summary.agents:
        lines.append(
            f"| {a.agent} | {_ICONS[a.state]} {a.state} | {a.count('completed', 'cached')}"
            f" | {a.count('failed')} | {a.count('not-run')} | {a.duration_s:.1f}s"
            f" | {_tokens(a.usage)} | {_cell(a.reason or '')} |"
        )
    return redact("\n".join(lines) + "\n", secret_values())
