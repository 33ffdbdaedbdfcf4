"""The two input layouts of the temporal modules, and the one they compute on.

Every temporal module takes feature maps ``(B, T, C, H, W)`` (a CNN's) or tokens ``(B, T, N, C)``
(a ViT's, ``N = num_prefix_tokens + H * W``) and computes on tokens ``(B, T, L, C)``: one
validation of the layout for all of them, so their errors read the same.
"""

from __future__ import annotations

from typing import Optional

from einops import rearrange
from torch import Tensor

from ._checks import check_float_tensor

__all__ = ["from_tokens", "to_tokens"]


def to_tokens(
    x: object,
    dim: int,
    grid: Optional[tuple[int, int]],
    num_prefix_tokens: int,
    need_grid: bool = True,
) -> tuple[Tensor, Optional[tuple[int, int]], int]:
    """``x`` as tokens ``(B, T, L, dim)``, the grid ``(H, W)`` and the number of prefix tokens.

    Args:
        x: maps ``(B, T, dim, H, W)`` (the grid is read from them) or tokens ``(B, T, N, dim)``.
        dim: the channels the module was built for.
        grid: ``(H, W)`` of a token grid; for maps ``None`` or the maps' own.
        num_prefix_tokens: tokens before the grid (0 for maps).
        need_grid: tokens must come with their grid (modules that use the spatial layout);
            otherwise a token grid may be ``None``.
    """
    check_float_tensor("x", x)
    if x.dim() == 5:
        if x.shape[2] != dim and x.shape[1] == dim:
            raise ValueError(
                f"x: expected (B, T, C={dim}, H, W) feature maps, got {tuple(x.shape)}, which "
                "looks like torchvision's / PyTorchVideo's (B, C, T, H, W) layout: pass "
                "x.transpose(1, 2)"
            )
        if x.shape[2] != dim:
            raise ValueError(
                f"x: expected a feature map (B, T, C={dim}, H, W), got {tuple(x.shape)}"
            )
        if num_prefix_tokens:
            raise ValueError(
                f"num_prefix_tokens: expected 0 for a feature map, got {num_prefix_tokens}"
            )
        H, W = x.shape[-2:]
        if grid is not None and tuple(grid) != (H, W):
            raise ValueError(f"grid: expected {(H, W)} (that of x) or None, got {grid!r}")
        return rearrange(x, "b t c h w -> b t (h w) c"), (H, W), 0
    if x.dim() == 4:
        if x.shape[-1] != dim and x.shape[1] == dim:
            raise ValueError(
                f"x: expected (B, T, C={dim}, H, W) feature maps or (B, T, N, C={dim}) tokens, got "
                f"{tuple(x.shape)}, which looks like per-frame maps (B*T, C, H, W): pass "
                "x.unflatten(0, (B, T))"
            )
        if x.shape[-1] != dim:
            raise ValueError(f"x: expected tokens (B, T, N, C={dim}), got {tuple(x.shape)}")
        if grid is None and need_grid:
            raise ValueError("grid: expected (H, W) of the token grid for 4-D tokens, got None")
        if not isinstance(num_prefix_tokens, int) or not 0 <= num_prefix_tokens <= x.shape[2]:
            raise ValueError(
                f"num_prefix_tokens: expected an int in [0, {x.shape[2]}], "
                f"got {num_prefix_tokens!r}"
            )
        return x, grid, num_prefix_tokens
    raise ValueError(
        f"x: expected (B, T, C, H, W) feature maps or (B, T, N, C) tokens, "
        f"got shape {tuple(x.shape)}"
    )


def from_tokens(out: Tensor, x: Tensor, grid: Optional[tuple[int, int]]) -> Tensor:
    """``out`` ``(B, T, L, C)`` back in the layout of the module's input ``x``."""
    if x.dim() == 5:
        return rearrange(out, "b t (h w) c -> b t c h w", h=grid[0], w=grid[1])
    return out
