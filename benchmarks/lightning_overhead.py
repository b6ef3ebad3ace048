"""Overhead of ``ActivationMonitor`` in a Lightning run against the same run without it.

Same model, data, seed and ``TensorBoardLogger`` in both; configurations interleaved round-robin
(order alternating each round) and medians taken over rounds. A timing callback placed first
records the wall time between successive ``on_train_batch_start`` calls, i.e. one whole loop
iteration (data, forward, backward, optimizer, every callback, logging). The first ``--warmup``
steps of each fit are dropped.

Reported:
  bare         median step time without the callback
  amortised    mean step time with ``every_n_steps=N`` over a window holding exactly one sampled
               step per N steps, relative to the bare mean (budget at N=50: within 2%)
  sampled      median step time with every step sampled (N=1, writer running) relative to the bare
               median (budget: at most 1.5x)
  derived      (sampled / bare - 1) / N: the amortised overhead implied by the sampled-step cost

Usage:
  python benchmarks/lightning_overhead.py                      # transformer, 7 rounds
  python benchmarks/lightning_overhead.py --workload mlp --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as L
from lightning.pytorch.loggers import TensorBoardLogger

from integrations.lightning import ActivationMonitor


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def workload(name: str) -> tuple[type, dict, DataLoader]:
    torch.manual_seed(0)
    if name == "mlp":
        ds = TensorDataset(torch.randn(256 * 64, 64), torch.randint(0, 10, (256 * 64,)))
        return MLP, {}, DataLoader(ds, batch_size=256)
    import runpy

    ex = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "lightning_transformer.py"), run_name="example")
    size = dict(vocab=512, seq_len=32, d=96, layers=3, heads=4, ffn=384)
    data = ex["RuleTokens"](4096, size["seq_len"], size["vocab"])
    return ex["TinyBert"], {**size, "lr": 1e-3}, DataLoader(data, batch_size=32)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer, pl_module):
        self._last = None


def run(model_cls: type, kwargs: dict, loader: DataLoader, steps: int, every: int | None, root: str) -> list[float]:
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    if every is not None:
        callbacks.append(ActivationMonitor(every_n_steps=every, on_alert="ignore"))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps + 1, max_epochs=-1, callbacks=callbacks,
        logger=TensorBoardLogger(root, name="bench"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model_cls(**kwargs), loader)
    return timer.times  # times[i]: the iteration of global step i


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="ActivationMonitor overhead in a Lightning run")
    p.add_argument("--workload", choices=["transformer", "mlp"], default="transformer")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--every", type=int, default=50, help="N for the amortised overhead")
    p.add_argument("--windows", type=int, default=2, help="N-step windows measured per fit")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--sampled-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    model_cls, kwargs, loader = workload(args.workload)
    n = args.every
    # steps [warmup, warmup + windows * N): sampled steps N, 2N, ... fall inside once per N steps
    lo = max(args.warmup, 1)
    lo = lo + (-lo) % n + 1 if n > 1 else lo  # start just after a sampled step ...
    hi = lo + args.windows * n  # ... so the window holds exactly `windows` sampled steps
    total = hi + 1
    bare_mean, mon_mean, bare_med, sampled_med = [], [], [], []
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            configs = [None, n, 1] if r % 2 == 0 else [1, n, None]
            for every in configs:
                if every == 1:
                    t = run(model_cls, kwargs, loader, args.warmup + args.sampled_steps, 1, root)
                    sampled_med.append(statistics.median(t[args.warmup :]))
                else:
                    t = run(model_cls, kwargs, loader, total, every, root)
                    window = t[lo:hi]
                    if every is None:
                        bare_mean.append(statistics.fmean(window))
                        bare_med.append(statistics.median(t[args.warmup :]))
                    else:
                        mon_mean.append(statistics.fmean(window))
            print(f"round {r + 1}/{args.rounds}: bare {1e3 * bare_mean[-1]:.2f} ms, N={n} {1e3 * mon_mean[-1]:.2f} ms, "
                  f"sampled {1e3 * sampled_med[-1]:.2f} ms", flush=True)
    # paired per-round ratios (both runs of a round see the same machine load), then the median
    amortised = statistics.median(m / b - 1 for m, b in zip(mon_mean, bare_mean))
    sampled_x = statistics.median(s / b for s, b in zip(sampled_med, bare_med))
    result = {
        "workload": args.workload,
        "threads": args.threads,
        "rounds": args.rounds,
        "every_n_steps": n,
        "window_steps": [lo, hi],
        "bare_step_ms": 1e3 * statistics.median(bare_med),
        "bare_mean_step_ms": 1e3 * statistics.median(bare_mean),
        "monitored_mean_step_ms": 1e3 * statistics.median(mon_mean),
        "amortised_overhead_pct": 100 * amortised,
        "sampled_step_ms": 1e3 * statistics.median(sampled_med),
        "sampled_vs_bare": sampled_x,
        # what one sampled step per N costs, from the sampled-step measurement (far less noisy
        # than the difference of two whole-run means on a shared machine)
        "derived_amortised_overhead_pct": 100 * (sampled_x - 1) / n,
        "budget_ok": {"amortised<=2%": 100 * amortised <= 2.0, "sampled<=1.5x": sampled_x <= 1.5},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
