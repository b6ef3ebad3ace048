"""The README's demo runs and shows what it promises."""

import os
import runpy

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    return runpy.run_path(os.path.join(ROOT, "examples", name), run_name="example")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quickstart_catches_the_pathology_and_stays_silent_when_healthy(tmp_path, capsys):
    main = load("quickstart.py")["main"]
    mon = main(["--steps", "30", "--logdir", str(tmp_path / "bad")])
    kinds = {(a.layer, a.kind) for a in mon.alerts if not a.recovered}
    assert ("relu2", "dead") in kinds
    out = capsys.readouterr().out
    assert "ALERT step 10 | relu2 | dead" in out and str(tmp_path / "bad") in out
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "bad"))
    healthy = main(["--steps", "30", "--lr", "1e-3", "--logdir", str(tmp_path / "ok")])
    assert healthy.alerts == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_vanishing_gradients_example_alerts_at_step_0_and_its_fix_is_silent(tmp_path, capsys):
    main = load("vanishing_gradients.py")["main"]
    mon = main(["--logdir", str(tmp_path / "bad")])
    first = {a.layer: a.step for a in mon.alerts if a.kind == "vanishing_gradient" and not a.recovered}
    assert first["act0"] == 0 and "act19" not in first
    assert mon.parameter_health()["fc0.weight"].update_ratio < 1e-12  # the first layer does not learn
    out = capsys.readouterr().out
    assert "ALERT step 0 | act0 | vanishing gradient" in out
    healthy = main(["--fix", "--logdir", str(tmp_path / "ok")])
    assert healthy.alerts == []
    assert healthy.parameter_health()["fc0.weight"].update_ratio > 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hf_trainer_example_catches_the_exploding_residual_stream_and_its_fix_is_silent(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    main = load("hf_trainer.py")["main"]
    mon = main(["--steps", "30", "--output-dir", str(tmp_path / "bad")])
    first = {(a.layer, a.kind): a.step for a in mon.alerts if not a.recovered}
    assert first[("transformer.h.0", "exploding")] == 10 and first[("transformer.h.1", "exploding")] == 10
    out = capsys.readouterr().out
    assert "ALERT step 10 | transformer.h.0 | exploding" in out
    # the monitor's event file is in the Trainer's own TensorBoard run directory
    files = os.listdir(mon.log_dir)
    assert any(f.endswith(".activation-monitor") for f in files) and any(f[-1].isdigit() for f in files)
    assert os.path.dirname(os.path.dirname(mon.log_dir)) == str(tmp_path / "bad")
    healthy = main(["--fix", "--steps", "30", "--output-dir", str(tmp_path / "ok")])
    assert healthy.alerts == []
