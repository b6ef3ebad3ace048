"""Reusable float32 CPU buffers for the copies of small outputs (:class:`CopyPool`).

A copy taken in a hook lives until the writer thread has reduced it, up to a couple of seconds
(the dispatcher hands samples over in batches). Fresh allocations for every sampled step, freed
on another thread seconds later, fragment glibc's heap: on a 2-core VM the process grew by about
1 MB per sampled step, and every sampled step paid ~70 page faults for memory it touched for the
first time. Copies taken from a pool reuse the same pages: the writer gives each buffer back once
it has read it (:meth:`Pending.release <monitor.partials.Pending.release>`).
"""

from __future__ import annotations

import threading

import torch

_MAX_FREE = 64  # buffers kept per shape (a batch of samples in flight)
_MAX_SHAPES = 16  # shapes kept; more (varying batch sizes or sequence lengths): start over


class CopyPool:
    """Free float32 CPU buffers by shape. ``take`` on the training thread, ``give`` on any thread.

    >>> pool = CopyPool()
    >>> a = pool.take((2, 3))
    >>> pool.give(a)
    >>> pool.take((2, 3)) is a
    True
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor of ``shape``, contents undefined (to be overwritten)."""
        with self._lock:
            free = self._free.get(shape)
            if free:
                return free.pop()
            if free is None:
                if len(self._free) >= _MAX_SHAPES:
                    self._free.clear()
                self._free[shape] = []
        # A normal tensor also when the hook runs under torch.inference_mode(): an inference
        # tensor could not be written by the next sampled step's copy outside it.
        with torch.inference_mode(False):
            return torch.empty(shape, dtype=torch.float32)

    def give(self, t: torch.Tensor) -> None:
        """Hand back a buffer from :meth:`take` that nothing reads any more."""
        with self._lock:
            free = self._free.get(tuple(t.shape))
            if free is not None and len(free) < _MAX_FREE:
                free.append(t)

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        """A float32 copy of ``src`` (any float dtype, any layout) in a pooled buffer: one kernel."""
        return self.take(tuple(src.shape)).copy_(src)

    def stack2(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``torch.stack([a, b])`` as float32 in a pooled buffer (one kernel for float32 inputs)."""
        out = self.take((2, *a.shape))
        if a.dtype == torch.float32 and b.dtype == torch.float32:
            return torch.stack([a, b], out=out)
        out[0].copy_(a)
        out[1].copy_(b)
        return out
