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

import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

try:
    from skorch.callbacks import Callback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "integrations.skorch needs skorch (and scikit-learn): pip install 'activation-monitor[skorch]'"
    ) from e

from torch import nn

from monitor.core import ActivationAlertError, Monitor, MonitorWarning
from monitor.detect import Alert, LayerHealth, Thresholds
from monitor.sinks import Sink

__all__ = ["HISTORY_KEYS", "ActivationMonitor"]

SkorchOnAlert = Union[Literal["warn", "raise", "ignore", "stop"], Callable[[Alert], None]]  # noqa: UP007 (py3.10)
_ON_ALERT = ("warn", "raise", "ignore", "stop")

#: Keys written into ``net.history`` at the end of every epoch (``<layer>`` e.g. ``dense0.relu``).
HISTORY_KEYS = {
    "activation_alerts": "alerts that fired (entered an unhealthy state) during this epoch",
    "activation_samples": "sampled training steps during this epoch (0: values below are carried over)",
    "activation_dead_fraction_max": "worst dead fraction over ReLU-family layers (NaN: none)",
    "activation_saturated_fraction_max": "worst saturated fraction over bounded layers (NaN: none)",
    "activation_nonfinite": "NaN/Inf values over all layers at their latest sampled step",
    "activation_dead_fraction/<layer>": "per ReLU-family layer (with history_layers=True)",
    "activation_saturated_fraction/<layer>": "per bounded layer (with history_layers=True)",
}


def _nan_max(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(max(vals)) if vals else math.nan


class _StepGuard:
    """Forward hook (``with_kwargs=True, always_call=True``) on ``net.module_`` during a sampled step.

    Completed forward (torch iterates a copy of the hook dict): runs the core's hooks moved into it,
    removes itself and ends the step. Forward that raised (torch iterates ``module._forward_hooks``
    itself, so no entry may leave or join it until the exception has left ``module_``): ends the
    step with ``failed=True`` and stays in that dict, spent, doing nothing, until the callback's next
    ``on_batch_begin``/``on_batch_end``/``on_train_begin``/``on_train_end``/``initialize``, pickling,
    or the module's next completed forward, whichever comes first. A pickled copy is a spent guard.
    """

    __slots__ = ("absorbed", "callback", "entry_exc", "handle")

    def __init__(self, callback: ActivationMonitor | None = None, entry_exc: BaseException | None = None) -> None:
        self.callback = callback  # None: spent
        self.entry_exc = entry_exc  # the exception being handled, if any, when the step began
        self.absorbed: list[tuple[Callable[..., Any], bool]] = []  # (core hook, with_kwargs)
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        callback = self.callback
        if sys.exc_info()[1] is not self.entry_exc:  # torch's exception path
            self.callback, self.absorbed, self.entry_exc = None, [], None
            if callback is not None:
                callback._end_failed_step()
            return None
        absorbed = self.absorbed
        self.remove(module)
        result = None
        for hook, with_kwargs in absorbed:  # the core's, in registration order, before the step ends
            r = hook(module, args, kwargs, output) if with_kwargs else hook(module, args, output)
            if r is not None:
                output = result = r
        if callback is not None:
            callback._end_step(failed=False)
        return result

    def remove(self, module: nn.Module | None = None) -> None:
        """Spend the guard and take it off its module (by identity for an unpickled copy)."""
        self.callback, self.absorbed, self.entry_exc = None, [], None
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.remove()
        elif module is not None:
            for key in [k for k, hook in module._forward_hooks.items() if hook is self]:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_StepGuard, ())  # never the callback, the monitor or the core's hooks


class ActivationMonitor(Callback):
    """Watch ``net.module_``'s activations on every N-th training batch; dead/saturated/exploding units.

    Takes the keyword options of :class:`monitor.Monitor` (``every_n_steps``, ``include``,
    ``exclude``, ``thresholds``, ``logdir``, ``on_alert``, ``histograms``,
    ``images_every_n_samples``, ``timeline_length``, ``functional``, ``sinks``) and:

    Args:
        logdir: a base directory; each fit writes TensorBoard events to a fresh numbered
            subdirectory (``run-000``, ``run-001``, ...; see ``run_dir_``) unless
            ``new_run_per_fit=False``, which writes into ``logdir`` itself (e.g. beside skorch's
            ``TensorBoard`` callback, as one run).
        on_alert: as in the core, plus ``"stop"``: warn and end ``fit`` at the end of the epoch,
            the way ``skorch.callbacks.EarlyStopping`` does.
        history_layers: also write per-layer keys (``activation_dead_fraction/<layer>``, ...)
            into ``net.history``.

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
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        thresholds: Thresholds | None = None,
        logdir: str | os.PathLike[str] | None = None,
        on_alert: SkorchOnAlert = "warn",
        *,
        histograms: bool = True,
        images_every_n_samples: int = 20,
        timeline_length: int = 100,
        functional: bool = True,
        sinks: Sequence[Sink] | None = None,
        new_run_per_fit: bool = True,
        history_layers: bool = True,
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
        self.new_run_per_fit = new_run_per_fit
        self.history_layers = history_layers

    # -- validation ----------------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"ActivationMonitor: expected `{name}` to be {expected}, got {getattr(self, name)!r}.")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.every_n_steps) or self.every_n_steps < 1:
            raise bad("every_n_steps", "a positive integer")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str) and not (
                isinstance(v, Sequence) and all(isinstance(p, str) for p in v)
            ):
                raise bad(name, "None, a glob pattern or a sequence of glob patterns")
        if self.thresholds is not None and not isinstance(self.thresholds, Thresholds):
            raise TypeError(
                f"ActivationMonitor: expected `thresholds` to be a monitor.Thresholds, got {self.thresholds!r}."
            )
        if self.logdir is not None and not isinstance(self.logdir, (str, os.PathLike)):
            hint = (
                " Pass a directory; to share a run with skorch's TensorBoard callback pass its log dir "
                "and new_run_per_fit=False."
                if hasattr(self.logdir, "add_scalar")
                else ""
            )
            raise TypeError(
                f"ActivationMonitor: expected `logdir` to be None or a directory path, got {self.logdir!r}.{hint}"
            )
        if not (callable(self.on_alert) or (isinstance(self.on_alert, str) and self.on_alert in _ON_ALERT)):
            raise bad("on_alert", f"one of {', '.join(map(repr, _ON_ALERT))} or a callable")
        if not is_int(self.images_every_n_samples) or self.images_every_n_samples < 0:
            raise bad("images_every_n_samples", "a non-negative integer")
        if not is_int(self.timeline_length) or self.timeline_length < 2:
            raise bad("timeline_length", "an integer >= 2")
        for name in ("histograms", "functional", "new_run_per_fit", "history_layers"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.sinks is not None and not (
            isinstance(self.sinks, Sequence) and all(isinstance(s, Sink) for s in self.sinks)
        ):
            raise bad("sinks", "None or a sequence of monitor.Sink objects")

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
        self.alerts_: list[Alert] = []
        self.module_ref_: weakref.ref | None = None
        self.epoch_alerts_ = 0
        self.epoch_samples_ = 0
        self.stop_requested_ = False
        self.pending_error_: ActivationAlertError | None = None
        self.guard_: _StepGuard | None = None  # ends the sampled step in progress (or left spent on module_)
        return self

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        if not hasattr(self, "step_"):
            self.initialize()
        self._start(net)
        self.epoch_alerts_ = 0
        self.epoch_samples_ = 0
        self.stop_requested_ = False

    def on_epoch_begin(self, net: Any, dataset_train: Any = None, dataset_valid: Any = None, **kwargs: Any) -> None:
        self.epoch_alerts_ = 0
        self.epoch_samples_ = 0

    def on_batch_begin(self, net: Any, batch: Any = None, training: bool | None = None, **kwargs: Any) -> None:
        if not training:
            self._drop_spent_guard()
            return  # validation / prediction batches are never sampled
        mon = self.monitor_
        if mon is None or getattr(net, "module_", None) is not mon.model:
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
            self._guard(mon, before)

    def on_batch_end(self, net: Any, batch: Any = None, training: bool | None = None, **kwargs: Any) -> None:
        if not training:
            return
        self._end_step(failed=False)  # normally already ended right after the forward
        if self.pending_error_ is not None:
            err, self.pending_error_ = self.pending_error_, None
            self._shutdown()
            raise err

    def on_epoch_end(self, net: Any, dataset_train: Any = None, dataset_valid: Any = None, **kwargs: Any) -> None:
        if self.monitor_ is not None:
            self.health_.update(self.monitor_.health())
        for key, value in self._history_row().items():
            net.history.record(key, value)
        self.epoch_alerts_ = 0
        self.epoch_samples_ = 0
        if self.stop_requested_:
            self.stop_requested_ = False
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
            on_alert=self._handle_alert,
            histograms=self.histograms,
            images_every_n_samples=self.images_every_n_samples,
            timeline_length=self.timeline_length,
            functional=self.functional,
            sinks=self.sinks,
            background=self.on_alert != "raise",  # "raise" must see the alert at the batch's end
        )
        if self.monitor_state_ is not None:
            mon.load_state_dict(self.monitor_state_)
        self.monitor_ = mon.attach()
        self.module_ref_ = weakref.ref(module)
        if self.run_dir_ is None:
            self.run_dir_ = ""  # marks "started" when there is no log directory

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
            self.alerts_ = mon.alerts
        finally:
            self.monitor_ = None
            mon.close()

    def _guard(self, mon: Monitor, before: set[int]) -> None:
        """End the sampled step right after ``module_``'s forward, also when the forward raises.

        One forward hook, registered with ``always_call=True`` after the core's hooks, does it (see
        :class:`_StepGuard`). Forward hooks the core put on ``module_`` itself (keys of its
        ``_forward_hooks`` that ``begin_step`` added to ``before``) move into the guard, which runs
        them in the same place on success: torch iterates that dict itself, not a copy, when the
        forward raises, so no entry may leave it then, and ending the step must not have to remove one.
        """
        module = mon.model
        hooks = module._forward_hooks
        guard = _StepGuard(self, sys.exc_info()[1])
        for key in [k for k in hooks if k not in before]:
            guard.absorbed.append((hooks.pop(key), bool(module._forward_hooks_with_kwargs.pop(key, False))))
            module._forward_hooks_always_called.pop(key, None)
        guard.handle = module.register_forward_hook(guard, with_kwargs=True, always_call=True)
        self.guard_ = guard

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

    def _handle_alert(self, alert: Alert) -> None:
        if not alert.recovered:
            self.epoch_alerts_ += 1
        mode = self.on_alert
        if callable(mode):
            mode(alert)
            return
        if mode == "ignore":
            return
        if mode == "raise" and not alert.recovered:
            if self.pending_error_ is None:
                self.pending_error_ = ActivationAlertError(alert)
            return
        message = alert.message
        if mode == "stop" and not alert.recovered:
            self.stop_requested_ = True
            message += " | on_alert='stop': training stops at the end of this epoch"
        warnings.warn(message, MonitorWarning, stacklevel=2)

    def _history_row(self) -> dict[str, float]:
        health = self.health_
        row: dict[str, float] = {
            "activation_alerts": self.epoch_alerts_,
            "activation_samples": self.epoch_samples_,
            "activation_dead_fraction_max": _nan_max([h.dead_fraction for h in health.values()]),
            "activation_saturated_fraction_max": _nan_max([h.saturated_fraction for h in health.values()]),
            "activation_nonfinite": float(sum(h.nonfinite for h in health.values())) if health else math.nan,
        }
        if self.history_layers:
            for name, h in health.items():
                if h.dead_fraction is not None:
                    row[f"activation_dead_fraction/{name}"] = float(h.dead_fraction)
                if h.saturated_fraction is not None:
                    row[f"activation_saturated_fraction/{name}"] = float(h.saturated_fraction)
        return row
