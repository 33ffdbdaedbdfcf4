"""``SelectiveScanBlock`` (``temporal="scan"``): PKS4Block without its kinematic prior.

A plain selective scan along time at every location, as TimeMamba in video-mamba-suite
(Chen et al., "Video Mamba Suite: State Space Model as a Versatile Alternative for Video
Understanding", 2024) runs one per location: ``delta``, ``B`` and ``C`` come from the features
alone, as in Mamba (Gu and Dao, 2023). Everything else is PKS4Block's, built by the same
:class:`~pks4_layers.ParallelTemporalScan`, so that the difference between the two is what the
kinematic prior is worth.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..layers.temporal_scan import ParallelTemporalScan
from ..ops.motion_scan import ScanBackend
from .residual import ResidualTemporalModule

__all__ = ["SelectiveScanBlock", "scan_num_params"]


def scan_num_params(
    dim: int,
    inner_dim: Optional[int] = None,
    d_state: int = 16,
    expand: int = 1,
    d_conv: int = 4,
    bidirectional: bool = True,
) -> int:
    """Parameters of a residual scan without prior (``scan`` and ``st_scan``), from the formula.

    With ``C = dim``, ``r = inner_dim``, ``E = expand * r``, ``R = ceil(r / 16)`` (the rank of
    ``delta``'s projection), ``N = d_state``, ``W = d_conv`` and ``K`` directions (2 when
    bidirectional): ``2*C`` (LayerNorm) ``+ (C*r + r if r != C)`` (down)
    ``+ 2*E*r + 2*E`` (in_proj to the stream and the gate)
    ``+ K*E*(W + 2*R + 3*N + 3)`` (per direction: the temporal conv ``E*W + E``, the
    projection to ``delta``, ``B``, ``C`` ``E*(R + 2N)``, ``delta``'s ``R*E + E``, ``A_log``
    ``E*N``, ``D`` ``E``) ``+ E*C + C`` (the output projection).
    """
    r = dim if inner_dim is None else inner_dim
    E, R, K = expand * r, math.ceil(r / 16), 2 if bidirectional else 1
    down = dim * r + r if r != dim else 0
    return (
        2 * dim
        + down
        + 2 * E * r
        + 2 * E
        + K * E * (d_conv + 2 * R + 3 * d_state + 3)
        + E * dim
        + dim
    )


class SelectiveScanBlock(ResidualTemporalModule):
    """``x + scan(down(norm(x)))``: PKS4Block with the kinematic prior removed.

    A LayerNorm, a linear map to ``inner_dim`` channels (none when ``inner_dim == dim``), a
    :class:`~pks4_layers.ParallelTemporalScan` built with ``prior_targets=()`` (every location,
    prefix tokens included, an independent sequence over ``T``; forward and reverse scans
    averaged when bidirectional, causal otherwise) whose zero-initialised output projection maps
    back to ``dim``, a residual connection. The arguments and defaults are PKS4Block's.

    Parameters: :func:`scan_num_params` (about ``C*r + 3*E*r + ...``; 5.6 M at ``dim=1280``).

    Args:
        dim: channels ``C``.
        inner_dim: width the scan works at (default ``dim``).
        d_state, expand, d_conv, bidirectional, backend, dt_min, dt_max, recompute: as in
            :class:`~pks4_layers.PKS4Block`.

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` -> ``(B, T, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        inner_dim: Optional[int] = None,
        d_state: int = 16,
        expand: int = 1,
        d_conv: int = 4,
        bidirectional: bool = True,
        backend: ScanBackend = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        recompute: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(dim)
        inner = dim if inner_dim is None else inner_dim
        if not isinstance(inner, int) or isinstance(inner, bool) or inner < 1:
            raise ValueError(f"inner_dim: expected a positive int or None, got {inner_dim!r}")
        self.inner_dim = inner
        self.down = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.scan = ParallelTemporalScan(
            inner,
            prior_dim=0,
            d_state=d_state,
            expand=expand,
            d_conv=d_conv,
            bidirectional=bidirectional,
            backend=backend,
            prior_targets=(),
            dt_min=dt_min,
            dt_max=dt_max,
            out_dim=dim,
            recompute=recompute,
        )
        self.reset_output()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def output_projection(self) -> nn.Linear:
        return self.scan.out_proj

    @staticmethod
    def num_params(
        dim: int,
        *,
        inner_dim: Optional[int] = None,
        d_state: int = 16,
        expand: int = 1,
        d_conv: int = 4,
        bidirectional: bool = True,
        **_: object,
    ) -> int:
        """The parameter count of ``SelectiveScanBlock(dim, ...)``, from the formula."""
        return scan_num_params(dim, inner_dim, d_state, expand, d_conv, bidirectional)

    @property
    def bidirectional(self) -> bool:
        return self.scan.bidirectional

    def branch(self, h: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        return self.scan(self.down(h))

    def extra_repr(self) -> str:
        d = self.scan.directions[0]
        return (
            f"dim={self.dim}, inner_dim={self.inner_dim}, d_state={d.d_state}, "
            f"expand={self.scan.d_inner // self.inner_dim}, bidirectional={self.bidirectional}, "
            "order=per location over time"
        )
