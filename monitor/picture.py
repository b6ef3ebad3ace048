"""Pixels and text for the monitor's images: a palette image, a colour scale, text bitmaps and
the layout rules that make an image legible in TensorBoard's image card.

TensorBoard's Images dashboard shows every image in a card **350 CSS pixels wide**, scaled to that
width with nearest-neighbour sampling (``image-rendering: pixelated``). An image that is exactly
:data:`CARD_WIDTH` wide is therefore shown pixel for pixel: 12 px text stays 12 px and a unit one
pixel wide stays one pixel wide (a wider image loses whole rows and columns of pixels, text
included). Every image of the monitor is :data:`CARD_WIDTH` wide and at most
:data:`MAX_HEIGHT` tall (the card scrolls beyond 1024 px, and its scroll bar would shrink the
image); titles wrap instead of running off the right edge.

Pure numpy for the pixels (a viridis colour map from its published polynomial fit) and Pillow's
bundled font for the labels, so rendering takes a few milliseconds and needs no matplotlib.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

CARD_WIDTH = 350  # TensorBoard's image card (tf-image-loader: `width: 350px`, image `width: 100%`)
MAX_HEIGHT = 1000  # below the card's 1024 px scroll limit
MARGIN = 6
FONT_SIZE = 12
LINE = 15  # height of one line of text

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
NAN, WHITE, BLACK, GREY = LEVELS, LEVELS + 1, LEVELS + 2, LEVELS + 3  # further palette entries
NAN_RGB = (220, 30, 30)


@lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """256 x 3 uint8: the colour scale (viridis), then red (NaN/Inf), white, black, grey."""
    t = np.linspace(0.0, 1.0, LEVELS)[:, None]
    rgb = np.zeros((LEVELS, 3))
    for coef in _VIRIDIS[::-1]:
        rgb = rgb * t + coef
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:LEVELS] = (np.clip(rgb, 0, 1) * 255).round()
    pal[NAN], pal[WHITE], pal[BLACK], pal[GREY] = NAN_RGB, (255, 255, 255), (20, 20, 20), (150, 150, 150)
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
        """The picture as an 8-bit palette PNG (no row filter, zlib level 1): written here rather
        than by Pillow, which took ~1.6x as long for a timeline; ``zlib`` releases the GIL while it
        compresses, so the training thread runs meanwhile."""
        h, w = self.pixels.shape
        rows = np.zeros((h, w + 1), dtype=np.uint8)  # each scanline: filter type 0, then its indices
        rows[:, 1:] = self.pixels
        header = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)  # 8-bit, colour type 3 (palette)
        return b"".join(
            (_PNG_SIGNATURE, _chunk(b"IHDR", header), _plte(), _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)), _IEND)
        )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_IEND = _chunk(b"IEND", b"")


@lru_cache(maxsize=1)
def _plte() -> bytes:
    return _chunk(b"PLTE", palette().tobytes())


def bin_units(values: np.ndarray, max_bins: int) -> np.ndarray:
    """Average adjacent entries of axis 0 so that at most ``max_bins`` remain (NaN-propagating)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    if n <= max_bins:
        return v
    edges = np.linspace(0, n, max_bins + 1).round().astype(int)
    return np.stack([v[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])])


# -- text ------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _font(size: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def text_width(text: str) -> int:
    return text_mask(text).shape[1]


_NUMBERS = re.compile(r"(\d+)")


def text_mask(text: str) -> np.ndarray:
    """Boolean bitmap of ``text``. A text with a number in it (a step, which changes in every
    image, or a layer index) is composed from cached bitmaps of its other pieces and of digits
    instead of rendering the whole text anew (also each trial line of :func:`wrap`)."""
    if len(text) <= 6 or not _NUMBERS.search(text):  # short texts (unit and step ticks) are cached as they are
        return _text_mask(text)
    return _composed_mask(text)


_SPACE = 4  # px: the width of a space trimmed from the ends of a piece


@lru_cache(maxsize=2048)
def _composed_mask(text: str) -> np.ndarray:
    """``text`` from cached pieces: digits one by one, the runs between them trimmed of spaces (cached
    too: names like ``layers.12`` repeat in every image, titles with a step do not; read-only, like
    every cached mask). Pieces are top-aligned, as PIL draws them from the same origin."""
    placed: list[tuple[int, np.ndarray]] = []  # (x, mask)
    x = 0
    for piece in _NUMBERS.split(text):
        if not piece:
            continue
        if piece.isdigit():
            for d in piece:
                placed.append((x, _text_mask(d)))
                x += placed[-1][1].shape[1]
            continue
        core = piece.strip(" ")
        x += _SPACE if piece[0] == " " else 0
        if core:
            placed.append((x, _text_mask(core)))
            x += placed[-1][1].shape[1] + (_SPACE if piece[-1] == " " else 0)
    out = np.zeros((max((m.shape[0] for _, m in placed), default=1), x), dtype=bool)
    for x0, m in placed:
        out[: m.shape[0], x0 : x0 + m.shape[1]] = m
    return out


@lru_cache(maxsize=1024)
def _text_mask(text: str) -> np.ndarray:
    """Boolean bitmap of ``text`` (cached: layer names repeat in every image)."""
    from PIL import Image, ImageDraw

    font = _font(FONT_SIZE)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("1", (int(right) * 5 // 4 + 16, max(int(bottom) + 3, 15)), 0)  # unhinted bbox: too narrow
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliasing: text stays one palette colour
    draw.text((0, 0), text, fill=1, font=font)
    mask = np.asarray(img, dtype=bool)
    inked = np.flatnonzero(mask.any(axis=0))
    return mask[:, : (inked[-1] + 2 if inked.size else 1)]


def elide(text: str, width: int) -> str:
    """``text`` if it fits in ``width`` pixels, else its start and end around an ellipsis."""
    if text_width(text) <= width:
        return text
    keep_end = len(text) // 2
    keep_start = len(text) - keep_end
    while keep_start + keep_end > 1:
        if keep_start >= keep_end:
            keep_start -= 1
        else:
            keep_end -= 1
        short = text[:keep_start] + "…" + (text[-keep_end:] if keep_end else "")
        if text_width(short) <= width:
            return short
    return "…"


def shorten_names(names: Sequence[str], width: int) -> tuple[list[str], str]:
    """Row labels for ``names`` that fit in ``width`` pixels, and the dotted prefix they all share
    and that was left out (``""`` if none): ``model.encoder.layer.3.act`` -> ``3.act`` with prefix
    ``model.encoder.layer.``. What is still too wide loses its middle."""
    names = list(names)
    prefix = ""
    if len(names) > 1 and any(text_width(n) > width for n in names):
        parts = [n.split(".") for n in names]
        common = 0
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
        if common:
            prefix = ".".join(parts[0][:common]) + "."
            names = [n[len(prefix) :] for n in names]
    return [elide(n, width) for n in names], prefix


_BREAK = re.compile(r"(?<=[ .,/_:|])")  # break after a space or a separator of layer names


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` pixels, broken after spaces, dots, slashes,
    underscores, commas or colons (and inside a word only when one alone is too wide)."""
    lines: list[str] = []
    current = ""
    for piece in (p for p in _BREAK.split(text) if p):
        trial = current + piece
        if text_width(trial.rstrip()) <= width:
            current = trial
            continue
        if current.strip():
            lines.append(current.rstrip())
        current = piece.lstrip()
        while text_width(current.rstrip()) > width and len(current) > 1:  # one piece wider than the line
            cut = len(current) - 1
            while cut > 1 and text_width(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current.strip() or not lines:
        lines.append(current.rstrip())
    return lines


def text_block(lines: Sequence[str], x: int, y: int) -> list[tuple[tuple[int, int], str, str]]:
    """Label items for ``lines`` drawn from ``(x, y)`` down, one :data:`LINE` apart."""
    return [((x, y + i * LINE), line, "left") for i, line in enumerate(lines)]


def colorbar(pic: Picture, x: int, y: int, width: int, ticks: Sequence[tuple[float, str]], height: int = 8) -> list:
    """A horizontal colour scale at ``(x, y)`` with tick labels ``(position in [0, 1], text)`` below it."""
    pic.pixels[y : y + height, x : x + width] = color_index(np.linspace(0, 1, width))[None, :]
    items = []
    for pos, text in ticks:
        align = "left" if pos <= 0 else "right" if pos >= 1 else "centre"
        items.append(((x + round(pos * width), y + height + 1), text, align))
    return items
