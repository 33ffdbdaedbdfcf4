"""``pks4-train`` / ``python -m pks4_layers.train``: train and evaluate from flags or YAML.

Examples::

    pks4-train --dataset benchmark --benchmark-task temporal --temporal pks4 --pretrained \\
        --crop-size 96 --short-side 96 --epochs 8 --output-dir runs/temporal-pks4
    torchrun --nproc_per_node=2 -m pks4_layers.train --config my_run.yaml
    pks4-train --config my_run.yaml --eval-only --resume runs/x/checkpoint_best.pt
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from .config import parse_args
from .engine import run


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg, args = parse_args(argv)
    result = run(cfg, eval_only=args.eval_only)
    summary = {k: v for k, v in result.summary.items() if k != "config"}
    if result.summary.get("world_size", 1) == 1 or _is_main():
        print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
