"""A small BERT-like encoder trained with PyTorch Lightning, watched by ``ActivationMonitor``.

Everything is built in-process (random init, synthetic tokens, no downloads) and runs on CPU in
well under two minutes with the defaults. Masked-token prediction on sequences that follow a
simple rule (each token is the previous one plus a per-sequence stride, modulo the vocabulary).

    python examples/lightning_transformer.py                  # healthy: no alerts
    python examples/lightning_transformer.py --pathology lr   # learning rate far too high: alerts
    tensorboard --logdir runs/lightning_transformer           # the heatmaps, beside train_loss

With ``--pathology lr`` the optimizer's step size is ~1000x too large: the weights grow by
about the learning rate every step, the residual stream and the MLP activations blow up, and
the monitor reports ``exploding`` (then ``nonfinite``) for the blocks, with the alert text in
TensorBoard's Text tab and the ``activation_scan`` heatmap turning bright.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as L
from lightning.pytorch.loggers import TensorBoardLogger

from integrations.lightning import ActivationMonitor
from monitor import MonitorWarning

PAD, MASK = 0, 1


class RuleTokens(Dataset):
    """Sequences ``t[i+1] = t[i] + stride (mod vocab)``; 15% of positions masked (MLM targets)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(2, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.tokens = 2 + (start + stride * torch.arange(seq_len)) % (vocab - 2)
        self.mask = torch.rand(n, seq_len, generator=g) < 0.15
        self.mask[:, 0] = False

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tokens[i].clone()
        y = torch.full_like(x, -100)
        m = self.mask[i]
        y[m] = x[m]
        x[m] = MASK
        return x, y


class Block(nn.Module):
    """Pre-LN transformer block: self-attention and a GELU MLP, each with a residual."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyBert(L.LightningModule):
    def __init__(self, vocab: int, seq_len: int, d: int, layers: int, heads: int, ffn: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, vocab))  # MLM head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pathology", choices=["none", "lr"], default="none", help="inject a pathology")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--every-n-steps", type=int, default=10, help="sample every N optimizer steps")
    p.add_argument("--logdir", default="runs/lightning_transformer", help="TensorBoard root directory")
    p.add_argument("--tiny", action="store_true", help="a much smaller model (tests)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for this size)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> ActivationMonitor:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = dict(vocab=64, seq_len=16, d=32, layers=1, heads=2, ffn=64) if args.tiny else dict(
        vocab=512, seq_len=32, d=96, layers=3, heads=4, ffn=384
    )
    lr = 3.0 if args.pathology == "lr" else 1e-3
    model = TinyBert(**size, lr=lr)
    data = RuleTokens(4096, size["seq_len"], size["vocab"])
    loader = DataLoader(data, batch_size=32, shuffle=True, num_workers=0)

    monitor = ActivationMonitor(every_n_steps=args.every_n_steps, on_alert="ignore")
    logger = TensorBoardLogger(args.logdir, name=f"pathology_{args.pathology}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        max_epochs=-1,
        callbacks=[monitor],
        logger=logger,
        log_every_n_steps=max(1, args.every_n_steps // 2),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)  # printed below instead
        trainer.fit(model, loader)

    alerts = [a for a in monitor.alerts if not a.recovered]
    print(f"\n{len(alerts)} activation alert(s) in {trainer.global_step} steps (pathology: {args.pathology})")
    for a in monitor.alerts[:12]:
        print(("  RECOVERED " if a.recovered else "  ALERT ") + a.message[:240])
    if len(monitor.alerts) > 12:
        print(f"  ... and {len(monitor.alerts) - 12} more")
    print("\nLayer health at the last sampled step:")
    for name, h in monitor.health().items():
        rms = f"{h.rms:.3g}" if math.isfinite(h.rms) else str(h.rms)
        print(f"  {name:<22} {h.kind:<6} rms={rms:<10} max|a|={h.max_abs:.3g} nonfinite={h.nonfinite}")
    print(f"\nTensorBoard logs: {logger.log_dir}\n  tensorboard --logdir {args.logdir}")
    return monitor


if __name__ == "__main__":
    main()
