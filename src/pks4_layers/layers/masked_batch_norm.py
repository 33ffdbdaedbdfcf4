"""``MaskedBatchNorm``: per-channel standardisation over the data, on the entries a mask keeps.

The kinematic prior's motion cues are cosine similarities and what is computed from them: in a
small motion they differ from one clip to another by a thousandth of their common level, and
where a displacement reaches beyond the feature map the cost volume holds padding zeros. A
linear fusion trained for a few hundred steps cannot scale a thousandth up to a decision; a
standardisation of each channel over the training data can (what the suite's cost-volume probe
does). The padding zeros and the frames without a predecessor are not data: they are left out
of the statistics and stay zero, the mean of what is kept.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class MaskedBatchNorm(nn.Module):
    """Standardise each channel of channels-last ``x`` by its mean and variance over the entries
    ``mask`` keeps: over the batch in training (running averages updated as
    :class:`torch.nn.BatchNorm1d` does), by the running averages in evaluation. No affine map
    (a learnt layer follows). Statistics and arithmetic in at least float32.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.
        momentum: weight of the batch in the running averages.

    Shapes:
        ``x``: ``(..., C)``; ``mask``: bool, broadcastable to ``x``.
        output: as ``x``; zero where ``mask`` is ``False``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features: expected >= 1, got {num_features}")
        if not eps > 0:
            raise ValueError(f"eps: expected > 0, got {eps!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected in [0, 1], got {momentum!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(
                f"x: expected {self.num_features} channels in the last dimension, got shape "
                f"{tuple(x.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
        compute = torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(compute)
        keep = mask.expand_as(x)
        if self.training:
            weight = keep.to(compute).flatten(0, -2)
            values = x32.flatten(0, -2)
            count = weight.sum(0)  # (C,)
            mean = (values * weight).sum(0) / count.clamp_min(1.0)
            var = ((values - mean).square() * weight).sum(0) / count.clamp_min(1.0)
            # A channel the batch has fewer than two entries of keeps the running statistics.
            seen = count >= 2
            running_mean = self.running_mean.to(compute)
            running_var = self.running_var.to(compute)
            mean = torch.where(seen, mean, running_mean)
            var = torch.where(seen, var, running_var)
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp_min(1.0)
                m = self.momentum
                self.running_mean.copy_(
                    torch.where(seen, (1 - m) * running_mean + m * mean.detach(), running_mean)
                )
                self.running_var.copy_(
                    torch.where(seen, (1 - m) * running_var + m * unbiased.detach(), running_var)
                )
        else:
            mean = self.running_mean.to(compute)
            var = self.running_var.to(compute)
        out = (x32 - mean) * torch.rsqrt(var + self.eps)
        return torch.where(keep, out, out.new_zeros(())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
