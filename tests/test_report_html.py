"""``python -m monitor report --html``: the page of real runs, opened in a real headless browser.

The runs come from a real training loop (``train_plain`` of tests/test_report.py: act2 killed by its
bias, act1 saturated; "revived": act2 brought back at step 4). The page is opened in Chromium
through the DevTools protocol over a pipe (``--remote-debugging-pipe``), which says what the
browser made of it: the table rows it laid out, the images it decoded (and painted: pixels of a
screenshot), every request it made. Without a Chromium binary those tests are skipped (CI installs
one: .ci/run); the checks on the file itself always run.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from test_report import train_plain

from monitor import report as R
from monitor.report import formatting, svgplot

PROBE = (37, 23, (10, 200, 30))  # width, height, colour of the activation_probe image written below


def report(*args) -> tuple[int, str, str]:
    """The CLI in this process, stdout and stderr captured (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = R.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def write_probe_image(run_dir: Path, step: int, tag: str = "activation_probe/attention") -> None:
    """An ``activation_probe/...`` image, in a second monitor event file of the run (as another writer would add)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    from monitor.eventfile import EventFileWriter

    w, h, colour = PROBE
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
    writer = EventFileWriter(run_dir)
    writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    writer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    dead_mon, _ = train_plain(root / "runs" / "dead")
    revived_mon, _ = train_plain(root / "runs" / "revived", revive_at=4)
    write_probe_image(root / "runs" / "revived", step=10)
    write_probe_image(root / "runs" / "revived", step=10, tag="activation_probe/act2")  # a layer's: with its plots
    return root, dead_mon, revived_mon


@pytest.fixture(scope="module")
def page(runs):
    """The page of both runs (written with --html while --json goes to stdout), and that JSON."""
    root = runs[0]
    path = root / "report.html"
    code, out, err = report(root / "runs", "--html", path, "--json")
    assert code == 0 and err == "", err
    return path, json.loads(out)


# -- the file itself ------------------------------------------------------------------------------
class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def test_the_file_is_self_contained(page):
    path, doc = page
    text = path.read_text(encoding="utf-8")
    parser = _Elements()
    parser.feed(text)
    tags = [t for t, _ in parser.elements]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    outside_data = re.sub(r'"data:image/png;base64,[A-Za-z0-9+/=]*"', '""', text)
    assert not re.search(
        r"https?:|//[a-z]", outside_data, re.IGNORECASE
    )  # no URL of any server, not even an SVG namespace
    assert not any(k.startswith("on") for _, a in parser.elements for k in a)  # no event handler attributes
    csp = [a["content"] for t, a in parser.elements if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    refs = [(k, v) for _, a in parser.elements for k, v in a.items() if k in ("src", "href")]
    assert refs and all(v.startswith("#") if k == "href" else v.startswith("data:image/png;base64,") for k, v in refs)
    ids = {a["id"] for _, a in parser.elements if a.get("id")}
    assert all(v[1:] in ids for k, v in refs if k == "href")  # every link lands on this page
    # every image is the PNG the monitor wrote, with its size
    for _, a in parser.elements:
        if "src" in a:
            png = base64.b64decode(a["src"].split(",", 1)[1])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (
                int(a["width"]),
                int(a["height"]),
            )
    assert [r["run"] for r in doc["runs"]] == [str(path.parent / "runs" / n) for n in ("dead", "revived")]


def test_html_to_stdout_and_errors(runs, tmp_path):
    root = runs[0]
    code, out, err = report(root / "runs" / "dead", "--html", "-")
    assert code == 0 and err == "" and out.startswith("<!DOCTYPE html>") and "act2" in out
    code, out, err = report(root / "runs" / "dead", "--html", tmp_path / "no" / "such" / "dir" / "r.html")
    assert code == 2 and "--html" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    code, out, err = report(root / "runs" / "dead", "--html", tmp_path / "r.html", "--fail-on", "dead")
    assert code == 1 and (tmp_path / "r.html").stat().st_size > 0  # the page is written, the gate still fails
    assert out.startswith(str(root / "runs" / "dead"))  # the terminal report as usual


def test_plots_keep_spikes_and_stay_small():
    steps = np.arange(10_000) * 10
    values = np.full(steps.size, 0.5)
    values[7_003] = 1e4  # one exploding step
    values[9_000] = np.nan
    svg = svgplot.render(
        svgplot.Plot("RMS", [svgplot.Line("RMS", steps, values, "#000")], (0, int(steps[-1])), log=True)
    )
    (points,) = re.findall(r'points="([^"]*)"', svg)
    ys = [float(p.split(",")[1]) for p in points.split()]
    assert len(ys) <= 2 * 380  # at most two points per pixel column
    assert min(ys) == pytest.approx(20, abs=0.5)  # the one-step spike survives: it reaches the top (1e4)
    assert ">1e4<" in svg and ">0.1<" in svg and ">step<" in svg  # decades and the axis title
    assert 'stroke="#d62728"' in svg and "NaN/Inf" in svg  # the NaN is marked
    zero = svgplot.render(svgplot.Plot("RMS", [svgplot.Line("RMS", steps[:3], np.zeros(3), "#000")], (0, 20), log=True))
    assert "every value is 0" in zero


# -- in a browser ---------------------------------------------------------------------------------
def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


needs_browser = pytest.mark.skipif(
    chromium() is None,
    reason="no Chromium binary on PATH (chromium, chromium-browser, google-chrome): "
    "`apt-get install -y chromium` runs the browser tests (.ci/run does)",
)


class Browser:
    """Headless Chromium driven through the DevTools protocol on fds 3/4 (``--remote-debugging-pipe``)."""

    def __init__(self, profile: Path) -> None:
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        args = ["--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        # chromium reads the protocol on fd 3 and writes it on fd 4: a small exec wrapper (a fresh,
        # single-threaded process) puts the pipe ends there
        wrapper = (
            "import fcntl, os, sys\n"
            "a, b = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])\n"
            "os.dup2(a, 3); os.dup2(b, 4)\n"
            "os.execv(sys.argv[3], sys.argv[3:])\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(to_child), str(from_child), chromium(), *args],
            pass_fds=(to_child, from_child),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        return self._wait(lambda m: m.get("id") == self._id)["result"]

    def _wait(self, done):
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                m = json.loads(raw)
                if "error" in m:
                    raise RuntimeError(m["error"])
                if done(m):
                    return m
                self.events.append(m)
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk

    def page(self, method: str, **params):
        return self.send(method, session=self.session, **params)

    def open(self, path: Path) -> None:
        self.page("Page.enable")
        self.page("Network.enable")
        self.page("Emulation.setScriptExecutionDisabled", value=True)  # readable without JavaScript
        self.page("Emulation.setDeviceMetricsOverride", width=1280, height=1600, deviceScaleFactor=1, mobile=False)
        self.page("Page.navigate", url=path.as_uri())
        self._wait(lambda m: m.get("method") == "Page.loadEventFired")

    def eval(self, expression: str):
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in r, r
        return r["result"]["value"]

    def screenshot(self, clip: dict | None = None) -> np.ndarray:
        from PIL import Image

        params = {"format": "png", "captureBeyondViewport": True}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        data = base64.b64decode(self.page("Page.captureScreenshot", **params)["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def browser(page, tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        b.open(page[0])
        yield b
    finally:
        b.close()


ROWS = """Array.from(document.querySelectorAll('#run-%d table.layers tbody tr')).map(tr => ({
  cells: Array.from(tr.cells).map(c => c.innerText.trim()), cls: tr.className,
  height: tr.getBoundingClientRect().height, link: (tr.querySelector('a') || {}).hash || null}))"""


@needs_browser
def test_the_browser_loads_nothing_else(browser, page):
    urls = [m["params"]["request"]["url"] for m in browser.events if m.get("method") == "Network.requestWillBeSent"]
    assert urls[0] == page[0].as_uri()
    assert all(u == page[0].as_uri() or u.startswith("data:image/png;base64,") for u in urls), urls
    assert not [m for m in browser.events if m.get("method") == "Network.loadingFailed"]
    assert browser.eval("document.scripts.length") == 0


@needs_browser
def test_tables_as_the_browser_lays_them_out(browser, page, runs):
    _, doc = page
    _, dead_mon, revived_mon = runs
    assert browser.eval("Array.from(document.querySelectorAll('nav a')).map(a => a.hash)") == ["#run-1", "#run-2"]
    assert browser.eval("document.querySelectorAll('section.run').length") == 2
    for i, (run, mon) in enumerate(zip(doc["runs"], (dead_mon, revived_mon)), 1):
        assert browser.eval(f"document.querySelector('#run-{i} .runline').innerText").startswith(run["run"] + ": ")
        rows = browser.eval(ROWS % i)
        head = browser.eval(f"Array.from(document.querySelectorAll('#run-{i} table.layers th')).map(t => t.innerText)")
        assert head == ["layer", "kind", "units", "dead/sat first worst last", "RMS first", "trend", "RMS last",
                        "grad RMS first→last", "alerts"]  # fmt: skip
        assert [r["cells"][0] for r in rows] == [lay["name"] for lay in run["layers"]] == ["act0", "act1", "act2"]
        for row, lay in zip(rows, run["layers"]):
            cells = dict(zip(head, row["cells"]))
            assert row["height"] > 0 and row["link"] == f"#run-{i}-layer-{run['layers'].index(lay) + 1}"
            assert (cells["kind"], cells["units"]) == (lay["kind"], str(lay["units"]))
            assert cells["RMS last"] == formatting.num(float(lay["rms"]["last"]))
            health = lay["dead_fraction"] or lay["saturated_fraction"]
            label = "dead" if lay["dead_fraction"] else "sat"
            want = f"{label} {formatting.pct(health['first'])} {formatting.pct(health['worst'])} {formatting.pct(health['last'])}"
            assert cells["dead/sat first worst last"] == want
        alerts = {r["cells"][0]: (r["cells"][-1], r["cls"]) for r in rows}
        assert alerts["act0"] == ("", "")
        assert alerts["act1"] == ("saturated@0", "active")
        recovered = [a.step for a in mon.alerts if a.layer == "act2" and a.recovered]
        assert alerts["act2"] == (("dead@0", "active") if i == 1 else (f"dead@0-{recovered[0]}", "recovered"))
        logged = browser.eval(f"Array.from(document.querySelectorAll('#run-{i} ul.alerts li')).map(l => l.innerText)")
        assert logged == [("RECOVERED " if a.recovered else "ALERT ") + a.message for a in mon.alerts]


@needs_browser
def test_images_decoded_and_painted(browser):
    images = browser.eval(
        """Array.from(document.images).map(i => ({tag: i.closest('figure').dataset.tag, run: i.closest('section').id,
           layer: (i.closest('.layer') || {}).id || null,
           complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, box: i.getBoundingClientRect().toJSON()}))"""
    )
    by_run = {}
    for im in images:
        assert im["complete"] and im["w"] > 0 and im["h"] > 0, im
        by_run.setdefault(im["run"], set()).add(im["tag"])
    timelines = {f"activation_timeline/act{k}" for k in range(3)}
    assert by_run["run-1"] >= {"activation_scan"} | timelines
    assert by_run["run-2"] >= {"activation_scan", "gradient_flow", "activation_probe/attention"} | timelines
    probe = next(im for im in images if im["tag"] == "activation_probe/attention")
    assert (probe["w"], probe["h"]) == PROBE[:2] and probe["layer"] is None  # no such layer: with the run's images
    assert [(im["layer"], im["w"]) for im in images if im["tag"] == "activation_probe/act2"] == [("run-2-layer-3", 37)]
    assert {im["layer"] for im in images if im["tag"].startswith("activation_timeline/")} == {
        f"run-{i}-layer-{j}" for i in (1, 2) for j in (1, 2, 3)
    }
    # painted: the probe's pixels are its colour; the scan's pixels are a heatmap, not blank
    y = browser.eval("window.scrollY")
    box = probe["box"]
    clip = {"x": box["x"] + 2, "y": box["y"] + y + 2, "width": box["width"] - 4, "height": box["height"] - 4}
    pixels = browser.screenshot(clip).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - PROBE[2]).max(axis=1) <= 3).mean() > 0.95
    scan = next(im for im in images if im["tag"] == "activation_scan")["box"]
    shot = browser.screenshot({"x": scan["x"], "y": scan["y"] + y, "width": scan["width"], "height": scan["height"]})
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 20


@needs_browser
def test_plots_drawn(browser, page):
    _, doc = page
    plots = browser.eval(
        """Array.from(document.querySelectorAll('#run-2 .layer')).map(d => ({id: d.id,
           titles: Array.from(d.querySelectorAll('svg.plot .ptitle')).map(t => t.textContent),
           widths: Array.from(d.querySelectorAll('svg.plot')).map(s => s.getBoundingClientRect().width),
           lines: Array.from(d.querySelectorAll('svg.plot polyline')).map(p => p.points.numberOfItems),
           axes: Array.from(d.querySelectorAll('svg.plot text')).map(t => t.textContent),
           bands: d.querySelectorAll('svg.plot rect[fill-opacity]').length}))"""
    )
    run = doc["runs"][1]
    assert [p["id"] for p in plots] == [f"run-2-layer-{j}" for j in range(1, 4)]
    for p, lay in zip(plots, run["layers"]):
        fraction = "dead fraction" if lay["dead_fraction"] else "saturated fraction"
        assert p["titles"] == [fraction, "RMS (log scale)", "gradient RMS (log scale)"]
        assert all(w > 100 for w in p["widths"])
        assert all(n == run["sampled_steps"] for n in p["lines"][:2])  # one point per sampled step
        assert {"0", "10", "step", "100%"} <= set(p["axes"])  # step range, axis title, fraction axis
        assert p["bands"] == 3 * len(lay["alerts"])  # every alert shaded on every plot of its layer


@needs_browser
def test_compare_page(browser, runs):
    """``--compare ... --html``: the side-by-side table first, laid out, the differences marked; then both runs."""
    root, _, revived_mon = runs
    recovered = next(a.step for a in revived_mon.alerts if a.layer == "act2" and a.recovered)
    path = root / "compare.html"
    code, _, err = report("--compare", root / "runs" / "dead", root / "runs" / "revived", "--html", path)
    assert code == 0 and err == ""
    browser.open(path)
    rows = browser.eval(
        """Array.from(document.querySelectorAll('#compare table.compare tbody tr')).map(tr => ({
           cells: Array.from(tr.cells).map(c => c.innerText.trim()),
           marked: Array.from(tr.cells).map(c => c.classList.contains('diff')),
           height: tr.getBoundingClientRect().height}))"""
    )
    act2 = next(r for r in rows if r["cells"][0].startswith("act2"))
    assert act2["height"] > 0
    assert act2["cells"][2:4] == ["dead 100% → 100%", "100% → 0% *"]  # the worst did not move, the last did
    assert act2["marked"][2:4] == [False, True] and act2["marked"][0]
    assert act2["cells"][-2:] == ["dead@0 *", f"dead@0-{recovered} *"]  # active at the end in A only
    assert browser.eval("Array.from(document.querySelectorAll('nav a')).map(a => a.hash)") == [
        "#compare",
        "#run-1",
        "#run-2",
    ]
