"""ParallelTemporalScan: causality, per-location independence, the prior's role, backends."""

from __future__ import annotations

import pytest
import torch

from pks4_layers import ParallelTemporalScan
from tolerances import assert_close


def _scan(bidirectional: bool = True, backend: str = "auto", **kw) -> ParallelTemporalScan:
    torch.manual_seed(0)
    return ParallelTemporalScan(
        8, prior_dim=5, d_state=4, bidirectional=bidirectional, backend=backend, **kw
    )


def _frames_changed(module, x, prior, frame: int) -> list[bool]:
    base = module(x, prior)
    x2 = x.clone()
    x2[:, frame] += 1.0
    return ((module(x2, prior) - base).abs().amax(dim=(0, 2, 3)) > 0).tolist()


def test_forward_only_scan_is_causal():
    m = _scan(bidirectional=False).double()
    x, prior = torch.randn(2, 7, 3, 8).double(), torch.randn(2, 7, 3, 5).double()
    assert _frames_changed(m, x, prior, 3) == [False] * 3 + [True] * 4


def test_bidirectional_scan_sees_both_ways():
    m = _scan(bidirectional=True).double()
    x, prior = torch.randn(2, 7, 3, 8).double(), torch.randn(2, 7, 3, 5).double()
    assert _frames_changed(m, x, prior, 3) == [True] * 7


def test_locations_are_independent():
    m = _scan().double()
    x, prior = torch.randn(2, 5, 6, 8).double(), torch.randn(2, 5, 6, 5).double()
    perm = torch.randperm(6)
    assert_close(m(x[:, :, perm], prior[:, :, perm]), m(x, prior)[:, :, perm])


def test_prior_drives_the_scan():
    """The prior enters delta, B and C: changing it alone changes the output at that frame."""
    m = _scan(bidirectional=False).double()
    x, prior = torch.randn(1, 5, 2, 8).double(), torch.randn(1, 5, 2, 5).double()
    base = m(x, prior)
    prior2 = prior.clone()
    prior2[:, 2] += 1.0
    changed = (m(x, prior2) - base).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [False, False, True, True, True]
    d = m.directions[0]
    g = torch.autograd.grad(m(x, prior).sum(), d.prior_proj.weight)[0]
    # rows of prior_proj: [dt_rank | B (d_state) | C (d_state)]: each part receives gradient
    for part in torch.split(g, [d.dt_rank, d.d_state, d.d_state]):
        assert part.abs().sum() > 0


def test_mamba_initialisation():
    m = _scan(d_conv=4)
    for d in m.directions:
        dt = torch.nn.functional.softplus(d.dt_proj.bias)
        assert dt.min() >= 1e-4 and dt.max() <= 1e-1 + 1e-6
        assert torch.equal(-torch.exp(d.A_log), -torch.arange(1, 5).float().expand(8, 4))


def test_torch_backend_matches_ref_backend():
    x, prior = torch.randn(2, 6, 4, 8, requires_grad=True), torch.randn(2, 6, 4, 5)
    ref, fast = _scan(backend="ref"), _scan(backend="torch")
    y_ref, y = ref(x, prior), fast(x, prior)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    for (name, p_ref), p in zip(ref.named_parameters(), fast.parameters()):
        gr, gf = (
            torch.autograd.grad(y_ref, p_ref, g, retain_graph=True)[0],
            torch.autograd.grad(y, p, g, retain_graph=True)[0],
        )
        assert_close(gf, gr, scale=max(1.0, gr.abs().max().item()), msg=name)


def test_gradcheck_float64():
    m = ParallelTemporalScan(4, prior_dim=3, d_state=2, dt_rank=2).double()
    x = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x, prior))


@pytest.mark.parametrize(
    "x, prior, match",
    [
        (torch.randn(2, 3, 4, 7), torch.randn(2, 3, 4, 5), r"x: expected shape \(B, T, L, 8\)"),
        (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 6), r"prior: expected shape \(B, T, 4, 5\)"),
        (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 3, 5), r"prior: expected shape \(B, T, 4, 5\)"),
        (torch.randn(2, 3, 4, 8), torch.randn(2, 2, 4, 5), r"prior: expected \(B, T\) = \(2, 3\)"),
        (torch.randn(3, 4, 8), torch.randn(3, 4, 5), r"x: expected shape"),
    ],
    ids=["x-channels", "prior-channels", "prior-locations", "prior-frames", "x-rank"],
)
def test_bad_input(x, prior, match):
    with pytest.raises(ValueError, match=match):
        _scan()(x, prior)
