"""What a probe run costs, on the workloads of benchmarks/overhead.py.

A probe runs once every ``probe_every_n_samples`` sampled steps, i.e. once every
``every_n_steps * probe_every_n_samples`` training steps (1000 with the defaults 50 and 20), so
a benchmark block of a few hundred steps holds at most one: its cost is lost in the noise of a
step-time comparison. This script measures its parts instead, each many times, as CPU time of
the thread that does the work (``time.thread_time``, PyTorch on ``--threads`` intra-op threads,
default 1 so that all of a step's work is on that thread): CPU time is much less disturbed than
wall time by other work on the machine, and ratios of CPU times are what the amortised overhead is.

  bare step  one training step (forward, backward, optimizer step), median
  train ms   one probe run on the training thread (the invisible forward with its hooks, the
             one transfer of the [samples x units] matrices), median of ``--runs`` runs of
             ``Monitor.run_due_probe``
  writer ms  the writer thread's CPU for one probe run (drift and favourites, the heatmap PNGs,
             the units tables, the scalars into the event file), median of ``--runs`` calls of
             ``write_probe`` on a fresh result
  amplified  (``--amplified``, wall clock, needs a quiet machine) training with a probe after
             every sampled step (N=5) against the same training without, paired blocks, median
             over rounds: (time with - time without) / probe runs; a cross-check

and reports the amortised overhead at N=``--every`` with ``probe_every_n_samples=``
``--probe-every``: (train ms + writer ms) / (N * probe_every) / bare step.

  python benchmarks/probe_cost.py                      # mlp, cnn, transformer; probe = the training batch
  python benchmarks/probe_cost.py --workloads mlp --probe-samples 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.overhead import make_workload  # noqa: E402
from monitor import Monitor  # noqa: E402


def steps(w, mon, opt, n: int, start: int, clock=time.perf_counter) -> float:
    model, (x, y) = w.model, w.batch
    t0 = clock()
    for step in range(start, start + n):
        with mon.step(step) if mon is not None else _null():
            loss = w.loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if mon is not None and mon._dispatcher is not None:
        mon._dispatcher.flush(sinks=False)  # the writer's work belongs to this block
    return clock() - t0


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def bench(name: str, args: argparse.Namespace) -> dict:
    w = make_workload(name, "cpu")
    x = w.batch[0]
    probe = x[: args.probe_samples] if args.probe_samples else x
    opt = torch.optim.Adam(w.model.parameters(), lr=1e-4)
    out: dict = {"workload": name, "probe_samples": int(probe.shape[0])}
    with tempfile.TemporaryDirectory() as logdir:
        steps(w, None, opt, 3, 0)
        bare = [steps(w, None, opt, 1, 0, time.thread_time) for _ in range(max(args.runs, 20))]
        out["bare_step_ms"] = statistics.median(bare) * 1e3

        # train ms: probe runs on the training thread, each asked for by a sampled step
        mon = Monitor(w.model, every_n_steps=1, logdir=os.path.join(logdir, "a"), on_alert="ignore", probe=probe,
                      probe_every_n_samples=1).attach()
        steps(w, mon, opt, 2, 0)  # warm-up: discovery, first probe
        runs = []
        for i in range(args.runs):
            steps(w, mon, opt, 1, 10 + i)  # a sampled step: a probe is due
            mon.flush()
            t0 = time.thread_time()
            mon.run_due_probe()
            runs.append(time.thread_time() - t0)
            mon.flush()
        out["train_ms"] = statistics.median(runs) * 1e3
        # writer ms: the TensorBoard sink's write_probe, timed on this thread
        from monitor.probe import ProbeRecord, ProbeResult

        sink = next(s for s in mon._sinks if hasattr(s, "write_probe"))
        last = mon.last_probe
        cpu = []
        for _ in range(args.runs):
            fresh = ProbeResult(last.step, last.activations, last.labels, last.loss, previous=ProbeResult(0, last.activations))
            t0 = time.thread_time()
            sink.write_probe(ProbeRecord(fresh))  # drift and favourites included (computed on first read)
            cpu.append(time.thread_time() - t0)
        out["writer_ms"] = statistics.median(cpu) * 1e3
        out["layers"] = len(last.activations)
        mon.close()
        if not args.amplified:
            return _amortised(out, args)

        # amplified end to end: N=5, a probe after every sampled step
        with_p, without = [], []
        mons = {p: Monitor(w.model, every_n_steps=5, logdir=os.path.join(logdir, f"b{p}"), on_alert="ignore",
                           probe=probe if p else None, probe_every_n_samples=1).attach() for p in (0, 1)}
        for m in mons.values():
            steps(w, m, opt, 10, 0)
        block = args.block_steps
        for r in range(args.rounds):
            order = (0, 1) if r % 2 else (1, 0)
            for p in order:
                t = steps(w, mons[p], opt, block, 1000 + r * block)
                (with_p if p else without).append(t)
        probes_per_block = block // 5
        diffs = [(a - b) / probes_per_block for a, b in zip(with_p, without)]
        out["amplified_ms_per_probe"] = statistics.median(diffs) * 1e3
        for m in mons.values():
            m.close()
    out["amortised_pct_amplified"] = 100 * out["amplified_ms_per_probe"] / (args.every * args.probe_every) / out["bare_step_ms"]
    return _amortised(out, args)


def _amortised(out: dict, args: argparse.Namespace) -> dict:
    per_run = out["train_ms"] + out["writer_ms"]
    out["amortised_pct"] = 100 * per_run / (args.every * args.probe_every) / out["bare_step_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "transformer"])
    p.add_argument("--probe-samples", type=int, default=0, help="probe size (default: the workload's training batch)")
    p.add_argument("--every", type=int, default=50, help="every_n_steps for the amortised figure")
    p.add_argument("--probe-every", type=int, default=20, help="probe_every_n_samples for the amortised figure")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--block-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads (1: all work on the timed thread)")
    p.add_argument("--amplified", action="store_true", help="also the end-to-end wall-clock cross-check (quiet machine)")
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results = []
    for name in a.workloads:
        r = bench(name, a)
        results.append(r)
        print(json.dumps(r), flush=True)
    print("| workload | bare step | probe (samples, layers) | training thread per run | writer CPU per run "
          "| amortised at N=%d, a probe every %d sampled steps |" % (a.every, a.probe_every))
    print("|---|---|---|---|---|---|")
    for r in results:
        amp = f" (amplified: {r['amplified_ms_per_probe']:.2f} ms per run, {r['amortised_pct_amplified']:.2f}%)" if a.amplified else ""
        print(f"| {r['workload']} | {r['bare_step_ms']:.2f} ms | {r['probe_samples']}, {r['layers']} | {r['train_ms']:.2f} ms "
              f"| {r['writer_ms']:.2f} ms | {r['amortised_pct']:.2f}%{amp} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
