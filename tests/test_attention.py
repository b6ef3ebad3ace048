"""Attention heads: per head entropy and first-token mass, against ground truth computed here from
the probabilities PyTorch and Hugging Face return themselves (``need_weights=True,
average_attn_weights=False``; ``output_attentions=True`` in eval mode), the constructed pathologies
and healthy training, hooks, TensorBoard output and DDP sums."""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from monitor import AttentionHealth, Monitor, Thresholds
from monitor.attention import AttentionCapture, find_attention
from monitor.headstats import SEQUENCES, mha_rows
from monitor.options import Options

logging.getLogger("transformers").setLevel(logging.ERROR)


def truth(w: torch.Tensor, visible: np.ndarray, one_hot: float = 1e-5):
    """Per head: mean entropy (nats), mean entropy / log(visible keys), mean probability on the first
    visible key, the share of queries whose normalised entropy is at most ``one_hot``, and the
    queries counted (those that see at least two keys), over the first SEQUENCES sequences.
    ``w``: ``[N, H, L, S]`` probabilities; ``visible``: broadcastable to it."""
    p = w.double().numpy()[:SEQUENCES]
    vis = np.broadcast_to(visible, w.shape)[:SEQUENCES]
    n, h, length, _ = p.shape
    ent, norm, sink, hot, count = (np.zeros(h) for _ in range(5))
    for s in range(n):
        for head in range(h):
            for q in range(length):
                keys = np.flatnonzero(vis[s, head, q])
                if keys.size < 2:
                    continue
                row = p[s, head, q, keys]
                e = -sum(x * np.log(x) for x in row if x > 0)
                ent[head] += e
                norm[head] += e / np.log(keys.size)
                sink[head] += p[s, head, q, keys[0]]
                hot[head] += e / np.log(keys.size) <= one_hot
                count[head] += 1
    return ent / count, norm / count, sink / count, hot / count, count


def check(health: AttentionHealth, expected, tol: float = 2e-5) -> None:
    ent, norm, sink, hot, count = expected
    np.testing.assert_allclose(health.entropy, ent, atol=tol)
    np.testing.assert_allclose(health.normalized_entropy, norm, atol=tol)
    np.testing.assert_allclose(health.sink, sink, atol=tol)
    np.testing.assert_allclose(health.one_hot, hot, atol=1e-9)
    assert health.queries == int(count.max())


class Attend(nn.Module):
    """One nn.MultiheadAttention called with fixed masks, then a watched activation."""

    def __init__(self, mha: nn.MultiheadAttention, **call) -> None:
        super().__init__()
        self.mha, self.call = mha, call

    def forward(self, q: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        k = q if k is None else k
        return torch.relu(self.mha(q, k, k, need_weights=False, **self.call)[0])


def monitored(model: nn.Module, *inputs, **kw) -> dict[str, AttentionHealth]:
    with Monitor(model, every_n_steps=1, on_alert="ignore", histograms=False, **kw) as mon:
        with mon.step(0):
            model(*inputs)
        return mon.attention_health()


E, H, L, N = 16, 4, 7, 10  # more sequences than SEQUENCES: only the first ones are measured
CAUSAL = np.tril(np.ones((L, L), bool))[None, None]


def _padding() -> torch.Tensor:
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 5:] = True  # right padding
    kpm[3, :2] = True  # left padding: the first token a query may see is key 2
    return kpm


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "causal_bool", "padding_causal", "per_head", "cross"])
def test_multihead_attention_matches_the_probabilities_pytorch_returns(batch_first, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, dropout=0.3).train()  # dropout: numbers are before it
    x = torch.randn(N, L, E)
    k_in = torch.randn(N, 5, E) if masks == "cross" else x
    call: dict = {}
    vis = np.ones((N, 1, 1, k_in.shape[1]), bool)
    kpm = _padding()
    if "padding" in masks:
        call["key_padding_mask"] = kpm
        vis = vis & ~kpm.numpy()[:, None, None, :]
    if masks in ("causal", "padding_causal"):
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)  # float, -inf above the diagonal
        call["key_padding_mask"] = torch.zeros(N, L).masked_fill(kpm, -torch.inf) if "padding" in masks else None
        vis = vis & CAUSAL
    if masks == "causal_bool":
        call["attn_mask"] = ~torch.tril(torch.ones(L, L, dtype=torch.bool))
        vis = vis & CAUSAL
    if masks == "per_head":  # [N * H, L, S] boolean, a different pattern per head
        m = torch.rand(N * H, L, L, generator=torch.Generator().manual_seed(1)) > 0.6
        m[..., 0] = False
        call["attn_mask"] = m
        vis = vis & ~m.view(N, H, L, L).numpy()
    seq = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    model = Attend(mha, **call)
    got = monitored(model, seq(x), seq(k_in))["mha"]
    mha.eval()
    with torch.no_grad():
        _, w = mha(seq(x), seq(k_in), seq(k_in), need_weights=True, average_attn_weights=False, **call)
    check(got, truth(w, vis))
    if masks == "causal":
        assert got.queries == SEQUENCES * (L - 1)  # each sequence's first query sees one key: left out


def test_separate_projections_bias_kv_zero_attention_and_unbatched_inputs():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, kdim=12, vdim=9, add_bias_kv=True, add_zero_attn=True).eval()
    x, k, v = torch.randn(3, 6, E), torch.randn(3, 5, 12), torch.randn(3, 5, 9)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, 0] = True
    with torch.no_grad():
        _, w = mha(x, k, v, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
        rows = mha_rows(mha, x, k, kpm)
    vis = np.concatenate([~kpm.numpy(), np.ones((3, 2), bool)], 1)[:, None, None, :]  # bias_k, zero key: visible
    ent, norm, sink, hot, count = truth(w, vis)
    expect = np.stack([ent * count, norm * count, sink * count, hot * count, count])
    np.testing.assert_allclose(rows.numpy(), expect, rtol=1e-5)
    x1 = torch.randn(6, E)  # unbatched
    model = Attend(nn.MultiheadAttention(E, H).eval())
    with torch.no_grad():
        _, w1 = model.mha(x1, x1, x1, need_weights=True, average_attn_weights=False)
    check(monitored(model, x1)["mha"], truth(w1[None], np.ones((1, 1, 1, 6), bool)))


@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_transformer_encoder_layers_in_train_mode_and_on_the_fast_path(mode):
    """In eval mode under no_grad a TransformerEncoderLayer takes its fused fast path, which never calls
    self_attn, unless a module of the layer has a hook: on a sampled step it runs the regular path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, batch_first=True, dropout=0.2)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(N, L, E)
    kpm = _padding()
    model.train(mode == "train")
    ctx = torch.no_grad() if mode == "eval_no_grad" else torch.enable_grad()
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon, ctx, mon.step(0):
        model(x, src_key_padding_mask=kpm)
    got = mon.attention_health()
    assert list(got) == ["layers.0.self_attn", "layers.1.self_attn"]
    attn = model.layers[0].self_attn.eval()  # the first layer's input is x: its truth needs no forward
    with torch.no_grad():
        _, w = attn(x, x, x, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    check(got["layers.0.self_attn"], truth(w, ~kpm.numpy()[:, None, None, :]))


def _hf(kind: str, impl: str, layers: int = 2, **extra):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = dict(n_layer=layers, n_head=4, n_embd=32, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(GPT2Config(**cfg, **extra, attn_implementation=impl))
    if kind == "bert":
        cfg = dict(num_hidden_layers=layers, num_attention_heads=4, hidden_size=32, intermediate_size=64, vocab_size=50)
        return BertModel(BertConfig(**cfg, **extra, attn_implementation=impl))
    cfg = dict(
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=50, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(LlamaConfig(**cfg, **extra, attn_implementation=impl))


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hugging_face_heads_match_output_attentions(kind, impl):
    """Eager: the softmax inside the attention module; sdpa (transformers' default): recomputed from the
    query, key, mask and scale handed to F.scaled_dot_product_attention (Llama: grouped key heads)."""
    pytest.importorskip("transformers")
    ids = torch.randint(0, 50, (N, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(N, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    model = _hf(kind, "eager").eval()
    with torch.no_grad():  # the truth: eager attention's own probabilities
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    model.set_attn_implementation(impl)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning that heads are not watched
        with Monitor(model, every_n_steps=1, on_alert="ignore") as mon, torch.no_grad(), mon.step(0):
            model(input_ids=ids, attention_mask=mask)
    got = mon.attention_health()
    assert len(got) == 2 == len(out.attentions)
    vis = mask.bool().numpy()[:, None, None, :] & (np.tril(np.ones((12, 12), bool)) if kind != "bert" else True)
    for w, health in zip(out.attentions, got.values()):
        check(health, truth(w, vis), tol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hugging_face_numbers_in_train_mode_are_before_attention_dropout(impl):
    """Eager attention returns its weights after dropout in training mode; the monitor reads the
    softmax itself (eager) or recomputes it (sdpa): the first layer's numbers equal eval mode's."""
    pytest.importorskip("transformers")
    model = _hf("gpt2", "eager", layers=1, attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w = model.eval()(input_ids=ids, output_attentions=True).attentions[0]
    model.set_attn_implementation(impl)
    got = monitored(model.train(), ids)["transformer.h.0.attn"]
    check(got, truth(w, np.tril(np.ones((12, 12), bool))[None, None]), tol=1e-4)


def small_encoder(layers: int = 2, d: int = 32, heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True), layers, enable_nested_tensor=False)


def sharpen(mha: nn.MultiheadAttention, head: int, factor: float = 100.0) -> None:
    """Scale one head's query and key projections (weights and biases) by ``factor``: its scores grow
    factor**2 and its softmax becomes one-hot."""
    e, d = mha.embed_dim, mha.embed_dim // mha.num_heads
    with torch.no_grad():
        for block in (0, e):  # query rows, key rows of the packed in-projection
            rows = slice(block + head * d, block + (head + 1) * d)
            mha.in_proj_weight[rows] *= factor
            mha.in_proj_bias[rows] *= factor


def train(model, mon, steps, batch, loss_fn, lr=1e-3):
    opt = torch.optim.Adam(model.parameters(), lr)
    for step in range(steps):
        with mon.step(step):
            loss = loss_fn(model, batch(step))
            loss.backward()
            opt.step()
            opt.zero_grad()
    return mon


def regression(model, x):
    return (model(x) - x.flip(1)).pow(2).mean()


def test_nan_attention_gives_no_verdict_and_restarts_the_streak():
    model = small_encoder()
    sharpen(model.layers[1].self_attn, head=2)
    clean = torch.randn(16, 16, 32, generator=torch.Generator().manual_seed(0))
    poisoned = clean.clone()
    poisoned[0, 3] = float("nan")  # a measured sequence: every head's scores are NaN there
    mon = Monitor(model, every_n_steps=1, on_alert="ignore")
    with mon, torch.no_grad():
        for step in range(6):
            with mon.step(step):
                model(poisoned if step == 2 else clean)
            if step == 2:
                assert np.isnan(mon.attention_health()["layers.1.self_attn"].normalized_entropy[2])
    got = [(a.step, a.kind) for a in mon.alerts if a.kind.startswith("attention")]
    # collapsed on steps 0, 1, (NaN: no verdict, the streak starts over), 3, 4, 5: the alert comes at step 5
    assert got == [(5, "attention_entropy")]


def test_a_one_hot_head_alerts_on_the_third_sampled_step_and_names_the_head():
    model = small_encoder()
    sharpen(model.layers[1].self_attn, head=2)
    x = torch.randn(16, 16, 32, generator=torch.Generator().manual_seed(0))
    mon = Monitor(model, every_n_steps=5, on_alert="ignore")
    train(model, mon, 11, lambda s: x, regression)
    got = [a for a in mon.alerts if a.kind.startswith("attention")]
    assert [(a.step, a.layer, a.kind) for a in got] == [(10, "layers.1.self_attn", "attention_entropy")]
    # 99% here, 100% on another CPU: a query or two sit near the 1e-5 line
    assert re.search(r"head 2 of 4 collapsed: (9[5-9]|100)% of its queries look at one key", got[0].message)
    assert "3 consecutive sampled steps" in got[0].message and "try" in got[0].message
    h = mon.attention_health()["layers.1.self_attn"]
    assert h.normalized_entropy[2] < 1e-3 < 0.3 < min(h.normalized_entropy[i] for i in (0, 1, 3))
    assert h.one_hot[2] > 0.95 and max(h.one_hot[i] for i in (0, 1, 3)) == 0.0
    assert h.collapsed(Thresholds().attention_collapsed) == (2,)
    mon.close()


class BiasedToFirst(nn.Module):
    """An encoder whose attention scores of one head get a large bias toward key 0 (a position bias gone wrong)."""

    def __init__(self, head: int, bias: float = 30.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head, self.bias = head, bias

    def forward(self, x):
        n, t, _ = x.shape
        b = torch.zeros(n, 4, t, t)
        b[:, self.head, :, 0] = self.bias
        h = x + self.attn(x, x, x, attn_mask=b.view(n * 4, t, t), need_weights=False)[0]
        return h + self.ff(h)


def test_a_head_biased_to_the_first_token_alerts_as_a_sink_and_recovers():
    torch.manual_seed(0)
    model = BiasedToFirst(head=1)
    x = torch.randn(8, 12, 32)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore")
    for step in range(7):
        model.bias = 30.0 if step < 3 else 0.0  # fixed at step 3
        with mon.step(step):
            model(x)
    got = [(a.step, a.layer, a.kind, a.recovered) for a in mon.alerts if a.kind.startswith("attention")]
    assert got == [(2, "attn", "attention_sink", False), (4, "attn", "attention_sink", True)]
    msg = next(a.message for a in mon.alerts if a.kind == "attention_sink")
    assert "head 1 of 4 put 100.0% of its attention on the first token" in msg
    mon.close()


def test_hugging_face_one_hot_head_alerts():
    pytest.importorskip("transformers")
    model = _hf("gpt2", "sdpa")  # transformers' default implementation
    e, d, head = 32, 8, 1
    with torch.no_grad():
        for block in (0, e):  # GPT-2's c_attn is a Conv1D: [in, 3 * embed] with query, key, value columns
            cols = slice(block + head * d, block + (head + 1) * d)
            model.transformer.h[0].attn.c_attn.weight[:, cols] *= 1000  # GPT-2's init is small (std 0.02)
            model.transformer.h[0].attn.c_attn.bias[cols] *= 1000
    ids = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(0))
    mon = Monitor(model, every_n_steps=1, on_alert="ignore")
    for step in range(3):
        with mon.step(step):
            model(input_ids=ids)
    got = [(a.step, a.layer, a.kind) for a in mon.alerts if a.kind.startswith("attention")]
    assert got == [(2, "transformer.h.0.attn", "attention_entropy")]
    assert mon.attention_health()["transformer.h.0.attn"].normalized_entropy[head] < 1e-6
    mon.close()


def test_healthy_training_is_silent_and_far_from_the_thresholds():
    """The benchmark's encoder shrunk, and a small GPT-2 with a first (BOS) token on a copy task."""
    th = Thresholds()
    model = small_encoder()
    x = torch.randn(16, 16, 32, generator=torch.Generator().manual_seed(0))
    lowest, highest, hot = [], [], []

    def record(mon, step):
        for h in mon.attention_health().values():
            if h.step == step:
                lowest.append(min(h.normalized_entropy))
                highest.append(max(h.sink))
                hot.append(max(h.one_hot))

    mon = Monitor(model, every_n_steps=5, on_alert="ignore")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for step in range(60):
        with mon.step(step):
            regression(model, x).backward()
            opt.step()
            opt.zero_grad()
        if step % 5 == 0:
            record(mon, step)
    assert not [a for a in mon.alerts if a.kind.startswith("attention")]
    mon.close()
    pytest.importorskip("transformers")
    gpt = _hf("gpt2", "sdpa", layers=2)
    g = torch.Generator().manual_seed(0)

    def copy_task(step):
        a = torch.randint(2, 50, (16, 8), generator=g)
        return torch.cat([torch.zeros(16, 1, dtype=torch.long), a, a], 1)

    mon = Monitor(gpt, every_n_steps=5, on_alert="ignore")
    opt = torch.optim.AdamW(gpt.parameters(), 3e-3)
    for step in range(40):
        ids = copy_task(step)
        with mon.step(step):
            gpt(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        if step % 5 == 0:
            record(mon, step)
    assert not [a for a in mon.alerts if a.kind.startswith("attention")]
    mon.close()
    assert len(lowest) == 2 * 12 + 2 * 8
    assert min(lowest) > 10 * th.attention_entropy and max(highest) < th.release * th.attention_sink
    assert max(hot) < 0.1 * th.attention_collapsed


def _snapshot(model: nn.Module):
    return [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs)) for m in model.modules()]


@pytest.mark.parametrize("kind", ["torch", "hf"])
def test_hooks_and_the_softmax_mode_are_removed_when_the_forward_raises(kind):
    from torch.overrides import _get_current_function_mode_stack

    if kind == "hf":
        pytest.importorskip("transformers")
        model = _hf("gpt2", "eager")
        inner = model.transformer.h[1].attn.c_proj  # raises inside an attention module, after its softmax
        run = lambda: model(input_ids=torch.randint(0, 50, (2, 8)))  # noqa: E731
    else:
        model = small_encoder()
        inner = model.layers[1].linear1
        run = lambda: model(torch.randn(2, 5, 32))  # noqa: E731

    def boom(module, args):
        raise RuntimeError("boom")

    handle = inner.register_forward_pre_hook(boom)
    before = _snapshot(model)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore")
    with pytest.raises(RuntimeError, match="boom"), mon.step(0):
        run()
    assert _snapshot(model) == before and _get_current_function_mode_stack() == []
    handle.remove()
    with mon.step(1):  # the next sampled step works and leaves nothing behind either
        run()
    assert len(mon.attention_health()) == 2 and _get_current_function_mode_stack() == []
    mon.close()


def test_tensorboard_scalars_and_the_heads_image(tmp_path):
    from io import BytesIO

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = small_encoder()
    sharpen(model.layers[0].self_attn, head=3)
    x = torch.randn(4, 10, 32)
    with Monitor(model, every_n_steps=1, logdir=tmp_path, on_alert="ignore", images_every_n_samples=1) as mon:
        for step in range(2):
            with mon.step(step):
                model(x)
        health = mon.attention_health()
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    for name, h in health.items():
        ent = [v for v in h.normalized_entropy]
        expect = {
            "attention_entropy": np.mean(ent), "attention_entropy_min": min(ent), "attention_one_hot_max": max(h.one_hot),
            "attention_sink": np.mean(h.sink), "attention_sink_max": max(h.sink),
        }
        for prefix, value in expect.items():
            events = ea.Scalars(f"{prefix}/{name}")
            assert [e.step for e in events] == [0, 1]
            assert events[-1].value == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert "attention_heads" in tags["images"]
    images = ea.Images("attention_heads")
    assert [i.step for i in images] == [0, 1]
    pic = np.asarray(Image.open(BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert pic.shape[1] == 350 and pic.shape[0] < 1000


def test_attention_false_options_and_thresholds():
    model = small_encoder()
    with Monitor(model, every_n_steps=1, on_alert="ignore", attention=False) as mon, mon.step(0):
        assert not model.layers[0].self_attn._forward_hooks_with_kwargs  # no attention hook attached
        model(torch.randn(2, 5, 32))
    assert mon.attention_health() == {} and len(mon.health()) > 0
    with pytest.raises(TypeError, match="`attention` to be True or False"):
        Options(attention="yes")
    for kw, needle in [
        ({"attention_entropy": 0}, "attention_entropy"), ({"attention_sink": 1.5}, "attention_sink"),
        ({"attention_collapsed": 0}, "attention_collapsed"),
        ({"attention_samples": 0}, "attention_samples"),
    ]:
        with pytest.raises(ValueError, match=needle):
            Thresholds(**kw)
    assert [p.name for p in find_attention(model)] == ["layers.0.self_attn", "layers.1.self_attn"]


def test_calls_add_up_pauses_are_skipped_and_streaks_survive_a_checkpoint():
    model = small_encoder()
    sharpen(model.layers[0].self_attn, head=0)
    x = torch.randn(3, 6, 32)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon.step(0):
        model(x)
        model(x)  # two micro-batches: twice the queries
        mon.pause()
        model(torch.randn(5, 9, 32))  # a validation forward inside the step: not counted
        mon.pause(False)
    assert mon.attention_health()["layers.0.self_attn"].queries == 2 * 3 * 6
    with mon.step(1):
        model(x)
    state = mon.state_dict()
    mon.close()
    resumed = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    resumed.load_state_dict(state)
    with resumed.step(2):
        model(x)
    assert [(a.step, a.kind) for a in resumed.alerts if a.kind.startswith("attention")] == [(2, "attention_entropy")]
    resumed.close()


def test_ddp_ranks_add_up_in_the_one_collective():
    """Under DDP the sums travel in the step's one gathered tensor: two ranks of 4 sequences give the
    numbers of one process that saw all 8."""
    model = small_encoder().eval()  # no dropout: the three runs see the same activations
    xa, xb = torch.randn(4, 6, 32), torch.randn(4, 6, 32)
    flats = []
    rank_b = Monitor(model, every_n_steps=1, on_alert="ignore", histograms=False)
    rank_b.gather = lambda flat: (flats.append(flat.clone()), flat[None])[1]
    with rank_b.step(0):
        model(xb)
    rank_b.close()
    rank_a = Monitor(model, every_n_steps=1, on_alert="ignore", histograms=False)
    rank_a.gather = lambda flat: torch.stack([flat, flats[0]])
    with rank_a.step(0):
        model(xa)
    whole = Monitor(model, every_n_steps=1, on_alert="ignore", histograms=False)
    with whole.step(0):
        model(torch.cat([xa, xb]))
    for name, h in whole.attention_health().items():
        g = rank_a.attention_health()[name]
        assert g.queries == h.queries == 8 * 6
        np.testing.assert_allclose(g.normalized_entropy, h.normalized_entropy, atol=1e-5)
        np.testing.assert_allclose(g.sink, h.sink, atol=1e-5)
    rank_a.close()
    whole.close()


def test_capture_alone_detaches_on_every_path():
    model = small_encoder()
    cap = AttentionCapture(model, lambda k, m: None)
    before = _snapshot(model)
    cap.begin()
    assert _snapshot(model) != before
    assert cap.end() is None  # nothing ran
    assert _snapshot(model) == before


def test_the_heads_image_fits_the_card_for_few_and_many_modules():
    from monitor.picture import CARD_WIDTH, MAX_HEIGHT, WHITE
    from monitor.render import render_attention_heads

    rng = np.random.default_rng(0)
    for n, h in [(1, 2), (4, 4), (12, 12), (48, 32), (4, 400)]:
        ent, sink = rng.uniform(0, 1, (n, h)), rng.uniform(0, 1, (n, h))
        pic = render_attention_heads([f"model.transformer.h.{i}.attn" for i in range(n)], [h] * n, ent, sink, 10)
        assert pic.pixels.shape[1] == CARD_WIDTH and pic.pixels.shape[0] <= MAX_HEIGHT
    # a module with fewer heads than the widest: its missing cells are white
    pic = render_attention_heads(["a", "b"], [8, 4], np.full((2, 8), 0.5), np.zeros((2, 8)), 0)
    grid_rows = [r for r in range(pic.pixels.shape[0]) if (pic.pixels[r] != WHITE).sum() > 100]
    last = pic.pixels[grid_rows[len(grid_rows) // 2 + 2]]
    assert (last[-80:] == WHITE).all()


def test_lightning_and_trainer_callbacks_give_the_heads(tmp_path):
    pytest.importorskip("lightning")
    import lightning as L

    from integrations.lightning import ActivationMonitor as LightningMonitor

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_encoder()

        def training_step(self, batch, i):
            return regression(self.net, batch[0])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-3)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 6, 32)), batch_size=4)
    for attention in (True, False):
        cb = LightningMonitor(every_n_steps=1, on_alert="ignore", attention=attention)
        trainer = L.Trainer(
            max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[cb],
        )
        trainer.fit(Module(), data)
        assert list(cb.attention_health()) == (["net.layers.0.self_attn", "net.layers.1.self_attn"] if attention else [])
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from integrations.transformers import ActivationMonitor as TrainerMonitor

    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    cb = TrainerMonitor(every_n_steps=1, on_alert="ignore", logdir=str(tmp_path / "hf"))
    args = TrainingArguments(
        str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=4, save_strategy="no",
        max_steps=2, disable_tqdm=True, dataloader_num_workers=0,
    )
    Trainer(model=_hf("gpt2", "sdpa"), args=args, train_dataset=rows, callbacks=[cb]).train()
    assert list(cb.attention_health()) == ["transformer.h.0.attn", "transformer.h.1.attn"]
