"""include/exclude: glob strings, nn.Module classes and predicates, alone or mixed in one list."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from models import Encoder
from torch import nn

from monitor import Monitor
from monitor.activations import RELU, RELU6, TANH, hardtanh_kind
from monitor.selection import Selector, validate_patterns

VALID_FORMS = ("glob pattern string", "nn.Module subclass", "callable(name: str, module: nn.Module | None) -> bool")


class ScaledTanh(nn.Tanh):
    """A user subclass of an activation module."""

    def forward(self, x):
        return 2 * super().forward(x)


def tanh_gelu_mlp() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            fc0=nn.Linear(13, 16),
            act0=nn.Tanh(),
            fc1=nn.Linear(16, 16),
            act1=nn.GELU(),
            fc2=nn.Linear(16, 16),
            act2=ScaledTanh(),
            head=nn.Linear(16, 3),
        )
    )


class FunctionalNet(nn.Module):
    """Activations only as functional calls: F.relu after dense0, torch.tanh after dense1."""

    def __init__(self) -> None:
        super().__init__()
        self.dense0 = nn.Linear(13, 16)
        self.dense1 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.dense1(F.relu(self.dense0(x)))))


def transformer() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)  # F.relu in its FFN
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def batch(model: nn.Module) -> torch.Tensor:
    if isinstance(model, nn.TransformerEncoder):
        return torch.randn(2, 5, 16)
    if isinstance(model, Encoder):
        return torch.randint(0, 50, (2, 16))
    return torch.randn(8, 13)


def selected(model: nn.Module, include=None, exclude=None, functional: bool = True) -> list[str]:
    """Module watch points chosen by the Selector itself."""
    return [wp.name for wp in Selector(model, include, exclude, functional).module_watch_points(model, 0.01)]


def watched(model: nn.Module, **kwargs) -> list[str]:
    """Layers a Monitor records over one sampled forward."""
    torch.manual_seed(0)
    mon = Monitor(model, every_n_steps=1, on_alert="ignore", **kwargs)
    with mon, mon.step(0):
        model(batch(model))
    return list(mon.health())


def instances(model: nn.Module, *classes: type) -> list[str]:
    """The reference: non-root modules that are instances of one of ``classes``."""
    return [n for n, m in model.named_modules() if n and isinstance(m, classes)]


# -- classes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "include, classes",
    [
        (nn.Tanh, (nn.Tanh,)),  # a single class; ScaledTanh is a subclass and matches
        ([nn.GELU], (nn.GELU,)),
        ((nn.Tanh, nn.GELU), (nn.Tanh, nn.GELU)),
        ([ScaledTanh], (ScaledTanh,)),  # a user subclass selects its own modules only
        (nn.Linear, (nn.Linear,)),
    ],
)
def test_classes_select_their_instances(include, classes):
    model = tanh_gelu_mlp()
    expected = instances(model, *classes)
    assert expected  # the reference is not vacuous
    assert selected(model, include) == expected
    assert selected(model, include, functional=False) == expected
    assert watched(model, include=include) == expected


def test_subclasses_match_inside_a_transformer():
    model = transformer()
    expected = instances(model, nn.Linear)
    assert any(type(model.get_submodule(n)) is not nn.Linear for n in expected)  # out_proj is a subclass
    assert selected(model, nn.Linear) == expected
    assert selected(model, [nn.LayerNorm]) == instances(model, nn.LayerNorm)
    assert watched(model, include=nn.LayerNorm) == instances(model, nn.LayerNorm)
    blocks = instances(model, nn.TransformerEncoderLayer)
    assert selected(model, nn.TransformerEncoderLayer) == blocks == ["layers.0", "layers.1"]
    assert watched(model, include=nn.TransformerEncoderLayer) == blocks
    sel = Selector(model, nn.TransformerEncoderLayer, None, True)
    assert {wp.kind.name for wp in sel.module_watch_points(model, 0.01)} == {"block"}


def test_activation_classes_select_their_functional_twins():
    model = FunctionalNet()
    assert selected(model, nn.ReLU) == []  # no module is a ReLU, yet the class is valid
    assert watched(model, include=nn.ReLU) == ["dense0.relu"]
    assert watched(model, include=[nn.Tanh]) == ["dense1.tanh"]
    assert watched(model, include=[nn.ReLU, nn.Tanh]) == ["dense0.relu", "dense1.tanh"]
    assert watched(transformer(), include=nn.ReLU) == ["layers.0.linear1.relu", "layers.1.linear1.relu"]
    assert watched(Encoder(), include=nn.GELU) == ["blocks.0.linear1.gelu", "blocks.1.linear1.gelu"]

    sel = Selector(model, [nn.ReLU], None, True)
    assert sel.wants_functional("dense0.relu", RELU) and not sel.wants_functional("dense1.tanh", TANH)
    # nn.ReLU6 subclasses nn.Hardtanh: the base class selects both functional kinds, ReLU6 only its own.
    sel = Selector(model, nn.Hardtanh, None, True)
    assert sel.wants_functional("x.relu6", RELU6) and sel.wants_functional("x.hardtanh", hardtanh_kind(0.0, 2.0))
    assert not sel.wants_functional("x.relu", RELU)
    sel = Selector(model, nn.ReLU6, None, True)
    assert sel.wants_functional("x.relu6", RELU6) and not sel.wants_functional("x.hardtanh", hardtanh_kind())
    # A user subclass is not a twin of torch.tanh; nor does anything select functional calls when
    # functional watching is off.
    assert not Selector(tanh_gelu_mlp(), ScaledTanh, None, True).wants_functional("fc0.tanh", TANH)
    relu_mlp = nn.Sequential(nn.Linear(13, 8), nn.ReLU())
    assert not Selector(relu_mlp, nn.ReLU, None, False).wants_functional("0.relu", RELU)


def test_exclude_with_a_class():
    model = tanh_gelu_mlp()
    assert selected(model, exclude=nn.Tanh) == instances(model, nn.GELU) == ["act1"]
    assert watched(model, exclude=[nn.Tanh]) == ["act1"]
    assert selected(model, include=nn.Tanh, exclude=ScaledTanh) == ["act0"]
    assert watched(FunctionalNet(), exclude=nn.ReLU) == ["dense1.tanh"]
    tr = transformer()
    assert watched(tr, exclude=nn.ReLU) == ["layers.0", "layers.1"]
    assert watched(tr, exclude=nn.TransformerEncoderLayer) == ["layers.0.linear1.relu", "layers.1.linear1.relu"]


# -- predicates ------------------------------------------------------------------------------------


def test_predicates_get_the_qualified_name_and_the_module():
    model = tanh_gelu_mlp()
    calls: list[tuple[str, nn.Module | None]] = []

    def pred(name, module):
        calls.append((name, module))
        return isinstance(module, nn.Linear) and name != "head"

    assert selected(model, pred) == ["fc0", "fc1", "fc2"]
    reference = [(n, m) for n, m in model.named_modules() if n]
    assert [n for n, _ in calls] == [n for n, _ in reference]
    assert all(m is ref for (_, m), (_, ref) in zip(calls, reference, strict=True))
    calls.clear()
    assert watched(model, include=pred) == ["fc0", "fc1", "fc2"]
    assert all(m is model.get_submodule(n) for n, m in calls)


def test_predicates_see_functional_activations_with_module_none():
    model = FunctionalNet()
    calls: list[tuple[str, nn.Module | None]] = []

    def pred(name, module):
        calls.append((name, module))
        return module is None and name.endswith(".tanh")

    assert watched(model, include=pred) == ["dense1.tanh"]
    functional_calls = [c for c in calls if c[1] is None]
    assert functional_calls == [("dense0.relu", None), ("dense1.tanh", None)]
    assert [n for n, m in calls if m is not None] == [n for n, _ in model.named_modules() if n]
    # An exclude predicate too.
    assert watched(transformer(), exclude=lambda n, m: m is not None) == ["layers.0.linear1.relu", "layers.1.linear1.relu"]


def test_predicate_errors_name_the_module():
    model = tanh_gelu_mlp()

    def pred(name, module):
        if name == "fc1":
            raise KeyError("boom")
        return False

    for run in (lambda: selected(model, pred), lambda: Monitor(model, include=[pred])):
        with pytest.raises(ValueError, match="include predicate raised KeyError") as e:
            run()
        assert "'fc1'" in str(e.value) and isinstance(e.value.__cause__, KeyError)
    with pytest.raises(ValueError, match="exclude predicate raised ZeroDivisionError.* for 'act0'"):
        selected(model, exclude=lambda n, m: 1 / 0)
    sel = Selector(FunctionalNet(), lambda n, m: {}[n] if m is None else False, None, True)
    with pytest.raises(ValueError, match="include predicate raised KeyError.* for 'dense0.relu'"):
        sel.wants_functional("dense0.relu", RELU)
    with pytest.raises(ValueError, match="returned None for 'fc0'"):
        selected(model, lambda n, m: None)  # forgot to return


# -- mixed lists -----------------------------------------------------------------------------------


def test_mixed_lists():
    model = tanh_gelu_mlp()
    include = ["fc0", nn.GELU, lambda n, m: n == "head"]
    expected = [n for n, m in model.named_modules() if n == "fc0" or isinstance(m, nn.GELU) or n == "head"]
    assert expected == ["fc0", "act1", "head"]
    assert selected(model, include) == expected
    assert watched(model, include=include) == expected
    assert watched(model, include=["act*", nn.Linear], exclude=[ScaledTanh, "fc2", lambda n, m: n == "head"]) == [
        "fc0",
        "act0",
        "fc1",
        "act1",
    ]

    tr = transformer()
    include = ["layers.0.*", nn.LayerNorm, lambda n, m: m is None]
    expected = [n for n, m in tr.named_modules() if n.startswith("layers.0.") or isinstance(m, nn.LayerNorm)]
    assert selected(tr, include) == expected
    health = watched(tr, include=include)
    relus = {"layers.0.linear1.relu", "layers.1.linear1.relu"}  # selected by the predicate (module None)
    # out_proj is never called as a module (attention uses its weight), so it never reports.
    assert set(health) == set(expected) - {"layers.0.self_attn.out_proj"} | relus


def test_validate_patterns_normalises_without_a_model():
    def pred(n, m):
        return True

    assert validate_patterns("include", None) == ()
    assert validate_patterns("include", "a.*") == ("a.*",)
    assert validate_patterns("include", nn.Tanh) == (nn.Tanh,)
    assert validate_patterns("include", pred) == (pred,)
    assert validate_patterns("exclude", ["a", nn.GELU, pred]) == ("a", nn.GELU, pred)
    assert validate_patterns("include", []) == ()
    from monitor.selection import _normalise  # integrations/lightning.py imports this name

    assert _normalise("include", ("x", nn.ReLU)) == ("x", nn.ReLU)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, names",
    [
        (3, ["3"]),
        ([3], ["[3]", "3 (int)"]),
        (["act0", 3.5], ["['act0', 3.5]", "3.5 (float)"]),
        (int, ["<class 'int'>", "builtins.int is a class but not an nn.Module subclass"]),
        ([nn.Tanh, dict], ["builtins.dict is a class but not an nn.Module subclass"]),
        (nn.Tanh(), ["Tanh()", "pass its class nn.Tanh"]),
        ([nn.GELU()], ["[GELU(approximate='none')]", "pass its class nn.GELU"]),
        (lambda name: True, ["<lambda>(name) cannot be called as (name, module)"]),
        ({"act0"}, ["{'act0'}", "set is not a pattern"]),
        (b"act0", ["b'act0'"]),
    ],
)
@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_wrong_types_are_type_errors_naming_the_value_and_the_valid_forms(value, names, arg):
    def check(e: pytest.ExceptionInfo) -> None:
        msg = str(e.value)
        assert f"`{arg}`" in msg
        for needle in (*names, *VALID_FORMS):
            assert needle in msg, (needle, msg)

    with pytest.raises(TypeError) as e:
        validate_patterns(arg, value)
    check(e)
    with pytest.raises(TypeError) as e:
        Monitor(tanh_gelu_mlp(), **{arg: value})
    check(e)


def test_classes_that_match_nothing_are_value_errors():
    with pytest.raises(ValueError) as e:
        Monitor(tanh_gelu_mlp(), include=[nn.Tanh, nn.Conv2d])
    msg = str(e.value)
    assert "`include` class nn.Conv2d matches no module of this Sequential" in msg
    assert "GELU, Linear, ScaledTanh, Tanh" in msg  # the module types that are there
    with pytest.raises(ValueError, match="`exclude` class nn.LayerNorm matches no module"):
        selected(FunctionalNet(), exclude=nn.LayerNorm)
    # A class without modules is fine while its functional twin may appear, not with functional=False.
    assert selected(FunctionalNet(), nn.Sigmoid) == []
    with pytest.raises(ValueError, match=r"nn\.Sigmoid matches no module .*functional=False"):
        Monitor(FunctionalNet(), include=nn.Sigmoid, functional=False)
    # A user subclass has no functional twin.
    with pytest.raises(ValueError, match=r"test_selection\.ScaledTanh matches no module of this FunctionalNet"):
        selected(FunctionalNet(), ScaledTanh)
    # Globs keep their check, also inside a mixed list.
    with pytest.raises(ValueError, match="`include` pattern 'act9' matches no module name.*Close names: act2, act1, act0"):
        selected(tanh_gelu_mlp(), [nn.Tanh, "act9", lambda n, m: False])
