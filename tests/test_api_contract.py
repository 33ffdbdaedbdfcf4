"""The public API's promises: keyword-only arguments after ``dim``, the parts' defaults equal
the block's, and what ``print`` shows."""

from __future__ import annotations

import inspect

import pytest

from pks4_layers import KinematicPriorEncoder, ParallelTemporalScan, PKS4Block
from pks4_layers.models.temporal_heads import PEERS

LAYERS = (PKS4Block, KinematicPriorEncoder, ParallelTemporalScan, *PEERS.values())


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_every_argument_after_dim_is_keyword_only(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert params[0].name == "dim" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), cls.__name__


def test_mamba_order_positional_arguments_are_refused():
    """``PKS4Block(384, 16, 4, 2)`` in mamba's order (d_model, d_state, d_conv, expand) used to
    build prior_dim=16, d_state=4, expand=2 without a word."""
    with pytest.raises(TypeError, match="positional argument"):
        PKS4Block(384, 16, 4, 2)


@pytest.mark.parametrize("part", [KinematicPriorEncoder, ParallelTemporalScan])
def test_the_parts_defaults_equal_the_blocks(part):
    block = inspect.signature(PKS4Block.__init__).parameters
    mine = inspect.signature(part.__init__).parameters
    shared = [n for n in mine if n in block and n not in ("self", "dim")]
    assert len(shared) >= 6
    for name in shared:
        assert mine[name].default == block[name].default, (part.__name__, name)


def test_no_weight_decay_names_the_scan_parameters_biases_and_norms():
    import torch

    from pks4_layers.models import FrameBackbone, PKS4VideoClassifier
    from pks4_layers.train.optim import weight_decay_groups

    block = PKS4Block(16, inner_dim=8, d_state=4, prior_dim=4, corr_dim=4, diff_dim=4)
    names = block.no_weight_decay()
    params = dict(block.named_parameters())
    assert {n for n in params if n.endswith(("A_log", ".D", "dt_proj.bias"))} <= names
    assert {n for n in params if n.startswith("norm.") or n.endswith(".bias")} <= names
    assert "prior.corr_log_scale" in names
    matrices = {n for n, p in params.items() if p.dim() >= 2 and not n.endswith("A_log")}
    assert matrices and not matrices & names
    assert "scan.out_proj.weight" in matrices and "scan.directions.0.x_proj.weight" in matrices

    torch.manual_seed(0)
    backbone = FrameBackbone(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8)), 16)
    model = PKS4VideoClassifier(backbone, 3, 4, temporal="attention")
    exempt = model.no_weight_decay()
    assert "temporal.time_embed" in exempt and "head.fc.bias" in exempt
    assert "backbone.model.0.bias" in exempt and "backbone.model.0.weight" not in exempt
    # pks4-train's optimizer follows it
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = weight_decay_groups(model, trainable)
    own = dict(model.named_parameters())
    assert {id(own[n]) for n in exempt} == {id(p) for p in no_decay}
    assert len(decay) + len(no_decay) == len(trainable)


def test_other_video_layouts_are_recognised_and_named():
    import torch

    block = PKS4Block(16, d_state=4, prior_dim=4, corr_dim=4, diff_dim=4)
    with pytest.raises(ValueError, match=r"looks like torchvision's / PyTorchVideo's \(B, C, T"):
        block(torch.randn(2, 16, 5, 3, 4))  # (B, C, T, H, W)
    with pytest.raises(ValueError, match=r"looks like per-frame maps \(B\*T, C, H, W\)"):
        block(torch.randn(10, 16, 3, 4))  # (B*T, C, H, W)
    for cls in PEERS.values():
        with pytest.raises(ValueError, match=r"\(B, C, T, H, W\) layout"):
            cls(16)(torch.randn(2, 16, 5, 3, 4))


def test_print_shows_what_was_chosen():
    text = repr(PKS4Block(32, d_state=8, bidirectional=False, prior_targets=("selection",)))
    for shown in ("d_state=8", "bidirectional=False", "prior_targets=('selection',)", "cues="):
        assert shown in text, shown
    assert "forward in time" in text and "reverse in time" not in text
    assert "reverse in time" in repr(PKS4Block(32))


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_device_and_dtype_arguments_place_every_parameter(cls):
    import torch

    kwargs = {"prior_dim": 4} if cls is ParallelTemporalScan else {}
    module = cls(16, dtype=torch.float64, **kwargs)
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    meta = cls(16, device="meta", **kwargs)
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_a_state_dict_of_an_older_layout_says_what_changed_and_who_wrote_it():
    import collections

    import torch

    old = PKS4Block(16, prior_dim=8, cues=("cost", "displacement", "difference"))
    state = old.state_dict()
    assert state._metadata[""]["version"] == 2  # the layout travels with the state dict
    # as pks4-layers 0.1.x wrote it: torch's default module version, 1
    state._metadata = collections.OrderedDict({k: dict(v) for k, v in state._metadata.items()})
    state._metadata[""]["version"] = 1
    with pytest.raises(
        ValueError,
        match=r"^state_dict: .*pks4-layers 0\.1\.x.*prior\.fuse\.0\.weight \[16, 61\] "
        r"\(this block: \[16, 90\]\)",
    ):
        PKS4Block(16, prior_dim=8).load_state_dict(state)
    # the same layout-1 weights load into a block built with the arguments they had
    same = PKS4Block(16, prior_dim=8, cues=("cost", "displacement", "difference"))
    same.load_state_dict(state)
    x = torch.randn(1, 3, 16, 2, 2)
    torch.testing.assert_close(same(x), old(x))


def test_a_state_dict_names_the_library_version_and_the_configuration():
    import io

    import torch

    from pks4_layers import __version__

    block = PKS4Block(16, prior_dim=8, d_state=4)
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # the metadata survives a save and a load
    meta = state._metadata[""]
    assert meta["library_version"] == __version__ and "d_state=4" in meta["config"]
    with pytest.raises(ValueError, match=rf"written by pks4-layers {__version__} with dim=16"):
        PKS4Block(16, prior_dim=8, d_state=8).load_state_dict(state)
