"""Where sample records go: plain data in, effects out, off the training thread.

The core builds one :class:`SampleRecord` per sampled step (host numpy only, no tensors) and a
:class:`Dispatcher` hands it to each :class:`Sink` on a background thread. A sink that fails is
dropped with one warning; training never sees the exception.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.detect import Alert, LayerHealth
from monitor.stats import UnitSummary

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

    @classmethod
    def from_counts(cls, counts: np.ndarray, edges: Sequence[float], s: UnitSummary) -> HistogramData | None:
        """Bucket ``i`` holds values in ``(edges[i-1], edges[i]]``; the last one is open above."""
        limits = np.append(np.asarray(edges, dtype=np.float64), _FLOAT_MAX)
        counts = np.asarray(counts, dtype=np.float64)
        nz = np.flatnonzero(counts)
        if nz.size == 0:
            return None
        lo, hi = max(int(nz[0]) - 1, 0), int(nz[-1]) + 1  # keep one empty bucket on the left
        finite_min = s.min[np.isfinite(s.min)]
        finite_max = s.max[np.isfinite(s.max)]
        # Values are not summed on the device (nothing reads the mean); estimate it from buckets.
        centres = np.concatenate([[limits[0]], (limits[:-2] + limits[1:-1]) / 2, [limits[-2]]])
        finite_sq = s.sumsq[np.isfinite(s.sumsq)]
        return cls(
            min=float(finite_min.min()) if finite_min.size else 0.0,
            max=float(finite_max.max()) if finite_max.size else 0.0,
            num=float(counts.sum()),
            sum=float((centres * counts).sum()),
            sum_squares=float(finite_sq.sum()),
            bucket_limits=limits[lo:hi].tolist(),
            bucket_counts=counts[lo:hi].tolist(),
        )


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
        if self.hist_counts is None:
            return None
        from monitor.stats import histogram_edges

        return HistogramData.from_counts(self.hist_counts * self.hist_scale, histogram_edges(), self.summary)


@dataclass
class SampleRecord:
    """Everything a sink needs about one sampled step."""

    step: int
    layers: list[LayerSample]
    alerts: list[Alert] = field(default_factory=list)


class Sink:
    """Receives sample records on the monitor's background thread. Override :meth:`write`."""

    def write(self, record: SampleRecord) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable."""

    def close(self) -> None:
        """Release resources; called once, after the last write."""


_FLUSH, _CLOSE = object(), object()


class Dispatcher:
    """A daemon thread feeding records to sinks; a full queue drops records rather than block."""

    def __init__(self, sinks: Sequence[Sink], warn_once: Callable[[str, str], None], maxsize: int = 256) -> None:
        self._sinks = list(sinks)
        self._warn_once = warn_once
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.busy_seconds = 0.0  # CPU time spent in sinks (benchmarks read it)
        self._thread = threading.Thread(target=self._run, name="activation-monitor-writer", daemon=True)
        self._thread.start()

    def submit(self, record: SampleRecord) -> None:
        if os.environ.get("AM_SYNC"):
            t0 = time.thread_time()
            for sink in list(self._sinks):
                self._call(sink, "write", record)
            self.busy_seconds += time.thread_time() - t0
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._warn_once("queue", "the writer is falling behind; some samples were not written")

    def flush(self, timeout: float = 60.0) -> None:
        done = threading.Event()
        self._queue.put((_FLUSH, done))
        done.wait(timeout)

    def close(self, timeout: float = 120.0) -> None:
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put((_CLOSE, done))
        done.wait(timeout)
        self._thread.join(timeout=5)

    def _call(self, sink: Sink, what: str, *args: object) -> None:
        try:
            getattr(sink, what)(*args)
        except Exception as e:
            self._sinks = [s for s in self._sinks if s is not sink]
            self._warn_once(
                f"sink:{id(sink)}",
                f"{type(sink).__name__}.{what} failed ({e!r}); it is disabled and training continues",
            )

    def _run(self) -> None:
        # Lowest CPU priority for this thread (Linux: threads are tasks with their own nice value):
        # on a machine with few cores it must not preempt the training's intra-op threads.
        with contextlib.suppress(Exception):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            item = self._queue.get()
            if isinstance(item, tuple) and item and item[0] in (_FLUSH, _CLOSE):
                marker, done = item
                for sink in list(self._sinks):
                    self._call(sink, "flush" if marker is _FLUSH else "close")
                done.set()
                if marker is _CLOSE:
                    return
                continue
            t0 = time.thread_time()
            for sink in list(self._sinks):
                self._call(sink, "write", item)
            self.busy_seconds += time.thread_time() - t0
