"""Alerts and what happens with them: warn, raise, ignore, a callable, or stop."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Union


class MonitorWarning(UserWarning):
    """Warnings from the activation monitor (alerts with ``on_alert="warn"``, degraded output)."""


@dataclass(frozen=True)
class Alert:
    """A layer entered (or, with ``recovered=True``, left) an unhealthy state.

    ``kind`` is the detector's name (``"dead"``, ``"saturated"``, ``"dormant"``, ``"exploding"``,
    ``"nonfinite"`` or one of your own); ``value`` is the measured number and ``threshold`` the
    bound it crossed; ``message`` is one readable line with the likely causes and what to try.
    """

    step: int
    layer: str
    kind: str
    value: float
    threshold: float
    message: str
    recovered: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ActivationAlertError(RuntimeError):
    """Raised at the end of a sampled step when ``on_alert="raise"`` and a layer became unhealthy."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(alert.message)
        self.alert = alert


OnAlert = Union[Literal["warn", "raise", "ignore", "stop"], Callable[[Alert], None]]
ON_ALERT_MODES = ("warn", "raise", "ignore", "stop")


_FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "skorch", "transformers", "accelerate")


def _skipped_dirs() -> tuple[str, ...]:
    """Directories whose frames are not the user's: this project, torch, and the training
    frameworks already imported (so a warning inside ``trainer.fit`` points at that call)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = [os.path.join(root, "monitor"), os.path.join(root, "integrations")]
    for name in ("torch", *_FRAMEWORKS):
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None)
        if path:
            dirs.append(os.path.dirname(path))
    return (*(d + os.sep for d in dirs), os.path.dirname(contextlib.__file__) + os.sep + "contextlib.py")


def warn(message: str) -> None:
    """A :class:`MonitorWarning` attributed to the first frame outside this project, torch and
    the training frameworks: the user's line (on the monitor's writer thread there is none; the
    thread's frame is used)."""
    skip = _skipped_dirs()
    frame = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
        level += 1
    warnings.warn(message, MonitorWarning, stacklevel=level if frame is not None else 2)


def deliver(alerts: list[Alert], on_alert: OnAlert) -> bool:
    """Act on ``alerts``; return whether training should stop (``"stop"`` and a new alert).

    ``"raise"`` raises :class:`ActivationAlertError` for the first new (not recovered) alert after
    warning about recoveries; a callable receives every alert.
    """
    stop = False
    for alert in alerts:
        if on_alert == "ignore":
            continue
        if callable(on_alert):
            on_alert(alert)
        elif on_alert == "stop" and not alert.recovered:
            stop = True
            warn(f"{alert.message} | on_alert='stop': stopping training")
        elif on_alert in ("warn", "stop") or alert.recovered:
            warn(alert.message)
    if on_alert == "raise":
        bad = [a for a in alerts if not a.recovered]
        if bad:
            raise ActivationAlertError(bad[0])
    return stop


class WarnOnce:
    """``warn_once(key, message)``: one :class:`MonitorWarning` per key, at the user's line."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.keys:
            self.keys.add(key)
            warn(f"activation monitor: {message}")
