"""The Wine classifier trained through skorch, watched by the ActivationMonitor callback, with
the test set as its probe.

    python examples/wine_skorch.py            # normal settings: per-layer health, the probe film
    python examples/wine_skorch.py --seed 1   # two units of dense1 die during training (dark columns)
    python examples/wine_skorch.py --bad      # dense0 bias initialised to -10: the dead alert fires at step 0
    python examples/wine_skorch.py --seed 1 --probe-png docs/probe_wine.png   # the README picture
    tensorboard --logdir runs/wine --samples_per_plugin images=100

Besides the monitor's own output (scalars, histograms, ``activation_scan``,
``activation_timeline/<layer>``) the probe gives the heatmap the seed author looked at by eye
(shared/seeds/004), for every layer and at every probe run: ``activation_probe/<layer>``, the
test set (rows, grouped by wine class) x units, colour: |activation| / the largest. A unit
silent on every test sample is a dark column; the same unit is the same column in every image,
so the images of a run are a film of training.

A unit silent on the test samples is not necessarily dead: the monitor calls a unit dead only if
it never fired on any training value of its evidence (here: the last epoch's training batch).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations.skorch import ActivationMonitor
from monitor import MonitorWarning, Thresholds


class WineClassifier(nn.Module):
    def __init__(self, num_units: int = 20, dense0_bias: float | None = None) -> None:
        super().__init__()
        self.dense0 = nn.Linear(13, num_units)
        if dense0_bias is not None:  # the deliberately bad setting (--bad)
            nn.init.constant_(self.dense0.bias, dense0_bias)
        self.dense1 = nn.Linear(num_units, 10)
        self.output = nn.Linear(10, 3)

    def forward(self, X):
        X = self.dense0(X)
        X = self.dense1(F.relu(X))
        X = self.output(F.relu(X))
        return X


def compose_probe_film(run_dir: str, layer: str, path: str) -> list[int]:
    """The monitor's ``activation_probe/<layer>`` images at the first, middle and last probe run,
    side by side in one PNG (as they are in the event file, pixel for pixel); returns their steps."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir, size_guidance={"images": 0})
    ea.Reload()
    events = ea.Images(f"activation_probe/{layer}")
    chosen = [events[0], events[len(events) // 2], events[-1]] if len(events) >= 3 else events
    images = [Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB") for e in chosen]
    gap = 12
    film = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        film.paste(im, (x, 0))
        x += im.width + gap
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    film.save(path, optimize=True)
    return [e.step for e in chosen]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bad", action="store_true", help="initialise dense0's bias to -10 (all its ReLUs dead)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="sample every N training batches")
    p.add_argument("--logdir", default="runs/wine", help="base log directory (each fit gets a run-NNN subdirectory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-png", default=None, help="save the probe heatmaps of --probe-layer at three points of training here")
    p.add_argument("--probe-layer", default="dense1.relu")
    args = p.parse_args(argv)

    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from skorch import NeuralNetClassifier

    X, y = load_wine(return_X_y=True)
    X = X.astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
    scaler = StandardScaler().fit(X_train)
    X_train = scaler.transform(X_train).astype(np.float32)
    X_test = scaler.transform(X_test).astype(np.float32)

    torch.manual_seed(args.seed)
    # skorch's defaults (batch_size 128, 20% held out for validation) give 1 training batch of
    # 113 samples per epoch, more than `min_positions` (100): each sampled step is judged on its
    # own batch; `window=2` caps how far back the evidence of smaller batches may reach.
    monitor = ActivationMonitor(
        every_n_steps=args.every,
        thresholds=Thresholds(window=2),
        logdir=args.logdir,
        on_alert="ignore",  # printed below instead of warned
        probe=(X_test, y_test),  # the test set, invisibly to training, at every sampled step
        probe_every_n_samples=1,
        probe_labels=[f"class {c}" for c in y_test],
    )
    net = NeuralNetClassifier(
        WineClassifier,
        module__num_units=20,
        module__dense0_bias=-10.0 if args.bad else None,
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=0.01,
        max_epochs=args.epochs,
        verbose=0,
        callbacks=[monitor],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)
        net.fit(X_train, y_train)

    health = monitor.health()
    print(f"{'bad' if args.bad else 'normal'} run: {len(net.history)} epochs, {monitor.step_} training batches, "
          f"test accuracy {float((net.predict(X_test) == y_test).mean()):.3f}")
    print(f"{'layer':<14}{'units':>6}{'dead':>7}{'firing':>8}{'rms':>9}{'max|a|':>9}  dead units")
    for name, h in health.items():
        dead = "-" if h.dead_fraction is None else f"{h.dead_fraction:.2f}"
        firing = "-" if h.firing_rate is None else f"{h.firing_rate:.2f}"
        print(f"{name:<14}{h.units:>6}{dead:>7}{firing:>8}{h.rms:>9.3g}{h.max_abs:>9.3g}  {list(h.dead_units)}")

    # The seed's heatmap, from the last probe run: the test set x units of dense0 after its ReLU.
    probe = monitor.last_probe
    acts = probe.activations["dense0.relu"]
    silent = {layer: np.flatnonzero((m <= 0).all(axis=0)).tolist() for layer, m in probe.activations.items()}
    dead0 = list(health["dense0.relu"].dead_units) if "dense0.relu" in health else []
    print(f"dense0: dead units (monitor, training window): {dead0}")
    print(f"units silent on all {acts.shape[0]} test samples (last probe, step {probe.step}): {silent}")
    unit = int(np.abs(acts).mean(axis=0).argmax())
    tops = ", ".join(f"#{t.sample} ({t.label}) {t.value:.2f}" for t in probe.top("dense0.relu", unit, 3))
    print(f"dense0: most active unit {unit}, its favourite test samples: {tops}")
    alerts = [a for a in monitor.alerts if not a.recovered]
    for a in alerts[:5]:
        print(f"ALERT {a.message}")
    if not alerts:
        print("no alerts")

    run_dir = monitor.run_dir_
    print(f"TensorBoard logs: {run_dir}  (tensorboard --logdir {args.logdir})")
    if args.probe_png:
        steps = compose_probe_film(run_dir, args.probe_layer, args.probe_png)
        print(f"{args.probe_png}: activation_probe/{args.probe_layer} at steps {steps}")
    return {"net": net, "monitor": monitor, "health": health, "alerts": alerts, "run_dir": run_dir,
            "dense0_dead": dead0, "silent_on_test_set": silent, "probe": probe}


if __name__ == "__main__":
    main()
