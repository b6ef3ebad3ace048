"""Parameters on a sampled step: gradient norms and update-to-weight ratios, on the device.

In a plain loop, :class:`ParameterCapture` attaches, for the duration of one sampled step only,
process-wide optimizer step pre/post hooks (``torch.optim.optimizer``). When an optimizer steps
parameters of the watched model, the pre-hook reads their gradients' L2 norms (one
``_foreach_norm``: the gradient the optimizer is about to use, i.e. after ``GradScaler``'s
unscaling and after any clipping done before ``optimizer.step()``) and a fixed strided sample of
at most :data:`SAMPLE` elements of each parameter; the post-hook marks them stepped, and their
samples after the step are read when the sampled step ends. From those,
``||w_after - w_before|| / ||w_before||`` is estimated (exact up to :data:`SAMPLE` elements). No
copy of a weight is ever made, only of its sample.

Integrations whose framework says where gradients are final (Lightning's
``on_before_optimizer_step``: unscaled, before its clipping; skorch's ``on_grad_computed``)
attach nothing (``use_hooks=False``): they call :meth:`ParameterCapture.read_gradients` there,
which does the same as the pre-hook.

Every number stays a tensor on the parameter's device until the step is packed; nothing here
reads a value back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from monitor.compiled import named_parameters
from monitor.handles import remove_all

SAMPLE = 4096  # elements per parameter tensor behind an update ratio


@lru_cache(maxsize=4096)
def sample_stride(shape: tuple[int, ...]) -> int:
    """ceil(numel / SAMPLE), raised until coprime with the last dimension: a stride sharing a factor
    with a row's length would only ever see some columns (some input features of a weight)."""
    numel = math.prod(shape)
    stride = max(1, math.ceil(numel / SAMPLE))
    last = shape[-1] if len(shape) else 1
    while stride > 1 and math.gcd(stride, last) != 1:
        stride += 1
    return stride


def _dense_flat(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """``t``'s elements as a 1-d view in memory order and its sizes in memory order (outermost
    first), when ``t`` fills its memory densely in some order of its dimensions (contiguous,
    ``channels_last``, a transpose); None otherwise. Never a copy: ``reshape(-1)`` of a
    non-contiguous weight would copy all of it."""
    if t.is_contiguous():
        return t.view(-1), tuple(t.shape)
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return None  # gaps or overlaps: not one dense block
        expected *= n
    return t.as_strided((t.numel(),), (1,), t.storage_offset()), tuple(n for _, n in reversed(dims))


def _sample(p: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``p``'s strided sample as float32, and whether it is a live view (it follows the updates)."""
    t = p.detach()
    flat = _dense_flat(t)
    if flat is None:  # not one dense block (rare for a parameter): gathered, a copy of the sample only
        stride = sample_stride(tuple(t.shape))
        index = torch.arange(0, t.numel(), stride, device=t.device)
        return torch.take(t, index).float(), False
    v, memory_shape = flat
    stride = sample_stride(memory_shape)
    v = v[::stride] if stride > 1 else v
    return (v, True) if v.dtype == torch.float32 else (v.float(), False)


def weight_sample(p: torch.Tensor) -> torch.Tensor:
    """A float32 copy of every k-th element of ``p`` in memory order (see :func:`sample_stride`), on p's device."""
    return _sample(p)[0].clone()


@dataclass
class _Group:
    """Parameters of one optimizer step on one device, and their samples before the step (one copy)."""

    names: list[str]
    params: list[torch.Tensor]
    views: list[torch.Tensor]  # views of the parameters' samples (copies for non-float32 ones)
    lengths: list[int]
    before: torch.Tensor
    stepped: bool = False

    live: list[bool] = field(default_factory=list)  # per parameter: its view follows the update

    def after(self) -> list[torch.Tensor]:
        """The samples now: the same views where they follow the update, fresh samples elsewhere."""
        return [v if live else _sample(p)[0] for v, live, p in zip(self.views, self.live, self.params)]


@dataclass
class ParameterPartials:
    """One sampled step's parameter numbers, as flat tensors on their devices (names in model order).

    Update ratios travel as per-parameter sums of squares reduced on the device (``update_sq``:
    sum (after - before)^2, sum before^2 per parameter), or, for CPU models (``on_host``), as the
    samples themselves (``before``, then ``after``), summed on the host off the training thread.
    """

    norm_names: list[str] = field(default_factory=list)
    norms: torch.Tensor | None = None  # [len(norm_names)] gradient L2 norms
    host_norms: list[torch.Tensor] = field(default_factory=list)  # CPU (``on_host``): the 0-d norms themselves
    ratio_names: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # samples per ratio name
    update_sq: torch.Tensor | None = None
    before: torch.Tensor | None = None
    after: list[torch.Tensor] = field(default_factory=list)
    on_host: bool = False
    backward: bool = False  # a gradient was seen
    stepped: bool = False  # an optimizer stepped one of the model's parameters

    def tensors(self) -> list[torch.Tensor]:
        out = [self.norms] if self.norms is not None else []
        if self.on_host and self.before is not None:
            return out + [self.before, *self.after]
        return out + ([self.update_sq] if self.update_sq is not None else [])

    def __len__(self) -> int:
        norms = 0 if self.host_norms else len(self.norm_names)
        return norms + 2 * (sum(self.lengths) if self.on_host else len(self.ratio_names))


class ParameterCapture:
    """The parameter hooks of sampled steps on one model. ``begin()`` ... step ... ``end()``."""

    def __init__(self, model: nn.Module, warn_once: Callable[[str, str], None]) -> None:
        self.model = model
        self.use_hooks = True  # False: the integration calls read_gradients() (see the module docs)
        self._warn_once = warn_once
        self._handles: list[Any] = []
        self._names: dict[int, str] = {}
        self._order: dict[str, int] = {}
        self._norms: dict[str, torch.Tensor] = {}
        self._groups: list[_Group] = []
        self._sampled: set[str] = set()
        self._segments: dict[tuple, torch.Tensor] = {}  # segment lengths on the device, per sample layout
        self._views: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(param) -> ((data_ptr, strides), live sample view)
        self._backward = False
        self._stepped = False

    def _index(self) -> None:
        """Names and model order of the parameters (walked again only when an unknown one shows up)."""
        named = named_parameters(self.model)
        self._names = {id(p): n for n, p in named}
        self._order = {n: i for i, (n, _) in enumerate(named)}
        self._views.clear()

    def begin(self) -> None:
        if not self._names or not self.use_hooks:
            self._index()  # integrations read every parameter: walk the model each sampled step
        self._norms, self._groups, self._sampled = {}, [], set()
        self._backward = self._stepped = False
        if not self.use_hooks:
            return
        try:
            self._handles.append(register_optimizer_step_pre_hook(self._pre_step))
            self._handles.append(register_optimizer_step_post_hook(self._post_step))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        remove_all(self._handles)

    def end(self, failed: bool = False, host: bool = False) -> ParameterPartials:
        """Detach and hand over the step's numbers (flat tensors, in the model's parameter order).

        ``host``: the numbers may be finished on the host (no collective follows)."""
        self.detach()
        if not self.use_hooks and self._groups and not failed:
            self._sample_after(self._named_now())
        out = ParameterPartials(backward=self._backward, stepped=self._stepped)
        try:
            if self._norms:
                out.norm_names = sorted(self._norms, key=self._order.__getitem__)
                norms = [self._norms[n] for n in out.norm_names]
                if host and all(t.is_cpu for t in norms):
                    out.host_norms = norms  # read on the host as they are: no kernel to stack them
                else:
                    out.norms = _stack(norms)
            groups = [g for g in self._groups if g.stepped]
            if groups:
                for g in groups:
                    out.ratio_names += g.names
                    out.lengths += g.lengths
                out.on_host = host and all(g.before.is_cpu for g in groups)
                if out.on_host:
                    out.before = torch.cat([g.before for g in groups]) if len(groups) > 1 else groups[0].before
                    out.after = [v for g in groups for v in g.after()]  # copied by the step's one concatenation
                else:
                    sums = []
                    for g in groups:
                        after = torch.cat(g.after())
                        sq = torch.stack([(after - g.before).square_(), g.before.square()], dim=1)
                        sums.append(self._segment_sums(g.lengths, sq))
                    device = sums[0].device
                    out.update_sq = torch.cat([t.to(device, non_blocking=True) for t in sums]).reshape(-1)
        except Exception as e:
            self._warn_once("params", f"could not compute the parameters' numbers: {e!r}")
            out = ParameterPartials(backward=self._backward, stepped=self._stepped)
        self._norms, self._groups = {}, []
        return out

    def _segment_sums(self, lengths_list: list[int], sq: torch.Tensor) -> torch.Tensor:
        """``[n, 2]`` per-sample squares -> ``[params, 2]`` sums per parameter (one kernel)."""
        key = (sq.device, tuple(lengths_list))
        lengths = self._segments.get(key)
        if lengths is None:
            lengths = torch.tensor(lengths_list, device=sq.device)
            if len(self._segments) > 16:
                self._segments.clear()
            self._segments[key] = lengths
        return torch.segment_reduce(sq, "sum", lengths=lengths, axis=0)

    # -- gradients ---------------------------------------------------------------------------
    def _named_now(self) -> list[tuple[str, torch.Tensor]]:
        names = self._names
        return [(names[id(p)], p) for p in self.model.parameters() if id(p) in names and p.requires_grad]

    def read_gradients(self, params: list[tuple[str, torch.Tensor]] | None = None) -> None:
        """Read the gradients' norms and the weights' "before" samples of ``params`` (default: every
        trainable parameter of the model) now: gradients final, the optimizer not stepped yet.
        With several optimizer steps in one sampled step, the first one's are kept."""
        named = self._named_now() if params is None else params
        self._sample_before(named)
        grads = [(name, p.grad) for name, p in named if p.grad is not None and name not in self._norms]
        if not grads:
            return
        self._backward = True
        dense = [(n, g) for n, g in grads if not g.is_sparse]
        try:
            if dense:
                norms = _foreach_norm32([g.detach() for _, g in dense])
                self._norms.update({n: v for (n, _), v in zip(dense, norms)})
            for n, g in grads:
                if g.is_sparse:
                    self._norms[n] = _norm(g)
        except Exception as e:
            self._warn_once("grads", f"could not read the parameters' gradients: {e!r}")

    # -- the optimizer step ------------------------------------------------------------------
    def params_of(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of the watched model's trainable parameters that ``optimizer`` steps."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if any(id(p) not in self._names for p in params):
            self._index()  # a parameter added or replaced since (or another model's: skipped below)
        names = self._names
        return [(names[id(p)], p) for p in params if id(p) in names]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.read_gradients(self.params_of(optimizer))

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._sample_after(self.params_of(optimizer))

    def _sample_before(self, params: list[tuple[str, torch.Tensor]]) -> None:
        try:
            params = [(n, p) for n, p in params if n not in self._sampled and p.numel()]  # several steps: span all
            if not params:
                return
            by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
            for name, p in params:
                by_device.setdefault(p.device, []).append((name, p))
            for group in by_device.values():
                ps = [p for _, p in group]
                views, live = self._cached_views(ps)
                before = torch.cat(views) if len(views) > 1 else views[0].clone()  # a copy, safe from the update
                self._groups.append(_Group([n for n, _ in group], ps, views, [v.numel() for v in views], before, live=live))
            self._sampled.update(n for n, _ in params)
        except Exception as e:
            self._warn_once("update", f"could not sample the weights before the optimizer step: {e!r}")

    def _cached_views(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[bool]]:
        """Each parameter's sample and whether it is a live view; live views are reused across
        steps while the parameter keeps its storage and layout."""
        out, live = [], []
        cache = self._views
        for p in params:
            key = (p.data_ptr(), p.stride())
            hit = cache.get(id(p))
            if hit is not None and hit[0] == key:
                v, is_live = hit[1], True
            else:
                v, is_live = _sample(p)
                if is_live:
                    cache[id(p)] = (key, v)
            out.append(v)
            live.append(is_live)
        return out, live

    def _sample_after(self, params: list[tuple[str, torch.Tensor]]) -> None:
        """The optimizer stepped ``params``: their groups' "after" samples are read when the step ends."""
        if params:
            self._stepped = True
        taken = {n for n, _ in params}
        for g in self._groups:
            if taken.issuperset(g.names):
                g.stepped = True


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    device = values[0].device
    return torch.stack([v if v.device == device else v.to(device, non_blocking=True) for v in values])


def _foreach_norm32(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norms as float32 tensors. float32 (and float64, complex) gradients in their own precision
    (one ``_foreach_norm`` per dtype); bf16/fp16 accumulated in float32 (a bf16 norm is rounded to
    3 significant digits): one kernel where ``_foreach_norm`` takes a ``dtype`` (2.3+), else one per tensor."""
    if all(g.dtype == torch.float32 for g in grads):
        return list(torch._foreach_norm(grads))
    out: list[torch.Tensor | None] = [None] * len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        group = [grads[i] for i in idx]
        if dtype in (torch.float16, torch.bfloat16):
            try:
                norms = list(torch._foreach_norm(group, 2, dtype=torch.float32))
            except (TypeError, RuntimeError):
                norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in group]
        else:
            norms = [n if n.dtype == torch.float32 else n.float() for n in torch._foreach_norm(group)]
        for i, n in zip(idx, norms):
            out[i] = n
    return out  # type: ignore[return-value]


def _norm(g: torch.Tensor) -> torch.Tensor:
    g = g.detach()
    if g.is_sparse:
        g = g.coalesce().values()
    return torch.linalg.vector_norm(g, dtype=torch.float32)
