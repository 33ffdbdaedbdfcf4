"""State carried between the chunks of a streamed video: small, fixed-size, tensors only.

A causal PKS4 block (``bidirectional=False``) sees frame ``t`` and the frames before it, and what
it needs of the past fits in a few tensors whose size does not depend on how many frames have
gone by: the previous frame's reduced features (kinematic prior), the last ``d_conv - 1`` inputs
of the temporal convolution, and the scan's state. Streaming a video chunk by chunk with these
carried over gives the outputs of one call on the whole video.

Shapes (``B`` batch, ``HW = H * W`` spatial locations, ``L = num_prefix_tokens + HW`` scanned
locations):

* :class:`PriorStreamState`: ``previous_corr (B, HW, corr_dim)``,
  ``previous_diff (B, HW, diff_dim)``, ``has_previous (B,)``, ``previous_motion (B, HW, M)``
  (``M``: the motion cues' channels with the ``"change"`` cue, 0 without),
  ``previous_has_motion (B,)``;
* :class:`ScanStreamState`: ``conv_inputs (B, d_conv - 1, L, d_inner)``,
  ``scan_state (B, L, d_inner, d_state)`` (float32, float64 for float64 inputs);
* :class:`PKS4StreamState`: one of each.

In all, ``B * (HW * (corr_dim + diff_dim + M) + 2 + L * d_inner * (d_conv - 1 + d_state))``
numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, TypeVar, Union

import torch
from torch import Tensor

__all__ = ["PKS4StreamState", "PriorStreamState", "ScanStreamState", "StreamState"]

S = TypeVar("S", bound="StreamState")


class StreamState:
    """Helpers shared by the stream states (dataclasses whose fields are tensors or states)."""

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor of the state, nested states included."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                yield value
            elif isinstance(value, StreamState):
                yield from value.tensors()

    def _map(self: S, fn) -> S:
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, StreamState):
                changes[f.name] = value._map(fn)
        return dataclasses.replace(self, **changes)

    def detach(self: S) -> S:
        """The same state cut from the autograd graph (truncated backpropagation through time:
        without it, a stream run with gradients enabled keeps the graph of every chunk)."""
        return self._map(Tensor.detach)

    def to(self: S, device: Union[torch.device, str]) -> S:
        """The state on ``device``; dtypes are kept (the scan state stays float32 / float64)."""
        return self._map(lambda t: t.to(device))

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors: fixed for a given batch, grid and block."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class PriorStreamState(StreamState):
    """What :class:`~pks4_layers.KinematicPriorEncoder` keeps of the previous frame.

    Attributes:
        previous_corr: ``(B, HW, corr_dim)``, the L2-normalised reduced features correlated with
            the next frame.
        previous_diff: ``(B, HW, diff_dim)``, the reduced features subtracted from the next frame.
        has_previous: ``(B,)`` bool; ``False`` before the first frame, whose motion cues are zero
            by design, exactly as in a call on the whole clip.
        previous_motion: ``(B, HW, motion_dim)``, the previous frame's motion cues (cost volume,
            displacement, confidence), from which the ``"change"`` cue is taken (``motion_dim``
            is 0 without that cue).
        previous_has_motion: ``(B,)`` bool; the previous frame had a predecessor itself.
    """

    previous_corr: Tensor
    previous_diff: Tensor
    has_previous: Tensor
    previous_motion: Tensor
    previous_has_motion: Tensor


@dataclass
class ScanStreamState(StreamState):
    """What the forward scan of :class:`~pks4_layers.ParallelTemporalScan` keeps.

    Attributes:
        conv_inputs: ``(B, d_conv - 1, L, d_inner)``, the last inputs of the causal temporal
            convolution (zeros before the first frame: the zero padding of a whole-clip call).
        scan_state: ``(B, L, d_inner, d_state)``, the selective scan's state after the last frame
            (``initial_state`` / ``return_last_state`` of :func:`~pks4_layers.motion_scan`).
    """

    conv_inputs: Tensor
    scan_state: Tensor


@dataclass
class PKS4StreamState(StreamState):
    """State of a streamed :class:`~pks4_layers.PKS4Block`: its prior's and its scan's."""

    prior: PriorStreamState
    scan: ScanStreamState

    @property
    def batch_size(self) -> int:
        return self.scan.scan_state.shape[0]

    @property
    def num_locations(self) -> int:
        """``L``, the scanned locations (prefix tokens included)."""
        return self.scan.scan_state.shape[1]

    @property
    def num_spatial(self) -> int:
        """``H * W``, the locations of the grid."""
        return self.prior.previous_corr.shape[1]


def scan_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scan's state for activations of ``dtype`` (that of ``motion_scan``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
