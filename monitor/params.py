"""Parameters on a sampled step: gradient norms and update-to-weight ratios, on the device.

In a plain loop, :class:`ParameterCapture` attaches, for the duration of one sampled step only:

- a post-accumulate-grad hook on each trainable parameter of the watched model: the L2 norm of
  its gradient as backward left it (before clipping or the optimizer; with several backward
  passes in the step, the accumulated gradient of the last);
- process-wide optimizer step pre/post hooks (``torch.optim.optimizer``): a fixed strided sample
  of at most :data:`SAMPLE` elements of each parameter before and after the optimizer step, from
  which ``||w_after - w_before|| / ||w_before||`` is estimated (exact up to :data:`SAMPLE`
  elements). No copy of a weight is ever made, only of its sample.

Integrations whose framework says where gradients are final (Lightning's
``on_before_optimizer_step``, skorch's ``on_grad_computed``) attach neither (``use_hooks=False``):
they call :meth:`ParameterCapture.read_gradients` there (the norms, and the "before" sample: the
optimizer has not updated yet), and the "after" sample is taken when the step ends.

Every number stays a 0-d tensor on the parameter's device until the step is packed; nothing here
reads a value back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

SAMPLE = 4096  # elements per parameter tensor behind an update ratio


def sample_stride(shape: torch.Size) -> int:
    """ceil(numel / SAMPLE), raised until coprime with the last dimension: a stride sharing a factor
    with a row's length would only ever see some columns (some input features of a weight)."""
    numel = math.prod(shape)
    stride = max(1, math.ceil(numel / SAMPLE))
    last = shape[-1] if len(shape) else 1
    while stride > 1 and math.gcd(stride, last) != 1:
        stride += 1
    return stride


def weight_sample(p: torch.Tensor) -> torch.Tensor:
    """A float32 copy of every k-th element of ``p`` (see :func:`sample_stride`), on p's device."""
    flat = p.detach().reshape(-1)
    stride = sample_stride(p.shape)
    if stride > 1:
        flat = flat[::stride]
    return flat.to(torch.float32, copy=True)


@dataclass
class ParameterPartials:
    """One sampled step's parameter numbers, as tensors on their devices (names in model order)."""

    norm_names: list[str] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)  # 0-d gradient L2 norms
    ratio_names: list[str] = field(default_factory=list)
    deltas: list[torch.Tensor] = field(default_factory=list)  # 0-d ||after - before|| of the sample
    weights: list[torch.Tensor] = field(default_factory=list)  # 0-d ||before|| of the sample
    backward: bool = False  # a gradient was seen
    stepped: bool = False  # an optimizer stepped one of the model's parameters

    def tensors(self) -> list[torch.Tensor]:
        return [*self.norms, *self.deltas, *self.weights]

    def __len__(self) -> int:
        return len(self.norms) + 2 * len(self.deltas)


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
        self._before: dict[str, torch.Tensor] = {}
        self._after: dict[str, torch.Tensor] = {}
        self._backward = False
        self._stepped = False

    def begin(self) -> None:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._names = {id(p): n for n, p in named}
        self._order = {n: i for i, (n, _) in enumerate(named)}
        self._norms, self._before, self._after = {}, {}, {}
        self._backward = self._stepped = False
        if not self.use_hooks:
            return
        try:
            for _, p in named:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self._handles.append(register_optimizer_step_pre_hook(self._pre_step))
            self._handles.append(register_optimizer_step_post_hook(self._post_step))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def end(self, failed: bool = False) -> ParameterPartials:
        """Detach and hand over the step's numbers (0-d tensors, in the model's parameter order)."""
        self.detach()
        if not self.use_hooks and self._before and not failed:
            self._sample_after(self._named_now())
        out = ParameterPartials(backward=self._backward, stepped=self._stepped)
        for name in sorted(self._norms, key=self._order.__getitem__):
            out.norm_names.append(name)
            out.norms.append(self._norms[name])
        for name in sorted(self._before.keys() & self._after.keys(), key=self._order.__getitem__):
            before, after = self._before[name], self._after[name]
            if after.device != before.device:
                after = after.to(before.device)
            out.ratio_names.append(name)
            out.deltas.append(torch.linalg.vector_norm(after - before))
            out.weights.append(torch.linalg.vector_norm(before))
        self._norms, self._before, self._after = {}, {}, {}
        return out

    # -- gradients ---------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        name = self._names.get(id(p))
        if name is not None and p.grad is not None:
            self._backward = True
            try:
                self._norms[name] = _norm(p.grad)
            except Exception as e:
                self._warn_once(f"grad:{name}", f"could not read the gradient of {name}: {e!r}")

    def _named_now(self) -> list[tuple[str, torch.Tensor]]:
        names = self._names
        return [(names[id(p)], p) for p in self.model.parameters() if id(p) in names]

    def read_gradients(self) -> None:
        """Read every parameter's gradient now, where an integration knows they are final and the
        optimizer has not updated the weights yet (also their "before" samples, once per step)."""
        named = self._named_now()
        if not self.use_hooks:
            self._sample_before(named)
        grads = [(name, p.grad) for name, p in named if p.grad is not None]
        if not grads:
            return
        self._backward = True
        dense = [(n, g) for n, g in grads if not g.is_sparse]
        try:
            if dense:
                norms = torch._foreach_norm([g.detach() for _, g in dense])
                self._norms.update({n: v.float() for (n, _), v in zip(dense, norms)})
            for n, g in grads:
                if g.is_sparse:
                    self._norms[n] = _norm(g)
        except Exception as e:
            self._warn_once("grads", f"could not read the parameters' gradients: {e!r}")

    # -- the optimizer step ------------------------------------------------------------------
    def _params_of(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
        names = self._names
        return [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"] if id(p) in names]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._sample_before(self._params_of(optimizer))

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._sample_after(self._params_of(optimizer))

    def _sample_before(self, params: list[tuple[str, torch.Tensor]]) -> None:
        try:
            for name, p in params:
                if name not in self._before:  # several steps in one sampled step: span all of them
                    self._before[name] = weight_sample(p)
        except Exception as e:
            self._warn_once("update", f"could not sample the weights before the optimizer step: {e!r}")

    def _sample_after(self, params: list[tuple[str, torch.Tensor]]) -> None:
        try:
            if params:
                self._stepped = True
            for name, p in params:
                if name in self._before:
                    self._after[name] = weight_sample(p)
        except Exception as e:
            self._warn_once("update", f"could not sample the weights after the optimizer step: {e!r}")


def _norm(g: torch.Tensor) -> torch.Tensor:
    g = g.detach()
    if g.is_sparse:
        g = g.coalesce().values()
    return torch.linalg.vector_norm(g, dtype=torch.float32)
