"""Building the CUDA kernels' own source against the host emulation of CUDA in this folder.

A build is a torch extension (``torch.utils.cpp_extension.load``, ninja) that registers
``<name>::motion_scan_fwd`` / ``<name>::motion_scan_bwd`` on the CPU (see ``bindings_emu.cpp``).
Its kernels are ``csrc/motion_scan/*.cu`` themselves: ``motion_scan_*_emu.cpp`` only
``#include`` them, compiled with ``include/`` (the emulated ``cuda_runtime.h``, ``cuda_fp16.h``,
``cuda_bf16.h``) first on the include path and the kernel sources' folder after it. Nothing of
the kernels is copied, so what runs is what the GPU build compiles.

Two details a host compiler cannot see are taken from the sources here:

* ``__launch_bounds__``: read from each ``.cu`` file and written to a generated
  ``<stem>.launch_bounds.inc``, which the wrapper includes to register the bound with the
  emulated launcher (which then refuses a larger block, as the GPU does);
* mutants: :func:`build_mutant` builds a copy of the kernel sources with one string replaced
  (the replacement must match exactly once), to show that the tests catch a planted bug.

Builds are cached in the project's private extension cache (``$PKS4_CACHE_DIR`` or
``~/.cache/pks4_layers``, checked as :mod:`pks4_layers.ops.build` checks it), under
``cuda_emulation/<name>-<hash of sources, flags and versions>``. The torch-heavy bindings and
the runtime are compiled once, by the build of the real sources; a mutant compiles only the
wrappers of the kernels it changes and links the rest from there.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pks4_layers.ops import build as pks4_build

EMU_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = EMU_DIR / "include"
MAIN_NAME = "pks4_emu"
# Compiled by the build of the real sources only; every mutant links their objects.
SHARED_SOURCES = ("bindings_emu.cpp", "runtime.cpp", "selftest_kernels.cpp")
# Compiled by every build: the torch library's name is the extension's.
NAME_SOURCE = "library_name.cpp"
# The wrapper of each kernel source.
WRAPPERS = {
    "motion_scan_fwd.cu": "motion_scan_fwd_emu.cpp",
    "motion_scan_bwd.cu": "motion_scan_bwd_emu.cpp",
}
# -O2: the emulated kernels run millions of steps; no -ffast-math (NaN must stay NaN), as in the
# real builds. #pragma unroll is nvcc's and means nothing here.
CFLAGS = ["-O2", "-Wno-unknown-pragmas"]
# Every build binds its own symbols: several builds define the same kernels and runtime and are
# loaded into one process.
LDFLAGS = ["-Wl,-Bsymbolic"]

# What a build's ops are reached through: ``torch.ops.<name>``.
Ops = torch._ops._OpNamespace

_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\s*\(([^()]*)\)\s*(\w+)\s*\(")


@dataclass(frozen=True)
class EmulatedBuild:
    """A loaded build: its ops are ``torch.ops.<name>``."""

    name: str
    build_dir: Path
    seconds: float  # building (or finding in the cache) and loading it

    @property
    def ops(self) -> Ops:
        return getattr(torch.ops, self.name)


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (which must occur exactly once) by ``new`` in the kernel source ``file``."""

    file: str
    old: str
    new: str


def kernel_dir() -> Path:
    """The folder of the real kernel sources (``csrc/motion_scan``)."""
    src = pks4_build.csrc_dir()
    if src is None:
        raise RuntimeError("the kernel sources (csrc/motion_scan) are not part of this checkout")
    return src


def kernel_files() -> tuple[str, ...]:
    """The kernel sources a build reads: the ``.cu`` files and every header."""
    return tuple(WRAPPERS) + pks4_build.HEADERS


def launch_bounds_header(source: str, filename: str) -> str:
    """The registration of the ``__launch_bounds__`` of the kernels defined in ``source``."""
    found = _LAUNCH_BOUNDS.findall(source)
    if len(found) != source.count("__launch_bounds__"):
        raise ValueError(
            f"{filename}: expected every __launch_bounds__(...) to be followed by the kernel's "
            f"name and parameters, found {len(found)} such of "
            f"{source.count('__launch_bounds__')}"
        )
    lines = [f"// Generated from {filename}: the __launch_bounds__ of its kernels."]
    lines += [f"PKS4EMU_REGISTER_LAUNCH_BOUNDS({name}, {args.strip()})" for args, name in found]
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    # An unchanged file keeps its time stamp, so that ninja does not rebuild what includes it.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _emulation_digest(src: Path) -> str:
    files = sorted(p for p in EMU_DIR.rglob("*") if p.suffix in (".h", ".cpp"))
    parts = [str(p.relative_to(EMU_DIR)).encode() + p.read_bytes() for p in files]
    parts += [name.encode() + (src / name).read_bytes() for name in kernel_files()]
    parts += [
        " ".join(CFLAGS + LDFLAGS).encode(),
        torch.__version__.encode(),
        sys.version.split()[0].encode(),
        platform.machine().encode(),
    ]
    return _digest(parts)


def _build_dir(name: str, digest: str) -> Path:
    # Both levels private, as the library's own cache: native code is loaded from there.
    root = pks4_build._private_dir(
        pks4_build._private_dir(pks4_build.cache_root()) / "cuda_emulation"
    )
    return pks4_build._private_dir(root / f"{name}-{digest}")


def _load(
    name: str, build_dir: Path, sources: list[str], src: Path, objects: list[Path]
) -> EmulatedBuild:
    """Compiles ``sources`` (of this folder) against the kernel sources in ``src``, links
    ``objects`` with them, and loads the library."""
    from torch.utils import cpp_extension

    generated = build_dir / "generated"
    generated.mkdir(exist_ok=True)
    for cu in WRAPPERS:
        header = launch_bounds_header((src / cu).read_text(), cu)
        _write_if_changed(generated / f"{Path(cu).stem}.launch_bounds.inc", header)
    if not (build_dir / f"{name}.so").exists():
        print(
            f"pks4-layers tests: compiling the emulated CUDA kernels {name} into {build_dir}...",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(EMU_DIR / s) for s in sources],
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS + [str(o) for o in objects],
        extra_include_paths=[str(INCLUDE_DIR), str(generated), str(src)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return EmulatedBuild(name, build_dir, time.perf_counter() - start)


@functools.cache
def build_emulation() -> EmulatedBuild:
    """The real kernel sources on the emulation, built (once per process) and loaded."""
    src = kernel_dir()
    build_dir = _build_dir(MAIN_NAME, _emulation_digest(src))
    sources = [NAME_SOURCE, *SHARED_SOURCES, *WRAPPERS.values()]
    return _load(MAIN_NAME, build_dir, sources, src, [])


def mutated_source(mutation: Mutation) -> str:
    """The text of ``mutation.file`` with the mutation applied; it must match exactly once."""
    text = (kernel_dir() / mutation.file).read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise ValueError(
            f"{mutation.file}: expected the text to mutate exactly once, found it {count} times "
            f"(the kernel changed? update the mutant): {mutation.old!r}"
        )
    return text.replace(mutation.old, mutation.new)


@functools.cache
def build_mutant(mutant_id: str, mutation: Mutation) -> EmulatedBuild:
    """A copy of the kernel sources with ``mutation`` applied, built and loaded as
    ``torch.ops.pks4_emu_mut_<mutant_id>``. Only the wrappers of the kernels that read the
    mutated file are compiled; the bindings, the runtime and the other kernels are linked from
    :func:`build_emulation`'s build."""
    main = build_emulation()
    text = mutated_source(mutation)
    name = "pks4_emu_mut_" + re.sub(r"\W", "_", mutant_id)
    digest = _digest(
        [main.build_dir.name.encode(), mutation.file.encode(), text.encode(), name.encode()]
    )
    build_dir = _build_dir(name, digest)
    src = build_dir / "src"
    src.mkdir(exist_ok=True)
    for file in kernel_files():
        if file != mutation.file and not (src / file).exists():
            shutil.copyfile(kernel_dir() / file, src / file)
    _write_if_changed(src / mutation.file, text)
    if mutation.file in WRAPPERS:  # a kernel source: only its wrapper reads it
        changed = [WRAPPERS[mutation.file]]
    else:  # a header: every kernel may read it
        changed = list(WRAPPERS.values())
    kept = [w for w in WRAPPERS.values() if w not in changed]
    objects = [main.build_dir / f"{Path(s).stem}.o" for s in (*SHARED_SOURCES, *kept)]
    return _load(name, build_dir, [NAME_SOURCE, *changed], src, objects)
