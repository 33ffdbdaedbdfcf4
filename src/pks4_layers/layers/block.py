"""``PKS4Block``: kinematic priors + parallel temporal scan + residual, after any 2D backbone.

Our interpretation of the PKS4 module of Zeng et al., "PKS^4: Parallel Kinematic Selective State
Space Scanners for Efficient Video Understanding" (arXiv:2604.26461), built from its abstract.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops.motion_scan import ScanBackend
from ._checks import (
    check_grid,
    check_same_device,
    check_same_dtype,
    check_tokens,
)
from .kinematic_prior import DEFAULT_PRIOR_CUES, KinematicPriorEncoder
from .layout import from_tokens, to_tokens
from .recompute import maybe_recompute
from .stream_state import PKS4StreamState
from .temporal_scan import ParallelTemporalScan
from .weight_decay import no_weight_decay_names

OUTPUT_INITS = ("zero", "small")


def _record_layout(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A state dict's metadata names the library version and the block's configuration, so
    that a state that does not fit says who wrote it and how it was built."""
    from .. import __version__

    local_metadata["library_version"] = __version__
    local_metadata["config"] = module.extra_repr()


SCAN_INPUTS = ("features", "prior")


class PKS4Block(nn.Module):
    """Temporal modelling block that returns its input's shape.

    ``x + out_proj(scan(h, prior(h)))`` with ``h = down(norm(x))``: a LayerNorm, a linear map to
    ``inner_dim`` channels (none when ``inner_dim == dim``), a :class:`KinematicPriorEncoder` on
    the spatial locations, a :class:`ParallelTemporalScan` on every location (prefix tokens
    included) whose output projection maps back to ``dim``, a residual connection. The output
    projection starts at zero (``out_init="zero"``), so a freshly inserted block is the
    identity and a pretrained backbone's behaviour is unchanged at step 0.

    User settings: ``dim``, ``inner_dim``, ``d_state``, ``expand``, ``bidirectional``,
    ``backend``, ``device``, ``dtype``. Every other argument is a research setting (experimental):
    the ablations of the motion suite use it, its default is what they chose, and it may change
    in a minor version (with a line in the changelog).

    Args:
        dim: channels ``C`` of the features.
        prior_dim: channels of the kinematic prior.
        d_state: state size of the scan.
        expand: the scan's inner width is ``expand * dim``.
        radius: correlation window radius of the prior encoder.
        d_conv: width of the scan's temporal convolution.
        bidirectional: forward and reverse scans; ``False`` gives a causal block (the output
            at frame ``t`` depends on frames ``<= t`` only), which can stream.
        corr_dim, diff_dim: channel reductions inside the prior encoder.
        backend: backend of :func:`pks4_layers.ops.motion_scan`.
        inner_dim: width the block works at (default ``dim``): after a wide backbone a
            narrower one keeps the block small (``efficientnet_lite0``'s 1280 channels with
            ``inner_dim=256``: 0.89 M parameters, a sixth of the full-width block).
        prior_targets: where the prior enters the scan (see :class:`ParallelTemporalScan`):
            by default the projections to ``delta``, ``B``, ``C`` and, through a linear map,
            the scan's output. On the motion suite's held-out validation clips (format 4)
            selection alone lost the pan task by 27 points after a frozen backbone and by 34
            trained from scratch: one default for both regimes (see the README's ablations).
        cues: the cues the prior keeps (see :class:`KinematicPriorEncoder`); by default all
            four: the cost volume, the displacement and confidence, the frame differences and
            the change of the first two since the previous frame pair. Without the change
            the motion suite's onset task after a frozen backbone lost 10 points (held-out
            validation clips), with no difference on the mean of its temporal tasks.
        out_init: ``"zero"`` (identity at insertion) or ``"small"`` (normal, std 0.02).
        dt_min, dt_max: range of the scan's initial step sizes.
        corr_temperature, learn_corr_temperature, prior_norm: the prior encoder's match
            sharpness and output normalisation (see :class:`KinematicPriorEncoder`); the
            default LayerNorm on the prior gives its routes the same scale whatever the
            backbone's feature scale.
        motion_norm: ``"batch"`` standardises the prior's motion cues over the data before the
            fusion (see :class:`KinematicPriorEncoder`); ``"none"`` fuses them as computed.
        device, dtype: where and in which dtype the parameters are created (the factory
            arguments of timm's and mamba-ssm's modules).
        scan_input: the stream the scan reads: ``"features"`` (the block's normalised
            features, the default) or ``"prior"`` (the kinematic prior itself: a scan that
            sees motion and no content; research setting).
        scan_dropout: dropout on the features the scan reads, not on the prior (research
            setting).
        recompute: in a training forward, keep neither the prior encoder's intermediate
            results nor the scan directions' conv and projections: the backward recomputes them
            from inputs it keeps anyway (same gradients, about half the memory of the block,
            for about one more forward of those parts).

    ``set_grad_checkpointing(True)`` makes a training forward keep only the block's input for
    the backward, which then recomputes the rest: less memory for a second forward's time.

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        feature maps ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``grid`` is read from the map.
        tokens ``(B, T, N, C)`` with ``N = num_prefix_tokens + H * W`` and ``grid = (H, W)``
        -> ``(B, T, N, C)``. Prefix tokens (a ViT's class token) are scanned over time with a
        zero kinematic prior: they have no spatial neighbourhood to correlate.

    Streaming (causal blocks): ``out, state = block.step(chunk, state, grid, num_prefix_tokens)``
    on consecutive chunks of ``T >= 1`` frames, starting from ``state=None`` or
    :meth:`init_stream`, gives the outputs of :meth:`forward` on the whole video in constant
    memory. The state holds the previous frame's reduced features (kinematic prior), the last
    ``d_conv - 1`` inputs of the causal temporal convolution and the scan's state.
    A bidirectional block refuses to stream: its reverse scan needs the frames still to come.
    """

    def __init__(
        self,
        dim: int,
        *,
        prior_dim: int = 32,
        d_state: int = 16,
        expand: int = 1,
        radius: int = 2,
        d_conv: int = 4,
        bidirectional: bool = True,
        corr_dim: Optional[int] = 64,
        diff_dim: int = 32,
        backend: ScanBackend = "auto",
        inner_dim: Optional[int] = None,
        prior_targets: Sequence[str] = ("selection", "output"),
        cues: Sequence[str] = DEFAULT_PRIOR_CUES,
        out_init: Literal["zero", "small"] = "zero",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        corr_temperature: float = 10.0,
        learn_corr_temperature: bool = True,
        prior_norm: Literal["layer", "none"] = "layer",
        motion_norm: Literal["none", "batch"] = "none",
        recompute: bool = True,
        scan_input: Literal["features", "prior"] = "features",
        scan_dropout: float = 0.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        inner = dim if inner_dim is None else inner_dim
        if not isinstance(inner, int) or inner < 1:
            raise ValueError(f"inner_dim: expected a positive int or None, got {inner_dim!r}")
        if isinstance(prior_targets, (list, tuple)) and not prior_targets:
            raise ValueError(
                "prior_targets: expected at least one route for the kinematic prior (the block "
                "without it is pks4_layers.baselines.SelectiveScanBlock, temporal='scan'), got []"
            )
        if scan_input not in SCAN_INPUTS:
            raise ValueError(f"scan_input: expected one of {list(SCAN_INPUTS)}, got {scan_input!r}")
        if not 0.0 <= scan_dropout < 1.0:
            raise ValueError(f"scan_dropout: expected a float in [0, 1), got {scan_dropout!r}")
        if out_init not in OUTPUT_INITS:
            raise ValueError(f"out_init: expected one of {list(OUTPUT_INITS)}, got {out_init!r}")
        self.dim = dim
        self.inner_dim = inner
        self.out_init = out_init
        self.recompute = bool(recompute)
        self.grad_checkpointing = False
        self.norm = nn.LayerNorm(dim)
        # One narrow copy of the features feeds both the prior encoder and the scan.
        self.down = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.prior = KinematicPriorEncoder(
            inner,
            prior_dim=prior_dim,
            radius=radius,
            corr_dim=corr_dim,
            diff_dim=diff_dim,
            cues=cues,
            corr_temperature=corr_temperature,
            learn_corr_temperature=learn_corr_temperature,
            prior_norm=prior_norm,
            motion_norm=motion_norm,
        )
        self.scan_input = scan_input
        # Dropout on the features the scan reads (not on the prior): a regulariser against
        # memorising the content of a few training clips instead of reading their motion.
        self.scan_drop = nn.Dropout(scan_dropout) if scan_dropout else nn.Identity()
        self.scan = ParallelTemporalScan(
            inner if scan_input == "features" else prior_dim,
            prior_dim=prior_dim,
            d_state=d_state,
            expand=expand,
            d_conv=d_conv,
            bidirectional=bidirectional,
            backend=backend,
            prior_targets=prior_targets,
            dt_min=dt_min,
            dt_max=dt_max,
            out_dim=dim,
            recompute=recompute,
        )
        self.reset_output()
        register = getattr(self, "register_state_dict_post_hook", None)
        (register or self._register_state_dict_hook)(_record_layout)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.no_grad()
    def reset_output(self) -> None:
        """Initialise the output projection as ``out_init`` says: zero (the block becomes the
        identity) or small random weights (std 0.02) with a zero bias."""
        if self.out_init == "zero":
            nn.init.zeros_(self.scan.out_proj.weight)
        else:
            nn.init.normal_(self.scan.out_proj.weight, std=0.02)
        nn.init.zeros_(self.scan.out_proj.bias)

    def _scanned(self, h: Tensor, prior: Tensor) -> Tensor:
        """What the scan reads as its stream: the features, or the prior itself (a purely
        kinematic scan that sees no content)."""
        return self.scan_drop(h) if self.scan_input == "features" else prior

    def extra_repr(self) -> str:
        scan = self.scan.directions[0]
        return (
            f"dim={self.dim}, inner_dim={self.inner_dim}, d_state={scan.d_state}, "
            f"expand={self.scan.d_inner // self.inner_dim}, "
            f"bidirectional={self.scan.bidirectional}, prior_targets={self.scan.prior_targets}, "
            f"cues={self.prior.cues}, out_init={self.out_init!r}, backend={scan.backend!r}"
        )

    # The layout of the state dict, stored by torch in its metadata: 1 for every block written
    # by pks4-layers 0.1.x (whose defaults changed without a version), 2 from 0.2.0.
    _version = 2

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version")
        differ = [
            f"{name} {list(state_dict[prefix + name].shape)} (this block: {list(own.shape)})"
            for name, own in self.state_dict().items()
            if prefix + name in state_dict and state_dict[prefix + name].shape != own.shape
        ]
        if differ:
            written = local_metadata.get("library_version")
            writer = (
                "pks4-layers 0.1.x, whose defaults changed without a version (the change-of-"
                "motion cue widened prior.fuse.0.weight from [64, 61] to [64, 90]; build the "
                "block with the cues and prior_targets it had)"
                if version is not None and version < 2
                else f"a block written by pks4-layers {written or '?'} with "
                f"{local_metadata.get('config', 'other arguments')}"
            )
            raise ValueError(
                f"state_dict: expected the weights of a block like this one (layout "
                f"{self._version}), got those of {writer}: {'; '.join(differ[:3])}"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (timm's convention): biases, norms,
        ``A_log``, ``D`` and the step-size bias (see :mod:`pks4_layers.layers.weight_decay`)."""
        return no_weight_decay_names(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the block in the backward instead of keeping its activations.

        With it on, a forward under autograd keeps only the block's input (and its parameters)
        for the backward, which runs the block's forward again before its own; the gradients
        are those of the plain block. Streaming (:meth:`step`) is unaffected. The finer
        recomputation of ``recompute`` stays on inside: the backward's rerun of the block then
        keeps what a plain training forward keeps, so the peak stays that of the plain block
        (without it, the rerun would keep everything and raise the peak), for one more forward
        of the prior encoder and the projections.
        """
        self.grad_checkpointing = bool(enable)

    def forward(
        self,
        x: Tensor,
        grid: Optional[tuple[int, int]] = None,
        num_prefix_tokens: int = 0,
    ) -> Tensor:
        tokens, grid, prefix = self._as_tokens(x, grid, num_prefix_tokens)
        if self.grad_checkpointing and torch.is_grad_enabled():
            out = checkpoint(self._residual, tokens, grid, prefix, use_reentrant=False)
        else:
            out = self._residual(tokens, grid, prefix)
        return self._as_input_layout(out, x, grid)

    def _residual(self, tokens: Tensor, grid: tuple[int, int], prefix: int) -> Tensor:
        return self._forward_tokens(tokens, grid, prefix)[0]

    def init_stream(
        self,
        batch_size: int,
        grid: tuple[int, int],
        num_prefix_tokens: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> PKS4StreamState:
        """The state before the first frame of a stream (causal blocks only).

        :meth:`step` with ``state=None`` makes it from its first chunk; build it here to hold
        its memory from the start or to pick its device and dtype.

        Args:
            batch_size: ``B``, the videos streamed together.
            grid: ``(H, W)`` of the feature map or token grid.
            num_prefix_tokens: tokens before the grid (0 for feature maps).
            device, dtype: those of the features to come (default: the block's parameters').

        Returns:
            a :class:`~pks4_layers.layers.stream_state.PKS4StreamState` of
            ``B * (H*W * (corr_dim + diff_dim + M) + 2 + L * d_inner * (d_conv - 1 + d_state))``
            numbers, ``L = num_prefix_tokens + H * W`` and ``M`` the prior's motion channels
            with the ``"change"`` cue (0 without), whatever the length of the stream.
        """
        self.scan.check_streamable()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or not all(isinstance(g, int) and g > 0 for g in grid)
        ):
            raise ValueError(f"grid: expected a pair of positive ints (H, W), got {grid!r}")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(
                f"num_prefix_tokens: expected a non-negative int, got {num_prefix_tokens!r}"
            )
        spatial = grid[0] * grid[1]
        return PKS4StreamState(
            prior=self.prior.init_stream(batch_size, spatial, device, dtype),
            scan=self.scan.init_stream(batch_size, num_prefix_tokens + spatial, device, dtype),
        )

    def step(
        self,
        x: Tensor,
        state: Optional[PKS4StreamState] = None,
        grid: Optional[tuple[int, int]] = None,
        num_prefix_tokens: int = 0,
    ) -> tuple[Tensor, PKS4StreamState]:
        """The next chunk of a stream: online inference in constant memory (causal blocks only).

        Streaming a video in chunks of any lengths, each call given the state the previous one
        returned, gives the outputs of :meth:`forward` on the whole video: a block built with
        ``bidirectional=False`` sees frame ``t`` and the frames before it only. Run it under
        ``torch.no_grad()`` (or ``state = state.detach()`` between chunks) to keep the memory
        constant: otherwise autograd keeps every chunk's graph through the state.

        Args:
            x: the chunk, in :meth:`forward`'s layout with ``T >= 1`` frames: maps
                ``(B, T, C, H, W)`` or tokens ``(B, T, N, C)``.
            state: from :meth:`init_stream` or the previous call; ``None`` starts a stream
                (the first frame of ``x`` is frame 0: no predecessor, no motion).
            grid, num_prefix_tokens: as in :meth:`forward`, the same for every chunk.

        Returns:
            the chunk's output, ``x``'s shape, and the state for the next chunk.
        """
        self.scan.check_streamable()
        tokens, grid, prefix = self._as_tokens(x, grid, num_prefix_tokens)
        if state is not None:
            if not isinstance(state, PKS4StreamState):
                raise TypeError(
                    f"state: expected a PKS4StreamState or None, got {type(state).__name__}"
                )
            expected = (tokens.shape[0], tokens.shape[2], tokens.shape[2] - prefix)
            got = (state.batch_size, state.num_locations, state.num_spatial)
            if got != expected:
                raise ValueError(
                    f"state: expected (batch, locations, grid locations) = {expected} (those of "
                    f"x), got {got}"
                )
        out, state = self._forward_tokens(tokens, grid, prefix, stream=True, state=state)
        return self._as_input_layout(out, x, grid), state

    def _as_tokens(
        self, x: Tensor, grid: Optional[tuple[int, int]], num_prefix_tokens: int
    ) -> tuple[Tensor, tuple[int, int], int]:
        """``x`` as tokens ``(B, T, L, C)``, the grid and the number of prefix tokens."""
        return to_tokens(x, self.dim, grid, num_prefix_tokens)

    @staticmethod
    def _as_input_layout(out: Tensor, x: Tensor, grid: tuple[int, int]) -> Tensor:
        return from_tokens(out, x, grid)

    def _forward_tokens(
        self,
        x: Tensor,
        grid: tuple[int, int],
        prefix: int,
        stream: bool = False,
        state: Optional[PKS4StreamState] = None,
    ) -> tuple[Tensor, Optional[PKS4StreamState]]:
        grid = check_grid(grid, x.shape[2] - prefix)
        check_tokens("x", x, self.dim)
        check_same_device("x", x, "the block's parameters", self.norm.weight)
        check_same_dtype("x", x, "the block's parameters", self.norm.weight)
        h = self.down(self.norm(x))
        # narrow, not h[:, :, prefix:]: under torch 2.5's export a full slice of the batch
        # dimension adds a guard that an unbounded dynamic batch violates.
        spatial = h.narrow(2, prefix, h.shape[2] - prefix)
        if stream:
            prior, prior_state = self.prior.step(
                spatial, grid, None if state is None else state.prior
            )
        else:
            prior = maybe_recompute(self.recompute, self.prior, spatial, grid)
        if prefix:
            no_motion = prior.new_zeros(*prior.shape[:2], prefix, prior.shape[-1])
            prior = torch.cat([no_motion, prior], dim=2)
        if not stream:
            return x + self.scan(self._scanned(h, prior), prior), None
        scanned = self._scanned(h, prior)
        y, scan_state = self.scan.step(scanned, prior, None if state is None else state.scan)
        return x + y, PKS4StreamState(prior=prior_state, scan=scan_state)
