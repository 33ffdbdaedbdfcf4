"""Clip transforms: uint8 frames ``(T, H, W, 3)`` -> normalised float32 ``(T, 3, S, S)``.

All frames of a clip share one crop and one flip decision, so motion between frames is preserved
(an independent crop per frame would add fake camera shake).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resize_short_side(frames: Tensor, short_side: int) -> Tensor:
    """Float ``(T, C, H, W)`` -> ``(T, C, H', W')`` with ``min(H', W') == short_side``."""
    H, W = frames.shape[-2:]
    scale = short_side / min(H, W)
    size = (max(short_side, round(H * scale)), max(short_side, round(W * scale)))
    if size == (H, W):
        return frames
    # antialias: downscaling 720p to 256 without it aliases fine texture.
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)


class ClipTransform:
    """Resize, crop, optionally flip and normalise a clip.

    Input uint8 ``(T, H, W, 3)`` RGB; output ``(clip, flipped)`` with ``clip`` float32
    ``(T, 3, crop_size, crop_size)`` normalised by ``mean``/``std`` (on the 0..1 scale).

    Train: short side -> ``short_side``, a uniformly random ``crop_size`` square and, if ``flip``,
    a horizontal flip with probability 1/2. Eval: short side -> ``short_side`` and a centre crop;
    with ``num_crops > 1`` (usually 3) crop ``crop_index`` is spread along the long side:
    0/1/2 = left/centre/right for landscape frames, top/centre/bottom for portrait ones.
    """

    def __init__(
        self,
        crop_size: int = 224,
        short_side: int = 256,
        train: bool = True,
        flip: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if not isinstance(crop_size, int) or crop_size < 1:
            raise ValueError(f"crop_size: expected a positive int, got {crop_size!r}")
        if not isinstance(short_side, int) or short_side < crop_size:
            raise ValueError(
                f"short_side: expected an int >= crop_size ({crop_size}), got {short_side!r}"
            )
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean, std: expected 3 values each (std > 0), got {mean}, {std}")
        self.crop_size = crop_size
        self.short_side = short_side
        self.train = train
        self.flip = flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def crop_origin(
        self,
        height: int,
        width: int,
        generator: Optional[torch.Generator] = None,
        crop_index: Optional[int] = None,
        num_crops: int = 1,
    ) -> tuple[int, int]:
        """Top-left ``(y, x)`` of the crop in the resized ``height x width`` frame."""
        dy, dx = height - self.crop_size, width - self.crop_size
        if self.train:
            y = int(torch.randint(0, dy + 1, (1,), generator=generator))
            x = int(torch.randint(0, dx + 1, (1,), generator=generator))
            return y, x
        if not isinstance(num_crops, int) or num_crops < 1:
            raise ValueError(f"num_crops: expected a positive int, got {num_crops!r}")
        if crop_index is None or num_crops == 1:
            return dy // 2, dx // 2
        if not 0 <= crop_index < num_crops:
            raise ValueError(
                f"crop_index: expected 0 <= crop_index < {num_crops}, got {crop_index}"
            )
        # Spread along the long side, centred along the short one.
        along = crop_index * max(dx, dy) // (num_crops - 1)  # index (n-1)/2 == centre
        return (dy // 2, along) if dx >= dy else (along, dx // 2)

    def __call__(
        self,
        frames: Tensor,
        generator: Optional[torch.Generator] = None,
        crop_index: Optional[int] = None,
        num_crops: int = 1,
    ) -> tuple[Tensor, bool]:
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}"
            )
        x = frames.permute(0, 3, 1, 2).float().div_(255.0)
        x = resize_short_side(x, self.short_side)
        y0, x0 = self.crop_origin(x.shape[-2], x.shape[-1], generator, crop_index, num_crops)
        x = x[..., y0 : y0 + self.crop_size, x0 : x0 + self.crop_size]
        flipped = False
        if self.train and self.flip:
            flipped = bool(torch.rand(1, generator=generator) < 0.5)
            if flipped:
                x = x.flip(-1)
        x = (x - self.mean) / self.std
        return x.contiguous(), flipped

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_size={self.crop_size}, short_side={self.short_side}, "
            f"train={self.train}, flip={self.flip})"
        )
