"""AdamW's parameter groups for a video classifier: weight decay by name, learning rate by part.

Weight decay follows the model's ``no_weight_decay()`` (timm's convention): the weight
matrices decay; norms, biases, the scan's ``A_log``, ``D`` and step bias and learnt time
embeddings do not. The learning rate is the peak rate times a scale per part of
``model.parameter_groups()`` (``"backbone"``, ``"temporal"``, ``"head"``): a pretrained backbone
fine-tuned with the temporal module learns at a tenth of the module's rate in the motion
suite's fine-tuned regime, the protocol behind its numbers (docs/motion_suite.md).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

__all__ = ["PARTS", "optimizer_param_groups", "weight_decay_groups"]

#: The parts of a classifier that can learn at their own rate.
PARTS = ("backbone", "temporal", "head")


def weight_decay_groups(
    model: nn.Module, trainable: list[nn.Parameter]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``trainable`` split into (decayed, not decayed) by ``model.no_weight_decay()`` when the
    model has one (timm's convention), else by shape (matrices decay, 1-D parameters do not)."""
    own = getattr(model, "no_weight_decay", None)
    exempt_names = (
        own() if callable(own) else {n for n, p in model.named_parameters() if p.dim() < 2}
    )
    exempt = {id(p) for n, p in model.named_parameters() if n in exempt_names}
    decay = [p for p in trainable if id(p) not in exempt]
    no_decay = [p for p in trainable if id(p) in exempt]
    return decay, no_decay


def optimizer_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    lr_scales: Optional[Mapping[str, float]] = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW(groups)``: the model's trainable parameters
    grouped by (learning rate, weight decay).

    Args:
        model: a module; with ``parameter_groups()`` (as :class:`~pks4_layers.models.
            PKS4VideoClassifier`) each part learns at ``lr * lr_scales[part]``, without it every
            parameter learns at ``lr``.
        lr: the peak learning rate (of the head, and of every part without a scale).
        weight_decay: the decay of the parameters that decay (see :func:`weight_decay_groups`).
        lr_scales: part name (of :data:`PARTS`) -> multiplier of ``lr`` (missing parts: 1).

    Returns:
        One dict per (scale, decayed) pair that holds a parameter, ``{"params", "lr",
        "weight_decay"}``; the parameters keep the model's order within a group. Parts with the
        same scale share a group, and the group of the head's rate with decay comes first (a
        schedule's ``param_groups[0]["lr"]`` is the peak rate's), so with every scale 1 the
        groups are exactly ``[decayed, not decayed]``.

    Raises:
        ValueError: ``lr_scales`` names a part not in :data:`PARTS` or holds a scale <= 0.
    """
    scales = dict(lr_scales or {})
    for part, scale in scales.items():
        if part not in PARTS:
            raise ValueError(f"lr_scales: expected keys of {list(PARTS)}, got {part!r}")
        if not scale > 0:
            raise ValueError(f"lr_scales[{part!r}]: expected a number > 0, got {scale!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay, _ = weight_decay_groups(model, trainable)
    decayed = {id(p) for p in decay}
    part_of: dict[int, str] = {}
    parts = getattr(model, "parameter_groups", None)
    if callable(parts):
        for part, params in parts().items():
            part_of.update((id(p), part) for p in params)
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for p in trainable:
        scale = float(scales.get(part_of.get(id(p), "head"), 1.0))
        grouped.setdefault((scale, id(p) in decayed), []).append(p)
    # The head's rate first, decayed before not; then the other rates, highest first.
    order = sorted(grouped, key=lambda k: (k[0] != 1.0, -k[0], not k[1]))
    return [
        {
            "params": grouped[key],
            "lr": lr * key[0],
            "weight_decay": weight_decay if key[1] else 0.0,
        }
        for key in order
    ]
