"""The monitor's heatmaps: the "scan" (layers x units), per-layer timelines (units x time), the
gradient flow (layers x time), the probe heatmap (probe samples x units) and the attention
heads (attention modules x heads).

Every image is :data:`~monitor.picture.CARD_WIDTH` (350) pixels wide, the width of TensorBoard's
image card, so the Images dashboard shows it pixel for pixel without "show actual image size"
(see :mod:`monitor.picture`). Long titles wrap; long row labels lose their middle (``enc…1.relu``).
Wide layers wrap onto several lines of units rather than being squeezed. Non-finite cells are red.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monitor.picture import (  # noqa: F401 - re-exported: the names this module always had
    BLACK,
    CARD_WIDTH,
    GREY,
    LEVELS,
    LINE,
    MARGIN,
    MAX_HEIGHT,
    NAN,
    NAN_RGB,
    WHITE,
    Picture,
    bin_units,
    color_index,
    colorbar,
    colorize,
    elide,
    palette,
    shorten_names,
    text_block,
    text_mask,
    text_width,
    wrap,
)

MAX_LINES = 4  # a layer's units wrap onto at most this many lines of the scan
MAX_CELL = 24  # widest cell of a unit (px)


@dataclass(frozen=True)
class UnitLayout:
    """How ``units`` columns are laid out in ``width`` pixels: ``lines`` lines of ``per_line``
    cells ``cell`` pixels wide; ``shown`` columns in all (``shown < units``: adjacent units averaged)."""

    units: int
    shown: int
    per_line: int
    lines: int
    cell: int


def unit_layout(units: int, width: int, max_lines: int = MAX_LINES, cells: Sequence[int] = (2, 1)) -> UnitLayout:
    """Cells of at least 2 px on up to ``max_lines`` balanced lines; else 1 px; else averaged."""
    for cell in cells:
        per_line_max = max(width // cell, 1)
        lines = max(1, math.ceil(units / per_line_max))
        if lines <= max_lines:
            per_line = math.ceil(units / lines)
            return UnitLayout(units, units, per_line, lines, min(MAX_CELL, max(width // per_line, 1)))
    shown = width * max_lines
    return UnitLayout(units, shown, width, max_lines, 1)


def _title(lines: Sequence[str], width: int) -> list[str]:
    return [line for text in lines for line in wrap(text, width - 2 * MARGIN)]


def _fit_height(pic_height: int) -> int:
    return min(pic_height, MAX_HEIGHT)


@dataclass
class ScanRow:
    label: str  # layer name
    values: np.ndarray  # per unit, in [0, 1]
    metric: str  # "firing" or "rms"


def render_scan(rows: Sequence[ScanRow], step: int, width: int = CARD_WIDTH) -> Picture:
    """Layers (forward order, top to bottom) x units: the whole network at one sampled step.

    Each layer gets a label line (name, units, metric) and its units left to right, wrapped onto
    up to four lines (cells of 2 px or more when they fit, 1 px otherwise; only layers of more
    than 4 x 338 units are averaged). Colour: firing rate for ReLU-like layers, RMS / the layer's
    largest unit RMS otherwise.
    """
    avail = width - 2 * MARGIN
    title = _title([f"activation scan @ step {step}: layers x units"], width)
    legend = wrap("firing rate, or RMS / the layer's largest (red: NaN/Inf)", avail - 130)
    y = 4 + len(title) * LINE + 4
    bar_y = y
    y += max(len(legend) * LINE, 24) + 4
    layouts = [unit_layout(r.values.shape[0], avail) for r in rows]
    heights = []
    for lay in layouts:
        line_h = 14 if lay.lines == 1 else 10
        heights.append(LINE + lay.lines * line_h + (lay.lines - 1) * 3 + 6)
    if y + sum(heights) + 4 > MAX_HEIGHT:
        return _compact_scan(rows, title, legend, y, bar_y, width)
    pic = Picture(y + sum(heights) + 4, width)
    items = text_block(title, MARGIN, 4)
    items += colorbar(pic, MARGIN, bar_y + 2, 120, [(0.0, "0"), (0.5, "0.5"), (1.0, "1")])
    items += text_block(legend, MARGIN + 130, bar_y - 2)
    for r, lay, hgt in zip(rows, layouts, heights):
        n = lay.units
        unit_text = f"{n} units" if lay.shown == n else f"{n} units in {lay.shown} columns"
        metric = "firing rate" if r.metric == "firing" else "RMS"
        items.append(((MARGIN, y), elide(f"{r.label}: {unit_text}, {metric}", avail), "left"))
        values = color_index(bin_units(r.values, lay.shown))
        line_h = 14 if lay.lines == 1 else 10
        ly = y + LINE
        for i in range(lay.lines):
            chunk = values[i * lay.per_line : (i + 1) * lay.per_line]
            x1 = MARGIN + chunk.shape[0] * lay.cell
            pic.pixels[ly : ly + line_h, MARGIN:x1] = np.repeat(chunk, lay.cell)[None, :]
            if lay.lines > 1:
                first = i * lay.per_line * n // lay.shown
                last = min((i + 1) * lay.per_line, lay.shown) * n // lay.shown - 1
                tag = f"{first}-{last}"
                if width - MARGIN - x1 >= text_width(tag) + 4:
                    items.append(((width - MARGIN, ly - 3), tag, "right"))
            ly += line_h + 3
        y += hgt
    pic.labels(items)
    return pic


def _compact_scan(
    rows: Sequence[ScanRow], title: list[str], legend: list[str], top: int, bar_y: int, width: int
) -> Picture:
    """Too many layers for a label line each: one strip per layer, names on the left (like the gradient flow)."""
    n = len(rows)
    short, prefix = shorten_names([r.label for r in rows], int(width * 0.42))
    if prefix:
        title = [*title, *wrap(f"layers: {prefix}…", width - 2 * MARGIN)]
        top += LINE
    row_h = int(np.clip((MAX_HEIGHT - top - 4) // max(n, 1), 2, 14))
    label_every = max(1, -(-14 // row_h))
    names = {i: short[i] for i in range(0, n, label_every)}
    left = max([text_width(s) for s in names.values()] + [30]) + 10
    avail = width - left - MARGIN
    pic = Picture(min(top + n * row_h + 4, MAX_HEIGHT), width)
    items = text_block(title, MARGIN, 4)
    bar_y += LINE if prefix else 0
    items += colorbar(pic, MARGIN, bar_y + 2, 120, [(0.0, "0"), (0.5, "0.5"), (1.0, "1")])
    items += text_block(legend, MARGIN + 130, bar_y - 2)
    for i, r in enumerate(rows):
        y = top + i * row_h
        if y + row_h > pic.pixels.shape[0]:
            break
        binned = bin_units(r.values, avail)
        cols = (np.arange(avail) * binned.shape[0] // avail).clip(0, binned.shape[0] - 1)
        pic.pixels[y : y + max(row_h - 1, 1), left : left + avail] = color_index(binned[cols])[None, :]
        if i in names:
            items.append(((left - 5, y + row_h // 2 - 7), names[i], "right"))
    pic.labels(items)
    return pic


def render_timeline(
    layer: str, metric: str, values: np.ndarray, steps: Sequence[int], max_rows: int = 256, width: int = CARD_WIDTH
) -> Picture:
    """Units (rows) x sampled steps (columns) for one layer; a dying unit is a row going dark.

    ``values`` is ``[units, samples]`` in [0, 1]; more than ``max_rows`` units are averaged.
    """
    v = bin_units(np.asarray(values, dtype=np.float64), max_rows)
    units, samples = v.shape
    n_units = values.shape[0]
    binned = f" ({n_units} units in {units} rows)" if units < n_units else ""
    title = _title([layer, f"{metric} per unit (rows) over sampled steps{binned}"], width)
    left = max(text_width(str(n_units - 1)), 12) + 10
    cell_h = int(np.clip(360 // max(units, 1), 1, 16))
    cell_w = int(np.clip((width - left - MARGIN) // max(samples, 1), 1, 32))
    samples = min(samples, (width - left - MARGIN) // cell_w)  # the newest columns that fit
    v = v[:, v.shape[1] - samples :]
    steps = list(steps)[len(steps) - samples :] if steps else []
    top = 4 + len(title) * LINE + 4
    gh, gw = units * cell_h, samples * cell_w
    legend = f"{metric} (red: NaN/Inf)"
    pic = Picture(top + gh + 18 + 10 + 2 * LINE, width)
    pic.pixels[top : top + gh, left : left + gw] = np.repeat(np.repeat(color_index(v), cell_h, axis=0), cell_w, axis=1)
    items = text_block(title, MARGIN, 4)
    for frac in (0.0, 0.5, 1.0):
        row = min(int(frac * (units - 1)), units - 1)
        unit = row if units == n_units else int(row * n_units / units)
        y = top + row * cell_h + cell_h // 2 - 7
        items.append(((left - 5, int(np.clip(y, top - 4, top + gh - 10))), str(unit), "right"))
    if steps:
        items.append(((left, top + gh + 2), f"step {steps[0]}", "left"))
        items.append(((left + gw, top + gh + 2), str(steps[-1]), "right"))
    bar_y = top + gh + 20
    items += colorbar(pic, left, bar_y, 120, [(0.0, "0"), (0.5, "0.5"), (1.0, "1")])
    items += text_block(wrap(legend, width - left - 130 - MARGIN), left + 130, bar_y - 3)
    pic.labels(items)
    return pic


FLOW_LOW, FLOW_HIGH = -6.0, 2.0  # log10 range of the gradient-flow colours


def render_gradient_flow(layers: Sequence[str], ratios: np.ndarray, steps: Sequence[int], width: int = CARD_WIDTH) -> Picture:
    """Layers (rows, forward order: the input at the top, the loss at the bottom) x sampled steps
    (columns); colour: log10 of the layer's gradient RMS over that of the layers nearest the loss
    on the same step, from 1e-6 (dark) to 1e2 (yellow). A vanishing gradient is a dark band
    growing from the top; white: no gradient reached the layer on that step.

    ``ratios`` is ``[layers, samples]`` (NaN where there is none).
    """
    r = np.asarray(ratios, dtype=np.float64)
    n, samples = r.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (np.log10(np.where(r > 0, r, 1e-300)) - FLOW_LOW) / (FLOW_HIGH - FLOW_LOW)
    missing = np.isnan(r)
    cell_h = int(np.clip(480 // max(n, 1), 3, 18))
    label_every = max(1, -(-14 // cell_h))  # a label needs ~14 px
    short, prefix = shorten_names(layers, int(width * 0.42))
    names = [short[i] for i in range(0, n, label_every)]
    left = max([text_width(s) for s in names] + [30]) + 10
    cell_w = int(np.clip((width - left - MARGIN) // max(samples, 1), 1, 32))
    keep = min(samples, (width - left - MARGIN) // cell_w)
    v, missing = v[:, samples - keep :], missing[:, samples - keep :]
    steps = list(steps)[len(steps) - keep :] if steps else []
    title = ["gradient flow: layers x sampled steps, gradient RMS / layers nearest the loss"]
    title = _title(title + ([f"layers: {prefix}…"] if prefix else []), width)
    top = 4 + len(title) * LINE + 4
    gh, gw = n * cell_h, keep * cell_w
    pic = Picture(_fit_height(top + gh + 20 + 10 + 2 * LINE + 4), width)
    grid = color_index(np.where(np.isfinite(v), np.clip(v, 0.0, 1.0), np.inf))  # Inf (NaN/Inf gradients): red
    grid[missing] = WHITE
    gh = min(gh, pic.pixels.shape[0] - top - 20 - 10 - 2 * LINE - 4)
    pic.pixels[top : top + gh, left : left + gw] = np.repeat(np.repeat(grid, cell_h, axis=0), cell_w, axis=1)[:gh]
    items = text_block(title, MARGIN, 4)
    for label, i in zip(names, range(0, n, label_every)):
        if i * cell_h < gh:
            items.append(((left - 5, top + i * cell_h + cell_h // 2 - 7), label, "right"))
    if steps:
        items.append(((left, top + gh + 2), f"step {steps[0]}", "left"))
        items.append(((left + gw, top + gh + 2), str(steps[-1]), "right"))
    bar_y = top + gh + 20
    ticks = [(0.0, "1e-6"), (0.5, "1e-2"), (0.75, "1"), (1.0, "1e2")]
    items += colorbar(pic, MARGIN, bar_y, 200, ticks)
    items += text_block(wrap("white: no gradient, red: NaN/Inf", width - 2 * MARGIN), MARGIN, bar_y + 8 + LINE)
    pic.labels(items)
    return pic


def render_probe(
    layer: str,
    matrix: np.ndarray,
    step: int,
    labels: Sequence[str] | None = None,
    width: int = CARD_WIDTH,
    grid_height: int = 480,
) -> Picture:
    """Probe samples (rows, grouped by label) x units (columns, in unit order) for one layer.

    ``matrix`` is ``[samples, units]``, its rows already in the order to draw (grouped by label,
    see :func:`monitor.probe.row_order`), ``labels`` one per row. Colour: |activation| / the
    largest |activation| of the image, so a unit that is silent on every probe sample (a dead
    ReLU) is a dark column. Units that do not fit one line wrap into up to four blocks, each
    showing every sample; rows are 1-12 px within ``grid_height`` (more samples than that are
    averaged in adjacent groups, each labelled by its first sample).
    """
    m = np.abs(np.asarray(matrix, dtype=np.float64))
    samples, units = m.shape if m.ndim == 2 else (0, 0)
    finite = m[np.isfinite(m)]
    top_value = float(finite.max()) if finite.size else 0.0
    scaled = m / top_value if top_value > 0 else np.where(np.isfinite(m), 0.0, m)
    names_in = [str(x) for x in labels] if labels is not None else None
    left = max([text_width(elide(s, int(width * 0.35))) for s in set(names_in or ())] + [text_width(str(max(samples - 1, 0))), 12]) + 10
    avail = width - left - MARGIN
    lay = unit_layout(max(units, 1), avail, max_lines=1)  # one block of all units if they fit
    if lay.shown < lay.units:
        lay = unit_layout(units, avail, max_lines=4, cells=(1,))  # else up to four blocks of 1 px units
    block_gap = LINE + 2 if lay.lines > 1 else 0
    room = grid_height - lay.lines * block_gap
    max_rows = max(room // lay.lines - 8, 8)
    row_labels = names_in
    if samples > max_rows:  # averaged rows; each takes the label of its first sample
        first = np.linspace(0, samples, max_rows + 1).round().astype(int)[:-1]
        scaled = bin_units(scaled, max_rows)
        row_labels = [names_in[i] for i in first] if names_in is not None else None
    rows = scaled.shape[0]
    groups = _groups(row_labels, rows)
    names = [elide(g[0], int(width * 0.35)) for g in groups] if row_labels is not None else []
    seps = len(groups) - 1  # one white pixel row between label groups
    row_h = int(np.clip((room // lay.lines - seps) // max(rows, 1), 1, 12))
    title = _title([layer, f"probe @ step {step}: {samples} samples (rows) x {units} units"], width)
    top = 4 + len(title) * LINE + 4
    block_h = rows * row_h + seps
    footer = 18 + 10 + 2 * LINE + 4
    pic = Picture(top + lay.lines * (block_h + block_gap) + footer, width)
    items = text_block(title, MARGIN, 4)
    values = color_index(bin_units(scaled.T, lay.shown).T) if units else np.zeros((rows, 0), np.uint8)
    y = top
    for b in range(lay.lines):
        lo, hi = b * lay.per_line, min((b + 1) * lay.per_line, lay.shown)
        if lay.lines > 1:
            items.append(((left, y), f"units {lo * units // lay.shown}-{hi * units // lay.shown - 1}", "left"))
            y += block_gap
        cells = np.repeat(values[:, lo:hi], lay.cell, axis=1)
        gy = y
        for g, (_, start, stop) in enumerate(groups):
            h = (stop - start) * row_h
            pic.pixels[gy : gy + h, left : left + cells.shape[1]] = np.repeat(cells[start:stop], row_h, axis=0)
            if row_labels is not None and (h >= 9 or g == 0):
                items.append(((left - 5, gy + max(h // 2 - 7, 0)), names[g], "right"))
            gy += h + 1
        if row_labels is None:
            items.append(((left - 5, y - 3), "0", "right"))
            items.append(((left - 5, y + block_h - 11), str(samples - 1), "right"))
        y += block_h
    if lay.lines == 1 and lay.shown == units:  # unit numbers under their columns
        room = text_width(str(units - 1)) + 6
        every = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if s * lay.cell >= room)
        ticks = list(range(0, units, every))
        if ticks[-1] != units - 1 and (units - 1 - ticks[-1]) * lay.cell >= room:
            ticks.append(units - 1)
        items += [((left + u * lay.cell + lay.cell // 2, y + 2), str(u), "centre") for u in ticks]
    bar_y = y + 20
    items += colorbar(pic, MARGIN, bar_y, 120, [(0.0, "0"), (1.0, f"{top_value:.3g}")])
    legend = "|activation| / largest in this image (red: NaN/Inf)"
    items += text_block(wrap(legend, width - 130 - 2 * MARGIN), MARGIN + 130, bar_y - 3)
    pic.labels(items)
    return pic


def _groups(labels: Sequence[str] | None, rows: int) -> list[tuple[str, int, int]]:
    """Runs of equal labels: (label, first row, end row)."""
    if labels is None or rows == 0:
        return [("", 0, rows)]
    out: list[tuple[str, int, int]] = []
    start = 0
    for i in range(1, rows + 1):
        if i == rows or labels[i] != labels[start]:
            out.append((labels[start], start, i))
            start = i
    return out


def render_attention_heads(
    modules: Sequence[str],
    heads: Sequence[int],
    entropy: np.ndarray,
    sink: np.ndarray,
    step: int,
    width: int = CARD_WIDTH,
) -> Picture:
    """Attention modules (rows, forward order) x heads (columns) at one sampled step; colour: the
    head's normalised attention entropy (0: every query looks at one key, dark; 1: spread evenly,
    yellow). A dot marks a head with more than half of its attention on the first token (white on
    dark cells, black on light ones). Cells of heads a module does not have are white; NaN/Inf red.

    ``entropy`` and ``sink`` are ``[modules, max(heads)]`` (see :mod:`monitor.headstats`).
    """
    ent = np.asarray(entropy, dtype=np.float64).reshape(len(modules), -1)
    snk = np.asarray(sink, dtype=np.float64).reshape(ent.shape)
    n, cols = ent.shape
    short, prefix = shorten_names(modules, int(width * 0.42))
    cell_h = int(np.clip(480 // max(n, 1), 3, 18))
    label_every = max(1, -(-14 // cell_h))
    names = [short[i] for i in range(0, n, label_every)]
    left = max([text_width(s) for s in names] + [30]) + 10
    avail = width - left - MARGIN
    shown = min(cols, avail)  # more heads than pixels: adjacent heads averaged
    if shown < cols:
        ent, snk = bin_units(ent.T, shown).T, bin_units(snk.T, shown).T
    cell_w = int(np.clip(avail // max(shown, 1), 1, 24))
    title = [f"attention heads @ step {step}: modules x heads"]
    title = _title(title + ([f"modules: {prefix}…"] if prefix else []), width)
    top = 4 + len(title) * LINE + 4
    footer = 18 + 10 + 3 * LINE + 4
    pic = Picture(_fit_height(top + n * cell_h + footer), width)
    gh = min(n * cell_h, pic.pixels.shape[0] - top - footer)
    grid = color_index(np.where(np.isnan(ent), np.inf, np.clip(ent, 0.0, 1.0)))
    have = np.arange(cols)[None, :] < np.asarray(heads)[:, None]
    if shown < cols:
        have = bin_units(have.T.astype(np.float64), shown).T > 0
    grid[~have] = WHITE
    block = np.repeat(np.repeat(grid, cell_h, axis=0), cell_w, axis=1)
    if cell_h >= 5 and cell_w >= 5:  # grid lines between cells
        block[cell_h - 1 :: cell_h, :] = WHITE
        block[:, cell_w - 1 :: cell_w] = WHITE
        dot = max(2, min(cell_h, cell_w) // 3)
        for r, c in zip(*np.nonzero((snk > 0.5) & have)):
            y0 = r * cell_h + (cell_h - 1 - dot) // 2
            x0 = c * cell_w + (cell_w - 1 - dot) // 2
            block[y0 : y0 + dot, x0 : x0 + dot] = WHITE if ent[r, c] < 0.5 else BLACK
    pic.pixels[top : top + gh, left : left + shown * cell_w] = block[:gh]
    items = text_block(title, MARGIN, 4)
    for label, i in zip(names, range(0, n, label_every)):
        if i * cell_h < gh:
            items.append(((left - 5, top + i * cell_h + cell_h // 2 - 7), label, "right"))
    room = text_width(str(max(cols - 1, 0))) + 6
    every = next((s for s in (1, 2, 4, 8, 16, 32, 64) if s * cell_w >= room), max(cols, 1))
    if shown == cols:
        items += [((left + h * cell_w + cell_w // 2, top + gh + 2), str(h), "centre") for h in range(0, cols, every)]
    else:
        items.append(((left, top + gh + 2), f"{cols} heads in {shown} columns", "left"))
    bar_y = top + gh + 20
    items += colorbar(pic, MARGIN, bar_y, 120, [(0.0, "0"), (0.5, "0.5"), (1.0, "1")])
    legend = ["normalised entropy (0: one key,", "1: uniform); dot: > half on the", "first token; red: NaN/Inf"]
    items += text_block([x for line in legend for x in wrap(line, width - 130 - 2 * MARGIN)], MARGIN + 130, bar_y - 3)
    pic.labels(items)
    return pic
