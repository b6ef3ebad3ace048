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
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from monitor.activations import conv_like, functional_kind, is_activation_module
from monitor.compiled import named_modules
from monitor.copies import CopyPool
from monitor.recurrent import recompute
from monitor.selection import RecurrentWatch, Selector, WatchPoint, make_watch_point
from monitor.stats import (
    GRAD_ROWS,
    HOST_ROWS,
    PRE_MAX,
    block_token_rows,
    combine_rows,
    grad_stat_rows,
    histogram_sample,
    pre_stat_rows,
    sample_stride,
    unit_stat_rows,
)
from monitor.tokens import TOKEN_SIM

_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
_SERIAL_BELOW = 1 << 18  # elements
# CPU outputs up to this size are copied in the hook and reduced on the host (Capture.host_rows).
HOST_BELOW = 1 << 16  # elements


def _token_dim(wp: WatchPoint) -> int:
    """Where the tokens are in a stack block's 3-d output: 1 (``[batch, tokens, width]``, Hugging
    Face and ``batch_first=True``), or 0 for ``nn.Transformer*Layer(batch_first=False)``."""
    attn = getattr(wp.module, "self_attn", None)
    return 0 if getattr(attn, "batch_first", True) is False else 1


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module output: a tensor, tuple/list, dict or dataclass."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = first_tensor(o)
            if t is not None:
                return t
        return None
    if isinstance(obj, dict):
        for o in obj.values():
            t = first_tensor(o)
            if t is not None:
                return t
        return None
    fields = getattr(obj, "__dataclass_fields__", None)
    if fields:
        for f in fields:
            t = first_tensor(getattr(obj, f, None))
            if t is not None:
                return t
    return None


@dataclass
class Pending:
    """One watch point's partials of the step in progress (on the activation's device)."""

    stats: list[torch.Tensor]  # one [units] row per entry of the watch point's rows
    units: int
    hist_samples: list[torch.Tensor]  # binned together at the end of the step
    positions: int
    hist_numel: int  # values the histogram stands for
    hist_sampled: int  # values actually binned
    grad: list[torch.Tensor] | None = None  # GRAD_ROWS of the gradient w.r.t. this output, once backward reached it
    grad_positions: int = 0
    sequences: int = 0  # stack blocks: sequences behind the token rows (monitor.tokens)
    # Small CPU outputs (Capture.host_rows): float32 copies, reduced on the host instead of ``stats``
    # (empty then): per call (output, ReLU input or None, reduced dims), where a ReLU input copied
    # together with its output is ``"stacked"`` (the copy holds [input, output]); per gradient (gradient, dims).
    host: list[tuple[torch.Tensor, torch.Tensor | str | None, tuple[int, ...]]] = field(default_factory=list)
    host_grads: list[tuple[torch.Tensor, tuple[int, ...]]] = field(default_factory=list)
    pool: CopyPool | None = None  # where the copies came from

    def release(self) -> None:
        """The host copies have been read: hand their buffers back to the pool."""
        pool, host, grads = self.pool, self.host, self.host_grads
        self.host, self.host_grads = [], []  # nothing may read them now: the buffers get reused
        if pool is None:
            return
        for x, z, _ in host:
            pool.give(x)
            if isinstance(z, torch.Tensor):
                pool.give(z)
        for g, _ in grads:
            pool.give(g)

    @property
    def on_host(self) -> bool:
        return not self.stats  # reduced on the host: no rows from the hooks

    @property
    def backward(self) -> bool:
        """Backward reached this output during the step."""
        return self.grad is not None or bool(self.host_grads)

    @property
    def is_cpu(self) -> bool:
        return self.on_host or self.stats[0].is_cpu


class _FunctionalMode(TorchFunctionMode):
    """Sees functional activations (``F.relu(x)``, ``torch.tanh(x)``, ``x.relu()``) in a forward."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        kind = functional_kind(func, args, kwargs)
        cap = self.capture
        if kind is None or cap.act_depth or not args or not cap.active:
            return func(*args, **kwargs)
        wp = cap.functional_point(kind, args[0])
        if cap.tap is not None:  # a tapped capture (probe run, ablation block): see Capture.tapped
            out = func(*args, **kwargs)
            return out if wp is None else cap.tap_output(wp, out, args[0])
        # A ReLU's input is read before the call: an in-place relu_ overwrites it.
        pre = cap.pre_rows(wp, args[0]) if wp is not None and PRE_MAX in wp.rows else None
        out = func(*args, **kwargs)
        if wp is not None:
            cap.record(wp, out, args[0], pre)
        return out


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
        self.functional_points: dict[tuple, WatchPoint] = {}
        self.functional_seen = False
        self.discovered = False  # a sampled step in this process looked for functional activations
        self.names = {id(m): n for n, m in named_modules(model)}
        self.active = False
        self.paused = False  # forward passes ignored (a validation loop inside a training step)
        self.act_depth = 0
        self._handles: list[Any] = []
        self._grad_handles: list[Any] = []  # tensor hooks on this step's watched outputs
        self._mode: _FunctionalMode | None = None
        self._owner = threading.get_ident()  # the thread of the sampled step in progress
        self._current: dict[WatchPoint, Pending] = {}
        self._pre: dict[int, list[torch.Tensor]] = {}
        self._producers: dict[int, tuple[weakref.ref, str, nn.Module]] = {}
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
        self._owner = threading.get_ident()
        self.active = True
        self.paused = False
        self._current = {}
        self._pre = {}
        self.act_depth = 0
        self._producers = {}
        # Track producers (for functional names and (N, C, L) outputs) until functional calls are
        # known to exist, then only when they do.
        self._tracking = self.functional and (not self.discovered or self.functional_seen)
        handles = self._handles
        try:
            for wp in self.module_points:
                if self.tap is not None:  # a tapped capture: outputs go to the tap (see Capture.tapped)
                    handles.append(wp.module.register_forward_hook(functools.partial(self._tap_hook, wp), prepend=self.tap_first))  # type: ignore[union-attr]
                    continue
                pre, post = self._hooks[id(wp)]
                if pre is not None:
                    handles.append(wp.module.register_forward_pre_hook(pre))  # type: ignore[union-attr]
                handles.append(wp.module.register_forward_hook(post))  # type: ignore[union-attr]
            if self.tap is None:
                for rw in self.recurrent:
                    hook = functools.partial(self._record_recurrent, rw)
                    handles.append(rw.module.register_forward_hook(hook, with_kwargs=True))
            if self._tracking or not self.discovered:
                for name, module in named_modules(self.model):
                    if not name:
                        continue  # the root's output is never an input inside its own forward
                    if is_activation_module(module):
                        handles.append(module.register_forward_pre_hook(self._enter_activation))
                        handles.append(module.register_forward_hook(self._leave_activation))
                    else:
                        handles.append(module.register_forward_hook(self._track_producer))
            if self._tracking:
                self._mode = _FunctionalMode(self)
                self._mode.__enter__()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook and the functional mode (idempotent).

        The functional mode lives on the thread that began the step: called from another thread
        (a monitor closed in an alert callback on the writer thread), the mode is left for that
        thread's ``end()`` and does nothing until then.
        """
        self.end_forward()
        handles, self._grad_handles = self._grad_handles, []
        for h in handles:
            h.remove()
        self.active = self._mode is not None  # left for the owner's end()

    def end_forward(self) -> None:
        """Stop watching forward passes (hooks and the functional mode removed); the gradient hooks
        of the outputs already seen stay until :meth:`end`."""
        mode = self._mode
        if mode is not None and threading.get_ident() == self._owner:
            self._mode = None
            with contextlib.suppress(Exception):
                mode.__exit__(None, None, None)
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._producers = {}
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
            if args and isinstance(args[0], torch.Tensor):
                rows = self.pre_rows(wp, args[0])
                if rows is not None:
                    self._pre[key] = rows

        return pre, post

    def _record_recurrent(self, rw: RecurrentWatch, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """Forward hook of an nn.LSTM / nn.GRU: recompute its gates and states on a subset of the
        sequences (:func:`monitor.recurrent.recompute`) and record each like a watched output."""
        try:
            if self.paused or torch._C._current_graph_task_id() != -1:
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
            self.act_depth += 1  # its sigmoid/tanh calls are not functional activations of the model
            try:
                got = recompute(module, tuple(args), kwargs or {}, output, rw.wanted, gen)
            finally:
                self.act_depth -= 1
                if threads > 1:
                    torch.set_num_threads(threads)
        except Exception as e:
            self._warn_once(f"record:{rw.name}", f"could not recompute the gates of {rw.name or type(module).__name__}: {e!r}")
            return
        for slot, wp in rw.points:
            t = got.get((slot.layer, slot.direction, slot.role))
            if t is not None:
                self.record(wp, t, None)

    def _enter_activation(self, module: nn.Module, args: Any) -> None:
        self.act_depth += 1

    def _leave_activation(self, module: nn.Module, args: Any, output: Any) -> None:
        self.act_depth = max(0, self.act_depth - 1)
        self._track_producer(module, args, output)

    def _track_producer(self, module: nn.Module, args: Any, output: Any) -> None:
        t = output if isinstance(output, torch.Tensor) else first_tensor(output)
        if t is not None:
            self._producers[id(t)] = (weakref.ref(t), self.names.get(id(module), ""), module)

    def _producer(self, t: Any) -> tuple[str, nn.Module] | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._producers.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1], entry[2]

    # -- functional activations ----------------------------------------------------------------
    def _enclosing_module(self) -> str | None:
        """Qualified name of the innermost module of the model whose code is running, or None when
        no ``forward`` of the model is on the stack: the call comes from a loss function, the
        training loop or a LightningModule's ``training_step``, not from the model.

        A method's instance is its first argument, whatever it is called (``self``, ``s``, ...).
        """
        frame = sys._getframe(3)
        innermost: str | None = None
        for _ in range(100):
            if frame is None:
                break
            code = frame.f_code
            if code.co_argcount:
                owner = frame.f_locals.get(code.co_varnames[0])
                if isinstance(owner, nn.Module) and id(owner) in self.names:
                    if innermost is None:
                        innermost = self.names[id(owner)]
                    if code.co_name == "forward":
                        return innermost
            frame = frame.f_back
        return None

    @staticmethod
    def _call_site() -> tuple[Any, int]:
        frame = sys._getframe(3)
        while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
            frame = frame.f_back
        return (frame.f_code, frame.f_lineno) if frame is not None else (None, 0)

    def functional_point(self, kind: Any, inp: Any) -> WatchPoint | None:
        """The watch point of a functional activation call, or None (not the model's, not watched)."""
        try:
            enclosing = self._enclosing_module()
            if enclosing is None:
                return None  # not part of the model's forward (e.g. F.relu in a hinge loss)
            producer = self._producer(inp)
            owner = producer[0] if producer else enclosing
            base_name = kind.name.split("[")[0]
            key = (owner, base_name, self._call_site())
            wp = self.functional_points.get(key)
            if wp is None:
                name = f"{owner}.{base_name}" if owner else base_name
                taken = {p.name for p in self.functional_points.values()} | {p.name for p in self.module_points}
                if name in taken:
                    k = 2
                    while f"{name}#{k}" in taken:
                        k += 1
                    name = f"{name}#{k}"
                wp = make_watch_point(name, kind, None, self.tolerance)
                wp.rows = self._rows(wp)
                if producer is not None and conv_like(producer[1]):
                    wp.unit_dim = 1
                if not self.selector.wants_functional(name, kind):
                    wp.rows = ()  # remembered as "not watched"
                self.functional_points[key] = wp
            self.functional_seen = True
            return wp if wp.rows else None
        except Exception as e:
            self._warn_once("functional", f"could not record a functional activation: {e!r}")
            return None

    # -- reductions ----------------------------------------------------------------------------
    def _resolve_unit_dim(self, wp: WatchPoint, x: torch.Tensor, inp: Any) -> None:
        if wp.unit_dim is None:
            if x.ndim <= 2:
                wp.unit_dim = -1
            elif x.ndim >= 4:
                wp.unit_dim = 1
            else:
                producer = self._producer(inp)
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
            if self.paused or torch._C._current_graph_task_id() != -1:
                return  # paused, or a forward re-run inside backward (activation checkpointing): seen already
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
                    part = self._host_part(wp, x, dims, pre, pre_input)
                else:
                    part = self._device_part(wp, x, inp, dims, pre, pre_input)
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
                prev.sequences += part.sequences
            else:
                self._warn_once(f"shape:{wp.name}", f"{wp.name}: unit count changed within a step; extra call ignored")
                return
            if self.gradients and raw.requires_grad:
                # Fires when backward reaches this output (if it runs before the step ends); removed with the rest.
                self._grad_handles.append(raw.register_hook(functools.partial(self._record_grad, wp, dims)))
        except Exception as e:
            self._warn_once(f"record:{wp.name}", f"could not record {wp.name}: {e!r}")

    def _device_part(
        self,
        wp: WatchPoint,
        x: torch.Tensor,
        inp: Any,
        dims: tuple[int, ...],
        pre: list[torch.Tensor] | torch.Tensor | None,
        pre_input: Any,
    ) -> Pending:
        """One call's rows, reduced on ``x``'s device (no host sync), and its histogram sample."""
        if isinstance(pre, torch.Tensor):  # a host copy, taken before the mode was known
            pre = pre_stat_rows(pre, dims)
        stats = unit_stat_rows(x, dims, wp.rows, wp.kind, wp.lo_thr, wp.hi_thr)
        if PRE_MAX in wp.rows:
            if pre is None and isinstance(pre_input, torch.Tensor) and pre_input.shape == x.shape:
                pre = pre_stat_rows(pre_input.detach(), dims)
            if pre is None or pre[0].shape != stats[0].shape:
                pre = pre_stat_rows(x, dims)  # no usable input: the output stands in (no margin)
            stats = pre + stats
        numel = x.numel()
        units = stats[0].shape[0]
        sequences = 0
        if TOKEN_SIM in wp.rows:  # a stack block: how alike its tokens are, how much it changed them
            rows, sequences = block_token_rows(x, inp, _token_dim(wp), units)
            stats += rows
        hist = histogram_sample(x, sample_stride(numel, units)) if self.histograms else None
        return Pending(
            stats, units, [] if hist is None else [hist], numel // units, numel, 0 if hist is None else hist.numel(), sequences=sequences
        )

    def _host_part(
        self, wp: WatchPoint, x: torch.Tensor, dims: tuple[int, ...], pre: list[torch.Tensor] | torch.Tensor | None, pre_input: Any
    ) -> Pending:
        """One float32 copy of a small CPU output (stacked with a ReLU's intact input): the rows are
        computed from it on the host (:func:`monitor.stats.host_stat_rows`)."""
        numel = x.numel()
        units = x.shape[wp.unit_dim]  # type: ignore[index]
        z: torch.Tensor | str | None = None
        if PRE_MAX in wp.rows:
            if isinstance(pre, torch.Tensor) and pre.shape == x.shape:
                z = pre  # copied before an in-place ReLU overwrote it
            elif pre is None and isinstance(pre_input, torch.Tensor) and pre_input.shape == x.shape:
                x = self.pool.stack2(pre_input.detach(), x)  # one kernel copies both
                z = "stacked"
        if z != "stacked":
            x = self.pool.copy(x)
        sampled = len(range(0, numel, sample_stride(numel, units))) if self.histograms else 0
        return Pending([], units, [], numel // units, numel, sampled, host=[(x, z, dims)], pool=self.pool)

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
        other.functional_points = _SharedPoints(self.functional_points)  # type: ignore[assignment]
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


class _SharedPoints:
    """A capture's functional watch points as a tapped capture sees them. A probe's forward is
    called from another line than the training forward, and a model made of library modules has
    no call site of its own (the first frame outside torch is the caller's line): a key not seen
    before falls back to the one watch point of the same producer and activation, if one exists."""

    def __init__(self, points: dict[tuple, WatchPoint]) -> None:
        self.points = points

    def get(self, key: tuple) -> WatchPoint | None:
        wp = self.points.get(key)
        if wp is None:
            same = [p for k, p in self.points.items() if k[:2] == key[:2]]
            wp = same[0] if len(same) == 1 else None
        return wp

    def values(self) -> Any:
        return self.points.values()

    def __setitem__(self, key: tuple, wp: WatchPoint) -> None:
        self.points[key] = wp
