"""Temporal modules between a per-frame backbone and the classifier head.

All take the :class:`~pks4_layers.PKS4Block` calling convention,
``forward(x, grid=None, num_prefix_tokens=0)`` with ``x`` ``(B, T, C, H, W)`` maps or
``(B, T, N, C)`` tokens, and return ``x``'s shape; all are the identity when created, so that
swapping one for another changes nothing at step 0:

* ``"pks4"``: :class:`~pks4_layers.PKS4Block`;
* ``"mean"``: :class:`TemporalIdentity`, no temporal modelling (the head averages frames);
* ``"tconv"``: :class:`TemporalConvBlock`, a residual depthwise-separable convolution over
  time, the cheap baseline;
* the peers users would insert instead (:mod:`pks4_layers.baselines`): ``"frame_mlp"`` (no
  temporal mixing, the control for parameters), ``"tsm"`` (temporal shift), ``"adapter"``
  (ST-Adapter), ``"attention"`` (divided temporal attention), ``"scan"`` (PKS4Block without
  its prior), ``"prior_adapter"`` (the prior without the scan), ``"st_scan"`` (VideoMamba's one
  scan over all ``T * H * W`` tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from ..baselines import (
    FrameMLP,
    PriorAdapter,
    SelectiveScanBlock,
    SpatiotemporalScan,
    TemporalAdapter,
    TemporalAttention,
    TemporalShift,
)
from ..baselines.temporal_attention import default_num_heads
from ..layers import PKS4Block
from ..layers.weight_decay import no_weight_decay_names

__all__ = [
    "PEER_KINDS",
    "TEMPORAL_KINDS",
    "TemporalConvBlock",
    "TemporalIdentity",
    "create_temporal",
    "inner_dim_for_params",
    "temporal_num_params",
]

# The peers of pks4_layers.baselines, by the name the classifier, the CLI and the suite use.
PEERS: dict[str, type[nn.Module]] = {
    "frame_mlp": FrameMLP,
    "tsm": TemporalShift,
    "adapter": TemporalAdapter,
    "attention": TemporalAttention,
    "scan": SelectiveScanBlock,
    "prior_adapter": PriorAdapter,
    "st_scan": SpatiotemporalScan,
}
PEER_KINDS = tuple(PEERS)
TEMPORAL_KINDS = ("pks4", "mean", "tconv", *PEER_KINDS)


def _check_features(x: object, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not (x.dim() == 5 and x.shape[2] == dim) and not (x.dim() == 4 and x.shape[-1] == dim):
        raise ValueError(
            f"x: expected (B, T, {dim}, H, W) maps or (B, T, N, {dim}) tokens, got {tuple(x.shape)}"
        )


class TemporalIdentity(nn.Module):
    """No temporal modelling: returns its input (the frame-average baseline).

    Shapes: ``(B, T, C, H, W)`` or ``(B, T, N, C)`` -> the same tensor.
    """

    def __init__(
        self,
        dim: int,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(
        self, x: Tensor, grid: Optional[tuple[int, int]] = None, num_prefix_tokens: int = 0
    ) -> Tensor:
        _check_features(x, self.dim)
        return x


class TemporalConvBlock(nn.Module):
    """Residual depthwise-separable convolution over time at every location.

    ``x + pointwise(act(depthwise_t(norm(x))))``: a LayerNorm over channels, a depthwise
    ``kernel_size``-tap convolution along ``T`` (centred, zero padded, so it sees past and future
    frames like the bidirectional PKS4 scan), GELU, and a ``C x C`` pointwise projection that
    starts at zero, so the block is the identity when created. Every location (prefix tokens
    included) is an independent sequence; about ``C * (C + kernel_size + 4)`` parameters.

    Args:
        dim: channels ``C``.
        kernel_size: taps along time (odd).

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` -> ``(B, T, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int = 3,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected a positive odd int, got {kernel_size}")
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.pwconv = nn.Linear(dim, dim)
        self.reset_output()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay: biases and norms."""
        return no_weight_decay_names(self)

    def reset_output(self) -> None:
        """Zero the output projection: the block becomes the identity."""
        nn.init.zeros_(self.pwconv.weight)
        nn.init.zeros_(self.pwconv.bias)

    def forward(
        self, x: Tensor, grid: Optional[tuple[int, int]] = None, num_prefix_tokens: int = 0
    ) -> Tensor:
        _check_features(x, self.dim)
        if x.dim() == 5:
            H, W = x.shape[-2:]
            out = self._forward_tokens(rearrange(x, "b t c h w -> b t (h w) c"))
            return rearrange(out, "b t (h w) c -> b t c h w", h=H, w=W)
        return self._forward_tokens(x)

    def _forward_tokens(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        h = rearrange(self.norm(x), "b t l c -> (b l) c t")
        h = rearrange(self.dwconv(h), "(b l) c t -> b t l c", b=B)
        return x + self.pwconv(self.act(h))


def create_temporal(kind: str, dim: int, **kwargs) -> nn.Module:
    """The temporal module ``kind`` (one of :data:`TEMPORAL_KINDS`) for ``dim`` channels.

    ``kwargs`` go to its constructor: :class:`~pks4_layers.PKS4Block`'s arguments for
    ``"pks4"``, ``kernel_size`` for ``"tconv"``, none for ``"mean"``, the peer's for the kinds
    of :mod:`pks4_layers.baselines` (``inner_dim``, ``bidirectional`` and their own).
    """
    if kind == "pks4":
        return PKS4Block(dim, **kwargs)
    if kind == "tconv":
        return TemporalConvBlock(dim, **kwargs)
    if kind == "mean":
        if kwargs:
            raise ValueError(f"block_kwargs: expected none for temporal='mean', got {kwargs}")
        return TemporalIdentity(dim)
    if kind in PEERS:
        return PEERS[kind](dim, **kwargs)
    raise ValueError(f"temporal: expected one of {list(TEMPORAL_KINDS)}, got {kind!r}")


def temporal_num_params(kind: str, dim: int, **kwargs) -> int:
    """Parameters of ``create_temporal(kind, dim, **kwargs)``: the peers' formula, or a count
    of a module built for the purpose (``"pks4"``, ``"tconv"``, ``"mean"``)."""
    if kind in PEERS:
        return PEERS[kind].num_params(dim, **kwargs)
    return sum(p.numel() for p in create_temporal(kind, dim, **kwargs).parameters())


def inner_dim_for_params(kind: str, dim: int, params: int, **kwargs) -> int:
    """The ``inner_dim`` whose module ``kind`` has the parameter count closest to ``params``.

    Sizes a peer to the same budget as another module (the motion suite matches every peer to
    PKS4's parameters at its width). Counts grow with ``inner_dim``, so a bisection finds it.
    For ``"attention"`` without ``num_heads``, among the widths within 2% of the closest count
    the one with the most heads of its default (about 64 channels each) wins: a width the
    heads do not divide would otherwise fall back to few wide heads.
    """
    if kind not in PEERS:
        raise ValueError(f"kind: expected one of {list(PEER_KINDS)}, got {kind!r}")
    if not isinstance(params, int) or params < 1:
        raise ValueError(f"params: expected a positive int, got {params!r}")

    def count(width: int) -> int:
        return PEERS[kind].num_params(dim, inner_dim=width, **kwargs)

    low, high = 1, 1
    while count(high) < params:
        low, high = high, 2 * high
        if high > 1 << 20:
            raise ValueError(f"params: {params} is beyond any inner_dim of {kind!r} at dim={dim}")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < params else (low, mid)
    best = min((low, high), key=lambda w: abs(count(w) - params))
    if kind == "attention" and "num_heads" not in kwargs:
        near = [
            w
            for w in range(max(1, best - 32), best + 33)
            if abs(count(w) - params) <= abs(count(best) - params) + 0.02 * params
        ]
        best = max(near, key=lambda w: (default_num_heads(w), -abs(count(w) - params)))
    return best
