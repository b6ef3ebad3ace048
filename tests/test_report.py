"""``python -m monitor report``: on event files written by real training runs (a plain loop, Lightning, skorch).

Ground truth is computed here without the monitor: which units never fire and which sit at a tanh
bound (own forward hooks on the last sampled step), each layer's RMS, and the alerts the monitor
itself holds in memory (``mon.alerts``), against what the report reads back from the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from torch import nn

from monitor import Monitor
from monitor import report as R
from monitor.report import formatting, template

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY, BATCH = 12, 2, 128  # a batch of 128 values per unit: the evidence is the last sampled step
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- real runs ------------------------------------------------------------------------------------
def three_layer_model() -> nn.Sequential:
    """act0: a healthy ReLU; act1: tanh, 24 of 32 units pinned at +1 by their bias; act2: a ReLU killed by its bias (-100)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            [
                ("fc0", nn.Linear(13, 32)),
                ("act0", nn.ReLU()),
                ("fc1", nn.Linear(32, 32)),
                ("act1", nn.Tanh()),
                ("fc2", nn.Linear(32, 16)),
                ("act2", nn.ReLU()),
                ("head", nn.Linear(16, 3)),
            ]
        )
    )
    with torch.no_grad():
        model.fc1.bias[:24] = 5.0
        model.fc2.bias.fill_(-100.0)
    return model


class Truth:
    """What the last sampled step's forward really produced, seen by hooks of our own."""

    def __init__(self, model: nn.Module) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.grad: dict[str, torch.Tensor] = {}
        self.handles = [getattr(model, n).register_forward_hook(self._hook(n)) for n in ("act0", "act1", "act2")]

    def _hook(self, name):
        def hook(module, args, output):
            self.out[name] = output.detach().clone()
            if output.requires_grad:  # the gradient with respect to this output, when backward reaches it
                output.register_hook(lambda g: self.grad.__setitem__(name, g.detach().clone()))

        return hook

    def dead_fraction(self, name: str) -> float:
        return float((~(self.out[name] > 0).any(0)).float().mean())

    def saturated_fraction(self, name: str) -> float:  # |tanh| > 0.98 on >= 95% of a unit's values (README)
        return float(((self.out[name].abs() > 0.98).float().mean(0) >= 0.95).float().mean())

    def rms(self, name: str) -> float:
        return float(self.out[name].pow(2).mean().sqrt())

    def grad_rms(self, name: str) -> float:
        return float(self.grad[name].pow(2).mean().sqrt())


def train_plain(logdir, revive_at: int | None = None, writer=None, steps: int = STEPS):
    model = three_layer_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 13, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
    truth = None
    target = {"logdir": str(logdir)} if writer is None else {"writer": writer}
    with Monitor(model, every_n_steps=EVERY, on_alert="ignore", **target) as mon:
        for step in range(steps):
            if revive_at is not None and step == revive_at:
                with torch.no_grad():
                    model.fc2.bias.fill_(1.0)  # act2 comes back to life
            last = step == (steps - 1) // EVERY * EVERY
            if last:
                truth = Truth(model)
            with mon.step(step):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            if last:
                for h in truth.handles:
                    h.remove()
    return mon, truth


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """runs/dead: act2 dead and act1 saturated to the end; runs/revived: act2 revived at step 4."""
    root = tmp_path_factory.mktemp("plain")
    dead_mon, truth = train_plain(root / "runs" / "dead")
    revived_mon, _ = train_plain(root / "runs" / "revived", revive_at=4)
    return root, dead_mon, truth, revived_mon


def run_report(*args: str, capsys=None, columns: int | None = None, monkeypatch=None):
    if columns is not None:
        monkeypatch.setenv("COLUMNS", str(columns))
    code = R.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli(*args, **kw) -> subprocess.Popen:
    """``python -m monitor report ...`` in a fresh interpreter (started now, read later: they run in parallel)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    return subprocess.Popen(
        [sys.executable, "-m", "monitor", "report", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


# -- the plain loop -------------------------------------------------------------------------------
def test_json_matches_ground_truth(plain, capsys):
    root, mon, truth, _ = plain
    code, out, err = run_report(root / "runs" / "dead", "--json", capsys=capsys)
    assert code == 0 and err == ""
    doc = strict_json(out)
    (run,) = doc["runs"]
    assert run["run"] == str(root / "runs" / "dead")
    assert [os.path.basename(f).endswith(".activation-monitor") for f in run["files"]] == [True]
    assert (run["first_step"], run["last_step"], run["sampled_steps"]) == (0, 10, 6)
    layers = {lay["name"]: lay for lay in run["layers"]}
    assert [lay["name"] for lay in run["layers"]] == ["act0", "act1", "act2"]  # forward order
    assert [lay["kind"] for lay in run["layers"]] == ["relu", "tanh", "relu"]
    # which layer is dead / saturated: our own hooks on the last sampled step (its 128 values per unit)
    assert truth.dead_fraction("act2") == 1.0 and truth.dead_fraction("act0") < 0.5
    for name in ("act0", "act2"):
        assert layers[name]["dead_fraction"]["last"] == pytest.approx(truth.dead_fraction(name))
        assert layers[name]["saturated_fraction"] is None
    assert truth.saturated_fraction("act1") > 0.5
    assert layers["act1"]["saturated_fraction"]["last"] == pytest.approx(truth.saturated_fraction("act1"))
    assert layers["act1"]["dead_fraction"] is None
    assert layers["act2"]["dead_fraction"]["worst"] == 1.0
    for name in ("act0", "act1", "act2"):
        assert layers[name]["rms"]["last"] == pytest.approx(truth.rms(name), rel=1e-4)
        assert len(layers[name]["rms"]["trend"]) == 6
        assert layers[name]["grad_rms"]["last"] == pytest.approx(truth.grad_rms(name), rel=1e-4)  # backward inside the step
    # kinds and units as the monitor recorded them (the `activation_layers` text): the model's widths
    assert [(lay["kind"], lay["units"]) for lay in run["layers"]] == [("relu", 32), ("tanh", 32), ("relu", 16)]
    # the alerts: exactly those the monitor held in memory, in order
    want = [(a.step, a.layer, a.kind, a.recovered, a.message) for a in mon.alerts]
    assert [(a["step"], a["layer"], a["kind"], a["recovered"], a["message"]) for a in run["alerts"]] == want
    assert {(a["layer"], a["kind"]) for a in run["active_alerts"]} == {("act2", "dead"), ("act1", "saturated")}
    assert run["alerts_by_kind"] == {"dead": {"fired": 1, "active": 1}, "saturated": {"fired": 1, "active": 1}}
    assert layers["act2"]["alerts"] == [{"kind": "dead", "step": 0, "recovered_step": None}]
    assert doc["fail_on"] is None and doc["failed"] == [] and doc["notes"] == []


def test_recovered_alerts(plain, capsys):
    root, _, _, mon = plain
    code, out, _ = run_report(root / "runs" / "revived", "--json", capsys=capsys)
    assert code == 0
    (run,) = strict_json(out)["runs"]
    recovered = [a for a in mon.alerts if a.layer == "act2" and a.kind == "dead" and a.recovered]
    assert recovered, mon.alerts  # the monitor itself saw act2 come back
    act2 = next(lay for lay in run["layers"] if lay["name"] == "act2")
    assert act2["alerts"] == [{"kind": "dead", "step": 0, "recovered_step": recovered[0].step}]
    assert act2["dead_fraction"]["first"] == 1.0 and act2["dead_fraction"]["last"] < 0.5
    assert ("act2", "dead") not in {(a["layer"], a["kind"]) for a in run["active_alerts"]}
    assert [(a["step"], a["layer"], a["kind"], a["recovered"]) for a in run["alerts"]] == [
        (a.step, a.layer, a.kind, a.recovered) for a in mon.alerts
    ]


def test_terminal_output(plain, capsys, monkeypatch):
    root, mon, truth, _ = plain
    code, out, err = run_report(root / "runs", capsys=capsys, columns=120, monkeypatch=monkeypatch)
    assert code == 0 and err == ""
    assert "\x1b[" not in out  # not a terminal: plain text
    lines = out.splitlines()
    dead_dir, revived_dir = str(root / "runs" / "dead"), str(root / "runs" / "revived")
    run_lines = [ln for ln in lines if ln.startswith(str(root))]
    assert run_lines == [
        f"{dead_dir}: steps 0..10 (6 sampled), alerts: saturated 1 (1 active), dead 1 (1 active)",
        f"{revived_dir}: steps 0..10 (6 sampled), alerts: saturated 1 (1 active), dead 1",
    ]
    table = lines[1:5]
    assert table[0].split("  ")[0] == "layer" and "kind" in table[0] and "alerts" in table[0]
    assert [row.split()[0] for row in table[1:]] == ["act0", "act1", "act2"]
    assert table[3].split()[:3] == ["act2", "relu", "16"]
    assert "dead 100% 100% 100%" in table[3] and table[3].endswith("dead@0")
    assert (
        table[2].split()[:2] == ["act1", "tanh"]
        and f"sat {formatting.pct(truth.saturated_fraction('act1'))}" in table[2]
    )
    rms_last = formatting.num(truth.rms("act0"))
    assert re.search(r"\s[▁▂▃▄▅▆▇█]{6} " + re.escape(rms_last) + r"\s", table[1]), table[1]
    assert all(len(line) <= 120 for line in table)
    # the alert lines, in logged order, verbatim when piped
    alert_lines = [ln.strip() for ln in lines if ln.lstrip().startswith(("ALERT", "RECOVERED"))]
    dead_section = alert_lines[: len(mon.alerts)]
    assert dead_section == [("RECOVERED " if a.recovered else "ALERT ") + a.message for a in mon.alerts]
    assert "act2" in out.split(revived_dir)[1] and "dead@0-" in out.split(revived_dir)[1]


def test_colours_and_widths(plain, capsys, monkeypatch):
    root = plain[0]
    _, out, _ = run_report(root / "runs" / "dead", "--color", "always", capsys=capsys)
    assert "\x1b[31;1mact2\x1b[0m" in out  # an active alert: the layer in bold red
    for columns in (70, 90):
        _, out, _ = run_report(root / "runs" / "dead", capsys=capsys, columns=columns, monkeypatch=monkeypatch)
        table = [ln for ln in out.splitlines()[1:5]]
        assert all(len(ln) <= columns for ln in table), (columns, table)
        assert [ln.split()[0] for ln in table[1:]] == ["act0", "act1", "act2"]
    # colour never changes the text
    _, coloured, _ = run_report(
        root / "runs" / "dead", "--color", "always", capsys=capsys, columns=90, monkeypatch=monkeypatch
    )
    assert ANSI.sub("", coloured) == out


def test_fast_path_reads_what_tensorboard_reads(plain, capsys, monkeypatch):
    """The byte templates give exactly what decoding every event gives, and what EventAccumulator reads."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = plain[0]
    _, fast, _ = run_report(root / "runs", "--json", capsys=capsys)
    monkeypatch.setattr(template.Template, "build", classmethod(lambda cls, rec, lay: None))
    _, slow, _ = run_report(root / "runs", "--json", capsys=capsys)
    assert fast == slow
    ea = EventAccumulator(str(root / "runs" / "dead"), size_guidance={"scalars": 0})
    ea.Reload()
    for lay in strict_json(fast)["runs"][0]["layers"]:
        rms = [e.value for e in ea.Scalars(f"activation_rms/{lay['name']}")]
        assert (lay["rms"]["first"], lay["rms"]["last"], lay["rms"]["max"]) == (rms[0], rms[-1], max(rms))


def test_fail_on_exit_codes_and_bad_input(plain, tmp_path):
    """The CLI as a pipeline runs it: subprocesses, exit status, messages on stderr."""
    root = plain[0]
    dead, revived = root / "runs" / "dead", root / "runs" / "revived"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no events here")
    cases = {
        "dead-dead": ([dead, "--fail-on", "dead"], 1),
        "dead-exploding": ([dead, "--fail-on", "exploding,nonfinite"], 0),
        "all": ([dead, revived, "--fail-on", "all", "--json"], 1),
        "missing": ([dead, tmp_path / "nope", "--fail-on", "all"], 2),
        "empty": ([tmp_path / "empty"], 2),
    }
    procs = {name: cli(*args) for name, (args, _) in cases.items()}
    results = {name: (p.wait(timeout=120), *p.communicate()) for name, p in procs.items()}
    for name, (code, out, err) in results.items():
        assert code == cases[name][1], (name, code, err)
        assert "Traceback" not in err, (name, err)
    assert "--fail-on dead: still active at the end: dead in act2 since step 0" in results["dead-dead"][2]
    doc = strict_json(results["all"][1])
    assert doc["fail_on"] == ["all"]
    assert {(os.path.basename(f["run"]), f["layer"], f["kind"]) for f in doc["failed"]} == {
        ("dead", "act2", "dead"),
        ("dead", "act1", "saturated"),
        ("revived", "act1", "saturated"),
    }
    assert results["missing"][1] == "" and f"{tmp_path / 'nope'}: no such directory" in results["missing"][2]
    assert f"{tmp_path / 'empty'}: no activation-monitor event files" in results["empty"][2]


def test_fail_on_recovered_and_typos(plain, capsys):
    root = plain[0]
    revived = root / "runs" / "revived"
    assert run_report(revived, "--fail-on", "dead", capsys=capsys)[0] == 0  # act2 died, then recovered
    assert run_report(revived, "--fail-on", "saturated", capsys=capsys)[0] == 1
    assert run_report(revived, "--fail-on", "Dead,vanishing", capsys=capsys)[0] == 0  # -> vanishing_gradient
    code, out, err = run_report(revived, "--fail-on", "deed", capsys=capsys)  # a typo must not pass a CI gate
    assert code == 2 and out == "" and "did you mean 'dead'" in err
    code, _, err = run_report(revived, "--fail-on", "too_quiet", capsys=capsys)  # a detector of your own
    assert code == 0 and "too_quiet" in err


def test_fail_on_knows_every_builtin_kind(tmp_path, capsys):
    """Every built-in detector's name is a --fail-on kind: an LSTM whose forget gate is stuck open
    (bias +20: sigmoid(20) = 1 - 2e-9) fails a `gate_saturated` gate; typos of the newer kinds fail
    with exit 2; a prefix stands for the kinds it begins (and a detector of that very name)."""
    from monitor.detectors import BUILTIN_NAMES

    assert R.BUILTIN_KINDS == BUILTIN_NAMES  # the report's copy (it does not import torch) is complete
    torch.manual_seed(0)
    rnn = nn.LSTM(8, 32, batch_first=True)
    with torch.no_grad():
        rnn.bias_ih_l0[32:64].fill_(20.0)
    with Monitor(rnn, every_n_steps=1, logdir=tmp_path / "gate", on_alert="ignore") as mon:
        for s in range(3):
            with mon.step(s):
                rnn(torch.randn(16, 40, 8))
    assert "gate_saturated" in {a.kind for a in mon.alerts}
    code, _, err = run_report(tmp_path / "gate", "--fail-on", "gate_saturated", capsys=capsys)
    assert code == 1 and "not a built-in" not in err and "gate_saturated" in err
    code, _, err = run_report(tmp_path / "gate", "--fail-on", "collapse,attention_sink,hidden_saturated", capsys=capsys)
    assert code == 0 and "not a built-in" not in err
    code, out, err = run_report(tmp_path / "gate", "--fail-on", "colapse", capsys=capsys)
    assert code == 2 and out == "" and "did you mean 'collapse'" in err
    code, out, err = run_report(tmp_path / "gate", "--fail-on", "attention", capsys=capsys)  # a prefix of two
    assert code == 0 and "taken as attention_entropy, attention_sink" in err
    code, _, err = run_report(tmp_path / "gate", "--fail-on", "gate", capsys=capsys)  # gate_saturated (or yours)
    assert code == 1 and "gate_saturated" in err


def test_truncated_and_corrupt_files(plain, tmp_path, capsys):
    root = plain[0]
    _, whole, _ = run_report(root / "runs" / "dead", "--json", capsys=capsys)
    whole_run = strict_json(whole)["runs"][0]
    for case in ("truncated", "corrupt", "header"):
        d = tmp_path / case
        shutil.copytree(root / "runs" / "dead", d)
        (f,) = d.iterdir()
        data = bytearray(f.read_bytes())
        if case == "truncated":  # a run killed mid-write: the last record is cut short
            data = data[:-7]
        elif case == "corrupt":  # a flipped byte in the middle: that record fails its checksum
            data[len(data) // 2] ^= 0xFF
        else:  # killed right after creating the file
            data = data[:5]
        f.write_bytes(bytes(data))
        code, out, err = run_report(d, "--json", capsys=capsys)
        assert code == 0
        assert f"note: {f}: " in err and "Traceback" not in err
        run = strict_json(out)["runs"][0]
        assert len(run["notes"]) == 1 and str(f) in run["notes"][0]
        if case == "truncated":
            assert "incomplete" in err
            assert run["sampled_steps"] == whole_run["sampled_steps"]  # the last record was an image
            assert run["layers"] == whole_run["layers"]
        elif case == "corrupt":
            assert "corrupt" in err
            assert 0 < run["sampled_steps"] <= whole_run["sampled_steps"]
        else:
            assert run["sampled_steps"] == 0 and run["layers"] == []
        code, out, err = run_report(d, capsys=capsys)  # the terminal report too
        assert code == 0 and out.startswith(str(d)) and str(f) in err


def test_older_runs_in_a_summary_writers_file(tmp_path, capsys):
    """Earlier versions wrote into the SummaryWriter's own file (no .activation-monitor suffix): still found."""
    from torch.utils.tensorboard import SummaryWriter

    class NoDirectory:  # a writer that shows no directory: the monitor writes through its add_* methods
        def __init__(self, w):
            self.w = w

        def __getattr__(self, name):
            if name in ("add_scalar", "add_histogram_raw", "add_image", "flush"):
                return getattr(self.w, name)
            raise AttributeError(name)

        def add_text(self, tag, text, step):  # older versions wrote no `activation_layers` text
            if tag != "activation_layers":
                self.w.add_text(tag, text, step)

    sw = SummaryWriter(str(tmp_path / "old"))
    mon, _ = train_plain(None, writer=NoDirectory(sw), steps=5)
    sw.close()
    assert not list((tmp_path / "old").glob("*.activation-monitor"))
    code, out, err = run_report(tmp_path, "--json", capsys=capsys)
    assert code == 0 and err == ""
    (run,) = strict_json(out)["runs"]
    assert run["sampled_steps"] == 3 and [lay["name"] for lay in run["layers"]] == ["act0", "act1", "act2"]
    assert next(lay for lay in run["layers"] if lay["name"] == "act2")["dead_fraction"]["last"] == 1.0
    # no recorded kinds and units: inferred from the tags (tanh named by its saturated alert) and the alerts
    assert [(lay["kind"], lay["units"]) for lay in run["layers"]] == [("relu", None), ("tanh", 32), ("relu", 16)]
    assert [(a["step"], a["layer"], a["kind"]) for a in run["alerts"]] == [
        (a.step, a.layer, a.kind) for a in mon.alerts
    ]


def test_a_run_still_being_written_and_then_resumed(tmp_path, capsys):
    """Read while the monitor still writes; a resumed run's second file in the same directory is merged."""
    model = three_layer_model()
    x = torch.randn(BATCH, 13, generator=torch.Generator().manual_seed(1))
    logdir = tmp_path / "run"

    def train(mon, steps):
        for step in steps:
            with mon.step(step):
                model(x)  # forward only: no gradient numbers

    first = Monitor(model, every_n_steps=EVERY, logdir=str(logdir), on_alert="ignore")
    train(first, range(6))
    first.flush()  # still open: its file is being written
    code, out, err = run_report(logdir, "--json", capsys=capsys)
    (run,) = strict_json(out)["runs"]
    assert code == 0 and (run["first_step"], run["last_step"], run["sampled_steps"]) == (0, 4, 3)
    state = first.state_dict()
    first.close()
    second = Monitor(model, every_n_steps=EVERY, logdir=str(logdir), on_alert="ignore")
    second.load_state_dict(state)  # resumed: no second alert for a layer already dead
    train(second, range(6, 12))
    second.close()
    assert len(list(logdir.glob("*.activation-monitor"))) == 2
    code, out, err = run_report(logdir, "--json", capsys=capsys)
    (run,) = strict_json(out)["runs"]
    assert code == 0 and err == "" and len(run["files"]) == 2
    assert (run["first_step"], run["last_step"], run["sampled_steps"]) == (0, 10, 6)
    assert [(a["step"], a["layer"], a["kind"]) for a in run["alerts"]] == [
        (a.step, a.layer, a.kind) for a in first.alerts
    ]
    act2 = next(lay for lay in run["layers"] if lay["name"] == "act2")
    assert act2["alerts"] == [{"kind": "dead", "step": 0, "recovered_step": None}]
    assert len(act2["rms"]["trend"]) == 6 and act2["grad_rms"] is None


def test_a_new_run_written_into_the_same_directory_is_not_merged_with_the_old_one(tmp_path, capsys):
    """A script rerun into the same logdir starts over at step 0: not a resume. Only the newest run
    is reported, with a note (the two were stitched together by step)."""
    logdir = tmp_path / "run"
    x = torch.randn(BATCH, 13, generator=torch.Generator().manual_seed(1))
    for steps in (12, 6):  # the old run goes further than the new one
        model = three_layer_model()
        mon = Monitor(model, every_n_steps=EVERY, logdir=str(logdir), on_alert="ignore")
        for step in range(steps):
            with mon.step(step):
                model(x)
        mon.close()
    assert len(list(logdir.glob("*.activation-monitor"))) == 2
    code, out, err = run_report(logdir, "--json", capsys=capsys)
    (run,) = strict_json(out)["runs"]
    assert code == 0 and (run["first_step"], run["last_step"], run["sampled_steps"]) == (0, 4, 3)
    assert [(a["step"], a["layer"], a["kind"]) for a in run["alerts"]] == [(a.step, a.layer, a.kind) for a in mon.alerts]
    assert any("starts over at step 0" in n for n in run["notes"]), run["notes"]


# -- Lightning and skorch -------------------------------------------------------------------------
def test_lightning_versions(tmp_path, capsys):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from integrations.lightning import ActivationMonitor

    class MLP(L.LightningModule):
        def __init__(self, dead_bias=None):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
            if dead_bias is not None:
                with torch.no_grad():
                    self.net[0].bias.fill_(dead_bias)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    data = DataLoader(TensorDataset(x, x[:, :1]), batch_size=128)
    callbacks = {}
    for dead_bias in (-100.0, None):  # version_0: net.1 killed by its bias; version_1: healthy
        cb = ActivationMonitor(every_n_steps=2, on_alert="ignore")
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=6,
            max_epochs=10,
            logger=TensorBoardLogger(str(tmp_path), name="lt"),
            callbacks=[cb],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=1,
        )
        trainer.fit(MLP(dead_bias), data)
        callbacks[trainer.logger.version] = cb
    code, out, err = run_report(tmp_path / "lt", "--json", capsys=capsys)
    assert code == 0, err
    runs = strict_json(out)["runs"]
    assert [os.path.basename(r["run"]) for r in runs] == ["version_0", "version_1"]
    for r in runs:  # only the monitor's files, never the logger's own
        assert len(r["files"]) == 1 and r["files"][0].endswith(".activation-monitor")
        assert any("tfevents" in f and not f.endswith(".activation-monitor") for f in os.listdir(r["run"]))
        assert (r["first_step"], r["last_step"], r["sampled_steps"]) == (0, 4, 3)
        assert [(lay["name"], lay["kind"]) for lay in r["layers"]] == [("net.1", "relu"), ("net.3", "relu")]
    dead, healthy = runs
    assert dead["layers"][0]["dead_fraction"]["last"] == 1.0 and dead["layers"][0]["units"] == 32
    assert [(a["step"], a["layer"], a["kind"]) for a in dead["alerts"]] == [
        (a.step, a.layer, a.kind) for a in callbacks[0].alerts
    ]
    assert ("net.1", "dead") in {(a["layer"], a["kind"]) for a in dead["active_alerts"]}
    assert healthy["alerts"] == [] and callbacks[1].alerts == []
    assert healthy["layers"][0]["dead_fraction"]["worst"] < 0.5
    code, out, _ = run_report(tmp_path / "lt", "--fail-on", "dead", capsys=capsys)
    assert code == 1
    n = len(callbacks[0].alerts)  # net.1 by its bias; and net.3, whose input is now all zeros, in part
    assert re.search(rf"version_0: steps 0\.\.4 \(3 sampled\), alerts: dead {n} \({n} active\)", out)
    assert re.search(r"version_1: steps 0\.\.4 \(3 sampled\), no alerts", out)


def test_skorch_runs(tmp_path, capsys):
    pytest.importorskip("skorch")
    from sklearn.datasets import load_wine
    from sklearn.preprocessing import StandardScaler
    from skorch import NeuralNetClassifier

    from integrations.skorch import ActivationMonitor

    class Wine(nn.Module):  # functional ReLUs: layers dense0.relu, dense1.relu
        def __init__(self, dense0_bias=None):
            super().__init__()
            self.dense0, self.dense1, self.output = nn.Linear(13, 20), nn.Linear(20, 10), nn.Linear(10, 3)
            if dense0_bias is not None:
                nn.init.constant_(self.dense0.bias, dense0_bias)

        def forward(self, X):
            return self.output(torch.relu(self.dense1(torch.relu(self.dense0(X)))))

    X, y = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    nets = []
    for bias in (-100.0, None):  # run-000: dense0.relu dead; run-001: healthy
        torch.manual_seed(0)
        cb = ActivationMonitor(every_n_steps=2, logdir=str(tmp_path / "wine"), on_alert="ignore")
        net = NeuralNetClassifier(
            Wine,
            module__dense0_bias=bias,
            max_epochs=2,
            batch_size=64,
            lr=0.01,
            optimizer=torch.optim.Adam,
            callbacks=[cb],
            verbose=0,
            train_split=None,
        )
        net.fit(X, y)
        nets.append(cb)
    # 178 samples / 64 = 3 batches per epoch, 2 epochs: steps 0..5, sampled 0, 2, 4
    code, out, err = run_report(tmp_path / "wine", "--json", capsys=capsys)
    assert code == 0, err
    runs = strict_json(out)["runs"]
    assert [os.path.basename(r["run"]) for r in runs] == ["run-000", "run-001"]
    for r, cb in zip(runs, nets):
        assert r["run"] == cb.run_dir_
        assert (r["first_step"], r["last_step"], r["sampled_steps"]) == (0, 4, 3)
        assert [(lay["name"], lay["kind"]) for lay in r["layers"]] == [("dense0.relu", "relu"), ("dense1.relu", "relu")]
        assert [(a["step"], a["layer"], a["kind"], a["recovered"]) for a in r["alerts"]] == [
            (a.step, a.layer, a.kind, a.recovered) for a in cb.alerts
        ]
        dead = r["layers"][0]["dead_fraction"]["last"]
        assert dead == pytest.approx(cb.health()["dense0.relu"].dead_fraction)
    assert runs[0]["layers"][0]["dead_fraction"]["last"] == 1.0 and runs[1]["alerts"] == []
    code, out, _ = run_report(tmp_path / "wine", capsys=capsys)
    assert "dense0.relu  relu" in out and "dead@0" in out


# -- entry points ---------------------------------------------------------------------------------
def test_entry_points(plain, capsys):
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"activation-monitor": "monitor.report:main"}
    root = plain[0]
    # the console script takes the same arguments, with or without the word "report"
    assert R.main([str(root / "runs" / "dead"), "--fail-on", "dead"]) == 1
    assert R.main(["report", str(root / "runs" / "dead"), "--fail-on", "dormant"]) == 0
    from monitor.__main__ import main as module_main

    capsys.readouterr()
    assert module_main([]) == 2 and "usage: python -m monitor report" in capsys.readouterr().err


def test_the_report_imports_no_torch(plain):
    """`import monitor` is lazy (PEP 562): the report, terminal and --json, starts without torch."""
    code = (
        "import sys\n"
        "from monitor.__main__ import main\n"
        f"assert main(['report', {str(plain[0] / 'runs')!r}, '--json']) == 0\n"
        "assert main(['report', " + repr(str(plain[0] / "runs")) + "]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'PIL'))\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr


def test_number_and_percent_formats_of_the_table():
    """The table's two formats, spelled out (the table tests above format their ground truth with them)."""
    values = (0.0, 0.00123456, 12.3456, 123456.0, -2.5e-5, float("nan"), float("inf"))
    assert [formatting.num(v) for v in values] == ["0", "0.00123", "12.3", "1.23e+05", "-2.50e-05", "nan", "inf"]
    fractions = (0.0, 0.001, 0.25, 0.996, 1.0, float("nan"))
    assert [formatting.pct(v) for v in fractions] == ["0%", "<1%", "25%", ">99%", "100%", "nan"]
