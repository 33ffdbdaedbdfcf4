"""Training and evaluation of video classifiers built on a 2D backbone and a temporal module.

``run(TrainConfig(...))`` from Python, ``pks4-train`` (or ``python -m pks4_layers.train``)
from the shell, unchanged under ``torchrun``.
"""

from .config import TrainConfig, config_from_mapping, load_yaml, parse_args
from .distributed import ShardedSampler
from .engine import RunResult, evaluate, run, summarize

__all__ = [
    "RunResult",
    "ShardedSampler",
    "TrainConfig",
    "config_from_mapping",
    "evaluate",
    "load_yaml",
    "parse_args",
    "run",
    "summarize",
]
