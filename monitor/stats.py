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
from functools import cache, lru_cache

import numpy as np
import torch

from monitor.activations import Kind
from monitor.tokens import INPUT_SQ, TOKEN_ROWS, TOKEN_SEQS, TOKEN_SIM, UPDATE_SQ, token_rows

# Row names and their reductions. NEGMIN stores -min so that it reduces by max like MAX.
FIRED, MAX, NEGMIN, SUMSQ, NONFINITE, AT_BOUND = "fired", "max", "negmin", "sumsq", "nonfinite", "at_bound"
SUMABS = "sumabs"  # sum of |value| per unit (mean |activation|: dormant units)
AT_HIGH = "at_high"  # recurrent gates: values at the upper bound (at_bound - at_high: at the lower one)
# Rows of a ReLU-family layer's *input* (its pre-activation), read in a forward pre-hook, before an
# in-place ReLU overwrites it: how far below zero a silent unit sits.
PRE_MAX, PRE_MIN = "pre_max", "pre_min"
# Rows of the gradient with respect to a watched output, read by a tensor hook during backward:
# per-unit sum of squares and largest magnitude (NaN/Inf where a value was: amax propagates them).
GRAD_SUMSQ, GRAD_MAX = "grad_sumsq", "grad_max"
GRAD_ROWS = (GRAD_SUMSQ, GRAD_MAX)
_SMALL = 1 << 16  # elements: below, per-kernel overhead dominates memory traffic
MAX_ROWS = frozenset({MAX, NEGMIN, PRE_MAX, GRAD_MAX})
MIN_ROWS = frozenset({PRE_MIN})
PRE_ROWS = (PRE_MAX, PRE_MIN)
ALL_ROWS = frozenset({FIRED, MAX, NEGMIN, SUMSQ, NONFINITE, AT_BOUND, AT_HIGH, SUMABS, PRE_MAX, PRE_MIN, *TOKEN_ROWS})


def rows_for(kind: Kind, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The statistic rows computed for an output of ``kind`` (plus ``extra`` rows a detector reads).

    Every output gets its extrema and sum of squares (a unit held NaN/Inf where an extremum is
    NaN/Inf: no row of its own). ReLU-family outputs get
    their pre-activation extrema (instead of the output's maximum where that is
    ``max(pre_max, 0)``), and the firing count; bounded outputs the count at a bound; activations (not blocks or other
    modules) the sum of magnitudes; stack blocks the sequence rows of :mod:`monitor.tokens`.
    """
    rows: list[str] = []
    if kind.can_die:
        rows += PRE_ROWS
    if kind.fires:
        rows.append(FIRED)
    if not kind.clamps:
        rows.append(MAX)
    if not kind.nonnegative:  # a ReLU's minimum is 0: no need to compute it
        rows.append(NEGMIN)
    rows.append(SUMSQ)  # NaN/Inf per unit: read from the extrema on the host (amax/amin propagate them)
    if kind.bounded:
        rows.append(AT_BOUND)
    if kind.rnn == "gate":  # which bound a stuck gate sits at (monitor.detectors.gates)
        rows.append(AT_HIGH)
    if kind.activation:
        rows.append(SUMABS)
    tokens = kind.name == "block" or any(r in TOKEN_ROWS for r in extra)
    for r in extra:
        if r not in rows and r not in TOKEN_ROWS:
            rows.append(r)
    if tokens:  # last: the hooks append them after the other rows (monitor.tokens: 3-d outputs only)
        rows += TOKEN_ROWS
    return tuple(rows)


def pre_stat_rows(z: torch.Tensor, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """The PRE_MAX and PRE_MIN rows of a ReLU's input ``z`` (float32, on z's device, no sync)."""
    if z.dtype != torch.float32:
        z = z.float()
    return [z.amax(dims), z.amin(dims)]


def grad_stat_rows(g: torch.Tensor, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """The GRAD_ROWS of a gradient ``g`` with respect to a watched output (float32, on g's device, no sync).

    >>> [r.tolist() for r in grad_stat_rows(torch.tensor([[3.0, -1.0], [-4.0, float("nan")]]), (0,))]
    [[25.0, nan], [4.0, nan]]
    """
    if g.dtype != torch.float32:
        g = g.float()
    if g.numel() < _SMALL:  # fewer kernels
        return [(g * g).sum(dims), g.abs().amax(dims)]
    return [(g * g).sum(dims), torch.maximum(g.amax(dims), g.amin(dims).neg_())]  # no |g| temporary


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

    ``dims`` are the dimensions reduced away (all but the unit dimension); pre-activation rows, if
    any, are taken from ``x`` itself here (the hooks read them from the layer's input). Runs on ``x``'s device
    with no host synchronisation; float16/bfloat16 inputs are reduced in float32. Pass a detached
    tensor (the hooks do): nothing here should be recorded by autograd.

    >>> t = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    >>> unit_stats(t, (0,), rows_for(Kind("x", fires=True)), Kind("x", fires=True))[0]
    tensor([1., 1.])
    """
    pre = pre_stat_rows(x, dims) if PRE_MAX in rows else []
    out = pre + unit_stat_rows(x, dims, rows, kind, lo_thr, hi_thr)
    if TOKEN_SIM in rows:
        out += block_token_rows(x, None, 1, out[0].shape[0])
    return torch.stack(out)


def block_token_rows(
    x: torch.Tensor, inp: torch.Tensor | None, token_dim: int, units: int, mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The TOKEN_ROWS of a block's output: :func:`monitor.tokens.token_rows` for a 3-d output
    whose last dimension holds the units (``mask``: the model's ``attention_mask``, if it has one),
    zero rows (no sequences) otherwise."""
    if x.ndim == 3 and x.shape[-1] == units:
        return token_rows(x, inp, token_dim, mask)[0]
    z = torch.zeros(units, dtype=torch.float32, device=x.device)
    return [z] * len(TOKEN_ROWS)


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
    return [_REDUCERS[row](x, dims, kind, lo_thr, hi_thr) for row in rows if row not in _NOT_HERE]


def _fired(x: torch.Tensor, dims: tuple[int, ...], kind: Kind, lo: float | None, hi: float | None) -> torch.Tensor:
    return (x if kind.nonnegative else x.clamp(min=0)).sign().sum(dims)


def _nonfinite(x: torch.Tensor, dims: tuple[int, ...], kind: Kind, lo: float | None, hi: float | None) -> torch.Tensor:
    # finite * 0 == 0, while nan * 0 and inf * 0 are nan: count those per unit.
    return (x * 0).nan_to_num_(nan=1.0).sum(dims)


_NOT_HERE = frozenset((*PRE_ROWS, *TOKEN_ROWS))  # rows the hooks compute from more than the output

_REDUCERS = {
    FIRED: _fired,
    MAX: lambda x, dims, kind, lo, hi: x.amax(dims),
    NEGMIN: lambda x, dims, kind, lo, hi: x.amin(dims).neg_(),
    SUMSQ: lambda x, dims, kind, lo, hi: (x * x).sum(dims),
    NONFINITE: _nonfinite,
    AT_BOUND: lambda x, dims, kind, lo, hi: _at_bound(x, lo, hi).sum(dims),
    AT_HIGH: lambda x, dims, kind, lo, hi: _at_bound(x, None, hi).sum(dims),
    SUMABS: lambda x, dims, kind, lo, hi: x.sum(dims) if kind.nonnegative else x.abs().sum(dims),
}


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
    idx += _histogram_offsets(tuple(lengths), buckets)
    return np.bincount(idx, minlength=len(lengths) * buckets).astype(np.float64).reshape(len(lengths), buckets)


@lru_cache(maxsize=64)
def _histogram_offsets(lengths: tuple[int, ...], buckets: int) -> np.ndarray:
    """Each sampled value's histogram offset (``i * buckets`` for the values of histogram ``i``)."""
    out = np.repeat(np.arange(len(lengths)) * buckets, lengths)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=1)
def _edges_np() -> np.ndarray:
    return np.asarray(histogram_edges(), dtype=np.float32)


def combine_rows(a: list[torch.Tensor], b: list[torch.Tensor], rows: tuple[str, ...]) -> list[torch.Tensor]:
    """Merge two partials of the same watch point (e.g. a module called twice in one step):
    maximum / minimum for extremum rows, sum for the others."""
    return [
        torch.maximum(x, y) if row in MAX_ROWS else torch.minimum(x, y) if row in MIN_ROWS else x + y
        for x, y, row in zip(a, b, rows)
    ]


def reduce_rows_host(parts: np.ndarray, rows: Sequence[Sequence[str]], units: Sequence[int]) -> np.ndarray:
    """Combine ``[ranks, n]`` host partials whose first entries are consecutive ``[rows, units]``
    blocks (one per watch point): max / min for extremum rows, sum for everything else (counts,
    sums, and whatever follows the blocks)."""
    out = parts.sum(axis=0)
    offset = 0
    for block_rows, c in zip(rows, units):
        for row in block_rows:
            if row in MAX_ROWS:
                out[offset : offset + c] = parts[:, offset : offset + c].max(axis=0)
            elif row in MIN_ROWS:
                out[offset : offset + c] = parts[:, offset : offset + c].min(axis=0)
            offset += c
    return out


# ---------------------------------------------------------------------------------------------
# Small CPU activations: one copy in the hook, the rows computed here, off the training thread.
# A kernel called from a hook in the middle of a training step runs with cold caches (~20 us each
# on a 128 x 256 activation, ~4x its warm cost), so for small CPU tensors the hook's nine kernels
# cost more than one copy; numpy (not PyTorch) reduces the copy on the writer thread (see unpack).

HOST_ROWS = frozenset({FIRED, MAX, NEGMIN, SUMSQ, NONFINITE, AT_BOUND, AT_HIGH, SUMABS, PRE_MAX, PRE_MIN})


def host_stat_rows(
    x: np.ndarray,
    pre: np.ndarray | None,
    dims: tuple[int, ...],
    rows: tuple[str, ...],
    kind: Kind,
    lo_thr: float | None = None,
    hi_thr: float | None = None,
) -> np.ndarray:
    """The numpy twin of :func:`pre_stat_rows` + :func:`unit_stat_rows` for a float32 host array:
    ``[len(rows), units]`` float64, the same numbers up to float32 rounding of the sums (squares are
    taken in float32, so they overflow to +inf where the device's would). ``pre`` is a ReLU's input
    (the output stands in where it is None). Every row must be in :data:`HOST_ROWS`.

    >>> host_stat_rows(np.array([[0.0, 2.0], [1.0, -1.0]], np.float32), None, (0,), ("fired", "max"), Kind("x"))
    array([[1., 1.],
           [1., 2.]])
    """
    out = []
    with np.errstate(all="ignore"):
        for row in rows:
            if row == PRE_MAX:
                v = (x if pre is None else pre).max(axis=dims)
            elif row == PRE_MIN:
                v = (x if pre is None else pre).min(axis=dims)
            elif row == FIRED:
                v = (x > 0).sum(axis=dims, dtype=np.int32)  # NaN > 0 is False, like torch.sign(NaN) == 0
            elif row == MAX:
                v = x.max(axis=dims)
            elif row == NEGMIN:
                v = -x.min(axis=dims)
            elif row == SUMSQ:
                v = _sumsq(x, dims)
            elif row == NONFINITE:
                v = (~np.isfinite(x)).sum(axis=dims, dtype=np.int32)
            elif row == AT_BOUND or row == AT_HIGH:
                lo = lo_thr if row == AT_BOUND else None
                if lo is not None and hi_thr is not None:
                    mid, half = (hi_thr + lo) / 2, (hi_thr - lo) / 2
                    v = (np.abs(x - np.float32(mid)) > half).sum(axis=dims, dtype=np.int32)
                elif hi_thr is not None:
                    v = (x > hi_thr).sum(axis=dims, dtype=np.int32)
                else:
                    v = (x < lo).sum(axis=dims, dtype=np.int32)
            elif row == SUMABS:
                v = (x if kind.nonnegative else np.abs(x)).sum(axis=dims)
            else:
                raise ValueError(f"row {row!r} is not computed on the host")
            out.append(v)
    return np.asarray(out, dtype=np.float64)


def host_grad_rows(g: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """The numpy twin of :func:`grad_stat_rows`: ``[len(GRAD_ROWS), units]`` float64.

    >>> host_grad_rows(np.array([[3.0, -1.0], [-4.0, np.nan]], np.float32), (0,)).tolist()
    [[25.0, nan], [4.0, nan]]
    """
    with np.errstate(all="ignore"):
        return np.asarray([_sumsq(g, dims), np.abs(g).max(axis=dims)], dtype=np.float64)


def _sumsq(x: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """Per-unit sums of float32 squares (inf where a square overflows, as on the device)."""
    if x.ndim == 2 and dims == (0,):
        return np.einsum("ij,ij->j", x, x)  # one pass, no temporary
    return np.square(x).sum(axis=dims)


def combine_host(blocks: list[np.ndarray], rows: Sequence[str]) -> np.ndarray:
    """Merge the host rows of several calls of one watch point (see :func:`combine_rows`)."""
    if len(blocks) == 1:
        return blocks[0]
    shape = blocks[0].shape
    return reduce_rows_host(np.stack([b.reshape(-1) for b in blocks]), [rows], [shape[1]]).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Host side


class _once:  # noqa: N801 - used like functools.cached_property
    """A lazily computed attribute, cached in the instance: ``functools.cached_property`` without
    its lock (Python 3.11 takes an RLock on every first access; here, once per layer per step)."""

    def __init__(self, fn):  # type: ignore[no-untyped-def]
        self.fn, self.name = fn, fn.__name__

    def __get__(self, obj, cls=None):  # type: ignore[no-untyped-def]
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass
class UnitSummary:
    """One watch point on one sampled step, per unit, on the host."""

    positions: int  # values seen per unit (batch x sequence x spatial, over all calls)
    fired: np.ndarray | None  # count of values > 0 per unit
    max: np.ndarray
    min: np.ndarray
    sumsq: np.ndarray
    nonfinite: np.ndarray  # > 0 where the unit held NaN/Inf (1, or its value count if the row was computed)
    at_bound: np.ndarray | None
    sumabs: np.ndarray | None = None  # sum of |value| per unit (activation kinds)
    pre_max: np.ndarray | None = None  # ReLU family: largest / smallest pre-activation per unit
    pre_min: np.ndarray | None = None
    grad: GradSummary | None = None  # the gradient with respect to this output; None: no backward seen
    token_sim: np.ndarray | None = None  # stack blocks: the sequence rows of monitor.tokens
    update_sq: np.ndarray | None = None
    input_sq: np.ndarray | None = None
    token_seqs: np.ndarray | None = None  # its entries sum to the sequences that added to token_sim
    at_high: np.ndarray | None = None  # recurrent gates: values at the upper bound per unit

    @property
    def units(self) -> int:
        return int(self.max.shape[0])

    # Layer-wide reductions, computed once (detection and the histogram both read them).
    @_once
    def hi(self) -> float:
        return float(self.max.max())

    @_once
    def lo(self) -> float:
        return float(self.min.min())

    @_once
    def total_sq(self) -> float:
        return float(self.sumsq.sum())


@dataclass
class GradSummary:
    """The gradient with respect to one watched output on one sampled step, per unit, on the host."""

    positions: int  # gradient values per unit (over every backward of the step)
    sumsq: np.ndarray
    max: np.ndarray  # largest magnitude; NaN/Inf where the unit's gradient held NaN/Inf

    def numbers(self) -> tuple[float, float, int]:
        """(RMS, largest magnitude, units whose gradient held NaN/Inf), the first two over the other
        units; the RMS is +inf when a float32 sum of finite squares overflowed."""
        with np.errstate(all="ignore"):
            top = float(np.maximum.reduce(self.max)) if self.max.size else math.nan
            if math.isfinite(top):  # every unit finite (amax propagates NaN/Inf): no masks needed
                n = self.positions * self.max.size
                return (math.sqrt(float(np.add.reduce(self.sumsq)) / n) if n else math.nan), top, 0
            finite = np.isfinite(self.max)
            nonfinite = int((~finite).sum())
            rms = safe_rms(np.where(finite, self.sumsq, np.nan), self.positions)
            max_abs = float(self.max[finite].max()) if finite.any() else float("nan")
        return rms, max_abs, nonfinite


def summarize_grad(block: np.ndarray, positions: int) -> GradSummary:
    """Host ``[len(GRAD_ROWS), units]`` partials -> a :class:`GradSummary` in float64."""
    block = np.asarray(block, dtype=np.float64)
    return GradSummary(positions, block[0], block[1])


def summarize(block: np.ndarray, rows: tuple[str, ...], positions: int, upper: float | None = None) -> UnitSummary:
    """Host ``[len(rows), units]`` partials -> a :class:`UnitSummary` in float64.

    float64 so that layer-wide sums of large per-unit sums never overflow. ``upper`` is the
    ReLU family's upper bound (``relu6``), used to derive the output maximum from PRE_MAX.
    """
    block = np.asarray(block, dtype=np.float64)
    r = {name: block[i] for i, name in enumerate(rows)}
    pre_max = r.get(PRE_MAX)
    if MAX in r:
        mx = r[MAX]
    else:  # ReLU family: the output's maximum is the clipped pre-activation maximum
        mx = np.maximum(pre_max, 0.0)
        if upper is not None:
            mx = np.minimum(mx, upper)
    mn = -r[NEGMIN] if NEGMIN in r else None  # ReLU family: min is 0
    nonfinite = r.get(NONFINITE)  # a value count, when a detector asked for the row
    if nonfinite is None:  # a unit held NaN/Inf iff an extremum is NaN/Inf (the reductions propagate them)
        if all_finite(mx) and (mn is None or all_finite(mn)):
            nonfinite = np.zeros(mx.shape)
        else:
            nonfinite = (~(np.isfinite(mx) & (True if mn is None else np.isfinite(mn)))).astype(np.float64)
    if mn is None:
        mn = np.zeros(mx.shape)
    fired = r.get(FIRED)
    if fired is not None and np.maximum.reduce(nonfinite, initial=0.0) > 0:
        # torch.sign(NaN) is 0: a unit that saw NaN/Inf did not "not fire"; its count is unknown.
        fired = np.where(nonfinite > 0, np.nan, fired)
    return UnitSummary(
        positions=positions,
        fired=fired,
        max=mx,
        min=mn,
        sumsq=r[SUMSQ],
        nonfinite=nonfinite,
        at_bound=r.get(AT_BOUND),
        sumabs=r.get(SUMABS),
        at_high=r.get(AT_HIGH),
        pre_max=pre_max,
        pre_min=r.get(PRE_MIN),
        token_sim=r.get(TOKEN_SIM),
        update_sq=r.get(UPDATE_SQ),
        input_sq=r.get(INPUT_SQ),
        token_seqs=r.get(TOKEN_SEQS),
    )


def all_finite(a: np.ndarray) -> bool:
    """Whether every entry of ``a`` is finite, told by one sum (no mask): a finite sum means all are.
    A sum that overflows from finite entries says ``False``; callers then take their exact path.

    >>> all_finite(np.array([1.0, 2.0])), all_finite(np.array([1.0, np.nan]))
    (True, False)
    """
    return math.isfinite(np.add.reduce(a, axis=None))


def safe_rms(sumsq: np.ndarray, count: float) -> float:
    """RMS over the per-unit sums that are not NaN (NaN units are reported as non-finite, not
    averaged in); a unit whose float32 sum overflowed to +inf makes the RMS +inf."""
    kept = ~np.isnan(sumsq)
    n = count * int(kept.sum())
    if n == 0:
        return float("nan")
    with np.errstate(over="ignore"):
        return float(math.sqrt(float(np.asarray(sumsq[kept], dtype=np.float64).sum()) / n))
