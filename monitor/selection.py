"""Which outputs to watch: activation modules, functional activations, stack blocks.

Selection is normalised once, at construction, into :class:`Selector`; a pattern that can match
nothing in the model is an error that lists close names.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from monitor.activations import BLOCK, FUNCTIONAL_NAMES, MODULE, Kind, module_kind, saturation_thresholds
from monitor.stats import reduce_dims, rows_for

Patterns = str | Sequence[str] | None


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


def _normalise(name: str, patterns: Patterns) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    if isinstance(patterns, Sequence) and all(isinstance(p, str) for p in patterns):
        return tuple(patterns)
    raise TypeError(
        f"Expected `{name}` to be None, a glob pattern string or a sequence of them, got {patterns!r}."
    )


def _is_block(parent: nn.Module, child: nn.Module) -> bool:
    """An element of a ModuleList/Sequential stack that is itself composite (a transformer block)."""
    return isinstance(parent, (nn.ModuleList, nn.Sequential)) and any(True for _ in child.children())


class Selector:
    """Normalised include/exclude patterns over module names, module types and functional names."""

    def __init__(self, model: nn.Module, include: Patterns, exclude: Patterns, functional: bool) -> None:
        self.include = _normalise("include", include)
        self.exclude = _normalise("exclude", exclude)
        self.functional = functional
        names = [n for n, _ in model.named_modules() if n]
        types = sorted({type(m).__name__ for m in model.modules()})
        fn_names = sorted(FUNCTIONAL_NAMES)
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            for p in patterns:
                if any(fnmatchcase(n, p) for n in names) or any(fnmatchcase(t, p) for t in types):
                    continue
                if functional and any(
                    fnmatchcase(f, p) or any(fnmatchcase(f"{n}.{f}", p) for n in names) for f in fn_names
                ):
                    continue
                close = difflib.get_close_matches(p, names + types + fn_names, n=6, cutoff=0.5)
                hint = f" Close names: {', '.join(close)}." if close else f" Module names include: {', '.join(names[:8])}."
                raise ValueError(
                    f"`{arg}` pattern {p!r} matches no module name, module type or functional activation "
                    f"of this {type(model).__name__}.{hint} Valid patterns match qualified module names "
                    f"(e.g. {names[0] if names else 'encoder.layers.*'!r}), module types (e.g. 'ReLU') or "
                    "functional activations ('<module>.relu')."
                )

    def _matches(self, patterns: tuple[str, ...], *labels: str) -> bool:
        return any(fnmatchcase(label, p) for p in patterns for label in labels)

    def module_watch_points(self, model: nn.Module, tolerance: float) -> list[WatchPoint]:
        parents = {id(c): m for m in model.modules() for c in m.children()}
        points: list[WatchPoint] = []
        for name, module in model.named_modules():
            if not name:
                continue
            tname = type(module).__name__
            kind = module_kind(module)
            if self.include:
                if not self._matches(self.include, name, tname):
                    continue
                if kind is None:
                    parent = parents.get(id(module))
                    kind = BLOCK if parent is not None and _is_block(parent, module) else MODULE
            elif kind is None:
                parent = parents.get(id(module))
                if parent is None or not _is_block(parent, module):
                    continue
                kind = BLOCK
            if self._matches(self.exclude, name, tname):
                continue
            points.append(make_watch_point(name, kind, module, tolerance))
        return points

    def wants_functional(self, name: str, kind: Kind) -> bool:
        if not self.functional:
            return False
        base = kind.name.split("[")[0]
        if self.include and not self._matches(self.include, name, base):
            return False
        return not self._matches(self.exclude, name, base)
