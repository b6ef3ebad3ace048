"""Sequence statistics of a stack block's output: how alike its tokens are, how much it changed them.

Two signals of a transformer block that per-unit statistics cannot show (seed 003's "层塌陷"):

- **token similarity**: the mean pairwise cosine similarity of the token vectors of one sequence,
  averaged over the sequences of the step. Tokens are first centred by the mean token of the
  whole call (every sequence, every position), so a direction that all tokens share (the
  anisotropy of trained language models) does not count as collapse; a sequence whose tokens
  became one vector does. Near 0 for a healthy block; 1 when the tokens of each sequence are
  identical (rank collapse: Dong et al. 2021, "Attention is not all you need: pure attention
  loses rank doubly exponentially with depth").
- **block update**: ``||output - input|| / ||input||`` over the step, how much the block changes
  the residual stream it was given (only when its input is a tensor of the output's shape).

Both fit the per-unit rows of :mod:`monitor.stats`, so they travel in the step's one transfer,
combine across calls and DDP ranks by summing, and cost O(tokens x width):

- ``token_sim[k]`` = sum over sequences of ``(T * (mean_t u[t, k])**2 - 1 / width) / (T - 1)``
  with ``u`` the centred, normalised tokens and ``T`` the sequence's length: summed over ``k``,
  ``|mean_t u_t|**2 = (1 + (T - 1) c) / T`` makes it ``c``, the sequence's mean pairwise cosine.
  So the row sums to the similarities of the sequences themselves, whatever their lengths: calls
  of different lengths in one step (gradient accumulation) add up exactly;
- ``update_sq[k]`` = sum of ``(output - input)**2``, ``input_sq[k]`` = sum of ``input**2``;
- ``token_seqs[0]`` = the sequences that added to ``token_sim`` (the rest of the row is 0): counted
  on the device, since with an attention mask a sequence of fewer than two real tokens adds nothing.

A call of one sequence (or of one token) adds nothing and counts no sequence: centring by its own
mean token would remove the sequence's mean and make a collapsed sequence look like noise (batch
size 1 with gradient accumulation). A step without a call of at least two sequences is not judged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TOKEN_SIM, UPDATE_SQ, INPUT_SQ, TOKEN_SEQS = "token_sim", "update_sq", "input_sq", "token_seqs"
TOKEN_ROWS = (TOKEN_SIM, UPDATE_SQ, INPUT_SQ, TOKEN_SEQS)


def token_rows(
    x: torch.Tensor, inp: torch.Tensor | None, token_dim: int, mask: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], int]:
    """The TOKEN_ROWS of a ``[batch, tokens, width]`` output (``token_dim`` 1; 0 for
    ``[tokens, batch, width]``) and the number of sequences in it. ``inp``: the block's input
    (used when it has the output's shape). ``mask``: a ``[batch, tokens]`` attention mask (1: a
    real token, 0: padding; used when its shape fits): padding tokens are left out of the mean
    token and of every sequence (a model without position embeddings makes its padding tokens
    nearly identical, which read as collapse); a sequence with fewer than two real tokens adds
    nothing and is not counted. On x's device, float32, no host sync.

    >>> x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # each sequence: one vector twice
    >>> rows, n = token_rows(x, None, 1)
    >>> round(token_similarity(rows[0].numpy(), rows[3].numpy()), 6)
    1.0
    """
    shape = x.shape
    if x.dtype != torch.float32:
        x = x.float()
    if token_dim == 0:
        x = x.transpose(0, 1)
    sequences, tokens, width = x.shape
    seqs = torch.zeros(width, dtype=torch.float32, device=x.device)
    if sequences < 2 or tokens < 2:  # centring would remove the one sequence's own mean
        sim, sequences = torch.zeros(width, dtype=torch.float32, device=x.device), 0
    elif isinstance(mask, torch.Tensor) and mask.shape == (sequences, tokens) and mask.device == x.device:
        w = (mask != 0).to(torch.float32)
        real = w.sum(1, keepdim=True)  # [sequences, 1]: each sequence's real tokens
        mean = (x * w.unsqueeze(-1)).sum((0, 1)) / w.sum().clamp_min(1.0)
        c = (x - mean) * w.unsqueeze(-1)  # padding: zero vectors, then zero after normalising
        u = _unit(c, w.unsqueeze(-1) != 0)
        m = u.sum(1) / real.clamp_min(1.0)
        per = (m.square_() * real - 1.0 / width) / (real - 1.0).clamp_min(1.0)
        sim = torch.where(real >= 2, per, 0.0).sum(0)
        seqs[0] = (real >= 2).sum()
    else:
        c = x - x.mean((0, 1))
        u = _unit(c, None)
        sim = u.mean(1).square_().sum(0).mul_(tokens).sub_(sequences / width).div_(tokens - 1)
        seqs[0] = sequences
    if isinstance(inp, torch.Tensor) and inp.shape == shape and inp.is_floating_point():
        i = inp.detach()
        if i.dtype != torch.float32:
            i = i.float()
        if token_dim == 0:
            i = i.transpose(0, 1)
        upd = (x - i).square_().sum((0, 1))
        base = i.square().sum((0, 1))
    else:
        upd = base = torch.zeros_like(sim)
    return [sim, upd, base, seqs], sequences


def _unit(c: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Centred tokens ``[sequences, tokens, width]`` normalised to unit length. A token equal to the
    call's mean token (its centred norm 0, or below 1e-6 of the largest: float rounding) becomes the
    first basis vector, one and the same for all of them: tokens that are all the mean token are
    identical (a block whose every token is one vector, e.g. all zero, reads 1, not -1/(T-1)).
    ``real``: where tokens are real (padding stays a zero vector, left out by the caller)."""
    norm = torch.linalg.vector_norm(c, dim=-1, keepdim=True)
    at_mean = norm <= norm.amax() * 1e-6
    if real is not None:
        at_mean &= real
    u = c / norm.clamp_min(1e-30)
    e0 = torch.zeros(c.shape[-1], dtype=c.dtype, device=c.device)
    e0[0] = 1.0
    return torch.where(at_mean, e0, u)


def token_similarity(token_sim: np.ndarray, token_seqs: np.ndarray) -> float | None:
    """Mean pairwise cosine similarity of a sequence's (centred) tokens, from the summed rows.

    None when no call of at least two sequences was seen, or the row is not finite."""
    sequences = float(np.sum(token_seqs, dtype=np.float64))
    if not sequences >= 1:
        return None
    total = float(np.sum(token_sim, dtype=np.float64))
    if not math.isfinite(total):
        return None
    return total / sequences


def block_update(update_sq: np.ndarray, input_sq: np.ndarray) -> float | None:
    """``||output - input|| / ||input||`` over the step (None without a usable input)."""
    num = float(np.sum(update_sq, dtype=np.float64))
    den = float(np.sum(input_sq, dtype=np.float64))
    if not (den > 0 and math.isfinite(den) and math.isfinite(num)):
        return None
    return math.sqrt(num / den)
