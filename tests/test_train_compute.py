"""``compute_budget`` and ``pks4-train --dry-run``: the numbers agree with each other and with
the model, and a dry run reads no video and writes nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pks4_layers.train import TrainConfig
from pks4_layers.train.compute import compute_budget, count_train_clips, resolve_num_classes

SMALL = dict(
    backbone="efficientnet_lite0",
    pretrained=False,
    num_frames=4,
    crop_size=64,
    short_side=64,
    batch_size=2,
    epochs=3,
    temporal="pks4",
    freeze_backbone=True,
)


def small_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def frozen():
    return compute_budget(small_config(), train_clips=100)


def test_parts_add_up(frozen):
    b = frozen
    assert b.params_total == b.params_backbone + b.params_temporal + b.params_head
    assert 0 < b.params_trainable < b.params_total
    assert b.params_trainable == b.params_temporal + b.params_head
    assert b.gflops_forward == pytest.approx(b.gflops_backbone + b.gflops_temporal + b.gflops_head)
    assert b.gflops_backbone > 0 and b.gflops_temporal > 0
    assert b.num_classes == 4  # the generated benchmark's temporal task
    assert b.clip_shape == (1, 4, 3, 64, 64)


def test_schedule_flops_count_frozen_forward_and_three_trained_forwards(frozen):
    b = frozen
    frozen_fwd = b.gflops_backbone
    trained_fwd = b.gflops_temporal + b.gflops_head
    assert b.gflops_train_per_clip == pytest.approx(frozen_fwd + 3 * trained_fwd)
    expected = b.epochs * 100 * (frozen_fwd + 3 * trained_fwd) * 1e9
    assert b.schedule_flops == pytest.approx(expected, rel=1e-9)
    assert (b.train_clips, b.clips_per_epoch, b.steps_per_epoch) == (100, 100, 50)
    assert b.train_clips_source.startswith("assumed")


def test_step_memory_parts(frozen):
    b = frozen
    assert b.trainable_weight_bytes == 4 * b.params_trainable  # float32
    assert b.weight_bytes == 4 * b.params_total
    assert b.gradient_bytes == b.trainable_weight_bytes
    assert b.optimizer_bytes == 2 * b.trainable_weight_bytes  # AdamW: exp_avg, exp_avg_sq
    parts = b.activation_bytes + b.weight_bytes + b.gradient_bytes + b.optimizer_bytes
    assert b.step_bytes == parts
    assert b.activation_bytes > 0


def test_unfreezing_the_backbone_costs_flops_and_memory(frozen):
    # The same architecture (a trained backbone would get the preset features by default).
    unfrozen = compute_budget(
        small_config(freeze_backbone=False, preset="motion_only"), train_clips=100
    )
    assert unfrozen.params_trainable == unfrozen.params_total
    assert unfrozen.gflops_forward == pytest.approx(frozen.gflops_forward)
    assert unfrozen.gflops_train_per_clip == pytest.approx(3 * unfrozen.gflops_forward)
    assert unfrozen.schedule_flops > frozen.schedule_flops
    assert unfrozen.activation_bytes > 2 * frozen.activation_bytes
    assert unfrozen.step_bytes > frozen.step_bytes


@pytest.mark.parametrize("field", ["batch_size", "num_frames"])
def test_activation_memory_is_about_linear(frozen, field):
    doubled = compute_budget(small_config(**{field: 2 * SMALL[field]}), train_clips=100)
    ratio = doubled.activation_bytes / frozen.activation_bytes
    assert 1.8 < ratio < 2.2, ratio


def test_eval_flops_count_every_view(frozen):
    b = compute_budget(small_config(eval_clips=2, eval_crops=3), train_clips=100)
    assert b.eval_views == 6
    assert b.gflops_eval_per_video == pytest.approx(6 * frozen.gflops_forward)


def test_max_steps_per_epoch_caps_the_schedule(frozen):
    capped = compute_budget(small_config(max_steps_per_epoch=10), train_clips=100)
    assert (capped.steps_per_epoch, capped.clips_per_epoch) == (10, 20)
    assert capped.schedule_flops == pytest.approx(frozen.schedule_flops * 20 / 100)


def test_classes_and_clips_from_a_folder_dataset_without_decoding(tmp_path):
    # Empty files named like videos: counting them must not open them.
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(2):
            (tmp_path / c / f"{i}.mp4").write_bytes(b"")
    cfg = small_config(dataset="folder", data_root=str(tmp_path))
    assert resolve_num_classes(cfg)[0] == 3
    assert count_train_clips(cfg)[0] == 6
    split = tmp_path / "train.txt"
    split.write_text("a/0.mp4\nb/1.mp4\n\n")
    assert count_train_clips(dataclasses.replace(cfg, train_split=str(split)))[0] == 2


def test_ssv2_counts_come_from_the_jsons(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Pushing x": "0", "Pulling x": "1"}))
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"id": str(i), "template": "Pushing x"} for i in range(5)]))
    cfg = small_config(dataset="ssv2", labels_json=str(labels), train_json=str(train))
    assert resolve_num_classes(cfg)[0] == 2
    assert count_train_clips(cfg)[0] == 5


def test_a_missing_dataset_names_the_way_out(tmp_path):
    cfg = small_config(dataset="folder", data_root=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="--dry-run-classes"):
        resolve_num_classes(cfg)
    with pytest.raises(ValueError, match="--dry-run-clips"):
        count_train_clips(cfg)


def test_format_shows_every_part(frozen):
    text = frozen.format()
    for needle in ("backbone", "temporal (pks4)", "head", "trainable", "backward = 2x forward"):
        assert needle in text
    assert "assumed" in text
    assert json.loads(frozen.to_json())["params_total"] == frozen.params_total


def test_cli_dry_run_prints_the_table_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "data"
    argv = [
        sys.executable, "-m", "pks4_layers.train", "--dry-run",
        "--data-root", str(data), "--output-dir", str(out),
        "--backbone", "efficientnet_lite0", "--no-pretrained",
        "--num-frames", "4", "--crop-size", "64", "--batch-size", "2", "--epochs", "2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "temporal (pks4)" in proc.stdout and "saved for backward" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["train_clips"] == TrainConfig().benchmark_train
    # Neither the benchmark's videos nor a run directory: nothing is generated or saved.
    assert not out.exists() and not data.exists()
    assert not list(Path(tmp_path).rglob("*.pt"))


def test_cli_dry_run_without_a_dataset_exits_2_with_advice(tmp_path):
    argv = [
        sys.executable, "-m", "pks4_layers.train", "--dry-run", "--dataset", "folder",
        "--data-root", str(tmp_path / "absent"), "--num-frames", "4", "--crop-size", "64",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--dry-run-classes" in proc.stderr


def test_partial_tuning_moves_backbone_flops_to_the_trained_side():
    """tune_last_blocks makes part of the backbone train: the schedule costs more and a step
    keeps more activations than with the backbone frozen."""
    pytest.importorskip("timm")
    from pks4_layers.train.compute import compute_budget

    base = dict(
        dataset="benchmark",
        backbone="efficientnet_lite0",
        num_frames=4,
        crop_size=64,
        short_side=64,
        batch_size=2,
        epochs=1,
    )
    frozen = compute_budget(TrainConfig(**base), num_classes=4, train_clips=8)
    tuned = compute_budget(TrainConfig(**base, tune_last_blocks=2), num_classes=4, train_clips=8)
    assert tuned.params_trainable > frozen.params_trainable
    assert tuned.gflops_frozen_forward < frozen.gflops_frozen_forward
    assert tuned.schedule_flops > frozen.schedule_flops
    assert tuned.activation_bytes > frozen.activation_bytes
