"""``PKS4VideoClassifier``: a 2D image backbone per frame, a temporal module, a linear head."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .backbone import Features, FrameBackbone, create_backbone
from .temporal_heads import create_temporal

__all__ = ["ClassifierHead", "PKS4VideoClassifier"]

TOKEN_POOLS = ("avg", "prefix")


class ClassifierHead(nn.Module):
    """LayerNorm, dropout, linear classifier on pooled clip features.

    Shapes: ``(B, C)`` -> ``(B, num_classes)``.
    """

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.norm(x)))


class PKS4VideoClassifier(nn.Module):
    """Video classifier: per-frame 2D backbone, a temporal module, pooling, a linear head.

    ``logits = head(pool(temporal(backbone(frames))))``. The temporal module is a PKS4 block,
    our interpretation of L. Zeng et al., "PKS^4: Parallel Kinematic Selective State Space
    Scanners for Efficient Video Understanding", arXiv:2604.26461 (2026): a kinematic prior and
    a selective scan along time at every location of the backbone's last feature map or token
    grid. Because the block's output projection starts at zero, a freshly built ``"pks4"`` (or
    ``"tconv"``) model gives exactly the logits of the ``"mean"`` model with the same backbone
    and head: inserting the block leaves a pretrained backbone's features untouched at step 0.

    Pooling is the mean over frames and space. For ViT tokens, ``token_pool="avg"`` (default)
    averages the patch tokens, like the map case and timm's ``global_pool="avg"``: the scan keeps
    locations separate, so every patch token carries its own temporal context;
    ``token_pool="prefix"`` averages the class / register tokens instead.

    Args:
        backbone: an image model (see :class:`FrameBackbone`), a :class:`FrameBackbone`, or a
            name for :func:`create_backbone`.
        num_classes: classes of the head.
        num_frames: frames ``T`` per clip; inputs are checked against it.
        temporal: ``"pks4"``, ``"mean"`` (no temporal modelling) or ``"tconv"`` (residual
            depthwise-separable temporal conv, kernel 3).
        freeze_backbone: backbone parameters get ``requires_grad=False``, the backbone stays in
            eval mode (BatchNorm statistics frozen) under ``train()`` and runs without autograd;
            only the temporal module and the head train.
        drop_rate: dropout before the linear classifier.
        block_kwargs: arguments of the temporal module (:class:`~pks4_layers.PKS4Block`'s for
            ``"pks4"``, ``kernel_size`` for ``"tconv"``).
        pretrained: with a backbone name, passed to :func:`create_backbone`.
        token_pool: ``"avg"`` or ``"prefix"``, the tokens pooled for ViT backbones.

    Shapes:
        ``forward(x)``: ``(B, num_frames, 3, H, W)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        backbone: Union[nn.Module, str],
        num_classes: int,
        num_frames: int,
        temporal: str = "pks4",
        freeze_backbone: bool = False,
        drop_rate: float = 0.0,
        block_kwargs: Optional[dict] = None,
        pretrained: bool = False,
        token_pool: str = "avg",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
        if token_pool not in TOKEN_POOLS:
            raise ValueError(f"token_pool: expected one of {list(TOKEN_POOLS)}, got {token_pool!r}")
        if isinstance(backbone, FrameBackbone):
            if pretrained:
                raise ValueError(
                    f"pretrained: expected False with a backbone instance, got {pretrained!r}"
                )
            self.backbone = backbone
        else:
            self.backbone = FrameBackbone(create_backbone(backbone, pretrained=pretrained))
        if token_pool == "prefix" and self.backbone.num_prefix_tokens == 0:
            raise ValueError(
                "token_pool: expected 'avg' for a backbone without prefix tokens, got 'prefix'"
            )
        self.num_classes = num_classes
        self.num_frames = num_frames
        self.temporal_kind = temporal
        self.token_pool = token_pool
        dim = self.backbone.num_features
        self.temporal = create_temporal(temporal, dim, **(block_kwargs or {}))
        self.head = ClassifierHead(dim, num_classes, drop_rate)
        self.backbone_frozen = False
        self.set_backbone_frozen(freeze_backbone)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def set_backbone_frozen(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the backbone: ``requires_grad`` and BatchNorm statistics."""
        self.backbone_frozen = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> PKS4VideoClassifier:
        super().train(mode)
        if self.backbone_frozen:
            # A frozen backbone keeps its BatchNorm running statistics and has no dropout.
            self.backbone.eval()
        return self

    def _check_input(self, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        c = self.backbone.in_chans
        if x.dim() != 5:
            raise ValueError(f"x: expected 5 dims (B, T, {c}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_frames:
            raise ValueError(
                f"x: expected num_frames T={self.num_frames} in (B, T, {c}, H, W), "
                f"got T={x.shape[1]} (shape {tuple(x.shape)})"
            )
        if x.shape[2] != c:
            raise ValueError(
                f"x: expected {c} channels in (B, T, {c}, H, W), got {x.shape[2]} "
                f"(shape {tuple(x.shape)})"
            )
        return x

    def forward_features(self, x: Tensor) -> Features:
        """Backbone features of every frame: ``(B, T, 3, H, W)`` -> :class:`Features`."""
        x = self._check_input(x)
        if self.backbone_frozen:
            # Nothing in the backbone trains: keep no activations for a backward pass.
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def forward_temporal(self, feats: Features) -> Features:
        """The temporal module on the features; same layout out."""
        out = self.temporal(feats.x, grid=feats.grid, num_prefix_tokens=feats.num_prefix_tokens)
        return feats.replace(out)

    def pool(self, feats: Features) -> Tensor:
        """Mean over frames and space: :class:`Features` -> ``(B, C)``."""
        if feats.kind == "map":
            return feats.x.mean(dim=(1, 3, 4))
        k = feats.num_prefix_tokens
        tokens = feats.x[:, :, :k] if self.token_pool == "prefix" else feats.x[:, :, k:]
        return tokens.mean(dim=(1, 2))

    def forward_head(self, pooled: Tensor) -> Tensor:
        """``(B, C)`` -> ``(B, num_classes)``."""
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.pool(self.forward_temporal(self.forward_features(x))))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part: ``{"backbone": [...], "temporal": [...], "head": [...]}``
        (for per-part learning rates or weight decay)."""
        parts = {"backbone": self.backbone, "temporal": self.temporal, "head": self.head}
        return {n: [p for p in m.parameters() if p.requires_grad] for n, m in parts.items()}
