"""Bad video files: each is decoded correctly or skipped with a warning naming it, counted in
the epoch's metrics, and never stops training or evaluation unless asked to fail fast.

The files are made from real footage (the carphone clip): cut, emptied, replaced by text,
shortened, re-timed to a variable frame rate and re-encoded at odd sizes with PyAV.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import pytest

pytest.importorskip("av")

import av
import torch
from torch import nn
from torch.utils.data import DataLoader

from pks4_layers.data import (
    BadVideoWarning,
    VideoClipDataset,
    VideoDecodeError,
    VideoSample,
    VideoTooShortError,
    collate_skipping_bad,
    read_frames,
    real_clip_path,
    video_info,
    write_video,
)
from pks4_layers.train import TrainConfig

T = 4  # frames per clip in every dataset here
SOURCE_FRAMES = 12  # frames of the files that are cut or re-timed


def _codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _encode(
    path: Path,
    frames: torch.Tensor,
    codec: str,
    pix_fmt: str = "yuv420p",
    pts_ms: Optional[list[int]] = None,
    container_options: Optional[dict[str, str]] = None,
) -> Path:
    """uint8 ``(N, H, W, 3)`` frames to ``path`` with PyAV; ``pts_ms`` gives each frame its own
    timestamp in milliseconds (a variable frame rate)."""
    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "fast", "threads": "1"}
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i, array in enumerate(frames.numpy()):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    decoded: bool  # True: decoded correctly; False: skipped with a warning


@pytest.fixture(scope="module")
def source() -> torch.Tensor:
    """uint8 ``(12, 144, 176, 3)``: every 8th frame of the carphone clip, so that consecutive
    frames differ clearly."""
    return read_frames(real_clip_path("carphone_pristine"), range(0, 8 * SOURCE_FRAMES, 8))


def _small(source: torch.Tensor) -> torch.Tensor:
    return source[:, 40:104, 56:120].contiguous()  # (12, 64, 64, 3)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, source) -> dict[str, Case]:
    """The bad files, one per case, and whether each must decode or be skipped."""
    root = tmp_path_factory.mktemp("bad_videos")
    work = root / "work"
    work.mkdir()
    small = _small(source)
    out: dict[str, Case] = {}

    def add(name: str, make: Callable[[Path], Path], decoded: bool, suffix: str = ".mp4"):
        out[name] = Case(name, make(root / f"{name}{suffix}"), decoded)

    # Truncated, index at the front (MP4 "faststart"): the header promises 12 frames, the file
    # holds the first few; they are the clip.
    faststart = _encode(
        work / "fs.mp4", small, _codec(), container_options={"movflags": "+faststart"}
    )
    add("truncated_faststart", lambda p: _cut(faststart, p, 0.7), decoded=True)
    # Truncated Matroska: no frame count in the header; counting stops at the cut.
    mkv = work / "whole.mkv"
    write_video(mkv, small)
    add("truncated_mkv", lambda p: _cut(mkv, p, 0.7), decoded=True, suffix=".mkv")
    # Truncated, index at the end (plain MP4): the index is lost, nothing can be read.
    plain = work / "plain.mp4"
    write_video(plain, small)
    add("truncated_no_index", lambda p: _cut(plain, p, 0.7), decoded=False)
    add("zero_bytes", lambda p: (p.write_bytes(b""), p)[1], decoded=False)
    add(
        "not_a_video",
        lambda p: (p.write_text("class,clip\nApply,v_Apply_g01\n" * 40), p)[1],
        decoded=False,
    )
    add("short", lambda p: (write_video(p, small[:2]), p)[1], decoded=True)  # 2 < T frames
    # Variable frame rate: 10, 40 and 90 ms between frames.
    steps = [10, 40, 90, 40, 10, 90, 10, 40, 90, 10, 40]
    pts = [sum(steps[:i]) for i in range(SOURCE_FRAMES)]
    add("vfr", lambda p: _encode(p, small, _codec(), pts_ms=pts), decoded=True, suffix=".mkv")
    # Odd size 175 x 143: yuv420p cannot hold it in H.264, yuv444p can.
    odd = source[:, :143, :175].contiguous()
    if _codec() == "libx264":
        add("odd_size", lambda p: _encode(p, odd, "libx264", "yuv444p"), decoded=True)
    else:
        add("odd_size", lambda p: _encode(p, odd, "mpeg4"), decoded=True, suffix=".avi")
    return out


SKIPPED = ("truncated_no_index", "zero_bytes", "not_a_video")
DECODED = ("truncated_faststart", "truncated_mkv", "short", "vfr", "odd_size")


# ------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("name", SKIPPED)
def test_unreadable_files_raise_the_typed_error_naming_the_file(cases, name):
    case = cases[name]
    assert not case.decoded
    for read in (lambda: video_info(case.path), lambda: read_frames(case.path, [0])):
        with pytest.raises(VideoDecodeError, match=re.escape(str(case.path))) as info:
            read()
        assert isinstance(info.value, ValueError)  # what callers caught before
        assert info.value.path == str(case.path) and "cannot open as a video" in info.value.reason
        assert not isinstance(info.value.__cause__, VideoDecodeError)  # PyAV's error, chained


def test_truncated_file_decodes_the_frames_that_are_there(cases, source):
    small = _small(source).float()
    case = cases["truncated_faststart"]
    assert video_info(case.path).num_frames == SOURCE_FRAMES  # the header over-promises
    with pytest.raises(VideoTooShortError, match=re.escape(str(case.path))) as info:
        read_frames(case.path, [SOURCE_FRAMES - 1])
    n = info.value.num_frames
    assert 0 < n < SOURCE_FRAMES and "unreadable packet" in str(info.value)
    frames = read_frames(case.path, range(n))
    assert (frames.float() - small[:n]).abs().mean() < 6
    # Matroska stores no count: counting stops at the cut, and those frames decode.
    case = cases["truncated_mkv"]
    n = video_info(case.path).num_frames
    assert 0 < n < SOURCE_FRAMES
    assert (read_frames(case.path, range(n)).float() - small[:n]).abs().mean() < 6


def test_variable_frame_rate_indexes_frames_by_order_not_time(cases, source):
    path = cases["vfr"].path
    with av.open(str(path)) as container:
        pts = [frame.pts for frame in container.decode(video=0)]
    gaps = {b - a for a, b in zip(pts, pts[1:])}
    assert len(gaps) == 3, f"expected a variable frame rate, got timestamps {pts}"
    frames = read_frames(path, range(SOURCE_FRAMES)).float()
    assert video_info(path).num_frames == SOURCE_FRAMES
    # Frame i is source frame i: the closest of all 12, whatever the gap before it.
    small = _small(source).float()
    dist = (frames[:, None] - small[None]).abs().mean(dim=(2, 3, 4))  # (12, 12)
    assert torch.equal(dist.argmin(dim=1), torch.arange(SOURCE_FRAMES))
    assert dist.diagonal().max() < 6


def test_odd_size_decodes_at_its_size(cases, source):
    path = cases["odd_size"].path
    info = video_info(path)
    assert (info.width, info.height) == (175, 143)
    frames = read_frames(path, [0, 5])
    assert frames.shape == (2, 143, 175, 3)
    assert (frames.float() - source[[0, 5], :143, :175].float()).abs().mean() < 8


def test_decode_error_survives_pickling_and_rebuilding_from_its_message(tmp_path):
    err = VideoTooShortError(tmp_path / "a.mp4", "frame index expected < 2", 2, "cut")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.path, back.num_frames, back.cause) == (
        VideoTooShortError,
        str(err),
        err.path,
        2,
        "cut",
    )
    # How a DataLoader worker re-raises it in the main process: from the message alone.
    assert str(VideoDecodeError("worker says: x.mp4: cannot open")) == (
        "worker says: x.mp4: cannot open"
    )


# -------------------------------------------------------------------------------- dataset
def _dataset(paths: list[Path], train: bool, **kwargs) -> VideoClipDataset:
    samples = [VideoSample(str(p), k % 2) for k, p in enumerate(paths)]
    views = {} if train else {"num_clips": 2, "num_crops": 3}
    return VideoClipDataset(
        samples, num_frames=T, train=train, crop_size=32, short_side=40, **views, **kwargs
    )


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_6_views"])
@pytest.mark.parametrize("name", SKIPPED + DECODED)
def test_dataset_item_is_decoded_or_skipped_with_a_warning(cases, name, train):
    case = cases[name]
    ds = _dataset([case.path], train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item = ds[0]
        again = ds[0]
    bad = [w for w in caught if issubclass(w.category, BadVideoWarning)]
    if case.decoded:
        assert not bad
        clip, label = item
        shape = (T, 3, 32, 32) if train else (6, T, 3, 32, 32)
        assert clip.shape == shape and label == 0 and torch.isfinite(clip).all()
        assert torch.equal(clip, again[0])  # reproducible, header corrected or not
        return
    assert item is None and again is None
    assert len(bad) == 1, "one warning per file and process"
    message = str(bad[0].message)
    assert str(case.path) in message and "cannot open as a video" in message
    with pytest.raises(VideoDecodeError, match=re.escape(str(case.path))):
        _dataset([case.path], train, on_error="raise")[0]


def test_short_clip_repeats_frames(cases):
    ds = _dataset([cases["short"].path], train=False)
    clip = ds[0][0][0]  # first view (T, 3, S, S) of a 2-frame video: frames 0, 0, 1, 1
    assert torch.equal(clip[0], clip[1]) and torch.equal(clip[2], clip[3])
    assert not torch.equal(clip[1], clip[2])


def test_truncated_clip_is_sampled_from_the_frames_it_has(cases):
    path = cases["truncated_faststart"].path
    ds = _dataset([path], train=False)
    clip, _ = ds[0]
    n = ds._num_video_frames[str(path)]  # corrected from the header's 12
    assert 0 < n < SOURCE_FRAMES
    # The same item from a dataset told the true count up front.
    fresh = _dataset([path], train=False)
    fresh._num_video_frames[str(path)] = n
    assert torch.equal(fresh[0][0], clip)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_6_views"])
def test_loader_drops_bad_items_and_counts_them(cases, train):
    paths = [c.path for c in cases.values()]
    ds = _dataset(paths, train)
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_skipping_bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):  # two epochs: still one warning per file
            ds.set_epoch(epoch)
            batches = list(loader)
            assert sum(b[2] for b in batches) == len(SKIPPED)
            clips = torch.cat([b[0] for b in batches if b[0] is not None])
            labels = torch.cat([b[1] for b in batches if b[1] is not None])
            assert clips.shape[0] == labels.shape[0] == len(DECODED)
            assert clips.shape[1:] == ((T, 3, 32, 32) if train else (6, T, 3, 32, 32))
    messages = [str(w.message) for w in caught if issubclass(w.category, BadVideoWarning)]
    assert len(messages) == len(SKIPPED)
    for name in SKIPPED:
        assert sum(str(cases[name].path) in m for m in messages) == 1, name


def test_loader_workers_skip_and_fail_fast_with_the_typed_error(cases):
    paths = [cases[n].path for n in ("short", "zero_bytes", "vfr")]
    # Spawned, not forked: a worker forked from a process whose decoder and thread pools have
    # run can wait forever on a lock held at the fork.
    spawn = {"num_workers": 1, "multiprocessing_context": "spawn"}
    loader = DataLoader(
        _dataset(paths, True), batch_size=3, collate_fn=collate_skipping_bad, **spawn
    )
    ((clips, labels, skipped),) = list(loader)
    assert clips.shape == (2, T, 3, 32, 32) and labels.tolist() == [0, 0] and skipped == 1
    loader = DataLoader(
        _dataset(paths, True, on_error="raise"),
        batch_size=3,
        collate_fn=collate_skipping_bad,
        **spawn,
    )
    with pytest.raises(VideoDecodeError, match=re.escape(str(cases["zero_bytes"].path))):
        list(loader)


def test_collate_of_an_all_bad_batch_and_argument_errors():
    assert collate_skipping_bad([None, None]) == (None, None, 2)
    clips, labels, skipped = collate_skipping_bad([(torch.zeros(2, 3), 1), None])
    assert clips.shape == (1, 2, 3) and labels.tolist() == [1] and skipped == 1
    with pytest.raises(ValueError, match="on_error"):
        VideoClipDataset([], num_frames=T, train=True, on_error="ignore")
    with pytest.raises(ValueError, match="on_bad_video"):
        TrainConfig(on_bad_video="ignore").validate()


# ----------------------------------------------------------------------------- train loop
class _TinyVideoNet(nn.Module):
    """(B, T, 3, S, S) -> (B, 3) logits: a time-averaged linear map, with batch norm (its
    buffers make DDP broadcast in every forward)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3 * size * size)
        self.head = nn.Linear(3 * size * size, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x.mean(1).flatten(1)))


def _loop_parts(model: nn.Module, size: int):
    from pks4_layers.train.distributed import DistEnv

    cfg = TrainConfig(num_frames=2, crop_size=size, short_side=size, epochs=1, progress=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return cfg, optimizer, scheduler, DistEnv


def _batch(seed: int, n: int, size: int, skipped: int = 0):
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(n, 2, 3, size, size, generator=g)
    return clips, torch.randint(0, 3, (n,), generator=g), skipped


def test_train_and_eval_steps_whose_clips_were_all_bad_are_skipped():
    from pks4_layers.train import evaluate
    from pks4_layers.train.engine import train_one_epoch

    torch.manual_seed(0)
    model = _TinyVideoNet(4)
    cfg, optimizer, scheduler, DistEnv = _loop_parts(model, 4)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    loader = [(None, None, 3)]
    out = train_one_epoch(model, loader, optimizer, scheduler, None, cfg, env, None, 0)
    assert out == {"train_loss": 0.0, "train_top1": 0.0, "train_skipped": 3}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update
    assert scheduler.last_epoch == 0
    loader = [(None, None, 2), _batch(1, 4, 4, skipped=1)]
    out = train_one_epoch(model, loader, optimizer, scheduler, None, cfg, env, None, 0)
    assert out["train_skipped"] == 3 and out["train_loss"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out = evaluate(model, [(None, None, 4), _batch(2, 4, 4, skipped=2)], cfg, env, None)
    assert out["val_skipped"] == 6 and out["val_loss"] > 0


def _ddp_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: rank 1's first batch lost every clip."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pks4_layers.train.engine import train_one_epoch

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),  # a rank left waiting fails the test instead of hanging
    )
    try:
        torch.manual_seed(0)
        base = _TinyVideoNet(4)
        model = DistributedDataParallel(base)
        cfg, optimizer, scheduler, DistEnv = _loop_parts(model, 4)
        env = DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        if rank == 0:
            loader = [_batch(10, 2, 4), _batch(11, 2, 4, skipped=1)]
        else:
            loader = [(None, None, 2), _batch(12, 2, 4)]
        out = train_one_epoch(model, loader, optimizer, scheduler, None, cfg, env, None, 0)
        torch.save({"state": base.state_dict(), "out": out}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_rank_with_an_all_bad_batch_still_takes_the_step(tmp_path):
    """Two gloo processes; rank 1 has no clip in its first step. Both finish (no rank waits
    on a missing all-reduce) with identical parameters, and the counts are summed. (Batch-norm
    running statistics are per rank under DDP, re-broadcast from rank 0 at each forward.)"""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["out"]["train_skipped"] == r1["out"]["train_skipped"] == 3
    for key in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
        assert torch.equal(r0["state"][key], r1["state"][key]), f"ranks differ on {key}"
    assert r0["out"]["train_loss"] == pytest.approx(r1["out"]["train_loss"])


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def folder_root(tmp_path_factory, cases, source) -> Path:
    """``root/<class>/<clip>``: 8 good clips (4 frames of 64 x 64) in two classes, and the 8
    bad files shared between the classes."""
    pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("folder")
    small = _small(source)
    for k in range(8):
        cls = "left" if k < 4 else "right"
        frames = small[k : k + 4] if cls == "left" else small[k : k + 4].flip(2)
        write_video(root / cls / f"good_{k}.mp4", frames.contiguous())
    for k, case in enumerate(cases.values()):
        shutil.copy(case.path, root / ("left" if k % 2 else "right") / case.path.name)
    return root


def _run_config(root: Path, out: Path, on_bad_video: str) -> TrainConfig:
    return TrainConfig(
        dataset="folder",
        data_root=str(root),
        backbone="efficientnet_lite0",
        pretrained=False,
        freeze_backbone=True,
        epochs=1,
        batch_size=4,
        crop_size=64,
        short_side=64,
        num_frames=T,
        progress=False,
        output_dir=str(out),
        on_bad_video=on_bad_video,
        device="cpu",
    )


@pytest.mark.slow
def test_training_run_skips_bad_videos_and_reports_them(folder_root, tmp_path, capsys):
    from pks4_layers.train import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(_run_config(folder_root, tmp_path / "run", "skip"))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"][0]
    # 16 files, 4 per step, no tail to drop: every bad file is met once in each pass.
    assert record["train_skipped"] == record["val_skipped"] == len(SKIPPED)
    assert result.history[0]["train_skipped"] == len(SKIPPED)
    assert record["train_loss"] > 0 and 0 <= record["val_top1"] <= 100
    line = capsys.readouterr().out
    assert f"skipped bad videos: {len(SKIPPED)} train, {len(SKIPPED)} val" in line
    messages = [str(w.message) for w in caught if issubclass(w.category, BadVideoWarning)]
    for name in SKIPPED:
        assert any(re.search(rf"[/\\]{name}\.\w+: ", m) for m in messages), name


@pytest.mark.slow
def test_training_run_fails_fast_naming_the_file(folder_root, tmp_path):
    from pks4_layers.train import run

    with pytest.raises(VideoDecodeError) as info:
        run(_run_config(folder_root, tmp_path / "run", "raise"))
    assert Path(info.value.path).stem in SKIPPED
    assert info.value.path in str(info.value) and Path(info.value.path).parent.parent == folder_root
