"""Numerics at the edges: saturated and vanishing step sizes, long sequences with an almost
undamped state, half-precision inputs, and mixed-precision training on real video.

``tests/test_ops_compiled.py`` already checks step-size logits of +-30 and ``A = -1e-6`` over
1024 steps for the compiled kernels in float32 and float64; here the limits are pushed further
(logits of +-50 and +-1e4, where a naive ``log1p(exp(x))`` overflows; ``A = -1e-8``, below
float32's resolution around 1), every backend is included (the PyTorch one too), and half
precision is covered. Each comparison is against the float64 reference on the same values, with
the tolerance of the inputs' dtype (``tests/tolerances.py``); the reference is first checked to be
finite itself, so that agreeing with it means "finite and right".
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pks4_layers.layers import PKS4Block
from scan_cases import (
    BACKENDS,
    HALF_DTYPES,
    INPUT_NAMES,
    Inputs,
    backend_dtype_params,
    backend_fn,
    magnitude,
    make_inputs,
    ref_fn,
    run_with_grads,
    state_dtype,
    to_float64,
    upstream,
)
from tolerances import assert_close


def check_finite_and_close(inputs: Inputs, backend: str, seed: int = 0, **flags) -> None:
    """y, last state and every gradient of ``backend`` are finite and equal the float64
    reference's (which must be finite too) within the inputs' dtype tolerance."""
    dtype = inputs["u"].dtype
    grad_y, grad_last = upstream(inputs, seed)
    y_ref, last_ref, grads_ref = run_with_grads(
        ref_fn, to_float64(inputs), grad_y.double(), grad_last.double(), **flags
    )
    for name, t in [("y", y_ref), ("last", last_ref), *grads_ref.items()]:
        assert t is not None and torch.isfinite(t).all(), f"reference {name} is not finite"
    y, last, grads = run_with_grads(backend_fn(backend), inputs, grad_y, grad_last, **flags)
    assert y.dtype == dtype and last.dtype == state_dtype(dtype)
    for name, t in [("y", y), ("last", last), *grads.items()]:
        assert torch.isfinite(t).all(), f"{name} is not finite"
    assert_close(y, y_ref, dtype=dtype, scale=magnitude(y_ref), msg="y")
    assert_close(last, last_ref, dtype=dtype, scale=magnitude(last_ref), msg="last state")
    for name in INPUT_NAMES:
        expected = grads_ref[name]
        assert_close(grads[name], expected, dtype=dtype, scale=magnitude(expected), msg=name)


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    """A, D and delta_bias as the layers pass them: float32 beside half-precision activations.
    (A float16 A could not hold its own gradient here: summed over 1024 frames of a barely
    decaying state it exceeds float16's range, an overflow of the requested dtype.)"""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _logits(kind: str, shape: torch.Size, seed: int) -> Tensor:
    """Step-size logits: all ``+x``, all ``-x``, or a random sign per element."""
    size = float(kind.lstrip("+-").replace("mixed", ""))
    if kind.startswith("mixed"):
        g = torch.Generator().manual_seed(seed)
        return size * (torch.randint(0, 2, shape, generator=g) * 2.0 - 1.0)
    return torch.full(shape, -size if kind.startswith("-") else size)


# Half precision only at +-50: at 1e4 the outputs themselves (dt * B * u summed over N) exceed
# float16's range, which is an overflow of the requested output dtype, not of the scan.
SATURATED_CASES = [
    pytest.param(*p.values, kind, marks=p.marks, id=f"{p.id}-{kind}")
    for kind in ("+50", "-50", "mixed50", "+1e4", "-1e4", "mixed1e4")
    for p in backend_dtype_params(
        BACKENDS,
        (torch.float64, torch.float32) + (HALF_DTYPES if "50" in kind else ()),
    )
]


@pytest.mark.parametrize("A", [None, -1e-8], ids=["decaying", "A-1e-8"])
@pytest.mark.parametrize(("backend", "dtype", "kind"), SATURATED_CASES)
def test_saturated_step_sizes_stay_finite_and_match_reference(
    backend: str, dtype: torch.dtype, kind: str, A: Optional[float]
) -> None:
    """softplus(+1e4) = 1e4 (the state is overwritten at once; computed as log1p(exp(x)) it
    would be inf) and softplus(-1e4) = 0 (exp underflows: the frame is skipped); with A near
    zero a huge step still barely decays the state while writing 1e4 * B * u into it."""
    inputs = make_inputs((2, 24, 3, 5, 4), dtype, seed=103, param_dtype=_param_dtype(dtype))
    inputs["delta"] = _logits(kind, inputs["u"].shape, 103).to(dtype)
    if A is not None:
        inputs["A"] = torch.full_like(inputs["A"], A)
    check_finite_and_close(inputs, backend, seed=103)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    ("backend", "dtype"),
    backend_dtype_params(BACKENDS, (torch.float64, torch.float32) + HALF_DTYPES),
)
def test_long_sequence_with_almost_undamped_state(
    backend: str, dtype: torch.dtype, reverse: bool
) -> None:
    """1024 frames with ``A = -1e-8`` (exp(dt * A) rounds to 1 in float32): the state sums
    every write; nothing overflows, nothing is lost, gradients reach the first frame."""
    inputs = make_inputs((1, 1024, 2, 3, 4), dtype, seed=107, param_dtype=_param_dtype(dtype))
    inputs["A"] = torch.full_like(inputs["A"], -1e-8)
    check_finite_and_close(inputs, backend, seed=107, reverse=reverse)


@pytest.mark.parametrize(("backend", "dtype"), backend_dtype_params(BACKENDS, HALF_DTYPES))
def test_half_precision_inputs_accumulate_in_a_float32_state(
    backend: str, dtype: torch.dtype
) -> None:
    """1024 writes of dt = 0.01 into an undamped state reach 10.24. A state held in the inputs'
    dtype would stall (bfloat16 cannot add 0.01 to 4; float16 rounds each write near 10 to
    a multiple of 2**-7): only a float32 state gets within the half-precision tolerance."""
    T = 1024
    shape = (1, T, 1, 2, 2)
    dt = 0.01
    inputs: Inputs = {
        "u": torch.ones(shape[:4], dtype=dtype),
        "delta": torch.full(shape[:4], math.log(math.expm1(dt)), dtype=dtype),
        "A": torch.full((2, 2), -1e-8, dtype=torch.float32),
        "B": torch.ones(1, T, 1, 2, dtype=dtype),
        "C": torch.ones(1, T, 1, 2, dtype=dtype),
        "D": None,
        "z": None,
        "delta_bias": None,
        "initial_state": None,
    }
    y, last = backend_fn(backend)(**inputs)
    y_ref, last_ref = ref_fn(**to_float64(inputs))
    assert last.dtype == torch.float32
    assert 10.0 < last_ref.min() and last_ref.max() < 10.5
    assert_close(last, last_ref, dtype=dtype, scale=magnitude(last_ref), msg="last state")
    assert_close(y, y_ref, dtype=dtype, scale=magnitude(y_ref), msg="y")


# --------------------------------------------------------------------------------------------
# mixed-precision training on a real clip

CLIP = "carphone_pristine"  # 120 frames of 176x144, a talking head with a moving background
FRAMES, WINDOW, CHANNELS, GRID = 96, 8, 8, 8
STEPS = 200
# Low-precision runs must stay within this relative distance of the float32 run's loss.
LOSS_BAND = 0.15


def _real_features() -> Tensor:
    """``(windows, WINDOW, CHANNELS, GRID, GRID)`` standardised features of a real clip: frames
    average-pooled to 8x8 and projected from RGB by a fixed random 1x1 convolution."""
    pytest.importorskip("av", reason="decoding the real clip needs PyAV")
    from pks4_layers.data import read_frames, real_clip_path

    try:
        path = real_clip_path(CLIP)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"the real clips are unavailable: {exc}")
    frames = read_frames(path, range(FRAMES)).permute(0, 3, 1, 2).float() / 255.0
    pooled = F.adaptive_avg_pool2d(frames, (GRID, GRID))  # (FRAMES, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    projection = torch.randn(CHANNELS, 3, 1, 1, generator=g)
    feats = torch.tanh(F.conv2d(pooled - pooled.mean(), projection))
    feats = (feats - feats.mean((0, 2, 3), keepdim=True)) / feats.std((0, 2, 3), keepdim=True)
    starts = range(0, FRAMES - WINDOW + 1, 4)
    return torch.stack([feats[s : s + WINDOW] for s in starts])


class _NextFramePredictor(nn.Module):
    """A causal PKS4 block and a per-location linear head: features of frame t -> t + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.block = PKS4Block(
            CHANNELS, prior_dim=8, d_state=8, corr_dim=8, diff_dim=8, bidirectional=False
        )
        self.head = nn.Conv2d(CHANNELS, CHANNELS, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(x)
        B, T = h.shape[:2]
        return self.head(h.flatten(0, 1)).unflatten(0, (B, T))


def _train(feats: Tensor, amp_dtype: Optional[torch.dtype]) -> tuple[list[float], int]:
    """Losses of up to ``STEPS`` Adam steps from the same seed (stopping at the first
    non-finite one), and the number of steps the gradient scaler skipped (float16 only)."""
    torch.manual_seed(0)
    model = _NextFramePredictor()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    autocast = dict(dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    inputs, targets = feats[:, :-1], feats[:, 1:]
    losses: list[float] = []
    skipped = 0
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", **autocast):
            pred = model(inputs)
        loss = F.mse_loss(pred.float(), targets)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale:
            skipped += 1
    return losses, skipped


def _window(losses: list[float], end: int) -> float:
    """Mean loss over the 10 steps before ``end``."""
    return sum(losses[end - 10 : end]) / 10


CHECKPOINTS = (50, 100, 150, STEPS)


@pytest.fixture(scope="module")
def real_features() -> Tensor:
    return _real_features()


@pytest.fixture(scope="module")
def float32_curve(real_features: Tensor) -> list[float]:
    losses, _ = _train(real_features, None)
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert _window(losses, STEPS) < 0.1 * losses[0], "float32 did not learn: the test is void"
    return losses


def _check_tracks_float32(losses: list[float], skipped: int, reference: list[float]) -> None:
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), (
        f"non-finite loss at step {len(losses) - 1}"
    )
    assert skipped <= STEPS // 20, f"the gradient scaler skipped {skipped} steps"
    assert _window(losses, STEPS) < 0.1 * losses[0], "the loss did not fall"
    for end in CHECKPOINTS:
        ours, theirs = _window(losses, end), _window(reference, end)
        gap = abs(ours - theirs) / theirs
        assert gap < LOSS_BAND, f"step {end}: loss {ours:.4f} vs float32 {theirs:.4f} ({gap:.1%})"


@pytest.mark.slow
def test_bfloat16_autocast_training_tracks_float32(
    real_features: Tensor, float32_curve: list[float]
) -> None:
    """A PKS4 block trained on real video features under bfloat16 autocast stays finite at
    every step and follows the float32 loss curve: within LOSS_BAND of it, averaged over 10
    steps, at steps 50, 100, 150 and 200, and falling like it."""
    losses, skipped = _train(real_features, torch.bfloat16)
    _check_tracks_float32(losses, skipped, float32_curve)


@pytest.mark.slow
def test_float16_autocast_training_tracks_float32(
    real_features: Tensor, float32_curve: list[float]
) -> None:
    """The same under float16 autocast, with a gradient scaler: finite at every step, within
    LOSS_BAND of the float32 curve, and hardly a step skipped for overflowing gradients."""
    losses, skipped = _train(real_features, torch.float16)
    _check_tracks_float32(losses, skipped, float32_curve)
