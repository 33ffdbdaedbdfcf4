"""Recomputation of cheap intermediate results in the backward, instead of keeping them.

The block's prior encoder and each scan direction's projections are cheap next to what autograd
would keep of them (cost volumes, convolution and activation inputs, projections, one set per
direction): rerunning them in the backward from inputs that are kept anyway (the normalised
features, the scanned stream, the prior) halves what a training step of the block keeps.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch.utils.checkpoint import checkpoint

R = TypeVar("R")


def maybe_recompute(enabled: bool, fn: Callable[..., R], *args: object) -> R:
    """``fn(*args)``; when ``enabled`` and autograd records, only ``args`` are kept for the
    backward, which runs ``fn`` again. Under ``torch.compile`` / ``torch.export`` the compiler's
    own partitioner decides what to recompute, so ``fn`` is traced as it is."""
    if enabled and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
