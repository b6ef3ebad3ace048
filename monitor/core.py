"""The :class:`Monitor`: a thin facade over recording, packing, judging, the sinks and the probe.

One sampled step, as data: ``Monitor.step`` -> the :class:`~monitor.recording.StepRecorder`
begins: :class:`~monitor.capture.Capture` registers hooks (and
:class:`~monitor.params.ParameterCapture` its optimizer hooks,
:class:`~monitor.attention.AttentionCapture` its attention hooks; a compiled model runs eagerly)
-> forward -> each hook appends per-unit rows on the device (and registers a tensor hook for the
gradient) -> backward and the optimizer step, if inside the step -> the recorder ends (hooks
removed) -> :func:`~monitor.pack.pack` concatenates them (one DDP collective) -> the writer thread
(:class:`~monitor.sinks.Dispatcher`) hands them to the :class:`~monitor.ledger.Ledger`, which copies
them to the host once (:func:`~monitor.pack.unpack`), has the :class:`~monitor.judge.Judge` run
each detector and keeps the results -> :func:`~monitor.alerts.deliver` acts -> sinks write.
Probe runs and ablations (:mod:`monitor.probe`, :mod:`monitor.ablation`) go through
:class:`~monitor.probing.Probing`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import operator
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from monitor.ablation import Ablation, AblationEffect, importance_table
from monitor.alerts import ActivationAlertError, Alert, MonitorWarning, OnAlert, WarnOnce, deliver
from monitor.compiled import has_compiled_parts, unwrap
from monitor.detectors import Detector, builtin_detectors
from monitor.health import AttentionHealth, LayerHealth, ParameterHealth
from monitor.judge import Judge
from monitor.ledger import Ledger
from monitor.options import Options
from monitor.pack import Job, pack
from monitor.probe import ProbeRecord, ProbeResult, ProbeRunner, probe_input
from monitor.probing import Probing
from monitor.recording import StepRecorder
from monitor.records import SampleRecord
from monitor.runconfig import normalize_config
from monitor.selection import Patterns, Selector, WatchPoint
from monitor.sinks import Dispatcher, Sink
from monitor.stats import PRE_ROWS, rows_for
from monitor.thresholds import Thresholds

__all__ = ["ActivationAlertError", "Monitor", "MonitorWarning", "OnAlert"]

_OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()


@atexit.register
def _close_open_monitors() -> None:
    """A script that simply ends: whatever was sampled reaches its sinks (atexit runs before the
    interpreter stops the monitor's daemon writer thread)."""
    for mon in list(_OPEN):
        with contextlib.suppress(Exception):
            mon.close()


def _rows(custom: tuple[Detector, ...], wp: WatchPoint) -> tuple[str, ...]:
    """The statistic rows of a watch point: the built-ins' and those your detectors read."""
    extra = tuple(
        r for d in custom if d.applies(wp.kind) for r in (*d.reads, *d.windowed) if r not in PRE_ROWS or wp.kind.can_die
    )
    return rows_for(wp.kind, extra)


def _make_sinks(
    sinks: Sequence[Sink] | None, logdir: Any, writer: Any, images_every_n_samples: int, timeline_length: int,
    run_config: Mapping[str, Any],
) -> list[Sink]:
    """The monitor's sinks: those passed, then TensorBoard's when there is a ``logdir`` or a ``writer``."""
    out: list[Sink] = list(sinks or [])
    if logdir is not None or writer is not None:
        from monitor.tensorboard import TensorBoardSink

        out.append(
            TensorBoardSink(
                logdir=logdir,
                writer=writer,
                images_every_n_samples=images_every_n_samples,
                timeline_length=timeline_length,
                run_config=run_config,
            )
        )
    return out


class Monitor:
    """Watch a model's activations (and gradients) on every N-th step; detect dead, saturated, dormant,
    exploding units and vanishing or exploding gradients.

    Args:
        model: the ``nn.Module`` to watch. It is never modified: hooks exist only during sampled
            steps and are always removed.
        every_n_steps: sample steps where ``step % every_n_steps == 0``.
        include, exclude: what to watch: glob patterns over qualified module names
            (``"encoder.layers.*"``), module type names (``"GELU"``) and functional activation
            names (``"dense0.relu"``), module classes (``nn.Tanh``, subclasses match) or a
            predicate ``callable(name, module) -> bool``; a string, a class, a callable or a
            list of them. By default every activation module, functional activation and stack
            block is watched, and the gates and states of every ``nn.LSTM``/``nn.GRU`` (recomputed:
            :mod:`monitor.recurrent`).
        thresholds: a :class:`Thresholds`; defaults are silent on healthy runs.
        logdir: write TensorBoard events here (needs the ``tensorboard`` extra).
        writer: or a ``SummaryWriter``: the monitor writes its own event file into the writer's
            directory (one run in TensorBoard) and never touches the writer itself.
        on_alert: ``"warn"`` (a :class:`MonitorWarning`), ``"raise"`` (:class:`ActivationAlertError`
            at the end of the sampled step), ``"stop"`` (warn and set :attr:`should_stop`, which the
            integrations turn into a clean stop), ``"ignore"``, or a callable receiving each :class:`Alert`.
        histograms: write per-layer histograms.
        images_every_n_samples: render the heatmaps every this many sampled steps (also when an
            alert fires, and on close); 0 disables images.
        timeline_length: sampled steps kept in each "units x time" timeline.
        functional: also watch functional activations called inside ``forward``.
        sinks: extra :class:`~monitor.sinks.Sink` objects that receive every sample record.
        background: judge sampled steps on the monitor's writer thread, so the training thread
            only concatenates the partials on their device. ``alerts``, ``health()``, ``flush()``
            and ``state_dict()`` first wait for the steps already taken. ``"raise"``, ``"stop"``,
            DDP (``gather``) and ``background=False`` judge on the training thread when the step ends.
        detectors: extra :class:`~monitor.detectors.Detector` instances, judged after the built-ins.
        gradients: when the backward (and optimizer step) of a sampled step run inside
            ``with mon.step(...)``, also record the gradient with respect to each watched output,
            each parameter's gradient norm and update-to-weight ratio. Costs nothing when only
            the forward is inside the step.
        run_config: what this run is (``{"lr": 0.1, "fold": 2}``): written once into the run's
            event file (text tag ``run_config``, one JSON object; see :mod:`monitor.runconfig`),
            where the run report shows it and groups runs by it.
        probe: a fixed batch run through the model, invisibly to training, every
            ``probe_every_n_samples`` sampled steps (and by :meth:`probe`): a tensor or NumPy array
            (``model(P)``), a dict of keyword inputs (``model(**P)``) or ``(inputs, targets)``.
            Gives per watched layer the samples x units matrix, each unit's most exciting samples
            and the drift since the previous probe run (see :mod:`monitor.probe`).
        probe_every_n_samples: sampled steps between probe runs (default 20, the cadence of the
            scan images: with ``every_n_steps=50``, one probe every 1000 steps).
        probe_labels: one label per probe sample (rows of the heatmap are grouped by them), or
            ``"targets"`` for the probe's targets.
        probe_loss_fn: ``loss_fn(output, targets)`` for the probe's loss (needs targets).
        attention: on sampled steps, also measure every attention head (``nn.MultiheadAttention``,
            Hugging Face attention run with ``attn_implementation="eager"`` or ``"sdpa"``): the
            entropy of its attention and its mass on the first token (see :mod:`monitor.headstats`).

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
        detectors: Sequence[Detector] | None = None,
        gradients: bool = True,
        run_config: Mapping[str, Any] | None = None,
        probe: Any = None,
        probe_every_n_samples: int = 20,
        probe_labels: Any = None,
        probe_loss_fn: Callable[[Any, Any], Any] | None = None,
        attention: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
        opts = Options(
            every_n_steps, include, exclude, thresholds, logdir, writer, on_alert, histograms,
            images_every_n_samples, timeline_length, functional, sinks, background, detectors, gradients, run_config,
            probe, probe_every_n_samples, probe_labels, probe_loss_fn, attention,
        )
        # NumPy integers are accepted; kept as Python ints (checkpoints load with weights_only=True)
        every_n_steps, images_every_n_samples = int(every_n_steps), int(images_every_n_samples)
        timeline_length, probe_every_n_samples = int(timeline_length), int(probe_every_n_samples)
        compiled_parts = has_compiled_parts(model)
        model = unwrap(model)  # torch.compile(model): watch the module it runs (see monitor/compiled.py)
        self.model = model
        self.every_n_steps = every_n_steps
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self.on_alert: OnAlert = on_alert
        self.histograms = histograms
        self.background = background
        self.run_config = normalize_config(run_config)
        self._custom = list(detectors or ())
        self.detectors: list[Detector] = builtin_detectors() + self._custom
        self._warn_once = WarnOnce()
        # No reference back to the monitor from its parts: when the last reference to an unclosed
        # monitor goes, ``__del__`` runs (and judges and writes what is queued) before weak
        # references to it are cleared.
        self._recorder = StepRecorder(
            model,
            Selector(model, include, exclude, functional),
            compiled_parts=compiled_parts,
            functional=functional,
            histograms=histograms,
            gradients=gradients,
            attention=attention,
            tolerance=self.thresholds.saturation_tolerance,
            attention_entropy=self.thresholds.attention_entropy,
            rows=functools.partial(_rows, tuple(self._custom)),
            warn_once=self._warn_once,
        )
        self.probe_every_n_samples = probe_every_n_samples
        self._probes = ProbeRunner(  # run by self._probing; has_probe and last_probe read it here
            self._recorder.capture,
            None if probe is None else probe_input(probe, probe_labels),
            probe_loss_fn,
            self._warn_once,
        )
        self._ledger = Ledger(Judge(self.thresholds, self.detectors, self._warn_once))
        self._judge = self._ledger.judge

        self._sinks = _make_sinks(opts.sinks, logdir, writer, images_every_n_samples, timeline_length, self.run_config)
        self._dispatcher: Dispatcher | None = None
        self._probing = Probing(self._recorder, self._probes, self._sinks, self._warn_once)

        self._samples = 0
        self._auto_step = 0
        self._last_sampled: int | None = None
        self._step = 0
        self._attached = False
        self._closed = False
        self._enabled = True
        self._stop = False
        self._queued = False  # sampled steps handed to the writer thread and maybe not judged yet
        self._seq = 0  # sampled steps packed by this monitor (never reset)
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by DDP integrations

    # -- lifecycle -----------------------------------------------------------------------------
    def attach(self) -> Monitor:
        """Start monitoring (``with Monitor(...)`` and the first sampled step call this). Returns ``self``."""
        if self._closed:
            raise RuntimeError("This Monitor was closed; create a new one.")
        if self._attached:
            return self
        self._attached = True
        _OPEN.add(self)
        if self._recorder.compiled_parts and not self._recorder.eager.available:
            self._enabled = False
            self._warn_once(
                "compile",
                "the model (or part of it) is torch.compile'd and this PyTorch has no torch.compiler.set_stance "
                "(2.6+), which the monitor needs to run sampled steps eagerly: monitoring is disabled for it "
                "(training is unaffected). Upgrade PyTorch, or monitor an uncompiled model.",
            )
        if (self._sinks or self.background) and self._dispatcher is None:
            judge = weakref.WeakMethod(self._judge_in_background)  # the thread must not keep us alive
            self._dispatcher = Dispatcher(self._sinks, self._warn_once, judge=lambda job: judge()(job))  # type: ignore[misc]
        return self

    def close(self) -> None:
        """Remove any hooks, then judge and write everything sampled and close the sinks.

        Idempotent. Also runs at interpreter exit for a monitor that was never closed.
        """
        if self._probing.due_here():
            self.run_due_probe()  # the last sampled step's probe run (on the training thread only)
        self._recorder.detach()
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher = None
        self._attached = False
        self._closed = True
        _OPEN.discard(self)

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
        # An unclosed monitor that is no longer referenced: hooks off, the queued steps judged
        # and written, the writer thread ended.
        with contextlib.suppress(Exception):
            self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (a closed monitor cannot be re-attached)."""
        return self._closed

    # -- sampling ------------------------------------------------------------------------------
    def should_sample(self, step: int) -> bool:
        """Whether ``step`` is a sampled step (and has not been sampled already)."""
        return self._enabled and step % self.every_n_steps == 0 and step != self._last_sampled

    def step(self, step: int | None = None) -> contextlib.AbstractContextManager[Any]:
        """Context manager around one training step: its forward pass, or all of it.

        On non-sampled steps it is a shared no-op context: no hooks, no work. On sampled steps the
        watched outputs are reduced on their device while the forward runs; if ``backward()`` runs
        inside too, so are the gradients with respect to them and each parameter's gradient
        norm, and an optimizer step inside gives the update-to-weight ratios. On exit the
        statistics reach the host in one transfer and are judged. ``step`` is an ``int``
        (a NumPy integer or an integer 0-d tensor counts as its value; default: one more than the last).

        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh())
        >>> mon = Monitor(model, every_n_steps=1, on_alert="ignore")
        >>> with mon.step(0):
        ...     _ = model(torch.randn(8, 2))
        >>> mon.health()["1"].kind
        'tanh'
        """
        if self._probing.due is not None:
            self.run_due_probe()  # asked for by the previous sampled step: run between two steps
        if step is None:
            step = self._auto_step
        elif isinstance(step, bool) or not isinstance(step, int):
            try:  # NumPy integers, integer 0-d tensors: anything with __index__ (not bool, not float)
                if isinstance(step, (bool, np.bool_)) or (
                    isinstance(step, torch.Tensor) and (step.ndim != 0 or step.dtype == torch.bool)
                ):
                    raise TypeError
                step = operator.index(step)
            except TypeError:
                raise TypeError(f"Expected `step` to be an int (or None for the next one), got {step!r}.") from None
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
        if self._recorder.active:
            self._end(failed=failed)

    def end_forward(self) -> None:
        """In the sampled step in progress, stop watching forward passes; its gradients, parameter
        norms and optimizer step are still recorded until :meth:`end_step`. For integrations whose
        framework reports a finished forward but no exception (skorch)."""
        self._recorder.end_forward()

    @property
    def in_step(self) -> bool:
        """Whether a sampled step is being recorded right now."""
        return self._recorder.active

    @property
    def should_stop(self) -> bool:
        """With ``on_alert="stop"``: whether an alert asked training to stop."""
        return self._stop

    # -- results -------------------------------------------------------------------------------
    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far (entering and recovering), oldest first."""
        self._drain()
        with self._ledger.lock:
            return list(self._ledger.alerts)

    def health(self) -> dict[str, LayerHealth]:
        """Each watched layer's health at its latest sampled step, in forward order."""
        self._drain()
        return self._ledger.layer_health()

    def parameter_health(self) -> dict[str, ParameterHealth]:
        """Each trainable parameter's gradient norm and update ratio at the latest sampled step
        whose backward ran inside the step (empty until one did)."""
        self._drain()
        with self._ledger.lock:
            return dict(self._ledger.param_health)

    def attention_health(self) -> dict[str, AttentionHealth]:
        """Each attention module's heads at its latest sampled step (entropy, normalised entropy and
        first-token mass per head), in forward order (empty until one was measured)."""
        self._drain()
        with self._ledger.lock:
            return dict(self._ledger.attention)

    def gradients_from_callbacks(self) -> None:
        """For integrations: the framework reports where gradients are final, so sampled steps
        attach no parameter or optimizer hooks; call :meth:`record_gradients` there. Nothing
        process-wide is left behind if the framework's step raises without telling anyone."""
        self._recorder.gradients_from_callbacks()

    def record_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Read the parameters' gradients now, in the sampled step in progress (a no-op outside one).

        For integrations that know where gradients are final and the optimizer has not updated
        yet (Lightning's ``on_before_optimizer_step``: after gradient accumulation and the DDP
        all-reduce, before clipping; skorch's ``on_grad_computed``). With
        :meth:`gradients_from_callbacks`, the weights' "before" samples are taken here and the
        "after" ones when the step ends, so the update ratio spans the optimizer step. With
        ``optimizer``, only its parameters (several optimizers stepping one after the other).
        """
        self._recorder.read_gradients(optimizer)

    def pause(self, paused: bool = True) -> None:
        """Ignore (``True``) or record again (``False``) forward passes in the sampled step in
        progress: for a validation loop that runs in the middle of a training step."""
        self._recorder.paused = paused

    @property
    def layers(self) -> list[str]:
        """Names of the layers seen so far, in forward order."""
        self._drain()
        with self._ledger.lock:
            return list(self._ledger.order)

    # -- one sampled step ----------------------------------------------------------------------
    def _begin(self, step: int) -> None:
        if self._recorder.active:
            raise RuntimeError("Monitor.step() contexts cannot be nested.")
        self._step = step
        self._recorder.begin(host=self.gather is None)

    def _end(self, failed: bool) -> None:
        current, params, attention = self._recorder.end(failed, host=self.gather is None)
        if failed or self._closed:
            return  # the step raised (the exception propagates), or the monitor was closed meanwhile
        self._recorder.check_stepped(self._step, current, params)
        self._recorder.check_modules(current)
        self._last_sampled = self._step
        if not current and attention is None:
            self._warn_once(
                "empty",
                f"no watched activation ran during sampled step {self._step}; check `include`/`exclude` "
                "and that the forward pass runs inside `with monitor.step(...)`.",
            )
            return
        try:
            self._seq += 1
            job = pack(self._seq, self._step, current, self.gather, params, attention)
            self._samples += 1
            self._probing.sampled(self._samples, self.probe_every_n_samples, self._step)
            self._recorder.capture.discovered = True
            if self._background:
                self._queued = True
                self._dispatcher.submit(job)  # type: ignore[union-attr]
                return
            judged = self._ledger.take(job)
            if judged is None:
                return
            record, alerts = judged
            if self._dispatcher is not None:
                self._dispatcher.submit(record)
        except Exception as e:  # never let monitoring break training
            self._warn_once("process", f"monitoring step {self._step} failed and was skipped: {e!r}")
            return
        self._act(alerts)

    @property
    def _background(self) -> bool:
        d = self._dispatcher
        inline = self.on_alert in ("raise", "stop") or self.gather is not None
        return self.background and not inline and d is not None and not d.overloaded

    def _judge_in_background(self, job: Job) -> SampleRecord | None:
        """The writer thread's half: judge, then deliver the alerts ("warn" or a callable)."""
        if isinstance(job, ProbeRecord):
            self._probing.write(job, self._dispatcher)
            return None
        judged = self._ledger.take(job)
        if judged is None:
            return None
        record, alerts = judged
        try:
            self._act(alerts)
        except Exception as e:  # a user callback that raises must not stop the writer
            self._warn_once("on_alert", f"the on_alert callback raised {e!r}; later alerts are still delivered")
        return record

    def _act(self, alerts: list[Alert]) -> None:
        if alerts and deliver(alerts, self.on_alert):
            self._stop = True

    def _drain(self) -> None:
        """Wait until every sampled step so far has been judged (results read after it are current)."""
        d = self._dispatcher
        if d is not None and self._queued and not d.on_writer_thread():
            self._queued = False
            d.flush(sinks=False)

    def _compiled(self) -> bool:
        """torch.compile(model), model.compile(), a compiled submodule, or Lightning's compile."""
        return self._recorder.compiled()

    def mark_compiled(self) -> None:
        """The model runs through a compiled wrapper the monitor was not given (the Hugging Face
        Trainer's ``torch_compile=True`` compiles its own wrapper of the model): run sampled steps
        and probes under the ``"force_eager"`` compiler stance, as for a compiled model
        (:mod:`monitor.compiled`). For integrations."""
        self._recorder.compiled_parts = True

    # -- probe and ablation (monitor/probing.py: monitor/probe.py, monitor/ablation.py) ----------
    def probe(
        self, ablate: Mapping[str, Any] | None = None, *, value: float | str = 0.0, loss_fn: Callable[[Any, Any], Any] | None = None
    ) -> ProbeResult:
        """Run the probe now, invisibly to training, and return its :class:`~monitor.probe.ProbeResult`
        (also written to the sinks: TensorBoard's ``activation_probe/<layer>``, ``probe_drift/<layer>``, ...).

        With ``ablate={layer: "all" | [units]}``, the probe runs twice, as is and with those units
        replaced by ``value`` (0, a number, or ``"mean"``: each unit's mean on the probe): the
        result holds the ablated run's matrices, ``drift`` against the unablated run (how much each
        layer moved because of the ablation) and ``ablation``, an
        :class:`~monitor.ablation.AblationEffect` (output, prediction and, with targets and a
        ``loss_fn``, loss change). Ablated runs are not written and not compared with later runs.
        """
        return self._probing.probe(ablate, value, loss_fn, max(self._auto_step - 1, 0), self._publish)

    def ablate(self, layers: Mapping[str, Any], value: float | str = 0.0) -> Ablation:
        """``with mon.ablate({"dense0.relu": [3, 7], "layers.2": "all"}):`` replaces those units of
        watched layers by ``value`` (0, a number, or ``"mean"``: each unit's mean over the last probe
        run) in every forward inside the block; hooks and the functional mode leave with the block."""
        return self._probing.ablate(layers, value)

    def layer_importance(
        self, value: float | str = 0.0, loss_fn: Callable[[Any, Any], Any] | None = None
    ) -> dict[str, AblationEffect]:
        """Each watched layer that the probe reaches ablated whole (every unit), one after the other,
        on the probe: ``{layer: AblationEffect}`` in forward order. Written to the sinks as the text
        table ``probe_importance`` (most important first)."""
        effects = self._probing.layer_importance(value, loss_fn)
        self._publish(ProbeRecord(None, step=max(self._auto_step - 1, 0), importance=importance_table(effects)))
        return effects

    def set_probe(self, probe: Any, labels: Any = None) -> None:
        """Use another probe from now on (drift starts over). For integrations (Lightning's
        ``probe="val"``: the first validation batch)."""
        self._probing.set_probe(probe, labels)

    @property
    def has_probe(self) -> bool:
        """Whether a probe is set (and periodic probe runs have not been stopped by a failure)."""
        return self._probes.probe is not None

    @property
    def last_probe(self) -> ProbeResult | None:
        """The latest (unablated) probe run, or None."""
        return self._probes.last

    def run_due_probe(self) -> ProbeResult | None:
        """Run the probe if a sampled step asked for one (``probe_every_n_samples``). The core calls
        it at the next :meth:`step` and at :meth:`close`; integrations call it where their training
        step has ended. A failing run warns once and stops the periodic probe; training goes on."""
        return self._probing.run_due(self._publish)

    def _publish(self, record: ProbeRecord) -> None:
        if not self._attached and not self._closed:
            self.attach()  # mon.probe() before any sampled step: its output still reaches the sinks
        if self._dispatcher is not None and not self._closed:
            self._dispatcher.submit(record)

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Evidence windows, baselines, alert states and the sampling position, for checkpoints."""
        self._drain()
        with self._ledger.lock:
            return {
                "version": 2,
                "every_n_steps": self.every_n_steps,
                "samples": self._samples,
                "auto_step": self._auto_step,
                "last_sampled": self._last_sampled,
                **self._ledger.state_dict(),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (also version 1); layers resume as they are seen again."""
        if not isinstance(state, dict) or state.get("version") not in (1, 2):
            raise ValueError("Expected a state dict saved by Monitor.state_dict() (version 1 or 2).")
        try:
            samples, auto_step, last = int(state["samples"]), int(state["auto_step"]), state["last_sampled"]
            last = None if last is None else int(last)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Expected a state dict saved by Monitor.state_dict(); this one is incomplete or damaged: {e!r}.") from e
        self._drain()
        with self._ledger.lock:
            try:
                self._ledger.load_state_dict(state)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"Expected a state dict saved by Monitor.state_dict(); its layers could not be read: {e!r}.") from e
            self._samples, self._auto_step, self._last_sampled = samples, auto_step, last


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
