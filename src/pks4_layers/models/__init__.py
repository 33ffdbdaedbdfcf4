"""Video models: per-frame 2D backbones, temporal modules and the PKS4 video classifier."""

from .backbone import Features, FrameBackbone, create_backbone
from .classifier import ClassifierHead, PKS4VideoClassifier
from .flops import ModelReport, model_report
from .pretrained import efficientnet_lite0
from .temporal_heads import TemporalConvBlock, TemporalIdentity, create_temporal

__all__ = [
    "ClassifierHead",
    "Features",
    "FrameBackbone",
    "ModelReport",
    "PKS4VideoClassifier",
    "TemporalConvBlock",
    "TemporalIdentity",
    "create_backbone",
    "create_temporal",
    "efficientnet_lite0",
    "model_report",
]
