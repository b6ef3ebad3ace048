"""Per-unit statistics: device-side partial reductions and their host-side summary.

Two halves that meet only through a flat float32 vector:

- :func:`unit_stats` and :func:`histogram_counts` run inside forward hooks. They read one
  activation on its own device and return small tensors, never syncing with the host.
- :func:`summarize` turns the host copy of those partials into per-unit numpy arrays.

Every row has a declared cross-call/cross-rank reduction (sum for counts, max for extrema), so
partials from several forward calls in one step, or from several DDP ranks, combine exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache

import numpy as np
import torch

from monitor.activations import Kind

# Row names and their reductions. NEGMIN stores -min so that every extremum row reduces by max.
FIRED, MAX, NEGMIN, SUMSQ, NONFINITE, AT_BOUND = "fired", "max", "negmin", "sumsq", "nonfinite", "at_bound"
MAX_ROWS = frozenset({MAX, NEGMIN})


def rows_for(kind: Kind) -> tuple[str, ...]:
    rows: list[str] = []
    if kind.fires:
        rows.append(FIRED)
    rows.append(MAX)
    if not kind.nonnegative:  # a ReLU's minimum is 0: no need to compute it
        rows.append(NEGMIN)
    rows += [SUMSQ, NONFINITE]
    if kind.bounded:
        rows.append(AT_BOUND)
    return tuple(rows)


def reduce_dims(ndim: int, unit_dim: int) -> tuple[int, ...]:
    unit_dim = unit_dim % ndim
    return tuple(d for d in range(ndim) if d != unit_dim)


def unit_stats(
    x: torch.Tensor,
    dims: tuple[int, ...],
    rows: tuple[str, ...],
    kind: Kind,
    lo_thr: float | None = None,
    hi_thr: float | None = None,
) -> torch.Tensor:
    """Per-unit partial statistics of one activation, shape ``[len(rows), units]``, float32.

    ``dims`` are the dimensions reduced away (all but the unit dimension). Runs on ``x``'s device
    with no host synchronisation; float16/bfloat16 inputs are reduced in float32. Pass a detached
    tensor (the hooks do): nothing here should be recorded by autograd.

    >>> t = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    >>> unit_stats(t, (0,), rows_for(Kind("x", fires=True)), Kind("x", fires=True))[0]
    tensor([1., 1.])
    """
    return torch.stack(unit_stat_rows(x, dims, rows, kind, lo_thr, hi_thr))


def unit_stat_rows(
    x: torch.Tensor,
    dims: tuple[int, ...],
    rows: tuple[str, ...],
    kind: Kind,
    lo_thr: float | None = None,
    hi_thr: float | None = None,
) -> list[torch.Tensor]:
    """:func:`unit_stats` as a list of ``[units]`` rows, not stacked.

    The monitor's hooks use this form: the rows of all layers are concatenated once, when the
    step ends, instead of once per layer and again per step.
    """
    if x.dtype != torch.float32:
        x = x.float()
    out: list[torch.Tensor] = []
    for row in rows:
        if row == FIRED:
            pos = x if kind.nonnegative else x.clamp(min=0)
            out.append(pos.sign().sum(dims))
        elif row == MAX:
            out.append(x.amax(dims))
        elif row == NEGMIN:
            out.append(x.amin(dims).neg_())
        elif row == SUMSQ:
            out.append((x * x).sum(dims))
        elif row == NONFINITE:
            # finite * 0 == 0, while nan * 0 and inf * 0 are nan: count those per unit.
            out.append((x * 0).nan_to_num_(nan=1.0).sum(dims))
        elif row == AT_BOUND:
            out.append(_at_bound(x, lo_thr, hi_thr).sum(dims))
    return out


def _at_bound(x: torch.Tensor, lo_thr: float | None, hi_thr: float | None) -> torch.Tensor:
    # Float arithmetic instead of comparisons: boolean kernels are several times slower on CPU.
    # (v - thr).clamp(min=0).sign() is 1 where v > thr and 0 elsewhere.
    if lo_thr is not None and hi_thr is not None:
        mid, half = (hi_thr + lo_thr) / 2, (hi_thr - lo_thr) / 2
        return (x - mid).abs_().sub_(half).clamp_(min=0).sign_()
    if hi_thr is not None:
        return (x - hi_thr).clamp_(min=0).sign_()
    assert lo_thr is not None
    return (lo_thr - x).clamp_(min=0).sign_()


# ---------------------------------------------------------------------------------------------
# Histograms: fixed, symmetric, geometrically spaced buckets (the shape TensorBoard itself uses),
# so binning needs no data-dependent range and therefore no host sync.

HIST_MAX_SAMPLES = 1024


@cache
def histogram_edges(lo_exp: int = -4, hi_exp: int = 6, per_decade: int = 8) -> tuple[float, ...]:
    """Bucket edges: 0, +-10**k for k from lo_exp to hi_exp in steps of 1/per_decade."""
    pos = [10 ** (lo_exp + i / per_decade) for i in range((hi_exp - lo_exp) * per_decade + 1)]
    return tuple([-p for p in reversed(pos)] + [0.0] + pos)


_EDGE_TENSORS: dict[torch.device, torch.Tensor] = {}


def _edges_on(device: torch.device) -> torch.Tensor:
    t = _EDGE_TENSORS.get(device)
    if t is None:
        t = _EDGE_TENSORS[device] = torch.tensor(histogram_edges(), dtype=torch.float32, device=device)
    return t


@lru_cache(maxsize=4096)
def sample_stride(numel: int, units: int) -> int:
    """A stride that keeps at most HIST_MAX_SAMPLES values and is coprime with the unit count.

    A stride sharing a factor with the number of units would only ever sample some units.
    """
    stride = max(1, math.ceil(numel / HIST_MAX_SAMPLES))
    while stride > 1 and math.gcd(stride, units) != 1:
        stride += 1
    return stride


def histogram_sample(x: torch.Tensor, stride: int) -> torch.Tensor:
    """A contiguous float32 copy of every ``stride``-th value of ``x`` (NaN -> 0), on x's device.

    The copy is what a hook keeps: binning waits until the end of the step, when the samples of
    all layers are binned together (:func:`histogram_counts_batched`), one kernel launch per step
    instead of per layer. NaN values are counted separately (the ``nonfinite`` row).
    """
    flat = x.reshape(-1)
    if stride > 1:
        flat = flat[::stride]
    return flat.float().nan_to_num(nan=0.0)  # a copy, hence contiguous and safe from later in-place ops


def histogram_counts(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Bucket counts of a strided sample of ``x`` (len(edges) + 1 buckets), on x's device."""
    return histogram_counts_batched([histogram_sample(x, stride)], [1])[0]


_LAYER_OFFSETS: dict[tuple, torch.Tensor] = {}


def histogram_counts_batched(samples: list[torch.Tensor], groups: list[int]) -> torch.Tensor:
    """Bucket counts of several histogram samples at once, ``[len(groups), buckets]`` float32.

    ``samples`` are :func:`histogram_sample` outputs, ``groups[i]`` says how many consecutive
    samples belong to histogram ``i`` (a module called twice in a step gives two). Everything stays
    on the samples' device: one bucketize and one bincount/index_add_ for all layers.
    """
    edges = _edges_on(samples[0].device)
    buckets = edges.numel() + 1
    flat = torch.cat(samples) if len(samples) > 1 else samples[0]
    idx = torch.bucketize(flat, edges)
    if len(groups) > 1:
        lengths = tuple(s.numel() for s in samples)
        key = (flat.device, lengths, tuple(groups))
        offsets = _LAYER_OFFSETS.get(key)
        if offsets is None:
            per_sample = [g for g, n in enumerate(groups) for _ in range(n)]
            offsets = torch.repeat_interleave(
                torch.tensor(per_sample, dtype=torch.int64) * buckets, torch.tensor(lengths, dtype=torch.int64)
            ).to(flat.device)
            if len(_LAYER_OFFSETS) >= 64:  # layouts change rarely (a new layer, a new batch size)
                _LAYER_OFFSETS.clear()
            _LAYER_OFFSETS[key] = offsets
        idx = idx + offsets
    total = len(groups) * buckets
    if flat.device.type == "cpu":
        counts = torch.bincount(idx, minlength=total).float()
    else:
        # bincount on an accelerator reads max(idx) back to size its output: a host sync. index_add_ does not.
        counts = torch.zeros(total, dtype=torch.float32, device=flat.device).index_add_(0, idx, torch.ones_like(flat))
    return counts.reshape(len(groups), buckets)


def histogram_counts_host(values: np.ndarray, lengths: Sequence[int] | None = None) -> np.ndarray:
    """The numpy twin of :func:`histogram_counts_batched`: bucket counts of sampled values.

    ``values`` holds the samples of one histogram, or, with ``lengths``, of ``len(lengths)``
    histograms one after the other (``lengths[i]`` values each); the result is then
    ``[len(lengths), buckets]``. Same buckets, same edge rule as ``torch.bucketize(right=False)``:
    a value equal to an edge goes to the bucket below it. The monitor's writer thread uses it for
    CPU models: no PyTorch kernel runs on that thread (CPU kernels called from a second thread
    slowed the training thread about 3x on a 2-core machine, likely through a second OpenMP team).
    """
    edges = _edges_np()
    buckets = edges.size + 1
    idx = np.searchsorted(edges, values, side="left")
    if lengths is None:
        return np.bincount(idx, minlength=buckets).astype(np.float64)
    idx += np.repeat(np.arange(len(lengths)) * buckets, lengths)
    return np.bincount(idx, minlength=len(lengths) * buckets).astype(np.float64).reshape(len(lengths), buckets)


@lru_cache(maxsize=1)
def _edges_np() -> np.ndarray:
    return np.asarray(histogram_edges(), dtype=np.float32)


def combine_rows(a: list[torch.Tensor], b: list[torch.Tensor], rows: tuple[str, ...]) -> list[torch.Tensor]:
    """Merge two partials of the same watch point (e.g. a module called twice in one step):
    maximum for extremum rows, sum for the others."""
    return [torch.maximum(x, y) if row in MAX_ROWS else x + y for x, y, row in zip(a, b, rows)]


# ---------------------------------------------------------------------------------------------
# Host side


@dataclass
class UnitSummary:
    """One watch point on one sampled step, per unit, on the host."""

    positions: int  # values seen per unit (batch x sequence x spatial, over all calls)
    fired: np.ndarray | None  # count of values > 0 per unit
    max: np.ndarray
    min: np.ndarray
    sumsq: np.ndarray
    nonfinite: np.ndarray
    at_bound: np.ndarray | None
    hist_counts: np.ndarray | None = None  # scaled to the full tensor
    hist_sampled: int = 0

    @property
    def units(self) -> int:
        return int(self.max.shape[0])

    # Layer-wide reductions, computed once (detection and the histogram both read them).
    @cached_property
    def hi(self) -> float:
        return float(self.max.max())

    @cached_property
    def lo(self) -> float:
        return float(self.min.min())

    @cached_property
    def total_sq(self) -> float:
        return float(self.sumsq.sum())


def summarize(block: np.ndarray, rows: tuple[str, ...], positions: int) -> UnitSummary:
    """Host numpy ``[len(rows), units]`` partials -> a :class:`UnitSummary`."""
    r = {name: block[i] for i, name in enumerate(rows)}
    return UnitSummary(
        positions=positions,
        fired=r.get(FIRED),
        max=r[MAX],
        min=-r[NEGMIN] if NEGMIN in r else np.zeros_like(r[MAX]),  # ReLU family: min is 0
        sumsq=r[SUMSQ],
        nonfinite=r[NONFINITE],
        at_bound=r.get(AT_BOUND),
    )


def safe_rms(sumsq: np.ndarray, count: float) -> float:
    """RMS over the finite per-unit sums (NaN units are reported as non-finite, not averaged in)."""
    finite = np.isfinite(sumsq)
    n = count * int(finite.sum())
    if n == 0:
        return float("nan")
    return float(math.sqrt(float(sumsq[finite].sum()) / n))
