"""``SpatiotemporalScan`` (``temporal="st_scan"``): VideoMamba's one scan over all tokens.

Li et al., "VideoMamba: State Space Model for Efficient Video Understanding" (ECCV 2024) flatten
the tokens of a clip frame by frame into one sequence of ``T * H * W`` and run a bidirectional
selective scan over it. Here that order runs on the library's scan (the same
:class:`~pks4_layers.ParallelTemporalScan`, no prior) along the flattened axis, so its cost and
accuracy sit beside the per-location scan of ``scan`` and PKS4: the same parameters, a sequence
``H * W`` times longer, one sequence per clip instead of one per location.
"""

from __future__ import annotations

from typing import Optional

from einops import rearrange
from torch import Tensor

from .selective_scan import SelectiveScanBlock

__all__ = ["SpatiotemporalScan"]


class SpatiotemporalScan(SelectiveScanBlock):
    """``x + scan(down(norm(x)))`` with the scan over the ``T * N`` tokens of each clip.

    The tokens ``(B, T, N, C)`` (prefix tokens, then the grid in row-major order, frame after
    frame) become one sequence ``(B, T * N, 1, C)``; the scan's temporal convolution and state
    run along it, forward and reverse (VideoMamba's bidirectional scan), or forward only with
    ``bidirectional=False``, which is causal in time: frame ``t``'s tokens see the tokens of
    earlier frames and the earlier tokens of their own frame. Arguments, defaults and
    parameters (:func:`~pks4_layers.baselines.selective_scan.scan_num_params`) are those of
    :class:`SelectiveScanBlock`.

    Shapes (``forward(x, grid=None, num_prefix_tokens=0)``):
        ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``; ``(B, T, N, C)`` -> ``(B, T, N, C)``.
    """

    def branch(self, h: Tensor, grid: Optional[tuple[int, int]], prefix: int) -> Tensor:
        T = h.shape[1]
        seq = rearrange(self.down(h), "b t l c -> b (t l) 1 c")
        return rearrange(self.scan(seq), "b (t l) 1 c -> b t l c", t=T)

    def extra_repr(self) -> str:
        return (
            super()
            .extra_repr()
            .replace("order=per location over time", "order=one sequence of T*N tokens per clip")
        )
