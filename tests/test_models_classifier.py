"""PKS4VideoClassifier and FrameBackbone on timm CNNs, timm ViTs and torchvision ResNets."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import pytest
import torch
from torch import nn

from pks4_layers import PKS4Block
from pks4_layers.models import (
    FrameBackbone,
    PKS4VideoClassifier,
    TemporalConvBlock,
    TemporalIdentity,
    create_backbone,
)
from pks4_layers.models.classifier import batch_norms

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

B, T, SIZE, CLASSES = 2, 4, 64, 7
TEMPORALS = ("pks4", "mean", "tconv")


def _timm_cnn() -> nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


def _timm_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE)


def _tv_resnet() -> nn.Module:
    return torchvision.models.resnet18(weights=None)


BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "timm_cnn": _timm_cnn,
    "timm_vit": _timm_vit,
    "tv_resnet": _tv_resnet,
}


def _clip(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, SIZE, SIZE, generator=g)


def _output_proj(model: PKS4VideoClassifier) -> nn.Linear:
    if isinstance(model.temporal, PKS4Block):
        return model.temporal.scan.out_proj
    assert isinstance(model.temporal, TemporalConvBlock)
    return model.temporal.pwconv


@torch.no_grad()
def _perturb_output(model: PKS4VideoClassifier, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    proj = _output_proj(model)
    proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.05)


def _sibling(
    reference: PKS4VideoClassifier, temporal: str, preset: Optional[str] = None
) -> PKS4VideoClassifier:
    """A classifier with ``reference``'s backbone and head weights and another temporal module."""
    model = PKS4VideoClassifier(
        copy.deepcopy(reference.backbone), CLASSES, T, temporal=temporal, preset=preset
    )
    model.head.load_state_dict(reference.head.state_dict())
    return model


# --- FrameBackbone -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "channels", "grid", "prefix"),
    [
        ("timm_cnn", "map", 512, (2, 2), 0),
        ("timm_vit", "tokens", 192, (4, 4), 1),
        ("tv_resnet", "map", 512, (2, 2), 0),
    ],
)
def test_frame_backbone_detects_layout(name, kind, channels, grid, prefix):
    backbone = FrameBackbone(BACKBONES[name]())
    assert (backbone.kind, backbone.num_features) == (kind, channels)
    with torch.no_grad():
        feats = backbone.eval()(_clip())
    assert feats.kind == kind
    assert feats.grid == grid
    assert feats.num_prefix_tokens == prefix
    if kind == "map":
        assert feats.x.shape == (B, T, channels, *grid)
    else:
        assert feats.x.shape == (B, T, prefix + grid[0] * grid[1], channels)


def test_frame_backbone_matches_per_frame_model():
    model = _tv_resnet().eval()
    x = _clip()
    with torch.no_grad():
        feats = FrameBackbone(model)(x).x
        trunk = nn.Sequential(*list(model.children())[:-2])  # up to layer4
        expected = torch.stack([trunk(x[:, t]) for t in range(T)], dim=1)
    torch.testing.assert_close(feats, expected)


def test_frame_backbone_torchvision_without_fc_and_custom_module():
    tv = torchvision.models.resnet50(weights=None)
    tv.fc = nn.Identity()
    assert FrameBackbone(tv).num_features == 2048

    conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU())
    with pytest.raises(ValueError, match="num_features"):
        FrameBackbone(conv)
    backbone = FrameBackbone(conv, num_features=8)
    assert backbone(_clip()).x.shape == (B, T, 8, 16, 16)
    with pytest.raises(ValueError, match=r"num_features: expected 512"):
        FrameBackbone(_timm_cnn(), num_features=100)


def test_frame_backbone_leaves_the_users_model_as_it_was():
    """The classifier never runs: it is left out of the backbone (no parameter without a
    gradient), and the model the user passed keeps it, its weights shared, not copied."""
    tv = torchvision.models.resnet18(weights=None)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    for original, model in ((tv, FrameBackbone(tv)), (net, FrameBackbone(net))):
        model(_clip()).x.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        assert isinstance(original.fc, nn.Linear)  # still the user's classifier
        assert original.fc.weight.grad is None
        assert model.model.conv1.weight is original.conv1.weight  # shared, not copied
        theirs = sum(p.numel() for p in original.parameters())
        assert (
            sum(p.numel() for p in model.parameters())
            == theirs - original.fc.weight.numel() - original.fc.bias.numel()
        )
    assert net.num_classes == 10
    logits = net(torch.randn(1, 3, SIZE, SIZE))
    assert logits.shape == (1, 10)


@pytest.mark.parametrize(
    "name, channels",
    [
        ("mobilenet_v3_small", 576),
        ("efficientnet_b0", 1280),
        ("convnext_tiny", 768),
        ("regnet_x_400mf", 400),
        ("densenet121", 1024),
    ],
)
def test_torchvision_classifiers_beyond_resnet(name, channels):
    model = getattr(torchvision.models, name)(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = FrameBackbone(model)
    # the channel probe ran in eval mode: no BatchNorm statistic moved, nothing was replaced
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training
    head = model.classifier if hasattr(model, "classifier") else model.fc
    assert not isinstance(head, nn.Identity)
    assert backbone.num_features == channels and backbone.source.startswith("torchvision_")
    feats = backbone(_clip())
    assert feats.kind == "map" and feats.x.shape[:3] == (B, T, channels)
    clf = PKS4VideoClassifier(backbone, CLASSES, T, temporal="tsm")
    assert clf(_clip()).shape == (B, CLASSES)


def test_frame_backbone_rejects_wrong_outputs():
    with pytest.raises(ValueError, match="output: expected"):
        FrameBackbone(nn.Conv2d(3, 8, 3), num_features=16)(_clip())
    with pytest.raises(ValueError, match="output: expected"):
        FrameBackbone(nn.Flatten(2), num_features=3)(_clip())  # 3-D output, no token grid
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module"):
        FrameBackbone("resnet18")


def test_create_backbone():
    tv = create_backbone("tv_resnet18")
    assert isinstance(tv, torchvision.models.ResNet)
    net = create_backbone("resnet18")
    assert net.num_classes == 0 and net.num_features == 512
    module = nn.Conv2d(3, 4, 1)
    assert create_backbone(module) is module
    with pytest.raises(ValueError, match="downloads nothing"):
        create_backbone("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="pretrained: expected False for 'tv_resnet18'"):
        create_backbone("tv_resnet18", pretrained=True)
    with pytest.raises(ValueError, match="tv_resnet50"):
        create_backbone("tv_vgg16")


def test_create_backbone_from_checkpoint_file(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)  # 1000-class classifier
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = create_backbone("resnet18", pretrained=str(path))
    assert net.num_classes == 0
    torch.testing.assert_close(net.conv1.weight, source.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        net.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var, rtol=0, atol=0
    )
    with pytest.raises(FileNotFoundError):
        create_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))


# --- training behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", TEMPORALS)
@pytest.mark.parametrize("name", list(BACKBONES))
def test_forward_backward(name, temporal):
    torch.manual_seed(0)
    model = PKS4VideoClassifier(BACKBONES[name](), CLASSES, T, temporal=temporal).train()
    logits = model(_clip())
    assert logits.shape == (B, CLASSES)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for part in (model.head, model.temporal, model.backbone):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        if grads:
            assert sum(g.abs().sum() for g in grads) > 0
    if temporal == "mean":
        assert isinstance(model.temporal, TemporalIdentity)
        assert not list(model.temporal.parameters())
    else:
        assert _output_proj(model).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("temporal", TEMPORALS)
@pytest.mark.parametrize("name", list(BACKBONES))
def test_frozen_backbone(name, temporal):
    torch.manual_seed(0)
    model = PKS4VideoClassifier(
        BACKBONES[name](), CLASSES, T, temporal=temporal, freeze_backbone=True
    )
    model.train()
    assert model.training and model.temporal.training and model.head.training
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    if name != "timm_vit":
        assert any("running_var" in k for k in stats)

    model(_clip()).logsumexp(-1).sum().backward()

    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is not None for p in model.temporal.parameters())
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0, msg=k)
    groups = model.parameter_groups()
    assert groups["backbone"] == []
    # After a frozen backbone PKS4 gets the preset motion_only: a second, LayerNorm-free head.
    assert model.preset == ("motion_only" if temporal == "pks4" else "features")
    assert len(groups["head"]) == 4 + (2 if temporal == "pks4" else 0)
    assert len(groups["temporal"]) == len(list(model.temporal.parameters()))

    model.set_backbone_frozen(False)
    model.train()
    assert model.backbone.training
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_unfrozen_backbone_updates_batchnorm_statistics():
    model = PKS4VideoClassifier(_tv_resnet(), CLASSES, T, temporal="mean").train()
    before = model.backbone.model.bn1.running_mean.clone()
    model(_clip())
    assert not torch.equal(before, model.backbone.model.bn1.running_mean)


def _with_learnt_statistics(backbone: nn.Module) -> nn.Module:
    """The backbone's BatchNorm statistics as a pretrained one holds them: not 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    for norm in batch_norms(backbone):
        norm.running_mean.copy_(torch.rand(norm.running_mean.shape, generator=gen) - 0.5)
        norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=gen) + 0.5)
    return backbone


def _statistics(model: PKS4VideoClassifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}


def test_a_pretrained_backbone_that_trains_keeps_its_batchnorm_statistics():
    model = PKS4VideoClassifier(
        _with_learnt_statistics(_tv_resnet()), CLASSES, T, temporal="tsm"
    ).train()
    assert model.backbone_norm == "eval" and model.init_config["backbone_norm"] == "eval"
    norms = batch_norms(model.backbone)
    assert norms and not any(n.training for n in norms)
    assert model.backbone.training and model.backbone.model.layer1.training
    before = _statistics(model)
    x = _clip()
    logits = model(x)
    logits.logsumexp(-1).sum().backward()
    for k, v in _statistics(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    # The affine weights and every other backbone parameter still train.
    assert all(p.requires_grad and p.grad is not None for p in model.backbone.parameters())
    assert all(n.weight.grad.abs().sum() > 0 for n in norms)
    # No dropout in the backbone and the head: training mode computes what evaluation does.
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(x))


def test_a_new_backbone_learns_its_batchnorm_statistics_and_the_choice_can_be_forced():
    fresh = PKS4VideoClassifier(_tv_resnet(), CLASSES, T, temporal="mean").train()
    assert fresh.backbone_norm == "train" and all(n.training for n in batch_norms(fresh.backbone))
    forced = PKS4VideoClassifier(
        _with_learnt_statistics(_tv_resnet()), CLASSES, T, temporal="mean", backbone_norm="train"
    ).train()
    before = _statistics(forced)
    forced(_clip())
    assert not torch.equal(
        before["model.bn1.running_mean"], _statistics(forced)["model.bn1.running_mean"]
    )
    kept = PKS4VideoClassifier(_tv_resnet(), CLASSES, T, temporal="mean", backbone_norm="eval")
    kept.train()
    assert kept.backbone_norm == "eval" and not any(n.training for n in batch_norms(kept.backbone))
    # Frozen wins: the whole backbone stays in evaluation mode either way.
    frozen = PKS4VideoClassifier(
        _tv_resnet(), CLASSES, T, temporal="mean", freeze_backbone=True, backbone_norm="train"
    ).train()
    assert not any(m.training for m in frozen.backbone.modules())
    with pytest.raises(
        ValueError,
        match=r"^backbone_norm: expected one of \['eval', 'train'\] or None, got 'frozen'",
    ):
        PKS4VideoClassifier(_tv_resnet(), CLASSES, T, temporal="mean", backbone_norm="frozen")


# --- the identity at insertion and frame order ---------------------------------------------------


@pytest.mark.parametrize(
    ("temporal", "preset"), [("pks4", None), ("pks4", "features"), ("tconv", None)]
)
@pytest.mark.parametrize("name", list(BACKBONES))
def test_identity_at_insertion(name, temporal, preset):
    torch.manual_seed(0)
    reference = PKS4VideoClassifier(BACKBONES[name](), CLASSES, T, temporal="mean").eval()
    model = _sibling(reference, temporal, preset).eval()
    x = _clip()
    with torch.no_grad():
        expected = reference(x)
        before = model(x)
        if model.motion_head is None:
            assert torch.equal(before, expected)
        else:  # the factored readout: the frame average's head, a motion head on zero (its bias)
            content, motion = model(x, return_heads=True)
            assert torch.equal(content, expected)
            assert torch.equal(motion, model.motion_head.fc.bias.expand_as(motion))
        _perturb_output(model)
        assert not torch.allclose(model(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["timm_cnn", "timm_vit"])
def test_frame_order(name):
    torch.manual_seed(0)
    mean = PKS4VideoClassifier(BACKBONES[name](), CLASSES, T, temporal="mean").eval()
    pks4 = _sibling(mean, "pks4").eval()
    _perturb_output(pks4)
    x = _clip()
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(mean(x[:, perm]), mean(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(pks4(x[:, perm]), pks4(x), rtol=1e-4, atol=1e-4)


def test_token_pool_choices():
    torch.manual_seed(0)
    avg = PKS4VideoClassifier(_timm_vit(), CLASSES, T, temporal="mean").eval()
    prefix = PKS4VideoClassifier(
        copy.deepcopy(avg.backbone), CLASSES, T, temporal="mean", token_pool="prefix"
    ).eval()
    with torch.no_grad():
        feats = avg.forward_features(_clip())
        torch.testing.assert_close(avg.pool(feats), feats.x[:, :, 1:].mean(dim=(1, 2)))
        torch.testing.assert_close(prefix.pool(feats), feats.x[:, :, 0].mean(dim=1))
    with pytest.raises(ValueError, match="token_pool"):
        PKS4VideoClassifier(_tv_resnet(), CLASSES, T, token_pool="prefix")


# --- errors --------------------------------------------------------------------------------------


def test_input_errors():
    model = PKS4VideoClassifier(_tv_resnet(), CLASSES, T, temporal="tconv")
    with pytest.raises(ValueError, match=r"x: expected num_frames T=4 .* got T=3"):
        model(torch.zeros(B, 3, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="x: expected 5 dims"):
        model(torch.zeros(B * T, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        model(torch.zeros(B, T, 1, SIZE, SIZE))
    with pytest.raises(TypeError, match=r"x: expected a torch\.Tensor"):
        model(None)


def test_constructor_errors():
    with pytest.raises(ValueError, match="temporal: expected one of"):
        PKS4VideoClassifier(_tv_resnet(), CLASSES, T, temporal="lstm")
    with pytest.raises(ValueError, match="model: expected a timm model"):
        PKS4VideoClassifier(nn.Sequential(nn.Conv2d(3, 8, 3)), CLASSES, T)
    with pytest.raises(ValueError, match="num_frames"):
        PKS4VideoClassifier(_tv_resnet(), CLASSES, 0)
    with pytest.raises(ValueError, match="block_kwargs"):
        PKS4VideoClassifier(_tv_resnet(), CLASSES, T, temporal="mean", block_kwargs={"d_state": 8})
    with pytest.raises(ValueError, match="pretrained"):
        PKS4VideoClassifier(_tv_resnet(), CLASSES, T, pretrained=True)


def test_custom_backbone_and_block_kwargs():
    backbone = FrameBackbone(nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.GELU()), 16)
    model = PKS4VideoClassifier(
        backbone, CLASSES, T, temporal="pks4", block_kwargs={"d_state": 4, "prior_dim": 8}
    )
    assert model.backbone is backbone
    assert model.temporal.scan.directions[0].d_state == 4
    assert model(_clip()).shape == (B, CLASSES)
    tconv = PKS4VideoClassifier(
        copy.deepcopy(backbone), CLASSES, T, temporal="tconv", block_kwargs={"kernel_size": 5}
    )
    assert tconv.temporal.dwconv.kernel_size == (5,)


def test_tune_last_blocks_trains_only_those_blocks_and_the_final_norm():
    """Partial tuning: gradients reach the last block(s) and the final norm of a ViT, not the
    blocks before them; the trainable count is temporal + head + those layers."""
    timm = pytest.importorskip("timm")
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=3
    )
    model = PKS4VideoClassifier(vit, num_classes=3, num_frames=2, freeze_backbone=True)
    frozen_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.tune_last_blocks(1)
    blocks = model.backbone.model.blocks
    tuned = sum(p.numel() for p in blocks[-1].parameters())
    tuned += sum(p.numel() for p in model.backbone.model.norm.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        frozen_trainable + tuned
    )
    with torch.no_grad():  # open the block's zero-initialised output path
        model.temporal.scan.out_proj.weight.normal_(0, 0.1)
    model(torch.randn(2, 2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[-1].parameters())
    assert all(p.grad is None for p in blocks[0].parameters())
    with pytest.raises(ValueError, match=r"^count: expected an int in \[1, 3\], got 4"):
        model.tune_last_blocks(4)
