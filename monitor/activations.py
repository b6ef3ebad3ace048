"""What the monitor knows about activation functions: which are ReLU-like, which are bounded.

A *kind* describes how a watched output is judged:

- ``relu``-family kinds (``relu``, ``relu6``) can have *dead* units (never > 0).
- bounded kinds (``tanh``, ``sigmoid``, ``hardtanh``, ``relu6`` upper bound, ...) can *saturate*.
- the gates and states of recurrent layers (``lstm_forget``, ``gru_hidden``, ...: see
  :mod:`monitor.recurrent`) carry their role in ``Kind.rnn``.
- every kind, including ``block`` (the output of a stack block: a transformer's residual stream)
  and ``module`` (any other module a user includes), can explode or turn non-finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Kind:
    """How one watched output is judged."""

    name: str
    can_die: bool = False  # ReLU-family: a unit that never fires (> 0) is dead
    fires: bool = False  # "firing" (> 0) is meaningful: report a firing rate
    nonnegative: bool = False  # outputs are >= 0, so "fired" == "non-zero"
    lower: float | None = None  # saturation bounds (None: unbounded on that side)
    upper: float | None = None
    activation: bool = True  # an activation function (False: a stack block or another module)
    clamps: bool = False  # output = clamp(input, 0[, upper]): its maximum follows from the input's
    # A recomputed gate or state of an nn.LSTM / nn.GRU (monitor.recurrent): "gate", "candidate",
    # "hidden" or "cell"; "" for everything else.
    rnn: str = ""

    @property
    def bounded(self) -> bool:
        return self.lower is not None or self.upper is not None


RELU = Kind("relu", can_die=True, fires=True, nonnegative=True, clamps=True)
RELU6 = Kind("relu6", can_die=True, fires=True, nonnegative=True, upper=6.0, clamps=True)
RELU2 = Kind("relu2", can_die=True, fires=True, nonnegative=True)  # relu(x) ** 2
LEAKY = Kind("leaky_relu", fires=True)
SMOOTH_RELU = {n: Kind(n, fires=True) for n in ("elu", "selu", "celu", "gelu", "silu", "mish", "softplus", "hardswish")}
TANH = Kind("tanh", lower=-1.0, upper=1.0)
SIGMOID = Kind("sigmoid", lower=0.0, upper=1.0)
HARDSIGMOID = Kind("hardsigmoid", lower=0.0, upper=1.0)
SOFTSIGN = Kind("softsign", lower=-1.0, upper=1.0)
BLOCK = Kind("block", activation=False)
MODULE = Kind("module", activation=False)


def hardtanh_kind(min_val: float = -1.0, max_val: float = 1.0) -> Kind:
    if (min_val, max_val) == (-1.0, 1.0):
        return Kind("hardtanh", lower=-1.0, upper=1.0)
    return Kind(f"hardtanh[{min_val:g},{max_val:g}]", lower=float(min_val), upper=float(max_val))


_MODULE_KINDS: dict[type, Kind] = {
    nn.ReLU: RELU,
    nn.ReLU6: RELU6,
    nn.LeakyReLU: LEAKY,
    nn.PReLU: LEAKY,
    nn.RReLU: LEAKY,
    nn.ELU: SMOOTH_RELU["elu"],
    nn.SELU: SMOOTH_RELU["selu"],
    nn.CELU: SMOOTH_RELU["celu"],
    nn.GELU: SMOOTH_RELU["gelu"],
    nn.SiLU: SMOOTH_RELU["silu"],
    nn.Mish: SMOOTH_RELU["mish"],
    nn.Softplus: SMOOTH_RELU["softplus"],
    nn.Hardswish: SMOOTH_RELU["hardswish"],
    nn.Tanh: TANH,
    nn.Sigmoid: SIGMOID,
    nn.Hardsigmoid: HARDSIGMOID,
    nn.Softsign: SOFTSIGN,
}


# Hugging Face ``transformers.activations`` classes (what ``ACT2FN[config.hidden_act]`` builds),
# known by name so that transformers is never imported here. Each is one activation, watched at
# its output; the torch.tanh / torch.sigmoid / F.gelu they call inside are not separate layers.
_HF_MODULE = "transformers.activations"
_HF_KINDS: dict[str, Kind | None] = {
    **dict.fromkeys(
        (
            "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
            "AccurateGELUActivation", "ClippedGELUActivation", "GELUTanh", "PytorchGELUTanh",
        ),
        SMOOTH_RELU["gelu"],
    ),
    "SiLUActivation": SMOOTH_RELU["silu"],
    "MishActivation": SMOOTH_RELU["mish"],
    "ReLUSquaredActivation": RELU2,
    "LaplaceActivation": Kind("laplace", lower=0.0, upper=1.0),  # a smooth step in [0, 1]
    "SqrtSoftplusActivation": Kind("sqrtsoftplus", fires=True),
    "XIELUActivation": Kind("xielu", fires=True),
    "LinearActivation": None,  # the identity: not an activation
}


def module_kind(module: nn.Module) -> Kind | None:
    """The kind of an activation module, or None if ``module`` is not an activation."""
    if isinstance(module, nn.ReLU6):  # subclass of Hardtanh: check first
        return RELU6
    if isinstance(module, nn.Hardtanh):
        return hardtanh_kind(module.min_val, module.max_val)
    for cls in type(module).__mro__:
        kind = _MODULE_KINDS.get(cls)
        if kind is not None:
            return kind
        if cls.__module__ == _HF_MODULE and cls.__name__ in _HF_KINDS:
            return _HF_KINDS[cls.__name__]
    return None


def is_activation_module(module: nn.Module) -> bool:
    return module_kind(module) is not None


# Functional activations, keyed by the object ``__torch_function__`` receives as ``func``.
_FUNCTIONAL: dict[object, Kind] = {}


def _register(kind: Kind, *funcs: object) -> None:
    for f in funcs:
        if f is not None:
            _FUNCTIONAL[f] = kind


_T = torch.Tensor
_register(RELU, F.relu, torch.relu, _T.relu, F.relu_, torch.relu_, _T.relu_)
_register(RELU6, F.relu6)
_register(LEAKY, F.leaky_relu, F.leaky_relu_, F.rrelu, F.prelu)
for _name, _kind in SMOOTH_RELU.items():
    _register(_kind, getattr(F, _name, None), getattr(torch, _name, None), getattr(F, _name + "_", None))
_register(TANH, torch.tanh, _T.tanh, torch.tanh_, _T.tanh_, F.tanh)
_register(SIGMOID, torch.sigmoid, _T.sigmoid, torch.sigmoid_, _T.sigmoid_, F.sigmoid)
_register(HARDSIGMOID, F.hardsigmoid)
_register(SOFTSIGN, F.softsign)

#: Names functional watch points can end with (used to validate ``include``/``exclude`` early).
FUNCTIONAL_NAMES: frozenset[str] = frozenset({k.name for k in _FUNCTIONAL.values()} | {"hardtanh"})


def functional_kind(func: object, args: tuple, kwargs: dict | None) -> Kind | None:
    """The kind of a functional activation call, or None if ``func`` is not one."""
    if func is F.hardtanh or func is F.hardtanh_:
        lo = (kwargs or {}).get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = (kwargs or {}).get("max_val", args[2] if len(args) > 2 else 1.0)
        return hardtanh_kind(lo, hi)
    try:
        return _FUNCTIONAL.get(func)
    except TypeError:  # unhashable func objects: never an activation
        return None


def saturation_thresholds(kind: Kind, tolerance: float) -> tuple[float | None, float | None]:
    """Values at or beyond which an output counts as sitting at its bound.

    The tolerance is a fraction of the output range: 0.01 on tanh means |y| >= 0.98.
    For the ReLU family only the upper bound counts: a ReLU at 0 is "not firing", judged as death.
    """
    lo, hi = kind.lower, kind.upper
    if lo is not None and hi is not None:
        span = hi - lo
        lo_thr, hi_thr = lo + tolerance * span, hi - tolerance * span
    else:
        lo_thr = lo + tolerance * abs(lo or 1.0) if lo is not None else None
        hi_thr = hi - tolerance * abs(hi or 1.0) if hi is not None else None
    if kind.can_die:
        lo_thr = None
    return lo_thr, hi_thr


def conv_like(module: nn.Module | None) -> bool:
    """Modules whose 3-D output is (N, C, L): units on dim 1."""
    return isinstance(
        module,
        (
            nn.Conv1d,
            nn.ConvTranspose1d,
            nn.BatchNorm1d,
            nn.InstanceNorm1d,
            nn.GroupNorm,
            nn.MaxPool1d,
            nn.AvgPool1d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveMaxPool1d,
        ),
    )
