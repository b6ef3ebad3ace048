"""The monitor's hooks on users' modules: wrapped so that copies of a module never carry them
(:class:`Hook`), and removed so that none is ever lost (:func:`remove_all`)."""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any


def remove_all(handles: list[Any]) -> None:
    """Remove every hook handle in ``handles``, emptying the list.

    A handle leaves the list only once it is removed, and an exception in one removal (a Ctrl-C
    landing there) does not stop the others: that removal is tried once more, the others are all
    removed, then the first exception is raised again. What could not be removed stays in the list
    for the next call (removing a handle twice is harmless), so a hook can never be left on a model
    with nothing to remove it.

    >>> import torch
    >>> m = torch.nn.ReLU()
    >>> handles = [m.register_forward_hook(lambda *a: None) for _ in range(3)]
    >>> remove_all(handles)
    >>> handles, len(m._forward_hooks)
    ([], 0)
    """
    error: BaseException | None = None
    for i in range(len(handles) - 1, -1, -1):
        try:
            handles[i].remove()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other removals
            error = error or e
            try:
                handles[i].remove()  # once more: a Ctrl-C does not land twice in a row
            except BaseException:  # noqa: BLE001
                continue
        del handles[i]
    if error is not None:
        raise error


# How a monitor's hook is pickled: ``nullcontext().__exit__``, which takes any arguments and returns
# None (a hook that changes nothing), from the standard library. A module that is never called
# through ``__call__`` (``MultiheadAttention.out_proj``) keeps it; it costs nothing to load.
_NO_OP = (getattr, (contextlib.nullcontext(), "__exit__"))


class Hook(functools.partial):  # type: ignore[type-arg]
    """A hook the monitor puts on a user's module (``Hook(fn)`` calls ``fn``; C-speed, a partial).

    A copy of the module made while the hook is on it gets a no-op in its place: an
    :class:`InertHook` for ``copy.deepcopy``, a standard-library no-op for ``pickle`` and
    ``torch.save(model)`` inside a sampled step. Never the monitor's hook, which would record the
    copy's forwards as the watched model's, and never the monitor itself (locks, threads: not
    copyable).

    >>> import copy, torch
    >>> m = torch.nn.ReLU()
    >>> seen = []
    >>> h = m.register_forward_hook(Hook(lambda mod, args, out: seen.append(out)))
    >>> c = copy.deepcopy(m)
    >>> _ = c(torch.ones(1)), m(torch.ones(1))
    >>> len(seen), len(c._forward_hooks), len(m._forward_hooks)
    (1, 0, 1)
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return _NO_OP

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:
        return InertHook()


class InertHook:
    """What a deep copy of a module gets for a monitor's hook: does nothing, and takes itself off
    the module at its first call (outside exception handling, where torch may be iterating the
    dict). Pickled, it is a no-op of the standard library (:data:`_NO_OP`), so a saved model never
    needs this package to load."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return _NO_OP

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:
        return InertHook()

    def __call__(self, module: Any = None, *args: Any, **kwargs: Any) -> None:
        if sys.exc_info()[0] is not None or not hasattr(module, "_forward_hooks"):
            return None
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if h is self]:
                del hooks[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                    getattr(module, extra, {}).pop(key, None)
        return None
