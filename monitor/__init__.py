"""An fMRI for your network while it trains: per-unit activation health for PyTorch.

>>> from monitor import Monitor, Thresholds
>>> # with Monitor(model, every_n_steps=50, logdir="runs/exp1") as mon:
>>> #     with mon.step(step):               # the forward, or the whole step:
>>> #         loss = loss_fn(model(x), y)      # activations
>>> #         loss.backward(); opt.step()      # + gradients and update ratios
"""

from monitor.alerts import ActivationAlertError, Alert, MonitorWarning, OnAlert
from monitor.core import Monitor
from monitor.detectors import Detector, Evidence, LayerView, Verdict
from monitor.health import LayerHealth, ParameterHealth
from monitor.options import Options
from monitor.selection import Patterns
from monitor.sinks import LayerSample, SampleRecord, Sink
from monitor.thresholds import Thresholds

__all__ = [
    "ActivationAlertError",
    "Alert",
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
    "SampleRecord",
    "Sink",
    "Thresholds",
    "Verdict",
]
__version__ = "0.1.0"
