"""The terminal report: the run line, the layer table with sparklines, the alert lines.

Per run:

- one line: the run directory, the steps covered (first..last sampled step), the number of
  sampled steps, the alerts by kind (how many fired; how many are still active at the end);
- a table, one row per layer in forward order: ``kind`` and ``units``, dead / saturated fraction
  (first, worst, last), RMS first and last around a sparkline of its course over the run
  (:func:`sparkline`), the gradient RMS (``gradient_rms/<layer>``) first -> last where the
  backward ran inside the sampled steps, and the layer's alerts (``kind@STEP``: still active at
  the end; ``kind@STEP-STEP2``: recovered at ``STEP2``);
- the alert lines in order, as they were logged (``ALERT step ...`` / ``RECOVERED step ...``).

Colours only when stdout is a terminal (``--color`` overrides; ``NO_COLOR`` is honoured); the
table's width follows :func:`shutil.get_terminal_size` (the ``COLUMNS`` variable when piped).
Alert lines are wrapped to that width on a terminal and printed verbatim when piped.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from monitor.report import compare as cmp
from monitor.report.config import items_text
from monitor.report.formatting import episodes_text, num, pct, run_line
from monitor.report.summary import RunReport, trend

SPARK = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-~=+*#"


def sparkline(points: list[float], chars: str = SPARK) -> str:
    """One character per point; ``!`` marks NaN/inf.

    Non-negative numbers (an RMS) are drawn from zero, so a layer that barely changes draws a
    flat line; when they span more than 100x (an explosion) the scale is logarithmic from the
    smallest to the largest; numbers of both signs span their own range.
    """
    p = np.asarray(points, dtype=np.float64)
    finite = np.isfinite(p)
    if not finite.any():
        return "!" * len(p)
    lo, hi = p[finite].min(), p[finite].max()
    if lo > 0 and hi / lo > 100:
        p, lo, hi = np.log10(np.where(finite, p, 1.0)), math.log10(lo), math.log10(hi)
    elif lo >= 0:
        lo = 0.0
    out = []
    top = len(chars) - 1
    for x, ok in zip(p, finite):
        if not ok:
            out.append("!")
        elif hi == lo:
            out.append(chars[top // 2])
        else:
            out.append(chars[round((x - lo) / (hi - lo) * top)])
    return "".join(out)


class Style:
    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, text: str, *codes: str) -> str:
        if not self.on or not codes or not text:
            return text
        return "\x1b[" + ";".join(codes) + "m" + text + "\x1b[0m"


BOLD, DIM, RED, GREEN, YELLOW = "1", "2", "31", "32", "33"


def _fit(text: str, width: int, middle: bool = False) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    if middle:
        head = (width - 1) // 2
        return text[:head] + "…" + text[len(text) - (width - 1 - head) :]
    return text[: width - 1] + "…"


def render_run(rep: RunReport, width: int, style: Style, unicode: bool, tty: bool) -> str:
    lines = [style(run_line(rep), BOLD)]
    if rep.config:
        lines.append(style(_fit("  config: " + items_text(rep.config), width), DIM))
    if not rep.sampled_steps:
        lines.append("  no sampled steps in these files")
    if rep.layers:
        lines += _table(rep, width, style, unicode)
    if rep.alerts:
        lines.append("")
        lines.append(style("alerts, as logged:", BOLD))
        for a in rep.alerts:
            prefix = style("RECOVERED", GREEN) if a.recovered else style("ALERT", RED, BOLD)
            if tty:  # wrapped under the message, at the terminal's width
                indent = 2 + len(a.line) - len(a.message)
                body = textwrap.wrap(a.message, max(width - indent, 20)) or [""]
                lines.append("  " + prefix + " " + body[0])
                lines += [" " * indent + b for b in body[1:]]
            else:
                lines.append("  " + prefix + " " + a.message)
    return "\n".join(lines)


def _table(rep: RunReport, width: int, style: Style, unicode: bool) -> list[str]:
    """The layer table at the terminal's width. As the terminal narrows: the sparkline shrinks
    (16 to 4 characters), the alerts column and then the layer names are shortened (to 16
    characters; names lose their middle), then the gradient, kind and units columns are left out;
    below that the lines are simply longer than the terminal."""
    optional = ["grad", "kind", "units"]
    plans = [(w, set(optional), 0) for w in (16, 12, 8, 6, 4)] + [(4, set(optional), 16)]
    plans += [(4, set(optional[i + 1 :]), 16) for i in range(len(optional))] + [(4, set(), 10)]
    for spark_w, cols, minimum in plans:
        head, rows = _rows(rep, spark_w, unicode, cols)
        widths = [max(len(head[i]), *(len(r[0][i]) for r in rows)) for i in range(len(head))]
        over = sum(widths) + 2 * (len(head) - 1) - width
        for col in (-1, 0):  # alerts, then names
            if over > 0 and minimum:
                cut = min(over, max(widths[col] - max(minimum, len(head[col])), 0))
                widths[col] -= cut
                over -= cut
        if over <= 0:
            break
    right = head.index("units") if "units" in head else -1
    out = ["  ".join(style(h, BOLD) + " " * (w - len(h)) for h, w in zip(head, widths)).rstrip()]
    for cells, colours in rows:
        texts = []
        for i, (c, w, col) in enumerate(zip(cells, widths, colours)):
            t = _fit(c, w, middle=(i == 0))
            pad = " " * (w - len(t))
            texts.append(pad + style(t, *col) if i == right else style(t, *col) + pad)
        out.append("  ".join(texts).rstrip())
    if any(lay.alerts for lay in rep.layers) or rep.other_alerts:
        out.append(style(_fit("(kind@STEP: still active at the end; kind@STEP-STEP2: recovered at STEP2)", width), DIM))
    return out


def _rows(
    rep: RunReport, spark_w: int, unicode: bool, cols: set[str]
) -> tuple[list[str], list[tuple[list[str], list[tuple[str, ...]]]]]:
    chars = SPARK if unicode else SPARK_ASCII
    arrow = "→" if unicode else "->"
    has_kind = "kind" in cols
    has_units = "units" in cols and any(lay.units is not None for lay in rep.layers)
    has_health = any("dead_fraction" in lay.series or "saturated_fraction" in lay.series for lay in rep.layers)
    has_grad = "grad" in cols and any("grad_rms" in lay.series for lay in rep.layers)
    head = ["layer"] + (["kind"] if has_kind else []) + (["units"] if has_units else [])
    head += (["dead/sat first worst last"] if has_health else []) + ["RMS first trend last"]
    head += ([f"grad RMS first{arrow}last"] if has_grad else []) + ["alerts"]
    rows: list[tuple[list[str], list[tuple[str, ...]]]] = []
    for lay in rep.layers:
        cells = [lay.name]
        colours: list[tuple[str, ...]] = [()]
        if has_kind:
            cells.append(lay.kind)
            colours.append((DIM,))
        if has_units:
            cells.append("" if lay.units is None else str(lay.units))
            colours.append(())
        if has_health:
            parts = []
            bad = False
            for key, label in (("dead_fraction", "dead"), ("saturated_fraction", "sat")):
                s = lay.series.get(key)
                if s is not None:
                    worst, _ = s.worst()
                    parts.append(f"{label} {pct(s.first)} {pct(worst)} {pct(s.last)}")
                    bad = bad or s.last >= 0.5
            cells.append("; ".join(parts))
            colours.append((RED,) if bad else ())
        rms = lay.series["rms"]
        cells.append(f"{num(rms.first)} {sparkline(trend(rms.values, spark_w), chars)} {num(rms.last)}")
        colours.append(())
        if has_grad:
            g = lay.series.get("grad_rms")
            cells.append(f"{num(g.first)} {arrow} {num(g.last)}" if g is not None else "")
            colours.append(())
        active = any(e.recovered_step is None for e in lay.alerts)
        cells.append(episodes_text(lay.alerts))
        colours.append((RED, BOLD) if active else (YELLOW,) if lay.alerts else ())
        if active:
            colours[0] = (RED, BOLD)
        rows.append((cells, colours))
    for name, eps in rep.other_alerts.items():
        active = any(e.recovered_step is None for e in eps)
        cells = [name] + [""] * (len(head) - 2) + [episodes_text(eps)]
        bad = (RED, BOLD) if active else (YELLOW,)
        rows.append((cells, [bad if active else ()] + [()] * (len(head) - 2) + [bad]))
    return head, rows


def render_comparison(c: cmp.Comparison, width: int, style: Style, unicode: bool) -> str:
    """The two run lines, how layers were matched, and one row per layer: A -> B, differences marked ``*``.

    Columns that are empty in every row are left out; when the table is wider than the terminal
    the alert columns and then the layer names are shortened."""
    arrow = "→" if unicode else "->"
    lines = [style(ln, BOLD) for ln in cmp.header_lines(c, arrow)]
    rows = [cmp.cells(r, arrow) for r in c.rows]
    keep = cmp.visible(rows)
    head = [cmp.HEAD[i].replace("→", arrow) for i in keep]
    table = [[(t + " *" if marked and t else t, marked) for t, marked in (row[i] for i in keep)] for row in rows]
    widths = [max(len(head[j]), *(len(r[j][0]) for r in table)) if table else len(head[j]) for j in range(len(head))]
    over = sum(widths) + 2 * (len(widths) - 1) - width
    for j in (len(widths) - 1, len(widths) - 2, 0):  # alerts B, alerts A, then names
        if over > 0:
            cut = min(over, max(widths[j] - max(12, len(head[j])), 0))
            widths[j] -= cut
            over -= cut
    lines.append("  ".join(style(h, BOLD) + " " * (w - len(h)) for h, w in zip(head, widths)).rstrip())
    for row in table:
        texts = []
        for j, ((t, marked), w) in enumerate(zip(row, widths)):
            t = _fit(t, w, middle=(j == 0))
            texts.append(style(t, RED, BOLD) if marked else t)
            texts[-1] += " " * (w - len(t))
        lines.append("  ".join(texts).rstrip())
    if any(r.differences for r in c.rows):
        lines.append(style(_fit(cmp.legend(), width), DIM))
    return "\n".join(lines)
