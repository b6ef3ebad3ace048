"""Small CPU outputs are copied in the hook and reduced on the host (``Capture.host_rows``).

The numbers must be those of the device reductions (which larger outputs and accelerators keep
using), and those of an independent computation from the activations themselves.
"""

from __future__ import annotations

import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import monitor.capture as capture_mod
from monitor import Monitor
from monitor.sinks import Sink


class Mixed(nn.Module):
    """Every kind of row on the host: ReLU (out of place and in place), a module called twice,
    bounded activations, a signed one, and a block-free wide layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.fc2, self.fc3 = nn.Linear(13, 48), nn.Linear(48, 48), nn.Linear(48, 48), nn.Linear(48, 300)
        self.relu, self.relu_ip = nn.ReLU(), nn.ReLU(inplace=True)
        self.tanh, self.sig, self.gelu, self.leaky = nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.LeakyReLU(0.1)
        self.head = nn.Linear(300, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc0(x))
        h = self.relu(self.fc1(h)) + self.relu_ip(self.fc2(h))  # relu called twice in one step
        h = self.tanh(h) * self.sig(h) + self.gelu(h)
        return self.head(self.leaky(self.fc3(h)))


class Histograms(Sink):
    """Keeps each layer's histogram bucket counts, per step."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], np.ndarray] = {}

    def write(self, record) -> None:  # type: ignore[no-untyped-def]
        for layer in record.layers:
            if layer.hist_counts is not None:
                self.counts[(record.step, layer.name)] = layer.hist_counts * layer.hist_scale


def run(
    monkeypatch: pytest.MonkeyPatch, host_below: int, nan_at: int | None = None, steps: int = 3, sink: Sink | None = None
) -> tuple[dict, dict]:
    monkeypatch.setattr(capture_mod, "HOST_BELOW", host_below)
    torch.manual_seed(0)
    model = Mixed()
    if nan_at is not None:
        with torch.no_grad():
            model.fc3.weight[nan_at, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(24, 13), torch.randint(0, 3, (24,))
    sinks = [sink] if sink is not None else []
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore", sinks=sinks).attach()
    for step in range(steps):
        with mon.step(step):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    health, params = mon.health(), mon.parameter_health()
    mon.close()
    return health, params


NUMBERS = ("rms", "max_abs", "nonfinite", "firing_rate", "evidence_values", "grad_rms", "grad_max_abs", "grad_nonfinite")


def same(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-5, atol=0, equal_nan=True))
    return a == b


def on_end(monkeypatch: pytest.MonkeyPatch, mon: Monitor, look) -> None:  # type: ignore[no-untyped-def]
    """Call ``look(current)`` with what the hooks left at the end of each sampled step, before the
    writer reads (and releases) it."""
    capture = mon._recorder.capture
    real_end = capture.end

    def end():  # type: ignore[no-untyped-def]
        current = real_end()
        look(current)
        return current

    monkeypatch.setattr(capture, "end", end)


@pytest.mark.parametrize("host_below", [1 << 16, 2000])  # all small layers on the host; a mix of both paths
def test_host_reductions_give_the_device_numbers(monkeypatch, host_below):
    device_hist, host_hist = Histograms(), Histograms()
    device, _ = run(monkeypatch, 0, sink=device_hist)
    host, _ = run(monkeypatch, host_below, sink=host_hist)
    # the same values sampled and binned: identical histograms (every layer, every step)
    assert device_hist.counts.keys() == host_hist.counts.keys() and len(device_hist.counts) == 18
    for key, counts in device_hist.counts.items():
        assert np.array_equal(host_hist.counts[key], counts), key
    assert list(host) == list(device) and len(host) == 6
    for name in device:
        d, h = device[name], host[name]
        for field in NUMBERS:
            assert same(getattr(h, field), getattr(d, field)), (name, field, getattr(h, field), getattr(d, field))
        for key, value in d.metrics.items():
            other = h.metrics[key]
            if isinstance(value, float):
                assert same(other, value), (name, key, other, value)
            else:
                assert other == value, (name, key, other, value)


def test_non_finite_units_are_counted_on_the_host_as_on_the_device(monkeypatch):
    device_hist, host_hist = Histograms(), Histograms()
    device, _ = run(monkeypatch, 0, nan_at=7, steps=1, sink=device_hist)
    host, _ = run(monkeypatch, 1 << 16, nan_at=7, steps=1, sink=host_hist)
    assert np.array_equal(host_hist.counts[(0, "leaky")], device_hist.counts[(0, "leaky")])  # NaN binned as 0 by both
    assert device["leaky"].nonfinite == host["leaky"].nonfinite == 1  # unit 7 of fc3 is NaN
    assert device["leaky"].rms == pytest.approx(host["leaky"].rms, rel=1e-5)  # over the finite units
    # the loss is NaN, so is every gradient
    assert host["leaky"].grad_nonfinite == device["leaky"].grad_nonfinite == 300


def test_host_numbers_match_the_activations_themselves(monkeypatch):
    """Ground truth from the tensors of an independent forward/backward with retain_grad()."""
    monkeypatch.setattr(capture_mod, "HOST_BELOW", 1 << 16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 40), nn.Tanh(), nn.Linear(40, 3))
    x, y = torch.randn(32, 13), torch.randint(0, 3, (32,))
    out = model[1](model[0](x))
    out.retain_grad()
    F.cross_entropy(model[2](out), y).backward()
    model.zero_grad()
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore").attach()
    with mon.step(0):
        F.cross_entropy(model(x), y).backward()
    h = mon.health()["1"]
    mon.close()
    a, g = out.detach().double(), out.grad.double()
    assert h.rms == pytest.approx(float(a.pow(2).mean().sqrt()), rel=1e-6)
    assert h.max_abs == pytest.approx(float(a.abs().max()), rel=1e-6)
    assert h.grad_rms == pytest.approx(float(g.pow(2).mean().sqrt()), rel=1e-5)
    assert h.grad_max_abs == pytest.approx(float(g.abs().max()), rel=1e-6)


def test_a_large_output_is_reduced_in_its_hook_and_a_small_one_is_copied(monkeypatch):
    monkeypatch.setattr(capture_mod, "HOST_BELOW", 1000)
    model = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 100), nn.Tanh())
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore").attach()
    seen = {}

    def look(current):  # type: ignore[no-untyped-def]
        # what the hooks left, before the writer reads (and releases) the host copies
        seen.update({wp.name: (p.on_host, len(p.stats), len(p.host), len(p.host_grads), p.grad is not None) for wp, p in current.items()})

    on_end(monkeypatch, mon, look)
    with mon.step(0):
        model(torch.randn(16, 13)).sum().backward()  # 16 x 8 = 128 values; 16 x 100 = 1600
    mon.close()
    assert seen["1"] == (True, 0, 1, 1, False)  # one copy of the output, one of its gradient; no rows
    assert seen["3"] == (False, 5, 0, 0, True)  # reduced in its hooks: 5 rows, the gradient's rows


@pytest.mark.parametrize("background", [True, False])
def test_the_copies_reuse_the_same_buffers_from_one_sampled_step_to_the_next(monkeypatch, background):
    """Fresh copies every sampled step, freed seconds later on the writer thread, fragmented the
    heap (~1 MB per sampled step) and cost page faults: the buffers come back to a pool."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore", background=background).attach()
    buffers: list[set[int]] = []

    def look(current):  # type: ignore[no-untyped-def]
        ptrs = {x.data_ptr() for p in current.values() for x, _, _ in p.host}
        ptrs |= {g.data_ptr() for p in current.values() for g, _ in p.host_grads}
        buffers.append(ptrs)

    on_end(monkeypatch, mon, look)
    x, y = torch.randn(16, 13), torch.randint(0, 3, (16,))
    for step in range(6):
        with mon.step(step):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        mon.flush()  # the writer has read this step's copies
    mon.close()
    assert len(buffers[0]) == 4  # two outputs (one stacked with the ReLU's input), two gradients
    assert all(b == buffers[0] for b in buffers[1:])


def test_the_writer_thread_runs_at_a_priority_that_keeps_up():
    """nice 19 starved the writer behind PyTorch's busy threads (the backlog grew without bound)."""
    import os
    import sys

    from monitor import sinks

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are a Linux feature")
    mon = Monitor(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), logdir=tempfile.mkdtemp()).attach()
    with mon.step(0):
        mon.model(torch.randn(2, 4))
    mon.flush()
    thread = mon._dispatcher._thread
    assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == sinks.NICE == 10
    mon.close()


class Records(Sink):
    """Each sampled step's layer healths, by step and layer name."""

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, object]] = {}

    def write(self, record) -> None:  # type: ignore[no-untyped-def]
        self.layers[record.step] = {layer.name: layer.health for layer in record.layers}


class Scaled(nn.Module):
    """A tanh whose output the model itself scales in place afterwards (legal without a graph)."""

    def __init__(self, post: str = "") -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(13, 32), nn.Tanh()
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.fc(x))
        if self.post == "in_place":
            a.mul_(3.0)
        return a


def tanh_case(monkeypatch: pytest.MonkeyPatch, post: str = "") -> tuple[Scaled, torch.Tensor, torch.Tensor]:
    """A :class:`Scaled` model on the host path, its input, and the tanh output it computes."""
    monkeypatch.setattr(capture_mod, "HOST_BELOW", 1 << 16)
    torch.manual_seed(0)
    model = Scaled(post)
    x = torch.randn(24, 13)
    return model, x, torch.tanh(model.fc(x)).detach().double()


@pytest.mark.parametrize("background", [True, False])
def test_an_activation_changed_in_place_after_its_hook_is_read_as_it_ran(monkeypatch, background):
    """The model scales its tanh output in place after the hook (legal without a graph): the numbers
    are those of the tanh output itself (|a| <= 1, never the scaled 3 * tanh), from the first step."""
    model, x, truth = tanh_case(monkeypatch, "in_place")
    records = Records()
    mon = Monitor(
        model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore", sinks=[records], background=background
    ).attach()
    with torch.no_grad():
        for step in range(2):
            with mon.step(step):
                model(x)
    mon.close()
    for step in (0, 1):
        s = records.layers[step]["act"]
        assert s.max_abs == pytest.approx(float(truth.abs().max()), rel=1e-6)  # type: ignore[attr-defined]
        assert s.rms == pytest.approx(float(truth.pow(2).mean().sqrt()), rel=1e-6)  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["in_place", "data"])
def test_an_output_the_user_changes_after_the_step_is_read_as_it_ran(monkeypatch, how):
    """The writer reads a step's numbers seconds later; the user's code may have changed the output
    by then, also through ``.data``, which no version counter sees."""
    model, x, truth = tanh_case(monkeypatch)
    records = Records()
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore", sinks=[records]).attach()
    with torch.no_grad():
        with mon.step(0):
            out = model(x)
        (out if how == "in_place" else out.data).mul_(3.0)  # before the writer reads step 0 (~2 s, or a flush)
    mon.close()
    assert records.layers[0]["act"].max_abs == pytest.approx(float(truth.abs().max()), rel=1e-6)  # type: ignore[attr-defined]


class HookedTanh(nn.Module):
    """A functional tanh whose gradient a tensor hook of the model scales in place (after the monitor's)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(13, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.fc(x))
        if a.requires_grad:
            a.register_hook(lambda g: g.mul_(3.0))
        return self.head(a)


def test_a_gradient_the_model_changes_in_place_after_the_hook_is_read_as_backward_gave_it(monkeypatch):
    """The monitor's hook sees the gradient before a later hook of the model scales it in place:
    the numbers are those of the gradient backward gave the layer (not 3x that), from the first step."""
    monkeypatch.setattr(capture_mod, "HOST_BELOW", 1 << 16)
    torch.manual_seed(0)
    model = HookedTanh()
    x = torch.randn(24, 13)
    g = model.head.weight.detach().double().expand(24, 32)  # d(sum of the outputs)/da: the head's weights
    records = Records()
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore", sinks=[records]).attach()
    for step in range(2):
        with mon.step(step):
            model(x).sum().backward()
        model.zero_grad()
    mon.close()
    (name,) = [n for n in records.layers[0] if "tanh" in n]
    for step in (0, 1):
        h = records.layers[step][name]
        assert h.grad_rms == pytest.approx(float(g.pow(2).mean().sqrt()), rel=1e-5)  # type: ignore[attr-defined]
        assert h.grad_max_abs == pytest.approx(float(g.abs().max()), rel=1e-6)  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["backward", "autograd.grad"])
def test_a_gradient_the_user_owns_is_read_as_backward_gave_it(monkeypatch, how):
    """``y.backward(G)`` hands the hook the user's own ``G``; ``torch.autograd.grad`` returns the
    tensor the hook saw. Either may be changed after the step, through ``.data`` too, before the
    writer reads (~2 s later): the numbers are those of the gradient as it was."""
    model, x, _ = tanh_case(monkeypatch)
    torch.manual_seed(1)
    G = torch.randn(24, 32)
    truth = G.double().clone()
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore").attach()
    with mon.step(0):
        y = model(x)
        if how == "backward":
            y.backward(G)
            theirs = G
        else:
            (theirs,) = torch.autograd.grad((y * G).sum(), y)
    theirs.data.mul_(100.0)  # no version counter sees this
    h = mon.health()["act"]
    mon.close()
    assert h.grad_rms == pytest.approx(float(truth.pow(2).mean().sqrt()), rel=1e-5)
    assert h.grad_max_abs == pytest.approx(float(truth.abs().max()), rel=1e-6)


def test_outputs_the_user_keeps_are_never_overwritten(monkeypatch):
    """The user's tensors never go into the pool of buffers that later copies are written into."""
    monkeypatch.setattr(capture_mod, "HOST_BELOW", 1 << 16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore", include=["*"]).attach()
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    x, y = torch.randn(16, 13), torch.randint(0, 3, (16,))
    for step in range(6):
        with mon.step(step):
            h = model[1](model[0](x))
            out = model[4](model[3](model[2](h)))
            F.cross_entropy(out, y).backward()
            opt.step()
            opt.zero_grad()
        outputs.append((h.detach(), h.detach().clone()))
        mon.flush()
        free = {t.data_ptr() for ts in mon._recorder.capture.pool._free.values() for t in ts}
        assert free and h.data_ptr() not in free  # the copies' buffers are there, never h
    mon.close()
    for kept, snapshot in outputs:
        assert torch.equal(kept, snapshot)


def test_inference_tensors_are_copied(monkeypatch):
    """Inference tensors have no version counter: copied in the hook, with the right numbers."""
    model, x, truth = tanh_case(monkeypatch)
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore").attach()
    with torch.inference_mode(), mon.step(0):
        model(x)
    h = mon.health()["act"]
    mon.close()
    assert h.max_abs == pytest.approx(float(truth.abs().max()), rel=1e-6)
    assert h.rms == pytest.approx(float(truth.pow(2).mean().sqrt()), rel=1e-6)


def test_a_training_step_after_an_inference_mode_step_is_recorded(monkeypatch):
    """A copy buffer first taken under ``torch.inference_mode()`` is reused by later training steps."""
    model, x, truth = tanh_case(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: truth holds at every step
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore").attach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a lost step warns; nothing may be lost
        for step in range(4):
            with mon.step(step):
                if step < 2:
                    with torch.inference_mode():
                        model(x)
                else:
                    model(x).pow(2).mean().backward()
                    opt.step()
                    opt.zero_grad()
            mon.flush()
            h = mon.health()["act"]
            assert h.step == step
            assert h.rms == pytest.approx(float(truth.pow(2).mean().sqrt()), rel=1e-6)
            assert (h.grad_rms is not None) == (step >= 2)
    mon.close()


def test_a_gradient_that_is_a_slice_of_a_larger_one_has_the_slices_numbers(monkeypatch):
    """A ReLU output concatenated with a wide one: backward hands its hook a slice of the whole gradient."""
    monkeypatch.setattr(capture_mod, "HOST_BELOW", 1 << 16)

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.wide = nn.Linear(13, 8), nn.ReLU(), nn.Linear(13, 4096)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.act(self.fc(x)), self.wide(x)], 1)

    torch.manual_seed(0)
    model = Wide()
    x = torch.randn(4, 13)
    mon = Monitor(model, every_n_steps=1, logdir=tempfile.mkdtemp(), on_alert="ignore").attach()
    with mon.step(0):
        (model(x) * torch.arange(4104.0)).sum().backward()
    h = mon.health()["act"]
    mon.close()
    g = torch.arange(8.0).double().expand(4, 8)  # d(sum of w * out)/d(relu output): the first 8 weights
    assert h.grad_rms == pytest.approx(float(g.pow(2).mean().sqrt()), rel=1e-6)
    assert h.grad_max_abs == 7.0
