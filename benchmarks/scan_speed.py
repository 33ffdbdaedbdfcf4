"""``pks4-bench`` from a source checkout: the speed and memory of every ``motion_scan`` backend
and of a ``PKS4Block``, results in ``benchmarks/results``.

The benchmark itself ships with the package (:mod:`pks4_layers.bench.scan_speed`), so that
``pip install pks4-layers`` users run the same code as ``pks4-bench``; see its docstring for
the flags and what every column means.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pks4_layers.bench.scan_speed import main

if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    # First, so that a --results-dir given on the command line still wins.
    sys.exit(main([f"--results-dir={results}", *sys.argv[1:]]))
