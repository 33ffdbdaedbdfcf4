"""The shipped recipes in configs/: each parses, and a smoke run of each (a randomly
initialised CLIP ViT-B/16, a few generated real-footage videos in the config's own dataset
layout) trains a step and evaluates, multi-crop included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pks4_layers.train import parse_args, run

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

pytest.importorskip("yaml")


def test_every_recipe_is_there_and_parses():
    names = {p.stem for p in CONFIGS}
    expected = {f"{d}_vitb16_clip_{t}f" for d in ("k400", "ssv2") for t in (8, 16)}
    assert expected <= names
    for path in CONFIGS:
        cfg, _ = parse_args(["--config", str(path)])
        assert cfg.backbone == "vit_base_patch16_clip_224.openai"
        assert cfg.freeze_backbone and cfg.temporal == "pks4"
        assert cfg.crop_size == 224 and cfg.short_side == 256
        assert cfg.global_batch % cfg.batch_size == 0
        if cfg.dataset == "folder":  # Kinetics-400
            assert cfg.sampling == "dense" and (cfg.eval_clips, cfg.eval_crops) == (4, 3)
        else:  # Something-Something v2: no plain flips of direction-sensitive classes
            assert cfg.dataset == "ssv2" and cfg.sampling == "segment" and not cfg.flip
            assert (cfg.eval_clips, cfg.eval_crops) == (2, 3)


def _videos(count: int, frames: int = 20, seed: int = 0) -> list[torch.Tensor]:
    """Short real-footage clips (uint8, (frames, 48, 64, 3)) cut from a shipped video."""
    pytest.importorskip("av")
    from pks4_layers.data import read_frames, real_clip_path

    source = read_frames(real_clip_path("bikes"), list(range(0, 2 * frames * count, 2)))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        clip = source[i * frames : (i + 1) * frames]
        y, x = int(torch.randint(0, clip.shape[1] - 48, (1,), generator=g)), 8 * i
        out.append(clip[:, y : y + 48, x : x + 64].contiguous())
    return out


def _k400_layout(root: Path) -> list[str]:
    from pks4_layers.data import write_video

    clips = iter(_videos(4))
    for split in ("train", "val"):
        for cls in ("abseiling", "zumba"):
            write_video(root / split / cls / f"{split}_{cls}.mp4", next(clips))
    return ["--data-root", str(root / "train"), "--val-root", str(root / "val")]


def _ssv2_layout(root: Path) -> list[str]:
    from pks4_layers.data import write_video

    templates = ["Pushing something from left to right", "Pushing something from right to left"]
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "labels.json").write_text(
        json.dumps({t: str(i) for i, t in enumerate(templates)})
    )
    clips = iter(_videos(3))
    splits = {"train": [(10, 0), (11, 1)], "validation": [(12, 1)]}
    for split, items in splits.items():
        entries = []
        for vid, label in items:
            write_video(root / "videos" / f"{vid}.mp4", next(clips))
            template = templates[label].replace("something", "[something]")
            entries.append({"id": str(vid), "template": template})
        (root / "labels" / f"{split}.json").write_text(json.dumps(entries))
    return [
        "--video-dir",
        str(root / "videos"),
        "--train-json",
        str(root / "labels" / "train.json"),
        "--val-json",
        str(root / "labels" / "validation.json"),
        "--labels-json",
        str(root / "labels" / "labels.json"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_smoke_run(path: Path, tmp_path: Path):
    """The config as shipped, with only what a smoke run must change: the data paths (a tiny
    generated dataset in the config's layout), no pretrained file (random ViT-B/16), one step of
    two clips, one clip per video at evaluation (the config's 3 crops kept), one process."""
    pytest.importorskip("timm")
    cfg, _ = parse_args(["--config", str(path)])
    layout = _k400_layout if cfg.dataset == "folder" else _ssv2_layout
    overrides = layout(tmp_path / "data") + [
        "--pretrained-path",
        "",
        "--epochs",
        "1",
        "--batch-size",
        "1",
        "--global-batch",
        "2",
        "--max-steps-per-epoch",
        "1",
        "--eval-clips",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "run"),
        "--resume",
        "",
    ]
    cfg, _ = parse_args(["--config", str(path), *overrides])
    result = run(cfg)
    record = result.history[-1]
    assert record["epoch"] == 1 and record["step"] == 1
    assert torch.isfinite(torch.tensor(record["train_loss"]))
    assert 0.0 <= record["val_top1"] <= 100.0
    assert result.summary["params_trainable"] < result.summary["params_total"]
    assert (tmp_path / "run" / "metrics.json").is_file()
