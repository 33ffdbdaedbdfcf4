"""KinematicPriorEncoder: the cost volume, the recovered displacement, frame 0, bad input."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from pks4_layers import KinematicPriorEncoder
from pks4_layers.layers.kinematic_prior import local_correlation
from tolerances import assert_close


def test_local_correlation_matches_brute_force():
    torch.manual_seed(0)
    cur, prev = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 3, 5, 4).double()
    r = 2
    cost = local_correlation(cur, prev, r)
    assert cost.shape == (2, 25, 5, 4)
    H, W = 5, 4
    k = 0
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            for y in range(H):
                for x in range(W):
                    py, px = y + dy, x + dx
                    inside = 0 <= py < H and 0 <= px < W
                    want = (cur[:, :, y, x] * prev[:, :, py, px]).sum(1) if inside else 0.0
                    assert_close(cost[:, k, y, x], torch.as_tensor(want).double().expand(2))
            k += 1


def _correlation_by_windows(current, previous, radius):
    """The cost volume by autograd through windows of the padded map: the oracle of the
    hand-written backward."""
    H, W = current.shape[-2:]
    padded = torch.nn.functional.pad(previous, (radius,) * 4)
    side = 2 * radius + 1
    return torch.stack(
        [
            (current * padded[..., dy : dy + H, dx : dx + W]).sum(1)
            for dy in range(side)
            for dx in range(side)
        ],
        1,
    )


@pytest.mark.parametrize(
    "shape,radius", [((2, 3, 5, 4), 2), ((3, 4, 1, 1), 1), ((2, 5, 3, 7), 1), ((1, 2, 6, 6), 3)]
)
def test_local_correlation_backward_matches_autograd(shape, radius):
    """Forward, backward (gradcheck, against autograd through the windows) and double
    backward, float64; float32 / bf16 / fp16 against float64 on the same values."""
    torch.manual_seed(0)
    a = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def corr(x, y):
        return local_correlation(x, y, radius)

    assert torch.autograd.gradcheck(corr, (a, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(corr, (a, b), fast_mode=True)
    g = torch.randn(shape[0], (2 * radius + 1) ** 2, *shape[2:], dtype=torch.float64)
    got = torch.autograd.grad((corr(a, b) * g).sum(), (a, b))
    want = torch.autograd.grad((_correlation_by_windows(a, b, radius) * g).sum(), (a, b))
    for x, y in zip(got, want):
        assert_close(x, y)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # the same rounded values in float64 are the reference: only the arithmetic differs
        x = a.detach().to(dtype).requires_grad_()
        y = b.detach().to(dtype).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        y64 = y.detach().double().requires_grad_()
        out = corr(x, y)
        (out * g.to(dtype)).sum().backward()
        out64 = corr(x64, y64)
        (out64 * g.to(dtype).double()).sum().backward()
        assert out.dtype == x.grad.dtype == y.grad.dtype == dtype
        # tolerances scaled by the size of the summed terms, not of their (cancelling) sum
        terms = float(corr(x64.detach().abs(), y64.detach().abs()).max())
        grad_terms = g.numel() / g.shape[0] * float(g.abs().max()) * terms
        assert_close(out, out64.detach(), scale=terms)
        assert_close(x.grad, x64.grad, scale=grad_terms / terms)
        assert_close(y.grad, y64.grad, scale=grad_terms / terms)
    # one input only needs a gradient: the other gets none
    x = a.detach().requires_grad_()
    local_correlation(x, b.detach(), radius).sum().backward()
    assert x.grad is not None and x.grad.shape == a.shape


@pytest.mark.parametrize("shift", [(1, 0), (0, -1), (-2, 1), (0, 0)])
def test_recovers_a_known_translation(shift):
    """Frame 1 is frame 0 moved by ``shift`` = (dx, dy) cells: the interior reports that motion."""
    torch.manual_seed(1)
    dim, H, W, pad = 16, 6, 7, 2
    sx, sy = shift
    world = torch.randn(dim, H + 2 * pad, W + 2 * pad)
    frame0 = world[:, pad : pad + H, pad : pad + W]
    frame1 = world[:, pad - sy : pad - sy + H, pad - sx : pad - sx + W]
    x = rearrange(torch.stack([frame0, frame1]), "t c h w -> 1 t (h w) c")
    enc = KinematicPriorEncoder(dim, radius=2)
    with torch.no_grad():
        enc.corr_log_scale.fill_(torch.log(torch.tensor(50.0)))
        cues = enc._displacement_cues(x, H, W)
    K = enc.num_displacements
    velocity = rearrange(cues[0, 1, :, K : K + 2], "(h w) v -> h w v", h=H)
    confidence = rearrange(cues[0, 1, :, K + 2], "(h w) -> h w", h=H)
    interior = (slice(2, H - 2), slice(2, W - 2))
    assert_close(
        velocity[interior], torch.tensor([sx, sy]).float().expand_as(velocity[interior]), scale=1e3
    )
    assert confidence[interior].min() > 0.9
    # Frame 0 has no predecessor: no motion, no confidence.
    assert torch.count_nonzero(cues[0, 0]) == 0


@pytest.mark.parametrize(
    "cues, reach",
    [
        (("cost", "displacement", "difference"), [False, False, False, True, True, False]),
        # the change of the motion cues since the previous pair also reaches frame t + 2
        (("cost", "displacement", "difference", "change"), [False, False, False, True, True, True]),
    ],
)
def test_prior_depends_only_on_the_frame_and_its_predecessors(cues, reach):
    torch.manual_seed(2)
    enc = KinematicPriorEncoder(8, prior_dim=6, radius=1, cues=cues).double()
    x = torch.randn(1, 6, 12, 8, dtype=torch.float64)
    base = enc(x, (3, 4))
    x2 = x.clone()
    x2[:, 3] += 1.0
    changed = (enc(x2, (3, 4)) - base).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == reach
    # No wrap-around: the last frame never reaches frame 0.
    x3 = x.clone()
    x3[:, -1] += 1.0
    assert torch.equal(enc(x3, (3, 4))[:, 0], base[:, 0])


def test_single_frame_and_gradients():
    torch.manual_seed(3)
    enc = KinematicPriorEncoder(8, prior_dim=4)
    out = enc(torch.randn(2, 1, 6, 8), (2, 3))
    assert out.shape == (2, 1, 6, 4) and torch.isfinite(out).all()
    x = torch.randn(2, 4, 6, 8, requires_grad=True)
    enc(x, (2, 3)).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_gradcheck_float64():
    torch.manual_seed(4)
    enc = KinematicPriorEncoder(4, prior_dim=3, radius=1, corr_dim=4, diff_dim=2).double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: enc(t, (2, 2)), (x,))


@pytest.mark.parametrize(
    "x, grid, match",
    [
        (torch.randn(2, 3, 6), (2, 3), r"x: expected shape \(B, T, L, 8\)"),
        (torch.randn(2, 3, 6, 5), (2, 3), r"x: expected shape \(B, T, L, 8\)"),
        (torch.randn(2, 3, 6, 8), (2, 2), r"grid: expected H \* W == 6"),
        (torch.randn(2, 3, 6, 8), 6, "grid: expected a pair"),
        (torch.randn(2, 0, 6, 8), (2, 3), r"x: expected at least one frame"),
        (torch.ones(2, 3, 6, 8, dtype=torch.int64), (2, 3), "x: expected a floating dtype"),
    ],
    ids=["rank", "channels", "grid-size", "grid-type", "no-frames", "int-dtype"],
)
def test_bad_input(x, grid, match):
    with pytest.raises(ValueError, match=match):
        KinematicPriorEncoder(8)(x, grid)


def test_bfloat16_autocast_is_finite():
    torch.manual_seed(5)
    enc = KinematicPriorEncoder(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(torch.randn(2, 4, 6, 8), (2, 3))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_curl_and_divergence_of_a_rotation_and_an_expansion():
    from pks4_layers.layers.kinematic_prior import curl_divergence

    H, W = 5, 6
    y, x = torch.meshgrid(
        torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
    )
    y, x = y - 2.0, x - 2.5
    interior = (slice(1, H - 1), slice(1, W - 1))  # central differences see zeros at the edge

    def field(vx, vy):
        v = torch.stack([vx, vy], -1).reshape(1, 1, H * W, 2)
        return curl_divergence(v, H, W).reshape(H, W, 2)

    turn = field(-y, x)  # counter-clockwise in (x, y) with y pointing down: curl +2
    assert torch.allclose(turn[interior][..., 0], torch.full((H - 2, W - 2), 2.0).double())
    assert torch.allclose(turn[interior][..., 1], torch.zeros(H - 2, W - 2).double())
    grow = field(x, y)
    assert torch.allclose(grow[interior][..., 0], torch.zeros(H - 2, W - 2).double())
    assert torch.allclose(grow[interior][..., 1], torch.full((H - 2, W - 2), 2.0).double())
    # the opposite sense has the opposite curl: what a space average of displacements loses
    assert torch.allclose(field(y, -x)[interior][..., 0], -turn[interior][..., 0])


def test_curl_cue_and_unreduced_correlation_options():
    enc = KinematicPriorEncoder(8, prior_dim=4, corr_dim=None, cues=("cost", "curl", "change"))
    assert isinstance(enc.corr_reduce, torch.nn.Identity) and enc.corr_dim == 8
    assert enc.motion_dim == 25 + 2 and enc.change_dim == 25 + 2 + 1
    assert not hasattr(enc, "diff_reduce")
    x = torch.randn(2, 4, 12, 8)
    assert enc(x, (3, 4)).shape == (2, 4, 12, 4)
    assert "corr_dim=None" in repr(enc)
    with pytest.raises(ValueError, match=r"^corr_dim: expected a positive int or None, got 0"):
        KinematicPriorEncoder(8, corr_dim=0)
    with pytest.raises(ValueError, match=r"^cues: expected a non-empty subset of .*'curl'"):
        KinematicPriorEncoder(8, cues=("vorticity",))


def _smooth_pair(shift: tuple[float, float], H: int = 8, W: int = 9, dim: int = 16):
    """Channels of slow plane waves and the same waves moved by ``shift`` = (u, v) cells."""
    g = torch.Generator().manual_seed(5)
    freq = (torch.rand(dim, 2, generator=g, dtype=torch.float64) - 0.5) * 0.8  # rad per cell
    phase = torch.rand(dim, generator=g, dtype=torch.float64) * 6.28
    y, x = torch.meshgrid(
        torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
    )

    def waves(dx: float, dy: float) -> torch.Tensor:
        arg = freq[:, 0, None, None] * (x - dx) + freq[:, 1, None, None] * (y - dy)
        return rearrange(torch.sin(arg + phase[:, None, None]), "c h w -> 1 1 (h w) c")

    return waves(*shift), waves(0.0, 0.0)


@pytest.mark.parametrize("shift", [(0.1, 0.0), (-0.05, 0.08), (0.0, -0.125), (0.0, 0.0)])
def test_gradient_flow_recovers_a_sub_cell_translation(shift):
    """A pattern moved by an eighth of a cell or less: every location reports that motion."""
    from pks4_layers.layers.kinematic_prior import gradient_flow

    H, W = 8, 9
    current, previous = _smooth_pair(shift, H, W)
    flow = gradient_flow(current, previous, H, W, damping=0.0)[0, 0]
    want = torch.tensor(shift, dtype=torch.float64).expand_as(flow)
    # one-sided differences at the edges and the linearisation: a few percent of a small shift
    assert torch.allclose(flow, want, atol=0.01), (flow - want).abs().max()
    # the damping (a ridge) shrinks the answer, and it still points the way the pattern moved
    damped = gradient_flow(current, previous, H, W)[0, 0]
    assert (damped.norm(dim=-1) <= flow.norm(dim=-1) + 1e-12).all()
    if any(shift):
        cosine = torch.nn.functional.cosine_similarity(damped, want, dim=-1)
        assert cosine.min() > 0.95 and damped.norm(dim=-1).min() > 0.5 * want.norm(dim=-1)[0]


def test_gradient_flow_of_flat_maps_and_low_precision_is_finite():
    from pks4_layers.layers.kinematic_prior import gradient_flow

    flat = torch.ones(2, 3, 12, 4)
    assert torch.equal(gradient_flow(flat, 2 * flat, 3, 4), torch.zeros(2, 3, 12, 2))
    line = torch.randn(1, 2, 5, 4)  # one row: no vertical gradient
    assert torch.isfinite(gradient_flow(line, line.flip(1), 1, 5)).all()
    current, previous = _smooth_pair((0.1, 0.0))
    half = gradient_flow(current.half(), previous.half(), 8, 9)
    assert half.dtype == torch.float16
    assert torch.allclose(half.double(), gradient_flow(current, previous, 8, 9), atol=5e-3)


def test_flow_cue_alone_and_its_gradients():
    torch.manual_seed(6)
    enc = KinematicPriorEncoder(4, prior_dim=3, corr_dim=None, cues=("flow", "change")).double()
    assert enc.motion_dim == 2 and enc.change_dim == 3 and not enc.matches
    assert not hasattr(enc, "corr_log_scale")
    x = torch.randn(1, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: enc(t, (2, 3)), (x,))
    # in the encoder the flow is the displacement of the correlation features
    current, previous = _smooth_pair((0.1, -0.05))
    both = torch.cat([previous, current], dim=1)
    probe = KinematicPriorEncoder(16, corr_dim=None, cues=("flow",)).double()
    with torch.no_grad():
        cues = probe._displacement_cues(both, 8, 9)
    from pks4_layers.layers.kinematic_prior import gradient_flow

    normed = torch.nn.functional.normalize(both, dim=-1)
    assert torch.allclose(cues[0, 1], gradient_flow(normed[:, 1:], normed[:, :1], 8, 9)[0, 0])
    assert torch.count_nonzero(cues[:, 0]) == 0
