"""TensorBoard output, read back with TensorBoard's own event reader."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from models import WineClassifier, mlp
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from monitor import Monitor
from monitor.render import CARD_WIDTH, MARGIN, NAN_RGB, ScanRow, colorize, render_scan, render_timeline, unit_layout


def read(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def png(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


@pytest.fixture
def half_dead_run(tmp_path):
    """An MLP whose first ReLU layer has exactly units 0..7 dead (bias -50), trained for 6 steps."""
    torch.manual_seed(0)
    model = mlp(width=16, depth=2)
    with torch.no_grad():
        model.fc0.bias[:8] = -50.0
    opt = torch.optim.SGD(model.parameters(), 1e-3)
    x = torch.randn(128, 13)
    seen: dict[str, torch.Tensor] = {}  # the outputs of the last sampled step (4), seen by hooks of our own

    def keep(name):
        return lambda m, a, o: seen.__setitem__(name, o.detach().clone())

    with Monitor(model, every_n_steps=2, logdir=tmp_path, on_alert="ignore", images_every_n_samples=1) as mon:
        for step in range(6):
            hooks = [getattr(model, n).register_forward_hook(keep(n)) for n in ("act0", "act1")] if step == 4 else []
            with mon.step(step):
                loss = model(x).pow(2).mean()
            for h in hooks:
                h.remove()
            loss.backward()
            opt.step()
            opt.zero_grad()
    return tmp_path, mon, seen


def test_scalars_one_section_per_metric_all_layers(half_dead_run):
    logdir, mon, seen = half_dead_run
    ea = read(logdir)
    tags = set(ea.Tags()["scalars"])
    for metric in ("dead_fraction", "firing_rate", "rms", "max_abs", "nonfinite"):
        assert {f"activation_{metric}/act0", f"activation_{metric}/act1"} <= tags
    dead = ea.Scalars("activation_dead_fraction/act0")
    assert [e.step for e in dead] == [0, 2, 4]
    assert [e.value for e in dead] == [0.5, 0.5, 0.5]
    # values agree with the last sampled step's output, seen by our own hook
    rms = ea.Scalars("activation_rms/act0")[-1].value
    assert rms == pytest.approx(float(seen["act0"].pow(2).mean().sqrt()), rel=1e-5)


def test_histograms_are_written(half_dead_run):
    logdir, _, seen = half_dead_run
    ea = read(logdir)
    h = ea.Histograms("activation_hist/act1")[-1].histogram_value
    assert h.num == pytest.approx(128 * 16)
    assert sum(h.bucket) == pytest.approx(128 * 16)
    out = seen["act1"]  # min, max and the sum of squares are exact, not taken from the sampled values
    assert (h.min, h.max) == pytest.approx((float(out.min()), float(out.max())), rel=1e-6)
    assert h.sum_squares == pytest.approx(float(out.double().pow(2).sum()), rel=1e-5)


def test_alerts_go_to_the_text_tab(half_dead_run):
    logdir, mon, *_ = half_dead_run
    ea = read(logdir)
    # exactly half of act0 is dead and the default threshold is ">= 50%": one alert, at step 0
    assert [(a.step, a.layer, a.kind) for a in mon.alerts] == [(0, "act0", "dead")]
    events = ea.Tensors("activation_alerts/text_summary")
    assert [e.step for e in events] == [0]
    assert mon.alerts[0].message in events[0].tensor_proto.string_val[0].decode()


def test_scan_and_timeline_images(half_dead_run):
    logdir, mon, *_ = half_dead_run
    ea = read(logdir)
    tags = set(ea.Tags()["images"])
    assert {"activation_scan", "activation_timeline/act0", "activation_timeline/act1"} <= tags
    scan = png(ea.Images("activation_scan")[-1])
    assert scan.shape[0] >= 60 and scan.shape[1] == CARD_WIDTH  # TensorBoard's card: shown pixel for pixel
    # The act0 row: its left half (dead units 0..7) is the colour of 0, the right half is not.
    cell = unit_layout(16, CARD_WIDTH - 2 * MARGIN).cell  # 21 px per unit
    dark = colorize(np.array([0.0]))[0]
    rows = [y for y in range(scan.shape[0]) if (scan[y] == dark).all(-1).sum() >= 8 * cell]
    assert rows, "no row with dead units found"
    y = rows[0]
    row = scan[y]
    dark_cols = np.flatnonzero((row == dark).all(-1))
    assert dark_cols.tolist() == list(range(MARGIN, MARGIN + 8 * cell))  # units 0..7, 21 px each
    timeline = png(ea.Images("activation_timeline/act0")[-1])
    assert timeline.shape[0] > 16 * 2 and timeline.shape[1] == CARD_WIDTH


def test_alert_fires_and_is_logged(tmp_path):
    model = mlp(width=16, depth=1)
    with torch.no_grad():
        model.fc0.bias.fill_(-50.0)
    with Monitor(model, every_n_steps=1, logdir=tmp_path, on_alert="ignore") as mon, mon.step(0):
        model(torch.randn(128, 13))
    ea = read(tmp_path)
    text = ea.Tensors("activation_alerts/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "ALERT step 0 | act0 | dead: 16/16 units" in text
    assert mon.alerts[0].message in text


def test_an_existing_writer_is_used_and_left_open(tmp_path):
    writer = SummaryWriter(tmp_path)
    writer.add_scalar("train/loss", 1.0, 0)
    model = WineClassifier()
    with Monitor(model, every_n_steps=1, writer=writer, on_alert="ignore") as mon, mon.step(0):
        model(torch.randn(32, 13))
    writer.add_scalar("train/loss", 0.5, 1)  # still open
    writer.close()
    tags = read(tmp_path).Tags()["scalars"]
    assert "train/loss" in tags and "activation_dead_fraction/dense0.relu" in tags


def test_event_checksums_match_tensorboards_own():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    from monitor.eventfile import fast_crc, masked_crc32c

    assert fast_crc(), "google-crc32c (a dependency of the tensorboard extra) should provide compiled code"
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 255, 4096, 10_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == reference(data)


@pytest.mark.parametrize("step", [0, 1, 127, 128, 2**40])
def test_directly_encoded_events_equal_protobufs_built_by_tensorboard(step):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    from monitor.eventfile import encode_event, encode_value_histogram, encode_value_scalar

    tag = "activation_rms/" + "layers.0.linear" * 12  # a tag longer than 127 bytes: two-byte lengths
    limits, counts = np.array([-1e-4, 0.0, 0.5, 2.0]), np.array([0.0, 10.0, 3.0, 1.5])
    data = encode_event(
        step,
        [encode_value_scalar("a/b", 0.25), encode_value_scalar(tag, -3.5),
         encode_value_histogram("h/x", -1.0, 2.0, 14.5, 9.5, 20.0, limits, counts)],
        wall_time=1234.5,
    )
    expected = Event(wall_time=1234.5, step=step, summary=Summary(value=[
        Summary.Value(tag="a/b", simple_value=0.25),
        Summary.Value(tag=tag, simple_value=-3.5),
        Summary.Value(tag="h/x", histo=HistogramProto(
            min=-1.0, max=2.0, num=14.5, sum=9.5, sum_squares=20.0, bucket_limit=limits.tolist(), bucket=counts.tolist()
        )),
    ]))
    assert Event.FromString(data) == expected


def test_own_event_file_is_readable_while_open_and_after_close(tmp_path):
    from tensorboard.compat.proto.summary_pb2 import Summary

    from monitor.eventfile import EventFileWriter

    w = EventFileWriter(tmp_path, flush_secs=0.0)  # every record reaches the file at once
    for step in range(3):
        w.add_summary(Summary(value=[Summary.Value(tag="x", simple_value=step / 2)]), step)
    assert [(e.step, e.value) for e in read(tmp_path).Scalars("x")] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    w.add_summary(Summary(value=[Summary.Value(tag="x", simple_value=9.0)]), 3)
    w.close()
    assert [e.value for e in read(tmp_path).Scalars("x")] == [0.0, 0.5, 1.0, 9.0]


def writer_parts(writer):
    """The objects inside a torch SummaryWriter: writer, file writer, event writer, async writer, record writer."""
    fw = vars(writer)["file_writer"]
    ew = vars(fw)["event_writer"]
    aw = vars(ew)["_async_writer"]
    rw = vars(aw)["_writer"]
    return {"writer": writer, "file_writer": fw, "event_writer": ew, "async_writer": aw, "record_writer": rw}


def identities(objs):
    """{name: (id(obj), {attribute: id(value)})}: any replaced, added or removed attribute shows."""
    return {name: (id(o), {k: id(v) for k, v in vars(o).items()}) for name, o in objs.items()}


def test_an_existing_writer_is_left_untouched_and_both_files_read_as_one_run(tmp_path):
    from tensorboard.summary.writer.record_writer import RecordWriter

    writer = SummaryWriter(tmp_path)
    parts = writer_parts(writer)
    before = identities(parts)
    model = WineClassifier()
    with Monitor(model, every_n_steps=1, writer=writer, on_alert="ignore") as mon:
        for step in range(3):
            with mon.step(step):
                model(torch.randn(32, 13))
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)  # the user's own events, their own file
    assert identities(writer_parts(writer)) == before  # nothing replaced, added or removed, anywhere inside
    record_writer = parts["record_writer"]
    assert "write" not in vars(record_writer) and type(record_writer).write is RecordWriter.write
    writer.add_scalar("train/loss", 0.25, 3)  # still open: the monitor neither closed nor used it
    writer.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and sum(f.endswith(".activation-monitor") for f in files) == 1
    ea = read(tmp_path)  # one run; TensorBoard's reader verifies every record's checksum
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert [e.step for e in ea.Scalars("activation_rms/dense0.relu")] == [0, 1, 2]
    assert {"activation_scan", "activation_timeline/dense0.relu"} <= set(ea.Tags()["images"])


def test_own_file_never_shares_a_name_with_a_writer_opened_in_the_same_second(tmp_path, monkeypatch):
    import itertools
    import time

    from tensorboard.compat.proto.summary_pb2 import Summary

    from monitor import eventfile

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)  # every file below: the same second
    first = SummaryWriter(tmp_path)
    first.add_scalar("user/first", 1.0, 0)
    counter = int(next(tmp_path.iterdir()).name.rsplit(".", 1)[1])
    # Our counter at the value TensorBoard gives the next writer: the old names would be equal.
    monkeypatch.setattr(eventfile, "_uid", itertools.count(counter + 1))
    ours = eventfile.EventFileWriter(tmp_path)
    second = SummaryWriter(tmp_path)
    second.add_scalar("user/second", 2.0, 0)
    ours.add_summary(Summary(value=[Summary.Value(tag="ours", simple_value=3.0)]), 0)
    for w in (first, ours, second):
        w.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3
    # the second writer's file has the name ours had before (same time, host, pid and counter)
    assert os.path.basename(ours.path).removesuffix(".activation-monitor") in names
    assert ours.path.endswith(f".{counter + 1}.activation-monitor") and "tfevents.1700000000." in ours.path
    ea = read(tmp_path)
    assert [ea.Scalars(t)[0].value for t in ("user/first", "ours", "user/second")] == [1.0, 3.0, 2.0]


def test_own_file_is_created_exclusively_and_takes_the_next_name(tmp_path, monkeypatch):
    import itertools
    import time

    from monitor import eventfile

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    monkeypatch.setattr(eventfile, "_uid", itertools.count(5))
    taken = eventfile.EventFileWriter(tmp_path)
    taken.close()
    content = Path(taken.path).read_bytes()
    monkeypatch.setattr(eventfile, "_uid", itertools.count(5))  # would produce the same name again
    w = eventfile.EventFileWriter(tmp_path)
    w.close()
    assert w.path != taken.path and w.path.endswith(".6.activation-monitor")
    assert Path(taken.path).read_bytes() == content  # not truncated


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"writer": "runs/oops"}, TypeError, "pass logdir='runs/oops' instead"),
        ({"logdir": 123}, TypeError, "Expected `logdir` to be a directory path (str or os.PathLike), got 123 (int)"),
        ({"writer": object()}, TypeError, "get_logdir() or a logdir/log_dir attribute) or an object with add_scalar"),
        ({"logdir": ""}, ValueError, "got an empty string"),
        ({}, ValueError, "Expected `logdir` or `writer`, got neither"),
    ],
)
def test_sink_types_are_checked_at_construction(kwargs, exc, needle):
    from monitor.tensorboard import TensorBoardSink

    with pytest.raises(exc) as e:
        TensorBoardSink(**kwargs)
    assert needle in str(e.value)


def test_construction_does_no_io_and_the_file_appears_on_the_first_write(tmp_path):
    from monitor.sinks import SampleRecord
    from monitor.tensorboard import TensorBoardSink

    target = tmp_path / "not" / "yet"
    sink = TensorBoardSink(logdir=target)
    assert not (tmp_path / "not").exists() and sink.path is None
    sink.write(SampleRecord(step=0, layers=[]))
    assert sink.path is not None and os.path.dirname(sink.path) == str(target)
    sink.close()
    writer = SummaryWriter(tmp_path / "user")
    sink = TensorBoardSink(writer=writer)
    assert sink.logdir == str(writer.get_logdir()) and len(list((tmp_path / "user").iterdir())) == 1
    sink.close()  # nothing written: no file of ours
    assert len(list((tmp_path / "user").iterdir())) == 1
    writer.close()


def test_nonfinite_units_are_red_and_values_do_not_crash_the_writer(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    x = torch.randn(32, 4)
    x[0, 0] = float("nan")
    with Monitor(model, every_n_steps=1, logdir=tmp_path, on_alert="ignore") as mon, mon.step(0):
        model(x)
    ea = read(tmp_path)
    assert ea.Scalars("activation_nonfinite/1")[0].value == 8  # row 0 is NaN in every unit
    scan = png(ea.Images("activation_scan")[0])
    assert (scan == np.array(NAN_RGB)).all(-1).sum() > 100


def test_render_shapes_and_labels():
    rows = [ScanRow("a", np.linspace(0, 1, 1000), "firing"), ScanRow("b", np.array([np.nan, 0.5]), "rms")]
    pic = render_scan(rows, step=7)
    rgb = pic.rgb()
    assert rgb.shape[1] == CARD_WIDTH and rgb.dtype == np.uint8
    decoded = Image.open(io.BytesIO(pic.png()))  # our own PNG writer, read by Pillow's decoder
    assert decoded.size == (rgb.shape[1], rgb.shape[0]) and decoded.mode == "P"
    assert (np.asarray(decoded) == pic.pixels).all() and (np.asarray(decoded.convert("RGB")) == rgb).all()
    tl = render_timeline("a", "firing rate", np.random.rand(300, 20), list(range(0, 1000, 50)))
    assert tl.pixels.shape[0] >= 256  # 300 units binned into at most 256 rows, >= 1 px each


def test_own_event_file_is_visible_after_each_batch_without_flush(tmp_path):
    model = WineClassifier()
    mon = Monitor(model, every_n_steps=1, logdir=tmp_path, on_alert="ignore").attach()
    try:
        with mon.step(0):
            model(torch.randn(32, 13))
        mon._dispatcher.max_batch = 1  # hand the next step over at once, as a 2 s old batch would be
        with mon.step(1):
            model(torch.randn(32, 13))
        mon.health()  # waits until the writer has processed both steps; no sink flush
        assert [e.step for e in read(tmp_path).Scalars("activation_rms/dense0.relu")] == [0, 1]
    finally:
        mon.close()


def test_a_remote_logdir_gets_a_file_writer_of_ours_opened_on_the_first_write(tmp_path):
    pytest.importorskip("fsspec")  # TensorBoard's file system layer serves memory:// through fsspec
    from monitor.tensorboard import TensorBoardSink

    logdir = f"memory://activation-monitor-test/{tmp_path.name}"
    model = WineClassifier()
    sink = TensorBoardSink(logdir=logdir)
    assert sink.path is None and sink._out is None  # nothing opened yet
    with Monitor(model, every_n_steps=1, sinks=[sink], on_alert="ignore") as mon:
        for step in range(2):
            with mon.step(step):
                model(torch.randn(32, 13))
    assert [e.step for e in read(logdir).Scalars("activation_rms/dense0.relu")] == [0, 1]
