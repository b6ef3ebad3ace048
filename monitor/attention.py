"""Attention heads on a sampled step: which modules are attention modules, and the hooks that hand
each call's probabilities to :mod:`monitor.headstats` (entropy, normalised entropy, first-token
mass and one-hot queries per head, defined there).

Where the probabilities come from:

- ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``/``DecoderLayer``, and any
  module built from it): recomputed from the module's own inputs and parameters in a forward hook
  (``with_kwargs``: ``key_padding_mask``, ``attn_mask``, ``is_causal``), exactly as
  ``F.multi_head_attention_forward`` forms them (in-projection or separate q/k projections, biases,
  ``bias_k``, ``add_zero_attn``, ``1/sqrt(head_dim)`` scaling, boolean or additive masks), before
  attention dropout. ``nn.TransformerEncoderLayer``'s fused fast path (eval mode under ``no_grad``),
  which never calls its ``self_attn``, is not taken while any of the layer's modules has a forward
  hook (PyTorch's own rule): on a sampled step the layer runs its regular path and the hook sees
  every call.
- Hugging Face attention modules (``GPT2Attention``, ``BertSelfAttention``, ``LlamaAttention``, ...:
  the innermost module of ``transformers`` whose class name ends in ``Attention``): while such a
  module runs, a ``TorchFunctionMode`` (pushed by a forward pre-hook, popped by an ``always_call``
  forward hook) sees its attention. With ``attn_implementation="eager"`` it reads the softmax's
  input and recomputes the softmax in float32: the probabilities before attention dropout (the
  ``attn_weights`` that eager attention returns are after dropout in training mode); keys the
  module's ``attention_mask`` hides (and scores at the dtype's minimum or ``-inf``) are excluded. With ``"sdpa"`` (the default of
  ``transformers`` 5 on PyTorch 2.x) it reads the query, key, mask, ``is_causal`` and scale handed to
  ``F.scaled_dot_product_attention`` and recomputes the probabilities from them (GQA key heads
  repeated). Flash and flex attention are neither: those modules are skipped with one warning.

Cost: see :mod:`monitor.headstats` (the first :data:`~monitor.headstats.SEQUENCES` sequences of a
call, at most :data:`~monitor.headstats.QUERIES` queries of each, no host sync); each call adds a
``[ROWS, heads]`` block of sums to the step's one flat tensor.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from monitor.compiled import named_modules
from monitor.functional import leave_mode
from monitor.handles import Hook, remove_all
from monitor.headstats import ONE_HOT, AttentionPartials, hf_rows, mha_rows, sdpa_rows

_SOFTMAX = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax})
_SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _quiet() -> Any:
    """No torch-function modes (the capture's functional mode) around the monitor's own arithmetic."""
    return torch._C.DisableTorchFunction()


@dataclass(eq=False)
class AttentionPoint:
    """One attention module: ``kind`` ``"mha"`` (``nn.MultiheadAttention``) or ``"hf"`` (Hugging Face)."""

    name: str
    module: nn.Module
    kind: str


def is_hf_attention(module: nn.Module) -> bool:
    """A Hugging Face attention class (``transformers.*``, name ending in ``Attention``)."""
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("Attention")


def find_attention(model: nn.Module) -> list[AttentionPoint]:
    """Every ``nn.MultiheadAttention`` and every innermost Hugging Face attention module, in
    registration order (their forward order is learnt on the first sampled step)."""
    points: list[AttentionPoint] = []
    for name, m in named_modules(model):
        if isinstance(m, nn.MultiheadAttention):
            p = AttentionPoint(name, m, "mha")
        elif is_hf_attention(m) and not any(
            is_hf_attention(c) or isinstance(c, nn.MultiheadAttention) for c in m.modules() if c is not m
        ):
            p = AttentionPoint(name, m, "hf")
        else:
            continue
        points.append(p)
    return points


def hf_implementation(module: nn.Module) -> str | None:
    """The ``attn_implementation`` a Hugging Face attention module runs with (None: unknown)."""
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


class _SoftmaxMode(TorchFunctionMode):
    """Active only while a Hugging Face attention module runs: hands its softmax to the capture."""

    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.capture._hf_stack:
            if func is _SDPA:
                self.capture._sdpa(args, kwargs)
            elif func in _SOFTMAX:
                self.capture._softmax(args, kwargs, out)
        return out


_FORWARD_PARAMS: dict[type, inspect.Signature | None] = {}


def _bound_mask(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The ``attention_mask`` a Hugging Face attention module was called with (by keyword or position)."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    if not args[1:]:
        return None
    cls = type(module)
    if cls not in _FORWARD_PARAMS:
        try:
            _FORWARD_PARAMS[cls] = inspect.signature(module.forward)
        except (TypeError, ValueError):
            _FORWARD_PARAMS[cls] = None
    sig = _FORWARD_PARAMS[cls]
    if sig is None:
        return None
    names = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "attention_mask" in names and names.index("attention_mask") < len(args):
        return args[names.index("attention_mask")]
    return None


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


class AttentionCapture:
    """The attention hooks of sampled steps on one model. ``begin()`` ... forward ... ``end()``.

    Like :class:`~monitor.params.ParameterCapture`: hooks exist only between ``begin()`` and
    ``end()``/``detach()``, which remove them on every path; nothing here reads a value back to the host.
    """

    def __init__(
        self,
        model: nn.Module,
        warn_once: Callable[[str, str], None],
        paused: Callable[[], bool] = lambda: False,
        one_hot: float = ONE_HOT,
    ) -> None:
        self.model = model
        self.one_hot = one_hot  # a query at or below this normalised entropy is counted as one-hot
        self.points = find_attention(model)
        self._warn_once = warn_once
        self._paused = paused
        self._handles: list[Any] = []
        self._rows: dict[str, torch.Tensor] = {}
        self._heads: dict[str, int] = {}
        self._hf_stack: list[tuple[AttentionPoint, Any]] = []  # HF modules running now, with their masks
        self._hf_called: set[str] = set()
        self._hf_seen: set[str] = set()
        self._mode: _SoftmaxMode | None = None
        self._owner = threading.get_ident()

    def begin(self) -> None:
        self._rows, self._heads, self._hf_stack = {}, {}, []
        self._hf_called, self._hf_seen = set(), set()
        self._owner = threading.get_ident()
        if not self.points:
            return
        skipped = []
        try:
            for p in self.points:
                m = p.module
                if p.kind == "mha":
                    self._handles.append(m.register_forward_hook(Hook(self._mha_hook(p)), with_kwargs=True))
                    continue
                impl = hf_implementation(m)
                if impl is not None and impl not in ("eager", "sdpa"):
                    skipped.append((p.name, impl))
                    continue
                self._handles.append(m.register_forward_pre_hook(Hook(self._hf_pre(p)), with_kwargs=True))
                self._handles.append(m.register_forward_hook(Hook(self._hf_post), always_call=True))
        except BaseException:
            self.detach()
            raise
        if skipped:
            names = ", ".join(n for n, _ in skipped[:2]) + (f" and {len(skipped) - 2} more" if len(skipped) > 2 else "")
            self._warn_once(
                "attention-impl",
                f"attention heads: {names} run with attn_implementation={skipped[0][1]!r}, whose kernel never forms "
                "the attention probabilities and whose inputs the monitor does not read, so their heads are not "
                "watched. Load the model with attn_implementation=\"eager\" or \"sdpa\" (from_pretrained(..., "
                "attn_implementation=\"sdpa\") or model.set_attn_implementation(\"sdpa\")) to watch them, or pass "
                "attention=False.",
            )

    def end_forward(self) -> None:
        """Remove the hooks (idempotent); a softmax mode still pushed on this thread is popped."""
        try:
            remove_all(self._handles)
        finally:
            self._pop_mode()

    def detach(self) -> None:
        self.end_forward()

    def end(self, failed: bool = False) -> AttentionPartials | None:
        """Remove the hooks and hand over the step's sums (None when nothing was measured)."""
        try:
            self.end_forward()
            rows, self._rows = self._rows, {}
            missing = sorted(self._hf_called - self._hf_seen)
            if missing and not failed:
                self._warn_once(
                    "attention-none",
                    f"attention heads: {missing[0]} ran but neither a softmax nor F.scaled_dot_product_attention was "
                    "seen inside it (does it run attn_implementation=\"eager\" or \"sdpa\"?); its heads are not watched.",
                )
            if failed or not rows:
                return None
            names = list(rows)
            return AttentionPartials(names, [self._heads[n] for n in names], [rows[n] for n in names])
        except Exception as e:  # noqa: BLE001 - never let monitoring break training
            self._warn_once("attention", f"could not compute the attention heads' numbers: {e!r}")
            return None

    # -- recording ---------------------------------------------------------------------------------
    def _skip(self) -> bool:
        return self._paused() or torch._C._current_graph_task_id() != -1  # checkpoint re-forward: seen already

    def _add(self, p: AttentionPoint, rows: torch.Tensor | None) -> None:
        if rows is None:
            return
        prev = self._rows.get(p.name)
        if prev is None:
            self._rows[p.name] = rows
            self._heads[p.name] = int(rows.shape[1])
        elif prev.shape == rows.shape:
            self._rows[p.name] = prev + rows.to(prev.device)

    def _measure(self, p: AttentionPoint, fn: Callable[[], torch.Tensor | None]) -> None:
        try:
            with torch.no_grad(), _quiet(), _no_autocast():
                self._add(p, fn())
        except Exception as e:  # noqa: BLE001 - never let monitoring break training
            self._warn_once(f"attention:{p.name}", f"could not measure the attention heads of {p.name}: {e!r}")

    def _mha_hook(self, p: AttentionPoint) -> Callable[..., None]:
        mha = p.module

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._skip():
                return
            a = _bind(_MHA_ARGS, args, kwargs)
            self._measure(
                p,
                lambda: mha_rows(
                    mha,  # type: ignore[arg-type]
                    _detach(a.get("query")),
                    _detach(a.get("key")),
                    a.get("key_padding_mask"),
                    a.get("attn_mask"),
                    bool(a.get("is_causal", False)),
                    one_hot=self.one_hot,
                ),
            )

        return hook

    def _hf_pre(self, p: AttentionPoint) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._hf_called.add(p.name)
            if threading.get_ident() != self._owner:
                return
            self._hf_stack.append((p, _bound_mask(module, args, kwargs)))
            if self._mode is None:
                self._mode = _SoftmaxMode(self)
                self._mode.__enter__()

        return pre

    def _hf_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if threading.get_ident() != self._owner:
            return
        if self._hf_stack and self._hf_stack[-1][0].module is module:
            self._hf_stack.pop()
        if not self._hf_stack:
            self._pop_mode()

    def _pop_mode(self) -> None:
        mode = self._mode
        if mode is None or threading.get_ident() != self._owner:
            return
        self._mode = None
        self._hf_stack = []
        leave_mode(mode)  # not __exit__: another mode may have been pushed above ours

    def _sdpa(self, args: tuple, kwargs: dict) -> None:
        p = self._hf_stack[-1][0]
        a = _bind(_SDPA_ARGS, args, kwargs)
        q, k = a.get("query"), a.get("key")
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            return
        self._hf_seen.add(p.name)
        if self._skip():
            return
        mask = a.get("attn_mask")
        self._measure(
            p,
            lambda: sdpa_rows(
                q.detach(), k.detach(), _detach(mask), bool(a.get("is_causal", False)), a.get("scale"), one_hot=self.one_hot
            ),
        )

    def _softmax(self, args: tuple, kwargs: dict, out: Any) -> None:
        p, mask = self._hf_stack[-1]
        x = args[0] if args else kwargs.get("input")
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or x.dim() != 4 or out.shape != x.shape:
            return
        if dim not in (-1, 3):
            return
        self._hf_seen.add(p.name)
        if self._skip():
            return
        self._measure(p, lambda: hf_rows(x.detach(), mask, one_hot=self.one_hot))


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _no_autocast() -> contextlib.ExitStack:
    """float32 arithmetic inside an autocast region too."""
    stack = contextlib.ExitStack()
    for device in ("cuda", "cpu"):
        with contextlib.suppress(Exception):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
    return stack
