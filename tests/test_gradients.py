"""Gradient flow in a plain loop: per-layer gradients, parameter norms, update ratios, the two
gradient detectors, and what stays untouched. Ground truth comes from ``retain_grad()`` and the
parameters themselves, never from the monitor."""

from __future__ import annotations

import itertools
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import optimizer as optim_mod

from monitor import Monitor, MonitorWarning, Thresholds
from monitor.params import SAMPLE, weight_sample


def deep(depth: int, width: int, act: type[nn.Module], he: bool = False, d_in: int = 13, d_out: int = 3) -> nn.Sequential:
    layers: list = []
    d = d_in
    for i in range(depth):
        lin = nn.Linear(d, width)
        if he:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers += [(f"fc{i}", lin), (f"act{i}", act())]
        d = width
    layers.append(("head", nn.Linear(d, d_out)))
    return nn.Sequential(OrderedDict(layers))


def no_hooks_left(model: nn.Module) -> None:
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    assert not optim_mod._global_optimizer_pre_hooks and not optim_mod._global_optimizer_post_hooks


class Twice(nn.Module):
    """A conv block with a functional ReLU, and a Tanh module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.tanh = nn.Tanh()
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.conv(x))
        self.saved = [h]
        h = self.fc(h.flatten(1))
        a = self.tanh(h)
        b = self.tanh(h * 0.5)
        self.saved += [a, b]
        return self.out(a + b)


def test_layer_gradients_match_retain_grad():
    torch.manual_seed(0)
    model = Twice()
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 2, (5,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon, mon.step(0):
        out = model(x)
        for t in model.saved:
            t.retain_grad()
        F.cross_entropy(out, y).backward()
        opt.step()
    h = mon.health()
    relu_g = model.saved[0].grad  # [5, 4, 6, 6]: units are channels
    assert h["conv.relu"].grad_rms == pytest.approx(relu_g.pow(2).mean().sqrt().item(), rel=1e-5)
    assert h["conv.relu"].grad_max_abs == pytest.approx(relu_g.abs().max().item(), rel=1e-6)
    a, b = model.saved[1].grad, model.saved[2].grad  # the module called twice: both calls count
    both = torch.cat([a, b])
    assert h["tanh"].grad_rms == pytest.approx(both.pow(2).mean().sqrt().item(), rel=1e-5)
    assert h["tanh"].grad_max_abs == pytest.approx(both.abs().max().item(), rel=1e-6)
    assert h["tanh"].grad_nonfinite == 0
    no_hooks_left(model)


def test_forward_only_step_keeps_working_without_gradient_numbers():
    torch.manual_seed(0)
    model = deep(2, 16, nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)  # nothing to say about a forward-only step
        with mon:
            for step in range(3):
                with mon.step(step):
                    loss = model(torch.randn(8, 13)).pow(2).mean()
                loss.backward()  # outside the step: no gradient numbers, no stray hook firing
                opt.step()
                opt.zero_grad()
    h = mon.health()["act0"]
    assert h.rms > 0 and h.grad_rms is None and h.grad_max_abs is None
    assert "grad_rms" not in h.scalars() and mon.parameter_health() == {}
    no_hooks_left(model)


def test_parameter_norms_are_what_the_optimizer_uses_and_update_ratios_are_exact():
    """In a plain loop the norms are read when ``optimizer.step()`` begins: after your clipping."""
    torch.manual_seed(0)
    model = deep(2, 16, nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon, mon.step(0):
        F.cross_entropy(model(torch.randn(32, 13)), torch.randint(0, 3, (32,))).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-4)
        norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    ph = mon.parameter_health()
    assert list(ph) == [n for n, _ in model.named_parameters()]
    assert math.sqrt(sum(v.grad_norm**2 for v in ph.values())) == pytest.approx(1e-4, rel=1e-4)
    for n, p in model.named_parameters():
        assert ph[n].grad_norm == pytest.approx(norms[n], rel=1e-5)
        exact = (p.detach() - before[n]).norm() / before[n].norm()
        assert ph[n].update_ratio == pytest.approx(exact.item(), rel=1e-4)


def test_grad_scaler_norms_are_unscaled_and_a_healthy_scaled_run_is_silent():
    torch.manual_seed(0)
    model = deep(3, 32, nn.ReLU, he=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    data = wine_like()
    truth = {}
    mon = Monitor(model, every_n_steps=5, on_alert="ignore", background=False)
    with mon:
        for step in range(30):
            x, y = data(step)
            with mon.step(step):
                scaler.scale(F.cross_entropy(model(x), y)).backward()
                scaler.unscale_(opt)  # as users do before clipping; the ground truth reads it here
                truth[step] = model.fc0.weight.grad.norm().item()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
    assert mon.parameter_health()["fc0.weight"].grad_norm == pytest.approx(truth[25], rel=1e-5)
    assert truth[25] < 10  # unscaled; the scaled gradient is 65536 times that
    assert [a.message for a in mon.alerts] == []


def test_update_ratio_estimate_of_a_large_parameter_is_close():
    """A weight of 1M elements: the ratio comes from a strided sample of 4096 of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4))
    assert model[0].weight.numel() > 100 * SAMPLE and weight_sample(model[0].weight).numel() <= SAMPLE
    errors = []
    for opt_cls, lr in ((torch.optim.SGD, 0.5), (torch.optim.Adam, 1e-3), (torch.optim.AdamW, 1e-3)):
        opt = opt_cls(model.parameters(), lr=lr)
        mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
        with mon, mon.step(0):
            F.cross_entropy(model(torch.randn(64, 1024)), torch.randint(0, 4, (64,))).backward()
            w0 = model[0].weight.detach().clone()
            opt.step()
            opt.zero_grad()
        exact = ((model[0].weight.detach() - w0).norm() / w0.norm()).item()
        errors.append(abs(mon.parameter_health()["0.weight"].update_ratio / exact - 1))
    assert max(errors) < 0.05, errors


class Layouts(nn.Module):
    """Parameters in three memory layouts: a conv weight (``channels_last`` when asked), a weight
    stored transposed (dense, not contiguous) and one that is every other column of a larger
    tensor (not dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.t = nn.Parameter(torch.randn(10, 16 * 4 * 4).t() * 0.05)
        self.gaps = nn.Parameter((torch.randn(10, 20) * 0.1)[:, ::2])

    def forward(self, x):
        return F.relu(self.conv(x)).flatten(1) @ self.t @ self.gaps


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_update_ratios_of_parameters_that_are_not_contiguous_are_exact(channels_last, opt_name):
    """channels_last, transposed and strided parameters: the ratio of what the optimizer moved."""
    torch.manual_seed(0)
    model = Layouts()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    assert not model.t.is_contiguous() and not model.gaps.is_contiguous()
    assert model.conv.weight.is_contiguous() != channels_last
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if opt_name == "sgd" else torch.optim.Adam(params, lr=1e-2)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon:
        for step in range(3):
            with mon.step(step):
                F.cross_entropy(model(torch.randn(8, 3, 4, 4)), torch.randint(0, 10, (8,))).backward()
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                opt.step()
                opt.zero_grad()
            ph = mon.parameter_health()
            for n, p in model.named_parameters():
                exact = ((p.detach() - before[n]).norm() / before[n].norm()).item()
                assert exact > 1e-3
                assert ph[n].update_ratio == pytest.approx(exact, rel=1e-4), (step, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gradient_norms_of_low_precision_parameters_are_summed_in_float32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 1)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon, mon.step(0):
        (model(torch.randn(256, 512).to(dtype) * 4).float().sum() * 8).backward()
        truth = model[0].weight.grad.float().norm().item()
        opt.step()
    assert mon.parameter_health()["0.weight"].grad_norm == pytest.approx(truth, rel=1e-5)


def test_a_complex_parameter_beside_real_ones_has_its_gradient_norm():
    """A Fourier layer's complex weight: every parameter keeps its norm (complex norms failed the whole read)."""

    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, dtype=torch.cfloat) * 0.1)
            self.lin, self.act = nn.Linear(16, 2), nn.ReLU()

        def forward(self, x):
            y = torch.fft.irfft(torch.fft.rfft(x, n=14) * self.w, n=16)
            return self.lin(self.act(y))

    torch.manual_seed(0)
    model = Spectral()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon, mon.step(0):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        truth = {n: p.grad.abs().pow(2).sum().sqrt().item() for n, p in model.named_parameters()}
        opt.step()
    ph = mon.parameter_health()
    assert {n: ph[n].grad_norm for n in truth} == pytest.approx(truth, rel=1e-5)


def test_no_optimizer_step_inside_the_step_says_so_once_and_skips_parameter_numbers():
    torch.manual_seed(0)
    model = deep(2, 16, nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with pytest.warns(MonitorWarning, match="no optimizer step") as rec, mon:
        for step in range(3):
            with mon.step(step):
                model(torch.randn(8, 13)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert sum("no optimizer step" in str(w.message) for w in rec) == 1
    assert mon.parameter_health() == {}  # read where the optimizer steps: nothing to report
    assert mon.health()["act0"].grad_rms > 0


def test_a_zero_weight_has_no_ratio_and_nonfinite_gradients_are_counted():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    nn.init.zeros_(model[0].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon, mon.step(0):
        out = model(torch.randn(3, 4))
        (out * torch.tensor([[1.0], [float("nan")], [1.0]])).sum().backward()
        opt.step()
    h = mon.health()["1"]
    assert h.grad_nonfinite == 4  # the NaN sample's row, one value per unit
    assert mon.parameter_health()["0.bias"].update_ratio is None  # ||w_before|| = 0: undefined
    kinds = {(a.layer, a.kind) for a in mon.alerts}
    assert ("1", "exploding_gradient") in kinds


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_activation_checkpointing_does_not_count_the_forward_twice(reentrant, inplace):
    """Checkpointed blocks run their forward again inside backward: the values are counted once,
    and the gradient is the one of the output. Reentrant checkpointing runs the first forward
    without a graph: the gradient hook goes on the recomputed output (it used to be missed)."""
    from torch.utils.checkpoint import checkpoint

    class Ck(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(6, 10), nn.ReLU(inplace=inplace), nn.Linear(10, 1)

        def forward(self, x):
            return self.out(checkpoint(lambda t: self.act(self.fc(t)), x, use_reentrant=reentrant))

    torch.manual_seed(0)
    model = Ck()
    x = torch.randn(7, 6, requires_grad=reentrant)  # reentrant: an input that needs grad, or no backward
    # ground truth: the same model without checkpointing, the gradient kept by retain_grad()
    z = model.fc(x)
    a = torch.relu(z)
    a.retain_grad()
    model.out(a).sum().backward()
    true_grad = a.grad.detach().clone()
    model.zero_grad()
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with mon, mon.step(0):
        model(x).sum().backward()
        opt.step()
    h = mon.health()["act"]
    assert h.firing_rate == pytest.approx((z > 0).float().mean().item())
    assert h.evidence_values == 7  # one forward's positions, not two
    assert h.grad_rms == pytest.approx(true_grad.pow(2).mean().sqrt().item(), rel=1e-5)
    assert h.grad_max_abs == pytest.approx(true_grad.abs().max().item(), rel=1e-5)


# -- the detectors on real runs -------------------------------------------------------------------------
def _train(model, opt, steps, every, data, loss_fn=F.cross_entropy, **kw):
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)
        with Monitor(model, every_n_steps=every, on_alert="ignore", **kw) as mon:
            for s in range(steps):
                x, y = data(s)
                with mon.step(s):
                    loss = loss_fn(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                losses.append(loss.item())
    return mon, losses


def wine_like(seed=0, n=512):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 13, generator=g)
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    return lambda s: (X[(s * 64) % n : (s * 64) % n + 64], Y[(s * 64) % n : (s * 64) % n + 64])


class MeanPooled(nn.Module):
    """A text classifier: per-token layers, mean pooling over the sequence, a two-layer MLP head."""

    def __init__(self, vocab: int = 100, d: int = 32, h: int = 64) -> None:
        super().__init__()
        self.emb, self.tok, self.tok_act = nn.Embedding(vocab, d), nn.Linear(d, h), nn.GELU()
        self.fc1, self.act1, self.fc2, self.act2, self.out = nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2)

    def forward(self, x):
        self.saved = [self.tok_act(self.tok(self.emb(x)))]  # [batch, tokens, h]
        self.saved.append(self.act1(self.fc1(self.saved[0].mean(1))))
        self.saved.append(self.act2(self.fc2(self.saved[1])))
        return self.out(self.saved[2])


def test_a_layer_averaged_over_many_positions_is_not_vanishing():
    """Mean pooling over 1024 tokens hands each token 1/1024 of the pooled gradient (per value
    ~5e-4 of the head's, past the 1e-3 threshold), while the per-token weights sum it over the
    tokens and learn as fast as the head's. The rule compares per-unit norms over the step."""
    torch.manual_seed(0)
    model = MeanPooled()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    mon = Monitor(model, every_n_steps=5, on_alert="ignore", background=False)
    losses, truth = [], {}
    with mon:
        for step in range(60):
            y = torch.randint(0, 2, (16,), generator=g)
            x = torch.randint(2, 100, (16, 1024), generator=g)
            frequent = torch.rand(16, 1024, generator=g) < 0.1  # the label's token is frequent
            x[frequent] = y[:, None].expand(-1, 1024)[frequent]
            with mon.step(step):
                loss = F.cross_entropy(model(x), y)
                for t in model.saved:
                    t.retain_grad()
                loss.backward()
                if step % 5 == 0:  # ground truth: per unit, the gradient's L2 norm over the step
                    norms = [t.grad.pow(2).sum().div(t.shape[-1]).sqrt().item() for t in model.saved]
                    rms = [t.grad.pow(2).mean().sqrt().item() for t in model.saved]
                    truth[step] = {"norm": norms[0] / float(np.median(norms)), "rms": rms[0] / float(np.median(rms))}
                opt.step()
                opt.zero_grad()
            losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.2 < 0.6 < np.mean(losses[:5])  # it learns
    h = mon.health()["tok_act"]
    assert h.metrics["grad_norm_ratio"] == pytest.approx(truth[55]["norm"], rel=1e-4)
    assert h.metrics["grad_ratio"] == pytest.approx(truth[55]["rms"], rel=1e-4)
    # per value, two sampled steps in a row below 1e-3 (an alert); per unit, 1e-2 and above throughout
    assert truth[5]["rms"] < 1e-3 and truth[10]["rms"] < 1e-3
    assert min(t["norm"] for t in truth.values()) > 1e-2
    assert [a.message for a in mon.alerts] == []


def quadrants(batch: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with one brighter quadrant, and which one it is."""
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 4, (batch,), generator=g)
    h = size // 2
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 1.0
    return x, y


def _conv_block(ci: int, co: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(ci, co, 3, 1, 1), nn.BatchNorm2d(co), nn.ReLU(), nn.Conv2d(co, co, 3, 1, 1), nn.BatchNorm2d(co), nn.ReLU()
    )


class UNet(nn.Module):
    """Five poolings: its bottleneck sees 1/1024 of the output's positions."""

    def __init__(self, levels: int = 5) -> None:
        super().__init__()
        ch = [8 * 2 ** min(i, 3) for i in range(levels + 1)]
        self.enc = nn.ModuleList([_conv_block(3 if i == 0 else ch[i - 1], ch[i]) for i in range(levels)])
        self.bott = _conv_block(ch[levels - 1], ch[levels])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, 2) for i in reversed(range(levels))])
        self.dec = nn.ModuleList([_conv_block(2 * ch[i], ch[i]) for i in reversed(range(levels))])
        self.out = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x):
        skips = []
        for e in self.enc:
            x = e(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bott(x)
        for u, d in zip(self.up, self.dec):
            x = d(torch.cat([u(x), skips.pop()], 1))
        return self.out(x)


def test_a_u_net_bottleneck_with_few_positions_is_not_vanishing():
    """The per-unit norm alone would alert here (the bottleneck has 1/1024 of the output's positions,
    so its ratio is the per-value one / 32: 2e-4 while the per-value one is 6e-3); the rule reads both."""
    torch.manual_seed(0)
    model = UNet()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(1)
    mon = Monitor(model, every_n_steps=10, on_alert="ignore", background=False)
    losses, norm_ratios = [], []
    with mon:
        for step in range(100):
            x, y = quadrants(8, 32, g)
            mask = torch.zeros(8, 1, 32, 32)
            for i, q in enumerate(y.tolist()):
                r, c = divmod(q, 2)
                mask[i, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = 1
            with mon.step(step):
                loss = F.binary_cross_entropy_with_logits(model(x), mask)
                loss.backward()
                opt.step()
                opt.zero_grad()
            losses.append(loss.item())
            if step % 10 == 0:
                norm_ratios.append(min(h.metrics["grad_norm_ratio"] for h in mon.health().values()))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])  # it learns
    assert min(norm_ratios) < 1e-3  # the per-unit reading alone is past the threshold
    assert [a.message for a in mon.alerts] == []


def test_a_deep_tanh_cnn_with_pooling_stuck_at_chance_vanishes():
    """12 tanh convs (default init, SGD) with three max-poolings: the first layers' per-value ratio
    is ~1.5e-4 and their weights do not move; per unit over the step (1.1e-3) the pooling makes it
    look nearly healthy, so that reading alone missed it."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c = 3
    for i in range(12):
        layers += [nn.Conv2d(c, 16, 3, padding=1), nn.Tanh()]
        c = 16
        if i in (3, 7, 10):
            layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    mon = Monitor(model, every_n_steps=10, on_alert="ignore", background=False)
    with mon:
        for step in range(21):
            x, y = quadrants(32, 32, g)
            with mon.step(step):
                before = model[0].weight.detach().clone()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            moved = ((model[0].weight.detach() - before).norm() / before.norm()).item()
    assert moved < 1e-4  # ground truth: the first conv does not learn
    first = {a.layer: a.step for a in mon.alerts if a.kind == "vanishing_gradient" and not a.recovered}
    assert first.get("1") == 10


def test_deep_sigmoid_mlp_vanishes_at_the_first_sampled_step():
    torch.manual_seed(0)
    model = deep(20, 64, nn.Sigmoid)
    mon, _ = _train(model, torch.optim.SGD(model.parameters(), lr=0.1), 30, 10, wine_like())
    first = {a.layer: a.step for a in mon.alerts if a.kind == "vanishing_gradient" and not a.recovered}
    assert all(first[f"act{i}"] == 0 for i in range(10))  # at once: 1e-6 and further below the loss's
    assert "act19" not in first and "act18" not in first
    # the front: a layer nearer the input never gets more gradient than one nearer the loss
    ratios = [mon.health()[f"act{i}"].grad_ratio for i in range(20)]
    assert ratios[0] < 1e-10 and all(a <= b for a, b in itertools.pairwise(ratios))


def test_gradient_blow_up_alerts_before_the_loss_turns_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    X = torch.randn(256, 13)
    Y = X[:, :1] * 3 + 0.1 * torch.randn(256, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon, losses = _train(
        model, opt, 80, 5, lambda s: (X[(s * 32) % 256 : (s * 32) % 256 + 32], Y[(s * 32) % 256 : (s * 32) % 256 + 32]), F.mse_loss
    )
    first_nan = next(i for i, v in enumerate(losses) if not math.isfinite(v))
    exploding = [a.step for a in mon.alerts if a.kind == "exploding_gradient" and not a.recovered]
    assert exploding and min(exploding) < first_nan
    assert not any(a.kind == "vanishing_gradient" for a in mon.alerts)  # the reference exploded: not "vanishing"


def test_exploding_init_alerts_at_the_first_sampled_step():
    """A deep ReLU MLP initialised at twice the He scale: the gradient grows ~2x per layer toward the input."""
    torch.manual_seed(0)
    model = deep(16, 64, nn.ReLU, he=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(2.0)
    mon, _ = _train(model, torch.optim.SGD(model.parameters(), lr=1e-6), 1, 1, wine_like())
    kinds = {(a.layer, a.kind) for a in mon.alerts if a.step == 0}
    assert ("act0", "exploding_gradient") in kinds


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_he_relu8_stays_silent(opt_name):
    torch.manual_seed(0)
    model = deep(8, 64, nn.ReLU, he=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if opt_name == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-3)
    mon, _ = _train(model, opt, 300, 10, wine_like())
    assert not [a.message for a in mon.alerts if "gradient" in a.kind]
    assert mon.health()["act0"].grad_rms > 0


def test_hooks_are_removed_when_backward_raises():
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom")

    model = deep(2, 8, nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore")
    with mon, pytest.raises(RuntimeError, match="boom"), mon.step(0):
        Boom.apply(model(torch.randn(4, 13))).sum().backward()
    no_hooks_left(model)
    assert not mon.in_step
    # and the next step works
    with Monitor(model, every_n_steps=1, on_alert="ignore", background=False) as mon2, mon2.step(0):
        model(torch.randn(4, 13)).sum().backward()
        opt.step()
    assert mon2.health()["act0"].grad_rms > 0


def test_state_dict_keeps_gradient_baselines():
    torch.manual_seed(0)
    model = deep(2, 16, nn.GELU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon, _ = _train(model, opt, 40, 10, wine_like())
    state = mon.state_dict()
    mem = state["layers"]["act0"]["detectors"]["exploding_gradient"]
    assert len(mem["baseline_values"]) == Thresholds().baseline_samples
    assert np.isfinite(mem["baseline_values"]).all()
    assert state["layers"]["(parameters)"]["detectors"]["gradient_reference"]["baseline"]


@pytest.mark.parametrize("workload", ["mlp", "cnn", "transformer"])
def test_benchmark_workloads_stay_silent_under_sgd_and_adam(workload):
    """300 steps of each healthy benchmark workload, SGD with momentum and Adam: no gradient alert,
    and the transformer's blocks do not collapse."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from overhead import make_workload

    for opt_name in ("sgd", "adam"):
        w = make_workload(workload, "cpu")
        x, y = w.batch
        params = w.model.parameters()
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9) if opt_name == "sgd" else torch.optim.Adam(params, lr=1e-3)
        g = torch.Generator().manual_seed(1)

        def data(s, x=x, y=y, g=g):
            return x + 0.1 * torch.randn(x.shape, generator=g), y

        mon, losses = _train(w.model, opt, 300, 10, data, w.loss)
        assert losses[-1] < losses[0]
        gradient_alerts = [a.message for a in mon.alerts if "gradient" in a.kind or a.kind == "collapse"]
        assert not gradient_alerts, (opt_name, gradient_alerts)
        assert all(h.grad_rms is not None and h.grad_rms > 0 for h in mon.health().values())
        if workload == "transformer":
            sims = [h.metrics["token_similarity"] for h in mon.health().values() if h.kind == "block"]
            assert len(sims) >= 4 and max(sims) < 0.3, sims  # the 4 layers and the encoder around them
        print(workload, opt_name, [a.message[:80] for a in mon.alerts])


@pytest.mark.parametrize("background", [True, False])
def test_no_host_access_from_the_monitor_during_a_whole_sampled_step(monkeypatch, background):
    """Forward, backward and the optimizer step with every gradient hook in place: the monitor
    reads nothing back to the host on the training thread; the one transfer is on the writer
    thread (background) or at the step's end."""
    import os
    import sys
    import threading

    import monitor

    here = os.path.dirname(monitor.__file__)
    torch.manual_seed(0)
    model = deep(3, 32, nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=background).attach()
    x, y = torch.randn(16, 13), torch.randint(0, 3, (16,))

    def step(s, inside):
        with mon.step(s):
            inside["on"] = True
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            inside["on"] = False

    step(0, {"on": False})
    mon.flush()
    events: list[str] = []
    inside = {"on": False}
    main = threading.current_thread()
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _n=name, _o=original, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(here):
                where = "inside:" if inside["on"] else "exit:" if threading.current_thread() is main else "writer:"
                events.append(where + _n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for s in (1, 2):
        step(s, inside)
    mon.flush()
    monkeypatch.undo()
    assert [e for e in events if e.startswith("inside:")] == []
    where = "writer:" if background else "exit:"
    # numpy views only: the step's one flat tensor, the copies of its small outputs and their
    # gradients (reduced on the host), the 0-d parameter norms; nothing else reaches the host
    assert len(events) >= 2 and set(events) == {f"{where}numpy"}
    assert mon.parameter_health()["fc0.weight"].update_ratio > 0 and mon.health()["act0"].grad_rms > 0
    mon.close()


def test_an_exact_zero_gradient_from_a_zero_init_is_not_vanishing_at_once():
    """Output projections initialised to zero (ReZero, many GPT recipes): at step 0 the layers below
    them get a gradient of exactly 0, and from the first update on a normal one. Not a vanishing
    gradient. A dead layer above keeps the gradient at exactly 0: that alerts once it is sustained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    grads: dict[int, float] = {}
    step_now = [0]
    act = model.transformer.h[0].mlp.act

    def keep_grad(module, args, out):
        out.register_hook(lambda g: grads.__setitem__(step_now[0], float(g.abs().max())))

    act.register_forward_hook(keep_grad)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with Monitor(model, every_n_steps=5, on_alert="ignore") as mon:
        for step in range(30):
            step_now[0] = step
            x = torch.randint(0, 64, (8, 16))
            with mon.step(step):
                model(x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad()
    assert grads[0] == 0.0 and grads[5] > 0  # exactly zero at step 0 only
    assert [a.message for a in mon.alerts if a.kind == "vanishing_gradient"] == []

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        mlp[2].bias.fill_(-100.0)  # the second ReLU never fires: nothing flows back to the first
    opt = torch.optim.SGD(mlp.parameters(), 0.01)
    with Monitor(mlp, every_n_steps=5, on_alert="ignore") as mon:
        for step in range(15):
            with mon.step(step):
                F.cross_entropy(mlp(torch.randn(32, 8)), torch.randint(0, 2, (32,))).backward()
                opt.step()
                opt.zero_grad()
    vanishing = [(a.step, a.layer) for a in mon.alerts if a.kind == "vanishing_gradient"]
    assert vanishing == [(5, "1")]  # the second sampled step with a zero gradient
