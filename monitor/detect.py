"""Detectors: decide whether a layer is dead, saturated, exploding or non-finite.

Deciding is separate from acting. :class:`LayerState` keeps a layer's memory (a window of recent
sampled steps, an RMS baseline, which alerts are active) and :meth:`LayerState.update` returns
:class:`LayerHealth` plus the :class:`Alert` records for state changes. Logging, raising and
stopping happen elsewhere.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from monitor.activations import Kind
from monitor.stats import UnitSummary, safe_rms

AlertKind = Literal["dead", "saturated", "exploding", "nonfinite"]
ALERT_KINDS: tuple[AlertKind, ...] = ("dead", "saturated", "exploding", "nonfinite")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}.")


def _fraction(name: str, value: Any, *, open_low: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if not ok or (not open_low and value == 0):
        raise ValueError(f"Expected `{name}` to be a number in (0, 1], got {value!r}.")


def _positive(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
    if not ok:
        raise ValueError(f"Expected `{name}` to be a positive finite number, got {value!r}.")


@dataclass(frozen=True)
class Thresholds:
    """When a layer counts as unhealthy. Defaults: silent on healthy runs, loud on clear pathologies.

    Attributes:
        min_positions: values per unit that a dead/saturated verdict needs. A unit is judged over
            the most recent sampled steps that together hold at least this many values: one step
            when the batch is large enough (so a clear pathology alerts at its first sampled step),
            more when batches are small.
        window: the most sampled steps a verdict may look back over.
        dead_fraction: alert when at least this fraction of a ReLU layer's units are dead.
        saturation_tolerance: fraction of the output range that counts as "at the bound"
            (0.01 on tanh: |y| >= 0.98; on sigmoid: y <= 0.01 or y >= 0.99).
        saturated_positions: a unit is saturated when at a bound on at least this fraction of
            its values over the window.
        saturated_fraction: alert when at least this fraction of a bounded layer's units saturate.
        max_rms, max_abs: absolute bounds on a layer's RMS and largest magnitude.
        growth_factor: alert when a layer's RMS exceeds this multiple of its own baseline
            (the median RMS of its first ``baseline_samples`` sampled steps).
        recovery_samples: consecutive healthy sampled steps before a "recovered" alert.

    Example:
        >>> Thresholds(dead_fraction=0.25, window=10).dead_fraction
        0.25
    """

    min_positions: int = 100
    window: int = 5
    dead_fraction: float = 0.5
    saturation_tolerance: float = 0.01
    saturated_positions: float = 0.95
    saturated_fraction: float = 0.5
    max_rms: float = 1e3
    max_abs: float = 1e4
    growth_factor: float = 100.0
    baseline_samples: int = 3
    recovery_samples: int = 2

    def __post_init__(self) -> None:
        for name in ("min_positions", "window", "baseline_samples", "recovery_samples"):
            _positive_int(name, getattr(self, name))
        for name in ("dead_fraction", "saturated_positions", "saturated_fraction"):
            _fraction(name, getattr(self, name))
        ok = isinstance(self.saturation_tolerance, (int, float)) and 0 <= self.saturation_tolerance < 0.5
        if not ok:
            raise ValueError(
                f"Expected `saturation_tolerance` to be a number in [0, 0.5), got {self.saturation_tolerance!r}."
            )
        for name in ("max_rms", "max_abs", "growth_factor"):
            _positive(name, getattr(self, name))
        if self.growth_factor <= 1:
            raise ValueError(f"Expected `growth_factor` to be greater than 1, got {self.growth_factor!r}.")


@dataclass(frozen=True)
class Alert:
    """A layer entered (or, with ``recovered=True``, left) an unhealthy state.

    ``value`` is the measured number and ``threshold`` the bound it crossed; ``message`` is one
    readable line with the likely causes and what to try.
    """

    step: int
    layer: str
    kind: AlertKind
    value: float
    threshold: float
    message: str
    recovered: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerHealth:
    """A layer's health at its latest sampled step. Fractions are None where they do not apply."""

    layer: str
    kind: str
    units: int
    step: int
    dead_fraction: float | None
    saturated_fraction: float | None
    firing_rate: float | None  # mean fraction of values > 0 (ReLU-like kinds)
    rms: float
    max_abs: float
    nonfinite: int  # NaN/Inf values seen this sampled step
    dead_units: tuple[int, ...] = ()
    saturated_units: tuple[int, ...] = ()


_CAUSES: dict[str, str] = {
    "dead": (
        "likely a learning rate too high (one large update pushed weights/biases negative) or a "
        "negative bias init; try a lower LR or warm-up, He init with biases >= 0, LeakyReLU/GELU, "
        "or normalisation before the ReLU"
    ),
    "saturated": (
        "pre-activations are too large: weight init too large, unnormalised inputs or LR too high; "
        "try Xavier/Glorot init, normalising inputs, LayerNorm/BatchNorm before the nonlinearity, "
        "or a lower LR"
    ),
    "exploding": (
        "likely a learning rate too high, missing normalisation or gradient clipping, or fp16 "
        "overflow; try a lower LR or warm-up, torch.nn.utils.clip_grad_norm_, LayerNorm, bf16"
    ),
    "nonfinite": (
        "NaN/Inf: overflow (fp16), a learning rate too high, log/div of zero, or bad input data; "
        "try a lower LR, gradient clipping, bf16 instead of fp16, checking inputs with "
        "torch.isfinite, torch.autograd.set_detect_anomaly"
    ),
}


def _clean(a: np.ndarray | None, nan: float, total: float | None = None) -> np.ndarray | None:
    """Counts with NaN (a unit that saw NaN/Inf) replaced: such a unit is not "dead".

    ``total`` is ``a.sum()`` when the caller has it: a finite sum means there is no NaN to replace.
    """
    if a is None:
        return None
    if total is None:
        total = float(a.sum())
    if not math.isfinite(total):
        a = np.where(np.isnan(a), nan, a)
    return a


def _steps(n: int) -> str:
    return "sampled step" if n == 1 else f"{n} sampled steps"


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


@dataclass
class _Sample:
    positions: int
    fired: np.ndarray | None
    at_bound: np.ndarray | None


@dataclass
class LayerState:
    """Memory of one watched layer across sampled steps (bounded: ``window`` samples)."""

    name: str
    kind: Kind
    thresholds: Thresholds
    window: deque = field(default_factory=deque)
    baseline_values: list = field(default_factory=list)
    active: dict = field(default_factory=dict)  # alert kind -> consecutive healthy samples
    _baseline: float | None = None

    @property
    def baseline(self) -> float | None:
        if self._baseline is None and self.baseline_values:
            self._baseline = float(np.median(self.baseline_values))
        return self._baseline

    def _push(self, sample: _Sample) -> None:
        if self.window:
            ref = self.window[-1]
            if (ref.fired is None) != (sample.fired is None) or (
                sample.fired is not None and ref.fired is not None and ref.fired.shape != sample.fired.shape
            ):
                self.window.clear()  # the layer changed width: judge it afresh
        self.window.append(sample)
        while len(self.window) > self.thresholds.window:
            self.window.popleft()

    def _evidence(self, attr: str) -> tuple[np.ndarray | None, int, int]:
        """Sum of ``attr`` over the most recent samples holding >= min_positions values per unit.

        Returns (sums, values per unit, samples used); sums is None if the window holds too few.
        """
        total: np.ndarray | None = None
        positions = used = 0
        for w in reversed(self.window):
            a = getattr(w, attr)
            if a is None:
                break
            total = a if total is None else total + a
            positions += w.positions
            used += 1
            if positions >= self.thresholds.min_positions:
                return total, positions, used
        return None, positions, used

    def update(self, step: int, s: UnitSummary) -> tuple[LayerHealth, list[Alert]]:
        th = self.thresholds
        fired_total = float(s.fired.sum()) if s.fired is not None else None
        self._push(_Sample(s.positions, _clean(s.fired, 1.0, fired_total), _clean(s.at_bound, 0.0)))
        units = s.units

        dead_fraction = firing_rate = None
        dead_units: tuple[int, ...] = ()
        evidence = (0, 0)
        if fired_total is not None:
            ok = s.positions and math.isfinite(fired_total)
            firing_rate = fired_total / (s.positions * units) if ok else None
        if self.kind.can_die and s.fired is not None:
            fired, seen, used = self._evidence("fired")
            evidence = (seen, used)
            dead_fraction = 0.0
            if fired is not None and fired.min() <= 0.5:
                dead = np.flatnonzero(fired <= 0.5)
                dead_units = tuple(dead.tolist())
                dead_fraction = dead.size / units

        saturated_fraction = None
        saturated_units: tuple[int, ...] = ()
        if self.kind.bounded and s.at_bound is not None:
            at, seen, used = self._evidence("at_bound")
            evidence = (seen, used)
            saturated_fraction = 0.0
            if at is not None:
                sat = np.flatnonzero(at >= th.saturated_positions * seen)
                if sat.size:
                    saturated_units = tuple(sat.tolist())
                    saturated_fraction = sat.size / units

        n = s.positions * units
        total_sq = s.total_sq
        rms = math.sqrt(total_sq / n) if math.isfinite(total_sq) and n else safe_rms(s.sumsq, s.positions)
        hi = s.hi
        lo = 0.0 if self.kind.nonnegative else s.lo  # the ReLU family's min row is 0
        finite_extrema = math.isfinite(hi) and math.isfinite(lo)
        if finite_extrema:
            max_abs = max(abs(hi), abs(lo))
        else:
            ext = np.concatenate([s.max[np.isfinite(s.max)], s.min[np.isfinite(s.min)]])
            max_abs = float(np.abs(ext).max()) if ext.size else float("nan")
        # A NaN/Inf value makes its unit's sum of squares non-finite: a finite total means none.
        nonfinite = 0 if math.isfinite(total_sq) and finite_extrema else int(s.nonfinite.sum())
        if nonfinite == 0 and not finite_extrema:
            nonfinite = 1  # an extremum can only be non-finite if some value was

        health = LayerHealth(
            layer=self.name,
            kind=self.kind.name,
            units=units,
            step=step,
            dead_fraction=dead_fraction,
            saturated_fraction=saturated_fraction,
            firing_rate=firing_rate,
            rms=rms,
            max_abs=max_abs,
            nonfinite=nonfinite,
            dead_units=dead_units,
            saturated_units=saturated_units,
        )
        conditions = self._conditions(health, evidence)
        healthy = nonfinite == 0 and math.isfinite(rms) and not conditions["exploding"][0]
        if healthy and len(self.baseline_values) < th.baseline_samples:
            self.baseline_values.append(rms)
            self._baseline = None
        if not self.active and not any(c[0] for c in conditions.values()):
            return health, []
        return health, self._transitions(step, conditions)

    def _conditions(
        self, h: LayerHealth, evidence: tuple[int, int]
    ) -> dict[str, tuple[bool, float, float, Callable[[], str]]]:
        """alert kind -> (bad?, value, threshold, what is wrong in words (built lazily))."""
        th = self.thresholds
        out: dict[str, tuple[bool, float, float, Callable[[], str]]] = {}
        if h.dead_fraction is not None:
            out["dead"] = (
                h.dead_fraction >= th.dead_fraction,
                h.dead_fraction,
                th.dead_fraction,
                lambda: f"dead: {len(h.dead_units)}/{h.units} units ({_pct(h.dead_fraction or 0.0)}) never fired "
                f"(> 0) on {evidence[0]} values each over the last {_steps(evidence[1])}, threshold "
                f"{_pct(th.dead_fraction)}",
            )
        if h.saturated_fraction is not None:
            out["saturated"] = (
                h.saturated_fraction >= th.saturated_fraction,
                h.saturated_fraction,
                th.saturated_fraction,
                lambda: f"saturated: {len(h.saturated_units)}/{h.units} units ({_pct(h.saturated_fraction or 0.0)}) "
                f"sit at a bound of {self.kind.name} on >= {_pct(th.saturated_positions)} of {evidence[0]} values "
                f"over the last {_steps(evidence[1])}, threshold {_pct(th.saturated_fraction)}",
            )
        base = self.baseline
        if math.isfinite(h.rms) and h.rms > th.max_rms:
            out["exploding"] = (True, h.rms, th.max_rms, lambda: f"exploding: RMS {h.rms:.3g} > {th.max_rms:.3g}")
        elif math.isfinite(h.max_abs) and h.max_abs > th.max_abs:
            out["exploding"] = (
                True, h.max_abs, th.max_abs, lambda: f"exploding: max |activation| {h.max_abs:.3g} > {th.max_abs:.3g}"
            )
        elif base is not None and base > 1e-8 and math.isfinite(h.rms) and h.rms > th.growth_factor * base:
            out["exploding"] = (
                True,
                h.rms / base,
                th.growth_factor,
                lambda: f"exploding: RMS {h.rms:.3g} is {h.rms / base:.0f}x its baseline {base:.3g}, "
                f"threshold {th.growth_factor:g}x",
            )
        else:
            out["exploding"] = (False, h.rms, th.max_rms, lambda: f"exploding: RMS {h.rms:.3g}, max |activation| {h.max_abs:.3g}")
        out["nonfinite"] = (
            h.nonfinite > 0, float(h.nonfinite), 0.0, lambda: f"non-finite: {h.nonfinite} NaN/Inf values"
        )
        return out

    def _transitions(self, step: int, conditions: dict[str, tuple[bool, float, float, Callable[[], str]]]) -> list[Alert]:
        alerts: list[Alert] = []
        for kind, (bad, value, limit, what) in conditions.items():
            if bad:
                if kind not in self.active:
                    msg = f"step {step} | {self.name} | {what()} | {_CAUSES[kind]}"
                    alerts.append(Alert(step, self.name, kind, value, limit, msg))  # type: ignore[arg-type]
                self.active[kind] = 0
            elif kind in self.active:
                self.active[kind] += 1
                if self.active[kind] >= self.thresholds.recovery_samples:
                    del self.active[kind]
                    now = what().split(": ", 1)[-1]
                    msg = f"step {step} | {self.name} | recovered from {kind}: now {now}"
                    alerts.append(Alert(step, self.name, kind, value, limit, msg, recovered=True))  # type: ignore[arg-type]
        return alerts

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        import torch

        def t(a: np.ndarray | None) -> Any:
            return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64).copy())

        return {
            "window": [{"positions": w.positions, "fired": t(w.fired), "at_bound": t(w.at_bound)} for w in self.window],
            "baseline_values": list(self.baseline_values),
            "active": dict(self.active),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def a(x: Any) -> np.ndarray | None:
            return None if x is None else np.asarray(x.numpy() if hasattr(x, "numpy") else x)

        self.window = deque()
        for w in state["window"]:
            self._push(_Sample(int(w["positions"]), a(w["fired"]), a(w["at_bound"])))
        self.baseline_values = [float(v) for v in state["baseline_values"]]
        self._baseline = None
        self.active = {str(k): int(v) for k, v in state["active"].items()}


THRESHOLD_FIELDS = tuple(f.name for f in fields(Thresholds))
