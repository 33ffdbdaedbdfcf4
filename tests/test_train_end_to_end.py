"""End to end on real decoded video: the CLI trains, evaluates, writes its outputs and
resumes; two gloo processes under torchrun agree with each other and with one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("timm")

from pks4_layers.data import make_benchmark

TESTS = Path(__file__).resolve().parent

# A small run: random (frozen) efficientnet_lite0, 4 frames of 64x64, a few clips.
BASE = {
    "dataset": "benchmark",
    "benchmark_task": "temporal",
    "benchmark_size": 64,
    "benchmark_train": 16,
    "benchmark_val": 8,
    "num_frames": 4,
    "crop_size": 64,
    "short_side": 64,
    "backbone": "efficientnet_lite0",
    "pretrained": False,
    "temporal": "pks4",
    "freeze_backbone": True,
    "epochs": 2,
    "lr": 3e-3,
    "warmup_epochs": 0.5,
    "progress": False,
    "seed": 3,
}


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    make_benchmark(root, "temporal", num_train=16, num_val=8, num_frames=4, size=64)
    return root


def _flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


@pytest.mark.slow
def test_cli_trains_evaluates_and_resumes(data_root, tmp_path):
    out = tmp_path / "run"
    values = {**BASE, "data_root": str(data_root), "output_dir": str(out), "batch_size": 4}
    cmd = [sys.executable, "-m", "pks4_layers.train", *_flags(values)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert 0.0 <= h["val_top1"] <= h["val_top5"] <= 100.0
        assert h["train_loss"] > 0 and torch.isfinite(torch.tensor(h["train_loss"]))
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "checkpoint_last.pt").is_file() and (out / "checkpoint_best.pt").is_file()
    assert metrics["summary"]["params_trainable"] < metrics["summary"]["params_total"]
    # The default (factored) readout's weights were fitted on the validation split.
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    scales = state["model"]["readout_scales"]
    assert scales.shape == (2,) and (scales > 0).all() and not torch.equal(scales, torch.ones(2))

    # Evaluating the last checkpoint reproduces the last epoch's validation metrics.
    cmd_eval = cmd + ["--eval-only", "--resume", str(out / "checkpoint_last.pt")]
    done = subprocess.run(cmd_eval, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["val_top1"] == pytest.approx(history[-1]["val_top1"])
    assert summary["val_loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-4)

    # Resuming continues from epoch 2 to epoch 3 instead of starting over.
    cmd_resume = [*cmd, "--epochs", "3", "--resume", "auto"]
    done = subprocess.run(cmd_resume, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    history3 = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history3] == [1, 2, 3]
    assert history3[:2] == history


@pytest.mark.slow
def test_two_gloo_processes_agree_with_each_other_and_with_one_process(data_root, tmp_path):
    """torchrun, 2 CPU processes, gloo: both ranks end with identical parameters, and those
    and the validation metrics match one process that takes the same global batches (the
    default preset's batch statistics synchronised across the processes)."""
    per_rank_batch = 2
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    single_dir.mkdir()
    worker = TESTS / "ddp_worker.py"

    def write_config(folder: Path, batch: int) -> Path:
        cfg = {**BASE, "data_root": str(data_root), "output_dir": str(folder / "run")}
        cfg["batch_size"] = batch
        # The classifier's default preset: its motion cues are standardised over the batch,
        # which pks4-train synchronises across the processes.
        path = folder / "config.json"
        path.write_text(json.dumps(cfg))
        return path

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(worker),
        str(write_config(ddp_dir, per_rank_batch)),
        str(ddp_dir),
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    cmd = [sys.executable, str(worker), str(write_config(single_dir, 2 * per_rank_batch))]
    done = subprocess.run(cmd + [str(single_dir)], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]

    rank0, rank1 = (torch.load(ddp_dir / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(single_dir / "rank0.pt")
    trained = [k for k in rank0 if k.startswith(("temporal.", "head."))]
    assert trained, "the temporal module and head must be in the state dict"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ on {key}"
    # The head sees full-size gradients from the first step: it matches the single process
    # closely. (Parameters behind the block's zero-initialised output projection get
    # gradients near zero at first, which Adam normalises to full steps: there the two runs'
    # different summation orders are amplified, and only the metrics below are compared.)
    for key in (k for k in trained if k.startswith("head.")):
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-3, atol=1e-4, msg=key)
    # The motion cues' running statistics: over the global batch, as the single process's.
    stats = [k for k in rank0 if "motion_bn.running" in k]
    assert stats, "the default preset standardises the motion cues"
    for key in stats:
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-6, msg=key)
    # Training moved the parameters: the block's output projection starts at zero.
    out_proj = [k for k in trained if "out_proj.weight" in k]
    assert out_proj and all(rank0[k].abs().sum() > 0 for k in out_proj)
    s_ddp = json.loads((ddp_dir / "rank0.json").read_text())["summary"]
    s_one = json.loads((single_dir / "rank0.json").read_text())["summary"]
    assert s_ddp["world_size"] == 2 and s_one["world_size"] == 1
    assert s_ddp["global_batch"] == s_one["global_batch"] == 2 * per_rank_batch
    assert s_ddp["final_val_top1"] == pytest.approx(s_one["final_val_top1"])
    assert s_ddp["best_val_top1"] == pytest.approx(s_one["best_val_top1"])
    # Only rank 0 wrote the run's files.
    assert (ddp_dir / "run" / "metrics.json").is_file()
    history = json.loads((ddp_dir / "run" / "metrics.json").read_text())["history"]
    single_history = json.loads((single_dir / "run" / "metrics.json").read_text())["history"]
    for h_ddp, h_one in zip(history, single_history):
        assert h_ddp["train_loss"] == pytest.approx(h_one["train_loss"], rel=1e-3)
        assert h_ddp["val_loss"] == pytest.approx(h_one["val_loss"], rel=1e-3)
