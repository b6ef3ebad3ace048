"""Image geometry: every heatmap fits TensorBoard's image card (350 px wide, shown pixel for pixel),
titles wrap instead of running off the edge, and dead units are dark cells where they belong."""

import numpy as np
import pytest

from monitor.picture import (
    BLACK,
    CARD_WIDTH,
    LINE,
    MARGIN,
    MAX_HEIGHT,
    color_index,
    elide,
    shorten_names,
    text_width,
    wrap,
)
from monitor.render import ScanRow, render_gradient_flow, render_probe, render_scan, render_timeline, unit_layout

LONG = "model.encoder.layer.11.intermediate.intermediate_act_fn"
DARK = color_index(np.array([0.0]))[0]


def pictures():
    rng = np.random.default_rng(0)
    yield "scan 2 x 256", render_scan([ScanRow("relu1", rng.random(256), "firing"), ScanRow("relu2", rng.random(256), "firing")], 290)
    yield "scan 1 unit", render_scan([ScanRow("a", np.array([0.5]), "rms")], 0)
    yield "scan 5000 units", render_scan([ScanRow(LONG, rng.random(5000), "rms")], 123456)
    yield "scan 120 layers", render_scan([ScanRow(f"{LONG}.{i}", rng.random(64), "rms") for i in range(120)], 7)
    for units, samples in ((1, 1), (20, 3), (256, 100), (3000, 100)):
        yield f"timeline {units}x{samples}", render_timeline(LONG, "firing rate", rng.random((units, samples)), list(range(samples)))
    yield "flow 1x1", render_gradient_flow(["a"], np.ones((1, 1)), [0])
    yield "flow 200x100", render_gradient_flow([f"{LONG}.{i}" for i in range(200)], rng.random((200, 100)), list(range(100)))
    for samples, units in ((1, 1), (36, 20), (64, 700), (2000, 5000)):
        labels = sorted(f"class {i % 3}" for i in range(samples))
        yield f"probe {samples}x{units}", render_probe(LONG, rng.random((samples, units)), 10**7, labels)
    yield "probe no labels", render_probe("x", rng.random((10, 4)), 0, None)


@pytest.mark.parametrize("name, pic", list(pictures()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_image_fits_the_card_and_no_text_runs_off_its_edge(name, pic):
    h, w = pic.pixels.shape
    assert w == CARD_WIDTH and 0 < h <= MAX_HEIGHT
    assert not (pic.pixels[:, w - MARGIN // 2 :] == BLACK).any()  # no text in the right margin: titles wrap
    assert (pic.pixels[: 4 + LINE, :] == BLACK).any()  # a title at the top


def test_wrapping_breaks_at_separators_and_keeps_every_character():
    lines = wrap(f"{LONG}: firing rate per unit (rows) over sampled steps", 200)
    assert len(lines) > 1 and all(text_width(line) <= 200 for line in lines)
    assert "".join(lines).replace(" ", "") == f"{LONG}: firing rate per unit (rows) over sampled steps".replace(" ", "")
    assert wrap("x" * 300, 100)[0] and all(text_width(line) <= 100 for line in wrap("x" * 300, 100))
    assert elide(LONG, 120).count("…") == 1 and text_width(elide(LONG, 120)) <= 120 and elide("abc", 120) == "abc"
    short, prefix = shorten_names([f"{LONG}.{i}" for i in range(3)], 140)
    assert prefix == "model.encoder.layer.11.intermediate.intermediate_act_fn." and short == ["0", "1", "2"]


@pytest.mark.parametrize("units", [1, 16, 169, 170, 256, 338, 1000, 1352, 5000])
def test_unit_layout_keeps_cells_of_two_pixels_until_four_lines_are_full(units):
    lay = unit_layout(units, 338)
    assert lay.per_line * lay.cell <= 338 and lay.lines <= 4
    assert lay.per_line * lay.lines >= lay.shown
    if units <= 4 * 169:
        assert lay.cell >= 2 and lay.shown == units
    elif units <= 4 * 338:
        assert lay.cell == 1 and lay.shown == units
    else:
        assert lay.shown == 4 * 338  # only beyond that are adjacent units averaged


def test_scan_dead_units_are_dark_cells_at_their_columns():
    values = np.full(256, 0.8)
    dead = [0, 5, 127, 128, 200, 255]
    values[dead] = 0.0
    pic = render_scan([ScanRow("relu2", values, "firing")], 10)
    lay = unit_layout(256, CARD_WIDTH - 2 * MARGIN)
    assert (lay.lines, lay.per_line, lay.cell) == (2, 128, 2)
    grid_rows = [y for y in range(pic.pixels.shape[0]) if (pic.pixels[y, MARGIN : MARGIN + 256] < 248).all()]
    assert len(grid_rows) == 2 * 10  # two lines of 10 px
    for y in grid_rows:
        line = 0 if y < grid_rows[10] else 1
        cols = np.flatnonzero(pic.pixels[y, MARGIN : MARGIN + 256] == DARK) // 2 + line * 128
        assert sorted(set(cols.tolist())) == [u for u in dead if u // 128 == line]


def test_probe_dead_units_are_dark_columns_and_label_groups_are_separated():
    rng = np.random.default_rng(1)
    m = rng.uniform(0.2, 1.0, size=(36, 20))
    m[:, [3, 11]] = 0.0
    labels = ["class 0"] * 14 + ["class 1"] * 14 + ["class 2"] * 8
    pic = render_probe("dense0.relu", m, 40, labels)
    grid = pic.pixels < 248
    cols = np.flatnonzero(grid.sum(axis=0) >= 36)  # columns of the heatmap
    rows = np.flatnonzero(grid[:, cols].all(axis=1))
    assert len(rows) == 36 * (len(rows) // 36) and len(cols) % 20 == 0  # whole cells
    cell = len(cols) // 20
    heat = pic.pixels[np.ix_(rows, cols)]
    dark_units = sorted({int(c) // cell for c in np.flatnonzero((heat == DARK).all(axis=0))})
    assert dark_units == [3, 11]
    gaps = np.flatnonzero(np.diff(rows) > 1)
    assert len(gaps) == 2  # one white row between class 0, 1 and 2
