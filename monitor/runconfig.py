"""A run's configuration, as the monitor records it: :func:`normalize_config`.

Every run the monitor writes says where it came from: the options a plain loop passes
(``Monitor(..., run_config={"lr": 0.1})``), a Lightning module's ``hparams``, a skorch net's
parameters of that fit. They are written once, at the run's first record, as the TensorBoard text
tag ``run_config`` (:data:`RUN_CONFIG_TAG`) holding one JSON object, which the run report reads
to tell runs apart and group them.

Values become JSON: numbers, strings, booleans and ``None`` as they are (non-finite floats as
``"nan"``, ``"inf"``, ``"-inf"``), numpy and 0-d torch scalars as numbers, mappings and
sequences element by element (nested at most :data:`MAX_DEPTH` deep, at most :data:`MAX_ITEMS`
items each), classes by their qualified name and functions by their name (``SGD``, ``WineClassifier``, ``relu``),
anything else by its ``repr`` without memory addresses (so that two runs with equal settings
compare equal), cut at 200 characters.
"""

from __future__ import annotations

import json
import math
import re
import types
from collections.abc import Mapping
from typing import Any

RUN_CONFIG_TAG = "run_config"
MAX_DEPTH = 4
MAX_ITEMS = 100
_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")

JSON = Any  # None | bool | int | float | str | list[JSON] | dict[str, JSON]


def normalize_config(config: Any, name: str = "run_config") -> dict[str, JSON]:
    """``config`` (a mapping with string keys) as a JSON-ready dict; ``None`` gives ``{}``.

    Raises ``TypeError`` naming the bad value for anything that is not such a mapping.

    Example:
        >>> import torch
        >>> normalize_config({"lr": 0.1, "optimizer": torch.optim.SGD, "betas": (0.9, 0.99), "decay": float("nan")})
        {'lr': 0.1, 'optimizer': 'SGD', 'betas': [0.9, 0.99], 'decay': 'nan'}
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(f"Expected `{name}` to be None or a mapping of str keys to values, got {config!r:.200}.")
    bad = [k for k in config if not isinstance(k, str)]
    if bad:
        raise TypeError(f"Expected `{name}` to have str keys, got {bad[0]!r} ({type(bad[0]).__name__}).")
    return {k: _value(v, 1) for k, v in config.items()}


def config_json(config: Mapping[str, JSON]) -> str:
    """The text written to :data:`RUN_CONFIG_TAG`: one JSON object, keys sorted."""
    return json.dumps(dict(config), sort_keys=True, ensure_ascii=False, allow_nan=False)


def _value(v: Any, depth: int) -> JSON:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    item = getattr(v, "item", None)
    if callable(item) and getattr(v, "ndim", None) == 0:  # numpy / torch scalars
        try:
            return _value(item(), depth)
        except Exception:
            pass
    if isinstance(v, type):
        return v.__qualname__
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return str(getattr(v, "__name__", None) or repr(v))
    if depth < MAX_DEPTH:
        if isinstance(v, Mapping):
            return {str(k): _value(x, depth + 1) for k, x in list(v.items())[:MAX_ITEMS]}
        if isinstance(v, (list, tuple)):
            return [_value(x, depth + 1) for x in v[:MAX_ITEMS]]
        if isinstance(v, (set, frozenset)):
            return [_value(x, depth + 1) for x in sorted(v, key=repr)[:MAX_ITEMS]]
    text = _ADDRESS.sub("", repr(v))
    return text if len(text) <= 200 else text[:199] + "…"
