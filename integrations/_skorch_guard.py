"""The skorch callback's step guard: one forward hook on ``net.module_`` that ends a sampled step
right after the module's forward, also when that forward raises.

skorch has no event between a batch's forward and its backward, nor one for an exception inside
the forward; :class:`StepGuard` stands in for both. The callback (:mod:`integrations.skorch`) is
told through two methods: ``_forward_done()`` (the forward completed) and ``_end_failed_step()``
(it raised).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn


class StepGuard:
    """Forward hook (``with_kwargs=True, always_call=True``) on ``net.module_`` during a sampled step.

    Completed forward (torch iterates a copy of the hook dict): runs the core's hooks moved into it,
    removes itself and ends the step. Forward that raised (torch iterates ``module._forward_hooks``
    itself, so no entry may leave or join it until the exception has left ``module_``): ends the
    step with ``failed=True`` and stays in that dict, spent, doing nothing, until the callback's next
    ``on_batch_begin``/``on_batch_end``/``on_train_begin``/``on_train_end``/``initialize``, pickling,
    or the module's next completed forward, whichever comes first. A pickled copy is a spent guard.
    """

    __slots__ = ("absorbed", "callback", "entry_exc", "handle")

    def __init__(self, callback: Any = None, entry_exc: BaseException | None = None) -> None:
        self.callback = callback  # None: spent
        self.entry_exc = entry_exc  # the exception being handled, if any, when the step began
        self.absorbed: list[tuple[Callable[..., Any], bool]] = []  # (core hook, with_kwargs)
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        callback = self.callback
        if sys.exc_info()[1] is not self.entry_exc:  # torch's exception path
            self.callback, self.absorbed, self.entry_exc = None, [], None
            if callback is not None:
                callback._end_failed_step()
            return None
        absorbed = self.absorbed
        self.remove(module)
        result = None
        for hook, with_kwargs in absorbed:  # the core's, in registration order, before the step ends
            r = hook(module, args, kwargs, output) if with_kwargs else hook(module, args, output)
            if r is not None:
                output = result = r
        if callback is not None:
            callback._forward_done()
        return result

    def remove(self, module: nn.Module | None = None) -> None:
        """Spend the guard and take it off its module (by identity for an unpickled copy)."""
        self.callback, self.absorbed, self.entry_exc = None, [], None
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.remove()
        elif module is not None:
            for key in [k for k, hook in module._forward_hooks.items() if hook is self]:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (StepGuard, ())  # never the callback, the monitor or the core's hooks


def guard_step(callback: Any, module: nn.Module, before: set[int]) -> StepGuard:
    """End the sampled step right after ``module``'s forward, also when the forward raises.

    One forward hook, registered with ``always_call=True`` after the core's hooks, does it (see
    :class:`StepGuard`). Forward hooks the core put on ``module`` itself (keys of its
    ``_forward_hooks`` not in ``before``, taken before ``begin_step``) move into the guard, which runs
    them in the same place on success: torch iterates that dict itself, not a copy, when the
    forward raises, so no entry may leave it then, and ending the step must not have to remove one.
    """
    hooks = module._forward_hooks
    guard = StepGuard(callback, sys.exc_info()[1])
    for key in [k for k in hooks if k not in before]:
        guard.absorbed.append((hooks.pop(key), bool(module._forward_hooks_with_kwargs.pop(key, False))))
        module._forward_hooks_always_called.pop(key, None)
    guard.handle = module.register_forward_hook(guard, with_kwargs=True, always_call=True)
    return guard
