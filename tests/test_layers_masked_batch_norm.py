"""MaskedBatchNorm: per-channel standardisation over the entries a mask keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pks4_layers import PKS4Block
from pks4_layers.layers.kinematic_prior import KinematicPriorEncoder, local_correlation
from pks4_layers.layers.masked_batch_norm import MaskedBatchNorm, convert_sync_masked_batch_norm
from tolerances import assert_close


def _masked_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each channel over the kept entries, one channel at a time."""
    keep = mask.expand_as(x).reshape(-1, x.shape[-1])
    values = x.reshape(-1, x.shape[-1])
    mean = torch.stack([values[keep[:, c], c].mean() for c in range(x.shape[-1])])
    var = torch.stack([values[keep[:, c], c].var(unbiased=False) for c in range(x.shape[-1])])
    return mean, var


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 7, 6), (40, 1)])
def test_training_standardises_the_kept_entries_and_zeroes_the_rest(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.rand(*shape, generator=g) < 0.6
    mask.view(-1, shape[-1])[:2] = True  # at least two kept entries per channel
    norm = MaskedBatchNorm(shape[-1], eps=1e-5).double()
    out = norm(x, mask)
    mean, var = _masked_stats(x, mask)
    expected = torch.where(mask, (x - mean) / (var + 1e-5).sqrt(), torch.zeros(()).double())
    assert_close(out, expected)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    # running averages as BatchNorm's: momentum 0.1, unbiased variance
    count = mask.reshape(-1, shape[-1]).sum(0).double()
    assert_close(norm.running_mean, 0.1 * mean)
    assert_close(norm.running_var, 0.9 + 0.1 * var * count / (count - 1))


def test_an_all_true_mask_is_batch_norm_without_affine():
    g = torch.Generator().manual_seed(1)
    ours, theirs = MaskedBatchNorm(5).double(), torch.nn.BatchNorm1d(5, affine=False).double()
    for _ in range(3):
        x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64) * 2 - 1
        got = ours(x, torch.ones(1, dtype=torch.bool))
        assert_close(got, theirs(x.reshape(-1, 5)).reshape(x.shape))
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert_close(ours(x, torch.ones(1, dtype=torch.bool)), theirs(x))


def test_evaluation_uses_the_running_statistics_and_leaves_them():
    norm = MaskedBatchNorm(3)
    norm.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    norm.eval()
    x = torch.randn(6, 3)
    out = norm(x, torch.ones(6, 1, dtype=torch.bool))
    expected = (x - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
    assert_close(out, expected)
    assert torch.equal(norm.running_mean, torch.tensor([1.0, -2.0, 0.5]))


def test_a_channel_with_fewer_than_two_kept_entries_keeps_the_running_statistics():
    norm = MaskedBatchNorm(2).double()
    norm.running_mean.fill_(0.5)
    norm.running_var.fill_(2.0)
    x = torch.randn(8, 2, dtype=torch.float64)
    mask = torch.ones(8, 2, dtype=torch.bool)
    mask[1:, 1] = False  # channel 1: one kept entry
    out = norm(x, mask)
    assert_close(out[0, 1], (x[0, 1] - 0.5) / (2.0 + norm.eps) ** 0.5)
    assert norm.running_mean[1] == 0.5 and norm.running_var[1] == 2.0
    assert norm.running_mean[0] != 0.5


def test_gradcheck_through_the_batch_statistics():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 3, 4, generator=g) < 0.7
    mask[:2] = True
    norm = MaskedBatchNorm(4).double()
    assert torch.autograd.gradcheck(lambda t: norm(t, mask), (x,))
    assert torch.autograd.gradgradcheck(lambda t: norm(t, mask), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(3)
    # A common level of 0.9 with differences of a thousandth: what the cost volume holds.
    x = 0.9 + 1e-3 * torch.randn(64, 3, generator=g)
    mask = torch.ones(64, 3, dtype=torch.bool)
    rounded = x.to(dtype)
    out = MaskedBatchNorm(3).to(dtype)(rounded, mask)
    assert out.dtype == dtype
    expected = MaskedBatchNorm(3).double()(rounded.double(), mask)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda n: n(torch.randn(4, 3), torch.ones(4, 3, dtype=torch.bool)), "x: expected 2"),
        (lambda n: n(torch.randn(4, 2), torch.ones(4, 2)), "mask: expected a bool"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(MaskedBatchNorm(2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_features": 0}, "num_features"),
        ({"num_features": 2, "eps": 0.0}, "eps"),
        ({"num_features": 2, "momentum": 2.0}, "momentum"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedBatchNorm(**kwargs)


@pytest.mark.parametrize("grid, radius", [((3, 3), 2), ((4, 5), 1), ((2, 6), 3), ((1, 1), 1)])
def test_the_encoder_keeps_the_costs_inside_the_map(grid, radius):
    H, W = grid
    enc = KinematicPriorEncoder(8, radius=radius, corr_dim=None, motion_norm="batch")
    valid = enc._valid_motion(H, W, torch.device("cpu"))
    ones = torch.ones(1, 1, H, W)
    inside = local_correlation(ones, ones, radius).reshape(-1, H * W).T > 0.5
    assert torch.equal(valid[:, : enc.num_displacements], inside)
    assert valid[:, enc.num_displacements :].all()  # displacement and confidence: data


def test_the_encoder_statistics_leave_out_padding_and_first_frames():
    torch.manual_seed(0)
    H, W, K = 3, 3, 25
    enc = KinematicPriorEncoder(8, radius=2, corr_dim=None, cues=("cost",), motion_norm="batch")
    enc.motion_bn.momentum = 1.0  # the running mean is this batch's
    x = torch.randn(2, 4, H * W, 8)
    enc(x, (H, W))
    f = torch.nn.functional.normalize(x, dim=-1).reshape(2, 4, H, W, 8).permute(0, 1, 4, 2, 3)
    cost = local_correlation(f[:, 1:].flatten(0, 1), f[:, :-1].flatten(0, 1), 2)  # (6, K, H, W)
    ones = torch.ones(1, 1, H, W)
    inside = local_correlation(ones, ones, 2)[0] > 0.5  # (K, H, W)
    expected = torch.stack([cost[:, k][:, inside[k]].mean() for k in range(K)])
    assert_close(enc.motion_bn.running_mean, expected)


def test_block_with_motion_norm_has_batch_statistics_only_when_asked():
    plain = PKS4Block(16, prior_dim=6, d_state=4)
    assert plain.prior.motion_bn is None
    assert not any("motion_bn" in k for k in plain.state_dict())
    block = PKS4Block(16, prior_dim=6, d_state=4, motion_norm="batch")
    assert {"prior.motion_bn.running_mean", "prior.motion_bn.running_var"} <= set(
        block.state_dict()
    )


@pytest.mark.slow
def test_block_with_motion_norm_compiles_without_graph_breaks():
    # The running statistics are buffers updated in place in training: Dynamo must trace that
    # (fullgraph) and the compiled block must update them as the eager one does.
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = PKS4Block(16, prior_dim=6, d_state=4, motion_norm="batch", bidirectional=False)
    with torch.no_grad():
        eager.scan.out_proj.weight.normal_(std=0.1)
    compiled_block = PKS4Block(16, prior_dim=6, d_state=4, motion_norm="batch", bidirectional=False)
    compiled_block.load_state_dict(eager.state_dict())
    run = torch.compile(compiled_block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 16, 3, 3)
    try:
        for _ in range(2):
            out, out_c = eager(x), run(x)
            assert_close(out_c, out)
        for name in ("running_mean", "running_var"):
            assert_close(
                getattr(compiled_block.prior.motion_bn, name),
                getattr(eager.prior.motion_bn, name),
            )
        out_c.square().mean().backward()
        assert compiled_block.scan.out_proj.weight.grad is not None
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------ across processes (sync)
def _sync_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of 4 clips' motion cues, a mask, loss weights, and a block's input."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 3, 6, generator=g, dtype=torch.float64) * 2 + 1
    mask = torch.rand(4, 5, 3, 1, generator=g) < 0.7
    weights = torch.randn(4, 5, 3, 6, generator=g, dtype=torch.float64)
    clips = torch.randn(4, 3, 16, 4, 4, generator=g, dtype=torch.float64)
    return x, mask, weights, clips


def _sync_block() -> nn.Module:
    torch.manual_seed(0)
    block = PKS4Block(16, prior_dim=6, d_state=4, motion_norm="batch").double()
    with torch.no_grad():
        block.scan.out_proj.weight.normal_(std=0.1)  # not the identity: the output shows the stats
    return block


def _sync_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes, each with half of the batch of :func:`_sync_inputs`."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, mask, weights, clips = (t[2 * rank : 2 * rank + 2] for t in _sync_inputs())
        norm = convert_sync_masked_batch_norm(MaskedBatchNorm(6).double())
        x.requires_grad_(True)
        out = norm(x, mask)
        (out * weights).sum().backward()
        block = convert_sync_masked_batch_norm(_sync_block())
        clips.requires_grad_(True)
        y = block(clips)
        y.square().sum().backward()
        torch.save(
            {
                "out": out.detach(),
                "grad": x.grad,
                "running": (norm.running_mean, norm.running_var),
                "block_out": y.detach(),
                "block_grad": clips.grad,
                "block_running": block.prior.motion_bn.running_mean,
            },
            f"{out_dir}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_synced_statistics_on_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    """Two gloo processes with two clips each standardise, back-propagate and update the
    running statistics as one process with all four clips: outputs, input gradients (through
    the statistics of the other process's clips too) and running averages."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]

    x, mask, weights, clips = _sync_inputs()
    norm = MaskedBatchNorm(6).double()
    x.requires_grad_(True)
    out = norm(x, mask)
    (out * weights).sum().backward()
    block = _sync_block()
    clips.requires_grad_(True)
    y = block(clips)
    y.square().sum().backward()

    assert_close(torch.cat([r["out"] for r in ranks]), out.detach())
    assert_close(torch.cat([r["grad"] for r in ranks]), x.grad)
    assert_close(torch.cat([r["block_out"] for r in ranks]), y.detach())
    assert_close(torch.cat([r["block_grad"] for r in ranks]), clips.grad)
    for r in ranks:
        assert_close(r["running"][0], norm.running_mean)
        assert_close(r["running"][1], norm.running_var)
        assert_close(r["block_running"], block.prior.motion_bn.running_mean)
    # Without sync, each process's half has its own statistics: the test can tell.
    half = MaskedBatchNorm(6).double()(x[:2].detach(), mask[:2])
    assert not torch.allclose(half, out[:2].detach())


def test_sync_without_a_process_group_computes_locally():
    x, mask, _, _ = _sync_inputs()
    plain, synced = MaskedBatchNorm(6).double(), MaskedBatchNorm(6, sync=True).double()
    assert_close(synced(x, mask), plain(x, mask))
    assert "sync=True" in repr(synced) and "sync" not in repr(plain)


def test_convert_sets_sync_on_every_masked_batch_norm_and_returns_the_module():
    block = PKS4Block(16, prior_dim=6, d_state=4, motion_norm="batch")
    assert not block.prior.motion_bn.sync
    assert convert_sync_masked_batch_norm(block, process_group="g") is block
    assert block.prior.motion_bn.sync and block.prior.motion_bn.process_group == "g"
