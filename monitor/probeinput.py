"""What ``Monitor(..., probe=P, probe_labels=L)`` takes, checked and normalised.

``P``: a tensor or NumPy array (``model(P)``), a dict of keyword inputs (``model(**P)``, arrays
among them made tensors) or a pair ``(inputs, targets)``; the first dimension of the inputs (of
the first tensor of a dict) counts the samples. ``L``: one label per sample, or ``"targets"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monitor.functional import first_tensor

LABELS_FROM_TARGETS = "targets"


@dataclass
class ProbeInput:
    """A checked probe: model inputs (a tensor, or a dict for ``model(**inputs)``), optional targets."""

    inputs: Any
    targets: Any
    samples: int
    labels: list[Any] | None
    _moved: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
        """(inputs, targets) on ``device``, floating ones as ``dtype`` (the model's: a float64 NumPy
        probe into a float32 model), converted once, then cached."""
        key = f"{device}/{dtype}"
        if key not in self._moved:
            self._moved.clear()  # one device at a time
            self._moved[key] = (_to(self.inputs, device, dtype), _to(self.targets, device, dtype))
        return self._moved[key]


def _to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _tensor(x: Any, what: str) -> Any:
    if isinstance(x, np.ndarray):
        return torch.as_tensor(x)
    if isinstance(x, Mapping):
        return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(
        f"Expected `{what}` to be a tensor, a NumPy array, a dict of model inputs or a tuple (inputs, targets), "
        f"got {type(x).__name__}."
    )


def probe_input(probe: Any, labels: Any = None) -> ProbeInput:
    """Check and normalise a probe and its labels (one per sample, or ``"targets"``)."""
    targets = None
    if isinstance(probe, (tuple, list)):
        if len(probe) != 2:
            raise ValueError(f"Expected `probe` as a tuple/list to be (inputs, targets), got {len(probe)} elements.")
        probe, targets = probe
        targets = _tensor(targets, "probe targets")
    inputs = _tensor(probe, "probe")
    first = inputs if isinstance(inputs, torch.Tensor) else first_tensor(list(inputs.values()))
    if first is None or first.ndim == 0 or first.shape[0] == 0:
        raise ValueError(f"Expected `probe` to hold at least one sample (a tensor with a first, batch dimension), got {probe!r:.80}.")
    n = int(first.shape[0])
    if isinstance(labels, str) and labels == LABELS_FROM_TARGETS:
        if targets is None or not isinstance(targets, torch.Tensor) or targets.ndim != 1:
            raise ValueError('Expected `probe_labels="targets"` with a probe (inputs, targets) whose targets are one per sample.')
        labels = targets.tolist()
    if labels is not None:
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
            raise TypeError(f"Expected `probe_labels` to be a sequence with one label per probe sample, got {labels!r:.80}.")
        labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        if len(labels) != n:
            raise ValueError(f"Expected `probe_labels` to hold one label per probe sample ({n}), got {len(labels)}.")
    return ProbeInput(inputs, targets, n, labels)
