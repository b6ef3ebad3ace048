"""The numbers behind the built-in detectors' verdicts: :class:`Thresholds`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}.")


def _fraction(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if not ok:
        raise ValueError(f"Expected `{name}` to be a number in (0, 1], got {value!r}.")


def _positive(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
    if not ok:
        raise ValueError(f"Expected `{name}` to be a positive finite number, got {value!r}.")


@dataclass(frozen=True)
class Thresholds:
    """When a layer counts as unhealthy. Defaults: silent on healthy runs, loud on clear pathologies.

    Evidence (dead, saturated, dormant):
        min_positions: values per unit a count-based verdict needs. A unit is judged over the most
            recent sampled steps that together hold this many values: one step when the batch is
            large enough, more when batches are small. Numbers are reported from the first
            sampled step on, over the values seen so far, with how many that is
            (``LayerHealth.evidence_values``); alerts wait until the evidence is complete.
        window: the most sampled steps evidence may span; evidence that spans this many steps
            counts as complete even with fewer than ``min_positions`` values (batch size 1 of a
            plain MLP: 100 sampled steps hold 100 values).

    Dead (ReLU family):
        dead_fraction: alert when at least this fraction of a ReLU layer's units are dead.
        dead_margin: a unit is dead for certain, without waiting for evidence, when its largest
            pre-activation on the sampled step sits below ``-dead_margin`` times the layer's
            pre-activation spread (the median over units of max - min pre-activation, never less
            than the typical size of the units that fired).

    Saturated (bounded activations):
        saturation_tolerance: fraction of the output range that counts as "at the bound"
            (0.01 on tanh: abs(y) >= 0.98; on sigmoid: y <= 0.01 or y >= 0.99).
        saturated_positions: a unit is saturated when at a bound on at least this fraction of
            its values.
        saturated_fraction: alert when at least this fraction of a bounded layer's units saturate.
            The hidden state of an LSTM/GRU (``hidden_saturated``) is judged with these numbers too.

    Recurrent gates (``nn.LSTM``/``nn.GRU`` input, forget, output, reset, update gates):
        gate_saturated_positions: a gate unit is stuck at 0 (at 1) when within
            ``saturation_tolerance`` of that bound on at least this fraction of its values.
        gate_saturated_fraction: alert when at least this fraction of a gate's units are stuck.

    Dormant (every activation; Sokar et al. 2023):
        dormant_tau: a unit is dormant when its mean abs(activation) is at most this times the
            layer's mean over units (ReLU-family units that are dead count as dead, not dormant).
        dormant_fraction: alert when at least this fraction of a layer's units are dormant.

    Exploding (every layer):
        max_rms, max_abs: absolute bounds on a layer's RMS and largest magnitude.
        growth_factor: alert when a layer's RMS exceeds this multiple of its own baseline
            (the median RMS of its first ``baseline_samples`` healthy sampled steps) ...
        growth_floor: ... never taken below this RMS: activations of healthy networks sit at O(1),
            and a layer that starts tiny (weights initialised with std 0.02) and grows up to O(1)
            is learning, not exploding.

    Gradients (on sampled steps whose backward runs inside ``Monitor.step``). The reference is the
    median gradient RMS of the (up to) three watched layers nearest the loss on the same step:
        vanishing_orders: a layer's gradient RMS this many orders of magnitude below the reference
            (1e-3) on ``vanishing_samples`` consecutive sampled steps is vanishing ...
        vanishing_orders_at_once: ... and at once this many orders below (1e-6).
        exploding_orders: a layer's gradient RMS this many orders above the reference is exploding
            (a gradient growing toward the input) ...
        grad_growth_factor: ... and so is one above this multiple of its own baseline (the median
            of its first ``baseline_samples`` judged sampled steps, never below the reference's
            own baseline: a gradient that starts orders below the layers nearest the loss and
            grows up to their level is not exploding), and ...
        max_grad_norm: ... the model's total gradient norm (all parameters) above this. Read where the
            integration reads gradients: before clipping in Lightning (and in skorch with the callback
            placed before ``GradientNormClipping``); in a plain loop and the Hugging Face Trainer when
            ``optimizer.step()`` begins, after any clipping, which then keeps it below the clip value.

    Collapse (stack blocks with ``[batch, tokens, width]`` outputs):
        collapse_similarity: alert when the tokens of a sequence have at least this mean pairwise
            cosine similarity (centred by the step's mean token; :mod:`monitor.tokens`).

    Attention heads (``nn.MultiheadAttention``, Hugging Face attention; :mod:`monitor.attention`):
        attention_entropy: a query whose normalised entropy (entropy / log(visible keys): 0 when it
            looks at one key, 1 when it spreads evenly) is at most this looks at one key (one-hot) ...
        attention_collapsed: ... and a head at least this share of whose queries are one-hot has
            collapsed ...
        attention_sink: ... and a head whose mean attention mass on the first token is at least
            this is a sink; either alerts when it holds ...
        attention_samples: ... on this many consecutive sampled steps.

    Entering and leaving an alert:
        release: hysteresis. A layer enters an alert at the threshold and leaves it only when
            its value is below ``release`` times the threshold ...
        recovery_samples: ... on this many consecutive judged sampled steps ("recovered").

    Example:
        >>> Thresholds(dead_fraction=0.25, window=10).dead_fraction
        0.25
    """

    min_positions: int = 100
    window: int = 100
    dead_fraction: float = 0.5
    dead_margin: float = 4.0
    saturation_tolerance: float = 0.01
    saturated_positions: float = 0.95
    saturated_fraction: float = 0.5
    gate_saturated_positions: float = 0.95
    gate_saturated_fraction: float = 0.5
    dormant_tau: float = 0.1
    dormant_fraction: float = 0.5
    max_rms: float = 1e3
    max_abs: float = 1e4
    growth_factor: float = 100.0
    growth_floor: float = 0.1
    baseline_samples: int = 3
    vanishing_orders: float = 3.0
    vanishing_orders_at_once: float = 6.0
    vanishing_samples: int = 2
    exploding_orders: float = 4.0
    grad_growth_factor: float = 100.0
    max_grad_norm: float = 1e3
    collapse_similarity: float = 0.9
    attention_entropy: float = 1e-5
    attention_collapsed: float = 0.95
    attention_sink: float = 0.98
    attention_samples: int = 3
    release: float = 0.8
    recovery_samples: int = 2

    def __post_init__(self) -> None:
        for name in (
            "min_positions", "window", "baseline_samples", "recovery_samples", "vanishing_samples", "attention_samples",
        ):
            _positive_int(name, getattr(self, name))
        for name in (
            "dead_fraction", "saturated_positions", "saturated_fraction", "dormant_fraction", "release", "collapse_similarity",
            "gate_saturated_positions", "gate_saturated_fraction",
            "attention_entropy", "attention_collapsed", "attention_sink",
        ):
            _fraction(name, getattr(self, name))
        ok = isinstance(self.saturation_tolerance, (int, float)) and 0 <= self.saturation_tolerance < 0.5
        if not ok:
            raise ValueError(
                f"Expected `saturation_tolerance` to be a number in [0, 0.5), got {self.saturation_tolerance!r}."
            )
        for name in (
            "max_rms", "max_abs", "growth_factor", "growth_floor", "dead_margin", "dormant_tau", "vanishing_orders",
            "vanishing_orders_at_once", "exploding_orders", "grad_growth_factor", "max_grad_norm",
        ):
            _positive(name, getattr(self, name))
        for name in ("growth_factor", "grad_growth_factor"):
            if getattr(self, name) <= 1:
                raise ValueError(f"Expected `{name}` to be greater than 1, got {getattr(self, name)!r}.")
        if self.vanishing_orders_at_once < self.vanishing_orders:
            raise ValueError(
                f"Expected `vanishing_orders_at_once` ({self.vanishing_orders_at_once!r}) to be at least "
                f"`vanishing_orders` ({self.vanishing_orders!r})."
            )
        if self.dormant_tau >= 1:
            raise ValueError(f"Expected `dormant_tau` to be a number in (0, 1), got {self.dormant_tau!r}.")


THRESHOLD_FIELDS = tuple(f.name for f in fields(Thresholds))
