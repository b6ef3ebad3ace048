"""What the Hugging Face callback reads of the ``Trainer`` around it: which Trainer runs it, whether
a forward comes from its training loop, where its TensorBoard run is, and its processes.

Callbacks are not handed the Trainer: the functions here find it on the call stack and read its
arguments, state and callbacks. Nothing of the Trainer is replaced or changed.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import transformers

#: Where the output goes when the Trainer writes no TensorBoard run: ``<output_dir>/<SUBDIR>``.
SUBDIR = "activation_monitor"
# Frames of the Trainer's training loop (a forward outside them is not a training forward).
_LOOP_FRAMES = frozenset({"training_step", "_run_epoch", "_inner_training_loop"})


def calling_trainer(callback: Any) -> Any:
    """The ``transformers.Trainer`` on this thread's call stack whose callbacks hold ``callback``
    (the one running ``train()`` now), or None. Its training loop's frame has it as ``self``."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, transformers.Trainer):
            handler = getattr(obj, "callback_handler", None)
            if handler is not None and any(cb is callback for cb in handler.callbacks):
                return obj
        frame = frame.f_back
    return None


def in_training_loop() -> bool:
    """Whether this thread is inside the Trainer's training loop (a frame of it on the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in _LOOP_FRAMES and isinstance(frame.f_locals.get("self"), transformers.Trainer):
            return True
        frame = frame.f_back
    return False


def is_class(obj: Any, name: str) -> bool:
    """Whether a class named ``name`` is in ``obj``'s MRO (no import of optional classes needed)."""
    return any(c.__name__ == name for c in type(obj).__mro__)


def tensorboard_callback(trainer: Any) -> Any:
    """The Trainer's ``TensorBoardCallback``, or None."""
    if trainer is None:
        return None
    return next((cb for cb in trainer.callback_handler.callbacks if is_class(cb, "TensorBoardCallback")), None)


def outputs(
    args: Any, state: Any, logdir: str | os.PathLike[str] | None, trainer: Any, warn_once: Callable[[str, str], None]
) -> tuple[Any, str | None, str | None]:
    """(writer, logdir, directory) of the main process's TensorBoard output: ``logdir`` if given,
    else the writer of the Trainer's ``TensorBoardCallback``, else the directory that callback writes
    into, else ``<output_dir>/activation_monitor``; the directory is None when nothing is written."""
    try:
        from monitor.tensorboard import require_tensorboard

        require_tensorboard()
    except ImportError as e:
        if logdir is not None:
            raise
        warn_once("no-tensorboard", f"activation monitor: no TensorBoard output ({e}).")
        return None, None, None
    if logdir is not None:
        return None, os.fspath(logdir), os.fspath(logdir)
    tb = tensorboard_callback(trainer)
    writer = getattr(tb, "tb_writer", None) if tb is not None else None
    if writer is not None:
        return writer, None, _writer_dir(writer)
    directory = _trainer_tensorboard_dir(args, state)
    if directory is None:
        directory = os.path.join(args.output_dir, SUBDIR)
        warn_once(
            "where",
            "activation monitor: the Trainer writes no TensorBoard run (`report_to` without \"tensorboard\"); "
            f"activation output goes to TensorBoard under {directory}.",
        )
    others = [r for r in _report_to(args) if r != "tensorboard"]
    if others and trainer is None:
        warn_once(
            "reporters",
            f"activation monitor: the Trainer running this callback was not found; call "
            f"`monitor.set_trainer(trainer)` for the activation scalars to reach {', '.join(others)} too "
            "(they go to TensorBoard only).",
        )
    return None, directory, directory


def gather(args: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An all_gather over the Trainer's processes (``[world, n]``), or None for one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    world = dist.get_world_size()

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t)
        return torch.stack(out)

    return all_gather


def _report_to(args: Any) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    return [report_to] if isinstance(report_to, str) else list(report_to)


def _writer_dir(writer: Any) -> str | None:
    for attr in ("get_logdir", "logdir", "log_dir"):
        value = getattr(writer, attr, None)
        value = value() if callable(value) else value
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return None


def _trainer_tensorboard_dir(args: Any, state: Any) -> str | None:
    """The directory of the Trainer's ``TensorBoardCallback`` (its ``on_train_begin`` ran before
    ours: the reporting callbacks come first), or None when it writes none."""
    trial = state.trial_name if getattr(state, "is_hyper_param_search", False) else None
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:  # transformers 4.x: the callback writes into args.logging_dir (per trial: a subdirectory)
        return os.path.join(logging_dir, trial) if trial else logging_dir
    if "tensorboard" not in _report_to(args):
        return None
    env = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if env and not trial:
        return os.path.expanduser(env)
    # transformers 5: <output_dir>/runs/<date>_<host>[/<trial>], named when its on_train_begin ran.
    # Its writer's newest event file, written by this process, names the directory.
    pattern = os.path.join(glob.escape(os.fspath(args.output_dir)), "runs", "**", "events.out.tfevents.*")
    pid = f".{os.getpid()}."
    own = [f for f in glob.glob(pattern, recursive=True) if pid in os.path.basename(f) and not f.endswith(".activation-monitor")]
    if not own:
        return None
    return os.path.dirname(max(own, key=lambda f: (_created(f), os.path.getmtime(f))))


def _created(path: str) -> int:
    parts = os.path.basename(path).split(".")
    return int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
