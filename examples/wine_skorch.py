"""The Wine classifier trained through skorch, watched by the ActivationMonitor callback.

    python examples/wine_skorch.py            # normal settings: per-layer health, dead units of dense0
    python examples/wine_skorch.py --bad      # dense0 bias initialised to -10: the dead alert fires at step 0
    tensorboard --logdir runs/wine --samples_per_plugin images=100

Besides the monitor's own output (scalars, histograms, ``activation_scan``,
``activation_timeline/<layer>``) it writes the heatmap the seed author looked at by eye:
``dense0_relu_samples_x_units``, the activations of dense0 after its ReLU for 5 test samples
(rows: samples, columns: units, colour: activation / largest activation).

A unit that is 0 for those 5 samples is not necessarily dead: the monitor calls a unit dead only
if it never fired on any training value of its evidence (here: the last epoch's training batch).
"""

from __future__ import annotations

import argparse
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
from monitor.render import Picture, color_index


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


def heatmap(values: np.ndarray, cell: int = 16) -> Picture:
    """A samples x units heatmap (values scaled by their maximum), each cell ``cell`` pixels wide."""
    v = np.asarray(values, dtype=np.float64)
    top = v[np.isfinite(v)].max() if np.isfinite(v).any() else 0.0
    scaled = v / top if top > 0 else np.zeros_like(v)
    rows, cols = scaled.shape
    left, head = 24, 18
    pic = Picture(head + rows * cell + 4, left + cols * cell + 4)
    pic.pixels[head : head + rows * cell, left : left + cols * cell] = np.kron(
        color_index(scaled), np.ones((cell, cell), dtype=np.uint8)
    )
    pic.labels([((left, 3), "dense0 after ReLU: samples x units", "left")])
    pic.labels([((left - 4, head + i * cell + 2), str(i), "right") for i in range(rows)])
    return pic


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bad", action="store_true", help="initialise dense0's bias to -10 (all its ReLUs dead)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="sample every N training batches")
    p.add_argument("--logdir", default="runs/wine", help="base log directory (each fit gets a run-NNN subdirectory)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from skorch import NeuralNetClassifier
    from torch.utils.tensorboard import SummaryWriter

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

    # The seed's heatmap: dense0 after ReLU for 5 test samples.
    with torch.no_grad():
        acts = F.relu(net.module_.dense0(torch.as_tensor(X_test[:5]))).numpy()
    silent = np.flatnonzero((acts <= 0).all(axis=0)).tolist()
    dead0 = list(health["dense0.relu"].dead_units) if "dense0.relu" in health else []
    print(f"dense0: dead units (monitor, training window): {dead0}")
    print(f"dense0: units silent on the 5 test samples of the heatmap: {silent}")
    alerts = [a for a in monitor.alerts if not a.recovered]
    for a in alerts[:5]:
        print(f"ALERT {a.message}")
    if not alerts:
        print("no alerts")

    run_dir = monitor.run_dir_
    writer = SummaryWriter(log_dir=run_dir)
    try:
        writer.add_image("dense0_relu_samples_x_units", heatmap(acts).rgb(), monitor.step_, dataformats="HWC")
    finally:
        writer.close()
    print(f"TensorBoard logs: {run_dir}  (tensorboard --logdir {args.logdir})")
    return {"net": net, "monitor": monitor, "health": health, "alerts": alerts, "run_dir": run_dir,
            "dense0_dead": dead0, "dense0_silent_on_samples": silent}


if __name__ == "__main__":
    main()
