"""A run's configuration: the text tag ``run_config`` (one JSON object), read back and told apart.

The monitor writes a run's configuration once, at the run's first record, as the TensorBoard text
tag ``run_config`` whose value is one JSON object (string keys, JSON values: the options of a
plain loop, a Lightning module's hparams, a skorch net's parameters). A run without one (written
before the monitor recorded it, or with nothing to record) has no configuration (``None``). A run
directory whose files hold several different ones (a resumed run with new settings, several skorch
fits into one directory) shows the last one read, with a note; a value that is not one JSON object
is a note too, never an error.

When several runs are reported, runs whose configurations have the same keys form a group (runs
of one experiment: a grid search, the folds of a cross-validation), and the keys whose values
differ within the group are shown in each run's line (``lr=0.1 fold=2``), so runs that differ
only in a few settings are told apart at a glance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

CONFIG_TAGS = ("run_config/text_summary", "run_config")  # SummaryWriter.add_text adds "/text_summary"
_PLAIN = re.compile(r"[\w.:/+-]+")  # strings shown without quotes
MISSING = object()  # a key one of two configurations does not have


class HasConfig(Protocol):
    run: str
    config: dict[str, Any] | None
    config_differs: list[str]


def parse(texts: Sequence[str], where: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(the configuration, notes) from the ``run_config`` texts of one run, in the order read."""
    configs: list[dict[str, Any]] = []
    notes: list[str] = []
    for text in texts:
        try:
            value = json.loads(text, parse_constant=str)  # NaN / Infinity: kept as strings, strict JSON out
        except ValueError as e:
            notes.append(f"{where}: run_config is not JSON ({e}); ignored")
            continue
        if not isinstance(value, dict):
            notes.append(f"{where}: run_config is a JSON {type(value).__name__}, not an object; ignored")
            continue
        if not configs or value != configs[-1]:
            configs.append(value)
    if len(configs) > 1:
        notes.append(f"{where}: {len(configs)} different run_config values in this run; the last one is shown")
    return (configs[-1] if configs else None), notes


def value_text(v: Any) -> str:
    """A value as short text: plain strings bare, anything else as compact JSON."""
    if isinstance(v, str) and _PLAIN.fullmatch(v):
        return v
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def items_text(config: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """``key=value key=value`` for ``keys`` (default: all, in the configuration's order)."""
    return " ".join(f"{k}={value_text(config[k])}" for k in (config if keys is None else keys) if k in config)


def mark_differing(reports: Sequence[HasConfig]) -> None:
    """Set each report's ``config_differs``: the keys whose values differ among the runs of its group
    (runs whose configurations have the same keys); empty for a run alone in its group."""
    groups: dict[frozenset[str], list[HasConfig]] = {}
    for rep in reports:
        rep.config_differs = []
        if rep.config:
            groups.setdefault(frozenset(rep.config), []).append(rep)
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0].config
        assert first is not None
        keys = [k for k in first if any(_canon(m.config[k]) != _canon(first[k]) for m in members[1:])]  # type: ignore[index]
        for m in members:
            m.config_differs = keys


def differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """``[(key, value in a, value in b)]`` for the keys that differ (:data:`MISSING` where one has none)."""
    if a is None or b is None:
        return []
    keys = list(a) + [k for k in b if k not in a]
    return [
        (k, a.get(k, MISSING), b.get(k, MISSING))
        for k in keys
        if k not in a or k not in b or _canon(a[k]) != _canon(b[k])
    ]


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True)
