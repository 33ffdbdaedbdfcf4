"""``PriorAdapter`` (``temporal="prior_adapter"``): the kinematic prior without the scan.

PKS4's :class:`~pks4_layers.KinematicPriorEncoder` (cost volume with the previous frame,
displacement, frame differences, their change) concatenated to the features and fed to the
temporal adapter (:class:`~pks4_layers.baselines.TemporalAdapter`'s branch): it tells what the
prior is worth without the selective scan, as ``scan`` tells what the scan is worth without
the prior.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..layers.kinematic_prior import DEFAULT_PRIOR_CUES, KinematicPriorEncoder
from .residual import ResidualTemporalModule, bottleneck_width
from .temporal_adapter import ADAPTER_ACTIVATIONS, depthwise_time_conv

__all__ = ["PriorAdapter"]


class PriorAdapter(ResidualTemporalModule):
    """``x + up(act(dwconv_t([h, prior(h)])))`` with ``h = down(norm(x))``.

    A linear map to ``r = inner_dim`` channels; the kinematic prior of those features
    (``prior_dim`` channels per frame and grid location, zero on prefix tokens, which have no
    neighbourhood, exactly as in PKS4Block); the two concatenated, a depthwise convolution over
    time (``kernel_size`` frames, centred or causal), GELU, and a zero-initialised linear map
    back to ``C``. The prior's arguments and defaults are PKS4Block's.

    Parameters, with ``C = dim``, ``P = prior_dim``, ``k = kernel_size``: ``2*C`` (LayerNorm)
    ``+ C*r + r`` (down) ``+ P_prior(r)`` (the prior encoder: ``r*(corr_dim + diff_dim)`` plus
    a part that does not depend on ``r``) ``+ (r + P)*(k + 1)`` (depthwise conv)
    ``+ (r + P)*C + C`` (up).

    Args:
        dim: channels ``C``.
        inner_dim: bottleneck width ``r`` (default ``dim // 4``, at least 1).
        kernel_size, activation, bidirectional: as in :class:`TemporalAdapter`.
        prior_dim, radius, corr_dim, diff_dim, cues, corr_temperature: the prior encoder's,
            as in :class:`~pks4_layers.PKS4Block`.
        learn_corr_temperature, prior_norm, motion_norm: likewise.

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` with ``grid=(H, W)`` ->
        ``(B, T, N, C)``.
    """

    needs_grid = True

    def __init__(
        self,
        dim: int,
        *,
        inner_dim: Optional[int] = None,
        kernel_size: int = 3,
        activation: Literal["gelu", "none"] = "gelu",
        bidirectional: bool = True,
        prior_dim: int = 32,
        radius: int = 2,
        corr_dim: Optional[int] = 64,
        diff_dim: int = 32,
        cues: Sequence[str] = DEFAULT_PRIOR_CUES,
        corr_temperature: float = 10.0,
        learn_corr_temperature: bool = True,
        prior_norm: Literal["layer", "none"] = "layer",
        motion_norm: Literal["none", "batch"] = "none",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(dim)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected a positive odd int, got {kernel_size!r}")
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {list(ADAPTER_ACTIVATIONS)}, got {activation!r}"
            )
        self.inner_dim = bottleneck_width(dim, inner_dim)
        self.kernel_size = kernel_size
        self.activation = activation
        self.bidirectional = bool(bidirectional)
        self.down = nn.Linear(dim, self.inner_dim)
        self.prior = KinematicPriorEncoder(
            self.inner_dim,
            prior_dim=prior_dim,
            radius=radius,
            corr_dim=corr_dim,
            diff_dim=diff_dim,
            cues=cues,
            corr_temperature=corr_temperature,
            learn_corr_temperature=learn_corr_temperature,
            prior_norm=prior_norm,
            motion_norm=motion_norm,
        )
        width = self.inner_dim + prior_dim
        self.conv = nn.Conv1d(width, width, kernel_size, groups=width)
        self.act = nn.GELU() if activation == "gelu" else nn.Identity()
        self.out_proj = nn.Linear(width, dim)
        self.reset_output()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @staticmethod
    def num_params(
        dim: int,
        *,
        inner_dim: Optional[int] = None,
        kernel_size: int = 3,
        prior_dim: int = 32,
        radius: int = 2,
        corr_dim: Optional[int] = 64,
        diff_dim: int = 32,
        cues: Sequence[str] = DEFAULT_PRIOR_CUES,
        learn_corr_temperature: bool = True,
        prior_norm: Literal["layer", "none"] = "layer",
        **_: object,
    ) -> int:
        """The parameter count of ``PriorAdapter(dim, ...)``, from the formula (the prior
        encoder's part counted on an encoder built for the purpose)."""
        r = bottleneck_width(dim, inner_dim)
        encoder = KinematicPriorEncoder(
            r,
            prior_dim=prior_dim,
            radius=radius,
            corr_dim=corr_dim,
            diff_dim=diff_dim,
            cues=cues,
            learn_corr_temperature=learn_corr_temperature,
            prior_norm=prior_norm,
        )
        p_prior = sum(p.numel() for p in encoder.parameters())
        width = r + prior_dim
        return 2 * dim + dim * r + r + p_prior + width * (kernel_size + 1) + width * dim + dim

    def branch(self, h: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        h = self.down(h)
        spatial = h.narrow(2, prefix, h.shape[2] - prefix)
        prior = self.prior(spatial, grid)
        if prefix:
            no_motion = prior.new_zeros(*prior.shape[:2], prefix, prior.shape[-1])
            prior = torch.cat([no_motion, prior], dim=2)
        mixed = depthwise_time_conv(
            torch.cat([h, prior], dim=-1), self.conv, causal=not self.bidirectional
        )
        return self.out_proj(self.act(mixed))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, inner_dim={self.inner_dim}, prior_dim={self.prior.prior_dim}, "
            f"kernel_size={self.kernel_size}, activation={self.activation!r}, "
            f"bidirectional={self.bidirectional}"
        )
