"""``pks4-train`` / ``python -m pks4_layers.train``: train and evaluate from flags or YAML.

Examples::

    pks4-train --dataset benchmark --benchmark-task temporal --temporal pks4 --pretrained \\
        --crop-size 96 --short-side 96 --epochs 8 --output-dir runs/temporal-pks4
    torchrun --nproc_per_node=2 -m pks4_layers.train --config my_run.yaml
    pks4-train --config my_run.yaml --eval-only --resume runs/x/checkpoint_best.pt
    pks4-train --config my_run.yaml --dry-run --dry-run-clips 240000   # FLOPs, memory; no data

A mistake in the flags, the config or the files they name prints one line,
``pks4-train: error: <what>: expected <x>, got <y>``, and exits with status 2; ``--debug``
raises it with its traceback instead. Any other exception is a bug: traceback, status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .config import TrainConfig, build_parser, config_from_args
from .engine import run
from .errors import UsageError, one_line

PROG = "pks4-train"


def main(argv: Optional[Sequence[str]] = None) -> int:
    # A flag argparse cannot read exits here, with status 2 and one line (see config._Parser).
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {one_line(str(err))}", file=sys.stderr, flush=True)
        return 2


def _main(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.dry_run:
        return dry_run(cfg, num_classes=args.dry_run_classes, train_clips=args.dry_run_clips)
    result = run(cfg, eval_only=args.eval_only)
    summary = {k: v for k, v in result.summary.items() if k != "config"}
    if result.summary.get("world_size", 1) == 1 or _is_main():
        print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _config(args: argparse.Namespace) -> TrainConfig:
    """The config of the flags; a YAML file that does not parse is a usage error (the library's
    ``load_yaml`` keeps raising PyYAML's own error for Python callers)."""
    try:
        import yaml

        yaml_error: type[BaseException] = yaml.YAMLError
    except ImportError:  # pragma: no cover - depends on the environment
        yaml_error = _NoYAML
    try:
        return config_from_args(args)
    except yaml_error as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UsageError(
            f"config {args.config}",
            "YAML of plain keys and values (read with yaml.safe_load)",
            f"{problem}{where}",
        ) from err


class _NoYAML(Exception):
    """Stands for yaml.YAMLError where PyYAML is not installed (then nothing raises it)."""


def dry_run(
    cfg: TrainConfig, num_classes: Optional[int] = None, train_clips: Optional[int] = None
) -> int:
    """Prints the config's compute budget (a table, then one JSON line) and returns 0. The
    model has random weights: the pretrained weights are not needed. When the dataset's classes
    or clips cannot be known (no data here, no ``--dry-run-classes`` / ``--dry-run-clips``) it
    raises :class:`~.errors.UsageError`."""
    from .compute import compute_budget

    budget = compute_budget(cfg, num_classes=num_classes, train_clips=train_clips)
    print(budget.format())
    print(budget.to_json())
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
