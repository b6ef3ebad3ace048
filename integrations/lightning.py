"""PyTorch Lightning integration: :class:`ActivationMonitor`, a ``Callback`` around :class:`monitor.Monitor`.

The callback only translates Lightning events into core calls:

============================  ==================================================================
``setup("fit")``              build the :class:`~monitor.Monitor` on the LightningModule, choose
                              where output goes (the trainer's ``TensorBoardLogger`` if any)
``on_train_batch_start``      ``begin_step(m)`` for the multiple ``m`` of N optimizer steps
                              (``trainer.global_step``) that this batch runs (see
                              :meth:`ActivationMonitor.on_train_batch_start`)
``on_after_backward``         notes that a backward ran in the sampled step
``on_before_optimizer_step``  ``record_gradients(optimizer)``: that optimizer's parameters'
                              gradients, final (accumulated, all-reduced under DDP, unscaled under
                              fp16 AMP) and *before* clipping; automatic and manual optimization
``on_train_batch_end``        ``end_step()`` once an optimizer stepped in the sampled step: with
                              gradient accumulation (automatic, or manual ``opt.step()`` every k
                              batches) the step spans every micro-batch; the update ratio spans
                              the optimizer step(s); scalars to non-TensorBoard loggers
``on_train_epoch_end``        ``end_step()`` of a step still open (no optimizer step before the
                              epoch ended: activations only, one warning)
``on_validation_start`` / end ``pause()`` / ``pause(False)``: validation forwards are never recorded
``on_validation_batch_start`` ``probe="val"``: the first validation batch becomes the probe
``on_train_batch_end`` (too)  ``run_due_probe()``: a probe run after the sampled step, between two steps
``on_exception`` / teardown   ``end_step(failed=True)`` and ``close()``: hooks are always removed
``state_dict`` / load         the core's ``state_dict()`` in the checkpoint
============================  ==================================================================
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, Literal, Union

import torch

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
from monitor.options import python_ints
from monitor.selection import Patterns
from monitor.sinks import ScalarQueue

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "The Lightning integration needs the `lightning` extra: pip install 'activation-monitor[lightning]'"
    ) from e

__all__ = ["ActivationAlertError", "ActivationMonitor"]

LightningOnAlert = Union[Literal["warn", "raise", "ignore", "stop"], Callable[[Alert], None]]  # noqa: UP007
_KWARGS = (
    "histograms", "images_every_n_samples", "timeline_length", "functional", "sinks", "background", "detectors", "gradients",
    "run_config", "probe", "probe_every_n_samples", "probe_labels", "probe_loss_fn", "attention",
)
VAL_PROBE = "val"
SUBDIR = "activation_monitor"
STEPS_PER_BATCH = "lightning_steps_per_batch"  # beside the monitor's state in the callback's checkpoint entry
MAX_OPEN_BATCHES = 32  # manual optimization: a sampled step without a counted optimizer step ends after this many batches


def _str_keys(config: dict[Any, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in config.items()}


class ActivationMonitor(Callback):
    """Per-unit activation health of the LightningModule, sampled every N optimizer steps.

    Takes the options of :class:`monitor.Monitor`; ``on_alert`` also accepts ``"stop"`` (end
    training cleanly with ``trainer.should_stop = True`` after the alert is logged). Output goes
    to the trainer's ``TensorBoardLogger`` beside your own metrics; with other loggers the scalars
    reach every logger through ``log_metrics`` and images/histograms go to
    ``<trainer.log_dir>/activation_monitor`` (or ``logdir=``). The run's configuration
    (``run_config`` in the event file, read by the run report) is the module's ``hparams``
    (``save_hyperparameters()``), updated with ``run_config=`` if given. ``probe="val"`` probes
    with the first validation batch (the sanity check's, by default), ``pl_module(inputs)`` with
    ``inputs`` the batch, or its first element when it is a pair ``(inputs, targets)``; or pass
    a batch of your own as ``probe=``.

    Example:
        >>> import lightning.pytorch as L  # doctest: +SKIP
        >>> from integrations.lightning import ActivationMonitor  # doctest: +SKIP
        >>> trainer = L.Trainer(callbacks=[ActivationMonitor(every_n_steps=50)])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> trainer.callbacks[0].alerts  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: Patterns = None,
        exclude: Patterns = None,
        thresholds: Thresholds | None = None,
        on_alert: LightningOnAlert = "warn",
        logdir: str | os.PathLike[str] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(monitor_kwargs) - set(_KWARGS))
        if unknown:
            raise TypeError(f"ActivationMonitor got unexpected keyword argument(s): {', '.join(unknown)}.")
        # Every option is validated now, with the core's messages; whether a pattern matches a
        # module is known at `setup`, on the real model. probe="val": the batch is known later.
        self._val_probe = isinstance(monitor_kwargs.get("probe"), str) and monitor_kwargs["probe"] == VAL_PROBE
        checked = {**monitor_kwargs, "probe": None, "probe_labels": None} if self._val_probe else monitor_kwargs
        Options(every_n_steps, include, exclude, thresholds, logdir, None, on_alert, **checked)
        self.every_n_steps = int(every_n_steps)  # np.int64 too: the state key and checkpoints want int
        self.include = include
        self.exclude = exclude
        self.thresholds = thresholds
        self.on_alert = on_alert
        self.logdir = logdir
        self.monitor_kwargs = python_ints(monitor_kwargs)

        self.monitor: Monitor | None = None  # the core monitor of the current/last fit
        self._pending_state: dict[str, Any] | None = None
        self._queue: ScalarQueue | None = None
        self._metric_loggers: list[Any] = []
        self._rank_zero = True
        self._stepped = False  # an optimizer stepped inside the sampled step in progress
        self._backward = False  # a backward ran inside the sampled step in progress
        self._sampling: int | None = None  # the sampled step in progress
        self._ahead = False  # it was begun ahead of its optimizer step (see on_train_batch_start)
        self._batch_step: int | None = None  # trainer.global_step when the previous training batch began (this fit)
        self._covered = 0  # trainer.global_step when the last recorded sampled step ended (this fit)
        self._retry: int | None = None  # a step begun ahead and dropped: the next batches are begun ahead for it
        self._told_no_step = False
        self._open_batches = 0  # training batches of the sampled step in progress
        self._per_batch = 0  # optimizer steps the previous batch ran (kept in checkpoints: manual optimization)

    # -- identity / results ---------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, include=_stable(self.include), exclude=_stable(self.exclude)
        )

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far (entering and recovering), oldest first."""
        return self.monitor.alerts if self.monitor is not None else []

    def health(self) -> dict[str, LayerHealth]:
        """Each watched layer's health at its latest sampled step."""
        return self.monitor.health() if self.monitor is not None else {}

    def parameter_health(self) -> dict[str, ParameterHealth]:
        """Each parameter's gradient norm (before clipping) and update ratio at the latest sampled step."""
        return self.monitor.parameter_health() if self.monitor is not None else {}

    def attention_health(self) -> dict[str, AttentionHealth]:
        """Each attention module's heads (entropy, first-token mass) at the latest sampled step."""
        return self.monitor.attention_health() if self.monitor is not None else {}

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        previous = self.monitor
        if previous is not None:
            previous.close()
        self._rank_zero = trainer.is_global_zero
        state = self._pending_state
        if state is None and previous is not None and previous.model is pl_module:
            state = previous.state_dict()  # a re-used Trainer continues the same run
        # A compiled module (torch.compile(module), which Lightning unwraps, or .compile()) is
        # watched like any other: the core runs its sampled steps eagerly (monitor/compiled.py).
        writer, logdir, self._metric_loggers = self._outputs(trainer)
        self._queue = ScalarQueue() if self._metric_loggers else None
        sinks = list(self.monitor_kwargs.get("sinks") or []) if self._rank_zero else []
        if self._queue is not None:
            sinks.append(self._queue)
        # What this run is: the module's hyperparameters (save_hyperparameters), then run_config= on top.
        config = {**dict(getattr(pl_module, "hparams", None) or {}), **dict(self.monitor_kwargs.get("run_config") or {})}
        probe = {} if self._rank_zero and not self._val_probe else {"probe": None, "probe_labels": None}  # rank 0 probes
        mon = Monitor(
            pl_module,
            self.every_n_steps,
            self.include,
            self.exclude,
            self.thresholds,
            logdir=logdir,
            writer=writer,
            on_alert=self._core_on_alert(),
            **{**self.monitor_kwargs, "sinks": sinks, "run_config": _str_keys(config), **probe},
        )
        if trainer.world_size > 1:
            strategy = trainer.strategy
            mon.gather = lambda t: strategy.all_gather(t)  # one collective per sampled step, every rank
        mon.gradients_from_callbacks()  # read at on_before_optimizer_step: no parameter/optimizer hooks
        if state is not None:
            mon.load_state_dict(state)
        self._pending_state = None
        self._stepped = self._backward = self._ahead = False
        self._sampling = self._batch_step = self._retry = None
        self._per_batch = int((state or {}).get(STEPS_PER_BATCH, 0))  # a checkpoint loaded later (ckpt_path=) sets it too
        self._covered = 0
        self.monitor = mon.attach()

    def _outputs(self, trainer: pl.Trainer) -> tuple[Any, str | None, list[Any]]:
        """(writer, logdir, loggers that get scalars via log_metrics) for this rank."""
        loggers = list(trainer.loggers)
        tb = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
        dry = bool(getattr(trainer, "fast_dev_run", False))  # Lightning writes no logs then; neither do we
        need_dir = self.logdir is None and tb is None and not dry
        # `trainer.log_dir` broadcasts: every rank must ask (or none).
        log_dir = (trainer.log_dir or trainer.default_root_dir) if need_dir else None
        if not self._rank_zero:
            return None, None, []
        if self.logdir is not None:
            return None, os.fspath(self.logdir), [lg for lg in loggers if lg is not tb]
        if tb is not None:
            return tb.experiment, None, [lg for lg in loggers if lg is not tb]
        if dry:
            return None, None, loggers  # alerts and health only
        target = os.path.join(log_dir or trainer.default_root_dir, SUBDIR)
        try:
            from monitor.tensorboard import require_tensorboard

            require_tensorboard()
        except ImportError as e:
            target = None
            where = f"images and histograms are not written ({e})"
        else:
            where = f"images and histograms go to TensorBoard under {target}"
        sent = "every logger through `log_metrics`" if loggers else "no logger (the trainer has none)"
        warnings.warn(
            f"activation monitor: the trainer has no TensorBoardLogger; activation scalars go to {sent}, {where}.",
            MonitorWarning,
            stacklevel=3,
        )
        return None, target, loggers

    def _core_on_alert(self) -> Any:
        mode = self.on_alert
        if mode in ("raise", "stop"):
            return mode  # every rank sees the same alerts: they raise or stop together (rank 0 warns)
        if not self._rank_zero:
            return "ignore"  # only rank 0 warns / calls back
        return mode

    # -- the training step --------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Begin the sampled step of the multiple ``m`` of N optimizer steps that this batch runs.

        Steps are ``trainer.global_step``: optimizer steps, also in manual optimization, where
        every ``opt.step()`` of an optimizer from ``self.optimizers()`` counts (a GAN's two per
        batch are two). A batch is sampled, as step ``m``:

        - when it begins at ``m`` (``global_step == m``): the usual case, one optimizer step per
          batch or per accumulation window;
        - ahead, when it will probably run ``m``: the previous batch ran ``k > 1`` optimizer
          steps and ``m`` lies within this batch's next ``k``. Once an optimizer stepped, the
          step is kept if ``global_step`` passed ``m``, otherwise dropped (nothing recorded) and
          the next batches are begun ahead for ``m`` until one runs it;
        - late, when the previous batch ran ``m`` but no sampled step did (the guess ahead was
          wrong) and this batch is not sampled ahead: labelled ``m``, this batch is the first
          one after it.

        Each multiple is sampled at most once, each sample is one batch or accumulation window.
        With the same number of optimizer steps in every batch, at most N, there is one sample
        every N optimizer steps, the batch that runs the multiple; with more than N, every batch
        runs a multiple and every batch is sampled. When the number varies, a wrong guess can
        sample a multiple one batch late or leave one out.
        """
        mon = self.monitor
        step = trainer.global_step
        previous, self._batch_step = self._batch_step, step
        if previous is not None:
            self._per_batch = step - previous  # else: 0 in a new fit, the saved count in a resumed one
        if mon is None or mon.in_step:
            return  # a sampled step in progress (gradient accumulation) goes on
        n = self.every_n_steps
        reached = step - step % n  # the latest multiple of N
        if reached == step:
            if mon.should_sample(step):
                self._begin(mon, step, ahead=False)
            return
        per_batch = self._per_batch
        upcoming = reached + n
        if (upcoming == self._retry or (per_batch > 1 and upcoming < step + per_batch)) and mon.should_sample(upcoming):
            self._begin(mon, upcoming, ahead=True)
        elif previous is not None and previous < reached and reached >= self._covered and mon.should_sample(reached):
            self._begin(mon, reached, ahead=False)  # late

    def _begin(self, mon: Monitor, step: int, ahead: bool) -> None:
        self._stepped = self._backward = False
        self._open_batches = 0
        if mon.begin_step(step):
            self._sampling, self._ahead = step, ahead

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mon = self.monitor
        if mon is not None and mon.in_step:
            self._backward = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        mon = self.monitor
        if mon is not None and mon.in_step:
            mon.record_gradients(optimizer)  # before Lightning clips them (its next call)
            self._stepped = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A micro-batch without an optimizer step (gradient accumulation, automatic or manual)
        # leaves the sampled step open: it is the whole optimizer step. In manual optimization, an
        # optimizer Lightning does not count never ends it: at most MAX_OPEN_BATCHES batches.
        self._open_batches += 1
        if self._stepped or (
            self.monitor is not None
            and self.monitor.in_step
            and not pl_module.automatic_optimization
            and self._open_batches >= MAX_OPEN_BATCHES
        ):
            self._end(trainer)
        if self.monitor is not None and not self.monitor.in_step:
            self.monitor.run_due_probe()
        self._log_metrics()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer)
        self._log_metrics()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.pause()  # e.g. val_check_interval inside a gradient-accumulation window

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        mon = self.monitor
        if not (self._val_probe and self._rank_zero and mon is not None and batch_idx == 0 and dataloader_idx == 0):
            return
        if not mon.has_probe:
            try:
                mon.set_probe(_clone(batch), self.monitor_kwargs.get("probe_labels"))
            except (TypeError, ValueError) as e:
                self._val_probe = False
                warnings.warn(f"activation monitor: probe='val' cannot use the first validation batch: {e}", MonitorWarning, stacklevel=2)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.pause(False)

    def _end(self, trainer: pl.Trainer) -> None:
        """End the sampled step in progress (if any): record it, or drop it if it was begun ahead
        for an optimizer step that it did not run."""
        mon = self.monitor
        step, ahead, stepped, backward = self._sampling, self._ahead, self._stepped, self._backward
        self._sampling, self._ahead, self._stepped, self._backward = None, False, False, False
        if mon is None or not mon.in_step:
            return
        if ahead and step is not None and trainer.global_step <= step:
            mon.end_step(failed=True)  # nothing recorded; `step` is still due
            self._retry = step
            return
        self._covered = trainer.global_step
        no_step = not stepped and backward and self.monitor_kwargs.get("gradients", True) is not False
        if not self._rank_zero:  # "raise"/"stop" judge on every rank, inline; only rank 0 speaks
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MonitorWarning)
                mon.end_step()
        elif no_step:  # the core's advice is for a plain loop: ours below instead
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*but no optimizer step did", MonitorWarning)
                mon.end_step()
        else:
            mon.end_step()
        if no_step and self._rank_zero and not self._told_no_step:
            self._told_no_step = True
            warnings.warn(
                f"activation monitor: sampled step {step} ended (with the epoch, or after {MAX_OPEN_BATCHES} batches in "
                "manual optimization) before any optimizer step ran in it, so its parameters' gradient norms and update "
                "ratios are skipped. Lightning (and the monitor) sees only the steps of the optimizers from "
                "`self.optimizers()`: in manual optimization call `opt.step()` on those, not on the torch optimizer "
                "inside. A manual gradient-accumulation window still open when the epoch ends also gives this.",
                MonitorWarning,
                stacklevel=2,
            )
        if mon.should_stop:
            trainer.should_stop = True

    def _log_metrics(self) -> None:
        if self._queue is None:
            return
        for step, values in self._queue.drain():
            for logger in self._metric_loggers:
                logger.log_metrics(values, step)

    # -- the end, however it comes --------------------------------------------------------------
    def _close(self, trainer: pl.Trainer, failed: bool) -> None:
        mon = self.monitor
        if mon is None:
            return
        if not failed:
            self._end(trainer)
        self._sampling, self._ahead, self._stepped, self._backward = None, False, False, False
        mon.end_step(failed=True)  # a no-op unless a step is still open
        mon.close()  # idempotent: hooks removed, sinks flushed and closed
        self._log_metrics()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(trainer, failed=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(trainer, failed=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close(trainer, failed=True)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.monitor.state_dict() if self.monitor is not None else dict(self._pending_state or {})
        if self._per_batch > 1:  # manual optimization: the first batch of a resumed fit can be sampled ahead
            state[STEPS_PER_BATCH] = self._per_batch
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._per_batch = int(state_dict.get(STEPS_PER_BATCH, 0))
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


def _clone(batch: Any) -> Any:
    """A detached copy of a batch (tensors, tuples, lists, dicts of them) that training cannot change."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(_clone(b) for b in batch) if not hasattr(batch, "_fields") else type(batch)(*map(_clone, batch))
    if isinstance(batch, dict):
        return {k: _clone(v) for k, v in batch.items()}
    return batch


def _stable(patterns: Any) -> Any:
    """A description of include/exclude that is the same in every process (checkpoint keys):
    classes and callables by qualified name, not by their repr (which holds an address)."""
    if patterns is None or isinstance(patterns, str):
        return patterns
    items = patterns if isinstance(patterns, (list, tuple)) else [patterns]
    return [p if isinstance(p, str) else f"{getattr(p, '__module__', '')}.{getattr(p, '__qualname__', type(p).__qualname__)}" for p in items]

