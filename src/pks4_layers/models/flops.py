"""Parameter and FLOP report of a :class:`PKS4VideoClassifier`, split into its three parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..export import scan_backend
from .classifier import PKS4VideoClassifier

__all__ = ["ModelReport", "count_flops", "model_report"]


@dataclass
class ModelReport:
    """Parameters and forward GFLOPs of one clip, by part.

    GFLOPs are ``1e9`` FLOPs as counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix
    products, convolutions and attention, a multiply-add counting 2; element-wise operations
    (normalisation, activations, the scan's state recurrence) are not counted, in any part.
    """

    params_total: int
    params_trainable: int
    params_backbone: int
    params_temporal: int
    params_head: int
    gflops_backbone: float
    gflops_temporal: float
    gflops_head: float
    gflops_total: float
    clip_shape: Optional[tuple[int, ...]] = None
    temporal: str = ""

    def format(self) -> str:
        """An aligned table of the parts, with each part's share of the total in %."""

        def share(part: float, total: float) -> str:
            return f"{100.0 * part / total:6.2f}%" if total else "      -"

        temporal = f"temporal ({self.temporal})" if self.temporal else "temporal"
        rows = [
            ("backbone", self.params_backbone, self.gflops_backbone),
            (temporal, self.params_temporal, self.gflops_temporal),
            ("head", self.params_head, self.gflops_head),
            ("total", self.params_total, self.gflops_total),
        ]
        width = max(len(r[0]) for r in rows)
        lines = []
        if self.clip_shape is not None:
            lines.append(f"clip {tuple(self.clip_shape)}, forward of one clip")
        header = f"{'part':<{width}}  {'params':>12}  {'share':>7}  {'GFLOPs':>10}  {'share':>7}"
        lines += [header, "-" * len(header)]
        for name, params, gflops in rows:
            lines.append(
                f"{name:<{width}}  {params:>12,}  {share(params, self.params_total)}  "
                f"{gflops:>10.4f}  {share(gflops, self.gflops_total)}"
            )
        lines.append(f"{'trainable':<{width}}  {self.params_trainable:>12,}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _num_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """FLOPs of ``fn(*args, **kwargs)`` as counted by FlopCounterMode, and its result."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out


def model_report(
    model: PKS4VideoClassifier, clip_shape: tuple[int, int, int, int, int]
) -> ModelReport:
    """Parameters and forward FLOPs of ``model`` on one clip of ``clip_shape``.

    Runs one forward pass of a zero clip, in eval mode and without autograd (the model's mode is
    restored after), counting each part separately: ``model.forward_features`` (backbone),
    ``model.forward_temporal`` (temporal module) and ``model.forward_head`` (head); the pooling
    in between is a mean, which FlopCounterMode does not count. The temporal module's scans run
    on the pure-PyTorch backend for the count (the compiled kernels are invisible to
    FlopCounterMode; every backend computes the same scan).

    Args:
        model: the classifier (or a DistributedDataParallel / compiled wrapper of it).
        clip_shape: ``(1, T, C, H, W)``, one clip (the FLOPs are per clip).

    Returns:
        a :class:`ModelReport`.
    """
    # Reach the classifier inside DistributedDataParallel / DataParallel or torch.compile.
    for wrapper_attr in ("module", "_orig_mod"):
        inner = getattr(model, wrapper_attr, None)
        if isinstance(inner, PKS4VideoClassifier):
            model = inner
    if not isinstance(model, PKS4VideoClassifier):
        raise TypeError(f"model: expected a PKS4VideoClassifier, got {type(model).__name__}")
    shape = tuple(int(s) for s in clip_shape)
    if len(shape) != 5 or shape[0] != 1:
        raise ValueError(f"clip_shape: expected (1, T, C, H, W), got {tuple(clip_shape)}")
    param = next(model.parameters())
    x = torch.zeros(shape, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        # The compiled scan kernels are custom operators that FlopCounterMode does not see; the
        # PyTorch backend computes the same scan with ops it counts (the read-out C_t . h_t is a
        # matrix product), so the count does not depend on the backend a model runs on.
        with torch.no_grad(), scan_backend(model.temporal, "torch"):
            f_backbone, feats = count_flops(model.forward_features, x)
            f_temporal, feats = count_flops(model.forward_temporal, feats)
            pooled = model.pool(feats)
            f_head, _ = count_flops(model.forward_head, pooled)
    finally:
        model.train(was_training)
    p_backbone = _num_params(model.backbone)
    p_temporal = _num_params(model.temporal)
    p_head = _num_params(model.head)
    return ModelReport(
        params_total=_num_params(model),
        params_trainable=_num_params(model, trainable_only=True),
        params_backbone=p_backbone,
        params_temporal=p_temporal,
        params_head=p_head,
        gflops_backbone=f_backbone / 1e9,
        gflops_temporal=f_temporal / 1e9,
        gflops_head=f_head / 1e9,
        gflops_total=(f_backbone + f_temporal + f_head) / 1e9,
        clip_shape=shape,
        temporal=model.temporal_kind,
    )
