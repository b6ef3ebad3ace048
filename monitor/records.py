"""What a sampled step becomes on the host: a :class:`SampleRecord` (plain numpy data, no
tensors) with a :class:`LayerSample` per watched layer, and the TensorBoard histogram fields of a
layer (:func:`histogram_fields`). Built by the ledger, read by every sink.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.alerts import Alert
from monitor.health import AttentionHealth, LayerHealth, ParameterHealth
from monitor.stats import UnitSummary, histogram_edges

_FLOAT_MAX = float(np.finfo(np.float64).max)


@dataclass
class HistogramData:
    """The fields of TensorBoard's ``HistogramProto`` (``SummaryWriter.add_histogram_raw``)."""

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


def histogram_fields(
    counts: np.ndarray, edges: Sequence[float], s: UnitSummary
) -> tuple[float, float, float, float, float, np.ndarray, np.ndarray] | None:
    """(min, max, num, sum, sum_squares, bucket limits, bucket counts) as TensorBoard stores them.

    Bucket ``i`` holds values in ``(edges[i-1], edges[i]]``; the last one is open above.
    Empty buckets at both ends are dropped (one is kept on the left), so sparse histograms stay
    small on disk. None when there is nothing to draw.
    """
    limits, centres = _limits_and_centres(edges)
    counts = np.asarray(counts, dtype=np.float64)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return None
    lo, hi = max(int(nz[0]) - 1, 0), int(nz[-1]) + 1  # keep one empty bucket on the left
    mn, mx, sq = s.lo, s.hi, s.total_sq
    if not (math.isfinite(mn) and math.isfinite(mx) and math.isfinite(sq)):
        mn = float(np.nanmin(np.where(np.isfinite(s.min), s.min, np.nan), initial=0.0))
        mx = float(np.nanmax(np.where(np.isfinite(s.max), s.max, np.nan), initial=0.0))
        sq = float(s.sumsq[np.isfinite(s.sumsq)].sum())
    kept = counts[lo:hi]
    # Values are not summed on the device (nothing reads the mean); estimate it from buckets.
    return mn, mx, float(kept.sum()), float(centres[lo:hi] @ kept), sq, limits[lo:hi], kept


_LIMITS: dict[int, tuple[Sequence[float], np.ndarray, np.ndarray]] = {}


def _limits_and_centres(edges: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Bucket upper limits and centres for ``edges`` (cached by identity: the edges are a constant)."""
    hit = _LIMITS.get(id(edges))
    if hit is not None and hit[0] is edges:
        return hit[1], hit[2]
    limits = np.append(np.asarray(edges, dtype=np.float64), _FLOAT_MAX)
    centres = np.concatenate([[limits[0]], (limits[:-2] + limits[1:-1]) / 2, [limits[-2]]])
    if len(_LIMITS) > 8:
        _LIMITS.clear()
    _LIMITS[id(edges)] = (edges, limits, centres)
    return limits, centres


@dataclass
class LayerSample:
    """One layer on one sampled step: its health and per-unit statistics.

    Derived views (``firing``, ``magnitude``, ``histogram()``) are computed on demand, i.e. on the
    sink's thread rather than the training thread.
    """

    name: str
    kind: str
    health: LayerHealth
    summary: UnitSummary
    hist_counts: np.ndarray | None = None  # raw bucket counts of the sampled values
    hist_scale: float = 1.0  # values represented per sampled value

    @property
    def firing(self) -> np.ndarray | None:
        """Per-unit fraction of values > 0 (ReLU-like kinds), else None."""
        s = self.summary
        return None if s.fired is None or not s.positions else s.fired / s.positions

    @property
    def magnitude(self) -> np.ndarray:
        """Per-unit RMS."""
        s = self.summary
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return np.sqrt(s.sumsq / max(s.positions, 1))

    def histogram(self) -> HistogramData | None:
        h = self.histogram_fields()
        if h is None:
            return None
        mn, mx, num, total, sq, limits, kept = h
        return HistogramData(mn, mx, num, total, sq, limits.tolist(), kept.tolist())

    def histogram_fields(self) -> tuple[float, float, float, float, float, np.ndarray, np.ndarray] | None:
        """:meth:`histogram` as numpy arrays (see :func:`histogram_fields`)."""
        if self.hist_counts is None:
            return None
        return histogram_fields(self.hist_counts * self.hist_scale, histogram_edges(), self.summary)


@dataclass
class SampleRecord:
    """Everything a sink needs about one sampled step."""

    step: int
    layers: list[LayerSample]
    alerts: list[Alert] = field(default_factory=list)
    parameters: list[ParameterHealth] = field(default_factory=list)  # when a backward ran inside the step
    attention: list[AttentionHealth] = field(default_factory=list)  # attention modules measured, in forward order
