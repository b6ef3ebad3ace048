"""The :class:`Monitor`: hooks a model on sampled steps and turns activations into health."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from monitor.activations import conv_like, functional_kind, is_activation_module
from monitor.detect import Alert, LayerHealth, LayerState, Thresholds
from monitor.selection import Patterns, Selector, WatchPoint, make_watch_point
from monitor.sinks import Dispatcher, LayerSample, SampleRecord, Sink
from monitor.stats import (
    combine_rows,
    histogram_counts_batched,
    histogram_counts_host,
    histogram_edges,
    histogram_sample,
    sample_stride,
    summarize,
    unit_stat_rows,
)

OnAlert = Union[Literal["warn", "raise", "ignore"], Callable[[Alert], None]]
_ON_ALERT = ("warn", "raise", "ignore")
_TORCH_DIR = os.path.dirname(torch.__file__)
_MAX_ALERTS = 10_000
_SERIAL_BELOW = 1 << 18  # elements


class MonitorWarning(UserWarning):
    """Warnings from the activation monitor (alerts with ``on_alert="warn"``, degraded output)."""


class ActivationAlertError(RuntimeError):
    """Raised at the end of a sampled step when ``on_alert="raise"`` and a layer became unhealthy."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(alert.message)
        self.alert = alert


def _first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module output: a tensor, tuple/list, dict or dataclass."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
        return None
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
        return None
    fields = getattr(obj, "__dataclass_fields__", None)
    if fields:
        for f in fields:
            t = _first_tensor(getattr(obj, f, None))
            if t is not None:
                return t
    return None


class _Capture(TorchFunctionMode):
    """Sees functional activations (``F.relu(x)``, ``torch.tanh(x)``, ``x.relu()``) in a forward."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__()
        self.monitor = monitor

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        kind = functional_kind(func, args, kwargs)
        if kind is not None and self.monitor._act_depth == 0 and args:
            self.monitor._on_functional(kind, args[0], out)
        return out


@dataclass
class _Job:
    """One sampled step on its way from the training thread to the host side."""

    seq: int  # sampled steps are judged in this order; an older one arriving late is dropped
    step: int
    flat: torch.Tensor | np.ndarray  # all partials, on their device (a host array under DDP)
    ready: Any  # a CUDA event recorded after the partials, or None
    points: list[WatchPoint]
    pending: list[_Pending]
    counts: list[float]  # per point: positions, histogram values sampled, values they stand for
    bin_on_host: bool


@dataclass
class _Pending:
    stats: list[torch.Tensor]  # one [units] row per entry of the watch point's rows
    units: int
    hist_samples: list[torch.Tensor]  # binned together at the end of the step
    positions: int
    hist_numel: int  # values the histogram stands for
    hist_sampled: int  # values actually binned


class Monitor:
    """Watch a model's activations on every N-th step; detect dead, saturated, exploding units.

    Args:
        model: the ``nn.Module`` to watch. It is never modified: hooks exist only during sampled
            steps and are always removed.
        every_n_steps: sample steps where ``step % every_n_steps == 0``.
        include, exclude: glob patterns over qualified module names (``"encoder.layers.*"``),
            module types (``"GELU"``) and functional activation names (``"dense0.relu"``).
            By default every activation module, functional activation and stack block is watched.
        thresholds: a :class:`Thresholds`; defaults are silent on healthy runs.
        logdir: write TensorBoard events here (needs the ``tensorboard`` extra).
        writer: or an existing ``SummaryWriter`` (not closed by the monitor).
        on_alert: ``"warn"`` (a :class:`MonitorWarning`), ``"raise"`` (:class:`ActivationAlertError`
            at the end of the sampled step), ``"ignore"``, or a callable receiving each :class:`Alert`.
        histograms: write per-layer histograms.
        images_every_n_samples: render the heatmaps every this many sampled steps (also when an
            alert fires, and on close); 0 disables images.
        timeline_length: sampled steps kept in each "units x time" timeline.
        functional: also watch functional activations called inside ``forward``.
        sinks: extra :class:`~monitor.sinks.Sink` objects that receive every sample record.
        background: judge sampled steps (summaries, detection, ``on_alert``) on the monitor's
            writer thread, so the training thread only concatenates the partials on their device
            and never waits for the device-to-host copy. Alerts then arrive shortly after their
            step (``"warn"`` and callables run on that thread); ``alerts``, ``health()``,
            ``flush()`` and ``state_dict()`` first wait for the steps already taken. With
            ``on_alert="raise"``, under DDP (``gather``) or ``background=False`` the sampled step
            is judged on the training thread when it ends.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> with Monitor(model, every_n_steps=10, on_alert="ignore") as mon:
        ...     for step in range(20):
        ...         with mon.step(step):
        ...             loss = model(torch.randn(32, 4)).pow(2).mean()
        >>> sorted(mon.health())
        ['1']
    """

    def __init__(
        self,
        model: nn.Module,
        every_n_steps: int = 50,
        include: Patterns = None,
        exclude: Patterns = None,
        thresholds: Thresholds | None = None,
        logdir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        on_alert: OnAlert = "warn",
        *,
        histograms: bool = True,
        images_every_n_samples: int = 20,
        timeline_length: int = 100,
        functional: bool = True,
        sinks: Sequence[Sink] | None = None,
        background: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"Expected `every_n_steps` to be a positive integer, got {every_n_steps!r}.")
        if not (callable(on_alert) or on_alert in _ON_ALERT):
            raise ValueError(
                f"Expected `on_alert` to be one of {', '.join(map(repr, _ON_ALERT))} or a callable, got {on_alert!r}."
            )
        if thresholds is None:
            thresholds = Thresholds()
        elif not isinstance(thresholds, Thresholds):
            raise TypeError(f"Expected `thresholds` to be a monitor.Thresholds, got {type(thresholds).__name__}.")
        if logdir is not None and writer is not None:
            raise ValueError("Expected either `logdir` or `writer`, got both.")
        if isinstance(images_every_n_samples, bool) or not isinstance(images_every_n_samples, int) or images_every_n_samples < 0:
            raise ValueError(
                f"Expected `images_every_n_samples` to be a non-negative integer, got {images_every_n_samples!r}."
            )
        if isinstance(timeline_length, bool) or not isinstance(timeline_length, int) or timeline_length < 2:
            raise ValueError(f"Expected `timeline_length` to be an integer >= 2, got {timeline_length!r}.")

        self.model = model
        self.every_n_steps = every_n_steps
        self.thresholds = thresholds
        self.on_alert = on_alert
        self.histograms = bool(histograms)
        self.background = bool(background)
        self._selector = Selector(model, include, exclude, functional)
        self._module_points = self._selector.module_watch_points(model, thresholds.saturation_tolerance)
        self._functional = bool(functional)

        sink_list: list[Sink] = list(sinks or [])
        if logdir is not None or writer is not None:
            from monitor.tensorboard import TensorBoardSink

            sink_list.append(
                TensorBoardSink(
                    logdir=logdir,
                    writer=writer,
                    images_every_n_samples=images_every_n_samples,
                    timeline_length=timeline_length,
                )
            )
        self._sinks = sink_list
        self._dispatcher: Dispatcher | None = None

        self._names = {id(m): n for n, m in model.named_modules()}
        self._layers: dict[str, LayerState] = {}
        self._pending_state: dict[str, Any] = {}
        self._health: dict[str, LayerHealth] = {}
        self._alerts: list[Alert] = []
        self._order: list[str] = []  # layer names in first-seen forward order
        self._functional_points: dict[tuple, WatchPoint] = {}
        self._functional_seen = False
        self._discovered = False  # a first sample in this process looked for functional activations
        self._samples = 0
        self._auto_step = 0
        self._last_sampled: int | None = None
        self._attached = False
        self._closed = False
        self._enabled = True
        self._warned: set[str] = set()
        self._lock = threading.RLock()  # detection state, shared with the writer thread
        self._queued = False  # sampled steps handed to the writer thread and maybe not judged yet
        self._seq = 0  # sampled steps packed by this monitor (never reset)
        self._judged_seq = 0  # the last of them judged
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by DDP integrations

        # Per sampled step
        self._active = False
        self._handles: list[Any] = []
        self._capture: _Capture | None = None
        self._current: dict[WatchPoint, _Pending] = {}
        self._step_names: set[str] = set()
        self._producers: dict[int, tuple[weakref.ref, str, nn.Module]] = {}
        self._act_depth = 0
        self._tracking = False
        self._hooks = {id(wp): self._make_hook(wp) for wp in self._module_points}

    # -- lifecycle -----------------------------------------------------------------------------
    def attach(self) -> Monitor:
        """Start monitoring (``with Monitor(...)`` calls this). Returns ``self``."""
        if self._closed:
            raise RuntimeError("This Monitor was closed; create a new one.")
        if self._attached:
            return self
        self._attached = True
        if self._compiled():
            self._enabled = False
            self._warn_once(
                "compile",
                "the model (or part of it) is torch.compile'd: compiled code does not run Python forward "
                "hooks added later, so activation monitoring is disabled for it (training is unaffected). "
                "Monitor the model before compiling it, or compile only the loss.",
            )
        if (self._sinks or self.background) and self._dispatcher is None:
            judge = weakref.WeakMethod(self._judge_in_background)  # the thread must not keep us alive
            self._dispatcher = Dispatcher(self._sinks, self._warn_once, judge=lambda job: judge()(job))  # type: ignore[misc]
        return self

    def close(self) -> None:
        """Remove any hooks, flush and close the sinks (a writer passed in is flushed, not closed)."""
        self._detach_step()
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher = None
        self._attached = False
        self._closed = True

    def flush(self) -> None:
        """Wait until everything sampled so far is judged and written."""
        if self._dispatcher is not None and not self._dispatcher.on_writer_thread():
            self._queued = False
            self._dispatcher.flush()

    def __enter__(self) -> Monitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._detach_step()

    # -- sampling ------------------------------------------------------------------------------
    def should_sample(self, step: int) -> bool:
        """Whether ``step`` is a sampled step (and has not been sampled already)."""
        return self._enabled and step % self.every_n_steps == 0 and step != self._last_sampled

    def step(self, step: int | None = None) -> contextlib.AbstractContextManager[Any]:
        """Context manager around one training step's forward pass.

        On non-sampled steps it is a shared no-op context: no hooks, no work. On sampled steps the
        watched outputs are reduced on their device while the forward runs, and on exit the
        statistics reach the host in one transfer and are judged.

        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh())
        >>> mon = Monitor(model, every_n_steps=1, on_alert="ignore").attach()
        >>> with mon.step(0):
        ...     _ = model(torch.randn(8, 2))
        >>> mon.health()["1"].kind
        'tanh'
        """
        if step is None:
            step = self._auto_step
        self._auto_step = step + 1
        if not self.should_sample(step):
            return _NULL
        if not self._attached:
            self.attach()
            if not self._enabled:
                return _NULL
        return _SampledStep(self, step)

    def begin_step(self, step: int) -> bool:
        """Callback form of :meth:`step` for framework integrations: start ``step`` if it is sampled.

        Returns whether it is; every ``True`` must be followed by :meth:`end_step`.
        """
        ctx = self.step(step)
        if ctx is _NULL:
            return False
        ctx.__enter__()
        return True

    def end_step(self, failed: bool = False) -> None:
        """Finish the sampled step started by :meth:`begin_step` (a no-op if none is active).

        With ``failed=True`` (the forward raised) the hooks are removed and nothing is recorded.
        """
        if self._active:
            self._end(failed=failed)

    @property
    def in_step(self) -> bool:
        """Whether a sampled step is being recorded right now."""
        return self._active

    # -- results -------------------------------------------------------------------------------
    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far (entering and recovering), oldest first."""
        self._drain()
        with self._lock:
            return list(self._alerts)

    def health(self) -> dict[str, LayerHealth]:
        """Each watched layer's health at its latest sampled step, in forward order."""
        self._drain()
        with self._lock:
            return {n: self._health[n] for n in self._order if n in self._health}

    @property
    def layers(self) -> list[str]:
        """Names of the layers seen so far, in forward order."""
        self._drain()
        with self._lock:
            return list(self._order)

    # -- hook machinery ------------------------------------------------------------------------
    def _begin(self, step: int) -> None:
        if self._active:
            raise RuntimeError("Monitor.step() contexts cannot be nested.")
        self._active = True
        self._step = step
        self._current = {}
        self._step_names = set()
        self._act_depth = 0
        self._producers = {}
        # Track producers (for functional names and (N, C, L) outputs) until functional calls are
        # known to exist, then only when they do.
        self._tracking = self._functional and (not self._discovered or self._functional_seen)
        handles = self._handles
        for wp in self._module_points:
            handles.append(wp.module.register_forward_hook(self._hooks[id(wp)]))  # type: ignore[union-attr]
        if self._tracking or not self._discovered:
            for name, module in self.model.named_modules():
                if is_activation_module(module):
                    handles.append(module.register_forward_pre_hook(self._enter_activation))
                    handles.append(module.register_forward_hook(self._leave_activation))
                else:
                    handles.append(module.register_forward_hook(self._track_producer))
        if self._tracking:
            self._capture = _Capture(self)
            self._capture.__enter__()

    def _detach_step(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            with contextlib.suppress(Exception):
                capture.__exit__(None, None, None)
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._producers = {}
        self._active = False

    def _end(self, failed: bool) -> None:
        try:
            self._detach_step()
        finally:
            current, self._current = self._current, {}
            self._active = False
        if failed:
            return  # the user's forward raised: record nothing, the exception propagates
        self._last_sampled = self._step
        if not current:
            self._warn_once(
                "empty",
                f"no watched activation ran during sampled step {self._step}; check `include`/`exclude` "
                "and that the forward pass runs inside `with monitor.step(...)`.",
            )
            return
        try:
            job = self._pack(self._step, current)
            if self._background:
                self._queued = True
                self._dispatcher.submit(job)  # type: ignore[union-attr]
                return
            judged = self._judge(job)
            if judged is None:
                return
            record, alerts = judged
            if self._dispatcher is not None:
                self._dispatcher.submit(record)
        except Exception as e:  # never let monitoring break training
            self._warn_once("process", f"monitoring step {self._step} failed and was skipped: {e!r}")
            return
        self._act(alerts)

    def _make_hook(self, wp: WatchPoint) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(wp, output, args[0] if args else None)

        return hook

    def _enter_activation(self, module: nn.Module, args: Any) -> None:
        self._act_depth += 1

    def _leave_activation(self, module: nn.Module, args: Any, output: Any) -> None:
        self._act_depth = max(0, self._act_depth - 1)
        self._track_producer(module, args, output)

    def _track_producer(self, module: nn.Module, args: Any, output: Any) -> None:
        t = output if isinstance(output, torch.Tensor) else _first_tensor(output)
        if t is not None:
            self._producers[id(t)] = (weakref.ref(t), self._names.get(id(module), ""), module)

    def _producer(self, t: Any) -> tuple[str, nn.Module] | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._producers.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1], entry[2]

    def _enclosing_module(self) -> str | None:
        """Qualified name of the innermost module of the model whose code is running, or None when
        no ``forward`` of the model is on the stack: the call comes from a loss function, the
        training loop or a LightningModule's ``training_step``, not from the model."""
        frame = sys._getframe(2)
        innermost: str | None = None
        for _ in range(100):
            if frame is None:
                break
            code = frame.f_code
            if "self" in code.co_varnames:
                owner = frame.f_locals.get("self")
                if isinstance(owner, nn.Module) and id(owner) in self._names:
                    if innermost is None:
                        innermost = self._names[id(owner)]
                    if code.co_name == "forward":
                        return innermost
            frame = frame.f_back
        return None

    @staticmethod
    def _call_site() -> tuple[Any, int]:
        frame = sys._getframe(3)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back
        return (frame.f_code, frame.f_lineno) if frame is not None else (None, 0)

    def _on_functional(self, kind: Any, inp: Any, out: Any) -> None:
        try:
            enclosing = self._enclosing_module()
            if enclosing is None:
                return  # not part of the model's forward (e.g. F.relu in a hinge loss)
            producer = self._producer(inp)
            owner = producer[0] if producer else enclosing
            base_name = kind.name.split("[")[0]
            key = (owner, base_name, self._call_site())
            wp = self._functional_points.get(key)
            if wp is None:
                name = f"{owner}.{base_name}" if owner else base_name
                taken = {p.name for p in self._functional_points.values()} | {p.name for p in self._module_points}
                if name in taken:
                    k = 2
                    while f"{name}#{k}" in taken:
                        k += 1
                    name = f"{name}#{k}"
                wp = make_watch_point(name, kind, None, self.thresholds.saturation_tolerance)
                if producer is not None and conv_like(producer[1]):
                    wp.unit_dim = 1
                if not self._selector.wants_functional(name, kind):
                    wp.rows = ()  # remembered as "not watched"
                self._functional_points[key] = wp
            self._functional_seen = True
            if wp.rows:
                self._record(wp, out, inp)
        except Exception as e:
            self._warn_once("functional", f"could not record a functional activation: {e!r}")

    def _record(self, wp: WatchPoint, output: Any, inp: Any) -> None:
        try:
            x = output if isinstance(output, torch.Tensor) else _first_tensor(output)
            if x is None or not x.is_floating_point() or x.ndim == 0 or x.numel() == 0:
                return
            x = x.detach()
            if wp.unit_dim is None:
                wp.unit_dim = -1 if x.ndim <= 2 else 1 if x.ndim >= 4 else self._unit_dim_3d(inp)
            dims = wp.dims(x.ndim)
            numel = x.numel()
            # Small CPU tensors: a parallel region costs more than the reduction it splits, so
            # reduce them on one thread (this halves the hook's cost on a 128 x 256 activation).
            threads = torch.get_num_threads() if x.device.type == "cpu" and numel < _SERIAL_BELOW else 1
            if threads > 1:
                torch.set_num_threads(1)
            try:
                stats = unit_stat_rows(x, dims, wp.rows, wp.kind, wp.lo_thr, wp.hi_thr)
                units = stats[0].shape[0]
                hist = None
                sampled = 0
                if self.histograms:
                    stride = sample_stride(numel, units)
                    hist = histogram_sample(x, stride)
                    sampled = hist.numel()
            finally:
                if threads > 1:
                    torch.set_num_threads(threads)
            prev = self._current.get(wp)
            if prev is None:
                self._current[wp] = _Pending(stats, units, [] if hist is None else [hist], numel // units, numel, sampled)
            elif prev.units == units:
                prev.stats = combine_rows(prev.stats, stats, wp.rows)
                if hist is not None:
                    prev.hist_samples.append(hist)
                prev.positions += numel // units
                prev.hist_numel += numel
                prev.hist_sampled += sampled
            else:
                self._warn_once(f"shape:{wp.name}", f"{wp.name}: unit count changed within a step; extra call ignored")
        except Exception as e:
            self._warn_once(f"record:{wp.name}", f"could not record {wp.name}: {e!r}")

    def _unit_dim_3d(self, inp: Any) -> int:
        producer = self._producer(inp)
        return 1 if producer is not None and conv_like(producer[1]) else -1

    # -- host side -----------------------------------------------------------------------------
    def _pack(self, step: int, current: dict[WatchPoint, _Pending]) -> _Job:
        """Training thread: concatenate this step's partials into one flat tensor on their device.

        No host sync, except under DDP, where the one collective happens here (on every rank).
        """
        points = list(current)
        pieces: list[torch.Tensor] = []
        device = current[points[0]].stats[0].device
        hist_samples: list[torch.Tensor] = []
        hist_groups: list[int] = []
        gather = self.gather
        # CPU tensors: the host is their device, so the sampled values are binned later on the same
        # device, off the training thread. Accelerators, and DDP (counts are summed across ranks):
        # binned here, on the device, without a sync.
        bin_on_host = gather is None and all(current[wp].stats[0].is_cpu for wp in points)
        for wp in points:
            p = current[wp]
            pieces += p.stats
            if p.hist_samples:
                hist_samples += p.hist_samples
                hist_groups.append(len(p.hist_samples))
        if hist_samples and bin_on_host:
            pieces += hist_samples  # binned on the host later; they travel in the same one transfer
        elif hist_samples:
            if any(t.device != device for t in hist_samples):  # a model split over devices
                hist_samples = [t.to(device, non_blocking=True) for t in hist_samples]
            pieces.append(histogram_counts_batched(hist_samples, hist_groups).reshape(-1))
        if any(t.device != device for t in pieces):
            pieces = [t.to(device, non_blocking=True) for t in pieces]
        counts = [float(v) for wp in points for v in (current[wp].positions, current[wp].hist_sampled, current[wp].hist_numel)]
        if gather is not None:
            pieces.append(torch.tensor(counts, dtype=torch.float32, device=device))
        flat: torch.Tensor | np.ndarray = torch.cat(pieces)
        ready = None
        if gather is not None:
            host = gather(flat).reshape(-1, flat.numel()).cpu().numpy()  # the one transfer
            flat = self._reduce_ranks(host, points, current)
            counts = flat[-len(counts) :].tolist()
        elif flat.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(flat.device))
        self._samples += 1
        self._discovered = True
        self._seq += 1
        return _Job(self._seq, step, flat, ready, points, [current[wp] for wp in points], counts, bin_on_host)

    def _judge(self, job: _Job) -> tuple[SampleRecord, list[Alert]] | None:
        """Host side of a sampled step: the one transfer, summaries, detection, the record.

        Runs on the writer thread (default) or inline (``on_alert="raise"``, DDP, ``background=False``).
        """
        # No ATen kernel may run here when this is the writer thread: CPU kernels called from a second
        # thread slowed the training thread about 3x on a 2-core machine (a second OpenMP team).
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
        layers: list[LayerSample] = []
        alerts: list[Alert] = []
        offset = 0
        hist_offset = sum(len(p.stats) * p.units for p in job.pending)
        buckets = len(histogram_edges()) + 1
        with self._lock:
            if job.seq <= self._judged_seq:
                return None  # a newer step was judged first (writer overload): windows stay in order
            self._judged_seq = job.seq
            host_counts = None
            if job.bin_on_host:  # CPU: the sampled values themselves, binned here with numpy, all layers at once
                lengths = [int(job.counts[3 * i + 1]) for i, p in enumerate(job.pending) if p.hist_samples]
                if lengths:
                    host_counts = iter(histogram_counts_host(host_flat[hist_offset : hist_offset + sum(lengths)], lengths))
            for i, (wp, p) in enumerate(zip(job.points, job.pending)):
                r, c = len(p.stats), p.units
                block = host_flat[offset : offset + r * c].reshape(r, c)
                offset += r * c
                positions, sampled, numel = int(counts[3 * i]), counts[3 * i + 1], counts[3 * i + 2]
                summary = summarize(block, wp.rows, positions)
                sample = LayerSample(wp.name, wp.kind.name, None, summary)  # type: ignore[arg-type]
                if p.hist_samples:
                    sample.hist_scale = numel / sampled if sampled else 1.0
                    if host_counts is not None:
                        sample.hist_counts = next(host_counts)
                    else:
                        sample.hist_counts = host_flat[hist_offset : hist_offset + buckets]
                        hist_offset += buckets
                state = self._layers.get(wp.name) or self._layer_state(wp)
                sample.health, new_alerts = state.update(job.step, summary)
                self._health[wp.name] = sample.health
                if new_alerts:
                    alerts += new_alerts
                layers.append(sample)
            if len(self._health) != len(self._order) or self._order[-1] != layers[-1].name:
                self._order.extend(ls.name for ls in layers if ls.name not in self._order)
            self._alerts.extend(alerts)
            if len(self._alerts) > _MAX_ALERTS:
                del self._alerts[: len(self._alerts) - _MAX_ALERTS]
        return SampleRecord(job.step, layers, alerts), alerts

    def _judge_in_background(self, job: _Job) -> SampleRecord | None:
        """The writer thread's half: judge, then deliver the alerts ("warn" or a callable)."""
        judged = self._judge(job)
        if judged is None:
            return None
        record, alerts = judged
        try:
            self._act(alerts)
        except Exception as e:  # a user callback that raises must not stop the writer
            self._warn_once("on_alert", f"the on_alert callback raised {e!r}; later alerts are still delivered")
        return record

    @property
    def _background(self) -> bool:
        d = self._dispatcher
        return self.background and self.on_alert != "raise" and self.gather is None and d is not None and not d.overloaded

    def _drain(self) -> None:
        """Wait until every sampled step so far has been judged (results read after it are current)."""
        d = self._dispatcher
        if d is not None and self._queued and not d.on_writer_thread():
            self._queued = False
            d.flush(sinks=False)

    def _reduce_ranks(self, host: np.ndarray, points: list[WatchPoint], current: dict[WatchPoint, _Pending]) -> np.ndarray:
        """Combine per-rank partials: max for extrema rows, sum for everything else."""
        from monitor.stats import MAX_ROWS

        is_max = np.zeros(host.shape[1], dtype=bool)
        offset = 0
        for wp in points:
            p = current[wp]
            r, c = len(p.stats), p.units
            for i, row in enumerate(wp.rows):
                if row in MAX_ROWS:
                    is_max[offset + i * c : offset + (i + 1) * c] = True
            offset += r * c
        return np.where(is_max, host.max(axis=0), host.sum(axis=0))

    def _layer_state(self, wp: WatchPoint) -> LayerState:
        state = self._layers.get(wp.name)
        if state is None:
            state = self._layers[wp.name] = LayerState(wp.name, wp.kind, self.thresholds)
            pending = self._pending_state.pop(wp.name, None)
            if pending is not None:
                state.load_state_dict(pending)
        return state

    def _act(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if self.on_alert == "ignore":
                continue
            if callable(self.on_alert):
                self.on_alert(alert)
            elif self.on_alert == "warn" or alert.recovered:
                warnings.warn(alert.message, MonitorWarning, stacklevel=4)
        if self.on_alert == "raise":
            bad = [a for a in alerts if not a.recovered]
            if bad:
                raise ActivationAlertError(bad[0])

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"activation monitor: {message}", MonitorWarning, stacklevel=3)

    def _compiled(self) -> bool:
        """torch.compile(model), model.compile(), a compiled submodule, or Lightning's compile."""
        return any(
            type(m).__name__ == "OptimizedModule"
            or getattr(m, "_compiled_call_impl", None) is not None
            or getattr(m, "_compiler_ctx", None) is not None
            for m in self.model.modules()
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (a closed monitor cannot be re-attached)."""
        return self._closed

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Windows, baselines, alert states and the sampling position, for checkpoints."""
        self._drain()
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        layers = {name: s.state_dict() for name, s in self._layers.items()}
        layers.update({k: v for k, v in self._pending_state.items() if k not in layers})
        return {
            "version": 1,
            "every_n_steps": self.every_n_steps,
            "samples": self._samples,
            "auto_step": self._auto_step,
            "last_sampled": self._last_sampled,
            "order": list(self._order),
            "layers": layers,
            "alerts": [a.to_dict() for a in self._alerts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; layers resume as they are seen again."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("Expected a state dict saved by Monitor.state_dict() (version 1).")
        self._drain()
        self._samples = int(state["samples"])
        self._auto_step = int(state["auto_step"])
        last = state["last_sampled"]
        self._last_sampled = None if last is None else int(last)
        self._order = list(state["order"])
        self._alerts = [Alert(**a) for a in state["alerts"]]
        self._layers = {}
        self._pending_state = dict(state["layers"])


class _SampledStep:
    __slots__ = ("monitor", "step")

    def __init__(self, monitor: Monitor, step: int) -> None:
        self.monitor, self.step = monitor, step

    def __enter__(self) -> Monitor:
        self.monitor._begin(self.step)
        return self.monitor

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        self.monitor._end(failed=exc_type is not None)
        return False


_NULL = contextlib.nullcontext()
