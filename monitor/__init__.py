"""An fMRI for your network while it trains: per-unit activation health for PyTorch.

>>> from monitor import Monitor, Thresholds
>>> # with Monitor(model, every_n_steps=50, logdir="runs/exp1") as mon:
>>> #     with mon.step(step):               # the forward, or the whole step:
>>> #         loss = loss_fn(model(x), y)      # activations
>>> #         loss.backward(); opt.step()      # + gradients and update ratios
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (PEP 562): `python -m monitor report` needs no torch
    from monitor.ablation import AblationEffect
    from monitor.alerts import ActivationAlertError, Alert, MonitorWarning, OnAlert
    from monitor.core import Monitor
    from monitor.detectors import Detector, Evidence, LayerView, Verdict
    from monitor.health import AttentionHealth, LayerHealth, ParameterHealth
    from monitor.options import Options
    from monitor.probe import ProbeResult
    from monitor.records import LayerSample, SampleRecord
    from monitor.selection import Patterns
    from monitor.sinks import Sink
    from monitor.thresholds import Thresholds

_WHERE = {
    "AblationEffect": "monitor.ablation",
    "ActivationAlertError": "monitor.alerts",
    "Alert": "monitor.alerts",
    "MonitorWarning": "monitor.alerts",
    "OnAlert": "monitor.alerts",
    "Monitor": "monitor.core",
    "Detector": "monitor.detectors",
    "Evidence": "monitor.detectors",
    "LayerView": "monitor.detectors",
    "Verdict": "monitor.detectors",
    "AttentionHealth": "monitor.health",
    "LayerHealth": "monitor.health",
    "ParameterHealth": "monitor.health",
    "Options": "monitor.options",
    "ProbeResult": "monitor.probe",
    "Patterns": "monitor.selection",
    "LayerSample": "monitor.records",
    "SampleRecord": "monitor.records",
    "Sink": "monitor.sinks",
    "Thresholds": "monitor.thresholds",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AblationEffect",
    "ActivationAlertError",
    "Alert",
    "AttentionHealth",
    "Detector",
    "Evidence",
    "LayerHealth",
    "LayerSample",
    "LayerView",
    "Monitor",
    "MonitorWarning",
    "OnAlert",
    "Options",
    "ParameterHealth",
    "Patterns",
    "ProbeResult",
    "SampleRecord",
    "Sink",
    "Thresholds",
    "Verdict",
]
__version__ = "0.1.0"
