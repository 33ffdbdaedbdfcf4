"""Property-based agreement with the reference over random valid shapes, layouts and dtypes.

Hypothesis draws the shape (``T`` from 1 to 64, ``N`` from 1 to 64, odd and 1x1 feature maps),
the dtype (float64, float32, float16, bfloat16), the flags, and the memory layout of every
input: contiguous, permuted (a view with the time axis not outermost), strided (every second
element of a larger buffer) or expanded (a stride-0 axis, as from ``expand``: one frame
repeated, one location broadcast). Each draw must give, on every backend, what the reference
gives within the tolerance of ``tests/tolerances.py``:

* ``motion_scan``: y, the last state and the gradient of every input against
  ``motion_scan_ref`` in float64 on the same (rounded) values. The gradients are taken with
  respect to the very views the op received, so an expanded input is checked element by
  element (not after autograd has summed it back into its base).
* the layers: the module with the backend under test against the same module on the ``ref``
  backend, in float64 for float32/float64 modules (identical weights), and in the module's own
  dtype for float16/bfloat16 (there the rest of the layer computes in half precision on both
  sides, so the scan is the only difference). The layout of the input must not change the
  result beyond that tolerance either.

``derandomize=True``: the examples are a function of the test alone, the same on every run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from typing import Callable, Iterator, Optional
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from pks4_layers.layers import KinematicPriorEncoder, ParallelTemporalScan, PKS4Block
from pks4_layers.ops import motion_scan, motion_scan_ref
from scan_cases import (
    ALL_DTYPES,
    HALF_DTYPES,
    INPUT_NAMES,
    OPTIONAL_NAMES,
    backend_params,
    device_for,
    magnitude,
    make_inputs,
    ref_fn,
    state_dtype,
    to_float64,
    upstream,
)
from tolerances import assert_close

# The module, not the class of the same name that ``pks4_layers.layers`` exports.
temporal_scan_module = importlib.import_module("pks4_layers.layers.temporal_scan")

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LAYER_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=25)

LAYOUTS = ("contiguous", "permuted", "strided", "expanded", "offset")

# --------------------------------------------------------------------------------------------
# layouts: differentiable views with the values of a base tensor (expanded: of one slice of it)


def _permuted(t: Tensor) -> Tensor:
    """Same values, the first two axes swapped in memory (a (T, batch, ...) buffer viewed as
    (batch, T, ...)); for 1-D and 2-D tensors, the axes reversed."""
    if t.dim() >= 3:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t.t().contiguous().t() if t.dim() == 2 else _strided(t)


def _strided(t: Tensor) -> Tensor:
    """Same values, every second element of a buffer twice as long on the last axis."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def _expanded(t: Tensor, axis: int) -> Tensor:
    """The first slice along ``axis`` repeated with stride 0 (different values from ``t``)."""
    axis = min(axis, t.dim() - 1)
    return t.narrow(axis, 0, 1).expand(t.shape)


def _offset(t: Tensor) -> Tensor:
    """Same values, contiguous, starting one element into a larger buffer: a data pointer
    aligned to the element size only, never to the 16 bytes of a vector load."""
    flat = torch.cat([torch.zeros(1, dtype=t.dtype, device=t.device), t.reshape(-1)])
    return flat[1:].view(t.shape)


def apply_layout(t: Tensor, layout: str, axis: int) -> Tensor:
    if layout == "offset":
        return _offset(t)
    if layout == "permuted":
        return _permuted(t)
    if layout == "strided":
        return _strided(t)
    if layout == "expanded":
        return _expanded(t, axis)
    return t


# --------------------------------------------------------------------------------------------
# motion_scan


@st.composite
def scan_problems(draw: Callable, allow_float64: bool = True) -> dict:
    dtypes = ALL_DTYPES if allow_float64 else tuple(d for d in ALL_DTYPES if d != torch.float64)
    dtype = draw(st.sampled_from(dtypes))
    shape = (
        draw(st.integers(1, 2)),  # batch
        draw(st.integers(1, 64)),  # T
        draw(st.integers(1, 3)),  # L
        draw(st.integers(1, 5)),  # D
        draw(st.sampled_from([1, 2, 3, 16, 17, 64])),  # N
    )
    names = list(INPUT_NAMES)
    return dict(
        shape=shape,
        dtype=dtype,
        bc_float32=dtype in HALF_DTYPES and draw(st.booleans()),
        softplus=draw(st.booleans()),
        reverse=draw(st.booleans()),
        optionals=tuple(draw(st.sets(st.sampled_from(OPTIONAL_NAMES)))),
        layouts={n: draw(st.sampled_from(LAYOUTS)) for n in names},
        axes={n: draw(st.integers(0, 3)) for n in names},
        return_state_grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _scan_with_views(
    backend: str,
    inputs: dict,
    layouts: dict,
    axes: dict,
    grad_y: Tensor,
    grad_last: Optional[Tensor],
    **flags,
) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Runs ``backend`` on views of fresh leaves (laid out on the backend's device) and returns
    y, the last state, the gradient with respect to each view, and the views' values."""
    device = device_for(backend) if backend != "ref" else torch.device("cpu")
    views = {}
    for k, v in inputs.items():
        if v is None:
            continue
        leaf = v.detach().to(device).requires_grad_()
        views[k] = apply_layout(leaf, layouts[k], axes[k])
    if backend == "ref":
        y, last = ref_fn(**views, **flags)
    else:
        y, last = motion_scan(**views, **flags, return_last_state=True, backend=backend)
    outs = [y] + ([last] if grad_last is not None else [])
    grads_out = [grad_y.to(device)] + ([grad_last.to(device)] if grad_last is not None else [])
    grads = torch.autograd.grad(outs, list(views.values()), grads_out, allow_unused=True)
    return (
        y.detach().cpu(),
        last.detach().cpu(),
        {k: (g.cpu() if g is not None else None) for k, g in zip(views, grads)},
        {k: v.detach().cpu() for k, v in views.items()},
    )


@pytest.mark.parametrize("backend", backend_params())
@PROPERTY_SETTINGS
@given(problem=scan_problems())
def test_motion_scan_matches_reference_for_any_valid_input(backend: str, problem: dict) -> None:
    """Any valid shape, dtype, flag combination and memory layout: the backend's outputs and
    gradients equal the float64 reference's on the same values."""
    dtype = problem["dtype"]
    if backend == "cuda" and dtype == torch.float64:
        dtype = torch.float32  # the CUDA kernel has no float64 (``auto`` routes it elsewhere)
    inputs = make_inputs(
        problem["shape"],
        dtype,
        seed=problem["seed"],
        optionals=problem["optionals"],
        positive_delta=not problem["softplus"],
        bc_dtype=torch.float32 if problem["bc_float32"] else None,
    )
    flags = dict(delta_softplus=problem["softplus"], reverse=problem["reverse"])
    grad_y, grad_last = upstream(inputs, problem["seed"])
    if not problem["return_state_grad"]:
        grad_last = None
    layouts, axes = problem["layouts"], problem["axes"]

    y, last, grads, views = _scan_with_views(
        backend, inputs, layouts, axes, grad_y, grad_last, **flags
    )
    y_ref, last_ref, grads_ref, views_ref = _scan_with_views(
        "ref",
        to_float64(inputs),
        layouts,
        axes,
        grad_y.double(),
        None if grad_last is None else grad_last.double(),
        **flags,
    )
    for name, view in views.items():  # both saw the same values
        assert torch.equal(view.double(), views_ref[name]), name

    assert y.dtype == dtype and last.dtype == state_dtype(dtype)
    assert_close(y, y_ref, dtype=dtype, scale=magnitude(y_ref), msg="y")
    assert_close(last, last_ref, dtype=dtype, scale=magnitude(last_ref), msg="last state")
    for name, expected in grads_ref.items():
        actual = grads[name]
        if expected is None:  # an input that does not reach the differentiated outputs
            assert actual is None or not actual.any(), name
            continue
        assert actual is not None and actual.dtype == inputs[name].dtype, name
        assert_close(actual, expected, dtype=dtype, scale=magnitude(expected), msg=f"grad {name}")


# --------------------------------------------------------------------------------------------
# the layers

DIM, PRIOR_DIM = 6, 4


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, the block's zero-initialised output projection included (a
    block that is the identity would agree with anything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "A_log" in name or "norm" in name or "log_scale" in name:
                continue
            p.copy_(0.4 * torch.randn(p.shape, generator=g))
    return module


# Every dtype, float16 included: the prior computes its entropy in float32, so a match weight
# that underflows to 0 in float16 gives 0, not NaN (see test_float16_kinematic_prior_is_finite).
PRIOR_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@st.composite
def layer_problems(draw: Callable, dtypes: tuple = ALL_DTYPES) -> dict:
    H = draw(st.sampled_from([1, 3, 5]))
    W = draw(st.sampled_from([1, 3, 5]))
    return dict(
        dtype=draw(st.sampled_from(dtypes)),
        batch=draw(st.integers(1, 2)),
        T=draw(st.integers(1, 64)),
        H=H,
        W=W,
        d_state=draw(st.sampled_from([1, 3, 16, 64])),
        bidirectional=draw(st.booleans()),
        layout=draw(st.sampled_from(("channels-last", "permuted", "strided", "expanded"))),
        axis=draw(st.integers(0, 1)),
        seed=draw(st.integers(0, 2**16)),
    )


def _layer_input(
    shape: tuple, dtype: torch.dtype, layout: str, axis: int, seed: int
) -> tuple[Tensor, Tensor]:
    """A contiguous input and a differently laid-out one with the same values. Feature maps
    ``(B, T, C, H, W)`` get channels-last (channels innermost, as a backbone run in that memory
    format returns them); tokens get permuted or strided views; expanded repeats frame 0
    (axis 1) or batch element 0 (axis 0) with stride 0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "expanded":
        strided = base.narrow(axis, 0, 1).expand(shape)
        return strided.contiguous(), strided
    if layout == "channels-last" and len(shape) == 5:
        strided = base.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    elif layout in ("channels-last", "permuted"):
        strided = _permuted(base)
    else:
        strided = _strided(base)
    return base, strided


def _run_layer(module: nn.Module, make_args: Callable, x: Tensor) -> tuple[Tensor, Tensor]:
    """Output and input gradient (of a fixed random weighting of the output); ``x`` keeps its
    strides (``detach`` shares them)."""
    x = x.detach().requires_grad_()
    args = make_args(x)
    out = module(*args)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, weight)
    return out.detach(), grad


@contextlib.contextmanager
def _checked_scans(expect_scans: bool) -> Iterator[list]:
    """Every ``motion_scan`` call a layer makes is compared, on the spot, with the float64
    reference on the same arguments (whatever strides the layer gave them) within the tolerance
    of the arguments' dtype. Yields the list of checked calls."""
    calls: list = []
    signature = inspect.signature(motion_scan)

    def checked(*args, **kwargs):
        out = motion_scan(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        bound.pop("backend", None)
        bound.pop("return_last_state", None)
        bound.pop("check_decay", None)
        ref = {k: (v.detach().double() if isinstance(v, Tensor) else v) for k, v in bound.items()}
        y_ref = motion_scan_ref(**ref)
        y = out[0] if isinstance(out, tuple) else out
        assert y.dtype == bound["u"].dtype
        assert_close(y.detach(), y_ref, dtype=y.dtype, scale=magnitude(y_ref), msg="layer's scan")
        calls.append(bound)
        return out

    with mock.patch.object(temporal_scan_module, "motion_scan", checked):
        yield calls
    if expect_scans:
        assert calls, "the layer no longer calls motion_scan through its module namespace"


def _layers_agree(
    make_module: Callable[[str], nn.Module],
    make_args: Callable[[Tensor], tuple],
    shape: tuple,
    backend: str,
    problem: dict,
    has_scan: bool = True,
) -> None:
    """``make_module(backend)`` in the drawn dtype, on a contiguous and a differently laid-out
    input, against the ``ref`` backend.

    float32 and float64 modules are compared whole (output and input gradient) with the same
    module in float64 on the ``ref`` backend. In float16 and bfloat16 every layer around the
    scan rounds its intermediates to half precision, by an amount no tolerance documents; there
    each scan the layer runs is compared with the reference on its actual arguments, and the
    layer's output must be finite.
    """
    dtype = problem["dtype"]
    if backend == "cuda":
        pytest.skip("the layers run on the CPU here; their CUDA path is the op's, tested above")
    device_for(backend)
    base = _randomise(make_module("ref"), problem["seed"]).to(dtype)
    module = make_module(backend)
    module.load_state_dict(base.state_dict())
    module.to(dtype)
    contiguous, laid_out = _layer_input(
        shape, dtype, problem["layout"], problem["axis"], problem["seed"]
    )
    if dtype in HALF_DTYPES:
        for x in (contiguous, laid_out):
            with _checked_scans(expect_scans=has_scan):
                out, grad = _run_layer(module, make_args, x)
            assert out.dtype == dtype and out.shape[:2] == x.shape[:2]
            assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        return

    reference = copy.deepcopy(base).double()
    out_ref, grad_ref = _run_layer(reference, make_args, contiguous.double())
    for x in (contiguous, laid_out):
        out, grad = _run_layer(module, make_args, x)
        assert out.dtype == dtype and out.shape == out_ref.shape
        assert_close(out, out_ref, dtype=dtype, scale=magnitude(out_ref), msg="output")
        assert_close(grad, grad_ref, dtype=dtype, scale=magnitude(grad_ref), msg="input grad")


@pytest.mark.parametrize("backend", backend_params())
@LAYER_SETTINGS
@given(problem=layer_problems(PRIOR_DTYPES))
def test_block_matches_reference_for_any_valid_input(backend: str, problem: dict) -> None:
    """PKS4Block on feature maps of any valid size (1x1 and odd maps, 1 to 64 frames), any
    dtype and memory layout, channels-last included: the backend agrees with the reference."""
    p = problem

    def make(b: str) -> nn.Module:
        return PKS4Block(
            DIM,
            prior_dim=PRIOR_DIM,
            d_state=p["d_state"],
            corr_dim=4,
            diff_dim=4,
            radius=1,
            bidirectional=p["bidirectional"],
            backend=b,
        )

    shape = (p["batch"], p["T"], DIM, p["H"], p["W"])
    _layers_agree(make, lambda x: (x,), shape, backend, p)


@pytest.mark.parametrize("backend", backend_params())
@LAYER_SETTINGS
@given(problem=layer_problems())
def test_temporal_scan_matches_reference_for_any_valid_input(backend: str, problem: dict) -> None:
    """ParallelTemporalScan on tokens of any valid shape, dtype and layout (the prior fixed)."""
    p = problem
    L = p["H"] * p["W"]
    g = torch.Generator().manual_seed(p["seed"] + 1)
    prior = torch.randn(p["batch"], p["T"], L, PRIOR_DIM, generator=g)

    def make(b: str) -> nn.Module:
        return ParallelTemporalScan(
            DIM,
            prior_dim=PRIOR_DIM,
            d_state=p["d_state"],
            bidirectional=p["bidirectional"],
            backend=b,
        )

    shape = (p["batch"], p["T"], L, DIM)
    _layers_agree(make, lambda x: (x, prior.to(x.dtype)), shape, backend, p)


@LAYER_SETTINGS
@given(problem=layer_problems(PRIOR_DTYPES))
def test_kinematic_prior_is_layout_invariant_and_matches_float64(problem: dict) -> None:
    """KinematicPriorEncoder has no scan, so no backend: in float32 it matches the float64
    computation whatever the input's memory layout; in half precision it stays finite."""
    p = problem
    grid = (p["H"], p["W"])

    def make(_: str) -> nn.Module:
        return KinematicPriorEncoder(DIM, prior_dim=PRIOR_DIM, corr_dim=4, diff_dim=4)

    shape = (p["batch"], p["T"], p["H"] * p["W"], DIM)
    _layers_agree(make, lambda x: (x, grid), shape, "torch", p, has_scan=False)


def test_float16_kinematic_prior_is_finite() -> None:
    """A float16 encoder on a map whose correlation window leaves the map (a 1x5 map, radius 2:
    the out-of-map displacements score 0 and their softmax weight underflows) stays finite."""
    torch.manual_seed(0)
    encoder = KinematicPriorEncoder(6, prior_dim=4, corr_dim=4, diff_dim=4)
    x = torch.randn(1, 2, 5, 6)
    assert torch.isfinite(encoder(x, (1, 5))).all()  # float32: fine
    assert torch.isfinite(encoder.half()(x.half(), (1, 5))).all()
