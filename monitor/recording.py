"""What records one sampled step: :class:`StepRecorder`.

It owns the parts whose hooks exist only during a sampled step: the
:class:`~monitor.capture.Capture` of the watched outputs (and of the gradients with respect to
them), the optional :class:`~monitor.params.ParameterCapture` (each parameter's gradient norm and
update ratio) and :class:`~monitor.attention.AttentionCapture` (the attention heads), and, for a
compiled model, the ``"force_eager"`` compiler stance (:class:`~monitor.compiled.EagerSteps`)
under which the model's eager code, hooks included, runs for the step. :meth:`StepRecorder.begin`
attaches all of them or none; :meth:`StepRecorder.end` removes every hook and leaves the stance on
every path (also when training raised) and hands over the step's partials, still on their devices.
Nothing here refers back to the :class:`~monitor.core.Monitor` that owns it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from monitor.attention import AttentionCapture
from monitor.capture import Capture
from monitor.compiled import EagerSteps, compile_count, has_compiled_wrapper, root_compiled
from monitor.headstats import AttentionPartials
from monitor.params import ParameterCapture, ParameterPartials
from monitor.partials import Pending
from monitor.selection import Selector, WatchPoint


class StepRecorder:
    """The hooks (and compiler stance) of sampled steps on one model. ``begin()`` ... ``end()``."""

    def __init__(
        self,
        model: nn.Module,
        selector: Selector,
        *,
        compiled_parts: bool,
        functional: bool,
        histograms: bool,
        gradients: bool,
        attention: bool,
        tolerance: float,
        attention_entropy: float,
        rows: Callable[[WatchPoint], tuple[str, ...]],
        warn_once: Callable[[str, str], None],
    ) -> None:
        self.model = model
        self._warn_once = warn_once
        self.compiled_parts = compiled_parts  # the model has compiled parts (or runs in a compiled wrapper)
        self.eager = EagerSteps()  # sampled steps of a compiled model run its eager code
        self.capture = Capture(
            model,
            selector,
            functional=functional,
            histograms=histograms,
            gradients=gradients,
            tolerance=tolerance,
            rows=rows,
            warn_once=warn_once,
        )
        self.params = ParameterCapture(model, warn_once) if gradients else None
        capture = self.capture
        self.attention = (
            AttentionCapture(model, warn_once, lambda: capture.paused, attention_entropy) if attention else None
        )
        if self.attention is not None and not self.attention.points:
            self.attention = None  # no attention module: nothing to attach on sampled steps
        self._missing: frozenset[int] = frozenset()  # watched modules that did not run, last checked
        self._graphs_seen = 0  # torch.compile's graph count when compiled wrappers were last looked for

    @property
    def active(self) -> bool:
        """Whether a sampled step is being recorded."""
        return self.capture.active

    @property
    def paused(self) -> bool:
        """Forward passes of the step in progress are ignored (a validation loop inside a training step)."""
        return self.capture.paused

    @paused.setter
    def paused(self, paused: bool) -> None:
        self.capture.paused = paused

    def compiled(self) -> bool:
        """torch.compile(model), model.compile(), a compiled submodule, Lightning's compile, or a
        ``torch.compile(model)`` wrapper the loop calls (looked for when the compiler has built new
        graphs since the last look; the first sampled step, if it is the wrapper's first call, runs
        before any graph exists)."""
        if self.compiled_parts or root_compiled(self.model):
            return True
        graphs = compile_count()
        if graphs != self._graphs_seen:
            self._graphs_seen = graphs
            self.compiled_parts = has_compiled_wrapper(self.model)
        return self.compiled_parts

    def begin(self, host: bool = False) -> None:
        """Attach every part, or none: a part that fails to begin takes the others (and the stance) down.

        ``host``: small CPU outputs may be reduced on the host (no collective combines the partials)."""
        self.capture.host_rows = host
        if self.compiled():
            self.eager.enter()  # compiled code runs its eager code (hooks included) until the step ends
        try:
            self.capture.begin()
        except BaseException:
            self.eager.exit()
            raise
        if self.params is not None:
            try:
                self.params.begin()
            except BaseException:
                self.capture.detach()
                self.eager.exit()
                raise
        if self.attention is not None:
            try:
                self.attention.begin()
            except BaseException:
                self.end(failed=True)
                raise

    def end(
        self, failed: bool, host: bool = False
    ) -> tuple[dict[WatchPoint, Pending], ParameterPartials | None, AttentionPartials | None]:
        """Remove every hook, leave the stance and hand over (layer partials, parameters' numbers,
        attention sums). ``host``: the parameters' numbers may be finished on the host."""
        attention = self.attention.end(failed) if self.attention is not None else None
        try:
            current = self.capture.end()
        finally:
            self.eager.exit()
            params = self.params.end(failed, host=host) if self.params is not None else None
        return current, params, attention

    def check_stepped(self, step: int, current: dict[WatchPoint, Pending], params: ParameterPartials | None) -> None:
        """After a sampled step: warn (once) if a backward ran inside it but no optimizer step did."""
        backward = any(p.backward for p in current.values()) or (params is not None and params.backward)
        if params is not None and backward and not params.stepped:
            self._warn_once(
                "no-optimizer-step",
                f"a backward ran inside sampled step {step} but no optimizer step did, so the parameters' "
                "gradient norms and update ratios are skipped: put `optimizer.step()` inside `with monitor.step(...)` "
                "(a GradScaler that skips a step with inf gradients also gives this once)",
            )

    def check_modules(self, current: dict[WatchPoint, Pending]) -> None:
        """After a sampled step: warn (once per layer) about watched modules that did not run because
        they are no longer in the model (replaced or removed since the monitor was built). The model
        is walked only when the set of watched modules that did not run changes."""
        missing = [wp for wp in self.capture.module_points if wp not in current]
        key = frozenset(id(wp) for wp in missing)
        if key == self._missing:
            return
        self._missing = key
        if not missing:
            return
        live = {id(m) for m in self.model.modules()}
        for wp in missing:
            if id(wp.module) not in live:
                self._warn_once(
                    f"gone:{wp.name}",
                    f"watched module `{wp.name}` is no longer part of the model (replaced or removed after the "
                    "monitor was built): it is not watched any more and its health stays at its last sampled "
                    "step. Build a new Monitor to watch the model as it is now.",
                )

    def end_forward(self) -> None:
        """Stop watching forward passes; gradient and optimizer hooks stay until :meth:`end`."""
        if self.capture.active:
            self.capture.end_forward()
            if self.attention is not None:
                self.attention.end_forward()

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        self.capture.detach()
        if self.params is not None:
            self.params.detach()
        if self.attention is not None:
            self.attention.detach()

    def gradients_from_callbacks(self) -> None:
        """No parameter or optimizer hooks: the integration calls :meth:`read_gradients`."""
        if self.params is not None:
            self.params.use_hooks = False

    def read_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The parameters' gradients now (``optimizer``: only its parameters), in a step in progress."""
        if self.capture.active and self.params is not None:
            self.params.read_gradients(None if optimizer is None else self.params.params_of(optimizer))
