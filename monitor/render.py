"""Heatmaps as RGB images: a "scan" (layers x units), per-layer timelines (units x time) and the
gradient flow (layers x time).

Pure numpy for the pixels (a viridis colour map from its published polynomial fit) and Pillow
for the labels, so rendering takes a few milliseconds and needs no matplotlib.
Non-finite cells are drawn in red.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Polynomial fit of matplotlib's viridis (max error ~0.013 per channel).
_VIRIDIS = np.array(
    [
        [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
        [0.1050930431085774, 1.404613529898575, 1.384590162594685],
        [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
        [-4.634230498983486, -5.799100973351585, -19.33244095627987],
        [6.228269936347081, 14.17993336680509, 56.69055260068105],
        [4.776384997670288, -13.74514537774601, -65.35303263337234],
        [-5.435455855934631, 4.645852612178535, 26.3124352495832],
    ]
)
LEVELS = 248  # palette entries used by the colour scale
NAN, WHITE, BLACK = LEVELS, LEVELS + 1, LEVELS + 2  # further palette entries
NAN_RGB = (220, 30, 30)


@lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """256 x 3 uint8: the colour scale (viridis), then red (NaN/Inf), white, black."""
    t = np.linspace(0.0, 1.0, LEVELS)[:, None]
    rgb = np.zeros((LEVELS, 3))
    for coef in _VIRIDIS[::-1]:
        rgb = rgb * t + coef
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:LEVELS] = (np.clip(rgb, 0, 1) * 255).round()
    pal[NAN], pal[WHITE], pal[BLACK] = NAN_RGB, (255, 255, 255), (20, 20, 20)
    return pal


def color_index(values: np.ndarray) -> np.ndarray:
    """Palette indices (uint8) for values in [0, 1]; NaN/Inf map to red."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    idx = (np.clip(np.where(finite, v, 0.0), 0.0, 1.0) * (LEVELS - 1)).round().astype(np.uint8)
    idx[~finite] = NAN
    return idx


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to viridis RGB (uint8); NaN/Inf become red."""
    return palette()[color_index(values)]


class Picture:
    """A palette image: cheap to build, to label and to encode as PNG (1 byte per pixel)."""

    def __init__(self, height: int, width: int) -> None:
        self.pixels = np.full((height, width), WHITE, dtype=np.uint8)

    def labels(self, items: Sequence[tuple[tuple[int, int], str, str]]) -> None:
        """Draw labels: ((x, y), text, align) with align in "left", "right", "centre"."""
        h, w = self.pixels.shape
        for (x, y), text, align in items:
            mask = text_mask(text)
            mh, mw = mask.shape
            if align != "left":
                x -= mw if align == "right" else mw // 2
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + mw, w), min(y + mh, h)
            if x1 <= x0 or y1 <= y0:
                continue
            region = self.pixels[y0:y1, x0:x1]
            region[mask[y0 - y : y1 - y, x0 - x : x1 - x]] = BLACK

    def rgb(self) -> np.ndarray:
        return palette()[self.pixels]

    def png(self) -> bytes:
        import io

        from PIL import Image

        img = Image.fromarray(self.pixels)
        img.putpalette(palette().reshape(-1).tolist())  # "L" -> "P", indices kept
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def bin_units(values: np.ndarray, max_bins: int) -> np.ndarray:
    """Average adjacent units so that at most ``max_bins`` remain (NaN-propagating)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    if n <= max_bins:
        return v
    edges = np.linspace(0, n, max_bins + 1).round().astype(int)
    return np.stack([v[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])])


@lru_cache(maxsize=4)
def _font(size: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def text_width(text: str) -> int:
    return text_mask(text).shape[1]


_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")


def text_mask(text: str) -> np.ndarray:
    """Boolean bitmap of ``text``. A trailing number (a step, which changes in every image) is
    composed from cached digit bitmaps instead of rendering the whole text anew."""
    m = _TRAILING_NUMBER.match(text)
    if m is None or len(text) < 3:
        return _text_mask(text)
    head, digits = m.groups()
    parts = [_text_mask(d) for d in digits]
    if head.strip():
        head_mask = _text_mask(head.rstrip())
        gap = 4 if head.endswith(" ") else 0  # the trimmed space
        parts.insert(0, np.pad(head_mask, ((0, 0), (0, gap))))
    height = max(p.shape[0] for p in parts)
    return np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 0))) for p in parts], axis=1)


@lru_cache(maxsize=1024)
def _text_mask(text: str) -> np.ndarray:
    """Boolean bitmap of ``text`` (cached: layer names repeat in every image)."""
    from PIL import Image, ImageDraw

    font = _font(12)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("1", (int(right) * 5 // 4 + 16, max(int(bottom) + 3, 15)), 0)  # unhinted bbox: too narrow
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliasing: text stays one palette colour
    draw.text((0, 0), text, fill=1, font=font)
    mask = np.asarray(img, dtype=bool)
    inked = np.flatnonzero(mask.any(axis=0))
    return mask[:, : (inked[-1] + 2 if inked.size else 1)]


@dataclass
class ScanRow:
    label: str  # layer name
    values: np.ndarray  # per unit, in [0, 1]
    metric: str  # "firing" or "rms"


def _colorbar(pic: Picture, x: int, y: int, width: int, height: int, legend: str) -> list:
    pic.pixels[y : y + height, x : x + width] = color_index(np.linspace(0, 1, width))[None, :]
    return [
        ((x, y + height + 2), "0", "left"),
        ((x + width // 2, y + height + 2), "0.5", "centre"),
        ((x + width, y + height + 2), "1", "right"),
        ((x + width + 10, y - 3), legend, "left"),
    ]


def render_scan(rows: Sequence[ScanRow], step: int, width: int = 640, row_height: int = 16) -> Picture:
    """Layers (rows, forward order) x units (columns): the whole network at one sampled step.

    Each layer's units span the full width (wide layers are averaged into ``width`` bins).
    Colour: firing rate for ReLU-like layers, RMS / the layer's largest unit RMS otherwise.
    """
    labels = [f"{r.label} ({r.values.shape[0]}, {r.metric})" for r in rows]
    label_w = max([text_width(s) for s in labels] + [80]) + 12
    top, bottom, gap = 24, 40, 2
    h = top + len(rows) * (row_height + gap) + bottom
    legend = "firing rate | RMS / layer max   (red: NaN/Inf)"
    pic = Picture(h, max(label_w + width + 12, label_w + min(200, width) + text_width(legend) + 24))
    items = [((6, 5), f"activation scan: layers x units @ step {step}", "left")]
    for i, (r, text) in enumerate(zip(rows, labels)):
        binned = bin_units(r.values, width)
        cols = (np.arange(width) * binned.shape[0] // width).clip(0, binned.shape[0] - 1)
        y0 = top + i * (row_height + gap)
        pic.pixels[y0 : y0 + row_height, label_w : label_w + width] = color_index(binned[cols])[None, :]
        items.append(((label_w - 6, y0 + (row_height - 13) // 2), text, "right"))
    items += _colorbar(pic, label_w, h - bottom + 10, min(200, width), 8, legend)
    pic.labels(items)
    return pic


def render_timeline(layer: str, metric: str, values: np.ndarray, steps: Sequence[int], max_rows: int = 256) -> Picture:
    """Units (rows) x sampled steps (columns) for one layer; a dying unit is a row going dark.

    ``values`` is ``[units, samples]`` in [0, 1].
    """
    v = bin_units(np.asarray(values, dtype=np.float64), max_rows)
    units, samples = v.shape
    cell_h = int(np.clip(320 // max(units, 1), 2, 16))
    cell_w = int(np.clip(480 // max(samples, 1), 3, 32))
    left, top, right, bottom = 56, 24, 16, 50
    gh, gw = units * cell_h, samples * cell_w
    n_units = values.shape[0]
    binned = f" ({n_units} units in {units} rows)" if units < n_units else ""
    title = f"{layer}: {metric} per unit (rows) over sampled steps{binned}"
    h, w = top + gh + bottom, max(left + gw + right, 440, text_width(title) + 12, left + 400)
    pic = Picture(h, w)
    grid = color_index(v)
    pic.pixels[top : top + gh, left : left + gw] = np.repeat(np.repeat(grid, cell_h, axis=0), cell_w, axis=1)
    items = [((6, 5), title, "left")]
    for frac in (0.0, 0.5, 1.0):
        row = min(int(frac * (units - 1)), units - 1)
        unit = row if units == n_units else int(row * n_units / units)
        items.append(((left - 6, top + row * cell_h + cell_h // 2 - 7), str(unit), "right"))
    if steps:
        items.append(((left, top + gh + 3), f"step {steps[0]}", "left"))
        items.append(((left + gw, top + gh + 3), str(steps[-1]), "right"))
    items += _colorbar(pic, left, top + gh + 24, 160, 8, f"{metric} (red: NaN/Inf)")
    pic.labels(items)
    return pic


FLOW_LOW, FLOW_HIGH = -6.0, 2.0  # log10 range of the gradient-flow colours


def render_gradient_flow(layers: Sequence[str], ratios: np.ndarray, steps: Sequence[int]) -> Picture:
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
    cell_h = int(np.clip(360 // max(n, 1), 3, 18))
    cell_w = int(np.clip(480 // max(samples, 1), 3, 32))
    label_every = max(1, -(-14 // cell_h))  # a label needs ~14 px
    names = [layers[i] for i in range(0, n, label_every)]
    left = max([text_width(s) for s in names] + [60]) + 12
    top, right, bottom = 24, 16, 52
    gh, gw = n * cell_h, samples * cell_w
    title = "gradient flow: layers x sampled steps, gradient RMS / layers nearest the loss"
    h, w = top + gh + bottom, max(left + gw + right, text_width(title) + 12, left + 420)
    pic = Picture(h, w)
    grid = color_index(np.where(np.isfinite(v), np.clip(v, 0.0, 1.0), np.inf))  # Inf (NaN/Inf gradients): red
    grid[missing] = WHITE
    pic.pixels[top : top + gh, left : left + gw] = np.repeat(np.repeat(grid, cell_h, axis=0), cell_w, axis=1)
    items = [((6, 5), title, "left")]
    for i in range(0, n, label_every):
        items.append(((left - 6, top + i * cell_h + cell_h // 2 - 7), layers[i], "right"))
    if steps:
        items.append(((left, top + gh + 3), f"step {steps[0]}", "left"))
        items.append(((left + gw, top + gh + 3), str(steps[-1]), "right"))
    x, y, width = left, top + gh + 24, 200
    pic.pixels[y : y + 8, x : x + width] = color_index(np.linspace(0, 1, width))[None, :]
    items += [
        ((x, y + 10), "1e-6", "left"),
        ((x + width * 4 // 8, y + 10), "1e-2", "centre"),
        ((x + width * 6 // 8, y + 10), "1", "centre"),
        ((x + width, y + 10), "1e2", "right"),
        ((x + width + 10, y - 3), "(white: no gradient, red: NaN/Inf)", "left"),
    ]
    pic.labels(items)
    return pic
