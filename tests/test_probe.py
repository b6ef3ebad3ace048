"""The probe: exact matrices, invisible to training, its schedule and its TensorBoard output.

Ground truth comes from the tests' own forward hooks (eval mode, no_grad) and numpy; TensorBoard
output is read back with TensorBoard's EventAccumulator.
"""

import copy
import io
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import Encoder, SmallCNN, mlp
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_probe_math import hsic_cka
from torch import nn

from monitor import Monitor, MonitorWarning, Options, Sink
from monitor.probeviews import probe_picture


class DropBN(nn.Module):
    """An MLP with BatchNorm1d and Dropout: a ReLU module (act0) and a functional ReLU (fc1.relu)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(13, 32)
        self.bn = nn.BatchNorm1d(32)
        self.act0 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.drop(self.act0(self.bn(self.fc0(x))))
        return self.head(F.relu(self.fc1(h)))


@pytest.fixture(scope="module")
def wine():
    from sklearn.datasets import load_wine
    from sklearn.preprocessing import StandardScaler

    X, y = load_wine(return_X_y=True)
    X = torch.tensor(StandardScaler().fit_transform(X), dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(X), generator=g)
    return X[idx[24:]], y[idx[24:]], X[idx[:24]], y[idx[:24]]  # train, probe (24 samples)


class Collect(Sink):
    """A sink that keeps every probe record (the write_probe protocol)."""

    def __init__(self) -> None:
        self.records = []

    def write(self, record):
        pass

    def write_probe(self, record):
        self.records.append(record)


def train(model, mon, X, y, steps, start=0, lr=1e-2, opt=None):
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(start)
    for step in range(start, start + steps):
        idx = torch.randint(0, len(X), (32,), generator=g)
        with mon.step(step):
            loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return opt


def truth(model, x, layers):
    """{name: [samples, units]} by our own hooks, eval mode, no_grad; ``layers``: name -> (module, fn, reduce dims)."""
    got = {}

    def hook(name, fn, dims):
        return lambda m, a, out: got.__setitem__(name, fn(out).mean(dims) if dims else fn(out))

    handles = [module.register_forward_hook(hook(name, fn, dims)) for name, (module, fn, dims) in layers.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {k: v.numpy() for k, v in got.items()}


def test_probe_matrices_are_the_activations_of_each_probe_sample(wine):
    X, y, px, py = wine
    torch.manual_seed(0)
    model = DropBN()
    mon = Monitor(model, every_n_steps=5, on_alert="ignore", probe=(px, py), probe_labels="targets", probe_loss_fn=F.cross_entropy)
    train(model, mon, X, y, 7)
    result = mon.probe()
    expected = truth(model, px, {"act0": (model.act0, lambda t: t, ()), "fc1.relu": (model.fc1, F.relu, ())})
    assert result.layers == ["act0", "fc1.relu"]
    for name, m in expected.items():
        np.testing.assert_allclose(result.activations[name], m, rtol=1e-6, atol=1e-6)
    assert result.labels == py.tolist()
    model.eval()
    with torch.no_grad():
        assert result.loss == pytest.approx(float(F.cross_entropy(model(px), py)), rel=1e-6)
    for unit in (0, 5, 11):
        col = expected["fc1.relu"][:, unit]
        order = np.argsort(-col, kind="stable")[:4]
        top = result.top("fc1.relu", unit, 4)
        assert [t.sample for t in top] == order.tolist()
        assert [t.value for t in top] == pytest.approx(col[order].tolist())
        assert [t.label for t in top] == [int(py[i]) for i in order]
    with pytest.raises(IndexError, match="16 units"):
        result.top("fc1.relu", 16)
    mon.close()


@pytest.mark.parametrize("as_numpy", [True, False])
def test_a_float64_probe_runs_in_the_models_dtype(wine, as_numpy):
    """What ``StandardScaler`` and ``np.random.randn`` give is float64: the probe runs as float32
    (it raised a dtype error, and the periodic probe runs stopped for good)."""
    X, y, px, py = wine
    torch.manual_seed(0)
    model = DropBN()
    p64 = px.double().numpy() if as_numpy else px.double()
    mon = Monitor(model, every_n_steps=5, on_alert="ignore", probe=(p64, py.numpy() if as_numpy else py),
                  probe_every_n_samples=1, probe_loss_fn=F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)
        train(model, mon, X, y, 11)
        mon.close()  # runs the probe the last sampled step asked for
    result = mon.last_probe
    assert result is not None and result.step == 10
    expected = truth(model, px, {"act0": (model.act0, lambda t: t, ())})
    np.testing.assert_allclose(result.activations["act0"], expected["act0"], rtol=1e-6, atol=1e-6)


def test_conv_and_sequence_outputs_are_averaged_over_their_positions():
    torch.manual_seed(0)
    cnn = SmallCNN()
    x = torch.randn(6, 3, 16, 16)
    mon = Monitor(cnn, on_alert="ignore", probe=x)
    with mon.step(0):
        cnn(torch.randn(8, 3, 16, 16))
    result = mon.probe()
    f = cnn.features
    expected = truth(cnn, x, {"features.1": (f[1], lambda t: t, (2, 3)), "features.4": (f[4], lambda t: t, (2, 3))})
    assert set(expected) <= set(result.activations)
    for name, m in expected.items():
        assert result.activations[name].shape == (6, m.shape[1])
        np.testing.assert_allclose(result.activations[name], m, rtol=1e-5, atol=1e-6)

    enc = Encoder(d=16, layers=1, seq=8)
    tokens = torch.randint(0, 50, (5, 8))
    mon = Monitor(enc, on_alert="ignore", probe=tokens)
    with mon.step(0):
        enc(torch.randint(0, 50, (4, 8)))
    result = mon.probe()
    block = enc.blocks[0]
    expected = truth(enc, tokens, {"blocks.0": (block, lambda t: t, (1,)), "blocks.0.linear1.gelu": (block.linear1, F.gelu, (1,))})
    for name, m in expected.items():
        assert result.activations[name].shape == (5, m.shape[1])  # tokens averaged, one row per sequence
        np.testing.assert_allclose(result.activations[name], m, rtol=1e-5, atol=1e-5)


def snapshot(model, opt):
    return {
        "state": copy.deepcopy(model.state_dict()),  # weights and BatchNorm's running_mean/var/num_batches_tracked
        "opt": copy.deepcopy(opt.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "flags": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "modes": torch._C._len_torch_function_stack(),
    }


def assert_same(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    for ga, gb in zip(a["grads"], b["grads"]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a["flags"] == b["flags"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert a["py_rng"] == b["py_rng"] and np.array_equal(a["np_rng"], b["np_rng"])
    assert a["hooks"] == b["hooks"] and a["modes"] == b["modes"]


def test_a_probe_run_changes_nothing_training_can_see(wine):
    X, y, px, py = wine
    torch.manual_seed(0)
    model = DropBN()
    mon = Monitor(model, every_n_steps=3, on_alert="ignore", probe=(px, py), probe_loss_fn=F.cross_entropy)
    opt = train(model, mon, X, y, 4)
    F.cross_entropy(model(X[:32]), y[:32]).backward()  # gradients pending, as between backward and step
    model.bn.eval()  # a mixed configuration: its flags must come back exactly
    random.random(), np.random.rand()
    before = snapshot(model, opt)
    mon.probe()
    mon.probe(ablate={"act0": [1, 2]}, value="mean")
    mon.layer_importance(loss_fn=F.cross_entropy)
    assert_same(before, snapshot(model, opt))
    assert mon.last_probe is not None and model.bn.training is False and model.drop.training is True
    mon.close()


def run_training(wine, probe: bool, calls: bool):
    """12 steps of DropBN; returns the dropout masks, losses and final weights."""
    X, y, px, py = wine
    torch.manual_seed(0)
    model = DropBN()
    masks = []
    model.drop.register_forward_hook(lambda m, a, out: masks.append((out == 0).clone()))
    kw = dict(probe=px, probe_every_n_samples=1) if probe else {}
    mon = Monitor(model, every_n_steps=2, on_alert="ignore", **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        with mon.step(step):
            loss = F.cross_entropy(model(X[step * 8 : step * 8 + 32]), y[step * 8 : step * 8 + 32])
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
        if calls and step in (3, 4):
            mon.probe()  # by hand, between steps
    mon.close()
    masks = [m for m in masks if m.shape[0] == 32]  # the training forwards (probes run in eval: no dropout)
    return masks, losses, model.state_dict(), mon


def test_training_with_probe_runs_is_bit_for_bit_the_training_without(wine):
    base_masks, base_losses, base_state, _ = run_training(wine, probe=False, calls=False)
    masks, losses, state, mon = run_training(wine, probe=True, calls=True)
    # one after each of the 6 sampled steps (after step 4: the run by hand is that one), 1 more by hand after step 3
    assert mon._probes.runs == 6 + 1
    assert len(masks) == len(base_masks) == 12
    for a, b in zip(masks, base_masks):  # the next batch's dropout mask is the one it would have had
        assert torch.equal(a, b)
    assert losses == base_losses
    for k in base_state:
        assert torch.equal(state[k], base_state[k]), k


def test_probe_values_never_mix_into_the_training_statistics(wine):
    X, y, px, _ = wine
    healths = []
    for inside in (False, True):
        torch.manual_seed(0)
        model = mlp(width=32, depth=2)
        mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False, probe=px * 100.0, gradients=False)
        for step in range(3):
            with mon.step(step):
                out = model(X[:40])
                if inside:
                    mon.probe()  # inside the sampled step: its forward is not recorded
                out.sum().backward()  # (no optimizer: the same weights every step)
        healths.append(mon.health())
        mon.close()
    for name in healths[0]:
        a, b = healths[0][name], healths[1][name]
        assert (a.rms, a.max_abs, a.firing_rate, a.dead_fraction) == (b.rms, b.max_abs, b.firing_rate, b.dead_fraction)


def test_periodic_probes_their_schedule_drift_and_tensorboard_output(wine, tmp_path):
    X, y, px, py = wine
    torch.manual_seed(0)
    model = mlp(width=16, depth=2)
    with torch.no_grad():
        model.fc0.bias[[3, 7]] = -100.0  # units 3 and 7 of act0 never fire: dark columns
    sink = Collect()
    labels = [f"class {c}" for c in py.tolist()]
    with Monitor(model, every_n_steps=2, logdir=tmp_path, on_alert="ignore", sinks=[sink], probe=(px, py),
                 probe_every_n_samples=2, probe_labels=labels, probe_loss_fn=F.cross_entropy) as mon:
        train(model, mon, X, y, 12)
    records = [r for r in sink.records if r.result is not None]
    assert [r.step for r in records] == [0, 4, 8]  # sampled 0, 2, ..., 10; a probe every 2nd sample
    results = [r.result for r in records]
    for prev, cur in zip(results, results[1:]):  # drift against the previous run, computed independently
        for name in ("act0", "act1"):
            a, b = prev.activations[name].astype(np.float64), cur.activations[name].astype(np.float64)
            assert cur.drift[name] == pytest.approx(1 - hsic_cka(a, b), abs=1e-6)  # CKA by its definition
    assert results[0].drift == {}
    assert np.all(results[-1].activations["act0"][:, [3, 7]] == 0)

    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    for name in ("act0", "act1"):
        images = ea.Images(f"activation_probe/{name}")
        assert [e.step for e in images] == [0, 4, 8]
        for e, r in zip(images, results):
            png = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
            assert png.shape[1] == 350  # TensorBoard's card width: shown pixel for pixel
            np.testing.assert_array_equal(png, probe_picture(r, name).rgb())
        drifts = ea.Scalars(f"probe_drift/{name}")
        assert [s.step for s in drifts] == [4, 8]
        assert [s.value for s in drifts] == pytest.approx([r.drift[name] for r in results[1:]], rel=1e-6)
        table = ea.Tensors(f"probe_units/{name}/text_summary")[-1].tensor_proto.string_val[0].decode()
        assert "| unit | mean abs |" in table and f"step 8: {len(px)} probe samples" in table
    assert "| 3 | 0 | (same on every sample) |" in ea.Tensors("probe_units/act0/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert [s.value for s in ea.Scalars("probe_loss")] == pytest.approx([r.loss for r in results], rel=1e-6)


def test_the_favourite_input_changes_are_counted_over_the_run(wine):
    X, y, px, _ = wine
    torch.manual_seed(0)
    model = mlp(width=16, depth=1)
    mon = Monitor(model, on_alert="ignore", probe=px)
    results = []
    for k in range(4):
        train(model, mon, X, y, 3, start=10 * k + 1, lr=5e-2)  # no sampled step: only these probe runs
        results.append(mon.probe())
    counts = np.zeros(16, dtype=int)
    for prev, cur in zip(results, results[1:]):
        a, b = prev.activations["act0"], cur.activations["act0"]
        changed = np.flatnonzero(np.argmax(a, 0) != np.argmax(b, 0))  # all units fire here: argmax is the favourite
        np.testing.assert_array_equal(cur.changed["act0"], changed)
        counts[changed] += 1
        np.testing.assert_array_equal(cur.favourite_changes["act0"], counts)
    assert counts.sum() > 0
    mon.close()


def test_a_failing_probe_warns_once_and_training_goes_on(wine):
    X, y, _, _ = wine
    bad_probe = torch.randn(8, 5)  # the wrong feature count; drawn before the seed, like data loaded beforehand
    torch.manual_seed(0)
    reference = DropBN()
    with Monitor(reference, every_n_steps=1, on_alert="ignore") as ref_mon:  # the same run without a probe
        train(reference, ref_mon, X, y, 4)
    torch.manual_seed(0)
    model = DropBN()
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", probe=bad_probe)
    with pytest.warns(MonitorWarning, match="probe run after step 0 failed") as record:
        train(model, mon, X, y, 4)
    assert len([w for w in record if "probe" in str(w.message)]) == 1
    assert all(m.training for m in model.modules()) and not mon.has_probe
    assert len(mon.health()) == 2  # the training was monitored all along
    mon.close()
    # the failed probe run changed nothing: the weights are bit for bit those of the run without it
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_dict_probes_call_the_model_with_keywords():
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6)
            self.act = nn.Tanh()

        def forward(self, x, scale):
            return self.act(self.lin(x) * scale)

    model = Keywords()
    probe = {"x": np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32), "scale": 2.0}
    mon = Monitor(model, on_alert="ignore", probe=probe)
    result = mon.probe()
    with torch.no_grad():
        expected = torch.tanh(model.lin(torch.as_tensor(probe["x"])) * 2.0).numpy()
    np.testing.assert_allclose(result.activations["act"], expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(probe="x"), TypeError, "Expected `probe` to be a tensor"),
        (dict(probe=(torch.zeros(3, 2), torch.zeros(3), 1)), ValueError, "got 3 elements"),
        (dict(probe=torch.zeros(0, 2)), ValueError, "at least one sample"),
        (dict(probe=torch.zeros(3, 2), probe_labels=[0, 1]), ValueError, r"one label per probe sample \(3\), got 2"),
        (dict(probe=torch.zeros(3, 2), probe_labels="targets"), ValueError, "targets"),
        (dict(probe=torch.zeros(3, 2), probe_every_n_samples=0), ValueError, "`probe_every_n_samples`.*got 0"),
        (dict(probe=torch.zeros(3, 2), probe_loss_fn="mse"), TypeError, "`probe_loss_fn`.*'mse'"),
        (dict(probe_labels=[1, 2]), ValueError, "without a probe"),
    ],
)
def test_probe_options_are_validated_with_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Options(**kwargs)
    with pytest.raises(error, match=match):
        Monitor(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), **kwargs)


def test_probe_every_n_samples_defaults_to_20_and_probe_needs_a_probe():
    assert Options().probe_every_n_samples == 20
    mon = Monitor(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(RuntimeError, match="No probe"):
        mon.probe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.close()


def test_probe_layers_keep_their_training_names_in_library_code():
    """F.relu inside torch's own TransformerEncoderLayer has no call site in user code: the probe,
    called from another line than the training forward, must still find the training's layer."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(4, 6, 16)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", probe=x[:3])
    with mon.step(0):
        model(x)
    result = mon.probe()
    assert result.layers == list(mon.health()) and "0.layers.1.linear1.relu" in result.layers
    with mon.ablate({"0.layers.1.linear1.relu": "all"}), torch.no_grad():
        model.eval()
        ablated = model(x)
    with torch.no_grad():
        first = model[0].layers[0](x)
        second = model[0].layers[1]
        h = second.norm1(first + second._sa_block(first, None, None))
        expected = second.norm2(h + second.linear2(torch.zeros_like(second.linear1(h))))
    torch.testing.assert_close(ablated, expected, rtol=1e-5, atol=1e-5)


def test_a_probe_before_any_training_step_is_written_too(tmp_path):
    model = mlp(width=8, depth=1)
    mon = Monitor(model, logdir=tmp_path, on_alert="ignore", probe=torch.randn(5, 13))  # not attached yet
    mon.probe()
    mon.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    assert [e.step for e in ea.Images("activation_probe/act0")] == [0]


@pytest.mark.parametrize("fails", [False, True])
def test_a_probe_by_hand_right_after_a_sampled_step_is_its_periodic_run(wine, fails):
    """A sampled step asks for a run at the next step; ``mon.probe()`` before it is that run, not
    a second run at the same step (which showed drift 0 against the first). One that raises is
    not: the periodic run still comes."""
    X, y, px, py = wine
    torch.manual_seed(0)
    model = mlp(width=16, depth=2)
    sink = Collect()
    with Monitor(model, every_n_steps=1, on_alert="ignore", sinks=[sink], probe=(px, py), probe_every_n_samples=1) as mon:
        opt = train(model, mon, X, y, 1)
        if fails:
            with pytest.raises(ZeroDivisionError):
                mon.probe(loss_fn=lambda out, target: 1 / 0)
        else:
            by_hand = mon.probe()
        train(model, mon, X, y, 1, start=1, opt=opt)
    records = [r for r in sink.records if r.result is not None]
    assert [r.step for r in records] == [0, 1]
    if not fails:
        assert records[0].result is by_hand
    assert all(v > 0 for v in records[1].result.drift.values())  # the model changed between them


class Log(Sink):
    """Every sample and probe record, in the order the sink receives them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def write(self, record):
        self.seen.append(("sample", record.step))

    def write_probe(self, record):
        self.seen.append(("probe", record.result.step))


def test_a_sink_receives_samples_and_probe_runs_in_step_order(wine):
    """Probe runs reach the sinks through the writer thread too, between the samples around them."""
    X, y, px, py = wine
    torch.manual_seed(0)
    model = mlp(width=16, depth=2)
    sink = Log()
    with Monitor(model, every_n_steps=1, on_alert="ignore", sinks=[sink], probe=px, probe_every_n_samples=2) as mon:
        train(model, mon, X, y, 5)
    assert sink.seen == [
        ("sample", 0), ("probe", 0), ("sample", 1), ("sample", 2), ("probe", 2), ("sample", 3), ("sample", 4), ("probe", 4)
    ]


def test_the_units_table_shows_inf_and_nan_means_as_they_are():
    """A unit that saw Inf has mean |activation| inf, one that saw NaN nan (3.4e38 and inf before);
    both rank as the most active."""
    from monitor.probeviews import unit_table

    probe = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    probe[2, 0], probe[4, 1] = float("inf"), float("nan")
    model = nn.Sequential(nn.ReLU())
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", probe=probe)
    result = mon.probe()
    mon.close()
    rows = [r.split("|")[1:3] for r in unit_table(result, "0").splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert {(u.strip(), v.strip()) for u, v in rows[:2]} == {("0", "inf"), ("1", "nan")}
    finite = probe[:, 2:].abs().mean(0)
    assert {u.strip(): float(v) for u, v in rows[2:]} == pytest.approx({"2": float(finite[0]), "3": float(finite[1])}, rel=6e-3)  # printed with 3 digits
