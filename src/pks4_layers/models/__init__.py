"""Video models: per-frame 2D backbones, temporal modules and the PKS4 video classifier."""

from .backbone import Features, FrameBackbone, create_backbone
from .classifier import (
    ClassifierHead,
    PKS4VideoClassifier,
    combine_heads,
    factored_loss,
    fit_readout_scales,
)
from .flops import FlopCount, ModelReport, count_flops, model_report
from .presets import PRESETS, Preset, preset_block_kwargs, resolve_preset
from .pretrained import efficientnet_lite0
from .temporal_heads import (
    TEMPORAL_KINDS,
    TemporalConvBlock,
    TemporalIdentity,
    create_temporal,
    inner_dim_for_params,
    temporal_num_params,
)
from .vit_insertion import TemporalBeforeBlock, insert_temporal

__all__ = [
    "PRESETS",
    "TEMPORAL_KINDS",
    "ClassifierHead",
    "Features",
    "FlopCount",
    "FrameBackbone",
    "ModelReport",
    "PKS4VideoClassifier",
    "Preset",
    "TemporalBeforeBlock",
    "TemporalConvBlock",
    "TemporalIdentity",
    "combine_heads",
    "count_flops",
    "create_backbone",
    "create_temporal",
    "efficientnet_lite0",
    "factored_loss",
    "fit_readout_scales",
    "inner_dim_for_params",
    "insert_temporal",
    "model_report",
    "preset_block_kwargs",
    "resolve_preset",
    "temporal_num_params",
]
