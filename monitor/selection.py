"""Which outputs to watch: activation modules, functional activations, stack blocks.

``include``/``exclude`` take patterns of three forms, alone or mixed in one sequence:

- a glob string, matched against qualified module names (``"encoder.layers.*"``), module type
  names (``"GELU"``) and functional activation names (``"dense0.relu"``, ``"*.relu"``);
- an ``nn.Module`` subclass (``nn.Tanh``): modules that are instances of it (subclasses match) and,
  for activation classes, the functional calls of the same kind (``nn.ReLU`` also selects
  ``F.relu``/``torch.relu``/``x.relu()``, ``nn.Tanh`` selects ``torch.tanh``, ...);
- a predicate ``callable(name: str, module: nn.Module | None) -> bool``, called with the qualified
  name and the module for modules, and with the functional name (``"dense0.relu"``) and ``None``
  for functional activations.

``nn.LSTM``/``nn.GRU`` modules are watched through their recomputed gates and states
(:mod:`monitor.recurrent`): *virtual* watch points named ``<module>.l<k>[_reverse].<role>``
(``rnn.l0.forget``), selected by default, by a pattern that matches their module (``nn.LSTM``,
``"rnn"``) or by one that matches their own name (``"*.forget"``; predicates get the name and the
recurrent module). The module's own (tuple) output is watched only when ``include`` selects it.

Selection is normalised once, at construction, into :class:`Selector`; a glob or class that can
match nothing in the model is an error that lists close names, and a value of the wrong type is a
``TypeError`` listing the valid forms (:func:`validate_patterns` does that check without a model).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TypeAlias, cast

from torch import nn

from monitor.activations import (
    _MODULE_KINDS,
    BLOCK,
    FUNCTIONAL_NAMES,
    MODULE,
    Kind,
    module_kind,
    saturation_thresholds,
)
from monitor.compiled import named_modules
from monitor.compiled import parents as parent_map
from monitor.recurrent import Slot, is_recurrent, layout
from monitor.stats import reduce_dims, rows_for

__all__ = [
    "Pattern", "Patterns", "Predicate", "RecurrentWatch", "Selector", "WatchPoint", "make_watch_point", "validate_patterns",
]

#: ``predicate(name, module) -> bool``; ``module`` is ``None`` for functional activations.
Predicate: TypeAlias = Callable[[str, nn.Module | None], bool]
#: One selection pattern: a glob string, an ``nn.Module`` subclass or a :data:`Predicate`.
Pattern: TypeAlias = str | type[nn.Module] | Predicate
#: What ``include``/``exclude`` accept: ``None``, one :data:`Pattern` or a sequence of them.
Patterns: TypeAlias = Pattern | Sequence[Pattern] | None


@dataclass(eq=False)
class WatchPoint:
    """One watched output: a module's output or one functional activation call site."""

    name: str
    kind: Kind
    module: nn.Module | None = None  # None for functional watch points
    rows: tuple[str, ...] = ()
    lo_thr: float | None = None
    hi_thr: float | None = None
    unit_dim: int | None = None  # resolved on first sight
    _dims: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def dims(self, ndim: int) -> tuple[int, ...]:
        d = self._dims.get(ndim)
        if d is None:
            d = self._dims[ndim] = reduce_dims(ndim, self.unit_dim if self.unit_dim is not None else -1)
        return d


def make_watch_point(name: str, kind: Kind, module: nn.Module | None, tolerance: float) -> WatchPoint:
    lo, hi = saturation_thresholds(kind, tolerance) if kind.bounded else (None, None)
    return WatchPoint(name=name, kind=kind, module=module, rows=rows_for(kind), lo_thr=lo, hi_thr=hi)


@dataclass(eq=False)
class RecurrentWatch:
    """An ``nn.LSTM``/``nn.GRU`` whose gates and states are recomputed on sampled steps
    (:mod:`monitor.recurrent`): its selected virtual watch points, ``[positions, units]`` each."""

    name: str
    module: nn.Module
    points: list[tuple[Slot, WatchPoint]]
    wanted: frozenset[tuple[int, int, str]] = frozenset()  # (layer, direction, role) of the points

    def __post_init__(self) -> None:
        self.wanted = frozenset((s.layer, s.direction, s.role) for s, _ in self.points)


# -- type checks (no model needed) --------------------------------------------------------------

_VALID_FORMS = (
    "a glob pattern string ('encoder.*', 'GELU', 'dense0.relu'), an nn.Module subclass (nn.GELU; "
    "subclasses match) or a callable(name: str, module: nn.Module | None) -> bool"
)


def _show(value: object) -> str:
    """A short, recognisable rendering of a pattern for error messages."""
    if isinstance(value, type):
        if getattr(nn, value.__name__, None) is value:
            return f"nn.{value.__name__}"
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value) and not isinstance(value, nn.Module):
        qualname = getattr(value, "__qualname__", None)
        return qualname if isinstance(qualname, str) else repr(value)
    return repr(value)


def _bad_type(name: str, value: object, why: str) -> TypeError:
    return TypeError(
        f"Expected `{name}` to be None, a glob pattern string or a sequence of patterns (or one pattern), "
        f"where a pattern is {_VALID_FORMS}; got {value!r}: {why}."
    )


def _check_one(name: str, value: object, pattern: object) -> None:
    if isinstance(pattern, str):
        return
    if isinstance(pattern, type):
        if not issubclass(pattern, nn.Module):
            raise _bad_type(name, value, f"{_show(pattern)} is a class but not an nn.Module subclass")
        return
    if isinstance(pattern, nn.Module):
        raise _bad_type(
            name, value, f"{type(pattern).__name__}() is a module instance; pass its class {_show(type(pattern))}"
        )
    if callable(pattern):
        try:
            signature = inspect.signature(pattern)
        except (TypeError, ValueError):  # no signature to inspect (some builtins): trust it
            return
        try:
            signature.bind("", None)
        except TypeError:
            raise _bad_type(
                name, value, f"the callable {_show(pattern)}{signature} cannot be called as (name, module)"
            ) from None
        return
    raise _bad_type(name, value, f"{pattern!r} ({type(pattern).__name__}) is none of these")


def validate_patterns(name: str, value: object) -> tuple[Pattern, ...]:
    """Type-check an ``include``/``exclude`` value and normalise it to a tuple of patterns.

    Needs no model (the integrations call it when they are built): whether a glob or a class
    matches anything is checked by :class:`Selector` on the real model. ``name`` is the option's
    name, used in the message of the ``TypeError`` raised for a value of the wrong type.
    """
    if value is None:
        return ()
    if isinstance(value, (str, type)) or (callable(value) and not isinstance(value, nn.Module)):
        _check_one(name, value, value)
        return cast("tuple[Pattern, ...]", (value,))
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray, nn.Module)):
        for pattern in value:
            _check_one(name, value, pattern)
        return cast("tuple[Pattern, ...]", tuple(value))
    if isinstance(value, nn.Module):
        _check_one(name, value, value)  # raises with the "pass its class" hint
    raise _bad_type(name, value, f"{type(value).__name__} is not a pattern or a sequence of patterns")


_normalise = validate_patterns  # the name integrations/lightning.py imported before validate_patterns


# -- classes and their functional twins -----------------------------------------------------------

# Activation module classes and the functional kind (``Kind.name``) their functional forms report.
_FUNCTIONAL_TWINS: dict[type, str] = {
    cls: kind.name for cls, kind in _MODULE_KINDS.items() if kind.name in FUNCTIONAL_NAMES
} | {nn.Hardtanh: "hardtanh"}


def _twin_kinds(cls: type) -> frozenset[str]:
    """Functional kinds selected by ``cls``: those of the activation classes it is (or is a base of).

    ``nn.ReLU`` -> ``{"relu"}``; ``nn.Hardtanh`` -> ``{"hardtanh", "relu6"}`` (``nn.ReLU6`` subclasses
    it); a user subclass of ``nn.ReLU`` selects its own modules only, not every ``F.relu`` call.
    """
    return frozenset(kind for twin, kind in _FUNCTIONAL_TWINS.items() if issubclass(twin, cls))


def _is_block(parent: nn.Module, child: nn.Module) -> bool:
    """An element of a ModuleList/Sequential stack that is itself composite (a transformer block)."""
    return isinstance(parent, (nn.ModuleList, nn.Sequential)) and any(True for _ in child.children())


class _Matcher:
    """One side (include or exclude) of the selection, every pattern form folded into one test."""

    def __init__(self, arg: str, patterns: tuple[Pattern, ...]) -> None:
        self.arg = arg
        self.patterns = patterns
        self.globs = tuple(p for p in patterns if isinstance(p, str))
        self.classes: tuple[type, ...] = tuple(p for p in patterns if isinstance(p, type))
        self.predicates: tuple[Predicate, ...] = tuple(p for p in patterns if not isinstance(p, (str, type)))
        self.kinds = frozenset().union(*(_twin_kinds(c) for c in self.classes))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def _ask(self, predicate: Predicate, name: str, module: nn.Module | None) -> bool:
        try:
            answer = predicate(name, module)
        except Exception as e:
            raise ValueError(
                f"{self.arg} predicate raised {e!r} for {name!r} (predicate {_show(predicate)}, called as "
                f"predicate(name, module) with module={'None' if module is None else type(module).__name__})."
            ) from e
        if answer is None:
            raise ValueError(
                f"{self.arg} predicate {_show(predicate)} returned None for {name!r}; it must return a bool."
            )
        return bool(answer)

    def module(self, name: str, module: nn.Module) -> bool:
        tname = type(module).__name__
        return (
            any(fnmatchcase(name, p) or fnmatchcase(tname, p) for p in self.globs)
            or (bool(self.classes) and isinstance(module, self.classes))
            or any(self._ask(p, name, module) for p in self.predicates)
        )

    def functional(self, name: str, base: str) -> bool:
        return (
            any(fnmatchcase(name, p) or fnmatchcase(base, p) for p in self.globs)
            or base in self.kinds
            or any(self._ask(p, name, None) for p in self.predicates)
        )

    def virtual(self, name: str, module: nn.Module) -> bool:
        """A recurrent module's gate or state (``rnn.l0.forget``), asked by its own name."""
        return any(fnmatchcase(name, p) for p in self.globs) or any(self._ask(p, name, module) for p in self.predicates)


class Selector:
    """Normalised include/exclude patterns: globs, module classes and predicates.

    A glob must match a module name, a module type name or a functional activation name; a class
    must match a module of the model (subclasses too) or, with ``functional``, be an activation
    class whose functional twin can appear. Predicates are called by :meth:`module_watch_points`
    and :meth:`wants_functional`; one that raises makes them raise ``ValueError``.
    """

    def __init__(self, model: nn.Module, include: Patterns, exclude: Patterns, functional: bool) -> None:
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.functional = functional
        self._include = _Matcher("include", self.include)
        self._exclude = _Matcher("exclude", self.exclude)
        named = [(n, m) for n, m in named_modules(model) if n]
        names = [n for n, _ in named]
        types = sorted({type(m).__name__ for m in model.modules()})
        fn_names = sorted(FUNCTIONAL_NAMES)
        virtual = [s.name for n, m in named if is_recurrent(m) for s in layout(n, m)]
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            for p in patterns:
                if isinstance(p, str):
                    self._check_glob(model, arg, p, names, types, fn_names, virtual)
                elif isinstance(p, type):
                    self._check_class(model, arg, p, named)

    def _check_glob(
        self, model: nn.Module, arg: str, p: str, names: list[str], types: list[str], fn_names: list[str],
        virtual: list[str],
    ) -> None:
        if any(fnmatchcase(n, p) for n in names) or any(fnmatchcase(t, p) for t in types):
            return
        if any(fnmatchcase(v, p) for v in virtual):  # a gate or state of an LSTM/GRU
            return
        if self.functional and any(
            fnmatchcase(f, p) or any(fnmatchcase(f"{n}.{f}", p) for n in names) for f in fn_names
        ):
            return
        close = difflib.get_close_matches(p, names + types + fn_names + virtual, n=6, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else f" Module names include: {', '.join(names[:8])}."
        raise ValueError(
            f"`{arg}` pattern {p!r} matches no module name, module type or functional activation "
            f"of this {type(model).__name__}.{hint} Valid patterns match qualified module names "
            f"(e.g. {names[0] if names else 'encoder.layers.*'!r}), module types (e.g. 'ReLU') or "
            "functional activations ('<module>.relu')."
        )

    def _check_class(self, model: nn.Module, arg: str, cls: type, named: list[tuple[str, nn.Module]]) -> None:
        if any(isinstance(m, cls) for _, m in named):
            return
        twins = _twin_kinds(cls)
        if twins and self.functional:
            return  # F.relu & co. are only seen during forwards: they may well be there
        types = sorted({type(m).__name__ for _, m in named})
        close = difflib.get_close_matches(cls.__name__, types, n=6, cutoff=0.5)
        hint = f" Close module types: {', '.join(close)}." if close else f" Module types: {', '.join(types[:12])}."
        twin_note = (
            f" (its functional twins, {', '.join(sorted(twins))}, are not watched with functional=False)"
            if twins
            else ""
        )
        raise ValueError(
            f"`{arg}` class {_show(cls)} matches no module of this {type(model).__name__}{twin_note}.{hint} "
            "A class selects the modules that are instances of it (subclasses too) and, for activation "
            "classes such as nn.ReLU or nn.Tanh, the functional calls of the same kind (F.relu, torch.tanh)."
        )

    def module_watch_points(self, model: nn.Module, tolerance: float) -> list[WatchPoint]:
        parents = parent_map(model)
        points: list[WatchPoint] = []
        for name, module in named_modules(model):
            if not name:
                continue
            kind = module_kind(module)
            if self._include:
                if not self._include.module(name, module):
                    continue
                if kind is None:
                    parent = parents.get(id(module))
                    kind = BLOCK if parent is not None and _is_block(parent, module) else MODULE
            elif kind is None:
                parent = parents.get(id(module))
                if parent is None or not _is_block(parent, module):
                    continue
                kind = BLOCK
            if self._exclude and self._exclude.module(name, module):
                continue
            points.append(make_watch_point(name, kind, module, tolerance))
        return points

    def recurrent_watch_points(self, model: nn.Module, tolerance: float) -> list[RecurrentWatch]:
        """The ``nn.LSTM``/``nn.GRU`` modules of the model and their selected gates and states.

        Watched by default. A virtual point (``rnn.l0.forget``) is selected when ``include`` is
        empty or matches its module (name, type, class, predicate) or its own name (glob, or a
        predicate called with its name and the module), and not when ``exclude`` matches either.
        """
        watches: list[RecurrentWatch] = []
        for name, module in named_modules(model):
            if not is_recurrent(module):
                continue
            whole_in = not self._include or self._include.module(name, module)
            whole_out = bool(self._exclude) and self._exclude.module(name, module)
            points = []
            for slot in layout(name, module):
                if whole_out or (self._exclude and self._exclude.virtual(slot.name, module)):
                    continue
                if not whole_in and not self._include.virtual(slot.name, module):
                    continue
                wp = make_watch_point(slot.name, slot.kind, None, tolerance)
                wp.unit_dim = -1  # recomputed as [positions, units]
                points.append((slot, wp))
            if points:
                watches.append(RecurrentWatch(name, module, points))
        return watches

    def wants_functional(self, name: str, kind: Kind) -> bool:
        if not self.functional:
            return False
        base = kind.name.split("[")[0]
        if self._include and not self._include.functional(name, base):
            return False
        return not (self._exclude and self._exclude.functional(name, base))
