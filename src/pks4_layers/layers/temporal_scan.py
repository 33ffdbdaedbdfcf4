"""``ParallelTemporalScan``: a Mamba-style gated selective scan along time, per location.

Our interpretation of the parallel kinematic scanner of Zeng et al., "PKS^4: Parallel Kinematic
Selective State Space Scanners for Efficient Video Understanding" (arXiv:2604.26461), built from
its abstract. Every spatial location of the feature map is an independent sequence over ``T``
frames: nothing is flattened across space, so the cost is linear in ``T`` and in the number of
locations, and the spatial layout is kept. The selection is driven by the kinematic prior:
it enters the projections that give the step size ``delta`` (how fast the state is updated),
``B`` (what is written) and ``C`` (what is read) at each frame. Where else the prior enters
(the scanned stream, the gate, the scan's output) is a constructor argument, ``prior_targets``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import motion_scan
from ..ops.motion_scan import ScanBackend
from ._checks import check_same_device, check_same_dtype, check_tokens
from .recompute import maybe_recompute
from .stream_state import ScanStreamState, scan_state_dtype
from .temporal_conv import temporal_conv, temporal_conv_step
from .weight_decay import no_weight_decay_names

# "selection": delta, B and C; "stream": added to the scanned stream; "gate": added to z;
# "output": added to the scan's output, before the output projection.
PRIOR_TARGETS = ("selection", "stream", "gate", "output")


class DirectionalScan(nn.Module):
    """One scan direction: temporal conv, prior-driven projections, the selective scan.

    Shapes:
        ``x``, ``z``: ``(B, T, L, d_inner)``; ``prior``: ``(B, T, L, prior_dim)``;
        output: ``(B, T, L, d_inner)``, already gated by ``silu(z)``.
    """

    def __init__(
        self,
        d_inner: int,
        prior_dim: int,
        d_state: int,
        d_conv: int,
        dt_rank: int,
        reverse: bool,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        backend: ScanBackend = "auto",
        prior_selects: bool = True,
    ) -> None:
        super().__init__()
        self.reverse = reverse
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.backend = backend
        self.conv_weight = nn.Parameter(torch.empty(d_inner, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(d_inner))
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        # Without it the prior does not reach delta, B and C (it enters the stream or the gate).
        self.prior_proj = (
            nn.Linear(prior_dim, dt_rank + 2 * d_state, bias=False) if prior_selects else None
        )
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        # Set by the owning scan: recompute the conv and projections in the backward.
        self.recompute = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d_inner, d_conv = self.conv_weight.shape
        # Same fan-in bound as nn.Conv1d's default for a depthwise kernel.
        bound = 1.0 / math.sqrt(d_conv)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        self.x_proj.reset_parameters()
        if self.prior_proj is not None:
            self.prior_proj.reset_parameters()
        # Mamba's initialisation: dt_proj keeps the variance of its input, and its bias is the
        # inverse softplus of a step size drawn log-uniformly in [dt_min, dt_max].
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt_min, dt_max, floor = self._dt_range
        dt = torch.exp(
            torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp_(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log) = -(1, 2, ..., N) for every channel (S4D-real).
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)))
        self.D.fill_(1.0)

    def extra_repr(self) -> str:
        d_inner, d_conv = self.conv_weight.shape
        return (
            f"{'reverse' if self.reverse else 'forward'} in time, d_inner={d_inner}, "
            f"d_state={self.d_state}, d_conv={d_conv}, dt_rank={self.dt_rank}, "
            f"prior_selects={self.prior_proj is not None}, backend={self.backend!r}"
        )

    def forward(self, x: Tensor, z: Tensor, prior: Optional[Tensor]) -> Tensor:
        u, delta, B, C = maybe_recompute(self.recompute, self._selection, x, prior)
        return self._scan(u, delta, B, C, z)

    def _selection(
        self, x: Tensor, prior: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The scanned input ``u`` (temporal conv, SiLU) and its ``delta``, ``B``, ``C``."""
        u = F.silu(temporal_conv(x, self.conv_weight, self.conv_bias, reverse=self.reverse))
        return (u, *self._projections(u, prior))

    def _projections(self, u: Tensor, prior: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``delta`` (before its bias), ``B`` and ``C`` from ``u`` and the prior."""
        proj = self.x_proj(u)
        if self.prior_proj is not None:
            proj = proj + self.prior_proj(prior)
        dt_low, B, C = torch.split(proj, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt_low, self.dt_proj.weight), B, C

    def step(
        self, x: Tensor, z: Tensor, prior: Tensor, state: ScanStreamState
    ) -> tuple[Tensor, ScanStreamState]:
        """The forward direction on the next chunk of a stream, carrying the conv's last inputs
        and the scan's state: equal to the same frames of a call on the whole stream."""
        if self.reverse:
            raise ValueError(
                "reverse: expected a forward (causal) scan to stream, got a reverse scan, "
                "which needs the frames that have not come yet"
            )
        conv, history = temporal_conv_step(x, self.conv_weight, self.conv_bias, state.conv_inputs)
        u = F.silu(conv)
        y, last = self._scan(u, *self._projections(u, prior), z, initial_state=state.scan_state)
        return y, ScanStreamState(conv_inputs=history, scan_state=last)

    def _scan(
        self,
        x: Tensor,
        delta: Tensor,
        B: Tensor,
        C: Tensor,
        z: Tensor,
        initial_state: Optional[Tensor] = None,
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """``y``, and the last state when ``initial_state`` is given (streaming)."""
        dtype = x.dtype
        # Scan parameters stay in float32 under mixed precision (float64 in a float64 model).
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        # A = -exp(A_log) is never positive: the op's check of A, which costs a device
        # synchronisation per call on a GPU, is skipped.
        return motion_scan(
            x,
            delta.to(dtype),
            -torch.exp(self.A_log.to(pdt)),
            B.to(dtype),
            C.to(dtype),
            D=self.D.to(pdt),
            z=z.to(dtype),
            delta_bias=self.dt_proj.bias.to(pdt),
            delta_softplus=True,
            reverse=self.reverse,
            initial_state=initial_state,
            return_last_state=initial_state is not None,
            backend=self.backend,
            check_decay=False,
        )


class ParallelTemporalScan(nn.Module):
    """Gated selective scan along time for every spatial location, driven by a kinematic prior.

    ``in_proj`` splits the features into the scanned stream ``x`` and the gate ``z``; each
    direction convolves ``x`` over a few frames, projects ``x`` and the prior to ``delta``,
    ``B`` and ``C``, and runs :func:`pks4_layers.ops.motion_scan`; the directions are averaged
    and ``out_proj`` maps back to ``out_dim``.

    Args:
        dim: channels of the input and output.
        prior_dim: channels of the kinematic prior.
        d_state: state size ``N`` per channel.
        expand: inner width is ``expand * dim``.
        d_conv: width of the temporal convolution.
        dt_rank: rank of the ``delta`` projection; ``"auto"`` is ``ceil(dim / 16)``.
        bidirectional: add a reverse-time scan (the forward-only scan is causal: its temporal
            convolution is the causal one, so frame ``t`` sees frames ``<= t`` only).
        backend: passed to :func:`pks4_layers.ops.motion_scan`.
        prior_targets: where the prior enters, a subset of ``("selection", "stream",
            "gate", "output")``: the projections to ``delta``, ``B``, ``C``; a linear map of it
            added to the scanned stream before the temporal convolution; one added to the gate
            ``z``; one added to the directions' mean output, before ``out_proj``. Empty: no
            prior at all (``delta``, ``B``, ``C`` from the features alone, as in Mamba), and
            ``prior`` must be ``None``.
        dt_min, dt_max: range of the initial step sizes (log-uniform per channel).
        out_dim: channels of the output (default ``dim``).
        recompute: each direction's temporal conv and projections are recomputed in the
            backward instead of kept (same gradients, less memory; see :mod:`.recompute`).
        device, dtype: where and in which dtype the parameters are created.

    Shapes:
        ``x``: ``(B, T, L, dim)``, ``prior``: ``(B, T, L, prior_dim)`` (``None`` without
        ``prior_targets``) -> ``(B, T, L, out_dim)``.

    A forward-only scan also runs on a stream, chunk by chunk (:meth:`init_stream`,
    :meth:`step`), carrying the convolution's last inputs and the scan's state.
    """

    def __init__(
        self,
        dim: int,
        *,
        prior_dim: int = 32,
        d_state: int = 16,
        expand: int = 1,
        d_conv: int = 4,
        dt_rank: Union[int, str] = "auto",
        bidirectional: bool = True,
        backend: ScanBackend = "auto",
        prior_targets: Sequence[str] = ("selection", "output"),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        out_dim: Optional[int] = None,
        recompute: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        targets = (prior_targets,) if isinstance(prior_targets, str) else tuple(prior_targets)
        if any(t not in PRIOR_TARGETS for t in targets) or len(set(targets)) != len(targets):
            raise ValueError(
                f"prior_targets: expected a subset of {list(PRIOR_TARGETS)} without repeats, "
                f"got {list(targets)}"
            )
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min, dt_max}")
        self.dim = dim
        self.prior_dim = prior_dim
        self.d_inner = expand * dim
        self.bidirectional = bidirectional
        self.prior_targets = tuple(t for t in PRIOR_TARGETS if t in targets)
        rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner)
        # The prior added to the scanned stream, the gate and / or the output: one map for all,
        # its output split in this order.
        self.prior_added_to = tuple(t for t in ("stream", "gate", "output") if t in targets)
        self.prior_in_proj = (
            nn.Linear(prior_dim, len(self.prior_added_to) * self.d_inner, bias=False)
            if self.prior_added_to
            else None
        )
        directions = [False, True] if bidirectional else [False]
        self.directions = nn.ModuleList(
            DirectionalScan(
                self.d_inner,
                prior_dim,
                d_state,
                d_conv,
                rank,
                reverse=r,
                dt_min=dt_min,
                dt_max=dt_max,
                backend=backend,
                prior_selects="selection" in targets,
            )
            for r in directions
        )
        self.out_proj = nn.Linear(self.d_inner, dim if out_dim is None else out_dim)
        self.set_recompute(recompute)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (timm's convention): biases, norms,
        ``A_log``, ``D`` and the step-size bias (see :mod:`pks4_layers.layers.weight_decay`)."""
        return no_weight_decay_names(self)

    def set_recompute(self, enable: bool) -> None:
        """Recompute (``True``) or keep (``False``) the directions' conv and projections."""
        self.recompute = bool(enable)
        for direction in self.directions:
            direction.recompute = self.recompute

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, prior_dim={self.prior_dim}, d_inner={self.d_inner}, "
            f"bidirectional={self.bidirectional}, prior_targets={self.prior_targets}"
        )

    def _stream_and_gate(
        self, x: Tensor, prior: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The scanned stream and the gate, with the prior added where ``prior_targets`` say,
        and what the prior adds to the output (``None`` if nothing)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        if self.prior_in_proj is None:
            return xs, z, None
        parts = self.prior_in_proj(prior).split(self.d_inner, dim=-1)
        added = dict(zip(self.prior_added_to, parts))
        if "stream" in added:
            xs = xs + added["stream"]
        if "gate" in added:
            z = z + added["gate"]
        return xs, z, added.get("output")

    def forward(self, x: Tensor, prior: Optional[Tensor] = None) -> Tensor:
        self._check_inputs(x, prior)
        xs, z, to_output = self._stream_and_gate(x, prior)
        y = self.directions[0](xs, z, prior)
        for direction in self.directions[1:]:
            y = y + direction(xs, z, prior)
        y = y / len(self.directions)
        if to_output is not None:
            y = y + to_output
        return self.out_proj(y)

    def _check_inputs(self, x: Tensor, prior: Optional[Tensor]) -> None:
        check_tokens("x", x, self.dim)
        check_same_device("x", x, "the module's parameters", self.in_proj.weight)
        check_same_dtype("x", x, "the module's parameters", self.in_proj.weight)
        if not self.prior_targets:
            if prior is not None:
                raise ValueError(
                    "prior: expected None (the scan was built with prior_targets=(), no prior), "
                    f"got a tensor of shape {tuple(prior.shape)}"
                )
            return
        if prior is None:
            raise ValueError(
                f"prior: expected a (B, T, L, {self.prior_dim}) tensor (prior_targets="
                f"{self.prior_targets}), got None"
            )
        check_tokens("prior", prior, self.prior_dim, length=x.shape[2])
        if prior.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"prior: expected (B, T) = {tuple(x.shape[:2])} (that of x), "
                f"got {tuple(prior.shape[:2])}"
            )
        check_same_device("prior", prior, "x", x)
        check_same_dtype("prior", prior, "x", x)

    def check_streamable(self) -> None:
        """Raise unless the scan is causal (only a forward scan can run on a stream)."""
        if self.bidirectional:
            raise ValueError(
                "bidirectional: expected False to stream (the reverse scan needs the frames that "
                "have not come yet), got True; build the block with bidirectional=False"
            )

    def init_stream(
        self,
        batch_size: int,
        num_locations: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> ScanStreamState:
        """The state before the first frame of a stream: zero conv inputs, zero scan state.

        Args:
            batch_size: ``B``.
            num_locations: ``L``, the scanned locations.
            device, dtype: those of the features to come (default: the module's parameters').

        Returns:
            ``conv_inputs (B, d_conv - 1, L, d_inner)`` in ``dtype`` and ``scan_state
            (B, L, d_inner, d_state)`` in float32 (float64 for float64 features).
        """
        self.check_streamable()
        scan = self.directions[0]
        ref = self.in_proj.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        d_conv = scan.conv_weight.shape[1]
        return ScanStreamState(
            conv_inputs=torch.zeros(
                batch_size, d_conv - 1, num_locations, self.d_inner, device=device, dtype=dtype
            ),
            scan_state=torch.zeros(
                batch_size,
                num_locations,
                self.d_inner,
                scan.d_state,
                device=device,
                dtype=scan_state_dtype(dtype),
            ),
        )

    def step(
        self, x: Tensor, prior: Optional[Tensor] = None, state: Optional[ScanStreamState] = None
    ) -> tuple[Tensor, ScanStreamState]:
        """The scan on the next chunk of a stream (causal scans only).

        Args:
            x: ``(B, T, L, dim)``, the chunk (``T >= 1``).
            prior: ``(B, T, L, prior_dim)`` (``None`` without ``prior_targets``).
            state: from :meth:`init_stream` or the previous call; ``None`` starts a stream.

        Returns:
            ``(B, T, L, dim)``, equal to the same frames of a :meth:`forward` on the whole stream
            so far, and the state for the next chunk.
        """
        self.check_streamable()
        self._check_inputs(x, prior)
        if state is None:
            state = self.init_stream(x.shape[0], x.shape[2], x.device, x.dtype)
        Bsz, L, scan = x.shape[0], x.shape[2], self.directions[0]
        for name, got, expected in (
            (
                "conv_inputs",
                state.conv_inputs,
                (Bsz, scan.conv_weight.shape[1] - 1, L, self.d_inner),
            ),
            ("scan_state", state.scan_state, (Bsz, L, self.d_inner, scan.d_state)),
        ):
            if tuple(got.shape) != expected:
                raise ValueError(
                    f"state: expected {name} of shape {expected} (batch and locations of x), "
                    f"got {tuple(got.shape)}"
                )
        xs, z, to_output = self._stream_and_gate(x, prior)
        y, state = self.directions[0].step(xs, z, prior, state)
        if to_output is not None:
            y = y + to_output
        return self.out_proj(y), state
