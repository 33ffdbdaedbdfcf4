"""The optional ``mamba`` backend: mamba-ssm's compiled ``selective_scan_fn`` on our layout.

For users who already have mamba-ssm's CUDA build, and for the benchmark's comparison. mamba-ssm
scans ``(batch, D, seqlen)`` sequences: every (batch, location) pair becomes one of its batch
entries, with ``seqlen = T``; ``reverse`` flips time around the call (copies), and an
``initial_state`` is not supported by its kernel.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

from einops import rearrange
from torch import Tensor


@functools.lru_cache(maxsize=1)
def _selective_scan_fn() -> tuple[Optional[Callable[..., object]], str]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # absent, or installed without its CUDA build
        return None, f"mamba-ssm's CUDA build is not importable ({type(exc).__name__}: {exc})"
    return selective_scan_fn, ""


def status() -> tuple[bool, str]:
    fn, reason = _selective_scan_fn()
    return fn is not None, reason


def motion_scan_mamba(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True,
    reverse: bool = False,
    initial_state: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    fn, reason = _selective_scan_fn()
    if fn is None:
        raise RuntimeError(f"backend 'mamba': {reason}")
    if not u.is_cuda:
        raise ValueError(f"backend 'mamba': expected CUDA tensors, got device {u.device}")
    if initial_state is not None:
        raise ValueError(
            "initial_state: backend 'mamba' does not support it (mamba-ssm's selective_scan_fn "
            "has no initial state); use backend 'cuda' or 'torch'"
        )
    batch = u.shape[0]

    def seq(x: Optional[Tensor], pattern: str) -> Optional[Tensor]:
        if x is None:
            return None
        x = x.flip(1) if reverse else x
        return rearrange(x, pattern).contiguous()

    y, last = fn(
        seq(u, "b t l d -> (b l) d t"),
        seq(delta, "b t l d -> (b l) d t"),
        A.float(),
        seq(B, "b t l n -> (b l) n t"),
        seq(C, "b t l n -> (b l) n t"),
        D=None if D is None else D.float(),
        z=seq(z, "b t l d -> (b l) d t"),
        delta_bias=None if delta_bias is None else delta_bias.float(),
        delta_softplus=delta_softplus,
        return_last_state=True,
    )
    y = rearrange(y, "(b l) d t -> b t l d", b=batch)
    y = y.flip(1) if reverse else y
    return y, rearrange(last, "(b l) d n -> b l d n", b=batch)
