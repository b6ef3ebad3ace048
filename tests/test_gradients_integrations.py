"""Gradient monitoring through the integrations: real Lightning Trainers and real skorch nets on CPU.

Every expected number is computed here, independently of the monitor: parameter gradient norms
and update-to-weight ratios by the LightningModule's own hooks (or a skorch callback) from
``p.grad`` and copies of the weights, gradients with respect to a layer's output with
``retain_grad()``. The monitor's numbers are read from a sink (every sampled step), from
``parameter_health()``/``health()`` and from the TensorBoard event files.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import optimizer as optim_module

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("lightning")
pytest.importorskip("skorch")
import lightning.pytorch as L
from lightning.pytorch.loggers import TensorBoardLogger
from models import WineClassifier  # the model of shared/seeds/004
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from integrations.lightning import ActivationMonitor as LightningMonitor
from integrations.skorch import ActivationMonitor as SkorchMonitor
from monitor import SampleRecord, Sink

N_IN, N_SAMPLES, BATCH = 8, 128, 16
torch.set_num_threads(1)


# -- ground-truth helpers ----------------------------------------------------------------------------
class Records(Sink):
    """Keeps every sample record (written on the monitor's thread)."""

    def __init__(self) -> None:
        self.records: list[SampleRecord] = []

    def write(self, record: SampleRecord) -> None:
        self.records.append(record)

    def by_step(self) -> dict[int, SampleRecord]:
        return {r.step: r for r in self.records}


def rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def ratio(after: torch.Tensor, before: torch.Tensor) -> float:
    before, after = before.detach().double(), after.detach().double()
    return float((after - before).norm() / before.norm())


def global_optimizer_hooks() -> tuple[int, int]:
    return len(optim_module._global_optimizer_pre_hooks), len(optim_module._global_optimizer_post_hooks)


_optimizer_hooks_at_start = (0, 0)


@pytest.fixture(autouse=True)
def _optimizer_hooks_baseline():
    """torch.optim's step hooks are process-wide: compare with what there was when the test began."""
    global _optimizer_hooks_at_start
    _optimizer_hooks_at_start = global_optimizer_hooks()
    yield


def assert_no_hooks(module: nn.Module, optimizer_hooks_before: tuple[int, int] | None = None) -> None:
    """Nothing of the monitor is left: no forward (pre-)hooks on any submodule, no
    post-accumulate-grad hook on any parameter, no process-wide optimizer hook, no function mode."""
    if optimizer_hooks_before is None:
        optimizer_hooks_before = _optimizer_hooks_at_start
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"forward hooks left on {name!r}"
        assert not m._backward_hooks and not m._backward_pre_hooks, f"backward hooks left on {name!r}"
    for name, p in module.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"post-accumulate-grad hooks left on {name!r}"
        assert not getattr(p, "_backward_hooks", None), f"tensor hooks left on {name!r}"
    assert global_optimizer_hooks() == optimizer_hooks_before
    assert torch._C._len_torch_function_stack() == 0


# -- Lightning --------------------------------------------------------------------------------------
class Net(L.LightningModule):
    """8 -> H -> ReLU (act1) -> H -> Tanh (act2) -> 1, recording its own ground truth.

    At every optimizer step (``on_before_optimizer_step``, before Lightning clips) it stores each
    parameter's gradient norm and a copy of its weights; once the optimizer stepped
    (``on_train_batch_end``) the update ratio ||w_after - w_before|| / ||w_before||. On the
    optimizer steps in ``retain_at`` it keeps act1's outputs (every micro-batch) with
    ``retain_grad()``.
    """

    def __init__(self, hidden: int = 16, lr: float = 0.1, retain_at: tuple[int, ...] = (), fail_backward_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(N_IN, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.Tanh()
        self.head = nn.Linear(hidden, 1)
        self.lr = lr
        self.retain_at = set(retain_at)
        self.fail_backward_at = fail_backward_at
        self.grad_norms: dict[int, dict[str, float]] = {}  # optimizer step -> pre-clipping norms
        self.clipped_total: dict[int, float] = {}  # optimizer step -> total grad norm after the step (clipped)
        self.update_ratios: dict[int, dict[str, float]] = {}
        self.act1_outputs: dict[int, list[torch.Tensor]] = {}
        self.act1_grads: dict[int, list[torch.Tensor]] = {}
        self._before: tuple[int, dict[str, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.fc1(x))
        if self.training and self.global_step in self.retain_at and torch.is_grad_enabled():
            h.retain_grad()
            self.act1_outputs.setdefault(self.global_step, []).append(h)
        h = self.fc2(h)
        if self.fail_backward_at is not None and self.global_step == self.fail_backward_at and self.training:
            h = FailInBackward.apply(h)
        return self.head(self.act2(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_before_optimizer_step(self, optimizer) -> None:
        step = self.global_step
        self.grad_norms[step] = {n: float(p.grad.detach().double().norm()) for n, p in self.named_parameters()}
        self._before = (step, {n: p.detach().clone() for n, p in self.named_parameters()})
        if step in self.act1_outputs:
            self.act1_grads[step] = [h.grad.detach().clone() for h in self.act1_outputs.pop(step)]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._before is None:
            return  # a micro-batch without an optimizer step
        step, before = self._before
        self._before = None
        params = dict(self.named_parameters())
        self.update_ratios[step] = {n: ratio(params[n], w) for n, w in before.items()}
        self.clipped_total[step] = float(torch.stack([p.grad.detach().double().norm() for p in params.values()]).norm())


class Failure(RuntimeError):
    pass


class FailInBackward(torch.autograd.Function):
    """Identity whose backward raises."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise Failure("boom in backward")


def loader(n: int = N_SAMPLES, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_IN, generator=g)
    y = x[:, :1] * 0.5 + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def trainer(tmp_path, **kw) -> L.Trainer:
    opts = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
    }
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.Trainer(**opts)


def fit(t: L.Trainer, model: L.LightningModule, data: DataLoader) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no TensorBoardLogger", dataloader workers, ...
        t.fit(model, data)


def test_lightning_grad_norms_are_before_clipping_and_update_ratios_span_the_optimizer_step(tmp_path):
    """gradient_clip_val=1e-3: the monitor's norms are the unclipped ones (way above 1e-3), equal to
    the module's own ``p.grad.norm()`` at ``on_before_optimizer_step``; update ratios equal the
    module's exact ||w_after - w_before|| / ||w_before||. hidden=71: fc2.weight has 5041 elements
    (> 4096, a strided estimate), every other parameter is exact."""
    clip = 1e-3
    records = Records()
    model = Net(hidden=71, lr=0.5)
    cb = LightningMonitor(every_n_steps=2, on_alert="ignore", sinks=[records])
    fit(trainer(tmp_path, callbacks=[cb], gradient_clip_val=clip, limit_train_batches=6), model, loader())

    by_step = records.by_step()
    assert sorted(by_step) == [0, 2, 4]
    names = [n for n, _ in model.named_parameters()]
    assert model.fc2.weight.numel() > 4096
    for step, record in by_step.items():
        truth_norms, truth_ratios = model.grad_norms[step], model.update_ratios[step]
        # clipping really happened: the gradients the optimizer used have total norm `clip`
        assert model.clipped_total[step] == pytest.approx(clip, rel=1e-4)
        params = {p.name: p for p in record.parameters}
        assert list(params) == names  # model order, every trainable parameter
        for name in names:
            p = params[name]
            assert p.step == step
            assert p.grad_norm == pytest.approx(truth_norms[name], rel=1e-5, abs=1e-12), (step, name)
            assert p.grad_norm > 10 * clip, (step, name)  # not the clipped gradient
            exact = name != "fc2.weight"
            rel = 1e-4 if exact else 0.05
            assert p.update_ratio == pytest.approx(truth_ratios[name], rel=rel), (step, name)
            assert p.update_ratio > 0
    # parameter_health() holds the latest sampled step (also once fit has closed the monitor)
    latest = cb.monitor.parameter_health()
    assert set(latest) == set(names) and {p.step for p in latest.values()} == {4}
    assert latest["head.weight"].grad_norm == pytest.approx(model.grad_norms[4]["head.weight"], rel=1e-5)
    # and the layers got their activation gradients
    health = cb.health()
    assert set(health) == {"act1", "act2"}
    for h in health.values():
        assert h.step == 4 and h.grad_rms is not None and h.grad_rms > 0 and h.grad_nonfinite == 0
    assert_no_hooks(model)


def test_lightning_activation_grad_rms_matches_retain_grad(tmp_path):
    """act1's grad_rms / grad_max_abs == RMS / max |.| of ``h.grad`` of an independent ``retain_grad()``
    on act1's output, at every sampled step."""
    records = Records()
    model = Net(hidden=16, retain_at=(0, 3, 6))
    cb = LightningMonitor(every_n_steps=3, on_alert="ignore", sinks=[records])
    fit(trainer(tmp_path, callbacks=[cb], limit_train_batches=7), model, loader())

    by_step = records.by_step()
    assert sorted(by_step) == [0, 3, 6]
    for step in (0, 3, 6):
        (g,) = model.act1_grads[step]
        act1 = next(ls.health for ls in by_step[step].layers if ls.name == "act1")
        assert act1.grad_rms == pytest.approx(rms(g), rel=1e-5), step
        assert act1.grad_max_abs == pytest.approx(float(g.abs().max()), rel=1e-6), step
        assert act1.grad_nonfinite == 0
    # non-sampled steps add nothing: the latest health is step 6's
    assert cb.health()["act1"].grad_rms == pytest.approx(rms(model.act1_grads[6][0]), rel=1e-5)
    assert_no_hooks(model)


def test_lightning_gradient_accumulation_reports_the_accumulated_gradient(tmp_path):
    """accumulate_grad_batches=2: a sampled optimizer step spans both micro-batches. Parameter norms
    are those of the accumulated gradient at the optimizer step; act1's grad_rms is over the
    gradients of both micro-batches (retain_grad on each)."""
    records = Records()
    model = Net(hidden=16, retain_at=(0, 2))
    cb = LightningMonitor(every_n_steps=2, on_alert="ignore", sinks=[records])
    fit(trainer(tmp_path, callbacks=[cb], accumulate_grad_batches=2, limit_train_batches=8), model, loader())

    assert model.global_step == 4
    by_step = records.by_step()
    assert sorted(by_step) == [0, 2]
    for step in (0, 2):
        record = by_step[step]
        params = {p.name: p for p in record.parameters}
        assert set(params) == set(model.grad_norms[step])
        for name, truth in model.grad_norms[step].items():
            assert params[name].grad_norm == pytest.approx(truth, rel=1e-5), (step, name)
            assert params[name].update_ratio == pytest.approx(model.update_ratios[step][name], rel=1e-4), (step, name)
        grads = model.act1_grads[step]
        assert len(grads) == 2  # one per micro-batch
        truth_rms = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads) / sum(g.numel() for g in grads))
        truth_max = max(float(g.abs().max()) for g in grads)
        for ls in record.layers:
            assert ls.health.grad_rms is not None and ls.health.grad_rms > 0, (step, ls.name)
        act1 = next(ls.health for ls in record.layers if ls.name == "act1")
        assert act1.grad_rms == pytest.approx(truth_rms, rel=1e-5), step
        assert act1.grad_max_abs == pytest.approx(truth_max, rel=1e-6), step
    assert_no_hooks(model)


class WithValidation(Net):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x * 100), y)


def test_lightning_validation_inside_an_accumulation_window_keeps_the_whole_step(tmp_path):
    """accumulate_grad_batches=2, val_check_interval=3: validation runs after micro-batch 0 of optimizer
    step 1. The sampled step 1 still spans both of its micro-batches and its optimizer step."""
    records = Records()
    model = WithValidation(hidden=16, retain_at=(1,))
    cb = LightningMonitor(every_n_steps=1, on_alert="ignore", sinks=[records])
    t = trainer(
        tmp_path, callbacks=[cb], accumulate_grad_batches=2, limit_train_batches=4, val_check_interval=3,
        limit_val_batches=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader(), loader())
    assert model.global_step == 2
    record = records.by_step()[1]
    grads = model.act1_grads[1]
    assert len(grads) == 2
    truth_rms = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads) / sum(g.numel() for g in grads))
    params = {p.name: p for p in record.parameters}
    assert set(params) == set(model.grad_norms[1])
    for name, truth in model.grad_norms[1].items():
        assert params[name].grad_norm == pytest.approx(truth, rel=1e-5), name
        assert params[name].update_ratio == pytest.approx(model.update_ratios[1][name], rel=1e-4), name
    act1 = next(ls.health for ls in record.layers if ls.name == "act1")
    assert act1.grad_rms == pytest.approx(truth_rms, rel=1e-5)
    assert_no_hooks(model)


class TwoStepGAN(L.LightningModule):
    """Manual optimization, two optimizer steps per batch (discriminator, then generator); the
    discriminator's gradient norm at each of its steps is kept as ground truth."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        self.D = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.truth: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        (x,) = batch
        og, od = self.optimizers()
        z = torch.randn(8, 4, generator=torch.Generator().manual_seed(1000 + self.global_step))
        od.zero_grad()
        self.manual_backward(self.D(x).mean() - self.D(self.G(z).detach()).mean())
        self.truth[self.global_step] = self.D[0].weight.grad.norm().item()
        od.step()
        og.zero_grad()
        self.manual_backward(self.D(self.G(z)).mean())
        og.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.G.parameters(), lr=1e-2), torch.optim.SGD(self.D.parameters(), lr=1e-2)


def test_lightning_manual_optimization_resumed_samples_the_same_batches(tmp_path):
    """Two optimizer steps per batch, N=3: sample 9 is the batch that runs steps 8-9, also in a
    fit resumed from the step-8 checkpoint (it was the batch after, labelled 9)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = DataLoader(TensorDataset(torch.randn(200, 4, generator=torch.Generator().manual_seed(0))), batch_size=8)

    def fit(ckpt=None):
        rec = Records()
        model = TwoStepGAN()
        trainer = L.Trainer(
            max_steps=20, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[
                LightningMonitor(every_n_steps=3, sinks=[rec], on_alert="ignore"),
                ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1),
            ],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, data, ckpt_path=ckpt)
        grads = {r.step: {p.name: p.grad_norm for p in r.parameters}["D.0.weight"] for r in rec.records}
        return grads, model.truth

    def d_step(grad, truth):  # which discriminator step a sample's gradient norm is
        return [k for k, t in truth.items() if grad == pytest.approx(t, rel=1e-5)]

    full, truth = fit()
    (ckpt,) = glob.glob(str(tmp_path / "ck" / "*step=8*.ckpt"))
    resumed, truth2 = fit(ckpt)
    assert d_step(full[9], truth) == [8]
    assert sorted(resumed) == [s for s in sorted(full) if s > 8]
    assert {s: d_step(g, truth2) for s, g in resumed.items()} == {s: d_step(full[s], truth) for s in resumed}


def test_lightning_bf16_mixed_gradients_present_and_finite(tmp_path):
    """precision="bf16-mixed" on CPU: bf16 activations and activation gradients, float32 weights.
    Every gradient number is there and finite, and still equals the independent computation."""
    records = Records()
    model = Net(hidden=16, retain_at=(0, 2))
    cb = LightningMonitor(every_n_steps=2, on_alert="ignore", sinks=[records])
    fit(trainer(tmp_path, callbacks=[cb], precision="bf16-mixed", limit_train_batches=4), model, loader())

    assert sorted(r.step for r in records.records) == [0, 2]
    for record in records.records:
        assert {ls.name for ls in record.layers} == {"act1", "act2"}
        for ls in record.layers:
            h = ls.health
            assert h.grad_rms is not None and math.isfinite(h.grad_rms) and h.grad_rms > 0
            assert h.grad_max_abs is not None and math.isfinite(h.grad_max_abs) and h.grad_max_abs >= h.grad_rms
            assert h.grad_nonfinite == 0
        (g,) = model.act1_grads[record.step]
        assert g.dtype == torch.bfloat16  # the autocast really ran
        act1 = next(ls.health for ls in record.layers if ls.name == "act1")
        assert act1.grad_rms == pytest.approx(rms(g), rel=1e-5)
        assert act1.grad_max_abs == pytest.approx(float(g.abs().max()), rel=1e-6)
        assert len(record.parameters) == len(list(model.parameters()))
        for p in record.parameters:
            assert p.grad_norm is not None and math.isfinite(p.grad_norm) and p.grad_norm > 0
            assert p.update_ratio is not None and math.isfinite(p.update_ratio) and p.update_ratio > 0
            # the master weights are float32: the module's own numbers still hold
            assert p.grad_norm == pytest.approx(model.grad_norms[record.step][p.name], rel=1e-5)
            assert p.update_ratio == pytest.approx(model.update_ratios[record.step][p.name], rel=1e-4)
    assert_no_hooks(model)


@pytest.mark.parametrize("fail_at", [0, 2], ids=["first-sampled-step", "later-sampled-step"])
def test_lightning_exception_in_backward_leaves_no_hooks(tmp_path, fail_at):
    """The backward of a sampled step raises (a custom autograd Function): the user's exception
    comes out of fit, and no hook of any kind is left behind. Step 0 is the step with per-parameter
    post-accumulate-grad hooks (later ones read the gradients at on_before_optimizer_step)."""
    before = global_optimizer_hooks()
    model = Net(hidden=16, fail_backward_at=fail_at)
    cb = LightningMonitor(every_n_steps=2, on_alert="ignore")
    with pytest.raises(Failure, match="boom in backward"):
        fit(trainer(tmp_path, callbacks=[cb], limit_train_batches=6), model, loader())
    assert model.global_step == fail_at
    assert not cb.monitor.in_step
    assert_no_hooks(model, before)
    # the failed step recorded nothing: the latest health is the previous sampled step's (if any)
    assert [h.step for h in cb.health().values()] == ([fail_at - 2] * 2 if fail_at else [])


def test_tensorboard_logger_gets_gradient_scalars_and_flow_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = Net(hidden=16)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    cb = LightningMonitor(every_n_steps=2, on_alert="ignore", images_every_n_samples=1)
    fit(trainer(tmp_path, callbacks=[cb], logger=tb, limit_train_batches=6), model, loader())

    scalars: dict[str, list[tuple[int, float]]] = {}
    images: dict[str, list[int]] = {}
    files = glob.glob(os.path.join(tb.log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files
    for d in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(d, size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))

    names = [n for n, _ in model.named_parameters()]
    for layer in ("act1", "act2"):
        for kind in ("gradient_rms", "gradient_max_abs", "gradient_ratio"):
            tag = f"{kind}/{layer}"
            assert [s for s, _ in scalars.get(tag, [])] == [0, 2, 4], tag
            assert all(math.isfinite(v) and v > 0 for _, v in scalars[tag]), tag
    for name in names:
        for kind in ("gradient_norm", "update_ratio"):
            tag = f"{kind}/{name}"
            assert [s for s, _ in scalars.get(tag, [])] == [0, 2, 4], tag
    # the scalars are the module's own numbers
    for step, v in scalars["gradient_norm/fc1.weight"]:
        assert v == pytest.approx(model.grad_norms[step]["fc1.weight"], rel=1e-5)
    for step, v in scalars["update_ratio/head.weight"]:
        assert v == pytest.approx(model.update_ratios[step]["head.weight"], rel=1e-4)
    for step, v in scalars["gradient_norm/(total)"]:
        total = math.sqrt(sum(n * n for n in model.grad_norms[step].values()))
        assert v == pytest.approx(total, rel=1e-5)
    assert images.get("gradient_flow"), sorted(images)
    assert set(images["gradient_flow"]) <= {0, 2, 4}


# -- skorch ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wine():
    X, y = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    return X, y.astype(np.int64)


class Probe(Callback):
    """Placed after the monitor: the truth of every training batch (weights before, after, gradient
    norms) and, on sampled batches, the monitor's parameter health read before it is closed."""

    def __init__(self, monitor_cb: SkorchMonitor) -> None:
        self.monitor_cb = monitor_cb
        self.truth: dict[int, dict[str, tuple[float, float]]] = {}  # step -> name -> (grad norm, ratio)
        self.reported: dict[int, dict] = {}
        self.step = 0
        self._before: dict[str, torch.Tensor] = {}

    def on_batch_begin(self, net, batch=None, training=None, **kwargs):
        if training:
            self._before = {n: p.detach().clone() for n, p in net.module_.named_parameters()}

    def on_batch_end(self, net, batch=None, training=None, **kwargs):
        if not training:
            return
        step, self.step = self.step, self.step + 1
        self.truth[step] = {
            n: (float(p.grad.detach().double().norm()), ratio(p, self._before[n]))
            for n, p in net.module_.named_parameters()
        }
        mon = self.monitor_cb.monitor_
        assert mon is not None and not mon.in_step  # the sampled step ended at on_batch_end
        params = mon.parameter_health()
        if params and next(iter(params.values())).step == step:
            self.reported[step] = params


def test_skorch_wine_gradients_update_ratios_and_clean_up(wine):
    X, y = wine
    before = global_optimizer_hooks()
    cb = SkorchMonitor(every_n_steps=3, on_alert="ignore")
    probe = Probe(cb)
    net = NeuralNetClassifier(
        WineClassifier,
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=0.01,
        max_epochs=2,
        batch_size=32,
        train_split=None,
        verbose=0,
        callbacks=[cb, probe],
    )
    net.fit(X, y)

    n_batches = math.ceil(len(X) / 32)
    assert probe.step == 2 * n_batches
    sampled = [s for s in range(2 * n_batches) if s % 3 == 0]
    assert sorted(probe.reported) == sampled
    names = [n for n, _ in net.module_.named_parameters()]
    for step in sampled:
        reported = probe.reported[step]
        assert list(reported) == names
        for name in names:
            norm, upd = probe.truth[step][name]
            assert reported[name].grad_norm == pytest.approx(norm, rel=1e-5), (step, name)
            assert reported[name].update_ratio == pytest.approx(upd, rel=1e-4), (step, name)
    # the callback's health after fit: every layer has its activation gradient
    health = cb.health()
    assert set(health) == {"dense0.relu", "dense1.relu"}
    for name, h in health.items():
        assert h.step == sampled[-1], name
        assert h.grad_rms is not None and math.isfinite(h.grad_rms) and h.grad_rms > 0, name
        assert h.grad_nonfinite == 0
    assert cb.monitor_ is None  # closed at train end
    assert_no_hooks(net.module_, before)


def test_skorch_gradient_rms_matches_retain_grad(wine):
    """dense0's ReLU output: the monitor's grad_rms equals an independent retain_grad's RMS."""
    X, y = wine

    class Retaining(WineClassifier):
        def forward(self, X):
            h = F.relu(self.dense0(X))
            if self.training:
                h.retain_grad()
                self.kept = h
            return self.output(F.relu(self.dense1(h)))

    class GradProbe(Callback):
        def __init__(self, monitor_cb):
            self.monitor_cb, self.step, self.pairs = monitor_cb, 0, []

        def on_batch_end(self, net, batch=None, training=None, **kwargs):
            if not training:
                return
            step, self.step = self.step, self.step + 1
            h = self.monitor_cb.monitor_.health()["dense0.relu"]
            if h.step == step:
                self.pairs.append((h.grad_rms, h.grad_max_abs, rms(net.module_.kept.grad), float(net.module_.kept.grad.abs().max())))

    cb = SkorchMonitor(every_n_steps=2, on_alert="ignore")
    probe = GradProbe(cb)
    net = NeuralNetClassifier(
        Retaining, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.05, max_epochs=1,
        batch_size=32, train_split=None, verbose=0, callbacks=[cb, probe],
    )
    net.fit(X, y)
    assert len(probe.pairs) == math.ceil(math.ceil(len(X) / 32) / 2)
    for got_rms, got_max, truth_rms, truth_max in probe.pairs:
        assert got_rms == pytest.approx(truth_rms, rel=1e-5)
        assert got_max == pytest.approx(truth_max, rel=1e-6)


def test_skorch_exception_in_backward_leaves_no_hooks(wine):
    """The backward of a sampled batch raises: fit raises the user's exception, and no hook of the
    monitor is left on the module, its parameters or torch.optim (process-wide)."""
    X, y = wine

    class FailingBackward(WineClassifier):
        calls = 0

        def forward(self, X):
            h = super().forward(X)
            if self.training:
                type(self).calls += 1
                if type(self).calls == 3:  # training batch 2: sampled with every_n_steps=2
                    h = FailInBackward.apply(h)
            return h

    before = global_optimizer_hooks()
    cb = SkorchMonitor(every_n_steps=2, on_alert="ignore")
    net = NeuralNetClassifier(
        FailingBackward, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.05, max_epochs=1,
        batch_size=32, train_split=None, verbose=0, callbacks=[cb],
    )
    try:
        with pytest.raises(Failure, match="boom in backward"):
            net.fit(X, y)
        assert cb.step_ == 3
        assert_no_hooks(net.module_, before)
    finally:
        cb.initialize()  # closes the monitor: nothing leaks into later tests (torch.optim's hooks are global)


def test_lightning_gradients_false_records_no_gradient_numbers(tmp_path):
    """``gradients=False``: no gradient numbers (per layer or per parameter); the activations are recorded."""
    cb = LightningMonitor(every_n_steps=2, on_alert="ignore", gradients=False)
    fit(trainer(tmp_path, callbacks=[cb], limit_train_batches=4), Net(), loader())
    health = cb.health()
    assert health and all(h.grad_rms is None for h in health.values())
    assert all(h.rms > 0 for h in health.values())
    assert cb.parameter_health() == {}
    with pytest.raises(TypeError, match="gradients"):
        LightningMonitor(gradients="yes")


def test_monitor_rejects_a_non_bool_gradients_option():
    from monitor import Monitor

    with pytest.raises(TypeError, match="`gradients` to be True or False, got 'no'"):
        Monitor(nn.Linear(2, 2), gradients="no")
