"""``python -m monitor report RUN_DIR [RUN_DIR ...]``: what the monitor saw, from its event files.

The monitor's event files (``events.out.tfevents.*.activation-monitor``, see
:mod:`monitor.eventfile`) are found under each directory, recursively: a run directory, or a
parent of many (Lightning ``version_N``, skorch ``run-NNN``). Files are grouped by the directory
they lie in; one directory is one run (several files in it, e.g. a resumed run, are read in name
order, i.e. by creation time, and merged by step: a step written twice keeps its last value).
They are read with TensorBoard's own reading code: its record reader
(``event_file_loader.RawEventFileLoader``, which verifies every record's checksum and stops at a
truncated record) and its ``Event`` protobuf. For speed, a sampled step whose event has the bytes
of an already decoded one except for its step, wall time and scalar values is read through that
layout (:class:`_Template`) instead of being decoded again. Directories with no such file are searched for
plain ``events.out.tfevents.*`` files holding the monitor's tags (older versions of the monitor
wrote into the ``SummaryWriter``'s file).

Terminal output, per run:

- one line: the run directory, the steps covered (first..last sampled step), the number of
  sampled steps, the alerts by kind (how many fired; how many are still active at the end);
- a table, one row per layer in forward order (the order in which the layers' scalars appear in
  the run's first sampled step; layers that appear later are appended in order of appearance):
  ``kind`` and ``units`` (as the monitor recorded them, see below), dead / saturated fraction
  (first, worst, last), RMS first and
  last around a sparkline of its course over the run (:func:`sparkline`), the gradient RMS (``gradient_rms/<layer>``)
  first -> last where the backward ran inside the sampled steps, and the layer's alerts
  (``kind@STEP``: still active at the end; ``kind@STEP-STEP2``: recovered at ``STEP2``);
- the alert lines in order, as they were logged (``ALERT step ...`` / ``RECOVERED step ...``).

Colours only when stdout is a terminal (``--color`` overrides; ``NO_COLOR`` is honoured); the
table's width follows :func:`shutil.get_terminal_size` (the ``COLUMNS`` variable when piped).
Alert lines are wrapped to that width on a terminal and printed verbatim when piped.

Kind and units: the monitor records each layer's kind and unit count in the text tag
``activation_layers`` (``layer | kind | units`` lines, once per layer). Runs written before it did
have them inferred: ``units`` from the alert messages (which count units; empty when no alert
mentions them), the kind from the tags written for the layer:
``relu`` (has a dead fraction: the ReLU family), ``relu6`` (dead and saturated fractions),
``bounded`` (a saturated fraction: tanh, sigmoid, hardtanh, ...; the exact name when a
``saturated`` alert names it), ``relu-like`` (a firing rate but no dead fraction: LeakyReLU,
GELU, SiLU, ...), ``activation`` (a dormant fraction only), ``block`` (none of these: a stack
block's output or another included module). When the layer's name ends in a functional
activation's name consistent with that (``dense0.relu``, ``layers.0.linear1.gelu``), that name
is the kind.

``--json`` prints the same content as one JSON document::

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
              "kind": "relu",                    # see above
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

Exit status: 0; 1 with ``--fail-on KINDS`` (comma-separated alert kinds, or ``all``) when an
alert of one of those kinds fired and had not recovered by the end of its run; 2 for bad usage,
a missing directory, a directory without monitor event files (the message names the path), or a
``--fail-on`` name that looks like a typo of a built-in kind.
A damaged file (a truncated last record from a run killed mid-write or still being written, a
record failing its checksum) gives a note naming the file on stderr; the records before the
damage are used.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import json
import math
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from monitor.eventfile import SUFFIX

ALERT_TAGS = ("activation_alerts/text_summary", "activation_alerts")
LAYER_TAGS = ("activation_layers/text_summary", "activation_layers")  # "layer | kind | units" lines
BUILTIN_KINDS = ("dead", "saturated", "dormant", "exploding", "nonfinite", "vanishing_gradient", "exploding_gradient")
TREND_POINTS = 20  # points of the JSON "trend" arrays

# metric prefix -> the series kept for every sampled step; everything else is only noted as present
_SERIES = {
    "activation_rms": "rms",
    "activation_dead_fraction": "dead_fraction",
    "activation_saturated_fraction": "saturated_fraction",
    "gradient_rms": "grad_rms",
}
_FUNCTIONAL = {  # functional activation names -> the family the tags would show
    "relu": "relu",
    "relu6": "relu6",
    **dict.fromkeys(
        ("leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "softplus", "hardswish"), "relu-like"
    ),
    **dict.fromkeys(("tanh", "sigmoid", "hardsigmoid", "softsign", "hardtanh"), "bounded"),
}
_ALERT_LINE = re.compile(r"^(ALERT|RECOVERED) (step (-?\d+) \| (.*?) \| (.*))$")
_RECOVERED_FROM = re.compile(r"^recovered from ([\w.-]+):")
_UNITS = re.compile(r"\b\d+/(\d+) units\b|\bof (\d+) units\b")
_BOUND_OF = re.compile(r"sit at a bound of (\S+) on")


class ReportError(Exception):
    """Bad input (exit status 2): the message names the path."""


# -- finding runs ---------------------------------------------------------------------------------
def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _is_monitor_file(name: str) -> bool:
    return name.endswith("." + SUFFIX) and "tfevents" in name


def find_runs(paths: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``[(run directory, [event files])]`` under ``paths``; :class:`ReportError` for a bad path."""
    runs: dict[str, list[str]] = {}
    for arg in paths:
        if not os.path.exists(arg):
            raise ReportError(f"{arg}: no such directory")
        if os.path.isfile(arg):
            if not _is_monitor_file(os.path.basename(arg)) and not _legacy_monitor_file(arg):
                raise ReportError(f"{arg}: not an activation-monitor event file (*.{SUFFIX})")
            runs.setdefault(os.path.dirname(arg) or ".", []).append(arg)
            continue
        if not os.path.isdir(arg):
            raise ReportError(f"{arg}: not a directory")
        found: dict[str, list[str]] = {}
        others: dict[str, list[str]] = {}
        for dirpath, dirnames, filenames in os.walk(arg):
            dirnames.sort(key=_natural)
            for name in sorted(filenames, key=_natural):
                if _is_monitor_file(name):
                    found.setdefault(os.path.normpath(dirpath), []).append(os.path.join(dirpath, name))
                elif "tfevents" in name:
                    others.setdefault(os.path.normpath(dirpath), []).append(os.path.join(dirpath, name))
        for d, files in others.items():  # older versions of the monitor wrote into the SummaryWriter's own file
            if d not in found:
                legacy = [f for f in files if _legacy_monitor_file(f)]
                if legacy:
                    found[d] = legacy
        if not found:
            extra = f" ({sum(map(len, others.values()))} other event files hold no activation_ tags)" if others else ""
            raise ReportError(f"{arg}: no activation-monitor event files (*.{SUFFIX}) under this directory{extra}")
        for d in sorted(found, key=_natural):  # the arguments' order; under each, natural order (run-2 < run-10)
            have = runs.setdefault(d, [])
            have.extend(f for f in found[d] if f not in have)
    return list(runs.items())


def _legacy_monitor_file(path: str, records: int = 200) -> bool:
    """Whether a plain TensorBoard event file holds the monitor's scalars within its first records."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto import event_pb2

        with _fast_checksums():
            for i, rec in enumerate(RawEventFileLoader(path).Load()):
                if i >= records:
                    break
                ev = event_pb2.Event.FromString(rec)
                if any(v.tag.startswith("activation_rms/") for v in ev.summary.value):
                    return True
    except Exception:  # noqa: BLE001 - an unreadable file is not ours to report on here
        return False
    return False


# -- reading --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fast_checksums() -> Iterator[None]:
    """TensorBoard's record reader, with its CRC-32C computed by ``google-crc32c``'s C code.

    Without TensorFlow, TensorBoard's reader verifies each record's checksum in pure Python
    (~125 ns per byte: minutes for a large run). The function it calls is swapped, for the
    duration of the read, for the C implementation of the same function (identical values).
    """
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub
    except ImportError:
        yield
        return
    if getattr(google_crc32c, "implementation", "c") != "c" or not hasattr(stub, "crc32c"):
        yield
        return
    old = stub.crc32c
    stub.crc32c = google_crc32c.value
    try:
        yield
    finally:
        stub.crc32c = old


@dataclass
class _Layout:
    """Where the wanted scalars sit in a step's summary (the monitor writes the same tags in the same order each step)."""

    idx: list[int]
    tags: list[str]
    keys: list[tuple[str, str]]  # (layer, series)
    simple: bool  # every wanted value is a simple_value
    sample: bool  # the event holds activation_rms: a sampled step
    templated: bool = True  # worth building a byte template for (see _Template)
    builds: int = 0  # templates built for it (a layout whose prefix changes every step gets no more)
    steps: list[int] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)

    def matches(self, vals: Any) -> bool:
        return all(vals[i].tag == t for i, t in zip(self.idx, self.tags))


def _scalar(v: Any) -> float:
    """The number of a scalar ``Summary.Value`` (``simple_value``, or a scalar tensor as migrated files hold)."""
    if v.WhichOneof("value") == "simple_value":
        return float(v.simple_value)
    t = v.tensor
    for name in ("float_val", "double_val", "int_val", "int64_val"):
        seq = getattr(t, name)
        if len(seq):
            return float(seq[0])
    if t.tensor_content:
        from tensorboard.util import tensor_util

        return float(np.asarray(tensor_util.make_ndarray(t)).reshape(-1)[0])
    return math.nan


def _text(v: Any) -> str:
    t = v.tensor
    if len(t.string_val):
        return "\n".join(s.decode("utf-8", "replace") for s in t.string_val)
    return ""


@dataclass
class _RunData:
    series: dict[tuple[str, str], list[tuple[list[int], np.ndarray]]] = field(default_factory=dict)
    layers: dict[str, set[str]] = field(default_factory=dict)  # layer -> metric prefixes seen, in forward order
    sampled: list[int] = field(default_factory=list)
    alert_lines: list[str] = field(default_factory=list)  # in logged order
    described: dict[str, tuple[str, int]] = field(default_factory=dict)  # layer -> (kind, units), when recorded
    notes: list[str] = field(default_factory=list)


def _read_file(path: str, run: _RunData) -> None:
    """Add one event file's records to ``run``; damage ends the file with a note."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    size = os.path.getsize(path)  # before reading: a run still being written may grow meanwhile
    consumed = records = 0
    templates: list[_Template] = []  # most recently matched first
    cache: dict[int, _Layout] = {}  # number of values -> the layout last seen with that many
    layouts: list[_Layout] = []
    parse = event_pb2.Event.FromString
    try:
        with _fast_checksums():
            for rec in RawEventFileLoader(path).Load():
                consumed += len(rec) + 16  # length (8), its CRC (4), data, data CRC (4)
                records += 1
                for k, tpl in enumerate(templates):
                    if tpl.read(rec):
                        if k:
                            templates.insert(0, templates.pop(k))
                        break
                else:
                    ev = parse(rec)
                    vals = ev.summary.value
                    n = len(vals)
                    if not n:
                        continue
                    lay = cache.get(n)
                    if lay is not None and lay.matches(vals):
                        lay.steps.append(ev.step)
                        lay.rows.append([_scalar(vals[i]) for i in lay.idx])
                    else:
                        lay = _scan(ev, vals, run)
                        if lay is None:
                            continue
                        layouts.append(lay)
                        if n < 8:  # small events (images, text) are simply read value by value
                            continue
                        cache[n] = lay
                    if lay.templated:  # e.g. the step's varint grew a byte: a new template for the same layout
                        tpl = _Template.build(rec, lay)
                        lay.builds += 1
                        lay.templated = tpl is not None and lay.builds < 16
                        if tpl is not None:
                            templates.insert(0, tpl)
                            del templates[4:]
    except Exception as e:  # noqa: BLE001 - a damaged file is a note, never a traceback
        run.notes.append(
            f"{path}: could not read record {records + 1} ({type(e).__name__}: {e}); "
            f"the {records} records before it are used"
        )
        consumed = size
    for lay in layouts:
        _collect(lay, run)
    if consumed < size:
        run.notes.append(_damage(path, consumed, size, records))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the protobuf varint at ``pos``."""
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


class _Template:
    """The byte layout of a step's event, to read the next steps' wanted scalars without decoding them.

    A sampled step's event repeats the previous one byte for byte except for its wall time, its
    step, the summary's length and the scalars' 4-byte values. The template is built from an
    event TensorBoard's ``Event`` proto has decoded (:func:`_scan`), up to the last wanted value;
    a later record is read through it only if every other byte of that prefix is identical and
    the step and length varints have the same size (so it decodes to the same tags, in the same
    places); anything else is decoded by the proto again.
    """

    def __init__(
        self,
        lay: _Layout,
        end: int,
        holes: np.ndarray,
        skeleton: bytes,
        head: tuple[int, int, bytes],
        step_at: tuple[int, int],
        length_at: tuple[int, int, int],
        floats: np.ndarray,
    ) -> None:
        self.lay, self.end, self.holes, self.skeleton, self.head = lay, end, holes, skeleton, head
        self.step_at, self.length_at, self.floats = step_at, length_at, floats

    @classmethod
    def build(cls, rec: bytes, lay: _Layout) -> _Template | None:
        if not lay.simple:
            return None
        try:
            return cls._build(rec, lay)
        except (IndexError, ValueError):  # a layout this reader does not expect: decode every time
            return None

    @classmethod
    def _build(cls, rec: bytes, lay: _Layout) -> _Template | None:
        holes: list[tuple[int, int]] = []
        pos, step_at, length_at = 0, None, None
        summary = None
        while pos < len(rec) and summary is None:
            key, p = _varint(rec, pos)
            field_no, wire = key >> 3, key & 7
            if field_no == 1 and wire == 1:  # wall_time
                holes.append((p, p + 8))
                pos = p + 8
            elif field_no == 2 and wire == 0:  # step
                _, q = _varint(rec, p)
                holes.append((p, q))
                step_at = (p, q)
                pos = q
            elif field_no == 5 and wire == 2:  # summary
                length, q = _varint(rec, p)
                holes.append((p, q))
                length_at = (p, q, q)
                summary = (q, q + length)
            else:
                return None
        if summary is None or step_at is None or length_at is None:
            return None
        wanted = dict.fromkeys(lay.idx)
        floats: dict[int, int] = {}
        pos, stop, i, head = summary[0], summary[1], 0, None
        last = max(lay.idx)
        while i <= last:
            if rec[pos] != 0x0A:  # Summary.value
                return None
            length, q = _varint(rec, pos + 1)
            vend = q + length
            p = q
            while p < vend:
                key, r = _varint(rec, p)
                if key == 0x15:  # simple_value (fixed32)
                    holes.append((r, r + 4))
                    if i in wanted:
                        floats[i] = r
                    p = r + 4
                elif key == 0x0A:  # tag
                    n, t = _varint(rec, r)
                    if head is None:
                        head = (t, t + n, rec[t : t + n])
                    p = t + n
                elif key & 7 == 2:
                    n, t = _varint(rec, r)
                    p = t + n
                elif key & 7 == 0:
                    p = _varint(rec, r)[1]
                elif key & 7 in (1, 5):
                    p = r + (8 if key & 7 == 1 else 4)
                else:
                    return None
            if p != vend:
                return None
            pos = vend
            i += 1
        if pos > stop or len(floats) != len(lay.idx) or head is None:
            return None
        end = pos
        hole_idx = np.concatenate([np.arange(a, b) for a, b in holes])
        buf = np.frombuffer(rec, np.uint8, count=end).copy()
        buf[hole_idx] = 0
        f = np.asarray([floats[i] for i in lay.idx], dtype=np.intp)
        return cls(
            lay,
            end,
            hole_idx,
            buf.tobytes(),
            head,
            step_at,
            (length_at[0], length_at[1], summary[0]),
            f[:, None] + np.arange(4),
        )

    def read(self, rec: bytes) -> bool:
        """Read ``rec`` into the layout if it has this template's bytes; False (nothing read) otherwise."""
        a, b, head = self.head
        if len(rec) < self.end or rec[a:b] != head:
            return False
        raw = np.frombuffer(rec, np.uint8, count=self.end)
        buf = raw.copy()
        buf[self.holes] = 0
        if buf.tobytes() != self.skeleton:
            return False
        step, q = _varint(rec, self.step_at[0])
        if q != self.step_at[1]:
            return False
        length, q = _varint(rec, self.length_at[0])
        if q != self.length_at[1] or self.length_at[2] + length < self.end:
            return False
        self.lay.steps.append(step - (1 << 64) if step >= 1 << 63 else step)  # int64
        self.lay.rows.append(raw[self.floats].view("<f4").ravel())
        return True


def _scan(ev: Any, vals: Any, run: _RunData) -> _Layout | None:
    """Read an event value by value; return the layout of its wanted scalars (None: nothing wanted)."""
    idx: list[int] = []
    tags: list[str] = []
    keys: list[tuple[str, str]] = []
    row: list[float] = []
    simple = True
    sample = False
    for i, v in enumerate(vals):
        tag = v.tag
        if tag in ALERT_TAGS:
            for line in _text(v).splitlines():
                line = line.strip()
                if line:
                    run.alert_lines.append(line)
            continue
        if tag in LAYER_TAGS:  # written by the monitor since the gradient-flow release
            for line in _text(v).splitlines():
                parts = [p.strip() for p in line.split(" | ")]
                if len(parts) == 3 and parts[2].isdigit():
                    run.described[parts[0]] = (parts[1], int(parts[2]))
            continue
        prefix, sep, name = tag.partition("/")
        if not sep or prefix in ("gradient_norm", "activation_hist", "activation_timeline"):
            continue
        if not prefix.startswith(("activation_", "gradient_")):
            continue
        if prefix == "activation_rms":
            sample = True
        run.layers.setdefault(name, set()).add(prefix)
        series = _SERIES.get(prefix)
        if series is not None:
            idx.append(i)
            tags.append(tag)
            keys.append((name, series))
            simple = simple and v.WhichOneof("value") == "simple_value"
            row.append(_scalar(v))
    if not idx:
        return None
    return _Layout(idx, tags, keys, simple, sample, templated=simple, steps=[int(ev.step)], rows=[row])


def _collect(lay: _Layout, run: _RunData) -> None:
    if not lay.rows:
        return
    m = np.asarray(lay.rows, dtype=np.float64).reshape(len(lay.rows), len(lay.idx))
    if lay.sample:
        run.sampled.extend(lay.steps)
    for j, key in enumerate(lay.keys):
        run.series.setdefault(key, []).append((lay.steps, m[:, j]))
    lay.rows, lay.steps = [], []


def _damage(path: str, consumed: int, size: int, records: int) -> str:
    """What is wrong at byte ``consumed`` of the file, where TensorBoard's reader stopped."""
    left = size - consumed
    what = "the last record is incomplete (a run killed mid-write, or still being written)"
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(consumed)
            head = f.read(8)
        if len(head) == 8 and 16 + int.from_bytes(head, "little") <= left:
            what = "a record is corrupt (fails its checksum)"
    return f"{path}: {what} at byte {consumed} of {size}; the {records} records before it are used, the last {left} bytes are not"


def read_run(files: Sequence[str]) -> _RunData:
    """Every monitor event file of one run directory, in name (creation) order."""
    run = _RunData()
    for path in files:
        try:
            _read_file(path, run)
        except OSError as e:
            run.notes.append(f"{path}: could not read ({e.strerror or e})")
    return run


# -- summarising ----------------------------------------------------------------------------------
@dataclass
class LoggedAlert:
    """One alert line of the Text tab."""

    step: int
    layer: str
    kind: str
    recovered: bool
    message: str  # the line without its ALERT / RECOVERED prefix

    @property
    def line(self) -> str:
        return ("RECOVERED " if self.recovered else "ALERT ") + self.message


@dataclass
class Episode:
    kind: str
    step: int
    recovered_step: int | None = None


@dataclass
class Series:
    steps: np.ndarray
    values: np.ndarray

    @property
    def first(self) -> float:
        return float(self.values[0])

    @property
    def last(self) -> float:
        return float(self.values[-1])

    def worst(self) -> tuple[float, int]:
        v = np.where(np.isnan(self.values), -np.inf, self.values)
        i = int(np.argmax(v))
        return float(self.values[i]), int(self.steps[i])

    def extrema(self) -> tuple[float, float]:
        finite = self.values[np.isfinite(self.values)]
        if not finite.size:
            return math.nan, math.nan
        return float(finite.min()), float(finite.max())


@dataclass
class LayerReport:
    name: str
    kind: str
    units: int | None
    series: dict[str, Series]
    alerts: list[Episode]


@dataclass
class RunReport:
    run: str
    files: list[str]
    sampled_steps: list[int]
    layers: list[LayerReport]
    other_alerts: dict[str, list[Episode]]  # alert subjects that are no layer, e.g. "(parameters)"
    alerts: list[LoggedAlert]
    notes: list[str]

    @property
    def active(self) -> list[tuple[str, Episode]]:
        out = [(lay.name, e) for lay in self.layers for e in lay.alerts if e.recovered_step is None]
        out += [(n, e) for n, eps in self.other_alerts.items() for e in eps if e.recovered_step is None]
        return sorted(out, key=lambda t: t[1].step)

    def alerts_by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for a in self.alerts:
            if not a.recovered:
                out.setdefault(a.kind, {"fired": 0, "active": 0})["fired"] += 1
        for _, e in self.active:
            out.setdefault(e.kind, {"fired": 0, "active": 0})["active"] += 1
        return out


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


_BUILTIN_BY_NORM = {_norm(k): k for k in BUILTIN_KINDS}


def parse_alert(line: str) -> LoggedAlert | None:
    """``ALERT step 10 | relu2 | dead: ...`` -> :class:`LoggedAlert` (None: not an alert line)."""
    m = _ALERT_LINE.match(line)
    if m is None:
        return None
    head, message, step, layer, rest = m.groups()
    recovered = head == "RECOVERED"
    r = _RECOVERED_FROM.match(rest)
    if recovered and r is not None:
        kind = r.group(1)  # the detector's own name
    else:
        what = rest.split(":", 1)[0].strip()
        kind = _BUILTIN_BY_NORM.get(_norm(what), re.sub(r"[\s-]+", "_", what))
    return LoggedAlert(int(step), layer, kind, recovered, message)


def _merge(chunks: list[tuple[list[int], np.ndarray]]) -> Series:
    steps = np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in chunks])
    values = np.concatenate([v for _, v in chunks])
    if steps.size > 1 and np.any(np.diff(steps) <= 0):  # several layouts or files: in step order
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        keep = np.append(steps[1:] != steps[:-1], True)  # a step written twice: its last value
        steps, values = steps[keep], values[keep]
    return Series(steps, values)


def _family(prefixes: set[str]) -> str:
    dead = "activation_dead_fraction" in prefixes
    sat = "activation_saturated_fraction" in prefixes
    if dead and sat:
        return "relu6"
    if dead:
        return "relu"
    if sat:
        return "bounded"
    if "activation_firing_rate" in prefixes:
        return "relu-like"
    if "activation_dormant_fraction" in prefixes:
        return "activation"
    return "block"


def _kind(name: str, prefixes: set[str], messages: list[str]) -> str:
    family = _family(prefixes)
    if family == "bounded":
        for msg in messages:
            m = _BOUND_OF.search(msg)
            if m:
                return m.group(1)
    base = name.rsplit(".", 1)[-1].split("#", 1)[0]
    if _FUNCTIONAL.get(base) == family:
        return base
    return family


def summarise(run_dir: str, files: list[str], data: _RunData) -> RunReport:
    alerts = [a for a in map(parse_alert, data.alert_lines) if a is not None]
    episodes: dict[str, list[Episode]] = {}
    messages: dict[str, list[str]] = {}
    units: dict[str, int] = {}
    for a in alerts:
        eps = episodes.setdefault(a.layer, [])
        messages.setdefault(a.layer, []).append(a.message)
        m = _UNITS.search(a.message)
        if m and a.layer not in units:
            units[a.layer] = int(m.group(1) or m.group(2))
        open_ = next((e for e in eps if e.kind == a.kind and e.recovered_step is None), None)
        if not a.recovered:
            if open_ is None:  # a second ALERT while active (e.g. after a resume) is the same episode
                eps.append(Episode(a.kind, a.step))
        elif open_ is not None:
            open_.recovered_step = a.step
    layers = []
    for name, prefixes in data.layers.items():
        if "activation_rms" not in prefixes:
            continue
        series = {s: _merge(data.series[(name, s)]) for s in _SERIES.values() if (name, s) in data.series}
        kind, n_units = data.described.get(name, (None, None))
        if kind is None:  # runs written before the monitor recorded it: inferred
            kind, n_units = _kind(name, prefixes, messages.get(name, [])), units.get(name)
        layers.append(LayerReport(name, kind, n_units, series, episodes.pop(name, [])))
    sampled = sorted(set(data.sampled))
    return RunReport(run_dir, list(files), sampled, layers, episodes, alerts, data.notes)


def trend(values: np.ndarray, points: int) -> list[float]:
    """The mean of each of up to ``points`` equal slices (NaN/inf when a slice holds one)."""
    v = np.asarray(values, dtype=np.float64)
    n = min(points, v.size)
    if n == 0:
        return []
    edges = np.linspace(0, v.size, n + 1).round().astype(np.int64)
    out = []
    for a, b in itertools.pairwise(edges):
        seg = v[a:b]
        bad = seg[~np.isfinite(seg)]
        out.append(float(bad[0]) if bad.size else float(seg.mean()))
    return out


# -- output ---------------------------------------------------------------------------------------
_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_ASCII = "_.-~=+*#"


def sparkline(points: list[float], chars: str = _SPARK) -> str:
    """One character per point; ``!`` marks NaN/inf.

    Non-negative numbers (an RMS) are drawn from zero, so a layer that barely changes draws a
    flat line; when they span more than 100x (an explosion) the scale is logarithmic from the
    smallest to the largest; numbers of both signs span their own range.
    """
    p = np.asarray(points, dtype=np.float64)
    finite = np.isfinite(p)
    if not finite.any():
        return "!" * len(p)
    lo, hi = p[finite].min(), p[finite].max()
    if lo > 0 and hi / lo > 100:
        p, lo, hi = np.log10(np.where(finite, p, 1.0)), math.log10(lo), math.log10(hi)
    elif lo >= 0:
        lo = 0.0
    out = []
    top = len(chars) - 1
    for x, ok in zip(p, finite):
        if not ok:
            out.append("!")
        elif hi == lo:
            out.append(chars[top // 2])
        else:
            out.append(chars[round((x - lo) / (hi - lo) * top)])
    return "".join(out)


def _num(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    a = abs(x)
    return f"{x:.3g}" if 1e-3 <= a < 1e5 else f"{x:.2e}"


def _pct(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0%"
    if x < 0.005:
        return "<1%"
    if x < 1 and x > 0.995:
        return ">99%"
    return f"{100 * x:.0f}%"


def _jf(x: float | None) -> float | str | None:
    if x is None:
        return None
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _episodes_text(eps: list[Episode]) -> str:
    return ", ".join(
        f"{e.kind}@{e.step}" + (f"-{e.recovered_step}" if e.recovered_step is not None else "") for e in eps
    )


class _Style:
    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, text: str, *codes: str) -> str:
        if not self.on or not codes or not text:
            return text
        return "\x1b[" + ";".join(codes) + "m" + text + "\x1b[0m"


BOLD, DIM, RED, GREEN, YELLOW = "1", "2", "31", "32", "33"


def _fit(text: str, width: int, middle: bool = False) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    if middle:
        head = (width - 1) // 2
        return text[:head] + "…" + text[len(text) - (width - 1 - head) :]
    return text[: width - 1] + "…"


def render_run(rep: RunReport, width: int, style: _Style, unicode: bool, tty: bool) -> str:
    lines = [style(_run_line(rep), BOLD)]
    if not rep.sampled_steps:
        lines.append("  no sampled steps in these files")
    if rep.layers:
        lines += _table(rep, width, style, unicode)
    if rep.alerts:
        lines.append("")
        lines.append(style("alerts, as logged:", BOLD))
        for a in rep.alerts:
            prefix = style("RECOVERED", GREEN) if a.recovered else style("ALERT", RED, BOLD)
            if tty:  # wrapped under the message, at the terminal's width
                indent = 2 + len(a.line) - len(a.message)
                body = textwrap.wrap(a.message, max(width - indent, 20)) or [""]
                lines.append("  " + prefix + " " + body[0])
                lines += [" " * indent + b for b in body[1:]]
            else:
                lines.append("  " + prefix + " " + a.message)
    return "\n".join(lines)


def _run_line(rep: RunReport) -> str:
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
    return f"{rep.run}: {span}, {alerts}"


def _table(rep: RunReport, width: int, style: _Style, unicode: bool) -> list[str]:
    """The layer table at the terminal's width. As the terminal narrows: the sparkline shrinks
    (16 to 4 characters), the alerts column and then the layer names are shortened (to 16
    characters; names lose their middle), then the gradient, kind and units columns are left out;
    below that the lines are simply longer than the terminal."""
    optional = ["grad", "kind", "units"]
    plans = [(w, set(optional), 0) for w in (16, 12, 8, 6, 4)] + [(4, set(optional), 16)]
    plans += [(4, set(optional[i + 1 :]), 16) for i in range(len(optional))] + [(4, set(), 10)]
    for spark_w, cols, minimum in plans:
        head, rows = _rows(rep, spark_w, unicode, cols)
        widths = [max(len(head[i]), *(len(r[0][i]) for r in rows)) for i in range(len(head))]
        over = sum(widths) + 2 * (len(head) - 1) - width
        for col in (-1, 0):  # alerts, then names
            if over > 0 and minimum:
                cut = min(over, max(widths[col] - max(minimum, len(head[col])), 0))
                widths[col] -= cut
                over -= cut
        if over <= 0:
            break
    right = head.index("units") if "units" in head else -1
    out = ["  ".join(style(h, BOLD) + " " * (w - len(h)) for h, w in zip(head, widths)).rstrip()]
    for cells, colours in rows:
        texts = []
        for i, (c, w, col) in enumerate(zip(cells, widths, colours)):
            t = _fit(c, w, middle=(i == 0))
            pad = " " * (w - len(t))
            texts.append(pad + style(t, *col) if i == right else style(t, *col) + pad)
        out.append("  ".join(texts).rstrip())
    if any(lay.alerts for lay in rep.layers) or rep.other_alerts:
        out.append(style(_fit("(kind@STEP: still active at the end; kind@STEP-STEP2: recovered at STEP2)", width), DIM))
    return out


def _rows(
    rep: RunReport, spark_w: int, unicode: bool, cols: set[str]
) -> tuple[list[str], list[tuple[list[str], list[tuple[str, ...]]]]]:
    chars = _SPARK if unicode else _SPARK_ASCII
    arrow = "→" if unicode else "->"
    has_kind = "kind" in cols
    has_units = "units" in cols and any(lay.units is not None for lay in rep.layers)
    has_health = any("dead_fraction" in lay.series or "saturated_fraction" in lay.series for lay in rep.layers)
    has_grad = "grad" in cols and any("grad_rms" in lay.series for lay in rep.layers)
    head = ["layer"] + (["kind"] if has_kind else []) + (["units"] if has_units else [])
    head += (["dead/sat first worst last"] if has_health else []) + ["RMS first trend last"]
    head += ([f"grad RMS first{arrow}last"] if has_grad else []) + ["alerts"]
    rows: list[tuple[list[str], list[tuple[str, ...]]]] = []
    for lay in rep.layers:
        cells = [lay.name]
        colours: list[tuple[str, ...]] = [()]
        if has_kind:
            cells.append(lay.kind)
            colours.append((DIM,))
        if has_units:
            cells.append("" if lay.units is None else str(lay.units))
            colours.append(())
        if has_health:
            parts = []
            bad = False
            for key, label in (("dead_fraction", "dead"), ("saturated_fraction", "sat")):
                s = lay.series.get(key)
                if s is not None:
                    worst, _ = s.worst()
                    parts.append(f"{label} {_pct(s.first)} {_pct(worst)} {_pct(s.last)}")
                    bad = bad or s.last >= 0.5
            cells.append("; ".join(parts))
            colours.append((RED,) if bad else ())
        rms = lay.series["rms"]
        cells.append(f"{_num(rms.first)} {sparkline(trend(rms.values, spark_w), chars)} {_num(rms.last)}")
        colours.append(())
        if has_grad:
            g = lay.series.get("grad_rms")
            cells.append(f"{_num(g.first)} {arrow} {_num(g.last)}" if g is not None else "")
            colours.append(())
        active = any(e.recovered_step is None for e in lay.alerts)
        cells.append(_episodes_text(lay.alerts))
        colours.append((RED, BOLD) if active else (YELLOW,) if lay.alerts else ())
        if active:
            colours[0] = (RED, BOLD)
        rows.append((cells, colours))
    for name, eps in rep.other_alerts.items():
        active = any(e.recovered_step is None for e in eps)
        cells = [name] + [""] * (len(head) - 2) + [_episodes_text(eps)]
        bad = (RED, BOLD) if active else (YELLOW,)
        rows.append((cells, [bad if active else ()] + [()] * (len(head) - 2) + [bad]))
    return head, rows


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


# -- command line ---------------------------------------------------------------------------------
def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Report what the activation monitor saw in one or more runs, from its event files.",
        epilog="Exit status: 0; 1 when --fail-on matched an alert still active at the end of its run; "
        "2 for a missing directory or one without monitor event files.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="a run directory, or a parent of many runs (searched recursively)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the terminal report")
    p.add_argument(
        "--fail-on",
        metavar="KINDS",
        default=None,
        help="comma-separated alert kinds (" + ", ".join(BUILTIN_KINDS) + ", your detectors' names) or 'all': "
        "exit 1 when one of them fired and had not recovered by the end of its run",
    )
    p.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colours (auto: when stdout is a terminal)"
    )
    return p


def _fail_kinds(spec: str, err: TextIO) -> list[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    if not kinds:
        raise ReportError("--fail-on: expected alert kinds separated by commas, or 'all'")
    if "all" in kinds:
        return ["all"]
    out = []
    for k in kinds:
        builtin = _BUILTIN_BY_NORM.get(_norm(k))
        prefixed = [b for b in BUILTIN_KINDS if b.startswith(k + "_")]
        if builtin is None and len(prefixed) == 1:  # "vanishing" -> "vanishing_gradient"
            builtin = prefixed[0]
        close = difflib.get_close_matches(k, BUILTIN_KINDS, n=1, cutoff=0.75)
        if builtin is not None:
            out.append(builtin)
        elif close:  # a typo in a CI gate must not pass silently
            raise ReportError(f"--fail-on: {k!r} is not an alert kind; did you mean {close[0]!r}? (or 'all')")
        elif re.fullmatch(r"[A-Za-z_][\w.-]*", k):
            print(
                f"note: --fail-on {k!r} is not a built-in alert kind ({', '.join(BUILTIN_KINDS)}); "
                "taken as the name of a detector of your own",
                file=err,
            )
            out.append(k)
        else:
            raise ReportError(f"--fail-on: {k!r} is not an alert kind (built-in: {', '.join(BUILTIN_KINDS)}, or 'all')")
    return out


def main(argv: Sequence[str] | None = None, prog: str = "activation-monitor") -> int:
    """The command line; returns the exit status (0, 1 with --fail-on, 2 for bad input)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["report"] and not os.path.isdir("report"):
        args_in = args_in[1:]  # `activation-monitor report RUN_DIR` == `activation-monitor RUN_DIR`
    out, err = sys.stdout, sys.stderr
    try:
        args = _parser(prog).parse_args(args_in)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        fail_on = _fail_kinds(args.fail_on, err) if args.fail_on is not None else None
        found = find_runs(args.runs)
    except ReportError as e:
        print(f"{prog}: error: {e}", file=err)
        return 2
    reports = [summarise(d, files, read_run(files)) for d, files in found]
    notes = [n for r in reports for n in r.notes]
    for n in notes:
        print(f"note: {n}", file=err)
    failed = []
    if fail_on is not None:
        for r in reports:
            for layer, e in r.active:
                if fail_on == ["all"] or e.kind in fail_on:
                    failed.append({"run": r.run, "layer": layer, "kind": e.kind, "step": e.step})
    try:
        _print(args, reports, fail_on, failed, notes, out)
    except BrokenPipeError:  # `... | head`: the reader has gone; the exit status still counts
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    if failed:
        what = ", ".join(f"{f['kind']} in {f['layer']} since step {f['step']} ({f['run']})" for f in failed)
        print(f"{prog}: --fail-on {args.fail_on}: still active at the end: {what}", file=err)
        return 1
    return 0


def _print(
    args: argparse.Namespace,
    reports: list[RunReport],
    fail_on: list[str] | None,
    failed: list[dict[str, Any]],
    notes: list[str],
    out: TextIO,
) -> None:
    if args.json:
        json.dump(report_json(reports, fail_on, failed, notes), out, indent=1, allow_nan=False)
        out.write("\n")
    else:
        tty = bool(getattr(out, "isatty", lambda: False)())
        colour = args.color == "always" or (args.color == "auto" and tty and not os.environ.get("NO_COLOR"))
        width = max(shutil.get_terminal_size((100, 24)).columns, 40)
        enc = getattr(out, "encoding", None) or "utf-8"
        try:
            (_SPARK + "→…").encode(enc)
            unicode = True
        except (UnicodeEncodeError, LookupError):
            unicode = False
        style = _Style(colour)
        text = "\n\n".join(render_run(r, width, style, unicode, tty) for r in reports)
        if not unicode:
            text = text.replace("…", "~")
        out.write(text + "\n")
    out.flush()
