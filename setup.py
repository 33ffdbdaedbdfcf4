"""Build script: metadata lives in pyproject.toml; this file adds the compiled kernels.

* Always: the kernel sources ``csrc/motion_scan`` are copied into the package
  (``pks4_layers/_csrc``) so that an installed package can compile them on first use.
* With ``PKS4_BUILD_EXT=1``: the extensions are built ahead of time, against the torch already
  installed (so use ``--no-build-isolation``)::

      PKS4_BUILD_EXT=1 pip install --no-build-isolation -e .

  ``pks4_layers._C`` (CPU kernels and the op schemas) always; ``pks4_layers._C_cuda`` when torch
  has CUDA and a CUDA toolkit (``nvcc``) is found, for ``TORCH_CUDA_ARCH_LIST`` (default
  ``8.0;9.0``). ``PKS4_BUILD_CUDA=0`` skips it, ``PKS4_BUILD_CUDA=1`` makes its absence an error.
  Flags are shared with the just-in-time build (``src/pks4_layers/ops/build.py``), and
  ``pks4_layers/_build_info.json`` records the torch they were built against: another torch
  at run time gets a warning and a just-in-time build instead of these libraries.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc" / "motion_scan"


class BuildPyWithKernelSources(build_py):
    """Ship the kernel sources inside the package for the just-in-time build."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "pks4_layers" / "_csrc" / "motion_scan"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(CSRC.iterdir()):
            if path.suffix in {".h", ".cuh", ".cpp", ".cu"}:
                shutil.copy2(path, target / path.name)


def _build_settings():
    """The flag and path helpers of the package's build module, loaded without the package."""
    spec = importlib.util.spec_from_file_location(
        "_pks4_build_settings", ROOT / "src" / "pks4_layers" / "ops" / "build.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def _extensions():
    if os.environ.get("PKS4_BUILD_EXT", "") != "1":
        return [], {}
    import torch

    settings = _build_settings()
    want_cuda = os.environ.get("PKS4_BUILD_CUDA", "auto")
    cuda_home = settings.find_cuda_home()
    if cuda_home is not None and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    from torch.utils import cpp_extension

    cpu_sources = [str(CSRC / s) for s in settings.CPU_SOURCES]
    extensions = [
        cpp_extension.CppExtension(
            "pks4_layers._C",
            [os.path.relpath(s, ROOT) for s in cpu_sources],
            include_dirs=[str(CSRC)],
            extra_compile_args=settings.CPU_CFLAGS,
            extra_link_args=settings.CPU_LDFLAGS,
        )
    ]
    has_cuda = torch.version.cuda is not None and cuda_home is not None
    if want_cuda == "1" and not has_cuda:
        raise RuntimeError(
            "PKS4_BUILD_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda}, CUDA toolkit={cuda_home}"
        )
    if want_cuda != "0" and has_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        extensions.append(
            cpp_extension.CUDAExtension(
                "pks4_layers._C_cuda",
                [os.path.relpath(CSRC / s, ROOT) for s in settings.CUDA_SOURCES],
                include_dirs=[str(CSRC), *settings.cuda_extra_include_dirs()],
                extra_compile_args={
                    "cxx": settings.CPU_CFLAGS,
                    "nvcc": settings.NVCC_FLAGS + settings.cuda_arch_flags(),
                },
            )
        )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtWithRecord(base):
        """Builds the extensions, then records the torch they were built against beside them:
        the library refuses to load them into another torch (see ops/build.py)."""

        def run(self) -> None:
            super().run()
            folder = Path(self.get_ext_fullpath("pks4_layers._C")).parent
            settings.write_build_info(folder)

    return extensions, {"build_ext": BuildExtWithRecord}


ext_modules, ext_cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithKernelSources, **ext_cmdclass},
)
