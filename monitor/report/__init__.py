"""``python -m monitor report RUN_DIR [RUN_DIR ...]``: what the monitor saw, from its event files.

One job per module:

- :mod:`~monitor.report.finding`: the run directories and their event files under the arguments;
- :mod:`~monitor.report.reading`: one run's files, read with TensorBoard's record reader and
  ``Event`` proto (:mod:`~monitor.report.template`: the byte templates that make it fast);
- :mod:`~monitor.report.summary`: the data -> :class:`RunReport` (layers, series, alert episodes);
  :mod:`~monitor.report.config`: the run's configuration (``run_config``) and the keys that tell
  runs apart;
- :mod:`~monitor.report.formatting`: numbers and run lines as text;
  :mod:`~monitor.report.terminal`: the terminal table; :mod:`~monitor.report.jsonout`: ``--json``
  (its docstring is the document's schema); :mod:`~monitor.report.html`: ``--html`` (plots drawn
  by :mod:`~monitor.report.svgplot`); :mod:`~monitor.report.compare`: ``--compare``;
- :mod:`~monitor.report.cli`: the command line (``--fail-on`` and the exit status).

Nothing here imports torch: ``import monitor`` is lazy (PEP 562), so the report starts in a
fraction of a second.
"""

from __future__ import annotations

from monitor.report.cli import main
from monitor.report.finding import ReportError, find_runs
from monitor.report.jsonout import report_json
from monitor.report.reading import read_run
from monitor.report.summary import (
    BUILTIN_KINDS,
    Episode,
    LayerReport,
    LoggedAlert,
    RunReport,
    Series,
    parse_alert,
    summarise,
    trend,
)
from monitor.report.terminal import render_run, sparkline

__all__ = [
    "BUILTIN_KINDS",
    "Episode",
    "LayerReport",
    "LoggedAlert",
    "ReportError",
    "RunReport",
    "Series",
    "find_runs",
    "main",
    "parse_alert",
    "read_run",
    "render_run",
    "report_json",
    "sparkline",
    "summarise",
    "trend",
]
