"""How fast ``python -m monitor report`` reads a large run: 100 layers x 10,000 sampled steps.

The event file is written by the monitor's own TensorBoard writer (``monitor.tensorboard.TensorBoardSink``,
the code a ``Monitor(..., logdir=...)`` writes through: scalars, gradient scalars, parameter norms,
histograms, the scan, timelines, gradient flow and alert text) from synthetic sample records, so it
has the size and layout of a real run: ~100-150 KB per sampled step. A real ``Monitor`` on a
100-layer MLP takes ~70 ms per sampled step on the project's 2-core VM (``every_n_steps=1``),
about 12 minutes for 10,000 sampled steps; this writes the same file in about a minute.

    python benchmarks/report_speed.py [--layers 100] [--steps 10000] [--dir /tmp/report-speed]

prints the file size, the time to write it, and the wall time of ``python -m monitor report DIR``
(terminal, ``--json`` and ``--html``), each a fresh interpreter as a user would run it, and of the reading alone
in this process.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monitor.alerts import Alert
from monitor.health import LayerHealth, ParameterHealth
from monitor.records import LayerSample, SampleRecord
from monitor.stats import GradSummary, UnitSummary, histogram_edges
from monitor.tensorboard import TensorBoardSink

EVERY = 10  # every_n_steps: sampled steps are 0, 10, 20, ...
DEAD_LAYER, DIES_AT = 37, 3000  # (layer index, sample index)
HOT_LAYER, EXPLODES_AT, RECOVERS_AT = 60, 7000, 8000


def _summary(rng: np.random.Generator, units: int, relu: bool) -> tuple[UnitSummary, np.ndarray]:
    positions = 128
    mx = rng.uniform(0.5, 3.0, units)
    s = UnitSummary(
        positions=positions,
        fired=rng.integers(20, 100, units).astype(np.float64) if relu else None,
        max=mx,
        min=np.zeros(units) if relu else -mx,
        sumsq=rng.uniform(10, 60, units),
        nonfinite=np.zeros(units),
        at_bound=None if relu else rng.integers(0, 5, units).astype(np.float64),
        sumabs=rng.uniform(10, 60, units),
        grad=GradSummary(positions, rng.uniform(1e-6, 1e-5, units), rng.uniform(1e-3, 1e-2, units)),
    )
    edges = np.asarray(histogram_edges())
    counts = np.zeros(edges.size + 1)
    values = np.abs(rng.normal(0, 1, 1024)) if relu else np.tanh(rng.normal(0, 1, 1024))
    if relu:
        values[:400] = 0.0
    np.add.at(counts, np.searchsorted(edges, values), 1)
    return s, counts


def write_run(logdir: str, layers: int = 100, steps: int = 10_000, units: int = 64) -> str:
    """One run of ``steps`` sampled steps of ``layers`` layers, written by the monitor's TensorBoard sink."""
    rng = np.random.default_rng(0)
    names = [f"blocks.{i}.act" for i in range(layers)]
    relu = [i % 10 != 9 for i in range(layers)]  # 90 ReLU layers, 10 tanh
    summaries = [_summary(rng, units, r) for r in relu]
    sink = TensorBoardSink(logdir)
    for k in range(steps):
        step = k * EVERY
        samples = []
        for i, name in enumerate(names):
            rms = 0.5 + 0.1 * math.sin(k / 500 + i)
            metrics: dict = {"dormant_fraction": 0.0}
            if relu[i]:
                dead = 0.7 if (i == DEAD_LAYER and k >= DIES_AT) else 0.02 * (1 + math.sin(k / 300 + i))
                metrics["dead_fraction"] = round(dead * units) / units
                if i == DEAD_LAYER and k >= DIES_AT:
                    metrics["dead_margin"] = 40.0
            else:
                metrics["saturated_fraction"] = 0.05
            if i == HOT_LAYER and EXPLODES_AT <= k < RECOVERS_AT:
                rms *= 1e3
            health = LayerHealth(
                name,
                "relu" if relu[i] else "tanh",
                units,
                step,
                rms=rms,
                max_abs=4 * rms,
                nonfinite=0,
                firing_rate=0.5 if relu[i] else None,
                evidence_values=128,
                evidence_steps=1,
                metrics=metrics,
                grad_rms=1e-3 * (1 + 0.05 * math.cos(k / 700)),
                grad_max_abs=1e-2,
                grad_nonfinite=0,
            )
            s, counts = summaries[i]
            samples.append(LayerSample(name, health.kind, health, s, counts, 1.0))
        params = [
            ParameterHealth(f"blocks.{i}.linear.{p}", step, grad_norm=0.01, update_ratio=1e-3)
            for i in range(layers)
            for p in ("weight", "bias")
        ]
        alerts = []
        if k == DIES_AT:
            msg = (
                f"step {step} | {names[DEAD_LAYER]} | dead: {round(0.7 * units)}/{units} units (70%) never fired (> 0) "
                "on 128 values each over the last sampled step, threshold 50% | likely a learning rate too high"
            )
            alerts.append(Alert(step, names[DEAD_LAYER], "dead", 0.7, 0.5, msg))
        if k == EXPLODES_AT:
            msg = f"step {step} | {names[HOT_LAYER]} | exploding: RMS 500 > 1e+03 | likely a learning rate too high"
            alerts.append(Alert(step, names[HOT_LAYER], "exploding", 500.0, 1e3, msg))
        if k == RECOVERS_AT + 1:
            msg = f"step {step} | {names[HOT_LAYER]} | recovered from exploding: now RMS 0.5, max |activation| 2"
            alerts.append(Alert(step, names[HOT_LAYER], "exploding", 0.5, 1e3, msg, True))
        sink.write(SampleRecord(step, samples, alerts, params))
        if k % 64 == 63:
            sink.batch_done()
    sink.close()
    return sink.path or logdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--dir", default="/tmp/report-speed")
    ap.add_argument("--keep", action="store_true", help="reuse the run in --dir if it exists")
    args = ap.parse_args()
    logdir = os.path.join(args.dir, f"run-{args.layers}x{args.steps}")
    if not (args.keep and os.path.isdir(logdir)):
        if os.path.isdir(logdir):
            for f in os.listdir(logdir):
                os.remove(os.path.join(logdir, f))
        t = time.perf_counter()
        write_run(logdir, args.layers, args.steps)
        print(f"wrote {args.layers} layers x {args.steps} sampled steps in {time.perf_counter() - t:.0f} s")
    size = sum(os.path.getsize(os.path.join(logdir, f)) for f in os.listdir(logdir))
    print(f"event file: {size / 1e6:.0f} MB")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    page = os.path.join(args.dir, "report.html")
    for extra in ([], ["--json"], ["--html", page]):
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "monitor", "report", logdir, *extra], check=True, env=env, stdout=subprocess.DEVNULL
        )
        print(f"python -m monitor report {' '.join(extra)}: {time.perf_counter() - t:.2f} s (fresh interpreter)")
    print(f"  the page: {os.path.getsize(page) / 1e6:.1f} MB")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import monitor"], check=True, env=env)
    print(f"  of which `import monitor` (torch): {time.perf_counter() - t:.2f} s")
    from monitor.report import find_runs, read_run, summarise

    t = time.perf_counter()
    for d, files in find_runs([logdir]):
        rep = summarise(d, files, read_run(files))
    print(
        f"reading and summarising in this process: {time.perf_counter() - t:.2f} s "
        f"({len(rep.sampled_steps)} steps, {len(rep.layers)} layers)"
    )


if __name__ == "__main__":
    main()
