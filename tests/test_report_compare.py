"""``python -m monitor report --compare RUN_A RUN_B``: a killed run against the same run with its init fixed.

Both runs come from the real training loop of tests/test_report.py (``train_plain``): in "killed"
act2's bias is -100 from the start (dead, and no gradient reaches act0/act1 through it), in "fixed"
the bias is set to 1 before the first step (the fix of the init). act1 is saturated in both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re

import numpy as np
import pytest
from test_report import train_plain

from monitor import report as R
from monitor.report import compare as C
from monitor.report.summary import Episode


def report(*args, columns: int = 160) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", str(columns))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = R.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    killed, _ = train_plain(root / "killed")
    fixed, _ = train_plain(root / "fixed", revive_at=0)
    return root, killed, fixed


def test_terminal(runs):
    root = runs[0]
    code, out, err = report("--compare", root / "killed", root / "fixed")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert (
        lines[0] == f"A  {root / 'killed'}: steps 0..10 (6 sampled), alerts: saturated 1 (1 active), dead 1 (1 active)"
    )
    assert lines[1] == f"B  {root / 'fixed'}: steps 0..10 (6 sampled), alerts: saturated 1 (1 active)"
    assert lines[2] == "3 layers matched by name; only in A: 0, only in B: 0; 3 differ"
    head = re.split(r"\s{2,}", lines[3])
    assert head == ["layer", "kind", "dead/sat worst A → B", "last A → B", "RMS last A → B", "grad RMS last A → B",
                    "alerts A", "alerts B"]  # fmt: skip
    rows = {ln.split()[0]: ln for ln in lines[4:7]}
    act2 = re.split(r"\s{2,}", rows["act2"])
    # dead in A from step 0 to the end; alive in B: every number that matters is marked
    assert act2[:4] == ["act2 *", "relu", "dead 100% → 0% *", "100% → 0% *"]
    assert re.fullmatch(r"0 → [\d.]+ \*", act2[4])  # RMS: 0 against a live layer's
    assert act2[-1] == "dead@0 *"  # an alert of run A only (alerts B is empty)
    act1 = re.split(r"\s{2,}", rows["act1"])
    assert act1[1:4] == ["tanh", "sat 75% → 75%", "75% → 75%"]  # saturated in both: not marked
    assert act1[-2:] == ["saturated@0", "saturated@0"]
    # no gradient reached act0/act1 through the dead act2 in A: 0 against B's, marked
    assert re.search(r"  0 → [\d.e-]+ \*(  |$)", rows["act0"]) and re.search(r"  0 → [\d.e-]+ \*  ", rows["act1"])
    assert lines[7].startswith("* differs: alerts (fired / active at end), dead/sat by > 0.1, RMS by > 10x")


def test_json(runs):
    root, killed, fixed = runs
    code, out, err = report("--compare", root / "killed", root / "fixed", "--json", "--fail-on", "dead")
    assert code == 1 and "dead in act2 since step 0" in err  # --fail-on still gates, over both runs
    doc = json.loads(out)
    assert doc["fail_on"] == ["dead"] and [f["run"] for f in doc["failed"]] == [str(root / "killed")]
    c = doc["compare"]
    _, plain, _ = report(root / "killed", root / "fixed", "--json")
    assert [c["a"], c["b"]] == json.loads(plain)["runs"]  # each run as in the plain report
    assert c["matched_by"] == "name" and c["thresholds"] == {"fraction_change": 0.1, "rms_factor": 10.0}
    layers = {lay["name"]: lay for lay in c["layers"]}
    assert layers["act2"]["differences"] == ["alerts", "dead_fraction", "rms"]
    assert layers["act1"]["differences"] == ["grad_rms"] and layers["act0"]["differences"] == ["grad_rms"]
    a, b = layers["act2"]["a"], layers["act2"]["b"]
    assert a["dead_fraction"] == {"worst": 1.0, "last": 1.0} and b["dead_fraction"]["last"] < 0.5
    assert a["rms_last"] == 0 and b["rms_last"] > 0.1
    assert a["alerts"] == [{"kind": "dead", "step": 0, "recovered_step": None}] and b["alerts"] == []
    assert [(x.step, x.layer, x.kind) for x in killed.alerts if x.layer == "act2"] == [(0, "act2", "dead")]
    assert not [x for x in fixed.alerts if x.layer == "act2"]
    assert c["differing"] == ["act0", "act1", "act2"]
    # a run against itself: nothing differs
    code, out, _ = report("--compare", root / "fixed", root / "fixed", "--json")
    assert code == 0 and json.loads(out)["compare"]["differing"] == []


def test_html(runs, tmp_path):
    root = runs[0]
    page = tmp_path / "c.html"
    code, out, err = report("--compare", root / "killed", root / "fixed", "--html", page)
    assert code == 0 and err == "" and out.startswith("A  ")
    text = page.read_text()
    compare = text[text.index('<section class="run" id="compare">') : text.index("</section>")]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", compare)
    act2 = next(r for r in rows if ">act2" in r)
    assert '<td class="diff">dead 100% → 0% *</td>' in act2 and '<td class="diff">dead@0 *</td>' in act2
    assert 'id="run-1"' in text and 'id="run-2"' in text and 'href="#compare"' in text  # and both runs in full


def test_rules():
    def side(dead=None, rms=1.0, grad=None, alerts=()):
        fractions = {} if dead is None else {"dead_fraction": dead}
        return C.Side("relu", fractions, rms, grad, [Episode(*a) for a in alerts])

    diff = C._differences
    assert diff(side((0.5, 0.5)), side((0.6, 0.6))) == []  # 0.1 exactly: not more than 0.1
    assert diff(side((0.5, 0.5)), side((0.5, 0.61))) == ["dead_fraction"]  # the last moved
    assert diff(side((0.9, 0.1)), side((0.5, 0.1))) == ["dead_fraction"]  # the worst moved
    assert diff(side(rms=1.0), side(rms=10.0)) == [] and diff(side(rms=1.0), side(rms=10.01)) == ["rms"]
    assert diff(side(rms=5.0), side(rms=0.4)) == ["rms"]  # either way
    assert diff(side(rms=0.0), side(rms=0.0)) == [] and diff(side(rms=0.0), side(rms=1e-9)) == ["rms"]
    assert diff(side(rms=math.nan), side(rms=1.0)) == ["rms"] and diff(side(rms=math.nan), side(rms=math.nan)) == []
    assert diff(side(grad=1e-3), side(grad=1e-5)) == ["grad_rms"] and diff(side(grad=1e-3), side()) == []
    assert diff(side(alerts=[("dead", 0)]), side(alerts=[("dead", 4)])) == []  # the same kind, active in both
    assert diff(side(alerts=[("dead", 0)]), side(alerts=[("dead", 0, 6)])) == ["alerts"]  # recovered in B only
    assert diff(side(alerts=[("dead", 0)]), side(alerts=[("exploding", 0)])) == ["alerts"]
    assert diff(side(), None) == ["only_a"] and diff(None, side()) == ["only_b"]


def test_matching_by_name_then_by_position(runs):
    root = runs[0]
    a, b = (R.summarise(d, f, R.read_run(f)) for d, f in R.find_runs([root / "killed", root / "fixed"]))
    # a layer missing in B, one new in B: matched by name, the others listed as one run's only
    b2 = dataclasses.replace(b, layers=[b.layers[0], b.layers[1], dataclasses.replace(b.layers[2], name="act3")])
    c = C.compare(a, b2)
    assert c.matched_by == "name"
    assert [(r.name, r.differences) for r in c.rows] == [
        ("act0", ["grad_rms"]),
        ("act1", ["grad_rms"]),
        ("act2", ["only_a"]),
        ("act3", ["only_b"]),
    ]
    # no name in common, as many layers: a renamed model, matched by position
    renamed = dataclasses.replace(b, layers=[dataclasses.replace(lay, name="net." + lay.name) for lay in b.layers])
    c = C.compare(a, renamed)
    assert c.matched_by == "position" and [(r.name, r.name_b) for r in c.rows] == [
        (f"act{k}", f"net.act{k}") for k in range(3)
    ]
    assert c.rows[2].differences == ["alerts", "dead_fraction", "rms"]
    assert "3 layers matched by position" in C.header_lines(c)[2]
    assert C.cells(c.rows[2])[0] == ("act2 → net.act2", True)


def test_usage_errors(runs):
    root = runs[0]
    code, out, err = report("--compare", root, root / "fixed")
    assert code == 2 and out == "" and f"{root}: 2 runs under this directory (fixed, killed)" in err
    code, _, err = report(root / "fixed", "--compare", root / "killed", root / "fixed")
    assert code == 2 and "not both" in err
    code, _, err = report()
    assert code == 2 and "RUN_DIR" in err
    code, _, err = report("--compare", root / "killed")
    assert code == 2 and "--compare" in err


def test_the_terminal_width(runs):
    root = runs[0]
    _, out, _ = report("--compare", root / "killed", root / "fixed", columns=100)
    table = out.splitlines()[3:7]
    assert max(map(len, table)) <= 110  # the alert columns are shortened first
    assert np.all([ln.split()[0] in ("layer", "act0", "act1", "act2") for ln in table])
