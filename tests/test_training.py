"""Real training runs: healthy ones stay silent, real pathologies alert at their first sampled step.

Ground truth comes from the test's own forward hooks on the same modules, never from the monitor.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import Encoder, SmallCNN, mlp
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler
from torch import nn

from monitor import Monitor, Thresholds


@pytest.fixture(scope="module")
def wine():
    X, y = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    return torch.tensor(X), torch.tensor(y)


class Recorder:
    """The test's own hooks: keep the outputs of some modules on the steps we ask for."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.on = False
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, out):
            if self.on:
                self.outputs[name] = out.detach().clone()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def train(model, batches, opt, mon, every, recorder=None, on_sample=None):
    for step, (x, y, loss_fn) in enumerate(batches):
        sampled = step % every == 0
        if recorder is not None:
            recorder.on = sampled
        with mon.step(step):
            loss = loss_fn(model(x), y)
        if sampled and on_sample is not None:
            on_sample(step)
        opt.zero_grad()
        loss.backward()
        opt.step()


def wine_batches(wine, n, batch=128, seed=0):
    X, y = wine
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, len(X), (batch,), generator=g)
        yield X[idx], y[idx], F.cross_entropy


# -- healthy trainings: zero alerts with default thresholds -------------------------------------------


def test_healthy_relu_mlp_is_silent(wine):
    torch.manual_seed(0)
    model = mlp(width=256, depth=2)
    with Monitor(model, every_n_steps=10, on_alert="raise") as mon:
        train(model, wine_batches(wine, 300), torch.optim.Adam(model.parameters(), 1e-3), mon, 10)
    assert mon.alerts == []
    assert all(h.dead_fraction < 0.5 for h in mon.health().values())


def test_a_small_init_growing_to_order_one_is_not_exploding():
    """Weights initialised at std 0.02 (GPT-2/DCGAN style): activations start at RMS ~1e-4..1e-2
    and grow 100-10000x as the network learns digits to >90%; the gradient of the first layer
    starts orders below the layers nearest the loss and catches up. Neither is an explosion: the
    activations' baseline is never below `growth_floor`, a gradient's never below the reference's."""
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)
    X, Y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(Y)
    torch.manual_seed(0)
    layers, d = [], 64
    for _ in range(4):
        lin = nn.Linear(d, 128)
        nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        d = 128
    model = nn.Sequential(*layers, nn.Linear(128, 10))
    rec = Recorder({"7": model[7]})
    rms = {}
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    with Monitor(model, every_n_steps=10, on_alert="ignore", histograms=False) as mon:
        for step in range(300):
            idx = torch.randint(0, len(X), (64,), generator=g)
            rec.on = step % 10 == 0
            with mon.step(step):
                loss = F.cross_entropy(model(X[idx]), Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if rec.on:
                rms[step] = float(rec.outputs["7"].pow(2).mean().sqrt())
    rec.close()
    with torch.no_grad():
        accuracy = (model(X).argmax(1) == Y).float().mean().item()
    assert accuracy > 0.9
    assert rms[0] < 1e-3 and max(rms.values()) > 100 * float(np.median([rms[0], rms[10], rms[20]]))  # it grew
    assert [a.message for a in mon.alerts] == []


def test_healthy_tanh_mlp_is_silent(wine):
    torch.manual_seed(0)
    model = mlp(width=64, depth=2, act=nn.Tanh)
    with Monitor(model, every_n_steps=10, on_alert="raise") as mon:
        train(model, wine_batches(wine, 200), torch.optim.Adam(model.parameters(), 1e-3), mon, 10)
    assert mon.alerts == []


def test_healthy_cnn_is_silent():
    torch.manual_seed(0)
    model = SmallCNN()
    protos = torch.randn(4, 3, 16, 16)

    def batches():
        g = torch.Generator().manual_seed(1)
        for _ in range(60):
            y = torch.randint(0, 4, (32,), generator=g)
            yield protos[y] + 0.5 * torch.randn(32, 3, 16, 16, generator=g), y, F.cross_entropy

    with Monitor(model, every_n_steps=5, on_alert="raise") as mon:
        train(model, batches(), torch.optim.Adam(model.parameters(), 1e-3), mon, 5)
    assert mon.alerts == [] and len(mon.health()) == 2


def test_healthy_small_transformer_is_silent():
    torch.manual_seed(0)
    model = Encoder(vocab=50, d=32, layers=2, seq=16)

    def batches():
        g = torch.Generator().manual_seed(2)
        for _ in range(60):
            tokens = torch.randint(0, 50, (16, 16), generator=g)
            target = torch.roll(tokens, 1, dims=1)
            yield tokens, target, lambda logits, t: F.cross_entropy(logits.reshape(-1, 50), t.reshape(-1))

    with Monitor(model, every_n_steps=5, on_alert="raise") as mon:
        train(model, batches(), torch.optim.Adam(model.parameters(), 1e-3), mon, 5)
    assert mon.alerts == []
    assert {"blocks.0", "blocks.1", "blocks.0.linear1.gelu"} <= set(mon.health())


# -- pathologies ------------------------------------------------------------------------------------


def test_dying_relu_from_a_high_learning_rate(wine):
    """Adam at lr=0.3 kills most units of the second ReLU layer within ten steps."""
    torch.manual_seed(0)
    model = mlp(width=256, depth=2)
    rec = Recorder({"act0": model.act0, "act1": model.act1})
    truth: dict[int, dict[str, tuple[int, ...]]] = {}
    seen: dict[int, dict[str, tuple[int, ...]]] = {}

    def on_sample(step):
        truth[step] = {n: tuple(np.flatnonzero((o > 0).sum(0).numpy() == 0).tolist()) for n, o in rec.outputs.items()}
        seen[step] = {n: h.dead_units for n, h in mon.health().items()}

    every = 10
    with Monitor(model, every_n_steps=every, on_alert="ignore", thresholds=Thresholds(min_positions=128)) as mon:
        train(model, wine_batches(wine, 200), torch.optim.Adam(model.parameters(), 0.3), mon, every, rec, on_sample)
    rec.close()
    # batch 128 >= min_positions: each verdict rests on its own sampled batch, exactly
    assert seen == truth
    first_bad = min(s for s, t in truth.items() if len(t["act1"]) >= 0.5 * 256)
    dead_alerts = [a for a in mon.alerts if a.kind == "dead" and not a.recovered]
    assert dead_alerts and dead_alerts[0].layer == "act1" and dead_alerts[0].step == first_bad
    assert "learning rate" in dead_alerts[0].message


def test_all_units_dead_alerts_at_the_first_sampled_step(wine):
    torch.manual_seed(0)
    model = mlp(width=32, depth=2)
    with torch.no_grad():
        model.fc0.bias.fill_(-20.0)  # a bias init that kills the layer
    with Monitor(model, every_n_steps=25, on_alert="ignore") as mon:
        train(model, wine_batches(wine, 50), torch.optim.SGD(model.parameters(), 0.01), mon, 25)
    first = mon.alerts[0]
    assert (first.step, first.layer, first.kind, first.value) == (0, "act0", "dead", 1.0)


def test_tanh_units_pinned_at_their_bounds(wine):
    torch.manual_seed(0)
    model = mlp(width=64, depth=2, act=nn.Tanh)
    with torch.no_grad():
        model.fc1.weight.normal_(0, 20.0)  # far too large an init: pre-activations of size ~100
    rec = Recorder({"act1": model.act1})
    truth = {}

    def on_sample(step):
        y = rec.outputs["act1"]
        pinned = ((y.abs() >= 0.98).float().mean(0) >= 0.95).float().mean().item()
        truth[step] = pinned

    with Monitor(model, every_n_steps=10, on_alert="ignore") as mon:
        train(model, wine_batches(wine, 30), torch.optim.SGD(model.parameters(), 1e-3), mon, 10, rec, on_sample)
    rec.close()
    sat = [a for a in mon.alerts if a.kind == "saturated"]
    assert truth[0] >= 0.5
    assert sat and (sat[0].step, sat[0].layer) == (0, "act1") and sat[0].value == pytest.approx(truth[0])
    assert "Xavier" in sat[0].message


def test_activations_growing_to_nan(wine):
    """Plain SGD at a huge learning rate on an unnormalised MLP: magnitudes blow up, then NaN."""
    torch.manual_seed(0)
    model = mlp(width=64, depth=3)
    rec = Recorder({"act2": model.act2})
    rms, nan = {}, {}

    def on_sample(step):
        y = rec.outputs["act2"]
        nan[step] = bool((~torch.isfinite(y)).any())
        rms[step] = float(y.pow(2).mean().sqrt()) if not nan[step] else float("nan")

    with Monitor(model, every_n_steps=2, on_alert="ignore") as mon:
        train(model, wine_batches(wine, 40), torch.optim.SGD(model.parameters(), lr=3.0), mon, 2, rec, on_sample)
    rec.close()
    alerts = [(a.step, a.kind) for a in mon.alerts if a.layer == "act2" and not a.recovered]
    first_nan = min(s for s, v in nan.items() if v)
    assert (first_nan, "nonfinite") in alerts
    baseline = rms[0]
    first_big = min(s for s, v in rms.items() if not np.isnan(v) and (v > 1e3 or v > 100 * baseline))
    assert first_big < first_nan  # the warning comes before the NaN
    assert ("exploding" in [k for s, k in alerts if s == first_big])
