"""Compiled models: sampled steps run the model's eager code, unsampled steps its compiled code.

``torch.compile`` turns a module's forward into compiled code that runs no Python forward hook
added later, and adding hooks changes what the compiler guards on (a recompilation, with the
hooks traced in). So the monitor leaves compiled code alone: for the duration of a sampled step
(and of a probe run) it sets the compiler's stance to ``"force_eager"``
(``torch.compiler.set_stance``), under which every compiled function runs its original Python
code, hooks and functional activations included, and nothing is compiled or recompiled. When
the step ends the previous stance is back and the next call runs the cached compiled code: no
guard fails, no recompilation (the tests count the compiler's graphs).

Supported: ``torch.compile(model)`` (an ``OptimizedModule``: the monitor watches the module it
wraps, under the same names), ``model.compile()``, compiled submodules, and whatever the
frameworks do with them (Lightning's ``model.compile()`` in ``configure_model`` or a compiled
module, the Hugging Face Trainer's ``torch_compile=True``). The stance is process-wide: other
compiled code that runs inside a sampled step (a compiled loss function) also runs eagerly
there. Setting it costs ~0.2 ms, so it is set only for models with compiled parts.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)`` wrapper (``OptimizedModule``) runs; ``model`` itself otherwise."""
    inner = getattr(model, "_orig_mod", None)
    while type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        model = inner
        inner = getattr(model, "_orig_mod", None)
    return model


def _compiled_module(m: nn.Module) -> bool:
    return (
        type(m).__name__ == "OptimizedModule"
        or getattr(m, "_compiled_call_impl", None) is not None
        or getattr(m, "_compiler_ctx", None) is not None
    )


def has_compiled_parts(model: nn.Module) -> bool:
    """``model.compile()`` on it or on any submodule, or a compiled (``OptimizedModule``) submodule."""
    return any(_compiled_module(m) for m in model.modules())


def root_compiled(model: nn.Module) -> bool:
    """The cheap check done on every sampled step: ``model.compile()`` called on the model itself
    (e.g. by Lightning's ``configure_model`` after the monitor was built)."""
    return getattr(model, "_compiled_call_impl", None) is not None


def compile_count() -> int:
    """Graphs ``torch.compile`` has built in this process (0 before the compiler is imported)."""
    dynamo = sys.modules.get("torch._dynamo")
    counters = getattr(getattr(dynamo, "utils", None), "counters", None) if dynamo is not None else None
    try:
        return int(counters["stats"]["unique_graphs"]) if counters else 0
    except Exception:
        return 0


def has_compiled_wrapper(model: nn.Module) -> bool:
    """Whether a ``torch.compile(model)`` wrapper of ``model`` exists (``Monitor(model)`` while the
    loop calls the wrapper): the wrapper holds the model as its ``_orig_mod`` child, which the model
    itself cannot see. One pass over the objects that refer to the model (``gc.get_referrers``):
    call it only when the compiler has built new graphs."""
    return any(isinstance(r, dict) and r.get("_orig_mod") is model for r in gc.get_referrers(model))


def clean_name(name: str) -> str:
    """A module or parameter name without the ``_orig_mod`` segments of compiled submodules
    (``block._orig_mod.0`` -> ``block.0``)."""
    if "_orig_mod" not in name:
        return name
    return ".".join(p for p in name.split(".") if p != "_orig_mod")


def _wrapper(m: nn.Module) -> bool:
    return type(m).__name__ == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` under the names of the uncompiled model: a compiled submodule
    (``model.block = torch.compile(block)``) is its wrapped module, named ``block`` (not
    ``block._orig_mod``), and its children ``block.0``, ...; the wrapper itself is left out."""
    return [(clean_name(n), m) for n, m in model.named_modules() if not _wrapper(m)]


def parents(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(child): parent}`` with compiled wrappers looked through: the module a compiled
    ``stack[2] = torch.compile(block)`` wraps has the stack as its parent."""
    out: dict[int, nn.Module] = {}
    for m in model.modules():
        if _wrapper(m):
            continue
        for c in m.children():
            out[id(c)] = m
            while _wrapper(c):
                c = c._orig_mod
                out[id(c)] = m
    return out


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` with the ``_orig_mod`` segments of compiled submodules removed."""
    return [(clean_name(n), p) for n, p in model.named_parameters()]


class EagerSteps:
    """Enters and leaves the ``"force_eager"`` compiler stance around sampled steps (idempotent)."""

    def __init__(self) -> None:
        self._ctx: Any = None

    @property
    def available(self) -> bool:
        return hasattr(torch, "compiler") and hasattr(torch.compiler, "set_stance")

    def enter(self) -> None:
        if self._ctx is not None or not self.available:
            return
        ctx = torch.compiler.set_stance("force_eager")
        ctx.__enter__()
        self._ctx = ctx

    def exit(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            with contextlib.suppress(Exception):
                ctx.__exit__(None, None, None)

    @contextlib.contextmanager
    def around(self, active: bool) -> Any:
        """``with eager.around(compiled):`` for a probe run or an ablation block."""
        if not active or self._ctx is not None:
            yield
            return
        self.enter()
        try:
            yield
        finally:
            self.exit()
