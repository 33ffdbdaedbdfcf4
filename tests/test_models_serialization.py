"""save_pretrained / from_pretrained (config + safetensors, no pickle) and from_checkpoint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from pks4_layers.models import FrameBackbone, PKS4VideoClassifier

pytest.importorskip("safetensors")


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.BatchNorm2d(16), nn.GELU())


def _opened(model: PKS4VideoClassifier) -> PKS4VideoClassifier:
    """Random weights everywhere (the temporal output starts at zero)."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_round_trip_with_a_module_backbone(tmp_path: Path):
    torch.manual_seed(0)
    kwargs = {"d_state": 4, "prior_dim": 8, "corr_dim": 8, "prior_targets": ("selection",)}
    model = _opened(PKS4VideoClassifier(FrameBackbone(_conv(), 16), 3, 4, block_kwargs=kwargs))
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["backbone"] is None and config["library_version"]
    assert config["block_kwargs"]["prior_targets"] == ["selection"]
    # safetensors: an 8-byte header length, a JSON header, raw tensor bytes (nothing to unpickle)
    raw = (tmp_path / "saved" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert "temporal.scan.out_proj.weight" in json.loads(raw[8 : 8 + n])
    with pytest.raises(ValueError, match=r"^backbone: expected the image model"):
        PKS4VideoClassifier.from_pretrained(tmp_path / "saved")
    loaded = PKS4VideoClassifier.from_pretrained(
        tmp_path / "saved", backbone=FrameBackbone(_conv(), 16)
    ).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.temporal.scan.prior_targets == ("selection",)


@pytest.mark.parametrize("temporal", ["pks4", "attention"])
def test_round_trip_with_a_named_backbone(tmp_path: Path, temporal):
    pytest.importorskip("torchvision")
    model = _opened(PKS4VideoClassifier("tv_resnet18", 5, 4, temporal=temporal))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["backbone"] == {"name": "tv_resnet18"}
    loaded = PKS4VideoClassifier.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_state_of_an_older_layout_says_what_differs(tmp_path: Path):
    """Weights from before the change-of-motion cue (the prior's fusion layer was [64, 61]) do
    not load silently: one line names the tensor, both shapes and where it came from."""
    old = PKS4VideoClassifier(
        FrameBackbone(_conv(), 16),
        3,
        4,
        block_kwargs={"cues": ("cost", "displacement", "difference")},
        preset="features",
    )
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_kwargs"] = {}  # as if the defaults had been saved implicitly
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"prior\.fuse\.0\.weight \[64, 61\] \(model: \[64, 90\]\)"
    ):
        PKS4VideoClassifier.from_pretrained(tmp_path, backbone=FrameBackbone(_conv(), 16))


def test_from_checkpoint_rebuilds_a_trained_model(tmp_path: Path):
    pytest.importorskip("timm")
    from pks4_layers.train import parse_args
    from pks4_layers.train.checkpoint import save_checkpoint
    from pks4_layers.train.engine import build_model

    cfg, _ = parse_args(["--backbone", "resnet18", "--temporal", "tsm", "--num-frames", "4"])
    model = _opened(build_model(cfg, num_classes=3, random_weights=True))
    path = tmp_path / "checkpoint_best.pt"
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "classes": ["a", "b", "c"]}
    save_checkpoint(path, state)
    loaded = PKS4VideoClassifier.from_checkpoint(path).eval()
    assert loaded.classes == ["a", "b", "c"] and loaded.temporal_kind == "tsm"
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"expected a pks4-layers checkpoint dict with a 'model'"):
        save_checkpoint(tmp_path / "other.pt", {"weights": torch.zeros(1)})
        PKS4VideoClassifier.from_checkpoint(tmp_path / "other.pt")


def test_a_checkpoint_written_before_presets_rebuilds_the_block_defaults(tmp_path: Path):
    """A pks4-train checkpoint of 0.2 (its config has no "preset"; the backbone frozen by
    default) holds the block's defaults and one head: it is rebuilt as that, not as today's
    default for a frozen backbone (the preset motion_only)."""
    pytest.importorskip("timm")
    from pks4_layers.train import parse_args
    from pks4_layers.train.checkpoint import save_checkpoint
    from pks4_layers.train.engine import build_model

    argv = ["--backbone", "resnet18", "--num-frames", "4", "--preset", "features"]
    cfg, _ = parse_args(argv)
    model = _opened(build_model(cfg, num_classes=3, random_weights=True))
    config = {k: v for k, v in cfg.to_dict().items() if k != "preset"}
    config["readout"] = "output"  # what 0.2 wrote
    path = tmp_path / "checkpoint_best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "classes": []})
    loaded = PKS4VideoClassifier.from_checkpoint(path).eval()
    assert loaded.preset == "features" and loaded.motion_head is None
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    fresh, _ = parse_args(["--backbone", "resnet18", "--num-frames", "4"])
    assert build_model(fresh, num_classes=3, random_weights=True).preset == "motion_only"


def test_the_backbone_norm_is_saved_resolved_and_an_older_model_trains_as_before(tmp_path: Path):
    """A model saved before ``backbone_norm`` existed trained its backbone with its batches'
    statistics: it is rebuilt that way, not by today's rule for learnt statistics."""
    backbone = _conv()
    backbone[1].running_var.fill_(2.0)  # statistics learnt from data
    model = PKS4VideoClassifier(FrameBackbone(backbone, 16), 3, 4, temporal="mean")
    assert model.backbone_norm == "eval"
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone_norm"] == "eval"
    loaded = PKS4VideoClassifier.from_pretrained(tmp_path, backbone=FrameBackbone(_conv(), 16))
    assert loaded.backbone_norm == "eval"  # the new backbone's statistics are 0 and 1
    del config["backbone_norm"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    older = PKS4VideoClassifier.from_pretrained(tmp_path, backbone=FrameBackbone(_conv(), 16))
    assert older.backbone_norm == "train" and older.train().backbone.model[1].training


def test_pks4_train_resolves_the_backbone_norm_from_pretrained(tmp_path: Path):
    pytest.importorskip("timm")
    from pks4_layers.train import parse_args
    from pks4_layers.train.checkpoint import save_checkpoint
    from pks4_layers.train.engine import build_model

    base = ["--backbone", "efficientnet_lite0", "--num-frames", "4", "--no-freeze-backbone"]
    for extra, expected in (
        ([], "train"),
        (["--pretrained"], "eval"),
        (["--pretrained", "--backbone-norm", "train"], "train"),
        (["--backbone-norm", "eval"], "eval"),
    ):
        cfg, _ = parse_args(base + extra)
        assert cfg.backbone_norm_arg() == expected, extra
    cfg, _ = parse_args(base + ["--pretrained"])
    # Rebuilt from a checkpoint with random weights, the model trains as the run did.
    model = build_model(cfg, num_classes=3, random_weights=True)
    assert model.backbone_norm == "eval"
    path = tmp_path / "checkpoint_last.pt"
    config = {k: v for k, v in cfg.to_dict().items() if k != "backbone_norm"}
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "classes": []})
    assert PKS4VideoClassifier.from_checkpoint(path).backbone_norm == "train"  # written before
