"""skorch integration: :class:`ActivationMonitor`, a callback that watches ``net.module_``.

>>> from integrations.skorch import ActivationMonitor
>>> # net = NeuralNetClassifier(MyModule, callbacks=[ActivationMonitor(every_n_steps=5, logdir="runs/wine")])
>>> # net.fit(X, y); net.history[:, "activation_dead_fraction_max"]

Only training batches are sampled; the step is the number of training batches seen since the
net was (re-)initialised. Hooks exist only while a sampled training batch's forward runs.
See the README (section "skorch") for the options, the history keys and how it behaves with ``clone``,
``GridSearchCV`` and ``pickle``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

try:
    from skorch.callbacks import Callback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "integrations.skorch needs skorch (and scikit-learn): pip install 'activation-monitor[skorch]'"
    ) from e

from torch import nn

from integrations._skorch_guard import StepGuard, guard_step
from integrations._skorch_history import HISTORY_KEYS, history_row
from monitor import (
    ActivationAlertError,
    Alert,
    Detector,
    LayerHealth,
    Monitor,
    Options,
    ParameterHealth,
    Sink,
    Thresholds,
)
from monitor.alerts import warn
from monitor.compiled import unwrap
from monitor.selection import Patterns

__all__ = ["HISTORY_KEYS", "ActivationMonitor"]

_StepGuard = StepGuard  # where pickles of nets saved before the split find it

SkorchOnAlert = Union[Literal["warn", "raise", "ignore", "stop"], Callable[[Alert], None]]  # noqa: UP007 (py3.10)

def _probe_tensors(probe: Any) -> Any:
    """A probe as skorch feeds ``module_``: arrays, lists and dicts of them as tensors (``to_tensor``)."""
    if probe is None:
        return None
    from skorch.utils import to_tensor

    if isinstance(probe, (tuple, list)) and len(probe) == 2:
        return (to_tensor(probe[0], device="cpu"), to_tensor(probe[1], device="cpu"))
    return to_tensor(probe, device="cpu")


def _net_config(net: Any) -> dict[str, Any]:
    """The net's own parameters of this fit (``get_params(deep=False)``), without callbacks and private keys."""
    try:
        params = net.get_params(deep=False)
    except Exception:  # a net without sklearn's get_params: nothing to record
        return {}
    return {
        str(k): v for k, v in params.items() if not str(k).startswith(("_", "callbacks")) and str(k) != "callbacks"
    }


class ActivationMonitor(Callback):
    """Watch ``net.module_``'s activations on every N-th training batch; dead/saturated/exploding units.

    Takes the keyword options of :class:`monitor.Monitor` (``every_n_steps``, ``include``,
    ``exclude``, ``thresholds``, ``logdir``, ``on_alert``, ``histograms``,
    ``images_every_n_samples``, ``timeline_length``, ``functional``, ``sinks``, ``detectors``,
    ``gradients``: the step spans the batch's backward and optimizer step) and:

    Args:
        logdir: a base directory; each fit writes TensorBoard events to a fresh numbered
            subdirectory (``run-000``, ``run-001``, ...; see ``run_dir_``) unless
            ``new_run_per_fit=False``, which writes into ``logdir`` itself (e.g. beside skorch's
            ``TensorBoard`` callback, as one run).
        on_alert: as in the core, plus ``"stop"``: warn and end ``fit`` at the end of the epoch,
            the way ``skorch.callbacks.EarlyStopping`` does.
        history_layers: also write per-layer keys (``activation_dead_fraction/<layer>``, ...)
            into ``net.history``.
        run_config: what this run is, added to the net's parameters of each fit
            (``net.get_params(deep=False)``: ``lr``, ``max_epochs``, ``module__*``,
            ``optimizer__*``, ...; callbacks left out), which are recorded in the run
            (``run_config`` text tag) for the run report, e.g. to tell the runs of a
            ``GridSearchCV`` apart.
        probe: ``X_subset`` (what ``net.predict`` takes: an array, a tensor, a dict) or
            ``(X_subset, y_subset)``, run through ``net.module_`` invisibly to training every
            ``probe_every_n_samples`` sampled batches (see ``monitor.Monitor``); with ``y``,
            ``probe_loss_fn`` defaults to the net's criterion (``net.get_loss``).
        probe_labels: one label per probe sample (heatmap rows are grouped by it), or ``"targets"``.

    Example:
        >>> from skorch import NeuralNetClassifier                       # doctest: +SKIP
        >>> net = NeuralNetClassifier(WineClassifier, max_epochs=20, lr=0.01,
        ...     callbacks=[ActivationMonitor(every_n_steps=5, logdir="runs/wine")])  # doctest: +SKIP
        >>> net.fit(X_train, y_train)                                    # doctest: +SKIP
        >>> net.history[:, "activation_dead_fraction_max"]               # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: Patterns = None,
        exclude: Patterns = None,
        thresholds: Thresholds | None = None,
        logdir: str | os.PathLike[str] | None = None,
        on_alert: SkorchOnAlert = "warn",
        *,
        histograms: bool = True,
        images_every_n_samples: int = 20,
        timeline_length: int = 100,
        functional: bool = True,
        sinks: Sequence[Sink] | None = None,
        detectors: Sequence[Detector] | None = None,
        gradients: bool = True,
        new_run_per_fit: bool = True,
        history_layers: bool = True,
        run_config: Mapping[str, Any] | None = None,
        probe: Any = None,
        probe_every_n_samples: int = 20,
        probe_labels: Any = None,
        probe_loss_fn: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        # sklearn contract: store the arguments unchanged; validation happens in initialize().
        self.every_n_steps = every_n_steps
        self.include = include
        self.exclude = exclude
        self.thresholds = thresholds
        self.logdir = logdir
        self.on_alert = on_alert
        self.histograms = histograms
        self.images_every_n_samples = images_every_n_samples
        self.timeline_length = timeline_length
        self.functional = functional
        self.sinks = sinks
        self.detectors = detectors
        self.gradients = gradients
        self.new_run_per_fit = new_run_per_fit
        self.history_layers = history_layers
        self.run_config = run_config
        self.probe = probe
        self.probe_every_n_samples = probe_every_n_samples
        self.probe_labels = probe_labels
        self.probe_loss_fn = probe_loss_fn

    # -- validation ----------------------------------------------------------------------------
    def _validate(self) -> None:
        """Every option, with the core's validator (the same messages as ``Monitor``)."""
        if self.logdir is not None and hasattr(self.logdir, "add_scalar"):
            raise TypeError(
                f"ActivationMonitor: expected `logdir` to be None or a directory path, got {self.logdir!r}. Pass a "
                "directory; to share a run with skorch's TensorBoard callback pass its log dir and new_run_per_fit=False."
            )
        Options(
            self.every_n_steps, self.include, self.exclude, self.thresholds, self.logdir, None, self.on_alert,
            self.histograms, self.images_every_n_samples, self.timeline_length, self.functional, self.sinks,
            True, self.detectors, self.gradients, self.run_config,
            self.probe if isinstance(self.probe, str) else _probe_tensors(self.probe),  # a str: the core names it
            self.probe_every_n_samples, self.probe_labels, self.probe_loss_fn,
        )
        for name in ("new_run_per_fit", "history_layers"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Expected `{name}` to be True or False, got {getattr(self, name)!r}.")

    # -- lifecycle -----------------------------------------------------------------------------
    def initialize(self) -> ActivationMonitor:
        """Validate the options and reset the derived state (called by ``net.initialize()``)."""
        self._validate()
        self._shutdown()
        self.monitor_: Monitor | None = None
        self.run_dir_: str | None = None
        self.step_ = 0  # training batches seen since initialisation
        self.monitor_state_: dict[str, Any] | None = None
        self.health_: dict[str, LayerHealth] = {}  # latest health per layer (kept after close / pickle)
        self.parameter_health_: dict[str, ParameterHealth] = {}  # latest gradient norm / update ratio per parameter
        self.alerts_: list[Alert] = []
        self.module_ref_: weakref.ref | None = None
        self.epoch_start_ = 0  # first step of the current epoch (its alerts are counted in history)
        self.epoch_samples_ = 0
        self.pending_error_: ActivationAlertError | None = None
        self.guard_: StepGuard | None = None  # ends the sampled step in progress (or left spent on module_)
        self.last_probe_: Any = None  # the latest probe run (kept after fit)
        return self

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        if not hasattr(self, "step_"):
            self.initialize()
        self._start(net)
        self.epoch_start_ = self.step_
        self.epoch_samples_ = 0

    def on_epoch_begin(self, net: Any, dataset_train: Any = None, dataset_valid: Any = None, **kwargs: Any) -> None:
        self.epoch_start_ = self.step_
        self.epoch_samples_ = 0

    def on_batch_begin(self, net: Any, batch: Any = None, training: bool | None = None, **kwargs: Any) -> None:
        if not training:
            self._drop_spent_guard()
            return  # validation / prediction batches are never sampled
        mon = self.monitor_
        module = getattr(net, "module_", None)
        if mon is None or not isinstance(module, nn.Module) or unwrap(module) is not mon.model:  # net(compile=True): a wrapper
            self._start(net)  # the module was replaced: follow it
            mon = self.monitor_
        self._end_step(failed=True)  # a step left open by an exception elsewhere
        step = self.step_
        self.step_ += 1
        if mon is None:
            return
        before = set(mon.model._forward_hooks)
        if mon.begin_step(step):
            self.epoch_samples_ += 1
            self.guard_ = guard_step(self, mon.model, before)

    def on_grad_computed(self, net: Any, named_parameters: Any = None, batch: Any = None, training: bool = False, **kwargs: Any) -> None:
        """Gradients are final, the optimizer has not stepped yet (place this callback before
        ``GradientNormClipping`` to get the norms before clipping)."""
        mon = getattr(self, "monitor_", None)
        if mon is not None and mon.in_step:
            mon.record_gradients()

    def on_batch_end(self, net: Any, batch: Any = None, training: bool | None = None, **kwargs: Any) -> None:
        if not training:
            return
        self._end_step(failed=False)  # normally already ended right after the forward
        mon = getattr(self, "monitor_", None)
        if mon is not None:
            mon.run_due_probe()  # after the optimizer step, before the next batch
        if self.pending_error_ is not None:
            err, self.pending_error_ = self.pending_error_, None
            self._shutdown()
            raise err

    def on_epoch_end(self, net: Any, dataset_train: Any = None, dataset_valid: Any = None, **kwargs: Any) -> None:
        if self.monitor_ is not None:
            self.health_.update(self.monitor_.health())
        row = history_row(self.health_, self.alerts, self.epoch_start_, self.epoch_samples_, self.detectors, self.history_layers)
        for key, value in row.items():
            net.history.record(key, value)
        self.epoch_start_ = self.step_
        self.epoch_samples_ = 0
        if self.monitor_ is not None and self.monitor_.should_stop:
            raise KeyboardInterrupt  # skorch's convention (EarlyStopping): fit ends, on_train_end runs

    def on_train_end(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        self._shutdown()

    # -- results -------------------------------------------------------------------------------
    def health(self) -> dict[str, LayerHealth]:
        """Each watched layer's health at its latest sampled step (also after fit / unpickling)."""
        mon = getattr(self, "monitor_", None)
        if mon is not None:
            self.health_.update(mon.health())
        return dict(getattr(self, "health_", {}))

    def parameter_health(self) -> dict[str, ParameterHealth]:
        """Each parameter's gradient norm and update ratio at the latest sampled batch (also after fit)."""
        mon = getattr(self, "monitor_", None)
        if mon is not None:
            self.parameter_health_ = {**getattr(self, "parameter_health_", {}), **mon.parameter_health()}
        return dict(getattr(self, "parameter_health_", {}))

    @property
    def last_probe(self) -> Any:
        """The latest probe run (``monitor.probe.ProbeResult``: ``activations``, ``top()``, ``drift``), or None."""
        mon = getattr(self, "monitor_", None)
        if mon is not None and mon.last_probe is not None:
            return mon.last_probe
        return getattr(self, "last_probe_", None)

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far (entering and recovering), oldest first."""
        mon = getattr(self, "monitor_", None)
        if mon is not None:
            return mon.alerts
        return list(getattr(self, "alerts_", []))

    # -- pickling ------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        self._drop_spent_guard()
        state = self.__dict__.copy()
        mon = state.get("monitor_")
        if mon is not None:  # keep the plain-data results, drop hooks, threads and the writer
            state["monitor_state_"] = mon.state_dict()
            state["health_"] = {**state.get("health_", {}), **mon.health()}
            state["alerts_"] = mon.alerts
        state["monitor_"] = None
        state["guard_"] = None
        state["module_ref_"] = None
        state["pending_error_"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- internals -----------------------------------------------------------------------------
    def _start(self, net: Any) -> None:
        """Create the core monitor on ``net.module_`` (a new run, or continuing this one)."""
        module = getattr(net, "module_", None)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"ActivationMonitor: expected `net.module_` to be a torch.nn.Module, got {type(module).__name__}."
            )
        continuing = self.run_dir_ is not None and (self.module_ref_ is None or self.module_ref_() is module)
        if not continuing and (self.run_dir_ is not None or self.monitor_state_ is not None):
            # a different module without net.initialize(): a new run
            self.step_, self.monitor_state_, self.health_, self.alerts_ = 0, None, {}, []
            self.run_dir_ = None
        self._shutdown()
        if self.logdir is not None and self.run_dir_ is None:
            self.run_dir_ = self._claim_run_dir()
        mon = Monitor(
            module,
            every_n_steps=self.every_n_steps,
            include=self.include,
            exclude=self.exclude,
            thresholds=self.thresholds,
            logdir=self.run_dir_ if self.logdir is not None else None,
            on_alert=self._raise_later if self.on_alert == "raise" else self.on_alert,
            histograms=self.histograms,
            images_every_n_samples=self.images_every_n_samples,
            timeline_length=self.timeline_length,
            functional=self.functional,
            sinks=self.sinks,
            detectors=self.detectors,
            background=self.on_alert != "raise",  # "raise" must see the alert at the batch's end
            gradients=self.gradients,
            run_config={**_net_config(net), **dict(self.run_config or {})},
            probe=_probe_tensors(self.probe),
            probe_every_n_samples=self.probe_every_n_samples,
            probe_labels=self.probe_labels,
            probe_loss_fn=self._probe_loss(net),
        )
        mon.gradients_from_callbacks()  # read at on_grad_computed: no parameter/optimizer hooks to leave behind
        if self.monitor_state_ is not None:
            mon.load_state_dict(self.monitor_state_)
        self.monitor_ = mon.attach()
        self.module_ref_ = weakref.ref(module)
        if self.run_dir_ is None:
            self.run_dir_ = ""  # marks "started" when there is no log directory

    def _probe_loss(self, net: Any) -> Callable[[Any, Any], Any] | None:
        """``probe_loss_fn``, or the net's own loss when the probe has targets."""
        if self.probe_loss_fn is not None or not isinstance(self.probe, (tuple, list)):
            return self.probe_loss_fn
        return lambda y_pred, y_true: net.get_loss(y_pred, y_true, training=False)

    def _claim_run_dir(self) -> str:
        base = os.fspath(self.logdir)  # type: ignore[arg-type]
        if not self.new_run_per_fit:
            os.makedirs(base, exist_ok=True)
            return base
        os.makedirs(base, exist_ok=True)
        k = len(os.listdir(base))
        while True:  # mkdir is atomic: parallel fits (GridSearchCV n_jobs) get distinct directories
            path = os.path.join(base, f"run-{k:03d}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                k += 1

    def _shutdown(self) -> None:
        """End any open step, keep the results as plain data, close the monitor (hooks, writer)."""
        mon = getattr(self, "monitor_", None)
        if mon is None:
            return
        try:
            self._end_step(failed=True)
            self.monitor_state_ = mon.state_dict()
            self.health_ = {**getattr(self, "health_", {}), **mon.health()}
            self.parameter_health_ = {**getattr(self, "parameter_health_", {}), **mon.parameter_health()}
            self.alerts_ = mon.alerts
        finally:
            self.monitor_ = None
            mon.close()  # runs a probe the last sampled batch asked for
            self.last_probe_ = mon.last_probe or getattr(self, "last_probe_", None)

    def _forward_done(self) -> None:
        """``module_``'s forward completed (called by the guard): with gradients, the step goes on
        through backward and the optimizer step until ``on_batch_end``; without, it ends here."""
        self.guard_ = None
        mon = getattr(self, "monitor_", None)
        if mon is not None and mon.in_step:
            if self.gradients:
                mon.end_forward()
            else:
                mon.end_step()

    def _end_failed_step(self) -> None:
        """The forward raised (called by the guard inside torch's exception path): end the step.

        The core removes its hooks: none is in ``module_._forward_hooks`` (moved into the guard).
        The guard stays there, inert, until :meth:`_end_step` or the module's next forward.
        """
        mon = getattr(self, "monitor_", None)
        if mon is not None and mon.in_step:
            mon.end_step(failed=True)

    def _drop_spent_guard(self) -> None:
        guard = getattr(self, "guard_", None)
        if guard is not None and guard.callback is None:
            self.guard_ = None
            guard.remove()

    def _end_step(self, failed: bool) -> None:
        guard, self.guard_ = getattr(self, "guard_", None), None
        if guard is not None:
            guard.remove()
        mon = getattr(self, "monitor_", None)
        if mon is not None and mon.in_step:
            mon.end_step(failed=failed)

    def _raise_later(self, alert: Alert) -> None:
        """``on_alert="raise"``: the sampled step ends inside the forward (a hook), so the error is
        raised at the end of the training batch instead, after the monitor is closed."""
        if alert.recovered:
            warn(alert.message)
        elif self.pending_error_ is None:
            self.pending_error_ = ActivationAlertError(alert)
