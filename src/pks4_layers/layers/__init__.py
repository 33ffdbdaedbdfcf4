"""The PKS4 modules: kinematic priors, the parallel temporal scan, and the block."""

from .block import PKS4Block
from .kinematic_prior import KinematicPriorEncoder
from .stream_state import PKS4StreamState, PriorStreamState, ScanStreamState
from .temporal_scan import ParallelTemporalScan

__all__ = [
    "KinematicPriorEncoder",
    "PKS4Block",
    "PKS4StreamState",
    "ParallelTemporalScan",
    "PriorStreamState",
    "ScanStreamState",
]
