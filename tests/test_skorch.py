"""skorch integration: real skorch nets on the Wine data (small, CPU, fast)."""

from __future__ import annotations

import importlib.util
import inspect
import math
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("skorch")

from sklearn.base import clone
from sklearn.datasets import load_wine
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier
from skorch.callbacks import (
    Callback,
    TensorBoard,
)
from skorch.dataset import Dataset
from skorch.helper import predefined_split
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from integrations.skorch import ActivationMonitor
from monitor import ActivationAlertError, Monitor, MonitorWarning, Thresholds

ROOT = Path(__file__).resolve().parents[1]


class WineClassifier(nn.Module):
    def __init__(self, num_units: int = 20, dense0_bias: float | None = None) -> None:
        super().__init__()
        self.dense0 = nn.Linear(13, num_units)
        if dense0_bias is not None:
            nn.init.constant_(self.dense0.bias, dense0_bias)
        self.dense1 = nn.Linear(num_units, 10)
        self.output = nn.Linear(10, 3)

    def forward(self, X):
        X = self.dense0(X)
        X = self.dense1(F.relu(X))
        X = self.output(F.relu(X))
        return X


class Boom(Exception):
    """The user's exception."""


class Bomb(nn.Module):
    def forward(self, h):
        raise Boom(f"boom {h.shape[0]}")


class FailingWine(WineClassifier):
    """Raises ``Boom`` on the ``fail_at``-th training forward (0-based), in its own forward or in a
    submodule's. Records whether its ``__dict__`` holds a ``forward`` on every call."""

    def __init__(self, fail_at: int = 3, fail_in: str = "forward") -> None:
        super().__init__()
        self.fail_at = fail_at
        self.fail_in = fail_in
        self.calls = 0
        self.bomb = Bomb()
        self.forward_in_dict: list[bool] = []

    def forward(self, X):
        self.forward_in_dict.append("forward" in self.__dict__)
        if self.training:
            if self.calls == self.fail_at:
                self.calls += 1
                h = F.relu(self.dense0(X))  # a watched activation has run when it fails
                if self.fail_in == "submodule":
                    self.bomb(h)
                raise Boom(f"boom {h.shape[0]}")
            self.calls += 1
        return super().forward(X)


def _noop_hook(module, args, output):
    return None


class LateRootHook(Callback):
    """After ActivationMonitor: a user's forward hook on ``module_`` behind the monitor's, for each
    training batch; records the types of the root's forward hooks it finds there."""

    def __init__(self) -> None:
        self.handle = None
        self.seen: list[list[str]] = []

    def on_batch_begin(self, net, batch=None, training=None, **kwargs):
        if training:
            self.seen.append([type(h).__name__ for h in net.module_._forward_hooks.values()])
            self.handle = net.module_.register_forward_hook(_noop_hook)

    def on_batch_end(self, net, batch=None, training=None, **kwargs):
        if training:
            self.handle.remove()
            self.handle = None


@pytest.fixture(scope="module")
def wine():
    X, y = load_wine(return_X_y=True)
    X = X.astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train).astype(np.float32), y_train, scaler.transform(X_test).astype(np.float32), y_test


def make_net(callbacks, module=WineClassifier, max_epochs=20, **kw):
    params = {
        "module__num_units": 20,
        "criterion": nn.CrossEntropyLoss,
        "optimizer": torch.optim.Adam,
        "lr": 0.01,
        "max_epochs": max_epochs,
        "verbose": 0,
    }
    if module is not WineClassifier:
        params.pop("module__num_units")
    params.update(kw)
    return NeuralNetClassifier(module, callbacks=callbacks, **params)


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def assert_clean(module: nn.Module) -> None:
    assert hook_count(module) == 0
    assert "forward" not in module.__dict__
    assert torch._C._len_torch_function_stack() == 0


def read(logdir) -> EventAccumulator:
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    ea.Reload()
    return ea


# -- pathologies on the real Wine classifier -------------------------------------------------------


def test_dead_units_match_an_independent_hook(wine):
    """Monitor's dead units == units never > 0 over the last epoch's training forwards (own hook)."""
    X, y, _, _ = wine
    batch_size = 32
    per_epoch = math.ceil(len(X) / batch_size)  # 5
    torch.manual_seed(1)
    # A verdict over exactly one epoch: the most recent samples holding len(X) values, i.e. 5 batches.
    th = Thresholds(window=per_epoch, min_positions=len(X))
    cb = ActivationMonitor(every_n_steps=1, thresholds=th, on_alert="ignore")
    net = make_net([cb], batch_size=batch_size, train_split=None).initialize()
    fired: dict[str, list[np.ndarray]] = {"dense0": [], "dense1": []}

    def record(name):
        def hook(mod, args, out):
            if net.module_.training:  # training forwards only, judged with the weights of that moment
                fired[name].append((out.detach() > 0).any(0).numpy())

        return hook

    handles = [getattr(net.module_, n).register_forward_hook(record(n)) for n in fired]
    net.partial_fit(X, y)
    for h in handles:
        h.remove()

    assert len(fired["dense0"]) == 20 * per_epoch == cb.step_
    health = cb.health()
    assert list(health) == ["dense0.relu", "dense1.relu"]
    expected = {}
    for name in fired:
        ever = np.any(fired[name][-per_epoch:], axis=0)
        expected[name] = tuple(np.flatnonzero(~ever).tolist())
        assert health[f"{name}.relu"].dead_units == expected[name]
        assert health[f"{name}.relu"].dead_fraction == pytest.approx(len(expected[name]) / len(ever))
    assert expected["dense0"] == ()  # healthy settings: every dense0 unit fires on some training value
    assert expected["dense1"] == (2, 6)  # ...but two of dense1's units are dead (seed 1)
    assert not [a for a in cb.alerts if not a.recovered]
    assert net.history[-1, "activation_dead_fraction/dense1.relu"] == pytest.approx(0.2)
    assert_clean(net.module_)


def test_bad_bias_init_fires_dead_alert_at_first_sampled_step(wine):
    X, y, _, _ = wine
    torch.manual_seed(0)
    cb = ActivationMonitor(every_n_steps=5, on_alert="warn")
    net = make_net([cb], module__dense0_bias=-10.0, max_epochs=6)
    with pytest.warns(MonitorWarning, match="dead"):
        net.fit(X, y)
    dead = [a for a in cb.alerts if a.kind == "dead" and a.layer == "dense0.relu"]
    assert dead and dead[0].step == 0 and dead[0].value == 1.0
    assert cb.health()["dense0.relu"].dead_units == tuple(range(20))
    assert net.history[0, "activation_alerts"] >= 1
    assert net.history[:, "activation_dead_fraction_max"] == [1.0] * 6
    assert_clean(net.module_)


def test_on_alert_stop_ends_fit_like_early_stopping(wine):
    X, y, _, _ = wine
    torch.manual_seed(0)
    cb = ActivationMonitor(every_n_steps=1, on_alert="stop")
    net = make_net([cb], module__dense0_bias=-10.0, max_epochs=10)
    with pytest.warns(MonitorWarning, match="on_alert='stop': stopping training"):
        net.fit(X, y)
    assert len(net.history) == 1  # of max_epochs=10: stopped after the first epoch; on_train_end ran
    assert net.history[-1, "activation_alerts"] >= 1
    assert cb.monitor_ is None  # closed by on_train_end
    assert_clean(net.module_)
    net.predict(X)  # the net is usable


def test_on_alert_raise(wine):
    X, y, _, _ = wine
    torch.manual_seed(0)
    cb = ActivationMonitor(every_n_steps=1, on_alert="raise")
    net = make_net([cb], module__dense0_bias=-10.0, max_epochs=3)
    with pytest.raises(ActivationAlertError, match="dense0.relu"):
        net.fit(X, y)
    assert cb.monitor_ is None
    assert_clean(net.module_)


# -- what is sampled -------------------------------------------------------------------------------


def test_validation_batches_are_never_sampled(wine):
    """Huge validation inputs would explode every statistic; training stats are unchanged by them."""
    X, y, _, _ = wine
    X_valid = (X[:40] * 1e5).astype(np.float32)  # max |activation| would be ~1e5 > max_abs 1e4

    def run(train_split):
        torch.manual_seed(3)
        cb = ActivationMonitor(every_n_steps=1, on_alert="ignore")
        net = make_net([cb], max_epochs=3, batch_size=64, train_split=train_split, iterator_train__shuffle=False)
        net.fit(X, y)
        return net, cb

    plain_net, plain = run(None)
    valid_net, valid = run(predefined_split(Dataset(X_valid, y[:40])))
    assert "valid_loss" in valid_net.history[-1]
    assert valid.step_ == plain.step_ == 3 * 3  # training batches only
    assert not valid.alerts  # no "exploding" from the validation data
    for name, h in plain.health().items():
        v = valid.health()[name]
        assert (v.rms, v.max_abs, v.dead_units, v.step) == (h.rms, h.max_abs, h.dead_units, h.step)
        assert v.max_abs < 100
    for key in ("activation_dead_fraction_max", "activation_dead_fraction/dense0.relu"):
        assert valid_net.history[:, key] == plain_net.history[:, key]


def test_history_keys_on_every_epoch_and_step_counter(wine):
    X, y, _, _ = wine
    torch.manual_seed(0)
    cb = ActivationMonitor(every_n_steps=7, on_alert="ignore")  # 5 batches/epoch: some epochs unsampled
    net = make_net([cb], max_epochs=4, batch_size=32, train_split=None)
    net.fit(X, y)
    assert cb.step_ == 20
    samples = net.history[:, "activation_samples"]
    assert samples == [1, 1, 1, 0]  # steps 0, 7, 14 sampled; epoch 4 (steps 15-19) not
    for key in (
        "activation_alerts",
        "activation_dead_fraction_max",
        "activation_saturated_fraction_max",
        "activation_nonfinite",
        "activation_dead_fraction/dense0.relu",
        "activation_dead_fraction/dense1.relu",
    ):
        assert len(net.history[:, key]) == 4, key
    # an unsampled epoch carries the latest sampled values over
    assert net.history[3, "activation_dead_fraction/dense1.relu"] == net.history[2, "activation_dead_fraction/dense1.relu"]
    assert all(math.isnan(v) for v in net.history[:, "activation_saturated_fraction_max"])  # no bounded layer

    # partial_fit continues the step counter, the run and the detector state
    alerts_before = list(cb.alerts)
    net.partial_fit(X, y, epochs=2)
    assert cb.step_ == 30
    assert len(net.history) == 6
    assert net.history[-2:, "activation_samples"] == [1, 1]  # steps 21, 28
    assert cb.health()["dense0.relu"].step == 28
    # the earlier alerts are kept, and the healthy run raises no new one
    assert cb.alerts[: len(alerts_before)] == alerts_before and cb.alerts[len(alerts_before) :] == []


def test_hooks_follow_module_(wine):
    X, y, _, _ = wine
    seen = []

    class Probe(Callback):  # runs after ActivationMonitor: sees the hooks of a sampled step
        def on_batch_begin(self, net, batch=None, training=None, **kwargs):
            if training and cb.monitor_ is not None and cb.monitor_.in_step:
                seen.append((net.module_, cb.monitor_.model, hook_count(net.module_)))

    torch.manual_seed(0)
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore")
    net = make_net([cb, Probe()], max_epochs=2, batch_size=64, train_split=None)
    net.fit(X, y)
    first = net.module_
    assert_clean(first)
    assert seen and all(m is first and watched is first and n > 0 for m, watched, n in seen)

    seen.clear()
    net.initialize()  # a new module_ (and a reset callback)
    second = net.module_
    assert second is not first
    net.partial_fit(X, y)
    assert cb.step_ == 2 * 3
    assert seen and all(m is second and watched is second and n > 0 for m, watched, n in seen)
    assert_clean(first)
    assert_clean(second)

    seen.clear()
    net.set_params(warm_start=True)
    steps = cb.step_
    net.fit(X, y)  # warm start: same module, the step counter goes on
    assert net.module_ is second and cb.step_ == steps + 2 * 3
    assert seen and all(m is second for m, _, _ in seen)
    assert_clean(second)

    seen.clear()
    net.set_params(warm_start=False)
    net.fit(X, y)  # a new fit: new module, steps from 0
    third = net.module_
    assert third is not second and cb.step_ == 6
    assert seen and all(m is third and watched is third for m, watched, _ in seen)
    for m in (first, second, third):
        assert_clean(m)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def fail_fit(net, cb, late, X, y):
    """fit until the sampled step 3 raises; check the user's exception and what is left behind."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Boom, match="boom 64") as info:  # not torch's "OrderedDict mutated ..."
            net.fit(X, y)
    assert info.type is Boom
    assert not [w for w in caught if "always_call" in str(w.message)]  # no hook failed in torch's except path
    root = net.module_
    assert cb.step_ == 4  # batches 0..3 started; 3 raised inside a sampled step
    assert cb.monitor_ is not None and not cb.monitor_.in_step
    assert torch._C._len_torch_function_stack() == 0
    assert net.history[:, "activation_samples"] == [3]  # epoch 1 complete, epoch 2 interrupted
    # during every sampled step the root's forward hooks were the guard alone (plus the user's)
    assert late.seen and all(seen == ["StepGuard"] for seen in late.seen)
    late.seen.clear()
    assert root.forward_in_dict == [False] * 4 and "forward" not in root.__dict__
    for name, m in root.named_modules():
        if name:
            assert all(not getattr(m, d) for d in _HOOK_DICTS), name
    late.handle.remove()  # the user's own hook (its on_batch_end never ran)
    late.handle = None
    assert all(not getattr(root, d) for d in _HOOK_DICTS if "_forward_hooks" not in d)
    # the root holds at most the spent guard: nothing of the core, nothing that still does work
    left = list(root._forward_hooks.values())
    assert len(left) <= 1
    if left:
        assert left[0] is cb.guard_ and left[0].callback is None and not left[0].absorbed
    return root


@pytest.mark.parametrize("fail_in", ["forward", "submodule"])
# functional: the core hooks the root too (producer tracking); dense* modules only: it does not at step 3
@pytest.mark.parametrize("options", [{}, {"functional": False, "include": "dense*"}], ids=["functional", "modules"])
def test_forward_that_raises(wine, options, fail_in):
    X, y, _, _ = wine
    cb = ActivationMonitor(every_n_steps=1, on_alert="ignore", **options)
    late = LateRootHook()
    net = make_net(
        [cb, late],
        module=FailingWine,
        module__fail_at=3,
        module__fail_in=fail_in,
        max_epochs=5,
        batch_size=64,
        train_split=None,
    )

    # 1. the module's next forward takes the spent guard off
    first = fail_fit(net, cb, late, X, y)
    net.predict(X)
    assert_clean(first)
    assert cb.step_ == 4 and not cb.monitor_.in_step

    # 2. so does pickling; the pickled copy holds at most a spent guard, gone after its next forward
    second = fail_fit(net, cb, late, X, y)
    assert second is not first
    copy = pickle.loads(pickle.dumps(net))
    assert_clean(second)
    assert len(copy.module_._forward_hooks) <= 1
    copy.predict(X)
    assert_clean(copy.module_)

    # 3. so does a new fit (net.initialize() re-initialises the callback), which trains normally
    third = fail_fit(net, cb, late, X, y)
    net.set_params(module__fail_at=10_000)
    net.fit(X, y)
    assert_clean(third)
    assert_clean(net.module_)
    assert net.module_.forward_in_dict and not any(net.module_.forward_in_dict)
    assert late.seen and all(seen == ["StepGuard"] for seen in late.seen)
    assert net.history[:, "activation_samples"] == [3] * 5


def test_root_forward_hooks_of_the_core_run_inside_the_step(wine, monkeypatch):
    """Robust to a core that hooks ``module_`` itself: such a hook runs once per sampled forward,
    before the step ends, and is never in the root's hook dict when a forward raises."""
    X, y, _, _ = wine
    calls = []
    begin_step, end_step = Monitor.begin_step, Monitor.end_step

    def begin(self, step):
        sampled = begin_step(self, step)
        if sampled:
            self._test_root_handle = self.model.register_forward_hook(lambda m, a, o: calls.append(self.in_step))
        return sampled

    def end(self, failed=False):
        handle = self.__dict__.pop("_test_root_handle", None)
        if handle is not None:
            handle.remove()
        end_step(self, failed)

    monkeypatch.setattr(Monitor, "begin_step", begin)
    monkeypatch.setattr(Monitor, "end_step", end)
    cb = ActivationMonitor(every_n_steps=2, on_alert="ignore")
    late = LateRootHook()
    net = make_net(
        [cb, late], module=FailingWine, module__fail_at=10_000, max_epochs=2, batch_size=64, train_split=None
    )
    net.fit(X, y)
    assert calls == [True] * 3  # steps 0, 2, 4: once each, while the step was open
    assert_clean(net.module_)

    calls.clear()
    net.set_params(module__fail_at=2)
    late.seen.clear()
    with pytest.raises(Boom):
        net.fit(X, y)
    assert calls == [True]  # step 0; step 2 raised: a plain hook is not called then (as in torch)
    late.handle.remove()
    assert len(net.module_._forward_hooks) <= 1 and not cb.monitor_.in_step
    net.predict(X)
    assert_clean(net.module_)


# -- sklearn contract: clone, GridSearchCV, pickle, parameters -------------------------------------


def test_init_stores_arguments_and_initialize_validates():
    th = Thresholds(window=3)
    cb = ActivationMonitor(every_n_steps=0, thresholds=th, on_alert="boom", logdir=123)
    assert cb.every_n_steps == 0 and cb.thresholds is th and cb.on_alert == "boom" and cb.logdir == 123
    params = cb.get_params()
    assert params["thresholds"] is th and "monitor_" not in params
    with pytest.raises(ValueError, match=r"every_n_steps.*got 0"):
        cb.initialize()
    for kwargs, err, match in [
        ({"on_alert": "boom"}, ValueError, r"on_alert.*'boom'"),
        ({"thresholds": {"window": 3}}, TypeError, "thresholds"),
        ({"images_every_n_samples": -1}, ValueError, r"images_every_n_samples.*-1"),
        ({"timeline_length": 1}, ValueError, r"timeline_length.*1"),
        ({"histograms": "yes"}, TypeError, r"histograms.*'yes'"),
        ({"include": 3}, TypeError, "include"),
        ({"new_run_per_fit": 1}, TypeError, r"new_run_per_fit.*True or False"),
        ({"detectors": [object()]}, TypeError, r"detectors.*monitor.Detector"),
    ]:
        with pytest.raises(err, match=match):
            ActivationMonitor(**kwargs).initialize()
    writer = SummaryWriter.__new__(SummaryWriter)  # not opened: only its type matters
    with pytest.raises(TypeError, match="new_run_per_fit=False"):
        ActivationMonitor(logdir=writer).initialize()
    for name, fn in inspect.getmembers(ActivationMonitor, inspect.isfunction):
        if name.startswith("on_"):
            kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
            assert inspect.Parameter.VAR_KEYWORD in kinds, name


def test_clone_gridsearch_and_pickle(wine, tmp_path):
    X, y, X_test, _ = wine
    torch.manual_seed(0)
    cb = ActivationMonitor(every_n_steps=2, logdir=tmp_path / "grid", on_alert="ignore")
    net = make_net([cb], max_epochs=2, batch_size=64, train_split=None)

    twin = clone(net)
    twin_cb = twin.callbacks[0]
    assert twin_cb is not cb and twin_cb.get_params() == cb.get_params()

    search = GridSearchCV(net, {"lr": [0.01, 0.02]}, cv=2, refit=False, scoring="accuracy")
    search.fit(X, y)
    runs = sorted(p for p in (tmp_path / "grid").iterdir())
    assert [p.name for p in runs] == ["run-000", "run-001", "run-002", "run-003"]  # 4 fits, none clobbered
    for run in runs:
        events = list(run.glob("events.out.tfevents.*"))
        assert len(events) == 1
        assert "activation_dead_fraction/dense0.relu" in read(run).Tags()["scalars"]
    assert not hasattr(cb, "monitor_")  # the grid search trained clones only

    net.fit(X, y)
    assert cb.run_dir_ == str(tmp_path / "grid" / "run-004")
    health = cb.health()
    state = cb.__getstate__()
    assert state["monitor_"] is None and state["guard_"] is None
    blob = pickle.dumps(net)
    net2 = pickle.loads(blob)
    cb2 = dict(net2.callbacks_)["ActivationMonitor"]
    assert cb2.monitor_ is None and cb2.health() == health and cb2.step_ == cb.step_
    assert (net2.predict(X_test) == net.predict(X_test)).all()
    assert_clean(net2.module_)
    net2.partial_fit(X, y, epochs=1)  # resumes into the same run directory, steps go on
    assert cb2.step_ == cb.step_ + 3 and cb2.run_dir_ == cb.run_dir_
    assert_clean(net2.module_)


# -- TensorBoard: beside skorch's own callback ------------------------------------------------------


def test_beside_skorch_tensorboard_callback(wine, tmp_path):
    X, y, _, _ = wine
    logdir = tmp_path / "tb"
    torch.manual_seed(0)
    cb = ActivationMonitor(every_n_steps=1, logdir=logdir, new_run_per_fit=False, images_every_n_samples=2)
    net = make_net([TensorBoard(SummaryWriter(str(logdir))), cb], max_epochs=3, batch_size=64)
    net.fit(X, y)
    assert cb.run_dir_ == str(logdir)
    ea = read(logdir)  # one run, two event files
    scalars = ea.Tags()["scalars"]
    assert "Loss/train_loss" in scalars and "Loss/valid_loss" in scalars  # skorch's
    assert "activation_dead_fraction/dense0.relu" in scalars and "activation_rms/dense1.relu" in scalars
    assert [e.step for e in ea.Scalars("activation_rms/dense0.relu")] == list(range(cb.step_))
    images = ea.Tags()["images"]
    assert "activation_scan" in images and "activation_timeline/dense0.relu" in images

    # default: a fresh run directory under the same base, beside skorch's run
    cb2 = ActivationMonitor(every_n_steps=1, logdir=logdir)
    net2 = make_net([TensorBoard(SummaryWriter(str(logdir / "skorch"))), cb2], max_epochs=2, batch_size=64)
    net2.fit(X, y)
    assert Path(cb2.run_dir_).parent == logdir and Path(cb2.run_dir_).name.startswith("run-")
    assert "activation_rms/dense0.relu" in read(cb2.run_dir_).Tags()["scalars"]


# -- packaging and the example ----------------------------------------------------------------------


def test_missing_skorch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "skorch", None)
    monkeypatch.setitem(sys.modules, "skorch.callbacks", None)
    spec = importlib.util.spec_from_file_location("_skorch_integration_copy", ROOT / "integrations" / "skorch.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=r"pip install 'activation-monitor\[skorch\]'"):
        spec.loader.exec_module(module)


def test_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("wine_skorch_example", ROOT / "examples" / "wine_skorch.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    good = example.main(["--logdir", str(tmp_path), "--epochs", "6"])
    assert not good["alerts"] and set(good["health"]) == {"dense0.relu", "dense1.relu"}
    bad = example.main(["--bad", "--logdir", str(tmp_path), "--epochs", "6"])
    first = bad["alerts"][0]
    assert first.kind == "dead" and first.layer == "dense0.relu" and first.step == 0
    assert bad["dense0_dead"] == list(range(20))
    out = capsys.readouterr().out
    assert "dense0: dead units" in out and str(tmp_path) in out
    images = read(bad["run_dir"]).Tags()["images"]
    assert "activation_probe/dense0.relu" in images and "activation_scan" in images
    assert good["run_dir"] != bad["run_dir"]


# -- small batches: numbers over the evidence seen, from the first sampled step ---------------------


class PartlyDeadWine(WineClassifier):
    """Units 0 and 1 of dense0 can never fire (bias -100)."""

    def __init__(self) -> None:
        super().__init__(num_units=20)
        with torch.no_grad():
            self.dense0.bias[:2] = -100.0


def test_small_batches_report_the_truth_over_the_values_seen_and_history_has_dormant(wine):
    X, y, _, _ = wine
    torch.manual_seed(0)
    seen = {}

    class FirstBatch(Callback):
        def on_batch_begin(self, net, batch=None, training=None, **kwargs):
            if training and "x" not in seen:  # the test's own record of the first training batch
                seen["x"] = batch[0].clone()
                with torch.no_grad():
                    seen["z"] = net.module_.dense0(seen["x"])

    cb = ActivationMonitor(every_n_steps=1000, on_alert="ignore")
    net = make_net([FirstBatch(), cb], module=PartlyDeadWine, max_epochs=1, batch_size=4, train_split=None)
    net.fit(X, y)
    truth = (seen["z"] > 0).sum(0) == 0  # units silent on the 4 values of step 0
    h = cb.health()["dense0.relu"]
    assert h.step == 0 and (h.evidence_values, h.evidence_steps) == (4, 1)
    assert h.dead_units == tuple(np.flatnonzero(truth.numpy()).tolist()) and {0, 1} <= set(h.dead_units)
    assert h.dead_fraction == pytest.approx(truth.float().mean().item())
    assert net.history[-1, "activation_dead_fraction/dense0.relu"] == pytest.approx(h.dead_fraction)
    assert not math.isnan(net.history[-1, "activation_dormant_fraction_max"])
    assert [a for a in cb.alerts if a.kind == "dead" and a.layer == "dense0.relu"] == []  # 2/20 < 50%


class _FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, X):
        return F.softmax(self.fc2(torch.relu(self.fc1(X))), dim=-1)


def test_a_users_function_mode_around_the_forward_is_left_alone():
    """The monitor's functional mode ends after a sampled forward; a `with torch.device("meta")`
    (a TorchFunctionMode of the user's) entered around that forward must stay the active mode
    until the user leaves it. `mode.__exit__` pops whatever is on top: it used to pop the user's."""
    from torch.overrides import _get_current_function_mode_stack

    seen = []

    class MetaInfer(NeuralNetClassifier):
        def infer(self, x, **fit_params):
            with torch.device("meta"):
                out = super().infer(x, **fit_params)
                seen.append(([type(m).__name__ for m in _get_current_function_mode_stack()], torch.empty(1).device.type))
            return out

    X = np.random.RandomState(0).randn(64, 8).astype("float32")
    y = (X[:, 0] > 0).astype("int64")
    cb = ActivationMonitor(every_n_steps=1, on_alert="ignore")
    net = MetaInfer(_FunctionalNet, max_epochs=1, batch_size=32, train_split=None, verbose=0, callbacks=[("am", cb)])
    net.fit(X, y)
    assert seen == [(["DeviceContext"], "meta")] * 2
    assert _get_current_function_mode_stack() == []
    assert set(cb.health_) == {"fc1.relu"}  # the functional relu was watched


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)

    def forward(self, X):
        from torch.utils.checkpoint import checkpoint

        X = X.requires_grad_()  # reentrant checkpointing needs an input that requires grad
        return F.softmax(self.out(checkpoint(lambda t: self.act(self.fc(t)), X, use_reentrant=True)), dim=-1)


def test_reentrant_checkpointing_gives_the_gradients_in_skorch_too():
    """skorch stops watching forwards when the forward ends; the layers of a reentrant checkpoint
    are re-run inside backward, and only there do their outputs get a graph: the hooks stay for
    that re-run (new forwards ignored), so `grad_rms` is the gradient of the output, once per batch."""
    torch.manual_seed(0)
    X = np.random.RandomState(0).randn(64, 8).astype("float32")
    y = (X[:, 0] > 0).astype("int64")
    truth: list[torch.Tensor] = []

    def keep(module, args, out):
        if out.requires_grad:  # the re-run inside backward
            out.register_hook(lambda g: truth.append(g.detach().clone()))

    cb = ActivationMonitor(every_n_steps=1, on_alert="ignore")
    net = NeuralNetClassifier(_Checkpointed, max_epochs=1, batch_size=32, train_split=None, verbose=0, callbacks=[("am", cb)])
    net.initialize()
    net.module_.act.register_forward_hook(keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.partial_fit(X, y)
    h = cb.health_["act"]
    assert len(truth) == 2  # one gradient per batch
    assert h.grad_rms == pytest.approx(float(truth[-1].pow(2).mean().sqrt()), rel=1e-5)
    assert h.evidence_values == 64  # two batches of 32, each counted once (the re-runs are not counted)


def test_a_compiled_net_keeps_one_monitor_and_one_run(tmp_path, wine):
    """``NeuralNet(compile=True)``: ``module_`` is the compiler's wrapper of the module the monitor
    watches; that is not a replaced module (it started a new monitor and run on every batch)."""
    from skorch.callbacks import Callback

    X, y, _, _ = wine
    cb = ActivationMonitor(every_n_steps=5, logdir=tmp_path, on_alert="ignore")
    monitors = []

    class Seen(Callback):
        def on_batch_end(self, net, **kwargs):  # type: ignore[no-untyped-def]
            if kwargs.get("training"):
                monitors.append(id(cb.monitor_))

    net = make_net([cb, Seen()], max_epochs=2, compile=True, compile__backend="eager", batch_size=64)
    net.fit(X, y)
    assert len(monitors) > 2 and len(set(monitors)) == 1
    assert type(net.module_).__name__ == "OptimizedModule"
    assert [p.name for p in tmp_path.iterdir()] == ["run-000"]
    batches = 2 * math.ceil(len(X) * 0.8 / 64)  # skorch's default 80% train split
    assert cb.step_ == batches
    assert {n: h.step for n, h in cb.health().items()} == dict.fromkeys(cb.health(), (batches - 1) // 5 * 5)
    events = list((tmp_path / "run-000").glob("events.out.tfevents.*"))
    assert len(events) == 1
