"""FLOP counting with the scan and the cost volume included, and the parameter / FLOP report of
a :class:`PKS4VideoClassifier`, split into its three parts.

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products, convolutions and attention
only. Two computations of the PKS4 modules are element-wise and so invisible to it (or, on the
compiled backends, hidden in a custom kernel): the selective scan's state recurrence
(:func:`pks4_layers.ops.motion_scan`) and the kinematic prior's local cost volume
(:func:`pks4_layers.layers.kinematic_prior.local_correlation`) and gradient flow
(:func:`~pks4_layers.layers.kinematic_prior.gradient_flow`). :class:`FlopCount` counts them
analytically, from the shapes of each call, and adds them to what FlopCounterMode counts.

FLOP convention: a multiply-add is 2 FLOPs (FlopCounterMode's convention for matrix products);
every other arithmetic operation on one element (add, multiply, divide) is 1 FLOP, and so is
each ``exp`` and ``log``. Element-wise work outside the scan and the cost volume
(normalisations, activations, softmax, the pooling mean) is not counted, in any part of a model.

The scan of ``u`` of shape ``(batch, T, L, D)`` with ``N`` states per channel
(:func:`scan_flops`)::

    batch * T * L * D * (7 * N + c)
        7 per state: exp(dt * A) (2), exp(.) * h + (dt * u) * B (3), the read-out C . h (2)
        c per channel: dt * u (1), + delta_bias (1), softplus = log(1 + exp(.)) (3),
                       + D * u skip (2), * silu(z) gate (5: z / (1 + exp(-z)) is 4, the product 1)

whatever the backend computes it with: the read-out, a matrix product on the ``"torch"``
backend that FlopCounterMode counts, is not counted twice. A scan over a flattened ``T * H * W``
sequence is the same formula with that ``T``. The cost volume of ``current`` against
``previous``, both ``(n, C, H, W)``, over a ``(2r + 1)^2`` window (:func:`correlation_flops`)::

    2 * C * (2r + 1)^2 * H * W * n

one dot product over the channels per (frame pair, location, displacement), the window's
out-of-map positions included (they are computed, against zero padding). The inputs'
L2 normalisation and the match softmax lie outside it and are not counted. The gradient flow
of ``n`` frame pairs of ``L`` locations and ``C`` channels (:func:`gradient_flow_flops`)::

    n * L * (17 * C + 20)
        17 per channel: the change (1), the pair's mean (2), the two spatial differences
                        (2 each), five sums of products over the channels (2 each)
        20 per location: the damped 2x2 solve

Only forward calls are counted analytically; a backward run inside a count is counted as far as
FlopCounterMode sees it.
"""

from __future__ import annotations

import functools
import math
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..export import scan_backend
from ..layers import kinematic_prior
from ..ops.motion_scan import _BACKENDS as _SCAN_BACKENDS
from .classifier import PKS4VideoClassifier

__all__ = [
    "FlopCount",
    "ModelReport",
    "correlation_flops",
    "count_flops",
    "gradient_flow_flops",
    "model_report",
    "scan_flops",
]


@dataclass
class ModelReport:
    """Parameters and forward GFLOPs of one clip, by part.

    GFLOPs are ``1e9`` FLOPs as counted by :class:`FlopCount`: matrix products, convolutions and
    attention as ``torch.utils.flop_counter.FlopCounterMode`` counts them, plus the selective
    scans' state recurrence, skip and gate (:func:`scan_flops`) and the kinematic prior's cost
    volume (:func:`correlation_flops`), counted from their shapes whatever backend runs them; a
    multiply-add counts 2, an ``exp`` 1. Other element-wise operations (normalisation,
    activations, softmax) are not counted, in any part.
    """

    params_total: int
    params_trainable: int
    params_backbone: int
    params_temporal: int
    params_head: int
    gflops_backbone: float
    gflops_temporal: float
    gflops_head: float
    gflops_total: float
    clip_shape: Optional[tuple[int, ...]] = None
    temporal: str = ""

    def format(self) -> str:
        """An aligned table of the parts, with each part's share of the total in %."""

        def share(part: float, total: float) -> str:
            return f"{100.0 * part / total:6.2f}%" if total else "      -"

        temporal = f"temporal ({self.temporal})" if self.temporal else "temporal"
        rows = [
            ("backbone", self.params_backbone, self.gflops_backbone),
            (temporal, self.params_temporal, self.gflops_temporal),
            ("head", self.params_head, self.gflops_head),
            ("total", self.params_total, self.gflops_total),
        ]
        width = max(len(r[0]) for r in rows)
        lines = []
        if self.clip_shape is not None:
            lines.append(f"clip {tuple(self.clip_shape)}, forward of one clip")
        header = f"{'part':<{width}}  {'params':>12}  {'share':>7}  {'GFLOPs':>10}  {'share':>7}"
        lines += [header, "-" * len(header)]
        for name, params, gflops in rows:
            lines.append(
                f"{name:<{width}}  {params:>12,}  {share(params, self.params_total)}  "
                f"{gflops:>10.4f}  {share(gflops, self.gflops_total)}"
            )
        lines.append(f"{'trainable':<{width}}  {self.params_trainable:>12,}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _num_params(module: Optional[nn.Module], trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def scan_flops(
    batch: int,
    T: int,
    L: int,
    D: int,
    N: int,
    *,
    skip: bool = True,
    gate: bool = True,
    delta_bias: bool = True,
    delta_softplus: bool = True,
) -> int:
    """FLOPs of one forward :func:`pks4_layers.ops.motion_scan` call, counted by hand.

    Args:
        batch, T, L, D: the shape of ``u``, ``(batch, T, L, D)``.
        N: states per channel (``A`` is ``(D, N)``).
        skip, gate, delta_bias: whether ``D``, ``z`` and ``delta_bias`` are given.
        delta_softplus: whether ``delta + delta_bias`` goes through a softplus.

    Returns:
        ``batch * T * L * D * (7 * N + c)``. Per state and step: ``exp(dt * A)`` is a multiply
        and an exp (2), ``exp(.) * h + (dt * u) * B`` two multiplies and an add (3), the
        read-out's term of ``sum_n C[n] * h[n]`` a multiply-add (2). Per channel and step,
        ``c`` is ``dt * u`` (1), plus the bias add (1), the softplus ``log(1 + exp(.))`` (3), the
        skip ``+ D * u`` (2) and the gate ``* silu(z)`` (5: ``z / (1 + exp(-z))`` is 4, the
        product 1) for those that apply: ``c = 12`` for a PKS4 scan.
    """
    per_channel = (
        1
        + (1 if delta_bias else 0)
        + (3 if delta_softplus else 0)
        + (2 if skip else 0)
        + (5 if gate else 0)
    )
    return batch * T * L * D * (7 * N + per_channel)


def correlation_flops(n: int, C: int, H: int, W: int, radius: int) -> int:
    """FLOPs of one :func:`~pks4_layers.layers.kinematic_prior.local_correlation` call on two
    ``(n, C, H, W)`` maps with window radius ``radius``: ``2 * C * (2r + 1)^2 * H * W * n``, a
    dot product over the ``C`` channels (``C`` multiply-adds) per frame pair, location and
    displacement."""
    return 2 * C * (2 * radius + 1) ** 2 * H * W * n


def gradient_flow_flops(n: int, L: int, C: int) -> int:
    """FLOPs of one :func:`~pks4_layers.layers.kinematic_prior.gradient_flow` call on ``n``
    frame pairs of ``L`` locations and ``C`` channels: ``n * L * (17 * C + 20)`` (see the
    module's docstring)."""
    return n * L * (17 * C + 20)


# The counts open now, innermost last: a scan or cost volume adds to each of them, as each of
# their FlopCounterModes sees the ops run inside it.
_open_counts: list[FlopCount] = []
# What entering the first count patched, undone when the last one exits.
_restore: list[Callable[[], None]] = []
# Patched function -> its counting wrapper, while a count is open: a function object taken
# before the count (``count_flops(local_correlation, ...)``) is swapped for its wrapper too.
_wrappers: dict[Callable[..., Any], Callable[..., Any]] = {}


def _count_analytic(kind: str, flops: int, run: Callable[[], Any]) -> Any:
    """``run()``, with ``flops`` added to every open count's ``kind`` and what their
    FlopCounterModes counted during it taken back (the analytic count replaces it)."""
    counts = list(_open_counts)
    before = [c.mode.get_total_flops() for c in counts]
    out = run()
    for count, seen in zip(counts, before):
        count.replaced += count.mode.get_total_flops() - seen
        setattr(count, kind, getattr(count, kind) + flops)
    return out


def _counted_scan_backend(backend: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(backend)
    def counted(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state):
        flops = scan_flops(
            *(int(s) for s in u.shape),
            int(A.shape[1]),
            skip=D is not None,
            gate=z is not None,
            delta_bias=delta_bias is not None,
            delta_softplus=bool(delta_softplus),
        )
        return _count_analytic(
            "scan",
            flops,
            lambda: backend(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state
            ),
        )

    return counted


def _counted_correlation(correlation: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(correlation)
    def counted(current, previous, radius):
        C, H, W = (int(s) for s in current.shape[-3:])
        flops = correlation_flops(math.prod(current.shape[:-3]), C, H, W, int(radius))
        return _count_analytic("correlation", flops, lambda: correlation(current, previous, radius))

    return counted


def _counted_gradient_flow(flow: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(flow)
    def counted(current, previous, H, W, *args, **kwargs):
        L, C = (int(s) for s in current.shape[-2:])
        flops = gradient_flow_flops(math.prod(current.shape[:-2]), L, C)
        return _count_analytic(
            "flow", flops, lambda: flow(current, previous, H, W, *args, **kwargs)
        )

    return counted


def _patch_global(original: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
    """Bind ``wrapper`` in place of ``original`` in every module that binds it to a global
    name, until the last count closes."""
    _wrappers[original] = wrapper
    bound: list[tuple[dict[str, Any], str]] = []
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        namespace = vars(module)
        for attr, value in list(namespace.items()):
            if value is original:
                namespace[attr] = wrapper
                bound.append((namespace, attr))

    def restore() -> None:
        _wrappers.pop(original, None)
        for namespace, attr in bound:
            if namespace.get(attr) is wrapper:
                namespace[attr] = original

    _restore.append(restore)


def _patch() -> None:
    """Route every scan and cost volume through the counting wrappers.

    The scan: every :func:`~pks4_layers.ops.motion_scan` call, however its caller imported it,
    looks its backend up in one table; wrapping the table's entries counts each call once, on
    every backend. The cost volume: every module that binds ``local_correlation`` to a global
    name (the kinematic prior, and any module that imported it) gets the wrapper in its place.
    """
    originals = dict(_SCAN_BACKENDS)
    for name, backend in originals.items():
        _SCAN_BACKENDS[name] = _counted_scan_backend(backend)

    def restore_scan() -> None:
        for name, backend in originals.items():
            _SCAN_BACKENDS[name] = backend

    _restore.append(restore_scan)

    _patch_global(
        kinematic_prior.local_correlation, _counted_correlation(kinematic_prior.local_correlation)
    )
    _patch_global(
        kinematic_prior.gradient_flow, _counted_gradient_flow(kinematic_prior.gradient_flow)
    )


def _unpatch() -> None:
    while _restore:
        _restore.pop()()


class FlopCount:
    """Forward FLOPs of what runs inside ``with FlopCount() as count:``.

    A ``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products, convolutions and
    attention; every :func:`pks4_layers.ops.motion_scan` call (any caller, any backend, any
    sequence length) adds :func:`scan_flops` of its shapes and every
    :func:`~pks4_layers.layers.kinematic_prior.local_correlation` call adds
    :func:`correlation_flops` and every
    :func:`~pks4_layers.layers.kinematic_prior.gradient_flow` call
    :func:`gradient_flow_flops`, in place of whatever FlopCounterMode counted inside them (the
    ``"torch"`` backend's read-out ``C_t . h_t`` is a matrix product it sees), so nothing is
    counted twice. Counts nest: an inner count's scans are in the outer one too. While a count
    is open, the scans and cost volumes of every thread go into it.

    The counts are in FLOPs; they grow while the ``with`` body runs, and a new ``with`` starts
    at zero.

    Attributes:
        mode: the FlopCounterMode (its per-op and per-module tables leave the analytic parts
            out).
        scan: the analytic count of the scans.
        correlation: the analytic count of the cost volumes.
        flow: the analytic count of the gradient flows.
        replaced: what FlopCounterMode counted inside those calls, replaced by them.
    """

    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False)
        self.scan = 0
        self.correlation = 0
        self.flow = 0
        self.replaced = 0

    @property
    def counted(self) -> int:
        """What FlopCounterMode alone counted, the scans' matrix products included."""
        return self.mode.get_total_flops()

    @property
    def analytic(self) -> int:
        """The analytic part: ``scan + correlation + flow``."""
        return self.scan + self.correlation + self.flow

    @property
    def total(self) -> int:
        """``counted - replaced + scan + correlation + flow``."""
        return self.counted - self.replaced + self.analytic

    def __enter__(self) -> FlopCount:
        self.scan = self.correlation = self.flow = self.replaced = 0
        if not _open_counts:
            _patch()
        _open_counts.append(self)
        try:
            self.mode.__enter__()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.mode.__exit__(*exc_info)
        finally:
            self._close()

    def _close(self) -> None:
        _open_counts.remove(self)
        if not _open_counts:
            _unpatch()


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Forward FLOPs of ``fn(*args, **kwargs)`` as :class:`FlopCount` counts them (the scans'
    recurrence and the cost volumes included), and its result."""
    with FlopCount() as count:
        try:
            fn = _wrappers.get(fn, fn)
        except TypeError:  # an unhashable callable is none of the patched functions
            pass
        out = fn(*args, **kwargs)
    return count.total, out


def model_report(
    model: PKS4VideoClassifier, clip_shape: tuple[int, int, int, int, int]
) -> ModelReport:
    """Parameters and forward FLOPs of ``model`` on one clip of ``clip_shape``.

    Runs one forward pass of a zero clip, in eval mode and without autograd (the model's mode is
    restored after), counting each part separately: ``model.forward_features`` (backbone),
    ``model.forward_temporal`` (temporal module) and ``model.forward_head`` (head); the pooling
    in between is a mean, which is not counted. Each part is counted by :func:`count_flops`:
    FlopCounterMode's matrix products, convolutions and attention plus the analytic counts of
    every selective scan, cost volume and gradient flow the part runs (see
    :class:`FlopCount`), so temporal modules compare whatever they compute with.

    Args:
        model: the classifier (or a DistributedDataParallel / compiled wrapper of it).
        clip_shape: ``(1, T, C, H, W)``, one clip (the FLOPs are per clip).

    Returns:
        a :class:`ModelReport`.
    """
    # Reach the classifier inside DistributedDataParallel / DataParallel or torch.compile.
    for wrapper_attr in ("module", "_orig_mod"):
        inner = getattr(model, wrapper_attr, None)
        if isinstance(inner, PKS4VideoClassifier):
            model = inner
    if not isinstance(model, PKS4VideoClassifier):
        raise TypeError(f"model: expected a PKS4VideoClassifier, got {type(model).__name__}")
    shape = tuple(int(s) for s in clip_shape)
    if len(shape) != 5 or shape[0] != 1:
        raise ValueError(f"clip_shape: expected (1, T, C, H, W), got {tuple(clip_shape)}")
    param = next(model.parameters())
    x = torch.zeros(shape, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        # The count does not depend on the scan backend (the scans are counted from their
        # shapes); the PyTorch one runs everywhere without building or loading a compiled
        # extension for a one-clip forward.
        with torch.no_grad(), scan_backend(model.temporal, "torch"):
            f_backbone, feats = count_flops(model.forward_features, x)
            f_temporal, feats = count_flops(model.forward_temporal, feats)
            pooled = model.pool(feats)
            f_head, _ = count_flops(model.forward_head, pooled)
            if model.motion_head is not None:  # the factored readout's second head
                f_head += count_flops(model.motion_head, pooled)[0]
    finally:
        model.train(was_training)
    p_backbone = _num_params(model.backbone)
    p_temporal = _num_params(model.temporal)
    p_head = _num_params(model.head) + _num_params(model.motion_head)
    return ModelReport(
        params_total=_num_params(model),
        params_trainable=_num_params(model, trainable_only=True),
        params_backbone=p_backbone,
        params_temporal=p_temporal,
        params_head=p_head,
        gflops_backbone=f_backbone / 1e9,
        gflops_temporal=f_temporal / 1e9,
        gflops_head=f_head / 1e9,
        gflops_total=(f_backbone + f_temporal + f_head) / 1e9,
        clip_shape=shape,
        temporal=model.temporal_kind,
    )
