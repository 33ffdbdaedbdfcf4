"""``benchmarks/suite_targets.py``: each target's verdict follows the summary rows it reads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(SCRIPTS))
import suite_targets  # noqa: E402


def _versus(diff: float, half: float = 3.0) -> dict[str, Any]:
    low, high = diff - half, diff + half
    verdict = "better" if low > 0 else "worse" if high < 0 else "no difference"
    return {"diff": diff, "low": low, "high": high, "verdict": verdict}


def _row(regime: str, task: str, model: str, mean: float, low_seed: float, vs: Optional[float]):
    return {
        "regime": regime,
        "task": task,
        "model": model,
        "mean": mean,
        "min": low_seed,
        "vs_reference": None if vs is None else _versus(vs),
    }


def _model(regime: str, model: str, vs: Optional[float]) -> dict[str, Any]:
    return {"regime": regime, "model": model, "vs_reference": None if vs is None else _versus(vs)}


def _status(targets: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {(t["target"], t["regime"]): t["status"] for t in targets}


def test_a_block_that_wins_everywhere_meets_every_target() -> None:
    rows, models = [], []
    for regime in ("frozen", "scratch"):
        for task in ("temporal", "rotation"):
            rows.append(_row(regime, task, "pks4", 97.0, 93.0, None))
            rows.append(_row(regime, task, "scan", 60.0, 55.0, -37.0))
            rows.append(_row(regime, task, "probe_local", 96.0, 94.0, -1.0))
        rows.append(_row(regime, "spatial", "pks4", 90.0, 88.0, None))
        rows.append(_row(regime, "spatial", "mean", 90.5, 88.0, 0.5))
        models += [_model(regime, "pks4", None), _model(regime, "tsm", -20.0)]
        models += [_model(regime, "scan", -30.0), _model(regime, "pks4_curl", +5.0)]
        models += [_model(regime, "probe_local", +1.0)]
    status = _status(suite_targets.check_targets(rows, models))
    assert status == {
        ("probe", "frozen"): "met",
        **{
            (t, r): "met"
            for t in ("peers", "prior", "accuracy", "spatial")
            for r in ("frozen", "scratch")
        },
    }


def test_each_failure_is_named_in_its_target() -> None:
    rows = [
        _row("frozen", "temporal", "pks4", 96.0, 91.0, None),
        _row("frozen", "rotation", "pks4", 96.0, 89.0, None),  # a seed below 90
        _row("frozen", "temporal", "probe_local", 99.0, 98.0, +10.0),  # the probe is better
        _row("frozen", "rotation", "probe_local", 95.0, 94.0, -1.0),
        _row("frozen", "temporal", "scan", 95.0, 90.0, -1.0),  # not significantly worse
        _row("frozen", "rotation", "scan", 50.0, 45.0, -46.0),
        _row("frozen", "spatial", "pks4", 80.0, 78.0, None),
        _row("frozen", "spatial", "mean", 90.0, 88.0, +10.0),  # the frame average wins
    ]
    models = [
        _model("frozen", "pks4", None),
        _model("frozen", "attention", -1.0),  # inside the interval: not ahead
        _model("frozen", "tsm", -20.0),
    ]
    targets = {t["target"]: t for t in suite_targets.check_targets(rows, models)}
    assert {k: t["status"] for k, t in targets.items()} == {
        "probe": "missed",
        "peers": "missed",
        "prior": "missed",
        "accuracy": "missed",
        "spatial": "missed",
    }
    assert targets["probe"]["evidence"].startswith("temporal: probe +10.0")
    assert targets["peers"]["evidence"].startswith("attention -1.0")
    assert targets["prior"]["evidence"].startswith("temporal: scan -1.0")
    assert targets["accuracy"]["evidence"].startswith("rotation 96.0 (worst seed 89.0)")
    assert "frame average +10.0" in targets["spatial"]["evidence"]
    table = suite_targets.format_targets(list(targets.values()))
    assert table.count("\n") == 1 + len(targets) and "| peers | frozen | missed |" in table


def test_targets_without_their_rows_are_not_run() -> None:
    rows = [_row("scratch", "temporal", "pks4", 91.0, 86.0, None)]
    status = _status(suite_targets.check_targets(rows, [_model("scratch", "pks4", None)]))
    assert status == {
        ("peers", "scratch"): "not run",
        ("prior", "scratch"): "not run",
        ("accuracy", "scratch"): "met",
    }
    assert suite_targets.check_targets([], []) == []
