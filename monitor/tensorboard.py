"""TensorBoard output: scalars, histograms, heatmap images and alert text.

Tags (``<layer>`` is the watched layer's qualified name, e.g. ``dense0.relu``, ``layers.0``):

========================================  ==========================================================
``activation_dead_fraction/<layer>``      ReLU-family layers: fraction of units dead over the window
``activation_saturated_fraction/<layer>`` bounded layers: fraction of units at a bound
``activation_firing_rate/<layer>``        ReLU-like layers: mean fraction of values > 0
``activation_rms/<layer>``                root mean square of the layer's values
``activation_max_abs/<layer>``            largest magnitude
``activation_nonfinite/<layer>``          NaN/Inf values on that sampled step
``activation_hist/<layer>``               histogram of the values
``activation_scan``                       image: layers x units
``activation_timeline/<layer>``           image: units x sampled steps
``activation_alerts``                     text: one line per alert
========================================  ==========================================================

Each metric is its own tag prefix, so TensorBoard shows one section per metric with every layer
in it. Everything here runs on the monitor's background thread.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import numpy as np

from monitor.eventfile import (
    EventFileWriter,
    encode_event,
    encode_value_histogram,
    encode_value_scalar,
    encoded_event_sink,
    speed_up_writer,
)
from monitor.render import Picture, ScanRow, render_scan, render_timeline
from monitor.sinks import SampleRecord, Sink, yield_gil

EXTRA_HINT = "pip install 'activation-monitor[tensorboard]'"

SCALAR_TAGS = {
    "dead_fraction": "activation_dead_fraction",
    "saturated_fraction": "activation_saturated_fraction",
    "firing_rate": "activation_firing_rate",
    "rms": "activation_rms",
    "max_abs": "activation_max_abs",
    "nonfinite": "activation_nonfinite",
}
HIST_TAG = "activation_hist"
SCAN_TAG = "activation_scan"
TIMELINE_TAG = "activation_timeline"
ALERT_TAG = "activation_alerts"


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Writing TensorBoard output needs the `tensorboard` extra: {EXTRA_HINT}") from e


def scalar_values(record: SampleRecord) -> dict[str, float]:
    """``{tag: value}`` for one record (the same names every logger receives)."""
    out: dict[str, float] = {}
    for layer in record.layers:
        h = layer.health
        for metric, prefix in SCALAR_TAGS.items():
            v = getattr(h, metric)
            if v is not None:
                out[f"{prefix}/{layer.name}"] = float(v)
    return out


class _Timeline:
    """The last ``length`` per-unit vectors of one layer (bounded memory)."""

    def __init__(self, length: int, metric: str) -> None:
        self.steps: deque[int] = deque(maxlen=length)
        self.values: deque[np.ndarray] = deque(maxlen=length)
        self.metric = metric

    def append(self, step: int, v: np.ndarray) -> None:
        if self.values and self.values[-1].shape != v.shape:
            self.steps.clear()
            self.values.clear()
        self.steps.append(step)
        self.values.append(np.asarray(v, dtype=np.float64))

    def matrix(self) -> np.ndarray:
        m = np.stack(list(self.values), axis=1)  # units x samples
        if self.metric == "rms":
            finite = m[np.isfinite(m)]
            top = finite.max() if finite.size else 1.0
            m = m / top if top > 0 else m
        return m


class TensorBoardSink(Sink):
    """Writes sample records to a ``SummaryWriter`` (its own under ``logdir``, or one passed in)."""

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        images_every_n_samples: int = 20,
        timeline_length: int = 100,
    ) -> None:
        require_tensorboard()
        if writer is None:
            if logdir is None:
                raise ValueError("Expected `logdir` or `writer`, got neither.")
            if "://" in os.fspath(logdir):  # a remote store (s3://, gs://): TensorBoard's own file system layer
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(log_dir=os.fspath(logdir))
            else:
                writer = EventFileWriter(logdir)
            self._owns = True
        else:
            self._owns = False
        speed_up_writer(writer)  # a no-op unless it is torch's SummaryWriter
        self.writer = writer
        self.images_every = images_every_n_samples
        self.timeline_length = timeline_length
        self._timelines: dict[str, _Timeline] = {}
        self._samples = 0
        self._last: SampleRecord | None = None
        self._rendered_last = False
        self._timelines_rendered_at = 0
        if isinstance(writer, EventFileWriter):
            self._file_writer: Any = writer
        else:
            get = getattr(writer, "_get_file_writer", None)
            self._file_writer = get() if callable(get) else None
        self._write_encoded = encoded_event_sink(writer)  # scalars and histograms skip protobuf objects

    @property
    def logdir(self) -> str:
        return str(self.writer.get_logdir() if hasattr(self.writer, "get_logdir") else self.writer.log_dir)

    # -- Sink ----------------------------------------------------------------------------------
    def write(self, record: SampleRecord) -> None:
        self._write_scalars_and_histograms(record)
        for layer in record.layers:
            metric, v = ("firing rate", layer.firing) if layer.firing is not None else ("rms", layer.magnitude)
            tl = self._timelines.get(layer.name)
            if tl is None:
                tl = self._timelines[layer.name] = _Timeline(self.timeline_length, "rms" if metric == "rms" else "firing")
            tl.append(record.step, v)
        if record.alerts:
            lines = "  \n".join(("RECOVERED " if a.recovered else "ALERT ") + a.message for a in record.alerts)
            if self._file_writer is None:
                self.writer.add_text(ALERT_TAG, lines, record.step)
            else:
                from torch.utils.tensorboard.summary import text

                self._file_writer.add_summary(text(ALERT_TAG, lines), record.step)
        self._samples += 1
        self._last = record
        self._rendered_last = False
        if self.images_every > 0:
            alert = any(not a.recovered for a in record.alerts)
            scan_due = (self._samples - 1) % self.images_every == 0
            # A timeline holds `timeline_length` samples: rendering one per full window keeps the
            # whole history in TensorBoard at a fraction of the cost of re-rendering it every time.
            timeline_due = self._samples - self._timelines_rendered_at >= self.timeline_length
            if scan_due or alert or timeline_due:
                self._write_images(record, timelines=alert or timeline_due)

    def flush(self) -> None:
        self.writer.flush()

    def batch_done(self) -> None:
        if isinstance(self.writer, EventFileWriter):
            self.writer.flush()  # one write(2) per batch: TensorBoard sees the data within seconds

    def close(self) -> None:
        try:
            if self._last is not None and not self._rendered_last and self.images_every > 0:
                self._write_images(self._last, timelines=True)
        finally:
            self.writer.flush()
            if self._owns:
                self.writer.close()

    # -- writing -------------------------------------------------------------------------------
    def _write_scalars_and_histograms(self, record: SampleRecord) -> None:
        scalars = scalar_values(record)
        if self._file_writer is None:
            for tag, v in scalars.items():
                self.writer.add_scalar(tag, v, record.step)
            for layer in record.layers:
                h = layer.histogram()
                if h is not None:
                    self.writer.add_histogram_raw(
                        f"{HIST_TAG}/{layer.name}", h.min, h.max, h.num, h.sum, h.sum_squares,
                        h.bucket_limits, h.bucket_counts, record.step,
                    )
            return
        if self._write_encoded is not None:  # encode the event directly (see monitor.eventfile)
            encoded = [encode_value_scalar(tag, v) for tag, v in scalars.items()]
            for layer in record.layers:
                yield_gil()
                fields = layer.histogram_fields()
                if fields is not None:
                    encoded.append(encode_value_histogram(f"{HIST_TAG}/{layer.name}", *fields))
            self._write_encoded(encode_event(record.step, encoded))
            return
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        values = [Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
        for layer in record.layers:
            yield_gil()
            h = layer.histogram()
            if h is not None:
                proto = HistogramProto(
                    min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
                    bucket_limit=h.bucket_limits, bucket=h.bucket_counts,
                )
                values.append(Summary.Value(tag=f"{HIST_TAG}/{layer.name}", histo=proto))
        self._file_writer.add_summary(Summary(value=values), record.step)

    def _write_images(self, record: SampleRecord, timelines: bool) -> None:
        self._rendered_last = True
        rows = []
        for layer in record.layers:
            if layer.firing is not None:
                rows.append(ScanRow(layer.name, layer.firing, "firing"))
            else:
                m = layer.magnitude
                finite = m[np.isfinite(m)]
                top = finite.max() if finite.size else 1.0
                rows.append(ScanRow(layer.name, m / top if top > 0 else m, "rms"))
        if rows:
            yield_gil()
            self._image(SCAN_TAG, render_scan(rows, record.step), record.step)
        if not timelines:
            return
        self._timelines_rendered_at = self._samples
        for name, tl in self._timelines.items():
            if tl.values:
                yield_gil()
                metric = "firing rate" if tl.metric == "firing" else "RMS / max"
                pic = render_timeline(name, metric, tl.matrix(), list(tl.steps))
                self._image(f"{TIMELINE_TAG}/{name}", pic, record.step)

    def _image(self, tag: str, pic: Picture, step: int) -> None:
        if self._file_writer is None:
            self.writer.add_image(tag, pic.rgb(), step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        h, w = pic.pixels.shape
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=pic.png())
        self._file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
