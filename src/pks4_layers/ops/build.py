"""Finding or building the compiled extensions, and saying why when there is none.

Two shared libraries register the kernels with PyTorch's dispatcher when loaded:

* ``pks4_cpu``: the ``pks4::motion_scan_fwd`` / ``pks4::motion_scan_bwd`` schemas and their CPU
  implementations (C++, ATen's thread pool);
* ``pks4_cuda``: their CUDA implementations, loaded after the CPU one.

Each is taken from the installed package when it was built ahead of time
(``PKS4_BUILD_EXT=1 pip install --no-build-isolation -e .``), and otherwise (or with
``PKS4_FORCE_JIT=1``) compiled on first use with ``torch.utils.cpp_extension.load`` and ninja
into a per-user cache (``$PKS4_CACHE_DIR``, else ``$XDG_CACHE_HOME/pks4_layers``, else
``~/.cache/pks4_layers``), once: the cache folder's name holds a hash of the sources, the
flags, and the torch, CUDA and Python versions, so an upgraded torch never loads a stale
binary. A failed build is reported once, with its reason, and the caller falls back to the
``torch`` backend.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../pks4_layers
_lock = threading.RLock()

CPU_SOURCES = ("bindings.cpp", "motion_scan_fwd_cpu.cpp", "motion_scan_bwd_cpu.cpp")
CUDA_SOURCES = ("bindings_cuda.cpp", "motion_scan_fwd.cu", "motion_scan_bwd.cu")
HEADERS = (
    "motion_scan.h",
    "bindings_common.h",
    "cpu_common.h",
    "cpu_update.h",
    "cuda_common.cuh",
)
CPU_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
CPU_LDFLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


@dataclass
class ExtensionStatus:
    """Whether an extension is loaded, from where, or why not."""

    name: str
    loaded: bool = False
    origin: str = ""
    reason: str = "not loaded yet"


_status: dict[str, ExtensionStatus] = {}


def csrc_dir() -> Optional[Path]:
    """The kernel sources: shipped inside the package, or ``csrc/`` of a source checkout."""
    for candidate in (
        _PACKAGE_DIR / "_csrc" / "motion_scan",
        _PACKAGE_DIR.parent.parent / "csrc" / "motion_scan",
    ):
        if (candidate / "motion_scan.h").is_file():
            return candidate
    return None


def cache_root() -> Path:
    explicit = os.environ.get("PKS4_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pks4_layers"


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit folder: ``$CUDA_HOME``/``$CUDA_PATH``, else where ``nvcc`` really lives.

    ``nvcc`` on the PATH may be a wrapper script in ``/usr/local/bin``; the toolkit is the
    folder whose ``bin/nvcc`` sits next to ``lib64/libcudart*``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and glob.glob(str(home / "lib*" / "libcudart*")):
            return str(home)
    return None


def cuda_extra_include_dirs() -> list[str]:
    """Headers of the CUDA libraries that ship as pip wheels (``nvidia/cu*/include``).

    ``ATen/cuda`` headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(str(p) for p in Path(root).glob("cu*/include") if p.is_dir())
    return dirs


def cuda_arch_flags() -> list[str]:
    """``-gencode`` flags for ``TORCH_CUDA_ARCH_LIST`` (default sm_80 and sm_90)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    flags = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _source_hash(names: tuple[str, ...], extra: list[str]) -> str:
    src = csrc_dir()
    h = hashlib.sha256()
    for name in sorted(names + HEADERS):
        path = src / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    for item in extra + [
        torch.__version__,
        str(torch.version.cuda),
        sys.version.split()[0],
        platform.machine(),
    ]:
        h.update(item.encode())
    return h.hexdigest()[:16]


def _prebuilt(stem: str) -> Optional[Path]:
    # "_C.cpython-311-x86_64-linux-gnu.so" or "_C.so", never "_C_cuda...".
    found = sorted(_PACKAGE_DIR.glob(f"{stem}.*so")) + sorted(_PACKAGE_DIR.glob(f"{stem}.*pyd"))
    return found[0] if found else None


def _is_stale(library: Path, kind: str) -> bool:
    """In a source checkout, an ahead-of-time build older than its sources is stale."""
    src = csrc_dir()
    if src is None:
        return False
    names = (CPU_SOURCES if kind == "cpu" else CUDA_SOURCES) + HEADERS
    newest = max((src / n).stat().st_mtime for n in names if (src / n).exists())
    return library.stat().st_mtime < newest


def _jit_build(kind: str) -> Path:
    """Compile one extension into the cache (once) and return the library's path."""
    home = find_cuda_home()
    if home is not None and not os.environ.get("CUDA_HOME"):
        # torch guesses the toolkit from the folder of `nvcc`, wrong for a wrapper script.
        os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        raise RuntimeError("the kernel sources (csrc/motion_scan) are not part of this install")
    if kind == "cpu":
        sources, flags = CPU_SOURCES, CPU_CFLAGS + CPU_LDFLAGS
    else:
        sources, flags = CUDA_SOURCES, CPU_CFLAGS + NVCC_FLAGS + cuda_arch_flags()
    name = f"pks4_{kind}_{_source_hash(sources, flags)}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    library = build_dir / f"{name}.so"
    if not library.exists():
        print(
            f"pks4-layers: compiling the {kind.upper()} kernels into {build_dir} "
            "(once per torch version; about a minute)...",
            file=sys.stderr,
            flush=True,
        )
    kwargs = dict(
        name=name,
        sources=[str(src / s) for s in sources],
        extra_cflags=CPU_CFLAGS,
        extra_ldflags=CPU_LDFLAGS,
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("PKS4_VERBOSE_BUILD", "") == "1",
    )
    if kind == "cuda":
        if home is None:
            raise RuntimeError("no CUDA toolkit found (set CUDA_HOME)")
        cpp_extension.CUDA_HOME = home
        kwargs["extra_cuda_cflags"] = NVCC_FLAGS + cuda_arch_flags()
        kwargs["extra_include_paths"] += cuda_extra_include_dirs()
    cpp_extension.load(**kwargs)  # loads the library into the process too
    return library


def load(kind: str) -> ExtensionStatus:
    """Load the ``"cpu"`` or ``"cuda"`` extension once; the status says from where or why not."""
    with _lock:
        if kind in _status:
            return _status[kind]
        status = ExtensionStatus(kind)
        _status[kind] = status
        if os.environ.get("PKS4_NO_EXT", "") == "1":
            status.reason = "disabled by PKS4_NO_EXT=1"
            return status
        if kind == "cuda":
            if not torch.cuda.is_available():
                status.reason = "no CUDA device visible to torch"
                return status
            cpu = load("cpu")
            if not cpu.loaded:
                status.reason = f"needs the CPU extension, which is unavailable: {cpu.reason}"
                return status
        stem = "_C" if kind == "cpu" else "_C_cuda"
        try:
            force_jit = os.environ.get("PKS4_FORCE_JIT", "") == "1"
            prebuilt = None if force_jit else _prebuilt(stem)
            if prebuilt is not None and _is_stale(prebuilt, kind):
                prebuilt = None  # edited kernels: build them rather than load the old ones
            if prebuilt is not None:
                torch.ops.load_library(str(prebuilt))
                status.origin = f"prebuilt {prebuilt.name}"
            else:
                path = _jit_build(kind)
                status.origin = f"built on first use in {path.parent}"
            status.loaded = True
            status.reason = ""
        except Exception as exc:  # a failed build must not take the library down with it
            status.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}"
        return status
