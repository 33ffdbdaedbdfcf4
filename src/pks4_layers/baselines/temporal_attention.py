"""``TemporalAttention`` (``temporal="attention"``): divided temporal self-attention.

Bertasius, Wang and Torresani, "Is Space-Time Attention All You Need for Video Understanding?"
(TimeSformer, ICML 2021) attend over time at each location, separately from space; Yang et al.,
"AIM: Adapting Image Models for Efficient Video Action Recognition" (ICLR 2023) do it inside a
bottleneck adapter with the image model frozen. This module is that temporal attention at the
backbone's output, in a bottleneck: every location attends over its own ``T`` frames.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .residual import ResidualTemporalModule, bottleneck_width

__all__ = ["TemporalAttention", "default_num_heads"]


def default_num_heads(width: int) -> int:
    """About 64 channels per head: the most heads, at most ``width // 64`` (at least one),
    that divide ``width``."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


class TemporalAttention(ResidualTemporalModule):
    """``x + up(attn_t(down(norm(x)) + time_embed))`` per location.

    A linear map to ``r = inner_dim`` channels, a learnt time embedding (one vector per frame
    index, zero-initialised, for up to ``max_frames`` frames), multi-head self-attention over
    the ``T`` frames of each location (``F.scaled_dot_product_attention``; a causal mask with
    ``bidirectional=False``), and a zero-initialised linear map back to ``C``. The attention's
    own output projection is folded into the up-projection (two linear maps in a row are one).

    Parameters: ``2*C`` (LayerNorm) ``+ C*r + r`` (down) ``+ max_frames*r`` (time embedding)
    ``+ 3*r*r + 3*r`` (queries, keys, values) ``+ r*C + C`` (up)
    ``= 2*C*r + 3*C + 3*r*r + r*(max_frames + 4)``.

    Args:
        dim: channels ``C``.
        inner_dim: attention width ``r`` (default ``dim // 4``, at least 1).
        num_heads: heads (must divide ``inner_dim``; default: :func:`default_num_heads`, about
            64 channels per head).
        max_frames: the longest clip the time embedding covers.
        bidirectional: every frame attends to every frame (``True``) or to frames ``<= t``.

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` -> ``(B, T, N, C)``,
        ``T <= max_frames``.
    """

    def __init__(
        self,
        dim: int,
        *,
        inner_dim: Optional[int] = None,
        num_heads: Optional[int] = None,
        max_frames: int = 64,
        bidirectional: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(dim)
        self.inner_dim = bottleneck_width(dim, inner_dim)
        heads = default_num_heads(self.inner_dim) if num_heads is None else num_heads
        if not isinstance(heads, int) or heads < 1 or self.inner_dim % heads:
            raise ValueError(
                f"num_heads: expected a positive int dividing inner_dim={self.inner_dim}, "
                f"got {num_heads!r}"
            )
        if not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"max_frames: expected a positive int, got {max_frames!r}")
        self.num_heads = heads
        self.max_frames = max_frames
        self.bidirectional = bool(bidirectional)
        self.down = nn.Linear(dim, self.inner_dim)
        self.time_embed = nn.Parameter(torch.zeros(max_frames, self.inner_dim))
        self.qkv = nn.Linear(self.inner_dim, 3 * self.inner_dim)
        self.out_proj = nn.Linear(self.inner_dim, dim)
        self.reset_output()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @staticmethod
    def num_params(
        dim: int, *, inner_dim: Optional[int] = None, max_frames: int = 64, **_: object
    ) -> int:
        """The parameter count of ``TemporalAttention(dim, ...)``, from the formula."""
        r = bottleneck_width(dim, inner_dim)
        return 2 * dim * r + 3 * dim + 3 * r * r + r * (max_frames + 4)

    def branch(self, h: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        T = h.shape[1]
        if T > self.max_frames:
            raise ValueError(
                f"x: expected at most max_frames={self.max_frames} frames, got T={T} "
                "(build the module with a larger max_frames)"
            )
        h = self.down(h) + self.time_embed[:T, None, :].to(h.dtype)
        q, k, v = rearrange(
            self.qkv(h), "b t l (three n e) -> three (b l) n t e", three=3, n=self.num_heads
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=not self.bidirectional)
        y = rearrange(y, "(b l) n t e -> b t l (n e)", b=h.shape[0])
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, inner_dim={self.inner_dim}, num_heads={self.num_heads}, "
            f"max_frames={self.max_frames}, bidirectional={self.bidirectional}"
        )
