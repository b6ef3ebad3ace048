"""Hugging Face activation classes are activations: real transformers models built from configs."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from monitor import Monitor  # noqa: E402


def gpt2(act: str):
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, activation_function=act,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def bert(act: str):
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, hidden_act=act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg)


def watched(model, tokens):
    with Monitor(model, every_n_steps=1, on_alert="ignore") as mon, mon.step(0):
        model(input_ids=tokens)
    return {name: h.kind for name, h in mon.health().items()}, mon


def test_gpt2_gelu_new_is_one_gelu_layer_not_the_tanh_inside_it():
    model = gpt2("gelu_new")
    tokens = torch.randint(0, 50, (4, 16))
    kinds, mon = watched(model, tokens)
    act = "transformer.h.0.mlp.act"
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    assert kinds[act] == "gelu" and kinds["transformer.h.1.mlp.act"] == "gelu"
    assert not [n for n in kinds if n.endswith(".tanh") or n.endswith(".sigmoid")]
    assert [a for a in mon.alerts if a.kind == "saturated"] == []


@pytest.mark.parametrize(
    "act, kind",
    [("gelu_new", "gelu"), ("gelu", "gelu"), ("quick_gelu", "gelu"), ("gelu_pytorch_tanh", "gelu"),
     ("relu", "relu"), ("silu", "silu"), ("tanh", "tanh"), ("relu2", "relu2")],
)
def test_the_same_slot_has_the_same_name_whatever_the_activation(act, kind):
    kinds, _ = watched(gpt2(act), torch.randint(0, 50, (2, 16)))
    assert kinds["transformer.h.0.mlp.act"] == kind
    assert sum(1 for n in kinds if ".mlp.act" in n) == 2  # one per block, nothing inside it


def test_bert_intermediate_activation_and_relu_squared_statistics():
    model = bert("gelu")
    kinds, _ = watched(model, torch.randint(0, 50, (2, 16)))
    assert kinds["bert.encoder.layer.0.intermediate.intermediate_act_fn"] == "gelu"
    # relu2 (ReLU squared) can die: firing and the output maximum come out right
    model = gpt2("relu2")
    x = torch.randn(3, 7, 128)
    wrapper = torch.nn.Sequential(model.transformer.h[0].mlp.act)
    with Monitor(wrapper, every_n_steps=1, on_alert="ignore", background=False) as mon, mon.step(0):
        y = wrapper(x)
    h = mon.health()["0"]
    assert h.kind == "relu2" and h.max_abs == pytest.approx(float(y.max()), rel=1e-6)
    assert h.firing_rate == pytest.approx(float((x > 0).float().mean()), rel=1e-6)
    assert torch.allclose(y, F.relu(x) ** 2)


def test_a_tiny_gpt2_trains_silently():
    model = gpt2("gelu_new")
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    with Monitor(model, every_n_steps=5, on_alert="raise") as mon:
        for step in range(40):
            tokens = torch.randint(0, 50, (8, 16), generator=g)
            with mon.step(step):
                loss = model(input_ids=tokens, labels=tokens).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert mon.alerts == []


def test_two_monitors_on_one_model_see_the_same_layers_once():
    """Two monitors on one GPT-2 (two callbacks with different options do this), their sampled
    steps nested: each sees the two MLP activations once, and one `dead` alert for the block whose
    `c_fc` bias is -100. The attention mode of one used to stay on the stack under the other's
    functional mode and hand it `nn.ReLU`'s inner `F.relu`: phantom layers `mlp.act.relu`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, activation_function="relu")
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias.fill_(-100.0)
    acts = [n for n, m in model.named_modules() if n.endswith("mlp.act")]
    opt = torch.optim.SGD(model.parameters(), 0.01)
    mons = [Monitor(model, every_n_steps=2, on_alert="ignore") for _ in range(2)]
    for step in range(6):
        ctxs = [mon.step(step) for mon in mons]
        for c in ctxs:
            c.__enter__()
        x = torch.randint(0, 64, (8, 16))
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        for c in reversed(ctxs):
            c.__exit__(None, None, None)
    for mon in mons:
        assert [n for n in mon.layers if "act" in n] == acts == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
        assert [(a.step, a.layer, a.kind) for a in mon.alerts] == [(0, "transformer.h.1.mlp.act", "dead")]
        mon.close()
