"""Small line plots as inline SVG, for the HTML page: no matplotlib, no script, no font files.

A plot shows one or more series of a layer over the run's sampled steps (the same step range for
every layer of a run, so plots line up), with tick labels on both axes, the axis titles, a
logarithmic y axis where asked (RMS: decades, values <= 0 drawn on the floor and said so), red
marks along the top for NaN/Inf values, and the layer's alerts: a shaded band from the alert's
step to its recovery (or to the end of the run while still active) with a line where it began.
A long series is reduced to the lowest and highest value per pixel column, so a spike of a single
step still shows and the page stays small (at most two points per column).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

import numpy as np

from monitor.report.formatting import num

COLOURS = {"dead": "#d62728", "saturated": "#ff7f0e", "rms": "#1f77b4", "grad": "#2ca02c"}
ALERT, RECOVERED = "#d62728", "#2ca02c"
_LEFT, _RIGHT, _TOP, _BOTTOM = 50, 10, 20, 30


@dataclass
class Line:
    label: str
    steps: np.ndarray
    values: np.ndarray
    colour: str


@dataclass
class Band:
    """An alert episode: from ``step`` to ``end`` (None: still active at the end of the run)."""

    kind: str
    step: int
    end: int | None = None


@dataclass
class Plot:
    title: str
    lines: list[Line]
    steps: tuple[int, int]  # the run's first and last sampled step
    log: bool = False
    fraction: bool = False  # a y axis of 0..100%
    bands: list[Band] = field(default_factory=list)
    width: int = 380
    height: int = 120


def _log_ticks(lo_dec: int, hi_dec: int) -> list[int]:
    step = max(1, math.ceil((hi_dec - lo_dec) / 5))
    return list(range(lo_dec, hi_dec + 1, step))


def _decimate(x: np.ndarray, y: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """At most two points (the lowest and the highest) per pixel column; ``x`` is in pixels, sorted."""
    if x.size <= 2 * columns:
        return x, y
    col = np.round(x).astype(np.int64)
    _, start = np.unique(col, return_index=True)
    lo = np.minimum.reduceat(y, start)
    hi = np.maximum.reduceat(y, start)
    xs = np.repeat(x[start], 2)
    ys = np.empty(2 * start.size)
    ys[0::2], ys[1::2] = hi, lo
    return xs, ys


def render(plot: Plot) -> str:
    """The plot as an ``<svg>`` element (a string)."""
    w, h = plot.width, plot.height
    pw, ph = w - _LEFT - _RIGHT, h - _TOP - _BOTTOM
    s0, s1 = plot.steps
    span = max(s1 - s0, 1)

    def px(steps: np.ndarray) -> np.ndarray:
        if s1 == s0:
            return np.full(steps.shape, _LEFT + pw / 2)
        return _LEFT + (steps.astype(np.float64) - s0) / span * pw

    values = [np.asarray(ln.values, dtype=np.float64) for ln in plot.lines]
    finite_all = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    floor_note = ""
    if plot.fraction:
        lo, hi = 0.0, 1.0
        ticks = [(0.0, "0%"), (0.5, "50%"), (1.0, "100%")]
    elif plot.log:
        pos = finite_all[finite_all > 0]
        lo_dec = math.floor(math.log10(pos.min())) if pos.size else -1
        hi_dec = math.ceil(math.log10(pos.max())) if pos.size else 0
        hi_dec = max(hi_dec, lo_dec + 1)
        lo, hi = float(lo_dec), float(hi_dec)
        ticks = [(float(d), f"1e{d}" if not -2 <= d <= 2 else num(10.0**d)) for d in _log_ticks(lo_dec, hi_dec)]
        if (finite_all <= 0).any():
            floor_note = "values ≤ 0 drawn on the floor" if pos.size else "every value is 0"
    else:
        lo = float(finite_all.min()) if finite_all.size else 0.0
        hi = float(finite_all.max()) if finite_all.size else 1.0
        lo = min(lo, 0.0)
        hi = hi if hi > lo else lo + 1.0
        ticks = [(lo, num(lo)), ((lo + hi) / 2, num((lo + hi) / 2)), (hi, num(hi))]

    def py(v: np.ndarray) -> np.ndarray:
        y = np.log10(np.where(v > 0, v, 10.0**lo)) if plot.log and not plot.fraction else v
        return _TOP + ph - (np.clip(y, lo, hi) - lo) / (hi - lo) * ph

    out = [
        (
            f'<svg class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'role="img" aria-label="{escape(plot.title)}">'
        ),
        f"<title>{escape(plot.title)}</title>",
        f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="#fff" stroke="#999" stroke-width="0.5"/>',
    ]
    for band in plot.bands:  # alert episodes, under the lines
        a = float(px(np.asarray([band.step]))[0])
        b = float(px(np.asarray([s1 if band.end is None else band.end]))[0])
        state = "still active" if band.end is None else f"recovered at step {band.end}"
        out.append(
            f'<rect x="{a:.1f}" y="{_TOP}" width="{max(b - a, 1.5):.1f}" height="{ph}" fill="{ALERT}" '
            f'fill-opacity="0.10"><title>{escape(band.kind)} alert at step {band.step}, {state}</title></rect>'
        )
        out.append(f'<line x1="{a:.1f}" y1="{_TOP}" x2="{a:.1f}" y2="{_TOP + ph}" stroke="{ALERT}" stroke-width="1"/>')
        if band.end is not None:
            out.append(
                f'<line x1="{b:.1f}" y1="{_TOP}" x2="{b:.1f}" y2="{_TOP + ph}" stroke="{RECOVERED}" stroke-width="1"/>'
            )
    for t, label in ticks:  # y ticks and grid
        y = float(py(np.asarray([10.0**t if plot.log and not plot.fraction else t]))[0])
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + pw}" y2="{y:.1f}" stroke="#eee" stroke-width="0.5"/>')
        out.append(f'<text x="{_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{escape(label)}</text>')
    x_ticks = sorted({s0, (s0 + s1) // 2, s1}) if s1 > s0 else [s0]
    for st in x_ticks:
        x = float(px(np.asarray([st]))[0])
        out.append(f'<line x1="{x:.1f}" y1="{_TOP + ph}" x2="{x:.1f}" y2="{_TOP + ph + 3}" stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{_TOP + ph + 13}" text-anchor="middle">{st}</text>')
    out.append(f'<text x="{_LEFT + pw}" y="{h - 3}" text-anchor="end" class="axis">step</text>')
    out.append(f'<text x="{_LEFT}" y="{_TOP - 6}" class="ptitle">{escape(plot.title)}</text>')
    if floor_note:
        out.append(f'<text x="{_LEFT + 3}" y="{_TOP + ph - 3}" class="note">{escape(floor_note)}</text>')
    for ln, v in zip(plot.lines, values):
        steps = np.asarray(ln.steps)
        ok = np.isfinite(v)
        if ok.any():
            xs, ys = _decimate(px(steps[ok]), py(v[ok]), pw)
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs, ys))
            if xs.size == 1:
                out.append(f'<circle cx="{xs[0]:.1f}" cy="{ys[0]:.1f}" r="2" fill="{ln.colour}"/>')
            else:
                out.append(f'<polyline fill="none" stroke="{ln.colour}" stroke-width="1.3" points="{pts}"/>')
        if (~ok).any():  # NaN/Inf: red marks along the top
            bad = np.unique(np.round(px(steps[~ok])))
            marks = " ".join(f"M{x:.0f},{_TOP}v5" for x in bad)
            out.append(f'<path d="{marks}" stroke="{ALERT}" stroke-width="1.5"><title>NaN/Inf</title></path>')
    if len(plot.lines) > 1:  # a legend
        x = _LEFT + pw
        for ln in reversed(plot.lines):
            out.append(f'<text x="{x}" y="{_TOP - 6}" text-anchor="end" fill="{ln.colour}">{escape(ln.label)}</text>')
            x -= 7 * len(ln.label) + 8
    out.append("</svg>")
    return "".join(out)


def spark(values: Sequence[float], width: int = 90, height: int = 18, colour: str = COLOURS["rms"]) -> str:
    """A tiny trend line for a table cell (log scale when the values span more than 100x, as in the terminal)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    out = [f'<svg class="spark" width="{width}" height="{height}" aria-hidden="true">']
    if ok.any():
        f = v[ok]
        lo, hi = float(f.min()), float(f.max())
        if lo > 0 and hi / lo > 100:
            v, lo, hi = np.log10(np.where(ok, v, 1.0)), math.log10(lo), math.log10(hi)
        elif lo >= 0:
            lo = 0.0
        n = max(v.size - 1, 1)
        xs = np.arange(v.size) / n * (width - 2) + 1
        ys = height - 2 - (np.where(ok, v, lo) - lo) / ((hi - lo) or 1.0) * (height - 4)
        if hi == lo:
            ys = np.full(v.size, height / 2)
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs[ok], ys[ok]))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{pts}"/>')
        for x in xs[~ok]:
            out.append(f'<path d="M{x:.1f},1v5" stroke="{ALERT}" stroke-width="1.5"/>')
    out.append("</svg>")
    return "".join(out)
