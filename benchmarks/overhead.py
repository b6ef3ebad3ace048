"""Overhead of the activation monitor against bare training and a naive hook-based monitor.

Workloads (CPU by default, ``--device cuda`` on a GPU):
  mlp          13 -> 256 -> 256 -> 3 MLP, batch 128
  cnn          small CNN on 3x32x32, batch 64
  transformer  4-layer encoder, d_model 128, 4 heads, ffn 512, seq 64, batch 32
  lstm         2-layer nn.LSTM, 32 -> 128, seq 64, batch 32, a linear head on every step (the
               monitor recomputes its gates and states on 8 of the 32 sequences: 12 virtual layers)

For each workload, side by side in one process (each configuration's block, a multiple of its N
steps, paired with a bare block of the same length run right before or after it; every block
starts from the same weights; medians over rounds), the monitor twice: ``monitor`` wraps the
forward only (activations), ``+grad`` wraps the whole step (forward, backward, optimizer step:
activations, gradients, parameter norms and update ratios; ``--no-gradients`` skips it;
``--no-attention`` builds the monitors with ``attention=False``, for the attention heads' share;
``--compile`` trains ``torch.compile(model)`` in every configuration, bare included: sampled steps
then run the model's eager code (the monitor's ``force_eager`` stance, see monitor/compiled.py), so
their ratio is against the compiled unsampled step; the result also gives the compile time, the
eager model's bare step and the compilations counted after warm-up, which must be none):
  bare step time; sampled-step time (every sampled step of the N >= 10 blocks);
  amortised overhead at N = every_n_steps for the monitor and for the naive approach
  (forward hooks that keep ``output.detach().cpu()`` on every step and call
  ``SummaryWriter.add_histogram`` on CPU every N steps); peak-memory delta (``--memory``, one
  subprocess per configuration, ru_maxrss on CPU / max_memory_allocated on CUDA).

Usage:
  python benchmarks/overhead.py                    # full table, N in 1 10 50 200
  python benchmarks/overhead.py --quick            # fewer rounds, for a smoke run
  python benchmarks/overhead.py --json out.json --markdown out.md
  python benchmarks/overhead.py --compile --workloads mlp   # a torch.compile'd model (inductor)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SequenceRegressor(nn.Module):
    """The ``lstm`` workload: a 2-layer LSTM and a linear read-out of every time step."""

    def __init__(self, d_in: int = 32, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d_in, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


@dataclass
class Workload:
    name: str
    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_workload(name: str, device: str) -> Workload:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(13, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))
        x, y = torch.randn(128, 13), torch.randint(0, 3, (128,))
        loss = F.cross_entropy
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
        )
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        loss = F.cross_entropy
    elif name == "transformer":
        model = nn.Sequential(
            nn.TransformerEncoder(nn.TransformerEncoderLayer(128, 4, 512, batch_first=True), 4, enable_nested_tensor=False),
        )
        x, y = torch.randn(32, 64, 128), torch.randn(32, 64, 128)
        loss = F.mse_loss
    elif name == "lstm":
        model = SequenceRegressor()
        x, y = torch.randn(32, 64, 32), torch.randn(32, 64, 1)
        loss = F.mse_loss
    else:
        raise ValueError(f"unknown workload {name!r}")
    model.to(device)
    return Workload(name, model, (x.to(device), y.to(device)), loss)


class Naive:
    """What people write first: hooks that copy every activation to the host, histograms on CPU.

    Its hooks exist only while its own blocks run (:meth:`attach`/:meth:`detach`), so they never
    slow down the other configurations.
    """

    def __init__(self, model: nn.Module, every_n_steps: int, logdir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from monitor.activations import is_activation_module

        self.writer = SummaryWriter(logdir)
        self.every = every_n_steps
        self.acts: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.modules = [
            (name, m) for name, m in model.named_modules()
            if name and (is_activation_module(m) or isinstance(m, (nn.TransformerEncoderLayer, nn.LSTM, nn.GRU)))
        ]

    def attach(self) -> None:
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.acts[name] = out.detach().cpu()

        return hook

    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            for name, a in self.acts.items():
                self.writer.add_histogram(name, a, step)
                self.writer.add_scalar(f"dead/{name}", float((a.reshape(-1, a.shape[-1]) > 0).sum(0).eq(0).float().mean()), step)

    def close(self) -> None:
        self.detach()
        self.writer.close()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_block(
    w: Workload, steps: int, start: int, mode: str, every: int, state: dict, device: str, per_step: list | None = None
) -> float:
    """Train ``steps`` steps; return seconds. ``state`` holds the optimizer and monitor.

    With ``per_step``, appends (step, seconds) for every step (synchronising each step on CUDA).
    """
    model, (x, y) = w.model, w.batch
    opt = state["opt"]
    mon = state.get("mon")
    naive = state.get("naive")
    if naive is not None:
        naive.attach()
    _sync(device)
    t0 = last = time.perf_counter()
    for step in range(start, start + steps):
        # "grads": the whole step inside the monitor's step; "monitor": the forward only.
        with mon.step(step) if mode in ("monitor", "grads") else contextlib.nullcontext():
            loss = w.loss(model(x), y)
            if mode == "grads":
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        if mode != "grads":
            if naive is not None:
                naive.after_step(step)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if per_step is not None:
            _sync(device)
            now = time.perf_counter()
            per_step.append((step, now - last))
            last = now
    # Wait for the monitor's writer thread to finish this block's samples: its work belongs to this
    # block, not to whichever configuration runs next. Not a disk flush (~5 ms here), which in a
    # real run happens every 2 minutes (TensorBoard's own writer) and at close.
    if mon is not None and mon._dispatcher is not None:
        mon._dispatcher.flush(sinks=False)
    _sync(device)
    elapsed = time.perf_counter() - t0
    if naive is not None:
        naive.detach()
    return elapsed


MONITOR_OPTIONS: dict = {}  # extra Monitor options for every configuration (--no-attention)


def make_state(w: Workload, mode: str, every: int, logdir: str) -> dict:
    from monitor import Monitor

    state: dict = {"opt": torch.optim.Adam(w.model.parameters(), lr=1e-4)}
    if mode in ("monitor", "grads"):
        state["mon"] = Monitor(
            w.model, every_n_steps=every, logdir=os.path.join(logdir, f"{mode}{every}"), on_alert="ignore", **MONITOR_OPTIONS
        ).attach()
    elif mode == "naive":
        state["naive"] = Naive(w.model, every, os.path.join(logdir, f"naive{every}"))
    return state


def close_state(state: dict) -> None:
    if "mon" in state:
        state["mon"].close()
    if "naive" in state:
        state["naive"].close()


def compilations() -> int:
    """Frames dynamo has compiled (or recompiled) in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_workload(w: Workload, device: str) -> dict:
    """``torch.compile`` the workload's model in place; return the compile time (the first training
    step, forward and backward, against an eager step) and the eager model's bare step."""
    eager = w.model
    opt = torch.optim.Adam(eager.parameters(), lr=1e-4)
    run_block(w, 3, 0, "bare", 1, {"opt": opt}, device)
    log: list = []
    run_block(w, 20, 0, "bare", 1, {"opt": opt}, device, log)
    eager_step = statistics.median(d for _, d in log)
    w.model = torch.compile(eager)
    t0 = time.perf_counter()
    run_block(w, 1, 0, "bare", 1, {"opt": opt}, device)
    first = time.perf_counter() - t0
    run_block(w, 3, 0, "bare", 1, {"opt": opt}, device)  # a second graph for a changed step, if any
    return {"compile_s": first - eager_step, "eager_bare_step_ms": eager_step * 1e3}


def bench_workload(
    name: str,
    intervals: list[int],
    rounds: int,
    device: str,
    naive: bool,
    target_s: float = 0.5,
    gradients: bool = True,
    compile: bool = False,
) -> dict:
    w = make_workload(name, device)
    compiled = compile_workload(w, device) if compile else None
    _ = run_block(w, 5, 0, "bare", 1, {"opt": torch.optim.Adam(w.model.parameters(), lr=1e-4)}, device)
    t_probe = run_block(w, 5, 0, "bare", 1, {"opt": torch.optim.Adam(w.model.parameters(), lr=1e-4)}, device) / 5
    n_ref = 50 if 50 in intervals else max(intervals)
    result: dict = {"workload": name, "device": device, "rounds": rounds, "intervals": {}}
    if compiled is not None:
        result["compiled"] = compiled
    configs = [("monitor", n) for n in intervals] + [("grads", n) for n in intervals if gradients]
    configs += [("naive", n_ref)] if naive else []
    # Each configuration's block is a multiple of its N (so it holds exactly k samples) lasting
    # about target_s; it is paired with a bare block of the same length run right next to it.
    blocks = {c: c[1] * max(1, round(target_s / (t_probe * c[1]))) for c in configs}
    result["block_steps"] = {f"{c[0]}@{c[1]}": blocks[c] for c in configs}
    init = {k: v.clone() for k, v in w.model.state_dict().items()}
    with tempfile.TemporaryDirectory() as logdir:
        bare_state = make_state(w, "bare", 1, logdir)
        states = {c: make_state(w, c[0], c[1], logdir) for c in configs}
        warm: dict = {}  # writer CPU and samples of the warm-up, left out of the per-sample figure
        for c, st in states.items():  # warm-up: the first sample discovers watch points
            run_block(w, 2, 0, c[0], c[1], st, device)
            if "mon" in st:
                # The warm-up sample's writer work includes one-time costs (first imports, fonts,
                # the run's description): a long run pays them once, so they are not a sample's cost.
                st["mon"].flush()
                d = st["mon"]._dispatcher
                warm[c] = (d.busy_seconds if d is not None else 0.0, st["mon"]._samples)
        graphs = compilations()
        ratios: dict = {c: [] for c in configs}
        times: dict = {c: [] for c in configs}
        bare_times: list = []
        mon_log: dict = {c: [] for c in configs if c[0] in ("monitor", "grads")}
        bare_log: list = []
        rng = random.Random(0)
        start = max(intervals) * 1000
        for r in range(rounds):
            order = configs[:]
            rng.shuffle(order)
            for c in order:
                pair = [("bare", 1, bare_state), (c[0], c[1], states[c])]
                if r % 2:
                    pair.reverse()  # neither side always runs first
                dt = {}
                for mode, every, st in pair:
                    # Same starting weights and a fresh optimizer for every block: the model memorises
                    # its batch and step time drifts with the training state, so blocks that started
                    # from different states would not be comparable.
                    w.model.load_state_dict(init)
                    st["opt"] = torch.optim.Adam(w.model.parameters(), lr=1e-4)
                    log = mon_log.get(c) if mode in ("monitor", "grads") else bare_log
                    dt[mode] = run_block(w, blocks[c], start, mode, every, st, device, log) / blocks[c]
                start += blocks[c]
                ratios[c].append(dt[c[0]] / dt["bare"])
                times[c].append(dt[c[0]])
                bare_times.append(dt["bare"])
        writer_cpu = {}
        for c, st in states.items():
            if "mon" in st:
                st["mon"].flush()
                d = st["mon"]._dispatcher
                busy0, samples0 = warm.get(c, (0.0, 0))
                samples = st["mon"]._samples - samples0
                writer_cpu[c] = (d.busy_seconds - busy0) / max(samples, 1) if d is not None else 0.0
            close_state(st)
        close_state(bare_state)
    if compiled is not None:
        # the timed blocks, sampled steps included, must have run without compiling anything
        compiled["compiled_graphs_during_blocks"] = compilations() - graphs
    bare = statistics.median(bare_times)
    result["bare_step_ms"] = bare * 1e3
    result["block_ms_per_step"] = {f"{c[0]}@{c[1]}": [round(t * 1e3, 4) for t in times[c]] for c in configs}
    for c in configs:
        key = f"{c[0]}@{c[1]}"
        result["intervals"][key] = {
            "step_ms": statistics.median(times[c]) * 1e3,
            # each block against the bare block it was paired with; median over rounds
            "overhead_pct": 100 * (statistics.median(ratios[c]) - 1),
        }
        if c in writer_cpu:
            result["intervals"][key]["writer_cpu_ms_per_sample"] = writer_cpu[c] * 1e3
    result["bare_step_median_ms"] = statistics.median(d for _, d in bare_log) * 1e3
    for mode, prefix in (("monitor", ""), ("grads", "grads_")):
        _sampled(result, mode, prefix, {c: log for c, log in mon_log.items() if c[0] == mode}, intervals, writer_cpu, bare)
    return result


def _sampled(result: dict, mode: str, prefix: str, mon_log: dict, intervals: list[int], writer_cpu: dict, bare: float) -> None:
    """Sampled-step time: every sampled step of the blocks with N >= 10 (a writer as busy as in real
    use) against the steps of all bare blocks; unsampled steps of the same blocks for reference."""
    if not mon_log:
        return
    logs = [(c[1], log) for c, log in mon_log.items() if c[1] >= 10] or [(c[1], log) for c, log in mon_log.items()]
    sampled = [d for n, log in logs for st, d in log if st % n == 0]
    unsampled = [d for n, log in logs for st, d in log if st % n != 0]
    result[f"{prefix}sampled_steps_measured"] = len(sampled)
    result[f"{prefix}sampled_step_ms"] = statistics.median(sampled) * 1e3
    result[f"{prefix}unsampled_step_ms"] = statistics.median(unsampled) * 1e3
    result[f"{prefix}sampled_step_ratio"] = result[f"{prefix}sampled_step_ms"] / result["bare_step_median_ms"]
    # Implied amortised overhead at N: (extra time of a sampled step + writer CPU per sample) / N.
    extra = (result[f"{prefix}sampled_step_ms"] - result[f"{prefix}unsampled_step_ms"]) / 1e3
    for n in intervals:
        wc = writer_cpu.get((mode, n), 0.0)
        result["intervals"][f"{mode}@{n}"]["implied_pct"] = 100 * (extra + wc) / n / bare


def sampled_step_naive(name: str, device: str, reps: int = 20) -> float:
    """Naive approach's sampled step (copy + CPU histograms), in ms."""
    w = make_workload(name, device)
    with tempfile.TemporaryDirectory() as logdir:
        state = make_state(w, "naive", 1, logdir)
        run_block(w, 2, 0, "naive", 1, state, device)
        log: list = []
        run_block(w, reps, 2, "naive", 1, state, device, log)
        close_state(state)
    return statistics.median(d for _, d in log) * 1e3


def memory_probe(name: str, mode: str, every: int, steps: int, device: str) -> int:
    """Run one configuration in a fresh process; return peak bytes (RSS on CPU, allocator on CUDA)."""
    code = (
        "import sys,resource,tempfile,torch;sys.path.insert(0,%r);import benchmarks.overhead as b;"
        "w=b.make_workload(%r,%r);d=tempfile.mkdtemp();s=b.make_state(w,%r,%d,d);"
        "b.run_block(w,%d,0,%r,%d,s,%r);b.close_state(s);"
        "print(torch.cuda.max_memory_allocated() if %r.startswith('cuda') else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024)"
    ) % (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name, device, mode, every, steps, mode, every, device, device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], intervals: list[int]) -> str:
    lines = [
        "| workload | bare step | sampled step (x bare) | " + " | ".join(f"N={n}" for n in intervals)
        + " | naive N=50 | naive sampled step (x bare) | peak mem delta (monitor / naive) |",
        "|---|---|---|" + "---|" * len(intervals) + "---|---|---|",
    ]
    for r in results:
        if "grads_sampled_step_ms" in r:
            cells = [
                f"{r['intervals'][f'grads@{n}']['overhead_pct']:+.1f}% ({r['intervals'][f'grads@{n}']['implied_pct']:.1f}%)"
                for n in intervals
            ]
            lines.append(
                f"| {r['workload']} +grad | {r['bare_step_ms']:.2f} ms | {r['grads_sampled_step_ms']:.2f} ms "
                f"({r['grads_sampled_step_ratio']:.2f}x) | " + " | ".join(cells) + " | | | |"
            )
        cells = [
            f"{r['intervals'][f'monitor@{n}']['overhead_pct']:+.1f}% ({r['intervals'][f'monitor@{n}']['implied_pct']:.1f}%)"
            for n in intervals
        ]
        naive = r["intervals"].get("naive@50")
        naive_s = f"{naive['step_ms'] / r['bare_step_ms']:.2f}x" if naive else "-"
        ns = r.get("naive_sampled_step_ms")
        ns_s = f"{ns / r['bare_step_median_ms']:.0f}x" if ns else "-"
        mem = r.get("memory")
        mem_s = f"{mem['monitor_delta_mb']:+.1f} MB / {mem['naive_delta_mb']:+.1f} MB" if mem else "-"
        lines.append(
            f"| {r['workload']} | {r['bare_step_ms']:.2f} ms | {r.get('sampled_step_ms', float('nan')):.2f} ms "
            f"({r.get('sampled_step_ratio', float('nan')):.2f}x) | " + " | ".join(cells) + f" | {naive_s} | {ns_s} | {mem_s} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "transformer", "lstm"])
    p.add_argument("--intervals", nargs="+", type=int, default=[1, 10, 50, 200])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block-seconds", type=float, default=0.5, help="target length of a timed block")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="2 rounds, no memory probe")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (subprocesses)")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--no-gradients", action="store_true", help="skip the +grad configuration (whole step inside)")
    p.add_argument("--no-attention", action="store_true", help="monitors without the attention heads (attention=False)")
    p.add_argument("--compile", action="store_true", help="train torch.compile(model) in every configuration")
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args()
    rounds = 3 if a.quick else a.rounds
    if a.no_attention:
        MONITOR_OPTIONS["attention"] = False
    results = []
    for name in a.workloads:
        r = bench_workload(
            name,
            a.intervals,
            rounds,
            a.device,
            naive=not (a.no_naive or a.compile),  # the naive hooks would break the compiled graph
            target_s=a.block_seconds,
            gradients=not a.no_gradients,
            compile=a.compile,
        )
        if not (a.no_naive or a.compile):
            r["naive_sampled_step_ms"] = sampled_step_naive(name, a.device)
        if a.memory and not a.quick:
            steps = 200 if name == "mlp" else 60
            base = memory_probe(name, "bare", 1, steps, a.device)
            mon = memory_probe(name, "monitor", 50, steps, a.device)
            naive = memory_probe(name, "naive", 50, steps, a.device)
            r["memory"] = {"monitor_delta_mb": (mon - base) / 2**20, "naive_delta_mb": (naive - base) / 2**20}
        r["attention"] = not a.no_attention
        results.append(r)
        print(json.dumps(r, indent=None), flush=True)
    table = markdown(results, a.intervals)
    print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
