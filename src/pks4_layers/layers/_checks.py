"""Input checks shared by the layers: errors name the argument, the expectation and what came."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.motion_scan import FLOAT_DTYPES


def check_float_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )
    return x


def check_tokens(name: str, x: object, dim: int, length: Optional[int] = None) -> Tensor:
    """``x`` must be ``(B, T, L, dim)`` (and ``L == length`` when given), floating, T >= 1."""
    x = check_float_tensor(name, x)
    L = "L" if length is None else str(length)
    if x.dim() != 4 or x.shape[-1] != dim or (length is not None and x.shape[2] != length):
        raise ValueError(f"{name}: expected shape (B, T, {L}, {dim}), got {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one frame (T >= 1), got {tuple(x.shape)}")
    # The op scans an empty batch, but the layers' reshapes cannot infer a size from 0 elements.
    if x.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty batch (B >= 1), got {tuple(x.shape)}")
    return x


def check_grid(grid: object, num_locations: int) -> tuple[int, int]:
    """``grid`` must be two positive ints ``(H, W)`` with ``H * W == num_locations``."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid: expected a pair of positive ints (H, W), got {grid!r}")
    H, W = grid
    if H * W != num_locations:
        raise ValueError(
            f"grid: expected H * W == {num_locations} (the number of spatial locations), "
            f"got {tuple(grid)} with H * W == {H * W}"
        )
    return H, W


def check_same_device(name: str, x: Tensor, reference_name: str, reference: Tensor) -> None:
    if x.device != reference.device:
        raise ValueError(
            f"{name}: expected device {reference.device} (that of {reference_name}), got {x.device}"
        )


def check_same_dtype(name: str, x: Tensor, reference_name: str, reference: Tensor) -> None:
    """``x`` must have ``reference``'s dtype unless autocast is on for ``x``'s device (autocast
    casts each op's inputs itself, so a float32 parameter meets bfloat16 activations legally)."""
    if x.dtype == reference.dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise ValueError(
        f"{name}: expected dtype {reference.dtype} (that of {reference_name}), got {x.dtype} "
        "(convert the module with .to(dtype), or run under torch.autocast)"
    )
