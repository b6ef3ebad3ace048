"""nn.LSTM / nn.GRU: gates and states recomputed on sampled steps (monitor/recurrent.py) against a
hand-written cell loop on the same weights; gate_saturated / hidden_saturated on forced biases and
silent on real trainings; selection, hooks, TensorBoard."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from monitor import Monitor
from monitor.recurrent import GRU_ROLES, LSTM_ROLES, recompute, subset_size


@pytest.fixture(autouse=True)
def one_thread():
    """Small recurrent nets train several times faster on one intra-op thread (and a loaded
    2-core machine makes two threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- ground truth: a hand-written cell loop ------------------------------------------------------


def cell_loop(module: nn.Module, x: torch.Tensor, lengths: list[int], h0: torch.Tensor, c0: torch.Tensor | None) -> dict:
    """Every gate and state of ``module`` at every valid (sequence, step), one cell step at a time
    (PyTorch's documented equations); ``x`` is ``[batch, steps, features]``."""
    lstm = isinstance(module, nn.LSTM)
    directions = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    h_out = module.proj_size if lstm and module.proj_size else hidden
    batch, steps, _ = x.shape
    truth: dict = {}
    layer_in = x
    for layer in range(module.num_layers):
        outs = torch.zeros(batch, steps, directions * h_out)
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)
            b_ih = getattr(module, "bias_ih" + sfx, torch.zeros(w_ih.shape[0]))
            b_hh = getattr(module, "bias_hh" + sfx, torch.zeros(w_hh.shape[0]))
            w_hr = getattr(module, "weight_hr" + sfx, None)
            for b in range(batch):
                h = h0[layer * directions + d, b]
                c = c0[layer * directions + d, b] if lstm else None
                for t in range(lengths[b]) if d == 0 else range(lengths[b] - 1, -1, -1):
                    a, r_ = w_ih @ layer_in[b, t] + b_ih, w_hh @ h + b_hh
                    if lstm:
                        g = a + r_
                        i, f = torch.sigmoid(g[:hidden]), torch.sigmoid(g[hidden : 2 * hidden])
                        cand, o = torch.tanh(g[2 * hidden : 3 * hidden]), torch.sigmoid(g[3 * hidden :])
                        c = f * c + i * cand
                        unprojected = o * torch.tanh(c)
                        h = w_hr @ unprojected if w_hr is not None else unprojected
                        vals = {"input": i, "forget": f, "cell_candidate": cand, "output": o, "hidden": unprojected, "cell": c}
                    else:
                        r = torch.sigmoid(a[:hidden] + r_[:hidden])
                        z = torch.sigmoid(a[hidden : 2 * hidden] + r_[hidden : 2 * hidden])
                        n = torch.tanh(a[2 * hidden :] + r * r_[2 * hidden :])
                        h = (1 - z) * n + z * h
                        vals = {"reset": r, "update": z, "new": n, "hidden": h}
                    for role, v in vals.items():
                        truth.setdefault((layer, d, role), {})[(b, t)] = v
                    outs[b, t, d * h_out : (d + 1) * h_out] = h
        layer_in = outs
    return truth


CASES = [
    (cls, layers, bi, bf, packed, proj)
    for cls, layers, bi, bf, packed, proj in itertools.product(
        (nn.LSTM, nn.GRU), (1, 2), (False, True), (False, True), (False, True), (0, 3)
    )
    if not (proj and cls is nn.GRU)
]


@pytest.mark.parametrize(("cls", "layers", "bi", "batch_first", "packed", "proj"), CASES)
def test_recomputed_gates_match_a_hand_written_cell(cls, layers, bi, batch_first, packed, proj):
    torch.manual_seed(layers * 8 + bi * 4 + batch_first * 2 + packed + proj)
    kw = {"proj_size": proj} if proj else {}
    module = cls(5, 6, layers, bidirectional=bi, batch_first=batch_first, bias=not (proj and bi), **kw)
    batch, steps = 4, 7
    x = torch.randn(batch, steps, 5)
    lengths = [7, 3, 5, 1] if packed else [steps] * batch
    directions = 2 if bi else 1
    h0 = torch.randn(layers * directions, batch, proj or 6)
    c0 = torch.randn(layers * directions, batch, 6)
    hx = (h0, c0) if cls is nn.LSTM else h0
    inp = x if batch_first else x.transpose(0, 1)
    if packed:
        inp = pack_padded_sequence(inp, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    out = module(inp, hx)
    roles = LSTM_ROLES if cls is nn.LSTM else GRU_ROLES
    wanted = {(la, d, r) for la in range(layers) for d in range(directions) for r in roles}
    got = recompute(module, (inp, hx), {}, out, wanted)
    truth = cell_loop(module, x, lengths, h0, c0 if cls is nn.LSTM else None)
    # Rows: time-major in the direction's own time, padding left out; packed: sequences longest first.
    seqs = inp.sorted_indices.tolist() if packed else range(batch)
    order = [
        [(b, t if d == 0 else lengths[b] - 1 - t) for t in range(steps) for b in seqs if t < lengths[b]] for d in (0, 1)
    ]
    assert set(got) == wanted
    for key in wanted:
        expected = torch.stack([truth[key][p] for p in order[key[1]]])
        torch.testing.assert_close(got[key], expected, atol=2e-6, rtol=1e-5, msg=str(key))


def test_unbatched_input_keyword_state_and_dropout_in_eval():
    torch.manual_seed(0)
    module = nn.LSTM(3, 4, 2, dropout=0.5).eval()  # eval: no inter-layer dropout
    x = torch.randn(6, 3)  # unbatched: [steps, features]
    h0, c0 = torch.randn(2, 4), torch.randn(2, 4)
    out = module(x, hx=(h0, c0))
    got = recompute(module, (x,), {"hx": (h0, c0)}, out, {(1, 0, "hidden"), (1, 0, "cell"), (0, 0, "forget")})
    truth = cell_loop(module, x[None], [6], h0[:, None], c0[:, None])
    for key, t in got.items():
        torch.testing.assert_close(t, torch.stack([truth[key][(0, s)] for s in range(6)]), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[(1, 0, "hidden")], out[0])  # the last layer's states are the module's output


def test_the_first_sequences_are_recomputed():
    torch.manual_seed(0)
    module = nn.GRU(2, 3, batch_first=True)
    x = torch.randn(40, 20, 2)
    out = module(x)
    k = subset_size(40, 20)
    assert k == 26  # ceil(512 / 20) sequences of 20 steps: about 512 positions
    got = recompute(module, (x,), {}, out, {(0, 0, "hidden")})[(0, 0, "hidden")]
    torch.testing.assert_close(got, out[0][:k].transpose(0, 1).reshape(-1, 3))
    assert subset_size(3, 500) == 3 and subset_size(100, 500) == 8


# -- detection -------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, cls=nn.LSTM, d_in=1, d_out=1, layers=1, bidirectional=False, hidden=32, last=False, **kw) -> None:
        super().__init__()
        self.rnn = cls(d_in, hidden, layers, batch_first=True, bidirectional=bidirectional, **kw)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), d_out)
        self.last = last

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.last else out)


def sine_batch(g: torch.Generator, n: int = 32, steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy sine waves of random phase and frequency; the target is the next value."""
    phase = torch.rand(n, 1, generator=g) * 2 * torch.pi
    freq = 0.5 + torch.rand(n, 1, generator=g)
    s = torch.sin(phase + freq * torch.arange(steps + 1) * 0.3) + 0.05 * torch.randn(n, steps + 1, generator=g)
    return s[:, :-1, None], s[:, 1:, None]


def set_gate_bias(rnn: nn.Module, block: int, value: float, suffix: str | None = None) -> None:
    """Gate block ``block`` (LSTM: 0 input, 1 forget, 2 candidate, 3 output; GRU: 0 reset, 1 update,
    2 new) of bias_ih set to ``value`` (bias_hh's to 0), in every layer or only ``_l<suffix>``."""
    h = rnn.hidden_size
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("bias_") and (suffix is None or name.endswith(suffix)):
                p[block * h : (block + 1) * h] = value if name.startswith("bias_ih") else 0.0


def train(net, batches, steps, every=10, lr=1e-2, loss_fn=F.mse_loss, **mon_kw):
    opt = torch.optim.Adam(net.parameters(), lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Monitor(net, every_n_steps=every, on_alert="ignore", **mon_kw) as mon:
            for step in range(steps):
                x, y = batches()
                with mon.step(step):
                    loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            mon.flush()
    return mon, float(loss.detach())


@pytest.mark.parametrize(("bias", "words"), [(20.0, "stuck at 1: always keeps its memory"), (-20.0, "stuck at 0: always forgets")])
def test_a_forget_bias_of_20_alerts_on_the_forget_gate_at_the_first_sampled_step(bias, words):
    torch.manual_seed(0)
    net = Net()
    set_gate_bias(net.rnn, 1, bias)
    g = torch.Generator().manual_seed(1)
    mon, _ = train(net, lambda: sine_batch(g), 21)
    alerts = [a for a in mon.alerts if not a.recovered]
    assert [(a.step, a.layer, a.kind) for a in alerts] == [(0, "rnn.l0.forget", "gate_saturated")]
    assert f"| gate saturated: forget gate {words}" in alerts[0].message and "32/32 units" in alerts[0].message
    h = mon.health()["rnn.l0.forget"]
    assert h.kind == "lstm_forget" and h.gate_saturated_fraction == 1.0
    assert (h.gate_open_fraction, h.gate_closed_fraction) == ((1.0, 0.0) if bias > 0 else (0.0, 1.0))
    assert "rnn.sigmoid" not in mon.health()  # the recomputation's own sigmoid/tanh are not layers


def test_one_layer_and_direction_alerts_alone_and_gru_gates_name_their_bound():
    torch.manual_seed(0)
    net = Net(d_in=4, layers=2, bidirectional=True, hidden=16)
    set_gate_bias(net.rnn, 1, -20.0, suffix="_l1_reverse")
    x = torch.randn(16, 12, 4)
    mon, _ = train(net, lambda: (x, torch.zeros(16, 12, 1)), 1, every=1)
    assert [(a.layer, a.kind) for a in mon.alerts] == [("rnn.l1_reverse.forget", "gate_saturated")]
    assert len(mon.health()) == 24  # 2 layers x 2 directions x 6 gates and states

    gru = Net(nn.GRU, d_in=4)
    set_gate_bias(gru.rnn, 1, 20.0)  # update gate z ~ 1: h' = z * h, the state never takes in the input
    mon, _ = train(gru, lambda: (x, torch.zeros(16, 12, 1)), 1, every=1)
    assert [(a.layer, a.kind) for a in mon.alerts] == [("rnn.l0.update", "gate_saturated")]
    assert "update gate stuck at 1: always keeps its previous state" in mon.alerts[0].message


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_gates_of_a_huge_init_switching_between_0_and_1_alert(cls):
    """Every parameter x1000: each gate unit flips between 0 and 1 (a binary switch: ~0 gradient on
    every value) without sitting at one bound; they were never counted."""
    torch.manual_seed(0)
    net = Net(cls, d_in=8)
    with torch.no_grad():
        for p in net.rnn.parameters():
            p.mul_(1000.0)
    x = torch.randn(32, 20, 8)
    # ground truth: our own cell loop over the sequences the monitor recomputes
    rnn = net.rnn
    h = torch.zeros(x.shape[0], rnn.hidden_size)
    c = torch.zeros_like(h)
    gates = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            gi = x[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0
            gh = h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
            if cls is nn.LSTM:
                i, f, g, o = (gi + gh).chunk(4, 1)
                i, f, o = i.sigmoid(), f.sigmoid(), o.sigmoid()
                c = f * c + i * g.tanh()
                h = o * c.tanh()
                gates.append(torch.stack([i, f, o]))
            else:
                r = (gi[:, :32] + gh[:, :32]).sigmoid()
                z = (gi[:, 32:64] + gh[:, 32:64]).sigmoid()
                n = (gi[:, 64:] + r * gh[:, 64:]).tanh()
                h = (1 - z) * n + z * h
                gates.append(torch.stack([r, z]))
    at_bound = ((torch.stack(gates) < 0.01) | (torch.stack(gates) > 0.99)).float().mean((0, 2))  # [gate, unit]
    assert (at_bound >= 0.95).float().mean() > 0.9  # nearly every unit of every gate switches
    mon, _ = train(net, lambda: (x, torch.zeros(32, 20, 1)), 1, every=1)
    names = ["input", "forget", "output"] if cls is nn.LSTM else ["reset", "update"]
    alerted = {a.layer for a in mon.alerts if a.kind == "gate_saturated"}
    assert alerted == {f"rnn.l0.{n}" for n in names}
    assert any("switching between 0 and 1" in a.message for a in mon.alerts)
    for n in names:
        assert mon.health()[f"rnn.l0.{n}"].gate_saturated_fraction > 0.9


def test_a_hidden_state_pinned_at_one_alerts_as_hidden_saturated():
    torch.manual_seed(0)
    x = torch.randn(16, 40, 1)
    lstm = Net()
    for block in (0, 1, 2, 3):  # input, forget, candidate, output ~ 1: c_t = c_{t-1} + 1, h = tanh(c_t) -> 1
        set_gate_bias(lstm.rnn, block, 20.0)
    mon, _ = train(lstm, lambda: (x, torch.zeros(16, 40, 1)), 1, every=1)
    kinds = {(a.layer, a.kind) for a in mon.alerts}
    assert ("rnn.l0.hidden", "hidden_saturated") in kinds
    assert ("rnn.l0.hidden", "saturated") not in kinds  # one alert for one pathology
    assert "hidden saturated: 32/32 units (100%) of the hidden state sit at +-1" in next(a.message for a in mon.alerts if a.kind == "hidden_saturated")
    assert mon.health()["rnn.l0.cell"].max_abs == pytest.approx(40.0, rel=1e-3)  # the cell counts up to T

    gru = Net(nn.GRU)
    set_gate_bias(gru.rnn, 2, 20.0)  # the new gate n ~ 1 ...
    set_gate_bias(gru.rnn, 1, -20.0)  # ... and the update gate z ~ 0: h' = (1 - z) * n + z * h ~ 1 at once
    mon, _ = train(gru, lambda: (x, torch.zeros(16, 40, 1)), 1, every=1)
    assert {(a.layer, a.kind) for a in mon.alerts} == {
        ("rnn.l0.update", "gate_saturated"), ("rnn.l0.new", "saturated"), ("rnn.l0.hidden", "hidden_saturated"),
    }


def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 8, 8) / 16.0  # read row by row: 8 steps of 8
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.7 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_default_recurrent_nets_trained_on_real_sequences_stay_silent(cls):
    """Noisy sine waves (next value, 1 layer) and scikit-learn's digits read row by row (2 layers,
    bidirectional): default init, Adam at lr 1e-2, 200 steps each, sampled every 10."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = Net(cls)
    mon, loss = train(net, lambda: sine_batch(g), 200)
    assert loss < 0.05  # it learned (predicting 0 gives ~0.5)
    assert mon.alerts == []
    assert all(h.metrics.get("gate_saturated_fraction", 0) == 0 for h in mon.health().values())

    xtr, ytr, xte, yte = digits_data()
    net = Net(cls, d_in=8, d_out=10, layers=2, bidirectional=True, last=True)

    def batch():
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        return xtr[idx], ytr[idx]

    mon, _ = train(net, batch, 200, loss_fn=F.cross_entropy)
    with torch.no_grad():
        accuracy = float((net(xte).argmax(1) == yte).float().mean())
    assert accuracy > 0.85
    assert mon.alerts == []
    assert len(mon.health()) == (24 if cls is nn.LSTM else 16)


# -- selection, hooks, packed input, RNG, TensorBoard ---------------------------------------------


def watched(net, **kw) -> list[str]:
    mon = Monitor(net, every_n_steps=1, on_alert="ignore", **kw)
    with warnings.catch_warnings(), mon.step(0):
        warnings.simplefilter("ignore")  # "no watched activation ran" where nothing is selected
        net(torch.randn(2, 5, 1))
    names = list(mon.health())
    mon.close()
    return names


def test_selection_of_recurrent_modules_and_their_gates():
    net = Net(hidden=4)
    everything = [f"rnn.l0.{g}" for g in ("input", "forget", "cell_candidate", "output", "hidden", "cell")]
    assert watched(net) == everything  # by default; the LSTM's own (tuple) output is not watched
    assert watched(net, exclude="rnn.*") == watched(net, exclude=nn.LSTM) == []
    assert watched(net, exclude="*.cell") == [n for n in everything if not n.endswith(".cell")]
    assert watched(net, include="*.forget") == ["rnn.l0.forget"]
    assert watched(net, include=lambda n, m: n.endswith("hidden")) == ["rnn.l0.hidden"]
    assert watched(net, include="rnn") == ["rnn", *everything]  # the module itself, as kind "module", and its gates
    assert watched(net, include=[nn.LSTM], exclude=lambda n, m: n.endswith(("input", "output"))) == [
        "rnn", "rnn.l0.forget", "rnn.l0.cell_candidate", "rnn.l0.hidden", "rnn.l0.cell",
    ]
    with pytest.raises(ValueError, match="rnn.l0.forget"):
        Monitor(net, include="rnn.l1.forget")  # no second layer: the close names are listed


def hooks_of(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs)) for m in model.modules()]


def test_hooks_are_removed_after_the_step_and_when_the_forward_raises():
    net = Net(hidden=4)
    before = hooks_of(net)
    mon = Monitor(net, every_n_steps=1, on_alert="ignore")
    with mon.step(0):
        net(torch.randn(2, 5, 1))
    assert hooks_of(net) == before

    class Boom(Exception):
        pass

    def failing(x):
        net.rnn(x)
        raise Boom

    with pytest.raises(Boom), mon.step(1):
        failing(torch.randn(2, 5, 1))
    assert hooks_of(net) == before
    mon.close()
    assert hooks_of(net) == before


def test_packed_sequences_count_only_their_real_positions():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, bidirectional=True)
    lengths = torch.tensor([9, 2, 5, 7])
    packed = pack_padded_sequence(torch.randn(9, 4, 3), lengths, enforce_sorted=False)
    with Monitor(rnn, every_n_steps=1, on_alert="ignore") as mon, mon.step(0):
        rnn(packed)
    health = mon.health()
    # a bare GRU as the model: its gates and state, forward direction first
    assert list(health) == [f"l0{d}.{g}" for d in ("", "_reverse") for g in ("reset", "update", "new", "hidden")]
    assert {h.evidence_values for n, h in health.items() if n.endswith(("reset", "update", "hidden"))} == {23}


def test_training_with_inter_layer_dropout_is_bit_for_bit_the_same_with_the_monitor():
    def run(monitored: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = Net(layers=3, hidden=8, dropout=0.5)
        opt = torch.optim.SGD(net.parameters(), 0.1)
        mon = Monitor(net, every_n_steps=2, on_alert="ignore") if monitored else None
        for step in range(6):
            x = torch.randn(4, 10, 1)
            with mon.step(step) if mon else torch.enable_grad():
                loss = net(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        if mon:
            assert mon.health()["rnn.l2.forget"].evidence_values == 3 * 4 * 10  # 3 sampled steps, all 4 sequences
            mon.close()
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_tensorboard_tags_read_back(tmp_path):
    torch.manual_seed(0)
    net = Net(hidden=8)
    set_gate_bias(net.rnn, 1, 20.0)
    x = torch.randn(8, 20, 1)
    train(net, lambda: (x, torch.zeros(8, 20, 1)), 3, every=1, logdir=tmp_path)
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in (
        "activation_gate_saturated_fraction/rnn.l0.forget", "activation_gate_open_fraction/rnn.l0.forget",
        "activation_gate_closed_fraction/rnn.l0.input", "activation_hidden_saturated_fraction/rnn.l0.hidden",
        "activation_rms/rnn.l0.cell", "activation_saturated_fraction/rnn.l0.cell_candidate",
    ):
        assert tag in scalars, tag
    assert [e.value for e in ea.Scalars("activation_gate_open_fraction/rnn.l0.forget")] == [1.0, 1.0, 1.0]
    assert "activation_saturated_fraction/rnn.l0.forget" not in scalars  # gates: gate_saturated only
    assert "activation_dormant_fraction/rnn.l0.forget" not in scalars
    assert "activation_hist/rnn.l0.forget" in ea.Tags()["histograms"]
    gates = np.asarray([e.value for e in ea.Scalars("activation_gate_saturated_fraction/rnn.l0.input")])
    assert gates.shape == (3,) and (gates < 0.5).all()
