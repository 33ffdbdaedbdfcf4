"""Saving and loading :class:`~pks4_layers.models.PKS4VideoClassifier` without pickle.

``save_pretrained(dir)`` writes ``config.json`` (what rebuilds the model, the library version
that wrote it) and ``model.safetensors`` (the weights: tensors only, nothing that runs code);
``from_pretrained(dir)`` rebuilds the model offline and loads them. ``from_checkpoint(path)``
does the same from a ``pks4-train`` checkpoint, which holds its training config.

A model whose backbone was given as a module (not a name) is saved with ``"backbone": null``:
``from_pretrained(dir, backbone=module)`` then needs the same architecture again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "from_checkpoint", "from_pretrained", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "pks4-layers/video-classifier"
FORMAT_VERSION = 1


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:  # an optional dependency: timm brings it, or pip install it
        raise ImportError(
            "save_pretrained / from_pretrained need the 'safetensors' package "
            "(pip install safetensors)"
        ) from err
    return safetensors.torch


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def save_pretrained(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``model``'s config and weights to ``directory`` (created if needed); returns it."""
    from .. import __version__
    from .classifier import PKS4VideoClassifier

    if not isinstance(model, PKS4VideoClassifier):
        raise TypeError(f"model: expected a PKS4VideoClassifier, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        **_jsonable(model.init_config),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    # safetensors refuses tensors that share memory: contiguous copies of each.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _safetensors().save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def read_config(directory: Union[str, Path]) -> dict[str, Any]:
    """The saved config of ``directory``, checked to be this library's."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"directory: expected {CONFIG_NAME} in {str(directory)!r}")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(
            f"directory: expected a {FORMAT} config, got format {config.get('format')!r} in "
            f"{str(path)!r}"
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"directory: expected format_version <= {FORMAT_VERSION}, got "
            f"{config['format_version']} (written by pks4-layers {config.get('library_version')}"
            "; upgrade the library)"
        )
    return config


def _backbone_of(config: dict[str, Any], backbone: Optional[nn.Module]) -> Union[nn.Module, str]:
    spec = config.get("backbone")
    if backbone is not None:
        return backbone
    if spec is None:
        raise ValueError(
            "backbone: expected the image model (the saved model's backbone was given as a "
            "module, so its architecture is not in the config), got None"
        )
    if spec.get("weights_arch") == "efficientnet_lite0":
        from .pretrained import efficientnet_lite0

        # The architecture the packaged weights fit (timm's tf_efficientnet_lite0), unloaded.
        return efficientnet_lite0(pretrained=False)
    from .backbone import create_backbone

    return create_backbone(spec["name"], pretrained=False, **spec.get("kwargs", {}))


def from_pretrained(
    directory: Union[str, Path], *, backbone: Optional[nn.Module] = None
) -> nn.Module:
    """The classifier saved in ``directory`` by :func:`save_pretrained`, offline; ``backbone``
    is needed only when the saved one was given as a module (then its architecture must be the
    same)."""
    from .backbone import FrameBackbone
    from .classifier import PKS4VideoClassifier

    config = read_config(directory)
    image_model = _backbone_of(config, backbone)
    model = PKS4VideoClassifier(
        image_model if isinstance(image_model, FrameBackbone) else FrameBackbone(image_model),
        num_classes=config["num_classes"],
        num_frames=config["num_frames"],
        temporal=config["temporal"],
        freeze_backbone=config["freeze_backbone"],
        drop_rate=config["drop_rate"],
        block_kwargs=config["block_kwargs"],
        token_pool=config["token_pool"],
        readout=config.get("readout", "output"),  # saved before 0.3.0: one head
        preset=config.get("preset", "features"),  # saved before 0.3.0: the block's defaults
        # Saved before 0.3.0: a backbone that trained did so with its batches' statistics.
        backbone_norm=config.get("backbone_norm", "train"),
    )
    model.init_config["backbone"] = config.get("backbone")
    state = _safetensors().load_file(str(Path(directory) / WEIGHTS_NAME))
    load_state(model, state, f"{directory} (pks4-layers {config.get('library_version')})")
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)``; a state that does not fit says in one line what
    differs and who wrote it."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} (model: {list(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"other shapes: {', '.join(shapes[:3])}")
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:3])}")
        raise ValueError(
            f"state: expected the weights of this model, got those of another layout from "
            f"{source}: {'; '.join(parts)} (see CHANGELOG.md for the defaults that changed)"
        )
    model.load_state_dict(state)


def from_checkpoint(path: Union[str, Path]) -> nn.Module:
    """The classifier of a ``pks4-train`` checkpoint, rebuilt from the training config it holds
    (the backbone's architecture, without loading its pretrained weights: the checkpoint has
    them) with its weights loaded: the public form of what ``pks4-train --eval-only`` does."""
    from ..train.checkpoint import load_checkpoint
    from ..train.config import config_from_mapping
    from ..train.engine import build_model

    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or "model" not in state:
        raise ValueError(f"path: expected a pks4-train checkpoint, got {str(path)!r} without one")
    # A checkpoint's config holds every key of its version's TrainConfig: one without
    # "preset" was written before 0.3.0, by the block's defaults; one without "backbone_norm"
    # trained its backbone (if at all) with its batches' statistics.
    cfg = config_from_mapping({"preset": "features", "backbone_norm": "train", **state["config"]})
    classes = state.get("classes") or []
    num_classes = len(classes) or state["model"]["head.fc.weight"].shape[0]
    model = build_model(cfg, num_classes, random_weights=True)
    load_state(model, state["model"], f"checkpoint {str(path)!r}")
    model.classes = list(classes)
    return model
