"""TensorBoard output, read back with TensorBoard's own event reader."""

import io

import numpy as np
import pytest
import torch
from models import WineClassifier, mlp
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from monitor import Monitor
from monitor.render import NAN_RGB, ScanRow, colorize, render_scan, render_timeline


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
    with Monitor(model, every_n_steps=2, logdir=tmp_path, on_alert="ignore", images_every_n_samples=1) as mon:
        for step in range(6):
            with mon.step(step):
                loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    return tmp_path, mon, model, x


def test_scalars_one_section_per_metric_all_layers(half_dead_run):
    logdir, mon, model, x = half_dead_run
    ea = read(logdir)
    tags = set(ea.Tags()["scalars"])
    for metric in ("dead_fraction", "firing_rate", "rms", "max_abs", "nonfinite"):
        assert {f"activation_{metric}/act0", f"activation_{metric}/act1"} <= tags
    dead = ea.Scalars("activation_dead_fraction/act0")
    assert [e.step for e in dead] == [0, 2, 4]
    assert [e.value for e in dead] == [0.5, 0.5, 0.5]
    # values agree with an independent computation on the last sampled step's input
    with torch.no_grad():
        h0 = model.act0(model.fc0(x))
    rms = ea.Scalars("activation_rms/act0")[-1].value
    assert rms == pytest.approx(float(h0.pow(2).mean().sqrt()), rel=1e-3)


def test_histograms_are_written(half_dead_run):
    logdir, *_ = half_dead_run
    ea = read(logdir)
    h = ea.Histograms("activation_hist/act1")[-1].histogram_value
    assert h.num == pytest.approx(128 * 16)
    assert sum(h.bucket) == pytest.approx(128 * 16)
    assert h.min >= 0.0 and h.max > 0  # ReLU outputs


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
    assert scan.shape[0] >= 60 and scan.shape[1] >= 640
    # The act0 row: its left half (dead units 0..7) is the colour of 0, the right half is not.
    dark = colorize(np.array([0.0]))[0]
    rows = [y for y in range(scan.shape[0]) if (scan[y] == dark).all(-1).sum() > 200]
    assert rows, "no row with dead units found"
    y = rows[0]
    row = scan[y]
    dark_cols = np.flatnonzero((row == dark).all(-1))
    assert dark_cols.size == pytest.approx(320, abs=2)  # 8 of 16 units over 640 px
    timeline = png(ea.Images("activation_timeline/act0")[-1])
    assert timeline.shape[0] > 16 * 2


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


def test_an_existing_writer_keeps_writing_valid_records_after_the_speed_up(tmp_path):
    writer = SummaryWriter(tmp_path)
    model = WineClassifier()
    with Monitor(model, every_n_steps=1, writer=writer, on_alert="ignore") as mon:
        for step in range(3):
            with mon.step(step):
                model(torch.randn(32, 13))
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)  # the user's own events, same file
    record_writer = writer._get_file_writer().event_writer._async_writer._writer
    assert getattr(record_writer, "_activation_monitor_fast", False)
    writer.close()
    ea = read(tmp_path)  # TensorBoard's reader verifies every record's checksum
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [e.step for e in ea.Scalars("activation_rms/dense0.relu")] == [0, 1, 2]


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
    assert rgb.shape[1] >= 640 and rgb.dtype == np.uint8
    assert Image.open(io.BytesIO(pic.png())).size == (rgb.shape[1], rgb.shape[0])
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
