"""``attention_entropy`` and ``attention_sink``: attention heads that look at one token only.

Both judge an attention module (not a watched layer) on every sampled step where its heads were
measured (:mod:`monitor.attention`), per head, and alert for the module naming its heads:

- ``attention_entropy``: a head at least ``attention_collapsed`` of whose queries are one-hot
  (normalised entropy, entropy / log(visible keys), at most ``attention_entropy``) on
  ``attention_samples`` consecutive sampled steps (and that is not a sink): its softmax has become
  one-hot, the entropy collapse of Zhai et al. 2023 ("Stabilizing Transformer
  Training by Preventing Attention Entropy Collapse") that accompanies unstable training;
- ``attention_sink``: a head whose mean attention mass on the first token is at least
  ``attention_sink`` on ``attention_samples`` consecutive sampled steps: it attends to nothing but
  the first token (an "attention sink", Xiao et al. 2023), i.e. it does nothing.

They are :class:`~monitor.detectors.base.Detector` subclasses that apply to no watched layer; the
judge calls :meth:`evaluate_attention` instead of ``evaluate``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from monitor.activations import Kind
from monitor.detectors.base import Detector, LayerView, Verdict
from monitor.thresholds import Thresholds


def _heads(idx: list[int], of: int) -> str:
    shown = ", ".join(str(i) for i in idx[:8]) + (f" (+{len(idx) - 8})" if len(idx) > 8 else "")
    return f"{'head' if len(idx) == 1 else 'heads'} {shown} of {of}"


def _its(idx: list[int]) -> str:
    return "its" if len(idx) == 1 else "their"


def _values(v: np.ndarray, idx: list[int], fmt: str) -> str:
    return ", ".join(format(float(v[i]), fmt) for i in idx[:8])


def _streaks(memory: dict[str, Any], flags: np.ndarray) -> list[int]:
    """Consecutive sampled steps each head has been flagged (kept in the detector's memory)."""
    old = memory.get("streak")
    if not isinstance(old, list) or len(old) != flags.shape[0]:
        old = [0] * flags.shape[0]
    streak = [s + 1 if f else 0 for s, f in zip(old, flags.tolist())]
    memory["streak"] = streak
    return streak


def _unjudged(what: str, values: np.ndarray, queries: np.ndarray, threshold: float, memory: dict[str, Any]) -> Verdict | None:
    """No verdict when no query was measured, or when a measured head's ``values`` are NaN/Inf
    (which also resets the streaks: never healthy, never counted towards an alert)."""
    if not np.any(queries > 0):
        return Verdict(None, math.nan, threshold, f"{what}: not measured")
    if not np.all(np.isfinite(values[queries > 0])):
        _streaks(memory, np.zeros(values.shape[0], dtype=bool))
        return Verdict(None, math.nan, threshold, f"{what}: NaN/Inf attention scores", band=True)
    return None


class _AttentionDetector(Detector):
    def applies(self, kind: Kind) -> bool:
        return False  # attention modules are judged through evaluate_attention, never as a watched layer

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:  # pragma: no cover - never called
        return Verdict(None)

    def evaluate_attention(self, heads: Any, thresholds: Thresholds, memory: dict[str, Any]) -> Verdict:
        """``heads``: a module's :class:`~monitor.headstats.AttentionNumbers` on one sampled step."""
        raise NotImplementedError


class AttentionEntropy(_AttentionDetector):
    """A head whose attention has collapsed onto one key per query: at least ``attention_collapsed``
    of its queries one-hot (normalised entropy at most ``attention_entropy``) on ``attention_samples``
    consecutive sampled steps (a head whose one key is the first token is reported by
    ``attention_sink`` instead). Judged on the share of one-hot queries rather than the mean
    entropy: one query with two tied keys (entropy log 2) would lift the mean of a one-hot head.
    Clear again once every head is below ``release * attention_collapsed``."""

    name = "attention_entropy"
    causes = (
        "attention logits grown so large that the softmax is one-hot (entropy collapse), typically with a "
        "learning rate too high or no warm-up, or query/key weights that grew large; try a lower LR or warm-up, "
        "LayerNorm on queries and keys (QK-norm), weight decay on the query/key projections, or logit soft-capping"
    )

    def evaluate_attention(self, heads: Any, thresholds: Thresholds, memory: dict[str, Any]) -> Verdict:
        share = thresholds.attention_collapsed
        v = np.asarray(heads.one_hot, dtype=np.float64)
        ent = np.asarray(heads.normalized, dtype=np.float64)
        q = np.asarray(heads.queries)
        unjudged = _unjudged("attention entropy", ent, q, share, memory)
        if unjudged is not None:
            return unjudged
        sinks = np.nan_to_num(np.asarray(heads.sink, dtype=np.float64)) >= thresholds.attention_sink
        high = (np.nan_to_num(v) >= share) & ~sinks  # one-hot on the first token: a sink
        streak = _streaks(memory, high)
        k = thresholds.attention_samples
        bad = [i for i, s in enumerate(streak) if s >= k]
        top = float(np.nanmax(v))
        n = v.shape[0]
        eps = thresholds.attention_entropy
        if bad:
            over = "the last sampled step" if k == 1 else f"{k} consecutive sampled steps"

            def what() -> str:
                shares = ", ".join(f"{100 * float(v[i]):.0f}%" for i in bad[:8])
                return (
                    f"attention entropy: {_heads(bad, n)} collapsed: {shares} of {_its(bad)} queries look at one key "
                    f"(normalised entropy <= {eps:g}; threshold {100 * share:g}% of {int(np.max(q))} queries; mean "
                    f"normalised entropy {_values(ent, bad, '.2g')}) on {over}"
                )

            return Verdict(True, float(max(v[i] for i in bad)), share, what)
        clear = top < thresholds.release * share
        i = int(np.nanargmax(v))
        what_now = (
            f"attention entropy: largest share of one-hot queries {100 * top:.0f}% (head {i} of {n}), "
            f"threshold {100 * share:g}%"
        )
        return Verdict(False if clear else None, top, share, what_now, band=not clear)


class AttentionSink(_AttentionDetector):
    """A head that puts nearly all its attention on the first token: mean first-token mass at least
    ``attention_sink`` on ``attention_samples`` consecutive sampled steps. Clear again once every head
    is below ``release * attention_sink``."""

    name = "attention_sink"
    causes = (
        "a head that attends to nothing but the first token passes nothing on (an attention sink); a few such "
        "heads are normal in a pretrained language model, many or new ones while training from scratch point to "
        "a too-high learning rate, a first token (BOS/CLS, position 0) whose embedding grew large, or a mask that "
        "hides the other keys; try a lower LR or warm-up, checking the first token's embedding and the attention "
        "mask, or raising Thresholds(attention_sink=...) for a pretrained model's known sink heads"
    )

    def evaluate_attention(self, heads: Any, thresholds: Thresholds, memory: dict[str, Any]) -> Verdict:
        th = thresholds.attention_sink
        v = np.asarray(heads.sink, dtype=np.float64)
        q = np.asarray(heads.queries)
        unjudged = _unjudged("attention sink", v, q, th, memory)
        if unjudged is not None:
            return unjudged
        high = np.where(np.isfinite(v), v, -np.inf) >= th
        streak = _streaks(memory, high)
        k = thresholds.attention_samples
        bad = [i for i, s in enumerate(streak) if s >= k]
        highest = float(np.nanmax(v))
        n = v.shape[0]
        if bad:
            over = "the last sampled step" if k == 1 else f"{k} consecutive sampled steps"

            def what() -> str:
                shares = ", ".join(f"{100 * float(v[i]):.1f}%" for i in bad[:8])
                return (
                    f"attention sink: {_heads(bad, n)} put {shares} of {_its(bad)} attention on the first token "
                    f"(threshold {100 * th:g}%) on {over}, {int(np.max(q))} queries"
                )

            return Verdict(True, float(max(v[i] for i in bad)), th, what)
        clear = highest < thresholds.release * th
        i = int(np.nanargmax(v))
        what_now = f"attention sink: largest first-token mass {100 * highest:.1f}% (head {i} of {n}), threshold {100 * th:g}%"
        return Verdict(False if clear else None, highest, th, what_now, band=not clear)
