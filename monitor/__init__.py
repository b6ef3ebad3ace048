"""An fMRI for your network while it trains: per-unit activation health for PyTorch.

>>> from monitor import Monitor, Thresholds
>>> # with Monitor(model, every_n_steps=50, logdir="runs/exp1") as mon:
>>> #     with mon.step(step):
>>> #         loss = loss_fn(model(x), y)
"""

from monitor.core import ActivationAlertError, Monitor, MonitorWarning, OnAlert
from monitor.detect import Alert, LayerHealth, Thresholds
from monitor.sinks import LayerSample, SampleRecord, Sink

__all__ = [
    "ActivationAlertError",
    "Alert",
    "LayerHealth",
    "LayerSample",
    "Monitor",
    "MonitorWarning",
    "OnAlert",
    "SampleRecord",
    "Sink",
    "Thresholds",
]
__version__ = "0.1.0"
