"""Training and evaluation of video classifiers built on a 2D backbone and a temporal module.

``run(TrainConfig(...))`` from Python, ``pks4-train`` (or ``python -m pks4_layers.train``)
from the shell, unchanged under ``torchrun``. A mistake in the config or in the files it names
raises :class:`UsageError` (a ``ValueError``), which ``pks4-train`` prints as one line.
"""

from .config import TrainConfig, config_from_mapping, load_yaml, parse_args
from .distributed import ShardedSampler
from .engine import RunResult, evaluate, run, summarize
from .errors import UsageError

__all__ = [
    "RunResult",
    "ShardedSampler",
    "TrainConfig",
    "UsageError",
    "config_from_mapping",
    "evaluate",
    "load_yaml",
    "parse_args",
    "run",
    "summarize",
]
