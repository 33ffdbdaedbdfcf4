"""Sample lists (UCF101-style folders, SSv2 json) and VideoClipDataset."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("av")

import torch

from data_helpers import write_clip
from pks4_layers.data import (
    SSV2_FLIP_PAIRS,
    VideoClipDataset,
    VideoSample,
    flip_label_map,
    folder_samples,
    ssv2_samples,
)


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory):
    """``root/videos/<class>/<clip>`` with 2 classes x 2 real clips, plus UCF101 split files."""
    root = tmp_path_factory.mktemp("ucf")
    videos = root / "videos"
    for name in ("Zoom/v_Zoom_g01_c01.mp4", "Zoom/v_Zoom_g02_c01.avi", "Apply/v_Apply_g01_c01.mp4"):
        write_clip(videos / name, num_frames=6)
    write_clip(videos / "Apply" / "v_Apply_g02_c01.mkv", num_frames=10)
    (videos / "Apply" / "notes.txt").write_text("not a video")
    (root / "classInd.txt").write_text("1 Zoom\n2 Apply\n")
    # UCF101 lists .avi; the re-encoded .mp4 is found instead.
    (root / "trainlist.txt").write_text(
        "Zoom/v_Zoom_g01_c01.avi 1\nApply/v_Apply_g02_c01.mkv 2\n\n"
    )
    (root / "testlist.txt").write_text("Apply/v_Apply_g01_c01.mp4\n")
    return root


def test_folder_samples_without_split(ucf_root):
    samples, classes = folder_samples(ucf_root / "videos")
    assert classes == ["Apply", "Zoom"]  # sorted folder names
    names = [(s.path.split("/")[-1], s.label) for s in samples]
    assert names == [
        ("v_Apply_g01_c01.mp4", 0),
        ("v_Apply_g02_c01.mkv", 0),
        ("v_Zoom_g01_c01.mp4", 1),
        ("v_Zoom_g02_c01.avi", 1),
    ]
    only_mp4, _ = folder_samples(ucf_root / "videos", extensions=(".mp4",))
    assert len(only_mp4) == 2


def test_folder_samples_with_split_and_class_index(ucf_root):
    train, classes = folder_samples(
        ucf_root / "videos", ucf_root / "trainlist.txt", ucf_root / "classInd.txt"
    )
    assert classes == ["Zoom", "Apply"]  # classInd order, not sorted
    assert [(s.path.split("/")[-1], s.label) for s in train] == [
        ("v_Zoom_g01_c01.mp4", 0),
        ("v_Apply_g02_c01.mkv", 1),
    ]
    test, _ = folder_samples(
        ucf_root / "videos", ucf_root / "testlist.txt", ucf_root / "classInd.txt"
    )
    assert test == [VideoSample(str(ucf_root / "videos/Apply/v_Apply_g01_c01.mp4"), 1)]


def test_folder_samples_errors(ucf_root, tmp_path):
    videos = ucf_root / "videos"
    with pytest.raises(FileNotFoundError, match="missing_root"):
        folder_samples(tmp_path / "missing_root")
    with pytest.raises(FileNotFoundError, match=r"split_file.*nolist\.txt"):
        folder_samples(videos, tmp_path / "nolist.txt")
    with pytest.raises(FileNotFoundError, match=r"classes_file.*noind\.txt"):
        folder_samples(videos, classes_file=tmp_path / "noind.txt")
    # Labels of trainlist refer to classInd order: without it they disagree with sorted folders.
    with pytest.raises(ValueError, match=r"trainlist.txt:1: label expected 2 .*got 1"):
        folder_samples(videos, ucf_root / "trainlist.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("Zoom/v_Zoom_g01_c01.mp4 1\nZoom/v_Zoom_g09_c01.avi 1\n")
    with pytest.raises(FileNotFoundError, match=r"bad.txt:2: video not found: .*g09"):
        folder_samples(videos, bad, ucf_root / "classInd.txt")
    bad.write_text("Unknown/clip.avi\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: class 'Unknown'"):
        folder_samples(videos, bad, ucf_root / "classInd.txt")
    bad_ind = tmp_path / "ind.txt"
    bad_ind.write_text("1 Zoom\n3 Apply\n")
    with pytest.raises(ValueError, match=r"class ids 1\.\.2"):
        folder_samples(videos, classes_file=bad_ind)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="video files"):
        folder_samples(empty)


@pytest.fixture(scope="module")
def ssv2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssv2")
    videos = root / "videos"
    # Any video extension is accepted (SSv2 ships .webm).
    write_clip(videos / "7.mp4", num_frames=5)
    write_clip(videos / "101.mkv", num_frames=5)
    write_clip(videos / "55.mp4", num_frames=5)
    labels = {
        "Pushing something from left to right": "2",
        "Pushing something from right to left": "0",
        "Putting number of something onto something": "1",
    }
    (root / "labels.json").write_text(json.dumps(labels))
    split = [
        {"id": "101", "label": "x", "template": "Pushing [something] from left to right"},
        {"id": "7", "template": "Putting [number of] [something] onto [something]"},
        {"id": "55", "template": "Pushing [something] from right to left", "placeholders": []},
    ]
    (root / "train.json").write_text(json.dumps(split))
    return root


def test_ssv2_samples(ssv2_root):
    samples, classes = ssv2_samples(
        ssv2_root / "videos", ssv2_root / "train.json", ssv2_root / "labels.json"
    )
    assert classes == [
        "Pushing something from right to left",
        "Putting number of something onto something",
        "Pushing something from left to right",
    ]
    assert [(s.path.split("/")[-1], s.label) for s in samples] == [
        ("101.mkv", 2),
        ("7.mp4", 1),
        ("55.mp4", 0),
    ]


def test_ssv2_errors(ssv2_root, tmp_path):
    videos, labels = ssv2_root / "videos", ssv2_root / "labels.json"
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps([{"id": "999", "template": "Pushing [something] from left to right"}])
    )
    with pytest.raises(FileNotFoundError, match="no 999"):
        ssv2_samples(videos, split, labels)
    split.write_text(json.dumps([{"id": "7", "template": "Dancing [something]"}]))
    with pytest.raises(ValueError, match="video 7: template 'Dancing something'"):
        ssv2_samples(videos, split, labels)
    split.write_text(json.dumps([{"id": "7"}]))
    with pytest.raises(ValueError, match="'template'"):
        ssv2_samples(videos, split, labels)
    with pytest.raises(FileNotFoundError, match=r"labels_json.*missing\.json"):
        ssv2_samples(videos, split, tmp_path / "missing.json")


def test_flip_label_map():
    names = [
        "Pushing something from right to left",
        "Holding something",
        "Pushing something from left to right",
    ]
    assert flip_label_map(names, SSV2_FLIP_PAIRS) == {0: 2, 2: 0}
    with pytest.raises(ValueError, match="flip partner"):
        flip_label_map(names[:2], SSV2_FLIP_PAIRS)
    # Every table entry is a pair of distinct left/right templates.
    for a, b in SSV2_FLIP_PAIRS:
        assert a != b and a.replace("left", "X").replace("right", "left").replace("X", "right") == b


# --------------------------------------------------------------------------------- the dataset


@pytest.mark.parametrize("sampling", ["segment", "dense"])
def test_dataset_train_item(ucf_root, sampling):
    kw = dict(num_frames=4, sampling=sampling, frame_stride=2, crop_size=32, short_side=40)
    root = ucf_root
    ds = VideoClipDataset.from_folder(
        root / "videos", root / "trainlist.txt", root / "classInd.txt", train=True, **kw
    )
    assert len(ds) == 2 and ds.classes == ["Zoom", "Apply"]
    clip, label = ds[1]
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.float32 and label == 1
    assert clip.isfinite().all() and clip.std() > 0.05
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 4, 3, 32, 32) and batch[1].tolist() == [0, 1]


def test_dataset_multi_view_eval_is_clip_major(ucf_root):
    path = str(ucf_root / "videos/Apply/v_Apply_g02_c01.mkv")  # 10 frames, 48x64
    kw = dict(
        num_frames=3, train=False, sampling="dense", frame_stride=2, crop_size=32, short_side=40
    )
    multi = VideoClipDataset([VideoSample(path, 0)], num_clips=2, num_crops=3, **kw)
    clip, _ = multi[0]
    assert clip.shape == (6, 3, 3, 32, 32)
    # View c * 3 + k is clip c, crop k: the centre crop of clip 1 is the single-crop clip 1.
    single = VideoClipDataset([VideoSample(path, 0)], num_clips=2, **kw)[0][0]
    assert single.shape == (2, 3, 3, 32, 32)
    assert torch.equal(clip[4], single[1]) and torch.equal(clip[1], single[0])
    for c in range(2):
        for k in range(3):
            assert not torch.equal(clip[c * 3 + k], clip[(1 - c) * 3 + k])  # different times
    assert not torch.equal(clip[0], clip[1]) and not torch.equal(clip[1], clip[2])
    with pytest.raises(ValueError, match="1 view in training"):
        VideoClipDataset([VideoSample(path, 0)], 3, train=True, num_crops=3)


def test_dataset_reproducible_per_seed_epoch_index(ucf_root):
    samples, _ = folder_samples(ucf_root / "videos")
    kw = dict(num_frames=3, train=True, crop_size=24, short_side=40, flip=True)
    a, b = VideoClipDataset(samples, seed=1, **kw), VideoClipDataset(samples, seed=1, **kw)
    assert torch.equal(a[2][0], b[2][0])
    first = a[2][0]
    a.set_epoch(1)
    assert not torch.equal(a[2][0], first)
    a.set_epoch(0)
    assert torch.equal(a[2][0], first)
    assert not torch.equal(VideoClipDataset(samples, seed=2, **kw)[2][0], first)
    # Workers get the same items as the main process.
    # Spawned, not forked: a worker forked after the decoder has run can wait forever on a lock.
    loader = torch.utils.data.DataLoader(
        a, batch_size=1, num_workers=2, persistent_workers=True, multiprocessing_context="spawn"
    )
    assert torch.equal(list(loader)[2][0][0], first)
    # set_epoch reaches the persistent workers.
    a.set_epoch(1)
    assert torch.equal(list(loader)[2][0][0], a[2][0])
    assert not torch.equal(a[2][0], first)


def test_dataset_flip_remaps_labels(ucf_root):
    path = str(ucf_root / "videos/Zoom/v_Zoom_g01_c01.mp4")
    samples = [VideoSample(path, 0)] * 24 + [VideoSample(path, 2)] * 8
    kw = dict(num_frames=2, train=True, crop_size=24, short_side=32)
    ds = VideoClipDataset(samples, flip=True, flip_label_map={0: 1, 1: 0}, **kw)
    ref = VideoClipDataset(samples, **kw)
    seen = set()
    for i in range(len(ds)):
        clip, label = ds[i]
        ref_clip, ref_label = ref[i]  # same seed: same crop, never flipped
        assert ref_label == samples[i].label
        flipped = not torch.equal(clip, ref_clip)
        if flipped:
            assert torch.equal(clip, ref_clip.flip(-1))
        expected = (
            {0: 1, 1: 0}.get(samples[i].label, samples[i].label) if flipped else samples[i].label
        )
        assert label == expected
        seen.add((samples[i].label, label))
    assert seen == {(0, 0), (0, 1), (2, 2)}


def test_dataset_argument_errors():
    s = [VideoSample("x.mp4", 0)]
    with pytest.raises(ValueError, match="sampling"):
        VideoClipDataset(s, 8, True, sampling="random")
    with pytest.raises(ValueError, match="num_frames"):
        VideoClipDataset(s, 0, True)
