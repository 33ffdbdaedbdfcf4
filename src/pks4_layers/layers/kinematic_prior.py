"""``KinematicPriorEncoder``: motion priors from neighbouring frames.

This is our interpretation of the kinematic prior of Zeng et al., "PKS^4: Parallel Kinematic
Selective State Space Scanners for Efficient Video Understanding" (arXiv:2604.26461), built from
its abstract; the paper's exact formulas were not available. Three cues per frame and location:

* displacement: a local correlation cost volume between frame ``t`` and frame ``t-1`` over a
  ``(2r+1)^2`` window of displacements, on L2-normalised, channel-reduced features, summarised
  by a soft-argmax displacement ``(dx, dy)`` and a confidence (one minus the normalised entropy
  of the match distribution);
* motion boundaries: the difference of reduced features between ``t`` and ``t-1``, passed
  through a small spatial convolution so that it sees where motion starts and stops;
* change of motion: the displacement cues of frame pair ``(t-1, t)`` minus those of
  ``(t-2, t-1)``, a per-location acceleration: where a motion starts, stops or turns;
* curl and divergence (``"curl"``, not in the default): of the displacement field, by central
  differences between neighbouring locations: how neighbours move relative to each other, the
  same sign of curl everywhere in a rotation, of divergence in an expansion, whatever the
  location; a per-location displacement averaged over space cannot tell a clockwise from a
  counter-clockwise turn;
* gradient flow (``"flow"``, not in the default): the least-squares displacement ``(u, v)``
  that explains the change of the features between ``t-1`` and ``t`` by their spatial
  gradient (the brightness-constancy constraint of every channel, as in Lucas-Kanade, solved
  per location over the channels): a motion far smaller than one feature cell moves no match
  of the cost volume but changes every feature in proportion to it.

Frame 0 has no predecessor: its cost volume, displacement, confidence and difference are zero,
and a ``has_previous`` channel tells the fusion which frames had one; likewise the change is
zero at frames 0 and 1, with its own flag. Nothing wraps around.

Which cues reach the fusion is a constructor argument (``cues``), so that each can be left out
and measured; a branch whose cues are all left out is not built.

The prior of frame ``t`` depends on frames ``t``, ``t-1`` and (with the change cue) ``t-2`` only,
so it streams: ``KinematicPriorEncoder.step`` keeps the previous frame's reduced features (and
motion cues) between chunks.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._checks import check_grid, check_same_dtype, check_tokens
from .masked_batch_norm import MaskedBatchNorm
from .stream_state import PriorStreamState
from .weight_decay import no_weight_decay_names

# Every cue the encoder can keep, and the default set (what the ablations chose).
PRIOR_CUES = ("cost", "displacement", "difference", "change", "curl", "flow")
# The cues read from the correlation features (the cosine-normalised, optionally reduced ones).
CORRELATION_CUES = ("cost", "displacement", "curl", "flow")
DEFAULT_PRIOR_CUES = ("cost", "displacement", "difference", "change")
# Central differences along x and y of a (N, 2, H, W) field, zero beyond the map.
_DIFF_X = (-0.5, 0.0, 0.5)
PRIOR_NORMS = ("none", "layer")
MOTION_NORMS = ("none", "batch")


def local_correlation(current: Tensor, previous: Tensor, radius: int) -> Tensor:
    """Cost volume of ``current`` against ``previous`` over a ``(2r+1)^2`` window.

    Args:
        current, previous: ``(N, C, H, W)`` feature maps.
        radius: largest displacement ``r`` along each axis.

    Returns:
        ``(N, (2r+1)^2, H, W)``: entry ``k`` at ``(y, x)`` is ``<current[y, x],
        previous[y + dy_k, x + dx_k]>`` with displacements in row-major order (``dy`` outer);
        positions outside the map correlate to zero.
    """
    return _LocalCorrelation.apply(current, previous, radius)


def _channels_last(current: Tensor, previous: Tensor, radius: int) -> tuple[Tensor, Tensor]:
    """``current`` as ``(N, H, W, C)`` and ``previous`` zero-padded by ``radius`` as ``(N, H+2r,
    W+2r, C)``, both contiguous: every displacement's window is then a run of whole channel
    vectors, and its dot products reduce along contiguous memory. Half precision is computed
    in float32 (these copies are made anyway), rounded once at the end."""
    dtype = torch.float32 if current.element_size() < 4 else current.dtype
    pad = (radius, radius, radius, radius)
    return (
        current.permute(0, 2, 3, 1).to(dtype).contiguous(),
        F.pad(previous, pad).permute(0, 2, 3, 1).to(dtype).contiguous(),
    )


class _LocalCorrelation(torch.autograd.Function):
    """:func:`local_correlation`, channels last, with a backward that accumulates every
    displacement's gradient in place. Autograd through windows of a ``(N, C, H, W)`` map
    reduced over strided channels and zero-filled a padded-size gradient per displacement: at
    width 1280 on a 3x3 map that was three quarters of the whole block's time on the CPU, 3.3
    times this. Only the inputs are saved; the backward is made of differentiable ops, so
    double backward works."""

    @staticmethod
    def forward(ctx, current: Tensor, previous: Tensor, radius: int) -> Tensor:
        ctx.save_for_backward(current, previous)
        ctx.radius = radius
        H, W = current.shape[-2:]
        cur, padded = _channels_last(current, previous, radius)
        side = 2 * radius + 1
        costs = [
            torch.linalg.vecdot(cur, padded[:, dy : dy + H, dx : dx + W])
            for dy in range(side)
            for dx in range(side)
        ]
        return torch.stack(costs, dim=1).to(current.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        current, previous = ctx.saved_tensors
        r = ctx.radius
        H, W = current.shape[-2:]
        cur, padded = _channels_last(current, previous, r)
        g = grad.permute(0, 2, 3, 1).unsqueeze(-1).to(cur.dtype)  # (N, H, W, K, 1)
        side = 2 * r + 1
        grad_cur = torch.zeros_like(cur) if ctx.needs_input_grad[0] else None
        # previous[y + dy, x + dx] met current[y, x] with weight grad[k, y, x]: its gradient
        # gathers grad_k * current at that offset of one padded map, cropped at the end.
        grad_padded = torch.zeros_like(padded) if ctx.needs_input_grad[1] else None
        for k in range(side * side):
            dy, dx = divmod(k, side)
            if grad_cur is not None:
                grad_cur.addcmul_(g[..., k, :], padded[:, dy : dy + H, dx : dx + W])
            if grad_padded is not None:
                grad_padded[:, dy : dy + H, dx : dx + W].addcmul_(g[..., k, :], cur)
        grad_current = grad_previous = None
        if grad_cur is not None:
            grad_current = grad_cur.permute(0, 3, 1, 2).to(current.dtype)
        if grad_padded is not None:
            grad_previous = grad_padded[:, r : r + H, r : r + W].permute(0, 3, 1, 2)
            grad_previous = grad_previous.to(previous.dtype)
        return grad_current, grad_previous, None


def curl_divergence(velocity: Tensor, H: int, W: int) -> Tensor:
    """Curl ``d(vy)/dx - d(vx)/dy`` and divergence ``d(vx)/dx + d(vy)/dy`` of a displacement
    field ``(B, T, H*W, 2)`` (``(vx, vy)`` per location, row-major), by central differences
    with zeros beyond the map: ``(B, T, H*W, 2)``."""
    Bsz = velocity.shape[0]
    field = rearrange(velocity, "b t (h w) c -> (b t) c h w", h=H, w=W)
    kernel = field.new_tensor(_DIFF_X)
    # d/dx and d/dy of both components at once: depthwise convolutions along one axis.
    ddx = F.conv2d(field, kernel.view(1, 1, 1, 3).expand(2, 1, 1, 3), padding=(0, 1), groups=2)
    ddy = F.conv2d(field, kernel.view(1, 1, 3, 1).expand(2, 1, 3, 1), padding=(1, 0), groups=2)
    curl = ddx[:, 1] - ddy[:, 0]
    divergence = ddx[:, 0] + ddy[:, 1]
    out = torch.stack([curl, divergence], dim=1)
    return rearrange(out, "(b t) c h w -> b t (h w) c", b=Bsz)


def _spatial_gradient(maps: Tensor, dim: int) -> Tensor:
    """``d/dx`` (``dim=-1``) or ``d/dy`` (``dim=-2``) of ``(..., H, W)`` maps: central
    differences inside, one-sided at the edges (``torch.gradient``'s ``edge_order=1``), zero
    along an axis of size 1."""
    n = maps.shape[dim]
    if n < 2:
        return torch.zeros_like(maps)
    edge_first = maps.narrow(dim, 1, 1) - maps.narrow(dim, 0, 1)
    edge_last = maps.narrow(dim, n - 1, 1) - maps.narrow(dim, n - 2, 1)
    if n == 2:
        return torch.cat([edge_first, edge_last], dim)
    inner = 0.5 * (maps.narrow(dim, 2, n - 2) - maps.narrow(dim, 0, n - 2))
    return torch.cat([edge_first, inner, edge_last], dim)


def gradient_flow(
    current: Tensor, previous: Tensor, H: int, W: int, damping: float = 0.1
) -> Tensor:
    """The displacement ``(u, v)`` per location, in feature cells per frame, that best explains
    ``current - previous`` by the features' spatial gradient ``(gx, gy)``: for a pattern that
    moved by ``(u, v)``, ``current - previous ~ -(u gx + v gy)`` in every channel. The 2x2
    normal equations summed over the channels are solved per location, their diagonal damped
    by ``damping`` times its mean (a flat location gives zero, not noise).

    Args:
        current, previous: ``(B, T, H*W, C)`` features of frames ``t`` and ``t-1``
            (row-major locations).
    Returns:
        ``(B, T, H*W, 2)`` in ``current``'s dtype (computed in at least float32).
    """
    dtype = current.dtype
    if current.element_size() < 4:
        current, previous = current.float(), previous.float()
    change = current - previous  # (B, T, L, C)
    # The gradient of the pair's mean: symmetric in the two frames.
    mean = rearrange(0.5 * (current + previous), "b t (h w) c -> b t c h w", h=H, w=W)
    gx = rearrange(_spatial_gradient(mean, -1), "b t c h w -> b t (h w) c")
    gy = rearrange(_spatial_gradient(mean, -2), "b t c h w -> b t (h w) c")
    sxx, syy, sxy = (gx * gx).sum(-1), (gy * gy).sum(-1), (gx * gy).sum(-1)
    bx, by = -(gx * change).sum(-1), -(gy * change).sum(-1)
    # The floor keeps a location with no gradient at all (a constant map) finite: u = v = 0.
    ridge = damping * 0.5 * (sxx + syy) + torch.finfo(sxx.dtype).tiny ** 0.5
    sxx, syy = sxx + ridge, syy + ridge
    det = sxx * syy - sxy * sxy
    u = (syy * bx - sxy * by) / det
    v = (sxx * by - sxy * bx) / det
    return torch.stack([u, v], dim=-1).to(dtype)


class KinematicPriorEncoder(nn.Module):
    """Kinematic prior per frame and location from the frame and its predecessor.

    Args:
        dim: channels of the input features.
        prior_dim: channels of the returned prior.
        radius: correlation window radius ``r`` (``(2r+1)^2`` displacements).
        corr_dim: channels the features are reduced to before correlation (a learnt linear
            map); ``None`` correlates the input features themselves, nothing learnt.
        diff_dim: channels of the frame-difference branch.
        cues: the cues fused into the prior, a subset of ``("cost", "displacement",
            "difference", "change")``: the cost volume itself, its soft-argmax displacement
            ``(dx, dy)`` with the match confidence, the frame-difference features, the change
            of the kept cost-volume and displacement cues since the previous frame pair (needs
            ``"cost"``, ``"displacement"`` or ``"curl"``), the curl and divergence of the
            displacement field, the gradient flow ``(u, v)`` (:func:`gradient_flow`: sub-cell
            motion).
        corr_temperature: initial scale of the cosine similarities in the match softmax.
        learn_corr_temperature: learn that scale (``False`` keeps it fixed).
        prior_norm: ``"layer"`` puts a LayerNorm on the fused prior (unit scale whatever the
            cues' scales), ``"none"`` leaves it as the fusion MLP gives it.
        motion_norm: ``"batch"`` standardises each motion cue channel (cost volume,
            displacement, confidence, curl and divergence) over the data before the fusion
            (:class:`MaskedBatchNorm`: batch statistics in training, running ones in evaluation;
            the cost volume's padding beyond the map and the frames without a predecessor left
            out and kept zero), so that the small differences of a small motion reach the fusion
            at unit scale; ``"none"`` fuses them as computed.
        device, dtype: where and in which dtype the parameters are created.

    Shapes:
        input ``x``: ``(B, T, L, dim)`` with ``L = H * W`` in row-major order and ``grid = (H, W)``.
        output: ``(B, T, L, prior_dim)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        prior_dim: int = 32,
        radius: int = 2,
        corr_dim: Optional[int] = 64,
        diff_dim: int = 32,
        cues: Sequence[str] = DEFAULT_PRIOR_CUES,
        corr_temperature: float = 10.0,
        learn_corr_temperature: bool = True,
        prior_norm: Literal["layer", "none"] = "layer",
        motion_norm: Literal["none", "batch"] = "none",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if radius < 0:
            raise ValueError(f"radius: expected >= 0, got {radius}")
        cues = tuple(cues) if not isinstance(cues, str) else (cues,)
        if not cues or any(c not in PRIOR_CUES for c in cues) or len(set(cues)) != len(cues):
            raise ValueError(
                f"cues: expected a non-empty subset of {list(PRIOR_CUES)}, got {list(cues)}"
            )
        if "change" in cues and not set(CORRELATION_CUES) & set(cues):
            raise ValueError(
                f"cues: expected 'cost', 'displacement', 'curl' or 'flow' with 'change' (the "
                f"change of those cues), got {list(cues)}"
            )
        if corr_dim is not None and (not isinstance(corr_dim, int) or corr_dim < 1):
            raise ValueError(f"corr_dim: expected a positive int or None, got {corr_dim!r}")
        if not corr_temperature > 0:
            raise ValueError(f"corr_temperature: expected > 0, got {corr_temperature!r}")
        if prior_norm not in PRIOR_NORMS:
            raise ValueError(f"prior_norm: expected one of {list(PRIOR_NORMS)}, got {prior_norm!r}")
        if motion_norm not in MOTION_NORMS:
            raise ValueError(
                f"motion_norm: expected one of {list(MOTION_NORMS)}, got {motion_norm!r}"
            )
        self.dim = dim
        self.prior_dim = prior_dim
        self.radius = radius
        self.num_displacements = (2 * radius + 1) ** 2
        self.cues = tuple(c for c in PRIOR_CUES if c in cues)
        self.uses_correlation = bool(set(CORRELATION_CUES) & set(cues))
        self.matches = "displacement" in cues or "curl" in cues
        self.reduces = corr_dim is not None
        self.corr_dim = (corr_dim if self.reduces else dim) if self.uses_correlation else 0
        self.diff_dim = diff_dim if "difference" in cues else 0

        if self.uses_correlation:
            self.corr_reduce = (
                nn.Linear(dim, corr_dim, bias=False) if self.reduces else nn.Identity()
            )
        if self.matches:
            # Cosine similarities lie in [-1, 1]; a scale sharpens the match distribution.
            log_scale = torch.tensor(math.log(corr_temperature))
            if learn_corr_temperature:
                self.corr_log_scale = nn.Parameter(log_scale)
            else:
                self.register_buffer("corr_log_scale", log_scale)
            offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
            dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
            self.register_buffer(
                "displacements", torch.stack([dx.flatten(), dy.flatten()], -1), False
            )
        if self.diff_dim:
            self.diff_reduce = nn.Linear(dim, diff_dim)
            self.diff_conv = nn.Conv2d(diff_dim, diff_dim, kernel_size=3, padding=1)

        # per cue: cost volume (K), (dx, dy) and confidence (3), curl and divergence (2),
        # gradient flow (2); has_previous; differences
        self.motion_dim = (
            (self.num_displacements if "cost" in cues else 0)
            + (3 if "displacement" in cues else 0)
            + (2 if "curl" in cues else 0)
            + (2 if "flow" in cues else 0)
        )
        self.change_dim = self.motion_dim + 1 if "change" in cues else 0
        self.motion_norm = motion_norm
        self.motion_bn = (
            MaskedBatchNorm(self.motion_dim) if motion_norm == "batch" and self.motion_dim else None
        )
        # The motion cues a stream carries to the next chunk: only the change cue reads them.
        self.carried_motion_dim = self.motion_dim if self.change_dim else 0
        fused_in = self.motion_dim + 1 + self.diff_dim + self.change_dim
        self.fuse = nn.Sequential(
            nn.Linear(fused_in, 2 * prior_dim),
            nn.GELU(),
            nn.Linear(2 * prior_dim, prior_dim),
        )
        self.norm = nn.LayerNorm(prior_dim) if prior_norm == "layer" else nn.Identity()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay: biases, norms, the match temperature."""
        return no_weight_decay_names(self)

    @property
    def _param(self) -> Tensor:
        """A parameter that every configuration has: the reference for device and dtype."""
        return self.fuse[0].weight

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        check_tokens("x", x, self.dim)
        check_same_dtype("x", x, "the module's parameters", self._param)
        H, W = check_grid(grid, x.shape[2])
        return self._encode(x, H, W, None)[0]

    def init_stream(
        self,
        batch_size: int,
        num_locations: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> PriorStreamState:
        """The state before the first frame of a stream: no previous frame.

        Args:
            batch_size: ``B``.
            num_locations: ``H * W`` of the grid.
            device, dtype: those of the features to come (default: the module's parameters').
        """
        ref = self._param
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        return PriorStreamState(
            previous_corr=torch.zeros(
                batch_size, num_locations, self.corr_dim, device=device, dtype=dtype
            ),
            previous_diff=torch.zeros(
                batch_size, num_locations, self.diff_dim, device=device, dtype=dtype
            ),
            has_previous=torch.zeros(batch_size, dtype=torch.bool, device=device),
            previous_motion=torch.zeros(
                batch_size,
                num_locations,
                self.carried_motion_dim,
                device=device,
                dtype=dtype,
            ),
            previous_has_motion=torch.zeros(batch_size, dtype=torch.bool, device=device),
        )

    def step(
        self, x: Tensor, grid: tuple[int, int], state: Optional[PriorStreamState] = None
    ) -> tuple[Tensor, PriorStreamState]:
        """The prior of the next chunk of a stream, and the state for the chunk after it.

        Args:
            x: ``(B, T, L, dim)``, the chunk's frames (``T >= 1``).
            grid: ``(H, W)`` with ``H * W == L``.
            state: from :meth:`init_stream` or the previous call; ``None`` starts a stream.

        Returns:
            the prior ``(B, T, L, prior_dim)``, equal to that of the same frames in a call on
            the whole stream so far, and the new state.
        """
        check_tokens("x", x, self.dim)
        check_same_dtype("x", x, "the module's parameters", self._param)
        H, W = check_grid(grid, x.shape[2])
        if state is None:
            state = self.init_stream(x.shape[0], x.shape[2], x.device, x.dtype)
        Bsz, L = x.shape[0], x.shape[2]
        for name, channels, why in (
            ("previous_corr", self.corr_dim, "batch and locations of x"),
            (
                "previous_motion",
                self.carried_motion_dim,
                "batch and locations of x, this encoder's cues",
            ),
        ):
            got = tuple(getattr(state, name).shape)
            if got != (Bsz, L, channels):
                raise ValueError(
                    f"state: expected {name} of shape {(Bsz, L, channels)} ({why}), got {got}"
                )
        return self._encode(x, H, W, state)

    def _encode(
        self, x: Tensor, H: int, W: int, state: Optional[PriorStreamState]
    ) -> tuple[Tensor, Optional[PriorStreamState]]:
        """The prior and, when streaming, the state after the chunk (``None`` otherwise).
        Without a state, frame 0 has no predecessor; with one, frame 0's predecessor is the
        state's, if it has one (``has_previous``)."""
        Bsz, T, L, _ = x.shape
        # keep[b, t]: frame t has a predecessor.
        keep = torch.ones(Bsz, T, dtype=torch.bool, device=x.device)
        keep[:, 0] = False if state is None else state.has_previous
        none = x.new_zeros(Bsz, T, L, 0)
        motion = boundaries = corr = diff = none
        if state is None:
            if self.uses_correlation:
                motion = self._displacement_cues(x, H, W)  # (B, T, L, motion_dim)
            if self.diff_dim:
                boundaries = self._difference_cues(x, H, W)  # (B, T, L, diff_dim)
        else:
            if self.uses_correlation:
                corr = F.normalize(self.corr_reduce(x), dim=-1)
                motion = self._displacement_cues(x, H, W, state, keep, corr)
            if self.diff_dim:
                diff = self.diff_reduce(x)
                boundaries = self._difference_cues(x, H, W, state, keep, diff)
        has_previous = keep.to(x.dtype)[..., None, None].expand(Bsz, T, L, 1)
        change = none
        if self.change_dim:
            change = self._change_cues(motion, keep, state)
        prior = self.norm(self.fuse(torch.cat([motion, has_previous, boundaries, change], dim=-1)))
        if state is None:
            return prior, None
        # Copies, not views: the state must not keep the whole chunk alive.
        return prior, PriorStreamState(
            previous_corr=corr[:, -1].clone(),
            previous_diff=diff[:, -1].clone(),
            has_previous=torch.ones_like(state.has_previous),
            previous_motion=motion[:, -1, :, : self.carried_motion_dim].clone(),
            previous_has_motion=keep[:, -1].clone(),
        )

    def _change_cues(
        self, motion: Tensor, keep: Tensor, state: Optional[PriorStreamState]
    ) -> Tensor:
        """How the motion cues changed since the previous frame pair: ``motion[t] -
        motion[t-1]`` where frames ``t`` and ``t-1`` both have a predecessor (zero elsewhere),
        and that flag: ``(B, T, L, motion_dim + 1)``."""
        Bsz, T, L, _ = motion.shape
        if state is None:
            before = motion.new_zeros(Bsz, 1, L, self.motion_dim)
            had = torch.zeros(Bsz, 1, dtype=torch.bool, device=motion.device)
        else:
            before = state.previous_motion.unsqueeze(1).to(motion.dtype)
            had = state.previous_has_motion.unsqueeze(1)
        # narrow, not slices: see _displacement_cues.
        previous = torch.cat([before, motion.narrow(1, 0, T - 1)], 1)
        both = (keep & torch.cat([had, keep.narrow(1, 0, T - 1)], 1))[..., None, None]
        step = torch.where(both, motion - previous, motion.new_zeros(()))
        return torch.cat([step, both.to(motion.dtype).expand(Bsz, T, L, 1)], dim=-1)

    def _displacement_cues(
        self,
        x: Tensor,
        H: int,
        W: int,
        state: Optional[PriorStreamState] = None,
        keep: Optional[Tensor] = None,
        feats: Optional[Tensor] = None,
    ) -> Tensor:
        """The kept ones of cost volume ``K``, displacement and confidence ``3``:
        ``(B, T, L, motion_dim)``; with a stream
        ``state``, ``keep`` ``(B, T)`` says which frames have a predecessor and ``feats`` are
        the chunk's normalised reduced features."""
        Bsz, T, L, _ = x.shape
        first = x.new_zeros(Bsz, 1, L, self.motion_dim)  # frame 0: no predecessor, no motion
        if state is None and T < 2:
            return first
        if feats is None:
            feats = F.normalize(self.corr_reduce(x), dim=-1)
        # Frames t >= 1 and t - 1 by narrow, not feats[:, 1:]: under torch 2.5's export a full
        # slice of the batch dimension adds a guard that an unbounded dynamic batch violates.
        if state is None:
            current, previous = feats.narrow(1, 1, T - 1), feats.narrow(1, 0, T - 1)
        else:
            current = feats
            stored = state.previous_corr.unsqueeze(1).to(feats.dtype)
            previous = torch.cat([stored, feats.narrow(1, 0, T - 1)], 1)
        kept = []
        if "cost" in self.cues or self.matches:
            cost = local_correlation(
                rearrange(current, "b t (h w) c -> (b t) c h w", h=H, w=W),
                rearrange(previous, "b t (h w) c -> (b t) c h w", h=H, w=W),
                self.radius,
            )
            cost = rearrange(cost, "(b t) k h w -> b t (h w) k", b=Bsz)
            kept = [cost] if "cost" in self.cues else []
        if self.matches:
            velocity, confidence = self._match_summary(cost)
            if "displacement" in self.cues:
                kept += [velocity, confidence]
            if "curl" in self.cues:
                kept.append(curl_divergence(velocity, H, W))
        if "flow" in self.cues:
            kept.append(gradient_flow(current, previous, H, W))
        later = torch.cat(kept, dim=-1).to(first.dtype)
        if self.motion_bn is not None:
            valid = self._valid_motion(H, W, x.device)  # (L, motion_dim)
            if state is not None:
                valid = valid & keep[..., None, None]
            later = self.motion_bn(later, valid)
        if state is None:
            return torch.cat([first, later], dim=1)
        # A stream's first frame has no predecessor either: the same zeros, whatever the
        # (zero) stored features gave.
        return torch.where(keep[..., None, None], later, first.new_zeros(()))

    def _valid_motion(self, H: int, W: int, device: torch.device) -> Tensor:
        """Which motion cue channels hold data at each location, ``(L, motion_dim)``: the cost of
        a displacement that reaches beyond the map is padding; the other cues are data."""
        valid = torch.ones(H * W, self.motion_dim, dtype=torch.bool, device=device)
        if "cost" in self.cues:
            r = self.radius
            offsets = torch.arange(-r, r + 1, device=device)
            # Displacement k = (dy, dx) in row-major order compares location (y, x) of frame t
            # with (y + dy, x + dx) of frame t - 1 (local_correlation's order).
            ys = torch.arange(H, device=device)[:, None] + offsets  # (H, 2r+1)
            xs = torch.arange(W, device=device)[:, None] + offsets  # (W, 2r+1)
            inside_y = (ys >= 0) & (ys < H)
            inside_x = (xs >= 0) & (xs < W)
            inside = inside_y[:, None, :, None] & inside_x[None, :, None, :]  # (H, W, dy, dx)
            valid[:, : self.num_displacements] = inside.reshape(H * W, self.num_displacements)
        return valid

    def _match_summary(self, cost: Tensor) -> list[Tensor]:
        """Soft-argmax displacement ``(.., 2)`` and confidence ``(.., 1)`` of a cost volume."""
        K = self.num_displacements
        match = torch.softmax(cost * self.corr_log_scale.exp(), dim=-1)
        # The content at this location sat at (location + offset) in frame t-1, so it moved
        # by -offset: report the motion, in feature-map cells per frame.
        velocity = -match @ self.displacements.to(match.dtype)
        # At least float32: the floor that keeps log finite (and its gradient) where a match
        # weight underflows to 0 would itself round to 0 in float16.
        match32 = match.float() if match.element_size() < 4 else match
        entropy = -(match32 * torch.log(match32.clamp_min(1e-12))).sum(-1, keepdim=True)
        entropy = entropy.to(match.dtype)
        confidence = 1.0 - entropy / math.log(K) if K > 1 else torch.ones_like(entropy)
        return [velocity, confidence]

    def _difference_cues(
        self,
        x: Tensor,
        H: int,
        W: int,
        state: Optional[PriorStreamState] = None,
        keep: Optional[Tensor] = None,
        reduced: Optional[Tensor] = None,
    ) -> Tensor:
        """Frame-difference features ``(B, T, L, diff_dim)``; ``state`` and ``keep`` as in
        :meth:`_displacement_cues`, ``reduced`` the chunk's ``diff_reduce(x)``."""
        if reduced is None:
            reduced = self.diff_reduce(x)  # (B, T, L, diff_dim)
        T = reduced.shape[1]
        # narrow, not slices: see _displacement_cues.
        if state is None:
            diff = torch.cat(
                [
                    torch.zeros_like(reduced.narrow(1, 0, 1)),
                    reduced.narrow(1, 1, T - 1) - reduced.narrow(1, 0, T - 1),
                ],
                1,
            )
        else:
            stored = state.previous_diff.unsqueeze(1).to(reduced.dtype)
            previous = torch.cat([stored, reduced.narrow(1, 0, T - 1)], 1)
            diff = torch.where(keep[..., None, None], reduced - previous, reduced.new_zeros(()))
        maps = rearrange(diff, "b t (h w) c -> (b t) c h w", h=H, w=W)
        edges = F.gelu(self.diff_conv(maps))
        return rearrange(edges, "(b t) c h w -> b t (h w) c", b=x.shape[0])

    def extra_repr(self) -> str:
        corr = self.corr_dim if self.reduces else "None (the input features)"
        return (
            f"dim={self.dim}, prior_dim={self.prior_dim}, radius={self.radius}, cues={self.cues}, "
            f"corr_dim={corr}"
        )
