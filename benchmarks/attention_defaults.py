"""The numbers behind the attention-head defaults (``attention_entropy``, ``attention_sink``).

Healthy runs, each sampled every 10 steps (25 for the long run) through the monitor itself; per
run, the lowest mean normalised entropy, the largest share of one-hot queries (normalised entropy
<= 0.001) and the highest mean first-token mass of any head on any sampled step, and the attention
alerts:

  bench     the benchmark transformer (benchmarks/overhead.py, 4 x d128, seq 64, batch 32, MSE to a
            fixed random target), 300 steps: Adam 1e-3, Adam 1e-4, SGD 1e-2 (momentum 0.9)
  gpt2      GPT-2 (4 layers, 4 heads, d64, sdpa) on sequences of a first token (0) and random tokens
            whose second half repeats the first (a copy task: an induction head pays), 300 steps of
            AdamW 1e-3 and 3e-3; ``gpt2long``: 1000 steps at 3e-3; ``gpt2longer``: 2000 steps
  bert      BERT (4 layers, 4 heads, d64) masked-LM on the same sequences with a quarter padded,
            300 steps of AdamW 1e-3 and 3e-3

Constructed pathologies (``patho``): one head of the benchmark transformer's second layer with its
query and key projections scaled x3, x10, x100 (20 Adam steps); GPT-2 with one head scaled x100 and
x1000; a head whose scores get +30 on the first key (a position bias gone wrong).

Cost (``cost``): the benchmark transformer's forward, timed as a bare step, a sampled step of a
monitor with ``attention=False`` and one with the attention heads, interleaved (one of each per
round, in a rotating order) so that the machine's drift hits all three alike; medians over rounds.

Usage: python benchmarks/attention_defaults.py [bench] [gpt2] [gpt2long] [gpt2longer] [bert] [patho] [cost]
(all but gpt2long, gpt2longer and cost by default; ~25 minutes on a 2-core CPU).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from monitor import Monitor

logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


def extremes(mon: Monitor, out: dict, step: int) -> None:
    for h in mon.attention_health().values():
        if h.step == step:
            out.setdefault("entropy", []).append(min(h.normalized_entropy))
            out.setdefault("sink", []).append(max(h.sink))
            out.setdefault("one_hot", []).append(max(h.one_hot))


def attention_alerts(mon: Monitor) -> list[str]:
    return [a.message.split(" | ")[1] + ": " + a.message.split(" | ")[2] for a in mon.alerts if a.kind.startswith("attention")]


def bench(opt_name: str, lr: float, steps: int = 300, every: int = 10) -> tuple[dict, float, list[str]]:
    from overhead import make_workload

    w = make_workload("transformer", "cpu")
    model, (x, y) = w.model, w.batch
    opt = torch.optim.Adam(model.parameters(), lr) if opt_name == "adam" else torch.optim.SGD(model.parameters(), lr, momentum=0.9)
    out: dict = {}
    with Monitor(model, every_n_steps=every, on_alert="ignore") as mon:
        for step in range(steps):
            with mon.step(step):
                loss = w.loss(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            if step % every == 0:
                extremes(mon, out, step)
        return out, float(loss), attention_alerts(mon)


def copy_batch(g: torch.Generator, vocab: int, batch: int, length: int) -> torch.Tensor:
    half = (length - 1) // 2
    a = torch.randint(2, vocab, (batch, half), generator=g)
    rest = torch.randint(2, vocab, (batch, length - 1 - 2 * half), generator=g)
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), a, a, rest], 1)


def hugging_face(kind: str, lr: float, steps: int = 300, every: int = 10) -> tuple[dict, float, list[str]]:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab, batch, length = 64, 16, 33
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=64, vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=0))
    else:
        cfg = BertConfig(num_hidden_layers=4, num_attention_heads=4, hidden_size=64, intermediate_size=256, vocab_size=vocab, max_position_embeddings=64)
        model = BertForMaskedLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr)
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    with Monitor(model.train(), every_n_steps=every, on_alert="ignore") as mon:
        for step in range(steps):
            ids = copy_batch(g, vocab, batch, length)
            with mon.step(step):
                if kind == "gpt2":
                    loss = model(input_ids=ids, labels=ids).loss
                else:
                    masked = torch.rand(ids.shape, generator=g) < 0.15
                    masked[:, 0] = False
                    inputs, labels = ids.masked_fill(masked, 1), ids.masked_fill(~masked, -100)
                    attention = torch.ones_like(ids)
                    attention[: batch // 4, -6:] = 0
                    loss = model(input_ids=inputs, attention_mask=attention, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            if step % every == 0:
                extremes(mon, out, step)
        return out, float(loss), attention_alerts(mon)


def report(label: str, result: tuple[dict, float, list[str]]) -> None:
    out, loss, alerts = result
    print(
        f"{label}: final loss {loss:.3f}; lowest normalised entropy of any head {min(out['entropy']):.3g}, "
        f"largest share of one-hot queries {max(out['one_hot']):.3f}, highest first-token mass {max(out['sink']):.3f}; "
        f"attention alerts: {alerts or 'none'}",
        flush=True,
    )


def scale_head(weight: torch.Tensor, bias: torch.Tensor, rows: list[slice], factor: float, dim: int) -> None:
    with torch.no_grad():
        for r in rows:
            (weight[r] if dim == 0 else weight[:, r]).mul_(factor)
            bias[r].mul_(factor)


class BiasedToFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        b = torch.zeros(n, 4, t, t)
        b[:, 1, :, 0] = 30.0  # head 1: +30 on the first key
        h = x + self.attn(x, x, x, attn_mask=b.view(n * 4, t, t), need_weights=False)[0]
        return h + self.ff(h)


def pathologies() -> None:
    from overhead import make_workload

    for factor in (3, 10, 100):
        w = make_workload("transformer", "cpu")
        model, (x, y) = w.model, w.batch
        attn = model[0].layers[1].self_attn
        e, d = attn.embed_dim, attn.embed_dim // attn.num_heads
        scale_head(attn.in_proj_weight, attn.in_proj_bias, [slice(2 * d, 3 * d), slice(e + 2 * d, e + 3 * d)], factor, 0)
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        with Monitor(model, every_n_steps=10, on_alert="ignore") as mon:
            for step in range(21):
                with mon.step(step):
                    w.loss(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
            h = mon.attention_health()["0.layers.1.self_attn"]
            ent = ", ".join(f"{v:.2g}" for v in h.normalized_entropy)
            hot = ", ".join(f"{v:.2f}" for v in h.one_hot)
            print(
                f"bench, layer 1 head 2 query/key x{factor}: normalised entropy per head {ent}, one-hot queries {hot}; "
                f"alerts: {attention_alerts(mon) or 'none'}"
            )
    from transformers import GPT2Config, GPT2LMHeadModel

    for factor in (100, 1000):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0))
        c = model.transformer.h[0].attn.c_attn
        scale_head(c.weight, c.bias, [slice(8, 16), slice(40, 48)], factor, 1)
        ids = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(0))
        with Monitor(model, every_n_steps=1, on_alert="ignore") as mon:
            for step in range(3):
                with mon.step(step):
                    model(input_ids=ids)
            h = mon.attention_health()["transformer.h.0.attn"]
            ent = ", ".join(f"{v:.2g}" for v in h.normalized_entropy)
            hot = ", ".join(f"{v:.2f}" for v in h.one_hot)
            print(
                f"GPT-2, layer 0 head 1 query/key x{factor}: normalised entropy per head {ent}, one-hot queries {hot}; "
                f"alerts: {attention_alerts(mon) or 'none'}"
            )
    torch.manual_seed(0)
    model = BiasedToFirst()
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon:
        for step in range(3):
            with mon.step(step):
                model(torch.randn(8, 12, 32))
        sink = ", ".join(f"{v:.3f}" for v in mon.attention_health()["attn"].sink)
        print(f"+30 on the first key, head 1: first-token mass per head {sink}; alerts: {attention_alerts(mon) or 'none'}")


def cost(rounds: int = 40) -> None:
    import contextlib
    import statistics
    import time

    from overhead import make_workload

    w = make_workload("transformer", "cpu")
    model, (x, _) = w.model, w.batch
    with_heads = Monitor(model, every_n_steps=1, on_alert="ignore", histograms=True)
    without = Monitor(model, every_n_steps=1, on_alert="ignore", histograms=True, attention=False)
    times: dict[str, list[float]] = {"bare": [], "monitor, attention=False": [], "monitor": []}
    step = 0

    def run(name: str) -> None:
        nonlocal step
        mon = {"monitor": with_heads, "monitor, attention=False": without}.get(name)
        t = time.perf_counter()
        with mon.step(step) if mon is not None else contextlib.nullcontext():
            model(x)
        times[name].append(time.perf_counter() - t)
        step += 1

    for name, measured in times.items():  # warm-up: the first sample discovers watch points
        run(name)
        measured.clear()
    order = list(times)
    for r in range(rounds):
        for name in order[r % 3 :] + order[: r % 3]:
            run(name)
        with_heads.flush()
        without.flush()
    with_heads.close()
    without.close()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"forward of the benchmark transformer, medians of {rounds} rounds: bare {med['bare']:.1f} ms, "
        f"sampled without attention heads {med['monitor, attention=False']:.1f} ms, with {med['monitor']:.1f} ms: "
        f"the heads add {med['monitor'] - med['monitor, attention=False']:.2f} ms per sampled step"
    )


def main() -> None:
    which = set(sys.argv[1:]) or {"bench", "gpt2", "bert", "patho"}
    torch.set_num_threads(2)
    if "bench" in which:
        report("bench Adam 1e-3", bench("adam", 1e-3))
        report("bench Adam 1e-4", bench("adam", 1e-4))
        report("bench SGD 1e-2", bench("sgd", 1e-2))
    if "gpt2" in which:
        report("GPT-2 copy AdamW 1e-3", hugging_face("gpt2", 1e-3))
        report("GPT-2 copy AdamW 3e-3", hugging_face("gpt2", 3e-3))
    if "gpt2long" in which:
        report("GPT-2 copy AdamW 3e-3, 1000 steps", hugging_face("gpt2", 3e-3, steps=1000, every=25))
    if "gpt2longer" in which:
        report("GPT-2 copy AdamW 3e-3, 2000 steps", hugging_face("gpt2", 3e-3, steps=2000, every=50))
    if "bert" in which:
        report("BERT MLM AdamW 1e-3", hugging_face("bert", 1e-3))
        report("BERT MLM AdamW 3e-3", hugging_face("bert", 3e-3))
    if "patho" in which:
        pathologies()
    if "cost" in which:
        cost()


if __name__ == "__main__":
    main()
