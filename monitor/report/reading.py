"""Reading one run's event files: the sampled steps' scalars, alert lines, layer descriptions.

Files are read with TensorBoard's own reading code: its record reader
(``event_file_loader.RawEventFileLoader``, which verifies every record's checksum and stops at a
truncated record) and its ``Event`` protobuf. For speed, a sampled step whose event has the bytes
of an already decoded one except for its step, wall time and scalar values is read through that
layout (:class:`monitor.report.template.Template`) instead of being decoded again. A damaged file
(a truncated last record from a run killed mid-write or still being written, a record failing its
checksum) gives a note naming the file and the byte where reading stopped; the records before the
damage are used.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.report.config import CONFIG_TAGS
from monitor.report.template import Layout, Template

ALERT_TAGS = ("activation_alerts/text_summary", "activation_alerts")
LAYER_TAGS = ("activation_layers/text_summary", "activation_layers")  # "layer | kind | units" lines
# metric prefix -> the series kept for every sampled step; everything else is only noted as present
SERIES = {
    "activation_rms": "rms",
    "activation_dead_fraction": "dead_fraction",
    "activation_saturated_fraction": "saturated_fraction",
    "gradient_rms": "grad_rms",
}


@contextlib.contextmanager
def fast_checksums() -> Iterator[None]:
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
class Image:
    """The latest image of one tag: an encoded PNG as the monitor wrote it."""

    tag: str
    step: int
    png: bytes
    width: int
    height: int


@dataclass
class RunData:
    series: dict[tuple[str, str], list[tuple[list[int], np.ndarray]]] = field(default_factory=dict)
    layers: dict[str, set[str]] = field(default_factory=dict)  # layer -> metric prefixes seen, in forward order
    sampled: list[int] = field(default_factory=list)
    alert_lines: list[str] = field(default_factory=list)  # in logged order
    described: dict[str, tuple[str, int]] = field(default_factory=dict)  # layer -> (kind, units), when recorded
    notes: list[str] = field(default_factory=list)
    images: dict[str, Image] | None = None  # tag -> its latest image; None: images are not read
    config_texts: list[str] = field(default_factory=list)  # the run_config texts, in the order read


def _read_file(path: str, run: RunData) -> None:
    """Add one event file's records to ``run``; damage ends the file with a note."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    size = os.path.getsize(path)  # before reading: a run still being written may grow meanwhile
    consumed = records = 0
    templates: list[Template] = []  # most recently matched first
    cache: dict[int, Layout] = {}  # number of values -> the layout last seen with that many
    layouts: list[Layout] = []
    parse = event_pb2.Event.FromString
    try:
        with fast_checksums():
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
                        tpl = Template.build(rec, lay)
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


def _scan(ev: Any, vals: Any, run: RunData) -> Layout | None:
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
        if tag in CONFIG_TAGS:  # the run's configuration: one JSON object (see monitor.report.config)
            run.config_texts.append(_text(v))
            continue
        prefix, sep, name = tag.partition("/")
        if not prefix.startswith(("activation_", "gradient_")):
            continue
        if run.images is not None and prefix not in SERIES and v.WhichOneof("value") == "image":
            _keep_image(run.images, tag, int(ev.step), v.image)
            continue
        if not sep or prefix in ("gradient_norm", "activation_hist", "activation_timeline"):
            continue
        if prefix == "activation_rms":
            sample = True
        run.layers.setdefault(name, set()).add(prefix)
        series = SERIES.get(prefix)
        if series is not None:
            idx.append(i)
            tags.append(tag)
            keys.append((name, series))
            simple = simple and v.WhichOneof("value") == "simple_value"
            row.append(_scalar(v))
    if not idx:
        return None
    return Layout(idx, tags, keys, simple, sample, templated=simple, steps=[int(ev.step)], rows=[row])


def _keep_image(images: dict[str, Image], tag: str, step: int, image: Any) -> None:
    have = images.get(tag)
    if have is None or step >= have.step:  # the latest (a resumed run's files are read in order)
        images[tag] = Image(tag, step, bytes(image.encoded_image_string), int(image.width), int(image.height))


def _collect(lay: Layout, run: RunData) -> None:
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


def read_run(files: Sequence[str], images: bool = False) -> RunData:
    """Every monitor event file of one run directory, in name (creation) order.

    ``images``: also keep the latest image of each of the monitor's image tags (``activation_scan``,
    ``activation_timeline/<layer>``, ``gradient_flow``, ``activation_probe/...``: any image under an
    ``activation_`` or ``gradient_`` tag), for the HTML page.
    """
    def read(path: str, run: RunData) -> None:
        try:
            _read_file(path, run)
        except OSError as e:
            run.notes.append(f"{path}: could not read ({e.strerror or e})")

    run = RunData(images={} if images else None)
    earliest: int | None = None  # the first sampled step of the files read so far
    kept: list[str] = []
    for path in files:
        before = len(run.sampled)
        read(path, run)
        new = run.sampled[before:]
        if new and earliest is not None and min(new) <= earliest:
            # Starts over at or before the first step already read: not a resumed run (which goes
            # on from a later step) but a new run written into the same directory. Only the newest
            # run is reported; its files are read again on their own.
            notes = [n for n in run.notes if not n.startswith(tuple(kept))]
            run = RunData(images={} if images else None, notes=notes)
            run.notes.append(
                f"{path} starts over at step {min(new)}, before or at the first step of "
                f"{', '.join(kept)} ({earliest}): a new run written into the same directory; "
                "only the newest run is reported (give each run its own directory)"
            )
            read(path, run)
            earliest, kept = min(new), []
        elif new:
            earliest = min(new) if earliest is None else min(earliest, min(new))
        kept.append(path)
    return run
