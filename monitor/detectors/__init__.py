"""Detectors: each signal is one unit behind one interface (:class:`Detector`).

The built-ins, in the order they are judged: ``dead``, ``saturated``, ``dormant``,
``exploding``, ``nonfinite``, ``vanishing_gradient``, ``exploding_gradient``, ``collapse``,
``attention_entropy``, ``attention_sink`` (attention modules, not layers),
``gate_saturated``, ``hidden_saturated``. A detector of your own goes through the same path:
``Monitor(model, detectors=[MyDetector()])``.
"""

from monitor.detectors.attention import AttentionEntropy, AttentionSink
from monitor.detectors.base import Detector, Evidence, LayerView, Verdict
from monitor.detectors.collapse import Collapse
from monitor.detectors.dead import Dead
from monitor.detectors.dormant import Dormant
from monitor.detectors.exploding import Exploding
from monitor.detectors.gates import GateSaturated, HiddenSaturated
from monitor.detectors.gradients import ExplodingGradient, VanishingGradient
from monitor.detectors.nonfinite import NonFinite
from monitor.detectors.saturated import Saturated


def builtin_detectors() -> list[Detector]:
    """Fresh instances of the built-in detectors, in the order they are judged."""
    return [
        Dead(), Saturated(), Dormant(), Exploding(), NonFinite(), VanishingGradient(), ExplodingGradient(), Collapse(),
        AttentionEntropy(), AttentionSink(),
        GateSaturated(), HiddenSaturated(),
    ]


BUILTIN_NAMES: tuple[str, ...] = tuple(d.name for d in builtin_detectors())

__all__ = [
    "AttentionEntropy",
    "AttentionSink",
    "BUILTIN_NAMES",
    "Collapse",
    "Dead",
    "Detector",
    "Dormant",
    "Evidence",
    "Exploding",
    "ExplodingGradient",
    "GateSaturated",
    "HiddenSaturated",
    "LayerView",
    "NonFinite",
    "Saturated",
    "VanishingGradient",
    "Verdict",
    "builtin_detectors",
]
