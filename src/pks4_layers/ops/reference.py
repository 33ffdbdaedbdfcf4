"""``motion_scan_ref``: the oracle every other implementation is tested against.

A plain loop over time with autograd doing the backward. It materialises nothing clever, keeps
every intermediate, and computes in float32 (or float64 when the inputs are float64), so that
each line can be read against the math in :mod:`pks4_layers.ops.motion_scan`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are scanned in float32; float64 stays float64 for gradcheck.
    return torch.float64 if dtype == torch.float64 else torch.float32


def motion_scan_ref(
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
    return_last_state: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Reference motion-gated selective scan (see :func:`pks4_layers.ops.motion_scan`).

    Shapes: ``u, delta, z``: ``(batch, T, L, D)``; ``A``: ``(D, N)``;
    ``B, C``: ``(batch, T, L, N)``; ``D, delta_bias``: ``(D,)``;
    ``initial_state`` and the returned last state: ``(batch, L, D, N)``.
    Returns ``y`` with ``u``'s shape and dtype, and the last state in the compute dtype
    (float32, or float64 for float64 inputs) when ``return_last_state``.

    No input validation: call it through :func:`pks4_layers.ops.motion_scan` with ``backend="ref"``
    for checked arguments.
    """
    ct = _compute_dtype(u.dtype)
    u_c, delta_c = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(ct)
    dt = F.softplus(delta_c) if delta_softplus else delta_c  # (b, T, L, D)
    A_c, B_c, C_c = A.to(ct), B.to(ct), C.to(ct)

    batch, T, L, Dm = u.shape
    N = A.shape[1]
    h = initial_state.to(ct) if initial_state is not None else u_c.new_zeros(batch, L, Dm, N)
    ys: list[Optional[Tensor]] = [None] * T
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        dt_t = dt[:, t]  # (b, L, D)
        decay = torch.exp(dt_t.unsqueeze(-1) * A_c)  # (b, L, D, N)
        write = (dt_t * u_c[:, t]).unsqueeze(-1) * B_c[:, t].unsqueeze(-2)  # (b, L, D, N)
        h = decay * h + write
        ys[t] = (h * C_c[:, t].unsqueeze(-2)).sum(-1)  # (b, L, D)
    y = torch.stack(ys, dim=1)  # type: ignore[arg-type]
    if D is not None:
        y = y + u_c * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y
