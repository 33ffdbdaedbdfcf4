"""Pure-PyTorch references from mamba-ssm and causal-conv1d, loaded without importing the packages.

``import mamba_ssm`` pulls in its model zoo (transformers, triton kernels) and compiled CUDA
extensions without guards, and ``import causal_conv1d`` needs ``causal_conv1d_cuda``. Their
reference functions, however, only need torch and einops. So each interface file is executed on
its own, from its path, while ``sys.modules`` temporarily holds small stand-ins for the modules
it imports at the top; the stand-ins are removed again afterwards, whatever happens.

The loaders return an :class:`ExternalRef`: the function, or ``None`` together with the reason it
is unavailable, so that a test can ``pytest.skip(reason)``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional


class ExternalRef(NamedTuple):
    fn: Optional[Callable]
    reason: str


class _Unavailable(Exception):
    """The package (or the file inside it) is not there: skip, don't fail."""


def _package_dir(name: str) -> Path:
    # find_spec of a top-level name locates the package without executing its __init__.
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise _Unavailable(f"{name} cannot be located: {exc!r}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise _Unavailable(f"{name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _exec_file(module_name: str, path: Path) -> types.ModuleType:
    """Execute one source file as a module, without registering it in ``sys.modules``."""
    if not path.is_file():
        raise _Unavailable(f"{path} not found (unsupported package layout)")
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, but one whose submodules can only come from sys.modules
    return module


def _raising(name: str) -> Callable:
    def fn(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in: the compiled extension is not loaded")

    fn.__name__ = name
    return fn


@contextmanager
def _temporary_modules(
    modules: dict[str, Optional[types.ModuleType]], prefixes: tuple[str, ...]
) -> Iterator[None]:
    """Put ``modules`` into ``sys.modules`` (``None`` makes ``import name`` raise ImportError).

    On exit the previous entries are put back, and any module under one of ``prefixes`` that
    appeared meanwhile is removed, so that the loading leaves ``sys.modules`` as it was.
    """
    missing = object()
    saved = {name: sys.modules.get(name, missing) for name in modules}
    before = set(sys.modules)
    sys.modules.update(modules)  # type: ignore[arg-type]
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in prefixes:
                del sys.modules[name]
        for name, old in saved.items():
            if old is missing:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old  # type: ignore[assignment]


def _load_selective_scan_interface() -> types.ModuleType:
    root = _package_dir("mamba_ssm")
    utils_torch = _exec_file("mamba_ssm.utils.torch", root / "utils" / "torch.py")
    layer_norm = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    layer_norm._layer_norm_fwd = _raising("_layer_norm_fwd")  # type: ignore[attr-defined]
    stubs: dict[str, Optional[types.ModuleType]] = {
        "mamba_ssm": _package_stub("mamba_ssm"),
        "mamba_ssm.utils": _package_stub("mamba_ssm.utils"),
        "mamba_ssm.utils.torch": utils_torch,
        "mamba_ssm.ops": _package_stub("mamba_ssm.ops"),
        "mamba_ssm.ops.triton": _package_stub("mamba_ssm.ops.triton"),
        "mamba_ssm.ops.triton.layer_norm": layer_norm,
        "selective_scan_cuda": types.ModuleType("selective_scan_cuda"),
        # The interface tries `from causal_conv1d import ...` inside `except ImportError`.
        # A None entry makes that import raise ImportError at once, without running the real
        # causal_conv1d package (which would try to load causal_conv1d_cuda).
        "causal_conv1d": None,
        "causal_conv1d_cuda": None,
    }
    prefixes = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda")
    with _temporary_modules(stubs, prefixes):
        return _exec_file(
            "mamba_ssm.ops.selective_scan_interface",
            root / "ops" / "selective_scan_interface.py",
        )


def _load_causal_conv1d_interface() -> types.ModuleType:
    root = _package_dir("causal_conv1d")
    cpp = types.ModuleType("causal_conv1d.cpp_functions")
    for name in (
        "causal_conv1d_fwd_function",
        "causal_conv1d_bwd_function",
        "causal_conv1d_update_function",
    ):
        setattr(cpp, name, _raising(name))
    stubs: dict[str, Optional[types.ModuleType]] = {
        "causal_conv1d": _package_stub("causal_conv1d"),
        "causal_conv1d.cpp_functions": cpp,
        "causal_conv1d_cuda": None,
    }
    with _temporary_modules(stubs, ("causal_conv1d", "causal_conv1d_cuda")):
        return _exec_file(
            "causal_conv1d.causal_conv1d_interface", root / "causal_conv1d_interface.py"
        )


@functools.cache
def _module(which: str) -> tuple[Optional[types.ModuleType], str]:
    loader = {
        "selective_scan": _load_selective_scan_interface,
        "causal_conv1d": _load_causal_conv1d_interface,
    }[which]
    try:
        return loader(), ""
    except _Unavailable as exc:
        return None, str(exc)
    except Exception as exc:
        # Installed, but this version's file does not load in isolation: report, don't crash.
        return None, f"could not load the {which} interface in isolation: {exc!r}"


def _ref(which: str, attr: str) -> ExternalRef:
    module, reason = _module(which)
    if module is None:
        return ExternalRef(None, reason)
    fn = getattr(module, attr, None)
    if fn is None:
        return ExternalRef(None, f"{attr} not found in {module.__file__}")
    return ExternalRef(fn, "")


@functools.cache
def load_selective_scan_ref() -> ExternalRef:
    """mamba-ssm's ``selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, ...)``, layout
    ``(batch, D, T)``."""
    return _ref("selective_scan", "selective_scan_ref")


@functools.cache
def load_causal_conv1d_ref() -> ExternalRef:
    """causal-conv1d's ``causal_conv1d_ref(x, weight, bias, initial_states, ...)``."""
    return _ref("causal_conv1d", "causal_conv1d_ref")


@functools.cache
def load_causal_conv1d_update_ref() -> ExternalRef:
    """causal-conv1d's ``causal_conv1d_update_ref(x, conv_state, weight, bias, ...)``."""
    return _ref("causal_conv1d", "causal_conv1d_update_ref")
