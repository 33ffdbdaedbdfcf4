"""PKS4VideoClassifier's factored readout: a content head on the backbone's features, a motion
head on the temporal module's contribution, each trained on its own loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pks4_layers.models import (
    FrameBackbone,
    PKS4VideoClassifier,
    combine_heads,
    factored_loss,
    fit_readout_scales,
)
from tiny_backbone import TinyCNN
from tolerances import assert_close

B, T, CLASSES = 3, 5, 4


def _model(
    backbone: str = "cnn", temporal: str = "pks4", perturb: bool = True, **kw
) -> tuple[PKS4VideoClassifier, int]:
    """A float64 factored classifier; ``perturb``: the temporal module no longer the identity."""
    torch.manual_seed(0)
    if backbone == "cnn":
        net, size = FrameBackbone(TinyCNN(), num_features=8), 12
    else:
        timm = pytest.importorskip("timm")
        net = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=1)
        size = 32
    if temporal == "pks4":
        kw.setdefault("block_kwargs", dict(prior_dim=6, d_state=4))
    model = PKS4VideoClassifier(net, CLASSES, T, temporal=temporal, readout="factored", **kw)
    if perturb:
        with torch.no_grad():
            for name, p in model.temporal.named_parameters():
                if p.dim() > 1 and not p.any():  # the zero-initialised output projection
                    p.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.double(), size


def _clip(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, size, size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "backbone, temporal, token_pool",
    [("cnn", "pks4", "avg"), ("cnn", "attention", "avg"), ("vit", "pks4", "prefix")],
)
def test_heads_read_the_features_and_the_contribution(backbone, temporal, token_pool):
    model, size = _model(backbone, temporal, token_pool=token_pool)
    x = _clip(size)
    content, motion = model(x, return_heads=True)
    assert content.shape == motion.shape == (B, CLASSES)
    assert_close(model(x), F.log_softmax(content, -1) + F.log_softmax(motion, -1))
    # Computed by hand: the content head on the pooled features (token_pool's tokens), the
    # motion head on the mean over frames and patch tokens of output minus input.
    feats = model.backbone(x)
    out = model.temporal(feats.x, grid=feats.grid, num_prefix_tokens=feats.num_prefix_tokens)
    assert_close(content, model.head(model.pool(feats)))
    k = feats.num_prefix_tokens
    delta = (out - feats.x).mean(dim=(1, 3, 4)) if k == 0 and feats.kind == "map" else None
    if delta is None:
        delta = (out - feats.x)[:, :, k:].mean(dim=(1, 2))
    assert_close(motion, model.motion_head(delta))
    assert not torch.allclose(motion[0], motion[1])  # the module adds something per clip


def test_at_creation_the_motion_head_reads_zeros_and_the_argmax_is_the_content_heads():
    model, size = _model(perturb=False)
    x = _clip(size)
    content, motion = model(x, return_heads=True)
    # The block is the identity when created: its contribution, the motion head's input, is
    # zero, and the motion logits are the head's bias, zero: the prediction is the content's.
    assert torch.equal(motion, torch.zeros_like(motion))
    assert torch.equal(model.motion_head.fc.bias, torch.zeros_like(model.motion_head.fc.bias))
    assert model.motion_head.fc.weight.abs().min() > 0
    assert torch.equal(model(x).argmax(-1), content.argmax(-1))
    assert_close(model(x), content.log_softmax(-1) - math.log(CLASSES))


def test_each_head_trains_on_its_own_loss_and_the_module_on_the_motion_loss_alone():
    model, size = _model()
    x, labels = _clip(size), torch.tensor([0, 3, 1])
    loss, logits = model.loss(x, labels)
    content, motion = model(x, return_heads=True)
    expected = F.cross_entropy(content, labels) + F.cross_entropy(motion, labels)
    assert loss.dtype == torch.float64  # float32 at least: a float64 model keeps float64
    assert_close(loss, expected)
    assert_close(logits, combine_heads(content, motion))
    assert_close(factored_loss(content, motion, labels), expected)
    half = factored_loss(content.half(), motion.bfloat16(), labels)
    assert half.dtype == torch.float32

    def grads(value: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=False)
        value.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    both = grads(model.loss(x, labels)[0])
    _, motion = model(x, return_heads=True)
    motion_only = grads(F.cross_entropy(motion, labels))
    content, _ = model(x, return_heads=True)
    content_only = grads(F.cross_entropy(content, labels))
    temporal = [n for n in both if n.startswith("temporal.")]
    assert temporal and any(both[n].abs().sum() > 0 for n in temporal)
    for n in temporal + [n for n in both if n.startswith("motion_head.")]:
        assert_close(both[n], motion_only[n])
    for n in [n for n in both if n.startswith("head.") or n.startswith("backbone.")]:
        # The backbone gets both gradients (it feeds both heads); the content head only its own.
        if n.startswith("head."):
            assert_close(both[n], content_only[n])
        else:
            assert_close(both[n], content_only[n] + motion_only[n])


def test_parameter_groups_and_weight_decay_cover_the_motion_head():
    model, _ = _model()
    groups = model.parameter_groups()
    ids = {id(p) for p in groups["head"]}
    assert {id(p) for p in model.motion_head.parameters()} <= ids
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert {"motion_head.fc.bias", "head.norm.weight"} <= model.no_weight_decay()
    assert not [n for n, _ in model.named_parameters() if n.startswith("motion_head.norm")]


def test_the_motion_head_reads_the_contribution_without_layernorm():
    """The motion head is linear in the contribution (no LayerNorm, which would make it
    scale-free and, on the zero contribution at creation, give its input a gain of about
    1/sqrt(eps)); the content head keeps its LayerNorm."""
    model, size = _model()
    x = _clip(size)
    feats = model.backbone(x)
    out = model.temporal(feats.x, grid=feats.grid, num_prefix_tokens=feats.num_prefix_tokens)
    delta = (out - feats.x).mean(dim=(1, 3, 4))
    bias = model.motion_head.fc.bias
    assert_close(model(x, return_heads=True)[1], model.motion_head.fc(delta))
    assert_close(model.motion_head(2 * delta) - bias, 2 * (model.motion_head(delta) - bias))
    assert isinstance(model.head.norm, torch.nn.LayerNorm)
    fresh, _ = _model(perturb=False)
    loss, _ = fresh.loss(x, torch.tensor([0, 3, 1]))
    loss.backward()
    grads = [p.grad for n, p in fresh.temporal.named_parameters() if p.grad is not None]
    assert grads and max(g.abs().max() for g in grads) < 1  # 14 with a LayerNorm


def test_stream_equals_forward():
    model, size = _model(block_kwargs=dict(prior_dim=6, d_state=4, bidirectional=False))
    model.eval()
    clip = _clip(size, seed=3)
    with torch.no_grad():
        expected = model(clip)
        state, seen = None, 0
        for chunk in [2, 1, 2]:
            logits, state = model.step(clip[:, seen : seen + chunk], state)
            seen += chunk
            # Running logits: those of the frames seen so far, through both heads.
            feats = model.backbone(clip[:, :seen])
            heads = model.forward_heads(feats, model.forward_temporal(feats))
            assert_close(logits, combine_heads(*heads))
    assert_close(logits, expected)
    assert state.pooled_sum.shape == state.contribution_sum.shape == (B, 8)
    one_head = PKS4VideoClassifier(
        FrameBackbone(TinyCNN(), num_features=8),
        CLASSES,
        T,
        block_kwargs=dict(prior_dim=6, d_state=4, bidirectional=False),
        readout="output",  # the same block, one head
    ).double()
    with torch.no_grad():
        _, plain = one_head.step(clip[:, :2])
    with pytest.raises(ValueError, match=r"^state: expected the contribution sum"):
        model.step(clip[:, 2:], plain)


def test_save_and_load_keep_the_readout(tmp_path):
    pytest.importorskip("safetensors")
    model, size = _model()
    model.eval()
    x = _clip(size)
    model.float().save_pretrained(tmp_path)
    loaded = PKS4VideoClassifier.from_pretrained(
        tmp_path, backbone=FrameBackbone(TinyCNN(), num_features=8)
    ).eval()
    assert loaded.readout == "factored" and loaded.motion_head is not None
    with torch.no_grad():
        assert_close(loaded(x.float()), model(x.float()))


def test_bad_readouts_name_the_argument():
    net = FrameBackbone(TinyCNN(), num_features=8)
    with pytest.raises(ValueError, match=r"^readout: expected one of \['output', 'factored'\], "):
        PKS4VideoClassifier(net, CLASSES, T, readout="two_heads")
    with pytest.raises(ValueError, match=r"^readout: expected 'output' with temporal='mean'"):
        PKS4VideoClassifier(net, CLASSES, T, temporal="mean", readout="factored")
    plain = PKS4VideoClassifier(net, CLASSES, T, preset="features")
    assert plain.motion_head is None and "readout" in plain.init_config
    with pytest.raises(ValueError, match=r"^return_heads: expected False with readout='output'"):
        plain(torch.randn(1, T, 3, 12, 12), return_heads=True)


def test_the_cli_builds_a_factored_classifier_and_its_loop_trains_each_head_on_its_loss():
    from pks4_layers.train import TrainConfig, config_from_mapping, parse_args
    from pks4_layers.train.distributed import DistEnv
    from pks4_layers.train.engine import build_model, train_one_epoch

    cfg, _ = parse_args(["--readout", "factored", "--backbone", "resnet18"])
    model = build_model(cfg, num_classes=3, random_weights=True)
    assert model.readout == "factored" and model.motion_head is not None
    with pytest.raises(ValueError, match=r"^readout: expected one of .*did you mean 'factored'"):
        config_from_mapping({"readout": "factord"})
    with pytest.raises(ValueError, match=r"^readout: expected output with temporal mean"):
        config_from_mapping({"readout": "factored", "temporal": "mean"})

    # One step of the training loop reports the sum of the two heads' losses and moves both.
    model, size = _model()
    model.float()
    x, labels = _clip(size).float(), torch.tensor([0, 3, 1])
    expected = model.loss(x, labels)[0].item()
    cfg = TrainConfig(num_frames=T, readout="factored", epochs=1, progress=False, grad_clip=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    motion_before = model.motion_head.fc.weight.detach().clone()
    out = train_one_epoch(model, [(x, labels, 0)], optimizer, scheduler, None, cfg, env, None, 0)
    assert out["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(motion_before, model.motion_head.fc.weight)


# ------------------------------------------------------------- calibrated weights of the heads
def _heads_with_one_cue(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, logits that tell them (a margin of 3 plus noise), and confident logits that
    do not (what a head gives on clips of a task its cue cannot read)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    informative = 3.0 * F.one_hot(labels, CLASSES) + torch.randn(n, CLASSES, generator=g)
    noise = 4.0 * torch.randn(n, CLASSES, generator=g)
    return labels, informative, noise


@pytest.mark.parametrize("cue", ["content", "motion"])
def test_fitted_weights_silence_the_head_whose_cue_does_not_tell_the_class(cue):
    labels, informative, noise = _heads_with_one_cue(256, seed=1)
    content, motion = (informative, noise) if cue == "content" else (noise, informative)
    scales = fit_readout_scales(content, motion, labels)
    assert scales.shape == (2,) and scales.dtype == torch.float32 and (scales > 0).all()
    good, bad = (scales[0], scales[1]) if cue == "content" else (scales[1], scales[0])
    assert good > 10 * bad
    # On clips the weights were not fitted on: the calibrated sum beats the plain one and
    # does as well as the informative head alone.
    labels, informative, noise = _heads_with_one_cue(512, seed=2)
    content, motion = (informative, noise) if cue == "content" else (noise, informative)

    def accuracy(logits: torch.Tensor) -> float:
        return (logits.argmax(-1) == labels).float().mean().item()

    calibrated = accuracy(combine_heads(content, motion, scales))
    assert calibrated > accuracy(combine_heads(content, motion)) + 0.1
    assert calibrated >= accuracy(informative) - 0.01


def test_weights_of_ones_are_the_plain_sum_and_both_cues_keep_weight():
    labels, informative, _ = _heads_with_one_cue(64, seed=3)
    other = informative.flip(0).roll(1, -1)
    assert_close(
        combine_heads(informative, other, torch.ones(2)),
        combine_heads(informative, other),
    )
    g = torch.Generator().manual_seed(4)
    second = 3.0 * F.one_hot(labels, CLASSES) + torch.randn(64, CLASSES, generator=g)
    scales = fit_readout_scales(informative, second, labels)
    assert scales.min() > 0.3 * scales.max()  # two heads that both tell the class


@pytest.mark.parametrize(
    "content, motion, labels, match",
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), "same shape"),
        (torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.long), "same shape"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), r"shape \(4,\)"),
        (torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "at least one"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]), r"in \[0, 3\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integer classes"),
    ],
)
def test_fit_readout_scales_names_the_bad_argument(content, motion, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_readout_scales(content, motion, labels)


def test_calibrate_readout_keeps_the_weights_in_the_state_and_forward_uses_them(tmp_path):
    model, size = _model()
    model.eval()
    assert torch.equal(model.readout_scales, torch.ones(2, dtype=torch.float64))
    x, labels = _clip(size), torch.tensor([0, 3, 1])
    with torch.no_grad():
        content, motion = model(x, return_heads=True)
    scales = model.calibrate_readout(content, motion, labels)
    assert_close(scales, fit_readout_scales(content, motion, labels).double())
    assert torch.equal(model.readout_scales, scales)
    assert not torch.allclose(scales, torch.ones_like(scales))
    expected = scales[0] * content.log_softmax(-1) + scales[1] * motion.log_softmax(-1)
    assert_close(model(x), expected)
    # The weights travel with the state dict; a state saved before they existed loads as
    # the plain sum.
    fresh, _ = _model()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.readout_scales, scales)
    old = {k: v for k, v in model.state_dict().items() if k != "readout_scales"}
    fresh.load_state_dict(old)
    assert torch.equal(fresh.readout_scales, torch.ones_like(scales))


def test_one_head_has_no_weights_to_calibrate():
    torch.manual_seed(0)
    model = PKS4VideoClassifier(
        FrameBackbone(TinyCNN(), num_features=8),
        CLASSES,
        T,
        block_kwargs=dict(prior_dim=6, d_state=4),
        readout="output",
    )
    assert not hasattr(model, "readout_scales")
    z = torch.zeros(2, CLASSES)
    with pytest.raises(ValueError, match="readout: expected 'factored' to calibrate"):
        model.calibrate_readout(z, z, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="readout: expected 'factored' for two heads"):
        model.combine_heads(z, z)


def test_evaluation_with_calibrate_fits_the_weights_and_scores_the_calibrated_model():
    from pks4_layers.train import TrainConfig
    from pks4_layers.train.distributed import DistEnv
    from pks4_layers.train.engine import evaluate

    model, size = _model()
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(B, T, 3, size, size, generator=g, dtype=torch.float64), torch.tensor(y))
        for y in ([0, 1, 2], [3, 0, 1], [2, 2, 3])
    ]
    cfg = TrainConfig(progress=False)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    plain = evaluate(model, batches, cfg, env, None)
    assert torch.equal(model.readout_scales, torch.ones(2, dtype=torch.float64))
    metrics = evaluate(model, batches, cfg, env, None, calibrate=True)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        content, motion = model(x, return_heads=True)
    # (the heads' logits are kept in float32 until the weights are fitted)
    expected = fit_readout_scales(content.float(), motion.float(), y).double()
    assert_close(model.readout_scales, expected)
    with torch.no_grad():
        logits = model(x)
    loss = F.nll_loss(logits.softmax(-1).log(), y).item()
    assert metrics["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val_top1"] == pytest.approx(100 * (logits.argmax(-1) == y).double().mean())
    assert metrics["val_loss"] < plain["val_loss"]  # fitted on these clips: never worse
