"""A per-frame image model small enough for exact float64 checks of the classifier."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """One 4x4 convolution of stride 4 and a ReLU: ``(N, 3, H, W)`` -> ``(N, 8, H/4, W/4)``
    (wrap it in ``FrameBackbone(TinyCNN(), num_features=8)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))
