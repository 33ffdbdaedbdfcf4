"""Shared building blocks of the ``motion_scan`` tests: random arguments, running a backend with
gradients, comparing against the float64 oracle, and the backend parametrisation.

Every backend is run on CPU-resident arguments: the ``cuda`` backend gets copies on the GPU
(differentiable ``.to`` calls, so the gradients come back to the CPU leaves), and its results
are copied back, so that every comparison happens on the CPU against the same oracle.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor

from pks4_layers.ops import motion_scan, motion_scan_ref
from pks4_layers.ops.motion_scan import backend_status
from tolerances import assert_close

# (batch, T, L, D, N)
Shape = tuple[int, int, int, int, int]

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
OPTIONAL_NAMES = ("D", "z", "delta_bias", "initial_state")
TIME_INPUTS = ("u", "delta", "B", "C", "z")  # the inputs with a T axis (dim 1)
HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# The backends that compute in the inputs' dtype with a backward of their own: the PyTorch one
# and the compiled kernels. ("ref" is the oracle; "mamba" is compared in the CUDA tests.)
BACKENDS = ("torch", "cpu", "cuda")
COMPILED_BACKENDS = ("cpu", "cuda")

Inputs = dict[str, Optional[Tensor]]


# --------------------------------------------------------------------------------------------
# backends


def _param(backend: str, *values: object, id: Optional[str] = None):
    marks = [pytest.mark.cuda] if backend == "cuda" else []
    return pytest.param(backend, *values, marks=marks, id=id or backend)


def backend_params(*backends: str) -> list:
    """``pytest.param`` per backend; the CUDA one carries the ``cuda`` mark."""
    return [_param(b) for b in (backends or BACKENDS)]


def backend_dtype_params(backends: tuple[str, ...], dtypes: tuple[torch.dtype, ...]) -> list:
    """(backend, dtype) pairs, without float64 for ``cuda`` (``auto`` routes it to ``torch`` and
    an explicit ``cuda`` refuses it)."""
    return [
        _param(b, d, id=f"{b}-{str(d).replace('torch.', '')}")
        for b, d in itertools.product(backends, dtypes)
        if not (b == "cuda" and d == torch.float64)
    ]


def device_for(backend: str) -> torch.device:
    """The device ``backend`` runs on. The compiled CPU kernel is part of what is tested: when
    it is unavailable the test fails with the reason. The CUDA backend is skipped without a GPU
    and fails, with the reason, on a GPU machine where it does not load."""
    if backend in ("cuda", "mamba"):
        if not torch.cuda.is_available():
            pytest.skip(f"backend {backend!r} needs a CUDA device; torch sees none")
        usable, reason = backend_status(backend)
        if not usable:
            if backend == "mamba":
                pytest.skip(f"backend 'mamba' is optional and unavailable: {reason}")
            pytest.fail(f"backend 'cuda' is unavailable on a CUDA machine: {reason}")
        return torch.device("cuda")
    if backend == "cpu":
        usable, reason = backend_status("cpu")
        if not usable:
            pytest.fail(f"the compiled CPU backend must be available to the tests: {reason}")
    return torch.device("cpu")


def precise_dtype(backend: str) -> torch.dtype:
    """The most precise dtype ``backend`` takes: float64, or float32 on CUDA."""
    return torch.float32 if backend in ("cuda", "mamba") else torch.float64


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}


ScanFn = Callable[..., tuple[Tensor, Tensor]]


def backend_fn(backend: str) -> ScanFn:
    """``motion_scan`` with ``backend`` returning ``(y, last_state)`` on the CPU, for arguments on
    the CPU (copied to the backend's device and back, differentiably)."""
    device = device_for(backend)

    def fn(**kwargs) -> tuple[Tensor, Tensor]:
        args = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
        y, last = motion_scan(**args, return_last_state=True, backend=backend)
        assert y.device.type == last.device.type == device.type
        return y.cpu(), last.cpu()

    return fn


def scan(inputs: Inputs, backend: str, **flags) -> tuple[Tensor, Tensor]:
    """``(y, last_state)`` of ``backend`` on ``inputs``, on the CPU."""
    return backend_fn(backend)(**inputs, **flags)


def ref_fn(**kwargs) -> tuple[Tensor, Tensor]:
    return motion_scan_ref(**kwargs, return_last_state=True)


# --------------------------------------------------------------------------------------------
# arguments


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scans keep (and return) their state in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(
    shape: Shape,
    dtype: torch.dtype = torch.float64,
    *,
    seed: int = 0,
    optionals: tuple[str, ...] = OPTIONAL_NAMES,
    positive_delta: bool = False,
    bc_dtype: Optional[torch.dtype] = None,
    param_dtype: Optional[torch.dtype] = None,
) -> Inputs:
    """Random arguments of ``motion_scan``, drawn in float64 and then rounded to their dtypes.

    ``A`` is negative (a decaying state) and ``dt`` moderate (about 0.1..1), the regime the scan
    is used in. ``positive_delta`` keeps ``delta + delta_bias`` positive, for runs without the
    softplus (where ``dt`` is used as given). ``initial_state`` is in the state dtype (what a
    previous chunk hands over).
    """
    batch, T, L, Dm, N = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=g, dtype=torch.float64)

    def rand(*size: int) -> Tensor:
        return torch.rand(*size, generator=g, dtype=torch.float64)

    bc_dtype = bc_dtype or dtype
    param_dtype = param_dtype or dtype
    delta = 0.5 * rand(batch, T, L, Dm) + 0.05 if positive_delta else 0.5 * randn(batch, T, L, Dm)
    inputs: Inputs = {
        "u": randn(batch, T, L, Dm).to(dtype),
        "delta": delta.to(dtype),
        "A": (-rand(Dm, N) - 0.05).to(param_dtype),
        "B": randn(batch, T, L, N).to(bc_dtype),
        "C": randn(batch, T, L, N).to(bc_dtype),
        "D": randn(Dm).to(param_dtype),
        "z": randn(batch, T, L, Dm).to(dtype),
        "delta_bias": (0.3 * rand(Dm) - (0.0 if positive_delta else 0.5)).to(param_dtype),
        "initial_state": randn(batch, L, Dm, N).to(state_dtype(dtype)),
    }
    for name in OPTIONAL_NAMES:
        if name not in optionals:
            inputs[name] = None
    return inputs


def to_float64(inputs: Inputs) -> Inputs:
    return {k: (v.to(torch.float64) if v is not None else None) for k, v in inputs.items()}


def magnitude(t: Tensor) -> float:
    """Scale for the absolute tolerance: errors grow with the size of what is computed."""
    return max(1.0, t.detach().abs().max().item())


def upstream(inputs: Inputs, seed: int) -> tuple[Tensor, Tensor]:
    """A random gradient for y and one for the last state, in the dtypes the outputs have."""
    u, A = inputs["u"], inputs["A"]
    assert u is not None and A is not None
    batch, _, L, Dm = u.shape
    g = torch.Generator().manual_seed(seed + 1000)
    grad_y = torch.randn(u.shape, generator=g, dtype=torch.float64).to(u.dtype)
    grad_last = torch.randn(batch, L, Dm, A.shape[1], generator=g, dtype=torch.float64)
    return grad_y, grad_last.to(state_dtype(u.dtype))


def time_slice(inputs: Inputs, start: int, stop: int) -> Inputs:
    return {
        k: (v[:, start:stop] if k in TIME_INPUTS and v is not None else v)
        for k, v in inputs.items()
    }


# --------------------------------------------------------------------------------------------
# running and comparing


def run_with_grads(
    fn: ScanFn,
    inputs: Inputs,
    grad_y: Optional[Tensor],
    grad_last: Optional[Tensor],
    requires_grad: tuple[str, ...] = INPUT_NAMES,
    **flags,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Runs ``fn`` on fresh leaves and back-propagates the given upstream gradients."""
    leaves = {
        k: (v.detach().clone().requires_grad_(k in requires_grad) if v is not None else None)
        for k, v in inputs.items()
    }
    y, last = fn(**leaves, **flags)
    wrt = {k: v for k, v in leaves.items() if v is not None and v.requires_grad}
    # An output the differentiated inputs do not reach (the last state, for C, D or z alone in
    # the reference) has no graph: leave it out.
    pairs = [
        (o, g) for o, g in ((y, grad_y), (last, grad_last)) if g is not None and o.requires_grad
    ]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], list(wrt.values()), [g for _, g in pairs], allow_unused=True
    )
    return y.detach(), last.detach(), {k: g for k, g in zip(wrt, grads)}


def check_against_reference(inputs: Inputs, backend: str = "torch", seed: int = 0, **flags) -> None:
    """``backend`` in the inputs' dtype against ``motion_scan_ref`` in float64 on the same
    (rounded) inputs: y, last state and the gradient of every given input."""
    u = inputs["u"]
    assert u is not None
    grad_y, grad_last = upstream(inputs, seed)
    y, last, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last, **flags)
    y_ref, last_ref, grads_ref = run_with_grads(
        ref_fn, to_float64(inputs), grad_y.double(), grad_last.double(), **flags
    )

    assert y.dtype == u.dtype and y.shape == u.shape
    assert last.dtype == state_dtype(u.dtype)
    assert last.shape == (u.shape[0], u.shape[2], u.shape[3], inputs["A"].shape[1])
    assert_close(y, y_ref, scale=magnitude(y_ref), msg="y")
    assert_close(last, last_ref, scale=magnitude(last_ref), msg="last state")
    assert grads.keys() == {k for k, v in inputs.items() if v is not None}
    for name, grad in grads.items():
        assert grad is not None, name
        assert grad.dtype == inputs[name].dtype, name
        expected = grads_ref[name]
        assert_close(grad, expected, scale=magnitude(expected), msg=f"grad of {name}")


def scan_in_chunks(
    inputs: Inputs, bounds: list[int], reverse: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """Scans the chunks ``[bounds[i], bounds[i+1])`` one call each, carrying the state: in time
    order, or last chunk first for ``reverse``."""
    fn = backend_fn(backend)
    chunks = list(zip(bounds[:-1], bounds[1:]))
    ys: dict[int, Tensor] = {}
    state = inputs["initial_state"]
    for start, stop in reversed(chunks) if reverse else chunks:
        part = time_slice(inputs, start, stop)
        part["initial_state"] = state
        ys[start], state = fn(**part, reverse=reverse)
    return torch.cat([ys[start] for start, _ in chunks], dim=1), state
