"""The peer temporal modules (pks4_layers.baselines): the calling convention, identity at
creation, gradients, parameter formulas, causality, order invariance and their wiring."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from pks4_layers import PKS4Block
from pks4_layers.baselines import (
    FrameMLP,
    PriorAdapter,
    SelectiveScanBlock,
    SpatiotemporalScan,
    TemporalAdapter,
    TemporalAttention,
    TemporalShift,
)
from pks4_layers.baselines.temporal_shift import temporal_shift
from pks4_layers.models import FrameBackbone, PKS4VideoClassifier, create_temporal
from pks4_layers.models.temporal_heads import (
    PEER_KINDS,
    TEMPORAL_KINDS,
    inner_dim_for_params,
    temporal_num_params,
)

DIM, T, GRID = 16, 5, (3, 4)
# Small settings of each kind (the prior's and scan's widths cut down for speed).
SMALL = {
    "frame_mlp": {"inner_dim": 6},
    "tsm": {"inner_dim": 6},
    "adapter": {"inner_dim": 6},
    "attention": {"inner_dim": 8, "num_heads": 2},
    "scan": {"inner_dim": 8, "d_state": 4},
    "prior_adapter": {"inner_dim": 6, "prior_dim": 4, "corr_dim": 4, "diff_dim": 4},
    "st_scan": {"inner_dim": 8, "d_state": 4},
}
CLASSES = {
    "frame_mlp": FrameMLP,
    "tsm": TemporalShift,
    "adapter": TemporalAdapter,
    "attention": TemporalAttention,
    "scan": SelectiveScanBlock,
    "prior_adapter": PriorAdapter,
    "st_scan": SpatiotemporalScan,
}


def _make(kind: str, seed: int = 0, perturb: bool = True, **overrides) -> nn.Module:
    """A small peer; ``perturb`` gives its zero output projection random weights, so that its
    output depends on its branch."""
    torch.manual_seed(seed)
    module = create_temporal(kind, DIM, **{**SMALL[kind], **overrides})
    if perturb:
        with torch.no_grad():
            proj = module.output_projection()
            proj.weight.normal_(std=0.5)
            proj.bias.normal_(std=0.1)
    return module


def _maps(seed: int = 1, frames: int = T, batch: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, DIM, *GRID, generator=g)


def _tokens(seed: int = 2, prefix: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, T, prefix + GRID[0] * GRID[1], DIM, generator=g)


def test_the_registry_holds_every_peer_by_its_fixed_name():
    assert PEER_KINDS == (
        "frame_mlp",
        "tsm",
        "adapter",
        "attention",
        "scan",
        "prior_adapter",
        "st_scan",
    )
    assert set(TEMPORAL_KINDS) == {"pks4", "mean", "tconv", *PEER_KINDS}
    for kind, cls in CLASSES.items():
        assert type(create_temporal(kind, DIM, **SMALL[kind])) is cls
    with pytest.raises(ValueError, match=r"^temporal: expected one of .*'st_scan'.*got 'tsn'"):
        create_temporal("tsn", DIM)


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_identity_when_created_on_maps_and_tokens(kind):
    module = _make(kind, perturb=False)
    x = _maps()
    assert torch.equal(module(x), x)
    tokens = _tokens()
    assert torch.equal(module(tokens, grid=GRID, num_prefix_tokens=1), tokens)


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_shape_contract_and_layouts_agree(kind):
    """Maps and the same features as tokens give the same output, in the input's layout."""
    module = _make(kind)
    x = _maps()
    out = module(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    tokens = x.flatten(3).transpose(2, 3)  # (B, T, H*W, C)
    out_tokens = module(tokens, grid=GRID)
    assert out_tokens.shape == tokens.shape
    torch.testing.assert_close(out_tokens, out.flatten(3).transpose(2, 3))
    with_prefix = module(_tokens(prefix=2), grid=GRID, num_prefix_tokens=2)
    assert with_prefix.shape == _tokens(prefix=2).shape


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_gradients_reach_every_parameter(kind):
    module = _make(kind)
    x = _maps().requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    (module(x) * torch.randn(x.shape, generator=g)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{kind}: no gradient reaches {name}"


@pytest.mark.parametrize("kind", PEER_KINDS)
@pytest.mark.parametrize("dim,inner", [(16, 6), (48, 40), (64, 64), (130, 17)])
def test_parameter_count_formula(kind, dim, inner):
    kwargs = {k: v for k, v in SMALL[kind].items() if k != "inner_dim"}
    if kind == "attention":
        kwargs = {"max_frames": 12}
    for bidirectional in (True, False):
        module = create_temporal(kind, dim, inner_dim=inner, bidirectional=bidirectional, **kwargs)
        count = sum(p.numel() for p in module.parameters())
        formula = temporal_num_params(
            kind, dim, inner_dim=inner, bidirectional=bidirectional, **kwargs
        )
        assert formula == count, (kind, dim, inner, bidirectional)


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_inner_dim_for_params_matches_a_budget_within_ten_percent(kind):
    for dim in (128, 1280):
        target = sum(p.numel() for p in PKS4Block(dim).parameters())
        width = inner_dim_for_params(kind, dim, target)
        assert abs(temporal_num_params(kind, dim, inner_dim=width) / target - 1) < 0.10
    with pytest.raises(ValueError, match=r"^kind: expected one of .*got 'pks4'"):
        inner_dim_for_params("pks4", 16, 1000)


def _future_changes_the_past(module: nn.Module, t: int = 2) -> bool:
    x = _maps()
    later = x.clone()
    later[:, t + 1 :] += torch.randn_like(later[:, t + 1 :])
    with torch.no_grad():
        return not torch.allclose(module(x)[:, : t + 1], module(later)[:, : t + 1], atol=1e-6)


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_causal_when_not_bidirectional(kind):
    """``bidirectional=False``: frames after t do not change the output at frames <= t; the
    bidirectional module (except the frame MLP, which mixes no frames) does see them."""
    assert not _future_changes_the_past(_make(kind, bidirectional=False))
    if kind != "frame_mlp":
        assert _future_changes_the_past(_make(kind, bidirectional=True))


def test_temporal_shift_moves_the_folds():
    x = torch.arange(1.0, 4.0).view(1, 3, 1, 1).expand(1, 3, 1, 16).clone()  # frame index + 1
    out = temporal_shift(x, fold_div=8)
    assert out[0, :, 0, 0].tolist() == [2.0, 3.0, 0.0]  # from t + 1, zero padded
    assert out[0, :, 0, 2].tolist() == [0.0, 1.0, 2.0]  # from t - 1
    assert out[0, :, 0, 4].tolist() == [1.0, 2.0, 3.0]  # kept
    causal = temporal_shift(x, fold_div=8, bidirectional=False)
    assert causal[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert causal[0, :, 0, 2].tolist() == [1.0, 2.0, 3.0]


def test_scan_is_pks4_block_without_its_prior():
    """With the routes of its prior zeroed, a PKS4 block computes what ``scan`` computes with
    the same weights: the two differ by the prior and nothing else."""
    torch.manual_seed(0)
    block = PKS4Block(DIM, d_state=4, prior_dim=4, corr_dim=4, diff_dim=4, inner_dim=8)
    scan = SelectiveScanBlock(DIM, d_state=4, inner_dim=8)
    with torch.no_grad():
        block.scan.out_proj.weight.normal_()
        for direction in block.scan.directions:
            direction.prior_proj.weight.zero_()
        block.scan.prior_in_proj.weight.zero_()
    missing = scan.load_state_dict(
        {k: v for k, v in block.state_dict().items() if not k.startswith("prior.")}, strict=False
    )
    assert not missing.missing_keys
    assert {k.split(".")[-2] for k in missing.unexpected_keys} <= {"prior_proj", "prior_in_proj"}
    x = _maps()
    torch.testing.assert_close(scan(x), block(x))


def test_st_scan_mixes_locations_and_scan_keeps_them_apart():
    x = _maps()
    moved = x.clone()
    # frame 0, location (0, 0); not a constant, which the LayerNorm in front would remove
    moved[:, 0, :, 0, 0] += torch.linspace(-2.0, 3.0, DIM)
    for kind, mixes in (("scan", False), ("st_scan", True)):
        module = _make(kind)
        with torch.no_grad():
            changed = (module(moved) - module(x)).abs().amax(dim=(0, 2))  # (T, H, W)
        assert changed[0, 0, 0] > 1e-3
        assert bool(changed[:, 1:, :].amax() > 1e-6) is mixes, kind


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"^x: expected a feature map \(B, T, C=16"):
        _make("adapter")(torch.randn(2, T, 8, 3, 4))
    with pytest.raises(ValueError, match=r"^grid: expected \(H, W\) of the token grid"):
        _make("prior_adapter")(_tokens())
    with pytest.raises(ValueError, match=r"^x: expected at most max_frames=4 frames, got T=5"):
        _make("attention", max_frames=4)(_maps())
    with pytest.raises(ValueError, match=r"^num_heads: expected a positive int dividing"):
        TemporalAttention(DIM, inner_dim=6, num_heads=4)
    with pytest.raises(ValueError, match=r"^inner_dim: expected a positive int or None"):
        FrameMLP(DIM, inner_dim=0)
    with pytest.raises(ValueError, match=r"^activation: expected one of"):
        TemporalAdapter(DIM, activation="relu")
    with pytest.raises(ValueError, match=r"^prior_targets: expected at least one route"):
        PKS4Block(DIM, prior_targets=())


@pytest.mark.parametrize("kind", ["frame_mlp", "tsm", "adapter", "attention", "prior_adapter"])
def test_gradcheck_float64(kind):
    module = _make(kind).double()
    x = torch.randn(1, 3, DIM, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_bfloat16_close_to_float32(kind):
    module = _make(kind)
    x = _maps()
    ref = module(x)
    low = copy.deepcopy(module).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_grad_checkpointing_gives_the_same_gradients(kind):
    module = _make(kind)
    x = _maps()
    grads = []
    for enable in (False, True):
        module.zero_grad()
        module.set_grad_checkpointing(enable)
        module(x).square().sum().backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _classifier(kind: str) -> PKS4VideoClassifier:
    torch.manual_seed(0)
    backbone = FrameBackbone(nn.Sequential(nn.Conv2d(3, DIM, 8, stride=8), nn.GELU()), DIM)
    kwargs = SMALL.get(kind, {})
    model = PKS4VideoClassifier(backbone, 3, 6, temporal=kind, block_kwargs=kwargs)
    if kind in PEER_KINDS:
        with torch.no_grad():
            model.temporal.output_projection().weight.normal_(std=0.5)
            if kind == "attention":  # zero at creation: attention alone ignores the order
                model.temporal.time_embed.normal_()
    return model.eval()


@pytest.mark.parametrize("kind", ["mean", "frame_mlp"])
def test_order_blind_models_are_invariant_to_frame_order(kind):
    """The frame average and the frame MLP see no order: reversed or shuffled frames give the
    same logits (up to the order of a float sum)."""
    model = _classifier(kind)
    g = torch.Generator().manual_seed(3)
    clip = torch.randn(2, 6, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = model(clip)
        torch.testing.assert_close(model(clip.flip(1)), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(clip[:, [3, 0, 5, 1, 4, 2]]), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kind", ["tsm", "adapter", "attention", "scan", "prior_adapter", "st_scan"]
)
def test_order_aware_peers_see_the_order(kind):
    model = _classifier(kind)
    g = torch.Generator().manual_seed(3)
    clip = torch.randn(2, 6, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert not torch.allclose(model(clip.flip(1)), model(clip), atol=1e-5)


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_classifier_builds_each_peer_and_refuses_to_stream_it(kind):
    model = _classifier(kind)
    assert model.temporal_kind == kind
    logits = model(torch.randn(2, 6, 3, 32, 32))
    assert logits.shape == (2, 3)
    with pytest.raises(ValueError, match=rf"^temporal: expected 'mean' or 'pks4' .*got '{kind}'"):
        model.init_stream(2)
