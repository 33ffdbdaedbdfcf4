"""Runs the compiled CPU kernels under AddressSanitizer: no out-of-bounds access, no use after free.

Not part of the pytest suite (it builds the extension once more, with ``-fsanitize=address``, which
takes a minute or two). Run it from the repository root::

    python tests/asan_check.py [--quick] [--build-dir DIR]

What it does:

1. for each CPU update path (the AVX-512 one where the CPU has it, and the portable one forced by
   ``PKS4_CPU_NO_AVX512=1``), starts a fresh Python with ``LD_PRELOAD`` set to the compiler's
   ``libasan.so`` (and ``libstdc++.so.6``, see :func:`asan_preload`) and
   ``ASAN_OPTIONS=detect_leaks=0`` (the interpreter's own allocations are not the kernels');
2. there, builds ``csrc/motion_scan`` (the sources and flags of :mod:`pks4_layers.ops.build`,
   plus ``-fsanitize=address -fno-omit-frame-pointer``) with ``torch.utils.cpp_extension.load``
   into a temporary folder (once; the second process reuses it), loads it, and calls
   ``torch.ops.pks4.motion_scan_fwd`` / ``motion_scan_bwd`` directly over a grid of shapes:
   D in {1, 5, 33, 70} (tails of every vector width), N in {1, 16, 64}, T in {1, 17, 200},
   both directions, the optional inputs all present, all absent or mixed, float32, float16,
   bfloat16 and float64 (and float32 B, C with half-precision activations), plus an empty batch.
   Each forward is compared against ``motion_scan_ref`` and each gradient checked for
   finiteness, so a kernel that reads the wrong (but mapped) memory is caught as well.

Exit status 0 when every call ran clean; AddressSanitizer aborts the process, with its report
on stderr, at the first bad access.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]
LIB_NAME = "pks4_cpu_asan"


def build_and_load(build_dir: Path) -> None:
    """Compile the CPU extension with AddressSanitizer into ``build_dir`` (once) and load it.

    Called in a process that already has the sanitizer runtime preloaded; the compiler runs
    without it."""
    from torch.utils import cpp_extension

    pks4_build = _load_file("pks4_build", ROOT / "src" / "pks4_layers" / "ops" / "build.py")
    src = pks4_build.csrc_dir()
    if src is None:
        raise SystemExit("csrc/motion_scan not found")
    os.environ.pop("LD_PRELOAD", None)  # for the compiler and ninja only
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=LIB_NAME,
        sources=[str(src / s) for s in pks4_build.CPU_SOURCES],
        extra_cflags=pks4_build.CPU_CFLAGS + ASAN_FLAGS,
        extra_ldflags=pks4_build.CPU_LDFLAGS + ["-fsanitize=address"],
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def _load_file(name: str, path: Path):
    """A module from its file alone: importing the ``pks4_layers`` package would pull in
    ``torch._dynamo`` (and with it compiled extensions the sanitizer need not see)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _gcc_file(name: str) -> str:
    path = subprocess.run(
        ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"gcc knows no {name} (got {path!r})")
    return path


def asan_preload() -> str:
    """``LD_PRELOAD`` for the sanitizer: its runtime first, then libstdc++, so that the runtime's
    C++ exception interceptor finds the real ``__cxa_throw`` (without it, the first exception
    thrown by any C++ library aborts the process)."""
    return f"{_gcc_file('libasan.so')} {_gcc_file('libstdc++.so.6')}"


# --------------------------------------------------------------------------------------------
# the child: calls the kernels under the sanitizer


def _inputs(torch, shape, dtype, bc_dtype, optionals, seed):
    batch, T, L, Dm, N = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    state = torch.float64 if dtype == torch.float64 else torch.float32
    args = {
        "u": randn(batch, T, L, Dm).to(dtype),
        "delta": (0.5 * randn(batch, T, L, Dm)).to(dtype),
        "A": (-torch.rand(Dm, N, generator=g, dtype=torch.float64) - 0.05).to(dtype),
        "B": randn(batch, T, L, N).to(bc_dtype),
        "C": randn(batch, T, L, N).to(bc_dtype),
        "D": randn(Dm).to(dtype),
        "z": randn(batch, T, L, Dm).to(dtype),
        "delta_bias": (0.3 * randn(Dm)).to(dtype),
        "initial_state": randn(batch, L, Dm, N).to(state),
    }
    for name in ("D", "z", "delta_bias", "initial_state"):
        if name not in optionals:
            args[name] = None
    return args


def child(build_dir: Path, quick: bool) -> int:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    # The reference only: motion_scan itself would load the uninstrumented build as well.
    reference = _load_file("pks4_reference", ROOT / "src" / "pks4_layers" / "ops" / "reference.py")
    motion_scan_ref = reference.motion_scan_ref
    from tolerances import assert_close

    start = time.perf_counter()
    build_and_load(build_dir)
    print(f"  built/loaded in {time.perf_counter() - start:.0f} s", flush=True)
    fwd, bwd = torch.ops.pks4.motion_scan_fwd, torch.ops.pks4.motion_scan_bwd

    dtypes = [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ]
    option_sets = [
        ("D", "z", "delta_bias", "initial_state"),
        (),
        ("z", "initial_state"),
    ]
    Ds = (1, 33) if quick else (1, 5, 33, 70)
    Ts = (1, 17) if quick else (1, 17, 200)
    grid = itertools.product(dtypes, Ds, (1, 16, 64), Ts, (False, True), option_sets)
    calls = 0
    start = time.perf_counter()
    for seed, ((dtype, bc_dtype), Dm, N, T, reverse, optionals) in enumerate(grid):
        shape = (2, T, 3, Dm, N)
        args = _inputs(torch, shape, dtype, bc_dtype, optionals, seed)
        order = [args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        y, last = fwd(*order, True, reverse, args["initial_state"])
        ref = {k: (v.double() if v is not None else None) for k, v in args.items()}
        y_ref, last_ref = motion_scan_ref(**ref, reverse=reverse, return_last_state=True)
        scale = max(1.0, y_ref.abs().max().item())
        where = f"shape={shape} dtype={dtype} B/C={bc_dtype} reverse={reverse} opts={optionals}"
        assert_close(y, y_ref, dtype=dtype, scale=scale, msg=f"y {where}")
        scale = max(1.0, last_ref.abs().max().item())
        assert_close(last, last_ref, dtype=dtype, scale=scale, msg=f"last {where}")
        grad_y = torch.randn(y.shape, dtype=torch.float64).to(dtype)
        grad_last = torch.randn(last.shape, dtype=last.dtype) if seed % 2 else None
        grads = bwd(*order, True, reverse, args["initial_state"], grad_y, grad_last)
        for name, g in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"), grads):
            if g.numel() and not torch.isfinite(g).all():
                raise AssertionError(f"non-finite gradient of {name}: {where}")
        calls += 2
    # An empty batch allocates empty outputs and must not touch memory.
    args = _inputs(torch, (0, 5, 3, 7, 4), torch.float32, torch.float32, ("D", "z"), 0)
    order = [args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y, last = fwd(*order, True, False, None)
    bwd(*order, True, False, None, torch.zeros_like(y), torch.zeros_like(last))
    calls += 2
    print(f"  {calls} kernel calls clean in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid of shapes")
    parser.add_argument("--build-dir", type=Path, help="reuse this build folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        return child(Path(opts.child), opts.quick)

    start = time.perf_counter()
    build_dir = opts.build_dir or Path(tempfile.mkdtemp(prefix="pks4_asan_"))
    preload = asan_preload()
    status = 0
    for no_avx512 in ("0", "1"):
        path = "portable" if no_avx512 == "1" else "AVX-512 where the CPU has it"
        print(f"CPU update path: {path}", flush=True)
        env = {
            **os.environ,
            "LD_PRELOAD": preload,
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
            "PKS4_CPU_NO_AVX512": no_avx512,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        }
        cmd = [sys.executable, __file__, "--child", str(build_dir)]
        if opts.quick:
            cmd.append("--quick")
        result = subprocess.run(cmd, env=env)
        if result.returncode != 0:
            print(f"  FAILED with exit status {result.returncode}", flush=True)
            status = 1
    print(f"{'clean' if status == 0 else 'ERRORS'} after {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
