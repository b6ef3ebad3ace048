"""Numbers and alert episodes as text: shared by the terminal, HTML and comparison outputs."""

from __future__ import annotations

import math

from monitor.report.config import items_text
from monitor.report.summary import Episode, RunReport


def num(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    a = abs(x)
    return f"{x:.3g}" if 1e-3 <= a < 1e5 else f"{x:.2e}"


def pct(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0%"
    if x < 0.005:
        return "<1%"
    if x < 1 and x > 0.995:
        return ">99%"
    return f"{100 * x:.0f}%"


def episodes_text(eps: list[Episode]) -> str:
    return ", ".join(
        f"{e.kind}@{e.step}" + (f"-{e.recovered_step}" if e.recovered_step is not None else "") for e in eps
    )


def run_label(rep: RunReport) -> str:
    """The run directory, and the configuration keys that tell it from the other runs of its group."""
    if rep.config and rep.config_differs:
        return f"{rep.run} [{items_text(rep.config, rep.config_differs)}]"
    return rep.run


def run_summary(rep: RunReport) -> str:
    s = rep.sampled_steps
    span = f"steps {s[0]}..{s[-1]} ({len(s)} sampled)" if s else "no sampled steps"
    by_kind = rep.alerts_by_kind()
    if by_kind:
        parts = []
        for kind, c in by_kind.items():
            parts.append(f"{kind} {c['fired']}" + (f" ({c['active']} active)" if c["active"] else ""))
        alerts = "alerts: " + ", ".join(parts)
    else:
        alerts = "no alerts"
    return f"{span}, {alerts}"


def run_line(rep: RunReport) -> str:
    return f"{run_label(rep)}: {run_summary(rep)}"
