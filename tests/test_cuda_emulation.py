"""The CUDA kernels' own source run on the CPU, against ``motion_scan_ref`` in float64.

Why: the CUDA kernels (``csrc/motion_scan/*.cu``) otherwise run only where a GPU is, and most
machines that test this library have none. ``tests/cuda_emulation`` compiles the same ``.cu``
files with the host compiler against an emulation of the CUDA execution model (threads of a
block as fibers that switch only at barriers and warp intrinsics, warp shuffles with their
masks checked, shared memory poisoned with NaN before every block, CUDA's launch limits) and
registers them, below the same glue as ``bindings_cuda.cpp``, as ``torch.ops.pks4_emu``. The
tests here run them over a table of shapes that reaches every path of the kernels (partial warps
and channel blocks, the forward's chunks of shared memory, the backward's checkpoint segments
and warp sums, both directions, every optional input, every storage type), check the host-side
refusals, check the emulation itself, and plant bugs in copies of the kernels to show that the
comparisons catch them.

Outputs the kernels fail to write must not pass by chance: ``torch.use_deterministic_algorithms``
fills every ``torch.empty`` (the kernels' outputs and workspace) with NaN first.

Cost: one compile of about 20 s on 2 cores (cached in the extension cache), then a few seconds
per planted bug (each compiles the kernels it changes) and about a second per shape.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor

from cuda_emulation.builder import (
    EmulatedBuild,
    Mutation,
    Ops,
    build_emulation,
    build_mutant,
    kernel_dir,
    launch_bounds_header,
)
from scan_cases import (
    INPUT_NAMES,
    OPTIONAL_NAMES,
    Inputs,
    magnitude,
    make_inputs,
    ref_fn,
    run_with_grads,
    state_dtype,
    to_float64,
    upstream,
)
from tolerances import assert_close

# The emulation runs on Linux (ucontext fibers, the dynamic linker's thread-local storage).
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the CUDA emulation runs on Linux only"
)

# The ops' positional arguments before the flags (their schema's order).
FWD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(scope="module")
def emulated() -> EmulatedBuild:
    """The real kernel sources, compiled against the emulation and loaded."""
    return build_emulation()


@pytest.fixture(autouse=True)
def poisoned_empty_tensors() -> Iterator[None]:
    """Uninitialised tensors filled with NaN, so that an output element (or a checkpoint) the
    kernels never write fails the comparison; one intra-op thread, because the reference is a
    loop of tiny ops that extra threads only slow down on a busy machine."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# the shapes


@dataclass(frozen=True)
class Case:
    """One call of the kernels: shape ``(batch, T, L, D, N)``, storage types and options."""

    shape: tuple[int, int, int, int, int]
    dtype: torch.dtype = torch.float32
    bc_dtype: Optional[torch.dtype] = None  # B and C: the input dtype, or float32
    reverse: bool = False
    optionals: tuple[str, ...] = OPTIONAL_NAMES
    softplus: bool = True
    grad_last: bool = True  # an upstream gradient for the last state


F16, BF16 = torch.float16, torch.bfloat16
# Each path, and where it is reached (kMaxN: 16 for N <= 16, 32 for N <= 32, else 64; the
# forward stages 1024 / kMaxN steps of B, C per chunk; the backward's segments are
# min(ceil(sqrt(T)), 8) steps; a block is 128 channels, a warp 32):
#   T = 0, 1, 2, 31, 32, 33, 257, 1024 and N = 1, 2, 16, 17, 64 (and 40: the second of the
#     two slots a lane keeps for the warp sums of 64 states, partly used): in the ids;
#   chunks: one partial (T < chunk), exactly full (T = chunk or 2 chunks), full + partial
#     (T=31/33 N>32, T=257 N=16/17, T=1024 N<=16); segments: 1, 2, 6 (31, 32, 33 steps), 8;
#   channels: one (D=1), a partial warp (5, 33, 36, 70, 100), a full block (64); several
#     blocks, the last one with one live lane (129), a partial warp and three dead ones (140,
#     150), a full warp and three dead ones (160), a partial warp and a dead one (200);
#   batch and L > 1 (the row -> (batch, location) split), reverse, each optional input alone,
#     all of them and none, no softplus, no upstream gradient for the last state;
#   storage: float32; float16 and bfloat16 with B, C in the same dtype and in float32.
CASES: dict[str, Case] = {
    "T0-N4-D33-f32": Case((2, 0, 3, 33, 4)),
    "T1-N1-D1-f32-reverse": Case((2, 1, 3, 1, 1), reverse=True),
    "T2-N2-D33-f32-bare": Case((1, 2, 2, 33, 2), optionals=(), grad_last=False),
    "T31-N64-D100-f32-reverse": Case((1, 31, 1, 100, 64), reverse=True),
    "T32-N64-D150-f32-bare": Case((1, 32, 1, 150, 64), optionals=(), grad_last=False),
    "T32-N17-D160-f32-z": Case((2, 32, 1, 160, 17), optionals=("z",)),
    "T33-N40-D140-f32-init-D": Case((1, 33, 2, 140, 40), optionals=("initial_state", "D")),
    "T64-N16-D129-f32-bias": Case((2, 64, 2, 129, 16), optionals=("delta_bias",)),
    "T257-N16-D200-f32": Case((1, 257, 1, 200, 16)),
    "T257-N17-D64-f32-reverse-no-grad-last": Case(
        (1, 257, 1, 64, 17), reverse=True, grad_last=False
    ),
    "T1024-N1-D5-f32-reverse": Case((1, 1024, 1, 5, 1), reverse=True),
    "T1024-N2-D33-f32-no-softplus": Case((1, 1024, 1, 33, 2), softplus=False),
    "T257-N16-D36-f16-reverse": Case((1, 257, 2, 36, 16), F16, reverse=True),
    "T33-N17-D129-f16-BC-f32": Case((1, 33, 1, 129, 17), F16, torch.float32),
    "T64-N32-D70-bf16": Case((1, 64, 1, 70, 32), BF16),
    "T31-N64-D33-bf16-BC-f32-reverse": Case((2, 31, 1, 33, 64), BF16, torch.float32, True),
}


def case_inputs(case: Case, seed: int = 0) -> Inputs:
    """Random arguments for ``case``, rounded to its dtypes."""
    return make_inputs(
        case.shape,
        case.dtype,
        seed=seed,
        optionals=case.optionals,
        positive_delta=not case.softplus,
        bc_dtype=case.bc_dtype,
    )


def upstream_grads(inputs: Inputs, case: Case, seed: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """Random upstream gradients for y and (unless the case has none) the last state."""
    grad_y, grad_last = upstream(inputs, seed)
    return grad_y, grad_last if case.grad_last else None


# --------------------------------------------------------------------------------------------
# running the emulated kernels and the reference


def emulated_forward(ops: Ops, inputs: Inputs, case: Case) -> tuple[Tensor, Tensor]:
    """``(y, last_state)`` of ``<ops>::motion_scan_fwd``."""
    args = (*(inputs[k] for k in FWD_NAMES), case.softplus, case.reverse)
    return ops.motion_scan_fwd(*args, inputs["initial_state"])


def emulated_backward(
    ops: Ops, inputs: Inputs, case: Case, grad_y: Tensor, grad_last: Optional[Tensor]
) -> dict[str, Tensor]:
    """The gradients ``<ops>::motion_scan_bwd`` returns for the inputs that are given."""
    args = (*(inputs[k] for k in FWD_NAMES), case.softplus, case.reverse)
    grads = ops.motion_scan_bwd(*args, inputs["initial_state"], grad_y, grad_last)
    return {k: g for k, g in zip(INPUT_NAMES, grads) if inputs[k] is not None}


def reference_forward(inputs: Inputs, case: Case) -> tuple[Tensor, Tensor]:
    """``(y, last_state)`` of ``motion_scan_ref`` in float64 on the same (rounded) inputs.

    With no step (T = 0) the oracle has nothing to stack; the scan is then the identity on the
    state: y is empty and the last state is the initial one."""
    x = to_float64(inputs)
    u, A, h0 = x["u"], x["A"], x["initial_state"]
    assert u is not None and A is not None
    if u.shape[1] == 0:
        batch, _, L, Dm = u.shape
        return u.clone(), h0.clone() if h0 is not None else u.new_zeros(batch, L, Dm, A.shape[1])
    with torch.no_grad():
        return ref_fn(**x, delta_softplus=case.softplus, reverse=case.reverse)


def reference_grads(
    inputs: Inputs, case: Case, grad_y: Tensor, grad_last: Optional[Tensor]
) -> dict[str, Tensor]:
    """The gradients of ``motion_scan_ref`` in float64 for every given input (for T = 0: only
    the initial state has one, that of the last state)."""
    x = to_float64(inputs)
    u = x["u"]
    assert u is not None
    gl = grad_last.double() if grad_last is not None else None
    if u.shape[1] == 0:
        grads = {k: torch.zeros_like(v) for k, v in x.items() if v is not None}
        if gl is not None and "initial_state" in grads:
            grads["initial_state"] = gl
        return grads
    flags = dict(delta_softplus=case.softplus, reverse=case.reverse)
    return run_with_grads(ref_fn, x, grad_y.double(), gl, **flags)[2]


def check_close(actual: Tensor, expected: Tensor, name: str) -> None:
    """``assert_close`` at the tolerance of ``actual``'s dtype, the output named in the
    message."""
    scale = magnitude(expected) if expected.numel() else 1.0
    assert_close(actual, expected, scale=scale, msg=lambda m: f"{name}: {m}")


def check_forward(ops: Ops, case: Case) -> None:
    """y and the last state of the emulated forward against the reference."""
    inputs = case_inputs(case)
    u = inputs["u"]
    assert u is not None
    y, last = emulated_forward(ops, inputs, case)
    y_ref, last_ref = reference_forward(inputs, case)
    assert y.dtype == u.dtype and y.shape == u.shape
    batch, _, L, Dm, N = case.shape
    assert last.dtype == state_dtype(u.dtype) and last.shape == (batch, L, Dm, N)
    check_close(y, y_ref, "y")
    check_close(last, last_ref, "last state")


def check_backward(ops: Ops, case: Case) -> None:
    """The gradients of every given input from the emulated backward against the reference."""
    inputs = case_inputs(case)
    grad_y, grad_last = upstream_grads(inputs, case)
    grads = emulated_backward(ops, inputs, case, grad_y, grad_last)
    grads_ref = reference_grads(inputs, case, grad_y, grad_last)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        given = inputs[name]
        assert given is not None
        assert grad.dtype == given.dtype and grad.shape == given.shape, name
        check_close(grad, grads_ref[name], f"grad of {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_emulation_forward(emulated: EmulatedBuild, case: str) -> None:
    """y and the last state of the CUDA forward kernel match the float64 reference."""
    check_forward(emulated.ops, CASES[case])


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_emulation_backward(emulated: EmulatedBuild, case: str) -> None:
    """The gradients of the CUDA backward kernel (with the glue's reductions of its partial
    sums) match those of the float64 reference."""
    check_backward(emulated.ops, CASES[case])


# --------------------------------------------------------------------------------------------
# what the CUDA path refuses (the host-side checks below the dispatcher)

REFUSED = {
    # id: (case, the error)
    "float64": (Case((1, 3, 1, 8, 4), torch.float64), "float64 is not supported by the CUDA"),
    "N-65": (Case((1, 3, 1, 8, 65)), "supports state sizes N from 1 to 64, got N = 65"),
    # The tensor glue refuses N = 0 before the kernels' own check (N from 1 to 64) is reached.
    "N-0": (Case((1, 3, 1, 8, 0)), r"A: expected shape \(D=8, N\) with N >= 1"),
    # One channel block more than the grid's y dimension (65535) holds.
    "D-too-large": (Case((1, 1, 1, 65535 * 128 + 1, 1), optionals=()), "exceeds the CUDA kernel"),
}


def lean_inputs(case: Case) -> Inputs:
    """Zeros (A: -1) in float32 without the optional inputs: for shapes refused before any
    value is read, where drawing random values would only cost time and memory."""
    batch, T, L, Dm, N = case.shape
    inputs: Inputs = dict.fromkeys(INPUT_NAMES)
    inputs["u"] = torch.zeros(batch, T, L, Dm)
    inputs["delta"] = torch.zeros(batch, T, L, Dm)
    inputs["A"] = -torch.ones(Dm, N)
    inputs["B"] = inputs["C"] = torch.zeros(batch, T, L, N)
    return inputs


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("refused", list(REFUSED))
def test_cuda_emulation_refuses(emulated: EmulatedBuild, refused: str, direction: str) -> None:
    """The host-side checks of the CUDA path raise a clear error instead of launching."""
    case, error = REFUSED[refused]
    inputs = lean_inputs(case) if case.shape[3] > 10**6 else case_inputs(case)
    with pytest.raises(RuntimeError, match=error):
        if direction == "forward":
            emulated_forward(emulated.ops, inputs, case)
        else:
            grad_y, grad_last = upstream_grads(inputs, case)
            emulated_backward(emulated.ops, inputs, case, grad_y, grad_last)


# --------------------------------------------------------------------------------------------
# the emulation itself

SELF_CHECKS = {
    # name: the error it must raise, or None when it must pass
    "shuffles": None,
    "shared_poisoned": None,
    "within_launch_bounds": None,
    "divergent_barrier": r"thread 16 .* reached __syncthreads\(\) at selftest_kernels\.cpp:\d+ "
    r"while threads 0-15 wait at __syncthreads\(\) at selftest_kernels\.cpp:\d+",
    "early_exit": r"thread 3 .* exited while threads 0-2 wait at __syncthreads\(\)",
    "half_warp_shuffle": r"thread 16 .* reached __syncthreads\(\) .* while thread 0 .* waits for "
    r"it in __shfl_xor_sync\(mask 0xffffffff\)",
    "mask_mismatch": r"warp operations do not match: thread 16 .* calls "
    r"__shfl_xor_sync\(mask 0xffff0000\)",
    "lane_outside_own_mask": r"thread 5 .* calls __shfl_xor_sync\(mask 0x00000001\) .* a mask "
    r"without its own lane",
    "read_outside_mask": r"reads lane 20 in __shfl_sync\(mask 0x0000ffff\) .* a lane outside",
    "block_too_large": r"invalid configuration argument .* blockDim\.x = 2048 is outside 1\.\.1024",
    "grid_too_large": r"invalid configuration argument .* gridDim\.y = 65536 is outside 1\.\.65535",
    "launch_bounds": r"too many resources requested for launch .* a block of 128 threads exceeds "
    r"the kernel's __launch_bounds__\(64\)",
}


@pytest.mark.parametrize("name", list(SELF_CHECKS))
def test_cuda_emulation_self_check(emulated: EmulatedBuild, name: str) -> None:
    """The emulated warp intrinsics exchange what CUDA defines, shared memory is poisoned
    between blocks, and each misuse the emulation promises to catch raises its error."""
    error = SELF_CHECKS[name]
    if error is None:
        emulated.ops.selftest(name)
    else:
        with pytest.raises(RuntimeError, match=error):
            emulated.ops.selftest(name)


def _bits(t: Tensor) -> Tensor:
    """The bit patterns of ``t``, so that results compare exactly (signed zeros included)."""
    return t.view(torch.int16) if t.dtype in (F16, BF16) else t.view(torch.int32)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["half", "bfloat16"])
def test_cuda_emulation_conversions(emulated: EmulatedBuild, dtype: torch.dtype) -> None:
    """The emulated conversion intrinsics round as torch does on the CPU (to nearest even,
    overflow to infinity, NaN kept): every 16-bit pattern to float32 and back, and float32
    values around every rounding boundary of the 16-bit format, subnormals included."""
    to_bits, to_float = (
        ("float2half_rn", "half2float") if dtype == F16 else ("float2bfloat16_rn", "bfloat162float")
    )
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    widened = emulated.ops.convert(patterns, to_float)
    expected = patterns.view(dtype).float()
    nan = expected.isnan()
    assert torch.equal(widened.isnan(), nan)
    assert torch.equal(_bits(widened)[~nan], _bits(expected)[~nan])

    # Each finite 16-bit value, the midpoints to its neighbours, and float32 values one unit of
    # float32 either side of those midpoints; plus random float32 bit patterns.
    finite = expected[expected.isfinite()]
    ordered = finite.double().unique()
    mids = (ordered[1:] + ordered[:-1]) / 2
    mids32 = mids.float()
    near = torch.cat([mids32, mids32.nextafter(mids32 + 1), mids32.nextafter(mids32 - 1)])
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (200_000,), generator=g, dtype=torch.int64)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4e38])
    values = torch.cat([finite, near, random_bits.to(torch.int32).view(torch.float32), specials])
    rounded = emulated.ops.convert(values, to_bits).view(dtype)
    expected_rounded = values.to(dtype)
    nan = expected_rounded.isnan()
    assert torch.equal(rounded.isnan(), nan)
    assert torch.equal(_bits(rounded)[~nan], _bits(expected_rounded)[~nan])


def test_cuda_emulation_reads_launch_bounds_from_the_source() -> None:
    """The launcher learns each kernel's ``__launch_bounds__`` from the ``.cu`` file itself."""
    for cu, kernel in (("motion_scan_fwd.cu", "fwd"), ("motion_scan_bwd.cu", "bwd")):
        header = launch_bounds_header((kernel_dir() / cu).read_text(), cu)
        assert f"PKS4EMU_REGISTER_LAUNCH_BOUNDS(motion_scan_{kernel}_kernel, kThreads)" in header
    with pytest.raises(ValueError, match="followed by the kernel's name"):
        launch_bounds_header("__launch_bounds__(128) __global__ void k();", "bad.cu")


# --------------------------------------------------------------------------------------------
# planted bugs: each compiles a copy of the kernel sources with one change and must fail


@dataclass(frozen=True)
class Mutant:
    """A bug planted in the kernel sources, a small case that should reveal it, and what the
    failure must look like: an exception type and a pattern of its message."""

    mutation: Mutation
    case: Case
    direction: str  # "forward" or "backward": which check runs
    error: type[Exception]
    message: str


_MISMATCH = r"Tensor-likes are not close"
MUTANTS: dict[str, Mutant] = {
    # Index arithmetic.
    "thread_pos-channel-off-by-one": Mutant(
        Mutation(
            "cuda_common.cuh",
            "pos.d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;",
            "pos.d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x + 1;",
        ),
        Case((1, 5, 2, 40, 4)),
        "forward",
        AssertionError,
        rf"^y: {_MISMATCH}",
    ),
    "fwd-chunk-one-step-short": Mutant(
        Mutation(
            "motion_scan_fwd.cu",
            "T - s0 < kChunk ? T - s0 : kChunk);",
            "T - s0 < kChunk ? T - s0 : kChunk - 1);",
        ),
        Case((1, 33, 1, 8, 64)),
        "forward",
        AssertionError,
        rf"^y: {_MISMATCH}",
    ),
    "bwd-dBC-partial-offset-without-warp": Mutant(
        Mutation(
            "motion_scan_bwd.cu",
            "(loc * p.bc_partitions + warp_part) * N;",
            "(loc * p.bc_partitions) * N;",
        ),
        Case((1, 5, 1, 70, 4)),
        "backward",
        AssertionError,
        rf"^grad of B: {_MISMATCH}",
    ),
    # Missing barriers: a thread runs ahead of the others over shared memory.
    "fwd-no-barrier-after-load": Mutant(
        Mutation(
            "motion_scan_fwd.cu",
            "load_bc<kMaxN, bc_t>(p, b, l, s0, len, smem_B, smem_C);\n    __syncthreads();\n",
            "load_bc<kMaxN, bc_t>(p, b, l, s0, len, smem_B, smem_C);\n",
        ),
        Case((1, 5, 1, 8, 4)),
        "forward",
        AssertionError,
        rf"^y: {_MISMATCH}",
    ),
    "fwd-no-barrier-before-reload": Mutant(
        Mutation(
            "motion_scan_fwd.cu",
            "    __syncthreads();  // the previous chunk is consumed by every thread\n",
            "",
        ),
        Case((1, 33, 1, 8, 64)),
        "forward",
        AssertionError,
        rf"^y: {_MISMATCH}",
    ),
    "bwd-no-barrier-after-load": Mutant(
        Mutation(
            "motion_scan_bwd.cu",
            "    load_bc<kMaxN, bc_t>(p, b, l, s0, len, smem_B, smem_C);\n    __syncthreads();\n",
            "    load_bc<kMaxN, bc_t>(p, b, l, s0, len, smem_B, smem_C);\n",
        ),
        Case((1, 5, 1, 8, 4)),
        "backward",
        AssertionError,
        rf"^grad of \w+: {_MISMATCH}",
    ),
    "bwd-no-barrier-before-reload": Mutant(
        Mutation(
            "motion_scan_bwd.cu",
            "    __syncthreads();  // the previous segment's B, C are consumed by every thread\n",
            "",
        ),
        Case((1, 10, 1, 8, 4)),
        "backward",
        AssertionError,
        rf"^grad of \w+: {_MISMATCH}",
    ),
    # Warp divergence: lanes past D skip the warp sums that the others wait in.
    "bwd-warp-sum-only-live-lanes": Mutant(
        Mutation(
            "motion_scan_bwd.cu",
            "        // Every lane of the warp takes the shuffles.\n",
            "        if (!live) continue;\n",
        ),
        Case((1, 5, 1, 33, 4)),
        "backward",
        RuntimeError,
        r"thread 33 .* while thread 32 .* waits for it in __shfl_xor_sync\(mask 0xffffffff\)",
    ),
    # The warp sums' butterfly keeping the wrong half: every dB_t / dC_t sum lands on the
    # wrong state.
    "bwd-warp-sum-butterfly-halves": Mutant(
        Mutation(
            "motion_scan_bwd.cu",
            "const bool upper = (lane & offset) != 0;",
            "const bool upper = (lane & offset) == 0;",
        ),
        Case((1, 5, 1, 40, 16)),
        "backward",
        AssertionError,
        rf"^grad of [BC]: {_MISMATCH}",
    ),
    # A block larger than the kernel's __launch_bounds__.
    "fwd-block-beyond-launch-bounds": Mutant(
        Mutation(
            "motion_scan_fwd.cu",
            "grid, kThreads, 0, stream, p);",
            "grid, 2 * kThreads, 0, stream, p);",
        ),
        Case((1, 5, 1, 8, 4)),
        "forward",
        RuntimeError,
        r"motion_scan_fwd: CUDA kernel launch failed: too many resources requested for launch "
        r".* a block of 256 threads exceeds the kernel's __launch_bounds__\(128\)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_cuda_emulation_catches_planted_bug(emulated: EmulatedBuild, mutant: str) -> None:
    """The check passes on the real kernels and fails, as expected, on the mutated copy."""
    m = MUTANTS[mutant]
    check = check_forward if m.direction == "forward" else check_backward
    check(emulated.ops, m.case)
    mutated = build_mutant(mutant, m.mutation)
    with pytest.raises(m.error, match=re.compile(m.message, re.DOTALL)):
        check(mutated.ops, m.case)
