"""Short depthwise convolution along time, as in Mamba's block, for the ``(B, T, L, D)`` layout.

Causal for the forward scan (frame ``t`` sees frames ``t-W+1 .. t``) and mirrored for the
reverse scan (frame ``t`` sees ``t .. t+W-1``): the reverse path equals flipping time, applying
the causal convolution and flipping back. On CUDA it runs through causal-conv1d's
``causal_conv1d_fn`` when that package is installed, elsewhere through ``F.conv1d``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


@functools.lru_cache(maxsize=1)
def _causal_conv1d_fn() -> Optional[Callable[..., Tensor]]:
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # absent, or installed without its compiled part
        return None
    return causal_conv1d_fn


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Causal depthwise conv: ``x (batch, D, T)``, ``weight (D, W)``, ``bias (D,)``."""
    width = weight.shape[-1]
    return F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0])


def temporal_conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool = False
) -> Tensor:
    """Depthwise temporal convolution per location.

    Args:
        x: ``(B, T, L, D)``.
        weight: ``(D, W)`` taps, the last one on the current frame.
        bias: ``(D,)`` or None.
        reverse: mirror in time (for the reverse scan).

    Returns:
        ``(B, T, L, D)``.
    """
    seqs = rearrange(x, "b t l d -> (b l) d t")
    weight = weight.to(seqs.dtype)
    bias = None if bias is None else bias.to(seqs.dtype)
    fast = _causal_conv1d_fn() if x.is_cuda else None
    if fast is not None:
        out = fast(seqs.flip(-1), weight, bias).flip(-1) if reverse else fast(seqs, weight, bias)
    elif reverse:
        # Mirrored in time: pad the future side and reverse the taps, no flipped copies.
        width = weight.shape[-1]
        out = F.conv1d(
            F.pad(seqs, (0, width - 1)), weight.flip(-1).unsqueeze(1), bias, groups=weight.shape[0]
        )
    else:
        out = causal_conv1d_torch(seqs, weight, bias)
    return rearrange(out, "(b l) d t -> b t l d", b=x.shape[0])
