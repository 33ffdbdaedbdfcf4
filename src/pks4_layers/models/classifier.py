"""``PKS4VideoClassifier``: a 2D image backbone per frame, a temporal module, a linear head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import PKS4Block
from ..layers.stream_state import PKS4StreamState, StreamState
from ..layers.weight_decay import no_weight_decay_names
from .backbone import Features, FrameBackbone, create_backbone
from .presets import PRESETS, preset_block_kwargs, resolve_preset
from .temporal_heads import create_temporal

__all__ = [
    "ClassifierHead",
    "ClassifierStreamState",
    "PKS4VideoClassifier",
    "combine_heads",
    "factored_loss",
    "fit_readout_scales",
]

TOKEN_POOLS = ("avg", "prefix")
READOUTS = ("output", "factored")


def combine_heads(content: Tensor, motion: Tensor, scales: Optional[Tensor] = None) -> Tensor:
    """The class scores of a ``readout="factored"`` classifier from its two heads' logits: the
    sum of their log-probabilities (a product of experts, unnormalised), each weighted by
    ``scales`` ``(2,)`` (content, motion; ``None``: 1 and 1), ``(B, K)`` each -> ``(B, K)``.
    With equal weights its argmax and its softmax are those of the product of the two
    distributions; :func:`fit_readout_scales` fits the weights on held-out clips."""
    log_content = torch.log_softmax(content, dim=-1)
    log_motion = torch.log_softmax(motion, dim=-1)
    if scales is None:
        return log_content + log_motion
    scales = scales.to(device=log_content.device, dtype=log_content.dtype)
    return scales[0] * log_content + scales[1] * log_motion


def fit_readout_scales(
    content: Tensor, motion: Tensor, labels: Tensor, *, l2: float = 1e-3, max_iter: int = 100
) -> Tensor:
    """The weights of the two heads' log-probabilities in :func:`combine_heads` that minimise
    the cross-entropy on held-out clips (``content``, ``motion``: ``(N, K)`` logits,
    ``labels``: ``(N,)``), ``(2,)`` float32, positive: temperature scaling (Guo et al., 2017)
    of each head. Each head fits its training clips, so their training logits cannot say
    which one to trust: on clips it has not seen, a head whose cue does not tell the class
    (the content in a motion task, the motion in an appearance task) gives confident noise,
    and its weight goes towards zero. Fitted by L-BFGS on the weights' logarithms in float64,
    with an ``l2`` penalty on them, which keeps them finite where one head is noise."""
    if content.dim() != 2 or content.shape != motion.shape:
        raise ValueError(
            "content, motion: expected logits of the same shape (N, K), got "
            f"{tuple(content.shape)} and {tuple(motion.shape)}"
        )
    if labels.shape != content.shape[:1]:
        raise ValueError(f"labels: expected shape ({content.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("labels: expected at least one held-out clip, got none")
    classes = content.shape[1]
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(
            f"labels: expected integer classes in [0, {classes}), got {labels.dtype} in "
            f"[{labels.min().item()}, {labels.max().item()}]"
        )
    log_content = torch.log_softmax(content.detach().double(), dim=-1)
    log_motion = torch.log_softmax(motion.detach().double(), dim=-1)
    target = labels.detach().long()
    log_scales = torch.zeros(2, dtype=torch.float64, device=content.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_scales], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        w = log_scales.exp()
        loss = F.cross_entropy(w[0] * log_content + w[1] * log_motion, target)
        loss = loss + l2 * log_scales.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return log_scales.detach().exp().float()


def factored_loss(content: Tensor, motion: Tensor, labels: Tensor) -> Tensor:
    """The training loss of a ``readout="factored"`` classifier: each head's cross-entropy on
    its own, summed (in float32 at least: half-precision logits are upcast). One cross-entropy
    of :func:`combine_heads` instead would let the content head fit the training clips alone
    and leave the motion head with no gradient."""
    return _cross_entropy(content, labels) + _cross_entropy(motion, labels)


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy in float32 at least (float64 stays float64)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, labels)


class ClassifierHead(nn.Module):
    """LayerNorm (``norm=True``), dropout, linear classifier on pooled clip features.

    ``norm=False`` leaves the LayerNorm out: the factored readout's motion head, whose input
    (the temporal module's contribution) is exactly zero when the module is created. A
    LayerNorm there has a gain of about ``1/sqrt(eps)``, so the first steps turn the direction
    of a tiny contribution at random; in the motion suite that head started in some seeds only.

    Shapes: ``(B, C)`` -> ``(B, num_classes)``.
    """

    def __init__(
        self, dim: int, num_classes: int, drop_rate: float = 0.0, *, norm: bool = True
    ) -> None:
        super().__init__()
        self.norm: nn.Module = nn.LayerNorm(dim) if norm else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.norm(x)))


@dataclass
class ClassifierStreamState(StreamState):
    """State of a streamed :class:`PKS4VideoClassifier`: fixed size, never the frames.

    Attributes:
        pooled_sum: ``(B, C)``, the sum over the frames seen so far of each frame's pooled
            features (float32, float64 for float64 features).
        frames_seen: how many frames have been streamed.
        temporal: the PKS4 block's state (``None`` for ``temporal="mean"``, and before the first
            chunk: the grid is known once the backbone has run).
        contribution_sum: with ``readout="factored"``, ``(B, C)``, the same sum for the
            temporal module's contribution (what the motion head reads; ``pooled_sum`` then
            holds the module's input, what the content head reads); ``None`` otherwise.
    """

    pooled_sum: Tensor
    frames_seen: int = 0
    temporal: Optional[PKS4StreamState] = None
    contribution_sum: Optional[Tensor] = None


def _backbone_spec(backbone: object, pretrained: object) -> Optional[dict]:
    """How :func:`~pks4_layers.models.serialization.from_pretrained` rebuilds the backbone's
    architecture: its name (``None`` for a module given by the user)."""
    if not isinstance(backbone, str):
        return None
    spec: dict = {"name": backbone}
    if backbone == "efficientnet_lite0" and pretrained is True:
        spec["weights_arch"] = "efficientnet_lite0"  # timm's tf_ variant the weights fit
    return spec


BACKBONE_NORMS = ("eval", "train")


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` (any dimension, SyncBatchNorm included)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_learnt_norm_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``module`` holds running statistics learnt from data: a
    running mean other than 0 or a running variance other than 1, a new layer's values."""
    for norm in batch_norms(module):
        if norm.running_mean is None or norm.running_var is None:
            continue
        if bool(norm.running_mean.ne(0).any()) or bool(norm.running_var.ne(1).any()):
            return True
    return False


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

    Readout. ``readout="output"`` (default): one head reads the temporal module's output, as
    above. ``readout="factored"``: two heads, each trained on its own cross-entropy
    (:meth:`loss`): a content head on the pooled backbone features (the module's input) and a
    motion head, a linear layer without LayerNorm, on the pooled contribution of the temporal
    module (its output minus its input, over the patch tokens for ViTs); the logits are
    :func:`combine_heads` of the two, weighted by the buffer ``readout_scales`` (1 and 1 until
    :meth:`calibrate_readout` fits them on held-out clips, as ``pks4-train`` does on its
    validation split: a head whose cue does not tell the classes then weighs little). Trained on
    one loss, a head that reads the backbone's features fits a small training set from the
    content of its clips alone and the module's motion signal is never needed; with the motion
    head on its own loss, the module must carry the label itself (measured in the motion suite,
    docs/motion_suite.md). ``forward(x, return_heads=True)`` gives both heads' logits.

    Presets (:data:`~pks4_layers.models.PRESETS`). A PKS4 classifier builds
    ``preset="motion_only"``, whether its backbone is frozen or trains: the block's scan reads
    the kinematic prior alone (cosine cost volume, displacement, its curl and divergence, the
    gradient flow, and their change) and the readout is factored. Every other temporal module builds
    ``"features"``: its defaults and one head (``preset="features"`` gives a PKS4 classifier
    the block's defaults). Measured in the motion suite: the default block fits the content of
    its training clips and reads motion worse than the content-free block in every regime,
    given the epochs the latter needs (see ``pks4_layers.models.presets``). Give ``preset`` to
    choose; ``block_kwargs`` and ``readout`` override the preset's.

    Args:
        backbone: an image model (see :class:`FrameBackbone`), a :class:`FrameBackbone`, or a
            name for :func:`create_backbone`.
        num_classes: classes of the head.
        num_frames: frames ``T`` per clip; inputs are checked against it.
        temporal: ``"pks4"``, ``"mean"`` (no temporal modelling), ``"tconv"`` (residual
            depthwise-separable temporal conv, kernel 3) or a peer of
            :mod:`pks4_layers.baselines` (``"frame_mlp"``, ``"tsm"``, ``"adapter"``,
            ``"attention"``, ``"scan"``, ``"prior_adapter"``, ``"st_scan"``): see
            :func:`~pks4_layers.models.create_temporal`.
        freeze_backbone: backbone parameters get ``requires_grad=False``, the backbone stays in
            eval mode (BatchNorm statistics frozen) under ``train()`` and runs without autograd;
            only the temporal module and the head train.
        backbone_norm: where the backbone trains, its BatchNorm layers under ``train()``:
            ``"eval"`` normalises with their running statistics and leaves them as they are
            (their affine weights still train: TSN's partial BatchNorm, mmaction2's
            ``norm_eval``), ``"train"`` uses and updates the statistics of each batch.
            ``None``: ``"eval"`` when the backbone holds statistics learnt from data (a
            pretrained one: a running mean or variance other than a new layer's 0 and 1),
            ``"train"`` otherwise (a backbone trained from scratch has to learn them).
            Measured in the motion suite, ``efficientnet_lite0`` fine-tuned end to end: with
            batch statistics the block fits neither the training clips nor the validation
            ones of the ``subcell`` task (see ``CHANGELOG.md``). ``model.backbone_norm`` is
            the value resolved.
        drop_rate: dropout before the linear classifier.
        block_kwargs: arguments of the temporal module (:class:`~pks4_layers.PKS4Block`'s for
            ``"pks4"``, ``kernel_size`` for ``"tconv"``, the peer's constructor's).
        pretrained: with a backbone name, passed to :func:`create_backbone`.
        token_pool: ``"avg"`` or ``"prefix"``, the tokens pooled for ViT backbones.
        readout: ``"output"`` or ``"factored"`` (see above; not with ``temporal="mean"``,
            which adds nothing for a motion head to read); ``None``: the preset's.
        preset: ``"features"`` or ``"motion_only"`` (see above; ``"motion_only"`` with
            ``temporal="pks4"`` only); ``None``: ``"motion_only"`` for PKS4, ``"features"``
            for the other modules.

    Streaming (online inference, constant memory): ``state = model.init_stream(B)``, then
    ``logits, state = model.step(chunk, state)`` for each chunk ``(B, T_chunk, 3, H, W)`` of any
    length ``T_chunk >= 1``. The logits are those of the running mean of the pooled features over
    every frame seen so far: once the stream has seen a whole clip they equal :meth:`forward` on
    it. Only causal temporal modules stream: ``"mean"`` and ``"pks4"`` built with
    ``block_kwargs={"bidirectional": False}`` (``"tconv"``'s centred convolution sees the next
    frame). ``num_frames`` is checked by :meth:`forward` only: a stream has any length.

    Shapes:
        ``forward(x)``: ``(B, num_frames, 3, H, W)`` -> logits ``(B, num_classes)``;
        ``forward(x, return_heads=True)``: the content and the motion logits, ``(B, num_classes)``
        each (``readout="factored"`` only).
        ``step(x, state)``: ``(B, T, 3, H, W)`` -> running logits ``(B, num_classes)``, state.
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
        token_pool: Literal["avg", "prefix"] = "avg",
        readout: Optional[Literal["output", "factored"]] = None,
        preset: Optional[str] = None,
        backbone_norm: Optional[Literal["eval", "train"]] = None,
    ) -> None:
        super().__init__()
        # The named configuration (block arguments, readout); the user's arguments win.
        preset = resolve_preset(preset, temporal=temporal)
        if readout is None:
            readout = PRESETS[preset].readout  # "output" for every kind but PKS4
        # What rebuilds this model (save_pretrained): its arguments and the backbone's name.
        self.init_config: dict = {
            "backbone": _backbone_spec(backbone, pretrained),
            "num_classes": num_classes,
            "num_frames": num_frames,
            "temporal": temporal,
            "freeze_backbone": freeze_backbone,
            "drop_rate": drop_rate,
            "block_kwargs": dict(block_kwargs or {}),
            "token_pool": token_pool,
            "readout": readout,
            "preset": preset,
        }
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
        if token_pool not in TOKEN_POOLS:
            raise ValueError(f"token_pool: expected one of {list(TOKEN_POOLS)}, got {token_pool!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout: expected one of {list(READOUTS)}, got {readout!r}")
        if readout == "factored" and temporal == "mean":
            raise ValueError(
                "readout: expected 'output' with temporal='mean' (the frame average adds nothing "
                "for a motion head to read), got 'factored'"
            )
        if isinstance(backbone, FrameBackbone):
            if pretrained:
                raise ValueError(
                    f"pretrained: expected False with a backbone instance, got {pretrained!r}"
                )
            self.backbone = backbone
        else:
            self.backbone = FrameBackbone(create_backbone(backbone, pretrained=pretrained))
        if backbone_norm is None:
            # Statistics learnt from data (a pretrained backbone) are kept; a backbone whose
            # BatchNorm layers are as created (mean 0, variance 1) has to learn them.
            backbone_norm = "eval" if has_learnt_norm_statistics(self.backbone) else "train"
        if backbone_norm not in BACKBONE_NORMS:
            raise ValueError(
                f"backbone_norm: expected one of {list(BACKBONE_NORMS)} or None, "
                f"got {backbone_norm!r}"
            )
        # Resolved, so that a saved model is rebuilt (and trains on) as it was.
        self.init_config["backbone_norm"] = backbone_norm
        self.backbone_norm = backbone_norm
        if token_pool == "prefix" and self.backbone.num_prefix_tokens == 0:
            raise ValueError(
                "token_pool: expected 'avg' for a backbone without prefix tokens, got 'prefix'"
            )
        self.num_classes = num_classes
        self.num_frames = num_frames
        self.temporal_kind = temporal
        self.token_pool = token_pool
        self.readout = readout
        self.preset = preset
        dim = self.backbone.num_features
        self.temporal = create_temporal(temporal, dim, **preset_block_kwargs(preset, block_kwargs))
        self.head = ClassifierHead(dim, num_classes, drop_rate)
        # The factored readout's second head reads the temporal module's contribution, as it
        # is: no LayerNorm, whose gain on the zero contribution at creation is 1/sqrt(eps).
        self.motion_head: Optional[ClassifierHead] = (
            ClassifierHead(dim, num_classes, drop_rate, norm=False)
            if readout == "factored"
            else None
        )
        if self.motion_head is not None:
            # Zero logits at creation: the prediction is the content head's (the frame average
            # model's), not shifted by a random class prior. The weights stay random, or the
            # block would get no gradient through this head.
            nn.init.zeros_(self.motion_head.fc.bias)
            # The heads' weights in combine_heads: 1 and 1 until calibrate_readout fits them
            # on held-out clips (pks4-train does, on its validation split).
            self.register_buffer("readout_scales", torch.ones(2))
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

    def save_pretrained(self, directory) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (weights only, no pickle) to
        ``directory``: :meth:`from_pretrained` rebuilds the model from them, offline."""
        from .serialization import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, backbone: Optional[nn.Module] = None):
        """The model :meth:`save_pretrained` wrote to ``directory`` (``backbone``: the image
        model, needed only when the saved model's backbone was given as a module)."""
        from .serialization import from_pretrained

        return from_pretrained(directory, backbone=backbone)

    @classmethod
    def from_checkpoint(cls, path):
        """The model of a ``pks4-train`` checkpoint, rebuilt from its config, weights loaded;
        its class names in ``model.classes``."""
        from .serialization import from_checkpoint

        return from_checkpoint(path)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (``model.named_parameters()``'s) to keep out of weight decay, timm's
        convention: biases, norms, the scan's ``A_log``, ``D`` and step-size bias, learnt time
        embeddings, and what a timm backbone itself names (position embeddings, class token)."""
        names = no_weight_decay_names(self)
        backbone_own = getattr(self.backbone.model, "no_weight_decay", None)
        if callable(backbone_own):
            names |= {f"backbone.model.{n}" for n in backbone_own()}
        own = dict(self.named_parameters())
        return {n for n in names if n in own}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing, timm's way: the temporal module (a :class:`PKS4Block`) keeps
        only its input for the backward and recomputes the rest; a trainable backbone that
        offers ``set_grad_checkpointing`` (timm models) gets it too."""
        for module in (self.temporal, self.backbone.model):
            fn = getattr(module, "set_grad_checkpointing", None)
            if callable(fn):
                fn(enable)

    def tune_last_blocks(self, count: int) -> None:
        """Partial tuning: freeze the backbone except its last ``count`` blocks (timm's
        ``model.blocks``: transformer blocks of a ViT, stages of an EfficientNet) and the layers
        after them (final norm / head convolution).

        Gradients then run through the tuned blocks, so the backbone no longer runs under
        ``no_grad`` and keeps their activations: the memory and compute of a backward through
        ``count`` blocks. The backbone follows ``train()``/``eval()`` like any module, its
        BatchNorm layers as ``backbone_norm`` says (ViTs have none).
        """
        blocks = getattr(self.backbone.model, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
            raise ValueError(
                f"count: expected a backbone with a timm-style 'blocks' sequence to tune, "
                f"got {type(self.backbone.model).__name__} without one"
            )
        if not isinstance(count, int) or not 1 <= count <= len(blocks):
            raise ValueError(f"count: expected an int in [1, {len(blocks)}], got {count!r}")
        self.set_backbone_frozen(False)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        tuned = list(blocks)[-count:]
        tuned += [
            getattr(self.backbone.model, name)
            for name in ("norm", "fc_norm", "conv_head", "bn2")
            if isinstance(getattr(self.backbone.model, name, None), nn.Module)
        ]
        for module in tuned:
            for p in module.parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> PKS4VideoClassifier:
        super().train(mode)
        if self.backbone_frozen:
            # A frozen backbone keeps its BatchNorm running statistics and has no dropout.
            self.backbone.eval()
        elif self.backbone_norm == "eval":
            # A backbone that trains normalises with its running statistics: measured, batch
            # statistics cost the fine-tuned block the motion under one feature cell (our
            # reading: they move with the other clips of each batch, by more than the small
            # differences between frames the prior reads).
            for norm in batch_norms(self.backbone):
                norm.eval()
        return self

    def _check_input(self, x: object, stream: bool = False) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        c = self.backbone.in_chans
        if x.dim() != 5:
            raise ValueError(f"x: expected 5 dims (B, T, {c}, H, W), got shape {tuple(x.shape)}")
        if stream:
            if x.shape[1] < 1:
                raise ValueError(
                    f"x: expected at least one frame (T >= 1) in (B, T, {c}, H, W), "
                    f"got shape {tuple(x.shape)}"
                )
        elif x.shape[1] != self.num_frames:
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
        return self._backbone_features(self._check_input(x))

    def _backbone_features(self, x: Tensor) -> Features:
        if self.backbone_frozen:
            # Nothing in the backbone trains: keep no activations for a backward pass.
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def forward_temporal(self, feats: Features) -> Features:
        """The temporal module on the features; same layout out."""
        out = self.temporal(feats.x, grid=feats.grid, num_prefix_tokens=feats.num_prefix_tokens)
        return feats.replace(out)

    def pool(self, feats: Features, tokens: Optional[str] = None) -> Tensor:
        """Mean over frames and space: :class:`Features` -> ``(B, C)``; ``tokens`` (``"avg"``
        or ``"prefix"``, default ``token_pool``) picks the tokens pooled for ViTs."""
        return self._pool_frames(feats, tokens).mean(dim=1)

    def forward_head(self, pooled: Tensor) -> Tensor:
        """``(B, C)`` -> ``(B, num_classes)``."""
        return self.head(pooled)

    def forward_heads(self, feats: Features, out: Features) -> tuple[Tensor, Tensor]:
        """``readout="factored"``: the content head's logits on the temporal module's input
        ``feats`` and the motion head's on its contribution ``out - feats`` (pooled over the
        patch tokens, where the module works), ``(B, num_classes)`` each."""
        if self.motion_head is None:
            raise ValueError(
                f"readout: expected 'factored' for two heads, got {self.readout!r} (one head)"
            )
        motion = self.motion_head(self._contribution_frames(feats, out).mean(dim=1))
        return self.forward_head(self.pool(feats)), motion

    def combine_heads(self, content: Tensor, motion: Tensor) -> Tensor:
        """The class scores from the two heads' logits (``readout="factored"``):
        :func:`combine_heads` with this model's ``readout_scales``."""
        if self.motion_head is None:
            raise ValueError(
                f"readout: expected 'factored' for two heads, got {self.readout!r} (one head)"
            )
        return combine_heads(content, motion, self.readout_scales)

    def calibrate_readout(self, content: Tensor, motion: Tensor, labels: Tensor) -> Tensor:
        """Fit ``readout_scales``, the weights of the two heads (``readout="factored"``), on
        clips the model did not train on: ``content``, ``motion`` are their logits
        (``model(x, return_heads=True)`` in eval mode), ``labels`` their classes. Returns the
        weights (content, motion), also kept in the model's state. See
        :func:`fit_readout_scales`; the head whose cue does not tell the classes of the task
        gets a weight near zero."""
        if self.motion_head is None:
            raise ValueError(
                f"readout: expected 'factored' to calibrate, got {self.readout!r} (one head)"
            )
        scales = fit_readout_scales(content, motion, labels)
        self.readout_scales.copy_(scales.to(self.readout_scales))
        return self.readout_scales.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A factored model saved before readout_scales existed combined its heads with 1 and 1.
        key = prefix + "readout_scales"
        if self.motion_head is not None and key not in state_dict:
            state_dict[key] = torch.ones_like(self.readout_scales)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _contribution_frames(self, feats: Features, out: Features) -> Tensor:
        """What the temporal module adds, ``out - feats``, pooled over the space of each frame
        (patch tokens for ViTs: the module leaves the prefix tokens as they are):
        ``(B, T, C)``."""
        return self._pool_frames(out.replace(out.x - feats.x), tokens="avg")

    def forward(
        self, x: Tensor, *, return_heads: bool = False
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        feats = self.forward_features(x)
        out = self.forward_temporal(feats)
        if self.motion_head is None:
            if return_heads:
                raise ValueError(
                    "return_heads: expected False with readout='output' (one head), got True"
                )
            return self.forward_head(self.pool(out))
        content, motion = self.forward_heads(feats, out)
        return (content, motion) if return_heads else self.combine_heads(content, motion)

    def loss(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The training loss on clips ``x`` with ``labels`` ``(B,)``, and :meth:`forward`'s
        logits (for accuracy): the logits' cross-entropy for ``readout="output"``, the sum of
        each head's own cross-entropy for ``"factored"`` (:func:`factored_loss`). Under
        DistributedDataParallel call the wrapper (``model(x, return_heads=True)``) instead, so
        that its gradient hooks run."""
        if self.motion_head is None:
            logits = self(x)
            return _cross_entropy(logits, labels), logits
        content, motion = self(x, return_heads=True)
        return factored_loss(content, motion, labels), self.combine_heads(content, motion)

    def check_streamable(self) -> None:
        """Raise unless the temporal module is causal (``"mean"``, or a forward-only PKS4)."""
        if self.temporal_kind not in ("mean", "pks4"):
            reason = (
                "its centred convolution sees the next frame"
                if self.temporal_kind == "tconv"
                else "it has no streaming step"
            )
            raise ValueError(
                "temporal: expected 'mean' or 'pks4' with block_kwargs={'bidirectional': False} "
                f"to stream, got {self.temporal_kind!r} ({reason})"
            )
        if isinstance(self.temporal, PKS4Block):
            self.temporal.scan.check_streamable()

    def init_stream(
        self,
        batch_size: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> ClassifierStreamState:
        """The state before the first frame of a stream (:meth:`step` with ``state=None`` makes
        it from its first chunk).

        Args:
            batch_size: ``B``, the videos streamed together.
            device, dtype: those of the features to come (default: the head's parameters').

        Returns:
            a zero running sum ``(B, C)``, no frame seen; the PKS4 block's state is made by the
            first chunk, whose backbone features give the grid.
        """
        self.check_streamable()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        ref = self.head.fc.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        def zeros() -> Tensor:
            return torch.zeros(batch_size, self.num_features, device=device, dtype=sum_dtype)

        if self.motion_head is None:
            return ClassifierStreamState(pooled_sum=zeros())
        return ClassifierStreamState(zeros(), contribution_sum=zeros())

    def step(
        self, x: Tensor, state: Optional[ClassifierStreamState] = None
    ) -> tuple[Tensor, ClassifierStreamState]:
        """The next chunk of a stream: running logits, in constant memory.

        Args:
            x: frames ``(B, T, 3, H, W)``, any ``T >= 1`` (``num_frames`` does not apply).
            state: from :meth:`init_stream` or the previous call; ``None`` starts a stream.

        Returns:
            the logits ``(B, num_classes)`` of the mean pooled features over every frame seen so
            far (after a whole clip: :meth:`forward`'s logits on it), and the new state. Run it
            under ``torch.no_grad()`` (or detach the state) to keep the memory constant.
        """
        self.check_streamable()
        x = self._check_input(x, stream=True)
        if state is None:
            state = self.init_stream(x.shape[0], x.device, x.dtype)
        elif not isinstance(state, ClassifierStreamState):
            raise TypeError(
                f"state: expected a ClassifierStreamState or None, got {type(state).__name__}"
            )
        if state.pooled_sum.shape[0] != x.shape[0]:
            raise ValueError(
                f"state: expected batch size {x.shape[0]} (that of x), "
                f"got {state.pooled_sum.shape[0]}"
            )
        feats = self._backbone_features(x)
        temporal = state.temporal
        out = feats
        if isinstance(self.temporal, PKS4Block):
            y, temporal = self.temporal.step(
                feats.x, temporal, grid=feats.grid, num_prefix_tokens=feats.num_prefix_tokens
            )
            out = feats.replace(y)
        frames_seen = state.frames_seen + x.shape[1]

        def running(total: Tensor, per_frame: Tensor) -> Tensor:
            return total + per_frame.sum(dim=1).to(total.dtype)

        def mean(total: Tensor) -> Tensor:
            return (total / frames_seen).to(feats.x.dtype)

        # The head reads the module's output, or its input with the factored readout.
        read = feats if self.motion_head is not None else out
        pooled_sum = running(state.pooled_sum, self._pool_frames(read))
        content = self.forward_head(mean(pooled_sum))
        if self.motion_head is None:
            return content, ClassifierStreamState(pooled_sum, frames_seen, temporal)
        if state.contribution_sum is None:
            raise ValueError(
                "state: expected the contribution sum of readout='factored' "
                "(from this model's init_stream), got a state without it"
            )
        contribution_sum = running(state.contribution_sum, self._contribution_frames(feats, out))
        state = ClassifierStreamState(pooled_sum, frames_seen, temporal, contribution_sum)
        motion = self.motion_head(mean(contribution_sum))
        return self.combine_heads(content, motion), state

    def _pool_frames(self, feats: Features, tokens: Optional[str] = None) -> Tensor:
        """Mean over space of every frame: :class:`Features` -> ``(B, T, C)``; ``tokens`` as in
        :meth:`pool`."""
        if feats.kind == "map":
            return feats.x.mean(dim=(3, 4))
        k = feats.num_prefix_tokens
        prefix = (self.token_pool if tokens is None else tokens) == "prefix"
        return (feats.x[:, :, :k] if prefix else feats.x[:, :, k:]).mean(dim=2)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part: ``{"backbone": [...], "temporal": [...], "head": [...]}``
        (for per-part learning rates or weight decay; ``"head"`` holds both heads of
        ``readout="factored"``)."""
        heads = nn.ModuleList([self.head] + ([self.motion_head] if self.motion_head else []))
        parts = {"backbone": self.backbone, "temporal": self.temporal, "head": heads}
        return {n: [p for p in m.parameters() if p.requires_grad] for n, m in parts.items()}
