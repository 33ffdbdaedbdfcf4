"""PKS4Block's design options: bottleneck width, where the prior enters, which cues it keeps,
output initialisation, step sizes, correlation temperature, prior normalisation, gradient
checkpointing. Each is computed for real and compared with what it must equal."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from pks4_layers import PKS4Block
from pks4_layers.models import PKS4VideoClassifier
from pks4_layers.models.backbone import FrameBackbone
from tolerances import assert_close

DIM = 16


def _block(**kw) -> PKS4Block:
    torch.manual_seed(0)
    kw.setdefault("prior_dim", 6)
    kw.setdefault("d_state", 4)
    kw.setdefault("corr_dim", 8)
    kw.setdefault("diff_dim", 4)
    return PKS4Block(DIM, **kw)


def _open(block: PKS4Block) -> PKS4Block:
    """Open the temporal path (the output projection starts at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        block.scan.out_proj.weight.normal_(std=0.3)
        block.scan.out_proj.bias.normal_(std=0.1)
    return block


OPTIONS = [
    {"inner_dim": 8},
    {"inner_dim": 24},
    {"prior_targets": ("selection", "stream")},
    {"prior_targets": ("selection", "gate")},
    {"prior_targets": ("selection", "stream", "gate")},
    {"prior_targets": ("stream",)},
    {"prior_targets": ("selection", "output")},
    {"prior_targets": ("stream", "gate", "output")},
    {"cues": ("displacement", "difference")},
    {"cues": ("cost", "difference")},
    {"cues": ("cost", "displacement")},
    {"cues": ("difference",)},
    {"cues": ("cost", "displacement", "difference", "change")},
    {"cues": ("displacement", "change")},
    {"prior_norm": "layer"},
    {"motion_norm": "batch"},
    {"motion_norm": "batch", "cues": ("cost", "displacement", "change", "curl")},
    {"learn_corr_temperature": False, "corr_temperature": 3.0},
    {"dt_min": 1e-2, "dt_max": 1.0},
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_option_identity_at_insertion_and_gradients(options):
    block = _block(**options)
    x = torch.randn(2, 5, DIM, 3, 4)
    assert torch.equal(block(x), x)  # zero output projection: identity, whatever the option
    _open(block)
    out = block(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_option_streams_like_the_whole_clip(options):
    block = _open(_block(bidirectional=False, **options)).double()
    x = torch.randn(2, 7, 1 + 6, DIM, dtype=torch.float64)
    if options.get("motion_norm") == "batch":
        # Batch statistics differ from chunk to chunk in training: a stream runs on the running
        # ones (evaluation), where every chunking gives the whole clip's answer.
        with torch.no_grad():
            block(x * 3 + 1, grid=(2, 3), num_prefix_tokens=1)  # running statistics != (0, 1)
        assert not torch.allclose(block.prior.motion_bn.running_var, torch.ones(()).double())
        block.eval()
    whole = block(x, grid=(2, 3), num_prefix_tokens=1)
    state, parts = None, []
    for chunk in x.split([3, 1, 3], dim=1):
        y, state = block.step(chunk, state, grid=(2, 3), num_prefix_tokens=1)
        parts.append(y)
    assert_close(torch.cat(parts, 1), whole)


def test_float64_gradcheck_with_every_option_on():
    block = _open(
        _block(
            inner_dim=8,
            prior_targets=("selection", "stream", "gate"),
            cues=("cost", "displacement", "difference", "change"),
            prior_norm="layer",
            d_state=2,
            radius=1,
        )
    ).double()
    x = torch.randn(1, 3, DIM, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


def test_inner_dim_after_efficientnet_lite0_keeps_the_block_small():
    timm = pytest.importorskip("timm")
    backbone = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    narrow = PKS4Block(backbone.num_features, inner_dim=256)
    full = PKS4Block(backbone.num_features)
    n_narrow = sum(p.numel() for p in narrow.parameters())
    # 0.89 M: 26% of the backbone's 3.37 M (the down and up projections alone are 0.66 M),
    # a sixth of the full-width block's 5.6 M.
    assert n_narrow < 0.27 * backbone_params, (n_narrow, backbone_params)
    assert n_narrow < sum(p.numel() for p in full.parameters()) / 6
    assert narrow.scan.d_inner == 256 and narrow.scan.out_proj.out_features == 1280


def test_inner_dim_default_is_the_full_width_without_a_down_projection():
    block = _block()
    assert block.inner_dim == DIM and isinstance(block.down, torch.nn.Identity)
    assert not any(k.startswith("down.") for k in block.state_dict())


def test_removed_cues_build_no_branch():
    only_diff = _block(cues=("difference",))
    assert not hasattr(only_diff.prior, "corr_reduce")
    only_corr = _block(cues=("cost",))
    assert not hasattr(only_corr.prior, "diff_reduce")
    # has_previous + the cost volume's (2r+1)^2 entries
    assert only_corr.prior.fuse[0].in_features == 1 + 25


def test_change_cue_is_the_change_of_the_motion_cues_since_the_previous_pair():
    """What the fusion gets: motion[t] - motion[t-1] where both frames have a predecessor (t >= 2),
    zero at frames 0 and 1, and that flag; the motion cues themselves are unchanged."""
    block = _block(cues=("cost", "displacement", "change"))
    enc = block.prior
    seen = []
    enc.fuse.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 6, 12, DIM)
    enc(x, (3, 4))
    fused = seen[0]
    M = enc.motion_dim
    assert M == 25 + 3 and fused.shape[-1] == M + 1 + M + 1
    motion, has_previous, change, flag = fused.split([M, 1, M, 1], dim=-1)
    assert torch.equal(has_previous[:, :, 0, 0], torch.tensor([[0.0] + [1.0] * 5] * 2))
    assert torch.equal(flag[:, :, 0, 0], torch.tensor([[0.0, 0.0] + [1.0] * 4] * 2))
    assert not change[:, :2].any()
    assert_close(change[:, 2:], motion[:, 2:] - motion[:, 1:-1])
    with pytest.raises(
        ValueError, match="cues: expected 'cost', 'displacement', 'curl' or 'flow' with 'change'"
    ):
        _block(cues=("difference", "change"))
    # A stream state from an encoder without the change cue is refused by name, not in a kernel.
    without = _block(cues=("cost", "displacement")).prior
    with pytest.raises(ValueError, match=r"state: expected previous_motion of shape \(2, 12, 28\)"):
        enc.step(x, (3, 4), without.init_stream(2, 12))


def test_prior_targets_build_only_what_they_use():
    assert _block(prior_targets=("selection",)).scan.prior_in_proj is None
    default = _block()
    assert default.scan.prior_targets == ("selection", "output")
    assert default.scan.prior_in_proj.out_features == default.scan.d_inner
    both = _block(prior_targets=("selection", "stream", "gate"))
    assert both.scan.prior_in_proj.out_features == 2 * both.scan.d_inner
    every = _block(prior_targets=("selection", "stream", "gate", "output"))
    assert every.scan.prior_in_proj.out_features == 3 * every.scan.d_inner
    stream_only = _block(prior_targets=("stream",))
    assert all(d.prior_proj is None for d in stream_only.scan.directions)


def test_prior_in_the_gate_changes_the_gate_only():
    """With the prior in the gate, zeroing the stream part of a shared map changes nothing."""
    block = _open(_block(prior_targets=("selection", "gate"), prior_norm="none"))
    x = torch.randn(1, 4, DIM, 2, 2)
    before = block(x)
    with torch.no_grad():
        block.scan.prior_in_proj.weight.zero_()
    after = block(x)
    assert not torch.allclose(before, after)  # the gate saw the prior
    plain = _block(prior_targets=("selection",), prior_norm="none")
    missing, unexpected = plain.load_state_dict(block.state_dict(), strict=False)
    assert not missing and unexpected == ["scan.prior_in_proj.weight"]
    assert_close(after, plain(x))


def test_small_output_init_is_not_the_identity_and_reset_keeps_the_choice():
    block = _block(out_init="small")
    x = torch.randn(1, 4, DIM, 2, 2)
    assert not torch.equal(block(x), x)
    std = block.scan.out_proj.weight.std().item()
    assert 0.01 < std < 0.03
    block.reset_output()
    assert block.scan.out_proj.weight.abs().sum() > 0


def test_dt_range_sets_the_initial_step_sizes():
    block = _block(dt_min=0.05, dt_max=0.2)
    for d in block.scan.directions:
        dt = torch.nn.functional.softplus(d.dt_proj.bias)
        assert dt.min() >= 0.05 * 0.999 and dt.max() <= 0.2 * 1.001


def test_fixed_correlation_temperature_is_a_buffer():
    block = _block(learn_corr_temperature=False, corr_temperature=4.0)
    names = dict(block.named_parameters())
    assert "prior.corr_log_scale" not in names
    assert torch.isclose(block.prior.corr_log_scale.exp(), torch.tensor(4.0))
    assert "prior.corr_log_scale" in dict(_block().named_parameters())


def test_prior_layer_norm_gives_unit_scale_priors():
    block = _block(prior_norm="layer")
    x = torch.randn(2, 4, 6, DIM)
    prior = block.prior(x, (2, 3))
    assert prior.mean(-1).abs().max() < 1e-5
    assert (prior.var(-1, unbiased=False) - 1).abs().max() < 1e-2  # LayerNorm eps


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"inner_dim": 0}, "inner_dim"),
        ({"out_init": "ones"}, "out_init"),
        ({"prior_targets": ()}, "prior_targets"),
        ({"prior_targets": ("delta",)}, "prior_targets"),
        ({"cues": ()}, "cues"),
        ({"cues": ("optical_flow",)}, "cues"),
        ({"cues": ("cost", "cost")}, "cues"),
        ({"prior_norm": "batch"}, "prior_norm"),
        ({"motion_norm": "layer"}, "motion_norm"),
        ({"corr_temperature": 0.0}, "corr_temperature"),
        ({"dt_min": 0.1, "dt_max": 0.01}, "dt_min"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _block(**kwargs)


def _saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("bidirectional", [True, False])
def test_grad_checkpointing_gives_the_plain_gradients_and_keeps_only_the_input(bidirectional):
    plain = _open(_block(bidirectional=bidirectional, inner_dim=12))
    ckpt = _open(_block(bidirectional=bidirectional, inner_dim=12))
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 6, 1 + 6, DIM)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = plain(xa, grid=(2, 3), num_prefix_tokens=1)
    yb = ckpt(xb, grid=(2, 3), num_prefix_tokens=1)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert_close(xb.grad, xa.grad)
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
        assert_close(pb.grad, pa.grad, msg=name)

    kept_plain = _saved_bytes(lambda: plain(x.requires_grad_(), grid=(2, 3), num_prefix_tokens=1))
    kept_ckpt = _saved_bytes(lambda: ckpt(x.requires_grad_(), grid=(2, 3), num_prefix_tokens=1))
    assert kept_ckpt == x.numel() * x.element_size()
    assert kept_ckpt < kept_plain / 4


def test_grad_checkpointing_is_off_without_autograd_and_switchable():
    block = _open(_block())
    block.set_grad_checkpointing()
    assert block.grad_checkpointing
    x = torch.randn(1, 3, DIM, 2, 2)
    with torch.no_grad():
        y = block(x)
    block.set_grad_checkpointing(False)
    assert not block.grad_checkpointing
    assert torch.equal(block(x), y)


def test_classifier_grad_checkpointing_reaches_the_block():
    backbone = torch.nn.Conv2d(3, DIM, 4, stride=4)
    model = PKS4VideoClassifier(
        FrameBackbone(backbone, num_features=DIM),
        num_classes=3,
        num_frames=4,
        block_kwargs={"prior_dim": 6, "d_state": 4},
    )
    model.set_grad_checkpointing(True)
    assert model.temporal.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.temporal.grad_checkpointing
    # a temporal module without checkpointing ("mean") is left alone, without an error
    PKS4VideoClassifier(
        model.backbone, num_classes=3, num_frames=4, temporal="mean"
    ).set_grad_checkpointing(True)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_recompute_gives_the_same_gradients_and_keeps_less(bidirectional):
    kept = _open(_block(bidirectional=bidirectional, recompute=False))
    recomputed = _open(_block(bidirectional=bidirectional))
    assert recomputed.recompute and all(d.recompute for d in recomputed.scan.directions)
    x = torch.randn(2, 6, DIM, 3, 3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = kept(xa), recomputed(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xb.grad, xa.grad)
    for (name, pa), pb in zip(kept.named_parameters(), recomputed.parameters()):
        assert torch.equal(pb.grad, pa.grad), name
    saved_kept = _saved_bytes(lambda: kept(x.requires_grad_()))
    saved_recomputed = _saved_bytes(lambda: recomputed(x.requires_grad_()))
    assert saved_recomputed < 0.75 * saved_kept, (saved_recomputed, saved_kept)


def test_scan_input_prior_scans_the_kinematic_prior_and_streams():
    block = _open(_block(scan_input="prior", bidirectional=False))
    assert block.scan.in_proj.in_features == 6  # prior_dim: the scan reads the prior
    x = torch.randn(2, 5, DIM, 3, 4)
    assert torch.equal(_block(scan_input="prior")(x), x)  # identity when created
    with torch.no_grad():
        whole = block(x)
        first, state = block.step(x[:, :2])
        second, _ = block.step(x[:, 2:], state)
    assert_close(torch.cat([first, second], 1), whole)
    # the scan's stream is the prior: the features reach the branch only through it
    seen = []
    handle = block.scan.in_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        block(x)
    handle.remove()
    prior = block.prior(block.down(block.norm(x.flatten(3).transpose(2, 3))), (3, 4))
    assert_close(seen[0], prior)
    with pytest.raises(ValueError, match=r"^scan_input: expected one of \['features', 'prior'\]"):
        _block(scan_input="content")


def test_scan_dropout_acts_on_the_scanned_features_in_training_only():
    x = torch.randn(2, 5, DIM, 3, 4)
    plain, dropped = _open(_block()), _open(_block(scan_dropout=0.5))
    dropped.load_state_dict(plain.state_dict())
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))
        dropped.train()
        torch.manual_seed(3)
        assert not torch.allclose(dropped(x), plain(x))
    with pytest.raises(ValueError, match=r"^scan_dropout: expected a float in \[0, 1\)"):
        _block(scan_dropout=1.0)
