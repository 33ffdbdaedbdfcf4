"""``pip install pks4-layers`` the way users get it: an sdist, a wheel built from that sdist (not
from the tree), installed into a fresh environment, used from a folder outside the checkout.

The fresh environment reuses the torch already installed (a ``.pth`` line pointing at this
interpreter's site-packages: its own ``.pth`` files, among them this checkout's editable
install, are not processed there), so that the package under test is the wheel's copy and
nothing else. The kernel cache starts empty, so the first use compiles the CPU kernels from the
sources the wheel carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

import pks4_layers

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SOURCES = {
    "bindings.cpp",
    "bindings_common.h",
    "bindings_cuda.cpp",
    "cpu_common.h",
    "cpu_update.h",
    "cuda_common.cuh",
    "motion_scan.h",
    "motion_scan_bwd.cu",
    "motion_scan_bwd_cpu.cpp",
    "motion_scan_fwd.cu",
    "motion_scan_fwd_cpu.cpp",
}

pytestmark = pytest.mark.slow


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of the checkout's build switches."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PKS4_") and k not in ("PYTHONPATH", "MAX_JOBS")
    }
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``python -m build``: the sdist from the checkout, then the wheel from that sdist, with
    pip's default build isolation (torch is not needed to build the default wheel)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], env=_clean_env())
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


def test_sdist_holds_what_builds_tests_and_benchmarks(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "README.md",
        "LICENSE",
        "Makefile",
        "pyproject.toml",
        "setup.py",
        ".ci/run",
        "benchmarks/scan_speed.py",
        "benchmarks/gpu_check.py",
        "configs/k400_vitb16_clip_8f.yaml",
        "tests/conftest.py",
        "tests/cuda_emulation/include/cuda_runtime.h",
        "src/pks4_layers/__init__.py",
        "src/pks4_layers/py.typed",
        "CHANGELOG.md",
        "docs/ablations_format3.md",
    ):
        assert needed in names, needed
    assert {f"csrc/motion_scan/{n}" for n in KERNEL_SOURCES} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".so", ".pyc", ".o"))]


def test_wheel_is_pure_python_with_the_kernel_sources(dists: dict[str, Path]) -> None:
    wheel = dists["wheel"]
    assert wheel.name == f"pks4_layers-{pks4_layers.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"pks4_layers-{pks4_layers.__version__}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert {f"pks4_layers/_csrc/motion_scan/{n}" for n in KERNEL_SOURCES} <= names
    assert "pks4_layers/bench/scan_speed.py" in names
    assert "pks4_layers/py.typed" in names  # PEP 561: the type hints reach type checkers
    assert "pks4_layers/baselines/temporal_attention.py" in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    assert not [n for n in names if "__pycache__" in n or n.endswith((".so", ".pyc"))]
    assert f"{info}/licenses/LICENSE" in names
    assert f"Version: {pks4_layers.__version__}\n" in metadata
    assert "License-Expression: Apache-2.0\n" in metadata
    assert "License-File: LICENSE\n" in metadata
    assert "Requires-Dist: torch>=2.6\n" in metadata
    assert "Description-Content-Type: text/markdown" in metadata
    assert "pks4-train = pks4_layers.train.cli:main" in entry_points
    assert "pks4-bench = pks4_layers.bench.scan_speed:main" in entry_points


def test_twine_accepts_the_sdist_and_the_wheel(dists: dict[str, Path]) -> None:
    proc = _run([sys.executable, "-m", "twine", "check", str(dists["sdist"]), str(dists["wheel"])])
    assert proc.stdout.count("PASSED") == 2, proc.stdout


_USE = textwrap.dedent(
    """
    import importlib.metadata, json, sys, time, warnings
    warnings.simplefilter("error", RuntimeWarning)  # a fallback to the torch backend fails
    import torch
    import pks4_layers
    from pks4_layers import PKS4Block, motion_scan
    from pks4_layers.ops import motion_scan_ref
    from pks4_layers.ops.build import load

    start = time.perf_counter()
    status = load("cpu")
    build_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    b, t, l, d, n = 2, 9, 3, 12, 5
    args = dict(
        u=torch.randn(b, t, l, d, generator=g, dtype=torch.float64),
        delta=torch.randn(b, t, l, d, generator=g, dtype=torch.float64),
        A=-torch.rand(d, n, generator=g, dtype=torch.float64),
        B=torch.randn(b, t, l, n, generator=g, dtype=torch.float64),
        C=torch.randn(b, t, l, n, generator=g, dtype=torch.float64),
        z=torch.randn(b, t, l, d, generator=g, dtype=torch.float64),
    )
    diff = (motion_scan(**args, backend="cpu") - motion_scan_ref(**args)).abs().max().item()
    block = PKS4Block(16, d_state=4)
    x = torch.randn(1, 4, 16, 3, 3, requires_grad=True)
    y = block(x)
    y.square().sum().backward()
    print(json.dumps({
        "file": pks4_layers.__file__,
        "version": pks4_layers.__version__,
        "metadata_version": importlib.metadata.version("pks4-layers"),
        "loaded": status.loaded, "origin": status.origin, "reason": status.reason,
        "build_s": build_s, "max_diff": diff,
        "block_shape": list(y.shape), "grad_finite": bool(torch.isfinite(x.grad).all()),
    }))
    """
)


def test_installed_wheel_works_from_outside_the_checkout(
    dists: dict[str, Path], tmp_path: Path
) -> None:
    env_dir = tmp_path / "env"
    _run([sys.executable, "-m", "venv", str(env_dir)])
    python = env_dir / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    # torch, einops and the rest from this interpreter; the package itself from the wheel.
    (site / "_reuse_installed_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(dists["wheel"])],
        env=_clean_env(),
    )

    work = tmp_path / "work"
    work.mkdir()
    cache = tmp_path / "kernel-cache"
    # ninja comes with this interpreter's environment, as with any user's torch install.
    path = os.pathsep.join([str(env_dir / "bin"), str(Path(sys.executable).parent), "/usr/bin"])
    env = _clean_env(PKS4_CACHE_DIR=str(cache), PATH=path)
    run = dict(cwd=work, env=env)

    start = time.perf_counter()
    proc = _run([str(python), "-c", _USE], **run)
    first_use_s = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(site)), result["file"]  # the wheel, not src/
    assert result["version"] == result["metadata_version"] == pks4_layers.__version__
    assert result["loaded"], result["reason"]
    assert result["origin"].startswith("built on first use"), result["origin"]
    assert str(cache) in result["origin"]
    assert result["max_diff"] < 1e-12
    assert result["block_shape"] == [1, 4, 16, 3, 3] and result["grad_finite"]
    assert "compiling the CPU kernels" in proc.stderr
    assert "No CUDA runtime" not in proc.stderr, proc.stderr
    print(f"first use, CPU kernels built from the wheel's sources: {result['build_s']:.0f} s")
    print(f"first use, the whole script: {first_use_s:.0f} s")

    info = _run([str(python), "-m", "pks4_layers.info"], **run)
    assert "cpu" in info.stdout and "No CUDA runtime" not in info.stderr
    assert (
        "usage: pks4-train" in _run([str(env_dir / "bin" / "pks4-train"), "--help"], **run).stdout
    )
    bench = env_dir / "bin" / "pks4-bench"
    assert "--backends" in _run([str(bench), "--help"], **run).stdout
    tiny = ["--batch=1", "--frames=2", "--size=2x2", "--dim=4", "--state=2", "--repeats=1"]
    out = _run([str(bench), *tiny, "--warmup=0", "--no-peak", "--backends=cpu,torch"], **run)
    assert "motion_scan[cpu]" in out.stdout and "PKS4Block[cpu]" in out.stdout
    assert (work / "scan_speed_results" / "scan_speed.json").is_file()
