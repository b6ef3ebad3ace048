"""Verdicts at any batch size, on real training runs.

Healthy default-initialised models stay silent at batch sizes 1, 2 and 4 over 200 sampled steps;
a layer killed outright alerts at its first sampled step at batch size 2 (1 for conv/sequence
outputs); and the numbers reported before the evidence is complete are the truth over the values
seen. Ground truth comes from the test's own computation on the same tensors, never from the monitor.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import Encoder, SmallCNN, mlp
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler
from torch import nn

from monitor import Monitor


@pytest.fixture(scope="module")
def wine():
    X, y = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    return torch.tensor(X), torch.tensor(y)


def run(model, batches, opt, every=1, **kw):
    mon = Monitor(model, every_n_steps=every, on_alert="ignore", **kw)
    with mon:
        for step, (x, y, loss_fn) in enumerate(batches):
            with mon.step(step):
                loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mon


def wine_batches(wine, n, batch, seed=0):
    X, y = wine
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, len(X), (batch,), generator=g)
        yield X[idx], y[idx], F.cross_entropy


def image_batches(n, batch, seed=1):
    protos = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        y = torch.randint(0, 4, (batch,), generator=g)
        yield protos[y] + 0.5 * torch.randn(batch, 3, 16, 16, generator=g), y, F.cross_entropy


def token_batches(n, batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        tokens = torch.randint(0, 50, (batch, 16), generator=g)
        yield tokens, torch.roll(tokens, 1, dims=1), lambda logits, t: F.cross_entropy(logits.reshape(-1, 50), t.reshape(-1))


HEALTHY = {
    "relu_mlp": (lambda: mlp(width=64, depth=2), "wine"),
    "gelu_mlp": (lambda: mlp(width=64, depth=2, act=nn.GELU), "wine"),
    "leaky_mlp": (lambda: mlp(width=64, depth=2, act=nn.LeakyReLU), "wine"),
    "cnn": (SmallCNN, "images"),
    "transformer": (lambda: Encoder(vocab=50, d=32, layers=2, seq=16), "tokens"),
}


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_runs_are_silent_at_tiny_batch_sizes(wine, name, batch):
    torch.manual_seed(0)
    make, data = HEALTHY[name]
    model = make()
    steps = 200
    batches = {
        "wine": lambda: wine_batches(wine, steps, batch),
        "images": lambda: image_batches(steps, batch),
        "tokens": lambda: token_batches(steps, batch),
    }[data]()
    mon = run(model, batches, torch.optim.Adam(model.parameters(), 1e-3))
    assert [a.message for a in mon.alerts] == []
    assert len(mon.health()) >= 2


def test_first_step_numbers_are_the_truth_over_the_values_seen():
    """Units 0 and 1 of ten can never fire (bias -100): after one step of batch 64 the dead
    fraction is 0.2 over 64 values, and the reason it does not alert yet is visible."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        model[0].bias[:2] = -100.0
    x = torch.randn(64, 13)
    truth = (model[0](x) > 0).sum(0) == 0  # the test's own computation
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon, mon.step(0):
        model(x)
    h = mon.health()["1"]
    assert h.dead_fraction == pytest.approx(truth.float().mean().item()) == pytest.approx(0.2)
    assert h.dead_units == tuple(np.flatnonzero(truth.numpy()).tolist()) == (0, 1)
    assert (h.evidence_values, h.evidence_steps) == (64, 1)
    assert h.dead_margin is not None and h.dead_margin > 10  # far below zero: they cannot revive
    assert mon.alerts == []  # 20% < 50%: no alert, but never a false "0.0"
    # a (4, 16, 8) sequence batch: 64 positions per unit
    seq = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
    with torch.no_grad():
        seq[0].bias[:2] = -100.0
    with Monitor(seq, every_n_steps=1, on_alert="ignore") as mon, mon.step(0):
        seq(torch.randn(4, 16, 5))
    h = mon.health()["1"]
    assert (h.dead_fraction, h.units, h.evidence_values) == (0.25, 8, 64)


def killed_mlp():
    model = mlp(width=64, depth=2)
    with torch.no_grad():
        model.fc0.bias.fill_(-100.0)
    return model


def test_a_layer_killed_by_its_bias_alerts_at_the_first_sampled_step_at_batch_2(wine):
    torch.manual_seed(0)
    model = killed_mlp()
    mon = run(model, wine_batches(wine, 30, batch=2), torch.optim.SGD(model.parameters(), 0.01), every=10)
    first = [a for a in mon.alerts if not a.recovered][0]
    assert (first.step, first.layer, first.kind, first.value) == (0, "act0", "dead", 1.0)
    assert mon.health()["act0"].evidence_values < 100  # alerted before the count evidence was complete


def near_duplicate_pairs(wine, n, noise, seed=3):
    """Batches of two views of one sample (a contrastive-style augmentation): the pair differs by `noise`."""
    X, y = wine
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        i = torch.randint(0, len(X), (1,), generator=g)
        x = X[i].repeat(2, 1)
        yield x + noise * torch.randn(x.shape, generator=g), y[i].repeat(2), F.cross_entropy


@pytest.mark.parametrize("noise", [1e-4, 1e-2, 1e-1])
def test_two_views_of_one_sample_are_no_evidence_of_death(wine, noise):
    """Two near-identical values give a pre-activation spread near zero, so every unit silent on
    that input would sit "thousands of spreads" below zero. The step's spread is no scale then:
    a healthy network fed such pairs stays silent, its dataset-wide dead fraction far below 50%."""
    torch.manual_seed(0)
    model = mlp(width=64, depth=2)
    with torch.no_grad():
        dead_truth = {f"act{k}": ((model[: 2 * k + 2](wine[0]) > 0).sum(0) == 0).float().mean().item() for k in (0, 1)}
    assert max(dead_truth.values()) < 0.2
    mon = run(model, near_duplicate_pairs(wine, 30, noise), torch.optim.SGD(model.parameters(), 0.01), every=1)
    assert [a.message for a in mon.alerts] == []


def test_three_quarters_killed_by_bias_still_alert_at_the_first_step_at_batch_2(wine):
    """The live quarter varies across two distinct samples: the step's spread stays a scale, and
    the killed units (bias -100) are dead for certain at once."""
    torch.manual_seed(0)
    model = mlp(width=64, depth=2)
    with torch.no_grad():
        model.fc0.bias[:48].fill_(-100.0)
    mon = run(model, wine_batches(wine, 10, batch=2), torch.optim.SGD(model.parameters(), 0.01), every=10)
    first = [a for a in mon.alerts if not a.recovered][0]
    assert (first.step, first.layer, first.kind) == (0, "act0", "dead")
    assert set(range(48)) <= set(mon.health()["act0"].dead_units)


@pytest.mark.parametrize("kind", ["conv", "sequence"])
def test_a_killed_conv_or_sequence_layer_alerts_at_batch_1(kind):
    torch.manual_seed(0)
    if kind == "conv":
        model = SmallCNN()
        with torch.no_grad():
            model.features[0].bias.fill_(-100.0)
        batches = image_batches(10, batch=1)
        layer = "features.1"
    else:
        model = Encoder(vocab=50, d=32, layers=2, seq=16)
        with torch.no_grad():
            model.blocks[0].linear1.bias.fill_(-100.0)
        model.blocks[0].activation = F.relu  # a ReLU FFN, killed
        batches = token_batches(10, batch=1)
        layer = "blocks.0.linear1.relu"
    mon = run(model, batches, torch.optim.SGD(model.parameters(), 0.01), every=5)
    first = [a for a in mon.alerts if not a.recovered][0]
    assert (first.step, first.layer, first.kind) == (0, layer, "dead")


def test_adam_at_a_huge_learning_rate_at_batch_2_alerts_once_the_evidence_is_complete(wine):
    """Adam at lr=1 kills most of act1 within ~10 steps, but the dead units sit only about one
    pre-activation spread below zero (the weights grow with the biases), as close as live units
    that were silent on the same two inputs: two values cannot tell them apart. The alert comes
    when the count evidence is complete (100 silent values: 50 sampled steps at batch 2), at a
    step where the exact dataset-wide dead fraction (the test's own forward over all of Wine) is
    at least 50%, and act0, which never dies, never alerts."""
    torch.manual_seed(0)
    X, _ = wine
    model = mlp(width=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), 1.0)
    every, batch = 5, 2
    truth: dict[int, tuple[float, float]] = {}
    with Monitor(model, every_n_steps=every, on_alert="ignore") as mon:
        for step, (x, y, loss_fn) in enumerate(wine_batches(wine, 400, batch=batch)):
            if step % every == 0:
                with torch.no_grad():
                    h0 = F.relu(model.fc0(X))
                    h1 = F.relu(model.fc1(h0))
                truth[step] = tuple(float(((h > 0).sum(0) == 0).float().mean()) for h in (h0, h1))
            with mon.step(step):
                loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    first_dead = min(s for s, (_, v) in truth.items() if v >= 0.5)
    dead = [a for a in mon.alerts if a.kind == "dead" and not a.recovered]
    assert dead and {a.layer for a in dead} == {"act1"} and all(v == 0.0 for v, _ in truth.values())
    assert truth[dead[0].step][1] >= 0.5
    assert first_dead < dead[0].step <= first_dead + (100 // batch) * every


def test_dormant_gelu_units_alert_at_the_first_sampled_step_and_healthy_stays_silent(wine):
    torch.manual_seed(0)
    model = mlp(width=64, depth=2, act=nn.GELU)
    with torch.no_grad():  # shrink 48 of 64 units of the first layer to near-zero output
        model.fc0.weight[:48] *= 1e-3
        model.fc0.bias[:48] *= 1e-3
    mon = run(model, wine_batches(wine, 3, batch=128), torch.optim.SGD(model.parameters(), 1e-3))
    first = [a for a in mon.alerts if not a.recovered]
    assert [(a.step, a.layer, a.kind) for a in first] == [(0, "act0", "dormant")]
    assert mon.health()["act0"].dormant_units == tuple(range(48))
