"""The PKS4 modules: kinematic priors, the parallel temporal scan, and the block."""

from .block import PKS4Block
from .kinematic_prior import KinematicPriorEncoder
from .masked_batch_norm import MaskedBatchNorm, convert_sync_masked_batch_norm
from .stream_state import PKS4StreamState, PriorStreamState, ScanStreamState
from .temporal_scan import ParallelTemporalScan

__all__ = [
    "KinematicPriorEncoder",
    "MaskedBatchNorm",
    "PKS4Block",
    "PKS4StreamState",
    "ParallelTemporalScan",
    "PriorStreamState",
    "ScanStreamState",
    "convert_sync_masked_batch_norm",
]
