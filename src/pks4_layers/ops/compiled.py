"""The compiled kernels as PyTorch custom ops: fake (meta) kernels and autograd.

``csrc/motion_scan/bindings.cpp`` declares, with ``TORCH_LIBRARY(pks4, m)``::

    pks4::motion_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, reverse,
                          initial_state?) -> (y, last_state)
    pks4::motion_scan_bwd(..., grad_y, grad_last_state?) -> 9 gradients

with CPU and (in a second library) CUDA implementations. This module registers what the
dispatcher needs besides them so that ``torch.compile(fullgraph=True)`` traces through the op
and ``torch.library.opcheck`` passes: a fake kernel for each op (shapes and dtypes only), and
the autograd formula of ``motion_scan_fwd`` in terms of ``motion_scan_bwd``. The backward
returns an empty tensor for an absent optional input; it is mapped back to ``None`` here.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from . import build
from .reference import _compute_dtype

_registered = False
_lock = threading.Lock()


def _fake_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state):
    batch, _, L, Dm = u.shape
    last = u.new_empty((batch, L, Dm, A.shape[1]), dtype=_compute_dtype(u.dtype))
    return torch.empty_like(u, memory_format=torch.contiguous_format), last


def _fake_bwd(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    delta_softplus,
    reverse,
    initial_state,
    grad_y,
    grad_last_state,
):
    def like(t: Optional[Tensor]) -> Tensor:
        if t is None:
            return u.new_empty((0,))
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return (
        like(u),
        like(delta),
        like(A),
        like(B),
        like(C),
        like(D),
        like(z),
        like(delta_bias),
        like(initial_state),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
    ctx.delta_softplus = delta_softplus
    ctx.reverse = reverse


def _backward(ctx, grad_y, grad_last):
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(u)
    grads = torch.ops.pks4.motion_scan_bwd(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        ctx.delta_softplus,
        ctx.reverse,
        initial_state,
        grad_y,
        grad_last,
    )
    present = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    out = [g if t is not None else None for g, t in zip(grads, present)]
    # (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state)
    return (*out[:8], None, None, out[8])


def register() -> None:
    """Register fake kernels and autograd once the CPU library is loaded."""
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake("pks4::motion_scan_fwd")(_fake_fwd)
        torch.library.register_fake("pks4::motion_scan_bwd")(_fake_bwd)
        torch.library.register_autograd(
            "pks4::motion_scan_fwd", _backward, setup_context=_setup_context
        )
        _registered = True


def load(device_type: str) -> build.ExtensionStatus:
    """Make the compiled op usable for ``device_type`` ("cpu" or "cuda"), or say why not."""
    status = build.load("cpu")
    if status.loaded:
        register()
    if device_type == "cuda":
        status = build.load("cuda")
    return status


def motion_scan_compiled(
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
    """The compiled op, already loaded for ``u``'s device: returns ``(y, last_state)``."""
    return torch.ops.pks4.motion_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state
    )
