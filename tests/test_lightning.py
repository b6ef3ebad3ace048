"""The Lightning callback, exercised with real ``lightning.pytorch.Trainer`` runs on CPU.

Ground truth (which units are dead, which steps are optimizer steps) is computed here without
the monitor. The DDP tests run this file as a script (``python tests/test_lightning.py ddp OUT``)
so that Lightning's launchers start the second process from a script, not from pytest.
"""

from __future__ import annotations

import glob
import json
import math
import os
import runpy
import subprocess
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("lightning")
import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from integrations.lightning import ActivationAlertError, ActivationMonitor
from monitor import MonitorWarning, SampleRecord, Sink, Thresholds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IN, N_SAMPLES, BATCH = 8, 256, 32
torch.set_num_threads(1)


# -- tiny models and helpers ---------------------------------------------------------------------
class MLP(L.LightningModule):
    """8 -> H -> ReLU (net.1) -> H -> ReLU (net.3) -> 1; ``dead_bias`` kills net.1 at init."""

    def __init__(self, hidden: int = 32, dead_bias: float | None = None, lr: float = 0.05, fail_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(N_IN, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        if dead_bias is not None:
            with torch.no_grad():
                self.net[0].bias.fill_(dead_bias)
        self.lr = lr
        self.fail_at = fail_at
        self.val_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom in training_step")
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        # Inputs x1000: about half of net.1's units fire here. If validation leaked into a
        # sampled step, net.1 would not look dead.
        x, y = batch
        self.val_forwards += 1
        self.log("val_loss", F.mse_loss(self(x * 1000), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0] * 1000)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, N_IN, generator=g)
    return TensorDataset(x, x[:, :1] * 0.5 + 0.1 * torch.randn(N_SAMPLES, 1, generator=g))


def loader(seed: int = 1) -> DataLoader:
    return DataLoader(data(seed), batch_size=BATCH)


def trainer(tmp_path, **kw) -> L.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
    )
    opts.update(kw)
    return L.Trainer(**opts)


class Steps(Sink):
    """Records the step of every sample record (runs on the monitor's thread)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def write(self, record: SampleRecord) -> None:
        self.steps.append(record.step)


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def no_function_mode() -> bool:
    return not torch.overrides._get_current_function_mode_stack()


def events(logdir: str) -> dict[str, dict]:
    """{tag kind: {tag: [(step, value)]}} from every event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict] = {"scalars": {}, "images": {}, "tensors": {}, "histograms": {}}
    files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    for d in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(d, size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags["scalars"]:
            out["scalars"].setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in tags["images"]:
            out["images"].setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        for tag in tags["tensors"]:
            out["tensors"].setdefault(tag, []).extend(e.step for e in acc.Tensors(tag))
        for tag in tags["histograms"]:
            out["histograms"].setdefault(tag, []).extend(e.step for e in acc.Histograms(tag))
    return out


def true_dead_units(model: MLP, x: torch.Tensor) -> list[int]:
    """Units of net.1 that never fire on ``x`` (a plain forward, no monitor)."""
    with torch.no_grad():
        pre = model.net[0](x)
    return torch.nonzero((pre <= 0).all(0)).flatten().tolist()


# -- options -------------------------------------------------------------------------------------
def test_options_are_validated_at_construction():
    with pytest.raises(ValueError, match=r"Expected `every_n_steps` to be a positive integer, got 0\."):
        ActivationMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="Expected `on_alert` to be one of 'warn', 'raise', 'ignore', 'stop'"):
        ActivationMonitor(on_alert="halt")
    with pytest.raises(TypeError, match="Expected `thresholds` to be a monitor.Thresholds"):
        ActivationMonitor(thresholds={"dead_fraction": 0.1})
    with pytest.raises(ValueError, match="images_every_n_samples"):
        ActivationMonitor(images_every_n_samples=-1)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        ActivationMonitor(every_n_step=5)
    cb = ActivationMonitor(every_n_steps=5, on_alert="stop", include="net.*", histograms=False)
    assert cb.state_key != ActivationMonitor(every_n_steps=7).state_key
    assert cb.alerts == [] and cb.health() == {}


def test_missing_lightning_names_the_extra():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "try:\n    import integrations.lightning\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False).stdout
    assert "pip install 'activation-monitor[lightning]'" in out


# -- a real pathology, into the trainer's TensorBoardLogger ---------------------------------------
def test_dead_layer_alert_in_tensorboard_beside_user_metrics(tmp_path):
    model = MLP(dead_bias=-10.0)
    steps = Steps()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", sinks=[steps])
    logger = TensorBoardLogger(str(tmp_path), name="run")
    t = trainer(tmp_path, logger=logger, max_epochs=2, callbacks=[cb])
    before = hook_count(model)
    t.fit(model, loader(), loader(2))
    assert t.global_step == 16 and model.val_forwards > 0

    # ground truth without the monitor: net.1's weights never change (no gradient through it)
    dead = true_dead_units(model, data().tensors[0])
    assert dead == list(range(32))
    health = cb.health()
    assert list(health["net.1"].dead_units) == dead and health["net.1"].dead_fraction == 1.0
    dead_alerts = [a for a in cb.alerts if a.layer == "net.1" and a.kind == "dead"]
    assert len(dead_alerts) == 1 and not dead_alerts[0].recovered
    # sampled at every 2nd optimizer step, over two epochs, once each
    assert steps.steps == list(range(0, 16, 2))
    assert hook_count(model) == before and no_function_mode()

    # validation/predict after fit add nothing
    t.validate(model, loader(2), verbose=False)
    t.predict(model, loader(2))
    assert steps.steps == list(range(0, 16, 2)) and hook_count(model) == before

    ev = events(logger.log_dir)
    assert "train_loss" in ev["scalars"]  # the user's metric, same run directory
    dead_curve = dict(ev["scalars"]["activation_dead_fraction/net.1"])
    assert sorted(dead_curve) == list(range(0, 16, 2)) and dead_curve[14] == 1.0
    assert "activation_scan" in ev["images"]
    assert "activation_hist/net.1" in ev["histograms"]
    assert any(tag.startswith("activation_alerts") for tag in ev["tensors"])


def test_healthy_run_has_no_alerts(tmp_path):
    model = MLP(lr=0.01)
    cb = ActivationMonitor(every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)
        trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path)), max_epochs=2, callbacks=[cb]).fit(model, loader())
    assert cb.alerts == []
    assert set(cb.health()) == {"net.1", "net.3"}
    assert all(h.dead_fraction < 0.5 for h in cb.health().values())


def test_huge_learning_rate_explodes(tmp_path):
    model = MLP(lr=50.0)
    cb = ActivationMonitor(every_n_steps=1, on_alert="ignore")
    trainer(tmp_path, logger=False, max_epochs=2, callbacks=[cb]).fit(model, loader())
    assert {a.kind for a in cb.alerts} & {"exploding", "nonfinite"}


# -- sampling follows optimizer steps ---------------------------------------------------------------
def test_gradient_accumulation_and_epochs_sample_optimizer_steps(tmp_path):
    seen: list[tuple[int, int]] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, cb.monitor.in_step))

    steps = Steps()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", sinks=[steps])
    t = trainer(tmp_path, logger=False, max_epochs=3, accumulate_grad_batches=3, limit_train_batches=6, callbacks=[cb, Spy()])
    t.fit(MLP(), loader())
    assert t.global_step == 6
    # micro-batches per optimizer step: 3; a sampled step spans all three (its optimizer step's gradients)
    assert [s for s, active in seen if active] == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert steps.steps == [0, 2, 4]


# -- what a sampled step spans: gradients=False, manual optimization -------------------------------------
def rms(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors) / sum(t.numel() for t in tensors))


def ratio(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after.detach().double() - before.double()).norm() / before.double().norm())


class Records(Sink):
    """Keeps every sample record (written on the monitor's thread)."""

    def __init__(self) -> None:
        self.records: list[SampleRecord] = []

    def write(self, record: SampleRecord) -> None:
        self.records.append(record)

    def steps(self) -> list[int]:
        return [r.step for r in self.records]

    def layer(self, step: int, name: str):
        (record,) = [r for r in self.records if r.step == step]
        return next(ls.health for ls in record.layers if ls.name == name)


def test_gradients_false_with_accumulation_records_every_micro_batch(tmp_path):
    """gradients=False changes what is recorded (no gradient numbers), not which forwards: the
    sampled step is still the whole optimizer step, the four micro-batches of each (the
    test's own forward hook on net.1 gives the truth)."""
    model = MLP()
    outputs: dict[int, list[torch.Tensor]] = {}

    def keep(module, args, out):
        if module.training and torch.is_grad_enabled():
            outputs.setdefault(model.trainer.global_step, []).append(out.detach().clone())

    handle = model.net[1].register_forward_hook(keep)
    records = Records()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", gradients=False, sinks=[records])
    try:
        t = trainer(
            tmp_path, logger=False, accumulate_grad_batches=4, limit_train_batches=8, limit_val_batches=0, callbacks=[cb]
        )
        t.fit(model, loader())
    finally:
        handle.remove()
    assert t.global_step == 2
    assert records.steps() == [0]
    (record,) = records.records
    truth = outputs[0]
    assert len(truth) == 4  # four micro-batches of optimizer step 0
    h = next(ls.health for ls in record.layers if ls.name == "net.1")
    assert h.rms == pytest.approx(rms(truth), rel=1e-5)
    assert h.max_abs == pytest.approx(max(float(o.abs().max()) for o in truth), rel=1e-6)
    assert h.grad_rms is None and record.parameters == [] and cb.parameter_health() == {}
    assert hook_count(model) == 0 and no_function_mode()


class ManualAccumulation(L.LightningModule):
    """Lightning's documented manual accumulation: ``manual_backward`` every batch, ``opt.step();
    opt.zero_grad()`` every ``every`` batches. Its own truth, per optimizer step: act's output of
    every micro-batch (``retain_grad``), the gradient norms right before ``opt.step()``, the
    exact update ratios."""

    def __init__(self, every: int = 2, fail_at_batch: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.fc = nn.Linear(N_IN, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 1)
        self.every = every
        self.fail_at_batch = fail_at_batch
        self.acts: dict[int, list[torch.Tensor]] = {}
        self.norms: dict[int, dict[str, float]] = {}
        self.ratios: dict[int, dict[str, float]] = {}

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("boom in a micro-batch")
        x, y = batch
        opt = self.optimizers()
        h = self.act(self.fc(x))
        h.retain_grad()
        self.acts.setdefault(self.global_step, []).append(h)
        self.manual_backward(F.mse_loss(self.out(h), y) / self.every)
        if (batch_idx + 1) % self.every == 0:
            step = self.global_step
            self.norms[step] = {n: float(p.grad.double().norm()) for n, p in self.named_parameters()}
            before = {n: p.detach().clone() for n, p in self.named_parameters()}
            opt.step()
            self.ratios[step] = {n: ratio(p, before[n]) for n, p in self.named_parameters()}
            opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manual_optimization_with_accumulation_samples_the_whole_optimizer_step(tmp_path):
    """Two micro-batches per ``opt.step()``: a sampled step spans both (activations and their
    gradients) and ends after the optimizer stepped (gradient norms and update ratios), with no
    warning."""
    model = ManualAccumulation(every=2)
    records = Records()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", sinks=[records])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = trainer(tmp_path, logger=False, limit_train_batches=8, limit_val_batches=0, callbacks=[cb])
        t.fit(model, loader())
    assert [str(x.message) for x in w if issubclass(x.category, MonitorWarning) and "optimizer" in str(x.message)] == []
    assert t.global_step == 4
    assert records.steps() == [0, 2]
    names = [n for n, _ in model.named_parameters()]
    for record in records.records:
        step = record.step
        outs = model.acts[step]
        assert len(outs) == 2  # both micro-batches of this optimizer step
        act = records.layer(step, "act")
        assert act.rms == pytest.approx(rms([h.detach() for h in outs]), rel=1e-5), step
        assert act.grad_rms == pytest.approx(rms([h.grad for h in outs]), rel=1e-5), step
        params = {p.name: p for p in record.parameters}
        assert list(params) == names
        for name in names:
            assert params[name].step == step
            assert params[name].grad_norm == pytest.approx(model.norms[step][name], rel=1e-5), (step, name)
            assert params[name].update_ratio == pytest.approx(model.ratios[step][name], rel=1e-4), (step, name)
    assert set(cb.parameter_health()) == set(names)
    assert hook_count(model) == 0 and no_function_mode()


def test_manual_accumulation_window_open_at_epoch_end_warns_in_lightning_terms(tmp_path):
    """Five batches, a step every two: batch 4 begins sampled step 2 (and, next epoch, 4) and the
    epoch ends before its optimizer step. The step keeps its activations; one warning says why
    there are no parameter numbers, in Lightning's terms (not the plain loop's "inside `with
    monitor.step`")."""
    model = ManualAccumulation(every=2)
    records = Records()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", sinks=[records])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = trainer(tmp_path, logger=False, max_epochs=2, limit_train_batches=5, limit_val_batches=0, callbacks=[cb])
        t.fit(model, loader())
    assert t.global_step == 4  # two per epoch; batch 4's gradient is carried into the next epoch's first step
    messages = [str(x.message) for x in w if issubclass(x.category, MonitorWarning)]
    about = [m for m in messages if "optimizer" in m]
    assert len(about) == 1, messages
    assert "sampled step 2 ended (with the epoch" in about[0] and "self.optimizers()" in about[0]
    assert not any("monitor.step" in m for m in messages)
    assert records.steps() == [0, 2, 4]
    by_step = {r.step: r for r in records.records}
    assert by_step[0].parameters != [] and by_step[2].parameters == [] and by_step[4].parameters == []
    (out,) = model.acts[2][:1]  # batch 4's forward, the only one in step 2 (epoch 0)
    assert records.layer(2, "act").rms == pytest.approx(rms([out.detach()]), rel=1e-5)
    assert hook_count(model) == 0 and no_function_mode()


class UncountedOptimizer(L.LightningModule):
    """Manual optimization that steps the torch optimizer itself (`use_pl_optimizer=False`):
    Lightning never counts a step, `global_step` stays 0."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.fc, self.act, self.out = nn.Linear(N_IN, 16), nn.ReLU(), nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers(use_pl_optimizer=False)
        x, y = batch
        self.manual_backward(F.mse_loss(self.out(self.act(self.fc(x))), y))
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_an_optimizer_lightning_does_not_count_closes_the_step_after_a_bounded_number_of_batches(tmp_path):
    """Without a counted optimizer step, a sampled step in manual optimization would stay open
    (hooks on every batch, host copies of every batch held) until the epoch ends: it closes after
    MAX_OPEN_BATCHES batches, with its activations and one warning."""
    from integrations.lightning import MAX_OPEN_BATCHES

    model = UncountedOptimizer()
    records = Records()
    cb = ActivationMonitor(every_n_steps=1, on_alert="ignore", sinks=[records])
    data_ = DataLoader(data(), batch_size=4)  # 64 batches in the epoch
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = trainer(tmp_path, logger=False, limit_train_batches=64, limit_val_batches=0, callbacks=[cb])
        t.fit(model, data_)
    assert t.global_step == 0
    assert records.steps() == [0]
    assert records.layer(0, "act").evidence_values == MAX_OPEN_BATCHES * 4 < 64 * 4
    about = [str(x.message) for x in w if issubclass(x.category, MonitorWarning) and "optimizer step" in str(x.message)]
    assert len(about) == 1 and f"after {MAX_OPEN_BATCHES} batches" in about[0]
    assert hook_count(model) == 0 and no_function_mode()


def test_manual_accumulation_exception_in_an_open_sampled_step_removes_hooks(tmp_path):
    """The sampled step 0 is open across batches 0 and 1; batch 1 raises: nothing is recorded for
    it, every hook is gone."""
    model = ManualAccumulation(every=2, fail_at_batch=1)
    records = Records()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", sinks=[records])
    with pytest.raises(RuntimeError, match="boom in a micro-batch"):
        trainer(tmp_path, logger=False, limit_train_batches=4, limit_val_batches=0, callbacks=[cb]).fit(model, loader())
    assert hook_count(model) == 0 and no_function_mode()
    assert records.records == [] and cb.health() == {}


class TwoOptimizers(L.LightningModule):
    """A GAN in manual optimization: per batch ``g_steps(batch_idx)`` generator steps, then one
    discriminator step, each ``zero_grad(); manual_backward(loss); step()`` (Lightning's example).
    Its own truth per batch: the optimizer steps it ran (``global_step`` before and after), every
    output of the generator's ReLU (``G.1``), and each parameter's gradient norm right before
    its optimizer's first step in the batch."""

    def __init__(self, g_steps: Callable[[int], int] = lambda i: 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, N_IN))
        self.D = nn.Sequential(nn.Linear(N_IN, 16), nn.Tanh(), nn.Linear(16, 1))
        self.g_steps = g_steps
        self.batches: list[dict] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        og, od = self.optimizers()
        rec = {"start": self.global_step, "g_act": [], "norms": {}}
        self.batches.append(rec)
        z = torch.randn(x.shape[0], 4)

        def fake() -> torch.Tensor:
            h = self.G[1](self.G[0](z))
            rec["g_act"].append(h.detach().clone())
            return self.G[2](h)

        def norms(prefix: str, module: nn.Module) -> None:
            for n, p in module.named_parameters():
                rec["norms"].setdefault(f"{prefix}.{n}", float(p.grad.double().norm()))

        for _ in range(self.g_steps(batch_idx)):
            og.zero_grad()
            self.manual_backward(F.softplus(-self.D(fake())).mean())
            norms("G", self.G)
            og.step()
        od.zero_grad()
        self.manual_backward(F.softplus(-self.D(x)).mean() + F.softplus(self.D(fake().detach())).mean())
        norms("D", self.D)
        od.step()
        rec["end"] = self.global_step

    def configure_optimizers(self):
        return torch.optim.Adam(self.G.parameters(), lr=1e-3), torch.optim.Adam(self.D.parameters(), lr=1e-3)


class InStep(L.Callback):
    """The batches that begin with a sampled step in progress (placed after the monitor in ``callbacks``)."""

    def __init__(self, cb: ActivationMonitor) -> None:
        self.cb, self.batches = cb, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.cb.monitor.in_step:
            self.batches.append(batch_idx)


def gan_fit(tmp_path, every_n_steps: int, batches: int, **kw):
    model = TwoOptimizers(**kw)
    records = Records()
    cb = ActivationMonitor(every_n_steps=every_n_steps, on_alert="ignore", sinks=[records])
    spy = InStep(cb)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(batches * BATCH, N_IN, generator=g)), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, logger=False, limit_train_batches=batches, limit_val_batches=0, callbacks=[cb, spy])
        t.fit(model, data)
    assert hook_count(model) == 0 and no_function_mode()
    return model, records, spy, cb


def check_sample_is_batch(model: TwoOptimizers, records: Records, step: int, b: int) -> None:
    """The record of ``step`` is batch ``b``'s data: G.1's outputs, each stepped parameter's norm."""
    truth = model.batches[b]
    assert records.layer(step, "G.1").rms == pytest.approx(rms(truth["g_act"]), rel=1e-5), (step, b)
    (record,) = [r for r in records.records if r.step == step]
    params = {p.name: p.grad_norm for p in record.parameters}
    assert set(params) == set(truth["norms"]), (step, b)
    for name, norm in truth["norms"].items():
        assert params[name] == pytest.approx(norm, rel=1e-5), (step, b, name)


@pytest.mark.parametrize("every_n_steps", [3, 4])
def test_two_optimizers_per_batch_sample_every_n_optimizer_steps(tmp_path, every_n_steps):
    """Two optimizer steps per batch (global_step +2): a sample every N optimizer steps, each the
    batch that runs the multiple of N (N=3: steps 2-3 for sample 3; it used to sample 0, 6, 12)."""
    model, records, spy, cb = gan_fit(tmp_path, every_n_steps, batches=8)
    ran = {b: (rec["start"], rec["end"]) for b, rec in enumerate(model.batches)}
    assert ran[7] == (14, 16)
    assert records.steps() == list(range(0, 16, every_n_steps))
    expected = [b for b, (start, end) in ran.items() if any(s % every_n_steps == 0 for s in range(start, end))]
    assert spy.batches == expected  # nothing else was recorded, not even for a while
    for step in records.steps():
        (b,) = [b for b, (start, end) in ran.items() if start <= step < end]
        check_sample_is_batch(model, records, step, b)
    assert {p.step for p in cb.parameter_health().values()} == {records.steps()[-1]}


VARYING = {
    # Even batches one optimizer step, odd ones two (a generator step every other batch), N=5.
    # Batches run steps (0,1) (1,3) (3,4) (4,6) (6,7) (7,9) (9,10) (10,12) (12,13) (13,15) (15,16) ...
    # - 0, 10, 15: the batch begins at the multiple (batches 0, 7, 10);
    # - 5 ran in batch 3 (steps 4-5), after a one-step batch: no guess; batch 4 samples it late;
    # - batch 6 follows a two-step batch and is begun ahead for 10, but runs only 9: dropped;
    # - 20 runs in the last batch (19-20), after a one-step batch: not sampled.
    "late-and-dropped": ((0, 1), 5, 14, [0, 5, 10, 15], [0, 4, 7, 10], [0, 4, 6, 7, 10]),
    # 2, 2, 4, 5 steps per batch, N=6: (0,2) (2,4) (4,8) (8,13) (13,15) (15,17) (17,21) (21,26).
    # - 6 ran in batch 2, unguessed (the batch before ran 2): batch 3 samples it late, and runs 12;
    # - 12 ran inside that recorded batch: batch 4 does not sample it again;
    # - 18, 24: guessed ahead from the batch before (2 and 4 steps) and run (batches 6, 7).
    "late-batch-runs-the-next": ((1, 1, 3, 4), 6, 8, [0, 6, 18, 24], [0, 3, 6, 7], [0, 3, 6, 7]),
    # 1, 3, 1, 3, ... steps per batch, N=3: (0,1) (1,4) (4,5) (5,8) (8,9) (9,12) (12,13) (13,16) ...
    # - batch 2 is begun ahead for 6 (the batch before ran 3) but runs only 4: dropped, and batch 3
    #   is begun ahead for 6 again (a one-step batch before it): it runs 5-7, kept;
    # - 3 (and 15) ran in an unguessed batch whose next batch is begun ahead for 6 (18): left out.
    "dropped-then-retried": (
        (0, 2), 3, 12, [0, 6, 9, 12, 18, 21], [0, 3, 5, 6, 9, 11], [0, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    ),
}


@pytest.mark.parametrize("case", list(VARYING))
def test_optimizer_steps_per_batch_that_vary_sample_each_multiple_at_most_once(tmp_path, case):
    """When the optimizer steps per batch vary, a batch is sampled ahead on a guess (kept only if it
    ran the multiple), or late; never twice for one multiple, and each record is its batch's data."""
    pattern, n, batches, steps, recorded, in_step = VARYING[case]
    model, records, spy, _ = gan_fit(tmp_path, n, batches=batches, g_steps=lambda i: pattern[i % len(pattern)])
    ran = [(rec["start"], rec["end"]) for rec in model.batches]
    assert [end - start for start, end in ran] == [1 + pattern[i % len(pattern)] for i in range(batches)]
    assert records.steps() == steps
    assert spy.batches == in_step
    for step, b in zip(steps, recorded):
        check_sample_is_batch(model, records, step, b)
    if case == "late-and-dropped":  # batch 4 stepped only the discriminator, and sample 5 says so
        assert {p.name for p in records.records[1].parameters} == set(model.batches[4]["norms"])
        assert all(n.startswith("D.") for n in model.batches[4]["norms"])


# -- other loggers ------------------------------------------------------------------------------------
def test_csv_logger_gets_scalars_and_tensorboard_dir_gets_images(tmp_path):
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore")
    logger = CSVLogger(str(tmp_path))
    with pytest.warns(MonitorWarning, match="no TensorBoardLogger"):
        trainer(tmp_path, logger=logger, callbacks=[cb]).fit(MLP(dead_bias=-10.0), loader())
    import csv

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    dead = {int(r["step"]): float(r["activation_dead_fraction/net.1"]) for r in rows if r.get("activation_dead_fraction/net.1")}
    assert sorted(dead) == [0, 2, 4, 6] and dead[6] == 1.0
    assert any(r.get("train_loss") for r in rows)
    ev = events(os.path.join(logger.log_dir, "activation_monitor"))
    assert "activation_scan" in ev["images"] and "activation_hist/net.1" in ev["histograms"]


def test_several_loggers_and_no_logger(tmp_path):
    csv_logger, tb = CSVLogger(str(tmp_path / "csv")), TensorBoardLogger(str(tmp_path / "tb"))
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)  # a TensorBoardLogger is there: nothing to say
        trainer(tmp_path, logger=[csv_logger, tb], callbacks=[cb]).fit(MLP(), loader())
    assert "activation_dead_fraction/net.1" in events(tb.log_dir)["scalars"]
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        assert "activation_dead_fraction/net.1" in f.readline()

    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore")
    with pytest.warns(MonitorWarning, match="no logger"):
        trainer(tmp_path / "bare", logger=False, callbacks=[cb]).fit(MLP(), loader())
    assert "activation_scan" in events(str(tmp_path / "bare" / "activation_monitor"))["images"]

    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", logdir=tmp_path / "mine")
    trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path / "tb2")), callbacks=[cb]).fit(MLP(), loader())
    assert "activation_scan" in events(str(tmp_path / "mine"))["images"]
    assert not any(k.startswith("activation") for k in events(str(tmp_path / "tb2"))["scalars"])


def test_fast_dev_run_writes_no_files_and_still_alerts(tmp_path):
    """`fast_dev_run` is a dry run: Lightning writes no logs, and the monitor writes no event file
    either (it used to create `activation_monitor/` under the root), but it judges and alerts."""
    cb = ActivationMonitor(every_n_steps=1, on_alert="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)  # nothing to say about where output goes
        L.Trainer(
            accelerator="cpu", fast_dev_run=2, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(tmp_path), callbacks=[cb],
        ).fit(MLP(dead_bias=-100.0), loader())  # dead for certain at once: far below zero
    assert [(a.step, a.layer, a.kind) for a in cb.alerts] == [(0, "net.1", "dead")]
    assert list(tmp_path.rglob("*")) == []


# -- on_alert ---------------------------------------------------------------------------------------------
def test_on_alert_stop_ends_training_cleanly(tmp_path):
    cb = ActivationMonitor(every_n_steps=1, on_alert="stop")
    logger = TensorBoardLogger(str(tmp_path))
    t = trainer(tmp_path, logger=logger, max_epochs=5, callbacks=[cb])
    with pytest.warns(MonitorWarning, match="stopping training"):
        t.fit(MLP(dead_bias=-10.0), loader())
    first = cb.alerts[0]
    assert first.kind == "dead" and first.layer == "net.1"
    assert t.global_step == first.step + 1 and t.state.status == "finished" and not t.interrupted
    ev = events(logger.log_dir)
    assert max(s for s, _ in ev["scalars"]["activation_dead_fraction/net.1"]) == first.step
    assert any(tag.startswith("activation_alerts") for tag in ev["tensors"])  # logged before stopping


def test_on_alert_raise_and_hooks_removed(tmp_path):
    model = MLP(dead_bias=-10.0)
    before = hook_count(model)
    cb = ActivationMonitor(every_n_steps=1, on_alert="raise")
    with pytest.raises(ActivationAlertError, match="dead"):
        trainer(tmp_path, logger=False, callbacks=[cb], max_epochs=3).fit(model, loader())
    assert hook_count(model) == before and no_function_mode()


def test_hooks_removed_after_exception_mid_sampled_step_and_trainer_reuse(tmp_path):
    model = MLP(fail_at=3)
    before = hook_count(model)
    cb = ActivationMonitor(every_n_steps=1, on_alert="ignore")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, logger=False, callbacks=[cb]).fit(model, loader())
    assert hook_count(model) == before and no_function_mode()
    assert [h.step for h in cb.health().values()] == [2, 2]  # the failed step recorded nothing

    # a Trainer re-used for a second fit works and continues the same sampling
    model = MLP()
    steps = Steps()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", sinks=[steps])
    t = trainer(tmp_path, logger=False, callbacks=[cb], limit_train_batches=4)
    t.fit(model, loader())
    assert hook_count(model) == before
    t.fit_loop.max_epochs = 2
    t.fit(model, loader())
    assert t.global_step == 8 and hook_count(model) == before
    assert steps.steps == [0, 2, 4, 6]


def test_bf16_mixed_precision(tmp_path):
    model = MLP(dead_bias=-10.0)
    cb = ActivationMonitor(every_n_steps=1, on_alert="ignore")
    trainer(tmp_path, logger=False, precision="bf16-mixed", callbacks=[cb]).fit(model, loader())
    assert cb.health()["net.1"].dead_fraction == 1.0
    assert [a.kind for a in cb.alerts if a.layer == "net.1"] == ["dead"]


class PlainMLP(MLP):
    # no `self.log` in training_step: Lightning 2.6's logging does not trace under dynamo with torch 2.13
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)


class CompiledInConfigureModel(PlainMLP):
    def configure_model(self):  # compiled by Lightning's hook, after the callback's monitor was built
        self.compile(backend="eager")


@pytest.mark.parametrize("how", ["torch.compile", "module.compile", "configure_model"])
def test_a_compiled_module_is_monitored_without_recompiling(tmp_path, how):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cb = ActivationMonitor(every_n_steps=2)
    model = PlainMLP()
    if how == "torch.compile":
        model = torch.compile(model, backend="eager")  # dynamo tracing, without inductor's build time
    elif how == "module.compile":
        model.compile(backend="eager")
    else:
        model = CompiledInConfigureModel()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = trainer(tmp_path, logger=False, callbacks=[cb], limit_train_batches=6, limit_val_batches=0)
        t.fit(model, loader())
    assert t.global_step == 6
    assert [str(x.message) for x in w if issubclass(x.category, MonitorWarning) and "torch.compile" in str(x.message)] == []
    assert cb.health() and all(h.step == 4 for h in cb.health().values())  # sampled steps 0, 2, 4 were seen
    assert counters["stats"]["unique_graphs"] == 1  # compiled once (an unsampled step), never again
    assert hook_count(t.lightning_module) == 0


# -- checkpoint / resume ------------------------------------------------------------------------------------
def test_checkpoint_resume_keeps_alert_state_and_sampling(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    steps1 = Steps()
    cb1 = ActivationMonitor(every_n_steps=2, on_alert="ignore", sinks=[steps1])
    t1 = trainer(
        tmp_path, logger=False, enable_checkpointing=True, limit_train_batches=7,
        callbacks=[cb1, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )
    t1.fit(MLP(dead_bias=-10.0), loader())
    assert steps1.steps == [0, 2, 4, 6]
    first = [a for a in cb1.alerts if a.layer == "net.1"]
    assert [a.kind for a in first] == ["dead"] and first[0].step < 7

    path = str(ckpt_dir / "last.ckpt")
    ckpt = torch.load(path, weights_only=True)  # plain types and tensors only
    state = ckpt["callbacks"][cb1.state_key]
    assert state["last_sampled"] == 6 and state["layers"]["net.1"]["active"] == {"dead": 0}

    steps2 = Steps()
    cb2 = ActivationMonitor(every_n_steps=2, on_alert="warn", sinks=[steps2])
    t2 = trainer(tmp_path, logger=False, max_epochs=2, limit_train_batches=7, callbacks=[cb2])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", r"step \d+ \|", MonitorWarning)  # a duplicate alert would warn
        t2.fit(MLP(dead_bias=-10.0), loader(), ckpt_path=path)
    assert t2.global_step == 14
    assert steps2.steps == [8, 10, 12]  # continues at the right global steps; 6 is not redone
    assert [a.to_dict() for a in cb2.alerts] == [a.to_dict() for a in cb1.alerts]  # no duplicate
    assert cb2.health()["net.1"].dead_fraction == 1.0


# -- the example ----------------------------------------------------------------------------------------------
def test_example_transformer_smoke(tmp_path, capsys):
    ns = runpy.run_path(os.path.join(ROOT, "examples", "lightning_transformer.py"))
    cb = ns["main"](["--steps", "12", "--every-n-steps", "2", "--pathology", "lr", "--logdir", str(tmp_path), "--tiny"])
    out = capsys.readouterr().out
    assert cb.alerts and "alert" in out.lower() and str(tmp_path) in out
    assert "activation_scan" in events(str(tmp_path))["images"]


# -- verdicts you can trust at any batch size (real data, tiny batches) ---------------------------------
@pytest.fixture(scope="module")
def wine() -> TensorDataset:
    """sklearn's Wine, standardised: 178 samples, 13 features, 3 classes."""
    import numpy as np

    sk = pytest.importorskip("sklearn.datasets")
    from sklearn.preprocessing import StandardScaler

    X, y = sk.load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    return TensorDataset(torch.tensor(X), torch.tensor(y))


class WineNet(L.LightningModule):
    """13 -> H -> act (net.1) -> H -> act (net.3) -> 3, Adam; ``dead`` units of net.1 get bias -100."""

    def __init__(self, hidden: int = 10, dead: tuple[int, ...] | slice = (), act: type[nn.Module] = nn.ReLU, lr: float = 1e-3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(13, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, 3))
        with torch.no_grad():
            self.net[0].bias[list(dead) if isinstance(dead, tuple) else dead] = -100.0
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class FirstBatchTruth(L.Callback):
    """At optimizer step 0, before the forward: the batch and net.1's output from the test's own
    forward with the weights of that moment (no monitor involved)."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and self.x is None:
            self.x = batch[0].clone()
            with torch.no_grad():
                self.out = pl_module.net[1](pl_module.net[0](self.x))


def wine_loader(ds: TensorDataset, batch_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def test_first_step_numbers_are_the_truth_at_batch_8_and_reach_the_csv_logger(tmp_path, wine):
    import csv

    model = WineNet(hidden=10, dead=(0, 1))
    truth_cb = FirstBatchTruth()
    seen: dict = {}

    class AfterStep0(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen.update(cb.health())

    cb = ActivationMonitor(every_n_steps=50, on_alert="ignore")
    logger = CSVLogger(str(tmp_path))
    t = trainer(tmp_path, logger=logger, max_steps=3, limit_val_batches=0, callbacks=[truth_cb, cb, AfterStep0()])
    with pytest.warns(MonitorWarning, match="no TensorBoardLogger"):
        t.fit(model, wine_loader(wine, 8, shuffle=True))  # mixed classes in the first batch
    assert t.global_step == 3

    # the test's own forward of the first batch with the same weights
    assert truth_cb.x is not None and truth_cb.x.shape == (8, 13)
    silent = (truth_cb.out > 0).sum(0) == 0
    truth = silent.float().mean().item()
    assert silent.nonzero().flatten().tolist() == [0, 1] and truth == pytest.approx(0.2)

    for h in (seen["net.1"], cb.health()["net.1"]):  # right after step 0, and after fit (nothing else sampled)
        assert h.step == 0 and h.units == 10
        assert h.dead_fraction == pytest.approx(truth)
        assert list(h.dead_units) == [0, 1]
        assert (h.evidence_values, h.evidence_steps) == (8, 1)
        assert h.firing_rate == pytest.approx((truth_cb.out > 0).float().mean().item())
    assert [a for a in cb.alerts if a.layer == "net.1"] == []  # 20% < 50%

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    dead = [(int(r["step"]), float(r["activation_dead_fraction/net.1"])) for r in rows if r.get("activation_dead_fraction/net.1")]
    ev = [(int(r["step"]), float(r["activation_evidence_values/net.1"])) for r in rows if r.get("activation_evidence_values/net.1")]
    assert len(dead) == 1 and dead[0][0] == 0 and dead[0][1] == pytest.approx(truth)
    assert ev == [(0, 8.0)]
    assert any(r.get("train_loss") for r in rows)


def test_killed_layer_stops_at_the_first_sampled_step_at_batch_2(tmp_path, wine):
    """The issue's failing case: every_n_steps=10, batch 2, net.1 killed by its bias: stop at step 0."""
    model = WineNet(hidden=10, dead=slice(None))
    truth_cb = FirstBatchTruth()
    cb = ActivationMonitor(every_n_steps=10, on_alert="stop")
    t = trainer(tmp_path, logger=CSVLogger(str(tmp_path)), max_steps=60, limit_train_batches=None,
                limit_val_batches=0, callbacks=[truth_cb, cb])
    with pytest.warns(MonitorWarning, match="stopping training"):
        t.fit(model, wine_loader(wine, 2))
    # ground truth: no unit of net.1 fires on the first batch
    assert truth_cb.x.shape[0] == 2 and bool((truth_cb.out <= 0).all())
    assert t.global_step == 1 and t.should_stop
    assert t.state.status == "finished" and not t.interrupted
    first = cb.alerts[0]
    assert (first.step, first.layer, first.kind, first.recovered) == (0, "net.1", "dead", False)
    assert first.value == 1.0
    h = cb.health()["net.1"]
    assert h.dead_fraction == 1.0 and h.evidence_values == 2  # alerted before the count evidence was complete


def test_healthy_wine_mlp_is_silent_at_batch_2_every_step(tmp_path, wine):
    model = WineNet(hidden=32)
    steps = Steps()
    cb = ActivationMonitor(every_n_steps=1, sinks=[steps])
    t = trainer(tmp_path, logger=CSVLogger(str(tmp_path)), max_steps=200, max_epochs=-1, limit_train_batches=None,
                limit_val_batches=0, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)  # the one "no TensorBoardLogger" note
        warnings.filterwarnings("error", r".*step \d+ \|", MonitorWarning)  # any alert fails the test
        t.fit(model, wine_loader(wine, 2, shuffle=True))
    assert t.global_step == 200
    assert steps.steps == list(range(200))
    assert [a.message for a in cb.alerts] == []
    assert set(cb.health()) == {"net.1", "net.3"} and all(h.step == 199 for h in cb.health().values())
    # the run really is healthy (the test's own forward over the whole data set)
    with torch.no_grad():
        h1 = model.net[1](model.net[0](wine.tensors[0]))
        h3 = model.net[3](model.net[2](h1))
    for h in (h1, h3):
        assert ((h > 0).sum(0) == 0).float().mean().item() < 0.5


def test_tensorboard_event_file_beside_the_loggers_one_run_hands_off(tmp_path, wine):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = WineNet(hidden=16)
    truth_cb = FirstBatchTruth()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore")
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    writer = tb.experiment
    keys_before = set(writer.__dict__)
    t = trainer(tmp_path, logger=tb, max_steps=6, limit_val_batches=0, callbacks=[truth_cb, cb])
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)  # a TensorBoardLogger is there: nothing to say
        t.fit(model, wine_loader(wine, 8))
    assert tb.experiment is writer and set(writer.__dict__) == keys_before

    files = sorted(glob.glob(os.path.join(tmp_path, "**", "events.out.tfevents.*"), recursive=True))
    ours = [f for f in files if f.endswith(".activation-monitor")]
    assert len(ours) == 1 and len(files) == 2, files
    assert os.path.dirname(ours[0]) == os.path.dirname(next(f for f in files if f not in ours)) == os.path.abspath(tb.log_dir)

    acc = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "train_loss" in scalars and "activation_rms/net.1" in scalars
    rms = {e.step: e.value for e in acc.Scalars("activation_rms/net.1")}
    assert sorted(rms) == [0, 2, 4]
    assert rms[0] == pytest.approx(truth_cb.out.pow(2).mean().sqrt().item(), rel=1e-5)


class TanhReluNet(WineNet):
    """net.1 is Tanh, net.3 ReLU."""

    def __init__(self) -> None:
        super().__init__(hidden=16)
        self.net[1] = nn.Tanh()


def _startswith_net(name, module):
    return name.startswith("net.")


@pytest.mark.parametrize("how", ["class", "predicate"])
def test_include_class_and_predicate(tmp_path, wine, how):
    model = TanhReluNet()
    include = [nn.Tanh] if how == "class" else (lambda name, m: name.startswith("net."))
    # ground truth from the module tree, not from the monitor
    expected = {n for n, m in model.named_modules() if isinstance(m, nn.Tanh)} if how == "class" else {
        n for n, _ in model.named_modules() if n.startswith("net.")
    }
    assert expected == ({"net.1"} if how == "class" else {f"net.{i}" for i in range(5)})
    steps = Steps()
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", include=include, sinks=[steps])
    t = trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path)), max_steps=6, limit_val_batches=0, callbacks=[cb])
    t.fit(model, wine_loader(wine, 8))
    assert steps.steps == [0, 2, 4]
    assert set(cb.health()) == expected
    assert cb.health()["net.1"].kind == "tanh"
    assert "0x" not in cb.state_key
    if how == "class":
        assert cb.health()["net.1"].saturated_fraction is not None


def test_state_key_of_a_predicate_is_the_same_in_every_process():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from torch import nn\n"
        "from integrations.lightning import ActivationMonitor\n"
        "def f(name, module):\n    return name.startswith('net.')\n"
        "print(repr(ActivationMonitor(include=f).state_key))\n"
        "print(repr(ActivationMonitor(include=[nn.Tanh], exclude=f).state_key))\n"
        "print(hex(id(f)))\n"
    )

    def once() -> list[str]:
        proc = subprocess.run([sys.executable, "-c", code, ROOT], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.splitlines()

    a, b = once(), once()
    assert a[:2] == b[:2], (a, b)
    for key in a[:2]:
        assert "0x" not in key and "<function" not in key and "object at" not in key
        assert a[2] not in key  # the function's address in that process
    assert a[0] != a[1] and a[0] != repr(ActivationMonitor().state_key)
    # in this process: a module-level predicate's key names it, and differs from another predicate's
    assert ActivationMonitor(include=_startswith_net).state_key != ActivationMonitor(include=[nn.Tanh]).state_key
    assert "_startswith_net" in ActivationMonitor(include=_startswith_net).state_key


# -- DDP (2 CPU processes, gloo) --------------------------------------------------------------------------------
class SplitNet(L.LightningModule):
    """``a``: 8 ReLU units, 0-3 fire only on rank 0's data, 4-7 only on rank 1's (frozen weights).
    ``b``: a ReLU layer that is dead everywhere (bias -10). The trainable head learns something."""

    def __init__(self) -> None:
        super().__init__()
        self.a_lin = nn.Linear(2, 8)
        with torch.no_grad():
            self.a_lin.weight.zero_()
            self.a_lin.weight[:4, 0] = 1.0
            self.a_lin.weight[4:, 1] = 1.0
            self.a_lin.bias.zero_()
        self.a_lin.requires_grad_(False)
        self.a = nn.ReLU()
        self.b_lin = nn.Linear(8, 8)
        with torch.no_grad():
            self.b_lin.bias.fill_(-10.0)
        self.b = nn.ReLU()
        self.head = nn.Linear(16, 1)

    @staticmethod
    def rank_batch(rank: int, n: int = 32) -> torch.Tensor:
        x = torch.rand(n, 2) + 0.1
        x[:, 1 - rank] *= -1.0  # rank 0: x0 > 0 > x1, rank 1: the opposite
        return x

    def forward(self, x):
        h = self.a(self.a_lin(x))
        return self.head(torch.cat([h, self.b(self.b_lin(h * 0.01))], dim=1))

    def training_step(self, batch, batch_idx):
        x = self.rank_batch(self.global_rank, batch[0].shape[0])
        return self(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


class RecordingMonitor(ActivationMonitor):
    """Counts gathers and MonitorWarnings per rank and writes them to ``<out>/rank<r>.json``."""

    def __init__(self, out: str, **kw) -> None:
        super().__init__(**kw)
        self.out = out

    def setup(self, trainer, pl_module, stage):
        self._wctx = warnings.catch_warnings(record=True)
        self._w = self._wctx.__enter__()
        warnings.simplefilter("always")
        super().setup(trainer, pl_module, stage)
        self.gathers: list[int] = []
        inner = self.monitor.gather

        def counted(t):
            self.gathers.append(self.monitor._step)  # the sampled step being packed
            out = inner(t)
            self.gather_shape = list(out.shape)
            return out

        self.monitor.gather = counted

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        self._wctx.__exit__(None, None, None)
        rank = trainer.global_rank
        own = self.monitor._ledger.health  # this rank's view
        x = SplitNet.rank_batch(rank, 512)
        with torch.no_grad():
            single_rank_dead = (pl_module.a(pl_module.a_lin(x)) <= 0).all(0).nonzero().flatten().tolist()
        result = {
            "rank": rank,
            "world": trainer.world_size,
            "global_step": trainer.global_step,
            "should_stop": trainer.should_stop,
            "gathers": self.gathers,
            "gather_shape": getattr(self, "gather_shape", None),
            "health_steps": sorted({h.step for h in own.values()}),
            "a_dead_fraction": own["a"].dead_fraction,
            "b_grad_rms": own["b"].grad_rms,
            "head_grad_norm": self.monitor.parameter_health()["head.weight"].grad_norm,
            "a_dead_units": list(own["a"].dead_units),
            "single_rank_dead_units": single_rank_dead,
            "alerts": [a.to_dict() for a in self.alerts],
            "monitor_warnings": [str(w.message) for w in self._w if issubclass(w.category, MonitorWarning)],
        }
        with open(os.path.join(self.out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


def ddp_main(strategy: str, out: str) -> None:
    torch.set_num_threads(1)
    ds = TensorDataset(torch.zeros(512, 2))
    cb = RecordingMonitor(out, every_n_steps=2, on_alert="stop", thresholds=Thresholds(min_positions=160))
    t = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, limit_train_batches=12,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        logger=TensorBoardLogger(out, name="tb"), callbacks=[cb], default_root_dir=out,
    )
    t.fit(SplitNet(), DataLoader(ds, batch_size=32))


def check_ddp(out: str) -> None:
    def load(rank: int) -> dict:
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            return json.load(f)

    r0, r1 = load(0), load(1)
    for r in (r0, r1):
        assert r["world"] == 2
        # per-unit statistics were reduced across ranks: a unit firing on one rank only is alive
        assert r["a_dead_fraction"] == 0.0 and r["a_dead_units"] == []
        # the ground truth per rank: half of `a` never fires on that rank's own data
        assert len(r["single_rank_dead_units"]) == 4
        # one gather per sampled step, on every rank, of shape [world, L]
        assert r["gathers"] == list(range(0, r["global_step"], 2)) and r["gather_shape"][0] == 2
        assert r["health_steps"] == [r["gathers"][-1]]
        # `b` is dead everywhere: the dead alert on `b` stops training on every rank at once
        assert [(a["layer"], a["kind"]) for a in r["alerts"]] == [("b", "dead")]
    assert r0["alerts"] == r1["alerts"] and r0["gathers"] == r1["gathers"]
    # gradients: combined in the same collective (activation gradients) / already all-reduced (parameters)
    assert r0["b_grad_rms"] is not None and r0["b_grad_rms"] == r1["b_grad_rms"] > 0
    assert r0["head_grad_norm"] == pytest.approx(r1["head_grad_norm"]) and r0["head_grad_norm"] > 0
    stop_step = r0["alerts"][0]["step"]
    assert r0["global_step"] == r1["global_step"] == stop_step + 1 < 12
    assert r0["should_stop"] and r1["should_stop"]
    # only rank 0 warns and writes
    assert any("stopping training" in m for m in r0["monitor_warnings"])
    assert r1["monitor_warnings"] == []
    files = glob.glob(os.path.join(out, "tb", "**", "events.out.tfevents.*"), recursive=True)
    ours = [f for f in files if f.endswith(".activation-monitor")]
    assert len(ours) == 1 and len(files) == 2  # the logger's (rank 0) and the monitor's, in one run directory
    assert os.path.dirname(ours[0]) == os.path.dirname(next(f for f in files if f not in ours))
    ev = events(os.path.join(out, "tb"))
    a_curve = ev["scalars"]["activation_dead_fraction/a"]
    assert sorted(s for s, _ in a_curve) == r0["gathers"] and all(v == 0.0 for _, v in a_curve)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_reduces_across_ranks_and_agrees_on_stop(tmp_path, strategy):
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), strategy, str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_ddp(str(tmp_path))


if __name__ == "__main__":
    ddp_main(sys.argv[1], sys.argv[2])


def test_a_user_detector_plugs_into_the_callback_and_its_field_reaches_the_logger(tmp_path, wine):
    """`detectors=[...]` through Lightning: the user's number is a logger metric, its alert a stop."""
    import csv

    import numpy as np

    from monitor import Detector, Verdict
    from monitor.stats import MAX

    class Peak(Detector):
        name = "low_peak"
        fields = ("peak",)
        reads = (MAX,)
        causes = "a layer whose largest output stays below 1000: try anything"

        def evaluate(self, layer, memory):
            peak = float(np.nanmax(layer.summary.max))
            return Verdict(peak < 1000.0, peak, 1000.0, f"low peak: {peak:.3g}", {"peak": peak})

    model = WineNet(hidden=10)
    truth_cb = FirstBatchTruth()
    cb = ActivationMonitor(every_n_steps=5, on_alert="stop", detectors=[Peak()])
    logger = CSVLogger(str(tmp_path))
    t = trainer(tmp_path, logger=logger, max_steps=20, limit_val_batches=0, callbacks=[truth_cb, cb])
    with pytest.warns(MonitorWarning, match="low peak"):
        t.fit(model, wine_loader(wine, 8, shuffle=True))
    assert t.global_step == 1 and t.should_stop  # the user's alert stopped training at step 0
    assert sorted((a.step, a.layer, a.kind) for a in cb.alerts) == [(0, "net.1", "low_peak"), (0, "net.3", "low_peak")]
    peak = cb.health()["net.1"].peak
    assert peak == pytest.approx(float(truth_cb.out.clamp(min=0).max()), rel=1e-5)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("activation_peak/net.1")]
    assert [(int(r["step"]), float(r["activation_peak/net.1"])) for r in rows] == [(0, pytest.approx(peak))]


def test_numpy_integer_options_give_the_same_callback_as_python_ints():
    import numpy as np

    a = ActivationMonitor(every_n_steps=np.int64(5), timeline_length=np.int32(20))
    b = ActivationMonitor(every_n_steps=5, timeline_length=20)
    assert a.state_key == b.state_key  # a checkpoint saved by one restores into the other
    assert type(a.every_n_steps) is int and type(a.monitor_kwargs["timeline_length"]) is int
