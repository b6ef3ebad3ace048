"""The run report reads a run's configuration: the text tag ``run_config``, one JSON object.

The runs are real (``train_plain`` of tests/test_report.py, copied per setting); the
configuration is written here, into a second event file of the monitor's format in each run
directory, with TensorBoard's own text summary (the proto ``SummaryWriter.add_text`` writes), so
these tests do not depend on the writer side (``Monitor(run_config=...)``); one test at the end
reads what that writer writes, where it exists.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_report import BATCH, EVERY, train_plain

from monitor import Monitor
from monitor import report as R

BASE = {"batch_size": 128, "model": {"hidden": 32, "act": "relu"}, "optimizer": "SGD"}


def report(*args, columns: int = 200) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", str(columns))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = R.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def write_config(run_dir: Path, text: str, tag: str = "run_config", step: int = 0) -> None:
    """``text`` under ``tag`` in a new monitor-format event file of ``run_dir`` (``/text_summary`` added by
    TensorBoard's text summary, as SummaryWriter.add_text does; ``plain=...`` tags are written as given)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.summary import text as text_summary

    from monitor.eventfile import EventFileWriter

    summary = text_summary(tag, text)
    if tag.startswith("plain="):  # the bare tag, as a writer that adds no suffix would write it
        value = summary.value[0]
        summary = Summary(value=[Summary.Value(tag=tag[6:], metadata=value.metadata, tensor=value.tensor)])
    w = EventFileWriter(run_dir)
    w.add_summary(summary, step)
    w.close()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """grid/run-000..003: lr x fold; run-004: no configuration; other/run-000: another experiment's keys."""
    root = tmp_path_factory.mktemp("config")
    template = root / "template"
    train_plain(template)
    configs = [{**BASE, "lr": lr, "fold": fold} for lr in (0.1, 0.01) for fold in (0, 1)]
    for k, cfg in enumerate(configs):
        shutil.copytree(template, root / "grid" / f"run-{k:03d}")
        tag = "run_config" if k % 2 == 0 else "plain=run_config"
        write_config(root / "grid" / f"run-{k:03d}", json.dumps(cfg, sort_keys=True), tag)
    shutil.copytree(template, root / "grid" / "run-004")
    shutil.copytree(template, root / "other" / "run-000")
    write_config(root / "other" / "run-000", json.dumps({"model": "WineClassifier", "max_epochs": 20}))
    return root, configs


def test_terminal_and_json(grid):
    root, configs = grid
    code, out, err = report(root / "grid", root / "other")
    assert code == 0 and err == ""
    lines = out.splitlines()
    runs = [ln for ln in lines if ln.startswith(str(root))]
    assert [ln.split(": ", 1)[0] for ln in runs] == [
        f"{root / 'grid' / 'run-000'} [fold=0 lr=0.1]",
        f"{root / 'grid' / 'run-001'} [fold=1 lr=0.1]",
        f"{root / 'grid' / 'run-002'} [fold=0 lr=0.01]",
        f"{root / 'grid' / 'run-003'} [fold=1 lr=0.01]",
        str(root / "grid" / "run-004"),  # no configuration: nothing to tell
        str(root / "other" / "run-000"),  # alone in its group (other keys): its line is plain
    ]
    config_lines = [lines[lines.index(r) + 1] for r in runs]
    assert config_lines[0] == '  config: batch_size=128 fold=0 lr=0.1 model={"act":"relu","hidden":32} optimizer=SGD'
    assert not config_lines[4].startswith("  config:")  # the table follows directly
    assert config_lines[5] == "  config: model=WineClassifier max_epochs=20"  # in the order written
    code, out, _ = report(root / "grid", root / "other", "--json")
    doc = json.loads(out)
    assert [r["config"] for r in doc["runs"]] == [*configs, None, {"model": "WineClassifier", "max_epochs": 20}]
    assert [r["config_differs"] for r in doc["runs"]] == [["fold", "lr"]] * 4 + [[], []]
    # one run alone: nothing differs within its group, the configuration is still shown
    code, out, _ = report(root / "grid" / "run-001")
    assert out.startswith(f"{root / 'grid' / 'run-001'}: steps") and "\n  config: batch_size=128 fold=1" in out


def test_html(grid, tmp_path):
    root = grid[0]
    page = tmp_path / "r.html"
    assert report(root / "grid", "--html", page)[0] == 0
    text = page.read_text()
    section = text[text.index('id="run-2"') : text.index('id="run-3"')]
    assert f"{root / 'grid' / 'run-001'} [fold=1 lr=0.1]" in section  # the heading says what tells it apart
    table = section[section.index('<table class="config">') : section.index("</table>")]
    assert '<tr class="differs"><th>lr</th><td>0.1</td></tr>' in table
    assert '<tr class=""><th>optimizer</th><td>SGD</td></tr>' in table
    assert "<th>model</th><td>{&quot;act&quot;:&quot;relu&quot;,&quot;hidden&quot;:32}</td>" in table
    assert f'<a href="#run-2">{root / "grid" / "run-001"} [fold=1 lr=0.1]</a>' in text  # and the contents


def test_compare_shows_the_settings_that_differ(grid):
    root = grid[0]
    code, out, _ = report("--compare", root / "grid" / "run-000", root / "grid" / "run-003")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"A  {root / 'grid' / 'run-000'} [fold=0 lr=0.1]: ")
    assert lines[2] == "config: fold 0 → 1; lr 0.1 → 0.01"
    _, out, _ = report("--compare", root / "grid" / "run-000", root / "other" / "run-000", "--json")
    diffs = json.loads(out)["compare"]["config_differences"]
    assert {d["key"]: (d["a"], d["b"], d["in"]) for d in diffs} == {
        "batch_size": (128, None, "a"),
        "fold": (0, None, "a"),
        "lr": (0.1, None, "a"),
        "model": ({"act": "relu", "hidden": 32}, "WineClassifier", "both"),
        "optimizer": ("SGD", None, "a"),
        "max_epochs": (None, 20, "b"),
    }


def test_bad_and_changing_configurations(grid, tmp_path):
    template = grid[0] / "template"
    cases = {
        "not-json": (["{lr: 0.1"], None, "run_config is not JSON"),
        "a-list": (['[{"lr": 0.1}]'], None, "run_config is a JSON list, not an object"),
        "changed": (['{"lr": 0.1}', '{"lr": 0.1}', '{"lr": 0.05}'], {"lr": 0.05}, "2 different run_config values"),
        "nan": (['{"lr": NaN, "clip": Infinity}'], {"lr": "NaN", "clip": "Infinity"}, None),
    }
    for name, (texts, want, note) in cases.items():
        d = tmp_path / name
        shutil.copytree(template, d)
        for step, text in enumerate(texts):
            write_config(d, text, step=step)
        code, out, err = report(d, "--json")
        assert code == 0, (name, err)
        run = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))["runs"][0]
        assert run["config"] == want, name
        if note is None:
            assert err == "" and run["notes"] == []
        else:
            assert note in err and "Traceback" not in err and any(note in n for n in run["notes"]), (name, err)
            assert run["sampled_steps"] == 6  # the rest of the report as usual


@pytest.mark.skipif(
    "run_config" not in inspect.signature(Monitor).parameters, reason="this Monitor does not record run_config"
)
def test_what_the_monitor_writes_is_read(tmp_path):
    """The writer side, where it exists: Monitor(run_config=...) -> the report shows it."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    x = torch.randn(BATCH, 4)
    for lr in (0.1, 0.01):
        cfg = {"lr": lr, "optimizer": torch.optim.SGD, "seed": 0}
        with Monitor(model, every_n_steps=EVERY, logdir=str(tmp_path / f"lr{lr}"), run_config=cfg) as mon:
            for step in range(4):
                with mon.step(step):
                    model(x)
    code, out, err = report(tmp_path, "--json")
    assert code == 0 and err == ""
    runs = sorted(json.loads(out)["runs"], key=lambda r: r["config"]["lr"])
    assert [r["config"] for r in runs] == [
        {"lr": 0.01, "optimizer": "SGD", "seed": 0},
        {"lr": 0.1, "optimizer": "SGD", "seed": 0},
    ]
    assert [r["config_differs"] for r in runs] == [["lr"], ["lr"]]
