"""One run's data -> :class:`RunReport`: layers in forward order, their series, alert episodes.

Kind and units: the monitor records each layer's kind and unit count in the text tag
``activation_layers`` (``layer | kind | units`` lines, once per layer). Runs written before it did
have them inferred: ``units`` from the alert messages (which count units; empty when no alert
mentions them), the kind from the tags written for the layer:
``relu`` (has a dead fraction: the ReLU family), ``relu6`` (dead and saturated fractions),
``bounded`` (a saturated fraction: tanh, sigmoid, hardtanh, ...; the exact name when a
``saturated`` alert names it), ``relu-like`` (a firing rate but no dead fraction: LeakyReLU,
GELU, SiLU, ...), ``activation`` (a dormant fraction only), ``block`` (none of these: a stack
block's output or another included module). When the layer's name ends in a functional
activation's name consistent with that (``dense0.relu``, ``layers.0.linear1.gelu``), that name
is the kind.

Layers are in forward order: the order in which the layers' scalars appear in the run's first
sampled step; layers that appear later are appended in order of appearance. Alerts about no
layer (``(parameters)``: the total gradient norm) are kept apart (``other_alerts``).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.report.config import parse as parse_config
from monitor.report.reading import SERIES, Image, RunData

# The built-in detectors' names, as `monitor.detectors.BUILTIN_NAMES` (a test keeps the two equal):
# spelled out here because the report reads runs without importing PyTorch.
BUILTIN_KINDS = (
    "dead", "saturated", "dormant", "exploding", "nonfinite", "vanishing_gradient", "exploding_gradient",
    "collapse", "attention_entropy", "attention_sink", "gate_saturated", "hidden_saturated",
)
_FUNCTIONAL = {  # functional activation names -> the family the tags would show
    "relu": "relu",
    "relu6": "relu6",
    **dict.fromkeys(
        ("leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "softplus", "hardswish"), "relu-like"
    ),
    **dict.fromkeys(("tanh", "sigmoid", "hardsigmoid", "softsign", "hardtanh"), "bounded"),
}
_ALERT_LINE = re.compile(r"^(ALERT|RECOVERED) (step (-?\d+) \| (.*?) \| (.*))$")
_RECOVERED_FROM = re.compile(r"^recovered from ([\w.-]+):")
_UNITS = re.compile(r"\b\d+/(\d+) units\b|\bof (\d+) units\b")
_BOUND_OF = re.compile(r"sit at a bound of (\S+) on")


@dataclass
class LoggedAlert:
    """One alert line of the Text tab."""

    step: int
    layer: str
    kind: str
    recovered: bool
    message: str  # the line without its ALERT / RECOVERED prefix

    @property
    def line(self) -> str:
        return ("RECOVERED " if self.recovered else "ALERT ") + self.message


@dataclass
class Episode:
    kind: str
    step: int
    recovered_step: int | None = None


@dataclass
class Series:
    steps: np.ndarray
    values: np.ndarray

    @property
    def first(self) -> float:
        return float(self.values[0])

    @property
    def last(self) -> float:
        return float(self.values[-1])

    def worst(self) -> tuple[float, int]:
        v = np.where(np.isnan(self.values), -np.inf, self.values)
        i = int(np.argmax(v))
        return float(self.values[i]), int(self.steps[i])

    def extrema(self) -> tuple[float, float]:
        finite = self.values[np.isfinite(self.values)]
        if not finite.size:
            return math.nan, math.nan
        return float(finite.min()), float(finite.max())


@dataclass
class LayerReport:
    name: str
    kind: str
    units: int | None
    series: dict[str, Series]
    alerts: list[Episode]


@dataclass
class RunReport:
    run: str
    files: list[str]
    sampled_steps: list[int]
    layers: list[LayerReport]
    other_alerts: dict[str, list[Episode]]  # alert subjects that are no layer, e.g. "(parameters)"
    alerts: list[LoggedAlert]
    notes: list[str]
    images: dict[str, Image] = field(default_factory=dict)  # tag -> latest image (read for the HTML page only)
    config: dict[str, Any] | None = None  # the run_config object (monitor.report.config), None without one
    config_differs: list[str] = field(default_factory=list)  # keys that tell it from the runs of its group

    @property
    def active(self) -> list[tuple[str, Episode]]:
        out = [(lay.name, e) for lay in self.layers for e in lay.alerts if e.recovered_step is None]
        out += [(n, e) for n, eps in self.other_alerts.items() for e in eps if e.recovered_step is None]
        return sorted(out, key=lambda t: t[1].step)

    def alerts_by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for a in self.alerts:
            if not a.recovered:
                out.setdefault(a.kind, {"fired": 0, "active": 0})["fired"] += 1
        for _, e in self.active:
            out.setdefault(e.kind, {"fired": 0, "active": 0})["active"] += 1
        return out


def norm_kind(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


BUILTIN_BY_NORM = {norm_kind(k): k for k in BUILTIN_KINDS}


def parse_alert(line: str) -> LoggedAlert | None:
    """``ALERT step 10 | relu2 | dead: ...`` -> :class:`LoggedAlert` (None: not an alert line)."""
    m = _ALERT_LINE.match(line)
    if m is None:
        return None
    head, message, step, layer, rest = m.groups()
    recovered = head == "RECOVERED"
    r = _RECOVERED_FROM.match(rest)
    if recovered and r is not None:
        kind = r.group(1)  # the detector's own name
    else:
        what = rest.split(":", 1)[0].strip()
        kind = BUILTIN_BY_NORM.get(norm_kind(what), re.sub(r"[\s-]+", "_", what))
    return LoggedAlert(int(step), layer, kind, recovered, message)


def _merge(chunks: list[tuple[list[int], np.ndarray]]) -> Series:
    steps = np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in chunks])
    values = np.concatenate([v for _, v in chunks])
    if steps.size > 1 and np.any(np.diff(steps) <= 0):  # several layouts or files: in step order
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        keep = np.append(steps[1:] != steps[:-1], True)  # a step written twice: its last value
        steps, values = steps[keep], values[keep]
    return Series(steps, values)


def _family(prefixes: set[str]) -> str:
    dead = "activation_dead_fraction" in prefixes
    sat = "activation_saturated_fraction" in prefixes
    if dead and sat:
        return "relu6"
    if dead:
        return "relu"
    if sat:
        return "bounded"
    if "activation_firing_rate" in prefixes:
        return "relu-like"
    if "activation_dormant_fraction" in prefixes:
        return "activation"
    return "block"


def _kind(name: str, prefixes: set[str], messages: list[str]) -> str:
    family = _family(prefixes)
    if family == "bounded":
        for msg in messages:
            m = _BOUND_OF.search(msg)
            if m:
                return m.group(1)
    base = name.rsplit(".", 1)[-1].split("#", 1)[0]
    if _FUNCTIONAL.get(base) == family:
        return base
    return family


def summarise(run_dir: str, files: list[str], data: RunData) -> RunReport:
    alerts = [a for a in map(parse_alert, data.alert_lines) if a is not None]
    episodes: dict[str, list[Episode]] = {}
    messages: dict[str, list[str]] = {}
    units: dict[str, int] = {}
    for a in alerts:
        eps = episodes.setdefault(a.layer, [])
        messages.setdefault(a.layer, []).append(a.message)
        m = _UNITS.search(a.message)
        if m and a.layer not in units:
            units[a.layer] = int(m.group(1) or m.group(2))
        open_ = next((e for e in eps if e.kind == a.kind and e.recovered_step is None), None)
        if not a.recovered:
            if open_ is None:  # a second ALERT while active (e.g. after a resume) is the same episode
                eps.append(Episode(a.kind, a.step))
        elif open_ is not None:
            open_.recovered_step = a.step
    layers = []
    for name, prefixes in data.layers.items():
        if "activation_rms" not in prefixes:
            continue
        series = {s: _merge(data.series[(name, s)]) for s in SERIES.values() if (name, s) in data.series}
        kind, n_units = data.described.get(name, (None, None))
        if kind is None:  # runs written before the monitor recorded it: inferred
            kind, n_units = _kind(name, prefixes, messages.get(name, [])), units.get(name)
        layers.append(LayerReport(name, kind, n_units, series, episodes.pop(name, [])))
    sampled = sorted(set(data.sampled))
    config, notes = parse_config(data.config_texts, run_dir)
    images = dict(data.images or {})
    return RunReport(run_dir, list(files), sampled, layers, episodes, alerts, data.notes + notes, images, config)


def trend(values: np.ndarray, points: int) -> list[float]:
    """The mean of each of up to ``points`` equal slices (NaN/inf when a slice holds one)."""
    v = np.asarray(values, dtype=np.float64)
    n = min(points, v.size)
    if n == 0:
        return []
    edges = np.linspace(0, v.size, n + 1).round().astype(np.int64)
    out = []
    for a, b in itertools.pairwise(edges):
        seg = v[a:b]
        bad = seg[~np.isfinite(seg)]
        out.append(float(bad[0]) if bad.size else float(seg.mean()))
    return out
