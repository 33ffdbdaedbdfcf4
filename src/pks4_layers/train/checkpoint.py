"""Checkpoints that resume a run and can be loaded without running code.

A checkpoint is a dict of tensors and plain Python values (model, optimiser and scheduler
states, the epoch, the config, the metrics history), written with ``torch.save`` and read
back with ``torch.load(weights_only=True)``: a file that carries a pickled object is refused
by torch's restricted unpickler instead of executed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import MissingPathError, UsageError, first_sentence

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes atomically (temporary file, then rename): an interrupted save never leaves a
    truncated checkpoint where the last good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``; a missing file, a file that is not a checkpoint (or is cut
    short, or carries pickled objects) raises :class:`~.errors.UsageError` saying so."""
    path = Path(path)
    if not path.is_file():
        got = "a folder" if path.is_dir() else "no such file"
        raise MissingPathError("resume", "a checkpoint file", f"{str(path)!r} ({got})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # Keep torch's one-line reason ("Unsupported global: ...", "failed finding central
        # directory"), not its advice to retry with weights_only=False: for a file of unknown
        # origin that would run its code.
        text = str(err)
        _, marker, detail = text.partition("WeightsUnpickler error:")
        reason = first_sentence(detail if marker else text) or type(err).__name__
        raise UsageError(
            f"{path}: not a loadable pks4-layers checkpoint (it is read with weights_only=True, "
            "which refuses pickled objects)",
            "a checkpoint_*.pt that pks4-train wrote",
            reason,
        ) from err
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        if isinstance(state, dict):
            got = f"a dict with keys {sorted(map(str, state))[:8]}"
        else:
            got = f"a {type(state).__name__}"
        raise UsageError(str(path), "a pks4-layers checkpoint dict with a 'model' entry", got)
    return state


def state_mismatch(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing keys, unexpected keys, shape mismatches)`` of ``state`` against ``model``;
    all empty when it fits."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)
    ]
    return missing, unexpected, mismatched


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raises a readable error naming missing, unexpected and mismatched keys and shapes."""
    missing, unexpected, mismatched = state_mismatch(model, state)
    if missing or unexpected or mismatched:
        lines = [f"{source}: the checkpoint does not fit this model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched[:10]}")
        raise ValueError("\n".join(lines))


# The config keys that decide the model's weights: a checkpoint fits only the same ones.
MODEL_KEYS = ("backbone", "temporal")


def _describe(config: dict[str, Any], num_classes: Optional[int]) -> str:
    parts = [f"{key} {config[key]!r}" for key in MODEL_KEYS if key in config]
    if num_classes is not None:
        parts.append(f"{num_classes} classes")
    return ", ".join(parts) or "an unknown model"


def _first(items: list[str], count: int = 3) -> str:
    more = f"; {len(items) - count} more" if len(items) > count else ""
    return "; ".join(items[:count]) + more


def check_checkpoint_fits(
    model: nn.Module,
    state: dict[str, Any],
    source: str,
    config: dict[str, Any],
    classes: Sequence[str],
    training: bool,
) -> None:
    """Raises :class:`~.errors.UsageError` (one line, expected vs got) when the checkpoint
    ``state`` read from ``source`` cannot resume this run: weights of another architecture or
    class count, another dataset's classes, or (``training``) no optimizer state.

    Args:
        model: the run's model (not wrapped in DistributedDataParallel).
        state: what :func:`load_checkpoint` returned.
        source: the checkpoint's path, for the message.
        config: the run's ``TrainConfig.to_dict()``.
        classes: the run's class names.
        training: the run continues training (not ``--eval-only``).
    """
    what = f"resume {source}"
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    saved_classes = state.get("classes")
    head = state["model"].get("head.fc.weight") if isinstance(state["model"], dict) else None
    saved_count = len(saved_classes) if isinstance(saved_classes, list) else None
    if saved_count is None and isinstance(head, torch.Tensor) and head.dim() == 2:
        saved_count = int(head.shape[0])
    missing, unexpected, mismatched = state_mismatch(model, state["model"])
    if missing or unexpected or mismatched:
        expected = f"a checkpoint of this run's model ({_describe(config, len(classes))})"
        differs = [k for k in MODEL_KEYS if k in saved and saved[k] != config.get(k)]
        if differs or (saved_count is not None and saved_count != len(classes)):
            got = f"one of {_describe(saved, saved_count)}"
        else:
            pieces = []
            if mismatched:
                pieces.append(f"{len(mismatched)} shape mismatch(es) ({_first(mismatched)})")
            if missing:
                pieces.append(f"{len(missing)} missing key(s) ({_first(missing)})")
            if unexpected:
                pieces.append(f"{len(unexpected)} unexpected key(s) ({_first(unexpected)})")
            got = "weights that do not fit it: " + ", ".join(pieces)
        raise UsageError(what, expected, got)
    if isinstance(saved_classes, list) and list(saved_classes) != list(classes):
        # Same count, other names: the labels would silently mean other classes.
        other = [c for c in saved_classes if c not in set(classes)]
        raise UsageError(
            what,
            f"a checkpoint trained on this dataset's {len(classes)} classes",
            f"one trained on other classes or another order ({_first(other or saved_classes)})",
        )
    if training:
        absent = [key for key in ("optimizer", "scheduler", "epoch") if key not in state]
        if absent:
            raise UsageError(
                what,
                "a training checkpoint with optimizer, scheduler and epoch (--eval-only needs "
                "the model only)",
                f"one without {', '.join(absent)}",
            )
