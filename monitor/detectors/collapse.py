"""``collapse``: a stack block whose tokens have become alike (representation / rank collapse)."""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.activations import Kind
from monitor.detectors.base import Detector, LayerView, Verdict, level
from monitor.tokens import TOKEN_ROWS, block_update, token_similarity


class Collapse(Detector):
    """A stack block's output whose tokens are alike within each sequence: the mean pairwise
    cosine similarity of a sequence's tokens (centred by the mean token of their forward call, see
    :mod:`monitor.tokens`) at or above ``collapse_similarity``. Judged on every sampled step with
    a call of at least two sequences of ``[batch, tokens, width]``; also reports ``block_update``,
    ``||output - input|| / ||input||`` of the block (a number, not a verdict)."""

    name = "collapse"
    fields = ("token_similarity", "block_update")
    reads = TOKEN_ROWS
    causes = (
        "the tokens of a sequence have become one vector (rank collapse): typical of attention "
        "without residual connections or with a residual branch scaled to ~0, or of a too-high "
        "learning rate; try checking the residual connections, pre-LN, a lower LR"
    )

    def applies(self, kind: Kind) -> bool:
        return kind.name == "block"

    def evaluate(self, layer: LayerView, memory: dict[str, Any]) -> Verdict:
        s, th = layer.summary, layer.thresholds
        seqs = s.token_seqs
        sim = token_similarity(s.token_sim, seqs) if s.token_sim is not None and seqs is not None else None
        upd = block_update(s.update_sq, s.input_sq) if s.update_sq is not None and s.input_sq is not None else None
        metrics = {"token_similarity": sim, "block_update": upd}
        limit = th.collapse_similarity
        if sim is None:
            return Verdict(None, float("nan"), limit, "collapse: not judged", metrics)
        bad, band = level(sim, limit, th.release, True)
        what = lambda: (  # noqa: E731 - built only when an alert needs it
            f"collapse: the tokens of a sequence have a mean cosine similarity of {sim:.3f} "
            f"(threshold {limit:g}; over {int(np.sum(seqs))} sequences)"
        )
        return Verdict(bad, sim, limit, what, metrics, band)
