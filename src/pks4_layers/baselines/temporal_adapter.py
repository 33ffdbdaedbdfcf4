"""``TemporalAdapter`` (``temporal="adapter"``): a bottleneck adapter with a temporal convolution.

Pan et al., "ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning" (NeurIPS 2022):
down-projection, a depthwise convolution over time, up-projection, added to the features;
UniFormerV2's local temporal module is the same idea. ST-Adapter's branch has no activation,
which works inside a ViT, where the following blocks are non-linear. Here the adapter sits at
the backbone's output, right before the frames are averaged: a linear branch there is a
time-invariant linear filter whose average over frames is (up to the clip's two ends) a scaled
average of its input, so it could tell the order of the frames only from the ends. The default
therefore puts a GELU after the convolution (``activation="gelu"``); ``activation="none"`` is
ST-Adapter's exact branch.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .residual import ResidualTemporalModule, bottleneck_width

__all__ = ["ADAPTER_ACTIVATIONS", "TemporalAdapter", "depthwise_time_conv"]

ADAPTER_ACTIVATIONS = ("gelu", "none")


def depthwise_time_conv(x: Tensor, conv: nn.Conv1d, causal: bool) -> Tensor:
    """``conv`` (depthwise, no padding of its own) along ``T`` of tokens ``(B, T, L, D)``.

    Zero padding: centred (``k // 2`` frames each side) or causal (``k - 1`` past frames).
    """
    k = conv.kernel_size[0]
    seqs = rearrange(x, "b t l d -> (b l) d t")
    seqs = F.pad(seqs, (k - 1, 0) if causal else (k // 2, k // 2))
    return rearrange(conv(seqs), "(b l) d t -> b t l d", b=x.shape[0])


class TemporalAdapter(ResidualTemporalModule):
    """``x + up(act(dwconv_t(down(norm(x)))))``: ST-Adapter's branch at every location.

    A linear map to ``r = inner_dim`` channels, a depthwise convolution over time only
    (``kernel_size`` frames, the same location, zero padded: centred, or over the past with
    ``bidirectional=False``), GELU (see the module's docstring for why) and a zero-initialised
    linear map back to ``C``.

    Parameters: ``2*C`` (LayerNorm) ``+ C*r + r`` (down) ``+ r*k + r`` (depthwise conv)
    ``+ r*C + C`` (up) ``= 2*C*r + 3*C + r*(k + 2)`` with ``C = dim``, ``k = kernel_size``.

    Args:
        dim: channels ``C``.
        inner_dim: bottleneck width ``r`` (default ``dim // 4``, at least 1).
        kernel_size: frames the convolution spans (odd).
        activation: ``"gelu"`` after the convolution, or ``"none"`` (ST-Adapter's branch).
        bidirectional: centred convolution (``True``) or causal (frames ``<= t``).

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` -> ``(B, T, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        inner_dim: Optional[int] = None,
        kernel_size: int = 3,
        activation: Literal["gelu", "none"] = "gelu",
        bidirectional: bool = True,
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
        self.conv = nn.Conv1d(self.inner_dim, self.inner_dim, kernel_size, groups=self.inner_dim)
        self.act = nn.GELU() if activation == "gelu" else nn.Identity()
        self.out_proj = nn.Linear(self.inner_dim, dim)
        self.reset_output()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @staticmethod
    def num_params(
        dim: int, *, inner_dim: Optional[int] = None, kernel_size: int = 3, **_: object
    ) -> int:
        """The parameter count of ``TemporalAdapter(dim, ...)``, from the formula."""
        r = bottleneck_width(dim, inner_dim)
        return 2 * dim * r + 3 * dim + r * (kernel_size + 2)

    def branch(self, h: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        h = depthwise_time_conv(self.down(h), self.conv, causal=not self.bidirectional)
        return self.out_proj(self.act(h))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, inner_dim={self.inner_dim}, kernel_size={self.kernel_size}, "
            f"activation={self.activation!r}, bidirectional={self.bidirectional}"
        )
