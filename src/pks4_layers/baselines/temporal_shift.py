"""``TemporalShift`` (``temporal="tsm"``): TSM's channel shift at the backbone's output.

Lin, Gan and Han, "TSM: Temporal Shift Module for Efficient Video Understanding" (ICCV 2019):
a fraction of the channels is taken from the next and the previous frame, at no cost, and a
per-location transform mixes them with the rest. TSM shifts inside every residual block of the
backbone; here the shift sits once, after the backbone, followed by a bottleneck MLP.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .residual import ResidualTemporalModule, bottleneck_width

__all__ = ["TemporalShift", "temporal_shift"]


def temporal_shift(x: Tensor, fold_div: int = 8, bidirectional: bool = True) -> Tensor:
    """TSM's shift on tokens ``(B, T, L, C)``, zero padded at the clip's ends.

    With ``f = C // fold_div``: channels ``[0, f)`` of frame ``t`` come from frame ``t + 1``
    and channels ``[f, 2f)`` from frame ``t - 1`` (bidirectional, offline TSM); causal
    (``bidirectional=False``, online TSM): channels ``[0, f)`` come from frame ``t - 1`` and
    nothing from the future. The other channels stay.
    """
    fold = x.shape[-1] // fold_div
    if fold == 0:
        return x
    out = torch.zeros_like(x)
    if bidirectional:
        out[:, :-1, :, :fold] = x[:, 1:, :, :fold]
        out[:, 1:, :, fold : 2 * fold] = x[:, :-1, :, fold : 2 * fold]
        out[..., 2 * fold :] = x[..., 2 * fold :]
    else:
        out[:, 1:, :, :fold] = x[:, :-1, :, :fold]
        out[..., fold:] = x[..., fold:]
    return out


class TemporalShift(ResidualTemporalModule):
    """``x + up(gelu(down(shift(norm(x)))))``: TSM's shift, then a per-location bottleneck MLP.

    ``shift`` is :func:`temporal_shift`: ``1/fold_div`` of the channels from frame ``t + 1``
    and ``1/fold_div`` from ``t - 1`` (zero padded), or, with ``bidirectional=False``,
    ``1/fold_div`` from ``t - 1`` only (causal). The MLP mixes them with the frame's own
    channels at every location (prefix tokens included).

    Parameters: ``2*C`` (LayerNorm) ``+ C*r + r`` (down) ``+ r*C + C`` (up)
    ``= 2*C*r + 3*C + r`` with ``C = dim`` and ``r = inner_dim``: the shift itself has none.

    Args:
        dim: channels ``C``.
        inner_dim: bottleneck width ``r`` (default ``dim // 4``, at least 1).
        fold_div: ``1/fold_div`` of the channels moves each way (TSM's 8).
        bidirectional: shift from both neighbours (``True``) or from the past only.

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` -> ``(B, T, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        inner_dim: Optional[int] = None,
        fold_div: int = 8,
        bidirectional: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(dim)
        if not isinstance(fold_div, int) or fold_div < 2 or dim // fold_div < 1:
            raise ValueError(
                f"fold_div: expected an int in [2, dim={dim}] (at least one channel shifts), "
                f"got {fold_div!r}"
            )
        self.inner_dim = bottleneck_width(dim, inner_dim)
        self.fold_div = fold_div
        self.bidirectional = bool(bidirectional)
        self.down = nn.Linear(dim, self.inner_dim)
        self.act = nn.GELU()
        self.out_proj = nn.Linear(self.inner_dim, dim)
        self.reset_output()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @staticmethod
    def num_params(dim: int, *, inner_dim: Optional[int] = None, **_: object) -> int:
        """The parameter count of ``TemporalShift(dim, inner_dim=inner_dim)``, from the formula."""
        r = bottleneck_width(dim, inner_dim)
        return 2 * dim * r + 3 * dim + r

    def branch(self, h: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        shifted = temporal_shift(h, self.fold_div, self.bidirectional)
        return self.out_proj(self.act(self.down(shifted)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, inner_dim={self.inner_dim}, fold_div={self.fold_div}, "
            f"bidirectional={self.bidirectional}"
        )
