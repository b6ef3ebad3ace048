"""Ablation: silence chosen units of watched layers for whatever runs inside a block.

``with mon.ablate({"dense0.relu": [3, 7], "layers.2": "all"}):`` replaces those units' values by
0 (or, with ``value="mean"``, by each unit's mean over the last probe run, or by any number) in
every forward that runs inside the block. It works through a tapped capture
(:meth:`monitor.capture.Capture.tapped`): forward hooks on watched modules, registered before any
other hook so that everything else (a sampled step's statistics, a probe) sees the ablated output,
and the functional-activation mode for ``F.relu`` and friends, which returns the ablated output.
Nothing of the model is replaced; the hooks and the mode leave when the block ends, also when it
raises. The unit axis is the monitor's (features last, channels of conv outputs).

:func:`effect` compares a model's outputs (and losses) with and without an ablation.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from monitor.capture import Capture
from monitor.functional import first_tensor
from monitor.probe import ProbeResult, ProbeRunner
from monitor.probemath import drift
from monitor.selection import WatchPoint

ALL = "all"


def check_spec(spec: Any) -> dict[str, Any]:
    """``{layer: "all" | unit | [units]}`` -> ``{layer: "all" | sorted unique int array}``."""
    if not isinstance(spec, Mapping) or not spec:
        raise TypeError(f'Expected `ablate` to be a non-empty dict {{layer: "all" or a list of unit indices}}, got {spec!r:.80}.')
    out: dict[str, Any] = {}
    for layer, units in spec.items():
        if not isinstance(layer, str):
            raise TypeError(f"Expected the layers to ablate to be named by strings, got {layer!r}.")
        if isinstance(units, str):
            if units != ALL:
                raise ValueError(f'Expected the units of {layer!r} to be "all" or unit indices, got {units!r}.')
            out[layer] = ALL
            continue
        idx = np.atleast_1d(np.asarray(units.tolist() if isinstance(units, torch.Tensor) else units))
        if idx.size == 0 or idx.dtype.kind not in "iu" or (idx < 0).any():
            raise ValueError(f"Expected the units of {layer!r} to be non-negative unit indices, got {units!r:.80}.")
        out[layer] = np.unique(idx.astype(np.int64))
    return out


def check_value(value: Any) -> None:
    if isinstance(value, str) and value == "mean":
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return
    raise ValueError(f'Expected the ablation `value` to be a finite number (0.0: zero the units) or "mean", got {value!r}.')


class Ablation:
    """The ablation block (see the module docstring). ``means(layer)`` gives the per-unit means
    for ``value="mean"`` (from the last probe run). One block per object."""

    def __init__(
        self,
        capture: Capture,
        spec: Mapping[str, Any],
        value: float | str = 0.0,
        means: Callable[[str], np.ndarray | None] | None = None,
        warn_once: Callable[[str, str], None] | None = None,
        eager: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        self.spec = check_spec(spec)
        check_value(value)
        known = {wp.name for wp in capture.module_points} | {wp.name for wp in capture.calls.points.values() if wp.rows}
        unknown = [n for n in self.spec if n not in known]
        if unknown and (capture.discovered or not capture.functional):
            raise ValueError(f"Cannot ablate {unknown}: not a watched layer. Watched layers: {sorted(known)}.")
        self._warn_once = warn_once
        self._replace = _Replace(self.spec, value, means, warn_once)  # the tap: refers to nothing that refers to it
        self._capture = capture.tapped(self._replace, first=True)
        self._eager = eager  # a compiled model's forwards run their eager code in the block
        self.active = False  # inside the block
        self._entered = False

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Inside the block, forwards that must not be ablated (a probe run that a sampled step
        asked for, ``mon.probe()``): the units are left as they are."""
        prev = self._replace.suspended
        self._replace.suspended = True
        try:
            yield
        finally:
            self._replace.suspended = prev

    @property
    def seen(self) -> set[str]:
        """The layers whose units were replaced so far."""
        return self._replace.seen

    def __enter__(self) -> Ablation:
        if self._entered:
            raise RuntimeError("An ablation block is entered once: call `mon.ablate(...)` again for another block.")
        self._entered = True
        if self._eager is not None:
            self._eager.__enter__()
        try:
            self._capture.begin()
        except BaseException:
            if self._eager is not None:
                self._eager.__exit__(None, None, None)
            raise
        self.active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.active = False
        try:
            self._capture.end()
        finally:
            if self._eager is not None:
                self._eager.__exit__(None, None, None)
        missing = [n for n in self.spec if n not in self.seen]
        if exc_type is None and missing and self._warn_once is not None:
            self._warn_once(
                f"ablate-missing:{','.join(missing)}",
                f"ablation of {missing} was never applied: no forward inside the block ran such a watched layer",
            )


class _Replace:
    """The ablation's tap: the chosen units of a watched output replaced, out of place."""

    def __init__(self, spec: dict[str, Any], value: float | str, means: Any, warn_once: Any) -> None:
        self.spec, self.value, self.means, self.warn_once = spec, value, means, warn_once
        self.seen: set[str] = set()
        self.suspended = False  # a probe run inside the block sees the model as it is
        self.fills: dict[tuple[str, str, int], tuple[torch.Tensor, Any]] = {}

    def fill(self, name: str, x: torch.Tensor, unit: int) -> tuple[torch.Tensor, Any]:
        """(mask of the ablated units, broadcast along ``unit``; the fill value) for ``x``."""
        units = x.shape[unit]
        key = (name, str(x.device), units)
        hit = self.fills.get(key)
        if hit is not None:
            return hit
        chosen = self.spec[name]
        mask = torch.ones(units, dtype=torch.bool) if isinstance(chosen, str) else torch.zeros(units, dtype=torch.bool)
        if not isinstance(chosen, str):
            if chosen[-1] >= units:
                raise ValueError(f"Cannot ablate unit {int(chosen[-1])} of {name}: it has {units} units.")
            mask[torch.as_tensor(chosen)] = True
        shape = [1] * x.ndim
        shape[unit] = units
        fill: Any = float(self.value) if not isinstance(self.value, str) else None
        if fill is None:
            means = self.means(name) if self.means is not None else None
            if means is None or np.asarray(means).shape != (units,):
                raise ValueError(f'value="mean" needs a probe run that saw {name} ({units} units): call mon.probe() first.')
            fill = torch.as_tensor(np.asarray(means), dtype=torch.float32).view(shape).to(x.device)
        hit = self.fills[key] = (mask.view(shape).to(x.device), fill)
        return hit

    def __call__(self, wp: WatchPoint, output: Any, inp: Any) -> Any:
        if self.suspended or wp.name not in self.spec:
            return None
        x = output if isinstance(output, torch.Tensor) else first_tensor(output)
        if x is None or x.ndim == 0 or wp.unit_dim is None:
            return None
        mask, fill = self.fill(wp.name, x, wp.unit_dim % x.ndim)
        new = torch.where(mask, fill.to(x.dtype) if isinstance(fill, torch.Tensor) else fill, x)
        self.seen.add(wp.name)
        if wp.module is None and x is inp:  # an in-place functional call (x.relu_()): its result may be ignored
            with torch.no_grad():
                x.copy_(new)
            return x
        if x is output:
            return new
        if isinstance(output, tuple) and output and output[0] is x:
            return (new, *output[1:])
        if isinstance(output, list) and output and output[0] is x:
            return [new, *output[1:]]
        if self.warn_once is not None:
            self.warn_once(f"ablate-output:{wp.name}", f"cannot ablate {wp.name}: its output is a {type(output).__name__}")
        return None


@dataclass(frozen=True)
class AblationEffect:
    """What an ablation changed on the probe.

    ``output_change``: ||ablated output - output|| / ||output|| (the model's first output tensor,
    or a Hugging Face output's ``logits``; all probe samples; 0 = no change, 1 = as large as the
    output itself). ``prediction_change``:
    the fraction of samples (rows; tokens too for sequence outputs) whose argmax over the last
    dimension changed, for outputs with one. ``loss`` / ``base_loss``: the probe's loss with and
    without the ablation (targets and a loss function given); ``loss_change = loss - base_loss``.
    """

    layers: tuple[str, ...]
    output_change: float
    prediction_change: float | None
    loss: float | None
    base_loss: float | None

    @property
    def loss_change(self) -> float | None:
        return None if self.loss is None or self.base_loss is None else self.loss - self.base_loss


def effect(layers: Sequence[str], base: Any, ablated: Any, base_loss: float | None, loss: float | None) -> AblationEffect:
    """Compare two outputs of the same probe (tensors, or outputs holding one: a Hugging Face
    output's ``logits`` when it has them, not its ``loss``, which comes first when the probe holds
    ``labels``)."""
    b = first_tensor(_logits(base))
    a = first_tensor(_logits(ablated))
    if b is None or a is None or a.shape != b.shape:
        return AblationEffect(tuple(layers), float("nan"), None, loss, base_loss)
    b64, a64 = b.detach().double(), a.detach().double()
    norm = float(torch.linalg.vector_norm(b64))
    diff = float(torch.linalg.vector_norm(a64 - b64))
    if not (math.isfinite(norm) and math.isfinite(diff)):
        change = float("nan")  # NaN/Inf outputs: no ratio to speak of
    else:
        change = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    pred = None
    if b.ndim >= 2 and b.shape[-1] > 1 and b.is_floating_point():
        pred = float((a64.argmax(-1) != b64.argmax(-1)).double().mean())
    return AblationEffect(tuple(layers), change, pred, loss, base_loss)


def _logits(output: Any) -> Any:
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output


def importance_table(effects: Mapping[str, AblationEffect]) -> str:
    """A Markdown table, most important layer first (by loss change, else output change)."""
    def key(item: tuple[str, AblationEffect]) -> float:
        e = item[1]
        v = e.loss_change if e.loss_change is not None else e.output_change
        return math.inf if math.isnan(v) else -v

    lines = ["| layer ablated (all units) | output change | predictions changed | loss change |", "|---|---|---|---|"]
    for name, e in sorted(effects.items(), key=key):
        pred = "-" if e.prediction_change is None else f"{e.prediction_change:.1%}"
        loss = "-" if e.loss_change is None else f"{e.loss_change:+.4g} ({e.base_loss:.4g} -> {e.loss:.4g})"
        lines.append(f"| {name} | {e.output_change:.3g} | {pred} | {loss} |")
    return "\n".join(lines)


def ablated_probe(
    runner: ProbeRunner, model: nn.Module, spec: Mapping[str, Any], value: float | str, loss_fn: Any, step: int,
    warn_once: Callable[[str, str], None],
) -> ProbeResult:
    """The probe run as is and with ``spec`` ablated (``value="mean"``: the means of the first run):
    the ablated run's matrices, ``drift`` against the unablated run and the :class:`AblationEffect`."""
    base, base_out, base_loss = runner.forward(model, loss_fn)
    unknown = [n for n in check_spec(spec) if n not in base]
    if unknown:  # the probe's own forward just showed which watched layers it reaches
        raise ValueError(f"Cannot ablate {unknown}: not a watched layer that the probe reaches. Those are: {list(base)}.")
    with Ablation(runner.capture, spec, value, means=functools.partial(_means, base), warn_once=warn_once) as abl:
        mats, out, loss = runner.forward(model, loss_fn)
    moved = {n: drift(base[n], m) for n, m in mats.items() if n in base and base[n].shape == m.shape}
    result = ProbeResult(step, mats, runner.probe.labels if runner.probe is not None else None, loss, drift=moved)
    result.ablation = effect(list(abl.spec), base_out, out, base_loss, loss)
    return result


def layer_importance(
    runner: ProbeRunner, model: nn.Module, value: float | str, loss_fn: Any, warn_once: Callable[[str, str], None]
) -> dict[str, AblationEffect]:
    """Each layer the probe reaches ablated whole, in turn: ``{layer: AblationEffect}`` in forward order."""
    base, base_out, base_loss = runner.forward(model, loss_fn)
    effects: dict[str, AblationEffect] = {}
    for name in base:
        with Ablation(runner.capture, {name: ALL}, value, means=functools.partial(_means, base), warn_once=warn_once):
            _, out, loss = runner.forward(model, loss_fn)
        effects[name] = effect([name], base_out, out, base_loss, loss)
    return effects


def _means(mats: Mapping[str, np.ndarray], layer: str) -> np.ndarray | None:
    m = mats.get(layer)
    return None if m is None else m.mean(axis=0)
