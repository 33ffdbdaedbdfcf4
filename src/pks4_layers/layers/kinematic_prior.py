"""``KinematicPriorEncoder``: motion priors from neighbouring frames.

This is our interpretation of the kinematic prior of Zeng et al., "PKS^4: Parallel Kinematic
Selective State Space Scanners for Efficient Video Understanding" (arXiv:2604.26461), built from
its abstract; the paper's exact formulas were not available. Two cues per frame and location:

* displacement: a local correlation cost volume between frame ``t`` and frame ``t-1`` over a
  ``(2r+1)^2`` window of displacements, on L2-normalised, channel-reduced features, summarised
  by a soft-argmax displacement ``(dx, dy)`` and a confidence (one minus the normalised entropy
  of the match distribution);
* motion boundaries: the difference of reduced features between ``t`` and ``t-1``, passed
  through a small spatial convolution so that it sees where motion starts and stops.

Frame 0 has no predecessor: its cost volume, displacement, confidence and difference are zero,
and a ``has_previous`` channel tells the fusion which frames had one. Nothing wraps around.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._checks import check_grid, check_tokens


def local_correlation(current: Tensor, previous: Tensor, radius: int) -> Tensor:
    """Cost volume of ``current`` against ``previous`` over a ``(2r+1)^2`` window.

    Args:
        current, previous: ``(N, C, H, W)`` feature maps.
        radius: largest displacement ``r`` along each axis.

    Returns:
        ``(N, (2r+1)^2, H, W)``: entry ``k`` at ``(y, x)`` is ``<current[y, x],
        previous[y + dy_k, x + dx_k]>`` with displacements in row-major order (``dy`` outer);
        positions outside the map correlate to zero.
    """
    H, W = current.shape[-2:]
    padded = F.pad(previous, (radius, radius, radius, radius))
    costs = []
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            shifted = padded[..., dy : dy + H, dx : dx + W]
            costs.append((current * shifted).sum(dim=1))
    return torch.stack(costs, dim=1)


class KinematicPriorEncoder(nn.Module):
    """Kinematic prior per frame and location from the frame and its predecessor.

    Args:
        dim: channels of the input features.
        prior_dim: channels of the returned prior.
        radius: correlation window radius ``r`` (``(2r+1)^2`` displacements).
        corr_dim: channels the features are reduced to before correlation.
        diff_dim: channels of the frame-difference branch.

    Shapes:
        input ``x``: ``(B, T, L, dim)`` with ``L = H * W`` in row-major order and ``grid = (H, W)``.
        output: ``(B, T, L, prior_dim)``.
    """

    def __init__(
        self,
        dim: int,
        prior_dim: int = 32,
        radius: int = 2,
        corr_dim: int = 64,
        diff_dim: int = 32,
    ) -> None:
        super().__init__()
        if radius < 0:
            raise ValueError(f"radius: expected >= 0, got {radius}")
        self.dim = dim
        self.prior_dim = prior_dim
        self.radius = radius
        self.num_displacements = (2 * radius + 1) ** 2

        self.corr_reduce = nn.Linear(dim, corr_dim, bias=False)
        # Cosine similarities lie in [-1, 1]; a learnt scale sharpens the match distribution.
        self.corr_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.diff_reduce = nn.Linear(dim, diff_dim)
        self.diff_conv = nn.Conv2d(diff_dim, diff_dim, kernel_size=3, padding=1)

        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        self.register_buffer("displacements", torch.stack([dx.flatten(), dy.flatten()], -1), False)

        # cost volume, (dx, dy), confidence, has_previous, frame-difference features
        fused_in = self.num_displacements + 4 + diff_dim
        self.fuse = nn.Sequential(
            nn.Linear(fused_in, 2 * prior_dim),
            nn.GELU(),
            nn.Linear(2 * prior_dim, prior_dim),
        )

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        check_tokens("x", x, self.dim)
        H, W = check_grid(grid, x.shape[2])
        Bsz, T = x.shape[:2]

        motion = self._displacement_cues(x, H, W)  # (B, T, L, K + 3)
        boundaries = self._difference_cues(x, H, W)  # (B, T, L, diff_dim)
        has_previous = x.new_ones(Bsz, T, x.shape[2], 1)
        has_previous[:, :1] = 0
        return self.fuse(torch.cat([motion, has_previous, boundaries], dim=-1))

    def _displacement_cues(self, x: Tensor, H: int, W: int) -> Tensor:
        Bsz, T, L, _ = x.shape
        K = self.num_displacements
        first = x.new_zeros(Bsz, 1, L, K + 3)  # frame 0: no predecessor, no motion
        if T < 2:
            return first
        feats = F.normalize(self.corr_reduce(x), dim=-1)
        feats = rearrange(feats, "b t (h w) c -> b t c h w", h=H, w=W)
        cost = local_correlation(
            rearrange(feats[:, 1:], "b t c h w -> (b t) c h w"),
            rearrange(feats[:, :-1], "b t c h w -> (b t) c h w"),
            self.radius,
        )
        cost = rearrange(cost, "(b t) k h w -> b t (h w) k", b=Bsz)
        match = torch.softmax(cost * self.corr_log_scale.exp(), dim=-1)
        # The content at this location sat at (location + offset) in frame t-1, so it moved
        # by -offset: report the motion, in feature-map cells per frame.
        velocity = -match @ self.displacements.to(match.dtype)
        entropy = -(match * torch.log(match.clamp_min(1e-12))).sum(-1, keepdim=True)
        confidence = 1.0 - entropy / math.log(K) if K > 1 else torch.ones_like(entropy)
        later = torch.cat([cost, velocity, confidence], dim=-1).to(first.dtype)
        return torch.cat([first, later], dim=1)

    def _difference_cues(self, x: Tensor, H: int, W: int) -> Tensor:
        reduced = self.diff_reduce(x)  # (B, T, L, diff_dim)
        diff = torch.cat([torch.zeros_like(reduced[:, :1]), reduced[:, 1:] - reduced[:, :-1]], 1)
        maps = rearrange(diff, "b t (h w) c -> (b t) c h w", h=H, w=W)
        edges = F.gelu(self.diff_conv(maps))
        return rearrange(edges, "(b t) c h w -> b t (h w) c", b=x.shape[0])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, prior_dim={self.prior_dim}, radius={self.radius}"
