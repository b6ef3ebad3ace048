"""Finding runs: the monitor's event files under the directories given on the command line.

The monitor's event files (``events.out.tfevents.*.activation-monitor``, see
:mod:`monitor.eventfile`) are found under each directory, recursively: a run directory, or a
parent of many (Lightning ``version_N``, skorch ``run-NNN``). Files are grouped by the directory
they lie in; one directory is one run (several files in it, e.g. a resumed run, are read in name
order, i.e. by creation time, and merged by step: a step written twice keeps its last value; a
file that starts over at or before the first step read so far begins a new run, and only the
newest is reported: see :func:`monitor.report.reading.read_run`).
Directories with no such file are searched for plain ``events.out.tfevents.*`` files holding the
monitor's tags (older versions of the monitor wrote into the ``SummaryWriter``'s file).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from monitor.eventfile import SUFFIX
from monitor.report.reading import fast_checksums


class ReportError(Exception):
    """Bad input (exit status 2): the message names the path."""


def natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def is_monitor_file(name: str) -> bool:
    return name.endswith("." + SUFFIX) and "tfevents" in name


def find_runs(paths: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``[(run directory, [event files])]`` under ``paths``; :class:`ReportError` for a bad path."""
    runs: dict[str, list[str]] = {}
    for arg in paths:
        if not os.path.exists(arg):
            raise ReportError(f"{arg}: no such directory")
        if os.path.isfile(arg):
            if not is_monitor_file(os.path.basename(arg)) and not legacy_monitor_file(arg):
                raise ReportError(f"{arg}: not an activation-monitor event file (*.{SUFFIX})")
            runs.setdefault(os.path.dirname(arg) or ".", []).append(arg)
            continue
        if not os.path.isdir(arg):
            raise ReportError(f"{arg}: not a directory")
        found: dict[str, list[str]] = {}
        others: dict[str, list[str]] = {}
        for dirpath, dirnames, filenames in os.walk(arg):
            dirnames.sort(key=natural)
            for name in sorted(filenames, key=natural):
                if is_monitor_file(name):
                    found.setdefault(os.path.normpath(dirpath), []).append(os.path.join(dirpath, name))
                elif "tfevents" in name:
                    others.setdefault(os.path.normpath(dirpath), []).append(os.path.join(dirpath, name))
        for d, files in others.items():  # older versions of the monitor wrote into the SummaryWriter's own file
            if d not in found:
                legacy = [f for f in files if legacy_monitor_file(f)]
                if legacy:
                    found[d] = legacy
        if not found:
            extra = f" ({sum(map(len, others.values()))} other event files hold no activation_ tags)" if others else ""
            raise ReportError(f"{arg}: no activation-monitor event files (*.{SUFFIX}) under this directory{extra}")
        for d in sorted(found, key=natural):  # the arguments' order; under each, natural order (run-2 < run-10)
            have = runs.setdefault(d, [])
            have.extend(f for f in found[d] if f not in have)
    return list(runs.items())


def legacy_monitor_file(path: str, records: int = 200) -> bool:
    """Whether a plain TensorBoard event file holds the monitor's scalars within its first records."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto import event_pb2

        with fast_checksums():
            for i, rec in enumerate(RawEventFileLoader(path).Load()):
                if i >= records:
                    break
                ev = event_pb2.Event.FromString(rec)
                if any(v.tag.startswith("activation_rms/") for v in ev.summary.value):
                    return True
    except Exception:  # noqa: BLE001 - an unreadable file is not ours to report on here
        return False
    return False
