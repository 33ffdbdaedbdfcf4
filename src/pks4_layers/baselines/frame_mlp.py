"""``FrameMLP`` (``temporal="frame_mlp"``): a per-frame bottleneck MLP, no temporal mixing.

The control for extra parameters: what a temporal module gains from its parameters and
non-linearity alone, with no access to any other frame.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .residual import ResidualTemporalModule, bottleneck_width

__all__ = ["FrameMLP"]


class FrameMLP(ResidualTemporalModule):
    """``x + up(gelu(down(norm(x))))`` at every frame and location independently.

    Every frame is transformed on its own, so the module (and any model that averages its
    output over frames) is exactly invariant to the order of the frames: it is causal whatever
    ``bidirectional`` says (accepted so that every kind takes the same arguments). Its source is
    the transformer's MLP / a bottleneck adapter without the temporal part.

    Parameters: ``2*C`` (LayerNorm) ``+ C*r + r`` (down) ``+ r*C + C`` (up)
    ``= 2*C*r + 3*C + r`` with ``C = dim`` and ``r = inner_dim``.

    Args:
        dim: channels ``C``.
        inner_dim: bottleneck width ``r`` (default ``dim // 4``, at least 1).
        bidirectional: no effect (nothing crosses frames).

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` -> ``(B, T, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        inner_dim: Optional[int] = None,
        bidirectional: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(dim)
        self.inner_dim = bottleneck_width(dim, inner_dim)
        self.bidirectional = bool(bidirectional)
        self.down = nn.Linear(dim, self.inner_dim)
        self.act = nn.GELU()
        self.out_proj = nn.Linear(self.inner_dim, dim)
        self.reset_output()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @staticmethod
    def num_params(dim: int, *, inner_dim: Optional[int] = None, **_: object) -> int:
        """The parameter count of ``FrameMLP(dim, inner_dim=inner_dim)``, from the formula."""
        r = bottleneck_width(dim, inner_dim)
        return 2 * dim * r + 3 * dim + r

    def branch(self, h: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        return self.out_proj(self.act(self.down(h)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, inner_dim={self.inner_dim}"
