"""PKS4VideoClassifier's presets: a content-free block with the factored readout for PKS4,
frozen backbone or not; the block's defaults with one head by name; the user's arguments win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pks4_layers.models import PRESETS, FrameBackbone, PKS4VideoClassifier, resolve_preset
from pks4_layers.train.config import TrainConfig
from pks4_layers.train.errors import UsageError
from tiny_backbone import TinyCNN

T, CLASSES = 4, 3
SMALL = {"prior_dim": 6, "d_state": 4}


def _model(**kw) -> PKS4VideoClassifier:
    torch.manual_seed(0)
    kw.setdefault("block_kwargs", dict(SMALL))
    return PKS4VideoClassifier(FrameBackbone(TinyCNN(), num_features=8), CLASSES, T, **kw)


@pytest.mark.parametrize(
    "preset, temporal, expected",
    [
        (None, "pks4", "motion_only"),
        (None, "attention", "features"),
        (None, "mean", "features"),
        ("features", "pks4", "features"),
        ("motion_only", "pks4", "motion_only"),
        ("features", "tsm", "features"),
    ],
)
def test_resolve_preset(preset, temporal, expected):
    assert resolve_preset(preset, temporal=temporal) == expected


def test_bad_presets_name_the_argument():
    with pytest.raises(ValueError, match=r"^preset: expected None or one of .*got 'motion'"):
        resolve_preset("motion", temporal="pks4")
    with pytest.raises(ValueError, match=r"^preset: expected None or 'features' with temporal="):
        _model(temporal="attention", preset="motion_only", block_kwargs=None)


@pytest.mark.parametrize("frozen", [True, False])
def test_pks4_gets_the_content_free_block_and_two_heads(frozen):
    model = _model(freeze_backbone=frozen)
    assert model.preset == "motion_only" and model.readout == "factored"
    assert model.motion_head is not None
    assert model.temporal.scan_input == "prior" and not model.temporal.prior.reduces
    assert tuple(model.temporal.prior.cues) == PRESETS["motion_only"].block_kwargs["cues"]
    # its motion cues standardised over the data: batch statistics, kept with the model
    assert model.temporal.prior.motion_norm == "batch"
    assert "temporal.prior.motion_bn.running_var" in model.state_dict()
    assert model.init_config["preset"] == "motion_only"
    assert model.init_config["block_kwargs"] == SMALL  # the user's, not merged


def test_the_features_preset_is_the_block_defaults_and_one_head():
    model = _model(freeze_backbone=False, preset="features")
    default = PKS4VideoClassifier(
        FrameBackbone(TinyCNN(), num_features=8), CLASSES, T, block_kwargs=SMALL, preset="features"
    )
    assert model.preset == "features" and model.readout == "output"
    assert model.motion_head is None
    assert model.temporal.scan_input == "features"
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in default.named_parameters()
    ]


def test_the_users_arguments_override_the_preset():
    model = _model(
        freeze_backbone=True,
        readout="output",
        block_kwargs={**SMALL, "cues": ("cost", "displacement")},
    )
    assert model.preset == "motion_only" and model.readout == "output"
    assert model.motion_head is None
    assert tuple(model.temporal.prior.cues) == ("cost", "displacement")
    assert model.temporal.scan_input == "prior"  # the rest of the preset stays
    explicit = _model(freeze_backbone=True, preset="features")
    assert explicit.temporal.scan_input == "features" and explicit.motion_head is None


@pytest.mark.parametrize("preset", ["features", "motion_only"])
@pytest.mark.parametrize("frozen", [True, False])
def test_each_preset_is_the_frame_average_at_creation(preset, frozen):
    """Both presets keep the block the identity when created: the content head's logits are
    the frame-average model's, the motion head's its bias."""
    model = _model(freeze_backbone=frozen, preset=preset).eval()
    mean = _model(freeze_backbone=frozen, temporal="mean", block_kwargs=None).eval()
    mean.head.load_state_dict(model.head.state_dict())
    mean.backbone.load_state_dict(model.backbone.state_dict())
    x = torch.randn(2, T, 3, 12, 12)
    with torch.no_grad():
        if model.motion_head is None:
            torch.testing.assert_close(model(x), mean(x))
        else:
            content, motion = model(x, return_heads=True)
            torch.testing.assert_close(content, mean(x))
            torch.testing.assert_close(motion, model.motion_head.fc.bias.expand(2, CLASSES))


def test_save_and_load_keep_the_preset(tmp_path: Path):
    pytest.importorskip("safetensors")
    model = _model(freeze_backbone=True).eval()
    with torch.no_grad():
        model.temporal.scan.out_proj.weight.normal_(std=0.1)
    model.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["preset"] == "motion_only"
    loaded = PKS4VideoClassifier.from_pretrained(
        tmp_path / "new", backbone=FrameBackbone(TinyCNN(), num_features=8)
    ).eval()
    x = torch.randn(2, T, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.preset == "motion_only" and loaded.readout == "factored"


def test_a_config_saved_before_presets_loads_the_block_defaults(tmp_path: Path):
    """A frozen-backbone model saved by 0.2 (no "preset", no "readout" in its config) was
    built with the block's defaults and one head: it loads as that, not as the new default."""
    pytest.importorskip("safetensors")
    old = _model(freeze_backbone=True, preset="features").eval()
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["preset"], config["readout"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = PKS4VideoClassifier.from_pretrained(
        tmp_path, backbone=FrameBackbone(TinyCNN(), num_features=8)
    )
    assert loaded.preset == "features" and loaded.motion_head is None


def test_the_training_config_passes_the_preset():
    cfg = TrainConfig(dataset="benchmark")
    assert cfg.preset == "auto" and cfg.preset_arg() is None and cfg.readout_arg() is None
    assert TrainConfig(preset="features", readout="output").preset_arg() == "features"
    with pytest.raises(UsageError, match="preset"):
        TrainConfig(preset="motion_only", temporal="attention").validate()
    with pytest.raises(UsageError, match="preset"):
        TrainConfig(preset="fast").validate()
