"""Checkpoints that resume a run and can be loaded without running code.

A checkpoint is a dict of tensors and plain Python values (model, optimiser and scheduler
states, the epoch, the config, the metrics history), written with ``torch.save`` and read
back with ``torch.load(weights_only=True)``: a file that carries a pickled object is refused
by torch's restricted unpickler instead of executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes atomically (temporary file, then rename): an interrupted save never leaves a
    truncated checkpoint where the last good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: expected a checkpoint file, got {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # Keep torch's one-line reason ("Unsupported global: ..."), not its advice to retry
        # with weights_only=False: for a file of unknown origin that would run its code.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next(
            (line for line in lines if "Unsupported global" in line), lines[0] if lines else ""
        )
        raise ValueError(
            f"{path}: not a loadable pks4-layers checkpoint (it is read with "
            f"weights_only=True, which refuses pickled objects): {reason}"
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: expected a pks4-layers checkpoint dict with a 'model' entry")
    return state


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raises a readable error naming missing, unexpected and mismatched keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the checkpoint does not fit this model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched[:10]}")
        raise ValueError("\n".join(lines))
