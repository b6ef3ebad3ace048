"""What a verdict says about one layer: :class:`LayerHealth`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Every detector's declared numbers (``Detector.fields``), built-in or not, added by each Judge:
# ``health.<field>`` is None where that number was not judged (the layer is of another kind, no
# backward ran, the detector raised), and an unknown name stays an AttributeError (a typo).
_DECLARED: set[str] = set()


def declare_fields(names: Any) -> None:
    """Make ``health.<name>`` read None where the number is absent (see :class:`LayerHealth`)."""
    _DECLARED.update(names)


@dataclass(frozen=True)
class LayerHealth:
    """A layer's health at its latest sampled step.

    The base statistics (``rms``, ``max_abs``, ``nonfinite``, ``firing_rate``) are always there;
    every detector adds its own numbers to ``metrics`` (``dead_fraction``, ``dead_margin``,
    ``saturated_fraction``, ``dormant_fraction``, and those of your own detectors), readable as
    attributes too: ``health.dead_fraction``. A number that was not judged (a dead fraction of
    a tanh layer, ``grad_ratio`` on a step without backward) is ``None``; a name that no detector
    declares raises ``AttributeError``. Count-based numbers are computed over the values
    seen so far: ``evidence_values`` per unit over ``evidence_steps`` sampled steps (a verdict
    waits until that reaches ``Thresholds.min_positions`` or ``Thresholds.window`` steps).

    Example:
        >>> h = LayerHealth("fc.relu", "relu", 4, 0, rms=1.0, max_abs=2.0, nonfinite=0,
        ...                 metrics={"dead_fraction": 0.25, "dead_units": (3,)})
        >>> h.dead_fraction, h.dead_units, h.saturated_fraction
        (0.25, (3,), None)
    """

    layer: str
    kind: str
    units: int
    step: int
    rms: float
    max_abs: float
    nonfinite: int  # units that held NaN/Inf values this sampled step
    firing_rate: float | None = None  # mean fraction of values > 0 (ReLU-like kinds)
    evidence_values: int = 0  # values per unit behind the count-based numbers
    evidence_steps: int = 0  # sampled steps those values span
    metrics: Mapping[str, Any] = field(default_factory=dict)
    # The gradient with respect to the layer's output (None: no backward ran inside the sampled step).
    grad_rms: float | None = None
    grad_max_abs: float | None = None
    grad_nonfinite: int | None = None  # units whose gradient held NaN/Inf values

    # Built-in detectors' numbers, typed (others: ``health.<name>`` or ``health.metrics``).
    @property
    def dead_fraction(self) -> float | None:
        return self.metrics.get("dead_fraction")

    @property
    def dead_margin(self) -> float | None:
        """How far below zero the dead units' largest pre-activation sits, in pre-activation spreads."""
        return self.metrics.get("dead_margin")

    @property
    def saturated_fraction(self) -> float | None:
        return self.metrics.get("saturated_fraction")

    @property
    def dormant_fraction(self) -> float | None:
        return self.metrics.get("dormant_fraction")

    @property
    def dead_units(self) -> tuple[int, ...]:
        return self.metrics.get("dead_units", ())

    @property
    def saturated_units(self) -> tuple[int, ...]:
        return self.metrics.get("saturated_units", ())

    @property
    def dormant_units(self) -> tuple[int, ...]:
        return self.metrics.get("dormant_units", ())

    def __getattr__(self, name: str) -> Any:
        metrics = self.__dict__.get("metrics")
        if name.startswith("_") or metrics is None:
            raise AttributeError(name)
        if name in metrics:
            return metrics[name]
        if name in _DECLARED:
            return None  # a detector's number, not judged for this layer at this step
        raise AttributeError(f"{type(self).__name__!r} has no attribute or metric {name!r}")

    def scalars(self) -> dict[str, float]:
        """Every number of this health that has a value, by name (what sinks and loggers receive)."""
        out: dict[str, float] = {"rms": self.rms, "max_abs": self.max_abs, "nonfinite": float(self.nonfinite)}
        if self.firing_rate is not None:
            out["firing_rate"] = self.firing_rate
        if self.evidence_values:
            out["evidence_values"] = float(self.evidence_values)
        if self.grad_rms is not None:
            out["grad_rms"] = self.grad_rms
            out["grad_max_abs"] = float(self.grad_max_abs)  # type: ignore[arg-type]
            out["grad_nonfinite"] = float(self.grad_nonfinite or 0)
        for k, v in self.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
        return out


@dataclass(frozen=True)
class ParameterHealth:
    """One parameter tensor at the latest sampled step whose optimizer step ran inside the step.

    ``grad_norm``: the L2 norm of its gradient where the optimizer is about to use it: in a plain
    loop when ``optimizer.step()`` begins (after ``GradScaler`` unscaling, after any clipping you
    do before it); in Lightning at ``on_before_optimizer_step`` (accumulated, all-reduced,
    unscaled, *before* Lightning's clipping); in skorch at ``on_grad_computed``.
    ``update_ratio``: ``||w_after - w_before|| / ||w_before||`` over the optimizer step(s) inside
    the sampled step, from a fixed strided sample of at most 4096 elements (exact below that);
    ``None`` when the weight was all zeros (undefined). Practitioners read roughly 1e-4..1e-2 as
    "learning"; far below, the layer has stopped moving.

    Example:
        >>> ParameterHealth("fc.weight", 100, grad_norm=0.3, update_ratio=1e-3).update_ratio
        0.001
    """

    name: str
    step: int
    grad_norm: float | None
    update_ratio: float | None


@dataclass(frozen=True)
class AttentionHealth:
    """One attention module's heads at its latest sampled step (see :mod:`monitor.headstats`).

    Per head (tuples of length ``heads``), over the measured queries of the step (the first
    sequences of each call; queries that may see a single key left out):
    ``entropy``: the mean entropy of a query's attention distribution, in nats;
    ``normalized_entropy``: the mean of entropy / log(keys the query may see): 0 when every query
    looks at one key, 1 when it spreads evenly over all it may see;
    ``sink``: the mean attention mass on the first token (the first key a query may see);
    ``one_hot``: the share of queries that look at one key (normalised entropy at most
    ``Thresholds.attention_entropy``).
    NaN for a head with no measured query. ``queries``: the queries behind each mean.

    Example:
        >>> h = AttentionHealth("layers.0.self_attn", 10, 2, (2.1, 0.0), (0.9, 0.0), (0.1, 0.1), 512, (0.0, 1.0))
        >>> h.collapsed(0.9), h.sinks(0.98)
        ((1,), ())
    """

    name: str
    step: int
    heads: int
    entropy: tuple[float, ...]
    normalized_entropy: tuple[float, ...]
    sink: tuple[float, ...]
    queries: int
    one_hot: tuple[float, ...] = ()

    def collapsed(self, share: float) -> tuple[int, ...]:
        """Heads at least ``share`` of whose queries look at one key on this step."""
        return tuple(i for i, v in enumerate(self.one_hot) if v >= share)

    def sinks(self, threshold: float) -> tuple[int, ...]:
        """Heads whose first-token mass is at least ``threshold`` on this step."""
        return tuple(i for i, v in enumerate(self.sink) if v >= threshold)

    def scalars(self) -> dict[str, float]:
        """``entropy`` (mean over heads of the normalised entropy), ``entropy_min``, ``one_hot_max``
        (the largest share of one-hot queries of a head), ``sink`` (mean first-token mass over heads),
        ``sink_max``: heads with a value only."""
        ent = [v for v in self.normalized_entropy if v == v]
        sink = [v for v in self.sink if v == v]
        one_hot = [v for v in self.one_hot if v == v]
        out: dict[str, float] = {}
        if one_hot:
            out["one_hot_max"] = max(one_hot)
        if ent:
            out["entropy"] = sum(ent) / len(ent)
            out["entropy_min"] = min(ent)
        if sink:
            out["sink"] = sum(sink) / len(sink)
            out["sink_max"] = max(sink)
        return out
