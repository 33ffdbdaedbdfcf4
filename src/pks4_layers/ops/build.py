"""Finding or building the compiled extensions, and saying why when there is none.

Two shared libraries register the kernels with PyTorch's dispatcher when loaded:

* ``pks4_cpu``: the ``pks4::motion_scan_fwd`` / ``pks4::motion_scan_bwd`` schemas and their CPU
  implementations (C++, ATen's thread pool);
* ``pks4_cuda``: their CUDA implementations, loaded after the CPU one.

Each is taken from the installed package when it was built ahead of time
(``PKS4_BUILD_EXT=1 pip install --no-build-isolation -e .``) for the torch that is running,
and otherwise (or with ``PKS4_FORCE_JIT=1``) compiled on first use with
``torch.utils.cpp_extension.load`` and ninja into a per-user cache (``$PKS4_CACHE_DIR``, else
``$XDG_CACHE_HOME/pks4_layers``, else ``~/.cache/pks4_layers``), once: the cache folder's name
holds a hash of the sources, the flags, and the torch, CUDA and Python versions, so an upgraded
torch never loads a stale binary. A failed build is reported once, with its reason, and the
caller falls back to the ``torch`` backend.

An ahead-of-time build records the torch it was built against (``_build_info.json`` beside the
libraries). One that does not fit the running torch (another torch or CUDA version, another
Python), has no record, or fails to load (an undefined symbol, say) is not used: one warning says
why, and the kernels are compiled on first use instead. A C++ extension built against one torch
must never be loaded into another: their C++ symbols differ, and at best the load fails.

Building the CPU kernels never looks for a CUDA toolkit: importing
``torch.utils.cpp_extension`` on a machine without a GPU would otherwise print torch's "No CUDA
runtime is found" warning for a build that does not need one.

The cache holds native code that is loaded into the process, so whoever can write there can run
code as the user. Both levels the library uses, the cache root and the per-key build folder,
are created owner-only (mode 0o700) and checked before every build or load: one that is a
symbolic link, is not a directory, is owned by another user or is writable by group/others is
refused with a :class:`PermissionError` naming the path, what was found and what is expected,
and the extension then counts as unavailable (one warning, ``torch`` backend), never loaded
from there.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import stat
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../pks4_layers
_lock = threading.RLock()
BUILD_INFO = "_build_info.json"  # what an ahead-of-time build was built against

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


def _check_private_dir(path: Path) -> None:
    """Refuse ``path`` as a place to build or load native code unless only this user controls it.

    Raises ``PermissionError`` when ``path`` is a symbolic link, is not a directory, is owned by
    another user, or is writable by group/others. ``os.lstat`` (not ``stat``) so that a link
    planted in place of the folder is seen as a link rather than followed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise PermissionError(
            f"extension cache {str(path)!r}: expected an existing directory, got nothing there"
        ) from None
    prefix = f"refusing the extension cache {str(path)!r}"
    hint = "use a private directory (mode 0o700, your own) or set PKS4_CACHE_DIR to one"
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(
            f"{prefix}: it is a symbolic link (to {os.readlink(path)!r}); expected a real "
            f"directory; {hint}"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{prefix}: it is not a directory; expected a directory; {hint}")
    if not hasattr(os, "getuid"):  # Windows: no POSIX owner and mode bits to check
        return
    uid = os.getuid()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != uid:
        raise PermissionError(
            f"{prefix}: it is owned by uid {st.st_uid} (mode {mode:#o}); expected a directory "
            f"owned by uid {uid}, the user running this process; {hint}"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{prefix}: it is writable by group/others (mode {mode:#o}, owner uid {st.st_uid}); "
            f"expected no group/other write permission, e.g. mode 0o700; {hint}"
        )


def _private_dir(path: Path) -> Path:
    """Create ``path`` owner-only if it is missing, then check it (see ``_check_private_dir``)."""
    # The parents are not the library's (e.g. ~/.cache): created with the default mode if
    # missing, and not checked.
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)  # the umask can only narrow this
    except FileExistsError:
        pass  # checked below like any existing folder, whoever made it
    _check_private_dir(path)
    return path


def _check_private_file(path: Path) -> None:
    """The built library must be this user's regular file. A link is refused because it would
    load a binary from outside the checked folder. Its mode is not checked: the linker applies
    the umask (0o775 under a umask of 0o002), and nobody else can reach a file inside a
    private folder anyway."""
    st = os.lstat(path)
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
        if stat.S_ISLNK(st.st_mode):
            found = "a symbolic link"
        elif stat.S_ISREG(st.st_mode):
            found = "a regular file"
        else:
            found = "not a regular file"
        raise PermissionError(
            f"refusing the built extension {str(path)!r}: it is {found} owned by uid "
            f"{st.st_uid}; expected a regular file owned by uid {uid}; delete it to rebuild"
        )


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


def build_key() -> dict[str, str]:
    """What a compiled extension must have been built against to be loaded here."""
    return {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "machine": platform.machine(),
    }


def write_build_info(folder: Path) -> Path:
    """Record :func:`build_key` beside ahead-of-time built libraries (called by setup.py)."""
    path = Path(folder) / BUILD_INFO
    path.write_text(json.dumps(build_key(), indent=1) + "\n")
    return path


def _prebuilt_mismatch(library: Path) -> Optional[str]:
    """Why the ahead-of-time ``library`` must not be loaded into this process, or None."""
    path = library.parent / BUILD_INFO
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return f"no record of the torch it was built against ({BUILD_INFO} is missing)"
    except (OSError, ValueError) as exc:
        return f"its build record {path.name} is unreadable ({exc})"
    here = build_key()
    if not isinstance(recorded, dict):
        return f"its build record {path.name} is not a JSON object"
    differ = [
        f"{key} {recorded.get(key)} (running {value})"
        for key, value in here.items()
        if recorded.get(key) != value
    ]
    return "built for " + ", ".join(differ) if differ else None


_warned_prebuilt: set[str] = set()


def _warn_prebuilt_unused(library: Path, why: str) -> None:
    if library.name in _warned_prebuilt:
        return
    _warned_prebuilt.add(library.name)
    warnings.warn(
        f"pks4-layers: not loading the ahead-of-time kernels {library.name}: {why}; compiling "
        "them for this torch on first use instead (once, into the kernel cache)",
        RuntimeWarning,
        stacklevel=3,
    )


def _import_cpp_extension(for_cuda: bool):
    """``torch.utils.cpp_extension``; for a CPU-only build without torch's warning about a
    missing CUDA runtime, which its import prints when it finds a toolkit but no GPU."""
    if for_cuda or "torch.utils.cpp_extension" in sys.modules:
        from torch.utils import cpp_extension

        return cpp_extension
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


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
    home = find_cuda_home() if kind == "cuda" else None
    if home is not None and not os.environ.get("CUDA_HOME"):
        # torch guesses the toolkit from the folder of `nvcc`, wrong for a wrapper script.
        os.environ["CUDA_HOME"] = home
    cpp_extension = _import_cpp_extension(for_cuda=kind == "cuda")

    src = csrc_dir()
    if src is None:
        raise RuntimeError("the kernel sources (csrc/motion_scan) are not part of this install")
    if kind == "cpu":
        sources, flags = CPU_SOURCES, CPU_CFLAGS + CPU_LDFLAGS
    else:
        sources, flags = CUDA_SOURCES, CPU_CFLAGS + NVCC_FLAGS + cuda_arch_flags()
    name = f"pks4_{kind}_{_source_hash(sources, flags)}"
    # Both levels are checked: a private build folder inside a root that others can write to
    # could be swapped for theirs.
    root = _private_dir(cache_root())
    build_dir = _private_dir(root / name)
    library = build_dir / f"{name}.so"
    if os.path.lexists(library):
        _check_private_file(library)
    else:
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
                why = _prebuilt_mismatch(prebuilt)
                if why is None:
                    try:
                        torch.ops.load_library(str(prebuilt))
                    except OSError as exc:  # e.g. an undefined symbol of another torch
                        why = f"it does not load ({str(exc).strip().splitlines()[-1][:300]})"
                if why is not None:
                    _warn_prebuilt_unused(prebuilt, why)
                    prebuilt = None
            if prebuilt is not None:
                status.origin = f"prebuilt {prebuilt.name}"
            else:
                path = _jit_build(kind)
                status.origin = f"built on first use in {path.parent}"
            status.loaded = True
            status.reason = ""
        except Exception as exc:  # a failed build must not take the library down with it
            status.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}"
        return status
