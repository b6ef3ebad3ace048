"""The probe: a fixed batch run through the model now and then, invisibly to training.

:func:`~monitor.probeinput.probe_input` checks and normalises what ``Monitor(..., probe=P)``
takes: a tensor (or a NumPy array), a dict of keyword inputs (``model(**P)``) or a pair
``(inputs, targets)``.
:func:`invisible` is the guarantee that a probe run changes nothing training can see: no
autograd graph (``no_grad``), every module in eval mode and then each one's own ``training`` flag
put back, the global random generators (torch CPU, CUDA, Python's ``random``, NumPy's) restored,
the sampled step's capture paused. :class:`ProbeRunner` runs the forward with a tapped capture
(:meth:`monitor.capture.Capture.tapped`): each watched output is reduced on its device to a
``[samples, units]`` matrix (the mean over the other positions: pixels of a conv output, tokens
of a sequence), and all of them reach the host in one transfer after the forward.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from monitor.capture import Capture
from monitor.functional import first_tensor
from monitor.probeinput import ProbeInput, probe_input  # noqa: F401 - probe_input: part of this module's API
from monitor.probemath import drift_on_device, favourites, row_order, top_k
from monitor.selection import WatchPoint


def _rng_state() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_rng_state(state: tuple[Any, ...]) -> None:
    cpu, cuda, py, npy = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    np.random.set_state(npy)


@contextlib.contextmanager
def invisible(model: nn.Module, capture: Capture | None = None) -> Iterator[None]:
    """Run a forward that training cannot notice: ``no_grad``, eval mode (each module's ``training``
    flag restored after, whatever it was), global RNG states restored, ``capture`` paused.

    The flags go back through ``train()``, as your own validation loop's ``model.train()`` would:
    a module whose ``train()`` does more than set its flag (a LoRA layer that merges its weights
    on ``eval()`` and unmerges them on ``train()``) sees the same calls as in that loop."""
    flags = [(m, m.training) for m in model.modules()]
    rng = _rng_state()
    paused = capture.paused if capture is not None else False
    if capture is not None:
        capture.paused = True
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:  # parents first: train() also sets the children, fixed after if they differ
            if m.training != flag:
                m.train(flag)
        _set_rng_state(rng)
        if capture is not None:
            capture.paused = paused


class TopInput(NamedTuple):
    """One of a unit's most exciting probe samples."""

    sample: int  # index into the probe
    value: float  # the unit's activation on it (mean over positions)
    label: Any  # its label, or None


class ProbeResult:
    """One probe run: per watched layer, the ``[samples, units]`` matrix and what follows from it.

    ``activations[layer]``: row ``i`` is probe sample ``i`` (the probe's order), column ``j`` unit
    ``j``: its activation, averaged over positions for conv (pixels) and sequence (tokens)
    outputs. ``drift[layer]``: ``1 - linear CKA`` against the previous probe run (absent on the
    first). ``changed[layer]``: units whose favourite sample (the one exciting them most) changed
    since the previous run; ``favourite_changes[layer]``: per unit, how often that happened over
    the run so far. ``loss``: the loss on the probe (targets and a loss function given).

    ``drift`` is computed on the matrices' device with the run and comes in the same transfer;
    ``changed`` and ``favourite_changes`` are computed when first read (the writer thread reads
    them for TensorBoard).
    """

    def __init__(
        self,
        step: int,
        activations: dict[str, np.ndarray],
        labels: list[Any] | None = None,
        loss: float | None = None,
        *,
        previous: ProbeResult | None = None,
        drift: dict[str, float] | None = None,
    ) -> None:
        self.step, self.activations, self.labels, self.loss = step, activations, labels, loss
        self.ablation: Any = None  # monitor.ablation.AblationEffect for mon.probe(ablate=...)
        self._previous = previous
        self._lock = threading.Lock()
        self._done = False
        self.drift: dict[str, float] = dict(drift or {})
        self._changed: dict[str, np.ndarray] = {}
        self._counts: dict[str, np.ndarray] = {}
        self._favourites: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"ProbeResult(step={self.step}, layers={self.layers}, loss={self.loss})"

    @property
    def changed(self) -> dict[str, np.ndarray]:
        self.finish()
        return self._changed

    @property
    def favourite_changes(self) -> dict[str, np.ndarray]:
        self.finish()
        return self._counts

    def finish(self) -> None:
        """Compute the favourites and their changes since the previous run (once; then forget it)."""
        with self._lock:
            if self._done:
                return
            prev = self._previous
            if prev is not None:
                prev.finish()
            for name, m in self.activations.items():
                fav = favourites(m)
                before = prev._favourites.get(name) if prev is not None else None
                counts = prev._counts.get(name) if prev is not None else None
                counts = np.zeros(fav.shape, np.int64) if counts is None or counts.shape != fav.shape else counts.copy()
                if before is not None and before.shape == fav.shape:
                    changed = np.flatnonzero(before != fav)
                    counts[changed] += 1
                    self._changed[name] = changed
                self._favourites[name], self._counts[name] = fav, counts
            self._previous, self._done = None, True

    @property
    def layers(self) -> list[str]:
        return list(self.activations)

    def top(self, layer: str, unit: int, k: int = 5) -> list[TopInput]:
        """The ``k`` probe samples that excite ``unit`` of ``layer`` most, largest first."""
        m = self.activations[layer]
        for name, v in (("unit", unit), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"Expected `{name}` to be an int, got {v!r}.")
        if not 0 <= unit < m.shape[1]:
            raise IndexError(f"{layer} has {m.shape[1]} units, got unit {unit}.")
        idx, vals = top_k(m, unit, k)
        return [TopInput(int(i), float(v), None if self.labels is None else self.labels[i]) for i, v in zip(idx, vals)]

    def order(self) -> np.ndarray:
        """The samples grouped by label: the row order of the heatmaps."""
        n = next(iter(self.activations.values())).shape[0] if self.activations else 0
        return row_order(self.labels, n)


@dataclass
class ProbeRecord:
    """What a sink's ``write_probe`` receives (on the writer thread): a probe run, or the text of a
    layer-importance table (``result`` None)."""

    result: ProbeResult | None
    step: int = 0
    importance: str | None = None

    def __post_init__(self) -> None:
        if self.result is not None:
            self.step = self.result.step


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer), None without one."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


class ProbeRunner:
    """Runs the probe on one model, keeps the previous run for drift and favourite changes."""

    def __init__(
        self,
        capture: Capture,
        probe: ProbeInput | None,
        loss_fn: Callable[..., Any] | None,
        warn_once: Callable[[str, str], None],
    ) -> None:
        self.capture = capture
        self.probe = probe
        self.loss_fn = loss_fn
        self._warn_once = warn_once
        self._tapped: Capture | None = None
        self._collect = _Collect(warn_once)  # the tap (no reference back: no cycle through the monitor)
        self.last: ProbeResult | None = None
        self._previous: dict[str, torch.Tensor] = {}  # the last run's matrices, on their device (drift)
        self.seconds = 0.0  # training-thread time spent in probe runs (benchmarks read it)
        self.runs = 0

    def set_probe(self, probe: ProbeInput) -> None:
        """A new probe: drift and favourites start over."""
        self.probe, self.last, self._previous = probe, None, {}

    def forward(
        self, model: nn.Module, loss_fn: Callable[..., Any] | None = None
    ) -> tuple[dict[str, np.ndarray], Any, float | None]:
        """One invisible probe forward: (matrices on the host, the output on its device, the loss
        by ``loss_fn`` or the runner's own, when the probe has targets)."""
        mats, out, loss = self._forward(model, loss_fn)
        host, scalars = _to_host(mats, {} if loss is None else {"loss": loss})
        return host, out, scalars.get("loss")

    def _forward(self, model: nn.Module, loss_fn: Callable[..., Any] | None) -> tuple[dict[str, torch.Tensor], Any, Any]:
        """The forward: matrices and the loss (a tensor) still on the device."""
        probe = self.probe
        if probe is None:
            raise RuntimeError("No probe: pass `probe=` to the Monitor (Lightning: probe='val' waits for a validation batch).")
        if self._tapped is None:
            self._tapped = self.capture.tapped(self._collect)
        inputs, targets = probe.on(model_device(model), model_dtype(model))
        collect = self._collect
        collect.samples, collect.sums = probe.samples, {}
        with invisible(model, self.capture):
            self._tapped.begin()
            try:
                out = call_model(model, inputs)
            finally:
                self._tapped.end()
                self._tapped.discovered = True  # producers are tracked again only if functional calls exist
            loss = None
            loss_fn = loss_fn if loss_fn is not None else self.loss_fn
            if loss_fn is not None and targets is not None:
                loss = torch.as_tensor(loss_fn(out, targets)).detach()
        sums, collect.sums = collect.sums, {}
        return {name: s / c for name, (s, c) in sums.items()}, out, loss

    def run(self, model: nn.Module, step: int, loss_fn: Callable[..., Any] | None = None) -> ProbeResult:
        """A probe run at ``step``: matrices, drift and favourite changes against the previous run."""
        t0 = time.perf_counter()
        mats, _, loss = self._forward(model, loss_fn)
        prev = self._previous
        scalars = {f"drift/{n}": drift_on_device(prev[n], m) for n, m in mats.items() if n in prev and prev[n].shape[0] == m.shape[0]}
        if loss is not None:
            scalars["loss"] = loss
        host, values = _to_host(mats, scalars)  # matrices, drifts and loss: one transfer
        self._previous = mats
        drifts = {k[len("drift/") :]: v for k, v in values.items() if k.startswith("drift/")}
        result = self.result(step, host, values.get("loss"), drifts)
        self.last = result
        self.seconds += time.perf_counter() - t0
        self.runs += 1
        return result

    def last_means(self, layer: str) -> np.ndarray | None:
        """Each unit's mean over the last probe run (``value="mean"`` ablations), or None."""
        last = self.last
        return None if last is None or layer not in last.activations else last.activations[layer].mean(axis=0)

    def result(self, step: int, mats: dict[str, np.ndarray], loss: float | None, drifts: dict[str, float]) -> ProbeResult:
        """The result of a run; its favourites against the previous run are computed later (the
        previous run's first, so at most two results are ever linked)."""
        prev = self.last
        if prev is not None:
            prev.finish()  # normally done already, by the writer thread
        labels = self.probe.labels if self.probe is not None else None
        return ProbeResult(step, mats, labels, loss, previous=prev, drift=drifts)


class _Collect:
    """The probe's tap: each watched output reduced to ``[samples, units]`` on its device."""

    def __init__(self, warn_once: Callable[[str, str], None]) -> None:
        self.warn_once = warn_once
        self.samples = 0
        self.sums: dict[str, list[Any]] = {}  # layer -> [sum of [samples, units] on the device, calls]

    def __call__(self, wp: WatchPoint, output: Any, inp: Any) -> None:
        x = output if isinstance(output, torch.Tensor) else first_tensor(output)
        if x is None or not x.is_floating_point() or x.ndim < 2 or wp.unit_dim is None:
            return
        unit = wp.unit_dim % x.ndim
        if x.shape[0] != self.samples or unit == 0:
            self.warn_once(
                f"probe-shape:{wp.name}",
                f"the probe cannot tell its samples apart in {wp.name} (output shape {tuple(x.shape)}, "
                f"{self.samples} probe samples expected in the first dimension); the layer is left out of probes",
            )
            return
        dims = tuple(d for d in range(1, x.ndim) if d != unit)
        m = x.detach().float()
        m = m.mean(dims) if dims else m  # [samples, units], reduced on the device
        acc = self.sums.get(wp.name)
        if acc is None:
            self.sums[wp.name] = [m, 1]
        elif acc[0].shape == m.shape:  # the same layer called again in this forward: averaged
            acc[0] = acc[0] + m
            acc[1] += 1
        return


def _to_host(mats: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Matrices and scalars to the host (as float32) in one transfer per device."""
    out: dict[str, Any] = {}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in [*mats.items(), *scalars.items()]:
        by_device.setdefault(t.device, []).append((name, t))
    for items in by_device.values():
        flat = torch.cat([t.reshape(-1).float() for _, t in items]).cpu().numpy()
        offset = 0
        for name, t in items:
            out[name] = flat[offset : offset + t.numel()].reshape(t.shape)
            offset += t.numel()
    return {name: out[name] for name in mats}, {name: float(out[name].reshape(-1)[0]) for name in scalars}
