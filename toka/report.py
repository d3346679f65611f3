"""Markdown reports for the Prefect UI: one per agent, one for the pipeline."""

from __future__ import annotations

from .graph import AgentGraph
from .results import AgentReport, PipelineSummary, TaskRecord

__all__ = ["agent_markdown", "pipeline_markdown"]

_ICONS = {"completed": "✅", "cached": "♻️", "failed": "❌", "not-run": "⏭️"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _task_row(t: TaskRecord) -> str:
    files = ", ".join(t.files_touched) or "-"
    note = t.error or (t.result.summary if t.result else "")
    return (
        f"| {t.index} | {_cell(t.description)} | {t.priority} | {_ICONS[t.state]} {t.state} "
        f"| {t.duration_s:.1f}s | {t.attempts} | {t.usage.total_tokens} | {t.tool_calls} ({t.refused_calls}) "
        f"| {_cell(files)} | {_cell(note[:200])} |"
    )


def agent_markdown(report: AgentReport, *, model: str) -> str:
    lines = [
        f"# {report.agent}: {report.state}",
        "",
        f"Model: `{model}`. Duration: {report.duration_s:.1f}s. "
        f"Tasks: {report.count('completed', 'cached')} done "
        f"({report.count('cached')} replayed from cache), {report.count('failed')} failed, "
        f"{report.count('not-run')} not run. Tokens: {report.usage.total_tokens}.",
    ]
    if report.reason:
        lines += ["", f"**Why:** {report.reason}"]
    lines += [
        "",
        "| # | task | priority | state | duration | attempts | tokens | tool calls (refused) | files "
        "| result / error |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_task_row(t) for t in report.tasks),
    ]
    return "\n".join(lines) + "\n"


def pipeline_markdown(summary: PipelineSummary, graph: AgentGraph) -> str:
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
        + f", {summary.duration_s:.1f}s, {usage.total_tokens} tokens in {usage.requests} requests.",
        "",
        *mermaid,
        "",
        "| agent | state | done | failed | not run | duration | tokens | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in summary.agents:
        lines.append(
            f"| {a.agent} | {_ICONS[a.state]} {a.state} | {a.count('completed', 'cached')}"
            f" | {a.count('failed')} | {a.count('not-run')} | {a.duration_s:.1f}s"
            f" | {a.usage.total_tokens} | {_cell(a.reason or '')} |"
        )
    return "\n".join(lines) + "\n"
