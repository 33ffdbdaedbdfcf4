"""The build: which extensions exist, that the CUDA sources compile where a toolkit is, info."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pks4_layers.ops import build
from pks4_layers.ops.motion_scan import KNOWN_BACKENDS, backend_status

# `make test` builds the extensions ahead of time (PKS4_BUILD_EXT=1 in the Makefile).
AHEAD_OF_TIME = os.environ.get("PKS4_BUILD_EXT", "") == "1"


def test_info_lists_every_backend():
    out = subprocess.run(
        [sys.executable, "-m", "pks4_layers.info"], capture_output=True, text=True, check=True
    ).stdout
    assert f"torch       {torch.__version__}" in out
    for name in KNOWN_BACKENDS:
        usable, reason = backend_status(name)
        assert (f"  {name:<6} available" in out) if usable else (reason in out), name


def test_cpu_backend_is_available():
    usable, reason = backend_status("cpu")
    assert usable, f"the CPU extension must build and load here: {reason}"


@pytest.mark.skipif(not AHEAD_OF_TIME, reason="the extensions were not built ahead of time")
def test_ahead_of_time_cpu_extension_is_the_one_loaded():
    status = build.load("cpu")
    assert status.loaded and status.origin.startswith("prebuilt"), status


@pytest.mark.cuda
@pytest.mark.skipif(not AHEAD_OF_TIME, reason="the extensions were not built ahead of time")
@pytest.mark.skipif(
    torch.version.cuda is None or build.find_cuda_home() is None,
    reason="needs a CUDA build of torch and a CUDA toolkit to compile the CUDA kernels",
)
def test_cuda_sources_were_compiled():
    """Where nvcc is available the CUDA kernels are compiled, so a change that breaks them
    fails here even on a machine without a GPU."""
    library = build._prebuilt("_C_cuda")
    assert library is not None, "the CUDA extension (pks4_layers._C_cuda) was not built"
    newest_source = max(
        os.path.getmtime(build.csrc_dir() / name) for name in build.CUDA_SOURCES + build.HEADERS
    )
    assert os.path.getmtime(library) >= newest_source, "the CUDA extension is older than csrc"


def test_cuda_arch_flags_follow_the_environment(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert build.cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
    ]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;9.0+PTX")
    assert build.cuda_arch_flags() == [
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def test_a_build_older_than_the_sources_is_not_loaded(tmp_path):
    """After editing the kernels in a checkout, the old ahead-of-time binary is ignored."""
    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    newest = max((build.csrc_dir() / n).stat().st_mtime for n in build.CPU_SOURCES + build.HEADERS)
    os.utime(library, (newest - 10, newest - 10))
    assert build._is_stale(library, "cpu")
    os.utime(library, (newest + 10, newest + 10))
    assert not build._is_stale(library, "cpu")
