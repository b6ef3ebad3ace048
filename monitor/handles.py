"""Removing hook handles so that none is ever lost (:func:`remove_all`)."""

from __future__ import annotations

from typing import Any


def remove_all(handles: list[Any]) -> None:
    """Remove every hook handle in ``handles``, emptying the list.

    A handle leaves the list only once it is removed, and an exception in one removal (a Ctrl-C
    landing there) does not stop the others: that removal is tried once more, the others are all
    removed, then the first exception is raised again. What could not be removed stays in the list for the next call (removing a
    handle twice is harmless), so a hook can never be left on a model with nothing to remove it.

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
