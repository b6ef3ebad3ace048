"""Quickstart: a plain PyTorch loop whose learning rate is too high, and the monitor catching it.

    python examples/quickstart.py                 # lr 0.3: ReLU units die within ten steps
    python examples/quickstart.py --lr 1e-3       # a healthy run: no alerts
    tensorboard --logdir runs --samples_per_plugin images=100

A 13 -> 256 -> 256 -> 3 ReLU MLP on scikit-learn's Wine data (bundled, no download).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monitor import Monitor, MonitorWarning


def main(argv: list[str] | None = None) -> Monitor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, default=0.3, help="Adam learning rate (0.3: too high; 1e-3: healthy)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=10, help="sample every N steps")
    p.add_argument("--logdir", default=None, help="TensorBoard run directory (default runs/quickstart-lr<lr>)")
    args = p.parse_args(argv)

    from sklearn.datasets import load_wine
    from sklearn.preprocessing import StandardScaler

    X, y = load_wine(return_X_y=True)
    X = torch.tensor(StandardScaler().fit_transform(X).astype(np.float32))
    y = torch.tensor(y)

    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(13, 256), relu1=nn.ReLU(), fc2=nn.Linear(256, 256), relu2=nn.ReLU(), head=nn.Linear(256, 3)
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    logdir = args.logdir or os.path.join("runs", f"quickstart-lr{args.lr:g}")
    g = torch.Generator().manual_seed(0)

    warnings.simplefilter("ignore", MonitorWarning)  # we print the alerts ourselves below
    with Monitor(model, every_n_steps=args.every, logdir=logdir, on_alert=lambda a: print("ALERT", a.message)) as mon:
        for step in range(args.steps):
            idx = torch.randint(0, len(X), (128,), generator=g)
            with mon.step(step):  # hooks exist only on sampled steps
                loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    print(f"\nfinal loss {loss.item():.4f}; layer health at step {max(h.step for h in mon.health().values())}:")
    for name, h in mon.health().items():
        dead = f"{h.dead_fraction:.0%} dead" if h.dead_fraction is not None else ""
        print(f"  {name:8s} {h.kind:6s} units={h.units:4d} rms={h.rms:10.3g} max|a|={h.max_abs:10.3g} {dead}")
    print(f"\n{len([a for a in mon.alerts if not a.recovered])} alert(s). TensorBoard logs: {os.path.abspath(logdir)}")
    print(f"  tensorboard --logdir {logdir} --samples_per_plugin images=100")
    return mon


if __name__ == "__main__":
    main()
