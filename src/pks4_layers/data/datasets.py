"""Video classification datasets: sample lists for common layouts and a clip dataset.

- ``folder_samples``: UCF101 / HMDB51 style ``root/<class>/<clip>.<ext>``, optionally restricted
  to a split file (UCF101 ``trainlist0X.txt`` / ``testlist0X.txt``) with a ``classInd.txt``.
- ``ssv2_samples``: Something-Something v2 (``<id>.webm`` + the json split and label files).
- ``VideoClipDataset``: decodes, samples and transforms one or several views per video; files
  that cannot be decoded are skipped with a warning (``on_error="skip"``, the default) and
  dropped from batches by ``collate_skipping_bad``, or stop the run (``on_error="raise"``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from .decode import VideoDecodeError, VideoTooShortError, read_frames, video_info
from .sampling import dense_indices, segment_indices
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ClipTransform

PathLike = Union[str, "os.PathLike[str]"]
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm")
ON_ERROR_CHOICES: tuple[str, ...] = ("skip", "raise")


class BadVideoWarning(UserWarning):
    """A video that could not be decoded was skipped (``VideoClipDataset(on_error="skip")``)."""


@dataclass(frozen=True)
class VideoSample:
    path: str
    label: int


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        got = "a folder, not a file" if path.is_dir() else "file not found"
        raise FileNotFoundError(f"{what}: expected a file, got {str(path)!r} ({got})")
    return path


def _read_json(path: Path) -> object:
    """The JSON in ``path``; a file that is not JSON raises ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: expected JSON, got {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err


def _preview(names: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:count])
    return shown + (", ..." if len(names) > count else "")


def read_class_index(classes_file: PathLike) -> list[str]:
    """UCF101 ``classInd.txt``: lines ``"<1-based id> <name>"`` -> names ordered by id."""
    path = _require_file(Path(classes_file), "classes_file")
    by_id: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}:{lineno}: expected '<id> <class name>', got {line!r}")
        by_id[int(parts[0])] = parts[1]
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise ValueError(f"{path}: expected class ids 1..{len(by_id)}, got {sorted(by_id)}")
    return [by_id[i] for i in range(1, len(by_id) + 1)]


def _with_any_extension(path: Path, extensions: Sequence[str]) -> Optional[Path]:
    """``path`` if it exists, else the same stem with another video extension (e.g. .avi->.mp4)."""
    if path.is_file():
        return path
    for ext in extensions:
        candidate = path.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def folder_samples(
    root: PathLike,
    split_file: Optional[PathLike] = None,
    classes_file: Optional[PathLike] = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> tuple[list[VideoSample], list[str]]:
    """Samples of a ``root/<class>/<clip>.<ext>`` tree; returns ``(samples, class_names)``.

    Classes: the names in ``classes_file`` (UCF101 ``classInd.txt``, ids are 1-based), else the
    sorted sub-folder names of ``root``. Without ``split_file`` every clip with one of
    ``extensions`` is a sample. With it, only the listed clips, one per line as
    ``"<class>/<clip>.<ext>"`` optionally followed by a 1-based label (UCF101 train/test lists);
    the label, when present, must agree with the class folder. A listed clip that is missing is
    also looked for under the other ``extensions`` (videos often get re-encoded, .avi -> .mp4).
    """
    root = Path(root)
    if not root.is_dir():
        got = "a file, not a folder" if root.exists() else "no such folder"
        raise FileNotFoundError(
            f"root: expected a video folder of class folders, got {str(root)!r} ({got})"
        )
    extensions = tuple(e.lower() for e in extensions)
    if classes_file is not None:
        classes = read_class_index(classes_file)
    else:
        classes = sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    if not classes:
        videos = [p.name for p in root.iterdir() if p.suffix.lower() in extensions]
        got = f"only videos ({_preview(videos, 2)}): no class folders" if videos else "none"
        raise ValueError(f"root: expected one sub-folder per class in {root}, got {got}")
    class_to_idx = {c: i for i, c in enumerate(classes)}

    samples: list[VideoSample] = []
    if split_file is None:
        for c in classes:
            folder = root / c
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"root: expected a folder for each class of {classes_file}, got no folder "
                    f"{c!r} in {root}"
                )
            for clip in sorted(folder.iterdir()):
                if clip.is_file() and clip.suffix.lower() in extensions:
                    samples.append(VideoSample(str(clip), class_to_idx[c]))
        if not samples:
            # A root one level too high (K400's train/ and val/, a download's top folder) has
            # class folders of folders: say so, it is the usual cause.
            nested = [c for c in classes if any(p.is_dir() for p in (root / c).iterdir())]
            got = f"none, but {_preview(nested, 2)} hold folders: is root one level too high?"
            raise ValueError(
                f"root: expected video files {extensions} in {root}/<class>/, "
                f"got {got if nested else 'none'}"
            )
        return samples, classes

    split_path = _require_file(Path(split_file), "split_file")
    for lineno, line in enumerate(split_path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{split_path}:{lineno}"
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
            raise ValueError(
                f"{where}: expected '<class>/<clip>' or '<class>/<clip> <label>', got {line!r}"
            )
        rel = Path(parts[0].replace("\\", "/"))
        if len(rel.parts) != 2:
            raise ValueError(f"{where}: expected '<class>/<clip>', got {parts[0]!r}")
        class_name = rel.parts[0]
        if class_name not in class_to_idx:
            raise ValueError(
                f"{where}: class {class_name!r} unknown: expected one of the {len(classes)} "
                f"classes ({_preview(classes)}), got {class_name!r}"
            )
        label = class_to_idx[class_name]
        if len(parts) == 2 and int(parts[1]) - 1 != label:
            raise ValueError(
                f"{where}: label expected {label + 1} (1-based index of {class_name!r}), "
                f"got {parts[1]}; pass the matching classes_file"
            )
        path = _with_any_extension(root / rel, extensions)
        if path is None:
            raise FileNotFoundError(
                f"{where}: video not found: expected {root / rel} (or another of "
                f"{extensions}), got no such file"
            )
        samples.append(VideoSample(str(path), label))
    if not samples:
        raise ValueError(f"split_file: expected at least one clip, got an empty {split_path}")
    return samples, classes


def _strip_template(template: str) -> str:
    # "Pushing [something] from left to right" -> "Pushing something from left to right"
    return template.replace("[", "").replace("]", "")


def ssv2_samples(
    video_dir: PathLike,
    split_json: PathLike,
    labels_json: PathLike,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> tuple[list[VideoSample], list[str]]:
    """Something-Something v2 samples; returns ``(samples, class_names)``.

    ``split_json``: a list of ``{"id": "78687", "template": "Pushing [something] from ...", ...}``
    (train.json / validation.json). ``labels_json``: ``{"Pushing something from ...": "93"}``,
    the template without brackets -> label id. Videos are ``<video_dir>/<id>.webm`` (or any of
    ``extensions``). Class names are ordered by label id.
    """
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        got = "a file, not a folder" if video_dir.exists() else "no such folder"
        raise FileNotFoundError(
            f"video_dir: expected a folder of <id>.webm videos, got {str(video_dir)!r} ({got})"
        )
    labels_path = _require_file(Path(labels_json), "labels_json")
    split_path = _require_file(Path(split_json), "split_json")
    labels = _read_json(labels_path)
    if not isinstance(labels, dict) or not labels:
        got = f"an empty {type(labels).__name__}" if not labels else type(labels).__name__
        raise ValueError(f"{labels_path}: expected a non-empty {{template: id}} object, got {got}")
    try:
        name_to_id = {name: int(i) for name, i in labels.items()}
    except (TypeError, ValueError):
        raise ValueError(
            f"{labels_path}: expected {{template: id}} with integer ids, got "
            f"{_preview([str(i) for i in labels.values()], 3)}"
        ) from None
    if sorted(name_to_id.values()) != list(range(len(name_to_id))):
        ids = sorted(name_to_id.values())
        raise ValueError(
            f"{labels_path}: expected label ids 0..{len(name_to_id) - 1}, got "
            f"{ids[0]}..{ids[-1]} with gaps or repeats"
        )
    classes = sorted(name_to_id, key=name_to_id.__getitem__)

    entries = _read_json(split_path)
    if not isinstance(entries, list):
        raise ValueError(
            f"{split_path}: expected a list of {{'id', 'template'}} objects, got a "
            f"{type(entries).__name__} (is it the labels json?)"
        )
    # One directory listing instead of a stat per entry and extension (SSv2 has 220k videos).
    extensions = tuple(e.lower() for e in extensions)
    files: dict[str, str] = {}
    with os.scandir(video_dir) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in extensions:
                files.setdefault(stem, entry.name)
    samples = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or "template" not in entry:
            raise ValueError(
                f"{split_path}: entry {k}: expected 'id' and 'template', got {entry!r}"
            )
        vid, name = str(entry["id"]), _strip_template(entry["template"])
        if name not in name_to_id:
            raise ValueError(
                f"{split_path}: video {vid}: template {name!r} unknown: expected one of the "
                f"{len(name_to_id)} templates of {labels_path}, got {name!r}"
            )
        if vid not in files:
            raise FileNotFoundError(
                f"video_dir: expected video {vid} of {split_path.name} in {video_dir}, got no "
                f"{vid}{{{','.join(extensions)}}} there"
            )
        samples.append(VideoSample(str(video_dir / files[vid]), name_to_id[name]))
    return samples, classes


# Something-Something v2 classes whose label swaps under a horizontal flip. Every other SSv2 class
# is direction-free ("Moving something up" is vertical, "Pushing something so that it slightly
# moves" has no side), so flipping them keeps the label.
SSV2_FLIP_PAIRS: tuple[tuple[str, str], ...] = (
    ("Pulling something from left to right", "Pulling something from right to left"),
    ("Pushing something from left to right", "Pushing something from right to left"),
    (
        "Turning the camera left while filming something",
        "Turning the camera right while filming something",
    ),
)


def flip_label_map(class_names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> dict[int, int]:
    """Label remapping for horizontal flips: both directions of every pair in ``class_names``.

    Pairs whose classes are absent (a subset of the classes) are skipped; a pair with only one
    side present raises, since that flip would produce a clip with no valid label.
    """
    index = {name: i for i, name in enumerate(class_names)}
    mapping: dict[int, int] = {}
    for a, b in pairs:
        if a in index and b in index:
            mapping[index[a]] = index[b]
            mapping[index[b]] = index[a]
        elif a in index or b in index:
            missing = b if a in index else a
            raise ValueError(f"pairs: class {missing!r} (flip partner) missing from class_names")
    return mapping


def _item_seed(seed: int, epoch: int, index: int) -> int:
    # A hash of the triple, so nearby (epoch, index) pairs get unrelated streams.
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class VideoClipDataset(Dataset):
    """Decoded, sampled and transformed clips of a list of videos.

    ``__getitem__(i) -> (clip, label)``: ``clip`` is float32 ``(T, 3, S, S)`` with one view, or
    ``(V, T, 3, S, S)`` with ``V = num_clips * num_crops > 1`` (eval only), clip-major: view
    ``c * num_crops + k`` is temporal clip ``c``, spatial crop ``k``. ``T = num_frames``,
    ``S = crop_size``.

    ``sampling="segment"`` (TSN/SSv2) or ``"dense"`` (K400; ``frame_stride`` apart). Training
    applies a random crop and, with ``flip=True``, a random horizontal flip. A flip changes the
    meaning of direction-aware classes ("from left to right"): pass ``flip_label_map`` (see
    ``flip_label_map()`` / ``SSV2_FLIP_PAIRS``) to swap their labels, or use ``flip`` without a
    map only when every class is direction-free (UCF101, HMDB51, Kinetics).

    Randomness comes from a ``torch.Generator`` seeded from ``(seed, epoch, index)``: item ``i``
    is the same in every DataLoader worker and DDP rank, and runs are reproducible. Call
    ``set_epoch(epoch)`` before each epoch, before iterating the DataLoader (the epoch lives in
    shared memory, so persistent workers see it).

    ``mean`` and ``std`` normalise the RGB values in [0, 1]: use the backbone's own (a timm
    model's ``pretrained_cfg["mean"]``/``["std"]``); ImageNet's by default.

    Bad files. Frames are indexed in decoding order, so variable-frame-rate clips sample like
    constant-rate ones; clips shorter than ``num_frames`` repeat frames; odd frame sizes are
    resized like any other. A truncated file whose header promises more frames than it holds is
    sampled again from the frames it has (the same random draws, so the item is still
    reproducible). A file that yields no frame at all (zero bytes, not a video, cut before its
    index or first frame) raises :class:`VideoDecodeError` naming it with ``on_error="raise"``;
    with ``on_error="skip"`` (the default) ``__getitem__`` instead warns once per file and
    process (:class:`BadVideoWarning`, naming the file and the cause) and returns ``None``,
    which ``collate_skipping_bad`` drops from the batch and counts (the default collate
    function cannot batch it). A missing file is a wrong path, not a bad video: it always
    raises ``FileNotFoundError``.
    """

    def __init__(
        self,
        samples: Sequence[VideoSample],
        num_frames: int,
        train: bool,
        sampling: str = "segment",
        frame_stride: int = 4,
        crop_size: int = 224,
        short_side: int = 256,
        flip: bool = False,
        flip_label_map: Optional[dict[int, int]] = None,
        num_clips: int = 1,
        num_crops: int = 1,
        seed: int = 0,
        classes: Optional[Sequence[str]] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_error: str = "skip",
    ) -> None:
        if sampling not in ("segment", "dense"):
            raise ValueError(f"sampling: expected 'segment' or 'dense', got {sampling!r}")
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error: expected one of {ON_ERROR_CHOICES}, got {on_error!r}")
        counts = {
            "num_frames": num_frames,
            "frame_stride": frame_stride,
            "num_clips": num_clips,
            "num_crops": num_crops,
        }
        for name, value in counts.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if train and num_clips * num_crops > 1:
            raise ValueError(
                f"num_clips, num_crops: expected 1 view in training, got {num_clips} x {num_crops}"
            )
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self.samples = list(samples)
        self.num_frames = num_frames
        self.train = train
        self.sampling = sampling
        self.frame_stride = frame_stride
        self.flip_label_map = dict(flip_label_map or {})
        self.num_clips = num_clips
        self.num_crops = num_crops
        self.seed = seed
        # In shared memory so that set_epoch reaches persistent DataLoader workers too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.classes = list(classes) if classes is not None else None
        self.transform = ClipTransform(
            crop_size, short_side, train=train, flip=flip, mean=mean, std=std
        )
        self.on_error = on_error
        self._num_video_frames: dict[str, int] = {}  # per-process cache: headers are re-read
        self._warned: set[str] = set()  # files already reported as skipped by this process

    @classmethod
    def from_folder(
        cls,
        root: PathLike,
        split_file: Optional[PathLike] = None,
        classes_file: Optional[PathLike] = None,
        **kwargs,
    ) -> VideoClipDataset:
        """``folder_samples(root, split_file, classes_file)`` + ``VideoClipDataset(**kwargs)``."""
        samples, classes = folder_samples(root, split_file, classes_file)
        return cls(samples, classes=classes, **kwargs)

    @classmethod
    def from_ssv2(
        cls, video_dir: PathLike, split_json: PathLike, labels_json: PathLike, **kwargs
    ) -> VideoClipDataset:
        """``ssv2_samples(...)`` + ``VideoClipDataset(**kwargs)``."""
        samples, classes = ssv2_samples(video_dir, split_json, labels_json)
        return cls(samples, classes=classes, **kwargs)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation; reaches workers, persistent ones included."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.samples)

    def _frame_count(self, path: str) -> int:
        if path not in self._num_video_frames:
            self._num_video_frames[path] = video_info(path).num_frames
        return self._num_video_frames[path]

    def _clip_indices(self, n: int, clip_index: int, generator: torch.Generator) -> list[int]:
        if self.sampling == "segment":
            return segment_indices(
                n, self.num_frames, self.train, generator, clip_index, self.num_clips
            )
        return dense_indices(
            n, self.num_frames, self.frame_stride, self.train, generator, clip_index, self.num_clips
        )

    def __getitem__(self, index: int) -> Optional[tuple[Tensor, int]]:
        """``(clip, label)``, or ``None`` for a file that cannot be decoded when
        ``on_error="skip"`` (see the class docstring)."""
        sample = self.samples[index]
        try:
            n = self._frame_count(sample.path)
            try:
                return self._load(sample, index, n)
            except VideoTooShortError as e:
                if e.num_frames >= n:  # not a header that over-promised: a real error
                    raise
                # The header promised more frames than the file holds (a truncated file): the
                # clip is sampled again from the frames that are there.
                self._num_video_frames[sample.path] = e.num_frames
                return self._load(sample, index, e.num_frames, e.cause)
        except VideoDecodeError as e:
            if self.on_error == "raise":
                raise
            if sample.path not in self._warned:
                self._warned.add(sample.path)
                reason = e.reason or str(e)
                warnings.warn(
                    f"skipping unreadable video {sample.path}: {reason}",
                    BadVideoWarning,
                    stacklevel=2,
                )
            return None

    def _load(
        self, sample: VideoSample, index: int, n: int, cause: Optional[str] = None
    ) -> tuple[Tensor, int]:
        """Item ``index`` of a video with ``n`` frames; ``cause`` explains a short count."""
        if n < 1:
            detail = f" ({cause})" if cause else ""
            raise VideoDecodeError(sample.path, f"no decodable video frame{detail}")
        # Seeded here, not in __getitem__, so a second attempt makes the same random draws.
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        clips = [self._clip_indices(n, c, generator) for c in range(self.num_clips)]
        # One decode pass for all clips of the video.
        frames = read_frames(sample.path, [i for clip in clips for i in clip])
        frames = frames.view(self.num_clips, self.num_frames, *frames.shape[1:])
        views, label = [], sample.label
        for c in range(self.num_clips):
            for k in range(self.num_crops):
                view, flipped = self.transform(frames[c], generator, k, self.num_crops)
                if flipped:
                    label = self.flip_label_map.get(sample.label, sample.label)
                views.append(view)
        clip = views[0] if len(views) == 1 else torch.stack(views)
        return clip, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={len(self)}, num_frames={self.num_frames}, "
            f"train={self.train}, sampling={self.sampling!r}, views={self.num_clips}x"
            f"{self.num_crops}, on_error={self.on_error!r}, transform={self.transform})"
        )


def collate_skipping_bad(
    batch: Sequence[Optional[tuple[Tensor, int]]],
) -> tuple[Optional[Tensor], Optional[Tensor], int]:
    """DataLoader ``collate_fn`` for ``VideoClipDataset``: drops the ``None`` of skipped files.

    Returns ``(clips, labels, num_skipped)``: ``clips`` ``(B', ...)`` and int64 ``labels``
    ``(B',)`` of the ``B'`` good items, stacked as by the default collate function, or
    ``(None, None, len(batch))`` when no item of the batch could be decoded.
    """
    good = [item for item in batch if item is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    clips, labels = default_collate(good)
    return clips, labels, skipped
