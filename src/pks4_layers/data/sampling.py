"""Which frames of a video make a clip: lists of 0-based frame indices.

Two conventions:

- ``segment_indices`` (TSN, TSM, Something-Something v2): the video is split into ``num_frames``
  equal segments and one frame is taken per segment, so a clip always covers the whole video.
- ``dense_indices`` (Kinetics-400, I3D/SlowFast style): ``num_frames`` frames ``stride`` apart, a
  short window of the video; multi-clip testing spreads ``num_clips`` windows over the video.

Every list has ``num_frames`` entries, is monotone non-decreasing and lies in
``[0, num_video_frames)``; videos that are too short repeat frames.
"""

from __future__ import annotations

from typing import Optional

import torch


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _check_clip_index(clip_index: int, num_clips: int) -> None:
    _check_positive("num_clips", num_clips)
    if not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index: expected 0 <= clip_index < {num_clips}, got {clip_index}")


def segment_indices(
    num_video_frames: int,
    num_frames: int,
    train: bool,
    generator: Optional[torch.Generator] = None,
    clip_index: int = 0,
    num_clips: int = 1,
) -> list[int]:
    """One frame from each of ``num_frames`` equal segments of the video.

    Train: a uniformly random frame in each segment (drawn from ``generator``). Eval: the segment
    centre; with ``num_clips > 1`` clip ``c`` takes the frame at fraction ``(c + 0.5) / num_clips``
    of each segment, so the clips interleave. Shorter videos than ``num_frames`` repeat frames.
    """
    _check_positive("num_video_frames", num_video_frames)
    _check_positive("num_frames", num_frames)
    _check_clip_index(clip_index, num_clips)
    n, T = num_video_frames, num_frames
    # Segment k is [start_k, end_k): integer bounds, at least one frame wide; end_k - 1 <=
    # start_{k+1}, so any choice inside the segments is monotone.
    starts = [k * n // T for k in range(T)]
    ends = [max((k + 1) * n // T, s + 1) for k, s in enumerate(starts)]
    if train:
        u = torch.rand(T, generator=generator).tolist()
    else:
        u = [(clip_index + 0.5) / num_clips] * T
    return [min(s + int(f * (e - s)), e - 1) for s, e, f in zip(starts, ends, u)]


def dense_indices(
    num_video_frames: int,
    num_frames: int,
    stride: int,
    train: bool,
    generator: Optional[torch.Generator] = None,
    clip_index: int = 0,
    num_clips: int = 1,
) -> list[int]:
    """``num_frames`` frames ``stride`` apart from one start frame.

    Train: the start is uniform over the positions where the window fits. Eval: with one clip the
    window is centred; with ``num_clips`` clips, clip ``c`` starts at ``c / (num_clips - 1)`` of the
    way from the first to the last position. Indices past the end are clamped to the last frame.
    """
    _check_positive("num_video_frames", num_video_frames)
    _check_positive("num_frames", num_frames)
    _check_positive("stride", stride)
    _check_clip_index(clip_index, num_clips)
    span = (num_frames - 1) * stride + 1
    last_start = max(num_video_frames - span, 0)
    if train:
        start = int(torch.randint(0, last_start + 1, (1,), generator=generator))
    elif num_clips == 1:
        start = last_start // 2
    else:
        start = round(clip_index * last_start / (num_clips - 1))
    return [min(start + k * stride, num_video_frames - 1) for k in range(num_frames)]
