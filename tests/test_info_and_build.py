"""The build: which extensions exist, that the CUDA sources compile where a toolkit is, info."""

from __future__ import annotations

import json
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


# --------------------------------------------------------------------------------------------
# an ahead-of-time build meets another torch


@pytest.mark.skipif(not AHEAD_OF_TIME, reason="the extensions were not built ahead of time")
def test_ahead_of_time_build_records_the_torch_it_was_built_against():
    library = build._prebuilt("_C")
    assert library is not None
    recorded = json.loads((library.parent / build.BUILD_INFO).read_text())
    assert recorded == build.build_key()
    assert build._prebuilt_mismatch(library) is None


def test_build_record_mismatches_are_named(tmp_path):
    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    assert "is missing" in build._prebuilt_mismatch(library)
    (tmp_path / build.BUILD_INFO).write_text("{not json")
    assert "unreadable" in build._prebuilt_mismatch(library)
    other = {**build.build_key(), "torch": "2.4.0", "cuda": "12.1"}
    (tmp_path / build.BUILD_INFO).write_text(json.dumps(other))
    why = build._prebuilt_mismatch(library)
    assert why == (
        f"built for torch 2.4.0 (running {torch.__version__}), "
        f"cuda 12.1 (running {torch.version.cuda})"
    )
    build.write_build_info(tmp_path)
    assert build._prebuilt_mismatch(library) is None


def _fresh_load(monkeypatch, tmp_path, prebuilt):
    """``build.load("cpu")`` with its memo emptied, the package's prebuilt library replaced by
    ``prebuilt`` and the just-in-time build replaced by a recorder (no compiler runs)."""
    jit_calls: list[str] = []

    def fake_jit(kind: str):
        jit_calls.append(kind)
        return tmp_path / "jit" / "pks4_cpu.so"

    monkeypatch.setattr(build, "_status", {})
    monkeypatch.setattr(build, "_warned_prebuilt", set())
    monkeypatch.setattr(build, "_prebuilt", lambda stem: prebuilt)
    monkeypatch.setattr(build, "_is_stale", lambda library, kind: False)
    monkeypatch.setattr(build, "_jit_build", fake_jit)
    monkeypatch.delenv("PKS4_NO_EXT", raising=False)
    monkeypatch.delenv("PKS4_FORCE_JIT", raising=False)
    return jit_calls


def test_a_build_for_another_torch_is_not_loaded_one_warning_then_jit(monkeypatch, tmp_path):
    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"not a library")
    (tmp_path / build.BUILD_INFO).write_text(json.dumps({**build.build_key(), "torch": "9.9"}))
    jit_calls = _fresh_load(monkeypatch, tmp_path, library)
    loaded: list[str] = []
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    with pytest.warns(RuntimeWarning, match=r"not loading the ahead-of-time kernels .*torch 9\.9"):
        status = build.load("cpu")
    assert loaded == [] and jit_calls == ["cpu"]
    assert status.loaded and status.origin.startswith("built on first use"), status


def test_a_build_that_does_not_load_falls_back_to_jit(monkeypatch, tmp_path):
    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"not a library")
    build.write_build_info(tmp_path)
    jit_calls = _fresh_load(monkeypatch, tmp_path, library)

    def undefined_symbol(path: str) -> None:
        raise OSError(f"{path}: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")

    monkeypatch.setattr(torch.ops, "load_library", undefined_symbol)
    with pytest.warns(RuntimeWarning, match=r"it does not load .*undefined symbol"):
        status = build.load("cpu")
    assert jit_calls == ["cpu"] and status.loaded, status


def test_a_cpu_build_prints_no_cuda_toolkit_warning(tmp_path):
    """Importing torch.utils.cpp_extension where a CUDA toolkit exists but no GPU makes torch
    log "No CUDA runtime is found"; the CPU build imports it quietly."""
    code = (
        "import torch; from pks4_layers.ops import build; "
        "build._import_cpp_extension(for_cuda=False); print('imported')"
    )
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}  # a toolkit folder torch will report
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert proc.stdout.strip() == "imported"
    assert "No CUDA runtime" not in proc.stderr, proc.stderr
    # The control: a plain import in the same environment does print it.
    plain = subprocess.run(
        [sys.executable, "-c", "from torch.utils import cpp_extension"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "No CUDA runtime" in plain.stderr
