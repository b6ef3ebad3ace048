"""Gate statistics of LSTMs and GRUs on healthy and pathological trainings: the numbers behind the
defaults of ``gate_saturated`` and ``hidden_saturated`` (README, "Recurrent layers").

Runs (CPU, one intra-op thread, seeds fixed), each with ``Monitor(every_n_steps=10)``:
  sine     next value of noisy sine waves (random phase and frequency), 50 steps, batch 32, MSE
  digits   scikit-learn's bundled 8x8 digits read row by row (8 steps of 8 pixels), batch 64,
           cross-entropy on the last step, accuracy on the held-out 30%
Models: a 1-layer LSTM/GRU (hidden 32) on sine; a 2-layer bidirectional LSTM/GRU (hidden 32) on
digits; and the pathologies: an LSTM whose forget-gate bias (a GRU whose update-gate bias) is
+20 or -20 in every layer. Adam, lr 1e-2 (3e-2 for a second healthy LSTM on each task).

For each gate and state, over all sampled steps: the largest ``gate_saturated_fraction``
(``hidden_saturated_fraction``, ``saturated_fraction`` for candidates), and the largest share of
positions any single unit spent above 0.99 / below 0.01 (gates) or at abs > 0.98 (hidden state),
which is what ``gate_saturated_positions`` / ``saturated_positions`` (0.95) are compared with.

Usage: python benchmarks/recurrent_gates.py [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monitor import Monitor
from monitor.recurrent import recompute


class Net(nn.Module):
    def __init__(self, cls: type, d_in: int, d_out: int, layers: int, bidirectional: bool, last: bool) -> None:
        super().__init__()
        self.rnn = cls(d_in, 32, layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(32 * (2 if bidirectional else 1), d_out)
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.last else out)


def sine_batch(g: torch.Generator, n: int = 32, steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    phase = torch.rand(n, 1, generator=g) * 2 * torch.pi
    freq = 0.5 + torch.rand(n, 1, generator=g)
    t = torch.arange(steps + 1).float() * 0.3
    s = torch.sin(phase + freq * t) + 0.05 * torch.randn(n, steps + 1, generator=g)
    return s[:, :-1, None], s[:, 1:, None]


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.7 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def bias_forget(rnn: nn.Module, value: float) -> None:
    """The forget gate's (LSTM) or update gate's (GRU) bias: the second block of bias_ih."""
    h = rnn.hidden_size
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("bias_ih"):
                p[h : 2 * h] = value
            elif name.startswith("bias_hh"):
                p[h : 2 * h] = 0.0


def shares(module: nn.Module, args: tuple, output: object, into: dict) -> None:
    """Per unit, the share of recomputed positions at each bound; the largest per point."""
    wanted = {
        (layer, d, role)
        for layer in range(module.num_layers)
        for d in range(2 if module.bidirectional else 1)
        for role in (("input", "forget", "output", "hidden") if isinstance(module, nn.LSTM) else ("reset", "update", "hidden"))
    }
    for (layer, d, role), t in recompute(module, args, {}, output, wanted).items():
        key = f"l{layer}{'_reverse' if d else ''}.{role}"
        if role == "hidden":
            got = {"abs>0.98": float((t.abs() > 0.98).float().mean(0).max())}
        else:
            got = {">0.99": float((t > 0.99).float().mean(0).max()), "<0.01": float((t < 0.01).float().mean(0).max())}
        for k, v in got.items():
            into.setdefault(key, {})[k] = max(into.get(key, {}).get(k, 0.0), v)


def run(task: str, cls: type, steps: int, forget_bias: float | None = None, lr: float = 1e-2) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if task == "sine":
        net = Net(cls, 1, 1, 1, False, last=False)
    else:
        net = Net(cls, 8, 10, 2, True, last=True)
        xtr, ytr, xte, yte = digits()
    if forget_bias is not None:
        bias_forget(net.rnn, forget_bias)
    opt = torch.optim.Adam(net.parameters(), lr)
    fractions: dict[str, dict[str, float]] = {}
    share: dict[str, dict[str, float]] = {}
    every = 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = Monitor(net, every_n_steps=every, on_alert="ignore")
        for step in range(steps):
            if task == "sine":
                x, y = sine_batch(g)
            else:
                idx = torch.randint(0, len(ytr), (64,), generator=g)
                x, y = xtr[idx], ytr[idx]
            with mon.step(step):
                out = net(x)
            if step % every == 0:  # the same forward again, outside the monitor's step, for the shares
                hook = net.rnn.register_forward_hook(lambda m, a, o: shares(m, a, o, share))
                with torch.no_grad():
                    net(x)
                hook.remove()
            loss = F.mse_loss(out, y) if task == "sine" else F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % every == 0:
                for name, h in mon.health().items():
                    for k in ("gate_saturated_fraction", "hidden_saturated_fraction", "saturated_fraction", "dormant_fraction"):
                        v = h.metrics.get(k)
                        if v is not None:
                            key = name.split(".", 1)[1]
                            fractions.setdefault(key, {})[k] = max(fractions.get(key, {}).get(k, 0.0), v)
        alerts = mon.alerts
        mon.close()
    result = {
        "run": f"{task} {cls.__name__} lr {lr:g}"
        + (f" {'forget' if cls is nn.LSTM else 'update'} bias {forget_bias:+g}" if forget_bias is not None else ""),
        "final_loss": float(loss.detach()),
        "alerts": [a.message.split(" | ")[0] + " | " + a.message.split(" | ")[1] + " | " + a.message.split(" | ")[2] for a in alerts],
        "max_fractions": fractions,
        "max_unit_share_at_bound": share,
    }
    if task == "digits":
        with torch.no_grad():
            result["test_accuracy"] = float((net(xte).argmax(1) == yte).float().mean())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    runs = [
        run("sine", nn.LSTM, a.steps), run("sine", nn.GRU, a.steps),
        run("digits", nn.LSTM, a.steps), run("digits", nn.GRU, a.steps),
        run("sine", nn.LSTM, a.steps, lr=3e-2), run("digits", nn.LSTM, a.steps, lr=3e-2),
        run("sine", nn.LSTM, a.steps, forget_bias=20.0), run("sine", nn.LSTM, a.steps, forget_bias=-20.0),
        run("digits", nn.LSTM, a.steps, forget_bias=20.0), run("digits", nn.LSTM, a.steps, forget_bias=-20.0),
        run("sine", nn.GRU, a.steps, forget_bias=20.0), run("sine", nn.GRU, a.steps, forget_bias=-20.0),
    ]
    for r in runs:
        acc = f", test accuracy {r['test_accuracy']:.3f}" if "test_accuracy" in r else ""
        print(f"== {r['run']}: final loss {r['final_loss']:.4f}{acc}, {len(r['alerts'])} alerts")
        for msg in r["alerts"][:8]:
            print("   ", msg[:200])
        for point in sorted(set(r["max_fractions"]) | set(r["max_unit_share_at_bound"])):
            fr = ", ".join(f"{k} {v:.3f}" for k, v in r["max_fractions"].get(point, {}).items())
            sh = ", ".join(f"{k} {v:.3f}" for k, v in r["max_unit_share_at_bound"].get(point, {}).items())
            print(f"    {point:22s} max: {fr} | largest unit share {sh}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
