"""A GPT-2-like model trained by the Hugging Face ``Trainer``, watched by ``ActivationMonitor``.

    python examples/hf_trainer.py            # AdamW at lr=3e-2: the residual stream explodes at step 10
    python examples/hf_trainer.py --fix      # the same model at lr=1e-3: silent
    tensorboard --logdir runs/hf_trainer     # the monitor's heatmaps in the Trainer's own run

A 2-block GPT-2 (ReLU MLPs, 64-wide) built from a config (random init, no download) learns
synthetic sequences ``t[i+1] = t[i] + stride (mod 64)``. At a learning rate 30x too high the
loss still goes down, but by the first sampled step after the start (step 10) each block's output
RMS is ~600x what it was at step 0: the monitor says ``exploding`` for both blocks, in the
console, in TensorBoard's Text tab and in the ``activation_scan`` heatmap, and it keeps the
Trainer's own ``loss``/``grad_norm`` curves in the same run. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from integrations.transformers import ActivationMonitor
from monitor import MonitorWarning

VOCAB, SEQ = 64, 32


class RuleTokens(torch.utils.data.Dataset):
    """Sequences ``t[i+1] = t[i] + stride (mod VOCAB)``: learnable, generated, no download."""

    def __init__(self, n: int = 512, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.tokens = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def build() -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, activation_function="relu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def main(argv: list[str] | None = None) -> ActivationMonitor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fix", action="store_true", help="a sane learning rate (1e-3) instead of 3e-2")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--every", type=int, default=10, help="sample every N optimizer steps")
    p.add_argument("--output-dir", default=None, help="the Trainer's output_dir (default runs/hf_trainer[-fix])")
    args = p.parse_args(argv)

    output_dir = args.output_dir or os.path.join("runs", "hf_trainer-fix" if args.fix else "hf_trainer")
    training = TrainingArguments(
        output_dir, use_cpu=True, report_to=["tensorboard"], per_device_train_batch_size=16, max_steps=args.steps,
        learning_rate=1e-3 if args.fix else 3e-2, lr_scheduler_type="constant", logging_steps=50,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )

    def show(alert):  # one line per alert: which layer, what, and the likely cause
        print("ALERT" if not alert.recovered else "RECOVERED", alert.message.split(" | likely")[0])

    warnings.simplefilter("ignore", MonitorWarning)  # we print the alerts ourselves
    monitor = ActivationMonitor(every_n_steps=args.every, on_alert=show)
    trainer = Trainer(model=build(), args=training, train_dataset=RuleTokens(), callbacks=[monitor])
    monitor.set_trainer(trainer)  # the scalars also reach any other report_to integration
    trainer.train()

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"\nlast logged loss {losses[-1] if losses else float('nan'):.3f}; each layer at its last sampled step:")
    for name, h in monitor.health().items():
        dead = f"{h.dead_fraction:.0%}" if h.dead_fraction is not None else "-"
        print(f"  {name:26s} {h.kind:6s} rms {h.rms:9.3g}   dead {dead:>4s}")
    n = len([a for a in monitor.alerts if not a.recovered])
    print(f"\n{n} alert(s). The Trainer's TensorBoard run, with the monitor's event file: {monitor.log_dir}")
    print(f"tensorboard --logdir {output_dir} --samples_per_plugin images=100")
    return monitor


if __name__ == "__main__":
    main()
