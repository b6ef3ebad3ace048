"""TensorBoard event files, written on the monitor's own thread with a checksum computed in C.

TensorBoard's record format (the TFRecord framing of ``Event`` protos) checksums every record
with CRC-32C. Without TensorFlow, ``tensorboard`` computes it in pure Python, one byte at a
time: ~125 ns per byte, ~0.25 ms for a 2 KB record. ``torch.utils.tensorboard`` does that on a
third thread that holds the GIL while it runs, so the training thread (which hands the GIL back
and forth around every PyTorch kernel) waits for it. For the monitor's own output that was the
largest single cost of a sampled step. Here the checksum comes from ``google-crc32c``'s C code
(a dependency of the ``tensorboard`` extra) and records are written synchronously on the
monitor's writer thread, which is already off the training thread. With a ``SummaryWriter``
passed in, the monitor writes this file of its own into that writer's directory (TensorBoard
reads all event files of a directory as one run) and never touches the writer itself.
The scalars and histograms of a sampled step are encoded without protobuf objects
(:func:`encode_event`).
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, BinaryIO

_MASK_DELTA = 0xA282EAD8
_uid = itertools.count()
SUFFIX = "activation-monitor"  # ends our file names: never the name of a SummaryWriter's file


@functools.cache
def _crc32c_function() -> tuple[Callable[[bytes], int], bool]:
    """(crc32c(bytes) -> int, whether it is compiled code), chosen once, on first use."""
    try:
        import google_crc32c

        if getattr(google_crc32c, "implementation", "c") == "c":
            return google_crc32c.value, True
    except ImportError:
        pass
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

    return crc32c, False


def fast_crc() -> bool:
    """Whether checksums are computed by compiled code (``google-crc32c`` is installed)."""
    return _crc32c_function()[1]


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of TFRecord framing (the same value TensorBoard computes)."""
    crc = _crc32c_function()[0](data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record: length, its masked CRC, the data, the data's masked CRC (little-endian)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# -- Event encoding -----------------------------------------------------------------------------
# The monitor's scalars and histograms, encoded straight into the protobuf wire format of
# TensorBoard's ``Event`` (a fixed, stable schema): building ~20 protobuf objects per sampled step
# cost more than everything else the writer does for a small model. Field numbers are those of
# tensorboard/compat/proto/{event,summary}.proto; tests read the result back with TensorBoard.


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(key: int, payload: bytes) -> bytes:
    """A length-delimited field (``key`` = field number << 3 | 2)."""
    return bytes((key,)) + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=8192)
def _scalar_prefix(tag: str) -> bytes:
    """Summary.value entry for ``tag`` up to its 4-byte float (Summary.Value: tag=1, simple_value=2)."""
    head = _field(0x0A, tag.encode()) + b"\x15"
    return b"\x0a" + _varint(len(head) + 4) + head


_HISTO_HEAD = struct.Struct("<BdBdBdBdBd")


def encode_value_scalar(tag: str, value: float) -> bytes:
    """One ``Summary.Value`` with ``simple_value``, as a field of ``Summary``."""
    return _scalar_prefix(tag) + struct.pack("<f", value)


def encode_value_histogram(
    tag: str, mn: float, mx: float, num: float, total: float, sum_squares: float, limits: Any, counts: Any
) -> bytes:
    """One ``Summary.Value`` with a ``HistogramProto`` (limits/counts: float64 arrays), as a field of ``Summary``."""
    histo = (
        _HISTO_HEAD.pack(0x09, mn, 0x11, mx, 0x19, num, 0x21, total, 0x29, sum_squares)
        + _field(0x32, limits.astype("<f8", copy=False).tobytes())  # bucket_limit, packed
        + _field(0x3A, counts.astype("<f8", copy=False).tobytes())  # bucket, packed
    )
    return _field(0x0A, _field(0x0A, tag.encode()) + _field(0x2A, histo))


def encode_event(step: int, values: list[bytes], wall_time: float | None = None) -> bytes:
    """An ``Event`` (wall_time=1, step=2, summary=5) whose summary holds the encoded ``values``."""
    wall = time.time() if wall_time is None else wall_time
    return b"\x09" + struct.pack("<d", wall) + b"\x10" + _varint(int(step)) + _field(0x2A, b"".join(values))


def _create_event_file(logdir: str) -> tuple[str, BinaryIO]:
    """A new event file in ``logdir``, created exclusively (``"xb"``): the next counter if the name exists."""
    stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    for _ in range(10_000):
        path = os.path.join(logdir, f"{stem}.{next(_uid)}.{SUFFIX}")
        try:
            return path, open(path, "xb")  # closed by EventFileWriter.close()
        except FileExistsError:
            continue
    raise FileExistsError(f"no free event file name in {logdir!r} (tried {stem}.<n>.{SUFFIX})")


class EventFileWriter:
    """A minimal, synchronous stand-in for ``SummaryWriter``'s file writer.

    Writes one ``events.out.tfevents.<time>.<host>.<pid>.<n>.activation-monitor`` file in
    ``logdir`` (read by TensorBoard like any other; the suffix keeps it apart from the files of a
    ``SummaryWriter`` opened in the same directory in the same second, and the file is created
    exclusively, never truncating an existing one), makes it visible to readers at least every
    ``flush_secs`` seconds, and does everything on the calling thread: no queue, no extra thread.
    Not thread-safe; the monitor calls it from its writer thread only. Construction creates the
    directory and the file, so it can fail like any file I/O.

    >>> import tempfile
    >>> from tensorboard.compat.proto.summary_pb2 import Summary
    >>> w = EventFileWriter(tempfile.mkdtemp())
    >>> w.add_summary(Summary(value=[Summary.Value(tag="loss", simple_value=0.5)]), step=1)
    >>> w.close()
    """

    def __init__(self, logdir: str | os.PathLike[str], flush_secs: float = 5.0) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SourceMetadata

        self.log_dir = os.fspath(logdir)
        os.makedirs(self.log_dir, exist_ok=True)
        self.path, self._file = _create_event_file(self.log_dir)
        self._event = Event
        self.flush_secs = flush_secs
        self._last_flush = time.monotonic()
        self.closed = False
        try:
            source = SourceMetadata(writer=SUFFIX)
            self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2", source_metadata=source))
            self.flush()
        except BaseException:
            self.closed = True
            self._file.close()
            raise

    def get_logdir(self) -> str:
        return self.log_dir

    def add_event(self, event: Any) -> None:
        self.add_encoded(event.SerializeToString())

    def add_encoded(self, event: bytes) -> None:
        """Write an already serialized ``Event`` (see :func:`encode_event`)."""
        self._file.write(frame(event))
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def add_summary(self, summary: Any, step: int | None = None, walltime: float | None = None) -> None:
        event = self._event(summary=summary, wall_time=time.time() if walltime is None else walltime)
        if step is not None:
            event.step = int(step)
        self.add_event(event)

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()
