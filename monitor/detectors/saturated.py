"""``saturated``: bounded units pinned at a bound of their output range."""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.activations import Kind
from monitor.detectors.base import Detector, LayerView, Verdict, level, pct
from monitor.stats import AT_BOUND


def units_at_bound(layer: LayerView) -> tuple[Any, np.ndarray, float] | None:
    """(evidence, units at a bound on at least ``saturated_positions`` of their values, their
    fraction) over the layer's ``at_bound`` evidence; None while there is none."""
    ev = layer.evidence(AT_BOUND)
    if ev is None or not ev.values:
        return None
    sat = np.flatnonzero(ev.sums >= layer.thresholds.saturated_positions * ev.values)
    return ev, sat, sat.size / layer.units


class Saturated(Detector):
    """A unit is saturated when it sits within ``saturation_tolerance`` of the output range of a
    bound on at least ``saturated_positions`` of its values over the evidence; the layer alerts
    when ``saturated_fraction`` of its units are, once the evidence is complete."""

    name = "saturated"
    fields = ("saturated_fraction",)
    reads = (AT_BOUND,)
    windowed = (AT_BOUND,)
    causes = (
        "pre-activations are too large: weight init too large, unnormalised inputs or LR too high; "
        "try Xavier/Glorot init, normalising inputs, LayerNorm/BatchNorm before the nonlinearity, "
        "or a lower LR"
    )

    def applies(self, kind: Kind) -> bool:
        return kind.bounded and kind.rnn not in ("gate", "hidden")  # those: gate_saturated, hidden_saturated

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        th, units = layer.thresholds, layer.units
        found = units_at_bound(layer)
        if found is None:
            return Verdict(None)
        ev, sat, fraction = found
        steps = ev.steps
        what = lambda: (  # noqa: E731 - built only when an alert needs it
            f"saturated: {sat.size}/{units} units ({pct(fraction)}) sit at a bound of {layer.kind.name} on >= "
            f"{pct(th.saturated_positions)} of {ev.values} values over the last "
            f"{'sampled step' if steps == 1 else f'{steps} sampled steps'}, threshold {pct(th.saturated_fraction)}"
        )
        metrics = {"saturated_fraction": fraction, "saturated_units": tuple(sat.tolist())}
        bad, band = level(fraction, th.saturated_fraction, th.release, ev.complete)
        return Verdict(bad, fraction, th.saturated_fraction, what, metrics, band)

