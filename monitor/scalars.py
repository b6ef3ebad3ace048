"""The scalar names and values of one sample record: what TensorBoard and every logger receive.

``activation_<number>/<layer>`` for each number of :meth:`LayerHealth.scalars()
<monitor.health.LayerHealth.scalars>` (its ``grad_<x>`` numbers as ``gradient_<x>/<layer>``),
``gradient_norm/<parameter>`` and ``gradient_norm/(total)``, ``update_ratio/<parameter>``, and
``attention_<number>/<module>``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitor.records import SampleRecord

TAG_PREFIX = "activation_"  # every number of LayerHealth.scalars() is activation_<name>/<layer>
_GRAD = "grad_"  # LayerHealth numbers grad_<x> are written as gradient_<x>/<layer>


def scalar_values(record: SampleRecord) -> dict[str, float]:
    """``{tag: value}`` for one record (the same names every logger receives)."""
    out: dict[str, float] = {}
    for layer in record.layers:
        for metric, v in layer.health.scalars().items():
            if metric.startswith(_GRAD):
                out[f"gradient_{metric[len(_GRAD):]}/{layer.name}"] = v
            else:
                out[f"{TAG_PREFIX}{metric}/{layer.name}"] = v
    norms = []
    for p in record.parameters:
        if p.grad_norm is not None:
            out[f"gradient_norm/{p.name}"] = p.grad_norm
            norms.append(p.grad_norm)
        if p.update_ratio is not None:
            out[f"update_ratio/{p.name}"] = p.update_ratio
    if norms:
        out["gradient_norm/(total)"] = math.sqrt(math.fsum(v * v for v in norms))  # NaN/Inf propagate
    for a in record.attention:
        for metric, v in a.scalars().items():
            out[f"attention_{metric}/{a.name}"] = v
    return out
