"""Vanishing gradients: a deep sigmoid MLP whose first layers never learn, caught at step 0.

    python examples/vanishing_gradients.py               # 20 sigmoid layers, default init, SGD
    python examples/vanishing_gradients.py --fix         # the same depth with ReLU + He init: silent
    tensorboard --logdir runs --samples_per_plugin images=100

scikit-learn's digits (bundled, no download), 64 -> 20 x 64 -> 10. The whole training step
(forward, loss, backward, optimizer step) runs inside ``with mon.step(step):``, so the monitor
also sees each layer's gradient and each parameter's update. The sigmoid's slope is at most 1/4:
twenty of them shrink the gradient by ~1e-15 before it reaches the first layer, whose weights then
move by ~1e-17 of their size per step, i.e. not at all. The "gradient flow" image in TensorBoard
(layers x sampled steps) shows it as a dark band from the input down.
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


def build(depth: int, fix: bool) -> nn.Sequential:
    layers: list = []
    d = 64
    for i in range(depth):
        lin = nn.Linear(d, 64)
        if fix:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers += [(f"fc{i}", lin), (f"act{i}", nn.ReLU() if fix else nn.Sigmoid())]
        d = 64
    layers.append(("head", nn.Linear(d, 10)))
    return nn.Sequential(OrderedDict(layers))


def main(argv: list[str] | None = None) -> Monitor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fix", action="store_true", help="ReLU + He init instead of sigmoid + default init")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10, help="sample every N steps")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate")
    p.add_argument("--logdir", default=None, help="TensorBoard run directory (default runs/vanishing[-fix])")
    args = p.parse_args(argv)

    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor((X / 16.0).astype(np.float32))
    y = torch.tensor(y)

    torch.manual_seed(0)
    model = build(args.depth, args.fix)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    logdir = args.logdir or os.path.join("runs", "vanishing-fix" if args.fix else "vanishing")
    g = torch.Generator().manual_seed(0)

    def show(alert):  # one line per alert: which layer, what, and the likely cause
        print("ALERT" if not alert.recovered else "RECOVERED", alert.message.split(" | likely")[0])

    warnings.simplefilter("ignore", MonitorWarning)  # we print the alerts ourselves
    with Monitor(model, every_n_steps=args.every, logdir=logdir, on_alert=show) as mon:
        for step in range(args.steps):
            idx = torch.randint(0, len(X), (64,), generator=g)
            with mon.step(step):  # the whole step: gradients and updates are seen too
                loss = F.cross_entropy(model(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()

    health, params = mon.health(), mon.parameter_health()
    print(f"\nfinal loss {loss.item():.3f}; at step {max(h.step for h in health.values())}:")
    print(f"  {'layer':6s} {'gradient RMS':>13s} {'/ near loss':>12s}   {'weight':10s} {'update ratio':>12s}")
    for i, (name, h) in enumerate(health.items()):
        if i % 4 and i != len(health) - 1:
            continue  # every 4th layer, and the last
        w = f"fc{i}.weight"
        ratio = params[w].update_ratio if w in params else None
        print(f"  {name:6s} {h.grad_rms:13.3g} {h.grad_ratio:12.3g}   {w:10s} {ratio if ratio is not None else float('nan'):12.3g}")
    n = len([a for a in mon.alerts if not a.recovered])
    print(f"\n{n} alert(s). TensorBoard: tensorboard --logdir {logdir} --samples_per_plugin images=100")
    return mon


if __name__ == "__main__":
    main()
