"""``dormant``: units whose output is negligible next to the rest of their layer (any activation)."""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.activations import Kind
from monitor.detectors.base import Detector, LayerView, Verdict, level, over, pct
from monitor.stats import FIRED, SUMABS


class Dormant(Detector):
    """Sokar et al. 2023 ("The Dormant Neuron Phenomenon in Deep Reinforcement Learning"): a unit
    is tau-dormant when its mean abs(activation) over the evidence is at most ``dormant_tau``
    times the layer's mean over units. Defined for every activation kind, so it covers GELU,
    SiLU, LeakyReLU, tanh ... where "dead" (never > 0) does not apply. In ReLU-family layers a
    unit that never fired is counted as dead, not dormant. The layer alerts when
    ``dormant_fraction`` of its units are dormant, once the evidence is complete. A layer whose
    units all shrink together is not dormant by this (relative) definition.
    """

    name = "dormant"
    fields = ("dormant_fraction",)
    reads = (SUMABS,)
    windowed = (SUMABS, FIRED)
    causes = (
        "units whose output is negligible next to their layer: an over-regularised or shrunk weight row, "
        "a too-high LR or weight decay, or units pushed into a flat region; try a lower LR or weight decay, "
        "re-initialising dormant units (ReDo), or normalisation before the nonlinearity"
    )

    def applies(self, kind: Kind) -> bool:
        return kind.activation

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        th, units = layer.thresholds, layer.units
        ev = layer.evidence(SUMABS)
        if ev is None or not ev.values:
            return Verdict(None)
        mean_abs = ev.sums / ev.values
        layer_mean = float(np.add.reduce(mean_abs)) / units  # = mean_abs.mean(), without its wrapper
        if not np.isfinite(layer_mean):  # units that saw NaN/Inf: the mean of the others
            finite = mean_abs[np.isfinite(mean_abs)]
            layer_mean = float(finite.mean()) if finite.size else float("nan")
        if not np.isfinite(layer_mean) or layer_mean <= 0:
            return Verdict(None, metrics={"dormant_fraction": None})
        dormant = mean_abs <= th.dormant_tau * layer_mean  # NaN units: not dormant
        if layer.kind.can_die:
            fired = layer.evidence(FIRED)
            if fired is not None:
                dormant &= fired.sums > 0.5  # never fired: dead, not dormant
        idx = np.flatnonzero(dormant)
        fraction = idx.size / units
        what = lambda: (  # noqa: E731 - built only when an alert needs it
            f"dormant: {idx.size}/{units} units ({pct(fraction)}) have a mean |activation| <= "
            f"{th.dormant_tau:g} x the layer mean ({layer_mean:.3g}) {over(ev.values, ev.steps)}, "
            f"threshold {pct(th.dormant_fraction)}"
        )
        metrics = {"dormant_fraction": fraction, "dormant_units": tuple(idx.tolist())}
        bad, band = level(fraction, th.dormant_fraction, th.release, ev.complete)
        return Verdict(bad, fraction, th.dormant_fraction, what, metrics, band)
