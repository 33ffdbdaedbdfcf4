"""Tests of ``motion_scan``: every backend (the PyTorch one and the compiled kernels) against
the float64 oracle and mamba-ssm's reference, the algebraic properties the docstring promises
(reverse, streaming, independent locations), the memory claim (no per-step states kept for the
backward), backend selection and argument validation. What only the compiled op has (opcheck,
torch.compile, determinism, non-finite values, the build) is in ``test_ops_compiled.py``."""

from __future__ import annotations

import itertools
import sys
from typing import Callable

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from external_refs import load_causal_conv1d_ref
from pks4_layers.ops import available_backends, motion_scan, motion_scan_ref
from pks4_layers.ops.motion_scan import backend_status
from scan_cases import (
    ALL_DTYPES,
    BACKENDS,
    HALF_DTYPES,
    INPUT_NAMES,
    OPTIONAL_NAMES,
    TIME_INPUTS,
    Inputs,
    Shape,
    backend_dtype_params,
    backend_fn,
    backend_params,
    check_against_reference,
    device_for,
    magnitude,
    make_inputs,
    precise_dtype,
    ref_fn,
    run_with_grads,
    scan,
    scan_in_chunks,
    to_device,
    to_float64,
    upstream,
)
from tolerances import assert_close

# --------------------------------------------------------------------------------------------
# against the oracle


SHAPES: list[Shape] = [
    (2, 5, 3, 4, 3),
    (1, 1, 2, 3, 2),  # T = 1: a single step, a single backward segment
    (2, 4, 1, 5, 4),  # L = 1
    (1, 6, 2, 3, 1),  # N = 1
    (3, 7, 5, 6, 5),  # odd sizes; 7 steps = segments of 3, 3, 1 in the backward
    (1, 10, 3, 2, 4),  # 10 steps = segments of 4, 4, 2
    # D = 35: the CPU kernel runs channels in blocks of 32, so a full block and a partial one.
    (1, 9, 2, 35, 3),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(("backend", "dtype"), backend_dtype_params(BACKENDS, ALL_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_reference(
    shape: Shape, backend: str, dtype: torch.dtype, reverse: bool
) -> None:
    inputs = make_inputs(shape, dtype, seed=sum(shape))
    check_against_reference(inputs, backend, reverse=reverse)


OPTION_COMBOS = list(itertools.product([False, True], repeat=6))


def _combo_id(combo: tuple[bool, ...]) -> str:
    names = ("D", "z", "bias", "init", "softplus", "reverse")
    return "-".join(n if on else f"no{n}" for n, on in zip(names, combo))


# Every optional input and flag is its own code path in the compiled kernels (a null pointer, a
# branch), so the whole product runs for each backend; the shapes are tiny.
@pytest.mark.parametrize(
    ("backend", "dtype"),
    backend_dtype_params(("torch", "cpu"), (torch.float64, torch.bfloat16))
    + backend_dtype_params(("cuda",), (torch.float32, torch.bfloat16)),
)
@pytest.mark.parametrize("combo", OPTION_COMBOS, ids=_combo_id)
def test_backend_matches_reference_options(
    combo: tuple[bool, ...], backend: str, dtype: torch.dtype
) -> None:
    *present, softplus, reverse = combo
    optionals = tuple(n for n, on in zip(OPTIONAL_NAMES, present) if on)
    inputs = make_inputs(
        (2, 5, 3, 4, 3), dtype, seed=7, optionals=optionals, positive_delta=not softplus
    )
    check_against_reference(inputs, backend, delta_softplus=softplus, reverse=reverse)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_ref_backend_matches_reference(dtype: torch.dtype) -> None:
    # backend="ref" is the oracle behind validation; in low precision it still must agree with
    # the float64 run (it computes in float32).
    check_against_reference(make_inputs((2, 5, 3, 4, 3), dtype, seed=3), backend="ref")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", INPUT_NAMES)
def test_gradient_of_each_input_alone(name: str, backend: str) -> None:
    # Only one input requires grad: the backward must not depend on the others' needs.
    inputs = make_inputs((2, 5, 3, 4, 3), torch.float32, seed=11)
    grad_y, grad_last = upstream(inputs, 11)
    _, _, grads = run_with_grads(
        backend_fn(backend), inputs, grad_y, grad_last, requires_grad=(name,)
    )
    _, _, grads_ref = run_with_grads(
        ref_fn, to_float64(inputs), grad_y.double(), grad_last.double(), requires_grad=(name,)
    )
    assert list(grads) == [name]
    assert_close(grads[name], grads_ref[name], scale=magnitude(grads_ref[name]))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("used", ["y", "last"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradient_through_one_output_only(used: str, reverse: bool, backend: str) -> None:
    # The other output's gradient reaches the backward as None.
    inputs = make_inputs((2, 6, 3, 4, 3), precise_dtype(backend), seed=5)
    grad_y, grad_last = upstream(inputs, 5)
    if used == "y":
        grad_last = None
    else:
        grad_y = None
    _, _, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last, reverse=reverse)
    _, _, grads_ref = run_with_grads(
        ref_fn,
        to_float64(inputs),
        None if grad_y is None else grad_y.double(),
        None if grad_last is None else grad_last.double(),
        reverse=reverse,
    )
    for name in INPUT_NAMES:
        expected = grads_ref[name]
        actual = grads[name]
        if expected is None:  # e.g. z and D do not reach the last state
            assert actual is None or not actual.any(), name
        else:
            assert_close(actual, expected, scale=magnitude(expected), msg=name)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_inputs(backend: str) -> None:
    # Feature maps often arrive as permuted views; results must not depend on the strides.
    inputs = make_inputs((2, 5, 3, 4, 3), torch.float32, seed=2)
    strided = {
        k: (v.transpose(1, 2).contiguous().transpose(1, 2) if v is not None and v.dim() == 4 else v)
        for k, v in inputs.items()
    }
    assert not strided["u"].is_contiguous()
    check_against_reference(strided, backend)


# --------------------------------------------------------------------------------------------
# gradcheck


# float64 only: "cuda" has no float64 kernel and is covered by the comparisons above.
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", ["torch", "ref", "cpu"])
def test_gradcheck(backend: str, reverse: bool) -> None:
    # T = 3 makes the backward of the torch and cpu backends replay two segments (2 + 1 steps).
    device_for(backend)
    inputs = make_inputs((2, 3, 2, 2, 2), torch.float64, seed=13)
    leaves = tuple(inputs[k].detach().clone().requires_grad_() for k in INPUT_NAMES)

    def fn(*args: Tensor) -> tuple[Tensor, Tensor]:
        return motion_scan(
            *args[:8],
            initial_state=args[8],
            reverse=reverse,
            return_last_state=True,
            backend=backend,
        )

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_without_softplus(backend: str) -> None:
    device_for(backend)
    inputs = make_inputs((1, 4, 2, 2, 3), torch.float64, seed=17, positive_delta=True)
    leaves = tuple(inputs[k].detach().clone().requires_grad_() for k in INPUT_NAMES)

    def fn(*args: Tensor) -> tuple[Tensor, Tensor]:
        return motion_scan(
            *args[:8],
            delta_softplus=False,
            initial_state=args[8],
            return_last_state=True,
            backend=backend,
        )

    assert torch.autograd.gradcheck(fn, leaves)


# --------------------------------------------------------------------------------------------
# mixed precision


@pytest.mark.parametrize(("backend", "dtype"), backend_dtype_params(BACKENDS, HALF_DTYPES))
def test_float32_B_C_with_half_activations(backend: str, dtype: torch.dtype) -> None:
    inputs = make_inputs(
        (2, 5, 3, 4, 3), dtype, seed=19, bc_dtype=torch.float32, param_dtype=torch.float32
    )
    check_against_reference(inputs, backend)
    # The grads of B and C were compared in float32 (their own dtype) above; check the dtypes
    # the caller gets back explicitly too.
    y, _, grads = run_with_grads(
        backend_fn(backend),
        inputs,
        torch.ones(2, 5, 3, 4, dtype=dtype),
        None,
    )
    assert y.dtype == dtype
    assert grads["u"].dtype == grads["delta"].dtype == grads["z"].dtype == dtype
    assert grads["B"].dtype == grads["C"].dtype == grads["A"].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# against mamba-ssm's selective_scan_ref


def _to_mamba(inputs: Inputs) -> Inputs:
    """(batch, T, L, ...) -> mamba's (batch * L, ..., T)."""
    out = dict(inputs)
    for name in ("u", "delta", "z"):
        if inputs[name] is not None:
            out[name] = rearrange(inputs[name], "b t l d -> (b l) d t")
    for name in ("B", "C"):
        out[name] = rearrange(inputs[name], "b t l n -> (b l) n t")
    return out


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "nosoftplus"])
@pytest.mark.parametrize("optionals", [("D", "z", "delta_bias"), ()], ids=["D-z-bias", "bare"])
@pytest.mark.parametrize("backend", backend_params())
def test_matches_mamba_selective_scan_ref(
    mamba_selective_scan_ref: Callable,
    backend: str,
    optionals: tuple[str, ...],
    softplus: bool,
    reverse: bool,
) -> None:
    # mamba's reference computes in float32 (it calls .float()), so compare in float32.
    batch, _, _, Dm, N = shape = (2, 6, 3, 4, 5)
    inputs = make_inputs(
        shape, torch.float32, seed=23, optionals=optionals, positive_delta=not softplus
    )
    # S4D-real initialisation, as in Mamba: A[d, n] = -(n + 1).
    inputs["A"] = -torch.arange(1, N + 1, dtype=torch.float32).repeat(Dm, 1)
    names = [k for k, v in inputs.items() if v is not None]

    leaves = {k: inputs[k].clone().requires_grad_() for k in names}
    y, last = scan(leaves, backend, delta_softplus=softplus, reverse=reverse)

    mamba_leaves = {k: inputs[k].clone().requires_grad_() for k in names}
    m = _to_mamba({**inputs, **mamba_leaves})
    if reverse:  # mamba has no reverse: scan the time-flipped sequence
        m = {
            k: (v.flip(-1) if k in ("u", "delta", "z", "B", "C") and v is not None else v)
            for k, v in m.items()
        }
    y_m, last_m = mamba_selective_scan_ref(
        m["u"],
        m["delta"],
        m["A"],
        m["B"],
        m["C"],
        D=m["D"],
        z=m["z"],
        delta_bias=m["delta_bias"],
        delta_softplus=softplus,
        return_last_state=True,
    )
    if reverse:
        y_m = y_m.flip(-1)
    y_m = rearrange(y_m, "(b l) d t -> b t l d", b=batch)
    last_m = rearrange(last_m, "(b l) d n -> b l d n", b=batch)
    assert_close(y, y_m, scale=magnitude(y_m))
    assert_close(last, last_m, scale=magnitude(last_m))

    grad_y, grad_last = upstream(inputs, 23)
    grads = torch.autograd.grad((y, last), [leaves[k] for k in names], (grad_y, grad_last))
    grads_m = torch.autograd.grad(
        (y_m, last_m), [mamba_leaves[k] for k in names], (grad_y, grad_last)
    )
    for name, g, g_m in zip(names, grads, grads_m):
        assert_close(g, g_m, scale=magnitude(g_m), msg=f"grad of {name}")


def test_loading_external_references_leaves_no_stand_ins(mamba_selective_scan_ref) -> None:
    # The interface files are loaded with stand-in modules in sys.modules; none may stay there
    # (a stand-in has no __file__, a real module does), or later imports would get them.
    load_causal_conv1d_ref()
    prefixes = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda")
    leftovers = [
        name
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in prefixes and getattr(module, "__file__", None) is None
    ]
    assert leftovers == []
    assert "causal_conv1d_fn" in mamba_selective_scan_ref.__globals__
    # Its optional causal_conv1d import failed cleanly (ImportError), not half-way.
    assert mamba_selective_scan_ref.__globals__["causal_conv1d_fn"] is None


# --------------------------------------------------------------------------------------------
# properties


PROPERTY_BACKENDS = backend_params("torch", "ref", "cpu", "cuda")


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
def test_reverse_is_flip_scan_flip(backend: str) -> None:
    inputs = make_inputs((2, 7, 3, 4, 3), precise_dtype(backend), seed=29)
    flipped = {k: (v.flip(1) if k in TIME_INPUTS else v) for k, v in inputs.items()}
    grad_y, grad_last = upstream(inputs, 29)
    y, last, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last, reverse=True)
    y_f, last_f, grads_f = run_with_grads(backend_fn(backend), flipped, grad_y.flip(1), grad_last)
    assert_close(y, y_f.flip(1))
    assert_close(last, last_f)
    for name in INPUT_NAMES:
        expected = grads_f[name].flip(1) if name in TIME_INPUTS else grads_f[name]
        assert_close(grads[name], expected, scale=magnitude(expected), msg=name)


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("bounds", [[0, 4, 9], [0, 3, 6, 9], [0, 1, 8, 9]], ids=str)
def test_streaming_in_chunks_equals_one_call(
    bounds: list[int], reverse: bool, backend: str
) -> None:
    inputs = make_inputs((2, 9, 3, 4, 3), precise_dtype(backend), seed=31)
    grad_y, grad_last = upstream(inputs, 31)

    def chunked(**kwargs) -> tuple[Tensor, Tensor]:
        return scan_in_chunks(kwargs, bounds, reverse, backend)

    y, last, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last, reverse=reverse)
    # The gradients of the chunked run flow through the carried states into the earlier chunks
    # and into initial_state.
    y_c, last_c, grads_c = run_with_grads(chunked, inputs, grad_y, grad_last)
    assert_close(y_c, y)
    assert_close(last_c, last)
    for name in INPUT_NAMES:
        assert_close(grads_c[name], grads[name], scale=magnitude(grads[name]), msg=name)


@pytest.mark.parametrize("backend", backend_params())
def test_streaming_with_float32_state_from_half_inputs(backend: str) -> None:
    # Under mixed precision the carried state stays float32, so chunking loses nothing.
    inputs = make_inputs((2, 8, 3, 4, 3), torch.bfloat16, seed=37)
    y, last = scan(inputs, backend)
    y_c, last_c = scan_in_chunks(inputs, [0, 3, 8], reverse=False, backend=backend)
    assert last_c.dtype == torch.float32
    assert_close(y_c, y)
    assert_close(last_c, last)


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
def test_locations_are_independent(backend: str) -> None:
    inputs = make_inputs((2, 5, 6, 4, 3), precise_dtype(backend), seed=41)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(41))
    permuted = {
        k: (v[:, :, perm] if k in TIME_INPUTS else v[:, perm] if k == "initial_state" else v)
        for k, v in inputs.items()
    }
    y, last = scan(inputs, backend)
    y_p, last_p = scan(permuted, backend)
    assert_close(y_p, y[:, :, perm])
    assert_close(last_p, last[:, perm])

    # Changing every input at location 0 leaves the other locations bit-for-bit unchanged.
    changed = {k: (v.clone() if v is not None else None) for k, v in inputs.items()}
    for k in TIME_INPUTS:
        changed[k][:, :, 0] += 1.0
    changed["initial_state"][:, 0] += 1.0
    y_c, last_c = scan(changed, backend)
    assert torch.equal(y_c[:, :, 1:], y[:, :, 1:])
    assert torch.equal(last_c[:, 1:], last[:, 1:])
    assert not torch.equal(y_c[:, :, 0], y[:, :, 0])


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
def test_optional_defaults_are_neutral(backend: str) -> None:
    # D=None is D=0, z=None is no gate, delta_bias=None is a zero bias, no initial_state is zeros.
    shape = (2, 5, 3, 4, 3)
    dtype = precise_dtype(backend)
    full = make_inputs(shape, dtype, seed=43)
    bare = make_inputs(shape, dtype, seed=43, optionals=())
    y, last = scan(bare, backend)
    y0, last0 = scan(
        {
            **bare,
            "D": torch.zeros_like(full["D"]),
            "delta_bias": torch.zeros_like(full["delta_bias"]),
            "initial_state": torch.zeros_like(full["initial_state"]),
        },
        backend,
    )
    assert_close(y, y0)
    assert_close(last, last0)
    # return_last_state=False: y alone.
    present = to_device({k: v for k, v in bare.items() if v is not None}, device_for(backend))
    assert torch.equal(motion_scan(**present, backend=backend).cpu(), y)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    T=st.integers(1, 12),
    L=st.integers(1, 3),
    Dm=st.integers(1, 4),
    N=st.integers(1, 4),
    softplus=st.booleans(),
    reverse=st.booleans(),
    optionals=st.sets(st.sampled_from(OPTIONAL_NAMES)),
    seed=st.integers(0, 2**16),
)
def test_random_configurations_match_reference(
    backend: str,
    batch: int,
    T: int,
    L: int,
    Dm: int,
    N: int,
    softplus: bool,
    reverse: bool,
    optionals: set[str],
    seed: int,
) -> None:
    inputs = make_inputs(
        (batch, T, L, Dm, N),
        torch.float64,
        seed=seed,
        optionals=tuple(optionals),
        positive_delta=not softplus,
    )
    check_against_reference(inputs, backend, seed=seed, delta_softplus=softplus, reverse=reverse)


# --------------------------------------------------------------------------------------------
# memory


def _bytes_saved_for_backward(backend: str, inputs: Inputs) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    device = device_for(backend)
    leaves = {k: v.detach().clone().to(device).requires_grad_() for k, v in inputs.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, last = motion_scan(**leaves, return_last_state=True, backend=backend)
    # The saved tensors must still be enough for the backward.
    (y.sum() + last.sum()).backward()
    assert all(v.grad is not None for v in leaves.values())
    return total


@pytest.mark.parametrize("backend", backend_params())
def test_backend_does_not_keep_per_step_states(backend: str) -> None:
    batch, T, L, Dm, N = shape = (2, 16, 4, 8, 16)
    inputs = make_inputs(shape, torch.float32, seed=47)
    all_states = batch * T * L * Dm * N * torch.float32.itemsize
    saved = _bytes_saved_for_backward(backend, inputs)
    saved_ref = _bytes_saved_for_backward("ref", inputs)
    assert saved < all_states
    # The reference's autograd keeps the per-step states: the bound above can fail.
    assert saved_ref > all_states


# --------------------------------------------------------------------------------------------
# backend selection


def test_available_backends() -> None:
    available = set(available_backends())
    assert {"torch", "ref"} <= available
    # The compiled CPU kernel is built for the tests (on first use if need be).
    assert "cpu" in available, backend_status("cpu")[1]
    assert ("cuda" in available) <= torch.cuda.is_available()


def test_env_var_forces_ref_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs((2, 5, 3, 4, 3), torch.float32, seed=53)
    expected, expected_last = motion_scan_ref(**inputs, return_last_state=True)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref_node = type(motion_scan(**leaves, backend="ref").grad_fn)
    torch_node = type(motion_scan(**leaves, backend="torch").grad_fn)
    assert ref_node is not torch_node

    # Without the variable, "auto" on CPU tensors is the compiled kernel when it loads (else
    # the torch backend, after a warning: see test_ops_compiled.py).
    monkeypatch.delenv("PKS4_BACKEND", raising=False)
    auto = "cpu" if backend_status("cpu")[0] else "torch"
    auto_node = type(motion_scan(**leaves, backend=auto).grad_fn)
    assert auto_node is not ref_node
    assert type(motion_scan(**leaves).grad_fn) is auto_node
    assert torch.equal(motion_scan(**inputs), motion_scan(**inputs, backend=auto))

    monkeypatch.setenv("PKS4_BACKEND", "torch")
    assert type(motion_scan(**leaves).grad_fn) is torch_node

    monkeypatch.setenv("PKS4_BACKEND", "ref")
    y, last = motion_scan(**inputs, return_last_state=True, backend="auto")
    assert torch.equal(y, expected)
    assert torch.equal(last, expected_last)
    assert type(motion_scan(**leaves).grad_fn) is ref_node
    # An explicit backend is not overridden.
    assert type(motion_scan(**leaves, backend="torch").grad_fn) is torch_node


def test_env_var_with_unknown_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs((1, 2, 1, 2, 2), torch.float32)
    monkeypatch.setenv("PKS4_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match=r"^PKS4_BACKEND: .*no-such-backend"):
        motion_scan(**inputs)
    motion_scan(**inputs, backend="torch")  # only "auto" consults the variable


# --------------------------------------------------------------------------------------------
# validation

# batch, T, L, D, N all distinct, so that every mismatch is visible.
BAD_SHAPE: Shape = (2, 3, 4, 5, 6)


def _with(**changes: object) -> Callable[[Inputs], Inputs]:
    """A mutation of the valid arguments: each value is a function of the old value."""

    def mutate(inputs: Inputs) -> Inputs:
        return {**inputs, **{k: f(inputs[k]) for k, f in changes.items()}}  # type: ignore[operator]

    return mutate


def _grow(dim: int) -> Callable[[Tensor], Tensor]:
    """One more element along ``dim``."""

    def f(t: Tensor) -> Tensor:
        size = list(t.shape)
        size[dim] += 1
        return torch.zeros(size, dtype=t.dtype)

    return f


def _as(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    return lambda t: t.to(dtype)


BAD_CALLS = [
    # (id, mutation, backend, exception, argument named in the message)
    ("u-rank3", _with(u=lambda t: t[0]), ValueError, "u"),
    ("u-rank5", _with(u=lambda t: t[..., None]), ValueError, "u"),
    ("u-not-tensor", _with(u=lambda t: t.tolist()), TypeError, "u"),
    ("u-int", _with(u=_as(torch.int32)), ValueError, "u"),
    ("u-complex", _with(u=_as(torch.complex64)), ValueError, "u"),
    ("u-T0", _with(u=lambda t: t[:, :0]), ValueError, "u"),
    ("delta-batch", _with(delta=_grow(0)), ValueError, "delta"),
    ("delta-T", _with(delta=_grow(1)), ValueError, "delta"),
    ("delta-L", _with(delta=_grow(2)), ValueError, "delta"),
    ("delta-D", _with(delta=_grow(3)), ValueError, "delta"),
    ("delta-not-tensor", _with(delta=lambda t: 0.5), TypeError, "delta"),
    ("delta-dtype", _with(delta=_as(torch.float64)), ValueError, "delta"),
    ("delta-int", _with(delta=_as(torch.int64)), ValueError, "delta"),
    ("delta-device", _with(delta=lambda t: t.to("meta")), ValueError, "delta"),
    ("A-rank1", _with(A=lambda t: t[:, 0]), ValueError, "A"),
    ("A-D", _with(A=_grow(0)), ValueError, "A"),
    ("A-N0", _with(A=lambda t: t[:, :0]), ValueError, "A"),
    ("A-not-tensor", _with(A=lambda t: t.tolist()), TypeError, "A"),
    ("A-int", _with(A=_as(torch.int64)), ValueError, "A"),
    ("B-batch", _with(B=_grow(0)), ValueError, "B"),
    ("B-T", _with(B=_grow(1)), ValueError, "B"),
    ("B-L", _with(B=_grow(2)), ValueError, "B"),
    ("B-N", _with(B=_grow(3)), ValueError, "B"),
    ("B-int", _with(B=_as(torch.int64)), ValueError, "B"),
    ("B-not-tensor", _with(B=lambda t: None), TypeError, "B"),
    ("C-batch", _with(C=_grow(0)), ValueError, "C"),
    ("C-T", _with(C=_grow(1)), ValueError, "C"),
    ("C-L", _with(C=_grow(2)), ValueError, "C"),
    ("C-N", _with(C=_grow(3)), ValueError, "C"),
    ("C-dtype", _with(C=_as(torch.float64)), ValueError, "C"),
    ("B-C-float16", _with(B=_as(torch.float16), C=_as(torch.float16)), ValueError, "B"),
    ("B-C-float64", _with(B=_as(torch.float64), C=_as(torch.float64)), ValueError, "B"),
    ("z-T", _with(z=_grow(1)), ValueError, "z"),
    ("z-L", _with(z=_grow(2)), ValueError, "z"),
    ("z-D", _with(z=_grow(3)), ValueError, "z"),
    ("z-dtype", _with(z=_as(torch.bfloat16)), ValueError, "z"),
    ("D-shape", _with(D=_grow(0)), ValueError, "D"),
    ("D-rank2", _with(D=lambda t: t[None]), ValueError, "D"),
    ("D-int", _with(D=_as(torch.int64)), ValueError, "D"),
    ("delta_bias-shape", _with(delta_bias=_grow(0)), ValueError, "delta_bias"),
    ("delta_bias-rank2", _with(delta_bias=lambda t: t[:, None]), ValueError, "delta_bias"),
    ("initial_state-batch", _with(initial_state=_grow(0)), ValueError, "initial_state"),
    ("initial_state-L", _with(initial_state=_grow(1)), ValueError, "initial_state"),
    ("initial_state-D", _with(initial_state=_grow(2)), ValueError, "initial_state"),
    ("initial_state-N", _with(initial_state=_grow(3)), ValueError, "initial_state"),
    (
        "initial_state-with-T",
        _with(initial_state=lambda t: t[:, None]),
        ValueError,
        "initial_state",
    ),
]


# The arguments are checked before a backend is chosen: the compiled one raises the same errors.
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    ("mutate", "exc", "name"),
    [pytest.param(m, e, n, id=i) for i, m, e, n in BAD_CALLS],
)
def test_invalid_arguments(
    mutate: Callable[[Inputs], Inputs], exc: type, name: str, backend: str
) -> None:
    inputs = mutate(make_inputs(BAD_SHAPE, torch.float32))
    # The message starts with the offending argument's name.
    with pytest.raises(exc, match=rf"^{name}: "):
        motion_scan(**inputs, backend=backend)


def test_unknown_backend_name() -> None:
    inputs = make_inputs((1, 2, 1, 2, 2), torch.float32)
    with pytest.raises(ValueError, match=r"^backend: .*'cuda-fast'"):
        motion_scan(**inputs, backend="cuda-fast")


@pytest.mark.parametrize(("backend", "dtype"), backend_dtype_params(BACKENDS, HALF_DTYPES))
def test_float32_B_C_allowed_with_half_u(backend: str, dtype: torch.dtype) -> None:
    # The one dtype mix validation allows: B and C in float32 under mixed precision.
    inputs = make_inputs((1, 2, 1, 2, 2), dtype, bc_dtype=torch.float32)
    y, last = scan(inputs, backend)
    assert y.dtype == dtype
    assert last.dtype == torch.float32
