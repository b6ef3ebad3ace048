"""Capturing one sampled step: hooks, functional activations, and per-unit partials on the device.

:class:`Capture` owns every handle it registers. :meth:`Capture.begin` attaches forward hooks to
the watched modules (and, for functional activations such as ``F.relu`` inside ``forward``, a
``TorchFunctionMode`` plus hooks that remember which module produced each tensor);
:meth:`Capture.end` removes all of them, always, and returns the step's partials: for each watch
point, a list of ``[units]`` rows on the activation's device (see :mod:`monitor.stats`). Nothing
in here reads a value back to the host.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from monitor.activations import conv_like
from monitor.copies import CopyPool
from monitor.functional import FastPaths, FunctionalCalls, FunctionalMode, SharedPoints, first_tensor, leave_mode
from monitor.handles import Hook, remove_all
from monitor.partials import Pending, device_part, host_part
from monitor.recurrent import recompute
from monitor.selection import RecurrentWatch, Selector, WatchPoint
from monitor.stats import GRAD_ROWS, HOST_ROWS, PRE_MAX, combine_rows, grad_stat_rows, pre_stat_rows
from monitor.tokens import TOKEN_SIM

_SERIAL_BELOW = 1 << 18  # elements
# CPU outputs up to this size are copied in the hook and reduced on the host (Capture.host_rows).
HOST_BELOW = 1 << 16  # elements


class Capture:
    """The hooks of sampled steps on one model. ``begin()`` ... forward ... ``end()``."""

    def __init__(
        self,
        model: nn.Module,
        selector: Selector,
        *,
        functional: bool,
        histograms: bool,
        gradients: bool,
        tolerance: float,
        rows: Callable[[WatchPoint], tuple[str, ...]],
        warn_once: Callable[[str, str], None],
    ) -> None:
        self.model = model
        self.selector = selector
        self.functional = functional
        self.histograms = histograms
        self.gradients = gradients
        self.tolerance = tolerance
        self._rows = rows
        self._warn_once = warn_once
        self.module_points = selector.module_watch_points(model, tolerance)
        for wp in self.module_points:
            wp.rows = rows(wp)
        # nn.LSTM / nn.GRU: gates and states recomputed in a forward hook (monitor.recurrent)
        self.recurrent = selector.recurrent_watch_points(model, tolerance)
        for rw in self.recurrent:
            for _, wp in rw.points:
                wp.rows = rows(wp)
        self._generators: dict[torch.device, torch.Generator] = {}  # inter-layer dropout masks
        self.calls = FunctionalCalls(model, self.module_points, selector, tolerance, rows, warn_once)
        self._fast = FastPaths(model, self)
        self.discovered = False  # a sampled step in this process looked for functional activations
        self.active = False
        self.paused = False  # forward passes ignored (a validation loop inside a training step)
        self._handles: list[Any] = []
        self._grad_handles: list[Any] = []  # tensor hooks on this step's watched outputs
        self._mode: FunctionalMode | None = None
        self._owner = threading.get_ident()  # the thread of the sampled step in progress
        self._current: dict[WatchPoint, Pending] = {}
        self._gradless: dict[WatchPoint, int] = {}  # outputs recorded without a graph (reentrant checkpointing)
        self._forward_ended = False  # end_forward() was called in this step (hooks kept only for re-runs)
        # Blocks read the model's `attention_mask=`; an encoder-decoder's is the encoder's padding only.
        encdec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._blocks = not encdec and any(TOKEN_SIM in wp.rows for wp in self.module_points)
        self.token_mask: torch.Tensor | None = None  # the model's `attention_mask` in this forward (blocks)
        self._pre: dict[int, list[torch.Tensor]] = {}
        self._tracking = False
        self._grad_lock = threading.Lock()  # CUDA backward runs tensor hooks on autograd's device threads
        self._hooks = {id(wp): self._make_hooks(wp) for wp in self.module_points}
        self.tap: Callable[[WatchPoint, Any, Any], Any] | None = None  # set on tapped captures only
        self.tap_first = False
        # Small CPU outputs and their gradients are copied (one kernel) and reduced off the training
        # thread (monitor.pack.unpack) instead of by a hook's ~9 kernels. Off under DDP: the ranks'
        # partials are combined on their devices.
        self.host_rows = False
        self.pool = CopyPool()  # their buffers, reused from one sampled step to the next

    # -- lifecycle -----------------------------------------------------------------------------
    def begin(self) -> None:
        if self._handles or self._grad_handles or self._mode is not None:
            self.detach()  # what an interrupted end left behind
        self._owner = threading.get_ident()
        self.active = True
        self.paused = False
        self._current = {}
        self._gradless = {}
        self._forward_ended = False
        self.token_mask = None
        self._pre = {}
        self.calls.reset()
        # Track producers (for functional names and (N, C, L) outputs) until functional calls are
        # known to exist, then only when they do.
        self._tracking = self.functional and (not self.discovered or self.calls.seen)
        handles = self._handles
        try:
            for wp in self.module_points:
                if self.tap is not None:  # a tapped capture: outputs go to the tap (see Capture.tapped)
                    handles.append(wp.module.register_forward_hook(Hook(self._tap_hook, wp), prepend=self.tap_first))  # type: ignore[union-attr]
                    continue
                pre, post = self._hooks[id(wp)]
                if pre is not None:
                    handles.append(wp.module.register_forward_pre_hook(Hook(pre)))  # type: ignore[union-attr]
                handles.append(wp.module.register_forward_hook(Hook(post)))  # type: ignore[union-attr]
            if self.tap is None and self._blocks:  # the padding of the blocks' sequences (monitor.tokens)
                handles.append(self.model.register_forward_pre_hook(Hook(self._read_mask), with_kwargs=True))
            if self.tap is None:
                for rw in self.recurrent:
                    hook = Hook(self._record_recurrent, rw)
                    handles.append(rw.module.register_forward_hook(hook, with_kwargs=True))
            if self._tracking or not self.discovered:
                handles += self.calls.hooks()
            if self._tracking:
                self._mode = FunctionalMode(self)
                self._mode.__enter__()
                if self.tap is None and self._fast.modules:  # frozen fused-path modules run without the mode
                    handles += self._fast.hooks()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook and the functional mode (idempotent).

        The functional mode lives on the thread that began the step: called from another thread
        (a monitor closed in an alert callback on the writer thread), the mode is left for that
        thread's ``end()`` and does nothing until then.
        """
        try:
            self._leave_forward(keep_hooks=False)
        finally:
            try:
                remove_all(self._grad_handles)
            finally:
                # Ended, also when a removal raised (a Ctrl-C): what is left is removed by the next
                # begin() or detach(). Only a mode on another thread is left for its owner's end().
                self.active = self._mode is not None and threading.get_ident() != self._owner

    def end_forward(self) -> None:
        """Stop watching forward passes (hooks and the functional mode removed); the gradient hooks
        of the outputs already seen stay until :meth:`end`. Outputs recorded without a graph
        (reentrant activation checkpointing) keep the module hooks until then, for the forward that
        backward re-runs; new forwards are ignored."""
        self._forward_ended = True
        self._leave_forward(keep_hooks=any(n > 0 for n in self._gradless.values()))

    def _leave_forward(self, keep_hooks: bool) -> None:
        mode = self._mode
        if mode is not None and threading.get_ident() == self._owner:
            with contextlib.suppress(Exception):
                leave_mode(mode)  # not __exit__: a user's mode may sit above ours
            self._mode = None  # after: an interrupted leave is tried again
        if not keep_hooks:
            remove_all(self._handles)
        self.calls.reset()
        self._pre = {}

    def end(self) -> dict[WatchPoint, Pending]:
        """Detach and hand over the step's partials."""
        try:
            self.detach()
        finally:
            current, self._current = self._current, {}
        return current

    # -- module hooks --------------------------------------------------------------------------
    def _make_hooks(self, wp: WatchPoint) -> tuple[Callable[..., None] | None, Callable[..., None]]:
        key = id(wp)
        if PRE_MAX in wp.rows and not getattr(wp.module, "inplace", False):
            # The input is intact after an out-of-place ReLU: read it in the forward hook.
            def post_with_input(module: nn.Module, args: Any, output: Any) -> None:
                inp = args[0] if args else None
                self.record(wp, output, inp, pre_input=inp)  # reduced inside record's one-thread region

            return None, post_with_input

        def post(module: nn.Module, args: Any, output: Any) -> None:
            inp = args[0] if args else None
            self.record(wp, output, inp, self._pre.pop(key, None))

        if PRE_MAX not in wp.rows:
            return None, post

        def pre(module: nn.Module, args: Any) -> None:  # an in-place ReLU overwrites its input
            if (
                args
                and isinstance(args[0], torch.Tensor)
                and torch._C._current_graph_task_id() == -1
                and not self._forward_ended
            ):
                rows = self.pre_rows(wp, args[0])
                if rows is not None:
                    self._pre[key] = rows

        return pre, post

    def _record_recurrent(self, rw: RecurrentWatch, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """Forward hook of an nn.LSTM / nn.GRU: recompute its gates and states on a subset of the
        sequences (:func:`monitor.recurrent.recompute`) and record each like a watched output."""
        try:
            if self.paused or self._forward_ended or torch._C._current_graph_task_id() != -1:
                return
            out = first_tensor(output[0] if isinstance(output, tuple) and output else output)
            device = out.device if out is not None else torch.device("cpu")
            gen = self._generators.get(device)
            if gen is None and module.training and module.dropout > 0:
                gen = self._generators[device] = torch.Generator(device=device)
                gen.manual_seed(0)
            # Small matrix products and a loop over time: one CPU thread beats a parallel region.
            threads = torch.get_num_threads() if device.type == "cpu" and module.hidden_size <= 256 else 1
            if threads > 1:
                torch.set_num_threads(1)
            self.calls.depth += 1  # its sigmoid/tanh calls are not functional activations of the model
            try:
                got = recompute(module, tuple(args), kwargs or {}, output, rw.wanted, gen)
            finally:
                self.calls.depth -= 1
                if threads > 1:
                    torch.set_num_threads(threads)
        except Exception as e:
            self._warn_once(f"record:{rw.name}", f"could not recompute the gates of {rw.name or type(module).__name__}: {e!r}")
            return
        for slot, wp in rw.points:
            t = got.get((slot.layer, slot.direction, slot.role))
            if t is not None:
                self.record(wp, t, None)

    # -- reductions ----------------------------------------------------------------------------
    def _resolve_unit_dim(self, wp: WatchPoint, x: torch.Tensor, inp: Any) -> None:
        if wp.unit_dim is None:
            if x.ndim <= 2:
                wp.unit_dim = -1
            elif x.ndim >= 4:
                wp.unit_dim = 1
            else:
                producer = self.calls.producer(inp)
                wp.unit_dim = 1 if producer is not None and conv_like(producer[1]) else -1

    def pre_rows(self, wp: WatchPoint, z: torch.Tensor) -> list[torch.Tensor] | torch.Tensor | None:
        """PRE_MAX/PRE_MIN rows of a ReLU's input (read before the activation runs), or, where the
        output will be reduced on the host, a float32 copy of the input."""
        try:
            if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim == 0 or z.numel() == 0:
                return None
            self._resolve_unit_dim(wp, z, z)  # before detach: the producer is known by identity
            if self._on_host(wp, z):
                return self.pool.copy(z.detach())
            return pre_stat_rows(z.detach(), wp.dims(z.ndim))
        except Exception as e:
            self._warn_once(f"record:{wp.name}", f"could not record {wp.name}: {e!r}")
            return None

    def _on_host(self, wp: WatchPoint, x: torch.Tensor) -> bool:
        """Whether this output of ``wp`` is copied for the host (the step's first call decides)."""
        prev = self._current.get(wp)
        if prev is not None:
            return prev.on_host
        return (
            self.host_rows and x.device.type == "cpu" and x.numel() <= HOST_BELOW and HOST_ROWS.issuperset(wp.rows)
        )

    def record(
        self,
        wp: WatchPoint,
        output: Any,
        inp: Any,
        pre: list[torch.Tensor] | torch.Tensor | None = None,
        pre_input: Any = None,
    ) -> None:
        """Reduce one output of ``wp`` to its rows. ReLU family: ``pre`` holds the rows of its input
        read earlier (in-place ReLUs; a copy of that input where the output is reduced on the host),
        or ``pre_input`` is that input, still intact."""
        try:
            if self.paused or not self.active:
                return
            if torch._C._current_graph_task_id() != -1:
                self._rerun(wp, output)  # a forward re-run inside backward (activation checkpointing)
                return
            if self._forward_ended:
                return  # a forward after end_forward(): hooks kept for re-runs only
            x = output if isinstance(output, torch.Tensor) else first_tensor(output)
            if x is None or not x.is_floating_point() or x.ndim == 0 or x.numel() == 0:
                return
            raw = x
            x = x.detach()
            self._resolve_unit_dim(wp, x, inp)
            dims = wp.dims(x.ndim)
            numel = x.numel()
            # Small CPU tensors: a parallel region costs more than the reduction it splits, so
            # reduce them on one thread (this halves the hook's cost on a 128 x 256 activation).
            threads = torch.get_num_threads() if x.device.type == "cpu" and numel < _SERIAL_BELOW else 1
            on_host = self._on_host(wp, x)
            if on_host and x.device.type != "cpu":
                self._warn_once(f"device:{wp.name}", f"{wp.name}: device changed within a step; extra call ignored")
                return
            if threads > 1:
                torch.set_num_threads(1)
            try:
                if on_host:
                    part = host_part(self.pool, wp, x, dims, pre, pre_input, self.histograms)
                else:
                    part = device_part(wp, x, inp, dims, pre, pre_input, self.histograms, self.token_mask)
            finally:
                if threads > 1:
                    torch.set_num_threads(threads)
            prev = self._current.get(wp)
            if prev is None:
                self._current[wp] = part
            elif prev.units == part.units and prev.on_host == part.on_host:
                if part.on_host:
                    prev.host += part.host
                else:
                    prev.stats = combine_rows(prev.stats, part.stats, wp.rows)
                prev.hist_samples += part.hist_samples
                prev.positions += part.positions
                prev.hist_numel += part.hist_numel
                prev.hist_sampled += part.hist_sampled
            else:
                self._warn_once(f"shape:{wp.name}", f"{wp.name}: unit count changed within a step; extra call ignored")
                return
            if self.gradients and raw.requires_grad:
                # Fires when backward reaches this output (if it runs before the step ends); removed with the rest.
                self._grad_handles.append(raw.register_hook(functools.partial(self._record_grad, wp, dims)))
            elif self.gradients and not torch.is_grad_enabled():  # reentrant checkpointing re-runs it in backward
                self._gradless[wp] = self._gradless.get(wp, 0) + 1
        except Exception as e:
            self._warn_once(f"record:{wp.name}", f"could not record {wp.name}: {e!r}")

    def _read_mask(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the model: its ``attention_mask=`` (a 2-d tensor), for the blocks."""
        mask = kwargs.get("attention_mask")
        self.token_mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    def _rerun(self, wp: WatchPoint, output: Any) -> None:
        """A forward re-run inside backward (activation checkpointing): its values were recorded
        in the forward. Reentrant checkpointing ran that forward without a graph, so the gradient
        hook it could not take goes on the recomputed output, which this backward reaches next."""
        if self._gradless.get(wp, 0) <= 0:
            return
        x = output if isinstance(output, torch.Tensor) else first_tensor(output)
        if x is None or not x.requires_grad:
            return
        self._gradless[wp] -= 1
        with self._grad_lock:  # CUDA: autograd's device thread
            self._grad_handles.append(x.register_hook(functools.partial(self._record_grad, wp, wp.dims(x.ndim))))

    def _record_grad(self, wp: WatchPoint, dims: tuple[int, ...], g: torch.Tensor | None) -> None:
        """Tensor hook: reduce the gradient with respect to one watched output to its GRAD_ROWS
        (or, for an output reduced on the host, copy it)."""
        try:
            if g is None or not g.is_floating_point() or not self.active:
                return
            numel = g.numel()
            threads = torch.get_num_threads() if g.device.type == "cpu" and numel < _SERIAL_BELOW else 1
            p = self._current.get(wp)
            host = p is not None and p.on_host and g.device.type == "cpu"
            if threads > 1:
                torch.set_num_threads(1)
            try:
                if host:
                    copy = self.pool.copy(g.detach())
                else:
                    rows = grad_stat_rows(g.detach(), dims)
            finally:
                if threads > 1:
                    torch.set_num_threads(threads)
            with self._grad_lock:
                p = self._current.get(wp)
                if p is None:
                    return
                if host:
                    if g.shape[wp.unit_dim] != p.units:  # type: ignore[index]
                        return
                    p.host_grads.append((copy, dims))
                else:
                    if p.on_host or rows[0].shape[0] != p.units:
                        return
                    p.grad = rows if p.grad is None else combine_rows(p.grad, rows, GRAD_ROWS)
                p.grad_positions += numel // p.units
        except Exception as e:
            self._warn_once(f"grad:{wp.name}", f"could not record the gradient of {wp.name}: {e!r}")

    # -- taps: probe runs and ablation blocks (monitor/probe.py, monitor/ablation.py) -------------------
    def tapped(self, tap: Callable[[WatchPoint, Any, Any], Any], first: bool = False) -> Capture:
        """A second capture of the same model and watch points whose hooks hand every watched output
        to ``tap(watch_point, output, input)`` instead of reducing it to statistics; a return value
        other than None replaces the output. ``first``: its module hooks run before the hooks already
        there (an ablation, which everything else must see), else after them (a probe, which sees
        what ran). It shares this capture's names of functional activations. ``begin()`` ... ``end()``."""
        other = Capture(
            self.model, self.selector, functional=self.functional, histograms=False, gradients=False,
            tolerance=self.tolerance, rows=self._rows, warn_once=self._warn_once,
        )
        other.calls.points = SharedPoints(self.calls.points)  # type: ignore[assignment]
        other.tap, other.tap_first = tap, first
        return other

    def _tap_hook(self, wp: WatchPoint, module: nn.Module, args: Any, output: Any) -> Any:
        return self.tap_output(wp, output, args[0] if args else None)

    def tap_output(self, wp: WatchPoint, output: Any, inp: Any) -> Any:
        """``tap(wp, output, inp)`` with ``wp.unit_dim`` resolved for the output; the output it returns."""
        x = output if isinstance(output, torch.Tensor) else first_tensor(output)
        if x is not None and x.ndim > 0:
            self._resolve_unit_dim(wp, x, inp)
        replaced = self.tap(wp, output, inp)  # type: ignore[misc]
        return output if replaced is None else replaced
