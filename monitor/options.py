"""Every option of the monitor, validated once, in one place.

:class:`Options` is what ``Monitor`` and the Lightning and skorch callbacks check their
arguments with, before any model exists: the same messages everywhere ("Expected
`every_n_steps` to be a positive integer, got 0."). Whether a pattern matches a module is known
only with the model and is checked when the monitor is built on it.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monitor.alerts import ON_ALERT_MODES, OnAlert
from monitor.detectors import BUILTIN_NAMES, Detector, builtin_detectors
from monitor.health import LayerHealth
from monitor.runconfig import normalize_config
from monitor.selection import Patterns, validate_patterns
from monitor.sinks import Sink
from monitor.stats import ALL_ROWS
from monitor.thresholds import Thresholds

_BASE_METRICS = frozenset({"rms", "max_abs", "nonfinite", "firing_rate", "evidence_values"})


#: The keyword options that are integers (besides ``every_n_steps``).
INT_OPTIONS = ("images_every_n_samples", "timeline_length", "probe_every_n_samples")


def python_ints(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the integer ones as Python ints (validated ``np.int64`` values become ``int``:
    what callbacks keep must go into JSON checkpoints and state keys unchanged).

    >>> import numpy as np
    >>> python_ints({"timeline_length": np.int64(50), "histograms": True})
    {'timeline_length': 50, 'histograms': True}
    """
    return {k: int(v) if k in INT_OPTIONS and _is_int(v) else v for k, v in options.items()}


def _is_int(v: Any) -> bool:
    """An integer: Python's or NumPy's (``np.int64(5)``), never a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def check_on_alert(on_alert: Any, modes: Sequence[str] = ON_ALERT_MODES) -> None:
    if not (callable(on_alert) or (isinstance(on_alert, str) and on_alert in modes)):
        raise ValueError(f"Expected `on_alert` to be one of {', '.join(map(repr, modes))} or a callable, got {on_alert!r}.")


def check_detectors(detectors: Any) -> tuple[Detector, ...]:
    """A user's extra detectors: Detector instances with a unique name and known rows."""
    if detectors is None:
        return ()
    if isinstance(detectors, Detector) or not isinstance(detectors, Sequence) or isinstance(detectors, str):
        raise TypeError(f"Expected `detectors` to be None or a sequence of monitor.Detector instances, got {detectors!r}.")
    names = set(BUILTIN_NAMES)
    # Fields become LayerHealth attributes: none may shadow an attribute or a built-in number.
    fields: set[str] = {f for d in builtin_detectors() for f in d.fields} | {
        n for n in dir(LayerHealth) if not n.startswith("_")
    } | {f.name for f in dataclasses.fields(LayerHealth)} | {f"{n}_units" for n in BUILTIN_NAMES}
    for d in detectors:
        if not isinstance(d, Detector):
            hint = " (pass an instance, not the class)" if isinstance(d, type) and issubclass(d, Detector) else ""
            raise TypeError(f"Expected `detectors` to hold monitor.Detector instances, got {d!r}{hint}.")
        if not isinstance(d.name, str) or not d.name.isidentifier():
            raise ValueError(f"Expected detector {d!r} to have a `name` that is an identifier, got {d.name!r}.")
        if d.name in names:
            raise ValueError(f"Detector name {d.name!r} is taken (built-in names: {', '.join(BUILTIN_NAMES)}).")
        names.add(d.name)
        bad_rows = [r for r in (*d.reads, *d.windowed) if r not in ALL_ROWS]
        if bad_rows:
            raise ValueError(
                f"Detector {d.name!r} reads unknown statistic rows {bad_rows}; valid rows: {', '.join(sorted(ALL_ROWS))}."
            )
        clash = (set(d.fields) & _BASE_METRICS) | (set(d.fields) & fields)
        if clash:
            raise ValueError(
                f"Detector {d.name!r} declares fields {sorted(clash)} that another number or a LayerHealth attribute "
                "already uses; choose other names."
            )
        fields |= set(d.fields)
    return tuple(detectors)


def check_logdir(logdir: Any) -> None:
    if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
        hint = " (a SummaryWriter goes in `writer=`)" if hasattr(logdir, "add_scalar") else ""
        raise TypeError(f"Expected `logdir` to be None or a directory path (str or os.PathLike), got {logdir!r}{hint}.")


def check_writer(writer: Any) -> None:
    if writer is None:
        return
    if isinstance(writer, (str, os.PathLike)):
        raise TypeError(f"Expected `writer` to be a SummaryWriter, got the path {writer!r}; pass a directory as `logdir=` instead.")
    if not (hasattr(writer, "get_logdir") or hasattr(writer, "log_dir") or hasattr(writer, "logdir") or hasattr(writer, "add_scalar")):
        raise TypeError(
            f"Expected `writer` to be a SummaryWriter (torch.utils.tensorboard or tensorboardX), got {writer!r}."
        )


def check_probe(probe: Any, every: Any, labels: Any, loss_fn: Any) -> None:
    """The probe options (see :func:`monitor.probe.probe_input` for the probe itself)."""
    if not _is_int(every) or every < 1:
        raise ValueError(f"Expected `probe_every_n_samples` to be a positive integer, got {every!r}.")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"Expected `probe_loss_fn` to be None or a callable loss_fn(output, targets), got {loss_fn!r}.")
    if probe is None:
        if labels is not None:
            raise ValueError("Expected `probe_labels` only together with a `probe`, got labels without a probe.")
        return
    from monitor.probe import probe_input

    probe_input(probe, labels)


@dataclass(frozen=True)
class Options:
    """The monitor's options, validated. Raises ``TypeError``/``ValueError`` naming the bad value.

    Example:
        >>> Options(every_n_steps=10).every_n_steps
        10
        >>> Options(every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `every_n_steps` to be a positive integer, got 0.
    """

    every_n_steps: int = 50
    include: Patterns = None
    exclude: Patterns = None
    thresholds: Thresholds | None = None
    logdir: str | os.PathLike[str] | None = None
    writer: Any = None
    on_alert: OnAlert = "warn"
    histograms: bool = True
    images_every_n_samples: int = 20
    timeline_length: int = 100
    functional: bool = True
    sinks: Sequence[Sink] | None = None
    background: bool = True
    detectors: Sequence[Detector] | None = None
    gradients: bool = True
    run_config: Any = None
    probe: Any = None
    probe_every_n_samples: int = 20
    probe_labels: Any = None
    probe_loss_fn: Any = None
    attention: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.every_n_steps) or self.every_n_steps < 1:
            raise ValueError(f"Expected `every_n_steps` to be a positive integer, got {self.every_n_steps!r}.")
        validate_patterns("include", self.include)
        validate_patterns("exclude", self.exclude)
        if self.thresholds is not None and not isinstance(self.thresholds, Thresholds):
            raise TypeError(f"Expected `thresholds` to be a monitor.Thresholds, got {self.thresholds!r}.")
        if self.logdir is not None and self.writer is not None:
            raise ValueError("Expected either `logdir` or `writer`, got both.")
        check_logdir(self.logdir)
        check_writer(self.writer)
        check_on_alert(self.on_alert)
        for name in ("histograms", "functional", "background", "gradients", "attention"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Expected `{name}` to be True or False, got {getattr(self, name)!r}.")
        if not _is_int(self.images_every_n_samples) or self.images_every_n_samples < 0:
            raise ValueError(
                f"Expected `images_every_n_samples` to be a non-negative integer, got {self.images_every_n_samples!r}."
            )
        if not _is_int(self.timeline_length) or self.timeline_length < 2:
            raise ValueError(f"Expected `timeline_length` to be an integer >= 2, got {self.timeline_length!r}.")
        if self.sinks is not None:
            if isinstance(self.sinks, (Sink, str)) or not isinstance(self.sinks, Sequence):
                raise TypeError(f"Expected `sinks` to be None or a sequence of monitor.Sink objects, got {self.sinks!r}.")
            for s in self.sinks:
                if not isinstance(s, Sink):
                    raise TypeError(f"Expected `sinks` to hold monitor.Sink objects (subclass monitor.Sink), got {s!r}.")
        check_detectors(self.detectors)
        normalize_config(self.run_config)
        check_probe(self.probe, self.probe_every_n_samples, self.probe_labels, self.probe_loss_fn)
