"""The temporal convolution: against causal-conv1d's own reference, causality, the mirrored path."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from external_refs import load_causal_conv1d_ref
from pks4_layers.layers.temporal_conv import causal_conv1d_torch, temporal_conv
from tolerances import assert_close


@pytest.fixture(scope="module")
def causal_conv1d_ref():
    fn, reason = load_causal_conv1d_ref()
    if fn is None:
        pytest.skip(reason)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,dim,seqlen,width", [(2, 8, 16, 4), (3, 5, 1, 4), (1, 7, 9, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_causal_conv1d_ref(causal_conv1d_ref, batch, dim, seqlen, width, dtype, with_bias):
    torch.manual_seed(0)
    x = torch.randn(batch, dim, seqlen, dtype=dtype, requires_grad=True)
    w = torch.randn(dim, width, dtype=dtype, requires_grad=True)
    b = torch.randn(dim, dtype=dtype, requires_grad=True) if with_bias else None
    ours = causal_conv1d_torch(x, w, b)
    theirs = causal_conv1d_ref(x, w, b)
    assert_close(ours, theirs)
    g = torch.randn_like(ours)
    inputs = [x, w] + ([b] if with_bias else [])
    for a, e in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g)):
        assert_close(a, e)


def test_layout_wrapper_matches_ref(causal_conv1d_ref):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 5, 8)  # (B, T, L, D)
    w, b = torch.randn(8, 4), torch.randn(8)
    expected = causal_conv1d_ref(rearrange(x, "b t l d -> (b l) d t"), w, b)
    assert_close(temporal_conv(x, w, b), rearrange(expected, "(b l) d t -> b t l d", b=2))


def test_reverse_is_flip_conv_flip():
    torch.manual_seed(2)
    x = torch.randn(2, 7, 3, 5)
    w, b = torch.randn(5, 4), torch.randn(5)
    expected = temporal_conv(x.flip(1), w, b).flip(1)
    assert_close(temporal_conv(x, w, b, reverse=True), expected)


@pytest.mark.parametrize("reverse", [False, True])
def test_sees_only_its_own_side_of_time(reverse):
    torch.manual_seed(3)
    x = torch.randn(1, 9, 2, 4)
    w = torch.randn(4, 4)
    y0 = temporal_conv(x, w, None, reverse=reverse)
    x2 = x.clone()
    x2[:, 4] += 1.0
    changed = (temporal_conv(x2, w, None, reverse=reverse) - y0).abs().amax(dim=(0, 2, 3)) > 0
    frames = torch.arange(9)
    # A causal conv of width 4 lets frame 4 reach frames 4..7; the mirrored one frames 1..4.
    expect = (frames >= 4) & (frames <= 7) if not reverse else (frames >= 1) & (frames <= 4)
    assert torch.equal(changed, expect)
