"""Functional activations inside ``forward`` (``F.relu(x)``, ``torch.tanh(x)``, ``x.relu()``): which
watch point a call is.

A call is named after the module that produced its input (``encoder.fc1.relu``), or, where no module
did, the innermost module of the model whose ``forward`` is running. Producers are remembered by
forward hooks that :class:`~monitor.capture.Capture` registers on sampled steps only
(:meth:`FunctionalCalls.hooks`); a :class:`FunctionalMode` sees the calls. Calls made inside an
activation module (GELU's own ``erf``, a recomputed LSTM's gates) or outside the model's forward
(a loss function, the training loop) are not layers.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from monitor.activations import Kind, conv_like, functional_kind, is_activation_module
from monitor.compiled import named_modules
from monitor.handles import Hook, remove_all
from monitor.selection import Selector, WatchPoint, make_watch_point
from monitor.stats import PRE_MAX

_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


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


class FunctionalCalls:
    """The functional watch points of one model, and what names them during a sampled forward.

    ``points`` maps ``(owner, activation, call site)`` to a watch point (one whose ``rows`` are empty
    is remembered as "not watched"); ``seen`` says whether any call was met in this process.
    """

    def __init__(
        self,
        model: nn.Module,
        module_points: Sequence[WatchPoint],
        selector: Selector,
        tolerance: float,
        rows: Callable[[WatchPoint], tuple[str, ...]],
        warn_once: Callable[[str, str], None],
    ) -> None:
        self.model = model
        self.module_points = module_points
        self.selector = selector
        self.tolerance = tolerance
        self._rows = rows
        self._warn_once = warn_once
        self.names = {id(m): n for n, m in named_modules(model)}
        self.points: dict[tuple, WatchPoint] = {}
        self.seen = False
        self.depth = 0  # > 0 inside an activation module (or a recomputation): its calls are not layers
        self._producers: dict[int, tuple[weakref.ref, str, nn.Module]] = {}

    def reset(self) -> None:
        """Forget the producers of the last forward (their tensors are gone)."""
        self._producers = {}
        self.depth = 0

    def hooks(self) -> list[Any]:
        """Register the producer-tracking hooks on every submodule; the caller removes the handles."""
        handles: list[Any] = []
        try:
            for name, module in named_modules(self.model):
                if not name:
                    continue  # the root's output is never an input inside its own forward
                if is_activation_module(module):
                    handles.append(module.register_forward_pre_hook(Hook(self._enter_activation)))
                    handles.append(module.register_forward_hook(Hook(self._leave_activation)))
                else:
                    handles.append(module.register_forward_hook(Hook(self._track_producer)))
        except BaseException:
            remove_all(handles)
            raise
        return handles

    def _enter_activation(self, module: nn.Module, args: Any) -> None:
        self.depth += 1

    def _leave_activation(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth = max(0, self.depth - 1)
        self._track_producer(module, args, output)

    def _track_producer(self, module: nn.Module, args: Any, output: Any) -> None:
        t = output if isinstance(output, torch.Tensor) else first_tensor(output)
        if t is not None:
            self._producers[id(t)] = (weakref.ref(t), self.names.get(id(module), ""), module)

    def producer(self, t: Any) -> tuple[str, nn.Module] | None:
        """(name, module) of the module whose output ``t`` is, if it ran in this forward."""
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._producers.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1], entry[2]

    def _enclosing_module(self) -> str | None:
        """Qualified name of the innermost module of the model whose code is running, or None when
        no ``forward`` of the model is on the stack: the call comes from a loss function, the
        training loop or a LightningModule's ``training_step``, not from the model.

        A method's instance is its first argument, whatever it is called (``self``, ``s``, ...).
        Frame 3 is the caller of the torch function (this, :meth:`point`, ``__torch_function__``).
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

    def point(self, kind: Kind, inp: Any) -> WatchPoint | None:
        """The watch point of a functional activation call, or None (not the model's, not watched).
        Called from :meth:`FunctionalMode.__torch_function__` only (the frames above are counted)."""
        try:
            enclosing = self._enclosing_module()
            if enclosing is None:
                return None  # not part of the model's forward (e.g. F.relu in a hinge loss)
            producer = self.producer(inp)
            owner = producer[0] if producer else enclosing
            base_name = kind.name.split("[")[0]
            key = (owner, base_name, self._call_site())
            wp = self.points.get(key)
            if wp is None:
                name = f"{owner}.{base_name}" if owner else base_name
                taken = {p.name for p in self.points.values()} | {p.name for p in self.module_points}
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
                self.points[key] = wp
            self.seen = True
            return wp if wp.rows else None
        except Exception as e:
            self._warn_once("functional", f"could not record a functional activation: {e!r}")
            return None


def leave_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch-function mode stack, wherever it sits.

    ``mode.__exit__`` pops the top of the stack, whatever it is: with a user's mode entered since
    ours (``with torch.device("meta")`` inside a forward, which even moves itself), that pops the
    user's mode and leaves ours. Here the modes above ours are popped, ours is dropped, and theirs
    are pushed back in their order (what ``torch.device`` itself does to the stack). Not on the
    stack: nothing changes."""
    above = []
    for _ in range(torch._C._len_torch_function_stack()):
        m = torch._C._pop_torch_function_stack()
        if m is mode:
            break
        above.append(m)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


#: Modules with a fused inference path (``torch._transformer_encoder_layer_fwd``,
#: ``torch._native_multi_head_attention``) that PyTorch takes only when no torch-function mode is active.
FAST_PATH_TYPES = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)


class FastPaths:
    """Takes a capture's functional mode off the stack while an eval-mode module with a fused
    inference path runs (a frozen backbone of the watched model), and puts it back after: with the
    mode on the stack PyTorch takes the regular path there, which differs from the fused one in the
    last bits, so training would not be bit-for-bit what it is without the monitor. Functional
    activations inside such a module are then not seen (the fused path calls none)."""

    def __init__(self, model: nn.Module, capture: Any) -> None:
        self.modules = [m for _, m in named_modules(model) if isinstance(m, FAST_PATH_TYPES)]
        self.capture = capture
        self._stack: list[bool] = []  # per fast-path module running on the owner thread: did it pause the mode

    def hooks(self) -> list[Any]:
        """The pre- and post-hooks (the post-hooks also when the forward raises); the caller removes them."""
        self._stack = []
        handles: list[Any] = []
        try:
            for m in self.modules:
                handles.append(m.register_forward_pre_hook(Hook(self._enter)))
                handles.append(m.register_forward_hook(Hook(self._leave), always_call=True))
        except BaseException:
            remove_all(handles)
            raise
        return handles

    def _enter(self, module: nn.Module, args: Any) -> None:
        cap = self.capture
        if threading.get_ident() != cap._owner:
            return
        pause = not module.training and cap._mode is not None and not any(self._stack)
        if pause:
            leave_mode(cap._mode)
        self._stack.append(pause)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        cap = self.capture
        if threading.get_ident() != cap._owner or not self._stack:
            return
        if self._stack.pop() and cap._mode is not None:
            torch._C._push_on_torch_function_stack(cap._mode)


class FunctionalMode(TorchFunctionMode):
    """Sees functional activations in a forward and hands each watched call to ``capture``: its
    output to ``capture.record`` (a ReLU's input read before the call: an in-place ``relu_``
    overwrites it), or, in a tapped capture, to ``capture.tap_output``."""

    def __init__(self, capture: Any) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        kind = functional_kind(func, args, kwargs)
        cap = self.capture
        calls = cap.calls
        if kind is None or calls.depth or not args or not cap.active:
            return func(*args, **kwargs)
        wp = calls.point(kind, args[0])
        if cap.tap is not None:  # a tapped capture (probe run, ablation block): see Capture.tapped
            out = func(*args, **kwargs)
            return out if wp is None else cap.tap_output(wp, out, args[0])
        pre = cap.pre_rows(wp, args[0]) if wp is not None and PRE_MAX in wp.rows else None
        out = func(*args, **kwargs)
        if wp is not None:
            cap.record(wp, out, args[0], pre)
        return out


class SharedPoints:
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
