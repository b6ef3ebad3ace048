"""Where sample records go: plain data in, effects out, off the training thread.

The core builds one :class:`SampleRecord` per sampled step (host numpy only, no tensors) and a
:class:`Dispatcher` hands it to each :class:`Sink` on a background thread. A sink that fails (in
``write``, ``batch_done``, ``flush`` or ``close``) is dropped with one warning and closed quietly;
training never sees the exception.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

from monitor.records import HistogramData, LayerSample, SampleRecord, histogram_fields
from monitor.scalars import scalar_values

__all__ = ["Dispatcher", "HistogramData", "LayerSample", "SampleRecord", "ScalarQueue", "Sink", "histogram_fields", "yield_gil"]


class Sink:
    """Receives sample records on the monitor's background thread. Override :meth:`write`."""

    def write(self, record: SampleRecord) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable."""

    def batch_done(self) -> None:
        """Called after each batch of records (one every ~2 s, or every 64 records): a cheap moment to make them visible."""

    def close(self) -> None:
        """Release resources; called once, after the last write."""


class ScalarQueue(Sink):
    """Keeps ``(step, {tag: value})`` per record (the TensorBoard scalar names); :meth:`drain`
    hands them over on the training thread. The integrations feed their frameworks' loggers
    (Lightning's ``log_metrics``, the Trainer's reporting callbacks) from it."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[int, dict[str, float]]] = collections.deque()
        self._lock = threading.Lock()

    def write(self, record: SampleRecord) -> None:
        values = scalar_values(record)
        if values:
            with self._lock:
                self._items.append((record.step, values))

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items


_FLUSH, _CLOSE, _DRAIN = object(), object(), object()


_YIELD_EVERY = 0.0005  # seconds of writer work between two hand-backs of the GIL
_last_yield = 0.0


def yield_gil() -> None:
    """Let the training thread take the GIL, if this thread has run for a while.

    A background thread that keeps the GIL runs until the interpreter's switch interval (5 ms)
    forces it off; meanwhile the training thread, which releases the GIL around every PyTorch
    kernel, waits to get it back. Sinks call this between small pieces of work, so training
    waits for at most ~0.5 ms of it, not for the switch interval. The hand-back itself is a
    system call (tens of microseconds on a busy VM), so it only happens once that long has passed.
    """
    global _last_yield
    now = time.perf_counter()
    if now - _last_yield >= _YIELD_EVERY:
        time.sleep(0)
        _last_yield = time.perf_counter()


NICE = 10  # the writer thread's nice value (see Dispatcher._run)


class Dispatcher:
    """A daemon thread feeding records to sinks; a full queue drops records rather than block.

    Items that are not :class:`SampleRecord` are turned into one by ``judge`` on the thread first
    (the monitor's host-side detection). When the queue is full, the queued items are taken back
    and judged right away on the caller's thread, oldest first, and their output is dropped; only
    steps of the batch the thread already holds can then arrive too late to be judged.

    Records are handed over in batches, at most ``max_delay`` seconds apart: every wake-up of a
    background Python thread costs the training thread far more than the work it does (they
    share the GIL), so one wake-up per couple of seconds is much cheaper than one per sample.
    TensorBoard reloads every 30 s by default, so nobody sees the difference. The thread also
    wakes every ``max_delay`` seconds on its own and takes a batch that is due, so the alerts of
    a lone sampled step arrive within about that long, not at the next sampled step.
    """

    def __init__(
        self,
        sinks: Sequence[Sink],
        warn_once: Callable[[str, str], None],
        maxsize: int = 32,
        max_delay: float = 2.0,
        max_batch: int = 64,
        judge: Callable[[object], SampleRecord] | None = None,
    ) -> None:
        self._sinks = list(sinks)
        self._warn_once = warn_once
        self._judge = judge
        # At most `maxsize` batches (each <= max_batch samples, ~max_delay seconds of them) wait:
        # a writer that falls further behind hands judging back to the training thread, which
        # bounds the alerts' delay and the memory held by waiting samples (copies of small CPU
        # outputs: up to ~1 MB per sample for a small MLP).
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._batch: list[object] = []  # records, or steps still to be judged
        self._batch_started = 0.0
        self._lock = threading.Lock()  # the waiting batch: appended by the caller, taken by either thread
        self.max_delay = max_delay
        self.max_batch = max_batch
        self.busy_seconds = 0.0  # CPU time spent in sinks (benchmarks read it)
        self.overloaded = False  # the queue overflowed once: callers should judge inline from now on
        self._thread = threading.Thread(target=self._run, name="activation-monitor-writer", daemon=True)
        self._thread.start()

    def on_writer_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, record: object) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._batch:
                self._batch_started = now
            self._batch.append(record)
            due = now - self._batch_started >= self.max_delay or len(self._batch) >= self.max_batch
        if due:
            self._hand_over()

    def _hand_over(self) -> None:
        with self._lock:
            if not self._batch:
                return
            batch, self._batch = self._batch, []
            try:
                self._queue.put_nowait(batch)
                return
            except queue.Full:
                # The sinks are stuck or far too slow. Detection must not wait for them: take the
                # queued batches back, judge their steps here in order (oldest first), drop their
                # output, and from now on the caller judges inline (``overloaded``).
                self.overloaded = True
                taken: list = []
                with contextlib.suppress(queue.Empty):
                    while True:
                        taken.append(self._queue.get_nowait())
                markers = [b for b in taken if isinstance(b, tuple)]
                for m in markers:
                    self._queue.put_nowait(m)
        self._warn_once("queue", "the writer is falling behind; some samples were not written")
        for b in [b for b in taken if not isinstance(b, tuple)] + [batch]:
            for item in b:
                if not isinstance(item, SampleRecord):
                    self._judge_item(item)

    def _take_due(self) -> list[object] | None:
        """Writer thread, after ``max_delay`` without a hand-over: the waiting batch, if it is due
        and nothing older is queued (steps are processed in order). So an alert of a lone
        sampled step arrives within ~``max_delay`` even if no further step comes."""
        with self._lock:
            if not self._batch or not self._queue.empty():
                return None
            if time.monotonic() - self._batch_started < self.max_delay:
                return None
            batch, self._batch = self._batch, []
            return batch

    def flush(self, timeout: float = 60.0, sinks: bool = True) -> None:
        """Wait until everything submitted so far is processed (and, with ``sinks``, flushed)."""
        self._hand_over()
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put((_FLUSH if sinks else _DRAIN, done))
        done.wait(timeout)

    def _judge_item(self, item: object) -> SampleRecord | None:
        """The record of a queued step, or None (judging failed, or the step is stale)."""
        try:
            return self._judge(item) if self._judge is not None else None  # type: ignore[return-value]
        except Exception as e:
            self._warn_once("judge", f"a sampled step could not be processed and was skipped: {e!r}")
            return None

    def close(self, timeout: float = 120.0) -> None:
        if not self._thread.is_alive():
            return
        self._hand_over()
        done = threading.Event()
        self._queue.put((_CLOSE, done))
        if self.on_writer_thread():
            return  # closed from one of its own callbacks (e.g. the monitor collected there): no self-wait
        done.wait(timeout)
        self._thread.join(timeout=5)

    def _call(self, sink: Sink, what: str, *args: object) -> None:
        """``sink.<what>(*args)``; on failure the sink is dropped with one warning and closed quietly.

        Nothing a sink raises leaves this method (not even a warning turned into an error), so
        the writer thread, and with it detection and alerts, keeps going.
        """
        try:
            getattr(sink, what)(*args)
        except Exception as e:
            self._sinks = [s for s in self._sinks if s is not sink]
            with contextlib.suppress(Exception):
                self._warn_once(
                    f"sink:{id(sink)}",
                    f"{type(sink).__name__}.{what} failed ({e!r}); it is disabled and training continues",
                )
            if what != "close":  # release its files; what it wrote so far reaches disk if it can
                with contextlib.suppress(Exception):
                    sink.close()

    def _run(self) -> None:
        # A lower CPU priority for this thread (Linux: threads are tasks with their own nice value):
        # on a machine with few cores it should not preempt the training's intra-op threads, yet it
        # must keep up. Measured on 2 cores (MLP, 400 samples at N=10, PyTorch's 2 threads busy):
        # nice 19 starved it (44 samples judged, the backlog and memory growing without bound),
        # nice 10 kept up (342, the rest in the batch not yet due) at the same training speed,
        # nice 0 kept up and slowed training by ~25%.
        with contextlib.suppress(Exception):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while True:
            try:
                item = self._queue.get(timeout=self.max_delay)
            except queue.Empty:
                item = self._take_due()
                if item is None:
                    continue
            if isinstance(item, tuple) and item and item[0] in (_FLUSH, _CLOSE, _DRAIN):
                marker, done = item
                try:
                    if marker is not _DRAIN:
                        for sink in list(self._sinks):
                            self._call(sink, "flush" if marker is _FLUSH else "close")
                finally:
                    done.set()
                if marker is _CLOSE:
                    return
                continue
            t0 = time.thread_time()
            for record in item:
                if not isinstance(record, SampleRecord):
                    yield_gil()
                    record = self._judge_item(record)
                    if record is None:
                        continue
                for sink in list(self._sinks):
                    yield_gil()
                    self._call(sink, "write", record)
            for sink in list(self._sinks):
                if hasattr(sink, "batch_done"):  # optional for duck-typed sinks
                    self._call(sink, "batch_done")
            self.busy_seconds += time.thread_time() - t0
