"""``vanishing_gradient`` and ``exploding_gradient``: the gradient flowing back through each layer.

Both read the gradient with respect to a watched layer's output on a sampled step whose backward
ran inside the step (``LayerView.grad_rms``, ``grad_norm``), and compare it with the *reference*:
the median of the same number over the (up to) three watched layers nearest the loss on the same
step (the last ones in forward order). A ratio is scale-free: the loss's reduction, the batch size
and a loss scale cancel out, so the same thresholds hold for any of them.
"""

from __future__ import annotations

import math
from typing import Any

from monitor.detectors.base import Detector, LayerView, Verdict, baseline, level

#: Orders of magnitude above the vanishing threshold at which a layer's per-unit gradient norm
#: (``grad_norm_ratio``) clears a low per-value ratio (3.2e-3 with the default 1e-3). Measured: healthy
#: pooled layers (1024 tokens mean-pooled, 32x32 and 64x64 maps global-average-pooled) sat at
#: 0.0083-0.13, and a 12-layer tanh CNN with pooling stuck at chance had its first layer at 1.1e-3.
POSITIONS_MARGIN = 0.5


def orders(ratio: float) -> float:
    """Orders of magnitude a ratio lies below 1 (``inf`` for 0)."""
    return math.inf if ratio <= 0 else -math.log10(ratio)


class VanishingGradient(Detector):
    """The gradient reaching a layer is orders of magnitude below that of the layers nearest the loss.

    ``grad_ratio``: the layer's gradient RMS (per value) over the reference. Bad at once when it
    lies at least ``vanishing_orders_at_once`` orders below (1e-6) without being exactly zero
    (zero-initialised projections give exactly zero at step 0 only), or at least
    ``vanishing_orders`` orders below (1e-3) on ``vanishing_samples`` consecutive sampled steps;
    clear again above ``release`` x those orders. Not judged while the reference itself has grown
    ``grad_growth_factor`` times over its baseline: the gradient exploded near the loss, and the
    layers further back merely have not caught up (``exploding_gradient`` speaks then).

    Per value, a layer applied at L positions whose outputs are then averaged (mean or global
    average pooling) gets 1/L of the gradient at each position, but its shared weights sum the L
    of them. So a low ``grad_ratio`` is not judged vanishing while ``grad_norm_ratio`` (per unit,
    the gradient's L2 norm over the step's values, against the reference's) is at least
    :data:`POSITIONS_MARGIN` orders above the threshold (3.2e-3): the averaging explains it.
    Either reading alone misjudges models whose layers see different numbers of positions (a
    U-Net's bottleneck has few, a pooled encoder many), so the rule needs both.
    """

    name = "vanishing_gradient"
    fields = ("grad_ratio", "grad_norm_ratio")
    causes = (
        "likely saturating activations (sigmoid/tanh) stacked deep, a too-small init, or a dead layer "
        "above it; try ReLU/GELU, He/Xavier init, residual connections or normalisation (BatchNorm/LayerNorm)"
    )

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        th, rms, ref = layer.thresholds, layer.grad_rms, layer.grad_reference
        if rms is None or ref is None or not (ref > 0 and math.isfinite(ref)) or not math.isfinite(rms) or layer.grad_nonfinite:
            return Verdict(None)
        growth = layer.grad_reference_growth
        if growth is not None and growth >= th.grad_growth_factor:
            return Verdict(None, band=True)
        ratio = rms / ref
        norm, norm_ref = layer.grad_norm, layer.grad_norm_reference
        norm_ratio = norm / norm_ref if norm is not None and norm_ref and math.isfinite(norm_ref) else None
        below = orders(ratio)
        if norm_ratio is not None and orders(norm_ratio) <= th.vanishing_orders - POSITIONS_MARGIN:
            below = min(below, orders(norm_ratio))  # the averaging over positions explains the low per-value ratio
        streak = memory["streak"] = memory.get("streak", 0) + 1 if below >= th.vanishing_orders else 0

        def what() -> str:
            per_unit = f"; per unit over the step {norm_ratio:.2g}" if norm_ratio is not None else ""
            return (
                f"vanishing gradient: RMS {rms:.3g} is {ratio:.2g} of the layers nearest the loss ({ref:.3g}{per_unit}), "
                f"threshold 1e-{th.vanishing_orders:g}"
            )

        metrics = {"grad_ratio": ratio, "grad_norm_ratio": norm_ratio}
        # An exact zero is not "at once": zero-initialised output projections (ReZero, many GPT
        # recipes) give the layers below them a zero gradient at step 0 only; a dead layer above
        # keeps it at zero and is caught by the streak.
        at_once = below >= th.vanishing_orders_at_once and rms > 0
        if at_once or (below >= th.vanishing_orders and streak >= th.vanishing_samples):
            return Verdict(True, below, th.vanishing_orders, what, metrics)
        bad, band = level(below, th.vanishing_orders, th.release, True)
        return Verdict(False if bad is False else None, below, th.vanishing_orders, what, metrics, band=band or bool(bad))


class ExplodingGradient(Detector):
    """The gradient reaching a layer is non-finite, or far too large: ``exploding_orders`` orders
    above the layers nearest the loss (the front of a gradient that grows toward the input), or
    ``grad_growth_factor`` times the layer's own baseline (the median gradient RMS of its first
    ``baseline_samples`` judged sampled steps): a blow-up over time, caught before the loss turns
    NaN. The model-wide gradient norm above ``max_grad_norm`` is judged once per step
    (:meth:`evaluate_parameters`, reported for ``"(parameters)"``)."""

    name = "exploding_gradient"
    causes = (
        "likely a learning rate too high, a too-large init, or missing normalisation; try a lower LR or "
        "warm-up, torch.nn.utils.clip_grad_norm_, He/Xavier init, LayerNorm/BatchNorm or residual scaling"
    )

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        th, rms, ref = layer.thresholds, layer.grad_rms, layer.grad_reference
        if rms is None:
            return Verdict(None)
        if layer.grad_nonfinite:
            n = layer.grad_nonfinite
            return Verdict(True, n, 1, f"exploding gradient: NaN/Inf in the gradient of {n} of {layer.units} units")
        history = memory.setdefault("baseline_values", [])
        base = baseline(history)
        ratio = rms / ref if ref is not None and ref > 0 else None
        growth = layer.grad_reference_growth
        if base is not None and ref is not None and growth:
            # Never below the layers nearest the loss at their start: a layer whose gradient
            # began orders below theirs (a small init) and grows up to their level is learning.
            base = max(base, ref / growth)
        if ratio is not None and ratio >= 10**th.exploding_orders:
            what = f"exploding gradient: RMS {rms:.3g} is {ratio:.2g}x that of the layers nearest the loss ({ref:.3g})"
            return Verdict(True, ratio, 10**th.exploding_orders, what)
        if base is not None and base > 0 and rms >= th.grad_growth_factor * base:
            what = f"exploding gradient: RMS {rms:.3g} is {rms / base:.0f}x its baseline {base:.3g}, threshold {th.grad_growth_factor:g}x"
            return Verdict(True, rms / base, th.grad_growth_factor, what)
        r = th.release
        clear = ratio is None or ratio < r * 10**th.exploding_orders
        if base is not None and base > 0:
            clear = clear and rms < r * th.grad_growth_factor * base
        if clear and len(history) < th.baseline_samples and rms > 0:
            history.append(rms)
        return Verdict(False if clear else None, rms, th.grad_growth_factor, lambda: f"gradient RMS {rms:.3g}", band=not clear)

    def evaluate_parameters(self, total_norm: float, nonfinite: int, threshold: float, release: float) -> Verdict:
        """The model-wide gradient norm (the L2 norm over every parameter's gradient, where it was read:
        see ``Thresholds.max_grad_norm``)."""
        if nonfinite:
            return Verdict(True, nonfinite, 1, f"exploding gradient: {nonfinite} parameter gradients with NaN/Inf norm")
        bad, band = level(total_norm, threshold, release, math.isfinite(total_norm) or total_norm == math.inf)
        what = f"exploding gradient: total gradient norm {total_norm:.3g} > {threshold:.3g}"
        return Verdict(bad, total_norm, threshold, what, band=band)
