"""pks4-layers: PKS4 temporal layers (Parallel Kinematic Selective State Space Scanners).

A drop-in temporal module after any 2D image backbone. The layers are this library's
interpretation of Zeng et al., "PKS^4: Parallel Kinematic Selective State Space Scanners for
Efficient Video Understanding", arXiv:2604.26461 (2026), built from its abstract: the paper's
exact formulas were not available.
"""

from .layers import KinematicPriorEncoder, ParallelTemporalScan, PKS4Block
from .ops import motion_scan

__version__ = "0.3.0"

__all__ = [
    "KinematicPriorEncoder",
    "PKS4Block",
    "ParallelTemporalScan",
    "__version__",
    "motion_scan",
]
