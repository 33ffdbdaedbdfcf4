"""Tests of the compiled ``motion_scan`` kernels beyond the backend matrix of
``test_ops_motion_scan.py``: the custom ops' registration (opcheck, fake tensors,
``torch.compile``), determinism, non-finite values, long sequences and extreme step sizes, the
backward's checkpoint segments, explicit backend errors, the fallback when the kernel does not
load, the on-first-use build, and the CUDA kernels where a GPU is present."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import pks4_layers
from pks4_layers.ops import mamba_backend, motion_scan
from pks4_layers.ops.motion_scan import resolve_backend
from scan_cases import (
    COMPILED_BACKENDS,
    INPUT_NAMES,
    TIME_INPUTS,
    Inputs,
    backend_dtype_params,
    backend_fn,
    backend_params,
    check_against_reference,
    device_for,
    magnitude,
    make_inputs,
    run_with_grads,
    scan,
    scan_in_chunks,
    state_dtype,
    to_device,
    upstream,
)
from tolerances import assert_close

# The module itself: the package attribute ``pks4_layers.ops.motion_scan`` is the function.
# Its ``backend_status`` is reached through it, never imported here by name: torch 2.5's dynamo
# stores the result of an ``assume_constant_result`` function under the function's own name in
# the globals of the module being compiled (this one, for the functions compiled below),
# replacing a global of that name.
motion_scan_module = importlib.import_module("pks4_layers.ops.motion_scan")

# The op's argument order (its schema), for calling it directly.
FWD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fwd_args(inputs: Inputs, softplus: bool = True, reverse: bool = False) -> tuple:
    """Positional arguments of ``pks4::motion_scan_fwd``."""
    return (*(inputs[k] for k in FWD_NAMES), softplus, reverse, inputs["initial_state"])


def with_grad(inputs: Inputs, names: tuple[str, ...] = INPUT_NAMES) -> Inputs:
    return {
        k: (v.detach().clone().requires_grad_(k in names) if v is not None else None)
        for k, v in inputs.items()
    }


# --------------------------------------------------------------------------------------------
# the custom ops' registration

SHAPE = (2, 5, 3, 4, 3)

FWD_CASES = {
    # id: (dtype, optionals, softplus, reverse, inputs that require grad)
    "float32-all-grad": (torch.float32, None, True, False, INPUT_NAMES),
    "float64-bare-reverse": (torch.float64, (), True, True, ()),
    "float64-bare-reverse-grad": (torch.float64, (), True, True, ("u", "delta", "A", "B", "C")),
    "float32-nosoftplus-reverse-grad": (torch.float32, None, False, True, INPUT_NAMES),
    "float64-init-only-grad": (torch.float64, ("initial_state",), True, False, ("u", "A")),
    "bfloat16-D-z": (torch.bfloat16, ("D", "z"), True, False, ()),
}


def _op_inputs(
    dtype: torch.dtype, optionals: Optional[tuple[str, ...]], softplus: bool, seed: int = 0
) -> Inputs:
    kwargs = {} if optionals is None else {"optionals": optionals}
    return make_inputs(SHAPE, dtype, seed=seed, positive_delta=not softplus, **kwargs)


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_opcheck_forward(case: str) -> None:
    device_for("cpu")
    dtype, optionals, softplus, reverse, grad_names = FWD_CASES[case]
    inputs = with_grad(_op_inputs(dtype, optionals, softplus), grad_names)
    torch.library.opcheck(
        torch.ops.pks4.motion_scan_fwd.default, fwd_args(inputs, softplus, reverse)
    )


BWD_CASES = {
    # id: (dtype, optionals, bc_dtype, reverse, with grad_last_state)
    "float32-all": (torch.float32, None, None, False, True),
    "float64-bare-reverse-no-grad-last": (torch.float64, (), None, True, False),
    "float64-all-reverse": (torch.float64, None, None, True, True),
    "bfloat16-float32-BC": (torch.bfloat16, None, torch.float32, False, True),
}


@pytest.mark.parametrize("case", list(BWD_CASES))
def test_opcheck_backward(case: str) -> None:
    device_for("cpu")
    dtype, optionals, bc_dtype, reverse, grad_last = BWD_CASES[case]
    kwargs = {} if optionals is None else {"optionals": optionals}
    inputs = make_inputs(SHAPE, dtype, seed=1, bc_dtype=bc_dtype, **kwargs)
    grad_y, grad_last_state = upstream(inputs, 1)
    args = (*fwd_args(inputs, True, reverse), grad_y, grad_last_state if grad_last else None)
    torch.library.opcheck(torch.ops.pks4.motion_scan_bwd.default, args)


# The kernels check their arguments themselves too, for callers of the op who bypass
# motion_scan's validation; the message names the argument.
OP_BAD_CALLS = [
    # (id, argument named in the message, changes)
    ("delta-shape", "delta", {"delta": lambda t: t[:, :-1]}),
    ("B-C-float64", "B", {"B": lambda t: t.double(), "C": lambda t: t.double()}),
    ("C-dtype", "C", {"C": lambda t: t.double()}),
    ("C-shape", "C", {"C": lambda t: t[..., :-1]}),
    ("z-dtype", "z", {"z": lambda t: t.half()}),
    ("D-shape", "D", {"D": lambda t: t[:-1]}),
    ("initial_state-shape", "initial_state", {"initial_state": lambda t: t[:, :-1]}),
    ("A-rank", "A", {"A": lambda t: t[:, 0]}),
    ("u-rank", "u", {"u": lambda t: t[0]}),
]


@pytest.mark.parametrize(
    ("name", "changes"), [pytest.param(n, c, id=i) for i, n, c in OP_BAD_CALLS]
)
def test_op_checks_its_arguments(name: str, changes: dict) -> None:
    device_for("cpu")
    inputs = make_inputs(SHAPE, torch.float32, seed=2)
    inputs.update({k: f(inputs[k]) for k, f in changes.items()})
    with pytest.raises(RuntimeError, match=rf"\b{name}: expected"):
        torch.ops.pks4.motion_scan_fwd(*fwd_args(inputs))


@pytest.mark.parametrize(
    ("dtype", "bc_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
    ids=["float32", "float64", "bfloat16", "float16-float32-BC"],
)
def test_fake_tensors_give_shapes_and_dtypes(dtype: torch.dtype, bc_dtype: torch.dtype) -> None:
    # What torch.compile and the meta-device model builders see: shapes and dtypes, no data.
    device_for("cpu")
    batch, T, L, Dm, N = shape = (2, 7, 3, 5, 4)
    inputs = make_inputs(shape, dtype, bc_dtype=bc_dtype, param_dtype=bc_dtype)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v).requires_grad_() for k, v in inputs.items() if v is not None}
        y, last = motion_scan(**fake, return_last_state=True, backend="cpu")
        grads = torch.autograd.grad(y.float().sum() + last.sum(), list(fake.values()))
    assert isinstance(y, FakeTensor) and isinstance(last, FakeTensor)
    assert y.shape == (batch, T, L, Dm) and y.dtype == dtype
    assert last.shape == (batch, L, Dm, N) and last.dtype == state_dtype(dtype)
    for (name, leaf), grad in zip(fake.items(), grads):
        assert isinstance(grad, FakeTensor), name
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def fresh_dynamo():
    """Compiled code of other tests must not be reused (or kept) across these tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _perturbed_block() -> pks4_layers.PKS4Block:
    """A PKS4Block whose zero-initialised output projection is set to random values, so that
    its output depends on the scan (a fresh block is the identity)."""
    torch.manual_seed(0)
    block = pks4_layers.PKS4Block(16, d_state=4)
    with torch.no_grad():
        block.scan.out_proj.weight.normal_(std=0.1)
        block.scan.out_proj.bias.normal_(std=0.1)
    return block


def _block_forward_backward(
    block: torch.nn.Module, x: Tensor, run=None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Output, input gradient and parameter gradients of ``run`` (default: ``block``) on ``x``;
    ``run`` is the compiled block, which shares the parameters."""
    x = x.detach().clone().requires_grad_()
    block.zero_grad()
    out = (block if run is None else run)(x)
    out.square().mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in block.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.slow
def test_compile_fullgraph_function_with_cpu_backend(fresh_dynamo) -> None:
    device_for("cpu")  # also loads the op before tracing: see the first-call test below
    inputs = make_inputs((2, 6, 3, 4, 3), torch.float32, seed=61)
    grad_y, grad_last = upstream(inputs, 61)

    def fn(**kwargs) -> tuple[Tensor, Tensor]:
        return motion_scan(**kwargs, reverse=True, return_last_state=True, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True)
    y, last, grads = run_with_grads(fn, inputs, grad_y, grad_last)
    y_c, last_c, grads_c = run_with_grads(compiled, inputs, grad_y, grad_last)
    assert_close(y_c, y)
    assert_close(last_c, last)
    for name in INPUT_NAMES:
        assert_close(grads_c[name], grads[name], scale=magnitude(grads[name]), msg=name)


@pytest.mark.slow
def test_compile_fullgraph_block(fresh_dynamo) -> None:
    # backend="auto" (the block's default) resolves to the compiled kernel on CPU tensors.
    device_for("cpu")
    block = _perturbed_block()
    x = torch.randn(2, 4, 16, 3, 3, generator=torch.Generator().manual_seed(67))
    out, grad_x, grads = _block_forward_backward(block, x)
    compiled = torch.compile(block, fullgraph=True)
    out_c, grad_x_c, grads_c = _block_forward_backward(block, x, compiled)
    # Inductor fuses and reorders the surrounding float32 ops: agreement to float32 rounding of
    # the terms, not bitwise.
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_c, out, **tol)
    torch.testing.assert_close(grad_x_c, grad_x, **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, **tol, msg=name)


@pytest.mark.slow
def test_compile_fullgraph_when_the_first_call_is_compiled(
    fresh_dynamo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a fresh process the first motion_scan call of a compiled model looks up (and loads)
    # the compiled backend while Dynamo traces. An empty status cache reproduces that here.
    # The Dynamo backend is "eager": what is tested is the trace, not code generation.
    device_for("cpu")
    monkeypatch.delenv("PKS4_BACKEND", raising=False)
    monkeypatch.setattr(motion_scan_module, "_status", {})
    inputs = make_inputs((1, 3, 2, 4, 2), torch.float32, seed=71)

    def fn(**kwargs) -> Tensor:
        return motion_scan(**kwargs)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert_close(compiled(**inputs), motion_scan(**inputs, backend="cpu"))


@pytest.mark.slow
def test_compiling_motion_scan_itself_leaves_the_module_intact(
    fresh_dynamo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.compile(motion_scan)``: the trace starts in the module that defines the
    ``assume_constant_result`` helpers. Dynamo before torch 2.6 stored their results under the
    helpers' own names in that module's globals, so ``backend_status`` became a tuple there and
    every later eager call failed ("'tuple' object is not callable")."""
    device_for("cpu")
    monkeypatch.delenv("PKS4_BACKEND", raising=False)
    # Restored at teardown whatever happens, so that a failure here does not spread.
    for name in ("backend_status", "_fallback"):
        monkeypatch.setattr(motion_scan_module, name, getattr(motion_scan_module, name))
    inputs = make_inputs((1, 3, 2, 4, 2), torch.float32, seed=73)
    compiled = torch.compile(motion_scan, fullgraph=True, backend="eager")
    y_c = compiled(**inputs)
    for name in ("backend_status", "_fallback"):
        assert callable(getattr(motion_scan_module, name)), f"{name} was replaced while tracing"
    assert_close(motion_scan(**inputs), y_c)


# --------------------------------------------------------------------------------------------
# determinism


DETERMINISM_SHAPE = (2, 40, 6, 37, 5)  # 12 rows for the thread pool, D = 32 + 5, 5 segments


def _forward_backward(inputs: Inputs, backend: str) -> list[Tensor]:
    grad_y, grad_last = upstream(inputs, 73)
    y, last, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last)
    return [y, last, *(grads[k] for k in INPUT_NAMES)]


def _assert_bitwise_equal(first: list[Tensor], second: list[Tensor]) -> None:
    names = ("y", "last_state", *(f"grad of {k}" for k in INPUT_NAMES))
    for name, a, b in zip(names, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("backend", "dtype"), backend_dtype_params(COMPILED_BACKENDS, (torch.float32, torch.bfloat16))
)
def test_two_runs_are_bitwise_identical(backend: str, dtype: torch.dtype) -> None:
    inputs = make_inputs(DETERMINISM_SHAPE, dtype, seed=73)
    _assert_bitwise_equal(_forward_backward(inputs, backend), _forward_backward(inputs, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_result_does_not_depend_on_the_number_of_threads(dtype: torch.dtype) -> None:
    # The backward's per-row partial sums are reduced in a fixed order, whatever the split.
    device_for("cpu")
    inputs = make_inputs(DETERMINISM_SHAPE, dtype, seed=79)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _forward_backward(inputs, "cpu")
        torch.set_num_threads(2)
        two = _forward_backward(inputs, "cpu")
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(one, two)


# --------------------------------------------------------------------------------------------
# non-finite values

NAN_SHAPE = (2, 9, 3, 5, 4)
BAD_AT = (1, 4, 2, 3)  # (batch, t, location, channel)


def _frames_reached(t: int, T: int, reverse: bool, against_scan: bool) -> slice:
    """The frames a value at frame ``t`` reaches: itself and those scanned after it (the later
    ones, or the earlier ones for ``reverse``); ``against_scan`` for a gradient, which flows
    the other way."""
    after = reverse == against_scan
    return slice(t, T) if after else slice(0, t + 1)


def _allowed_non_finite(inputs: Inputs, reverse: bool, against_scan: bool) -> dict[str, Tensor]:
    """Per output (y, last state, gradients), where a non-finite value at ``BAD_AT`` may reach:
    its (batch, location, channel) in the frames it reaches; B and C gradients of that location
    (they sum over channels); that channel of A, D and delta_bias (they sum over locations)."""
    b, t, l, d = BAD_AT
    T = inputs["u"].shape[1]
    frames = _frames_reached(t, T, reverse, against_scan)
    allowed: dict[str, Tensor] = {}
    for name, v in inputs.items():
        mask = torch.zeros(v.shape, dtype=torch.bool)
        if name in ("u", "delta", "z"):
            mask[b, frames, l, d] = True
        elif name in ("B", "C"):
            mask[b, frames, l] = True
        elif name in ("A", "D", "delta_bias"):
            mask[d] = True
        elif name == "initial_state":
            mask[b, l, d] = True
        allowed[name] = mask
    return allowed


def _assert_confined(actual: Tensor, clean: Tensor, allowed: Tensor, name: str) -> None:
    """Non-finite only where ``allowed``; everywhere else bit-for-bit the clean run."""
    outside = ~allowed
    assert torch.isfinite(actual[outside]).all(), f"{name}: non-finite values escaped"
    assert torch.equal(actual[outside], clean[outside]), f"{name}: changed outside"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", backend_params(*COMPILED_BACKENDS))
def test_non_finite_input_stays_at_its_location(backend: str, bad: float, reverse: bool) -> None:
    inputs = make_inputs(NAN_SHAPE, torch.float32, seed=83)
    poisoned = {k: (v.clone() if v is not None else None) for k, v in inputs.items()}
    poisoned["u"][BAD_AT] = bad
    grad_y, grad_last = upstream(inputs, 83)
    y, last, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last, reverse=reverse)
    y_p, last_p, grads_p = run_with_grads(
        backend_fn(backend), poisoned, grad_y, grad_last, reverse=reverse
    )

    b, t, l, d = BAD_AT
    T = NAN_SHAPE[1]
    reached = _frames_reached(t, T, reverse, against_scan=False)
    # Forward: the value's own channel is non-finite from its frame on, in scan order.
    assert not torch.isfinite(y_p[b, reached, l, d]).any()
    assert not torch.isfinite(last_p[b, l, d]).any()
    y_allowed = torch.zeros(y.shape, dtype=torch.bool)
    y_allowed[b, reached, l, d] = True
    _assert_confined(y_p, y, y_allowed, "y")
    last_allowed = torch.zeros(last.shape, dtype=torch.bool)
    last_allowed[b, l, d] = True
    _assert_confined(last_p, last, last_allowed, "last state")

    # Backward: the gradients of other locations and channels are those of the clean run. In
    # the poisoned channel, the gradient of any frame may meet the non-finite states.
    allowed = _allowed_non_finite(inputs, reverse, against_scan=False)
    for name in INPUT_NAMES:
        mask = allowed[name].clone()
        if name in TIME_INPUTS:
            mask[b, :, l, ...] = mask[b, t, l, ...]
        _assert_confined(grads_p[name], grads[name], mask, f"grad of {name}")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", backend_params(*COMPILED_BACKENDS))
def test_nan_upstream_gradient_stays_at_its_location(backend: str, reverse: bool) -> None:
    inputs = make_inputs(NAN_SHAPE, torch.float32, seed=89)
    grad_y, grad_last = upstream(inputs, 89)
    poisoned = grad_y.clone()
    poisoned[BAD_AT] = float("nan")
    _, _, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last, reverse=reverse)
    _, _, grads_p = run_with_grads(
        backend_fn(backend), inputs, poisoned, grad_last, reverse=reverse
    )

    b, t, l, d = BAD_AT
    T = NAN_SHAPE[1]
    # The gradient flows against the scan: to the frames before (forward) or after (reverse).
    earlier = _frames_reached(t, T, reverse, against_scan=True)
    assert grads_p["u"][b, earlier, l, d].isnan().all()
    assert grads_p["initial_state"][b, l, d].isnan().all()
    assert grads_p["A"][d].isnan().all()
    allowed = _allowed_non_finite(inputs, reverse, against_scan=True)
    for name in INPUT_NAMES:
        _assert_confined(grads_p[name], grads[name], allowed[name], f"grad of {name}")


# --------------------------------------------------------------------------------------------
# long sequences, extreme step sizes, checkpoint segments


@pytest.mark.parametrize("decay", ["decaying", "near-zero-A"])
@pytest.mark.parametrize(
    ("backend", "dtype"), backend_dtype_params(COMPILED_BACKENDS, (torch.float64, torch.float32))
)
def test_long_sequence(backend: str, dtype: torch.dtype, decay: str) -> None:
    # A near zero barely decays the state: over 1024 steps it accumulates, the hardest case for
    # float32 (and for a backward that would divide by the decay).
    inputs = make_inputs((1, 1024, 2, 3, 4), dtype, seed=97)
    if decay == "near-zero-A":
        inputs["A"] = torch.full_like(inputs["A"], -1e-6)
    y, last = scan(inputs, backend)
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    check_against_reference(inputs, backend, seed=97)
    # The torch backend, in the same dtype, agrees as well.
    y_t, last_t = scan(inputs, "torch")
    assert_close(y, y_t, scale=magnitude(y_t))
    assert_close(last, last_t, scale=magnitude(last_t))


@pytest.mark.parametrize("A", [None, -1e-6], ids=["decaying", "near-zero-A"])
@pytest.mark.parametrize("logit", ["+30", "-30", "mixed"])
@pytest.mark.parametrize(
    ("backend", "dtype"), backend_dtype_params(COMPILED_BACKENDS, (torch.float64, torch.float32))
)
def test_extreme_step_sizes(backend: str, dtype: torch.dtype, logit: str, A: Optional[float]):
    # softplus(+30) = 30 (a step that forgets the state at once) and softplus(-30) = 1e-13 (a
    # step that changes nothing); with and without the softplus threshold in between.
    inputs = make_inputs((2, 24, 3, 5, 4), dtype, seed=101)
    g = torch.Generator().manual_seed(101)
    signs = {
        "+30": torch.ones(inputs["u"].shape),
        "-30": -torch.ones(inputs["u"].shape),
        "mixed": torch.randint(0, 2, inputs["u"].shape, generator=g) * 2.0 - 1.0,
    }[logit]
    inputs["delta"] = (30.0 * signs).to(dtype)
    if A is not None:
        inputs["A"] = torch.full_like(inputs["A"], A)
    y, last = scan(inputs, backend)
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    check_against_reference(inputs, backend, seed=101)


# The backward keeps a checkpoint every min(ceil(sqrt(T)), 8) steps: 1, 2, 3, 3, 3, 8, 8, 8
# steps for these T, so exact multiples, one step past and one short of a segment.
CHECKPOINT_T = [1, 2, 7, 8, 9, 63, 64, 65]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    ("backend", "dtype"), backend_dtype_params(COMPILED_BACKENDS, (torch.float64, torch.float32))
)
@pytest.mark.parametrize("T", CHECKPOINT_T)
# The kernels' segment length depends on the state size (the CPU kernel fits a segment's states
# in a cache-sized buffer: 7 steps for N = 64 in float64, the whole clip for N = 2).
@pytest.mark.parametrize("N", [2, 64])
def test_backward_segment_boundaries(
    T: int, N: int, backend: str, dtype: torch.dtype, reverse: bool
):
    inputs = make_inputs((2, T, 2, 3, N), dtype, seed=T)
    check_against_reference(inputs, backend, seed=T, reverse=reverse)


# --------------------------------------------------------------------------------------------
# backend selection and its errors


def _all_to(inputs: Inputs, device: str) -> Inputs:
    return to_device(inputs, torch.device(device))


def test_cpu_backend_rejects_meta_tensors() -> None:
    inputs = _all_to(make_inputs((1, 2, 1, 2, 2), torch.float32), "meta")
    with pytest.raises(ValueError, match=r"^u: backend 'cpu' expected CPU tensors, got .*meta"):
        motion_scan(**inputs, backend="cpu")


@pytest.mark.cuda
@needs_cuda
def test_cpu_backend_rejects_cuda_tensors() -> None:
    inputs = _all_to(make_inputs((1, 2, 1, 2, 2), torch.float32), "cuda")
    with pytest.raises(ValueError, match=r"^u: backend 'cpu' expected CPU tensors, got .*cuda"):
        motion_scan(**inputs, backend="cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "mamba"])
def test_cuda_backends_reject_cpu_tensors(backend: str) -> None:
    inputs = make_inputs((1, 2, 1, 2, 2), torch.float32)
    with pytest.raises(ValueError, match=rf"^u: backend '{backend}' expected CUDA tensors"):
        motion_scan(**inputs, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "mamba"])
def test_cuda_backends_reject_float64(backend: str) -> None:
    # resolve_backend decides from the device and dtype alone: no GPU needed for the check.
    with pytest.raises(ValueError, match=rf"^u: backend '{backend}' expected float16, .*float64"):
        resolve_backend(backend, torch.device("cuda"), torch.float64)
    if torch.cuda.is_available():
        inputs = _all_to(make_inputs((1, 2, 1, 2, 2), torch.float64), "cuda")
        with pytest.raises(ValueError, match=rf"^u: backend '{backend}' expected float16"):
            motion_scan(**inputs, backend=backend)


def test_auto_sends_float64_on_cuda_to_the_torch_backend(monkeypatch) -> None:
    monkeypatch.delenv("PKS4_BACKEND", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: float64 is not a missing kernel
        assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"


@pytest.mark.cuda
@pytest.mark.skipif(mamba_backend.status()[0], reason="mamba-ssm's CUDA build is installed")
def test_mamba_backend_unavailable_says_why() -> None:
    with pytest.raises(RuntimeError, match=r"backend 'mamba' is unavailable: .*mamba-ssm"):
        resolve_backend("mamba", torch.device("cuda"), torch.float32)
    if torch.cuda.is_available():
        inputs = _all_to(make_inputs((1, 2, 1, 2, 2), torch.float32), "cuda")
        with pytest.raises(RuntimeError, match=r"backend 'mamba' is unavailable: .*mamba-ssm"):
            motion_scan(**inputs, backend="mamba")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_backend_unavailable_without_gpu_says_why() -> None:
    assert motion_scan_module.backend_status("cuda")[0] is False
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is unavailable: .*CUDA"):
        resolve_backend("cuda", torch.device("cuda"), torch.float32)


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PKS4_BACKEND", raising=False)
    monkeypatch.setitem(motion_scan_module._status, "cpu", (False, "simulated build failure"))
    monkeypatch.setattr(motion_scan_module, "_warned", set())
    inputs = make_inputs((2, 5, 3, 4, 3), torch.float32, seed=103)
    with pytest.warns(RuntimeWarning, match=r"'cpu' backend is unavailable \(simulated build"):
        y = motion_scan(**inputs)
    assert torch.equal(y, motion_scan(**inputs, backend="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert torch.equal(motion_scan(**inputs), y)
    # An explicit request is not silently served by another backend.
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is unavailable: simulated build"):
        motion_scan(**inputs, backend="cpu")


# --------------------------------------------------------------------------------------------
# the build on first use

_LOAD_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json
    import torch
    from pks4_layers.ops import build, motion_scan
    s = build.load("cpu")
    print(s)
    print(json.dumps(dataclasses.asdict(s)))
    # The loaded library serves the op: compare with the torch backend.
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 4, 2, 3, generator=g) for _ in range(3))
    A = -torch.rand(3, 2, generator=g) - 0.1
    B, C = (torch.randn(1, 4, 2, 2, generator=g) for _ in range(2))
    args = dict(u=u, delta=delta, A=A, B=B, C=C, z=z)
    diff = (motion_scan(**args, backend="cpu") - motion_scan(**args, backend="torch")).abs()
    print(json.dumps({"max_diff": diff.max().item()}))
    """
)


def _load_in_subprocess(cache: Path) -> tuple[dict, str, float]:
    env = dict(os.environ)
    env.pop("PKS4_NO_EXT", None)
    env.pop("PKS4_BACKEND", None)
    env["PKS4_CACHE_DIR"] = str(cache)
    env["PKS4_FORCE_JIT"] = "1"  # even if an ahead-of-time build sits in the package
    # ninja is installed next to the interpreter (a virtual environment's bin/), which is on the
    # PATH only when the environment is activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    status = json.loads(lines[-2])
    status["max_diff"] = json.loads(lines[-1])["max_diff"]
    status["printed"] = lines[-3]
    return status, proc.stderr, elapsed


@pytest.mark.slow
def test_build_on_first_use_then_load_from_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    status, stderr, _ = _load_in_subprocess(cache)
    assert status["loaded"], status
    assert status["origin"].startswith("built on first use"), status
    assert "loaded=True" in status["printed"] and "built on first use" in status["printed"]
    assert "compiling the CPU kernels" in stderr
    assert status["max_diff"] < 1e-5, status
    folders = sorted(cache.glob("pks4_cpu_*"))
    assert len(folders) == 1, folders
    libraries = list(folders[0].glob("pks4_cpu_*.so"))
    assert len(libraries) == 1, sorted(folders[0].iterdir())
    built_at = libraries[0].stat().st_mtime_ns

    status, stderr, _ = _load_in_subprocess(cache)
    assert status["loaded"], status
    assert status["max_diff"] < 1e-5, status
    # Loaded from the cache: no compile message, the library untouched, and much faster.
    assert "compiling" not in stderr, stderr
    assert libraries[0].stat().st_mtime_ns == built_at
    assert sorted(cache.glob("pks4_cpu_*")) == folders


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("dtype", "bc_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["float32", "float16", "bfloat16", "bfloat16-float32-BC"],
)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", [(2, 70, 3, 64, 16), (1, 129, 2, 40, 8)], ids=str)
def test_cuda_matches_reference(shape, dtype: torch.dtype, bc_dtype: torch.dtype, reverse: bool):
    # Larger than the shapes of the backend matrix: many channels per block, N = 16, several
    # backward segments. All optional inputs (initial_state included) are given.
    device_for("cuda")
    inputs = make_inputs(shape, dtype, seed=107, bc_dtype=bc_dtype, param_dtype=bc_dtype)
    check_against_reference(inputs, "cuda", seed=107, reverse=reverse)


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_cuda_streaming_in_chunks(reverse: bool) -> None:
    device_for("cuda")
    inputs = make_inputs((2, 50, 3, 48, 8), torch.float32, seed=109)
    y, last = scan(inputs, "cuda", reverse=reverse)
    y_c, last_c = scan_in_chunks(inputs, [0, 17, 33, 50], reverse=reverse, backend="cuda")
    assert_close(y_c, y, scale=magnitude(y))
    assert_close(last_c, last, scale=magnitude(last))


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_mamba_backend_matches_cuda_backend(reverse: bool) -> None:
    device_for("cuda")
    device_for("mamba")
    # mamba-ssm's kernel takes no initial_state.
    inputs = make_inputs(
        (2, 40, 3, 32, 8), torch.float32, seed=113, optionals=("D", "z", "delta_bias")
    )
    grad_y, grad_last = upstream(inputs, 113)
    y, last, grads = run_with_grads(backend_fn("cuda"), inputs, grad_y, grad_last, reverse=reverse)
    y_m, last_m, grads_m = run_with_grads(
        backend_fn("mamba"), inputs, grad_y, grad_last, reverse=reverse
    )
    assert_close(y_m, y, scale=magnitude(y))
    assert_close(last_m, last, scale=magnitude(last))
    for name, grad in grads.items():
        assert_close(grads_m[name], grad, scale=magnitude(grad), msg=name)


@pytest.mark.cuda
@pytest.mark.slow
def test_compile_fullgraph_block_on_cuda(fresh_dynamo) -> None:
    device = device_for("cuda")
    block = _perturbed_block().to(device)
    x = torch.randn(2, 4, 16, 3, 3, generator=torch.Generator().manual_seed(127)).to(device)
    out, grad_x, grads = _block_forward_backward(block, x)
    compiled = torch.compile(block, fullgraph=True)
    out_c, grad_x_c, grads_c = _block_forward_backward(block, x, compiled)
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_c, out, **tol)
    torch.testing.assert_close(grad_x_c, grad_x, **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, **tol, msg=name)


def test_large_state_on_cuda_routes_to_torch():
    """The CUDA kernel holds at most 64 states per sequence in registers: "auto" sends larger
    states to the torch backend, an explicit "cuda" says why it cannot."""
    resolve = motion_scan_module.resolve_backend
    cuda = torch.device("cuda")
    assert resolve("auto", cuda, torch.float32, 65) == "torch"
    with pytest.raises(ValueError, match=r"^A: backend 'cuda' expected a state size N <= 64"):
        resolve("cuda", cuda, torch.float32, 65)


@pytest.mark.slow
def test_cpu_portable_and_avx512_updates_agree(tmp_path):
    """The CPU kernel's scan step and backward walk have an AVX-512 version and a portable one;
    each (the portable one forced by PKS4_CPU_NO_AVX512=1 in a fresh process) matches the
    float64 reference within the float32 tolerance. (They differ from each other by rounding:
    the AVX-512 one fuses multiply-adds.)"""
    script = textwrap.dedent(
        """
        import sys, torch
        from pks4_layers.ops import motion_scan
        g = torch.Generator().manual_seed(0)
        b, T, L, D, N = 2, 9, 3, 40, 5
        r = lambda *s: torch.randn(*s, generator=g)
        args = dict(u=r(b, T, L, D), delta=r(b, T, L, D), A=-torch.rand(D, N, generator=g) - 0.1,
                    B=r(b, T, L, N), C=r(b, T, L, N), D=r(D), z=r(b, T, L, D),
                    delta_bias=r(D), initial_state=r(b, L, D, N))
        def run(backend, dtype):
            leaves = {k: v.to(dtype).requires_grad_() for k, v in args.items()}
            y, last = motion_scan(**leaves, return_last_state=True, backend=backend)
            grads = torch.autograd.grad((y.square().sum() + last.sum()), list(leaves.values()))
            return [y.detach(), last.detach(), *grads]
        torch.save([run("cpu", torch.float32), run("ref", torch.float64)], sys.argv[1])
        """
    )
    for env_value in ("0", "1"):
        path = tmp_path / f"avx512_off_{env_value}.pt"
        env = {**os.environ, "PKS4_CPU_NO_AVX512": env_value}
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True)
        outputs, expected = torch.load(path)
        for i, (out, ref) in enumerate(zip(outputs, expected)):
            assert_close(out, ref, scale=float(ref.abs().max()), msg=f"output {i}")
