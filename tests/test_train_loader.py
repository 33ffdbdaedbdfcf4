"""The training loader's workers: started by forkserver (not forked from a process that has
decoded video), and the batches they make equal the ones the training process makes itself."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

pytest.importorskip("av")

from pks4_layers.train import ShardedSampler, TrainConfig
from pks4_layers.train.distributed import DistEnv
from pks4_layers.train.engine import _loader, build_datasets, build_samples, worker_start_method

HAS_FORKSERVER = "forkserver" in multiprocessing.get_all_start_methods()


def test_no_workers_no_start_method_and_never_fork():
    assert worker_start_method(0) is None
    assert worker_start_method(2) != "fork"
    if HAS_FORKSERVER:
        assert worker_start_method(1) == "forkserver"


@pytest.mark.skipif(not HAS_FORKSERVER, reason="the platform has no forkserver")
def test_workers_started_after_the_process_decoded_video_give_its_batches(tmp_path):
    root = tmp_path / "bench"
    # The training process writes (encodes) the videos in build_samples and decodes a clip
    # before the loader starts its workers: the state a forked worker could inherit mid-lock.
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = {}
    for workers in (0, 1):
        cfg = TrainConfig(
            dataset="benchmark",
            data_root=str(root),
            benchmark_task="temporal",
            benchmark_train=4,
            benchmark_val=4,
            benchmark_size=32,
            num_frames=4,
            crop_size=32,
            short_side=32,
            batch_size=2,
            workers=workers,
        )
        train, val, classes = build_samples(cfg, env)
        _, val_ds = build_datasets(cfg, train, val, classes, ((0.5,) * 3, (0.25,) * 3))
        val_ds[0]  # decoded here, in the training process
        sampler = ShardedSampler(len(val_ds), False, rank=0, world_size=1)
        loader = _loader(val_ds, sampler, cfg, env)
        if workers:
            assert loader.multiprocessing_context.get_start_method() == "forkserver"
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[1]) == 2
    for (clips0, labels0, skipped0), (clips1, labels1, skipped1) in zip(batches[0], batches[1]):
        assert clips0.shape[:2] == (2, 4) and skipped0 == skipped1 == 0
        assert torch.equal(clips0, clips1) and torch.equal(labels0, labels1)
