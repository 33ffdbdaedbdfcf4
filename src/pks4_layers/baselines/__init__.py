"""The temporal modules users would insert instead of PKS4, on PKS4Block's calling convention.

Each takes feature maps ``(B, T, C, H, W)`` or tokens ``(B, T, N, C)`` with
``forward(x, grid=None, num_prefix_tokens=0)``, returns the input's shape, is the identity when
created, takes ``inner_dim`` (its width), ``bidirectional`` (``False``: causal, where the
design allows it) and ``device`` / ``dtype`` (where and in which dtype its parameters are
created), and has ``num_params(dim, **kwargs)``, its parameter count from the formula
in its docstring. :func:`pks4_layers.models.create_temporal` builds them by name.
"""

from .frame_mlp import FrameMLP
from .prior_adapter import PriorAdapter
from .residual import ResidualTemporalModule
from .selective_scan import SelectiveScanBlock
from .spatiotemporal_scan import SpatiotemporalScan
from .temporal_adapter import TemporalAdapter
from .temporal_attention import TemporalAttention
from .temporal_shift import TemporalShift

__all__ = [
    "FrameMLP",
    "PriorAdapter",
    "ResidualTemporalModule",
    "SelectiveScanBlock",
    "SpatiotemporalScan",
    "TemporalAdapter",
    "TemporalAttention",
    "TemporalShift",
]
