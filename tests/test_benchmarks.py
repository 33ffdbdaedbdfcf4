"""End-to-end run of ``benchmarks/scan_speed.py`` on a tiny shape.

Checks that the script runs, prints a row per backend and a block row, and writes a JSON with
sane numbers and a PNG. Timings are only checked for being finite and positive: how fast a
backend is depends on the machine and is never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pks4_layers.ops import available_backends

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scan_speed.py"
TINY = [
    "--batch=1",
    "--frames=3",
    "--size=3x2",
    "--dim=8",
    "--state=4",
    "--repeats=1",
    "--warmup=0",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path: Path, *extra: str) -> tuple[str, dict, Path]:
    json_path, png_path = tmp_path / "speed.json", tmp_path / "speed.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, f"--json={json_path}", f"--plot={png_path}", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(json_path.read_text()), png_path


@pytest.mark.slow
@pytest.mark.parametrize("peak", [True, False], ids=["peak", "no-peak"])
def test_scan_speed_end_to_end(tmp_path: Path, peak: bool) -> None:
    stdout, result, png_path = _run(tmp_path, *([] if peak else ["--no-peak"]))

    backends = available_backends()
    table_rows = [line.split()[0] for line in stdout.splitlines() if line.strip()]
    for name in backends:
        assert f"motion_scan[{name}]" in table_rows, stdout
        assert f"PKS4Block[{name}]" in table_rows, stdout

    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {f"{k}[{b}]" for k in ("motion_scan", "PKS4Block") for b in backends}
    assert result["config"]["dim"] == 8
    for label, row in rows.items():
        if row["backend"] not in ("ref", "torch") and row["error"]:
            continue  # a backend unusable here (wrong device, not built) reports why and no time
        assert row["error"] is None, (label, row["error"])
        for key in ("fwd_ms", "fwd_bwd_ms", "tokens_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (label, key, row[key])
        assert row["saved_bytes"] > 0, label
        if peak:
            assert row["peak_bytes"] >= 0, label
        else:
            assert row["peak_bytes"] is None, label
    for kind in ("motion_scan", "PKS4Block"):
        assert rows[f"{kind}[ref]"]["fwd_speedup_vs_ref"] == pytest.approx(1.0)
        assert rows[f"{kind}[torch]"]["max_abs_diff_y_vs_ref"] < 1e-4
        assert rows[f"{kind}[torch]"]["max_abs_diff_grad_vs_ref"] < 1e-4

    assert png_path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_scan_speed_reports_failing_backend(tmp_path: Path) -> None:
    # A backend that raises must become a row with its reason, not end the run.
    stdout, result, _ = _run(tmp_path, "--no-peak", "--no-block", "--backends=ref,nonexistent")
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["ref"]["error"] is None
    assert rows["nonexistent"]["error"] and "backend" in rows["nonexistent"]["error"]
    assert rows["nonexistent"]["fwd_ms"] is None
    assert "motion_scan[nonexistent]" in stdout


def test_scan_speed_block_rows_only(tmp_path: Path) -> None:
    stdout, result, _ = _run(tmp_path, "--no-peak", "--no-scan", "--backends=ref,torch")
    assert [r["label"] for r in result["rows"]] == ["PKS4Block[ref]", "PKS4Block[torch]"]
    assert result["config"]["scan"] is False
    assert "bandwidth:" not in stdout and "copy_gbps" not in result["environment"]


def test_scan_speed_refuses_no_block_with_no_scan() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--no-block", "--no-scan"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--no-block and --no-scan: expected at most one of them, got both" in proc.stderr


@pytest.mark.slow
def test_result_table_script_trains_every_model_and_saves_table(tmp_path):
    """benchmarks/result_table.py on a tiny setting (random frozen backbone, 1 epoch): one
    row per (task, model) with sane numbers, a markdown table, a JSON and a PNG."""
    pytest.importorskip("av")
    pytest.importorskip("timm")
    script = SCRIPT.parent / "result_table.py"
    out = tmp_path / "table"
    args = [
        "--tasks=temporal,spatial",
        "--models=mean,pks4",
        "--no-pretrained",
        "--epochs=1",
        "--frames=4",
        "--size=64",
        "--train-clips=8",
        "--val-clips=6",
        "--batch-size=4",
        f"--data-root={tmp_path / 'data'}",
        f"--runs-dir={tmp_path / 'runs'}",
        f"--out={out}",
        "--no-progress",
    ]
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["task"], r["model"]) for r in rows] == [
        ("temporal", "mean"),
        ("temporal", "pks4"),
        ("spatial", "mean"),
        ("spatial", "pks4"),
    ]
    for r in rows:
        assert 0.0 <= r["val_top1"] <= 100.0 and r["epochs_to_best"] == 1
        assert r["gflops"] > 0 and math.isfinite(r["train_time_s"])
    by_model = {r["model"]: r for r in rows if r["task"] == "temporal"}
    assert by_model["mean"]["gflops_temporal"] == 0.0 < by_model["pks4"]["gflops_temporal"]
    assert by_model["mean"]["params_trainable"] < by_model["pks4"]["params_trainable"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| temporal |") == 2 and "| pks4 |" in table
    assert "| final-epoch val top-1 (%) | best-epoch val top-1 (%) |" in table
    assert out.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
