"""``pks4-train`` / ``python -m pks4_layers.train``: train and evaluate from flags or YAML.

Examples::

    pks4-train --dataset benchmark --benchmark-task temporal --temporal pks4 --pretrained \\
        --crop-size 96 --short-side 96 --epochs 8 --output-dir runs/temporal-pks4
    torchrun --nproc_per_node=2 -m pks4_layers.train --config my_run.yaml
    pks4-train --config my_run.yaml --eval-only --resume runs/x/checkpoint_best.pt
    pks4-train --config my_run.yaml --dry-run --dry-run-clips 240000   # FLOPs, memory; no data
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from .config import TrainConfig, parse_args
from .engine import run


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg, args = parse_args(argv)
    if args.dry_run:
        return dry_run(cfg, num_classes=args.dry_run_classes, train_clips=args.dry_run_clips)
    result = run(cfg, eval_only=args.eval_only)
    summary = {k: v for k, v in result.summary.items() if k != "config"}
    if result.summary.get("world_size", 1) == 1 or _is_main():
        print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def dry_run(
    cfg: TrainConfig, num_classes: Optional[int] = None, train_clips: Optional[int] = None
) -> int:
    """Prints the config's compute budget (a table, then one JSON line) and returns 0; 2 with
    a message on stderr when the dataset's classes or clips cannot be known."""
    from .compute import compute_budget

    try:
        budget = compute_budget(cfg, num_classes=num_classes, train_clips=train_clips)
    except ValueError as err:
        print(f"pks4-train --dry-run: {err}", file=sys.stderr)
        return 2
    print(budget.format())
    print(budget.to_json())
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
