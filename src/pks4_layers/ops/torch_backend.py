"""The ``torch`` backend: the scan in PyTorch ops with a hand-written, memory-lean backward.

Autograd through :func:`motion_scan_ref` keeps every per-step state, ``(batch, T, L, D, N)`` in
all, alive until the backward runs. This backend saves only its inputs (``O(batch*T*L*D)``) and
recomputes the states inside the backward, in segments of about ``sqrt(T)`` steps: a first pass
stores the state at the start of each segment, then each segment, last to first, is replayed
forward and walked backward. The backward's working set is ``O(sqrt(T))`` states of shape
``(batch, L, D, N)`` and it never divides by ``exp(dt * A)`` (running the recurrence backwards
through a division is unstable once the decay underflows).

Runs on every device torch runs on; all arithmetic is in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _compute_dtype


def _segment_length(T: int) -> int:
    return max(1, math.isqrt(max(T - 1, 0)) + 1)


def _scan_order(T: int, reverse: bool) -> list[int]:
    return list(range(T - 1, -1, -1)) if reverse else list(range(T))


class _MotionScanFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        z: Optional[Tensor],
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        reverse: bool,
        initial_state: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        ct = _compute_dtype(u.dtype)
        _, dt = _discretise(delta, delta_bias, delta_softplus, ct)
        u_c = u.to(ct)
        A_c, B_c, C_c = A.to(ct), B.to(ct), C.to(ct)
        T = u.shape[1]
        h = _initial(initial_state, u_c, A.shape[1])

        y = torch.empty_like(u_c)
        # Step t is X.select(1, t), the same view as X[:, t]: under torch 2.5's export the slice
        # ":" of the batch dimension adds a guard that an unbounded dynamic batch violates.
        for t in _scan_order(T, reverse):
            h = _step(h, dt.select(1, t), u_c.select(1, t), A_c, B_c.select(1, t))
            y.select(1, t).copy_(_read(h, C_c.select(1, t)))
        if D is not None:
            y = y + u_c * D.to(ct)
        if z is not None:
            y = y * F.silu(z.to(ct))

        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.delta_softplus = delta_softplus
        ctx.reverse = reverse
        ctx.set_materialize_grads(False)
        return y.to(u.dtype), h

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_last: Optional[Tensor]):
        u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
        ct = _compute_dtype(u.dtype)
        T, N = u.shape[1], A.shape[1]

        pre, dt = _discretise(delta, delta_bias, ctx.delta_softplus, ct)
        u_c = u.to(ct)
        A_c, B_c, C_c = A.to(ct), B.to(ct), C.to(ct)
        D_c = D.to(ct) if D is not None else None

        gy = grad_y.to(ct) if grad_y is not None else torch.zeros_like(u_c)
        if z is not None:
            z_c = z.to(ct)
            sig_z = torch.sigmoid(z_c)
            gate = z_c * sig_z
            gy_ssm = gy * gate  # gradient reaching the un-gated output
        else:
            gy_ssm = gy

        grad_u = gy_ssm * D_c if D_c is not None else torch.zeros_like(u_c)
        grad_dt = torch.zeros_like(dt)
        grad_B = torch.zeros_like(B_c)
        grad_C = torch.zeros_like(C_c)
        # The gated output needs the un-gated scan output, which the replay below rebuilds.
        y_ssm = torch.empty_like(u_c) if z is not None else None

        order = _scan_order(T, ctx.reverse)
        K = _segment_length(T)
        h = _initial(initial_state, u_c, N)
        checkpoints = []
        for p, t in enumerate(order):
            if p % K == 0:
                checkpoints.append(h)
            h = _step(h, dt.select(1, t), u_c.select(1, t), A_c, B_c.select(1, t))

        gh = grad_last.to(ct).clone() if grad_last is not None else torch.zeros_like(h)
        # sum over steps of d loss / d (dt_t * A) * dt_t, reduced over (batch, L) once at the end
        grad_A_acc = torch.zeros_like(gh)
        for s in range(len(checkpoints) - 1, -1, -1):
            # Scan positions first..first+n-1. Plain ints, no range object indexed: torch 2.4's
            # Dynamo (tracing this backward in torch.export) indexes a range wrongly.
            first, n = s * K, min(T, (s + 1) * K) - s * K
            states, decays = [checkpoints[s]], []
            for p in range(first, first + n):
                t = order[p]
                dt_t, u_t = dt.select(1, t), u_c.select(1, t)
                decays.append(_decay(dt_t, A_c))
                states.append(_update(states[-1], decays[-1], dt_t, u_t, B_c.select(1, t)))
            for i in range(n - 1, -1, -1):
                t = order[first + i]
                h_prev, h_t, decay = states[i], states[i + 1], decays[i]
                dt_t, u_t, gy_t = dt.select(1, t), u_c.select(1, t), gy_ssm.select(1, t)
                if y_ssm is not None:
                    y_ssm.select(1, t).copy_(_read(h_t, C_c.select(1, t)))
                # y_t = <C_t, h_t>: the read adds to the state's gradient.
                grad_C.select(1, t).copy_(torch.matmul(gy_t.unsqueeze(-2), h_t).squeeze(-2))
                gh.addcmul_(gy_t.unsqueeze(-1), C_c.select(1, t).unsqueeze(-2))
                # h_t = exp(dt_t A) h_prev + dt_t u_t B_t
                g_log_decay = h_prev.mul(decay).mul_(gh)  # d loss / d (dt_t * A)
                grad_A_acc.addcmul_(g_log_decay, dt_t.unsqueeze(-1))
                g_write = _read(gh, B_c.select(1, t))  # d loss / d (dt_t u_t)
                grad_B.select(1, t).copy_(torch.matmul((dt_t * u_t).unsqueeze(-2), gh).squeeze(-2))
                grad_dt.select(1, t).copy_(g_log_decay.mul_(A_c).sum(-1).addcmul_(g_write, u_t))
                grad_u.select(1, t).add_(g_write * dt_t)
                gh.mul_(decay)
            del states, decays
        grad_A = grad_A_acc.sum(dim=(0, 1))

        if ctx.delta_softplus:
            # F.softplus is the identity above its threshold (20): its slope there is exactly 1.
            slope = torch.where(pre > 20.0, torch.ones_like(pre), torch.sigmoid(pre))
            grad_delta = grad_dt * slope
        else:
            grad_delta = grad_dt
        grad_D = grad_z = grad_bias = grad_init = None
        if D is not None and ctx.needs_input_grad[5]:
            grad_D = (gy_ssm * u_c).sum(dim=(0, 1, 2))
        if z is not None and ctx.needs_input_grad[6]:
            y_skip = y_ssm + u_c * D_c if D_c is not None else y_ssm
            dsilu = sig_z * (1.0 + z_c * (1.0 - sig_z))
            grad_z = (gy * y_skip * dsilu).to(z.dtype)
        if delta_bias is not None and ctx.needs_input_grad[7]:
            grad_bias = grad_delta.sum(dim=(0, 1, 2)).to(delta_bias.dtype)
        if initial_state is not None and ctx.needs_input_grad[10]:
            grad_init = gh.to(initial_state.dtype)

        def cast(g: Tensor, like: Tensor, idx: int) -> Optional[Tensor]:
            return g.to(like.dtype) if ctx.needs_input_grad[idx] else None

        return (
            cast(grad_u, u, 0),
            cast(grad_delta, delta, 1),
            cast(grad_A, A, 2),
            cast(grad_B, B, 3),
            cast(grad_C, C, 4),
            grad_D.to(D.dtype) if grad_D is not None else None,
            grad_z,
            grad_bias,
            None,
            None,
            grad_init,
        )


def _discretise(
    delta: Tensor, delta_bias: Optional[Tensor], softplus: bool, ct: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Returns ``(pre, dt)``: the biased ``delta`` and the step size ``dt`` derived from it."""
    pre = delta.to(ct)
    if delta_bias is not None:
        pre = pre + delta_bias.to(ct)
    return pre, (F.softplus(pre) if softplus else pre)


def _initial(initial_state: Optional[Tensor], u_c: Tensor, N: int) -> Tensor:
    if initial_state is not None:
        return initial_state.to(u_c.dtype)
    batch, _, L, Dm = u_c.shape
    return u_c.new_zeros(batch, L, Dm, N)


def _decay(dt_t: Tensor, A: Tensor) -> Tensor:
    """``exp(dt A)``: ``(b, L, D), (D, N) -> (b, L, D, N)``."""
    return torch.mul(dt_t.unsqueeze(-1), A).exp_()


def _update(h: Tensor, decay: Tensor, dt_t: Tensor, u_t: Tensor, B_t: Tensor) -> Tensor:
    """``decay * h + dt u B``, a new tensor (``h`` may be kept by the caller)."""
    return torch.mul(decay, h).addcmul_((dt_t * u_t).unsqueeze(-1), B_t.unsqueeze(-2))


def _step(h: Tensor, dt_t: Tensor, u_t: Tensor, A: Tensor, B_t: Tensor) -> Tensor:
    """One state update: ``h <- exp(dt A) h + dt u B`` for every (batch, location, channel)."""
    return _update(h, _decay(dt_t, A), dt_t, u_t, B_t)


def _read(h: Tensor, C_t: Tensor) -> Tensor:
    """Read-out ``y = <C, h>`` over the states: ``(b, L, D, N), (b, L, N) -> (b, L, D)``."""
    return torch.matmul(h, C_t.unsqueeze(-1)).squeeze(-1)


def motion_scan_torch(
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
    """Unchecked entry to the ``torch`` backend: returns ``(y, last_state)``."""
    return _MotionScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state
    )
