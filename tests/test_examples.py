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
