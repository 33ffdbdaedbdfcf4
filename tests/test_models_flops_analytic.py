"""The analytic FLOP counts of the selective scan and the cost volume, and their place in the
model report."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pks4_layers import KinematicPriorEncoder, PKS4Block
from pks4_layers.export import scan_backend
from pks4_layers.layers import kinematic_prior
from pks4_layers.layers.kinematic_prior import local_correlation
from pks4_layers.models import FrameBackbone, PKS4VideoClassifier
from pks4_layers.models.flops import (
    FlopCount,
    correlation_flops,
    count_flops,
    gradient_flow_flops,
    model_report,
    scan_flops,
)
from pks4_layers.ops import available_backends, motion_scan
from pks4_layers.ops.motion_scan import _BACKENDS

# Pairwise distinct, so that a factor counted for the wrong dimension changes the count.
BATCH, T, L, D, N = 2, 3, 5, 7, 4
BACKENDS = [b for b in ("torch", "ref", "cpu") if b in available_backends()]


def _plain_flops(fn, *args) -> int:
    """What FlopCounterMode alone counts (the count before the analytic terms)."""
    with FlopCounterMode(display=False) as mode:
        fn(*args)
    return mode.get_total_flops()


def _scan_inputs(batch=BATCH, steps=T, locations=L, channels=D, states=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, steps, locations, channels)
    return dict(
        u=torch.randn(shape, generator=g),
        delta=torch.randn(shape, generator=g),
        A=-torch.rand(channels, states, generator=g),
        B=torch.randn(batch, steps, locations, states, generator=g),
        C=torch.randn(batch, steps, locations, states, generator=g),
        D=torch.randn(channels, generator=g),
        z=torch.randn(shape, generator=g),
        delta_bias=torch.randn(channels, generator=g),
    )


# --- the scan ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_count_is_the_hand_formula_on_every_backend(backend):
    inputs = _scan_inputs()
    with torch.no_grad():
        total, _ = count_flops(lambda: motion_scan(**inputs, backend=backend))
    # Per state and step: exp(dt*A) 2, decay*h + (dt*u)*B 3, C*h read-out 2. Per channel and
    # step: dt*u 1, + bias 1, softplus 3, + D*u 2, * silu(z) 5.
    assert total == 2 * 3 * 5 * 7 * (7 * 4 + 12) == 8400
    assert scan_flops(BATCH, T, L, D, N) == 8400


def test_scan_read_out_is_not_counted_twice():
    inputs = _scan_inputs()
    run = lambda: motion_scan(**inputs, backend="torch")  # noqa: E731
    with torch.no_grad(), FlopCount() as count:
        run()
    # FlopCounterMode sees the torch backend's read-out (a batched matrix product) and nothing
    # else of the scan; the analytic count takes its place.
    read_out = 2 * BATCH * T * L * D * N
    with torch.no_grad():
        assert _plain_flops(run) == count.counted == count.replaced == read_out
    assert count.scan == 8400 and count.correlation == 0
    assert count.total == 8400


@pytest.mark.parametrize(
    ("drop", "per_channel"),
    [((), 12), (("D",), 10), (("z",), 7), (("delta_bias",), 11), (("D", "z", "delta_bias"), 4)],
)
@pytest.mark.parametrize("softplus", [True, False])
def test_scan_count_follows_the_options(drop, per_channel, softplus):
    inputs = _scan_inputs()
    for name in drop:
        inputs[name] = None
    with torch.no_grad():
        total, _ = count_flops(
            motion_scan, **inputs, delta_softplus=softplus, reverse=True, backend="torch"
        )
    per_channel -= 0 if softplus else 3
    assert total == BATCH * T * L * D * (7 * N + per_channel)


def test_scan_over_a_flattened_sequence_and_a_carried_state():
    # A scan over T * H * W positions of one sequence per clip, as a flattened-space scan does.
    steps = T * 3 * 4
    inputs = _scan_inputs(steps=steps, locations=1)
    state = torch.randn(BATCH, 1, D, N)
    with torch.no_grad():
        total, (y, last) = count_flops(
            motion_scan, **inputs, initial_state=state, return_last_state=True, backend="torch"
        )
    assert y.shape == (BATCH, steps, 1, D) and last.shape == (BATCH, 1, D, N)
    assert total == BATCH * steps * 1 * D * (7 * N + 12)


def test_every_call_is_counted_and_counts_nest():
    inputs = _scan_inputs()
    with torch.no_grad(), FlopCount() as outer:
        motion_scan(**inputs, backend="torch")
        with FlopCount() as inner:
            motion_scan(**inputs, backend="ref")
            motion_scan(**inputs, backend="torch")
    assert inner.scan == inner.total == 2 * 8400
    assert outer.scan == outer.total == 3 * 8400


# --- the cost volume ---------------------------------------------------------------------------


def test_cost_volume_count_is_the_hand_formula():
    n, C, H, W, r = 3, 6, 4, 5, 2
    g = torch.Generator().manual_seed(0)
    current, previous = torch.randn(n, C, H, W, generator=g), torch.randn(n, C, H, W, generator=g)
    # Element-wise products and sums: invisible to FlopCounterMode.
    assert _plain_flops(local_correlation, current, previous, r) == 0
    expected = 2 * 6 * 25 * 4 * 5 * 3
    assert correlation_flops(n, C, H, W, r) == expected
    # The function object itself, and through the module that defines it.
    total, cost = count_flops(local_correlation, current, previous, r)
    assert total == expected and cost.shape == (n, 25, H, W)
    total, _ = count_flops(lambda: kinematic_prior.local_correlation(current, previous, r))
    assert total == expected


def test_prior_encoder_counts_one_cost_volume_per_frame_pair():
    Bsz, frames, H, W, dim, corr_dim, r = 2, 5, 3, 4, 12, 6, 1
    encoder = KinematicPriorEncoder(dim, prior_dim=8, radius=r, corr_dim=corr_dim).eval()
    x = torch.randn(Bsz, frames, H * W, dim)
    per_pair = 2 * corr_dim * (2 * r + 1) ** 2 * H * W
    with torch.no_grad():
        with FlopCount() as count:
            encoder(x, (H, W))
        # Frames 1..T-1 against their predecessors.
        assert count.correlation == per_pair * Bsz * (frames - 1)
        assert count.total == _plain_flops(encoder, x, (H, W)) + count.correlation
        # Streaming: every frame of a chunk is correlated (frame 0 with the stored one).
        with FlopCount() as count:
            encoder.step(x, (H, W))
        assert count.correlation == per_pair * Bsz * frames


def test_gradient_flow_count_is_the_hand_formula():
    from pks4_layers.layers.kinematic_prior import gradient_flow

    Bsz, pairs, H, W, C = 2, 3, 3, 4, 5
    g = torch.Generator().manual_seed(0)
    current = torch.randn(Bsz, pairs, H * W, C, generator=g)
    previous = torch.randn(Bsz, pairs, H * W, C, generator=g)
    assert _plain_flops(gradient_flow, current, previous, H, W) == 0
    expected = Bsz * pairs * H * W * (17 * C + 20)
    assert gradient_flow_flops(Bsz * pairs, H * W, C) == expected
    total, flow = count_flops(gradient_flow, current, previous, H, W)
    assert total == expected and flow.shape == (Bsz, pairs, H * W, 2)


def test_prior_encoder_counts_its_gradient_flow_once_per_frame_pair():
    Bsz, frames, H, W, dim, corr_dim = 2, 5, 3, 4, 12, 6
    cues = ("cost", "flow", "change")
    encoder = KinematicPriorEncoder(dim, prior_dim=8, radius=1, corr_dim=corr_dim, cues=cues)
    x = torch.randn(Bsz, frames, H * W, dim)
    with torch.no_grad():
        with FlopCount() as count:
            encoder.eval()(x, (H, W))
        assert count.flow == Bsz * (frames - 1) * H * W * (17 * corr_dim + 20)
        assert count.correlation == 2 * corr_dim * 9 * H * W * Bsz * (frames - 1)
        plain = _plain_flops(encoder, x, (H, W))
        assert count.total == plain + count.correlation + count.flow
        assert count.analytic == count.correlation + count.flow  # no scan in the encoder


def test_patches_are_undone_also_after_an_error():
    original = kinematic_prior.local_correlation
    original_flow = kinematic_prior.gradient_flow
    backends = dict(_BACKENDS)
    with pytest.raises(RuntimeError, match="boom"), FlopCount():
        assert kinematic_prior.local_correlation is not original
        raise RuntimeError("boom")
    assert kinematic_prior.local_correlation is original
    assert local_correlation is original
    assert kinematic_prior.gradient_flow is original_flow
    assert _BACKENDS == backends


# --- a block and the report --------------------------------------------------------------------


def test_block_count_exceeds_flop_counter_by_exactly_the_analytic_extras():
    Bsz, frames, dim, H, W = 2, 5, 16, 3, 4
    d_state, expand, radius, corr_dim = 4, 2, 1, 8
    block = PKS4Block(
        dim, d_state=d_state, expand=expand, radius=radius, corr_dim=corr_dim, backend="torch"
    ).eval()
    x = torch.randn(Bsz, frames, dim, H, W)
    with torch.no_grad():
        plain = _plain_flops(block, x)
        total, _ = count_flops(block, x)
    Lc, d_inner = H * W, expand * dim
    # Two directions; FlopCounterMode already had each one's read-out matrix product.
    scan_extra = 2 * (
        Bsz * frames * Lc * d_inner * (7 * d_state + 12) - 2 * Bsz * frames * Lc * d_inner * d_state
    )
    corr_extra = 2 * corr_dim * (2 * radius + 1) ** 2 * H * W * Bsz * (frames - 1)
    assert scan_extra > 0 and corr_extra > 0
    assert total - plain == scan_extra + corr_extra
    # The same count whatever backend computes the scan.
    for backend in BACKENDS:
        with torch.no_grad(), scan_backend(block, backend):
            assert count_flops(block, x)[0] == total, backend


def _classifier(temporal: str) -> PKS4VideoClassifier:
    """A one-conv backbone (32 channels, 4x4 maps from 32x32 frames): fast to count."""
    torch.manual_seed(0)
    backbone = FrameBackbone(nn.Conv2d(3, 32, kernel_size=8, stride=8), num_features=32)
    kwargs = {"d_state": 8, "radius": 1, "corr_dim": 16} if temporal == "pks4" else None
    # The block's defaults (a scan over the features) and one head: the formula below.
    return PKS4VideoClassifier(
        backbone,
        num_classes=5,
        num_frames=6,
        temporal=temporal,
        block_kwargs=kwargs,
        preset="features",
    )


@pytest.mark.parametrize("temporal", ["pks4", "mean", "tconv"])
def test_report_adds_the_scan_and_cost_volume_to_the_temporal_part_only(temporal):
    model = _classifier(temporal).eval()
    clip = torch.zeros(1, 6, 3, 32, 32)
    report = model_report(model, tuple(clip.shape))
    # The count before the analytic terms: FlopCounterMode on each part.
    with torch.no_grad(), scan_backend(model, "torch"):
        feats = model.forward_features(clip)
        before_backbone = _plain_flops(model.forward_features, clip)
        before_temporal = _plain_flops(model.forward_temporal, feats)
        before_head = _plain_flops(model.forward_head, model.pool(feats))
    assert report.gflops_backbone == pytest.approx(before_backbone / 1e9, rel=1e-12)
    assert report.gflops_head == pytest.approx(before_head / 1e9, rel=1e-12)
    if temporal == "pks4":
        frames, Lc, d_inner, d_state = 6, 4 * 4, 32, 8
        scan = 2 * frames * Lc * d_inner * (7 * d_state + 12)
        read_out = 2 * (2 * frames * Lc * d_inner * d_state)
        corr = 2 * 16 * 9 * Lc * (frames - 1)
        after = before_temporal - read_out + scan + corr
        assert after > before_temporal
    else:
        after = before_temporal
    assert report.gflops_temporal == pytest.approx(after / 1e9, rel=1e-12)
    assert report.gflops_total == pytest.approx(
        (before_backbone + after + before_head) / 1e9, rel=1e-12
    )
