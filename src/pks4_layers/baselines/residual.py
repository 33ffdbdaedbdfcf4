"""``ResidualTemporalModule``: what every peer temporal module shares with ``PKS4Block``.

The calling convention (maps ``(B, T, C, H, W)`` or tokens ``(B, T, N, C)``, the input's shape
out), a LayerNorm in front of the branch, a residual connection, an output projection that
starts at zero (the module is the identity when created) and timm's gradient checkpointing.
A peer defines only its branch, on tokens ``(B, T, L, C)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers._checks import check_grid, check_same_device, check_same_dtype
from ..layers.layout import from_tokens, to_tokens
from ..layers.weight_decay import no_weight_decay_names

__all__ = ["ResidualTemporalModule", "bottleneck_width"]


def bottleneck_width(dim: int, inner_dim: Optional[int], default_ratio: float = 0.25) -> int:
    """``inner_dim``, checked, or ``max(1, round(dim * default_ratio))`` when ``None``."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    if inner_dim is None:
        return max(1, round(dim * default_ratio))
    if not isinstance(inner_dim, int) or isinstance(inner_dim, bool) or inner_dim < 1:
        raise ValueError(f"inner_dim: expected a positive int or None, got {inner_dim!r}")
    return inner_dim


class ResidualTemporalModule(nn.Module):
    """``x + branch(norm(x))`` on feature maps or tokens; the identity when created.

    Subclasses build the branch's last linear map (``self.out_proj``, or another one that
    :meth:`output_projection` returns), which :meth:`reset_output` zeroes, and implement
    :meth:`branch` on tokens ``(B, T, L, C)``.
    ``needs_grid`` says whether the branch uses the spatial layout (then tokens must come with
    their ``grid``).

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` -> ``(B, T, N, C)``.
    """

    needs_grid = False
    out_proj: nn.Linear

    def __init__(self, dim: int) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.grad_checkpointing = False

    def output_projection(self) -> nn.Linear:
        """The branch's last linear map (zero when the module is created)."""
        return self.out_proj

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero the output projection: the module becomes the identity."""
        proj = self.output_projection()
        nn.init.zeros_(proj.weight)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (timm's convention): biases, norms and
        the scans' ``A_log``, ``D``, step-size bias, the learnt time embedding."""
        return no_weight_decay_names(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only the module's input for the backward, which recomputes the branch."""
        self.grad_checkpointing = bool(enable)

    def branch(self, h: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        """The residual branch on normalised tokens ``h`` ``(B, T, L, C)`` -> ``(B, T, L, C)``."""
        raise NotImplementedError

    def forward(
        self, x: Tensor, grid: Optional[tuple[int, int]] = None, num_prefix_tokens: int = 0
    ) -> Tensor:
        tokens, grid, prefix = to_tokens(
            x, self.dim, grid, num_prefix_tokens, need_grid=self.needs_grid
        )
        if grid is not None:
            grid = check_grid(grid, tokens.shape[2] - prefix)
        if tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(
                f"x: expected at least one clip and one frame (B, T >= 1), got {tuple(x.shape)}"
            )
        check_same_device("x", tokens, "the module's parameters", self.norm.weight)
        check_same_dtype("x", tokens, "the module's parameters", self.norm.weight)
        if self.grad_checkpointing and torch.is_grad_enabled():
            out = checkpoint(self._residual, tokens, grid, prefix, use_reentrant=False)
        else:
            out = self._residual(tokens, grid, prefix)
        return from_tokens(out, x, grid)

    def _residual(self, tokens: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        return tokens + self.branch(self.norm(tokens), grid, prefix)
