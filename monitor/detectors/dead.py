"""``dead``: ReLU-family units that never fire (> 0)."""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.activations import Kind
from monitor.detectors.base import Detector, LayerView, Verdict, median, over, pct
from monitor.stats import FIRED, PRE_MAX, PRE_MIN, all_finite

_SPREADS = 8  # recent sampled steps whose spread the margin also trusts


class Dead(Detector):
    """A unit is dead when it did not fire on any value of the evidence (the most recent sampled
    steps holding ``min_positions`` values per unit), or, at once, when its largest pre-activation
    on the sampled step sits more than ``dead_margin`` pre-activation spreads below zero (the
    spread: the median over the layer's units of max - min pre-activation on that step, or the
    median of that over the layer's last 8 sampled steps if larger: two values can sit close
    together by chance; and never less than the typical size of the units that fired, the median
    over them of max(|max|, |min|): two views of one input have almost no spread). The
    layer alerts when ``dead_fraction`` of its units are dead for certain: all silent units once
    the evidence is complete, only the far-below-zero ones before.
    """

    name = "dead"
    fields = ("dead_fraction", "dead_margin")
    reads = (FIRED, PRE_MAX, PRE_MIN)
    windowed = (FIRED,)
    causes = (
        "likely a learning rate too high (one large update pushed weights/biases negative) or a "
        "negative bias init; try a lower LR or warm-up, He init with biases >= 0, LeakyReLU/GELU, "
        "or normalisation before the ReLU"
    )

    def applies(self, kind: Kind) -> bool:
        return kind.can_die

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        th, s, units = layer.thresholds, layer.summary, layer.units
        ev = layer.evidence(FIRED)
        if ev is None:
            return Verdict(None)
        silent = ev.sums <= 0.5
        certain = None
        margin = None
        pre_max, pre_min = s.pre_max, s.pre_min
        # Only a unit whose largest pre-activation is below zero can be dead for certain.
        if pre_max is not None and pre_min is not None and not np.minimum.reduce(pre_max) >= 0:
            spread = _finite(pre_max - pre_min)
            now = median(spread) if spread.size else 0.0
            # Two values can sit close together by chance (near-duplicate inputs): the spread is
            # the larger of this step's and the layer's recent median, never one lucky batch.
            recent = memory.setdefault("spreads", [])
            scale = max(now, sorted(recent)[(len(recent) - 1) // 2]) if recent else now
            if now > 0:
                recent.append(now)
                del recent[:-_SPREADS]
            # Never less than the live units' typical size: two near-identical inputs (two views
            # of one sample) give a spread near zero, and every unit silent on them would sit
            # "thousands of spreads" below zero.
            scale = max(scale, _live_size(pre_max, pre_min))
            if scale > 0:
                margin = pre_max / scale
                certain = margin <= -th.dead_margin  # NaN: not certain
        # (numpy calls kept few: this runs per layer per sampled step on the writer thread)
        dead = silent if certain is None else silent | certain
        n_dead = int(np.count_nonzero(dead))
        n_certain = 0 if certain is None else int(np.count_nonzero(certain))
        confirmed_fraction = (n_dead if ev.complete else n_certain) / units
        fraction = n_dead / units
        dead_margin = None
        dead_units = np.flatnonzero(dead) if n_dead else None
        if margin is not None and dead_units is not None:
            m = _finite(-margin[dead_units])
            dead_margin = median(m) if m.size else None
        band = False
        if confirmed_fraction >= th.dead_fraction:
            bad: bool | None = True
        elif ev.complete and fraction < th.release * th.dead_fraction:
            bad = False
        else:
            bad, band = None, ev.complete
        ev_values, ev_steps, complete = ev.values, ev.steps, ev.complete

        def what() -> str:
            text = f"dead: {n_dead}/{units} units ({pct(fraction)}) never fired (> 0) {over(ev_values, ev_steps)}"
            if n_certain and dead_margin is not None:
                text += f"; {n_certain} sit far below zero (median {dead_margin:.1f} pre-activation spreads)"
            if not complete:
                text += f" (evidence incomplete: {ev_values} of {th.min_positions} values)"
            return text + f", threshold {pct(th.dead_fraction)}"

        metrics = {
            "dead_fraction": fraction,
            "dead_margin": dead_margin,
            "dead_units": tuple(dead_units.tolist()) if dead_units is not None else (),
        }
        return Verdict(bad, confirmed_fraction, th.dead_fraction, what, metrics, band)


def _live_size(pre_max: np.ndarray, pre_min: np.ndarray) -> float:
    """The typical size of the pre-activations of the units that fired on the step: the median
    over them of max(|max|, |min|); 0 when none fired (a layer killed outright)."""
    live = pre_max > 0
    if not live.any():
        return 0.0
    size = _finite(np.maximum(pre_max[live], -pre_min[live]))
    return median(size) if size.size else 0.0


def _finite(a: np.ndarray) -> np.ndarray:
    """The finite entries of ``a`` (``a`` itself when all are)."""
    return a if all_finite(a) else a[np.isfinite(a)]
