"""``--html FILE``: the report as one self-contained web page.

One file, readable without JavaScript and without a network: inline CSS, the monitor's images
embedded as ``data:`` URIs, plots drawn as inline SVG (:mod:`monitor.report.svgplot`), no script,
no external font, and a Content-Security-Policy that forbids the browser to load anything else.
Per run (one section each, listed in a table of contents at the top):

- the run line (as in the terminal) and, when the run recorded one, its configuration;
- the layer table: the terminal table's content (kind, units, dead / saturated fraction first,
  worst and last, RMS first, trend and last, gradient RMS first -> last, alerts), each layer
  linked to its plots;
- the alert lines, as logged;
- the latest image of each of the monitor's image tags: the scan (``activation_scan``), the
  gradient flow (``gradient_flow``), any other ``activation_`` /
  ``gradient_`` image; each layer's timeline (``activation_timeline/<layer>``) and probe heatmap
  (``activation_probe/<layer>``) sit with its plots;
- per layer, small plots over the sampled steps: dead / saturated fraction (0-100%), RMS and
  gradient RMS (log scale), with the layer's alerts shaded from their step to their recovery.
"""

from __future__ import annotations

import base64
from html import escape

from monitor.report import compare as cmp
from monitor.report.compare import Comparison
from monitor.report.config import value_text
from monitor.report.formatting import episodes_text, num, pct, run_label, run_line, run_summary
from monitor.report.reading import Image
from monitor.report.summary import LayerReport, RunReport, trend
from monitor.report.svgplot import COLOURS, Band, Line, Plot, render, spark

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
LAYER_IMAGES = {"activation_timeline/": "timeline", "activation_probe/": "probe"}  # shown with their layer
_FIRST_IMAGES = ("activation_scan", "gradient_flow")

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 1.2em 2em; color: #222; background: #fafafa; }
h1 { font-size: 1.5em; margin: 0 0 .3em; } h2 { font-size: 1.25em; margin: 1.6em 0 .3em; word-break: break-all; }
h3 { font-size: 1.05em; margin: 1.2em 0 .2em; } h4 { font-size: .95em; margin: 1em 0 .3em; color: #444; }
section.run { border-top: 2px solid #ccc; margin-top: 1.5em; }
.runline { font-family: ui-monospace, "DejaVu Sans Mono", monospace; background: #fff; padding: .3em .5em;
           border: 1px solid #ddd; word-break: break-all; }
table { border-collapse: collapse; background: #fff; margin: .4em 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: middle; }
th { background: #f0f0f0; font-weight: 600; }
td.num { text-align: right; font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: nowrap; }
tr.active td.name, tr.active td.alerts, .bad { color: #b00; font-weight: 600; }
li.alert { color: #b00; }
tr.recovered td.alerts { color: #a60; }
td.health.bad, td.diff { color: #b00; } td.diff { font-weight: 600; }
ul.alerts { list-style: none; padding-left: 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
            font-size: 12.5px; white-space: pre-wrap; word-break: break-word; }
li.recovered { color: #176b17; }
.muted, .legend { color: #777; font-size: .9em; }
.notes li { color: #a60; }
figure { display: inline-block; margin: .3em 1em .8em 0; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; background: #fff; }
figcaption { font-size: .85em; color: #555; }
.layer { border-top: 1px dotted #ccc; }
.plots { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: flex-start; }
.stack { display: flex; flex-direction: column; gap: 4px; }
.plots figure { margin: 0; } .plots figure img { max-height: 400px; width: auto; }
svg.plot { background: #fff; font: 10px system-ui, "DejaVu Sans", sans-serif; fill: #333; overflow: visible; }
svg.plot .ptitle { font-weight: 600; } svg.plot .note { fill: #888; font-style: italic; }
svg.spark { vertical-align: middle; }
nav ol { padding-left: 1.4em; } nav li { margin: .15em 0; }
.badge { display: inline-block; padding: 0 .45em; border-radius: .6em; font-size: .85em; color: #fff; background: #2a7; }
.badge.bad { background: #c33; color: #fff; } .badge.warn { background: #d80; }
table.config td { font-family: ui-monospace, "DejaVu Sans Mono", monospace; word-break: break-all; }
table.config th { font-weight: normal; background: #f6f6f6; } table.config tr.differs th, table.config tr.differs td { font-weight: 700; }
details summary { cursor: default; color: #444; margin-top: .4em; }
"""


def _mime(png: bytes) -> str:
    if png.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if png.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return "image/png"


def image_tag(img: Image, caption: str | None = None) -> str:
    data = base64.b64encode(img.png).decode("ascii")
    size = f' width="{img.width}" height="{img.height}"' if img.width > 0 and img.height > 0 else ""
    alt = f"{img.tag} at step {img.step}"
    cap = escape(caption or img.tag) + f' <span class="muted">(step {img.step})</span>'
    return (
        f'<figure class="image" data-tag="{escape(img.tag)}"><img alt="{escape(alt)}"{size} '
        f'src="data:{_mime(img.png)};base64,{data}"><figcaption>{cap}</figcaption></figure>'
    )


def _badge(rep: RunReport) -> str:
    active = len(rep.active)
    if active:
        return f'<span class="badge bad">{active} active alert{"s" if active != 1 else ""}</span>'
    if rep.alerts:
        return '<span class="badge warn">recovered</span>'
    return '<span class="badge">no alerts</span>'


def render_page(
    reports: list[RunReport], comparison: Comparison | None = None, title: str = "activation-monitor report"
) -> str:
    """The whole page for ``reports`` (one section per run, a table of contents first); with
    ``comparison`` (``--compare``), the two runs side by side first."""
    toc = "".join(
        f'<li><a href="#run-{i}">{escape(run_label(rep))}</a> {_badge(rep)}<br><span class="muted">'
        f"{escape(run_summary(rep))}</span></li>"
        for i, rep in enumerate(reports, 1)
    )
    body = "".join(run_section(i, rep) for i, rep in enumerate(reports, 1))
    if comparison is not None:
        toc = f'<li><a href="#compare">A vs B, layer by layer</a></li>{toc}'
        body = compare_section(comparison) + body
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>"
        f"<h1>{escape(title)}</h1>"
        f'<nav><h2 id="runs">{len(reports)} run{"s" if len(reports) != 1 else ""}</h2><ol>{toc}</ol></nav>\n'
        f"{body}"
        '<p class="muted">Written by <code>python -m monitor report --html</code>: one file, no script, '
        "no network (images and plots are inside it).</p>"
        "</body></html>\n"
    )


def run_section(i: int, rep: RunReport) -> str:
    parts = [
        f'<section class="run" id="run-{i}"><h2>{escape(run_label(rep))} {_badge(rep)}</h2>',
        f'<p class="runline">{escape(run_line(rep))}</p>',
    ]
    if rep.config:
        parts.append(_config_table(rep))
    if rep.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in rep.notes) + "</ul>")
    if not rep.sampled_steps:
        parts.append('<p class="muted">no sampled steps in these files</p>')
    if rep.layers or rep.other_alerts:
        parts.append(_table(i, rep))
    if rep.alerts:
        items = "".join(
            f'<li class="{"recovered" if a.recovered else "alert"}">{escape(a.line)}</li>' for a in rep.alerts
        )
        parts.append(f'<h3>Alerts, as logged</h3><ul class="alerts">{items}</ul>')
    with_layers = {prefix + lay.name for lay in rep.layers for prefix in LAYER_IMAGES}
    shown = [t for t in _FIRST_IMAGES if t in rep.images]
    shown += sorted(t for t in rep.images if t not in shown and t not in with_layers)
    if shown:
        parts.append("<h3>Images (the latest of each)</h3><div>")
        parts += [image_tag(rep.images[t]) for t in shown]
        parts.append("</div>")
    if rep.layers and rep.sampled_steps:
        parts.append("<h3>Layers over the run</h3>")
        parts += [_layer(i, j, lay, rep) for j, lay in enumerate(rep.layers, 1)]
    parts.append("</section>\n")
    return "".join(parts)


def _config_table(rep: RunReport) -> str:
    """The run's configuration, key by key; the keys that tell it from the other runs of its group in bold."""
    assert rep.config is not None
    rows = "".join(
        f'<tr class="{"differs" if k in rep.config_differs else ""}"><th>{escape(k)}</th>'
        f"<td>{escape(value_text(v))}</td></tr>"
        for k, v in rep.config.items()
    )
    return f'<details open><summary>configuration</summary><table class="config">{rows}</table></details>'


def _table(i: int, rep: RunReport) -> str:
    has_units = any(lay.units is not None for lay in rep.layers)
    has_health = any("dead_fraction" in lay.series or "saturated_fraction" in lay.series for lay in rep.layers)
    has_grad = any("grad_rms" in lay.series for lay in rep.layers)
    head = ["layer", "kind"] + (["units"] if has_units else [])
    head += (["dead/sat first worst last"] if has_health else []) + ["RMS first", "trend", "RMS last"]
    head += (["grad RMS first→last"] if has_grad else []) + ["alerts"]
    rows = []
    for j, lay in enumerate(rep.layers, 1):
        active = any(e.recovered_step is None for e in lay.alerts)
        cls = "active" if active else "recovered" if lay.alerts else ""
        cells = [
            f'<td class="name"><a href="#run-{i}-layer-{j}">{escape(lay.name)}</a></td>',
            f"<td>{escape(lay.kind)}</td>",
        ]
        if has_units:
            cells.append(f'<td class="num">{"" if lay.units is None else lay.units}</td>')
        if has_health:
            health, bad = [], False
            for key, label in (("dead_fraction", "dead"), ("saturated_fraction", "sat")):
                s = lay.series.get(key)
                if s is not None:
                    worst, _ = s.worst()
                    health.append(f"{label} {pct(s.first)} {pct(worst)} {pct(s.last)}")
                    bad = bad or s.last >= 0.5
            cells.append(f'<td class="num health{" bad" if bad else ""}">{escape("; ".join(health))}</td>')
        rms = lay.series["rms"]
        cells.append(f'<td class="num">{num(rms.first)}</td>')
        cells.append(f"<td>{spark(trend(rms.values, 40))}</td>")
        cells.append(f'<td class="num">{num(rms.last)}</td>')
        if has_grad:
            g = lay.series.get("grad_rms")
            cells.append(f'<td class="num">{f"{num(g.first)} → {num(g.last)}" if g is not None else ""}</td>')
        cells.append(f'<td class="alerts">{escape(episodes_text(lay.alerts))}</td>')
        rows.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    for name, eps in rep.other_alerts.items():
        active = any(e.recovered_step is None for e in eps)
        empty = "<td></td>" * (len(head) - 2)
        rows.append(
            f'<tr class="{"active" if active else "recovered"}"><td class="name">{escape(name)}</td>{empty}'
            f'<td class="alerts">{escape(episodes_text(eps))}</td></tr>'
        )
    legend = ""
    if any(lay.alerts for lay in rep.layers) or rep.other_alerts:
        legend = '<p class="legend">kind@STEP: still active at the end; kind@STEP-STEP2: recovered at STEP2</p>'
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f'<table class="layers"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>{legend}'


def _layer(i: int, j: int, lay: LayerReport, rep: RunReport) -> str:
    steps = (rep.sampled_steps[0], rep.sampled_steps[-1])
    bands = [Band(e.kind, e.step, e.recovered_step) for e in lay.alerts]
    plots = []
    fractions = [
        Line(label, lay.series[key].steps, lay.series[key].values, COLOURS[label])
        for key, label in (("dead_fraction", "dead"), ("saturated_fraction", "saturated"))
        if key in lay.series
    ]
    if fractions:
        title = " / ".join(ln.label for ln in fractions) + " fraction"
        plots.append(Plot(title, fractions, steps, fraction=True, bands=bands))
    rms = lay.series["rms"]
    plots.append(
        Plot("RMS (log scale)", [Line("RMS", rms.steps, rms.values, COLOURS["rms"])], steps, log=True, bands=bands)
    )
    g = lay.series.get("grad_rms")
    if g is not None:
        plots.append(
            Plot(
                "gradient RMS (log scale)",
                [Line("grad RMS", g.steps, g.values, COLOURS["grad"])],
                steps,
                log=True,
                bands=bands,
            )
        )
    meta = [lay.kind] + ([f"{lay.units} units"] if lay.units is not None else [])
    if lay.alerts:
        meta.append("alerts: " + episodes_text(lay.alerts))
    pics = ['<div class="stack">' + "".join(render(p) for p in plots) + "</div>"]
    for prefix, caption in LAYER_IMAGES.items():
        img = rep.images.get(prefix + lay.name)
        if img is not None:
            pics.append(image_tag(img, caption))
    active = any(e.recovered_step is None for e in lay.alerts)
    return (
        f'<div class="layer" id="run-{i}-layer-{j}"><h4><span{" class=bad" if active else ""}>{escape(lay.name)}</span> '
        f'<span class="muted">{escape(" · ".join(meta))}</span></h4><div class="plots">{"".join(pics)}</div></div>'
    )


def compare_section(c: Comparison) -> str:
    """``--compare``: the two run lines and the side-by-side table, differences marked (class ``diff``)."""
    all_cells = [cmp.cells(r) for r in c.rows]
    keep = cmp.visible(all_cells)
    rows = []
    for r, row in zip(c.rows, all_cells):
        tds = "".join(
            f'<td class="{"diff" if marked else ""}">{escape(text)}{" *" if marked and text else ""}</td>'
            for text, marked in (row[i] for i in keep)
        )
        rows.append(f'<tr class="{"differs" if r.differences else ""}">{tds}</tr>')
    th = "".join(f"<th>{escape(cmp.HEAD[i])}</th>" for i in keep)
    lines = cmp.header_lines(c)
    head = "".join(f'<p class="runline">{escape(line)}</p>' for line in lines[:2])
    head += "".join(f"<p>{escape(line)}</p>" for line in lines[2:])
    return (
        f'<section class="run" id="compare"><h2>A vs B, layer by layer</h2>{head}'
        f'<table class="compare"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        f'<p class="legend">{escape(cmp.legend())}</p>'
        '<p class="muted">A is the first run below, B the second.</p></section>\n'
    )
