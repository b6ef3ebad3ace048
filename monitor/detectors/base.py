"""The detector interface: one signal, one unit.

A :class:`Detector` declares what it reads (statistic rows of :mod:`monitor.stats`), which of
them it judges as evidence over recent sampled steps, the health numbers it adds (each becomes
``LayerHealth.<name>``, a TensorBoard scalar ``activation_<name>/<layer>`` and a logger metric),
and one line of likely causes and fixes. :meth:`Detector.evaluate` gets a :class:`LayerView`
(one layer on one sampled step) and returns a :class:`Verdict` as data; it does nothing else.
Remembering (evidence windows, baselines, active alerts, hysteresis) and acting (warn, raise,
stop, write) happen elsewhere: :mod:`monitor.judge`, :mod:`monitor.alerts`, the sinks.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from monitor.activations import Kind
from monitor.stats import UnitSummary
from monitor.thresholds import Thresholds


@dataclass(frozen=True)
class Evidence:
    """Per-unit sums of one statistic row over the most recent sampled steps.

    ``values`` per unit over ``steps`` sampled steps; ``complete`` once that reaches
    ``Thresholds.min_positions`` values or ``Thresholds.window`` steps (enough for a verdict).
    """

    sums: np.ndarray
    values: int
    steps: int
    complete: bool


@dataclass(frozen=True)
class Verdict:
    """What a detector concluded about one layer on one sampled step.

    ``bad``: True when the layer is unhealthy (at or beyond the entering level), False when it is
    clearly healthy (below the leaving level: ``Thresholds.release`` times the threshold), None
    when it cannot say (not enough evidence yet, a non-finite step) or the value lies between the
    two levels; then ``band=True`` says it was judged there (a recovery in progress starts over).
    ``value``/``threshold``: the number compared and its bound; ``what``: the state in words
    (``"dead: 3/8 units ..."``), or a function returning it (built only when an alert needs it);
    ``metrics``: the numbers it adds to ``LayerHealth``.
    """

    bad: bool | None
    value: float = math.nan
    threshold: float = math.nan
    what: str | Callable[[], str] = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    band: bool = False

    def describe(self) -> str:
        """``what`` as text."""
        return self.what() if callable(self.what) else self.what


class LayerView:
    """One watched layer on one sampled step, as a detector sees it (read-only)."""

    def __init__(
        self,
        name: str,
        kind: Kind,
        step: int,
        summary: UnitSummary,
        thresholds: Thresholds,
        rms: float,
        max_abs: float,
        nonfinite: int,
        evidence: Callable[[str], Evidence | None],
        grad: tuple[float, float, int] | None = None,
        grad_reference: float | None = None,
        grad_reference_growth: float | None = None,
        grad_norm: float | None = None,
        grad_norm_reference: float | None = None,
    ) -> None:
        self.name, self.kind, self.step, self.summary, self.thresholds = name, kind, step, summary, thresholds
        self.rms, self.max_abs, self.nonfinite = rms, max_abs, nonfinite
        self._evidence = evidence
        #: The gradient with respect to the layer's output on this step: RMS, largest magnitude and
        #: units with NaN/Inf in it (None when no backward reached it inside the sampled step).
        self.grad_rms, self.grad_max_abs, self.grad_nonfinite = grad if grad is not None else (None, None, None)
        #: The median gradient RMS of the (up to) three watched layers nearest the loss on this step.
        self.grad_reference = grad_reference
        #: That reference over its own baseline (its median over the first sampled steps).
        self.grad_reference_growth = grad_reference_growth
        #: Per unit, the L2 norm of the gradient over all the step's values (samples, positions,
        #: calls), RMS over units: ``grad_rms * sqrt(values per unit)``. A layer applied at many
        #: positions (a conv, a per-token layer) gets a small gradient at each and sums them into
        #: its shared weights; this counts them.
        self.grad_norm = grad_norm
        #: The median ``grad_norm`` of the (up to) three watched layers nearest the loss on this step.
        self.grad_norm_reference = grad_norm_reference

    @property
    def units(self) -> int:
        return self.summary.units

    def evidence(self, row: str) -> Evidence | None:
        """The row summed over the recent sampled steps (None: the row is not kept for this layer)."""
        return self._evidence(row)


class Detector:
    """Base class of every detector, built-in or yours.

    Subclass it, set the class attributes and implement :meth:`evaluate`; pass an instance in
    ``Monitor(..., detectors=[...])``. ``evaluate`` receives ``memory``, a dict that persists for
    this detector and layer across sampled steps and through ``Monitor.state_dict()`` (keep
    plain numbers, lists and strings in it).

    Example:
        >>> from monitor.stats import MAX
        >>> class TooQuiet(Detector):
        ...     name = "too_quiet"
        ...     fields = ("peak",)
        ...     reads = (MAX,)
        ...     causes = "a layer whose largest output stays below 0.1: check its init"
        ...     def evaluate(self, layer, memory):
        ...         peak = float(layer.summary.max.max())
        ...         return Verdict(peak < 0.1, peak, 0.1, f"too quiet: peak {peak:.3g}", {"peak": peak})
    """

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()  # numbers added to LayerHealth / scalars
    reads: ClassVar[tuple[str, ...]] = ()  # statistic rows read from the step's summary
    windowed: ClassVar[tuple[str, ...]] = ()  # rows read as evidence over recent sampled steps
    causes: ClassVar[str] = ""  # one line: likely causes and what to try

    def applies(self, kind: Kind) -> bool:
        """Whether this detector judges layers of ``kind`` (default: every layer)."""
        return True

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:  # pragma: no cover - interface
        raise NotImplementedError


def baseline(history: list[float]) -> float | None:
    """A baseline from its first values (the median; None while there are none)."""
    return float(statistics.median(history)) if history else None


def median(a: np.ndarray) -> float:
    """The (lower) median of a non-empty 1-d array: one partition, without np.median's overhead
    (detectors run once per layer per sampled step on the writer thread)."""
    k = (a.size - 1) // 2
    return float(np.partition(a, k)[k])


def pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def over(values: int, steps: int) -> str:
    return f"on {values} values each over the last {'sampled step' if steps == 1 else f'{steps} sampled steps'}"


def level(value: float, threshold: float, release: float, judged: bool) -> tuple[bool | None, bool]:
    """The usual entering/leaving rule, as ``(bad, band)``: bad at or above ``threshold``, clear
    below ``release * threshold``, in the band (None, True) between them, (None, False) when not
    ``judged``."""
    if not judged:
        return None, False
    if value >= threshold:
        return True, False
    if value < release * threshold:
        return False, False
    return None, True
