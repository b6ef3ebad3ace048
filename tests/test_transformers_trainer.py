"""The Hugging Face Trainer callback, exercised with real ``transformers.Trainer`` runs on CPU.

Models are built from tiny configs (a GPT-2-like causal LM, a BERT-like classifier); data is
generated. Ground truth (activations, gradients, dead units, update ratios) is recomputed here
from weight snapshots and the recorded batches, with plain PyTorch, without the monitor. The
DDP test runs this file as a script under ``torch.distributed.run`` (2 CPU processes, gloo).
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from integrations.transformers import STATE_KEY, ActivationAlertError, ActivationMonitor  # noqa: E402
from monitor import MonitorWarning, SampleRecord, Sink, Thresholds  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ = 50, 16
GPT_ACT = "transformer.h.0.mlp.act"
BERT_ACT = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
torch.set_num_threads(1)


# -- tiny models, data and helpers -----------------------------------------------------------------
def gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def bert(seed: int = 0, dead_units: int = 0) -> transformers.BertForSequenceClassification:
    """ReLU BERT classifier; ``dead_units`` units of layer 0's FFN get bias -100 (dead from step 0)."""
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_act="relu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg)
    kill(model, dead_units)
    return model


def kill(model, n: int) -> None:
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.bias[:n] = -100.0


class Tokens(torch.utils.data.Dataset):
    """Random token sequences: causal-LM items (labels = inputs) or classification items."""

    def __init__(self, n: int = 64, seq: int = SEQ, seed: int = 0, classify: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n, seq), generator=g)
        self.y = (self.x[:, 0] % 2) if classify else self.x
        self.classify = classify

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


class Collator:
    """Stacks items and records every batch it builds (the Trainer's own micro-batches, in order)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


class Snapshot(TrainerCallback):
    """Weights before and after the optimizer step of every ``every``-th step, and the gradient
    norms the optimizer is about to use (read at on_pre_optimizer_step by this callback itself)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}
        self.grad_norms: dict[int, dict[str, float]] = {}

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0:
            self.before[state.global_step] = copy.deepcopy(model.state_dict())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0:
            self.grad_norms[state.global_step] = {
                n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None
            }

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0:
            self.after[state.global_step] = copy.deepcopy(model.state_dict())


class LogRecorder(TrainerCallback):
    """What ``on_log`` receives: (state.global_step, logs) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.calls.append((state.global_step, dict(logs)))


class Records(Sink):
    """Every sample record (the monitor's writer thread)."""

    def __init__(self) -> None:
        self.records: list[SampleRecord] = []

    def write(self, record: SampleRecord) -> None:
        self.records.append(record)

    @property
    def steps(self) -> list[int]:
        return [r.step for r in self.records]

    def layer(self, step: int, name: str):
        rec = next(r for r in self.records if r.step == step)
        return next(ls for ls in rec.layers if ls.name == name)


def targs(out, **kw) -> TrainingArguments:
    opts = {
        "use_cpu": True, "report_to": [], "per_device_train_batch_size": 4, "save_strategy": "no",
        "logging_steps": 1, "dataloader_num_workers": 0, "disable_tqdm": True, "seed": 0, "learning_rate": 1e-3,
        "max_steps": 6,
    }
    opts.update(kw)
    return TrainingArguments(str(out), **opts)


def hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def events(logdir: str) -> dict[str, dict]:
    """{"scalars": {tag: [(step, value)]}, "files": [...]} from every event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    out: dict = {"scalars": {}, "images": {}, "files": files}
    for d in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(d, size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out["scalars"].setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            out["images"].setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    return out


def causal_lm_sum(model, batch) -> torch.Tensor:
    """Sum of the next-token cross entropies of one micro-batch (no padding: every position counts)."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), reduction="sum")


# -- options and packaging ----------------------------------------------------------------------------
def test_options_are_validated_at_construction_with_the_core_messages():
    with pytest.raises(ValueError, match=r"Expected `every_n_steps` to be a positive integer, got 0\."):
        ActivationMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="Expected `on_alert` to be one of 'warn', 'raise', 'ignore', 'stop'"):
        ActivationMonitor(on_alert="halt")
    with pytest.raises(TypeError, match="Expected `thresholds` to be a monitor.Thresholds"):
        ActivationMonitor(thresholds={"dead_fraction": 0.1})
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        ActivationMonitor(every_n=5)
    with pytest.raises(TypeError, match="Expected a transformers.Trainer"):
        ActivationMonitor().set_trainer(object())
    assert isinstance(ActivationMonitor(), transformers.TrainerCallback)


def test_without_transformers_the_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    spec = importlib.util.spec_from_file_location("_hf_integration_probe", os.path.join(ROOT, "integrations", "transformers.py"))
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=r"pip install 'activation-monitor\[transformers\]'"):
        spec.loader.exec_module(module)


def test_pyproject_has_the_transformers_extra_in_all():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    names = [r.split(">")[0].split("=")[0] for r in extras["transformers"]]
    assert {"transformers", "accelerate", "tensorboard"} <= set(names)
    assert "transformers" in extras["all"][0]


# -- what is sampled, against ground truth -----------------------------------------------------------------
def test_gpt2_accumulated_step_matches_ground_truth_and_gradients_are_after_clipping(tmp_path):
    """GPT-2, 2 micro-batches per optimizer step, clipping at 0.05 (active), evaluation every 2 steps.

    A sampled step is the whole optimizer step: the activations and the gradients w.r.t. them over
    both micro-batches (never the evaluation forwards), the parameter gradients the optimizer uses
    (accumulated and clipped), and the update ratio across the optimizer step."""
    every, batch, max_norm = 2, 4, 0.05
    model, collator, snap, logs, records = gpt2(), Collator(), Snapshot(every), LogRecorder(), Records()
    mon = ActivationMonitor(every_n_steps=every, on_alert="ignore", sinks=[records])
    args = targs(
        tmp_path, gradient_accumulation_steps=2, max_grad_norm=max_norm, eval_strategy="steps", eval_steps=2,
        per_device_eval_batch_size=3, report_to=["tensorboard"],
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(64), eval_dataset=Tokens(6, seq=8, seed=1),
        data_collator=collator, callbacks=[snap, mon, logs],
    )
    trainer.train()

    assert records.steps == [0, 2, 4]  # optimizer steps: state.global_step when the step began
    train_batches = [b for b in collator.batches if b["input_ids"].shape[1] == SEQ]
    assert len(collator.batches) > len(train_batches)  # evaluation ran (its batches have 8 tokens)
    logged_norm = {s: entry["grad_norm"] for s, entry in logs.calls if "grad_norm" in entry}
    truth = gpt2()
    for step in records.steps:
        micro = train_batches[2 * step : 2 * step + 2]  # the two micro-batches of optimizer step `step`
        truth.load_state_dict(snap.before[step])
        truth.zero_grad(set_to_none=True)
        captured: list[torch.Tensor] = []
        handle = truth.transformer.h[0].mlp.act.register_forward_hook(lambda m, i, o, kept=captured: kept.append(o))
        loss = sum(causal_lm_sum(truth, b) for b in micro) / (2 * batch * (SEQ - 1))
        for a in captured:
            a.retain_grad()
        loss.backward()
        handle.remove()
        acts = torch.cat([a.detach().reshape(-1, a.shape[-1]) for a in captured])
        grads = torch.cat([a.grad.reshape(-1, a.shape[-1]) for a in captured])
        manual = {n: float(p.grad.norm()) for n, p in truth.named_parameters()}
        manual_total = math.sqrt(sum(v * v for v in manual.values()))
        pre_clip = logged_norm[step + 1]  # the Trainer logs its pre-clipping norm after the step
        scale = pre_clip / manual_total  # the Trainer's loss normalisation, one constant
        assert 0.5 < scale < 2.0

        ls = records.layer(step, GPT_ACT)
        # activations: both micro-batches, nothing else (2 x 4 sequences x 16 tokens per unit)
        assert ls.summary.positions == 2 * batch * SEQ == acts.shape[0]
        np.testing.assert_allclose(ls.summary.max, acts.max(0).values.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ls.summary.sumsq, acts.square().sum(0).numpy(), rtol=1e-4)
        # gradients w.r.t. the activation: every backward of the step (before any clipping)
        assert ls.summary.grad.positions == acts.shape[0]
        np.testing.assert_allclose(ls.summary.grad.sumsq, (grads * scale).square().sum(0).numpy(), rtol=2e-3, atol=1e-20)
        # parameter gradients: what the optimizer uses, i.e. after the Trainer's clipping
        assert pre_clip > max_norm  # clipping is active at this step
        clip = max_norm / (pre_clip + 1e-6)
        params = {p.name: p for p in next(r for r in records.records if r.step == step).parameters}
        for name, norm in manual.items():
            assert params[name].grad_norm == pytest.approx(snap.grad_norms[step][name], rel=1e-5)
            assert params[name].grad_norm == pytest.approx(norm * scale * clip, rel=2e-3)
        assert math.sqrt(sum(p.grad_norm**2 for p in params.values())) == pytest.approx(max_norm, rel=1e-3)
        # update ratios span the optimizer step (tensors under 4096 elements: exact)
        for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight", "transformer.wpe.weight"):
            w0, w1 = snap.before[step][name], snap.after[step][name]
            assert params[name].update_ratio == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-3)

    # TensorBoard: the monitor's event file sits beside the TensorBoardCallback's, one run directory
    ev = events(str(tmp_path / "runs"))
    ours = [f for f in ev["files"] if f.endswith(".activation-monitor")]
    theirs = [f for f in ev["files"] if f not in ours]
    assert len(ours) == 1 and len(theirs) == 1 and os.path.dirname(ours[0]) == os.path.dirname(theirs[0])
    assert os.path.dirname(ours[0]) == mon.log_dir
    assert [s for s, _ in ev["scalars"][f"activation_rms/{GPT_ACT}"]] == [0, 2, 4]
    assert sorted(s for s, _ in ev["scalars"]["train/loss"]) == list(range(1, 7))  # the Trainer's own
    assert not [t for t in ev["scalars"] if t.startswith("train/activation_")]  # not duplicated by its callback
    # no set_trainer: the callback found the Trainer running it, and its reporting callbacks got the scalars
    assert sorted({s for s, entry in logs.calls if f"activation_rms/{GPT_ACT}" in entry}) == [0, 2, 4]
    assert hook_count(model) == 0


def test_dead_units_mid_training_are_caught_stop_ends_training_and_reporters_receive_the_scalars(tmp_path):
    """A callback kills half of a BERT FFN's units after step 3; the sampled step 4 sees them dead
    (checked against a plain forward), "stop" ends training after that step, and the scalars
    reach the Trainer's reporting callbacks (a recording one) at their own steps, through set_trainer."""

    class Saboteur(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 4:  # optimizer step 3 is done: step 4 runs with dead units
                kill(model, 32)

    model, collator, snap, logs, records = bert(), Collator(), Snapshot(2), LogRecorder(), Records()
    mon = ActivationMonitor(
        every_n_steps=2, on_alert="stop", sinks=[records], thresholds=Thresholds(dead_fraction=0.25, min_positions=50)
    )
    args = targs(tmp_path, max_steps=12, per_device_train_batch_size=8, report_to=["tensorboard"])
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(96, classify=True), data_collator=collator,
        callbacks=[Saboteur(), snap, mon, logs],
    )
    assert mon.set_trainer(trainer) is mon and trainer.callback_handler.callbacks.count(mon) == 1
    with pytest.warns(MonitorWarning, match="dead"):
        trainer.train()

    entering = [a for a in mon.alerts if not a.recovered]
    assert [(a.step, a.layer, a.kind) for a in entering] == [(4, BERT_ACT, "dead")]
    assert trainer.state.global_step == 5 < args.max_steps  # stopped right after the alerting optimizer step
    # ground truth: the units whose pre-activation never exceeds 0 on step 4's batch
    truth = bert()
    truth.load_state_dict(snap.before[4])
    pre = []
    handle = truth.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, i, o: pre.append(o))
    with torch.no_grad():
        truth(input_ids=collator.batches[4]["input_ids"])
    handle.remove()
    dead = torch.nonzero((pre[0].reshape(-1, 64) <= 0).all(0)).flatten().tolist()
    assert dead == list(range(32))
    h = mon.health()[BERT_ACT]
    assert h.step == 4 and list(h.dead_units) == dead and h.dead_fraction == 0.5
    assert records.layer(2, BERT_ACT).health.dead_fraction == 0.0

    # the recording callback got each sampled step's scalars at that step; the Trainer's logs as usual
    ours = {s: e for s, e in logs.calls if any(k.startswith("activation_") for k in e)}
    assert sorted(ours) == [0, 2, 4]
    assert ours[4][f"activation_dead_fraction/{BERT_ACT}"] == 0.5 and ours[2][f"activation_dead_fraction/{BERT_ACT}"] == 0.0
    assert ours[4]["gradient_norm/classifier.weight"] == pytest.approx(snap.grad_norms[4]["classifier.weight"], rel=1e-5)
    assert [s for s, e in logs.calls if "loss" in e] == [1, 2, 3, 4, 5]
    # TensorBoard: exactly the Trainer's writer directory (set_trainer), our scalars once
    ev = events(str(tmp_path / "runs"))
    tb = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "TensorBoardCallback")
    assert mon.log_dir == tb.logging_dir
    assert [s for s, _ in ev["scalars"][f"activation_dead_fraction/{BERT_ACT}"]] == [0, 2, 4]
    assert not [t for t in ev["scalars"] if "activation_" in t and t.startswith("train/")]
    assert hook_count(model) == 0


# -- resuming -----------------------------------------------------------------------------------------
def _resume_run(tmp_path, name, ckpt=None, restore=False, on_alert=None):
    calls: list = []
    records = Records()
    mon = ActivationMonitor(
        every_n_steps=2, on_alert=on_alert or calls.append, sinks=[records],
        thresholds=Thresholds(dead_fraction=0.25, min_positions=50),
    )
    args = targs(
        tmp_path / name, max_steps=8, save_strategy="steps", save_steps=4, per_device_train_batch_size=8,
        restore_callback_states_from_checkpoint=restore,
    )
    trainer = Trainer(model=bert(dead_units=32), args=args, train_dataset=Tokens(96, classify=True), callbacks=[mon])
    trainer.train(resume_from_checkpoint=ckpt)
    return mon, calls, records, trainer


def test_resume_from_a_trainer_checkpoint_keeps_windows_baselines_and_active_alerts(tmp_path):
    full, full_calls, _, _ = _resume_run(tmp_path, "full")
    assert [(a.step, a.kind) for a in full_calls] == [(0, "dead")]  # dead from the start, said once
    ckpt = str(tmp_path / "full" / "checkpoint-4")
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        entry = json.load(f)["stateful_callbacks"]["ActivationMonitor"]
    assert entry[STATE_KEY]["global_step"] == 4 and entry["args"]["_restore"]["every_n_steps"] == 2
    assert len(json.dumps(entry)) < 200_000

    resumed, calls, rec, trainer = _resume_run(tmp_path, "resumed", ckpt)
    assert trainer.state.global_step == 8
    assert rec.steps == [4, 6]  # sampling continues where the checkpoint was
    assert calls == []  # the layer was already dead: no second alert
    assert resumed.alerts == full.alerts  # the history came back with the state
    for name, h in full.health().items():
        r = resumed.health()[name]
        assert (r.step, r.dead_fraction, r.evidence_values, r.dead_units) == (h.step, h.dead_fraction, h.evidence_values, h.dead_units)

    # the same checkpoint without the monitor's entry: the dead layer is reported again (the test can fail)
    bare = str(tmp_path / "bare")
    shutil.copytree(ckpt, bare)
    path = os.path.join(bare, "trainer_state.json")
    with open(path) as f:
        ts = json.load(f)
    del ts["stateful_callbacks"]["ActivationMonitor"]
    with open(path, "w") as f:
        json.dump(ts, f)
    _, again, _, _ = _resume_run(tmp_path, "again", bare)
    assert [(a.step, a.kind) for a in again] == [(4, "dead")]


def test_resume_with_restore_callback_states_keeps_the_users_callback_and_options(tmp_path):
    """``restore_callback_states_from_checkpoint=True`` makes the Trainer replace stateful callbacks
    by ones rebuilt from ``state()["args"]``: the rebuilt one is the user's callback (same options,
    including a callable ``on_alert``; results visible through the user's handle)."""
    _resume_run(tmp_path, "full")
    ckpt = str(tmp_path / "full" / "checkpoint-4")
    seen: list = []
    mon, _, rec, trainer = _resume_run(tmp_path, "restored", ckpt, restore=True, on_alert=seen.append)
    in_trainer = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ActivationMonitor))
    assert in_trainer is not mon and in_trainer.__dict__ is mon.__dict__  # replaced, and adopted
    assert rec.steps == [4, 6] and seen == []
    assert [(a.step, a.kind) for a in mon.alerts] == [(0, "dead")]
    assert mon.health()[BERT_ACT].step == 6


# -- clean-up -------------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise Boom("boom in backward")


@pytest.mark.parametrize("where", ["forward", "backward", "unsampled"])
def test_an_exception_in_training_leaves_no_hooks(tmp_path, where):
    """The Trainer has no exception event: the step left open is ended (hooks removed, nothing
    recorded) at the model's next forward outside the training loop, or at the next train()."""
    fail_at = 3 if where == "unsampled" else 2

    class Arm(TrainerCallback):
        armed = True

        def on_step_begin(self, args, state, control, model=None, **kw):
            model.fail = where if self.armed and state.global_step == fail_at else None
            self.armed = self.armed and model.fail is None

    class Failing(transformers.GPT2LMHeadModel):
        fail = None

        def forward(self, input_ids=None, labels=None, **kw):
            if self.fail in ("forward", "unsampled"):
                raise Boom("boom in forward")
            out = super().forward(input_ids=input_ids, labels=labels, **kw)
            if self.fail == "backward":
                out.loss = FailingBackward.apply(out.loss)
            return out

    model = Failing(gpt2().config)
    baseline = hook_count(model)
    records = Records()
    mon = ActivationMonitor(every_n_steps=2, on_alert="ignore", sinks=[records])
    trainer = Trainer(model=model, args=targs(tmp_path), train_dataset=Tokens(64), callbacks=[Arm(), mon])
    with pytest.raises(Boom):
        trainer.train()
    if where == "unsampled":
        assert hook_count(model) == baseline and not mon.monitor.in_step
    else:
        assert mon.monitor.in_step and hook_count(model) > baseline  # no event told the callback
    model.fail = None
    if where == "backward":  # the next train() cleans up first
        trainer.train()
        assert hook_count(model) == baseline and records.steps[:2] == [0, 0]
    else:  # a forward outside training: ends the step, and is not recorded
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(input_ids=torch.zeros(1, SEQ, dtype=torch.long))
        assert hook_count(model) == baseline
        ended = [w for w in caught if "never ended" in str(w.message)]
        if where == "unsampled":
            mon.monitor.flush()
            assert records.steps == [0, 2] and not ended and not mon.monitor.closed
        else:
            assert records.steps == [0] and len(ended) == 1 and mon.monitor.closed


def test_on_alert_raise_leaves_the_trainer_with_the_error_and_no_hooks(tmp_path):
    model = bert(dead_units=64)
    mon = ActivationMonitor(every_n_steps=2, on_alert="raise", thresholds=Thresholds(min_positions=50))
    trainer = Trainer(model=model, args=targs(tmp_path, per_device_train_batch_size=8), train_dataset=Tokens(64, classify=True), callbacks=[mon])
    with pytest.raises(ActivationAlertError, match="dead") as err:
        trainer.train()
    assert err.value.alert.step == 0 and trainer.state.global_step == 0
    assert hook_count(model) == 0 and mon.monitor.closed


def test_without_tensorboard_output_goes_to_a_subdirectory_and_set_trainer_adds_the_callback(tmp_path):
    logs = LogRecorder()
    trainer = Trainer(model=gpt2(), args=targs(tmp_path, max_steps=4), train_dataset=Tokens(32), callbacks=[logs])
    mon = ActivationMonitor(every_n_steps=3, on_alert="ignore").set_trainer(trainer)
    assert trainer.callback_handler.callbacks.count(mon) == 1
    with pytest.warns(MonitorWarning, match="no TensorBoard run"):
        trainer.train()
    assert mon.log_dir == str(tmp_path / "activation_monitor")
    ev = events(mon.log_dir)
    assert [s for s, _ in ev["scalars"][f"activation_rms/{GPT_ACT}"]] == [0, 3]
    ours = [(s, e[f"activation_rms/{GPT_ACT}"]) for s, e in logs.calls if f"activation_rms/{GPT_ACT}" in e]
    assert ours == [(s, pytest.approx(v)) for s, v in ev["scalars"][f"activation_rms/{GPT_ACT}"]]


def test_the_run_records_the_trainers_hyperparameters_and_run_config_on_top(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = ActivationMonitor(every_n_steps=2, on_alert="ignore", run_config={"note": "baseline", "seed": 7})
    args = targs(tmp_path, max_steps=2, gradient_accumulation_steps=2, report_to=["tensorboard"])
    Trainer(model=gpt2(), args=args, train_dataset=Tokens(32), callbacks=[mon]).train()
    acc = EventAccumulator(mon.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    [event] = acc.Tensors("run_config/text_summary")
    config = json.loads(event.tensor_proto.string_val[0].decode())
    assert config["model"] == "GPT2LMHeadModel" and config["learning_rate"] == 1e-3
    assert config["gradient_accumulation_steps"] == 2 and config["lr_scheduler_type"] == "linear"
    assert config["note"] == "baseline" and config["seed"] == 7  # run_config= wins over the Trainer's seed 0


def test_a_callback_rebuilt_from_a_checkpoint_without_its_original_takes_the_json_options():
    """restore_callback_states_from_checkpoint=True in a process where no live callback matches."""
    saved = {
        "every_n_steps": 7, "include": ["*.act"], "exclude": None, "on_alert": "stop", "logdir": None,
        "thresholds": {**Thresholds(dead_fraction=0.2).__dict__}, "histograms": False, "token": "elsewhere-1",
    }
    with pytest.warns(MonitorWarning, match="are back to their defaults"):
        cb = ActivationMonitor(_restore=saved)
    assert (cb.every_n_steps, cb.include, cb.on_alert) == (7, ["*.act"], "stop")
    assert cb.thresholds == Thresholds(dead_fraction=0.2) and cb.monitor_kwargs == {"histograms": False}
    assert cb._json_config() == {k: v for k, v in saved.items() if k != "token"}


# -- DDP (2 CPU processes, gloo) ----------------------------------------------------------------------------
def ddp_main(out: str) -> None:
    """One rank of a BERT classifier (half of one FFN dead) under DDP: writes what its callback saw
    and its own ground truth (its own batch of step 0, plain forward) to ``rank<r>.json``."""
    rank = int(os.environ["RANK"])
    collator, snap, records = Collator(), Snapshot(2), Records()
    model = bert(dead_units=32)
    mon = ActivationMonitor(
        every_n_steps=2, on_alert="stop", sinks=[records], thresholds=Thresholds(dead_fraction=0.25, min_positions=50)
    )
    args = targs(out, max_steps=8, per_device_train_batch_size=4, ddp_backend="gloo", report_to=["tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(64, classify=True), data_collator=collator, callbacks=[snap, mon])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # this rank's own ground truth at step 0: per-unit maxima of the FFN output on its own batch
    truth = bert()
    truth.load_state_dict(snap.before[0])
    acts = []
    handle = truth.bert.encoder.layer[0].intermediate.intermediate_act_fn.register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        truth(input_ids=collator.batches[0]["input_ids"])
    handle.remove()
    ls = records.layer(0, BERT_ACT) if rank == 0 else None
    result = {
        "world": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "alerts": [(a.step, a.layer, a.kind) for a in mon.alerts if not a.recovered],
        "health": {n: [h.step, h.evidence_values, h.dead_fraction] for n, h in mon.health().items()},
        "own_max": acts[0].reshape(-1, 64).max(0).values.tolist(),
        "own_positions": acts[0].reshape(-1, 64).shape[0],
        "positions": ls.summary.positions if ls else None,
        "max": ls.summary.max.tolist() if ls else None,
        "records": records.steps,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, MonitorWarning)],
        "log_dir": mon.log_dir,
        "hooks": hook_count(model),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_combines_ranks_in_one_collective_and_only_the_main_process_writes(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", os.path.abspath(__file__), "ddp", str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # the sampled step's statistics are both ranks' batches: positions summed, maxima maxed
    assert r0["positions"] == r0["own_positions"] + r1["own_positions"] == 2 * 4 * SEQ
    np.testing.assert_allclose(r0["max"], np.maximum(r0["own_max"], r1["own_max"]), rtol=1e-5, atol=1e-6)
    assert r0["own_max"] != r1["own_max"]  # the ranks did see different data
    # both ranks judged the combined numbers: the same alert, the same stop
    assert r0["alerts"] == r1["alerts"] == [[0, BERT_ACT, "dead"]]
    assert r0["global_step"] == r1["global_step"] == 1
    assert r0["health"] == r1["health"]
    # only the main process warns and writes
    assert any("dead" in m for m in r0["warnings"]) and r1["warnings"] == []
    assert r1["records"] == [] and r1["log_dir"] is None and r0["records"] == [0]
    files = glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    ours = [f for f in files if f.endswith(".activation-monitor")]
    assert len(ours) == 1 and os.path.dirname(ours[0]) == r0["log_dir"]
    assert r0["hooks"] == r1["hooks"] == 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ddp":
    ddp_main(sys.argv[2])


def test_numpy_integer_options_go_into_the_json_checkpoint_entry():
    import json

    import numpy as np

    cb = ActivationMonitor(every_n_steps=np.int64(5), images_every_n_samples=np.int64(3))
    entry = json.loads(json.dumps(cb.state()))  # trainer_state.json is JSON
    assert entry["args"]["_restore"]["every_n_steps"] == 5
    assert entry["args"]["_restore"]["images_every_n_samples"] == 3
