"""Video decoding (and encoding) with PyAV.

``read_frames(path, indices) -> uint8 (len(indices), H, W, 3)`` RGB. Clips in action recognition
are short (a few seconds), so frames are decoded sequentially once, from the start up to the
largest requested index: no seeking, whose accuracy depends on the container and the keyframe
layout. Only the requested frames are kept in memory.

Frame ``i`` is the ``i``-th frame the decoder returns (presentation order), never a timestamp, so
variable-frame-rate clips decode like constant-rate ones. Unreadable input raises
:class:`VideoDecodeError` naming the file and the cause, never PyAV's own exceptions. A file cut
short (an interrupted download or copy) decodes up to its first unreadable packet: those frames
are the video, and asking for a later one raises :class:`VideoTooShortError`, which says how many
there are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Union

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


class VideoDecodeError(ValueError):
    """A file that cannot be read as a video: ``path`` and ``reason`` say which and why.

    A ``ValueError``, as before it existed. Built from one string (the way a DataLoader worker
    re-raises it in the main process), that string is the whole message.
    """

    def __init__(self, path: PathLike, reason: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" if reason else str(path))

    def __reduce__(self):
        # Pickled by its fields, not by its message (the default), so it survives the trip.
        return type(self), (self.path, self.reason)


class VideoTooShortError(VideoDecodeError):
    """A frame index at or past the end: ``num_frames`` frames could be decoded.

    ``cause`` is the decoding error that ended the stream early (a truncated or damaged file),
    or None when the stream simply ended there.
    """

    def __init__(
        self, path: PathLike, reason: str = "", num_frames: int = 0, cause: Optional[str] = None
    ) -> None:
        super().__init__(path, reason)
        self.num_frames = num_frames
        self.cause = cause

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.num_frames, self.cause)


def _open(path: PathLike):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    av = _av()
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise VideoDecodeError(path, f"cannot open as a video ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "expected a video stream, got none")
    return container


def _decode(container, stream, failure: list[str]) -> Iterator:
    """The stream's frames in presentation order, up to the end or the first packet that cannot
    be demuxed or decoded; that error's text is appended to ``failure``.

    Stopping there is what makes a truncated file readable: its last packet is cut, and the
    frames before it are fine. The decoder is then drained, since it holds back a few decoded
    frames to reorder them.
    """
    av = _av()
    try:
        for packet in container.demux(stream):
            yield from packet.decode()
    except av.error.FFmpegError as e:
        failure.append(str(e))
        try:
            yield from stream.codec_context.decode(None)
        except av.error.FFmpegError:
            pass


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def video_info(path: PathLike) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream of ``path``.

    ``num_frames`` comes from the stream header; containers that do not store it (Matroska,
    WebM: 0) are counted by decoding, which is exact and cheap for short clips. The header of a
    truncated file can promise more frames than it holds (``read_frames`` then raises
    :class:`VideoTooShortError` with the true count); a counted one stops at its first
    unreadable packet. Raises :class:`VideoDecodeError` for a file that cannot be opened as a
    video.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = sum(1 for _ in _decode(container, stream, []))
        return VideoInfo(
            num_frames=num_frames,
            fps=fps,
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
        )


def read_frames(path: PathLike, indices: Sequence[int]) -> Tensor:
    """Decode the frames ``indices`` (0-based, may repeat, any order) of ``path``.

    Returns uint8 ``(len(indices), H, W, 3)`` RGB. Raises ``ValueError`` naming the path and the
    index when an index is negative, :class:`VideoTooShortError` (a ``ValueError`` too) naming
    them when an index is past the last decodable frame, and :class:`VideoDecodeError` when the
    file cannot be opened as a video or its frame size changes mid-stream.
    """
    indices = [int(i) for i in indices]
    for i in indices:
        if i < 0:
            raise ValueError(f"{path}: frame index expected >= 0, got {i}")
    wanted = set(indices)
    last = max(indices, default=-1)
    frames: dict[int, Tensor] = {}
    decoded = 0
    failure: list[str] = []
    with _open(path) as container:
        stream = container.streams.video[0]
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
        size: Optional[tuple[int, int]] = None  # of the first decoded frame
        if last >= 0:
            for frame in _decode(container, stream, failure):
                size = size or (frame.width, frame.height)
                if decoded in wanted:
                    if (frame.width, frame.height) != size:
                        raise VideoDecodeError(
                            path,
                            f"frame {decoded} is {frame.width}x{frame.height}, expected "
                            f"{size[0]}x{size[1]} like frame 0 (the size changes mid-stream)",
                        )
                    frames[decoded] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                decoded += 1
                if decoded > last:
                    break
    if last >= decoded:
        bad = next(i for i in indices if i >= decoded)
        cause = failure[0] if failure else None
        reason = f"frame index expected < {decoded} (the number of frames), got {bad}"
        if cause is not None:
            reason += f"; decoding stopped at an unreadable packet ({cause})"
        raise VideoTooShortError(path, reason, num_frames=decoded, cause=cause)
    if not indices:
        return torch.empty(0, height, width, 3, dtype=torch.uint8)
    return torch.stack([frames[i] for i in indices])


def write_video(
    path: PathLike, frames: Tensor, fps: float = 25.0, crf: int = 18, lossless: bool = False
) -> str:
    """Encode uint8 ``(T, H, W, 3)`` RGB frames to ``path``; returns the codec.

    By default H.264 (yuv420p, near-lossless at ``crf``), falling back to MPEG-4 part 2 when the
    PyAV build has no libx264; H and W must be even (yuv420p subsamples chroma by 2).
    ``lossless=True`` writes FFV1 in RGB: intra-only and exact, so every frame decodes to the
    very pixels given, whatever the order it is read in (needs a container that carries FFV1,
    such as ``.mkv``). The container follows the file extension (.mp4, .mkv, ...).
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}"
        )
    T, H, W, _ = frames.shape
    if T < 1 or (not lossless and (H % 2 or W % 2)):
        raise ValueError(f"frames: expected T >= 1 and even H, W, got {tuple(frames.shape)}")
    if lossless and Path(path).suffix.lower() not in (".mkv", ".avi"):
        raise ValueError(f"path: expected a .mkv or .avi file for lossless FFV1, got {path}")
    av = _av()
    if lossless:
        codec, pix_fmt = "ffv1", "bgr0"
    else:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        pix_fmt = "yuv420p"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        if codec == "libx264":
            # Near-lossless and single-threaded: small files, deterministic output.
            stream.options = {"crf": str(crf), "preset": "fast", "threads": "1"}
        elif codec == "mpeg4":
            stream.bit_rate = 4_000_000
        for frame in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec
