"""``benchmarks/gpu_check.py``, the device check, on a machine without a GPU.

It runs whole (every CUDA part says why it is skipped and the JSON and log are written), its
sanitizer workload runs on the CPU kernels, its file list holds every ``cuda``-marked test, and
the pieces it assembles on a GPU machine (install command, build environment, JUnit and
sanitizer parsing, speed ratios, the mamba-ssm shim) do what they say.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_runs_on_a_cpu_machine(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), f"--out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [p["name"] for p in result["parts"]]
    assert names == ["install", "tests", "sanitizer", "speed", "block_memory"]
    assert all(p["verdict"] == "skipped: no CUDA device" for p in result["parts"])
    assert result["ok"] is True
    assert result["card"]["cuda_available"] is False
    assert "skipped: no CUDA device" in proc.stdout
    assert (tmp_path / "gpu_check.log").stat().st_size < 16 * 2**20


def test_gpu_check_refuses_a_missing_out_folder() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert "--out: expected a folder" in proc.stderr


def test_sanitizer_workload_runs_on_the_cpu_kernels(capsys: pytest.CaptureFixture) -> None:
    """The same calls compute-sanitizer watches on a GPU, through the compiled CPU op: every
    dtype, reverse, initial state and N = 16 / 64 combination returns finite results."""
    calls = gpu_check.sanitizer_workload("cpu")
    assert calls == 4 * 2 * 2 * 2 * 2
    assert "all finite" in capsys.readouterr().out


def test_cuda_test_files_hold_every_cuda_marked_test() -> None:
    """On the GPU machine only CUDA_TEST_FILES are collected: a ``cuda``-marked test in any
    other file would silently never run there."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert files, proc.stdout[-2000:]
    assert files <= set(gpu_check.CUDA_TEST_FILES), files - set(gpu_check.CUDA_TEST_FILES)
    # and every listed file does hold some
    assert set(gpu_check.CUDA_TEST_FILES) <= files


def test_install_command_and_build_environment() -> None:
    cmd = gpu_check.install_command("/usr/bin/python3")
    assert cmd[:4] == ["/usr/bin/python3", "-m", "pip", "install"]
    for flag in ("--no-deps", "--no-build-isolation", "--no-index"):
        assert flag in cmd
    assert cmd[-2:] == ["-e", str(ROOT)]
    env = gpu_check.build_env((9, 0), 16)
    assert env == {
        "PKS4_BUILD_EXT": "1",
        "PKS4_BUILD_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": "9.0",
        "MAX_JOBS": "16",
    }
    assert gpu_check.gencode_flag((9, 0)) == "-gencode=arch=compute_90,code=sm_90"


def test_parse_junit_counts_and_failures(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" '
        'errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_ok2"/>'
        '<testcase classname="tests.test_a" name="test_bad">'
        '<failure message="AssertionError: y differs&#10;more">trace</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_skip">'
        '<skipped message="needs mamba"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_check.parse_junit(xml)
    assert summary["tests"] == 4 and summary["passed"] == 2
    assert summary["failures"] == 1 and summary["skipped"] == 1
    assert summary["failing"] == ["tests.test_a::test_bad: AssertionError: y differs"]
    assert summary["skip_reasons"] == {"needs mamba": 1}


@pytest.mark.parametrize(
    "returncode, output, clean",
    [
        (0, "========= ERROR SUMMARY: 0 errors\n", True),
        (9, "========= Invalid __global__ read\n========= ERROR SUMMARY: 2 errors\n", False),
        (0, "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", True),
        (9, "========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)\n", False),
        (None, "", False),
        (0, "no summary at all\n", False),
    ],
)
def test_sanitizer_verdict(returncode, output: str, clean: bool) -> None:
    assert gpu_check.sanitizer_verdict("memcheck", returncode, output)[0] is clean


def test_speed_summary_ratios() -> None:
    result = {
        "environment": {"copy_gbps": 4000.0, "fwd_floor_ms": 0.05},
        "rows": [
            {"kind": "motion_scan", "backend": "cuda", "fwd_ms": 0.08, "fwd_bwd_ms": 0.3},
            {"kind": "motion_scan", "backend": "mamba", "fwd_ms": 0.2, "fwd_bwd_ms": 0.9},
            {"kind": "PKS4Block", "backend": "cuda", "fwd_ms": 5.0, "fwd_bwd_ms": 9.0},
        ],
    }
    s = gpu_check.speed_summary(result)
    assert s["cuda_over_mamba_fwd_bwd"] == pytest.approx(3.0)
    assert s["cuda_over_mamba_fwd"] == pytest.approx(2.5)
    assert s["cuda_fwd_over_floor"] == pytest.approx(1.6)
    assert set(s["rows"]) == {"cuda", "mamba"}


def test_mamba_shim_imports_the_sdist_modules_without_its_init(tmp_path: Path) -> None:
    """The shim package resolves mamba_ssm's submodules from the unpacked sdist and never runs
    the sdist's ``__init__`` (here one that raises)."""
    source = tmp_path / "mamba_ssm-9.9"
    (source / "mamba_ssm" / "ops").mkdir(parents=True)
    (source / "mamba_ssm" / "__init__.py").write_text(
        '__version__ = "9.9"\nraise ImportError("the full package must not be imported")\n'
    )
    (source / "mamba_ssm" / "ops" / "__init__.py").write_text("")
    (source / "mamba_ssm" / "ops" / "probe.py").write_text("VALUE = 42\n")
    shim = tmp_path / "shim"
    gpu_check.write_mamba_shim(source, shim)
    code = "import mamba_ssm, mamba_ssm.ops.probe as p; print(mamba_ssm.__version__, p.VALUE)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(shim), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["9.9", "42"]


def test_report_text_keeps_the_report_from_its_header_on() -> None:
    output = "motion_scan: computing\n[1/2] ref ...\nmotion_scan speed | x\nrow  fwd\n[1] note\n"
    assert gpu_check.report_text(output, "motion_scan speed |") == (
        "motion_scan speed | x\nrow  fwd\n[1] note"
    )
    assert gpu_check.report_text("a\nb\nc", "missing |", max_lines=2) == "b\nc"


def test_speed_shapes_parse_to_the_issue_shapes() -> None:
    assert gpu_check._shape_of(gpu_check.SPEED_SHAPES["default"]) == {
        "batch": 2,
        "frames": 16,
        "locations": 196,
        "dim": 384,
        "state": 16,
        "dtype": "float32",
    }
    assert gpu_check._shape_of(gpu_check.SPEED_SHAPES["large"]) == {
        "batch": 8,
        "frames": 16,
        "locations": 196,
        "dim": 768,
        "state": 16,
        "dtype": "bfloat16",
    }
