"""``MaskedBatchNorm``: per-channel standardisation over the data, on the entries a mask keeps.

The kinematic prior's motion cues are cosine similarities and what is computed from them: in a
small motion they differ from one clip to another by a thousandth of their common level, and
where a displacement reaches beyond the feature map the cost volume holds padding zeros. A
linear fusion trained for a few hundred steps cannot scale a thousandth up to a decision; a
standardisation of each channel over the training data can (what the suite's cost-volume probe
does). The padding zeros and the frames without a predecessor are not data: they are left out
of the statistics and stay zero, the mean of what is kept.

Under data parallelism each process sees its share of the batch:
:func:`convert_sync_masked_batch_norm` makes every ``MaskedBatchNorm`` of a model compute its
statistics over all processes' entries (as :class:`torch.nn.SyncBatchNorm` does for
BatchNorm), so that N processes with B clips each standardise as one process with N * B clips
would.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["MaskedBatchNorm", "convert_sync_masked_batch_norm"]


class MaskedBatchNorm(nn.Module):
    """Standardise each channel of channels-last ``x`` by its mean and variance over the entries
    ``mask`` keeps: over the batch in training (running averages updated as
    :class:`torch.nn.BatchNorm1d` does), by the running averages in evaluation. No affine map
    (a learnt layer follows). Statistics and arithmetic in at least float32.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.
        momentum: weight of the batch in the running averages.
        sync: in training, sum the statistics' counts, sums and squared deviations over the
            processes of ``process_group`` (every process must call forward the same number of
            times, as with :class:`torch.nn.SyncBatchNorm`); without an initialised process
            group it computes them locally. Set by :func:`convert_sync_masked_batch_norm`.
        process_group: the processes to synchronise (``None``: the default group).

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
        sync: bool = False,
        process_group: Optional[Any] = None,
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
        self.sync = bool(sync)
        self.process_group = process_group
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
            synced = self._synced()
            # Two passes (the mean first, then the squared deviations from it): exact sums
            # across processes without the cancellation of a sum of squares.
            count_sum = torch.stack([weight.sum(0), (values * weight).sum(0)])  # (2, C)
            if synced:
                count_sum = _all_reduce_sum(count_sum, self.process_group)
            count, total = count_sum.unbind(0)
            mean = total / count.clamp_min(1.0)
            sq_dev = ((values - mean).square() * weight).sum(0)
            if synced:
                sq_dev = _all_reduce_sum(sq_dev, self.process_group)
            var = sq_dev / count.clamp_min(1.0)
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

    def _synced(self) -> bool:
        """Whether this call sums its statistics across processes."""
        return (
            self.sync
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def extra_repr(self) -> str:
        sync = ", sync=True" if self.sync else ""
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}{sync}"


def _all_reduce_sum(x: Tensor, group: Optional[Any]) -> Tensor:
    """The sum of ``x`` over the processes of ``group``, differentiable: the gradient of each
    process's input is the sum of the processes' gradients of the result (what the
    statistics' every consumer contributes)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(
        x, op=dist.ReduceOp.SUM, group=group if group is not None else dist.group.WORLD
    )


def convert_sync_masked_batch_norm(
    module: nn.Module, process_group: Optional[Any] = None
) -> nn.Module:
    """Make every :class:`MaskedBatchNorm` in ``module`` compute its training statistics over
    the processes of ``process_group`` (``None``: the default group) and return ``module``
    (changed in place). Call it before wrapping the model in
    :class:`~torch.nn.parallel.DistributedDataParallel`; ``pks4-train`` does when it runs on
    more than one process."""
    for m in module.modules():
        if isinstance(m, MaskedBatchNorm):
            m.sync = True
            m.process_group = process_group
    return module
