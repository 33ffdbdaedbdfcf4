"""pks4-train's optimizer groups: weight decay by name, a learning rate per classifier part."""

from __future__ import annotations

import pytest
import torch

from pks4_layers.models import FrameBackbone, PKS4VideoClassifier
from pks4_layers.train.config import TrainConfig
from pks4_layers.train.errors import UsageError
from pks4_layers.train.optim import optimizer_param_groups, weight_decay_groups


def _model(freeze_backbone: bool, readout: str = "output") -> PKS4VideoClassifier:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.GELU())
    return PKS4VideoClassifier(
        FrameBackbone(conv, 16),
        3,
        4,
        freeze_backbone=freeze_backbone,
        readout=readout,
        block_kwargs={"inner_dim": 8, "d_state": 4, "prior_dim": 4, "corr_dim": 4, "diff_dim": 4},
    )


def _lr_of(groups: list[dict]) -> dict[int, float]:
    out: dict[int, float] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = g["lr"]
    return out


def test_scales_of_one_give_the_decay_split_in_the_model_order():
    model = _model(freeze_backbone=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = optimizer_param_groups(model, lr=1e-3, weight_decay=0.05)
    decay, no_decay = weight_decay_groups(model, trainable)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in decay]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in no_decay]
    # A frozen backbone has nothing to scale: its scale changes no group.
    scaled = optimizer_param_groups(model, lr=1e-3, weight_decay=0.05, lr_scales={"backbone": 0.1})
    assert [[id(p) for p in g["params"]] for g in scaled] == [
        [id(p) for p in g["params"]] for g in groups
    ]


@pytest.mark.parametrize("readout", ["output", "factored"])
def test_each_part_learns_at_its_scale(readout):
    model = _model(freeze_backbone=False, readout=readout)
    scales = {"backbone": 0.1, "temporal": 3.0}
    groups = optimizer_param_groups(model, lr=2e-3, weight_decay=0.05, lr_scales=scales)
    lr = _lr_of(groups)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(lr) == {id(p) for p in trainable}
    for part, params in model.parameter_groups().items():
        assert params
        for p in params:
            assert lr[id(p)] == pytest.approx(2e-3 * scales.get(part, 1.0))
    # The peak rate's decayed group first: the schedule's logged rate is the head's.
    assert groups[0]["lr"] == 2e-3 and groups[0]["weight_decay"] == 0.05
    exempt = {id(p) for n, p in model.named_parameters() if n in model.no_weight_decay()}
    for g in groups:
        assert all((id(p) in exempt) == (g["weight_decay"] == 0.0) for p in g["params"])


def test_one_adamw_step_moves_each_part_by_its_rate():
    # Adam's first step moves every parameter with a gradient by about lr (the update is
    # m / sqrt(v) = sign(grad)): the largest move of each part is its own rate.
    model = _model(freeze_backbone=False)
    scales = {"backbone": 0.1, "temporal": 4.0}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 1e-3
    opt = torch.optim.AdamW(
        optimizer_param_groups(model, lr=lr, weight_decay=0.0, lr_scales=scales), lr=lr
    )
    x, y = torch.randn(2, 4, 3, 32, 32), torch.tensor([0, 2])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for part, prefix in (("backbone", "backbone."), ("temporal", "temporal."), ("head", "head.")):
        moved = max(
            (p.detach() - before[n]).abs().max().item()
            for n, p in model.named_parameters()
            if n.startswith(prefix)
        )
        assert moved == pytest.approx(lr * scales.get(part, 1.0), rel=1e-3), part


def test_bad_scales_are_named():
    model = _model(freeze_backbone=False)
    with pytest.raises(ValueError, match=r"lr_scales: expected keys of .*got 'neck'"):
        optimizer_param_groups(model, lr=1e-3, weight_decay=0.0, lr_scales={"neck": 1.0})
    with pytest.raises(ValueError, match=r"lr_scales\['temporal'\]: expected a number > 0"):
        optimizer_param_groups(model, lr=1e-3, weight_decay=0.0, lr_scales={"temporal": 0.0})
    for name in ("backbone_lr_scale", "temporal_lr_scale"):
        with pytest.raises(UsageError, match=name):
            TrainConfig(**{name: 0.0}).validate()
        with pytest.raises(UsageError, match=name):
            TrainConfig(**{name: float("nan")}).validate()


def test_train_config_scales_reach_the_groups():
    cfg = TrainConfig(backbone_lr_scale=0.2, temporal_lr_scale=2.0)
    assert cfg.lr_scales() == {"backbone": 0.2, "temporal": 2.0}
    assert TrainConfig().lr_scales() == {"backbone": 0.1, "temporal": 1.0}
