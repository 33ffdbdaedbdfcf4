"""One rank of the DDP test (launched by torchrun from test_train_end_to_end.py).

Runs the library's training entry point on a config read from a JSON file, then writes what
the test compares: this rank's final parameters and the run's summary. The library itself
writes only from rank 0; these per-rank files are the test's own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from pks4_layers.train import config_from_mapping, run


def main() -> None:
    config_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = config_from_mapping(json.loads(config_path.read_text()))
    result = run(cfg)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result.model.state_dict(), out_dir / f"rank{rank}.pt")
    summary = {k: v for k, v in result.summary.items() if k != "config"}
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
