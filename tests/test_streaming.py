"""Streaming: chunked causal blocks and classifiers equal whole-clip calls, in constant memory."""

from __future__ import annotations

import pytest
import torch

from pks4_layers import PKS4Block
from pks4_layers.layers import PKS4StreamState
from pks4_layers.layers.kinematic_prior import DEFAULT_PRIOR_CUES, PRIOR_CUES
from pks4_layers.layers.temporal_conv import temporal_conv, temporal_conv_step
from pks4_layers.models import PKS4VideoClassifier
from pks4_layers.models.classifier import combine_heads
from scan_cases import device_for
from tiny_backbone import TinyCNN
from tolerances import assert_close

T = 11
CHUNKINGS = {
    "ones": [1] * T,
    "threes": [3, 3, 3, 2],
    "uneven": [2, 5, 1, 3],
    "whole": [T],
}


def _block(dim: int = 16, **kw) -> PKS4Block:
    torch.manual_seed(0)
    kw.setdefault("prior_dim", 6)
    kw.setdefault("d_state", 4)
    kw.setdefault("bidirectional", False)
    block = PKS4Block(dim, **kw)
    # A trained-looking block: the zero-initialised output projection set to random values.
    with torch.no_grad():
        block.scan.out_proj.weight.normal_(std=0.5)
        block.scan.out_proj.bias.normal_(std=0.1)
    return block


def _stream(block: PKS4Block, x: torch.Tensor, chunks: list[int], state=None, **kw):
    outs, start = [], 0
    for size in chunks:
        out, state = block.step(x[:, start : start + size], state, **kw)
        outs.append(out)
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("layout", ["map", "tokens"])
@pytest.mark.parametrize(
    "backend, dtype",
    [
        ("torch", torch.float32),
        ("torch", torch.float64),
        ("cpu", torch.float32),
        ("cpu", torch.float64),
        pytest.param("cuda", torch.float32, marks=pytest.mark.cuda),  # no float64 kernel
    ],
    ids=["torch-f32", "torch-f64", "cpu-f32", "cpu-f64", "cuda-f32"],
)
def test_block_stream_equals_whole_clip(backend, dtype, layout, chunking):
    device = device_for(backend)
    block = _block(backend=backend).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    if layout == "map":
        x = torch.randn(2, T, 16, 3, 4, generator=g, dtype=dtype).to(device)
        kw = {}
    else:
        x = torch.randn(2, T, 1 + 12, 16, generator=g, dtype=dtype).to(device)
        kw = dict(grid=(3, 4), num_prefix_tokens=1)
    with torch.no_grad():
        expected = block(x, **kw)
        streamed, _ = _stream(block, x, CHUNKINGS[chunking], **kw)
    assert streamed.shape == x.shape
    assert_close(streamed, expected, scale=float(expected.abs().max()))


def test_init_stream_equals_lazy_state():
    block = _block().double()
    x = torch.randn(2, 6, 1 + 6, 16, dtype=torch.float64)
    kw = dict(grid=(2, 3), num_prefix_tokens=1)
    lazy, lazy_state = _stream(block, x, [4, 2], **kw)
    state = block.init_stream(2, (2, 3), num_prefix_tokens=1, dtype=torch.float64)
    shapes = [t.shape for t in state.tensors()]
    eager, eager_state = _stream(block, x, [4, 2], state=state, **kw)
    assert torch.equal(lazy, eager)
    assert [t.shape for t in lazy_state.tensors()] == shapes
    assert [t.shape for t in eager_state.tensors()] == shapes
    assert not state.prior.has_previous.any() and eager_state.prior.has_previous.all()
    assert state.scan.scan_state.dtype == torch.float64


def test_first_frame_of_a_stream_has_no_motion():
    """A new stream's frame 0 is a video's frame 0, whatever came before in another stream."""
    block = _block().double()
    x = torch.randn(1, 4, 16, 2, 2, dtype=torch.float64)
    _, used = _stream(block, torch.randn_like(x), [4])
    fresh, _ = block.step(x, None)
    assert torch.equal(fresh, block.step(x, block.init_stream(1, (2, 2), dtype=x.dtype))[0])
    assert not torch.equal(fresh, block.step(x, used)[0])
    assert_close(fresh, block(x))


def test_gradients_through_the_stream_equal_whole_clip_gradients():
    """Without ``detach`` the state carries the graph: backpropagation through every chunk."""
    block = _block(8, radius=1, corr_dim=4, diff_dim=3).double()
    x = torch.randn(1, 7, 8, 2, 3, dtype=torch.float64)
    weight = torch.randn_like(x)
    (block(x) * weight).sum().backward()
    expected = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    streamed, state = _stream(block, x, [2, 3, 1, 1])
    (streamed * weight).sum().backward()
    # One scale for all: some gradients are rounding noise (diff_reduce's bias cancels out).
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, p in block.named_parameters():
        assert_close(p.grad, expected[name], scale=scale, msg=name)
    assert all(not t.requires_grad for t in state.detach().tensors())


@pytest.mark.parametrize("layout", ["map", "tokens"])
def test_causal_block_output_at_t_ignores_frames_after_t(layout):
    block = _block().double()
    if layout == "map":
        x = torch.randn(1, 6, 16, 2, 3, dtype=torch.float64)
        kw = {}
    else:
        x = torch.randn(1, 6, 1 + 6, 16, dtype=torch.float64)
        kw = dict(grid=(2, 3), num_prefix_tokens=1)
    base = block(x, **kw)
    for t in range(x.shape[1] - 1):
        future = x.clone()
        future[:, t + 1 :] = torch.randn_like(future[:, t + 1 :])
        out = block(future, **kw)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), t
        assert not torch.equal(out[:, t + 1], base[:, t + 1]), t


def test_temporal_conv_step_equals_causal_conv():
    x = torch.randn(2, 9, 3, 5, dtype=torch.float64)
    w, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    history = x.new_zeros(2, 3, 3, 5)
    outs = []
    for start, stop in [(0, 1), (1, 3), (3, 8), (8, 9)]:
        out, history = temporal_conv_step(x[:, start:stop], w, b, history)
        outs.append(out)
    assert_close(torch.cat(outs, 1), temporal_conv(x, w, b))
    assert torch.equal(history, x[:, -3:])
    one_tap, empty = temporal_conv_step(x, w[:, -1:], b, x.new_zeros(2, 0, 3, 5))
    assert empty.shape == (2, 0, 3, 5)
    assert_close(one_tap, temporal_conv(x, w[:, -1:], b))


def test_bidirectional_block_refuses_to_stream():
    block = _block(bidirectional=True)
    match = r"bidirectional: expected False.*bidirectional=False"
    with pytest.raises(ValueError, match=match):
        block.step(torch.randn(1, 2, 16, 2, 2))
    with pytest.raises(ValueError, match=match):
        block.init_stream(1, (2, 2))


def test_stream_errors():
    block = _block()
    _, state = block.step(torch.randn(2, 3, 16, 2, 2))
    with pytest.raises(ValueError, match=r"state: expected \(batch, locations, grid locations\)"):
        block.step(torch.randn(1, 3, 16, 2, 2), state)
    with pytest.raises(ValueError, match=r"state: expected \(batch, locations, grid locations\)"):
        block.step(torch.randn(2, 3, 1 + 4, 16), state, grid=(2, 2), num_prefix_tokens=1)
    with pytest.raises(TypeError, match="state: expected a PKS4StreamState"):
        block.step(torch.randn(2, 3, 16, 2, 2), {"scan": None})
    with pytest.raises(ValueError, match="x: expected at least one frame"):
        block.step(torch.randn(2, 0, 16, 2, 2), state)
    with pytest.raises(ValueError, match="grid: expected a pair of positive ints"):
        block.init_stream(2, (2, 0))
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        block.init_stream(0, (2, 2))


@pytest.mark.parametrize(
    "cues, motion",
    [
        (("cost", "displacement", "difference"), 0),
        (DEFAULT_PRIOR_CUES, 25 + 3),
        (PRIOR_CUES, 25 + 3 + 2 + 2),
    ],
)
def test_long_stream_has_constant_memory(cues, motion):
    """500 frames in chunks of 7: the state's tensors keep their shapes, the outputs stay finite."""
    block = _block(8, prior_dim=4, d_state=3, corr_dim=4, diff_dim=3, cues=cues)
    batch, grid, prefix = 2, (2, 3), 1
    state = block.init_stream(batch, grid, num_prefix_tokens=prefix)
    shapes = [(t.shape, t.dtype) for t in state.tensors()]
    HW, L, d_inner = 6, 7, 8
    # the previous frame's reduced features (and motion cues for "change"), two flags, the
    # causal conv's last inputs and the scan state
    numbers = batch * (HW * (4 + 3 + motion) + 2 + L * d_inner * (4 - 1 + 3))
    assert sum(t.numel() for t in state.tensors()) == numbers
    nbytes = state.nbytes
    g = torch.Generator().manual_seed(0)
    seen = 0
    with torch.no_grad():
        while seen < 500:
            size = min(7, 500 - seen)
            x = torch.randn(batch, size, prefix + HW, 8, generator=g)
            out, state = block.step(x, state, grid=grid, num_prefix_tokens=prefix)
            assert out.shape == x.shape and torch.isfinite(out).all()
            assert [(t.shape, t.dtype) for t in state.tensors()] == shapes
            assert state.nbytes == nbytes
            seen += size
    assert isinstance(state, PKS4StreamState)
    assert all(torch.isfinite(t.float()).all() for t in state.tensors())


# --- the classifier -------------------------------------------------------------------------


def _classifier(temporal: str, backbone: str = "cnn", **kw) -> PKS4VideoClassifier:
    torch.manual_seed(0)
    if backbone == "cnn":
        from pks4_layers.models import FrameBackbone

        net, size = FrameBackbone(TinyCNN(), num_features=8), 12
    else:
        timm = pytest.importorskip("timm")
        net = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=1)
        size = 32
    if temporal == "pks4":
        kw.setdefault("block_kwargs", dict(bidirectional=False, prior_dim=6, d_state=4))
    model = PKS4VideoClassifier(net, num_classes=5, num_frames=8, temporal=temporal, **kw).eval()
    if temporal == "pks4":
        with torch.no_grad():
            model.temporal.scan.out_proj.weight.normal_(std=0.5)
    return model.double(), size


@pytest.mark.parametrize(
    "temporal, backbone, token_pool",
    [
        ("pks4", "cnn", "avg"),
        ("pks4-features", "cnn", "avg"),
        ("mean", "cnn", "avg"),
        ("pks4", "vit", "avg"),
        ("pks4", "vit", "prefix"),
    ],
)
def test_classifier_stream_equals_forward(temporal, backbone, token_pool):
    kw = {"preset": "features"} if temporal == "pks4-features" else {}
    model, size = _classifier(temporal.split("-")[0], backbone, token_pool=token_pool, **kw)
    clip = torch.randn(2, 8, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected = model(clip)
        state, seen = model.init_stream(2, dtype=torch.float64), 0
        for chunk in [2, 5, 1]:
            logits, state = model.step(clip[:, seen : seen + chunk], state)
            seen += chunk
            # Running logits: those of the mean over the frames seen so far (both heads with
            # the factored readout, PKS4's default).
            feats = model.backbone(clip[:, :seen])
            out = model.forward_temporal(feats)
            if model.motion_head is None:
                assert_close(logits, model.forward_head(model.pool(out)))
            else:
                assert_close(logits, combine_heads(*model.forward_heads(feats, out)))
    assert logits.shape == (2, 5) and state.frames_seen == 8
    assert_close(logits, expected)
    assert (state.temporal is None) == (temporal == "mean")


def test_classifier_stream_is_not_bound_to_num_frames():
    model, size = _classifier("pks4")
    state = None
    with torch.no_grad():
        for _ in range(4):
            logits, state = model.step(torch.randn(1, 3, 3, size, size, dtype=torch.float64), state)
    assert state.frames_seen == 12 and torch.isfinite(logits).all()
    assert state.pooled_sum.shape == (1, 8)


def test_classifier_refuses_non_causal_temporal_modules():
    model, size = _classifier("tconv")
    with pytest.raises(ValueError, match=r"temporal: expected 'mean' or 'pks4'.*got 'tconv'"):
        model.init_stream(1)
    bidirectional, _ = _classifier("pks4", block_kwargs=dict(prior_dim=6, d_state=4))
    with pytest.raises(ValueError, match=r"bidirectional=False"):
        bidirectional.step(torch.randn(1, 2, 3, size, size, dtype=torch.float64))
    causal, _ = _classifier("pks4")
    _, state = causal.step(torch.randn(2, 2, 3, size, size, dtype=torch.float64))
    with pytest.raises(ValueError, match="state: expected batch size 1"):
        causal.step(torch.randn(1, 2, 3, size, size, dtype=torch.float64), state)
    with pytest.raises(ValueError, match=r"x: expected at least one frame"):
        causal.step(torch.randn(2, 0, 3, size, size, dtype=torch.float64), state)


@pytest.mark.parametrize(
    "options",
    [
        {"cues": PRIOR_CUES},
        {"corr_dim": None},
        {"cues": ("curl", "difference", "change")},
        {"cues": ("flow", "change"), "corr_dim": None},
    ],
    ids=["all-cues", "unreduced", "curl-only", "flow-only"],
)
def test_stream_equals_whole_clip_with_the_research_cues(options):
    block = _block(**options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, 16, 3, 4, generator=g)
    with torch.no_grad():
        expected = block(x)
        streamed, _ = _stream(block, x, CHUNKINGS["uneven"])
    assert_close(streamed, expected, scale=float(expected.abs().max()))
