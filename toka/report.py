"""Reports for the Prefect UI: per agent a markdown report and a results table, one for the pipeline.

Reports quote results and errors, text the model chose: each report is redacted
as a whole before it is returned (:func:`toka.redact.redact`,
:func:`toka.redact.redact_data`).

The pipeline's DAG is an SVG picture (:func:`dag_svg`), embedded as a
``data:`` image: the Prefect UI's markdown renderer draws images and tables
but shows a mermaid block as raw text (seen with ``bench/ui_screenshot.py``).
A table of the same waves and edges follows it, for reading and searching.
"""

from __future__ import annotations

import base64
import re
import textwrap
from html import escape

from .branches import AgentChanges
from .graph import AgentGraph
from .model import Usage
from .redact import redact, redact_data, secret_values
from .results import AgentReport, AgentState, PipelineSummary, TaskRecord

__all__ = ["agent_markdown", "agent_results_table", "dag_svg", "pipeline_markdown"]

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


def agent_markdown(report: AgentReport, *, model: str, diff: str | None = None) -> str:
    """The agent's task report (redacted), with its branch and ``diff`` when it has one."""
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
    notes = [note for t in report.tasks if (note := _context_note(t, len(report.tasks)))]
    if notes:
        lines += ["", "**Long tasks:**", "", *(f"- {note}" for note in notes)]
    if report.changes is not None:
        lines += _changes_markdown(report.changes, diff)
    return _visible(redact("\n".join(lines) + "\n", secret_values()))


# Control characters (a spec's description, a model's result) written raw into a report would
# act on the terminal of whoever `cat`s it: ESC [ ... rewrites the screen. Shown as escapes.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _visible(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def _fenced(text: str, language: str = "") -> list[str]:
    """``text`` in a code fence longer than any run of backticks inside it."""
    fence = "`" * max(3, max((len(run) + 1 for run in re.findall(r"`+", text)), default=0))
    return [fence + language, text.rstrip("\n"), fence]


def _changes_markdown(changes: AgentChanges, diff: str | None) -> list[str]:
    head = (f"**Branch** `{changes.branch}` at `{changes.commit[:12]}` (from `{changes.base[:12]}`): "
            f"{_files(len(changes.files_changed))} changed.")
    lines = ["", "## Changes", "", head]
    if changes.diffstat:
        lines += ["", *_fenced(changes.diffstat)]
    if diff:
        lines += ["", *_fenced(diff, "diff")]
    lines += ["", f"Review: `git log {changes.base[:12]}..{changes.branch}`, "
                  f"`git diff {changes.base[:12]} {changes.branch}`."]
    return lines


def _context_note(task: TaskRecord, total: int) -> str:
    """What kept a long task going: its journal replayed, its conversation cleared or compacted."""
    parts = []
    # A task that failed again reports what it carried, not how many steps it replayed (a cached
    # task carries its whole earlier cost, and its row says "cached").
    if task.replayed or (task.state == "failed" and task.carried_usage.total_tokens):
        steps = f"{task.replayed} recorded steps replayed, " if task.replayed else ""
        parts.append(f"resumed from its journal ({steps}{task.carried_usage.total_tokens:,} tokens carried, "
                     "not paid again)")
    if task.tokens_cleared:
        parts.append(f"{task.tokens_cleared:,} tokens of old tool output cleared")
    if task.compactions:
        parts.append(f"compacted {task.compactions} time{'s' if task.compactions != 1 else ''} into a summary")
    return f"task {task.index}/{total}: " + "; ".join(parts) if parts else ""


def agent_results_table(report: AgentReport) -> list[dict[str, str]]:
    """What each task of the agent produced, one row per task, for a Prefect table artifact (redacted).

    The UI renders a text cell as markdown and never wraps a cell's line, so
    text is cut into lines of :data:`_WIDTH` characters, and lists
    (deliverables, files changed, follow-ups) are bullet lists. Text the model
    chose is shown as text: an image or HTML tag in it would otherwise be
    fetched or drawn in the reader's browser. An empty cell is empty (a lone
    ``-`` would be drawn as a bullet).
    """
    total = len(report.tasks)
    rows = []
    for t in report.tasks:
        result = t.result
        rows.append({
            "task": f"{t.index}/{total}",
            "state": f"{_ICONS[t.state]} {t.state}",
            "status": result.status if result else "",
            "summary": _text(result.summary if result else t.error or ""),
            "deliverables": _items(result.deliverables if result else []),
            "files changed": _items(result.files_changed if result else []),
            "follow-ups": _items(result.follow_ups if result else []),
            "description": _text(t.description),
        })
    return redact_data(rows, secret_values())


_WIDTH = 72
_MARKUP_AT_START = re.compile(r"^(?:([#>+*=_`~-])|(\d+)([.)]))")


def _text(text: str, width: int = _WIDTH) -> str:
    """Model text as literal text in a markdown cell: lines of ``width`` characters (words are
    not cut), no images, no HTML, no markup at the start of a line (heading, list, quote)."""
    flat = " ".join(text.replace("<", "&lt;").replace("![", "!\\[").split())
    lines = textwrap.wrap(flat, width, break_long_words=False, break_on_hyphens=False)
    return "\n".join(_MARKUP_AT_START.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", line)
                     for line in lines)


def _items(items: list[str]) -> str:
    return "\n".join("- " + _text(i, _WIDTH - 2).replace("\n", "\n  ") for i in items)


#: The most agents drawn in the DAG picture; bigger runs get the table alone.
MAX_DRAWN_AGENTS = 60

_FILL = {"completed": ("#d1fadf", "#12b76a"), "completed-with-failures": ("#fef0c7", "#f79009"),
         "failed": ("#fee4e2", "#f04438"), "not-run": ("#f2f4f7", "#98a2b3")}


def dag_svg(graph: AgentGraph, states: dict[str, AgentState], tasks: dict[str, str] | None = None) -> str:
    """The agents as an SVG picture: waves left to right, boxes coloured by state, arrows from
    the agent that runs first (solid: required, dashed: optional).

    A layered drawing: an edge that skips waves runs through a lane of its own in
    each wave it crosses, so it never passes behind a box; the agents of a wave are
    ordered to sit near their neighbours (barycentre sweeps). ``tasks`` adds a
    second line to each box (e.g. ``4/4 tasks``). Text is redacted; the picture has
    its own white background, so it reads in the UI's dark theme too.
    """
    secrets = secret_values()
    tasks = tasks or {}
    waves = graph.waves()
    wave_of = {name: w for w, wave in enumerate(waves) for name in wave}
    columns: list[list[str]] = [list(wave) for wave in waves]  # agents, and lanes ("\0edge:wave")
    paths: list[list[str]] = []
    for k, e in enumerate(graph.edges):
        lanes = [f"\0{k}:{w}" for w in range(wave_of[e.dependency] + 1, wave_of[e.dependent])]
        for lane in lanes:
            columns[int(lane.rsplit(":", 1)[1])].append(lane)
        paths.append([e.dependency, *lanes, e.dependent])
    before: dict[str, list[str]] = {}
    after: dict[str, list[str]] = {}
    for path in paths:
        for u, v in zip(path, path[1:]):
            before.setdefault(v, []).append(u)
            after.setdefault(u, []).append(v)

    def sweep(order: range, neighbours: dict[str, list[str]]) -> None:
        for w in order:
            rank = {item: i for i, item in enumerate(columns[w + (-1 if order.step > 0 else 1)])}
            current = {item: i for i, item in enumerate(columns[w])}

            def centre(item: str) -> float:
                near = [rank[n] for n in neighbours.get(item, []) if n in rank]
                return sum(near) / len(near) if near else current[item]

            columns[w].sort(key=lambda item: (centre(item), current[item]))

    for _ in range(2):  # left to right by what each waits for, then back by what waits for it
        sweep(range(1, len(columns)), before)
        sweep(range(len(columns) - 2, -1, -1), after)
    sweep(range(1, len(columns)), before)

    def label(name: str) -> tuple[str, str]:
        state = states.get(name, "not-run")
        return redact(name, secrets), redact(f"{state}, {tasks[name]}" if name in tasks else state, secrets)

    box_h, lane_h, gap_x, gap_y, pad, top = 46, 10, 72, 16, 24, 40
    widths = [max([max(len(label(n)[0]) * 7.6, len(label(n)[1]) * 6.2) + 28 for n in wave] + [60.0])
              for wave in waves]
    heights = [sum(lane_h if item[0] == "\0" else box_h for item in column) + gap_y * (len(column) - 1)
               for column in columns]
    tallest = max(heights)
    xs, x = [], float(pad)
    for width in widths:
        xs.append(x)
        x += width + gap_x
    width_total, legend_y = x - gap_x + pad, top + tallest + 22
    height_total = legend_y + 30
    at: dict[str, tuple[float, float]] = {}  # item -> top, height
    for w, column in enumerate(columns):
        y = top + (tallest - heights[w]) / 2  # centre short waves
        for item in column:
            at[item] = (y, lane_h if item[0] == "\0" else box_h)
            y += at[item][1] + gap_y

    def ends(item: str, others: list[str]) -> dict[str, float]:
        """Where the edges to (or from) ``others`` meet ``item``'s side: spread, in the others' order."""
        y0, h = at[item]
        spacing = min(8.0, (h - 16) / max(1, len(others) - 1)) if h > lane_h else 0.0
        ordered = sorted(dict.fromkeys(others), key=lambda o: at[o][0])
        return {o: y0 + h / 2 + (i - (len(ordered) - 1) / 2) * spacing for i, o in enumerate(ordered)}

    leaving = {item: ends(item, targets) for item, targets in after.items()}
    arriving = {item: ends(item, sources) for item, sources in before.items()}
    column_of = {item: w for w, column in enumerate(columns) for item in column}

    font = 'font-family="Inter, Segoe UI, Helvetica, Arial, sans-serif"'
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width_total:.0f}" height="{height_total:.0f}" '
        f'viewBox="0 0 {width_total:.0f} {height_total:.0f}" {font}>',
        f"<title>{len(graph)} agents in {len(waves)} waves</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#475467"/></marker></defs>',
        f'<rect width="{width_total:.0f}" height="{height_total:.0f}" rx="8" fill="#ffffff" stroke="#d0d5dd"/>',
    ]
    for w, x0 in enumerate(xs):
        out.append(f'<text x="{x0 + widths[w] / 2:.0f}" y="24" text-anchor="middle" font-size="12" '
                   f'fill="#667085">wave {w + 1}</text>')
    for e, path in zip(graph.edges, paths):
        d = ""
        for u, v in zip(path, path[1:]):
            sx, sy = xs[column_of[u]] + widths[column_of[u]], leaving[u][v]
            ex, ey = xs[column_of[v]] - (2 if v == path[-1] else 0), arriving[v][u]
            bend = (ex - sx) / 2
            d += (f"M{sx:.0f},{sy:.0f} " if not d else "") + (
                f"C{sx + bend:.0f},{sy:.0f} {ex - bend:.0f},{ey:.0f} {ex:.0f},{ey:.0f} ")
            if v != path[-1]:  # through the lane, across the wave
                d += f"H{xs[column_of[v]] + widths[column_of[v]]:.0f} "
        dash = ' stroke-dasharray="6 4"' if e.kind == "optional" else ""
        out.append(f'<path d="{d.strip()}" fill="none" stroke="#475467" stroke-width="1.5"{dash} '
                   'marker-end="url(#arrow)"/>')
    for name in graph.agents:
        x0, w0 = xs[wave_of[name]], widths[wave_of[name]]
        y0 = at[name][0]
        fill, stroke = _FILL[states.get(name, "not-run")]
        title, detail = label(name)
        out += [
            f'<rect x="{x0:.0f}" y="{y0:.0f}" width="{w0:.0f}" height="{box_h}" rx="6" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="2"/>',
            f'<text x="{x0 + 14:.0f}" y="{y0 + 19:.0f}" font-size="13" font-weight="600" '
            f'fill="#101828">{escape(title)}</text>',
            f'<text x="{x0 + 14:.0f}" y="{y0 + 36:.0f}" font-size="11" fill="#344054">{escape(detail)}</text>',
        ]
    lx = float(pad)
    out += [
        f'<path d="M{lx:.0f},{legend_y + 10:.0f} h34" stroke="#475467" stroke-width="1.5" '
        'marker-end="url(#arrow)"/>',
        f'<text x="{lx + 42:.0f}" y="{legend_y + 14:.0f}" font-size="11" fill="#344054">required</text>',
        f'<path d="M{lx + 100:.0f},{legend_y + 10:.0f} h34" stroke="#475467" stroke-width="1.5" '
        'stroke-dasharray="6 4" marker-end="url(#arrow)"/>',
        f'<text x="{lx + 142:.0f}" y="{legend_y + 14:.0f}" font-size="11" fill="#344054">optional</text>',
    ]
    lx += 210
    for state, (fill, stroke) in _FILL.items():
        out += [f'<rect x="{lx:.0f}" y="{legend_y + 3:.0f}" width="14" height="14" rx="3" fill="{fill}" '
                f'stroke="{stroke}" stroke-width="2"/>',
                f'<text x="{lx + 20:.0f}" y="{legend_y + 14:.0f}" font-size="11" fill="#344054">{state}</text>']
        lx += 34 + len(state) * 5.6
    out.append("</svg>")
    return "\n".join(out)


def _dag_markdown(graph: AgentGraph, summary: PipelineSummary) -> tuple[str | None, list[str]]:
    """The DAG picture's markdown line (None when there are too many agents) and the waves table."""
    agents = {a.agent: a for a in summary.agents}
    states: dict[str, AgentState] = {name: agents[name].state if name in agents else "not-run"
                                     for name in graph.agents}
    image = None
    if len(graph) <= MAX_DRAWN_AGENTS:
        done = {name: f"{a.count('completed', 'cached')}/{len(a.tasks)} tasks" for name, a in agents.items()}
        svg = dag_svg(graph, states, done)
        data = base64.b64encode(svg.encode()).decode()
        image = f"![DAG: {len(graph)} agents in {len(graph.waves())} waves](data:image/svg+xml;base64,{data})"
    table = ["| wave | agent | state | waits for (required) | waits for (optional) |", "|---|---|---|---|---|"]
    for w, wave in enumerate(graph.waves(), 1):
        for name in wave:
            table.append(
                f"| {w} | {name} | {_ICONS[states[name]]} {states[name]} "
                f"| {', '.join(graph.upstream(name, 'required')) or '-'} "
                f"| {', '.join(graph.upstream(name, 'optional')) or '-'} |"
            )
    return image, table


def pipeline_markdown(summary: PipelineSummary, graph: AgentGraph) -> str:
    """The pipeline's report: the DAG (a picture and a table) and a table of agents (redacted)."""
    image, dag_table = _dag_markdown(graph, summary)
    usage = summary.usage
    lines = [
        f"# Pipeline: {summary.state}",
        "",
        f"Run key `{summary.run_key}`, model `{summary.model}`"
        + (" (offline: placeholder results)" if summary.offline else "")
        + f", {summary.duration_s:.1f}s, {usage.total_tokens} tokens ({_breakdown(usage)}) "
        f"in {usage.requests} requests.",
        "",
        _IMAGE,
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
    lines += ["", "**Order**: agents of a wave may run together; each starts when what it waits for is done.", "",
              *dag_table]
    if summary.changes is not None:
        lines += ["", *_branches_markdown(summary)]
    text = _visible(redact("\n".join(lines) + "\n", secret_values()))
    # Spliced in after redaction: the picture's text was redacted before it was drawn, and a
    # token-shaped run of base64 must not be cut out of the image.
    return text.replace(_IMAGE + "\n\n", "" if image is None else image + "\n\n", 1)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _branches_markdown(summary: PipelineSummary) -> list[str]:
    """The run's branches: its merged one, and each agent's."""
    run = summary.changes
    assert run is not None
    lines = ["## Branches", "", f"The run's work: `{run.branch}` at `{run.commit[:12]}` "
             f"({_files(len(run.files_changed))} changed from `{run.base[:12]}`)."]
    if run.patch:
        lines.append(f"As a patch (the workspace is not a git repository): `{run.patch}`.")
    if run.pushed:
        lines.append(run.pushed + ".")
    lines += ["", "| agent | branch | commit | files changed | merged |", "|---|---|---|---|---|"]
    for a in summary.agents:
        if a.changes is None:
            continue
        merged = "yes" if a.agent in run.merged else _cell(run.not_merged.get(a.agent, f"no ({a.state})"))
        lines.append(f"| {a.agent} | `{a.changes.branch}` | `{a.changes.commit[:12]}` "
                     f"| {len(a.changes.files_changed)} | {merged} |")
    return lines


_IMAGE = "<!-- toka: DAG picture -->"
