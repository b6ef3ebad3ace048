"""One watched output -> its partials of a sampled step (:class:`Pending`), as the hooks take them.

:func:`device_part` reduces the output to per-unit rows on its own device (no host sync);
:func:`host_part` takes one float32 copy of a small CPU output instead, reduced later off the
training thread (:func:`monitor.stats.host_stat_rows`). Both only read the tensors they are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from monitor.copies import CopyPool
from monitor.selection import WatchPoint
from monitor.stats import PRE_MAX, block_token_rows, histogram_sample, pre_stat_rows, sample_stride, unit_stat_rows
from monitor.tokens import TOKEN_SIM


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


def token_dim(wp: WatchPoint) -> int:
    """Where the tokens are in a stack block's 3-d output: 1 (``[batch, tokens, width]``, Hugging
    Face and ``batch_first=True``), or 0 for ``nn.Transformer*Layer(batch_first=False)``."""
    attn = getattr(wp.module, "self_attn", None)
    return 0 if getattr(attn, "batch_first", True) is False else 1


def device_part(
    wp: WatchPoint,
    x: torch.Tensor,
    inp: Any,
    dims: tuple[int, ...],
    pre: list[torch.Tensor] | torch.Tensor | None,
    pre_input: Any,
    histograms: bool,
    token_mask: torch.Tensor | None = None,
) -> Pending:
    """One call's rows, reduced on ``x``'s device (no host sync), and its histogram sample.

    ``pre``: a ReLU's input rows read before the call (or a host copy of that input), else
    ``pre_input``: that input, still intact; with neither, the output stands in (no margin)."""
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
    if TOKEN_SIM in wp.rows:  # a stack block: how alike its tokens are, how much it changed them
        stats += block_token_rows(x, inp, token_dim(wp), units, token_mask)
    hist = histogram_sample(x, sample_stride(numel, units)) if histograms else None
    return Pending(
        stats, units, [] if hist is None else [hist], numel // units, numel, 0 if hist is None else hist.numel()
    )


def host_part(
    pool: CopyPool,
    wp: WatchPoint,
    x: torch.Tensor,
    dims: tuple[int, ...],
    pre: list[torch.Tensor] | torch.Tensor | None,
    pre_input: Any,
    histograms: bool,
) -> Pending:
    """One float32 copy of a small CPU output (stacked with a ReLU's intact input) from ``pool``:
    the rows are computed from it on the host (:func:`monitor.stats.host_stat_rows`). Always a
    copy: the output is the user's to change after its hook (an in-place op, a write through
    ``.data``), and the writer reads it seconds later."""
    numel = x.numel()
    units = x.shape[wp.unit_dim]  # type: ignore[index]
    z: torch.Tensor | str | None = None
    if PRE_MAX in wp.rows:
        if isinstance(pre, torch.Tensor) and pre.shape == x.shape:
            z = pre  # copied before an in-place ReLU overwrote it
        elif pre is None and isinstance(pre_input, torch.Tensor) and pre_input.shape == x.shape:
            x = pool.stack2(pre_input.detach(), x)  # one kernel copies both
            z = "stacked"
    if z != "stacked":
        x = pool.copy(x)
    sampled = len(range(0, numel, sample_stride(numel, units))) if histograms else 0
    return Pending([], units, [], numel // units, numel, sampled, host=[(x, z, dims)], pool=pool)
