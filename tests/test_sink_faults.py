"""Faults in the TensorBoard output never stop training, and a user's writer is never touched.

Every writer here is a real one made to fail: a directory under a regular file (ENOTDIR), our event
file's file object swapped for ``/dev/full`` (ENOSPC from the kernel), a ``SummaryWriter`` whose file
writer reports a full disk. (The tests run as root: permission bits would not stop anything.) Each
case checks one warning naming the failure, a training loop that runs to the end, alerts and health
still produced (``act0`` is killed by a bias of -100), and, where the user's writer is involved, that
not one attribute of it or of anything inside it was replaced, added or removed.
"""

import errno
import shutil
import threading
import warnings

import pytest
import torch
from models import mlp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.writer import FileWriter

from monitor import Monitor, MonitorWarning
from monitor.sinks import Dispatcher, SampleRecord, Sink
from monitor.tensorboard import TensorBoardSink

STEPS = 6
ENOSPC = "No space left on device"


def read(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def dead_model():
    torch.manual_seed(0)
    model = mlp(width=16, depth=2)
    with torch.no_grad():
        model.fc0.bias.fill_(-100.0)  # every unit of act0 is dead from the first step on
    return model


def run(before_close=None, **kwargs):
    """Train STEPS steps under a monitor; (monitor, MonitorWarning messages, steps done, health at the end)."""
    model = dead_model()
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    x = torch.randn(64, 13)
    done = 0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        kwargs.setdefault("images_every_n_samples", 100)  # the last sample's images are drawn at close
        with Monitor(model, every_n_steps=1, on_alert="ignore", **kwargs) as mon:
            for step in range(STEPS):
                with mon.step(step):
                    loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                done += 1
                if step == STEPS // 2:
                    mon.flush()  # the sinks' flush, in the middle of training
            mon.flush()
            if before_close is not None:
                before_close()
        health = mon.health()
    messages = [str(w.message) for w in rec if issubclass(w.category, MonitorWarning)]
    return mon, messages, done, health


_REFERENCE: list = []


def reference_alerts():
    """(step, layer, kind) of the alerts of the same run with no output at all."""
    if not _REFERENCE:
        mon, messages, done, _ = run()
        assert messages == [] and done == STEPS
        _REFERENCE.extend((a.step, a.layer, a.kind) for a in mon.alerts)
        assert ("act0", "dead") in {(layer, kind) for _, layer, kind in _REFERENCE}
    return _REFERENCE


def assert_training_went_on(mon, done, health):
    assert done == STEPS
    assert [(a.step, a.layer, a.kind) for a in mon.alerts] == reference_alerts()  # act0 dead, and nothing missed
    assert set(health) == {"act0", "act1"} and health["act0"].dead_fraction == 1.0
    assert health["act0"].step == STEPS - 1  # judged up to the last step


def assert_one_warning(messages, *needles):
    assert len(messages) == 1, messages
    for needle in needles:
        assert needle in messages[0], messages[0]
    assert "disabled and training continues" in messages[0]


def identities(*objs):
    """(id(obj), {attribute: id(value)}) of each object: a replaced, added or removed attribute shows."""
    return [(id(o), {k: id(v) for k, v in vars(o).items()}) for o in objs]


def torch_writer_parts(writer):
    """The writer and everything inside it that a speed-up or a private queue would have touched."""
    fw = vars(writer)["file_writer"]
    if fw is None:
        return [writer]
    ew = vars(fw)["event_writer"]
    aw = vars(ew)["_async_writer"]
    return [writer, fw, ew, aw, vars(aw)["_writer"]]


class FullDiskFileWriter(FileWriter):
    """torch's FileWriter on a disk that is full: every event (and, optionally, flush) fails with ENOSPC."""

    fail_flush = False

    def add_event(self, event, step=None, walltime=None):
        raise OSError(errno.ENOSPC, ENOSPC)

    def flush(self):
        if self.fail_flush:
            raise OSError(errno.ENOSPC, ENOSPC)
        super().flush()


class FullDiskWriter(SummaryWriter):
    """A torch SummaryWriter whose every write (add_scalar, add_image, ...) fails with ENOSPC."""

    file_writer_class = FullDiskFileWriter

    def _get_file_writer(self):
        if self.file_writer is None:
            self.file_writer = self.file_writer_class(self.log_dir)
            self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
        return self.file_writer


class FlushFailsFileWriter(FullDiskFileWriter):
    fail_flush = True

    def add_event(self, event, step=None, walltime=None):
        FileWriter.add_event(self, event, step, walltime)  # writes work; only flushing fails


class FlushFailsWriter(FullDiskWriter):
    file_writer_class = FlushFailsFileWriter


class NoDirLogger:
    """A logging facade over a SummaryWriter that shows no directory (so it is used through add_*)."""

    def __init__(self, writer):
        self._w = writer

    def add_scalar(self, *a, **k):
        self._w.add_scalar(*a, **k)

    def add_histogram_raw(self, *a, **k):
        self._w.add_histogram_raw(*a, **k)

    def add_image(self, *a, **k):
        self._w.add_image(*a, **k)

    def add_text(self, *a, **k):
        self._w.add_text(*a, **k)

    def flush(self):
        self._w.flush()


def own_sink_on_dev_full(tmp_path, buffering):
    """A TensorBoardSink whose (already created) event file now writes to /dev/full."""
    sink = TensorBoardSink(logdir=tmp_path)
    events = sink._output()  # our own EventFileWriter, opened early to swap its file
    events.flush_secs = 1e9  # flushed by batch_done/flush/close only
    real, events._file = events._file, open("/dev/full", "wb", buffering=buffering)  # noqa: SIM115
    real.close()
    return sink


# -- our own event file ----------------------------------------------------------------------------


def test_a_logdir_under_a_regular_file_warns_once_on_the_first_write(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    mon, messages, done, health = run(logdir=tmp_path / "file" / "run")  # constructing does no I/O
    assert_one_warning(messages, "TensorBoardSink.write failed", "NotADirectoryError")
    assert_training_went_on(mon, done, health)


def test_every_write_failing_with_enospc_warns_once(tmp_path):
    sink = own_sink_on_dev_full(tmp_path, buffering=0)  # every write(2) hits the full device
    mon, messages, done, health = run(sinks=[sink])
    assert_one_warning(messages, "TensorBoardSink.write failed", ENOSPC)
    assert_training_went_on(mon, done, health)
    assert sink._out.closed  # the dropped sink was closed (quietly): no file left open


def test_a_flush_failing_with_enospc_warns_once(tmp_path):
    sink = own_sink_on_dev_full(tmp_path, buffering=1 << 20)  # writes fill the buffer; flushing it fails
    mon, messages, done, health = run(sinks=[sink])
    assert_one_warning(messages, ENOSPC)
    assert "TensorBoardSink.batch_done failed" in messages[0] or "TensorBoardSink.flush failed" in messages[0]
    assert_training_went_on(mon, done, health)


def test_a_close_failing_with_enospc_warns_once_and_what_was_flushed_is_on_disk(tmp_path):
    sink = TensorBoardSink(logdir=tmp_path)

    def disk_fills_up():
        events = sink._out
        real, events._file = events._file, open("/dev/full", "wb", buffering=1 << 20)  # noqa: SIM115
        real.close()  # everything written so far was flushed by mon.flush()

    mon, messages, done, health = run(before_close=disk_fills_up, sinks=[sink])
    assert_one_warning(messages, "TensorBoardSink.close failed", ENOSPC)  # the final images did not fit
    assert_training_went_on(mon, done, health)
    assert [e.step for e in read(tmp_path).Scalars("activation_dead_fraction/act0")] == list(range(STEPS))


def test_without_faults_everything_is_on_disk_after_close(tmp_path):
    mon, messages, done, health = run(logdir=tmp_path)
    assert messages == []
    assert_training_went_on(mon, done, health)
    ea = read(tmp_path)
    assert [e.step for e in ea.Scalars("activation_dead_fraction/act0")] == list(range(STEPS))
    drawn = sorted({a.step for a in mon.alerts if not a.recovered} | {STEPS - 1})  # on each alert, and at close
    assert [e.step for e in ea.Images("activation_timeline/act0")] == drawn


# -- a writer passed in ----------------------------------------------------------------------------


def test_a_summary_writer_whose_directory_is_under_a_regular_file(tmp_path):
    writer = SummaryWriter(tmp_path / "a" / "run")
    writer.close()  # its file writer would be reopened on the next add_*: which now cannot work
    shutil.rmtree(tmp_path / "a")
    (tmp_path / "a").write_text("now a regular file")
    with pytest.raises(NotADirectoryError):
        SummaryWriter(tmp_path / "a" / "run")
    before = identities(writer)
    mon, messages, done, health = run(writer=writer)  # construction must not raise
    assert_one_warning(messages, "TensorBoardSink.write failed", "NotADirectoryError")
    assert_training_went_on(mon, done, health)
    assert identities(writer) == before and writer.file_writer is None  # never reopened by us


def test_a_summary_writer_on_a_full_disk_is_never_written_to(tmp_path):
    writer = FullDiskWriter(tmp_path)
    with pytest.raises(OSError, match=ENOSPC):
        writer.add_scalar("train/loss", 1.0, 0)  # the user's own writes fail ...
    parts = torch_writer_parts(writer)
    before = identities(*parts)
    mon, messages, done, health = run(writer=writer)
    assert messages == []  # ... ours never go through it: our own file in its directory
    assert_training_went_on(mon, done, health)
    assert identities(*torch_writer_parts(writer)) == before
    ea = read(tmp_path)
    assert [e.step for e in ea.Scalars("activation_dead_fraction/act0")] == list(range(STEPS))
    writer.close()


def test_a_writer_without_a_directory_failing_on_every_write_warns_once(tmp_path):
    inner = FullDiskWriter(tmp_path)
    logger = NoDirLogger(inner)
    before = identities(logger, *torch_writer_parts(inner))
    mon, messages, done, health = run(writer=logger)
    assert_one_warning(messages, "TensorBoardSink.write failed", ENOSPC)
    assert_training_went_on(mon, done, health)
    assert identities(logger, *torch_writer_parts(inner)) == before
    inner.close()


def test_a_writer_without_a_directory_failing_on_flush_warns_once(tmp_path):
    inner = FlushFailsWriter(tmp_path)
    logger = NoDirLogger(inner)
    mon, messages, done, health = run(writer=logger)
    assert_one_warning(messages, "TensorBoardSink.flush failed", ENOSPC)
    assert_training_went_on(mon, done, health)
    inner.file_writer.fail_flush = False
    inner.close()
    assert read(tmp_path).Scalars("activation_dead_fraction/act0")  # written through its add_scalar


def test_a_lightning_logger_and_its_writer_are_left_untouched(tmp_path):
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path))
    writer = logger.experiment  # what the Lightning callback passes in
    logger.log_metrics({"train/loss": 1.0}, step=0)
    before = identities(logger, *torch_writer_parts(writer))
    mon, messages, done, health = run(writer=writer)
    assert messages == []
    assert_training_went_on(mon, done, health)
    assert identities(logger, *torch_writer_parts(writer)) == before
    logger.finalize("success")
    ea = read(logger.log_dir)
    assert "train/loss" in ea.Tags()["scalars"] and "activation_scan" in ea.Tags()["images"]


# -- the dispatcher ---------------------------------------------------------------------------------


class Recording(Sink):
    def __init__(self, fail_on=()):
        self.fail_on = set(fail_on)
        self.calls = []

    def _maybe_fail(self, what):
        self.calls.append(what)
        if what in self.fail_on:
            raise OSError(errno.ENOSPC, f"{what}: {ENOSPC}")

    def write(self, record):
        self._maybe_fail("write")

    def batch_done(self):
        self._maybe_fail("batch_done")

    def flush(self):
        self._maybe_fail("flush")

    def close(self):
        self._maybe_fail("close")


def test_dispatcher_flush_and_close_failures_warn_once_per_sink_and_never_propagate():
    flush_fails, close_fails, both_fail, healthy = (
        Recording({"flush"}), Recording({"close"}), Recording({"flush", "close"}), Recording()
    )
    warned: list[tuple[str, str]] = []
    seen: set[str] = set()

    def warn_once(key, message):  # the monitor's: one warning per key
        if key not in seen:
            seen.add(key)
            warned.append((key, message))

    d = Dispatcher([flush_fails, close_fails, both_fail, healthy], warn_once)
    for step in range(3):
        d.submit(SampleRecord(step, []))
    d.flush()
    d.submit(SampleRecord(3, []))
    d.flush()
    d.close()  # returns: nothing propagates
    assert [m for _, m in warned] == [
        f"Recording.flush failed (OSError(28, 'flush: {ENOSPC}')); it is disabled and training continues",
        f"Recording.flush failed (OSError(28, 'flush: {ENOSPC}')); it is disabled and training continues",
        f"Recording.close failed (OSError(28, 'close: {ENOSPC}')); it is disabled and training continues",
    ]
    assert len({k for k, _ in warned}) == 3  # keyed per sink
    assert flush_fails.calls == ["write"] * 3 + ["batch_done", "flush", "close"]  # dropped, then closed quietly
    assert both_fail.calls == ["write"] * 3 + ["batch_done", "flush", "close"]  # its close failure: no second warning
    everything = ["write"] * 3 + ["batch_done", "flush", "write", "batch_done", "flush", "close"]
    assert close_fails.calls == healthy.calls == everything


def test_dispatcher_survives_a_warning_that_raises():
    broken, healthy = Recording({"write"}), Recording()

    def warn_once(key, message):  # e.g. warnings turned into errors
        raise MonitorWarning(message)

    d = Dispatcher([broken, healthy], warn_once)
    d.submit(SampleRecord(0, []))
    d.flush()
    d.submit(SampleRecord(1, []))
    t = threading.Thread(target=d.flush)
    t.start()
    t.join(10)
    assert not t.is_alive()  # the writer thread is alive and answering
    d.close()
    assert healthy.calls.count("write") == 2 and broken.calls == ["write", "close"]
