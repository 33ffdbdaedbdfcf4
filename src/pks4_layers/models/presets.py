"""Named configurations of a PKS4 classifier: the PKS4 block's arguments and the readout.

The block's defaults (its scan reads the features, the kinematic prior steers it) fit a small
training set from the content of the clips: after a frozen backbone they stay near chance on
the motion tasks of the motion suite (docs/motion_suite.md), like every peer module, and with a
backbone that trains they memorise it. A block whose scan reads the prior alone, computed from
cosine similarities between neighbouring frames and from the features' change against their
spatial gradient (the gradient flow: motion under one feature cell), standardised per channel
over the data (``motion_norm="batch"``), with the factored readout (a motion head trained on
the block's contribution alone), reads motion in every regime, given the epochs to fit: after
a frozen backbone at 24 epochs (at 8 it has not fit), from scratch and fine-tuned at 16 (at 8
it is no different from the block's defaults). It is every PKS4 classifier's default,
``"motion_only"``; ``"features"`` builds the block's defaults.

``PKS4VideoClassifier(preset=...)`` builds one of :data:`PRESETS` by name;
:func:`resolve_preset` gives the name a classifier uses when none is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

__all__ = ["PRESETS", "Preset", "preset_block_kwargs", "resolve_preset"]


@dataclass(frozen=True)
class Preset:
    """A named configuration: ``block_kwargs`` of :class:`~pks4_layers.PKS4Block` (under the
    user's, which win), the classifier's ``readout``, and what it is for."""

    block_kwargs: Mapping[str, Any] = field(default_factory=dict)
    readout: str = "output"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_kwargs", MappingProxyType(dict(self.block_kwargs)))


#: The presets by name: ``"features"`` and ``"motion_only"`` (read-only).
PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "features": Preset(
            {},
            "output",
            "PKS4Block's defaults, one head on the block's output: the scan reads the features "
            "and the kinematic prior steers it (fits the content of a small training set)",
        ),
        "motion_only": Preset(
            {
                "scan_input": "prior",
                "corr_dim": None,
                "cues": ("cost", "displacement", "change", "curl", "flow"),
                "motion_norm": "batch",
            },
            "factored",
            "the scan reads the kinematic prior alone (cosine cost volume of the features, "
            "soft-argmax displacement, its curl and divergence, the gradient flow of sub-cell "
            "motion, and their change, each standardised over the data: no learnt function of "
            "the content), and a motion head reads the block's contribution on its own loss (the "
            "default of a PKS4 classifier)",
        ),
    }
)


def preset_block_kwargs(
    preset: str, block_kwargs: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """The temporal module's arguments under ``preset``: the preset's, with the user's
    ``block_kwargs`` over them."""
    return {**PRESETS[preset].block_kwargs, **(block_kwargs or {})}


def resolve_preset(preset: Optional[str], *, temporal: str) -> str:
    """The preset a classifier builds: ``preset`` itself, checked, or with ``None``
    ``"motion_only"`` for a PKS4 block and ``"features"`` for every other temporal module
    (they take ``"features"`` only: no block arguments, one head by default)."""
    if preset is None:
        return "motion_only" if temporal == "pks4" else "features"
    if preset not in PRESETS:
        raise ValueError(f"preset: expected None or one of {list(PRESETS)}, got {preset!r}")
    if temporal != "pks4" and PRESETS[preset].block_kwargs:
        raise ValueError(
            f"preset: expected None or 'features' with temporal={temporal!r} (its arguments "
            f"are PKS4Block's), got {preset!r}"
        )
    return preset
