"""Robustness of the whole path on real models: unclosed monitors, functional naming, warning
locations, user-defined detectors, first-step truth, NaN, hysteresis and hook clean-up.

Ground truth is computed here, from the model's own pre-activations, never from the monitor;
TensorBoard output is read back with TensorBoard's own EventAccumulator.
"""

import contextlib
import copy
import inspect
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from monitor import Detector, Monitor, MonitorWarning, Verdict
from monitor.stats import MAX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITOR_DIR = os.path.join(ROOT, "monitor") + os.sep
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def read(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(logdir, tag):
    return [(e.step, e.value) for e in read(logdir).Scalars(tag)]


# -- 1. nothing is lost without `with mon:` ------------------------------------------------------

_SCRIPT_HEAD = """
import sys
import torch
from torch import nn
from monitor import Monitor

torch.manual_seed(0)
"""

_SCRIPTS = {
    # module-level monitor, the script simply ends
    "ends": """
model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))
mon = Monitor(model, every_n_steps=1, logdir=sys.argv[1], on_alert="ignore")
x = torch.randn(32, 13)
for s in range(30):
    with mon.step(s):
        model(x)
""",
    # the same, ending with sys.exit(0)
    "sys_exit": """
model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))
mon = Monitor(model, every_n_steps=1, logdir=sys.argv[1], on_alert="ignore")
x = torch.randn(32, 13)
for s in range(30):
    with mon.step(s):
        model(x)
sys.exit(0)
""",
    # the usual `def main(): ...; main()`: the monitor is a local that goes out of scope, and a
    # garbage collection runs before the interpreter exits
    "main_then_gc": """
import gc

def main():
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))
    mon = Monitor(model, every_n_steps=1, logdir=sys.argv[1], on_alert="ignore")
    x = torch.randn(32, 13)
    for s in range(30):
        with mon.step(s):
            model(x)

main()
gc.collect()
""",
}


@pytest.mark.parametrize("variant", sorted(_SCRIPTS))
def test_a_script_that_never_closes_the_monitor_loses_no_sampled_step(tmp_path, variant):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT_HEAD + _SCRIPTS[variant]))
    logdir = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(script), str(logdir)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    files = os.listdir(logdir)
    assert len(files) == 1 and files[0].endswith(".activation-monitor")
    ea = read(logdir)
    assert [e.step for e in ea.Scalars("activation_rms/1")] == list(range(30))
    assert [e.step for e in ea.Scalars("activation_dead_fraction/1")] == list(range(30))
    assert [e.step for e in ea.Histograms("activation_hist/1")] == list(range(30))
    # and the values are the model's: same seed, same model and input, recomputed here
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(32, 13)
    with torch.no_grad():
        rms = float(model[1](model[0](x)).pow(2).mean().sqrt())
    assert ea.Scalars("activation_rms/1")[-1].value == pytest.approx(rms, rel=1e-5)


# -- 2. functional activations do not depend on the name `self` -----------------------------------


class WithSelf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 7)

    def forward(self, x):
        return F.relu(self.fc(x))


class WithS(nn.Module):
    def __init__(s):  # not `self`: the point of the test
        super().__init__()
        s.fc = nn.Linear(5, 7)

    def forward(s, x):
        return F.relu(s.fc(x))


def act(t):
    return torch.tanh(t)


def scaled_act(t):
    return torch.tanh(2 * t)  # the input of tanh is not a module's output: named after the model


class HelperCalled(nn.Module):
    def __init__(me):
        super().__init__()
        me.fc = nn.Linear(5, 7)
        me.head = nn.Linear(7, 2)

    def forward(me, x):
        return me.head(act(me.fc(x)))


class HelperOnOwnTensor(nn.Module):
    def __init__(this):
        super().__init__()
        this.fc = nn.Linear(5, 7)

    def forward(this, x):
        return scaled_act(this.fc(x))


def test_functional_activation_is_named_the_same_whatever_the_instance_is_called():
    x = torch.randn(16, 5)
    healths = {}
    for cls in (WithSelf, WithS):
        torch.manual_seed(0)
        model = cls()
        with Monitor(model, every_n_steps=1, on_alert="ignore", background=False) as mon, mon.step(0):
            model(x)
        healths[cls] = mon.health()
        with torch.no_grad():
            ref = torch.relu(model.fc(x))
        h = healths[cls]["fc.relu"]
        assert h.kind == "relu" and h.units == 7
        assert h.rms == pytest.approx(float(ref.pow(2).mean().sqrt()), rel=1e-5)
    assert list(healths[WithSelf]) == list(healths[WithS]) == ["fc.relu"]
    a, b = healths[WithSelf]["fc.relu"], healths[WithS]["fc.relu"]
    assert (a.rms, a.max_abs, a.firing_rate) == pytest.approx((b.rms, b.max_abs, b.firing_rate))


def test_a_helper_function_called_from_forward_is_attributed_to_the_model():
    x = torch.randn(16, 5)
    model = HelperCalled()
    with Monitor(model, every_n_steps=1, on_alert="ignore", background=False) as mon, mon.step(0):
        model(x)
        torch.tanh(model(x))  # outside the model's forward (in the "loss"): not watched
    assert mon.layers == ["fc.tanh"]
    h = mon.health()["fc.tanh"]
    with torch.no_grad():
        ref = torch.tanh(model.fc(x))
    assert h.kind == "tanh" and h.units == 7
    # the model ran twice in the step: both forwards, nothing else
    assert h.rms == pytest.approx(float(ref.pow(2).mean().sqrt()), rel=1e-5)

    model = HelperOnOwnTensor()
    with Monitor(model, every_n_steps=1, on_alert="ignore", background=False) as mon, mon.step(0):
        model(x)
    assert mon.layers == ["tanh"]  # produced by no submodule: the root's (unnamed) activation
    with torch.no_grad():
        ref = torch.tanh(2 * model.fc(x))
    assert mon.health()["tanh"].max_abs == pytest.approx(float(ref.abs().max()), rel=1e-6)


# -- 3. warnings point at the user's line --------------------------------------------------------


def _monitor_warnings(rec):
    return [w for w in rec if issubclass(w.category, MonitorWarning)]


@pytest.mark.parametrize("on_alert", ["warn", "stop"])
def test_alert_warning_points_at_the_users_step_block(on_alert):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    mon = Monitor(model, every_n_steps=1, on_alert=on_alert, background=False)
    x = torch.randn(64, 13)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        with mon.step(0):
            model(x)
    mon.close()
    got = _monitor_warnings(rec)
    assert len(got) == 1 and "| 1 | dead: 16/16 units" in str(got[0].message)
    assert got[0].filename == __file__, got[0].filename
    assert got[0].lineno in (line, line + 1)


def test_problem_warnings_point_at_the_users_line():
    class Reused(nn.Module):  # one Tanh module applied to outputs of different widths
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 6), nn.Linear(6, 3), nn.Tanh()

        def forward(self, x):
            h = self.act(self.a(x))
            return self.act(self.b(h))

    src, start = inspect.getsourcelines(Reused.forward)
    forward_lines = range(start, start + len(src))
    model = Reused()
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with mon.step(0):
            model(torch.randn(8, 4))  # the second call of `act` has 3 units, not 6
        empty_line = inspect.currentframe().f_lineno + 1
        with mon.step(1):
            pass  # the forward is outside the step: no watched activation ran
    mon.close()
    got = {
        ("unit count" in str(w.message), "no watched activation" in str(w.message)): w for w in _monitor_warnings(rec)
    }
    assert set(got) == {(True, False), (False, True)}, [str(w.message) for w in rec]
    shape, empty = got[(True, False)], got[(False, True)]
    for w in (shape, empty):
        assert w.filename == __file__, (w.filename, str(w.message))
        assert not w.filename.startswith((MONITOR_DIR, TORCH_DIR))
    assert shape.lineno in forward_lines  # inside the user's forward, where `act` was called
    assert empty.lineno in (empty_line, empty_line + 1)


def test_a_compiled_model_gives_no_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.compile()  # marks the module; nothing is compiled
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mon = Monitor(model, every_n_steps=1).attach()
    mon.close()
    assert [str(w.message) for w in _monitor_warnings(rec)] == []


# -- 4. a user-defined detector through the whole path ------------------------------------------

BOUND = 5.0


class PeakGuard(Detector):
    """Alerts when the largest output of a layer exceeds BOUND; counts its own evaluations."""

    name = "peak_guard"
    fields = ("peak", "peak_evaluations")
    reads = (MAX,)
    causes = "a unit's output grew past the bound: check the weights of the layer before it"

    def evaluate(self, layer, memory):
        peak = float(layer.summary.max.max())
        memory["evaluations"] = memory.get("evaluations", 0) + 1
        memory.setdefault("peaks", []).append(peak)
        bad = True if peak > BOUND else (False if peak < 0.8 * BOUND else None)
        what = f"peak_guard: largest output {peak:.4g} vs bound {BOUND:g}"
        return Verdict(bad, peak, BOUND, what, {"peak": peak, "peak_evaluations": memory["evaluations"]})


def _peak_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 6) * 0.05)  # outputs far below the bound
        model[0].bias.fill_(0.1)
    return model


def _true_peak(model, x):
    with torch.no_grad():
        return float(torch.relu(model[0](x)).max())


class TanhShy(Detector):
    """A user detector with a bug: it raises on tanh layers, and only there."""

    name = "tanh_shy"
    fields = ("shy_peak",)
    reads = (MAX,)

    def evaluate(self, layer, memory):
        if layer.kind.name == "tanh":
            raise ValueError("tanh is not handled")
        peak = float(layer.summary.max.max())
        return Verdict(False, peak, 0.0, f"tanh_shy: {peak:.3g}", {"shy_peak": peak})


@pytest.mark.parametrize("background", [True, False])
def test_a_user_detector_that_raises_loses_only_its_own_verdicts(background):
    """A user detector raising on one layer warns once (naming it) and skips its own verdict there;
    the built-in detectors and the other layers are judged as before (75% dead units are found at
    step 0) and its number reads None where it raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].bias[:24] = -100.0  # units 0..23 of the ReLU can never fire
    xs = [torch.randn(128, 8) for _ in range(4)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with Monitor(model, every_n_steps=1, on_alert="ignore", detectors=[TanhShy()], background=background) as mon:
            for step, x in enumerate(xs):
                with mon.step(step):
                    model(x)
            health = mon.health()
            alerts = [(a.step, a.layer, a.kind) for a in mon.alerts]
    with torch.no_grad():
        relu = torch.relu(model[0](xs[-1]))
    assert alerts == [(0, "1", "dead")]
    assert health["1"].dead_units == tuple(range(24))
    assert health["1"].shy_peak == pytest.approx(float(relu.max()))
    assert health["3"].shy_peak is None and health["3"].step == 3  # judged, without the failing detector
    shy = [str(w.message) for w in _monitor_warnings(rec) if "tanh_shy" in str(w.message)]
    assert len(shy) == 1 and "ValueError('tanh is not handled')" in shy[0] and "on 3" in shy[0]


def test_a_number_that_was_not_judged_reads_none_and_a_typo_raises():
    """`grad_ratio` (the vanishing-gradient detector's number) on a forward-only step is None, like
    `grad_rms`; a name no detector declares is an AttributeError."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon:
        with mon.step(0):
            model(torch.randn(64, 8))
        h = mon.health()["1"]
    assert h.grad_rms is None and h.grad_ratio is None
    with pytest.raises(AttributeError, match="grad_ration"):
        h.grad_ration  # noqa: B018


def test_a_user_detector_goes_through_detection_health_tensorboard_and_checkpoints(tmp_path):
    model = _peak_model()
    x = torch.randn(64, 6)
    small = model[0].weight.detach().clone()
    truth: dict[int, float] = {}
    logdir = tmp_path / "a"
    mon = Monitor(model, every_n_steps=1, logdir=logdir, on_alert="ignore", detectors=[PeakGuard()])
    with mon:
        for step in range(6):
            if step == 3:
                with torch.no_grad():
                    model[0].weight.copy_(small * 400)  # peaks far beyond the bound from here on
            truth[step] = _true_peak(model, x)
            with mon.step(step):
                model(x)
            h = mon.health()["1"]
            assert h.peak == pytest.approx(truth[step], rel=1e-6)
            assert h.peak_evaluations == step + 1  # the detector's memory persists across steps
        state = mon.state_dict()
    assert all(truth[s] < 0.8 * BOUND for s in range(3)) and all(truth[s] > BOUND for s in range(3, 6))
    mine = [a for a in mon.alerts if a.kind == "peak_guard"]
    assert len(mine) == 1
    a = mine[0]
    assert (a.step, a.layer, a.recovered, a.threshold) == (3, "1", False, BOUND)
    assert a.value == pytest.approx(truth[3], rel=1e-6)
    assert f"peak_guard: largest output {truth[3]:.4g} vs bound 5" in a.message
    assert a.message.endswith(PeakGuard.causes) and a.message.startswith("step 3 | 1 | ")
    # TensorBoard: every field is a scalar activation_<field>/<layer>
    got = scalars(logdir, "activation_peak/1")
    assert [s for s, _ in got] == list(range(6))
    assert [v for _, v in got] == pytest.approx([truth[s] for s in range(6)], rel=1e-6)
    assert [v for _, v in scalars(logdir, "activation_peak_evaluations/1")] == [1, 2, 3, 4, 5, 6]
    text = read(logdir).Tensors("activation_alerts/text_summary")
    assert any(a.message in e.tensor_proto.string_val[0].decode() for e in text)
    # the detector's memory is in the checkpoint and serialisable with weights_only
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    state = torch.load(path, weights_only=True)
    assert state["layers"]["1"]["detectors"]["peak_guard"]["evaluations"] == 6

    # resume in a new monitor with a new detector instance: memory and alert state carry over
    logdir_b = tmp_path / "b"
    b = Monitor(model, every_n_steps=1, logdir=logdir_b, on_alert="ignore", detectors=[PeakGuard()])
    b.load_state_dict(state)
    with b:
        for step in range(6, 10):
            if step == 8:
                with torch.no_grad():
                    model[0].weight.copy_(small)  # healthy again: recovery after 2 healthy steps
            truth[step] = _true_peak(model, x)
            with b.step(step):
                model(x)
            assert b.health()["1"].peak_evaluations == step + 1
    assert truth[7] > BOUND and truth[8] < 0.8 * BOUND
    mine = [(al.step, al.recovered) for al in b.alerts if al.kind == "peak_guard"]
    assert mine == [(3, False), (9, True)]  # no duplicate at 6 or 7, one recovery
    assert [v for _, v in scalars(logdir_b, "activation_peak/1")] == pytest.approx(
        [truth[s] for s in range(6, 10)], rel=1e-6
    )


def test_state_dict_is_a_snapshot_that_later_steps_do_not_change():
    model = _peak_model()
    with torch.no_grad():
        model[0].bias[:2] = -5.0  # two units below zero: the dead detector keeps its spread history
    x = torch.randn(64, 6)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False, detectors=[PeakGuard()])
    for step in range(3):
        with mon.step(step):
            model(x)
    state = mon.state_dict()
    frozen = copy.deepcopy(state)
    for step in range(3, 6):
        with mon.step(step):
            model(x)
    saved = state["layers"]["1"]["detectors"]
    assert saved["peak_guard"]["peaks"] == frozen["layers"]["1"]["detectors"]["peak_guard"]["peaks"]
    assert saved["dead"]["spreads"] == frozen["layers"]["1"]["detectors"]["dead"]["spreads"]


class _Base(Detector):
    name = "mine"
    fields = ("mine_value",)
    reads = (MAX,)

    def evaluate(self, layer, memory):
        return Verdict(None)


class _Dead(_Base):
    name = "dead"


class _BadRow(_Base):
    reads = ("maximum",)


class _RmsField(_Base):
    fields = ("rms",)


class _BadName(_Base):
    name = "my detector"


@pytest.mark.parametrize(
    "detectors, exc, needle",
    [
        ([_Base], TypeError, "pass an instance, not the class"),
        (_Base(), TypeError, "a sequence of monitor.Detector instances"),
        ([_Dead()], ValueError, "Detector name 'dead' is taken"),
        ([_Base(), _Base()], ValueError, "Detector name 'mine' is taken"),
        ([_BadRow()], ValueError, "reads unknown statistic rows ['maximum']; valid rows:"),
        ([_RmsField()], ValueError, "declares fields ['rms'] that another number or a LayerHealth attribute already uses"),
        ([_BadName()], ValueError, "to have a `name` that is an identifier, got 'my detector'"),
    ],
)
def test_invalid_detectors_are_rejected_at_construction(detectors, exc, needle):
    model = _peak_model()
    with pytest.raises(exc) as e:
        Monitor(model, detectors=detectors)
    assert needle in str(e.value)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _DeadFractionField(_Base):
    fields = ("dead_fraction",)

    def evaluate(self, layer, memory):
        return Verdict(None, metrics={"dead_fraction": -1.0})


def test_a_field_of_a_builtin_detector_is_rejected():
    model = _peak_model()
    with pytest.raises(ValueError, match="dead_fraction"):
        Monitor(model, every_n_steps=1, on_alert="ignore", background=False, detectors=[_DeadFractionField()])


# -- 5. the first sampled step reports the truth --------------------------------------------------


def test_first_sampled_step_reports_the_true_dead_fraction(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        model[0].bias[:2] = -100.0
    x = torch.randn(64, 13)
    with torch.no_grad():
        pre = model[0](x)
    never_fired = (pre <= 0).all(dim=0)  # the truth, from the pre-activations
    truth = float(never_fired.float().mean())
    assert never_fired[:2].all() and truth == pytest.approx(0.2)
    with Monitor(model, every_n_steps=1, logdir=tmp_path, on_alert="ignore") as mon:
        with mon.step(0):
            model(x)
        h = mon.health()["1"]
    assert mon.alerts == []
    assert h.dead_fraction == pytest.approx(truth) and list(h.dead_units) == np.flatnonzero(never_fired).tolist()
    assert h.evidence_values == 64 and h.evidence_steps == 1
    ea = read(tmp_path)
    assert [(e.step, e.value) for e in ea.Scalars("activation_dead_fraction/1")] == [(0, pytest.approx(truth))]
    assert [(e.step, e.value) for e in ea.Scalars("activation_evidence_values/1")] == [(0, 64.0)]
    firing = float((pre > 0).float().mean())
    assert ea.Scalars("activation_firing_rate/1")[0].value == pytest.approx(firing, rel=1e-6)
    assert "activation_alerts/text_summary" not in ea.Tags()["tensors"]


# -- 6. NaN never reads as recovery -------------------------------------------------------------


def _tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 3))


@pytest.mark.parametrize("background", [False, True])
def test_nan_steps_never_read_as_recovery_from_saturation(background):
    model = _tanh_mlp()
    w0 = model[0].weight.detach().clone()
    x = torch.randn(128, 13)
    plan = ["big"] * 3 + ["nan"] * 5
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=background)
    with mon:
        for step, p in enumerate(plan):
            with torch.no_grad():
                model[0].weight.copy_(w0 * 100 if p == "big" else torch.full_like(w0, float("nan")))
                out = torch.tanh(model[0](x))
            with mon.step(step):
                model(x)
            h = mon.health()["1"]
            if p == "nan":
                assert h.nonfinite == int(torch.isnan(out).any(0).sum()) == 32  # units that held NaN
            else:
                assert float(((out.abs() > 0.98).float().mean(0) >= 0.95).float().mean()) >= 0.5  # truth: saturated
    alerts = [(a.step, a.kind, a.recovered) for a in mon.alerts]
    assert alerts == [(0, "saturated", False), (3, "nonfinite", False)]


def test_nan_steps_in_the_evidence_window_never_read_as_recovery():
    model = _tanh_mlp()
    w0 = model[0].weight.detach().clone()
    x = torch.randn(32, 13)  # 32 values per step: the evidence spans 4 sampled steps
    plan = ["big"] * 4 + ["nan"] * 3 + ["big"] * 6
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon:
        for step, p in enumerate(plan):
            with torch.no_grad():
                model[0].weight.copy_(w0 * 100 if p == "big" else torch.full_like(w0, float("nan")))
                out = torch.tanh(model[0](x))
            if p == "big":  # truth: every finite step is saturated (>= 50% of units at a bound)
                assert float(((out.abs() > 0.98).float().mean(0) >= 0.95).float().mean()) >= 0.5
            with mon.step(step):
                model(x)
    saturated = [(a.step, a.recovered) for a in mon.alerts if a.kind == "saturated"]
    assert saturated == [(3, False)]  # one alert, never a recovery: the layer never stopped saturating


def test_a_nan_relu_layer_is_not_reported_dead():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))
    b0 = model[0].bias.detach().clone()
    x = torch.randn(128, 13)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon:
        for step, p in enumerate(["ok", "ok", "nan", "nan", "ok", "ok"]):
            with torch.no_grad():
                model[0].bias.copy_(b0 if p == "ok" else torch.full_like(b0, float("nan")))
            with mon.step(step):
                model(x)
    kinds = [(a.step, a.kind, a.recovered) for a in mon.alerts]
    assert (2, "nonfinite", False) in kinds
    assert [k for k in kinds if k[1] == "dead"] == []  # NaN is not death (judge.py: NaN counts as fired)


# -- 7. hysteresis on a real model --------------------------------------------------------------


def test_hysteresis_one_alert_while_hovering_at_the_threshold_one_recovery_below_release():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 2))
    x = torch.randn(128, 8)
    plan = [128 if i % 2 == 0 else 127 for i in range(40)] + [90] * 3
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon:
        for step, n_dead in enumerate(plan):
            with torch.no_grad():
                model[0].bias.fill_(100.0)
                model[0].bias[:n_dead] = -100.0
                pre = model[0](x)
            truth = int((pre <= 0).all(0).sum())
            assert truth == n_dead
            with mon.step(step):
                model(x)
            h = mon.health()["1"]
            assert h.dead_fraction == truth / 256 and h.evidence_steps == 1
    alerts = [(a.step, a.kind, a.recovered) for a in mon.alerts]
    # 128/256 = 50% enters; 127/256 (49.6%) is above release (0.8 x 50% = 40%): no recovery, no
    # second alert; 90/256 (35%) twice in a row: one recovery, and nothing on the third step
    assert alerts == [(0, "dead", False), (41, "dead", True)]


# -- 8. hooks are always removed ----------------------------------------------------------------


class _RaisingReLU(nn.ReLU):
    armed = False

    def forward(self, x):
        if self.armed:
            raise ValueError("inside an activation module")
        return super().forward(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = _RaisingReLU()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.fail = None

    def forward(self, x):
        h = F.relu(self.fc(x))  # functional: the TorchFunctionMode is on the stack
        if self.fail == "after_functional":
            raise RuntimeError("boom")
        h = self.act(h)
        return torch.sigmoid(self.inner(h))


def _assert_clean(model):
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
    assert not torch.overrides._get_current_function_mode_stack()
    if hasattr(torch._C, "_len_torch_function_stack"):
        assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("where", ["after_functional", "in_activation_module", "keyboard_interrupt", "nested_step"])
def test_hooks_and_the_function_mode_are_gone_after_a_failed_step(background, where):
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(16, 6)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=background)
    with mon:
        with mon.step(0):  # a good step first: functional activations discovered
            model(x)
        exc = {"keyboard_interrupt": KeyboardInterrupt, "nested_step": RuntimeError}.get(where, Exception)
        with pytest.raises(exc), mon.step(1):
            assert len(torch.overrides._get_current_function_mode_stack()) == 1  # the step's mode
            if where == "after_functional":
                model.fail = "after_functional"
                model(x)
            elif where == "in_activation_module":
                model.act.armed = True
                model(x)
            elif where == "keyboard_interrupt":
                model(x)
                raise KeyboardInterrupt
            else:
                with mon.step(2):  # nesting is refused; the outer step fails
                    model(x)
        assert not mon.in_step
        _assert_clean(model)
        model.fail, model.act.armed = None, False
        # the monitor keeps working and sees every layer, functional ones included, on the retried step
        with mon.step(1):
            model(x)
        _assert_clean(model)
        h = mon.health()
        assert list(h) == ["fc.relu", "act", "inner.1", "inner.sigmoid"]
        assert {n: v.step for n, v in h.items()} == dict.fromkeys(h, 1)
        with torch.no_grad():
            ref = torch.relu(model.fc(x))
        assert h["fc.relu"].rms == pytest.approx(float(ref.pow(2).mean().sqrt()), rel=1e-5)
    _assert_clean(model)


@pytest.mark.parametrize("nth", [1, 2, 5])
def test_a_ctrl_c_while_the_hooks_are_removed_leaves_no_hook_and_the_next_step_works(monkeypatch, nth):
    """A KeyboardInterrupt that lands in the n-th hook removal at the end of a sampled step."""
    import torch.utils.hooks as hooks_mod

    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(16, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    real = hooks_mod.RemovableHandle.remove
    calls = {"n": 0, "armed": False}

    def remove(self):  # type: ignore[no-untyped-def]
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == nth:
                raise KeyboardInterrupt
        return real(self)

    def step(s: int) -> None:
        with mon.step(s):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()

    with mon:
        step(0)
        monkeypatch.setattr(hooks_mod.RemovableHandle, "remove", remove)
        calls["armed"] = True
        with pytest.raises(KeyboardInterrupt):
            step(1)
        calls["armed"] = False
        assert calls["n"] >= nth and not mon.in_step
        _assert_clean(model)
        step(2)  # not refused as nested, and recorded
        h = mon.health()
        assert {n: v.step for n, v in h.items()} == dict.fromkeys(["fc.relu", "act", "inner.1", "inner.sigmoid"], 2)
        assert all(v.grad_rms is not None for v in h.values())
        _assert_clean(model)
    _assert_clean(model)


class _WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.act(F.relu(self.rnn(x)[0][:, -1])))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_the_model_made_inside_a_sampled_step_carries_no_monitor(how):
    """An EMA or best-model snapshot taken inside the step: the copy works, is never watched, and
    its own forwards (here with inputs 100x larger) never reach the monitor."""
    import io
    import pickle

    torch.manual_seed(0)
    model = _WithLSTM()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: the truth below holds
    x = torch.randn(16, 5, 6)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon:
        with mon.step(0):
            F.cross_entropy(model(x), torch.randint(0, 3, (16,))).backward()
            if how == "deepcopy":
                snapshot = copy.deepcopy(model)
            elif how == "pickle":
                data = pickle.dumps(model)
                assert b"monitor" not in data
                snapshot = pickle.loads(data)
            else:
                buf = io.BytesIO()
                torch.save(model, buf)
                assert b"monitor" not in buf.getvalue()  # loads where this package is not installed
                buf.seek(0)
                snapshot = torch.load(buf, weights_only=False)
            opt.step()
            opt.zero_grad()
        with mon.step(1):
            model(x)
            with torch.no_grad():
                snapshot(x * 100)
        with torch.no_grad():
            truth = model.act(F.relu(model.rnn(x)[0][:, -1]))
        assert mon.health()["act"].max_abs == pytest.approx(float(truth.abs().max()), rel=1e-6)
    if how == "deepcopy":
        _assert_clean(snapshot)  # what the copy got in place of the hooks took itself off at its first forward
    else:  # no-ops of the standard library, nothing of the monitor's
        hooks = [h for m in snapshot.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
        assert hooks and all(getattr(h, "__self__", None).__class__.__name__ == "nullcontext" for h in hooks)
    _assert_clean(model)


def test_a_watched_module_replaced_during_training_is_named_in_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to say while the model is as built
            for step in range(2):
                with mon.step(step):
                    model(torch.randn(4, 6))
        model[1] = nn.GELU()  # replaced after the monitor was built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2, 5):
                with mon.step(step):
                    model(torch.randn(4, 6))
    gone = [str(w.message) for w in caught if "no longer part of the model" in str(w.message)]
    assert len(gone) == 1 and "`1`" in gone[0], [str(w.message) for w in caught]
    h = mon.health()
    assert h["1"].step == 1 and h["3"].step == 4  # the other layer goes on
    _assert_clean(model)


class _FrozenBackbone(nn.Module):
    """A frozen eval-mode nn.TransformerEncoder (PyTorch's fused inference path) under a trainable
    head with a functional activation (the monitor's functional mode is active in every step)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.enc.requires_grad_(False)
        self.fc, self.out = nn.Linear(16, 32), nn.Linear(32, 1)

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        super().train(mode)
        self.enc.eval()
        return self

    def forward(self, x):
        return self.out(F.relu(self.fc(self.enc(x))))


def test_a_frozen_eval_mode_transformer_backbone_trains_bit_for_bit_as_without_the_monitor():
    """The functional mode on the stack made PyTorch skip the fused path of the eval-mode encoder
    (the weights drifted 1.5e-8 apart in 5 steps); it is off the stack while such a module runs."""

    def run(monitored: bool) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        model = _FrozenBackbone().train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False) if monitored else None
        g = torch.Generator().manual_seed(1)
        for step in range(5):
            x = torch.randn(4, 5, 16, generator=g)
            ctx = mon.step(step) if mon is not None else contextlib.nullcontext()
            with ctx:
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        health = mon.health() if mon is not None else {}
        if mon is not None:
            mon.close()
        _assert_clean(model)
        return [p.detach().clone() for p in model.parameters()], health

    plain, _ = run(False)
    watched, health = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))
    assert health["fc.relu"].step == 4  # the head's functional activation is still watched


def test_hooks_are_gone_when_on_alert_raise_fires_at_the_end_of_the_step():
    from monitor import ActivationAlertError

    model = _Net()
    with torch.no_grad():
        model.fc.bias.fill_(-100.0)
    mon = Monitor(model, every_n_steps=1, on_alert="raise")
    with pytest.raises(ActivationAlertError) as e, mon.step(0):
        model(torch.randn(128, 6))
    assert (e.value.alert.layer, e.value.alert.kind) == ("fc.relu", "dead")
    _assert_clean(model)
    mon.close()
    _assert_clean(model)


def test_an_unreferenced_unclosed_monitor_is_closed_and_writes_everything(tmp_path):
    """No reference from the monitor's parts back to it: when the user's last reference goes,
    ``__del__`` judges and writes the queued steps and ends the writer thread (no leak)."""
    import gc
    import weakref

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())

    def train():
        mon = Monitor(model, every_n_steps=1, logdir=tmp_path, on_alert="ignore")
        for s in range(30):
            with mon.step(s):
                model(torch.randn(16, 4))
        return weakref.ref(mon), mon._dispatcher._thread

    ref, thread = train()
    gc.collect()
    thread.join(timeout=30)
    assert ref() is None and not thread.is_alive()
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("activation_rms/1")] == list(range(30))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_closing_the_monitor_inside_its_own_alert_callback_does_not_hang():
    """The callback runs on the writer thread; close() there must not wait for that thread."""
    import time

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    holder = {}

    def on_alert(alert):
        mon = holder.pop("mon", None)
        if mon is not None:
            mon.close()

    mon = Monitor(model, every_n_steps=1, on_alert=on_alert)
    holder["mon"] = mon
    t0 = time.monotonic()
    with mon.step(0):
        model(torch.randn(16, 4))
    mon.flush()
    assert mon.closed and time.monotonic() - t0 < 10
    assert [a.kind for a in mon.alerts] == ["dead"]
