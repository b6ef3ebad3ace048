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
          "config": {"lr": 0.1, "fold": 2, ...} | null,   # the run_config object (monitor.report.config)
          "config_differs": ["fold", "lr"],      # the keys that tell it from the other runs of its group
          "notes": ["...: the last record is incomplete ..."]
        }
      ],
      "fail_on": ["dead"] | null,
      "failed": [{"run": ..., "layer": ..., "kind": ..., "step": ...}],   # active alerts of those kinds
      "notes": [...]                              # every note of every run
    }

With ``--compare RUN_A RUN_B`` the document is instead (see :mod:`monitor.report.compare`)::

    {
      "version": 1,
      "compare": {
        "a": {...}, "b": {...},                  # each run's object, as in "runs" above
        "config_differences": [{"key": "lr", "a": 0.3, "b": 0.001, "in": "both"}, ...],   # "a"/"b": only there
        "matched_by": "name" | "position",
        "thresholds": {"fraction_change": 0.1, "rms_factor": 10.0},
        "layers": [                              # A's forward order, then B's own layers
          {
            "name": "act2",
            "name_b": null,                      # B's name, when matched by position
            "a": {"kind": "relu",
                  "dead_fraction": {"worst": 1.0, "last": 1.0} | null, "saturated_fraction": ... | null,
                  "rms_last": 0.0, "grad_rms_last": 0.0008 | null,
                  "alerts": [{"kind": "dead", "step": 0, "recovered_step": null}]} | null,   # null: not in A
            "b": {...} | null,
            "differences": ["alerts", "dead_fraction", "rms"]   # also kind, saturated_fraction, grad_rms, only_a, only_b
          }, ...
        ],
        "differing": ["act2", ...]
      },
      "fail_on": ..., "failed": [...], "notes": [...]   # as above, over both runs
    }

Non-finite numbers (an exploding layer's RMS) are the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"``, so the document is strict JSON.
"""

from __future__ import annotations

import math
from typing import Any

from monitor.report.summary import Episode, RunReport, Series, trend

TREND_POINTS = 20  # points of the JSON "trend" arrays


def jf(x: float | None) -> float | str | None:
    if x is None:
        return None
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _stat(s: Series | None, health: bool = False) -> dict[str, Any] | None:
    if s is None:
        return None
    if health:
        worst, at = s.worst()
        return {"first": jf(s.first), "worst": jf(worst), "worst_step": at, "last": jf(s.last)}
    lo, hi = s.extrema()
    return {
        "first": jf(s.first),
        "last": jf(s.last),
        "min": jf(lo),
        "max": jf(hi),
        "trend": [jf(x) for x in trend(s.values, TREND_POINTS)],
    }


def _eps(e: Episode) -> dict[str, Any]:
    return {"kind": e.kind, "step": e.step, "recovered_step": e.recovered_step}


def run_json(rep: RunReport) -> dict[str, Any]:
    """One run's object (an element of ``"runs"``)."""
    s = rep.sampled_steps
    return {
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
                "dead_fraction": _stat(lay.series.get("dead_fraction"), health=True),
                "saturated_fraction": _stat(lay.series.get("saturated_fraction"), health=True),
                "rms": _stat(lay.series["rms"]),
                "grad_rms": _stat(lay.series.get("grad_rms")),
                "alerts": [_eps(e) for e in lay.alerts],
            }
            for lay in rep.layers
        ],
        "other_alerts": [{"subject": n, **_eps(e)} for n, es in rep.other_alerts.items() for e in es],
        "alerts": [
            {"step": a.step, "layer": a.layer, "kind": a.kind, "recovered": a.recovered, "message": a.message}
            for a in rep.alerts
        ],
        "active_alerts": [{"layer": n, "kind": e.kind, "step": e.step} for n, e in rep.active],
        "config": rep.config,
        "config_differs": rep.config_differs,
        "notes": rep.notes,
    }


def report_json(
    reports: list[RunReport], fail_on: list[str] | None, failed: list[dict[str, Any]], notes: list[str]
) -> dict[str, Any]:
    return {"version": 1, "runs": [run_json(r) for r in reports], "fail_on": fail_on, "failed": failed, "notes": notes}
