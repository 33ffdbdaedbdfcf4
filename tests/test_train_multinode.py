"""Runs that change the number of processes: gradient accumulation keeps the global batch (and
so the training) the same whatever the world size, two "nodes" joined by a c10d rendezvous
train as one job, and a checkpoint written by two processes resumes on one."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pks4_layers.train import ShardedSampler, TrainConfig
from pks4_layers.train.engine import _warn_if_global_batch_changed

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "ddp_worker.py"


# --------------------------------------------------------------------------- fast checks
@pytest.mark.parametrize(
    ("batch", "world", "global_batch", "accum"),
    [(2, 1, 0, 1), (2, 1, 4, 2), (1, 2, 4, 2), (4, 1, 4, 1), (2, 3, 12, 2)],
)
def test_accum_steps_keep_the_global_batch(batch, world, global_batch, accum):
    cfg = TrainConfig(batch_size=batch, global_batch=global_batch)
    assert cfg.accum_steps(world) == accum
    assert cfg.effective_global_batch(world) == (global_batch or batch * world)


@pytest.mark.parametrize(("batch", "world", "global_batch"), [(2, 2, 6), (4, 1, 2), (3, 2, 9)])
def test_a_global_batch_the_processes_cannot_split_is_an_error(batch, world, global_batch):
    cfg = TrainConfig(batch_size=batch, global_batch=global_batch)
    with pytest.raises(ValueError, match=r"global_batch: .*batch_size x world size") as err:
        cfg.accum_steps(world)
    assert f"{batch} x {world}" in str(err.value) and f"got {global_batch}" in str(err.value)


def test_negative_global_batch_is_refused():
    with pytest.raises(ValueError, match="global_batch: expected >= 0, got -4"):
        TrainConfig(global_batch=-4).validate()


@pytest.mark.parametrize(("world", "batch"), [(1, 2), (2, 1), (2, 2), (4, 1)])
def test_sharded_sampler_optimizer_steps_take_the_same_items_whatever_the_world_size(world, batch):
    n, global_batch = 27, 8
    accum = global_batch // (batch * world)
    reference = list(ShardedSampler(n, True, seed=7, drop_last=True, batch_size=global_batch))
    ranks = [
        list(ShardedSampler(n, True, 7, r, world, True, batch_size=batch, accum_steps=accum))
        for r in range(world)
    ]
    assert len({len(r) for r in ranks}) == 1, "every rank takes the same number of steps"
    steps = len(ranks[0]) // (batch * accum)
    assert steps == len(reference) // global_batch == n // global_batch
    per_step = batch * accum  # one rank's micro-batches of one step, taken in order
    for k in range(steps):
        items = sorted(i for r in ranks for i in r[k * per_step : (k + 1) * per_step])
        assert items == sorted(reference[k * global_batch : (k + 1) * global_batch])


def test_resume_with_another_global_batch_warns_naming_both():
    from pks4_layers.train.distributed import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.warns(UserWarning, match="global_batch 8, but the checkpoint .* with 4"):
        _warn_if_global_batch_changed({"global_batch": 4, "world_size": 2}, 8, "ckpt", env)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_global_batch_changed({"global_batch": 4}, 4, "ckpt", env)
        _warn_if_global_batch_changed({}, 4, "old checkpoint", env)


# ------------------------------------------------------------------------ end to end runs
def _e2e():
    """The end-to-end test module (its small config and subprocess helpers), imported only by
    the runs below, which need PyAV and timm: the checks above run without them."""
    pytest.importorskip("av")
    pytest.importorskip("timm")
    import test_train_end_to_end

    return test_train_end_to_end


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    _e2e()
    from pks4_layers.data import make_benchmark

    root = tmp_path_factory.mktemp("bench_multinode")
    make_benchmark(root, "temporal", num_train=16, num_val=8, num_frames=4, size=64)
    return root


def _write_config(folder: Path, data_root: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # A constant rate after the warm-up (min_lr_ratio 1): a run of 1 epoch resumed to 2 then
    # follows the same schedule as a run of 2 epochs from the start.
    cfg = {**_e2e().BASE, "data_root": str(data_root), "output_dir": str(folder / "run")}
    # No batch statistics (preset features): the classifier's default standardises its motion
    # cues over each batch, as BatchNorm does; pks4-train synchronises them across processes,
    # but each accumulated micro-batch has its own, which the big batch's steps do not.
    cfg.update({"min_lr_ratio": 1.0, "preset": "features", **values})
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


Job = tuple[subprocess.Popen, Path]  # a process and the file its output goes to


def _start(cmd: list[str], log: Path) -> Job:
    # Output goes to a file, not a pipe: processes waited on one after the other could
    # otherwise block on a full pipe while the test waits for another.
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=_e2e()._env(), stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def _single(folder: Path, config: Path, name: str = "single") -> Job:
    cmd = [sys.executable, str(WORKER), str(config), str(folder)]
    return _start(cmd, folder / f"{name}.log")


def _two_nodes(folder: Path, config: Path) -> list[Job]:
    """Two torchrun agents, one process each, as two nodes meeting at a c10d rendezvous on the
    loopback interface (the agent that binds the endpoint hosts it, the other connects)."""
    endpoint = f"127.0.0.1:{_e2e()._free_port()}"
    jobs = []
    for node in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=pks4-multinode-test",
            "--local-addr=127.0.0.1",
            str(WORKER),
            str(config),
            str(folder),
        ]
        jobs.append(_start(cmd, folder / f"node{node}.log"))
    return jobs


def _wait(jobs: list[Job], timeout: float = 600) -> None:
    try:
        for proc, _ in jobs:
            proc.wait(timeout=timeout)
    finally:
        for proc, _ in jobs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in jobs:
        assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]


def _history(folder: Path) -> list[dict]:
    return json.loads((folder / "run" / "metrics.json").read_text())["history"]


@pytest.mark.slow
def test_accumulation_and_two_nodes_then_one_process_match_one_big_batch(data_root, tmp_path):
    """Four runs with the same global batch of 4 clips: one process with batches of 4; one
    process with batches of 2 accumulated twice; two nodes x one process with batches of 1
    accumulated twice for epoch 1, resumed by one process with batches of 2 for epoch 2. All
    end with the same head and the same per-epoch metrics."""
    big, accum, nodes = tmp_path / "big", tmp_path / "accum", tmp_path / "nodes"
    big_cfg = _write_config(big, data_root, batch_size=4)
    accum_cfg = _write_config(accum, data_root, batch_size=2, global_batch=4)
    nodes_cfg = _write_config(nodes, data_root, batch_size=1, global_batch=4, epochs=1)
    _wait([_single(big, big_cfg), _single(accum, accum_cfg)])
    _wait(_two_nodes(nodes, nodes_cfg))

    rank0, rank1 = (torch.load(nodes / f"rank{r}.pt") for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"the two nodes' ranks differ on {key}"
    s_nodes = json.loads((nodes / "rank0.json").read_text())["summary"]
    assert s_nodes["world_size"] == 2 and s_nodes["global_batch"] == 4
    assert s_nodes["accum_steps"] == 2

    # Epoch 2 on one process from the two-process checkpoint.
    resume_cfg = _write_config(
        nodes, data_root, batch_size=2, global_batch=4, epochs=2, resume="auto"
    )
    _wait([_single(nodes, resume_cfg, "resume")])
    # Same global batch on another world size: a plain resume, nothing to warn about.
    assert "global_batch" not in (nodes / "resume.log").read_text()
    s_accum = json.loads((accum / "rank0.json").read_text())["summary"]
    assert s_accum["accum_steps"] == 2 and s_accum["global_batch"] == 4

    big_h, accum_h, nodes_h = _history(big), _history(accum), _history(nodes)
    assert [h["epoch"] for h in nodes_h] == [1, 2]
    assert [h["world_size"] for h in nodes_h] == [2, 1]
    assert [h["global_batch"] for h in nodes_h] == [4, 4]
    # 16 clips in global batches of 4: the optimizer step count continues across the resume.
    assert [h["step"] for h in nodes_h] == [h["step"] for h in big_h] == [4, 8]
    assert [h["lr"] for h in nodes_h] == pytest.approx([h["lr"] for h in big_h])
    for other in (accum_h, nodes_h):
        for h, ref in zip(other, big_h):
            for key in ("train_loss", "val_loss"):
                assert h[key] == pytest.approx(ref[key], rel=1e-3), key
            assert h["train_top1"] == pytest.approx(ref["train_top1"])
            assert h["val_top1"] == pytest.approx(ref["val_top1"])

    big_p, accum_p = (torch.load(d / "rank0.pt") for d in (big, accum))
    final = torch.load(nodes / "rank0.pt")  # rewritten by the resumed one-process run
    heads = [k for k in big_p if k.startswith("head.")]
    assert heads
    # The head gets full-size gradients from the first step and is compared closely;
    # parameters behind the block's zero-initialised output projection get gradients near zero
    # at first, which Adam normalises to full steps, amplifying summation-order differences.
    for key in heads:
        torch.testing.assert_close(accum_p[key], big_p[key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(final[key], big_p[key], rtol=1e-3, atol=1e-4, msg=key)
