"""Packing a sampled step: the partials of every layer -> one flat tensor -> host summaries.

:func:`pack` runs on the training thread when a sampled step ends: it concatenates all rows on
their device (and, under DDP, makes the one collective). :func:`unpack` runs where the step is
judged (the writer thread by default): the one device-to-host copy, histogram binning for CPU
models, a :class:`~monitor.stats.UnitSummary` per layer and the parameters' numbers.

Layout of the flat vector: per watch point its activation rows, then its gradient rows (if
backward reached it); the parameters' gradient norms, update norms and weight norms; the
attention heads' sums (:mod:`monitor.headstats`); the histogram samples or counts; under DDP, the
counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from monitor.headstats import AttentionNumbers, AttentionPartials, attention_numbers
from monitor.params import ParameterPartials
from monitor.partials import Pending
from monitor.selection import WatchPoint
from monitor.stats import (
    GRAD_ROWS,
    UnitSummary,
    all_finite,
    combine_host,
    histogram_counts_batched,
    histogram_counts_host,
    histogram_edges,
    host_grad_rows,
    host_stat_rows,
    reduce_rows_host,
    sample_stride,
    summarize,
    summarize_grad,
)

COUNTS = 4  # per watch point: positions, histogram values sampled, values they stand for, gradient positions


@dataclass
class ParameterNumbers:
    """The parameters' numbers of one sampled step, on the host (names in model order)."""

    grad_norms: dict[str, float]
    update_ratios: dict[str, float | None]  # None: the weight's norm was 0 (ratio undefined)
    backward: bool
    stepped: bool


@dataclass
class Job:
    """One sampled step on its way from the training thread to the host side."""

    seq: int  # sampled steps are judged in this order; an older one arriving late is dropped
    step: int
    flat: torch.Tensor | np.ndarray  # all partials, on their device (a host array under DDP)
    ready: Any  # a CUDA event recorded after the partials, or None
    points: list[WatchPoint]
    pending: list[Pending]
    counts: list[float]  # per point: COUNTS numbers
    bin_on_host: bool
    params: ParameterPartials
    attention: AttentionPartials | None = None


def pack(
    seq: int,
    step: int,
    current: dict[WatchPoint, Pending],
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    params: ParameterPartials | None = None,
    attention: AttentionPartials | None = None,
) -> Job:
    """Concatenate a step's partials into one flat tensor on their device.

    No host sync, except under DDP (``gather``), where the one collective happens here, on every rank.
    """
    params = params if params is not None else ParameterPartials()
    points = list(current)
    pieces: list[torch.Tensor] = []
    on_device = [current[wp] for wp in points if not current[wp].on_host]
    if on_device:
        device = on_device[0].stats[0].device
    elif points or attention is None:
        device = torch.device("cpu")  # every output reduced on the host (Capture.host_rows)
    else:
        device = attention.rows[0].device
    hist_samples: list[torch.Tensor] = []
    hist_groups: list[int] = []
    # CPU tensors: the host is their device, so the sampled values are binned later on the same
    # device, off the training thread. Accelerators, and DDP (counts are summed across ranks):
    # binned here, on the device, without a sync.
    bin_on_host = gather is None and all(current[wp].is_cpu for wp in points)
    for wp in points:
        p = current[wp]
        pieces += p.stats
        if p.grad is not None:
            pieces += p.grad
        if p.hist_samples:
            hist_samples += p.hist_samples
            hist_groups.append(len(p.hist_samples))
    param_at = sum(t.numel() for t in pieces)
    pieces += params.tensors()
    if attention is not None:
        pieces += attention.tensors()  # sums: under DDP, added across ranks like the counts
    if hist_samples and bin_on_host:
        pieces += hist_samples  # binned on the host later; they travel in the same one transfer
    elif hist_samples:
        if any(t.device != device for t in hist_samples):  # a model split over devices
            hist_samples = [t.to(device, non_blocking=True) for t in hist_samples]
        pieces.append(histogram_counts_batched(hist_samples, hist_groups).reshape(-1))
    if any(t.device != device for t in pieces):
        pieces = [t.to(device, non_blocking=True) for t in pieces]
    counts = [
        float(v)
        for wp in points
        for p in (current[wp],)
        for v in (p.positions, p.hist_sampled, p.hist_numel, p.grad_positions)
    ]
    if gather is not None:
        pieces.append(torch.tensor(counts, dtype=torch.float32, device=device))
    flat: torch.Tensor | np.ndarray = torch.cat(pieces) if pieces else torch.zeros(0)
    ready = None
    pending = [current[wp] for wp in points]
    if gather is not None:
        host = gather(flat).reshape(-1, flat.numel()).cpu().numpy()  # the one transfer
        rows = [wp.rows + (GRAD_ROWS if p.grad is not None else ()) for wp, p in zip(points, pending)]
        flat = reduce_rows_host(host, rows, [p.units for p in pending])
        # Parameter gradients are all-reduced and weights are in sync: every rank holds (nearly) the same numbers.
        flat[param_at : param_at + len(params)] = host[:, param_at : param_at + len(params)].mean(axis=0)
        counts = flat[-len(counts) :].tolist()
    elif flat.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(flat.device))
    return Job(seq, step, flat, ready, points, pending, counts, bin_on_host, params, attention)


def unpack(
    job: Job,
) -> tuple[list[tuple[WatchPoint, UnitSummary, np.ndarray | None, float]], ParameterNumbers, list[AttentionNumbers]]:
    """Per layer (watch point, summary, histogram bucket counts or None, values per counted value),
    in forward order, the parameters' numbers and the attention modules' numbers.

    No ATen kernel runs here: on the writer thread, CPU kernels called from a second thread slowed
    the training thread about 3x on a 2-core machine (a second OpenMP team).
    """
    if isinstance(job.flat, torch.Tensor):
        if job.flat.device.type == "cpu":
            host_flat = job.flat.numpy()  # already on the host: a view, no kernel
        else:
            if job.ready is not None:
                job.ready.synchronize()  # waits on this thread only, never the training thread
            host_flat = job.flat.cpu().numpy()  # the one transfer of this sampled step
    else:
        host_flat = job.flat
    counts = job.counts
    offset = 0
    param_at = sum((len(p.stats) + (len(GRAD_ROWS) if p.grad is not None else 0)) * p.units for p in job.pending)
    params = _params(job.params, np.asarray(host_flat[param_at : param_at + len(job.params)], dtype=np.float64))
    attention_at = param_at + len(job.params)
    n_attention = len(job.attention) if job.attention is not None else 0
    attention = attention_numbers(job.attention, host_flat[attention_at : attention_at + n_attention])
    hist_offset = attention_at + n_attention
    buckets = len(histogram_edges()) + 1
    host_counts = None
    # CPU: the sampled values themselves (in the flat vector, or sampled here from the host copies),
    # binned here with numpy, all layers at once.
    values: list[np.ndarray] = []
    at = hist_offset
    # the host copies as numpy views, per layer: [(output, ReLU input or None, reduced dims)]
    arrays = [[(*_host_arrays(x, z), d) for x, z, d in p.host] if p.on_host else [] for p in job.pending]
    for i, p in enumerate(job.pending):
        if p.on_host and p.hist_sampled:
            values.append(_host_samples(arrays[i], p.units))
        elif p.hist_samples and job.bin_on_host:
            n = int(counts[COUNTS * i + 1])
            values.append(host_flat[at : at + n])
            at += n
    if values:
        flat = np.concatenate(values)  # a copy: the host copies' buffers are reused later
        if not all_finite(flat):  # NaN only where not all are finite
            flat[np.isnan(flat)] = 0  # NaN -> 0, as histogram_sample does on the device (NaN is counted apart)
        host_counts = iter(histogram_counts_host(flat, [v.size for v in values]))
    layers = []
    for i, (wp, p) in enumerate(zip(job.points, job.pending)):
        r, c = len(p.stats), p.units
        positions, sampled, numel, grad_positions = (counts[COUNTS * i + k] for k in range(COUNTS))
        if p.on_host:
            blocks = [host_stat_rows(x, z, d, wp.rows, wp.kind, wp.lo_thr, wp.hi_thr) for x, z, d in arrays[i]]
            block = combine_host(blocks, wp.rows)
        else:
            block = host_flat[offset : offset + r * c].reshape(r, c)
            offset += r * c
        summary = summarize(block, wp.rows, int(positions), wp.kind.upper if wp.kind.clamps else None)
        if p.host_grads:
            grad = combine_host([host_grad_rows(g.numpy(), dims) for g, dims in p.host_grads], GRAD_ROWS)
            summary.grad = summarize_grad(grad, int(grad_positions))
        elif p.grad is not None:
            g = len(GRAD_ROWS) * c
            summary.grad = summarize_grad(host_flat[offset : offset + g].reshape(len(GRAD_ROWS), c), int(grad_positions))
            offset += g
        hist = None
        scale = 1.0
        if p.hist_samples or (p.on_host and sampled):
            scale = numel / sampled if sampled else 1.0
            if p.on_host or job.bin_on_host:
                hist = next(host_counts)  # type: ignore[arg-type]
            else:
                hist = host_flat[hist_offset : hist_offset + buckets]
                hist_offset += buckets
        layers.append((wp, summary, hist, scale))
        p.release()  # its host copies are read: their buffers go back to the pool
    return layers, params, attention


def _host_arrays(x: torch.Tensor, z: torch.Tensor | str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(output, ReLU input or None) of one host copy, as numpy views (see ``Pending.host``)."""
    if isinstance(z, str):  # "stacked": [input, output]
        both = x.numpy()
        return both[1], both[0]
    return x.numpy(), None if z is None else z.numpy()


def _host_samples(arrays: list[tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]], units: int) -> np.ndarray:
    """The histogram samples of an output reduced on the host (its calls' ``(output, input, dims)``
    arrays), as the hook would have taken them (:func:`~monitor.stats.histogram_sample`, NaN still
    in: the caller zeroes them), as views."""
    parts = [x.reshape(-1)[:: sample_stride(x.size, units)] for x, _, _ in arrays]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@lru_cache(maxsize=64)
def _starts(lengths: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def _params(pp: ParameterPartials, values: np.ndarray) -> ParameterNumbers:
    r = len(pp.ratio_names)
    if pp.host_norms:  # CPU: 0-d tensors, read as numpy views (no kernel)
        n = 0
        norms = {name: float(t.numpy()) for name, t in zip(pp.norm_names, pp.host_norms)}
    else:
        n = len(pp.norm_names)
        norms = dict(zip(pp.norm_names, values[:n].tolist()))
    rest = values[n:]
    if pp.on_host:  # the samples themselves: before, then after
        total = sum(pp.lengths)
        before, after = rest[:total], rest[total : 2 * total]
        starts = _starts(tuple(pp.lengths))
        deltas = np.add.reduceat(np.square(after - before), starts) if r else np.zeros(0)
        weights = np.add.reduceat(np.square(before), starts) if r else np.zeros(0)
    else:  # per parameter on the device: sum (after - before)^2, sum before^2
        deltas, weights = rest[: 2 * r : 2], rest[1 : 2 * r : 2]
    with np.errstate(all="ignore"):
        ratios = {
            name: (math.sqrt(d / w) if w > 0 else None) for name, d, w in zip(pp.ratio_names, deltas.tolist(), weights.tolist())
        }
    return ParameterNumbers(norms, ratios, pp.backward, pp.stepped)
