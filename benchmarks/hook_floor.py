"""The floor of a hook-based sampled step on the MLP workload, without the monitor.

What a sampled step with gradients must at least do in this design, done by a bare loop: register
and remove two forward hooks (the ReLUs), two tensor hooks (their outputs' gradients) and the
optimizer's step pre/post hooks (``--mode hooks``), and in them take the same kernels the monitor
takes for small CPU outputs (``--mode copies``): the ReLU's input and output stacked into one
buffer, a copy of each gradient, one ``_foreach_norm`` over the parameters' gradients and one
concatenated strided weight sample. No bookkeeping, no judging, no writer. The difference to the
monitor's own sampled step (``benchmarks/overhead.py``, "+grad") is the monitor's bookkeeping.

Prints the extra thread time of a sampled step (median over sampled steps minus median over the
others, every N-th step sampled).

Usage:
  python benchmarks/hook_floor.py --mode hooks
  python benchmarks/hook_floor.py --mode copies
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import make_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("hooks", "copies"), default="copies")
    ap.add_argument("--every", type=int, default=50, help="sample every N-th step")
    ap.add_argument("--samples", type=int, default=200, help="sampled steps measured")
    args = ap.parse_args()
    copies = args.mode == "copies"
    w = make_workload("mlp", "cpu")
    x, y = w.batch
    opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
    relus = [m for m in w.model.modules() if isinstance(m, torch.nn.ReLU)]
    stacked: dict[int, torch.Tensor] = {}  # reused buffers, like the monitor's pool
    grads: dict[int, torch.Tensor] = {}
    params = list(w.model.parameters())

    def on_grad(i: int, g: torch.Tensor) -> None:
        if copies:
            if i not in grads:
                grads[i] = torch.empty(g.shape)
            grads[i].copy_(g)

    def on_output(i: int, handles: list, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if copies:
            if i not in stacked:
                stacked[i] = torch.empty((2, *output.shape))
            torch.stack([inputs[0].detach(), output.detach()], out=stacked[i])
        handles.append(output.register_hook(functools.partial(on_grad, i)))

    def before_step(optimizer: torch.optim.Optimizer, a: tuple, k: dict) -> None:
        if copies:
            torch._foreach_norm([p.grad for p in params])
            torch.cat([p.detach().reshape(-1)[::17] for p in params])

    def step(sampled: bool) -> None:
        handles: list = []
        if sampled:
            for i, m in enumerate(relus):
                handles.append(m.register_forward_hook(functools.partial(on_output, i, handles)))
            handles.append(register_optimizer_step_pre_hook(before_step))
            handles.append(register_optimizer_step_post_hook(lambda o, a, k: None))
        try:
            loss = w.loss(w.model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()

    n = args.every
    for s in range(3 * n):
        step(s % n == 0)
    sampled, unsampled = [], []
    for s in range(args.samples * n):
        t = time.thread_time()
        step(s % n == 0)
        (sampled if s % n == 0 else unsampled).append(time.thread_time() - t)
    a, b = statistics.median(sampled) * 1e3, statistics.median(unsampled) * 1e3
    print(f"{args.mode}: sampled step {a:.3f} ms, unsampled {b:.3f} ms, extra {a - b:.3f} ms")


if __name__ == "__main__":
    main()
