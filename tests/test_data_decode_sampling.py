"""Decoding real clips, frame index sampling and clip transforms."""

from __future__ import annotations

import pytest

av = pytest.importorskip("av")

import torch  # noqa: E402

from data_helpers import real_frames, write_clip  # noqa: E402
from pks4_layers.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipTransform,
    dense_indices,
    read_frames,
    real_clip_path,
    segment_indices,
    video_info,
)


def _decode_all(path) -> torch.Tensor:
    with av.open(str(path)) as container:
        return torch.stack(
            [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
        )


# ---------------------------------------------------------------------------------------- decode


def test_video_info_matches_decoding():
    path = real_clip_path("carphone_pristine")
    info = video_info(path)
    frames = _decode_all(path)
    assert info.num_frames == frames.shape[0] == 120
    assert (info.height, info.width) == tuple(frames.shape[1:3]) == (144, 176)
    assert info.fps == pytest.approx(30000 / 1001)
    assert video_info(real_clip_path("bikes")).num_frames == 250


def test_video_info_counts_frames_when_the_container_does_not_say(tmp_path):
    path = write_clip(tmp_path / "clip.mkv", num_frames=7)
    with av.open(str(path)) as container:
        assert not container.streams.video[0].frames  # Matroska has no frame count
    info = video_info(path)
    assert (info.num_frames, info.height, info.width) == (7, 48, 64)


def test_read_frames_matches_sequential_decode_with_repeats_and_any_order():
    path = real_clip_path("carphone_pristine")
    reference = _decode_all(path)
    indices = [119, 3, 3, 0, 57, 2, 119]
    frames = read_frames(path, indices)
    assert frames.dtype == torch.uint8 and frames.shape == (7, 144, 176, 3)
    assert torch.equal(frames, reference[indices])
    assert torch.equal(read_frames(path, range(120)), reference)


def test_read_frames_large_clip():
    path = real_clip_path("bigbuckbunny")
    frames = read_frames(path, [131, 0])
    assert frames.shape == (2, 720, 1280, 3)
    assert not torch.equal(frames[0], frames[1])
    assert torch.equal(read_frames(path, [0]), frames[1:])


@pytest.mark.parametrize("bad", [120, 500, -1])
def test_read_frames_out_of_range_names_path_and_index(bad):
    path = real_clip_path("carphone_pristine")
    with pytest.raises(ValueError, match=rf"carphone_pristine\.mp4.*got {bad}"):
        read_frames(path, [0, bad])


def test_read_frames_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.mp4"):
        read_frames(tmp_path / "nope.mp4", [0])


def test_write_video_round_trip(tmp_path):
    frames = real_frames(5)
    path = write_clip(tmp_path / "a.mp4", num_frames=5)
    decoded = read_frames(path, range(5))
    assert decoded.shape == frames.shape
    # Lossy but close: crf 18 H.264.
    assert (decoded.float() - frames.float()).abs().mean() < 4
    with pytest.raises(ValueError, match="even"):
        from pks4_layers.data import write_video

        write_video(tmp_path / "odd.mp4", frames[:, :47])


# -------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("n", [1, 3, 8, 9, 100, 301])
@pytest.mark.parametrize("train", [True, False])
def test_segment_indices_properties(n, train):
    g = torch.Generator().manual_seed(n)
    idx = segment_indices(n, 8, train, g)
    assert len(idx) == 8
    assert all(0 <= i < n for i in idx)
    assert idx == sorted(idx)
    if n >= 8:  # one distinct frame per segment
        assert len(set(idx)) == 8
        seg = n / 8
        assert all(int(k * seg) <= i < int((k + 1) * seg) + 1 for k, i in enumerate(idx))


def test_segment_indices_eval_is_the_segment_centre_and_deterministic():
    assert segment_indices(80, 8, train=False) == [5 + 10 * k for k in range(8)]
    assert segment_indices(80, 8, False, torch.Generator().manual_seed(1)) == segment_indices(
        80, 8, False, torch.Generator().manual_seed(2)
    )
    # Two eval clips interleave inside each segment.
    a = segment_indices(80, 8, False, clip_index=0, num_clips=2)
    b = segment_indices(80, 8, False, clip_index=1, num_clips=2)
    assert a == [2 + 10 * k for k in range(8)] and b == [7 + 10 * k for k in range(8)]


def test_segment_indices_train_varies_with_the_generator():
    draws = {
        tuple(segment_indices(200, 8, True, torch.Generator().manual_seed(s))) for s in range(10)
    }
    assert len(draws) == 10
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert segment_indices(200, 8, True, g1) == segment_indices(200, 8, True, g2)


def test_segment_indices_short_video_repeats_frames():
    assert segment_indices(3, 8, train=False) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert segment_indices(1, 4, train=True) == [0, 0, 0, 0]


@pytest.mark.parametrize("n", [1, 10, 29, 30, 31, 300])
@pytest.mark.parametrize("train", [True, False])
def test_dense_indices_properties(n, train):
    idx = dense_indices(n, 8, 4, train, torch.Generator().manual_seed(n))
    assert len(idx) == 8 and all(0 <= i < n for i in idx) and idx == sorted(idx)
    if n >= 29:  # the window fits: exact stride
        assert all(b - a == 4 for a, b in zip(idx, idx[1:]))
    else:  # clamped at the end
        assert idx[0] == 0 and idx[-1] == n - 1


def test_dense_indices_eval_spreads_clips_and_centres_one():
    assert dense_indices(100, 4, 2, train=False) == [46, 48, 50, 52]
    starts = [dense_indices(100, 4, 2, False, clip_index=c, num_clips=3)[0] for c in range(3)]
    assert starts == [0, 46, 93]
    with pytest.raises(ValueError, match="clip_index"):
        dense_indices(100, 4, 2, False, clip_index=3, num_clips=3)


def test_dense_indices_train_varies_with_the_generator():
    starts = {
        dense_indices(300, 8, 4, True, torch.Generator().manual_seed(s))[0] for s in range(10)
    }
    assert len(starts) > 5 and max(starts) <= 300 - 29


# ------------------------------------------------------------------------------------ transforms


def _ramp_clip(T: int = 3, H: int = 60, W: int = 80) -> torch.Tensor:
    # Pixel value encodes its column (and frame), so crops and flips can be located exactly.
    x = torch.arange(W).view(1, 1, W, 1).expand(T, H, W, 3) + 10 * torch.arange(T).view(T, 1, 1, 1)
    return x.to(torch.uint8).contiguous()


def test_clip_transform_shape_dtype_and_normalisation():
    frames = torch.full((4, 50, 70, 3), 128, dtype=torch.uint8)
    clip, flipped = ClipTransform(crop_size=32, short_side=40, train=False)(frames)
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.float32 and not flipped
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(clip[0, :, 5, 5], expected)
    with pytest.raises(ValueError, match="frames"):
        ClipTransform(32, 40)(frames.float())
    with pytest.raises(ValueError, match="short_side"):
        ClipTransform(crop_size=64, short_side=32)


def test_clip_transform_three_crops_left_centre_right():
    t = ClipTransform(crop_size=40, short_side=60, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    frames = _ramp_clip(W=80)  # already short side 60: no resize
    crops = [t(frames, crop_index=k, num_crops=3)[0] for k in range(3)]
    first_column = [round(c[0, 0, 0, 0].item() * 255) for c in crops]
    assert first_column == [0, 20, 40]
    assert torch.equal(t(frames)[0], crops[1])  # single centre crop == middle of three
    # Portrait: crops go top/centre/bottom.
    portrait = frames.transpose(1, 2).contiguous()  # (T, 80, 60, 3), value = row
    tops = [
        round(t(portrait, crop_index=k, num_crops=3)[0][0, 0, 0, 0].item() * 255) for k in range(3)
    ]
    assert tops == [0, 20, 40]


def test_clip_transform_resizes_short_side():
    t = ClipTransform(crop_size=16, short_side=30, train=False)
    assert t.crop_origin(30, 45) == (7, 14)
    clip, _ = t(torch.randint(0, 255, (2, 60, 90, 3), dtype=torch.uint8))
    assert clip.shape == (2, 3, 16, 16)


def test_clip_transform_train_crop_and_flip_shared_by_all_frames():
    t = ClipTransform(
        crop_size=40, short_side=60, train=True, flip=True, mean=(0, 0, 0), std=(1, 1, 1)
    )
    frames = _ramp_clip(T=3, W=80)
    seen_flip, seen_origins = set(), set()
    for seed in range(20):
        clip, flipped = t(frames, torch.Generator().manual_seed(seed))
        v = (clip[:, 0, 0] * 255).round()  # (T, 40) row values
        # Same crop and flip in every frame: frames differ only by the per-frame offset 10 * t.
        assert torch.equal(v[1] - v[0], torch.full_like(v[0], 10))
        assert torch.equal(v[2] - v[0], torch.full_like(v[0], 20))
        step = v[0, 1] - v[0, 0]
        assert step == (-1 if flipped else 1)
        seen_flip.add(flipped)
        seen_origins.add(v[0].min().item())
        clip2, flipped2 = t(frames, torch.Generator().manual_seed(seed))
        assert torch.equal(clip, clip2) and flipped == flipped2
    assert seen_flip == {True, False} and len(seen_origins) > 5
