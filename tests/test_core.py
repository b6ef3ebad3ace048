"""The Monitor's contract: selection, hooks, host syncs, robustness, persistence."""

import gc
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import Encoder, SmallCNN, StructuredOutputs, WineClassifier, mlp
from torch import nn

from monitor import ActivationAlertError, Alert, Monitor, MonitorWarning, Sink


def hook_counts(model: nn.Module) -> list[tuple[int, int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]


def one_step(mon, model, x, step=0):
    with mon.step(step):
        return model(x)


# -- construction errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"every_n_steps": 0}, ValueError, "Expected `every_n_steps` to be a positive integer, got 0."),
        ({"every_n_steps": 2.5}, ValueError, "got 2.5"),
        ({"on_alert": "explode"}, ValueError, "'warn', 'raise', 'ignore', 'stop' or a callable, got 'explode'"),
        ({"writer": "runs/oops"}, TypeError, "got the path 'runs/oops'; pass a directory as `logdir=`"),
        ({"logdir": 123}, TypeError, "Expected `logdir` to be None or a directory path (str or os.PathLike), got 123."),
        ({"sinks": [object()]}, TypeError, "Expected `sinks` to hold monitor.Sink objects"),
        ({"sinks": "x"}, TypeError, "Expected `sinks` to be None or a sequence of monitor.Sink objects, got 'x'."),
        ({"histograms": "yes"}, TypeError, "Expected `histograms` to be True or False, got 'yes'."),
        ({"include": "dense9*"}, ValueError, "Close names: dense1, dense0."),
        ({"exclude": ["nope"]}, ValueError, "`exclude` pattern 'nope' matches no module name"),
        ({"include": 3}, TypeError, "`include` to be None, a glob pattern string or a sequence"),
        ({"thresholds": {"window": 3}}, TypeError, "monitor.Thresholds"),
        ({"logdir": "x", "writer": object()}, ValueError, "either `logdir` or `writer`"),
    ],
)
def test_bad_input_is_rejected_at_construction(kwargs, exc, needle):
    with pytest.raises(exc) as e:
        Monitor(WineClassifier(), **kwargs)
    assert needle in str(e.value)


def test_numpy_integers_are_accepted_and_kept_as_python_ints():
    """``np.int64`` from a config or a grid search, as ``step()`` takes them; a bool never."""
    mon = Monitor(WineClassifier(), every_n_steps=np.int64(5), images_every_n_samples=np.int32(3))
    assert type(mon.every_n_steps) is int and mon.every_n_steps == 5
    assert type(mon.state_dict()["every_n_steps"]) is int  # checkpoints load with weights_only=True
    with pytest.raises(ValueError, match="got np.True_"):
        Monitor(WineClassifier(), every_n_steps=np.bool_(True))


@pytest.mark.parametrize(
    "state, needle",
    [
        ({"version": 2}, "incomplete or damaged: KeyError('samples')"),
        ({"version": 2, "samples": "x", "auto_step": 0, "last_sampled": None}, "incomplete or damaged"),
        ({"version": 2, "samples": 1, "auto_step": 0, "last_sampled": None}, "its layers could not be read"),
        ({"version": 2, "samples": 1, "auto_step": 0, "last_sampled": None, "order": ["x"], "alerts": []}, "its layers"),
        (
            {"version": 2, "samples": 1, "auto_step": 0, "last_sampled": None, "order": ["x"], "alerts": [], "layers": {"x": {"window": []}}},
            "its layers could not be read: KeyError('active')",
        ),
    ],
)
def test_a_damaged_state_dict_is_refused_with_a_clear_error(state, needle):
    model = WineClassifier()
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon.step(0):
        model(torch.randn(8, 13))
    before = mon.state_dict()
    with pytest.raises(ValueError, match="Expected a state dict saved by Monitor.state_dict") as e:
        mon.load_state_dict(state)
    assert needle in str(e.value)
    after = mon.state_dict()
    assert (after["samples"], after["order"], after["alerts"], sorted(after["layers"])) == (
        before["samples"], before["order"], before["alerts"], sorted(before["layers"])
    )  # unchanged
    with mon.step(1):  # and it goes on
        model(torch.randn(8, 13))
    assert mon.state_dict()["samples"] == 2


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="Expected `model` to be a torch.nn.Module, got function"):
        Monitor(lambda x: x)


@pytest.mark.parametrize("bad", [10.0, "3", True, torch.tensor(3.0), torch.tensor(True), torch.tensor([3])])
def test_a_step_that_is_not_an_int_is_named(bad):
    mon = Monitor(WineClassifier(), every_n_steps=1)
    with pytest.raises(TypeError, match=r"Expected `step` to be an int \(or None for the next one\), got"):
        mon.step(bad)
    assert not mon.in_step and mon.health() == {}


def test_numpy_and_tensor_integer_steps_count_as_their_value():
    """A loop over `np.arange(...)` or a step counter kept in a tensor: sampled by value."""
    import numpy as np

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    mon = Monitor(model, every_n_steps=5, on_alert="ignore")
    with mon:
        for step in np.arange(3, 11):
            with mon.step(step):
                model(torch.randn(16, 4))
        sampled = mon.health()["1"].step
        with mon.step(torch.tensor(15)):
            model(torch.randn(16, 4))
        assert mon.health()["1"].step == 15 and type(mon.health()["1"].step) is int
    assert sampled == 10 and type(sampled) is int


# -- what is watched ----------------------------------------------------------------------------


def test_wine_functional_relus_are_watched_out_of_the_box():
    model = WineClassifier()
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon:
        one_step(mon, model, torch.randn(32, 13))
    assert mon.layers == ["dense0.relu", "dense1.relu"]
    assert mon.health()["dense0.relu"].units == 20


def test_default_selection_modules_functional_and_blocks():
    model = Encoder()
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon:
        one_step(mon, model, torch.randint(0, 50, (4, 16)))
    # TransformerEncoderLayer calls its activation functionally (F.gelu) inside torch code;
    # each block's output (the residual stream) is watched too.
    assert mon.layers == ["blocks.0.linear1.gelu", "blocks.0", "blocks.1.linear1.gelu", "blocks.1"]
    h = mon.health()
    assert h["blocks.0"].kind == "block" and h["blocks.0"].units == 32
    assert h["blocks.0.linear1.gelu"].units == 128


def test_include_exclude_by_name_type_and_functional_name():
    model = mlp(act=nn.Tanh)
    with Monitor(model, every_n_steps=1, include=["Tanh"], exclude="act1", on_alert="ignore") as mon:
        one_step(mon, model, torch.randn(8, 13))
    assert mon.layers == ["act0"]
    model = WineClassifier()
    with Monitor(model, every_n_steps=1, include="dense0.*", on_alert="ignore") as mon:
        one_step(mon, model, torch.randn(8, 13))
    assert mon.layers == ["dense0.relu"]
    with Monitor(model, every_n_steps=1, include="dense1", on_alert="ignore") as mon:  # a Linear
        one_step(mon, model, torch.randn(8, 13))
    assert mon.layers == ["dense1"] and mon.health()["dense1"].kind == "module"


def test_activation_modules_are_not_double_counted_as_functional():
    model = mlp()  # nn.ReLU modules call F.relu internally
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon:
        one_step(mon, model, torch.randn(8, 13))
    assert mon.layers == ["act0", "act1"]


def test_units_are_channels_for_convolutions_and_features_for_sequences():
    model = SmallCNN()
    conv1d = nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU())
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon:
        one_step(mon, model, torch.randn(2, 3, 8, 8))
    assert [h.units for h in mon.health().values()] == [8, 16]
    with Monitor(conv1d, every_n_steps=1, on_alert="ignore") as mon:
        one_step(mon, conv1d, torch.randn(2, 3, 10))
    assert mon.health()["1"].units == 5  # (N, C, L): channels


def test_structured_outputs_and_functional_tanh_sigmoid():
    model = StructuredOutputs()
    with Monitor(model, every_n_steps=1, on_alert="ignore", include=["*"]) as mon:
        one_step(mon, model, torch.randn(8, 4))
    kinds = {n: h.kind for n, h in mon.health().items()}
    assert kinds["a.tanh"] == "tanh" and kinds["b.relu"] == "relu" and kinds["sigmoid"] == "sigmoid"


# -- hooks only on sampled steps, always removed --------------------------------------------------


def test_hooks_exist_only_inside_sampled_steps_and_model_is_left_as_found():
    model = WineClassifier()
    before = hook_counts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mon = Monitor(model, every_n_steps=5, on_alert="ignore").attach()
    with mon.step(1):  # not sampled
        assert hook_counts(model) == before
        model(torch.randn(4, 13))
    with mon.step(5):
        assert hook_counts(model) != before
        model(torch.randn(4, 13))
    assert hook_counts(model) == before
    mon.close()
    assert hook_counts(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.overrides._get_current_function_mode_stack()


def test_hooks_removed_when_the_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            F.relu(self.fc(x))
            self.act(x)
            raise RuntimeError("boom")

    model = Boom()
    before = hook_counts(model)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore").attach()
    with pytest.raises(RuntimeError, match="boom"), mon.step(0):
        model(torch.randn(2, 3))
    assert hook_counts(model) == before
    assert not torch.overrides._get_current_function_mode_stack()
    assert mon.health() == {}  # nothing half-recorded
    with mon.step(1):  # and the monitor keeps working
        mon.model.act(mon.model.fc(torch.randn(2, 3)))
    assert list(mon.health()) == ["act"]
    mon.close()


def test_non_sampled_steps_run_no_monitor_code(monkeypatch):
    model = mlp()
    mon = Monitor(model, every_n_steps=10, on_alert="ignore").attach()
    calls = []
    monkeypatch.setattr(Monitor, "_begin", lambda self, step: calls.append(step))
    monkeypatch.setattr(Monitor, "_end", lambda self, failed: None)
    for step in range(1, 10):
        with mon.step(step):
            model(torch.randn(2, 13))
    assert calls == []
    with mon.step(10):
        pass
    assert calls == [10]


@pytest.mark.parametrize("background", [True, False])
def test_no_host_sync_inside_hooks_and_one_transfer_per_sampled_step(monkeypatch, background):
    import threading

    model = Encoder()
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=background).attach()
    x = torch.randint(0, 50, (4, 16))
    one_step(mon, model, x, 0)  # discovery step
    mon.flush()
    events: list[str] = []
    in_forward = {"on": False}
    main = threading.current_thread()
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _n=name, _o=original, **k):
            where = "forward:" if in_forward["on"] else "exit:" if threading.current_thread() is main else "writer:"
            events.append(where + _n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for step in (1, 2):
        with mon.step(step):
            in_forward["on"] = True
            model(x)
            in_forward["on"] = False
    mon.flush()  # the writer thread judges the queued steps while the spies are in place
    monkeypatch.undo()
    assert [e for e in events if e.startswith("forward:")] == []
    if background:
        # Nothing touches the host on the training thread; the writer thread reads the CPU
        # partials (and the copies of small outputs, reduced there) as numpy views: no kernel.
        assert [e for e in events if e.startswith("exit:")] == []
        writer = [e for e in events if e.startswith("writer:")]
        assert len(writer) >= 2 and set(writer) == {"writer:numpy"}
    else:
        # CPU tensors: the one "transfer" is a numpy view of the concatenated partials (and views
        # of the copies of small outputs)
        exits = [e for e in events if e.startswith("exit:")]
        assert len(exits) >= 2 and set(exits) == {"exit:numpy"}
    assert not any(e.split(":")[1] in ("item", "tolist", "__bool__") for e in events)
    mon.close()


# -- robustness ----------------------------------------------------------------------------------


def test_a_module_called_twice_in_a_step_is_one_layer_over_both_calls():
    class TwiceReLU(nn.Module):  # one nn.ReLU module applied to two different tensors
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1, self.act = nn.Linear(6, 8), nn.Linear(8, 8), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc1(self.act(self.fc0(x))))

    torch.manual_seed(0)
    model = TwiceReLU()
    with torch.no_grad():
        model.fc0.bias[:3] = -100.0  # units 0..2 dead in the first call only
        model.fc1.bias[2:5] = -100.0  # units 2..4 dead in the second call only
        model.fc1.weight[7] *= 1e3  # a large unit in the second call
    x = torch.randn(200, 6)
    mon = Monitor(model, every_n_steps=1, include="act", on_alert="ignore", background=False)
    with mon:
        one_step(mon, model, x)
        h = mon.health()["act"]
    with torch.no_grad():  # independent reference: both calls' outputs side by side
        a = torch.relu(model.fc0(x))
        b = torch.relu(model.fc1(a))
    both = torch.cat([a, b])
    dead = [u for u in range(8) if not (both[:, u] > 0).any()]
    assert dead == [2]  # dead in both calls; units 0, 1, 3, 4 fired in one of them
    assert list(h.dead_units) == dead
    assert h.max_abs == pytest.approx(float(both.max()), rel=1e-5)
    assert h.rms == pytest.approx(float(both.pow(2).mean().sqrt()), rel=1e-4)
    assert h.firing_rate == pytest.approx(float((both > 0).float().mean()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_activations(dtype):
    model = mlp(act=nn.Tanh).to(dtype)
    x = torch.randn(64, 13, dtype=dtype)
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon:
        one_step(mon, model, x)
    h = mon.health()["act0"]
    with torch.no_grad():
        out = model.act0(model.fc0(x)).float()  # the same low-precision output, its statistics in float32
    assert h.rms == pytest.approx(float(out.pow(2).mean().sqrt()), rel=1e-5) and h.nonfinite == 0
    assert h.max_abs == pytest.approx(float(out.abs().max()), rel=1e-6)


def test_eval_mode_model_is_monitored_too():
    model = mlp().eval()
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon, torch.no_grad():
        one_step(mon, model, torch.randn(16, 13))
    assert set(mon.health()) == {"act0", "act1"}


def test_a_failing_sink_warns_once_and_training_goes_on():
    class Broken(Sink):
        def write(self, record):
            raise OSError("disk full")

    model = mlp()
    with pytest.warns(MonitorWarning, match="disk full") as rec:
        with Monitor(model, every_n_steps=1, on_alert="ignore", sinks=[Broken()]) as mon:
            for step in range(5):
                one_step(mon, model, torch.randn(8, 13), step)
            mon.flush()
    assert sum("disk full" in str(w.message) for w in rec) == 1
    assert len(mon.health()) == 2


def test_a_broken_tensorboard_writer_does_not_stop_training(tmp_path):
    class BadWriter:
        def add_scalar(self, *a, **k):
            raise RuntimeError("writer is gone")

        add_histogram_raw = add_image = add_text = add_scalar

        def flush(self):
            raise RuntimeError("writer is gone")

    model = mlp()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with Monitor(model, every_n_steps=1, writer=BadWriter(), on_alert="ignore") as mon:
            for step in range(3):
                one_step(mon, model, torch.randn(8, 13), step)
    assert sum("writer is gone" in str(w.message) for w in rec) == 1


def dead_model():
    model = mlp(width=16, depth=1)
    with torch.no_grad():
        model.fc0.bias.fill_(-100.0)
    return model


def test_on_alert_modes():
    x = torch.randn(128, 13)
    with pytest.warns(MonitorWarning, match=r"step 0 \| act0 \| dead: 16/16 units"):
        with Monitor(dead_model(), every_n_steps=1) as mon:
            one_step(mon, mon.model, x)
    got: list[Alert] = []
    with Monitor(dead_model(), every_n_steps=1, on_alert=got.append) as mon:
        one_step(mon, mon.model, x)
    assert [(a.kind, a.layer, a.value) for a in got] == [("dead", "act0", 1.0)]
    with Monitor(dead_model(), every_n_steps=1, on_alert="raise") as mon, pytest.raises(ActivationAlertError) as e:
        one_step(mon, mon.model, x)
    assert e.value.alert.kind == "dead"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Monitor(dead_model(), every_n_steps=1, on_alert="ignore") as mon:
            one_step(mon, mon.model, x)
        assert len(mon.alerts) == 1


def test_a_compiled_model_leaves_no_hooks_and_no_stance_behind():
    model = mlp()
    model.compile(backend="eager")  # marks the module; compiled when it runs (tests/test_compile.py: the rest)
    before = hook_counts(model)
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon, mon.step(0):
        model(torch.randn(8, 13))
        assert torch._dynamo.eval_frame._stance.stance == "force_eager"
    assert torch._dynamo.eval_frame._stance.stance == "default"
    assert hook_counts(model) == before
    assert sorted(mon.health()) == ["act0", "act1"]


# -- persistence and memory ----------------------------------------------------------------------


def test_state_dict_round_trip_continues_where_it_stopped():
    x = torch.randn(128, 13)
    model = dead_model()
    a = Monitor(model, every_n_steps=2, on_alert="ignore").attach()
    for step in range(4):
        one_step(a, model, x, step)
    state = a.state_dict()
    torch.save(state, "/dev/null")  # checkpoint-serialisable
    b = Monitor(model, every_n_steps=2, on_alert="ignore").attach()
    b.load_state_dict(state)
    assert not b.should_sample(2)  # the last sampled step is not sampled twice
    for step in range(4, 8):
        one_step(b, model, x, step)
    # dead since step 0: one alert only, carried over, none duplicated after the resume
    assert [(al.step, al.kind) for al in b.alerts] == [(0, "dead")]
    assert b.health()["act0"].step == 6


def test_memory_does_not_grow_with_steps():
    model = mlp()
    x = torch.randn(32, 13)

    class Count(Sink):
        n = 0

        def write(self, record):
            Count.n += 1

    mon = Monitor(model, every_n_steps=1, on_alert="ignore", sinks=[Count()]).attach()
    for step in range(50):
        one_step(mon, model, x, step)
    mon.flush()
    gc.collect()
    tracemalloc.start()
    first = tracemalloc.take_snapshot()
    for step in range(50, 450):
        one_step(mon, model, x, step)
    mon.flush()
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(first, "filename"))
    tracemalloc.stop()
    mon.close()
    assert Count.n == 450
    assert grown < 64 * 1024, f"{grown} bytes retained over 400 sampled steps"


def test_functional_calls_outside_the_model_are_not_watched():
    model = WineClassifier()
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon, mon.step(0):
        out = model(torch.randn(16, 13))
        F.relu(1 - out).mean()  # an activation in the loss, not in the model
        torch.tanh(out)
    assert mon.layers == ["dense0.relu", "dense1.relu"]


def test_activations_in_a_training_step_method_are_not_the_model():
    class Module(nn.Module):  # like a LightningModule: training_step is a method of the model
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x))

        def training_step(self, x):
            return torch.sigmoid(self(x)).mean()

    model = Module()
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon, mon.step(0):
        model.training_step(torch.randn(8, 4))
    assert mon.layers == ["fc.relu"]


def test_a_compiled_submodule_is_detected():
    model = nn.Sequential(mlp(), nn.ReLU())
    model[0] = torch.compile(model[0], backend="eager")
    mon = Monitor(model, every_n_steps=1, on_alert="ignore")
    assert mon._compiled()
    with mon, mon.step(0):
        model(torch.randn(8, 13))
    assert sorted(mon.health()) == ["0", "0.act0", "0.act1", "1"]  # the names of the uncompiled model


# -- judging on the writer thread (background=True) --------------------------------------------


def test_background_alerts_reach_callbacks_on_the_writer_thread_and_reads_are_current():
    import threading

    x = torch.randn(128, 13)
    seen: list[tuple[str, bool]] = []
    mon = Monitor(dead_model(), every_n_steps=1, on_alert=lambda a: seen.append((a.kind, threading.current_thread() is main)))
    main = threading.current_thread()
    with mon:
        one_step(mon, mon.model, x, 0)
        # no flush: reading the results waits for the steps already taken to be judged
        assert [(a.step, a.kind) for a in mon.alerts] == [(0, "dead")]
        assert mon.health()["act0"].dead_fraction == 1.0
        assert seen == [("dead", False)]  # delivered from the writer thread
    fg: list[bool] = []
    with Monitor(dead_model(), every_n_steps=1, on_alert=lambda a: fg.append(threading.current_thread() is main), background=False) as m2:
        one_step(m2, m2.model, x, 0)
        assert fg == [True]  # judged at the end of the step, on the training thread


def test_a_raising_alert_callback_warns_once_and_later_alerts_still_arrive():
    got: list[int] = []

    def callback(alert):
        got.append(alert.step)
        raise RuntimeError("callback bug")

    model = mlp(width=16, depth=1)
    x = torch.randn(128, 13)
    with pytest.warns(MonitorWarning, match="callback bug") as rec:
        with Monitor(model, every_n_steps=1, on_alert=callback) as mon:
            for step, bias in enumerate([0.0, 0.0, -100.0, -100.0, 0.0, 0.0, 0.0, -100.0]):
                with torch.no_grad():
                    model.fc0.bias.fill_(bias)
                one_step(mon, model, x, step)
            mon.flush()
    assert sum("callback bug" in str(w.message) for w in rec) == 1
    # dead at 2, recovered after 2 healthy samples (5), dead again at 7: every alert was delivered
    assert got == [2, 5, 7]
    assert [(a.step, a.recovered) for a in mon.alerts] == [(2, False), (5, True), (7, False)]


def test_a_writer_that_falls_behind_drops_output_but_keeps_detecting_in_order():
    import threading

    gate = threading.Event()

    class Stuck(Sink):
        def write(self, record):
            gate.wait(10)

    model = dead_model()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mon = Monitor(model, every_n_steps=1, on_alert="ignore", sinks=[Stuck()]).attach()
        mon._dispatcher.max_batch = 1  # hand every step over at once
        mon._dispatcher._queue.maxsize = 2
        for step in range(12):
            one_step(mon, model, torch.randn(128, 13), step)
        gate.set()
        mon.close()
    assert sum("falling behind" in str(w.message) for w in rec) == 1
    assert len(mon.alerts) == 1  # the dead layer was caught while the writer was stuck
    assert mon.health()["act0"].step == 11  # and steps were judged in order, the newest last
    assert mon._ledger.judged_seq == 12
