"""Pure functions on probe matrices (``[samples, units]``, one row per probe sample).

- :func:`linear_cka` / :func:`drift`: how much a layer's representation of the same inputs moved
  between two probe runs (Kornblith et al. 2019, "Similarity of Neural Network Representations
  Revisited": linear CKA; drift = 1 - CKA). :func:`drift_on_device` is the same number computed
  by torch where the matrices are (the probe's training-thread half, no host sync): BLAS on the
  monitor's low-priority writer thread would run on OpenBLAS's own worker threads, at normal
  priority, beside training.
- :func:`top_k`: the probe samples that excite a unit most.
- :func:`favourites`: each unit's most exciting sample (its "favourite input").
- :func:`row_order`: the samples grouped by label, for the heatmap rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

NO_FAVOURITE = -1  # a unit that is the same on every sample (a dead ReLU) has no favourite input


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two representations of the same ``n`` samples (``[n, p]`` and ``[n, q]``).

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with columns centred: 1 for the same
    representation up to a rotation and a uniform scale, near 0 for unrelated ones. NaN when a
    value is not finite or a representation is constant (no variance over the samples).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected the same number of samples, got {x.shape[0]} and {y.shape[0]}.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n <= min(p, q):  # the n x n Gram matrices are the smaller ones
        kx, ky = x @ x.T, y @ y.T
        cross = float((kx * ky).sum())
    else:
        kx, ky = x.T @ x, y.T @ y
        cross = float(np.square(y.T @ x).sum())
    nx, ny = float(np.sqrt((kx * kx).sum())), float(np.sqrt((ky * ky).sum()))
    if nx == 0.0 or ny == 0.0:
        return float("nan")
    return cross / (nx * ny)


def drift(previous: np.ndarray, current: np.ndarray) -> float:
    """``1 - linear_cka(previous, current)``: 0 when the representation of the probe did not move
    (up to rotation and scale), towards 1 when it changed completely.

    A representation constant over the samples both times (a dead layer) did not move: 0. Constant
    only once: 1. NaN/Inf values: NaN. Different unit counts are compared as they are (CKA allows it).
    """
    prev = np.asarray(previous, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if not (np.isfinite(prev).all() and np.isfinite(cur).all()):
        return float("nan")
    flat_prev = not np.ptp(prev, axis=0).any() if prev.size else True
    flat_cur = not np.ptp(cur, axis=0).any() if cur.size else True
    if flat_prev or flat_cur:
        return 0.0 if flat_prev and flat_cur else 1.0
    return float(min(max(1.0 - linear_cka(prev, cur), 0.0), 1.0))


def drift_on_device(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """:func:`drift` in torch, on the matrices' device, as a 0-d float64 tensor (nothing read back).

    The products run in float64 on CUDA (exact, and immune to TF32 matmuls), in float32 elsewhere
    (twice as fast on a CPU; the sums are float64: within ~1e-6 of :func:`drift`)."""
    dtype = torch.float64 if previous.is_cuda else torch.float32
    x, y = previous.to(dtype), current.to(dtype)
    finite = torch.isfinite(x).all() & torch.isfinite(y).all()
    x, y = torch.nan_to_num(x, 0.0, 0.0, 0.0), torch.nan_to_num(y, 0.0, 0.0, 0.0)
    flat_x = (x.amax(0) - x.amin(0)).amax() == 0 if x.numel() else torch.tensor(True, device=x.device)
    flat_y = (y.amax(0) - y.amin(0)).amax() == 0 if y.numel() else torch.tensor(True, device=y.device)
    x, y = x - x.mean(0), y - y.mean(0)
    if x.numel() and y.numel():  # CKA ignores each matrix's scale: at most 1 here, so no product overflows
        sx, sy = x.abs().amax(), y.abs().amax()
        x, y = x / torch.where(sx > 0, sx, 1.0), y / torch.where(sy > 0, sy, 1.0)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n <= min(p, q):
        kx, ky = (x @ x.T).double(), (y @ y.T).double()
        cross = (kx * ky).sum()
    else:
        kx, ky = (x.T @ x).double(), (y.T @ y).double()
        cross = (y.T @ x).double().square().sum()
    cka = cross / (torch.linalg.vector_norm(kx) * torch.linalg.vector_norm(ky))
    d = (1.0 - cka).clamp(0.0, 1.0)
    d = torch.where(flat_x | flat_y, (~(flat_x & flat_y)).double(), d)
    return torch.where(finite, d, torch.full_like(d, float("nan")))


def top_k(matrix: np.ndarray, unit: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` samples with the largest value of ``unit`` (ties: the lower sample index first),
    as ``(sample indices, values)``, largest first. NaN counts as smallest."""
    m = np.asarray(matrix)
    col = np.asarray(m[:, unit], dtype=np.float64)
    key = np.where(np.isnan(col), -np.inf, col)
    order = np.argsort(-key, kind="stable")[: max(int(k), 0)]
    return order, col[order]


def favourites(matrix: np.ndarray) -> np.ndarray:
    """Per unit, the sample with its largest value (the first on ties), or :data:`NO_FAVOURITE`
    when the unit has the same value on every sample (or is not finite anywhere)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0:
        return np.full(m.shape[-1] if m.ndim else 0, NO_FAVOURITE, dtype=np.int64)
    key = np.where(np.isnan(m), -np.inf, m)
    fav = key.argmax(axis=0).astype(np.int64)
    finite = np.isfinite(m)
    lo = np.where(finite, m, np.inf).min(axis=0)
    hi = np.where(finite, m, -np.inf).max(axis=0)
    fav[~(hi > lo)] = NO_FAVOURITE
    return fav


def row_order(labels: Sequence[object] | None, n: int) -> np.ndarray:
    """Sample indices grouped by label (labels in sorted order, samples in their order within a
    label); ``arange(n)`` without labels. Mixed label types sort by their text."""
    if labels is None:
        return np.arange(n)
    keys = list(labels)
    try:
        uniq = sorted(set(keys))  # type: ignore[type-var]
    except TypeError:
        uniq = sorted(set(keys), key=str)
    rank = {u: i for i, u in enumerate(uniq)}
    return np.argsort(np.array([rank[v] for v in keys], dtype=np.int64), kind="stable")
