"""Does fitting the factored readout's two weights on held-out clips help? Cross-fitted on val.

The classifier's factored readout sums the log-probabilities of a content head and a motion
head. Each head fits its training clips, including those where its cue cannot tell the class:
on new clips it then gives confident noise. ``PKS4VideoClassifier.calibrate_readout`` weights
the two heads by fitting them on held-out clips. This script measures that choice on the
validation split alone, without the test split: it reads motion-suite runs made with
``--keep-val-heads`` (each run's val log-probabilities of both heads, before any fitting),
fits the weights on one half of a run's val clips and scores the other half, then the other
way round, so that every clip is scored by weights fitted without it. It reports, per regime
and task, the top-1 of the plain sum and of the fitted weights, and their paired difference
on the same clips (a bootstrap over seeds and clips, :mod:`suite_stats`), and the same over
the mean of the temporal tasks.

    python benchmarks/motion_suite.py --peers --regimes frozen,scratch --models pks4 \\
        --keep-val-heads --out benchmarks/records/readout_calibration
    python benchmarks/readout_calibration.py "benchmarks/records/readout_calibration*.runs.json"
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_stats
from motion_suite import TEMPORAL_TASKS
from pks4_layers.models import combine_heads, fit_readout_scales


def cross_fitted(run: dict[str, Any], seed: int = 0) -> tuple[list[int], list[int]]:
    """Per val clip of ``run``: 1 where the plain sum is right, and 1 where weights fitted on
    the other half of the clips are (two folds, drawn with ``seed`` and the run's seed)."""
    heads = run["val_heads"]
    labels = torch.tensor(heads["labels"])
    content = torch.tensor(heads["content_logp"])
    motion = torch.tensor(heads["motion_logp"])
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 * seed + run["seed"]))
    folds = (order[: n // 2], order[n // 2 :])
    fitted = torch.zeros(n, dtype=torch.long)
    for fit, score in (folds, folds[::-1]):
        scales = fit_readout_scales(content[fit], motion[fit], labels[fit])
        fitted[score] = combine_heads(content[score], motion[score], scales).argmax(-1)
    plain = combine_heads(content, motion).argmax(-1)
    return (plain == labels).int().tolist(), (fitted == labels).int().tolist()


def table(runs: list[dict[str, Any]]) -> str:
    """The markdown table: per regime and task, then the temporal mean."""
    cells: dict[tuple[str, str], dict[str, list[list[int]]]] = defaultdict(
        lambda: {"ones": [], "fit": []}
    )
    for run in sorted(runs, key=lambda r: (r["regime"], r["task"], r["seed"])):
        plain, fitted = cross_fitted(run)
        cells[(run["regime"], run["task"])]["ones"].append(plain)
        cells[(run["regime"], run["task"])]["fit"].append(fitted)
    lines = [
        "| regime | task | seeds | plain sum top-1 (%) | fitted weights top-1 (%) | "
        "fitted - plain (points) [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for regime in sorted({r for r, _ in cells}):
        tasks = [t for t in (*TEMPORAL_TASKS, "spatial") if (regime, t) in cells]
        for task in tasks:
            c = cells[(regime, task)]
            ones, fit = (suite_stats.accuracy_interval(c[k]) for k in ("ones", "fit"))
            diff = suite_stats.paired_difference(c["fit"], c["ones"])
            lines.append(
                f"| {regime} | {task} | {len(c['fit'])} | {ones['mean']:.1f} | "
                f"{fit['mean']:.1f} | {suite_stats.format_difference(diff)} |"
            )
        temporal = [t for t in tasks if t in TEMPORAL_TASKS]
        if len(temporal) > 1:
            a = {t: cells[(regime, t)]["fit"] for t in temporal}
            b = {t: cells[(regime, t)]["ones"] for t in temporal}
            ones_mean = suite_stats.task_mean_interval(b)["mean"]
            fit_mean = suite_stats.task_mean_interval(a)["mean"]
            diff = suite_stats.paired_task_mean_difference(a, b)
            lines.append(
                f"| {regime} | temporal mean | | {ones_mean:.1f} | {fit_mean:.1f} | "
                f"{suite_stats.format_difference(diff)} |"
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", help="glob of motion-suite .runs.json files made with --keep-val-heads")
    p.add_argument("--out", default="", help="also write the table to this .md file")
    args = p.parse_args(argv)
    runs = [
        r
        for path in sorted(glob.glob(args.runs))
        for r in json.loads(Path(path).read_text())["runs"]
        if r.get("val_heads")
    ]
    if not runs:
        print(f"runs: expected runs with val_heads (--keep-val-heads) in {args.runs!r}, got none")
        return 2
    text = table(runs)
    print(text)
    if args.out:
        Path(args.out).write_text(
            "Cross-fitted on val: the readout's weights fitted on one half of each run's val "
            "clips, scored on the other half, and the other way round.\n\n" + text + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
