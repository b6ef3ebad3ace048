"""``exploding``: activations far too large, absolutely or against the layer's own baseline."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from monitor.detectors.base import Detector, LayerView, Verdict, baseline


class Exploding(Detector):
    """RMS above ``max_rms``, largest magnitude above ``max_abs``, or RMS above ``growth_factor``
    times the layer's baseline (the median RMS of its first ``baseline_samples`` healthy sampled
    steps, never below ``growth_floor``). A step with NaN/Inf values is not judged here (``nonfinite`` is), so NaN never
    "recovers"; finite values whose float32 sum of squares overflows give RMS +inf: exploding."""

    name = "exploding"
    causes = (
        "likely a learning rate too high, missing normalisation or gradient clipping, or fp16 "
        "overflow; try a lower LR or warm-up, torch.nn.utils.clip_grad_norm_, LayerNorm, bf16"
    )

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        th, rms, max_abs = layer.thresholds, layer.rms, layer.max_abs
        history = memory.setdefault("baseline_values", [])
        base = baseline(history)
        if base is not None:
            base = max(base, th.growth_floor)  # growing out of a tiny init up to O(1) is not exploding
        if layer.nonfinite or math.isnan(rms) or math.isnan(max_abs):
            return Verdict(None, rms, th.max_rms, f"exploding: RMS {rms:.3g}, max |activation| {max_abs:.3g}")
        bad: bool | None
        band = False
        what: str | Callable[[], str]
        if rms > th.max_rms:
            bad, value, limit, what = True, rms, th.max_rms, f"exploding: RMS {rms:.3g} > {th.max_rms:.3g}"
        elif max_abs > th.max_abs:
            bad, value, limit = True, max_abs, th.max_abs
            what = f"exploding: max |activation| {max_abs:.3g} > {th.max_abs:.3g}"
        elif base is not None and base > 1e-8 and rms > th.growth_factor * base:
            bad, value, limit = True, rms / base, th.growth_factor
            what = f"exploding: RMS {rms:.3g} is {rms / base:.0f}x its baseline {base:.3g}, threshold {th.growth_factor:g}x"
        else:
            r = th.release
            clear = rms < r * th.max_rms and max_abs < r * th.max_abs
            if base is not None and base > 1e-8:
                clear = clear and rms < r * th.growth_factor * base
            bad, value, limit = (False if clear else None), rms, th.max_rms
            band = not clear
            what = lambda: f"exploding: RMS {rms:.3g}, max |activation| {max_abs:.3g}"  # noqa: E731 - built only when needed
            if len(history) < th.baseline_samples:
                history.append(rms)
        return Verdict(bad, value, limit, what, band=band)
