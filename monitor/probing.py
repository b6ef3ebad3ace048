"""The probe and ablation side of a monitor: :class:`Probing`.

It runs the :class:`~monitor.probe.ProbeRunner` (periodic runs asked for by sampled steps, runs
by hand, ablated runs and layer importance from :mod:`monitor.ablation`), eagerly for a compiled
model, and writes probe records to the sinks that take them on the writer thread. What it makes
for the sinks goes through the ``publish`` callable each call is given: nothing here keeps a
reference to the :class:`~monitor.core.Monitor`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monitor.ablation import Ablation, AblationEffect, ablated_probe, layer_importance
from monitor.probe import ProbeRecord, ProbeResult, ProbeRunner, probe_input
from monitor.recording import StepRecorder
from monitor.sinks import Dispatcher, Sink

Publish = Callable[[ProbeRecord], None]


class Probing:
    """Probe runs and ablations on the recorder's model; the periodic run's bookkeeping."""

    def __init__(
        self, recorder: StepRecorder, runner: ProbeRunner, sinks: Sequence[Sink], warn_once: Callable[[str, str], None]
    ) -> None:
        self.recorder = recorder
        self.runner = runner
        self.sinks = sinks  # the monitor's list of sinks (probe records go to those with ``write_probe``)
        self._warn_once = warn_once
        self.due: tuple[int, int] | None = None  # (step, thread) of a probe run asked for by a sampled step
        self._ablations: weakref.WeakSet[Ablation] = weakref.WeakSet()  # blocks made by ablate()

    def sampled(self, samples: int, every: int, step: int) -> None:
        """Sampled step ``step`` (the ``samples``-th) was packed: every ``every`` of them asks for a run."""
        if self.runner.probe is not None and (samples - 1) % every == 0:
            self.due = (step, threading.get_ident())

    def due_here(self) -> bool:
        """Whether a run is due that a sampled step of this thread asked for."""
        return self.due is not None and self.due[1] == threading.get_ident()

    def probe(
        self,
        ablate: Mapping[str, Any] | None,
        value: float | str,
        loss_fn: Callable[[Any, Any], Any] | None,
        step: int,
        publish: Publish,
    ) -> ProbeResult:
        rec = self.recorder
        with rec.eager.around(rec.compiled()), self._unablated():  # a compiled model's probe runs its eager code
            if ablate is not None:
                return ablated_probe(self.runner, rec.model, ablate, value, loss_fn, step, self._warn_once)
            result = self.runner.run(rec.model, step, loss_fn)
            if self.due_here():
                self.due = None  # this run is the one the last sampled step asked for: not a second one
        publish(ProbeRecord(result))
        return result

    def _unablated(self) -> contextlib.ExitStack:
        """Ablation blocks of ``ablate()`` in progress suspended: a probe run (periodic, by hand,
        ablated or layer importance) inside one sees the model as it is, like every other probe run."""
        stack = contextlib.ExitStack()
        for block in list(self._ablations):
            if block.active:
                stack.enter_context(block.suspended())
        return stack

    def ablate(self, layers: Mapping[str, Any], value: float | str) -> Ablation:
        rec = self.recorder
        block = Ablation(
            rec.capture,
            layers,
            value,
            means=self.runner.last_means,
            warn_once=self._warn_once,
            eager=rec.eager.around(rec.compiled()),  # a compiled model runs its eager code in the block
        )
        self._ablations.add(block)
        return block

    def layer_importance(
        self, value: float | str, loss_fn: Callable[[Any, Any], Any] | None
    ) -> dict[str, AblationEffect]:
        rec = self.recorder
        with rec.eager.around(rec.compiled()), self._unablated():
            return layer_importance(self.runner, rec.model, value, loss_fn, self._warn_once)

    def set_probe(self, probe: Any, labels: Any) -> None:
        self.runner.set_probe(probe_input(probe, labels))

    def run_due(self, publish: Publish) -> ProbeResult | None:
        """The run a sampled step asked for, if any; a failing run warns once and stops periodic runs."""
        due, self.due = self.due, None
        if due is None or self.runner.probe is None:
            return None
        rec = self.recorder
        try:
            with rec.eager.around(rec.compiled()), self._unablated():  # a compiled model's probe runs its eager code
                result = self.runner.run(rec.model, due[0])
        except Exception as e:  # never let monitoring break training
            self.runner.probe = None
            self._warn_once("probe", f"the probe run after step {due[0]} failed, periodic probes stop: {e!r}")
            return None
        publish(ProbeRecord(result))
        return result

    def write(self, record: ProbeRecord, dispatcher: Dispatcher | None) -> None:
        """Writer thread: hand a probe record to every sink that takes them (``write_probe``)."""
        if dispatcher is None or not dispatcher.on_writer_thread():
            return  # judged on the training thread after an overflow: output is dropped
        for sink in self.sinks:
            write = getattr(sink, "write_probe", None)
            if callable(write):
                try:
                    write(record)
                except Exception as e:
                    self._warn_once(f"probe-sink:{id(sink)}", f"{type(sink).__name__}.write_probe failed: {e!r}")
