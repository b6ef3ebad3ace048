"""Judging: per-layer memory across sampled steps, the detectors, and alert transitions.

:class:`Judge` keeps, for each watched layer, the recent evidence (per-unit sums of the rows the
detectors judge over time), each detector's own memory (e.g. an RMS baseline) and which alerts
are active. :meth:`Judge.judge` runs every applicable detector on one layer's summary and
returns its :class:`~monitor.health.LayerHealth` and the alerts for state changes:

- an alert fires once when a detector's verdict turns bad, and a "recovered" alert once after
  ``recovery_samples`` consecutive clearly-healthy verdicts (below ``release`` x the threshold:
  hysteresis, so a layer hovering at a threshold does not flap);
- a verdict of "cannot say" (``None``: not enough evidence) changes nothing; one between the two
  levels (``band``) or on a step with NaN/Inf values is not healthy: a recovery in progress
  starts over.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.activations import Kind
from monitor.alerts import Alert, WarnOnce
from monitor.detectors import Detector, Evidence, LayerView
from monitor.detectors.base import baseline
from monitor.health import AttentionHealth, LayerHealth, declare_fields
from monitor.stats import AT_BOUND, FIRED, UnitSummary, safe_rms
from monitor.thresholds import Thresholds

PARAMETERS = "(parameters)"  # the subject of model-wide verdicts (the total gradient norm)
_REFERENCE_LAYERS = 3  # the watched layers nearest the loss whose median gradient RMS is the reference


def gradient_reference(grad_rms: Sequence[float | None]) -> float | None:
    """The median gradient RMS of the last (up to) three layers, in forward order, that have a finite one."""
    known = [g for g in grad_rms if g is not None and math.isfinite(g)]
    return float(statistics.median(known[-_REFERENCE_LAYERS:])) if known else None

# NaN in a windowed row: the unit saw NaN/Inf. It is not "dead" (counted as fired) and not at a bound.
_NAN_AS = {FIRED: 1.0, AT_BOUND: 0.0}


@dataclass
class _Sample:
    positions: int
    rows: dict[str, np.ndarray]
    nonfinite: bool = False  # the step held NaN/Inf values: evidence that includes it proves no health


@dataclass
class LayerMemory:
    """What one layer remembers between sampled steps (bounded; round-trips through state_dict)."""

    window: deque = field(default_factory=deque)
    active: dict[str, int] = field(default_factory=dict)  # alert kind -> consecutive healthy verdicts
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def push(self, sample: _Sample, th: Thresholds) -> None:
        if self.window:
            ref = self.window[-1]
            if ref.rows.keys() != sample.rows.keys() or any(
                ref.rows[k].shape != v.shape for k, v in sample.rows.items()
            ):
                self.window.clear()  # the layer changed width: judge it afresh
        self.window.append(sample)
        # Keep only the most recent samples that a verdict can use.
        kept = values = 0
        for w in reversed(self.window):
            kept += 1
            values += w.positions
            if values >= th.min_positions or kept >= th.window:
                break
        while len(self.window) > kept:
            self.window.popleft()

    def evidence(self, row: str, th: Thresholds) -> Evidence | None:
        total: np.ndarray | None = None
        values = steps = 0
        for w in reversed(self.window):
            a = w.rows.get(row)
            if a is None:
                return None
            total = a.copy() if total is None else total + a
            values += w.positions
            steps += 1
            if values >= th.min_positions:
                break
        if total is None:
            return None
        return Evidence(total, values, steps, values >= th.min_positions or steps >= th.window)

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {
            "window": [
                {
                    "positions": w.positions,
                    "rows": {k: torch.from_numpy(np.asarray(v, np.float64).copy()) for k, v in w.rows.items()},
                    "nonfinite": w.nonfinite,
                }
                for w in self.window
            ],
            "active": dict(self.active),
            "detectors": copy.deepcopy(self.detectors),  # a snapshot: later steps must not change it
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LayerMemory:
        def arr(x: Any) -> np.ndarray:
            return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)

        mem = cls()
        if "rows" in (state.get("window") or [{}])[0] or not state.get("window"):
            for w in state.get("window", []):
                rows = {k: arr(v) for k, v in w["rows"].items()}
                mem.window.append(_Sample(int(w["positions"]), rows, bool(w.get("nonfinite", False))))
        else:  # version 1: fired / at_bound per sample
            for w in state["window"]:
                rows = {k: arr(w[k]) for k in (FIRED, AT_BOUND) if w.get(k) is not None}
                mem.window.append(_Sample(int(w["positions"]), rows))
        if "baseline_values" in state:  # version 1
            mem.detectors["exploding"] = {"baseline_values": [float(v) for v in state["baseline_values"]]}
        mem.detectors.update({str(k): copy.deepcopy(dict(v)) for k, v in state.get("detectors", {}).items()})
        mem.active = {str(k): int(v) for k, v in state["active"].items()}
        return mem


def base_numbers(kind: Kind, s: UnitSummary) -> tuple[float, float, int, float | None]:
    """(rms, max_abs, units with NaN/Inf, firing rate) of one summary; NaN/Inf never averaged in."""
    n = s.positions * s.units
    with np.errstate(all="ignore"):
        total_sq = s.total_sq
        rms = math.sqrt(total_sq / n) if math.isfinite(total_sq) and n else safe_rms(s.sumsq, s.positions)
        hi = s.hi
        lo = 0.0 if kind.nonnegative else s.lo  # the ReLU family's minimum is 0
        finite_extrema = math.isfinite(hi) and math.isfinite(lo)
        if finite_extrema:
            max_abs = max(abs(hi), abs(lo))
        else:
            ext = np.concatenate([s.max[np.isfinite(s.max)], s.min[np.isfinite(s.min)]])
            max_abs = float(np.abs(ext).max()) if ext.size else float("nan")
        nonfinite = int(np.count_nonzero(s.nonfinite > 0)) if not (math.isfinite(total_sq) and finite_extrema) else 0
        if nonfinite == 0 and not finite_extrema:
            nonfinite = 1  # an extremum can only be non-finite if some value was
        firing = None
        if s.fired is not None and s.positions:
            total = float(s.fired.sum())
            if math.isfinite(total):
                firing = total / n
            else:
                known = s.fired[np.isfinite(s.fired)]  # NaN: a unit that saw NaN/Inf (fired unknown)
                firing = float(known.sum()) / (s.positions * known.size) if known.size else None
    return rms, max_abs, nonfinite, firing


class Judge:
    """Runs the detectors over each layer's summaries and keeps every layer's memory."""

    def __init__(
        self, thresholds: Thresholds, detectors: Sequence[Detector], warn_once: Callable[[str, str], None] | None = None
    ) -> None:
        self.thresholds = thresholds
        self.detectors = list(detectors)
        self._warn_once = warn_once if warn_once is not None else WarnOnce()
        declare_fields(f for d in self.detectors for f in d.fields)
        self.layers: dict[str, LayerMemory] = {}
        self._pending: dict[str, dict[str, Any]] = {}  # restored state of layers not seen yet
        self._applicable: dict[tuple[str, Kind], tuple[list[Detector], tuple[str, ...]]] = {}
        self._parameter_detectors = [d for d in self.detectors if hasattr(d, "evaluate_parameters")]

    def _failure(self, det: Detector, subject: str, e: Exception) -> None:
        """A detector that raised: its verdict on ``subject`` is skipped (its alerts stay as they
        are); the other detectors and the other layers go on. One warning per detector."""
        message = (
            f"detector {det.name!r} raised {e!r} on {subject}; its verdicts are skipped wherever it raises, "
            "the other detectors go on"
        )
        self._warn_once(f"detector:{det.name}", message)

    def _for(self, name: str, kind: Kind) -> tuple[list[Detector], tuple[str, ...]]:
        hit = self._applicable.get((name, kind))
        if hit is None:
            dets = [d for d in self.detectors if d.applies(kind)]
            windowed = tuple(dict.fromkeys(r for d in dets for r in d.windowed))
            hit = self._applicable[(name, kind)] = (dets, windowed)
        return hit

    def memory(self, name: str) -> LayerMemory:
        mem = self.layers.get(name)
        if mem is None:
            state = self._pending.pop(name, None)
            mem = self.layers[name] = LayerMemory.from_state_dict(state) if state else LayerMemory()
        return mem

    def judge_step(
        self, step: int, layers: Sequence[tuple[str, Kind, UnitSummary]], grad_norms: dict[str, float] | None = None
    ) -> tuple[list[LayerHealth], list[Alert]]:
        """Judge every layer of one sampled step (in forward order), then the model-wide gradient norm."""
        with np.errstate(all="ignore"):
            grads = [s.grad.numbers() if s.grad is not None else None for _, _, s in layers]
            ref = gradient_reference([g[0] if g is not None and not g[2] else None for g in grads])
            growth = self._reference_growth(ref)
            # Per unit, the L2 norm of its gradient over the step's values (RMS x sqrt(values per unit)).
            norms = [
                g[0] * math.sqrt(s.grad.positions) if g is not None and not g[2] and s.grad is not None else None
                for (_, _, s), g in zip(layers, grads)
            ]
            norm_ref = gradient_reference(norms)
            healths, alerts = [], []
            for (name, kind, s), g, norm in zip(layers, grads, norms):
                h, new = self._judge(name, kind, step, s, g, ref, growth, norm, norm_ref)
                healths.append(h)
                alerts += new
            if grad_norms:
                alerts += self._judge_parameters(step, grad_norms)
        return healths, alerts

    def _reference_growth(self, ref: float | None) -> float | None:
        """The reference over its own baseline (the median of its first ``baseline_samples`` values)."""
        if ref is None or not ref > 0:
            return None
        history = self.memory(PARAMETERS).detectors.setdefault("gradient_reference", {}).setdefault("baseline", [])
        base = baseline(history)
        if len(history) < self.thresholds.baseline_samples:
            history.append(ref)
        return ref / base if base else None

    def judge(self, name: str, kind: Kind, step: int, s: UnitSummary) -> tuple[LayerHealth, list[Alert]]:
        """Judge one layer's summary of ``step``: its health and the alerts for state changes.

        Detectors run with numpy's floating-point warnings silenced (NaN/Inf are data here)."""
        with np.errstate(all="ignore"):
            g = s.grad.numbers() if s.grad is not None else None
            return self._judge(name, kind, step, s, g, None, None)

    def _judge_parameters(self, step: int, grad_norms: dict[str, float]) -> list[Alert]:
        # A handful to a few thousand floats: plain Python beats numpy's per-call cost here.
        finite = [v for v in grad_norms.values() if math.isfinite(v)]
        bad_norms = len(grad_norms) - len(finite)
        total = math.sqrt(math.fsum(v * v for v in finite))
        mem = self.memory(PARAMETERS)
        alerts: list[Alert] = []
        for det in self._parameter_detectors:
            try:
                v = det.evaluate_parameters(total, bad_norms, self.thresholds.max_grad_norm, self.thresholds.release)  # type: ignore[attr-defined]
                self._transition(mem, det, v, None if v.bad is None else bool(v.bad), v.band, step, PARAMETERS, alerts)
            except Exception as e:
                self._failure(det, PARAMETERS, e)
        return alerts

    def judge_attention(self, step: int, modules: Sequence[Any]) -> tuple[list[AttentionHealth], list[Alert]]:
        """Judge each attention module measured on ``step`` (its :class:`~monitor.headstats.AttentionNumbers`)
        with the detectors that have ``evaluate_attention``; the module's name is the alert's subject."""
        healths: list[AttentionHealth] = []
        alerts: list[Alert] = []
        if not modules:
            return healths, alerts
        with np.errstate(all="ignore"):
            for m in modules:
                healths.append(
                    AttentionHealth(
                        m.name, step, m.heads, tuple(m.entropy.tolist()), tuple(m.normalized.tolist()),
                        tuple(m.sink.tolist()), int(m.queries.max()) if m.queries.size else 0, tuple(m.one_hot.tolist()),
                    )
                )
                mem = self.memory(m.name)
                for det in self.detectors:
                    judge = getattr(det, "evaluate_attention", None)
                    if judge is None:
                        continue
                    try:
                        v = judge(m, self.thresholds, mem.detectors.setdefault(det.name, {}))
                        self._transition(mem, det, v, None if v.bad is None else bool(v.bad), v.band, step, m.name, alerts)
                    except Exception as e:
                        self._failure(det, m.name, e)
        return healths, alerts

    def _transition(
        self, mem: LayerMemory, det: Detector, verdict: Any, bad: bool | None, unhealthy: bool, step: int, name: str, alerts: list[Alert]
    ) -> None:
        """Alert on entering; "recovered" after ``recovery_samples`` consecutive healthy verdicts."""
        th = self.thresholds
        if bad:
            if det.name not in mem.active:
                msg = f"step {step} | {name} | {verdict.describe()} | {det.causes}"
                alerts.append(Alert(step, name, det.name, float(verdict.value), float(verdict.threshold), msg))
            mem.active[det.name] = 0
        elif bad is False and det.name in mem.active:
            mem.active[det.name] += 1
            if mem.active[det.name] >= th.recovery_samples:
                del mem.active[det.name]
                now = verdict.describe().split(": ", 1)[-1]
                msg = f"step {step} | {name} | recovered from {det.name}: now {now}"
                alerts.append(Alert(step, name, det.name, float(verdict.value), float(verdict.threshold), msg, True))
        elif unhealthy and det.name in mem.active:
            mem.active[det.name] = 0  # recovery needs consecutive healthy verdicts: start over

    def _judge(
        self,
        name: str,
        kind: Kind,
        step: int,
        s: UnitSummary,
        grad: tuple[float, float, int] | None,
        grad_ref: float | None,
        ref_growth: float | None,
        grad_norm: float | None = None,
        norm_ref: float | None = None,
    ) -> tuple[LayerHealth, list[Alert]]:
        th = self.thresholds
        detectors, windowed = self._for(name, kind)
        mem = self.memory(name)
        rms, max_abs, nonfinite, firing = base_numbers(kind, s)
        rows = {}
        for r in windowed:
            a = getattr(s, r, None)
            if a is not None:
                if nonfinite and r in _NAN_AS:  # NaN only where a unit saw NaN/Inf
                    a = np.where(np.isnan(a), _NAN_AS[r] * (s.positions if r == FIRED else 1.0), a)
                rows[r] = a
        mem.push(_Sample(s.positions, rows, nonfinite > 0), th)
        # NaN/Inf on this step or in the evidence it is judged with: never evidence of health.
        tainted = any(w.nonfinite for w in mem.window)
        cache: dict[str, Evidence | None] = {}

        def evidence(row: str) -> Evidence | None:
            if row not in cache:
                cache[row] = mem.evidence(row, th)
            return cache[row]

        view = LayerView(name, kind, step, s, th, rms, max_abs, nonfinite, evidence, grad, grad_ref, ref_growth, grad_norm, norm_ref)
        metrics: dict[str, Any] = {}
        alerts: list[Alert] = []
        for det in detectors:
            try:
                verdict = det.evaluate(view, mem.detectors.setdefault(det.name, {}))
                bad = None if verdict.bad is None else bool(verdict.bad)  # numpy bools too
                unhealthy = verdict.band  # judged, between the two levels: not (yet) healthy
                if det.name != "nonfinite" and not bad and (nonfinite or (tainted and det.windowed)):
                    bad, unhealthy = None, True  # a step with NaN/Inf values is never evidence of health
                self._transition(mem, det, verdict, bad, unhealthy, step, name, alerts)
                metrics.update(verdict.metrics)
            except Exception as e:
                self._failure(det, name, e)
        ev = next((e for e in cache.values() if e is not None), None)
        health = LayerHealth(
            layer=name,
            kind=kind.name,
            units=s.units,
            step=step,
            rms=rms,
            max_abs=max_abs,
            nonfinite=nonfinite,
            firing_rate=firing,
            evidence_values=ev.values if ev else 0,
            evidence_steps=ev.steps if ev else 0,
            metrics=metrics,
            grad_rms=grad[0] if grad is not None else None,
            grad_max_abs=grad[1] if grad is not None else None,
            grad_nonfinite=grad[2] if grad is not None else None,
        )
        return health, alerts

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, Any]]:
        out = {name: m.state_dict() for name, m in self.layers.items()}
        out.update({k: v for k, v in self._pending.items() if k not in out})
        return out

    def load_state_dict(self, layers: dict[str, dict[str, Any]]) -> None:
        self.layers = {}
        self._pending = dict(layers)
