"""Ablation: exact outputs against forwards written out by hand, no leaks, effects and importance."""

import pytest
import torch
import torch.nn.functional as F
from models import SmallCNN
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_probe import DropBN, train, wine  # noqa: F401 - the fixture

from monitor import Monitor, MonitorWarning


def manual(model, x, act0_units=(), act0_value=0.0, fc1_units=(), fc1_value=0.0):
    """DropBN's forward written out (eval mode), with units replaced by hand."""
    with torch.no_grad():
        h = model.act0(model.bn(model.fc0(x)))
        value = torch.as_tensor(act0_value, dtype=h.dtype)
        h[:, list(act0_units)] = value if value.ndim == 0 else value[list(act0_units)]
        g = F.relu(model.fc1(model.drop(h)))
        g[:, list(fc1_units)] = fc1_value
        return model.head(g)


def untouched(model):
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0


@pytest.fixture(scope="module")
def trained(wine):  # noqa: F811
    X, y, px, py = wine
    torch.manual_seed(0)
    model = DropBN()
    mon = Monitor(model, every_n_steps=2, on_alert="ignore", probe=(px, py), probe_loss_fn=F.cross_entropy)
    train(model, mon, X, y, 5)
    model.eval()
    yield model, mon, px, py
    mon.close()


def test_ablated_units_are_replaced_inside_the_block_only(trained):
    model, mon, px, _ = trained
    with mon.ablate({"act0": [3, 7], "fc1.relu": "all"}), torch.no_grad():
        out = model(px)
    torch.testing.assert_close(out, manual(model, px, act0_units=[3, 7], fc1_units=range(16)), rtol=0, atol=0)
    with mon.ablate({"fc1.relu": [0, 15]}, value=1.5), torch.no_grad():
        out = model(px)
    torch.testing.assert_close(out, manual(model, px, fc1_units=[0, 15], fc1_value=1.5), rtol=0, atol=0)
    untouched(model)
    with torch.no_grad():
        torch.testing.assert_close(model(px), manual(model, px), rtol=0, atol=0)  # nothing left behind


def test_mean_ablation_uses_the_last_probe_run(trained):
    model, mon, px, _ = trained
    last = mon.probe()
    means = last.activations["act0"].mean(axis=0)
    with mon.ablate({"act0": [0, 1, 2]}, value="mean"), torch.no_grad():
        out = model(px)
    torch.testing.assert_close(out, manual(model, px, act0_units=[0, 1, 2], act0_value=means), rtol=1e-6, atol=1e-6)


def test_ablation_never_leaks_also_when_the_block_raises(trained):
    model, mon, px, _ = trained
    with pytest.raises(KeyError, match="boom"), mon.ablate({"act0": "all", "fc1.relu": [1]}):
        model(px)
        raise KeyError("boom")
    untouched(model)
    with pytest.raises(ValueError, match="Cannot ablate unit 40 of act0: it has 32 units"), mon.ablate({"act0": [40]}):
        model(px)
    untouched(model)
    with torch.no_grad():
        torch.testing.assert_close(model(px), manual(model, px), rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec, value, error, match",
    [
        ({"nope": [1]}, 0.0, ValueError, r"Cannot ablate \['nope'\]: not a watched layer. Watched layers: \['act0', 'fc1.relu'\]"),
        ({"act0": "some"}, 0.0, ValueError, "\"all\" or unit indices, got 'some'"),
        ({"act0": [-1]}, 0.0, ValueError, "non-negative unit indices"),
        ({"act0": [1]}, "max", ValueError, "finite number .* or \"mean\", got 'max'"),
        ({"act0": [1]}, float("nan"), ValueError, "got nan"),
        ([("act0", [1])], 0.0, TypeError, "non-empty dict"),
    ],
)
def test_bad_ablations_are_refused_naming_the_value(trained, spec, value, error, match):
    _, mon, _, _ = trained
    with pytest.raises(error, match=match):
        mon.ablate(spec, value=value)


def test_conv_units_are_channels():
    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    x = torch.randn(4, 3, 16, 16)
    mon = Monitor(cnn, on_alert="ignore", probe=x)
    with mon.step(0):
        cnn(x)
    with mon.ablate({"features.1": [0, 5]}), torch.no_grad():
        out = cnn(x)
    f = cnn.features
    with torch.no_grad():
        h = f[1](f[0](x))
        h[:, [0, 5]] = 0
        expected = cnn.head(f[5](f[4](f[3](f[2](h)))).flatten(1))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_probe_with_ablation_reports_the_change_against_the_unablated_probe(trained):
    model, mon, px, py = trained
    result = mon.probe(ablate={"act0": list(range(16))})
    base, ablated = manual(model, px).double(), manual(model, px, act0_units=range(16)).double()
    e = result.ablation
    assert e.layers == ("act0",)
    assert e.output_change == pytest.approx(float((ablated - base).norm() / base.norm()), rel=1e-6)
    assert e.prediction_change == pytest.approx(float((ablated.argmax(1) != base.argmax(1)).double().mean()))
    assert e.base_loss == pytest.approx(float(F.cross_entropy(base.float(), py)), rel=1e-5)
    assert e.loss == pytest.approx(float(F.cross_entropy(ablated.float(), py)), rel=1e-5)
    assert e.loss_change == pytest.approx(e.loss - e.base_loss)
    assert result.drift["act0"] > 0 and set(result.drift) == {"act0", "fc1.relu"}  # vs the unablated run
    assert mon.last_probe is None or mon.last_probe.ablation is None  # ablated runs are not "the last probe"


def test_layer_importance_ablates_each_layer_in_turn_and_writes_a_table(wine, tmp_path):  # noqa: F811
    X, y, px, py = wine
    torch.manual_seed(0)
    model = DropBN()
    with Monitor(model, every_n_steps=2, logdir=tmp_path, on_alert="ignore", probe=(px, py)) as mon:
        train(model, mon, X, y, 5)
        model.eval()
        effects = mon.layer_importance(loss_fn=F.cross_entropy)
    assert list(effects) == ["act0", "fc1.relu"]
    base = manual(model, px).double()
    for name, kw in (("act0", dict(act0_units=range(32))), ("fc1.relu", dict(fc1_units=range(16)))):
        ablated = manual(model, px, **kw).double()
        assert effects[name].output_change == pytest.approx(float((ablated - base).norm() / base.norm()), rel=1e-6)
        assert effects[name].loss == pytest.approx(float(F.cross_entropy(ablated.float(), py)), rel=1e-5)
    ea = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    ea.Reload()
    table = ea.Tensors("probe_importance/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| layer ablated (all units) | output change | predictions changed | loss change |")
    assert "| act0 |" in table and "| fc1.relu |" in table


def test_a_sampled_step_inside_an_ablation_block_records_what_ran(wine):  # noqa: F811
    X, _, px, _ = wine
    torch.manual_seed(0)
    model = DropBN()
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False, gradients=False)
    with mon.ablate({"act0": "all", "fc1.relu": [0, 1, 2, 3]}), mon.step(0):
        model(X[:64])
    h = mon.health()
    assert h["act0"].firing_rate == 0.0 and h["act0"].rms == 0.0
    # act0 is all zero, so fc1.relu's output is relu(fc1.bias) for every sample, with units 0-3 ablated:
    # the units that never fire are exactly those four and those whose bias is not positive
    silent = set(range(4)) | {u for u in range(16) if float(model.fc1.bias[u]) <= 0}
    assert 4 < len(silent) < 16 and sorted(h["fc1.relu"].dead_units) == sorted(silent)
    mon.close()
    untouched(model)


def test_an_ablation_that_never_applies_warns(trained):
    model, mon, px, _ = trained
    with pytest.warns(MonitorWarning, match=r"ablation of \['fc1.relu'\] was never applied"), mon.ablate({"fc1.relu": [1]}):
        model.fc0(px)  # no watched layer runs


def test_probes_and_ablations_leave_no_reference_cycle_through_the_monitor(wine):  # noqa: F811
    """A monitor in a cycle is finalised by the cycle collector after its weak references are
    cleared, and its writer thread could no longer judge what is queued: none may form."""
    import gc
    import weakref

    X, y, px, py = wine
    model = DropBN()
    opt = torch.optim.Adam(model.parameters())  # (made here: torch keeps a cycle with the frame that made it)
    gc.disable()
    try:
        mon = Monitor(model, every_n_steps=1, on_alert="ignore", probe=(px, py), probe_loss_fn=F.cross_entropy)
        train(model, mon, X, y, 2, opt=opt)
        mon.probe(ablate={"act0": [1]}, value="mean")
        mon.layer_importance()
        with mon.ablate({"fc1.relu": [2]}, value="mean"):
            model(px)
        ref = weakref.ref(mon)
        del mon
        holders = [] if ref() is None else [type(r).__name__ + ":" + str(r)[:120] for r in gc.get_referrers(ref())]
        assert ref() is None, holders  # freed by its reference count alone
    finally:
        gc.enable()


def test_a_probe_run_inside_an_ablation_block_sees_the_model_unablated(wine):  # noqa: F811
    """The run that sampled step 0 asked for comes at the next `mon.step()`, here inside an ablation
    block: it is recorded as the model is (the drift baseline and the "mean" values come from it),
    and a unit-index typo in that block can no longer make it fail and stop the periodic probe."""
    X, _, px, _ = wine
    torch.manual_seed(0)
    model = DropBN()
    model.eval()
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", probe=px, probe_every_n_samples=1)
    with mon:
        with mon.step(0):
            model(X[:64])
        with mon.ablate({"act0": "all"}):
            with mon.step(1):
                model(X[:64])
            first = mon.last_probe
            by_hand = mon.probe()
            inside = mon.probe(ablate={"fc1.relu": "all"}).ablation.output_change
            inside_importance = mon.layer_importance()
        outside = mon.probe(ablate={"fc1.relu": "all"}).ablation.output_change
        assert inside == pytest.approx(outside, rel=1e-6) and outside > 0  # measured against the model as it is
        assert inside_importance == mon.layer_importance()
        with torch.no_grad():
            truth = model.act0(model.bn(model.fc0(px))).numpy()
        assert first is not None and first.step == 0
        assert abs(first.activations["act0"] - truth).max() < 1e-6 and truth.max() > 0
        assert abs(by_hand.activations["act0"] - truth).max() < 1e-6
        with pytest.raises(ValueError, match="Cannot ablate unit 99 of act0"):
            with mon.ablate({"act0": [99]}):
                with mon.step(2):
                    model(X[:64])
        # the run step 1 asked for came at step 2's start, inside the block with the typo: unharmed
        assert mon.has_probe and mon.last_probe.step == 1
        with mon.step(3):
            model(X[:64])
    assert mon.last_probe.step == 3  # periodic runs go on (step 2 raised: it asked for none)
    untouched(model)


def test_an_ablated_probe_refuses_a_layer_the_probe_does_not_reach(trained):
    """Before any sampled step a name that is not a module may still be a functional activation;
    the probe's own forward settles it: refused, naming it and the layers the probe reaches."""
    model, _, px, py = trained
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", probe=(px, py))
    with mon:
        with pytest.raises(ValueError, match=r"Cannot ablate \['relu_typo'\]: not a watched layer that the probe reaches"):
            mon.probe(ablate={"relu_typo": "all"})
        assert mon.probe(ablate={"fc1.relu": "all"}).ablation.output_change > 0
    untouched(model)


class _LoRALinear(torch.nn.Linear):
    """loralib's Linear (merge_weights=True): merges B @ A into the weight on eval(), unmerges on train()."""

    def __init__(self, i, o, r=4):
        super().__init__(i, o)
        self.lora_A = torch.nn.Parameter(torch.randn(r, i) * 0.1)
        self.lora_B = torch.nn.Parameter(torch.zeros(o, r))
        self.merged = False
        self.weight.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        if mode and self.merged:
            self.weight.data -= self.lora_B @ self.lora_A
            self.merged = False
        elif not mode and not self.merged:
            self.weight.data += self.lora_B @ self.lora_A
            self.merged = True
        return self

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return out if self.merged else out + x @ self.lora_A.T @ self.lora_B.T


def test_a_probe_puts_training_flags_back_through_train():
    """A module whose train() does more than set its flag sees train(True) again after a probe run
    (as after a validation loop's model.train()): LoRA layers unmerge and keep learning. Setting the
    flags directly left them merged, so lora_A/lora_B got no gradient."""

    def run(probe):
        torch.manual_seed(0)
        model = torch.nn.Sequential(_LoRALinear(8, 32), torch.nn.ReLU(), _LoRALinear(32, 3))
        model[1].eval()  # a submodule kept in eval mode stays so
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        X, Y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        with Monitor(model, every_n_steps=5, probe=X[:16] if probe else None, probe_every_n_samples=1, on_alert="ignore") as mon:
            for s in range(20):
                with mon.step(s):
                    loss = F.cross_entropy(model(X), Y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
        return model

    plain, probed = run(False), run(True)
    assert [m.training for m in probed.modules()] == [True, True, False, True]
    assert not probed[0].merged and not probed[2].merged
    assert probed[0].lora_B.norm() > 0.01
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)  # equal up to the merge's rounding (w + d - d)


def test_the_effect_of_a_hugging_face_batch_with_labels_is_read_on_the_logits():
    """A probe holding `labels` makes a Hugging Face model return its loss first: the effect is
    measured on `logits` (ground truth: the same ablation written out with the model's own logits)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg)
    ids, y = torch.randint(0, 100, (20, 12)), torch.randint(0, 3, (20,))
    with Monitor(model, every_n_steps=1, on_alert="ignore", probe={"input_ids": ids, "labels": y}) as mon:
        got = mon.probe(ablate={"bert.pooler.activation": "all"}).ablation
        model.eval()
        with torch.no_grad():
            base = model(input_ids=ids).logits
            with mon.ablate({"bert.pooler.activation": "all"}):
                ablated = model(input_ids=ids).logits
    assert got.output_change == pytest.approx(((ablated - base).norm() / base.norm()).item(), rel=1e-5)
    assert got.prediction_change == pytest.approx((ablated.argmax(-1) != base.argmax(-1)).float().mean().item())
    assert got.prediction_change > 0.5


def test_misuse_of_results_and_blocks_gets_clear_errors(trained):
    model, mon, px, _ = trained
    r = mon.probe()
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError, match="Expected `unit` to be an int"):
            r.top("act0", bad)
    with pytest.raises(TypeError, match="Expected `k` to be an int"):
        r.top("act0", 0, k=2.5)
    block = mon.ablate({"act0": [0]})
    with block:
        model(px)
    with pytest.raises(RuntimeError, match="entered once"):
        with block:
            pass
    untouched(model)


def test_an_output_turned_nan_has_no_output_change():
    from monitor.ablation import effect

    base = torch.ones(4, 3)
    assert torch.isnan(torch.tensor(effect(["x"], base, base * float("nan"), None, None).output_change))
    assert effect(["x"], base, base * 2, None, None).output_change == pytest.approx(1.0)
