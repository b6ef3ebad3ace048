"""TensorBoard output: scalars, histograms, heatmap images and alert text.

Tags (``<layer>`` is the watched layer's qualified name, e.g. ``dense0.relu``, ``layers.0``):

========================================  ==========================================================
``activation_dead_fraction/<layer>``      ReLU-family layers: fraction of units dead over the evidence
``activation_dead_margin/<layer>``        ReLU-family layers: how far below zero the dead units sit
``activation_saturated_fraction/<layer>`` bounded layers: fraction of units at a bound
``activation_dormant_fraction/<layer>``   activations: fraction of units dormant (tiny mean abs value)
``activation_evidence_values/<layer>``    values per unit behind those fractions
``activation_<field>/<layer>``            every field of a user-defined detector
``activation_firing_rate/<layer>``        ReLU-like layers: mean fraction of values > 0
``activation_rms/<layer>``                root mean square of the layer's values
``activation_max_abs/<layer>``            largest magnitude
``activation_nonfinite/<layer>``          units that held NaN/Inf values on that sampled step
``activation_hist/<layer>``               histogram of the values
``activation_scan``                       image: layers x units
``attention_entropy/<module>``            attention modules: mean over heads of the normalised entropy
``attention_entropy_min/<module>``        ... its lowest head
``attention_one_hot_max/<module>``        ... the largest share of a head's queries that look at one key
``attention_sink/<module>``               ... mean over heads of the attention mass on the first token
``attention_sink_max/<module>``           ... its highest head
``attention_heads``                       image: attention modules x heads, colour = normalised entropy
``activation_timeline/<layer>``           image: units x sampled steps
``activation_alerts``                     text: one line per alert (also the gradient alerts)
``activation_layers``                     text: ``layer | kind | units``, once per layer (again if it changes)
``run_config``                            text: the run's configuration, one JSON object, at the first record
========================================  ==========================================================

With a probe (``Monitor(..., probe=P)``), per probe run: ``activation_probe/<layer>`` (image:
probe samples x units), ``probe_drift/<layer>``, ``probe_units/<layer>`` (text), ``probe_loss``;
``probe_importance`` (text) from ``Monitor.layer_importance``; see :mod:`monitor.probeviews`.

When the backward (and the optimizer step) of a sampled step run inside the step:

========================================  ==========================================================
``gradient_rms/<layer>``                  RMS of the gradient with respect to the layer's output
``gradient_max_abs/<layer>``              its largest magnitude
``gradient_nonfinite/<layer>``            units whose gradient held NaN/Inf
``gradient_ratio/<layer>``                gradient RMS / that of the 3 layers nearest the loss
``gradient_norm_ratio/<layer>``           the same per unit over the step's values (vanishing reads it)
``gradient_norm/<parameter>``             L2 norm of a parameter's gradient (see ``max_grad_norm``)
``gradient_norm/(total)``                 L2 norm over all parameters' gradients
``update_ratio/<parameter>``              ||w_after - w_before|| / ||w_before|| over the optimizer step
``gradient_flow``                         image: layers x sampled steps, log colour of gradient_ratio
========================================  ==========================================================

Each metric is its own tag prefix, so TensorBoard shows one section per metric with every layer
in it. Everything here runs on the monitor's background thread.

The monitor writes an event file of its own (:class:`monitor.eventfile.EventFileWriter`), also
when given a ``SummaryWriter``: it goes into that writer's directory, which TensorBoard reads as
one run, and the writer itself is never written to, flushed, closed or changed.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.eventfile import SUFFIX, EventFileWriter, encode_event, encode_value_histogram, encode_value_scalar
from monitor.judge import gradient_reference
from monitor.records import SampleRecord
from monitor.render import Picture, ScanRow, render_attention_heads, render_gradient_flow, render_scan, render_timeline
from monitor.runconfig import RUN_CONFIG_TAG, config_json, normalize_config
from monitor.scalars import scalar_values
from monitor.sinks import Sink, yield_gil

if TYPE_CHECKING:
    from monitor.probe import ProbeRecord

EXTRA_HINT = "pip install 'activation-monitor[tensorboard]'"

HIST_TAG = "activation_hist"
SCAN_TAG = "activation_scan"
TIMELINE_TAG = "activation_timeline"
ALERT_TAG = "activation_alerts"
LAYERS_TAG = "activation_layers"
FLOW_TAG = "gradient_flow"
ATTENTION_TAG = "attention_heads"


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Writing TensorBoard output needs the `tensorboard` extra: {EXTRA_HINT}") from e


def attention_picture(record: SampleRecord) -> Picture:
    """The ``attention_heads`` image of one record: its attention modules x heads."""
    heads = [a.heads for a in record.attention]
    cols = max(heads)
    ent = np.full((len(heads), cols), np.nan)
    sink = np.full((len(heads), cols), np.nan)
    for i, a in enumerate(record.attention):
        ent[i, : a.heads] = a.normalized_entropy
        sink[i, : a.heads] = a.sink
    return render_attention_heads([a.name for a in record.attention], heads, ent, sink, record.step)


def gradient_ratios(record: SampleRecord) -> dict[str, float]:
    """Each layer's gradient RMS over the reference of its step (inf: NaN/Inf gradients)."""
    hs = [layer.health for layer in record.layers if layer.health.grad_rms is not None]
    ref = gradient_reference([h.grad_rms if not h.grad_nonfinite else None for h in hs])
    if ref is None or ref <= 0:
        return {}
    return {h.layer: (np.inf if h.grad_nonfinite else h.grad_rms / ref) for h in hs}  # type: ignore[operator]


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


def writer_logdir(writer: Any) -> str | None:
    """The directory a TensorBoard writer writes to, read through its public API; None if it shows none.

    ``get_logdir()`` (``torch.utils.tensorboard`` and tensorboardX ``SummaryWriter``), else a
    ``logdir`` (tensorboardX) or ``log_dir`` (torch) attribute. Nothing is set or called beyond these.
    """
    get = getattr(writer, "get_logdir", None)
    if callable(get):
        try:
            d = get()
        except Exception:  # noqa: BLE001 - not the method we are looking for
            d = None
        if isinstance(d, (str, os.PathLike)) and os.fspath(d):
            return os.fsdecode(d)
    for name in ("logdir", "log_dir"):
        try:
            d = getattr(writer, name, None)
        except Exception:  # noqa: BLE001 - a property that fails: no directory from it
            d = None
        if isinstance(d, (str, os.PathLike)) and os.fspath(d):
            return os.fsdecode(d)
    return None


class TensorBoardSink(Sink):
    """Writes sample records to TensorBoard: an event file of its own under ``logdir``, or beside ``writer``'s.

    With ``writer`` (a ``torch.utils.tensorboard`` or tensorboardX ``SummaryWriter``), the file
    goes into the writer's directory (read with ``get_logdir()``, or its ``logdir``/``log_dir``);
    TensorBoard shows both files as one run. The writer is never written to, flushed, closed or
    modified. Only a writer that shows no directory is used through its public ``add_scalar``,
    ``add_histogram_raw``, ``add_image`` and ``add_text`` (and flushed, never closed). A directory
    with a scheme (``s3://``, ``gs://``) gets a ``FileWriter`` of ours (TensorBoard's file system
    layer). Construction checks types only and does no I/O: the file is created on the first write,
    on the monitor's writer thread, where a failure disables this sink with one warning.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        images_every_n_samples: int = 20,
        timeline_length: int = 100,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        require_tensorboard()
        self.run_config = normalize_config(run_config)
        self.writer = writer  # the caller's, or None
        self._fallback: Any = None  # a writer with no directory: used through its public methods
        if writer is None:
            if logdir is None:
                raise ValueError("Expected `logdir` or `writer`, got neither.")
            if not isinstance(logdir, (str, os.PathLike)):
                hint = " (a writer object goes in `writer=`)" if hasattr(logdir, "add_scalar") else ""
                raise TypeError(
                    f"Expected `logdir` to be a directory path (str or os.PathLike), got {logdir!r} "
                    f"({type(logdir).__name__}){hint}."
                )
            directory: str | None = os.fsdecode(os.fspath(logdir))
            if not directory:
                raise ValueError("Expected `logdir` to be a directory path, got an empty string.")
        else:
            if logdir is not None:
                raise ValueError("Expected either `logdir` or `writer`, got both.")
            if isinstance(writer, (str, bytes, os.PathLike)):
                raise TypeError(
                    f"Expected `writer` to be a SummaryWriter (torch.utils.tensorboard or tensorboardX), got the path "
                    f"{writer!r}; to write into a directory, pass logdir={os.fsdecode(os.fspath(writer))!r} instead."
                )
            directory = writer_logdir(writer)
            if directory is None:
                if not callable(getattr(writer, "add_scalar", None)):
                    raise TypeError(
                        "Expected `writer` to be a SummaryWriter (torch.utils.tensorboard or tensorboardX: one with "
                        "get_logdir() or a logdir/log_dir attribute) or an object with add_scalar, got "
                        f"{type(writer).__module__}.{type(writer).__qualname__} ({writer!r:.80})."
                    )
                self._fallback = writer
        self._dir = directory
        self._out: Any = None  # our EventFileWriter (or, for a remote directory, a FileWriter), opened on first write
        self._closed = False
        self.images_every = images_every_n_samples
        self.timeline_length = timeline_length
        self._timelines: dict[str, _Timeline] = {}
        self._described: dict[str, tuple[str, int]] = {}  # layer -> (kind, units) written to LAYERS_TAG
        self._flow: deque[tuple[int, dict[str, float]]] = deque(maxlen=timeline_length)
        self._flow_layers: dict[str, None] = {}  # layers with a gradient, in first-seen forward order
        self._samples = 0
        self._last: SampleRecord | None = None
        self._rendered_last = False  # the last record's scan was drawn
        self._histories_last = False  # ... and its timelines / gradient flow
        self._timelines_rendered_at = 0

    @property
    def logdir(self) -> str | None:
        """The directory our event file goes to (None when writing through a writer with no directory)."""
        return self._dir

    @property
    def path(self) -> str | None:
        """Our event file, once it exists (a local directory only)."""
        return getattr(self._out, "path", None)

    def _output(self) -> Any:
        """Our file writer, created on first use (on the writer thread); None for a directory-less writer."""
        if self._out is None and self._dir is not None:
            if self._closed:
                raise RuntimeError("TensorBoardSink is closed")
            if "://" in self._dir:  # a remote store (s3://, gs://): TensorBoard's own file system layer
                from torch.utils.tensorboard.writer import FileWriter

                self._out = FileWriter(self._dir, filename_suffix=f".{SUFFIX}")
            else:
                self._out = EventFileWriter(self._dir)
        return self._out

    # -- Sink ----------------------------------------------------------------------------------
    def write(self, record: SampleRecord) -> None:
        out = self._output()
        if self._samples == 0 and self.run_config:  # what this run is: once, at its first record
            self._text(out, RUN_CONFIG_TAG, config_json(self.run_config), record.step)
        self._write_scalars_and_histograms(record, out)
        for layer in record.layers:
            metric, v = ("firing rate", layer.firing) if layer.firing is not None else ("rms", layer.magnitude)
            tl = self._timelines.get(layer.name)
            if tl is None:
                tl = self._timelines[layer.name] = _Timeline(self.timeline_length, "rms" if metric == "rms" else "firing")
            tl.append(record.step, v)
        ratios = gradient_ratios(record)
        if ratios:
            self._flow.append((record.step, ratios))
            self._flow_layers.update(dict.fromkeys(ratios))
        described = self._described
        new = [(ls.name, ls.kind, ls.health.units) for ls in record.layers]
        new = [(n, k, u) for n, k, u in new if described.get(n) != (k, u)]
        if new:  # what a layer is, for readers of the file (the run report): once, and again if it changes
            self._described.update((n, (k, u)) for n, k, u in new)
            self._text(out, LAYERS_TAG, "  \n".join(f"{n} | {k} | {u}" for n, k, u in new), record.step)
        if record.alerts:
            lines = "  \n".join(("RECOVERED " if a.recovered else "ALERT ") + a.message for a in record.alerts)
            self._text(out, ALERT_TAG, lines, record.step)
        self._samples += 1
        self._last = record
        self._rendered_last = self._histories_last = False
        if self.images_every > 0:
            alert = any(not a.recovered for a in record.alerts)
            scan_due = (self._samples - 1) % self.images_every == 0
            # A timeline holds `timeline_length` samples: rendering one per full window keeps the
            # whole history in TensorBoard at a fraction of the cost of re-rendering it every time.
            timeline_due = self._samples - self._timelines_rendered_at >= self.timeline_length
            if scan_due or alert or timeline_due:
                self._write_images(record, timelines=alert or timeline_due)

    def write_probe(self, record: ProbeRecord) -> None:
        """A probe run: per layer its heatmap, drift and units table; or a layer-importance table."""
        from monitor import probeviews as views

        out = self._output()
        if record.importance is not None:
            self._text(out, views.IMPORTANCE_TAG, record.importance, record.step)
        result = record.result
        if result is None:
            return
        scalars = {f"{views.DRIFT_TAG}/{n}": v for n, v in result.drift.items()}
        if result.loss is not None:
            scalars[views.LOSS_TAG] = result.loss
        if scalars:
            self._scalars(out, scalars, result.step)
        for layer in result.activations:
            yield_gil()
            self._text(out, f"{views.UNITS_TAG}/{layer}", views.unit_table(result, layer), result.step)
            if self.images_every > 0:
                yield_gil()
                self._image(f"{views.IMAGE_TAG}/{layer}", views.probe_picture(result, layer), result.step)

    def _scalars(self, out: Any, values: dict[str, float], step: int) -> None:
        if out is None:
            for tag, v in values.items():
                self._fallback.add_scalar(tag, v, step)
        elif isinstance(out, EventFileWriter):
            out.add_encoded(encode_event(step, [encode_value_scalar(tag, v) for tag, v in values.items()]))
        else:
            from tensorboard.compat.proto.summary_pb2 import Summary

            out.add_summary(Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()]), step)

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()
        elif self._fallback is not None and callable(getattr(self._fallback, "flush", None)):
            self._fallback.flush()

    def batch_done(self) -> None:
        if isinstance(self._out, EventFileWriter):
            self._out.flush()  # one write(2) per batch: TensorBoard sees the data within seconds

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._last is not None and not self._histories_last and self.images_every > 0:
                self._write_images(self._last, timelines=True, scan=not self._rendered_last)
        finally:
            self._closed = True
            if self._out is not None:
                self._out.close()  # ours: flushed and closed (a writer passed in is neither)
            else:
                self.flush()

    # -- writing -------------------------------------------------------------------------------
    def _write_scalars_and_histograms(self, record: SampleRecord, out: Any) -> None:
        scalars = scalar_values(record)
        if out is None:
            w = self._fallback
            for tag, v in scalars.items():
                w.add_scalar(tag, v, record.step)
            add_histogram_raw = getattr(w, "add_histogram_raw", None)
            if callable(add_histogram_raw):
                for layer in record.layers:
                    h = layer.histogram()
                    if h is not None:
                        add_histogram_raw(
                            f"{HIST_TAG}/{layer.name}", h.min, h.max, h.num, h.sum, h.sum_squares,
                            h.bucket_limits, h.bucket_counts, record.step,
                        )
            return
        if isinstance(out, EventFileWriter):  # encode the event directly (see monitor.eventfile)
            encoded = [encode_value_scalar(tag, v) for tag, v in scalars.items()]
            for layer in record.layers:
                yield_gil()
                fields = layer.histogram_fields()
                if fields is not None:
                    encoded.append(encode_value_histogram(f"{HIST_TAG}/{layer.name}", *fields))
            out.add_encoded(encode_event(record.step, encoded))
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
        out.add_summary(Summary(value=values), record.step)

    def _write_images(self, record: SampleRecord, timelines: bool, scan: bool = True) -> None:
        self._rendered_last = True
        self._histories_last = self._histories_last or timelines
        rows = []
        for layer in record.layers:
            if layer.firing is not None:
                rows.append(ScanRow(layer.name, layer.firing, "firing"))
            else:
                m = layer.magnitude
                finite = m[np.isfinite(m)]
                top = finite.max() if finite.size else 1.0
                rows.append(ScanRow(layer.name, m / top if top > 0 else m, "rms"))
        if rows and scan:
            yield_gil()
            self._image(SCAN_TAG, render_scan(rows, record.step), record.step)
        if record.attention and scan:  # on the scan's schedule
            yield_gil()
            self._image(ATTENTION_TAG, attention_picture(record), record.step)
        if not timelines:
            return
        self._timelines_rendered_at = self._samples
        if self._flow:  # a history like the timelines: rendered on their schedule
            yield_gil()
            names = list(self._flow_layers)
            m = np.array([[r.get(n, np.nan) for _, r in self._flow] for n in names]).reshape(len(names), -1)
            self._image(FLOW_TAG, render_gradient_flow(names, m, [s for s, _ in self._flow]), record.step)
        for name, tl in self._timelines.items():
            if tl.values:
                yield_gil()
                metric = "firing rate" if tl.metric == "firing" else "RMS / max"
                pic = render_timeline(name, metric, tl.matrix(), list(tl.steps))
                self._image(f"{TIMELINE_TAG}/{name}", pic, record.step)

    def _text(self, out: Any, tag: str, lines: str, step: int) -> None:
        if out is None:
            add_text = getattr(self._fallback, "add_text", None)
            if callable(add_text):
                add_text(tag, lines, step)
        else:
            from torch.utils.tensorboard.summary import text

            out.add_summary(text(tag, lines), step)

    def _image(self, tag: str, pic: Picture, step: int) -> None:
        out = self._output()
        if out is None:
            add_image = getattr(self._fallback, "add_image", None)
            if callable(add_image):
                add_image(tag, pic.rgb(), step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        h, w = pic.pixels.shape
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=pic.png())
        out.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
