"""``benchmarks/memory.py``: the memory a training step keeps, PKS4 against its alternatives.

The saved-tensor counts are exact and deterministic (they depend on shapes and code, not on
the machine), so the method's claims are asserted on them at small widths: the PKS4 block's
memory grows linearly in ``T`` and stays below divided space-time attention and below adapters
in every layer of a frozen backbone from ``T = 16`` on. The peak (resident-set growth on CPU)
depends on the allocator and is only checked for being reported. The two reference rows are
checked the same way: attention without its MLPs keeps less than with them, and the
checkpointed PKS4 block keeps its input and less than the plain one, with the same gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "memory.py"
SMALL = ["--dim=64", "--size=4x4", "--layers=4"]
TINY = ["--dim=32", "--size=4x4"]
ALL_METHODS = ("pks4", "pks4_ckpt", "st_attention", "st_attention_bare", "adapters")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def memory() -> Iterator[ModuleType]:
    """The benchmark script as a module, from its folder."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import memory as module

        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _run(tmp_path: Path, *flags: str) -> tuple[str, dict, Path]:
    json_path, png_path = tmp_path / "memory.json", tmp_path / "memory.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *flags, f"--json={json_path}", f"--plot={png_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(json_path.read_text()), png_path


def _saved(rows: list[dict], method: str) -> dict[int, int]:
    return {r["frames"]: r["saved_bytes"] for r in rows if r["method"] == method}


@pytest.mark.slow
def test_pks4_is_linear_in_t_and_below_both_alternatives(tmp_path: Path) -> None:
    frames = [8, 16, 32]
    stdout, result, png_path = _run(
        tmp_path, *SMALL, f"--frames-list={','.join(map(str, frames))}", "--no-peak"
    )
    rows = result["rows"]
    assert len(rows) == len(ALL_METHODS) * len(frames)
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    pks4 = _saved(rows, "pks4")
    attention = _saved(rows, "st_attention")
    adapters = _saved(rows, "adapters")

    # Linear in T: a part proportional to T plus a few tensors of fixed size (such as the
    # scan's A = -exp(A_log) and the parameters the recomputation keeps), saved once whatever T.
    per_token = [pks4[t] / (t * 16) for t in frames]
    assert pks4[32] - pks4[16] == 2 * (pks4[16] - pks4[8]), pks4
    assert max(per_token) <= 1.05 * min(per_token), per_token
    assert per_token == sorted(per_token, reverse=True)  # never more per token as T grows
    growth = result["growth"]["pks4"]
    assert 0.95 * (frames[-1] / frames[0]) <= growth["saved_ratio"] <= frames[-1] / frames[0]

    for t in frames:
        if t >= 16:
            assert pks4[t] < attention[t], (t, pks4[t], attention[t])
            assert pks4[t] < adapters[t], (t, pks4[t], adapters[t])
    for r in rows:
        expected = r["saved_bytes"] / pks4[r["frames"]]
        assert r["saved_ratio_vs_pks4"] == pytest.approx(expected)
        assert r["saved_bytes_per_token"] == pytest.approx(r["saved_bytes"] / r["tokens"])
        assert r["peak_bytes"] is None

    lines = [line.split() for line in stdout.splitlines()]
    table = [cells for cells in lines if cells and cells[0] in {str(t) for t in frames}]
    assert [(cells[0], cells[1]) for cells in table] == [
        (str(t), m) for t in frames for m in ALL_METHODS
    ]
    assert all(cells[4] == "1.00x" for cells in table if cells[1] == "pks4")
    assert result["config"]["dim"] == 64 and result["config"]["frames_list"] == frames
    assert png_path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_peak_is_measured_in_fresh_processes(tmp_path: Path) -> None:
    stdout, result, _ = _run(
        tmp_path, *SMALL, "--frames-list=8,16", "--methods=adapters,pks4_ckpt,pks4", "--layers=2"
    )
    rows = result["rows"]
    assert [(r["method"], r["frames"]) for r in rows] == [
        ("pks4", 8),
        ("pks4_ckpt", 8),
        ("adapters", 8),
        ("pks4", 16),
        ("pks4_ckpt", 16),
        ("adapters", 16),
    ]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0
        assert "fresh process" in r["peak_method"]
        assert r["saved_bytes"] > 0
    assert "peak MiB" in stdout


def test_saved_bytes_are_deterministic(memory: ModuleType) -> None:
    assert memory.METHODS == ALL_METHODS
    args = memory.parse_args([*SMALL, "--no-peak"])
    for method in memory.METHODS:
        first = memory.measure_here(args, method, 8)
        second = memory.measure_here(args, method, 8)
        assert first["saved_bytes"] == second["saved_bytes"] > 0, method


def test_adapters_keep_the_activations_of_every_frozen_layer(memory: ModuleType) -> None:
    """With an adapter in every layer the whole frozen backbone is differentiated through:
    its saved memory grows with its depth, layer for layer."""
    saved = {}
    for layers in (1, 2, 4):
        args = memory.parse_args(["--dim=64", "--size=4x4", f"--layers={layers}", "--no-peak"])
        saved[layers] = memory.measure_here(args, "adapters", 8)["saved_bytes"]
    per_layer = saved[2] - saved[1]
    assert per_layer > 0
    assert saved[4] - saved[2] == 2 * per_layer
    module = memory.make_module(args, "adapters")
    frozen = [p.requires_grad for p in module.layers.parameters()]
    trainable = [p.requires_grad for p in module.adapters.parameters()]
    assert not any(frozen) and all(trainable)


def test_attention_kernel_decides_quadratic_memory(memory: ModuleType) -> None:
    """The fused attention kernel keeps O(T) per sequence; the math kernel keeps the T x T
    attention matrix of every head, so its bytes per token grow with T: by at least one float
    per head and key."""
    per_token = {}
    for kernel in ("default", "math"):
        args = memory.parse_args(
            ["--dim=128", "--heads=4", "--size=2x2", f"--sdpa={kernel}", "--no-peak"]
        )
        for frames in (8, 64):
            result = memory.measure_here(args, "st_attention", frames)
            per_token[kernel, frames] = result["saved_bytes"] / (frames * 4)
            nodes = result["attention_nodes"]
            if kernel == "math":
                assert any("Softmax" in n for n in nodes), nodes
            else:
                assert any("Attention" in n for n in nodes), nodes
    assert per_token["default", 64] == pytest.approx(per_token["default", 8])
    heads = args.heads
    assert per_token["math", 64] - per_token["math", 8] >= (64 - 8) * heads * 4


def test_compared_blocks_keep_the_map_shape(memory: ModuleType) -> None:
    import torch

    args = memory.parse_args(["--dim=64", "--size=3x2", "--layers=2", "--no-peak"])
    for method in memory.METHODS:
        module = memory.make_module(args, method)
        work = memory.make_workload(args, method, 5, module)
        out = work.forward()
        assert out.shape == work.grad_out.shape, method
        assert torch.isfinite(out).all(), method


def test_rejects_bad_flags(memory: ModuleType) -> None:
    for flags in (
        ["--frames-list=0,8"],
        ["--methods=pks4,lstm"],
        ["--methods=pks4_checkpoint"],
        ["--dim=96", "--heads=5"],
    ):
        with pytest.raises(SystemExit):
            memory.parse_args(flags)


@pytest.mark.parametrize("frames", [4, 8])
def test_bare_attention_and_checkpointed_pks4_rows(memory: ModuleType, frames: int) -> None:
    """Attention without MLPs keeps less than with them; the checkpointed PKS4 block keeps its
    input (it needs it to recompute the rest) and strictly less than the plain block."""
    args = memory.parse_args([*TINY, "--no-peak"])
    saved = {
        m: memory.measure_here(args, m, frames)["saved_bytes"]
        for m in ("pks4", "pks4_ckpt", "st_attention", "st_attention_bare")
    }
    assert 0 < saved["st_attention_bare"] < saved["st_attention"], saved
    h, w = args.size
    input_bytes = args.batch * frames * args.dim * h * w * 4  # float32
    assert input_bytes <= saved["pks4_ckpt"] < saved["pks4"], (input_bytes, saved)


def test_bare_attention_is_the_attention_layers_without_mlp(memory: ModuleType) -> None:
    from torch import nn

    args = memory.parse_args([*TINY, "--no-peak"])
    full = memory.make_module(args, "st_attention")
    bare = memory.make_module(args, "st_attention_bare")
    for layer in (bare.temporal, bare.spatial):
        assert layer.mlp is None and layer.norm2 is None
        assert isinstance(layer.norm1, nn.LayerNorm)
    # The same attention parameters (same heads, qkv and output projections), nothing else.
    attention_only = {k: v.shape for k, v in full.state_dict().items() if "mlp" not in k}
    attention_only = {k: v for k, v in attention_only.items() if "norm2" not in k}
    assert {k: v.shape for k, v in bare.state_dict().items()} == attention_only
    assert bare.temporal.attn.heads == full.temporal.attn.heads == args.heads


def test_checkpointed_pks4_is_the_same_block_with_the_same_gradients(memory: ModuleType) -> None:
    """``pks4_ckpt`` is ``pks4`` with checkpointing: same parameters, output and gradients (the
    backward recomputes what the forward did not keep), and it saves only its input here."""
    import torch

    args = memory.parse_args([*TINY, "--no-peak"])
    frames = 4
    results = {}
    for method in ("pks4", "pks4_ckpt"):
        module = memory.make_module(args, method)
        work = memory.make_workload(args, method, frames, module)
        out = work.forward()
        grads = torch.autograd.grad(out, work.trainable, work.grad_out)
        results[method] = (module.state_dict(), out.detach(), grads)
        if method == "pks4_ckpt":
            # The block keeps only its input (PKS4Block.set_grad_checkpointing): the count is
            # that input's storage, once, and nothing the checkpoint recomputes.
            count = memory.measure_here(args, method, frames)
            assert count["saved_bytes"] == work.grad_out.numel() * 4, count
    (state0, out0, grads0), (state1, out1, grads1) = results["pks4"], results["pks4_ckpt"]
    assert state0.keys() == state1.keys()
    assert all(torch.equal(state0[k], state1[k]) for k in state0)
    torch.testing.assert_close(out1, out0)
    assert len(grads0) == len(grads1) > 0
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0)
    assert any(g.abs().sum() > 0 for g in grads1)


def test_table_and_json_have_the_new_rows(tmp_path: Path) -> None:
    frames = [4, 8]
    methods = ("pks4", "pks4_ckpt", "st_attention", "st_attention_bare")
    stdout, result, png_path = _run(
        tmp_path,
        *TINY,
        "--frames-list=4,8",
        f"--methods={','.join(methods)}",
        "--no-peak",
    )
    rows = result["rows"]
    assert [(r["method"], r["frames"]) for r in rows] == [(m, t) for t in frames for m in methods]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    assert result["config"]["methods"] == list(methods)
    for t in frames:
        by = {r["method"]: r for r in rows if r["frames"] == t}
        assert by["pks4"]["saved_ratio_vs_pks4"] == 1.0
        assert by["pks4_ckpt"]["saved_ratio_vs_pks4"] < 1.0
        bare, full = by["st_attention_bare"], by["st_attention"]
        assert bare["saved_ratio_vs_pks4"] < full["saved_ratio_vs_pks4"]
    lines = [line.split() for line in stdout.splitlines()]
    table = [cells for cells in lines if cells and cells[0] in {str(t) for t in frames}]
    assert [(cells[0], cells[1]) for cells in table] == [
        (str(t), m) for t in frames for m in methods
    ]
    assert any(line.startswith("pks4_ckpt:") for line in stdout.splitlines())
    assert any(line.startswith("st_attention_bare:") for line in stdout.splitlines())
    assert set(result["growth"]) == set(methods)
    assert png_path.read_bytes()[:8] == PNG_MAGIC
