"""Hugging Face ``Trainer`` integration: :class:`ActivationMonitor`, a ``TrainerCallback`` around :class:`monitor.Monitor`.

>>> from integrations.transformers import ActivationMonitor             # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=train_ds,
...                   callbacks=[ActivationMonitor(every_n_steps=50)])   # doctest: +SKIP
>>> trainer.train()                                                        # doctest: +SKIP

The callback only translates Trainer events into core calls (the order is the Trainer's, checked
against ``transformers/trainer.py``: per micro-batch ``training_step`` (forward + backward), then on
the last micro-batch of an optimizer step: clip to ``max_grad_norm``, ``on_pre_optimizer_step``,
``optimizer.step()``, ``on_optimizer_step``, scheduler, ``zero_grad``, ``global_step += 1``,
``on_step_end``, then logging / evaluation / saving):

==========================  ========================================================================
``on_train_begin``          build the :class:`~monitor.Monitor` on the Trainer's model (state from the
                            checkpoint being resumed, if any); output into the Trainer's TensorBoard run
``on_step_begin``           ``begin_step(state.global_step)`` (optimizer steps: with gradient
                            accumulation the step spans every micro-batch of that optimizer step)
``on_pre_optimizer_step``   ``record_gradients(optimizer)``: accumulated, all-reduced under DDP,
                            unscaled under fp16 AMP (by the clipping) and **after** the Trainer's
                            clipping to ``max_grad_norm`` (it clips before this event)
``on_optimizer_step``       ``end_step()`` once the optimizer stepped (the update ratio spans that step);
                            ``on_alert="stop"`` sets ``control.should_training_stop``
``on_step_end``             the step's scalars to the Trainer's other reporting callbacks
                            (the Trainer found on the call stack at ``on_train_begin``, or
                            given with :meth:`ActivationMonitor.set_trainer`)
``on_epoch_end``            end a step that training left open; wait for the judged steps
``on_train_end``            ``close()``: hooks removed, sinks flushed and closed
``state()``                 the core's ``state_dict()`` in the checkpoint's ``trainer_state.json``
==========================  ========================================================================

The Trainer has no event for an exception: a sampled step that training leaves by raising is
ended (hooks removed, nothing recorded) at the model's next forward outside the Trainer's
training loop, at the next ``train()``, at :meth:`ActivationMonitor.close`, or when the process
exits. See the README, section "Hugging Face Trainer".
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal, Union

from torch import nn

from monitor import (
    ActivationAlertError,
    Alert,
    AttentionHealth,
    LayerHealth,
    Monitor,
    MonitorWarning,
    Options,
    ParameterHealth,
    Thresholds,
)
from monitor.handles import Hook
from monitor.options import python_ints
from monitor.selection import Patterns
from monitor.sinks import ScalarQueue

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "The Hugging Face Trainer integration needs the `transformers` extra: "
        "pip install 'activation-monitor[transformers]'"
    ) from e

from integrations._transformers_checkpoint import STATE_KEY, entry, from_json, json_config, saved_state, strip_token
from integrations._transformers_trainer import calling_trainer, gather, in_training_loop, outputs

__all__ = ["STATE_KEY", "ActivationAlertError", "ActivationMonitor"]

TrainerOnAlert = Union[Literal["warn", "raise", "ignore", "stop"], Callable[[Alert], None]]  # noqa: UP007
_KWARGS = (
    "histograms", "images_every_n_samples", "timeline_length", "functional", "sinks", "background", "detectors", "gradients",
    "run_config", "attention",
)
#: The TrainingArguments a run records as its ``run_config`` (with the model class, the world size
#: and a hyperparameter search's trial parameters); ``run_config=`` goes on top.
RUN_CONFIG_ARGS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs",
    "max_grad_norm", "weight_decay", "warmup_steps", "warmup_ratio", "lr_scheduler_type", "optim", "seed", "bf16", "fp16",
)
# Callbacks that do not get the monitor's scalars: the Trainer's flow, its console printers, and
# its TensorBoard callback (the monitor writes into that run itself). By class name, over the MRO.
_NOT_REPORTERS = frozenset(
    {"DefaultFlowCallback", "ProgressCallback", "PrinterCallback", "NotebookProgressCallback", "TensorBoardCallback"}
)
_LIVE: weakref.WeakSet[ActivationMonitor] = weakref.WeakSet()
_SERIAL = itertools.count()


class ActivationMonitor(TrainerCallback, ExportableState):
    """Per-unit activation (and gradient) health of the Trainer's model, sampled every N optimizer steps.

    Takes the options of :class:`monitor.Monitor` (the same names as the Lightning callback):
    ``every_n_steps``, ``include``, ``exclude``, ``thresholds``, ``on_alert``, ``logdir`` and the
    keyword-only ``histograms``, ``images_every_n_samples``, ``timeline_length``, ``functional``,
    ``sinks``, ``background``, ``detectors``, ``gradients``, ``run_config``, ``attention``; validated here, by the
    core's validator. The run's ``run_config`` (read by the run report) is the Trainer's main
    hyperparameters (:data:`RUN_CONFIG_ARGS`, the model class, the world size, a trial's
    parameters), updated with ``run_config=`` if given.
    ``on_alert="stop"`` warns and sets ``control.should_training_stop`` (the Trainer ends training
    after that step, ``on_train_end`` runs as usual).

    Output goes into the Trainer's TensorBoard run (the directory of its ``TensorBoardCallback``),
    as an event file of the monitor's own beside the Trainer's, or into ``logdir``. The scalars
    also reach the Trainer's other reporting callbacks (W&B, MLflow, ...) through their
    ``on_log``: the callback finds the Trainer that runs it on the call stack at
    ``on_train_begin`` (callbacks are not handed the Trainer); :meth:`set_trainer` names it
    explicitly (e.g. when ``train()`` is wrapped in a way that hides it).

    Example:
        >>> monitor = ActivationMonitor(every_n_steps=50)                                   # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.train()                                                                 # doctest: +SKIP
        >>> monitor.alerts, monitor.health()                                                # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: Patterns = None,
        exclude: Patterns = None,
        thresholds: Thresholds | None = None,
        on_alert: TrainerOnAlert = "warn",
        logdir: str | os.PathLike[str] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        restore = monitor_kwargs.pop("_restore", None)
        if restore is not None:
            # The Trainer rebuilds stateful callbacks from their `state()["args"]` when
            # `restore_callback_states_from_checkpoint=True`: become the instance it replaces.
            if self._adopt(restore):
                return
            every_n_steps, include, exclude, thresholds, on_alert, logdir, monitor_kwargs = from_json(restore)
        unknown = sorted(set(monitor_kwargs) - set(_KWARGS))
        if unknown:
            raise TypeError(f"ActivationMonitor got unexpected keyword argument(s): {', '.join(unknown)}.")
        # Every option is validated now, with the core's messages; whether a pattern matches a
        # module is known at `on_train_begin`, on the real model.
        Options(every_n_steps, include, exclude, thresholds, logdir, None, on_alert, **monitor_kwargs)
        self.every_n_steps = int(every_n_steps)  # np.int64 too: trainer_state.json is JSON
        self.include = include
        self.exclude = exclude
        self.thresholds = thresholds
        self.on_alert = on_alert
        self.logdir = logdir
        self.monitor_kwargs = python_ints(monitor_kwargs)

        self.monitor: Monitor | None = None  # the core monitor of the current/last train()
        self.log_dir: str | None = None  # where this rank's TensorBoard output goes (None: nowhere)
        self._trainer: weakref.ref | None = None
        self._queue: ScalarQueue | None = None
        self._rank_zero = True
        self._global_step = 0
        self._guard: Any = None  # the forward pre-hook of the sampled step in progress
        self._thread: int | None = None  # the thread that began it (the Trainer's)
        self._started = False
        self._token = f"{os.getpid()}-{next(_SERIAL)}"
        self._serial = next(_SERIAL)
        self._warned: set[str] = set()
        _LIVE.add(self)

    # -- results ----------------------------------------------------------------------------------
    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far (entering and recovering), oldest first."""
        return self.monitor.alerts if self.monitor is not None else []

    def health(self) -> dict[str, LayerHealth]:
        """Each watched layer's health at its latest sampled step."""
        return self.monitor.health() if self.monitor is not None else {}

    def parameter_health(self) -> dict[str, ParameterHealth]:
        """Each parameter's gradient norm (after the Trainer's clipping) and update ratio at the latest sampled step."""
        return self.monitor.parameter_health() if self.monitor is not None else {}

    def attention_health(self) -> dict[str, AttentionHealth]:
        """Each attention module's heads (entropy, first-token mass) at the latest sampled step."""
        return self.monitor.attention_health() if self.monitor is not None else {}

    def set_trainer(self, trainer: Any) -> ActivationMonitor:
        """Know the Trainer (as the Trainer's own ``JITCheckpointCallback.set_trainer`` does): the
        sampled steps' scalars then also reach its other reporting callbacks (W&B, MLflow, Comet,
        your own ``on_log``), and the TensorBoard output joins its ``TensorBoardCallback``'s writer
        directory exactly. Adds this callback to the Trainer if it is not one of its callbacks yet.
        Only read: nothing of the Trainer is replaced or changed. Returns ``self``."""
        if not all(hasattr(trainer, a) for a in ("callback_handler", "add_callback")):
            raise TypeError(f"Expected a transformers.Trainer, got {type(trainer).__name__}.")
        self._trainer = weakref.ref(trainer)
        if not any(cb is self or _same(cb, self) for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    def close(self) -> None:
        """End a sampled step left open (hooks removed, nothing recorded) and close the monitor
        (sinks flushed). Idempotent; the next ``train()`` starts a new monitor."""
        self._close(failed=True)

    # -- the run ------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._close(failed=True)  # a previous train() that raised, or a retry (auto_find_batch_size)
        if self._trainer is None or self._trainer() is None:
            trainer = calling_trainer(self)  # the Trainer whose train() calls us: read, never changed
            if trainer is not None:
                self._trainer = weakref.ref(trainer)
        self._started = True
        self._rank_zero = bool(state.is_world_process_zero)
        self._global_step = state.global_step
        if not isinstance(model, nn.Module):
            raise TypeError(f"ActivationMonitor: expected the Trainer's model to be a torch.nn.Module, got {type(model).__name__}.")
        saved = self._checkpoint_state(state) if state.global_step > 0 else None  # resuming from a checkpoint
        entries = getattr(state, "stateful_callbacks", None)
        if isinstance(entries, dict) and type(self).__name__ not in entries:
            # A checkpoint saved without this callback: the Trainer's next save indexes
            # `stateful_callbacks[<class name>]` and fails with a KeyError (transformers >= 4.45).
            # Put in the entry a fresh TrainerState would hold; the only write into the Trainer's objects.
            entries[type(self).__name__] = self.state()
        writer, logdir = self._outputs(args, state) if self._rank_zero else (None, None)
        reporters = self._rank_zero and self._trainer is not None
        self._queue = ScalarQueue() if reporters else None
        sinks = list(self.monitor_kwargs.get("sinks") or []) if self._rank_zero else []
        if self._queue is not None:
            sinks.append(self._queue)
        mon = Monitor(
            model,
            self.every_n_steps,
            self.include,
            self.exclude,
            self.thresholds,
            logdir=logdir,
            writer=writer,
            on_alert=self._core_on_alert(),
            **{**self.monitor_kwargs, "sinks": sinks, "run_config": self._run_config(args, state, model)},
        )
        all_gather = gather(args)
        if all_gather is not None:
            mon.gather = all_gather  # one collective per sampled step, on every rank
        mon.gradients_from_callbacks()  # read at on_pre_optimizer_step: no parameter/optimizer hooks
        if getattr(args, "torch_compile", False):
            mon.mark_compiled()  # the Trainer runs a compiled wrapper of `model`: sampled steps run its eager code
        if saved is not None:
            mon.load_state_dict(saved)
        self.monitor = mon.attach()

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        mon = self.monitor
        step = state.global_step
        if mon is None or mon.in_step or not mon.should_sample(step):
            return
        if mon.begin_step(step):
            self._thread = threading.get_ident()
            try:
                self._guard = mon.model.register_forward_pre_hook(Hook(self._check_forward))
            except BaseException:
                mon.end_step(failed=True)
                raise

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        mon = self.monitor
        if mon is not None and mon.in_step:
            mon.record_gradients(optimizer)  # accumulated, all-reduced, unscaled; already clipped

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end(control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._global_step = state.global_step
        self._end(control)  # normally ended at on_optimizer_step already
        self._report(args, state, control, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Training may have left the step open (stopped inside a gradient-accumulation window).
        self._end(control)
        if self.monitor is not None:
            self.monitor.flush()  # every value reaches the reporters before their on_train_end
        self._report(args, state, control, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close(failed=False)

    # -- internals ----------------------------------------------------------------------------------
    def _core_on_alert(self) -> Any:
        mode = self.on_alert
        if mode in ("raise", "stop"):
            return mode  # every rank sees the same alerts: they raise or stop together (rank 0 warns)
        if not self._rank_zero:
            return "ignore"  # only the main process warns / calls back
        return mode

    def _end(self, control: Any) -> None:
        mon = self.monitor
        self._remove_guard()
        if mon is None or not mon.in_step:
            return
        try:
            if self._rank_zero:
                mon.end_step()
            else:  # "raise"/"stop" judge on every rank, inline; only the main process speaks
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", MonitorWarning)
                    mon.end_step()
        except ActivationAlertError:
            self._close(failed=False)  # "raise": nothing left behind, then out of trainer.train()
            raise
        if mon.should_stop:
            control.should_training_stop = True

    def _check_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook on the model during a sampled step: a forward outside the Trainer's
        training loop means training left the step by raising (the Trainer tells callbacks
        nothing then): end it, remove every hook, record nothing from this forward. Forwards on
        other threads (``DataParallel`` replicas) are not judged."""
        if threading.get_ident() != self._thread or in_training_loop():
            return
        mon = self.monitor
        step = mon._step if mon is not None else None
        self._close(failed=True)
        self._warn_once(
            "abandoned",
            f"activation monitor: sampled step {step} never ended (did training raise?); its hooks are removed and "
            "the step is not recorded.",
        )

    def _remove_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.remove()

    def _close(self, failed: bool) -> None:
        self._remove_guard()
        mon = self.monitor
        if mon is None or mon.closed:
            return
        try:
            mon.end_step(failed=failed)
        finally:
            mon.close()  # idempotent: hooks removed, sinks flushed and closed
            if self._queue is not None:
                self._queue.drain()  # the reporters may be closed by now: nothing more goes to them

    def _report(self, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> None:
        """The sampled steps' scalars to the Trainer's reporting callbacks (main process only), each
        at its own step: ``on_log`` sees a copy of the state whose ``global_step`` is the sampled step."""
        queue = self._queue
        trainer = self._trainer() if self._trainer is not None else None
        if queue is None:
            return
        items = queue.drain()
        if not items or trainer is None:
            return
        targets = [cb for cb in trainer.callback_handler.callbacks if not _not_reporter(cb)]
        for step, values in items:
            at = copy.copy(state)
            at.global_step = step
            for cb in targets:
                cb.on_log(args, at, control, logs=dict(values), **kwargs)

    def _outputs(self, args: Any, state: Any) -> tuple[Any, str | None]:
        """(writer, logdir) for the main process: the Trainer's TensorBoard run, or ``logdir``."""
        trainer = self._trainer() if self._trainer is not None else None
        writer, logdir, self.log_dir = outputs(args, state, self.logdir, trainer, self._warn_once)
        return writer, logdir

    def _run_config(self, args: Any, state: Any, model: nn.Module) -> dict[str, Any]:
        """What this run is: the Trainer's main hyperparameters, then ``run_config=`` on top."""
        config: dict[str, Any] = {"model": type(model).__name__, "world_size": getattr(args, "world_size", 1)}
        for name in RUN_CONFIG_ARGS:
            if hasattr(args, name):
                value = getattr(args, name)
                config[name] = getattr(value, "value", value)  # enums (optim, lr_scheduler_type) by value
        config.update(getattr(state, "trial_params", None) or {})
        config.update(self.monitor_kwargs.get("run_config") or {})
        return {str(k): v for k, v in config.items()}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, MonitorWarning, stacklevel=3)

    # -- checkpoints (ExportableState) --------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """This callback's entry in ``trainer_state.json``: ``args`` to rebuild it (the JSON-able
        options) and, under :data:`STATE_KEY`, the monitor's ``state_dict()`` (windows, baselines,
        active alerts, alert history, last sampled step), read back by ``on_train_begin`` of a
        resumed run whatever ``restore_callback_states_from_checkpoint`` is."""
        mon = self.monitor
        return entry(self._json_config(), self._token, self._global_step, mon.state_dict() if mon is not None else None)

    def _checkpoint_state(self, state: Any) -> dict[str, Any] | None:
        entries = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        return saved_state(entries, self._token, self._json_config(), self._warn_once)

    def _json_config(self) -> dict[str, Any]:
        return json_config(
            self.every_n_steps, self.include, self.exclude, self.on_alert, self.thresholds, self.logdir, self.monitor_kwargs
        )

    def _adopt(self, restore: dict[str, Any]) -> bool:
        """Share the state of the live callback this rebuilt one replaces: the newest never-trained
        one with the same options (a new process, a new Trainer), else the one that saved the
        checkpoint (the same callback, resumed again). Both handles are then the same callback."""
        config = strip_token(restore)
        live = sorted((cb for cb in list(_LIVE) if "_token" in cb.__dict__), key=lambda cb: -cb._serial)
        fresh = [cb for cb in live if not cb._started and cb._json_config() == config]
        saver = [cb for cb in live if cb._token == restore.get("token")]
        original = (fresh or saver or [None])[0]
        if original is None:
            return False
        self.__dict__ = original.__dict__
        return True


# -- helpers ------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    """Two handles of one callback (an adopted rebuild shares its original's ``__dict__``)."""
    return isinstance(a, ActivationMonitor) and a.__dict__ is b.__dict__


def _not_reporter(cb: Any) -> bool:
    return isinstance(cb, ActivationMonitor) or any(c.__name__ in _NOT_REPORTERS for c in type(cb).__mro__)
