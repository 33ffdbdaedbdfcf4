"""insert_temporal: temporal modules between the blocks of a timm ViT (AIM's placement)."""

from __future__ import annotations

import pytest
import torch

from pks4_layers import PKS4Block
from pks4_layers.models import FrameBackbone, PKS4VideoClassifier, insert_temporal

timm = pytest.importorskip("timm")

B, T, SIZE = 2, 3, 32


def _vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE, depth=3
    ).eval()


def test_identity_at_insertion_and_the_users_vit_unchanged():
    vit = _vit()
    view = insert_temporal(vit, T, blocks=[0, -1], d_state=4, prior_dim=8, corr_dim=8)
    assert [type(b).__name__ for b in view.blocks] == [
        "TemporalBeforeBlock",
        "Block",
        "TemporalBeforeBlock",
    ]
    assert all(type(b).__name__ == "Block" for b in vit.blocks)  # the user's ViT as it was
    assert view.blocks[1] is vit.blocks[1] and view.patch_embed is vit.patch_embed
    frames = torch.randn(B * T, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(view.forward_features(frames), vit.forward_features(frames))
    temporal = view.blocks[0].temporal
    assert isinstance(temporal, PKS4Block) and view.blocks[0].grid == (2, 2)


@pytest.mark.parametrize("kind", ["pks4", "adapter", "attention"])
def test_inserted_modules_mix_frames_and_train(kind):
    vit = _vit()
    view = insert_temporal(vit, T, kind=kind, blocks=[1], inner_dim=16)
    model = PKS4VideoClassifier(FrameBackbone(view), 4, T, temporal="mean")
    with torch.no_grad():
        proj = (
            model.backbone.model.blocks[1].temporal.output_projection()
            if kind != "pks4"
            else (model.backbone.model.blocks[1].temporal.scan.out_proj)
        )
        proj.weight.normal_(std=0.5)
    clip = torch.randn(B, T, 3, SIZE, SIZE)
    later = clip.clone()
    later[:, 1] += 1.0
    model.eval()
    with torch.no_grad():
        first = model.forward_features(clip).x[:, 0]
        moved = model.forward_features(later).x[:, 0]
    # frame 0's tokens now depend on frame 1 (bidirectional modules mix neighbouring frames)
    assert not torch.allclose(first, moved)
    model.train()
    model(clip).sum().backward()
    temporal = model.backbone.model.blocks[1].temporal
    assert all(p.grad is not None for p in temporal.parameters())


def test_bad_arguments_are_named():
    vit = _vit()
    with pytest.raises(ValueError, match=r"^blocks: expected indices in \[-3, 3\)"):
        insert_temporal(vit, T, blocks=[3])
    with pytest.raises(ValueError, match=r"^vit: expected a timm Vision Transformer"):
        insert_temporal(torch.nn.Linear(2, 2), T)
    view = insert_temporal(vit, T, blocks=[0])
    with pytest.raises(ValueError, match=r"^x: expected tokens \(B\*T, N, C\) of clips of"):
        view.forward_features(torch.randn(4, 3, SIZE, SIZE))
