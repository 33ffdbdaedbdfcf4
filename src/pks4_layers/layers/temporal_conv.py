"""Short depthwise convolution along time, as in Mamba's block, for the ``(B, T, L, D)`` layout.

Causal for the forward scan (frame ``t`` sees frames ``t-W+1 .. t``) and mirrored for the
reverse scan (frame ``t`` sees ``t .. t+W-1``): the reverse path equals flipping time, applying
the causal convolution and flipping back. On CUDA it runs through causal-conv1d's
``causal_conv1d_fn`` when that package is installed, elsewhere through ``F.conv1d``. Under
``torch.use_deterministic_algorithms(True)`` it always takes ``F.conv1d``: causal-conv1d's
backward sums the weight gradients with atomic adds, whose order varies between runs. So it does
under ``torch.compile``, which cannot trace into causal-conv1d (nor its import) without a graph
break.

Only the causal direction can be streamed: :func:`temporal_conv_step` carries the last ``W - 1``
inputs from one chunk to the next, which is exactly the zero padding of a whole-clip call for the
first chunk and the true past frames after it. The mirrored one needs frames not yet seen.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
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
    # causal-conv1d's kernel is opaque to torch.compile (and its import cannot be traced): a
    # compiled graph takes F.conv1d, which the compiler fuses.
    use_fast = (
        x.is_cuda
        and not torch.are_deterministic_algorithms_enabled()
        and not torch.compiler.is_compiling()
    )
    fast = _causal_conv1d_fn() if use_fast else None
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


def temporal_conv_step(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], history: Tensor
) -> tuple[Tensor, Tensor]:
    """The causal :func:`temporal_conv` on one chunk of a stream.

    Args:
        x: ``(B, T, L, D)``, the chunk (``T >= 1`` frames).
        weight: ``(D, W)`` taps, the last one on the current frame.
        bias: ``(D,)`` or None.
        history: ``(B, W - 1, L, D)``, the inputs of the ``W - 1`` frames before the chunk (zeros
            before the first frame of the stream).

    Returns:
        the output ``(B, T, L, D)``, equal to that of the same frames in a whole-clip call, and
        the history ``(B, W - 1, L, D)`` for the next chunk.
    """
    width = weight.shape[-1]
    if history.shape != (*x.shape[:1], width - 1, *x.shape[2:]):
        raise ValueError(
            f"history: expected shape {(x.shape[0], width - 1, *x.shape[2:])} (the last "
            f"{width - 1} inputs of x's layout), got {tuple(history.shape)}"
        )
    full = torch.cat([history.to(x.dtype), x], dim=1)
    seqs = rearrange(full, "b t l d -> (b l) d t")
    weight = weight.to(seqs.dtype)
    bias = None if bias is None else bias.to(seqs.dtype)
    # The history stands in for the zero padding: a valid (unpadded) convolution.
    out = F.conv1d(seqs, weight.unsqueeze(1), bias, groups=weight.shape[0])
    out = rearrange(out, "(b l) d t -> b t l d", b=x.shape[0])
    # A copy, not a view: the state must not keep the whole chunk alive.
    return out, full[:, full.shape[1] - (width - 1) :].clone()
