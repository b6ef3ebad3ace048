"""What one probe run shows in TensorBoard: per layer a heatmap and a table of its units.

Tags (written by :meth:`monitor.tensorboard.TensorBoardSink.write_probe`, on the writer thread):

==============================  ===============================================================
``activation_probe/<layer>``    image: probe samples (rows, grouped by label) x units (columns,
                                unit 0 on the left in every image of the run); colour:
                                |activation| / the image's largest: a dead unit is a dark column
``probe_drift/<layer>``         scalar: 1 - linear CKA against the previous probe run
``probe_units/<layer>``         text: the most and least active units, their favourite inputs
``probe_loss``                  scalar: the loss on the probe (targets and a loss function given)
``probe_importance``            text: each layer ablated in turn (``Monitor.layer_importance``)
==============================  ===============================================================
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.probe import ProbeResult
from monitor.render import Picture, render_probe

IMAGE_TAG = "activation_probe"
DRIFT_TAG = "probe_drift"
UNITS_TAG = "probe_units"
LOSS_TAG = "probe_loss"
IMPORTANCE_TAG = "probe_importance"


def _label(result: ProbeResult, sample: int) -> str:
    return f"#{sample}" if result.labels is None else f"#{sample} ({result.labels[sample]})"


def probe_picture(result: ProbeResult, layer: str) -> Picture:
    """The heatmap of ``layer``: rows grouped by label, units in their own order."""
    order = result.order()
    labels = None if result.labels is None else [str(result.labels[i]) for i in order]
    return render_probe(layer, result.activations[layer][order], result.step, labels)


def unit_table(result: ProbeResult, layer: str, k: int = 5, top: int = 3) -> str:
    """Markdown: the ``k`` most and ``k`` least active units of ``layer`` (mean |activation| over
    the probe), each with its ``top`` favourite samples and how often its favourite changed."""
    m = result.activations[layer]
    activity = np.abs(m).mean(axis=0)  # shown as it is: inf for a unit that saw Inf, nan for NaN
    order = np.argsort(-np.where(np.isnan(activity), np.inf, activity), kind="stable")  # NaN ranks with Inf, first
    units = order.tolist() if order.size <= 2 * k else [*order[:k].tolist(), None, *order[-k:].tolist()]
    changes = result.favourite_changes.get(layer)
    changed = result.changed.get(layer)
    head = f"step {result.step}: {m.shape[0]} probe samples, {m.shape[1]} units"
    if changed is not None:
        head += f"; favourite input changed since the last probe run: {len(changed)} units"
        if 0 < len(changed) <= 10:
            head += f" ({', '.join(map(str, changed.tolist()))})"
    if layer in result.drift:
        head += f"; drift {result.drift[layer]:.3g}"
    rows = ["| unit | mean abs | favourite inputs: value | favourite changed (times) |", "|---|---|---|---|"]
    for u in units:
        if u is None:
            rows.append("| ... | | | |")
            continue
        favs = ", ".join(f"{_label(result, t.sample)}: {t.value:.3g}" for t in result.top(layer, u, top))
        silent = not np.ptp(m[:, u]) if m.shape[0] else True
        count: Any = "-" if changes is None else int(changes[u])
        rows.append(f"| {u} | {activity[u]:.3g} | {'(same on every sample)' if silent else favs} | {count} |")
    return head + "\n\n" + "\n".join(rows)
