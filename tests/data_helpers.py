"""Helpers shared by the data tests: small real videos and a nearest-centroid probe."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pks4_layers.data.decode import read_frames, write_video
from pks4_layers.data.sources import real_clip_path


def real_frames(num_frames: int, height: int = 48, width: int = 64) -> Tensor:
    """uint8 ``(T, height, width, 3)`` crops of consecutive real frames (carphone clip)."""
    frames = read_frames(real_clip_path("carphone_pristine"), range(num_frames))
    return frames[:, 40 : 40 + height, 50 : 50 + width].contiguous()


def write_clip(path: Path, num_frames: int = 6, height: int = 48, width: int = 64) -> Path:
    write_video(path, real_frames(num_frames, height, width))
    return path


def nearest_centroid_accuracy(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor
) -> float:
    """Fit class means on ``(N, D)`` train features, classify val by the nearest mean."""
    classes = train_y.unique()
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in classes])
    pred = classes[torch.cdist(val_x, centroids).argmin(1)]
    return (pred == val_y).float().mean().item()


def time_average(clips: Tensor) -> Tensor:
    """``(N, T, H, W, 3)`` uint8 -> ``(N, H*W*3)``: the per-pixel mean over time."""
    return clips.float().mean(1).flatten(1)


def motion_energy(clips: Tensor) -> Tensor:
    """``(N, T, H, W, 3)`` uint8 -> ``(N, 2)``: mean of ``dI/dt * dI/dx`` and ``dI/dt * dI/dy``.

    The Lucas-Kanade numerators: built from frame differences, their sign is the sign of the
    motion along each axis, whatever the content.
    """
    x = clips.float().mean(-1)  # (N, T, H, W) grey
    dt = x[:, 1:] - x[:, :-1]
    mid = (x[:, 1:] + x[:, :-1]) / 2
    gx = mid[..., 1:-1, 2:] - mid[..., 1:-1, :-2]
    gy = mid[..., 2:, 1:-1] - mid[..., :-2, 1:-1]
    dt = dt[..., 1:-1, 1:-1]
    energy = torch.stack([(dt * gx).mean((1, 2, 3)), (dt * gy).mean((1, 2, 3))], 1)
    return energy / (energy.norm(dim=1, keepdim=True) + 1e-6)


def logistic_accuracy(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, l2: float = 1e-2
) -> float:
    """An L2-regularised multinomial logistic regression on ``(N, D)`` features standardised on
    the training set (LBFGS, float64, deterministic): the val accuracy, as a fraction."""
    mu, sd = train_x.double().mean(0), train_x.double().std(0) + 1e-6
    xt, xv = (train_x.double() - mu) / sd, (val_x.double() - mu) / sd
    classes = int(max(train_y.max(), val_y.max())) + 1
    w = torch.zeros(xt.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, train_y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((xv @ w + b).argmax(1) == val_y).double().mean().item()


def one_nn_accuracy(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor) -> float:
    """Each val sample takes the label of its nearest (L2) training sample."""
    return (train_y[torch.cdist(val_x, train_x).argmin(1)] == val_y).float().mean().item()


def step_profile(clips):
    """Ordered: the mean absolute change at each step, relative to the clip's mean step."""
    steps = (clips[:, 1:].float() - clips[:, :-1].float()).abs().mean((2, 3, 4))
    return steps / steps.mean(1, keepdim=True)


def rotation_sense(clips):
    """Ordered: the sign of the Lucas-Kanade numerator of a rotation about the centre,
    the mean of ``dI/dt * (u dI/dy - v dI/dx)`` (negative for clockwise)."""
    x = F.avg_pool2d(clips.float().mean(-1), 2)  # (N, T, h, w) grey
    dt = (x[:, 1:] - x[:, :-1])[..., 1:-1, 1:-1]
    mid = (x[:, 1:] + x[:, :-1]) / 2
    gx = mid[..., 1:-1, 2:] - mid[..., 1:-1, :-2]
    gy = mid[..., 2:, 1:-1] - mid[..., :-2, 1:-1]
    off = torch.arange(dt.shape[-1]) - (dt.shape[-1] - 1) / 2
    v, u = torch.meshgrid(off, off, indexing="ij")
    return (dt * (u * gy - v * gx)).mean((1, 2, 3)).sign()[:, None]
