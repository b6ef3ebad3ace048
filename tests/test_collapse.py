"""Representation collapse of stack blocks: token similarity and block update, against ground truth
computed here with plain loops over sequences, on real attention stacks and transformers."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monitor import Monitor
from monitor.tokens import block_update, token_rows, token_similarity


def true_similarity(x: np.ndarray) -> float:
    """Mean over sequences of the mean pairwise cosine of its tokens, centred by the mean token of
    all sequences and positions; x is [batch, tokens, width]."""
    c = x - x.reshape(-1, x.shape[-1]).mean(0)
    sims = []
    for seq in c:
        pairs = [
            float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in itertools.permutations(seq, 2)
        ]
        sims.append(np.mean(pairs))
    return float(np.mean(sims))


@pytest.mark.parametrize("token_dim", [1, 0])
def test_rows_give_the_pairwise_cosine_and_the_update_ratio(token_dim):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 1, 16, generator=g)
    x = base + 0.7 * torch.randn(6, 9, 16, generator=g)  # tokens of a sequence partly alike
    inp = torch.randn(6, 9, 16, generator=g)
    xs, ins = (x, inp) if token_dim == 1 else (x.transpose(0, 1), inp.transpose(0, 1))
    rows, n = token_rows(xs, ins, token_dim)
    assert n == 6
    got = token_similarity(rows[0].numpy(), rows[3].numpy())
    truth = true_similarity(x.double().numpy())
    assert 0.2 < truth < 0.9
    assert got == pytest.approx(truth, abs=1e-5)
    upd = block_update(rows[1].numpy(), rows[2].numpy())
    assert upd == pytest.approx(float((x - inp).norm() / inp.norm()), rel=1e-5)


def test_one_sequence_or_one_token_is_not_judged():
    rows, n = token_rows(torch.randn(1, 8, 4), None, 1)
    assert n == 0 and token_similarity(rows[0].numpy(), rows[3].numpy()) is None
    rows, n = token_rows(torch.randn(5, 1, 4), None, 1)
    assert n == 0 and token_similarity(rows[0].numpy(), rows[3].numpy()) is None
    assert block_update(rows[1].numpy(), rows[2].numpy()) is None  # no input given


class ConstantBlock(nn.Module):
    """A block whose LayerNorm has weight 0: every token of every sequence is its bias."""

    def __init__(self, d: int, bias: float) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(d, d), nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight.zero_()
            self.norm.bias.fill_(bias)

    def forward(self, x):
        return self.norm(self.fc(x))


@pytest.mark.parametrize("bias", [0.0, 1.0, 0.3])
def test_a_block_whose_tokens_are_all_one_vector_is_collapsed(bias):
    """Every token exactly the same vector (all zero, say): centred, they are all exactly zero;
    they read -1/(T-1), "healthy", whenever the float mean came out exact (bias 0 or 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(ConstantBlock(32, 0.5), ConstantBlock(32, bias))
    model[0].norm.weight.data.fill_(1.0)  # the first block is an ordinary one
    x = torch.randn(16, 12, 32)
    with torch.no_grad():
        assert torch.unique(model(x).reshape(-1, 32), dim=0).shape[0] == 1  # ground truth: one vector
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon, mon.step(0):
        model(x)
    h = mon.health()["1"]
    assert h.metrics["token_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert [(a.layer, a.kind) for a in mon.alerts] == [("1", "collapse")]


class AttentionOnly(nn.Module):
    """Self-attention with no residual connection and no MLP (Dong et al. 2021)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def outputs_of(model: nn.Module, blocks: list[nn.Module], x: torch.Tensor) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(o.detach().double().numpy())) for b in blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_an_attention_only_stack_collapses_and_alerts_at_the_first_sampled_step():
    torch.manual_seed(0)
    stack = nn.Sequential(*[AttentionOnly(32, 4) for _ in range(5)])
    x = torch.randn(8, 12, 32)
    truth = [true_similarity(o) for o in outputs_of(stack, list(stack), x)]
    mon = Monitor(stack, every_n_steps=1, on_alert="ignore", background=False)
    with mon, mon.step(0):
        stack(x)
    health = mon.health()
    for i, t in enumerate(truth):
        assert health[str(i)].metrics["token_similarity"] == pytest.approx(t, abs=1e-4)
    alerted = sorted(a.layer for a in mon.alerts if a.kind == "collapse")
    assert alerted == [str(i) for i, t in enumerate(truth) if t >= 0.9]
    assert len(alerted) >= 3 and truth[-1] > 0.999  # near-identical tokens a few layers in
    assert "rank collapse" in next(a.message for a in mon.alerts if a.kind == "collapse")


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_healthy_pre_ln_transformer_trains_without_collapse(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=batch_first, norm_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 20, 64), torch.randn(16, 20, 64)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    blocks = list(model.layers)
    seen: list[tuple[np.ndarray, np.ndarray]] = []  # (input, output) of each block at the last sampled step

    def keep(m, a, o):
        seen.append(tuple(t.detach().double().numpy() for t in (a[0], o)))

    mon = Monitor(model, every_n_steps=10, on_alert="ignore", background=False)
    with mon:
        for step in range(60):
            hooks = [b.register_forward_hook(keep) for b in blocks] if step == 50 else []
            with mon.step(step):
                loss = F.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            for h in hooks:
                h.remove()
    assert [a for a in mon.alerts if a.kind == "collapse"] == []
    health = mon.health()
    for i, (inp, out) in enumerate(seen):
        h = health[f"layers.{i}"]
        truth = true_similarity(out if batch_first else out.transpose(1, 0, 2))
        assert truth < 0.2  # far from collapse
        assert h.metrics["token_similarity"] == pytest.approx(truth, abs=1e-4)
        assert h.metrics["block_update"] == pytest.approx(float(np.linalg.norm(out - inp) / np.linalg.norm(inp)), rel=1e-4)


def test_hugging_face_blocks_get_token_similarity_and_block_update():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(cfg).eval()  # no dropout: the same forward twice
    ids = torch.randint(0, 64, (4, 16))
    blocks = list(model.transformer.h)
    outs, ins = _first_outputs(model, blocks, ids)
    truth = [true_similarity(o) for o in outs]
    updates = [float(np.linalg.norm(o - i) / np.linalg.norm(i)) for o, i in zip(outs, ins)]  # ||out - in|| / ||in||
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
    with mon, mon.step(0):
        model(ids)
    health = mon.health()
    for i, t in enumerate(truth):
        h = health[f"transformer.h.{i}"]
        assert h.metrics["token_similarity"] == pytest.approx(t, abs=1e-4)
        assert h.metrics["block_update"] == pytest.approx(updates[i], rel=1e-4)
    assert [a for a in mon.alerts if a.kind == "collapse"] == []


def _first_outputs(
    model: nn.Module, blocks: list[nn.Module], ids: torch.Tensor
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each block's hidden-state output and hidden-state input of one forward."""
    seen: list[np.ndarray] = []
    seen_in: list[np.ndarray] = []

    def keep(m, a, kw, o):
        seen.append((o[0] if isinstance(o, tuple) else o).detach().double().numpy())
        seen_in.append((a[0] if a else kw["hidden_states"]).detach().double().numpy())

    hooks = [b.register_forward_hook(keep, with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen, seen_in


def masked_similarity(x: np.ndarray, mask: np.ndarray) -> float:
    """true_similarity over the real tokens only: centred by the mean real token, each sequence's
    pairwise cosine over its real tokens (a sequence with fewer than two is left out)."""
    keep = mask.astype(bool)
    c = x - x[keep].mean(0)
    sims = []
    for seq, k in zip(c, keep):
        toks = seq[k]
        pairs = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in itertools.permutations(toks, 2)]
        if len(toks) >= 2:
            sims.append(np.mean(pairs))
    return float(np.mean(sims))


def test_padding_tokens_are_left_out_with_an_attention_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, 16, generator=g)
    lengths = torch.tensor([6, 4, 6, 1, 5])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    x[mask == 0] = 3.0 + 0.01 * torch.randn(int((mask == 0).sum()), 16, generator=g)  # padding: nearly one vector
    rows, n = token_rows(x, None, 1, mask)
    assert n == 5 and float(rows[3].sum()) == 4  # the one-token sequence adds nothing and is not counted
    got = token_similarity(rows[0].numpy(), rows[3].numpy())
    truth = masked_similarity(x.double().numpy(), mask.numpy())
    assert got == pytest.approx(truth, abs=1e-5) and abs(truth) < 0.2
    plain = token_rows(x, None, 1)[0]
    unmasked = token_similarity(plain[0].numpy(), plain[3].numpy())
    assert unmasked == pytest.approx(true_similarity(x.double().numpy()), abs=1e-5) and unmasked > truth + 0.15  # the padding alone reads higher


def test_calls_of_different_lengths_add_up_and_one_sequence_calls_are_not_judged():
    """Gradient accumulation: each call is centred by its own mean token and each sequence adds its
    own similarity, whatever its length. Batch size 1 per call: nothing to centre by, no verdict
    (a collapsed sequence centred by its own mean looks like noise)."""
    torch.manual_seed(0)
    stack = nn.Sequential(*[AttentionOnly(32, 4) for _ in range(3)])
    short, long = torch.randn(3, 4, 32), torch.randn(2, 20, 32)
    truth_calls = [outputs_of(stack, list(stack), x) for x in (short, long)]
    mon = Monitor(stack, every_n_steps=1, on_alert="ignore", background=False)
    with mon:
        with mon.step(0):
            stack(short)
            stack(long)
        sims = {name: h.metrics["token_similarity"] for name, h in mon.health().items()}
        for i in range(3):
            per_seq = []
            for c in (0, 1):
                out = truth_calls[c][i]
                for seq in out - out.reshape(-1, 32).mean(0):  # centred by its call's mean token
                    pairs = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in itertools.permutations(seq, 2)]
                    per_seq.append(np.mean(pairs))
            assert sims[str(i)] == pytest.approx(np.mean(per_seq), abs=1e-4)
        with mon.step(1):
            for s in range(4):
                stack(torch.randn(1, 12, 32))
        h = mon.health()["2"]
    assert h.step == 1 and h.metrics["token_similarity"] is None
    assert not any(a.kind == "collapse" and a.step == 1 for a in mon.alerts)


def test_a_padded_llama_without_position_embeddings_is_not_collapsed():
    """Right padding to a fixed length: with rotary positions only, padding tokens come out nearly
    identical (0.9 over all positions). With the model's `attention_mask`, only real tokens count."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    lengths = torch.tensor([12, 20, 16, 24, 14, 18, 22, 13])
    mask = (torch.arange(128)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 32, (8, 128)).masked_fill(mask == 0, 0)
    seen: list[np.ndarray] = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().double().numpy())) for b in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    with Monitor(model, every_n_steps=1, on_alert="ignore", background=False) as mon, mon.step(0), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for i, out in enumerate(seen):
        got = mon.health()[f"model.layers.{i}"].metrics["token_similarity"]
        assert got == pytest.approx(masked_similarity(out, mask.numpy()), abs=1e-4)
        assert true_similarity(out) > 0.6  # what the padding alone would have read
    assert [a for a in mon.alerts if a.kind == "collapse"] == []


def test_an_encoder_decoder_does_not_apply_the_encoders_mask_to_its_decoder():
    """BART's `attention_mask=` is the source padding; the decoder's tokens are another sequence.
    Blocks of an encoder-decoder count every position (as without a mask)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
    )
    model = transformers.BartForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 40, (4, 16))
    mask = (torch.arange(16)[None] < torch.tensor([[6], [9], [16], [4]])).long()
    dec = torch.randint(3, 40, (4, 16))
    seen: list[np.ndarray] = []
    block = model.model.decoder.layers[0]
    h = block.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().double().numpy()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    h.remove()
    with Monitor(model, every_n_steps=1, on_alert="ignore", background=False) as mon, mon.step(0), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    got = mon.health()["model.decoder.layers.0"].metrics["token_similarity"]
    assert got == pytest.approx(true_similarity(seen[0]), abs=1e-4)
    assert abs(got - masked_similarity(seen[0], mask.numpy())) > 1e-3  # the encoder's mask would change it
