"""Attention heads: the per-head numbers of one attention call, and their host side (pure functions).

For every attention module of the model, on sampled steps only, per head:

- the **entropy** of each query's attention distribution over the keys it may see (nats), and the
  same divided by ``log(visible keys)``: the **normalised entropy**, 0 when a query looks at one key
  only, 1 when it spreads evenly over every key it may see;
- the **first-token mass** (an "attention sink"): the probability on the first key the query may see
  (the first token of the sequence; the first non-padding one under left padding);
- whether the query is **one-hot**: its normalised entropy at most ``Thresholds.attention_entropy``
  (1e-5), counted per head.

Queries that may see only one key (the first query of a causal head, a row masked down to one key)
are left out of every number: their entropy is 0 and their first-token mass 1 by construction. Queries
that may see no key at all are left out too. Padding *keys* are excluded through the masks; padding
*queries* count like any other (the model computes their distributions too).

Only the first :data:`SEQUENCES` sequences of a call are used, and of longer sequences :data:`QUERIES`
evenly strided queries (every key is kept), in float32, on the module's device, with no host sync.
Each call gives a ``[ROWS, heads]`` block of sums (entropy, normalised entropy, first-token mass,
one-hot queries, queries); calls and DDP ranks add up. Where the probabilities come from (the
hooks): :mod:`monitor.attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEQUENCES = 8  # sequences of a call whose attention is measured (the first ones)
QUERIES = 256  # queries per sequence at most (evenly strided); every key is kept
MASKED = -1e4  # an additive mask value at or below this hides its key (exp(-1e4) is 0 in float32)
ROWS = 5  # per head, sums over queries: entropy (nats), normalised entropy, first-token mass, one-hot queries; queries
ONE_HOT = 1e-5  # a query whose normalised entropy is at most this looks at one key (Thresholds.attention_entropy)


# -- the numbers, on the device ----------------------------------------------------------------------


def head_rows(logp: torch.Tensor, visible: torch.Tensor, one_hot: float = ONE_HOT) -> torch.Tensor:
    """``[ROWS, heads]`` sums over sequences and queries of one call: entropy (nats), entropy /
    log(visible keys), mass on the first visible key, queries whose normalised entropy is at most
    ``one_hot``, and the queries counted.

    ``logp``: ``[S, H, Q, K]`` float32 log-probabilities, finite (hidden keys very negative, not
    ``-inf``: see :func:`log_probs`); ``visible``: boolean, broadcastable to ``logp``
    (``[S or 1, H or 1, Q, K]``), the keys each query may see. Queries that see fewer than two keys
    are not counted.

    >>> scores = torch.tensor([[[[0.0, 0.0, 0.0], [0.0, 0.0, -torch.inf], [-torch.inf, 50.0, 0.0]]]])
    >>> vis = torch.tensor([[[[True, False, False], [True, True, False], [True, True, True]]]])
    >>> [round(v, 4) for v in head_rows(log_probs(scores), vis).squeeze(1).tolist()]  # 1st query: one key
    [0.6931, 1.0, 0.5, 1.0, 2.0]
    """
    p = logp.exp()
    n_vis = visible.sum(-1)
    counted = (n_vis >= 2).expand(p.shape[:-1])
    ent = -(p * logp).sum(-1)  # 0 * (very negative) = 0 for hidden keys; several times cheaper than entr
    norm = ent / n_vis.clamp_min(2).to(p.dtype).log()
    first = visible.to(torch.uint8).argmax(-1, keepdim=True).expand(*p.shape[:-1], 1)
    sink = p.gather(-1, first).squeeze(-1)
    zero = p.new_zeros(())
    rows = torch.stack(
        [
            torch.where(counted, ent, zero),
            torch.where(counted, norm, zero),
            torch.where(counted, sink, zero),
            (counted & (norm <= one_hot)).to(p.dtype),
            counted.to(p.dtype),
        ]
    )
    return rows.sum((1, 3))


def log_probs(scores: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dimension, with ``-inf`` scores (hidden keys) first raised to
    ``-1e30``: their probability is still 0, their log-probability finite (NaN stays NaN)."""
    return torch.log_softmax(scores.clamp_min(-1e30), dim=-1)


def _additive(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(additive float32 mask, visible) of a boolean (True: hidden) or additive mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(mask, -math.inf), ~mask
    add = mask.float()
    return add, add > MASKED


def _strided(length: int, queries: int) -> int:
    return max(1, math.ceil(length / queries))


def mha_rows(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    sequences: int = SEQUENCES,
    queries: int = QUERIES,
    one_hot: float = ONE_HOT,
) -> torch.Tensor | None:
    """``[ROWS, heads]`` of one ``nn.MultiheadAttention`` call, recomputed from its inputs and
    parameters as ``F.multi_head_attention_forward`` computes them (before dropout). None when the
    inputs are not plain dense tensors."""
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or query.is_nested or key.is_nested:
        return None
    if not query.is_floating_point() or query.dim() not in (2, 3) or key.dim() != query.dim():
        return None
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    batched = query.dim() == 3
    if not batched:
        q_in, k_in = query.unsqueeze(0), key.unsqueeze(0)
        n = 1
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif mha.batch_first:
        n = query.shape[0]
        q_in, k_in = query[:sequences], key[:sequences]
    else:
        n = query.shape[1]
        q_in, k_in = query[:, :sequences].transpose(0, 1), key[:, :sequences].transpose(0, 1)
    s, length, keys = q_in.shape[0], q_in.shape[1], k_in.shape[1]
    stride = _strided(length, queries)
    q_in = q_in[:, ::stride]
    rows_q = q_in.shape[1]
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e : 2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b = mha.in_proj_bias
    b_q, b_k = (b[:e].float(), b[e : 2 * e].float()) if b is not None else (None, None)
    q = F.linear(q_in.float(), w_q.float(), b_q)
    k = F.linear(k_in.float(), w_k.float(), b_k)
    extra = 0
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.float().expand(s, 1, e)], dim=1)
        extra += 1
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(s, 1, e)], dim=1)
        extra += 1
    total = keys + extra
    q = q.view(s, rows_q, h, d).transpose(1, 2)
    k = k.view(s, total, h, d).transpose(1, 2)
    scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-1, -2))  # [S, H, Q, K]
    add: torch.Tensor | None = None
    vis: torch.Tensor | None = None
    if attn_mask is not None:
        m = attn_mask.view(n, h, length, keys)[:s] if attn_mask.dim() == 3 else attn_mask.reshape(1, 1, length, keys)
        add, vis = _additive(m[:, :, ::stride])
    elif is_causal:
        pos = torch.arange(0, length, stride, device=scores.device)
        hidden = torch.arange(keys, device=scores.device)[None, :] > pos[:, None]
        add, vis = _additive(hidden[None, None])
    if key_padding_mask is not None:
        a2, v2 = _additive(key_padding_mask[:s].reshape(s, 1, 1, keys))
        add = a2 if add is None else add + a2
        vis = v2 if vis is None else vis & v2
    if add is not None and vis is not None:
        if extra:  # the appended keys (bias_k, zero attention) are never masked
            add = F.pad(add, (0, extra))
            vis = F.pad(vis, (0, extra), value=True)
        scores = scores + add
    else:
        vis = torch.ones((1, 1, 1, total), dtype=torch.bool, device=scores.device)
    return head_rows(log_probs(scores), vis, one_hot)


def _mask_visible(mask: Any, shape: torch.Size) -> torch.Tensor | None:
    """The keys a Hugging Face ``attention_mask`` lets each query see, cut to ``shape``
    (``[S, H, Q, K]`` of the measured probabilities); None when it does not fit."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    s, h, q, k = shape
    if not (mask.shape[0] == 1 or mask.shape[0] >= s) or mask.shape[1] not in (1, h):
        return None
    if mask.shape[2] not in (1, q) or mask.shape[3] < k:
        return None
    mask = mask[:s, :, :, :k]
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    return mask > MASKED  # transformers' masks hold the dtype's minimum


def sdpa_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    sequences: int = SEQUENCES,
    queries: int = QUERIES,
    one_hot: float = ONE_HOT,
) -> torch.Tensor | None:
    """``[ROWS, heads]`` of one ``F.scaled_dot_product_attention(query, key, value, attn_mask,
    is_causal=..., scale=...)`` call with ``[B, H, L, E]`` inputs, its probabilities recomputed as
    SDPA defines them: ``softmax(q k^T * scale + mask)``, a boolean ``attn_mask`` marking the keys
    that take part, ``is_causal`` the top-left causal mask, fewer key heads repeated (GQA). None for
    other shapes."""
    if query.dim() != 4 or key.dim() != 4 or query.is_nested or key.is_nested or not query.is_floating_point():
        return None
    length, keys = query.shape[2], key.shape[2]
    stride = _strided(length, queries)
    q = query[:sequences, :, ::stride].float()
    k = key[:sequences].float()
    if k.shape[1] != q.shape[1]:
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            return None
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # [S, H, Q, K]
    s, h = q.shape[0], q.shape[1]
    vis = torch.ones((1, 1, 1, keys), dtype=torch.bool, device=scores.device)
    if is_causal:
        pos = torch.arange(0, length, stride, device=scores.device)
        vis = (torch.arange(keys, device=scores.device)[None, :] <= pos[:, None])[None, None]
        scores = scores.masked_fill(~vis, -math.inf)
    if isinstance(attn_mask, torch.Tensor):
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask.dim() < 4 else attn_mask
        if m.dim() != 4 or m.shape[-1] != keys or m.shape[1] not in (1, h) or m.shape[2] not in (1, length):
            return None
        m = m[:s] if m.shape[0] > 1 else m
        m = m[:, :, ::stride] if m.shape[2] > 1 else m
        if m.dtype == torch.bool:
            vis = vis & m
            scores = scores.masked_fill(~m, -math.inf)
        else:
            add = m.float()
            vis = vis & (add > MASKED)
            scores = scores + add
    return head_rows(log_probs(scores), vis, one_hot)


def hf_rows(
    scores: torch.Tensor,
    mask: Any = None,
    sequences: int = SEQUENCES,
    queries: int = QUERIES,
    one_hot: float = ONE_HOT,
) -> torch.Tensor:
    """``[ROWS, heads]`` of one eager softmax of a Hugging Face attention module: ``scores`` its
    input (``[B, H, Tq, Tk]``), ``mask`` the module's ``attention_mask``. The probabilities are
    that softmax's, recomputed in float32 for the measured queries (the module's own output may be
    float16)."""
    stride = _strided(scores.shape[2], queries)
    x = scores[:sequences, :, ::stride]
    logp = log_probs(x.float())
    vis = x > torch.finfo(x.dtype).min / 2 if x.is_floating_point() else torch.ones_like(x, dtype=torch.bool)
    if mask is not None:
        mask = mask[:, :, ::stride] if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[2] > 1 else mask
        mv = _mask_visible(mask, logp.shape)
        if mv is not None:
            vis = vis & mv
    return head_rows(logp, vis, one_hot)


# -- one sampled step ------------------------------------------------------------------------------


@dataclass
class AttentionPartials:
    """One sampled step's attention sums, on the device: per module (in the order they first ran)
    a ``[ROWS, heads]`` tensor, flattened into the step's one tensor by :func:`monitor.pack.pack`."""

    names: list[str] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [r.reshape(-1) for r in self.rows]

    def __len__(self) -> int:
        return ROWS * sum(self.heads)


@dataclass
class AttentionNumbers:
    """One attention module on one sampled step, on the host: per head the mean entropy (nats),
    mean normalised entropy, mean first-token mass, the share of one-hot queries (NaN for a head
    with no counted query), and the queries behind the means."""

    name: str
    entropy: np.ndarray
    normalized: np.ndarray
    sink: np.ndarray
    one_hot: np.ndarray
    queries: np.ndarray

    @property
    def heads(self) -> int:
        return int(self.entropy.shape[0])


def attention_numbers(partials: AttentionPartials | None, values: np.ndarray) -> list[AttentionNumbers]:
    """The host side of :class:`AttentionPartials`: ``values`` is their slice of the flat vector."""
    out: list[AttentionNumbers] = []
    if partials is None:
        return out
    offset = 0
    for name, h in zip(partials.names, partials.heads):
        block = np.asarray(values[offset : offset + ROWS * h], dtype=np.float64).reshape(ROWS, h)
        offset += ROWS * h
        count = block[4]
        with np.errstate(all="ignore"):
            means = np.where(count > 0, block[:4] / np.where(count > 0, count, 1.0), np.nan)
        out.append(AttentionNumbers(name, means[0], means[1], means[2], means[3], count))
    return out
