"""``nonfinite``: NaN/Inf values in a layer's output."""

from __future__ import annotations

from typing import Any

from monitor.detectors.base import Detector, LayerView, Verdict


class NonFinite(Detector):
    """At least one NaN/Inf value on the sampled step (``layer.nonfinite``: units that held one; a
    unit did iff its extrema, reduced on the device, are NaN/Inf)."""

    name = "nonfinite"
    causes = (
        "NaN/Inf: overflow (fp16), a learning rate too high, log/div of zero, or bad input data; "
        "try a lower LR, gradient clipping, bf16 instead of fp16, checking inputs with "
        "torch.isfinite, torch.autograd.set_detect_anomaly"
    )

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        n = layer.nonfinite
        return Verdict(n > 0, float(n), 0.0, f"non-finite: {n} units with NaN/Inf values")
