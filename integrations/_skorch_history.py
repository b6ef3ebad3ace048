"""The keys the skorch callback writes into ``net.history`` at the end of every epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monitor import Alert, Detector, LayerHealth
from monitor.detectors import builtin_detectors

#: Keys written into ``net.history`` at the end of every epoch (``<layer>`` e.g. ``dense0.relu``).
HISTORY_KEYS = {
    "activation_alerts": "alerts that fired (entered an unhealthy state) during this epoch",
    "activation_samples": "sampled training steps during this epoch (0: values below are carried over)",
    "activation_dead_fraction_max": "worst dead fraction over ReLU-family layers (NaN: none)",
    "activation_saturated_fraction_max": "worst saturated fraction over bounded layers (NaN: none)",
    "activation_dormant_fraction_max": "worst dormant fraction over activation layers (NaN: none)",
    "activation_<field>_max": "the same for every *_fraction field of a user-defined detector",
    "activation_nonfinite": "units with NaN/Inf values over all layers at their latest sampled step",
    "activation_dead_fraction/<layer>": "per ReLU-family layer (with history_layers=True)",
    "activation_saturated_fraction/<layer>": "per bounded layer (with history_layers=True)",
    "activation_dormant_fraction/<layer>": "per activation layer (with history_layers=True)",
}
_FRACTIONS = tuple(f for d in builtin_detectors() for f in d.fields if f.endswith("_fraction"))


def _nan_max(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(max(vals)) if vals else math.nan


def history_row(
    health: dict[str, LayerHealth],
    alerts: list[Alert],
    epoch_start: int,
    epoch_samples: int,
    detectors: Sequence[Detector] | None,
    layers: bool,
) -> dict[str, float]:
    """One epoch's :data:`HISTORY_KEYS`: the alerts that fired since step ``epoch_start``, the
    sampled steps, and the worst of each ``*_fraction`` over the layers' latest ``health``
    (per layer too with ``layers``). NaN where no layer has the number: never judged is not 0."""
    row: dict[str, float] = {
        "activation_alerts": sum(1 for a in alerts if not a.recovered and a.step >= epoch_start),
        "activation_samples": epoch_samples,
    }
    fractions = list(_FRACTIONS) + [
        f for d in (detectors or ()) for f in d.fields if f.endswith("_fraction") and f not in _FRACTIONS
    ]
    for f in fractions:
        row[f"activation_{f}_max"] = _nan_max([h.metrics.get(f) for h in health.values()])
    row["activation_nonfinite"] = float(sum(h.nonfinite for h in health.values())) if health else math.nan
    if layers:
        for name, h in health.items():
            for f in fractions:
                v = h.metrics.get(f)
                if v is not None:
                    row[f"activation_{f}/{name}"] = float(v)
    return row
