"""``gate_saturated`` and ``hidden_saturated``: the gates and the hidden state of an ``nn.LSTM`` /
``nn.GRU`` (recomputed on sampled steps, :mod:`monitor.recurrent`) pinned at a bound.

A sigmoid gate at 0 or 1 on nearly every position is a switch that no longer moves: its
derivative is ~0, so it stops learning, and the layer's memory behaves the way the stuck gate
dictates (a forget gate at 1 never clears the cell state, at 0 keeps nothing from one step to
the next). Which bound matters, so the gate detector counts each bound separately (the
``at_high`` row beside ``at_bound``) and names it; the generic ``saturated`` detector does not
judge these points, so one pathology raises one alert.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.activations import Kind
from monitor.detectors.base import Detector, LayerView, Verdict, level, pct
from monitor.detectors.saturated import units_at_bound
from monitor.stats import AT_BOUND, AT_HIGH

#: Gate kind -> (the gate in words, what it does stuck at 1, what it does stuck at 0).
GATE_MEANING: dict[str, tuple[str, str, str]] = {
    "lstm_forget": (
        "forget gate", "always keeps its memory (the cell state is never cleared)",
        "always forgets (the cell state keeps nothing from one step to the next)",
    ),
    "lstm_input": ("input gate", "always writes the cell candidate into memory", "never writes to memory"),
    "lstm_output": ("output gate", "always exposes the whole cell state", "hides the cell state (the hidden state stays ~0)"),
    "gru_update": (
        "update gate", "always keeps its previous state (never takes in the input)",
        "always overwrites its state (keeps no memory)",
    ),
    "gru_reset": (
        "reset gate", "never resets (the candidate always sees the whole previous state)",
        "always resets (the candidate ignores the previous state)",
    ),
}


def _over(values: int, steps: int) -> str:
    return f"{values} values over the last {'sampled step' if steps == 1 else f'{steps} sampled steps'}"


class GateSaturated(Detector):
    """A gate unit is stuck at 1 (at 0) when it sits within ``saturation_tolerance`` of that bound
    (above 0.99 / below 0.01) on at least ``gate_saturated_positions`` of its values over the
    evidence, and switching when it sits at one bound or the other on that many (a huge init: a
    binary switch, ~0 gradient too); the gate (one gate of one layer and direction) alerts when
    ``gate_saturated_fraction`` of its units are saturated in any of these ways, once the evidence
    is complete. The message names the way most of them are and what the gate then does."""

    name = "gate_saturated"
    fields = ("gate_saturated_fraction", "gate_open_fraction", "gate_closed_fraction")
    reads = (AT_BOUND, AT_HIGH)
    windowed = (AT_BOUND, AT_HIGH)
    causes = (
        "gate pre-activations far from 0 (a bias init like +-20, weights grown by a learning rate too high or "
        "exploding gradients, unnormalised inputs); a stuck gate has ~0 gradient and no longer learns; try a "
        "forget-gate bias of ~1 and others 0, gradient clipping, a lower LR, normalised inputs"
    )

    def applies(self, kind: Kind) -> bool:
        return kind.rnn == "gate"

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        th, units = layer.thresholds, layer.units
        ev, high = layer.evidence(AT_BOUND), layer.evidence(AT_HIGH)
        if ev is None or high is None or not ev.values:
            return Verdict(None)
        need = th.gate_saturated_positions * ev.values
        at_one = np.flatnonzero(high.sums >= need)
        at_zero = np.flatnonzero(ev.sums - high.sums >= need)
        # At one bound or the other on nearly every value: a binary switch (a huge init), ~0 gradient too.
        switching = int(np.count_nonzero(ev.sums >= need)) - at_one.size - at_zero.size
        fraction = (at_one.size + at_zero.size + switching) / units
        gate, when_one, when_zero = GATE_MEANING.get(layer.kind.name, (layer.kind.name, "", ""))
        values, steps, tol = ev.values, ev.steps, th.saturation_tolerance

        def what() -> str:
            over = f"on >= {pct(th.gate_saturated_positions)} of {_over(values, steps)}"
            if switching > max(at_one.size, at_zero.size):
                text = (
                    f"gate saturated: {gate} switching between 0 and 1 (a binary switch with ~0 gradient); "
                    f"{switching}/{units} units ({pct(switching / units)}) sit below {tol:g} or above {1 - tol:g} {over}"
                )
                stuck = [f"{n} stuck at {b}" for n, b in ((at_one.size, "1"), (at_zero.size, "0")) if n]
                return text + (f" ({', '.join(stuck)})" if stuck else "") + f", threshold {pct(th.gate_saturated_fraction)}"
            ones = at_one.size >= at_zero.size
            bound, does, n = ("1", when_one, at_one.size) if ones else ("0", when_zero, at_zero.size)
            other, n_other = ("0", at_zero.size) if ones else ("1", at_one.size)
            side = f"above {1 - tol:g}" if ones else f"below {tol:g}"
            text = f"gate saturated: {gate} stuck at {bound}" + (f": {does}" if does else "")
            text += f"; {n}/{units} units ({pct(n / units)}) sit {side} {over}"
            more = [f"{n_other} more stuck at {other}"] if n_other else []
            more += [f"{switching} switching between 0 and 1"] if switching else []
            if more:
                text += f" ({', '.join(more)})"
            return text + f", threshold {pct(th.gate_saturated_fraction)}"

        metrics = {
            "gate_saturated_fraction": fraction,
            "gate_open_fraction": at_one.size / units,
            "gate_closed_fraction": at_zero.size / units,
            "gate_open_units": tuple(at_one.tolist()),
            "gate_closed_units": tuple(at_zero.tolist()),
        }
        bad, band = level(fraction, th.gate_saturated_fraction, th.release, ev.complete)
        return Verdict(bad, fraction, th.gate_saturated_fraction, what, metrics, band)


class HiddenSaturated(Detector):
    """A hidden-state unit is saturated when ``abs(h)`` is within ``saturation_tolerance`` of the
    range of 1 (above 0.98) on at least ``saturated_positions`` of its values over the evidence;
    the layer's hidden state alerts when ``saturated_fraction`` of its units are, once the
    evidence is complete (the numbers of ``saturated``: the hidden state is a tanh output)."""

    name = "hidden_saturated"
    fields = ("hidden_saturated_fraction",)
    reads = (AT_BOUND,)
    windowed = (AT_BOUND,)
    causes = (
        "an LSTM's cell state grown large (|c| >> 1) behind an open output gate, or recurrent weights too large "
        "(a GRU's state pinned at +-1): the units carry one bit and their gradient vanishes; try gradient "
        "clipping, a lower LR, a smaller (orthogonal) recurrent init, normalised inputs, a layer-normalised LSTM"
    )

    def applies(self, kind: Kind) -> bool:
        return kind.rnn == "hidden"

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        th, units = layer.thresholds, layer.units
        found = units_at_bound(layer)
        if found is None:
            return Verdict(None)
        ev, sat, fraction = found
        values, steps = ev.values, ev.steps
        lim = 1 - 2 * th.saturation_tolerance

        def what() -> str:  # built only when an alert needs it
            return (
                f"hidden saturated: {sat.size}/{units} units ({pct(fraction)}) of the hidden state sit at +-1 "
                f"(abs > {lim:g}) on >= {pct(th.saturated_positions)} of {_over(values, steps)}, "
                f"threshold {pct(th.saturated_fraction)}"
            )

        metrics = {"hidden_saturated_fraction": fraction, "hidden_saturated_units": tuple(sat.tolist())}
        bad, band = level(fraction, th.saturated_fraction, th.release, ev.complete)
        return Verdict(bad, fraction, th.saturated_fraction, what, metrics, band)
