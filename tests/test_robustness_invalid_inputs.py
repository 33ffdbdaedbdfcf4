"""Invalid, empty and poisoned inputs to ``motion_scan`` and the three layers, table-driven.

``tests/test_ops_motion_scan.py::test_invalid_arguments`` already covers the wrong ranks, the
mismatched batch/T/L/D/N of each argument, integer and complex dtypes and the activation dtype
mixes; the cases here are the ones it leaves out: the sign of ``A`` (a decay), the devices of the
other arguments, non-tensor optionals, half-precision mixes, flags that are not bools. The rules:

* an invalid argument is a ``ValueError`` (or ``TypeError`` for a wrong Python type) whose
  message starts with the argument's name and says what was expected;
* ``A`` must hold decay rates, entries ``<= 0``: a positive entry grows the state by
  ``exp(dt * A)`` per step and overflows a long scan, so ``motion_scan`` refuses it (one cheap
  reduction; skipped where values cannot be read: under ``torch.compile`` tracing, fake and meta
  tensors, inside ``vmap``);
* an empty batch (or no locations, or no channels) is legal for the op: every backend returns
  empty outputs, and zero gradients for the parameters. The layers refuse an empty batch with
  a ``ValueError`` (their reshapes cannot infer a size from zero elements);
* a NaN or an infinity in any argument is legal but poisoned: no error, no crash, and the NaN
  reaches exactly the outputs that depend on it (the same ones on every backend).
"""

from __future__ import annotations

import importlib
from typing import Callable

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from pks4_layers.layers import KinematicPriorEncoder, ParallelTemporalScan, PKS4Block
from pks4_layers.layers._checks import check_same_dtype
from pks4_layers.ops import motion_scan, motion_scan_ref
from scan_cases import (
    INPUT_NAMES,
    Inputs,
    backend_fn,
    backend_params,
    check_against_reference,
    device_for,
    make_inputs,
    ref_fn,
    run_with_grads,
    state_dtype,
    upstream,
)
from tolerances import assert_close

# batch, T, L, D, N all distinct, so that every mismatch is visible.
SHAPE = (2, 3, 4, 5, 6)
VALIDATING_BACKENDS = ("torch", "ref", "cpu")


def _set(name: str, f: Callable[[Tensor], object]) -> Callable[[Inputs], Inputs]:
    return lambda inputs: {**inputs, name: f(inputs[name])}  # type: ignore[arg-type]


def _poke(value: float, index: tuple = (0, 0)) -> Callable[[Tensor], Tensor]:
    """A copy with one entry replaced."""

    def f(t: Tensor) -> Tensor:
        t = t.clone()
        t[index] = value
        return t

    return f


# (id, mutation, exception, message pattern after "^")
BAD_CALLS = [
    # A is a decay rate
    (
        "A-one-positive-entry",
        _set("A", _poke(0.5)),
        ValueError,
        r"A: expected entries <= 0 \(decay rates\), got max 0\.5$",
    ),
    ("A-all-positive", _set("A", lambda t: -t), ValueError, r"A: expected entries <= 0"),
    ("A-plus-inf", _set("A", _poke(float("inf"))), ValueError, r"A: expected entries <= 0 .*inf"),
    ("A-tiny-positive", _set("A", _poke(1e-30)), ValueError, r"A: expected entries <= 0"),
    # devices: every argument against u's ("meta" is the other device every machine has)
    ("A-device", _set("A", lambda t: t.to("meta")), ValueError, r"A: expected device cpu"),
    ("B-device", _set("B", lambda t: t.to("meta")), ValueError, r"B: expected device cpu"),
    ("C-device", _set("C", lambda t: t.to("meta")), ValueError, r"C: expected device cpu"),
    ("D-device", _set("D", lambda t: t.to("meta")), ValueError, r"D: expected device cpu"),
    ("z-device", _set("z", lambda t: t.to("meta")), ValueError, r"z: expected device cpu"),
    (
        "delta_bias-device",
        _set("delta_bias", lambda t: t.to("meta")),
        ValueError,
        r"delta_bias: expected device cpu",
    ),
    (
        "initial_state-device",
        _set("initial_state", lambda t: t.to("meta")),
        ValueError,
        r"initial_state: expected device cpu",
    ),
    (
        "u-device",
        _set("u", lambda t: t.to("meta")),
        ValueError,
        r"delta: expected device meta \(that of u\), got cpu",
    ),
    # Python types
    ("C-not-tensor", _set("C", lambda t: t.tolist()), TypeError, r"C: expected a torch\.Tensor"),
    ("D-not-tensor", _set("D", lambda t: t.tolist()), TypeError, r"D: expected a torch\.Tensor"),
    ("z-not-tensor", _set("z", lambda t: 1.0), TypeError, r"z: expected a torch\.Tensor"),
    (
        "delta_bias-not-tensor",
        _set("delta_bias", lambda t: 0.1),
        TypeError,
        r"delta_bias: expected a torch\.Tensor",
    ),
    (
        "initial_state-not-tensor",
        _set("initial_state", lambda t: t.numpy()),
        TypeError,
        r"initial_state: expected a torch\.Tensor",
    ),
    ("u-numpy", _set("u", lambda t: t.numpy()), TypeError, r"u: expected a torch\.Tensor"),
    # dtypes
    ("u-bool", _set("u", lambda t: t > 0), ValueError, r"u: expected a floating dtype"),
    ("z-int", _set("z", lambda t: t.int()), ValueError, r"z: expected a floating dtype"),
    ("C-int", _set("C", lambda t: t.int()), ValueError, r"C: expected a floating dtype"),
    (
        "delta_bias-int",
        _set("delta_bias", lambda t: t.long()),
        ValueError,
        r"delta_bias: expected a floating dtype",
    ),
    (
        "initial_state-int",
        _set("initial_state", lambda t: t.long()),
        ValueError,
        r"initial_state: expected a floating dtype",
    ),
    (
        "C-half-with-float32-B",
        _set("C", lambda t: t.half()),
        ValueError,
        r"C: expected dtype torch\.float32 \(that of B\), got torch\.float16",
    ),
    # shapes the existing table leaves out
    ("z-batch", _set("z", lambda t: t[:1]), ValueError, r"z: expected shape \(2, 3, 4, 5\)"),
    ("D-scalar", _set("D", lambda t: t[0]), ValueError, r"D: expected shape \(5,\), got \(\)"),
    ("u-scalar", _set("u", lambda t: t[0, 0, 0, 0]), ValueError, r"u: expected 4 dims"),
    (
        "delta-transposed",
        _set("delta", lambda t: t.transpose(2, 3)),
        ValueError,
        r"delta: expected shape \(2, 3, 4, 5\), got \(2, 3, 5, 4\)",
    ),
    (
        "B-with-D-columns",
        _set("B", lambda t: t[..., :5]),
        ValueError,
        r"B: expected shape \(2, 3, 4, 6\)",
    ),
]

HALF_MIXES = [
    # (id, dtype of u, mutation, message pattern): half activations mixed with another half
    (
        "bf16-u-fp16-delta",
        torch.bfloat16,
        _set("delta", lambda t: t.half()),
        r"delta: expected dtype torch\.bfloat16 \(that of u\), got torch\.float16",
    ),
    (
        "fp16-u-bf16-BC",
        torch.float16,
        lambda i: {**i, "B": i["B"].bfloat16(), "C": i["C"].bfloat16()},
        r"B: expected dtype torch\.float16 \(that of u\) or torch\.float32, got torch\.bfloat16",
    ),
    (
        "fp16-u-fp32-z",
        torch.float16,
        _set("z", lambda t: t.float()),
        r"z: expected dtype torch\.float16 \(that of u\), got torch\.float32",
    ),
]


# The arguments are checked before a backend is chosen: every backend raises the same error.
@pytest.mark.parametrize("backend", VALIDATING_BACKENDS)
@pytest.mark.parametrize(
    ("mutate", "exc", "pattern"), [pytest.param(m, e, p, id=i) for i, m, e, p in BAD_CALLS]
)
def test_invalid_argument_is_named_in_the_error(mutate, exc, pattern, backend: str) -> None:
    """Each invalid argument gives an error that starts with its name and the expectation."""
    inputs = mutate(make_inputs(SHAPE, torch.float32))
    with pytest.raises(exc, match=rf"^{pattern}"):
        motion_scan(**inputs, backend=backend)


@pytest.mark.parametrize("backend", VALIDATING_BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "mutate", "pattern"), [pytest.param(d, m, p, id=i) for i, d, m, p in HALF_MIXES]
)
def test_mixed_half_precision_dtypes_are_refused(dtype, mutate, pattern, backend: str) -> None:
    """float16 and bfloat16 never mix: only float32 B and C may join half activations."""
    inputs = mutate(make_inputs(SHAPE, dtype))
    with pytest.raises(ValueError, match=rf"^{pattern}"):
        motion_scan(**inputs, backend=backend)


@pytest.mark.parametrize("flag", ["delta_softplus", "reverse"])
@pytest.mark.parametrize("value", ["yes", 1, None], ids=["str", "int", "None"])
def test_flags_must_be_bools(flag: str, value: object) -> None:
    """A truthy non-bool is refused up front: the compiled op's schema takes a bool only."""
    inputs = make_inputs(SHAPE, torch.float32)
    with pytest.raises(TypeError, match=rf"^{flag}: expected a bool, got {type(value).__name__}"):
        motion_scan(**inputs, **{flag: value}, backend="torch")


@pytest.mark.parametrize("backend", [None, 3, "CPU"], ids=["None", "int", "upper-case"])
def test_backend_must_be_a_known_name(backend: object) -> None:
    inputs = make_inputs(SHAPE, torch.float32)
    with pytest.raises(ValueError, match=r"^backend: expected 'auto' or one of"):
        motion_scan(**inputs, backend=backend)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [n for n in INPUT_NAMES if n != "u"])
def test_argument_on_cpu_with_u_on_cuda(name: str) -> None:
    """The real cross-device mix: one argument left on the CPU while u is on the GPU."""
    inputs = {k: v.cuda() for k, v in make_inputs(SHAPE, torch.float32).items()}
    inputs[name] = inputs[name].cpu()
    with pytest.raises(ValueError, match=rf"^{name}: expected device cuda"):
        motion_scan(**inputs, backend="torch")


# --------------------------------------------------------------------------------------------
# the sign of A: what is accepted, and where the check is skipped


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("value", [0.0, -0.0], ids=["zero", "negative-zero"])
def test_zero_decay_is_accepted(backend: str, value: float) -> None:
    """``A == 0`` (a state that never decays, a pure accumulator) is on the legal side."""
    inputs = make_inputs(SHAPE, torch.float64 if backend != "cuda" else torch.float32)
    inputs["A"] = torch.full_like(inputs["A"], value)
    check_against_reference(inputs, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decay_below_the_smallest_normal_is_accepted(backend: str, dtype: torch.dtype) -> None:
    """A decay rate of -1e-39 (a denormal in float32 and bfloat16, flushed to zero by some
    arithmetic) is still <= 0: accepted, and scanned like any other."""
    inputs = make_inputs(SHAPE, dtype)
    inputs["A"] = torch.full_like(inputs["A"], -1e-39)
    assert (inputs["A"] < 0).all()
    check_against_reference(inputs, backend)


def test_decay_check_is_skipped_for_fake_tensors() -> None:
    """Under a fake-tensor trace there are no values to read: the check must not try (it would
    raise), and shapes still propagate."""
    inputs = make_inputs(SHAPE, torch.float32)
    inputs["A"] = inputs["A"].abs()  # would be refused in eager mode
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in inputs.items()}
        y = motion_scan(**fake, backend="torch")
    assert y.shape == inputs["u"].shape


def test_decay_check_is_skipped_for_meta_tensors() -> None:
    """Meta tensors (shape-only dry runs) pass validation without reading ``A``."""
    inputs = {k: v.to("meta") for k, v in make_inputs(SHAPE, torch.float32).items()}
    y, last = motion_scan(**inputs, backend="ref", return_last_state=True)
    assert y.device.type == "meta" and y.shape == inputs["u"].shape
    assert last.shape == (2, 4, 5, 6)


def test_decay_check_works_inside_vmap() -> None:
    """``vmap`` over independent problems: a batched ``A`` cannot be read inside the transform
    (the check steps aside), an unbatched one is checked; both give the per-problem results."""
    problems = [make_inputs(SHAPE, torch.float64, seed=s) for s in (1, 2)]
    stacked = {k: torch.stack([p[k] for p in problems]) for k in problems[0]}
    expected = torch.stack([motion_scan(**p, backend="ref") for p in problems])

    def scan_one(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return motion_scan(
            u, delta, A, B, C, D, z, delta_bias, initial_state=initial_state, backend="ref"
        )

    names = list(stacked)
    batched = torch.func.vmap(scan_one)(*(stacked[k] for k in names))
    torch.testing.assert_close(batched, expected)

    shared = {**stacked, "A": problems[0]["A"]}
    in_dims = tuple(None if k == "A" else 0 for k in names)
    expected_shared = torch.stack(
        [motion_scan(**{**p, "A": problems[0]["A"]}, backend="ref") for p in problems]
    )
    out = torch.func.vmap(scan_one, in_dims=in_dims)(*(shared[k] for k in names))
    torch.testing.assert_close(out, expected_shared)
    with pytest.raises(ValueError, match=r"^A: expected entries <= 0"):
        torch.func.vmap(scan_one, in_dims=in_dims)(
            *((shared[k] if k != "A" else shared[k].abs()) for k in names)
        )


# --------------------------------------------------------------------------------------------
# empty inputs


@pytest.mark.parametrize("backend", backend_params("torch", "ref", "cpu", "cuda"))
@pytest.mark.parametrize(
    "shape", [(0, 3, 4, 5, 6), (2, 3, 0, 5, 6), (2, 3, 4, 0, 6)], ids=["batch0", "L0", "D0"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_empty_batch_gives_empty_outputs_and_zero_gradients(
    backend: str, shape: tuple, dtype: torch.dtype
) -> None:
    """Forward and backward of an empty problem return correctly shaped empty outputs; the
    parameters, shared by no element, get zero gradients (not garbage from uninitialised
    memory)."""
    device_for(backend)
    inputs = make_inputs(shape, dtype)
    grad_y, grad_last = upstream(inputs, 0)
    y, last, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last)
    batch, T, L, Dm, N = shape
    assert y.shape == (batch, T, L, Dm) and y.dtype == dtype
    assert last.shape == (batch, L, Dm, N) and last.dtype == state_dtype(dtype)
    for name in INPUT_NAMES:
        assert grads[name].shape == inputs[name].shape, name
        assert grads[name].dtype == inputs[name].dtype, name
    for name in ("A", "D", "delta_bias"):
        assert not grads[name].any(), name


# --------------------------------------------------------------------------------------------
# NaN and infinity: legal, poisoned, propagated


# Where one poisoned entry may reach y: per (batch, location, channel) row of the scan, the
# whole channel for a per-channel parameter.
POISON_AT = {
    "u": (0, 1, 2, 3),
    "delta": (0, 1, 2, 3),
    "z": (0, 1, 2, 3),
    "B": (0, 1, 2, 4),
    "C": (0, 1, 2, 4),
    "initial_state": (0, 2, 3, 4),
    "A": (3, 4),
    "D": (3,),
    "delta_bias": (3,),
}


def _nan_reach(name: str) -> Tensor:
    """Mask of the y entries (batch 2, T 3, L 4, D 5) that a poison in ``name`` may reach."""
    reach = torch.zeros(2, 3, 4, 5, dtype=torch.bool)
    at = POISON_AT[name]
    if name in ("u", "delta", "z"):  # its own (batch, location, channel) row
        reach[at[0], :, at[2], at[3]] = True
    elif name == "initial_state":  # (batch, location, channel, state)
        reach[at[0], :, at[1], at[2]] = True
    elif name in ("B", "C"):  # shared by every channel of its location
        reach[at[0], :, at[2], :] = True
    else:  # A, D, delta_bias: one channel everywhere
        reach[..., at[0]] = True
    return reach


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", INPUT_NAMES)
def test_nan_in_any_argument_propagates_and_stays_in_its_rows(backend: str, name: str) -> None:
    """A NaN anywhere runs forward and backward without an error, makes y NaN where it is read,
    and leaves every scan row that does not read it finite; the NaN pattern of y is the
    reference's, bit for bit."""
    inputs = make_inputs(SHAPE, torch.float32, seed=7)
    inputs[name] = inputs[name].clone()
    inputs[name][POISON_AT[name]] = float("nan")
    grad_y, grad_last = upstream(inputs, 7)
    y, _, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last)
    y_ref, _ = ref_fn(**inputs)

    assert torch.equal(y.isnan(), y_ref.isnan()), "NaN pattern differs from the reference"
    assert y.isnan().any(), "the NaN was lost"
    reach = _nan_reach(name)
    assert torch.isfinite(y[~reach]).all(), "NaN escaped its scan rows"
    # The batch element without the poison has finite gradients everywhere.
    if name not in ("A", "D", "delta_bias"):
        for g_name in ("u", "delta", "z", "B", "C", "initial_state"):
            assert torch.isfinite(grads[g_name][1]).all(), g_name


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    ("name", "value"),
    [("u", float("inf")), ("B", float("-inf")), ("delta", float("inf")), ("z", float("inf"))],
    ids=["u+inf", "B-inf", "delta+inf", "z+inf"],
)
def test_infinity_gives_non_finite_output_without_error(backend, name, value) -> None:
    """An infinite activation overflows its own scan row (inf, or NaN where inf meets 0) and
    nothing else, on every backend."""
    inputs = make_inputs(SHAPE, torch.float32, seed=11)
    inputs[name] = inputs[name].clone()
    inputs[name][POISON_AT[name]] = value
    grad_y, grad_last = upstream(inputs, 11)
    y, _, _ = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last)
    reach = _nan_reach(name)
    assert not torch.isfinite(y[reach]).all()
    assert torch.isfinite(y[~reach]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_minus_infinite_delta_is_a_skipped_frame(backend: str) -> None:
    """``delta = -inf`` gives ``dt = softplus(-inf) = 0``: that frame neither decays nor writes
    the state. A legal limit, not a poison: outputs and gradients stay finite and match the
    reference."""
    inputs = make_inputs(SHAPE, torch.float32, seed=13)
    inputs["delta"] = inputs["delta"].clone()
    inputs["delta"][:, 1] = float("-inf")
    check_against_reference(inputs, backend, seed=13)


# --------------------------------------------------------------------------------------------
# the layers


def _block() -> PKS4Block:
    torch.manual_seed(0)
    block = PKS4Block(8, prior_dim=4, d_state=4, corr_dim=4, diff_dim=4)
    torch.nn.init.normal_(block.scan.out_proj.weight, std=0.2)  # not the identity
    return block


def _encoder() -> KinematicPriorEncoder:
    torch.manual_seed(0)
    return KinematicPriorEncoder(8, prior_dim=4, corr_dim=4, diff_dim=4)


def _scan() -> ParallelTemporalScan:
    torch.manual_seed(0)
    return ParallelTemporalScan(8, prior_dim=4, d_state=4)


LAYER_BAD_CALLS = [
    # (id, call, exception, message pattern after "^")
    (
        "block-batch0-map",
        lambda: _block()(torch.randn(0, 3, 8, 3, 3)),
        ValueError,
        r"x: expected a non-empty batch \(B >= 1\), got \(0, 3, 9, 8\)",
    ),
    (
        "block-batch0-tokens",
        lambda: _block()(torch.randn(0, 3, 10, 8), grid=(3, 3), num_prefix_tokens=1),
        ValueError,
        r"x: expected a non-empty batch",
    ),
    (
        "encoder-batch0",
        lambda: _encoder()(torch.randn(0, 3, 9, 8), (3, 3)),
        ValueError,
        r"x: expected a non-empty batch",
    ),
    (
        "scan-batch0",
        lambda: _scan()(torch.randn(0, 3, 9, 8), torch.randn(0, 3, 9, 4)),
        ValueError,
        r"x: expected a non-empty batch",
    ),
    (
        "block-map-zero-width",
        lambda: _block()(torch.randn(1, 3, 8, 3, 0)),
        ValueError,
        r"grid: expected a pair of positive ints",
    ),
    (
        "block-meta-input",
        lambda: _block()(torch.randn(1, 3, 8, 3, 3, device="meta")),
        ValueError,
        r"x: expected device cpu \(that of the block's parameters\), got meta",
    ),
    (
        "scan-meta-prior",
        lambda: _scan()(torch.randn(1, 3, 9, 8), torch.randn(1, 3, 9, 4, device="meta")),
        ValueError,
        r"prior: expected device cpu \(that of x\), got meta",
    ),
    (
        "scan-prior-not-tensor",
        lambda: _scan()(torch.randn(1, 3, 9, 8), [[0.0]]),
        TypeError,
        r"prior: expected a torch\.Tensor",
    ),
    (
        "scan-prior-int",
        lambda: _scan()(torch.randn(1, 3, 9, 8), torch.ones(1, 3, 9, 4).long()),
        ValueError,
        r"prior: expected a floating dtype",
    ),
    (
        "encoder-not-tensor",
        lambda: _encoder()(None, (3, 3)),
        TypeError,
        r"x: expected a torch\.Tensor",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "pattern"), [pytest.param(c, e, p, id=i) for i, c, e, p in LAYER_BAD_CALLS]
)
def test_layer_invalid_input_is_named_in_the_error(call, exc, pattern) -> None:
    with pytest.raises(exc, match=rf"^{pattern}"):
        call()


# The layers do not yet compare the input's dtype with their parameters': without autocast a
# float64 input to a float32 layer fails deep inside a matmul or LayerNorm with a RuntimeError
# naming no argument. ``_checks.check_same_dtype`` is the check to call next to
# ``check_same_device`` in each forward.
LAYER_DTYPE_MIXES = [
    ("block-float64-x", lambda: _block()(torch.randn(1, 3, 8, 3, 3, dtype=torch.float64)), "x"),
    ("block-bfloat16-x", lambda: _block()(torch.randn(1, 3, 8, 3, 3).bfloat16()), "x"),
    ("encoder-float64-x", lambda: _encoder()(torch.randn(1, 3, 9, 8).double(), (3, 3)), "x"),
    (
        "scan-float64-prior",
        lambda: _scan()(torch.randn(1, 3, 9, 8), torch.randn(1, 3, 9, 4).double()),
        "prior",
    ),
]


@pytest.mark.parametrize(
    ("call", "name"), [pytest.param(c, n, id=i) for i, c, n in LAYER_DTYPE_MIXES]
)
def test_layer_dtype_mismatch_is_named_in_the_error(call, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: expected dtype torch\.float32"):
        call()


def test_same_dtype_check_allows_autocast() -> None:
    """The dtype check refuses a mix outside autocast and lets autocast's own casts through."""
    x, weight = torch.randn(2, dtype=torch.bfloat16), torch.randn(2)
    with pytest.raises(ValueError, match=r"^x: expected dtype torch\.float32 \(that of w\)"):
        check_same_dtype("x", x, "w", weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_same_dtype("x", x, "w", weight)
    check_same_dtype("x", x.float(), "w", weight)


def test_block_nan_stays_in_its_spatial_neighbourhood() -> None:
    """A NaN at one location of one frame reaches the output (no crash, nothing hides it) but
    only within the block's spatial reach: the correlation window (radius 2) and the 3x3
    difference convolution, plus a margin for convolution algorithms that mix a tile. Frames
    are reached in both directions (the scan is bidirectional); far locations stay finite."""
    block = _block()
    x = torch.randn(1, 4, 8, 11, 11)
    x[0, 1, 3, 0, 0] = float("nan")
    x.requires_grad_()
    out = block(x)
    assert out.shape == x.shape
    assert out[0, :, :, 0, 0].isnan().all()
    assert torch.isfinite(out[0, :, :, 6:, :]).all() and torch.isfinite(out[0, :, :, :, 6:]).all()
    out[0, :, :, 6:, 6:].sum().backward()
    assert torch.isfinite(x.grad[0, :, :, 6:, 6:]).all()


# --------------------------------------------------------------------------------------------
# the cost of the A check


def _count_decay_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    # The module, not the function of the same name that pks4_layers.ops exports.
    op_module = importlib.import_module("pks4_layers.ops.motion_scan")
    calls: list[int] = []
    real = op_module._check_decay

    def counting(A: Tensor) -> None:
        calls.append(A.numel())
        real(A)

    monkeypatch.setattr(op_module, "_check_decay", counting)
    return calls


def test_layers_skip_the_decay_check_a_direct_call_keeps_it(monkeypatch) -> None:
    """The check reads A back from the device (a synchronisation on a GPU): the layers, whose A
    is -exp(A_log), skip it; a direct call runs it unless told not to, and a positive A is
    still refused."""
    calls = _count_decay_checks(monkeypatch)
    block = PKS4Block(8, d_state=4)
    block(torch.randn(1, 3, 8, 2, 2)).sum().backward()
    scan = ParallelTemporalScan(8, prior_dim=3, d_state=4)
    scan(torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 3))
    assert calls == []

    inputs = make_inputs(SHAPE, torch.float32)
    motion_scan(**inputs)
    assert len(calls) == 1
    motion_scan(**inputs, check_decay=False)
    assert len(calls) == 1
    bad = {**inputs, "A": inputs["A"].abs()}
    with pytest.raises(ValueError, match=r"^A: expected entries <= 0"):
        motion_scan(**bad)
    with pytest.raises(TypeError, match=r"^check_decay: expected a bool, got int"):
        motion_scan(**inputs, check_decay=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scan_without_the_decay_check_never_synchronises() -> None:
    """With the check skipped, a CUDA call of the op, forward and backward, queues its work
    without waiting for the device (torch's sync debug mode turns a synchronisation into an
    error); with the check, the one synchronisation is the A read-back."""
    device_for("cuda")
    inputs = {k: v.cuda().requires_grad_() for k, v in make_inputs(SHAPE, torch.float32).items()}
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = motion_scan(**inputs, backend="cuda", check_decay=False)
        y.sum().backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            motion_scan(**inputs, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# problems past the CUDA kernel's launch limits


def test_cuda_launch_limits_are_named() -> None:
    op_module = importlib.import_module("pks4_layers.ops.motion_scan")
    assert op_module.cuda_launch_limit((8, 16, 196, 768)) is None
    assert op_module.cuda_launch_limit((1, 1, 2**31 - 1, 1)) is None
    assert op_module.cuda_launch_limit((2, 1, 2**30, 1)) == (
        "batch * L <= 2147483647 (one CUDA block per row), got 2147483648"
    )
    assert op_module.cuda_launch_limit((1, 1, 1, 65535 * 128)) is None
    assert "D <= 8388480" in op_module.cuda_launch_limit((1, 1, 1, 65535 * 128 + 1))


@pytest.mark.parametrize("shape", [(2, 1, 2**30, 1), (1, 1, 1, 65535 * 128 + 1)])
def test_past_the_cuda_grid_explicit_cuda_refuses_auto_runs_torch(monkeypatch, shape) -> None:
    """Shapes the kernel's grid cannot hold (on meta tensors: no memory is needed): an explicit
    ``backend="cuda"`` says which limit, ``"auto"`` runs the ``torch`` backend instead of
    failing inside the launch."""
    op_module = importlib.import_module("pks4_layers.ops.motion_scan")
    monkeypatch.setattr(op_module, "resolve_backend", lambda *args, **kwargs: "cuda")
    ran: list[str] = []
    for name in ("cuda", "torch"):
        monkeypatch.setitem(
            op_module._BACKENDS, name, lambda *args, _n=name: ran.append(_n) or (args[0], None)
        )
    batch, T, L, D = shape
    N = 1
    meta = {
        "u": torch.empty(batch, T, L, D, device="meta"),
        "delta": torch.empty(batch, T, L, D, device="meta"),
        "A": torch.empty(D, N, device="meta"),
        "B": torch.empty(batch, T, L, N, device="meta"),
        "C": torch.empty(batch, T, L, N, device="meta"),
    }
    with pytest.raises(ValueError, match=r"^u: backend 'cuda' expected (batch \* L|D) <= "):
        motion_scan(**meta, backend="cuda")
    assert ran == []
    motion_scan(**meta, backend="auto")
    assert ran == ["torch"]


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 60 * 2**30,
    reason="needs a CUDA device with 60 GB of memory",
)
def test_cuda_grid_of_more_than_2_31_threads() -> None:
    """2^24 rows of 256 channels: 2^32 threads in one launch (past any 32-bit thread index).
    The last rows, whose flat offsets exceed 2^31, match the reference computed on them."""
    device_for("cuda")
    batch, T, L, D, N = 1, 1, 2**24, 256, 1
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    u, delta, z = rnd(batch, T, L, D), rnd(batch, T, L, D), rnd(batch, T, L, D)
    B, C = rnd(batch, T, L, N), rnd(batch, T, L, N)
    A = -torch.rand(D, N, generator=g, device="cuda")
    y, last = motion_scan(u, delta, A, B, C, z=z, return_last_state=True, backend="cuda")
    tail = slice(L - 3, L)
    pick = [t[:, :, tail].double().cpu() for t in (u, delta, B, C, z)]
    y_ref, last_ref = motion_scan_ref(
        pick[0], pick[1], A.double().cpu(), pick[2], pick[3], z=pick[4], return_last_state=True
    )
    assert_close(y[:, :, tail].cpu(), y_ref, dtype=torch.bfloat16, msg="y of the last rows")
    assert_close(last[:, tail].cpu(), last_ref, dtype=torch.float32, msg="last state")
