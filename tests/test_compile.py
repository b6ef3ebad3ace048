"""Compiled models are monitored: sampled steps run the eager code under the "force_eager" compiler
stance, unsampled steps the compiled code, and nothing is compiled again (the compiler's own
counters). Compared with an eager twin trained on the same data."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from monitor import Monitor, MonitorWarning


def twin_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        a[2].bias.fill_(-100.0)  # the second ReLU layer is dead from the start
    b = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    b.load_state_dict(a.state_dict())
    return a, b


def train(model: nn.Module, call: nn.Module, steps: int, every: int) -> tuple[Monitor, list[float]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    mon = Monitor(call, every_n_steps=every, on_alert="ignore", background=False)
    graphs = []
    with mon:
        for step in range(steps):
            x, y = torch.randn(64, 13, generator=g), torch.randint(0, 3, (64,), generator=g)
            with mon.step(step):
                F.cross_entropy(call(x), y).backward()
                opt.step()
                opt.zero_grad()
            graphs.append(counters["stats"]["unique_graphs"])
    return mon, graphs


def test_an_inductor_compiled_model_is_monitored_like_its_eager_twin_and_never_recompiled():
    eager, compiled_base = twin_models()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_base)  # the default backend: inductor, C++ on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)  # no "monitoring is disabled"
        mon_c, graphs = train(compiled_base, compiled, steps=8, every=2)
    mon_e, _ = train(eager, eager, steps=8, every=2)
    # the killed layer alerts at the first sampled step, in both
    assert [(a.step, a.layer, a.kind) for a in mon_c.alerts if a.kind == "dead"] == [(0, "3", "dead")]
    assert [(a.step, a.layer, a.kind) for a in mon_e.alerts if a.kind == "dead"] == [(0, "3", "dead")]
    # the same names (no _orig_mod) and numbers within float tolerance (compiled training steps
    # may round differently from eager ones)
    hc, he = mon_c.health(), mon_e.health()
    assert sorted(hc) == sorted(he) == ["1", "3"]
    for name in hc:
        assert hc[name].step == he[name].step == 6
        assert hc[name].rms == pytest.approx(he[name].rms, rel=1e-4, abs=1e-6)
        assert hc[name].grad_rms == pytest.approx(he[name].grad_rms, rel=1e-3, abs=1e-9)
    assert sorted(mon_c.parameter_health()) == sorted(mon_e.parameter_health())
    # compiled once, at the first unsampled step (1); sampled steps 2, 4, 6 compiled nothing more
    assert graphs[0] == 0 and graphs[1] >= 1 and graphs[-1] == graphs[1], graphs
    assert torch._dynamo.eval_frame._stance.stance == "default"


class Net(nn.Module):
    """A module of the user's (``Module.compile`` on a bare ``nn.Sequential`` compiles nothing:
    the compiler skips torch's own files)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.act0, self.fc1, self.act1 = nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.fc1(self.act0(self.fc0(x))))


def test_module_compile_after_the_monitor_was_built_is_seen_at_the_sampled_step():
    model = Net()
    torch._dynamo.reset()
    counters.clear()
    mon = Monitor(model, every_n_steps=2, on_alert="ignore", background=False)
    model.compile(backend="eager")  # e.g. Lightning's configure_model, after the callback's monitor exists
    with mon:
        for step in range(5):
            with mon.step(step):
                model(torch.randn(16, 13)).sum().backward()
    assert sorted(mon.health()) == ["act0", "act1"] and mon.health()["act0"].step == 4
    assert counters["stats"]["unique_graphs"] == 1  # compiled at step 1, reused at step 3


def test_monitoring_the_uncompiled_model_while_training_its_compiled_wrapper():
    """``Monitor(model)`` while the loop calls ``torch.compile(model)``: every sampled step is
    recorded (the wrapper's compiled code runs no hook added after compilation; it stopped
    recording after the first step), and the compiled code is reused between samples."""
    model = Net()
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    mon = Monitor(model, every_n_steps=2, on_alert="ignore", background=False)
    steps, graphs = [], []
    g = torch.Generator().manual_seed(0)
    with mon:
        for step in range(8):
            x = torch.randn(16, 13, generator=g)
            with mon.step(step):
                compiled(x).sum().backward()
            steps.append(mon.health()["act1"].step)
            graphs.append(counters["stats"]["unique_graphs"])
            if step == 6:
                with torch.no_grad():
                    truth = model.act1(model.fc1(model.act0(model.fc0(x))))
    assert steps == [0, 0, 2, 2, 4, 4, 6, 6]
    assert mon.health()["act1"].max_abs == pytest.approx(float(truth.abs().max()), rel=1e-5)
    # the first sampled step was also the first call: compiled with the hooks in it, once more
    # without at step 1, then never again
    assert graphs[1:] == [graphs[1]] * 7


def test_a_compiled_function_beside_an_eager_model_stays_compiled_on_sampled_steps():
    """A compiled loss (or ``torch.compile(flex_attention)``) next to an eager model: sampled steps
    leave the compiler alone (forcing its eager code there made FlexAttention unfused, 5x slower)."""
    runs = {"n": 0}

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            runs["n"] += 1
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    loss_fn = torch.compile(lambda out, y: ((out - y) ** 2).mean(), backend=backend)
    model = Net()
    mon = Monitor(model, every_n_steps=2, on_alert="ignore", background=False)
    per_step = []
    with mon:
        for step in range(6):
            before = runs["n"]
            with mon.step(step):
                loss_fn(model(torch.randn(4, 13)), torch.zeros(4, 64)).backward()
            per_step.append(runs["n"] - before)
    assert per_step == [1] * 6
    assert mon.health()["act1"].step == 4


def compiled_twin() -> tuple[nn.Module, nn.Module]:
    """The killed-layer MLP and its dynamo-compiled wrapper (no inductor build), the counters reset."""
    _, model = twin_models()
    torch._dynamo.reset()
    counters.clear()
    return model, torch.compile(model, backend="eager")


def test_a_probe_of_a_compiled_model_runs_eagerly_without_recompiling():
    model, compiled = compiled_twin()
    probe = torch.randn(12, 13)
    mon = Monitor(compiled, every_n_steps=2, on_alert="ignore", background=False, probe=probe)
    with mon:
        for step in range(4):
            with mon.step(step):
                compiled(torch.randn(16, 13)).sum().backward()
        result = mon.probe()
    assert result.activations["1"].shape == (12, 64)
    with torch.no_grad():
        truth = model[1](model[0](probe)).numpy()
    assert result.activations["1"] == pytest.approx(truth, rel=1e-5, abs=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_an_ablation_block_on_a_compiled_model_runs_its_eager_code():
    model, compiled = compiled_twin()
    x = torch.randn(16, 13)
    mon = Monitor(compiled, every_n_steps=1, on_alert="ignore", background=False)
    with mon:
        with mon.step(0):
            compiled(x)
        compiled(x)  # compiled once, outside any sampled step
        with mon.ablate({"1": "all"}), torch.no_grad():
            out = compiled(x)
    with torch.no_grad():  # layer "1" (the first ReLU) zeroed by hand
        truth = model[4](model[3](model[2](torch.zeros(16, 64))))
    assert out == pytest.approx(truth, abs=1e-6)
    assert counters["stats"]["unique_graphs"] == 1  # the block compiled nothing


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def run_stack(model: nn.Module, **kwargs) -> Monitor:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False, **kwargs)
    with mon:
        for step in range(2):
            with mon.step(step):
                model(torch.randn(8, 5, 16, generator=torch.Generator().manual_seed(step))).sum().backward()
                opt.step()
                opt.zero_grad()
    return mon


def test_a_compiled_submodule_keeps_the_names_and_kinds_of_the_uncompiled_model():
    torch.manual_seed(0)
    eager = Stack()
    expected_params = [n for n, _ in eager.named_parameters()]  # before anything is compiled
    torch._dynamo.reset()
    counters.clear()
    model = Stack()
    model.blocks[1] = torch.compile(model.blocks[1], backend="eager")
    mon_e, mon_c = run_stack(eager), run_stack(model)
    names = list(mon_c.health())
    assert names == list(mon_e.health()) and not any("_orig_mod" in n for n in names)
    assert {"blocks.1", "blocks.1.act"} <= set(names)
    assert mon_c.health()["blocks.1"].kind == mon_e.health()["blocks.1"].kind == "block"  # still a stack block
    assert list(mon_c.parameter_health()) == expected_params  # "blocks.1.fc.weight", not "blocks.1._orig_mod.fc.weight"
    # patterns are written against those names
    only = run_stack(model, include="blocks.1.*")
    assert list(only.health()) == ["blocks.1.fc", "blocks.1.act"]


def test_without_set_stance_a_compiled_model_is_left_alone_with_one_warning(monkeypatch):
    from monitor.compiled import EagerSteps

    monkeypatch.setattr(EagerSteps, "available", property(lambda self: False))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.compile(backend="eager")
    with pytest.warns(MonitorWarning, match="set_stance"):
        mon = Monitor(model, every_n_steps=1).attach()
    with mon.step(0):
        model(torch.randn(2, 4))
    mon.close()
    assert mon.health() == {} and not model._forward_hooks


def test_hugging_face_trainer_with_torch_compile_is_monitored(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from integrations.transformers import ActivationMonitor

    torch._dynamo.reset()
    counters.clear()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=8, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, torch_compile=True, torch_compile_backend="eager", logging_steps=100,
    )
    mon = ActivationMonitor(every_n_steps=2, on_alert="ignore", logdir=str(tmp_path / "tb"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=data, callbacks=[mon]).train()
    health = mon.health()
    assert health and {h.step for h in health.values()} == {4}
    assert "transformer.h.0.mlp.act" in health
    assert counters["stats"]["unique_graphs"] >= 1  # the Trainer's compiled model ran compiled between samples
