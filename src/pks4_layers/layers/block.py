"""``PKS4Block``: kinematic priors + parallel temporal scan + residual, after any 2D backbone.

Our interpretation of the PKS4 module of Zeng et al., "PKS^4: Parallel Kinematic Selective State
Space Scanners for Efficient Video Understanding" (arXiv:2604.26461), built from its abstract.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from ._checks import check_float_tensor, check_grid, check_same_device, check_tokens
from .kinematic_prior import KinematicPriorEncoder
from .temporal_scan import ParallelTemporalScan


class PKS4Block(nn.Module):
    """Temporal modelling block that returns its input's shape.

    ``x + out_proj(scan(norm(x), prior(norm(x))))``: a LayerNorm, a
    :class:`KinematicPriorEncoder` on the spatial locations, a :class:`ParallelTemporalScan` on
    every location (prefix tokens included), a residual connection. The scan's output projection
    starts at zero, so a freshly inserted block is the identity and a pretrained backbone's
    behaviour is unchanged at step 0.

    Args:
        dim: channels ``C`` of the features.
        prior_dim: channels of the kinematic prior.
        d_state: state size of the scan.
        expand: the scan's inner width is ``expand * dim``.
        radius: correlation window radius of the prior encoder.
        d_conv: width of the scan's temporal convolution.
        bidirectional: forward and reverse scans; ``False`` gives a causal block.
        corr_dim, diff_dim: channel reductions inside the prior encoder.
        backend: backend of :func:`pks4_layers.ops.motion_scan`.

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        feature maps ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``grid`` is read from the map.
        tokens ``(B, T, N, C)`` with ``N = num_prefix_tokens + H * W`` and ``grid = (H, W)``
        -> ``(B, T, N, C)``. Prefix tokens (a ViT's class token) are scanned over time with a
        zero kinematic prior: they have no spatial neighbourhood to correlate.
    """

    def __init__(
        self,
        dim: int,
        prior_dim: int = 32,
        d_state: int = 16,
        expand: int = 1,
        radius: int = 2,
        d_conv: int = 4,
        bidirectional: bool = True,
        corr_dim: int = 64,
        diff_dim: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.prior = KinematicPriorEncoder(
            dim, prior_dim=prior_dim, radius=radius, corr_dim=corr_dim, diff_dim=diff_dim
        )
        self.scan = ParallelTemporalScan(
            dim,
            prior_dim,
            d_state=d_state,
            expand=expand,
            d_conv=d_conv,
            bidirectional=bidirectional,
            backend=backend,
        )
        self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero the output projection: the block becomes the identity."""
        nn.init.zeros_(self.scan.out_proj.weight)
        nn.init.zeros_(self.scan.out_proj.bias)

    def forward(
        self,
        x: Tensor,
        grid: Optional[tuple[int, int]] = None,
        num_prefix_tokens: int = 0,
    ) -> Tensor:
        check_float_tensor("x", x)
        if x.dim() == 5:
            if x.shape[2] != self.dim:
                raise ValueError(
                    f"x: expected a feature map (B, T, C={self.dim}, H, W), got {tuple(x.shape)}"
                )
            if num_prefix_tokens:
                raise ValueError(
                    f"num_prefix_tokens: expected 0 for a feature map, got {num_prefix_tokens}"
                )
            H, W = x.shape[-2:]
            if grid is not None and tuple(grid) != (H, W):
                raise ValueError(f"grid: expected {(H, W)} (that of x) or None, got {grid!r}")
            tokens = rearrange(x, "b t c h w -> b t (h w) c")
            out = self._forward_tokens(tokens, (H, W), 0)
            return rearrange(out, "b t (h w) c -> b t c h w", h=H, w=W)
        if x.dim() == 4:
            if x.shape[-1] != self.dim:
                raise ValueError(
                    f"x: expected tokens (B, T, N, C={self.dim}), got {tuple(x.shape)}"
                )
            if grid is None:
                raise ValueError("grid: expected (H, W) of the token grid for 4-D tokens, got None")
            if not isinstance(num_prefix_tokens, int) or not 0 <= num_prefix_tokens <= x.shape[2]:
                raise ValueError(
                    f"num_prefix_tokens: expected an int in [0, {x.shape[2]}], "
                    f"got {num_prefix_tokens!r}"
                )
            return self._forward_tokens(x, grid, num_prefix_tokens)
        raise ValueError(
            f"x: expected (B, T, C, H, W) feature maps or (B, T, N, C) tokens, "
            f"got shape {tuple(x.shape)}"
        )

    def _forward_tokens(self, x: Tensor, grid: tuple[int, int], prefix: int) -> Tensor:
        grid = check_grid(grid, x.shape[2] - prefix)
        check_tokens("x", x, self.dim)
        check_same_device("x", x, "the block's parameters", self.norm.weight)
        h = self.norm(x)
        prior = self.prior(h[:, :, prefix:], grid)
        if prefix:
            no_motion = prior.new_zeros(*prior.shape[:2], prefix, prior.shape[-1])
            prior = torch.cat([no_motion, prior], dim=2)
        return x + self.scan(h, prior)
