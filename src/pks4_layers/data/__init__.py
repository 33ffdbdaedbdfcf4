"""Video data: PyAV decoding, frame sampling, clip transforms, datasets and a generated benchmark.

Needs the ``video`` extra (PyAV) to decode; importing this package does not.
"""

from .benchmark import TASKS as BENCHMARK_TASKS
from .benchmark import make_benchmark
from .datasets import (
    ON_ERROR_CHOICES,
    SSV2_FLIP_PAIRS,
    VIDEO_EXTENSIONS,
    BadVideoWarning,
    VideoClipDataset,
    VideoSample,
    collate_skipping_bad,
    flip_label_map,
    folder_samples,
    read_class_index,
    ssv2_samples,
)
from .decode import (
    VideoDecodeError,
    VideoInfo,
    VideoTooShortError,
    read_frames,
    video_info,
    write_video,
)
from .sampling import dense_indices, segment_indices
from .sources import REAL_CLIPS, real_clip_path, real_clips_dir
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ClipTransform, resize_short_side

__all__ = [
    "BENCHMARK_TASKS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ON_ERROR_CHOICES",
    "REAL_CLIPS",
    "SSV2_FLIP_PAIRS",
    "VIDEO_EXTENSIONS",
    "BadVideoWarning",
    "ClipTransform",
    "VideoClipDataset",
    "VideoDecodeError",
    "VideoInfo",
    "VideoSample",
    "VideoTooShortError",
    "collate_skipping_bad",
    "dense_indices",
    "flip_label_map",
    "folder_samples",
    "make_benchmark",
    "read_class_index",
    "read_frames",
    "real_clip_path",
    "real_clips_dir",
    "resize_short_side",
    "segment_indices",
    "ssv2_samples",
    "video_info",
    "write_video",
]
