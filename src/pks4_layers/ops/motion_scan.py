"""``motion_scan``: the motion-gated selective scan, one math behind several implementations.

For every batch element ``b``, spatial location ``l`` and channel ``d`` an independent
sequence of length ``T`` is scanned with an ``N``-dimensional diagonal state::

    dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias without softplus)
    h_t  = exp(dt_t * A[d, :]) * h_{t-1} + dt_t * B_t[:] * u_t
    y_t  = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t  = y_t * silu(z_t)                         (when z is given)

``h_{-1}`` is ``initial_state`` (zeros by default). With ``reverse=True`` the scan runs from
``t = T-1`` down to ``0``. ``B_t`` and ``C_t`` are shared by all channels of a location: in a
PKS4 block they come from the kinematic prior of that location and frame (write and read), and
``delta`` (the update speed) does too.

The layout ``(batch, T, L, D)`` is that of a video feature map flattened over space, so a
backbone's output reaches the kernel without a transpose. The state is always kept in float32
(float64 for float64 inputs), whatever the input dtype.

Backends:

``"torch"``
    PyTorch ops with a hand-written backward that recomputes the states instead of storing
    them (:mod:`pks4_layers.ops.torch_backend`). Any device.
``"ref"``
    :func:`pks4_layers.ops.motion_scan_ref`, the oracle: a plain loop, autograd backward.
``"cpu"``, ``"cuda"``
    the compiled kernels of ``csrc/motion_scan`` registered as the custom op
    ``pks4::motion_scan_fwd`` (:mod:`pks4_layers.ops.compiled`); built on first use when the
    package was installed without them. float64 runs on ``"cpu"`` but not on ``"cuda"``.
``"mamba"``
    mamba-ssm's ``selective_scan_fn`` when its CUDA build is installed (no ``initial_state``).
``"auto"``
    the compiled kernel for the inputs' device, or ``"torch"`` with one warning saying why
    the kernel is unavailable (float64, or N > 64, on CUDA goes to ``"torch"`` silently); the
    environment variable ``PKS4_BACKEND`` (``torch``, ``cpu``, ``cuda``, ``mamba``, ``ref``)
    forces one.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Literal, Optional, Union

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import compiled, mamba_backend
from .reference import motion_scan_ref
from .torch_backend import motion_scan_torch

BACKEND_ENV_VAR = "PKS4_BACKEND"
KNOWN_BACKENDS = ("cpu", "cuda", "mamba", "ref", "torch")
# The backend names a call may ask for (the type of every ``backend`` argument).
ScanBackend = Literal["auto", "cpu", "cuda", "mamba", "ref", "torch"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _ref_backend(*args, **kwargs) -> tuple[Tensor, Tensor]:
    return motion_scan_ref(*args, **kwargs, return_last_state=True)


# name -> callable(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state)
# returning (y, last_state).
_BACKENDS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "torch": motion_scan_torch,
    "ref": _ref_backend,
    "cpu": compiled.motion_scan_compiled,
    "cuda": compiled.motion_scan_compiled,
    "mamba": mamba_backend.motion_scan_mamba,
}

# name -> (usable, reason); filled on first use so that a traced model only reads a dict.
_status: dict[str, tuple[bool, str]] = {}
_warned: set[str] = set()


# Under torch.compile these two run eagerly at trace time and their results become constants:
# loading (or building) an extension cannot be traced, and need not be.
@torch.compiler.assume_constant_result
def backend_status(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run here, and why not (the compiled ones build on first use)."""
    if name not in _status:
        if name in ("ref", "torch"):
            _status[name] = (True, "")
        elif name in ("cpu", "cuda"):
            ext = compiled.load(name)
            _status[name] = (ext.loaded, ext.reason)
        elif name == "mamba":
            _status[name] = mamba_backend.status()
        else:
            raise ValueError(f"backend: expected one of {list(KNOWN_BACKENDS)}, got {name!r}")
    return _status[name]


def available_backends() -> list[str]:
    """The backends that can run on this machine (``"auto"`` picks among them)."""
    return [name for name in KNOWN_BACKENDS if backend_status(name)[0]]


@torch.compiler.assume_constant_result
def _fallback(name: str) -> str:
    """The ``torch`` backend in place of an unavailable compiled one, said once."""
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"pks4_layers: the compiled '{name}' backend is unavailable "
            f"({backend_status(name)[1]}); using the 'torch' backend instead",
            RuntimeWarning,
            stacklevel=4,  # the caller of motion_scan
        )
    return "torch"


# The CUDA kernel keeps the N states of a sequence in registers, for N up to this.
CUDA_MAX_STATE = 64
# Its grid: one block per (batch, location) row in x (at most 2^31 - 1), blocks of 128 channels
# in y (at most 65535 of them). Any number of threads in total: every index is 64-bit.
CUDA_MAX_ROWS = 2**31 - 1
CUDA_MAX_DIM = 65535 * 128


def cuda_launch_limit(shape: tuple[int, ...]) -> Optional[str]:
    """Why a ``(batch, T, L, D)`` problem does not fit one launch of the CUDA kernel, or None."""
    batch, _, L, D = shape
    if batch * L > CUDA_MAX_ROWS:
        return f"batch * L <= {CUDA_MAX_ROWS} (one CUDA block per row), got {batch * L}"
    if D > CUDA_MAX_DIM:
        return f"D <= {CUDA_MAX_DIM} (65535 CUDA blocks of 128 channels), got D={D}"
    return None


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, dstate: int = 16
) -> str:
    """The concrete backend that ``backend`` stands for with inputs on ``device`` of ``dtype``
    and a state of size ``dstate``."""
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV_VAR, "").strip()
        if forced:
            if forced not in KNOWN_BACKENDS:
                raise ValueError(
                    f"{BACKEND_ENV_VAR}: expected one of {list(KNOWN_BACKENDS)}, got {forced!r}"
                )
            backend = forced
        elif device.type == "cpu":
            return "cpu" if backend_status("cpu")[0] else _fallback("cpu")
        elif device.type == "cuda" and dtype != torch.float64 and dstate <= CUDA_MAX_STATE:
            return "cuda" if backend_status("cuda")[0] else _fallback("cuda")
        else:
            return "torch"
    if backend not in KNOWN_BACKENDS:
        raise ValueError(
            f"backend: expected 'auto' or one of {list(KNOWN_BACKENDS)}, got {backend!r}"
        )
    if backend in ("cpu", "cuda", "mamba"):
        wanted = "cpu" if backend == "cpu" else "cuda"
        if device.type != wanted:
            raise ValueError(
                f"u: backend {backend!r} expected {wanted.upper()} tensors, got device {device}"
            )
        if backend != "cpu" and dtype == torch.float64:
            raise ValueError(
                f"u: backend {backend!r} expected float16, bfloat16 or float32, got {dtype} "
                "(float64 runs on the 'torch' and 'ref' backends)"
            )
        if backend == "cuda" and dstate > CUDA_MAX_STATE:
            raise ValueError(
                f"A: backend 'cuda' expected a state size N <= {CUDA_MAX_STATE}, got N={dstate} "
                "(larger states run on the 'torch' backend)"
            )
        usable, reason = backend_status(backend)
        if not usable:
            raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    return backend


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t: object, shape: tuple, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of u), got {t.device}")
    return t


def _validate(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial_state: Optional[Tensor],
    delta_softplus: bool = True,
    reverse: bool = False,
    check_decay: bool = True,
) -> None:
    if not isinstance(u, Tensor):
        raise TypeError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    if u.dim() != 4:
        raise ValueError(f"u: expected 4 dims (batch, T, L, D), got {_describe(u)}")
    batch, T, L, Dm = u.shape
    if T < 1:
        raise ValueError(f"u: expected at least one time step (T >= 1), got {_describe(u)}")
    if not isinstance(A, Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2 or A.shape[0] != Dm or A.shape[1] < 1:
        raise ValueError(f"A: expected shape (D={Dm}, N) with N >= 1, got {_describe(A)}")
    N = A.shape[1]
    dev = u.device
    _check_tensor("u", u, (batch, T, L, Dm), dev)
    _check_tensor("delta", delta, (batch, T, L, Dm), dev)
    _check_tensor("A", A, (Dm, N), dev)
    _check_tensor("B", B, (batch, T, L, N), dev)
    _check_tensor("C", C, (batch, T, L, N), dev)
    if D is not None:
        _check_tensor("D", D, (Dm,), dev)
    if z is not None:
        _check_tensor("z", z, (batch, T, L, Dm), dev)
    if delta_bias is not None:
        _check_tensor("delta_bias", delta_bias, (Dm,), dev)
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, (batch, L, Dm, N), dev)
    # Activations share one dtype; B and C may stay in float32 under mixed precision.
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            raise ValueError(f"{name}: expected dtype {u.dtype} (that of u), got {t.dtype}")
    if C.dtype != B.dtype:
        raise ValueError(f"C: expected dtype {B.dtype} (that of B), got {C.dtype}")
    if B.dtype not in (u.dtype, torch.float32):
        raise ValueError(f"B: expected dtype {u.dtype} (that of u) or torch.float32, got {B.dtype}")
    for name, flag in (("delta_softplus", delta_softplus), ("reverse", reverse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if check_decay:
        _check_decay(A)


def _holds_values(t: Tensor) -> bool:
    """Whether ``t``'s values can be read: not while tracing, not for meta or fake tensors, not
    inside a functorch transform (vmap), where reading a value is an error."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or isinstance(t, FakeTensor):
        return False
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (is_wrapped is not None and is_wrapped(t))


def _check_decay(A: Tensor) -> None:
    """``A`` holds decay rates: a positive entry makes the state grow as ``exp(dt * A)`` at every
    step and overflows long scans, so it is refused here, at the public boundary.

    One reduction over the ``D * N`` entries (and, on a GPU, one synchronisation); skipped where
    the values cannot be read (see :func:`_holds_values`): under ``torch.compile`` the check runs
    in eager mode only. NaN entries pass (a poisoned but legal input: the result is NaN).
    """
    if A.numel() == 0 or not _holds_values(A):
        return
    with torch.no_grad():
        largest = A.detach().max().item()
    if largest > 0:
        raise ValueError(f"A: expected entries <= 0 (decay rates), got max {largest:g}")


def motion_scan(
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
    backend: ScanBackend = "auto",
    check_decay: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Motion-gated selective scan along time, independently per location and channel.

    Args:
        u: input sequence, ``(batch, T, L, D)``.
        delta: step-size logits, ``(batch, T, L, D)``, same dtype as ``u``.
        A: state decay rates, ``(D, N)``, entries ``<= 0``: negative entries decay the state,
            zero keeps it; a positive entry is a ``ValueError`` (checked outside
            ``torch.compile`` tracing; NaN entries pass and give NaN).
        B: write projection, ``(batch, T, L, N)``, dtype of ``u`` or float32.
        C: read projection, ``(batch, T, L, N)``, same dtype as ``B``.
        D: skip connection per channel, ``(D,)``.
        z: gate, ``(batch, T, L, D)``; the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta`` before the softplus, ``(D,)``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        reverse: scan from the last frame to the first.
        initial_state: state before the first scanned frame, ``(batch, L, D, N)``.
        return_last_state: also return the state after the last scanned frame.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"torch"``, ``"ref"`` or ``"mamba"``
            (see the module docstring).
        check_decay: refuse an ``A`` with a positive entry. The check reads a value back from
            the device (one synchronisation per call on a GPU); pass ``False`` where ``A`` is
            non-positive by construction, as ``-exp(A_log)`` in the layers, to skip it.

    Returns:
        ``y`` of shape ``(batch, T, L, D)`` in ``u``'s dtype, and with ``return_last_state`` the
        last state ``(batch, L, D, N)`` in float32 (float64 for float64 inputs). Scanning
        frames ``0..T-1`` at once equals scanning two chunks with the state carried across.
        An empty batch (or ``L == 0``, ``D == 0``) gives empty outputs, and zero gradients for
        the parameters, on every backend.
    """
    if not isinstance(check_decay, bool):
        raise TypeError(f"check_decay: expected a bool, got {type(check_decay).__name__}")
    _validate(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, check_decay
    )
    name = resolve_backend(backend, u.device, u.dtype, A.shape[1])
    if name == "cuda":
        too_large = cuda_launch_limit(tuple(u.shape))
        if too_large is not None:
            if backend != "auto":
                raise ValueError(f"u: backend 'cuda' expected {too_large}")
            name = "torch"  # the kernel cannot take it in one launch; torch's ops can
    y, last_state = _BACKENDS[name](
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state
    )
    return (y, last_state) if return_last_state else y
