"""Video decoding (and encoding) with PyAV.

``read_frames(path, indices) -> uint8 (len(indices), H, W, 3)`` RGB. Clips in action recognition
are short (a few seconds), so frames are decoded sequentially once, from the start up to the
largest requested index: no seeking, whose accuracy depends on the container and the keyframe
layout. Only the requested frames are kept in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

PathLike = Union[str, "os.PathLike[str]"]


def _av():
    # Imported lazily so that the rest of the library works without the optional `video` extra.
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "video decoding needs PyAV: pip install 'pks4-layers[video]' (or pip install av)"
        ) from e
    return av


def _open(path: PathLike):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    av = _av()
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot open as a video ({e})") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: expected a video stream, got none")
    return container


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def video_info(path: PathLike) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream of ``path``.

    ``num_frames`` comes from the stream header; containers that do not store it (Matroska,
    WebM: 0) are counted by decoding, which is exact and cheap for short clips.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = sum(1 for _ in container.decode(stream))
        return VideoInfo(
            num_frames=num_frames,
            fps=fps,
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
        )


def read_frames(path: PathLike, indices: Sequence[int]) -> Tensor:
    """Decode the frames ``indices`` (0-based, may repeat, any order) of ``path``.

    Returns uint8 ``(len(indices), H, W, 3)`` RGB. Raises ``ValueError`` naming the path and the
    index when an index is negative or past the last frame.
    """
    indices = [int(i) for i in indices]
    for i in indices:
        if i < 0:
            raise ValueError(f"{path}: frame index expected >= 0, got {i}")
    wanted = set(indices)
    last = max(indices, default=-1)
    frames: dict[int, Tensor] = {}
    decoded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
        if last >= 0:
            for frame in container.decode(stream):
                if decoded in wanted:
                    frames[decoded] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                decoded += 1
                if decoded > last:
                    break
    if last >= decoded:
        bad = next(i for i in indices if i >= decoded)
        raise ValueError(
            f"{path}: frame index expected < {decoded} (the number of frames), got {bad}"
        )
    if not indices:
        return torch.empty(0, height, width, 3, dtype=torch.uint8)
    return torch.stack([frames[i] for i in indices])


def write_video(path: PathLike, frames: Tensor, fps: float = 25.0, crf: int = 18) -> str:
    """Encode uint8 ``(T, H, W, 3)`` RGB frames to ``path`` (H.264, yuv420p); returns the codec.

    H and W must be even (yuv420p subsamples chroma by 2). Falls back to MPEG-4 part 2 when the
    PyAV build has no libx264. The container follows the file extension (.mp4, .mkv, ...).
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}"
        )
    T, H, W, _ = frames.shape
    if T < 1 or H % 2 or W % 2:
        raise ValueError(f"frames: expected T >= 1 and even H, W, got {tuple(frames.shape)}")
    av = _av()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            # Near-lossless and single-threaded: small files, deterministic output.
            stream.options = {"crf": str(crf), "preset": "fast", "threads": "1"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec
