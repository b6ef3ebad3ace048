"""``--compare RUN_A RUN_B``: two runs side by side, layer by layer (before / after a fix).

Layers are matched by name. Only when the two runs have no layer name in common and the same
number of layers (a renamed model) are they matched by position in forward order, and the report
says so; otherwise a layer of one run only is listed as such. Per layer, for each run: the dead /
saturated fraction (worst and last), the last RMS, the last gradient RMS and the alerts. A
difference that matters is marked:

- ``alerts``: an alert kind fired in one run's layer but not in the other's, or is still active at
  the end of one run only (``dead@0`` against ``dead@0-6``);
- ``dead_fraction`` / ``saturated_fraction``: the worst or the last value moved by more than
  :data:`FRACTION_CHANGE` (absolute: 0.1, i.e. 10 points);
- ``rms`` / ``grad_rms``: the last value changed by more than :data:`RMS_FACTOR` (10x) either way,
  or is 0 or NaN/Inf in one run only;
- ``kind``: the layer's kind differs; ``only_a`` / ``only_b``: the layer is in one run only.

Alerts about no layer (``(parameters)``) are compared the same way, by subject.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from monitor.report.config import MISSING, value_text
from monitor.report.config import differences as config_differences
from monitor.report.formatting import episodes_text, num, pct, run_line
from monitor.report.jsonout import jf, run_json
from monitor.report.summary import Episode, LayerReport, RunReport

FRACTION_CHANGE = 0.1
RMS_FACTOR = 10.0
_FRACTIONS = (("dead_fraction", "dead"), ("saturated_fraction", "sat"))


@dataclass
class Side:
    """One run's numbers for one layer."""

    kind: str | None
    fractions: dict[str, tuple[float, float]]  # "dead_fraction" -> (worst, last), when the layer has it
    rms_last: float | None
    grad_rms_last: float | None
    alerts: list[Episode]

    @classmethod
    def of(cls, lay: LayerReport) -> Side:
        fractions = {k: (lay.series[k].worst()[0], lay.series[k].last) for k, _ in _FRACTIONS if k in lay.series}
        g = lay.series.get("grad_rms")
        return cls(lay.kind, fractions, lay.series["rms"].last, None if g is None else g.last, list(lay.alerts))


@dataclass
class Row:
    name: str  # the layer's name in run A (in run B when only there)
    name_b: str | None  # run B's name when matched by position and different
    a: Side | None
    b: Side | None
    differences: list[str] = field(default_factory=list)
    layer: bool = True  # False: an alert subject that is no layer, e.g. "(parameters)"


@dataclass
class Comparison:
    a: RunReport
    b: RunReport
    matched_by: str  # "name" or "position"
    rows: list[Row]

    @property
    def differing(self) -> list[Row]:
        return [r for r in self.rows if r.differences]


def rms_changed(a: float | None, b: float | None) -> bool:
    """More than :data:`RMS_FACTOR` apart, or 0 / non-finite in one of the two only."""
    if a is None or b is None:
        return False
    fa, fb = math.isfinite(a), math.isfinite(b)
    if not (fa and fb):
        return fa != fb or (math.isinf(a) != math.isinf(b))
    a, b = abs(a), abs(b)
    if a == 0 or b == 0:
        return a != b
    return max(a, b) / min(a, b) > RMS_FACTOR


def _kinds(eps: list[Episode]) -> tuple[set[str], set[str]]:
    """(kinds fired, kinds still active at the end)."""
    return {e.kind for e in eps}, {e.kind for e in eps if e.recovered_step is None}


def _moved(x: tuple[float, float] | None, y: tuple[float, float] | None, i: int) -> bool:
    return x is not None and y is not None and abs(x[i] - y[i]) > FRACTION_CHANGE


def _differences(a: Side | None, b: Side | None) -> list[str]:
    if a is None or b is None:
        return ["only_a" if b is None else "only_b"]
    out = []
    if a.kind != b.kind:
        out.append("kind")
    if _kinds(a.alerts) != _kinds(b.alerts):
        out.append("alerts")
    for key, _ in _FRACTIONS:
        fa, fb = a.fractions.get(key), b.fractions.get(key)
        if _moved(fa, fb, 0) or _moved(fa, fb, 1):
            out.append(key)
    if rms_changed(a.rms_last, b.rms_last):
        out.append("rms")
    if rms_changed(a.grad_rms_last, b.grad_rms_last):
        out.append("grad_rms")
    return out


def compare(a: RunReport, b: RunReport) -> Comparison:
    names_a, names_b = [lay.name for lay in a.layers], [lay.name for lay in b.layers]
    by_position = bool(names_a) and len(names_a) == len(names_b) and not set(names_a) & set(names_b)
    rows: list[Row] = []
    if by_position:
        for la, lb in zip(a.layers, b.layers):
            rows.append(Row(la.name, lb.name, Side.of(la), Side.of(lb)))
    else:
        in_b = {lay.name: lay for lay in b.layers}
        for la in a.layers:
            lb = in_b.pop(la.name, None)
            rows.append(Row(la.name, None, Side.of(la), None if lb is None else Side.of(lb)))
        rows += [Row(lb.name, None, None, Side.of(lb)) for lb in in_b.values()]  # B's own, in its forward order
    for subject in list(a.other_alerts) + [s for s in b.other_alerts if s not in a.other_alerts]:
        ea, eb = a.other_alerts.get(subject), b.other_alerts.get(subject)
        rows.append(
            Row(subject, None, Side(None, {}, None, None, ea or []), Side(None, {}, None, None, eb or []), layer=False)
        )
    for r in rows:
        r.differences = _differences(r.a, r.b)
    return Comparison(a, b, "position" if by_position else "name", rows)


# -- JSON -----------------------------------------------------------------------------------------
def _side_json(s: Side | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "kind": s.kind,
        **{
            k: (None if k not in s.fractions else {"worst": jf(s.fractions[k][0]), "last": jf(s.fractions[k][1])})
            for k, _ in _FRACTIONS
        },
        "rms_last": jf(s.rms_last),
        "grad_rms_last": jf(s.grad_rms_last),
        "alerts": [{"kind": e.kind, "step": e.step, "recovered_step": e.recovered_step} for e in s.alerts],
    }


def _where(x: Any, y: Any) -> str:
    return "a" if y is MISSING else "b" if x is MISSING else "both"


def comparison_json(c: Comparison) -> dict[str, Any]:
    """The ``"compare"`` object of ``--json`` (see :mod:`monitor.report.jsonout`)."""
    return {
        "a": run_json(c.a),
        "b": run_json(c.b),
        "config_differences": [
            {"key": k, "a": None if x is MISSING else x, "b": None if y is MISSING else y, "in": _where(x, y)}
            for k, x, y in config_differences(c.a.config, c.b.config)
        ],
        "matched_by": c.matched_by,
        "thresholds": {"fraction_change": FRACTION_CHANGE, "rms_factor": RMS_FACTOR},
        "layers": [
            {
                "name": r.name,
                "name_b": r.name_b,
                "a": _side_json(r.a),
                "b": _side_json(r.b),
                "differences": r.differences,
            }
            for r in c.rows
        ],
        "differing": [r.name for r in c.differing],
    }


# -- cells, shared by the terminal and the HTML page ----------------------------------------------
HEAD = [
    "layer",
    "kind",
    "dead/sat worst A → B",
    "last A → B",
    "RMS last A → B",
    "grad RMS last A → B",
    "alerts A",
    "alerts B",
]


def visible(rows: list[list[tuple[str, bool]]]) -> list[int]:
    """The columns of :data:`HEAD` to show: layer, kind and both alert columns always, the others when not empty."""
    return [i for i in range(len(HEAD)) if i < 2 or i >= 6 or any(row[i][0] for row in rows)]


def cells(r: Row, arrow: str = "→") -> list[tuple[str, bool]]:
    """``[(text, marked)]`` for the columns of :data:`HEAD`."""
    d = set(r.differences)
    a, b = r.a, r.b
    name = r.name if r.name_b is None else f"{r.name} {arrow} {r.name_b}"
    if a is None or b is None:
        side = a if b is None else b
        assert side is not None
        alerts = (episodes_text(side.alerts), bool(side.alerts))
        return [
            (name, True),
            (side.kind or "", False),
            ("only in A" if b is None else "only in B", True),
            ("", False),
            ("", False),
            ("", False),
            alerts if b is None else ("", False),
            alerts if a is None else ("", False),
        ]

    def fraction(f: tuple[float, float] | None, i: int) -> str:
        return "-" if f is None else pct(f[i])

    def pair(x: float | None, y: float | None) -> str:
        if x is None and y is None:
            return ""
        return f"{'-' if x is None else num(x)} {arrow} {'-' if y is None else num(y)}"

    worst, last = [], []
    moved = [False, False]
    for key, label in _FRACTIONS:
        fa, fb = a.fractions.get(key), b.fractions.get(key)
        if fa is not None or fb is not None:
            worst.append(f"{label} {fraction(fa, 0)} {arrow} {fraction(fb, 0)}")
            last.append(f"{fraction(fa, 1)} {arrow} {fraction(fb, 1)}")
            moved = [moved[i] or _moved(fa, fb, i) for i in (0, 1)]
    return [
        (name, bool(d)),
        (a.kind or "" if a.kind == b.kind else f"{a.kind} {arrow} {b.kind}", "kind" in d),
        ("; ".join(worst), moved[0]),
        ("; ".join(last), moved[1]),
        (pair(a.rms_last, b.rms_last), "rms" in d),
        (pair(a.grad_rms_last, b.grad_rms_last), "grad_rms" in d),
        (episodes_text(a.alerts), "alerts" in d and bool(a.alerts)),
        (episodes_text(b.alerts), "alerts" in d and bool(b.alerts)),
    ]


def legend() -> str:
    return (
        f"* differs: alerts (fired / active at end), dead/sat by > {FRACTION_CHANGE:g}, "
        f"RMS by > {RMS_FACTOR:g}x, layer in one run only"
    )


def _value(v: Any) -> str:
    return "(none)" if v is MISSING else value_text(v)


def header_lines(c: Comparison, arrow: str = "→") -> list[str]:
    """The run lines of A and B, the configuration keys that differ (when both have one), how layers were matched."""
    lines = [f"A  {run_line(c.a)}", f"B  {run_line(c.b)}"]
    changed = config_differences(c.a.config, c.b.config)
    if changed:
        lines.append("config: " + "; ".join(f"{k} {_value(x)} {arrow} {_value(y)}" for k, x, y in changed))
    only_a = sum(1 for r in c.rows if r.b is None)
    only_b = sum(1 for r in c.rows if r.a is None)
    matched = sum(1 for r in c.rows if r.layer and r.a is not None and r.b is not None)
    how = (
        "by position (no layer name in common, the same number of layers)" if c.matched_by == "position" else "by name"
    )
    lines.append(f"{matched} layers matched {how}; only in A: {only_a}, only in B: {only_b}; {len(c.differing)} differ")
    return lines
