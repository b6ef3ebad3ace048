"""Recurrent layers (``nn.LSTM``, ``nn.GRU``): their gates and states, recomputed on sampled steps.

A fused recurrent module runs as one operator: its gates never exist as tensors a hook could see.
On a sampled step the monitor's forward hook on the module gets its input, its initial state and
its output, and this module recomputes, **on a subset of the batch's sequences** (the first
:func:`subset_size` of them: at least ``SEQUENCES``, more for short sequences so that a step holds
about ``POSITIONS`` positions per unit), layer by layer and direction by direction:

- every hidden state ``h_t`` of the layer, by running the fused operator (``torch._VF.lstm`` /
  ``torch._VF.gru``) on that one layer with its own weights (the module's own output stands in for
  the last layer when it is exact: one layer, or no inter-layer dropout in training);
- from ``h_{t-1}`` and the layer's input ``x_t``, the gates at every position in two batched
  matrix products (no loop over time): LSTM input ``i``, forget ``f``, output ``o`` and cell
  candidate ``g``; GRU reset ``r``, update ``z`` and new ``n``;
- the LSTM cell state ``c_t = f_t * c_{t-1} + i_t * g_t``: one fused ``addcmul`` per time step
  (a loop over time, the one recurrence that cannot be batched), only when the cell (or, with
  ``proj_size``, the hidden point) is watched.

Each gate or state is a *virtual watch point* named ``<module>.l<k>[_reverse].<role>`` (the
layer and direction suffixes of PyTorch's own parameter names: ``rnn.l0.forget``,
``rnn.l1_reverse.hidden``), an ``[positions, units]`` tensor that goes through the same
reductions as any watched output. Padded positions of a ``PackedSequence`` are left out; the
reverse direction of a packed sequence starts at its own last element. With ``proj_size > 0``
the ``hidden`` point is ``o_t * tanh(c_t)`` before the projection (the bounded state; the
projected output is what the next layer and the gates see). Inter-layer dropout in training is
applied with a mask of the monitor's own generator (the same distribution as the module's mask,
not the same mask; the global RNG is never touched). Everything runs without autograd, in
float32, outside autocast.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from monitor.activations import Kind

__all__ = ["POSITIONS", "SEQUENCES", "Slot", "is_recurrent", "layout", "recompute", "subset_size"]

#: At least this many sequences of a batch are recomputed (all of them in a smaller batch) ...
SEQUENCES = 8
#: ... and more for short sequences, up to about this many positions (sequences x time steps).
POSITIONS = 512

LSTM_ROLES = ("input", "forget", "cell_candidate", "output", "hidden", "cell")
GRU_ROLES = ("reset", "update", "new", "hidden")


def _kind(mode: str, role: str) -> Kind:
    name = f"{mode}_{role}"
    if role in ("input", "forget", "output", "reset", "update"):  # sigmoid gates, in [0, 1]
        return Kind(name, lower=0.0, upper=1.0, activation=False, rnn="gate")
    if role in ("cell_candidate", "new"):  # tanh
        return Kind(name, lower=-1.0, upper=1.0, rnn="candidate")
    if role == "hidden":  # o * tanh(c) (LSTM), (1 - z) * n + z * h (GRU): in [-1, 1]
        return Kind(name, lower=-1.0, upper=1.0, rnn="hidden")
    return Kind(name, activation=False, rnn="cell")  # the LSTM cell state: unbounded


KINDS: dict[tuple[str, str], Kind] = {
    **{("lstm", r): _kind("lstm", r) for r in LSTM_ROLES},
    **{("gru", r): _kind("gru", r) for r in GRU_ROLES},
}


def is_recurrent(module: nn.Module) -> bool:
    """Whether the monitor recomputes this module's gates (``nn.LSTM``, ``nn.GRU``, subclasses)."""
    return isinstance(module, (nn.LSTM, nn.GRU))


def _mode(module: nn.Module) -> str:
    return "lstm" if isinstance(module, nn.LSTM) else "gru"


@dataclass(frozen=True)
class Slot:
    """One virtual watch point of a recurrent module: a gate or state of one layer and direction."""

    layer: int
    direction: int  # 0: forward, 1: reverse
    role: str
    name: str
    kind: Kind


def layout(name: str, module: nn.Module) -> list[Slot]:
    """The virtual watch points of ``module`` (named ``name`` in the model), in forward order."""
    mode = _mode(module)
    roles = LSTM_ROLES if mode == "lstm" else GRU_ROLES
    directions = 2 if module.bidirectional else 1
    prefix = f"{name}." if name else ""  # a bare nn.LSTM as the model: "l0.forget"
    return [
        Slot(layer, d, role, f"{prefix}l{layer}{'_reverse' if d else ''}.{role}", KINDS[(mode, role)])
        for layer in range(module.num_layers)
        for d in range(directions)
        for role in roles
    ]


def subset_size(batch: int, steps: int) -> int:
    """How many sequences (the first ones) are recomputed: at least ``SEQUENCES``, up to about
    ``POSITIONS`` positions for short sequences, never more than the batch.

    >>> subset_size(32, 64), subset_size(32, 16), subset_size(4, 64)
    (8, 32, 4)
    """
    return min(batch, max(SEQUENCES, math.ceil(POSITIONS / max(steps, 1))))


# -- recomputation ------------------------------------------------------------------------------


def _weights(module: nn.Module, layer: int, d: int) -> list[torch.Tensor]:
    sfx = f"_l{layer}{'_reverse' if d else ''}"
    names = ["weight_ih", "weight_hh"]
    if module.bias:
        names += ["bias_ih", "bias_hh"]
    if getattr(module, "proj_size", 0) > 0:
        names.append("weight_hr")
    return [getattr(module, n + sfx).detach().float() for n in names]


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class _Batch:
    """The recomputed sequences, time-major and padded: input ``[T, k, F]``, initial states
    ``[L*D, k, *]``; for packed input of different lengths, the index maps."""

    x: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor | None
    last: torch.Tensor | None  # the module's own output for these sequences, [T, k, D*H_out], or None
    reverse: torch.Tensor | None = None  # packed input: [T, k] time index of each sequence read backwards
    valid: torch.Tensor | None = None  # packed input: flat indices of the real positions of [T, k]


def _unpack(data: torch.Tensor, batch_sizes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``k`` sequences of a packed tensor (the ``k`` longest: packed order sorts by
    length) as padded ``[T, k, F]`` (padding holds copies of real rows: never read as a result),
    their lengths, and the gather index (host arithmetic on ``batch_sizes``; no device sync)."""
    lengths = (batch_sizes.unsqueeze(0) > torch.arange(k).unsqueeze(1)).sum(1)  # [k], longest first
    steps = int(lengths[0])
    offsets = torch.cumsum(batch_sizes[:steps], 0) - batch_sizes[:steps]
    seq = torch.arange(k).unsqueeze(0)
    rows = torch.where(torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0), offsets.unsqueeze(1) + seq, seq)
    rows = _to(rows.reshape(-1), data.device)
    return data.index_select(0, rows).reshape(steps, k, -1), lengths, rows


def _subset(module: nn.Module, inp: Any, hx: Any, output: Any, reuse: bool) -> _Batch | None:
    lstm = isinstance(module, nn.LSTM)
    out = output[0] if isinstance(output, tuple) else output
    extra: dict[str, torch.Tensor] = {}
    if isinstance(inp, PackedSequence):
        batch_sizes = inp.batch_sizes
        k = subset_size(int(batch_sizes[0]), batch_sizes.numel())
        x, lengths, rows = _unpack(inp.data, batch_sizes, k)
        steps = x.shape[0]
        last = None
        if reuse and isinstance(out, PackedSequence):
            last = out.data.index_select(0, rows).reshape(steps, k, -1)
        picked = inp.sorted_indices[:k] if inp.sorted_indices is not None else None
        if bool((lengths < steps).any()):
            t = torch.arange(steps).unsqueeze(1)
            real = t < lengths.unsqueeze(0)
            extra = {
                "reverse": _to(torch.where(real, lengths.unsqueeze(0) - 1 - t, t), x.device),
                "valid": _to(real.reshape(-1).nonzero().squeeze(1), x.device),
            }
    elif isinstance(inp, torch.Tensor) and inp.dim() in (2, 3):
        batched = inp.dim() == 3
        x = inp if batched else inp.unsqueeze(1)
        last = out if isinstance(out, torch.Tensor) and reuse else None
        if last is not None and not batched:
            last = last.unsqueeze(1)
        if batched and module.batch_first:
            x = x.transpose(0, 1)
            last = last.transpose(0, 1) if last is not None else None
        k = subset_size(x.shape[1], x.shape[0])
        x = x[:, :k]
        last = last[:, :k] if last is not None else None
        picked = None
        if not batched and hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    else:
        return None
    if not x.is_floating_point() or x.numel() == 0:
        return None
    directions = 2 if module.bidirectional else 1
    h_out = module.proj_size if lstm and module.proj_size > 0 else module.hidden_size
    layers = module.num_layers * directions

    def first(h: torch.Tensor) -> torch.Tensor:  # the initial states of the recomputed sequences
        return (h[:, :k] if picked is None else h.index_select(1, picked)).detach().float()

    if hx is None:
        h0 = x.new_zeros(layers, k, h_out, dtype=torch.float32)
        c0 = x.new_zeros(layers, k, module.hidden_size, dtype=torch.float32) if lstm else None
    elif lstm:
        h0, c0 = first(hx[0]), first(hx[1])
    else:
        h0, c0 = first(hx), None
    last = last.detach().float() if last is not None else None
    return _Batch(x.detach().float(), h0, c0, last, **extra)


def _backwards(t: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """``[T, k, ...]`` read from each sequence's last real element back to its first (padding stays
    at the end). Its own inverse."""
    if batch.reverse is None:
        return t.flip(0)
    index = batch.reverse.reshape(*batch.reverse.shape, *([1] * (t.dim() - 2))).expand_as(t)
    return t.gather(0, index)


def _run(module: nn.Module, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, flat: list[torch.Tensor], bi: bool) -> torch.Tensor:
    """Every hidden state of one layer: ``[T, k, D*H_out]`` (the fused operator, no autograd)."""
    if c0 is not None:
        return _VF.lstm(x, (h0, c0), flat, bool(module.bias), 1, 0.0, False, bi, False)[0]
    return _VF.gru(x, h0, flat, bool(module.bias), 1, 0.0, False, bi, False)[0]


def recompute(
    module: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    output: Any,
    wanted: Collection[tuple[int, int, str]],
    generator: torch.Generator | None = None,
) -> dict[tuple[int, int, str], torch.Tensor]:
    """The gates and states of ``module`` on this forward, for the ``(layer, direction, role)``
    slots in ``wanted``: each an ``[positions, units]`` float32 tensor on the input's device. Its
    rows are the real positions of the recomputed sequences, time-major in the direction's own
    time (the reverse direction from each sequence's last element back to its first).
    ``args``/``kwargs``/``output``: what a forward hook registered ``with_kwargs=True`` receives.
    Empty when the input is not a floating-point tensor or ``PackedSequence``. ``generator``: for
    the inter-layer dropout mask (training with ``dropout > 0``); the global RNG is never used.
    No host sync on an accelerator.
    """
    if not wanted:
        return {}
    inp = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    data = inp.data if isinstance(inp, PackedSequence) else inp
    if not isinstance(data, torch.Tensor):
        return {}
    with torch.no_grad():
        if torch.is_autocast_enabled(data.device.type):
            with torch.autocast(device_type=data.device.type, enabled=False):
                return _recompute(module, inp, hx, output, wanted, generator)
        return _recompute(module, inp, hx, output, wanted, generator)


def _recompute(
    module: nn.Module, inp: Any, hx: Any, output: Any, wanted: Collection[tuple[int, int, str]],
    generator: torch.Generator | None,
) -> dict[tuple[int, int, str], torch.Tensor]:
    lstm = isinstance(module, nn.LSTM)
    dropout = module.training and module.dropout > 0 and module.num_layers > 1
    batch = _subset(module, inp, hx, output, reuse=module.num_layers == 1 or not dropout)
    if batch is None:
        return {}
    x, steps, k = batch.x, batch.x.shape[0], batch.x.shape[1]
    directions = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    h_out = module.proj_size if lstm and module.proj_size > 0 else hidden
    top = max(layer for layer, _, _ in wanted)
    out: dict[tuple[int, int, str], torch.Tensor] = {}
    for layer in range(top + 1):
        weights = [_weights(module, layer, d) for d in range(directions)]
        first = layer * directions
        if layer == module.num_layers - 1 and batch.last is not None:
            hs = batch.last
        elif batch.reverse is None:  # both directions in one call
            flat = [w for ws in weights for w in ws]
            c0 = batch.c0[first : first + directions] if lstm else None
            hs = _run(module, x, batch.h0[first : first + directions], c0, flat, directions == 2)
        else:  # padded sequences: the reverse direction runs on each sequence read backwards
            parts = []
            for d in range(directions):
                c0 = batch.c0[first + d : first + d + 1] if lstm else None
                xd = x if d == 0 else _backwards(x, batch)
                hd = _run(module, xd, batch.h0[first + d : first + d + 1], c0, weights[d], False)
                parts.append(hd if d == 0 else _backwards(hd, batch))
            hs = torch.cat(parts, -1) if directions == 2 else parts[0]
        for d in range(directions):
            roles = {r for (la, di, r) in wanted if la == layer and di == d}
            if not roles:
                continue
            # In the direction's own time, every direction is a forward recurrence.
            xd = x if d == 0 else _backwards(x, batch)
            h_seq = hs[..., d * h_out : (d + 1) * h_out]
            h_seq = h_seq if d == 0 else _backwards(h_seq, batch)
            h0 = batch.h0[first + d]
            h_prev = torch.cat([h0.unsqueeze(0), h_seq[:-1]])
            xs, hp = xd.reshape(steps * k, -1), h_prev.reshape(steps * k, -1)
            if lstm:
                got = _lstm_direction(weights[d], xs, hp, h_seq, batch.c0[first + d], roles, module.bias, steps, k, hidden)  # type: ignore[index]
            else:
                got = _gru_direction(weights[d], xs, hp, h_seq, roles, module.bias, steps, k, hidden)
            for role, t in got.items():
                out[(layer, d, role)] = t if batch.valid is None else t.index_select(0, batch.valid)
        if layer < top:
            x = hs
            if dropout:  # the module's own mask is gone: one from the same distribution
                p = float(module.dropout)
                x = x * torch.empty_like(x).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    return out


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """``x.tanh_()`` as ``2 sigmoid(2x) - 1`` (torch's CPU tanh is ~3x slower per value)."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return x.mul(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _gates(ws: list[torch.Tensor], xs: torch.Tensor, hp: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and hidden parts of the gate pre-activations, ``[positions, G*H]`` each."""
    if bias:
        return torch.addmm(ws[2], xs, ws[0].t()), torch.addmm(ws[3], hp, ws[1].t())
    return xs @ ws[0].t(), hp @ ws[1].t()


def _lstm_direction(
    ws: list[torch.Tensor], xs: torch.Tensor, hp: torch.Tensor, h_seq: torch.Tensor, c0: torch.Tensor,
    roles: set[str], bias: bool, steps: int, k: int, hidden: int,
) -> dict[str, torch.Tensor]:
    # [positions, 4H]: i, f, g, o. The biases broadcast once (an addmm copies its input first).
    pre = torch.addmm(ws[2] + ws[3], xs, ws[0].t()) if bias else xs @ ws[0].t()
    pre.addmm_(hp, ws[1].t())
    h = hidden
    pre[:, 2 * h : 3 * h].mul_(2.0)  # tanh(x) = 2 sigmoid(2x) - 1: one sigmoid over the whole
    pre.sigmoid_()  # contiguous block (torch's CPU tanh is ~3x slower per value than sigmoid)
    pre[:, 2 * h : 3 * h].mul_(2.0).sub_(1.0)
    got = {"input": pre[:, :h], "forget": pre[:, h : 2 * h], "cell_candidate": pre[:, 2 * h : 3 * h], "output": pre[:, 3 * h :]}
    out = {r: got[r] for r in roles if r in got}
    projected = len(ws) == (5 if bias else 3)
    if "cell" in roles or (projected and "hidden" in roles):
        f = pre[:, h : 2 * h].reshape(steps, k, h).contiguous()
        ig = (pre[:, :h] * pre[:, 2 * h : 3 * h]).reshape(steps, k, h)
        cells = torch.empty_like(ig)
        c = c0
        for ig_t, f_t, out_t in zip(ig.unbind(0), f.unbind(0), cells.unbind(0)):
            c = torch.addcmul(ig_t, f_t, c, out=out_t)  # c_t = f_t * c_{t-1} + i_t * g_t: one kernel per step
        cells = cells.reshape(steps * k, h)
        if "cell" in roles:
            out["cell"] = cells
        if projected and "hidden" in roles:
            out["hidden"] = _tanh(cells).mul_(pre[:, 3 * h :])
    if "hidden" in roles and not projected:
        out["hidden"] = h_seq.reshape(steps * k, h)
    return out


def _gru_direction(
    ws: list[torch.Tensor], xs: torch.Tensor, hp: torch.Tensor, h_seq: torch.Tensor, roles: set[str], bias: bool,
    steps: int, k: int, hidden: int,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if roles != {"hidden"}:
        gi, gh = _gates(ws, xs, hp, bias)  # r, z, n
        h = hidden
        rz = gi[:, : 2 * h].add_(gh[:, : 2 * h]).sigmoid_()
        got = {"reset": rz[:, :h], "update": rz[:, h:]}
        if "new" in roles:
            got["new"] = _tanh_(gh[:, 2 * h :].mul_(rz[:, :h]).add_(gi[:, 2 * h :]))
        out = {r: got[r] for r in roles if r in got}
    if "hidden" in roles:
        out["hidden"] = h_seq.reshape(steps * k, hidden)
    return out
