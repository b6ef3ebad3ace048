"""``--json``: the report as one JSON document.

::

    {
      "version": 1,
      "runs": [
        {
          "run": "runs/exp/version_0",            # the run directory (as found under the argument)
          "files": ["runs/exp/version_0/events.out.tfevents....activation-monitor"],
          "first_step": 0, "last_step": 290,     # null when no step was sampled
          "sampled_steps": 30,
          "alerts_by_kind": {"dead": {"fired": 1, "active": 1}, ...},
          "layers": [                            # forward order
            {
              "name": "relu2",
              "kind": "relu",                    # see monitor.report.summary
              "units": 256,                      # or null
              "dead_fraction": {"first": 0.0, "worst": 0.75, "worst_step": 20, "last": 0.75} | null,
              "saturated_fraction": {...} | null,
              "rms": {"first": 0.41, "last": 75.9, "min": 0.4, "max": 80.1,
                      "trend": [... up to 20 floats: the mean of each of up to 20 equal slices of the run ...]},
              "grad_rms": {"first": ..., "last": ..., "min": ..., "max": ..., "trend": [...]} | null,
              "alerts": [{"kind": "dead", "step": 10, "recovered_step": null}, ...]
            }, ...
          ],
          "other_alerts": [{"subject": "(parameters)", "kind": ..., "step": ..., "recovered_step": ...}],
          "alerts": [{"step": 10, "layer": "relu2", "kind": "dead", "recovered": false,
                      "message": "step 10 | relu2 | dead: ..."}, ...],   # in logged order
          "active_alerts": [{"layer": "relu2", "kind": "dead", "step": 10}, ...],
          "notes": ["...: the last record is incomplete ..."]
        }
      ],
      "fail_on": ["dead"] | null,
      "failed": [{"run": ..., "layer": ..., "kind": ..., "step": ...}],   # active alerts of those kinds
      "notes": [...]                              # every note of every run
    }

Non-finite numbers (an exploding layer's RMS) are the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"``, so the document is strict JSON.
"""

from __future__ import annotations

import math
from typing import Any

from monitor.report.summary import Episode, RunReport, Series, trend

TREND_POINTS = 20  # points of the JSON "trend" arrays


def _jf(x: float | None) -> float | str | None:
    if x is None:
        return None
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def report_json(
    reports: list[RunReport], fail_on: list[str] | None, failed: list[dict[str, Any]], notes: list[str]
) -> dict[str, Any]:
    def stat(s: Series | None, health: bool = False) -> dict[str, Any] | None:
        if s is None:
            return None
        if health:
            worst, at = s.worst()
            return {"first": _jf(s.first), "worst": _jf(worst), "worst_step": at, "last": _jf(s.last)}
        lo, hi = s.extrema()
        return {
            "first": _jf(s.first),
            "last": _jf(s.last),
            "min": _jf(lo),
            "max": _jf(hi),
            "trend": [_jf(x) for x in trend(s.values, TREND_POINTS)],
        }

    def eps(e: Episode) -> dict[str, Any]:
        return {"kind": e.kind, "step": e.step, "recovered_step": e.recovered_step}

    runs = []
    for rep in reports:
        s = rep.sampled_steps
        runs.append(
            {
                "run": rep.run,
                "files": rep.files,
                "first_step": s[0] if s else None,
                "last_step": s[-1] if s else None,
                "sampled_steps": len(s),
                "alerts_by_kind": rep.alerts_by_kind(),
                "layers": [
                    {
                        "name": lay.name,
                        "kind": lay.kind,
                        "units": lay.units,
                        "dead_fraction": stat(lay.series.get("dead_fraction"), health=True),
                        "saturated_fraction": stat(lay.series.get("saturated_fraction"), health=True),
                        "rms": stat(lay.series["rms"]),
                        "grad_rms": stat(lay.series.get("grad_rms")),
                        "alerts": [eps(e) for e in lay.alerts],
                    }
                    for lay in rep.layers
                ],
                "other_alerts": [{"subject": n, **eps(e)} for n, es in rep.other_alerts.items() for e in es],
                "alerts": [
                    {"step": a.step, "layer": a.layer, "kind": a.kind, "recovered": a.recovered, "message": a.message}
                    for a in rep.alerts
                ],
                "active_alerts": [{"layer": n, "kind": e.kind, "step": e.step} for n, e in rep.active],
                "notes": rep.notes,
            }
        )
    return {"version": 1, "runs": runs, "fail_on": fail_on, "failed": failed, "notes": notes}
