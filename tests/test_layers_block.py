"""PKS4Block: identity at insertion, learning signal everywhere, both layouts, prefix tokens."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from pks4_layers import PKS4Block
from tolerances import assert_close


def _block(**kw) -> PKS4Block:
    torch.manual_seed(0)
    kw.setdefault("prior_dim", 6)
    kw.setdefault("d_state", 4)
    return PKS4Block(16, **kw)


def _perturb_output(block: PKS4Block) -> PKS4Block:
    """A trained-looking block: the zero-initialised output projection set to random values."""
    with torch.no_grad():
        block.scan.out_proj.weight.normal_(std=0.1)
        block.scan.out_proj.bias.normal_(std=0.1)
    return block


@pytest.mark.parametrize("layout", ["map", "tokens"])
def test_identity_at_initialisation(layout):
    block = _block()
    if layout == "map":
        x = torch.randn(2, 5, 16, 3, 4)
        out = block(x)
    else:
        x = torch.randn(2, 5, 1 + 12, 16)
        out = block(x, grid=(3, 4), num_prefix_tokens=1)
    assert out.shape == x.shape
    assert torch.equal(out, x)


def test_gradients_reach_every_parameter_after_one_step():
    block = _block()
    x = torch.randn(2, 4, 16, 3, 3)
    target = torch.randn_like(x)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(block(x), target).backward()
        if step == 0:
            # Only the output projection can learn while it is zero...
            assert block.scan.out_proj.weight.grad.abs().sum() > 0
            assert block.norm.weight.grad.abs().sum() == 0
            opt.step()
    # ...and after one step the signal reaches everything.
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_feature_map_and_tokens_agree():
    block = _perturb_output(_block()).double()
    x = torch.randn(2, 4, 16, 3, 5, dtype=torch.float64)
    from_map = block(x)
    tokens = rearrange(x, "b t c h w -> b t (h w) c")
    from_tokens = block(tokens, grid=(3, 5))
    assert_close(from_map, rearrange(from_tokens, "b t (h w) c -> b t c h w", h=3))


def test_prefix_tokens_skip_spatial_correlation():
    """A class token is scanned over time but does not mix with the spatial tokens here."""
    block = _perturb_output(_block()).double()
    x = torch.randn(1, 4, 1 + 6, 16, dtype=torch.float64)
    out = block(x, grid=(2, 3), num_prefix_tokens=1)
    moved_cls = x.clone()
    moved_cls[:, :, 0] += 1.0
    out2 = block(moved_cls, grid=(2, 3), num_prefix_tokens=1)
    assert torch.equal(out2[:, :, 1:], out[:, :, 1:])
    assert not torch.equal(out2[:, :, 0], out[:, :, 0])
    moved_patch = x.clone()
    moved_patch[:, :, 3] += 1.0
    out3 = block(moved_patch, grid=(2, 3), num_prefix_tokens=1)
    assert torch.equal(out3[:, :, 0], out[:, :, 0])
    # Prefix tokens get a zero prior: the spatial tokens alone equal a block without prefix.
    assert_close(block(x[:, :, 1:], grid=(2, 3)), out[:, :, 1:])


@pytest.mark.parametrize("size", [(1, 1), (3, 1), (5, 7)])
@pytest.mark.parametrize("frames", [1, 2, 9])
def test_shapes(size, frames):
    block = _perturb_output(_block())
    x = torch.randn(2, frames, 16, *size)
    out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_causal_block_output_does_not_see_the_future():
    block = _perturb_output(_block(bidirectional=False)).double()
    x = torch.randn(1, 6, 16, 2, 2, dtype=torch.float64)
    base = block(x)
    x2 = x.clone()
    x2[:, 4] += 1.0
    changed = (block(x2) - base).abs().amax(dim=(0, 2, 3, 4)) > 0
    assert changed.tolist() == [False] * 4 + [True] * 2


def test_backends_agree():
    x = torch.randn(2, 5, 16, 3, 3)
    ref = _perturb_output(_block(backend="ref"))
    fast = _perturb_output(_block(backend="torch"))
    assert_close(fast(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward(dtype):
    block = _perturb_output(_block())
    x = torch.randn(2, 4, 16, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = block(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())
    # The scan parameters stay float32.
    assert block.scan.directions[0].A_log.grad.dtype == torch.float32


def test_float64_gradcheck():
    torch.manual_seed(1)
    block = PKS4Block(4, prior_dim=3, d_state=2, radius=1, corr_dim=3, diff_dim=2).double()
    _perturb_output(block)
    x = torch.randn(1, 3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.randn(2, 3, 16), {}, r"x: expected \(B, T, C, H, W\) feature maps or"),
        (torch.randn(2, 3, 8, 4, 4), {}, r"x: expected a feature map \(B, T, C=16, H, W\)"),
        (torch.randn(2, 3, 12, 8), {"grid": (3, 4)}, r"x: expected tokens \(B, T, N, C=16\)"),
        (torch.randn(2, 3, 12, 16), {}, r"grid: expected \(H, W\)"),
        (torch.randn(2, 3, 12, 16), {"grid": (3, 3)}, r"grid: expected H \* W == 12"),
        (torch.randn(2, 3, 12, 16), {"grid": (3, 4), "num_prefix_tokens": 13}, "num_prefix"),
        (torch.randn(2, 3, 16, 4, 4), {"grid": (4, 5)}, r"grid: expected \(4, 4\)"),
        (torch.randn(2, 3, 16, 4, 4), {"num_prefix_tokens": 1}, "num_prefix_tokens: expected 0"),
        (torch.zeros(2, 3, 16, 4, 4, dtype=torch.int32), {}, "x: expected a floating dtype"),
        (torch.randn(2, 0, 16, 4, 4), {}, "x: expected at least one frame"),
    ],
    ids=[
        "rank",
        "map-channels",
        "token-channels",
        "no-grid",
        "grid-size",
        "prefix-range",
        "map-grid-mismatch",
        "map-prefix",
        "int-dtype",
        "no-frames",
    ],
)
def test_bad_input(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _block()(x, **kwargs)


def test_non_tensor_input():
    with pytest.raises(TypeError, match=r"x: expected a torch\.Tensor"):
        _block()([[1.0]])
