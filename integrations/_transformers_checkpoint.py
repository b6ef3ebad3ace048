"""The Hugging Face callback's entry in a checkpoint's ``trainer_state.json`` (``ExportableState``).

The entry holds ``args`` to rebuild the callback (its JSON-able options and a token naming the
instance that saved it) and, under :data:`STATE_KEY`, the monitor's ``state_dict()`` (windows,
baselines, active alerts, alert history, last sampled step) as compressed ``torch.save`` bytes.
Pure functions of plain data: the callback (:mod:`integrations.transformers`) decides when to
save and restore.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import torch

from monitor import MonitorWarning, Thresholds

#: The key of the monitor's state in the callback's entry of ``trainer_state.json``.
STATE_KEY = "activation_monitor"
FORMAT = "torch.save+zlib+base64"
#: Keyword options saved in ``args`` when their value is JSON (sinks and detectors never are).
JSON_KWARGS = (
    "histograms", "images_every_n_samples", "timeline_length", "functional", "background", "gradients", "run_config", "attention",
)


def json_config(
    every_n_steps: int,
    include: Any,
    exclude: Any,
    on_alert: Any,
    thresholds: Thresholds | None,
    logdir: str | os.PathLike[str] | None,
    monitor_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The callback's options that JSON can hold (a callable, a class or a sink is left out).

    >>> json_config(50, "*.act", None, print, None, None, {"histograms": False, "sinks": [object()]})
    {'every_n_steps': 50, 'include': '*.act', 'exclude': None, 'thresholds': None, 'logdir': None, 'histograms': False}
    """
    config: dict[str, Any] = {"every_n_steps": every_n_steps}
    for name, value in (("include", include), ("exclude", exclude)):
        if value is None or isinstance(value, str):
            config[name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            config[name] = list(value)
    if isinstance(on_alert, str):
        config["on_alert"] = on_alert
    config["thresholds"] = dataclasses.asdict(thresholds) if thresholds is not None else None
    config["logdir"] = os.fspath(logdir) if logdir is not None else None
    for name, value in monitor_kwargs.items():
        if name in JSON_KWARGS and _jsonable(value):
            config[name] = value
    return config


def entry(config: dict[str, Any], token: str, global_step: int, state_dict: dict[str, Any] | None) -> dict[str, Any]:
    """The callback's ``state()``: ``args`` to rebuild it and, once it has a monitor, that monitor's state."""
    out: dict[str, Any] = {"args": {"_restore": {**config, "token": token}}, "attributes": {}}
    if state_dict is not None:
        out[STATE_KEY] = {"format": FORMAT, "global_step": global_step, "state": _encode(state_dict)}
    return out


def saved_state(
    entries: Any, token: str, config: dict[str, Any], warn_once: Callable[[str, str], None]
) -> dict[str, Any] | None:
    """The monitor state to resume from, among the checkpoint's entries of this callback class:
    the one this instance saved (``token``), else one saved with the same options, else the only
    one; None when none fits or its format is unknown."""
    if entries is None:
        return None
    entries = entries if isinstance(entries, list) else [entries]
    entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get(STATE_KEY), dict)]
    mine = [e for e in entries if e.get("args", {}).get("_restore", {}).get("token") == token]
    same = [e for e in entries if strip_token(e.get("args", {}).get("_restore")) == config]
    pick = (mine or same or (entries if len(entries) == 1 else []))[-1:]
    if not pick:
        return None
    saved = pick[0][STATE_KEY]
    if saved.get("format") != FORMAT:
        warn_once("format", f"activation monitor: unknown checkpoint state format {saved.get('format')!r}; starting fresh.")
        return None
    return _decode(saved["state"])


def from_json(restore: dict[str, Any]) -> tuple[Any, ...]:
    """The callback's arguments from a checkpoint's ``args`` when no live callback could be adopted."""
    restore = dict(restore)
    restore.pop("token", None)
    th = restore.pop("thresholds", None)
    kwargs = {k: restore.pop(k) for k in JSON_KWARGS if k in restore}
    warnings.warn(
        "activation monitor: `restore_callback_states_from_checkpoint=True` rebuilt ActivationMonitor from the "
        "checkpoint's options; options that are not JSON (callables, classes, sinks, detectors) are back to their "
        "defaults. Keep the default `restore_callback_states_from_checkpoint=False`: the callback restores its "
        "monitor state from the checkpoint by itself.",
        MonitorWarning,
        stacklevel=4,
    )
    return (
        restore.get("every_n_steps", 50), restore.get("include"), restore.get("exclude"),
        Thresholds(**th) if th is not None else None, restore.get("on_alert", "warn"), restore.get("logdir"), kwargs,
    )


def strip_token(restore: Any) -> Any:
    """A saved ``_restore`` without the token of the instance that saved it (None if not a dict)."""
    if not isinstance(restore, dict):
        return None
    return {k: v for k, v in restore.items() if k != "token"}


def _jsonable(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _encode(state: dict[str, Any]) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(zlib.compress(buf.getvalue(), 6)).decode("ascii")


def _decode(text: str) -> dict[str, Any]:
    raw = zlib.decompress(base64.b64decode(text.encode("ascii")))
    return torch.load(io.BytesIO(raw), weights_only=True)
