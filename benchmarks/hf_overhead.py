"""Overhead of ``integrations.transformers.ActivationMonitor`` in a Hugging Face ``Trainer`` run.

The same GPT-2-like model (built from a small config), data and seed with and without the
callback; configurations interleaved round-robin (order alternating each round), medians over
rounds. A timing callback placed first records the wall time between successive
``on_step_begin`` calls: one whole optimizer step of the Trainer (data, forward, backward,
clipping, optimizer, every callback). The first ``--warmup`` steps of each run are dropped.

Reported, as in ``benchmarks/lightning_overhead.py``:
  bare         median step time without the callback
  amortised    mean step time with ``every_n_steps=N`` over a window holding exactly one sampled
               step per N steps, relative to the bare mean (budget at N=50: within 2%)
  sampled      median step time with every step sampled (N=1) relative to the bare median
               (budget: at most 1.5x)
  derived      (sampled / bare - 1) / N: the amortised overhead implied by the sampled-step cost

Usage:
  python benchmarks/hf_overhead.py                  # 5 rounds
  python benchmarks/hf_overhead.py --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from integrations.transformers import ActivationMonitor

SIZE = dict(n_layer=3, n_embd=96, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)
SEQ, BATCH = 32, 16


class Tokens(torch.utils.data.Dataset):
    """Synthetic token sequences with a learnable rule (each token is the previous one + 1 mod vocab)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, SIZE["vocab_size"], (n, 1), generator=g)
        self.ids = (start + torch.arange(SEQ)) % SIZE["vocab_size"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def run(steps: int, every: int | None, root: str) -> list[float]:
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    if every is not None:
        callbacks.append(ActivationMonitor(every_n_steps=every, on_alert="ignore"))
    args = TrainingArguments(
        output_dir=root, max_steps=steps + 1, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        report_to=["tensorboard"], logging_steps=10**6, save_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=GPT2LMHeadModel(GPT2Config(**SIZE)), args=args, train_dataset=Tokens(4096), callbacks=callbacks)
    trainer.train()
    return timer.times  # times[i]: the optimizer step i


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="ActivationMonitor overhead in a Hugging Face Trainer run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--every", type=int, default=50, help="N for the amortised overhead")
    p.add_argument("--windows", type=int, default=2, help="N-step windows measured per run")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--sampled-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    n = args.every
    lo = max(args.warmup, 1)
    lo = lo + (-lo) % n + 1 if n > 1 else lo  # start just after a sampled step ...
    hi = lo + args.windows * n  # ... so the window holds exactly `windows` sampled steps
    total = hi + 1
    bare_mean, mon_mean, bare_med, sampled_med = [], [], [], []
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            for every in ([None, n, 1] if r % 2 == 0 else [1, n, None]):
                if every == 1:
                    t = run(args.warmup + args.sampled_steps, 1, os.path.join(root, f"s{r}"))
                    sampled_med.append(statistics.median(t[args.warmup :]))
                else:
                    t = run(total, every, os.path.join(root, f"{every}-{r}"))
                    window = t[lo:hi]
                    if every is None:
                        bare_mean.append(statistics.fmean(window))
                        bare_med.append(statistics.median(t[args.warmup :]))
                    else:
                        mon_mean.append(statistics.fmean(window))
            print(f"round {r + 1}/{args.rounds}: bare {1e3 * bare_mean[-1]:.2f} ms, N={n} {1e3 * mon_mean[-1]:.2f} ms, "
                  f"sampled {1e3 * sampled_med[-1]:.2f} ms", flush=True)
    amortised = statistics.median(m / b - 1 for m, b in zip(mon_mean, bare_mean))
    sampled_x = statistics.median(s / b for s, b in zip(sampled_med, bare_med))
    result = {
        "workload": f"gpt2 {SIZE['n_layer']} x d{SIZE['n_embd']}, seq {SEQ}, batch {BATCH}",
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
        "derived_amortised_overhead_pct": 100 * (sampled_x - 1) / n,
        # the measured amortised figure compares two separate runs and moves by several percent
        # between rounds on a shared machine; the implied one is built from the stable sampled step
        "budget_ok": {
            "amortised<=2% (measured)": 100 * amortised <= 2.0,
            "amortised<=2% (implied)": 100 * (sampled_x - 1) / n <= 2.0,
            "sampled<=1.5x": sampled_x <= 1.5,
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
