"""One device check of the CUDA side of pks4-layers, prepared to fit a short GPU session.

Usage::

    python benchmarks/gpu_check.py --out gpu_check_out
    python benchmarks/gpu_check.py --out gpu_check_out --mamba-sdist mamba_ssm-2.3.2.post1.tar.gz
    make gpu-check                      # the same, with the python that holds torch

Run it with whatever ``python`` already holds torch (no virtual environment, nothing fetched
from the network). It installs only this package, in place (``pip install -e . --no-deps
--no-build-isolation``), with the kernels built ahead of time for the present GPU's
architecture only and as many build jobs as there are cores, then runs these parts, each
under its own time limit and with a one-line verdict:

``install``
    the editable install and a check that the CUDA extension loads from it.
``tests``
    every test of the suite that targets the ``cuda`` backend or a CUDA device (the ``cuda``
    mark, in the files of :data:`CUDA_TEST_FILES`); tests that need a missing package skip
    with the reason.
``sanitizer``
    ``compute-sanitizer`` memcheck and racecheck, where the tool exists, on small
    forward+backward calls of the op for each input dtype, reverse and initial state,
    N = 16 and 64 (:func:`sanitizer_workload`).
``speed``
    ``scan_speed.py --device cuda`` with the ref, torch, cuda and mamba backends at the default
    shape (batch 2, T 16, 14x14, D 384, N 16, float32) and at a large one (batch 8, T 16, 14x14,
    D 768, N 16, bfloat16), with the achieved bandwidth next to a device copy measured in the
    same run.
``block_memory``
    the ``PKS4Block`` rows of the speed benchmark and ``memory.py --device cuda``.

With ``--mamba-sdist PATH`` (a mamba-ssm source distribution), mamba-ssm's selective scan is
compiled in the background while the tests run: only ``csrc/selective_scan`` and only for the
present architecture (its ``setup.py`` would compile every architecture and the other
extensions too), into a private folder, and imported through a small package shim that skips
mamba-ssm's ``__init__`` (which pulls in modules the scan does not need). Its speed rows then
sit in the same table; without it, or when its build does not finish in time, the summary says
why.

The whole run is budgeted (``--budget``, default 480 s): a part that would overrun is cut and
says so, and later parts get what is left. It writes ``OUT/gpu_check.json`` (verdicts, card,
timings, the speed rows and the ratios to mamba-ssm and to the memory floor) and
``OUT/gpu_check.log`` (every command and its output, each capped) and prints a summary. On a
machine without a GPU every part says ``skipped: no CUDA device``; the test suite runs it that
way so that it cannot rot.

How to read it: every verdict should be ``passed``. A ``failed`` part names its failing tests
or the sanitizer's first errors in the log. In the speed table, ``cuda/mamba`` above 1 means
our kernel is faster than mamba-ssm's ``selective_scan_fn`` on the same shape, and
``floor x`` is the forward's time over the memory floor (bytes it must move over the copy
bandwidth): 1 is the best possible, 2 the goal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# The test files that hold the suite's ``cuda``-marked tests (a test in tests/test_gpu_check.py
# checks that no marked test lives elsewhere). Only these are collected on the GPU machine: the
# others import packages (PyAV, ...) that such a bare machine may lack.
CUDA_TEST_FILES = (
    "tests/test_ops_motion_scan.py",
    "tests/test_ops_compiled.py",
    "tests/test_guarantees.py",
    "tests/test_robustness_invalid_inputs.py",
    "tests/test_robustness_properties.py",
    "tests/test_streaming.py",
    "tests/test_info_and_build.py",
    "tests/test_numerics.py",
)

SPEED_SHAPES = {
    "default": ["--batch=2", "--frames=16", "--size=14x14", "--dim=384", "--state=16"],
    "large": [
        "--batch=8",
        "--frames=16",
        "--size=14x14",
        "--dim=768",
        "--state=16",
        "--dtype=bfloat16",
    ],
}
SPEED_BACKENDS = "ref,torch,cuda,mamba"

# Seconds per part; each is also cut at what is left of --budget.
LIMITS = {
    "install": 150.0,
    "tests": 150.0,
    "sanitizer": 90.0,
    "speed": 75.0,
    "block_memory": 60.0,
}
PART_NAMES = ("tests", "sanitizer", "speed", "block_memory")  # after the install, in this order
MAMBA_BUILD_LIMIT = 300.0
# Instrument our kernels only: torch's own ones are not under test, and instrumenting them all
# would take most of the part's time.
KERNEL_FILTER = "--kernel-name=kns=motion_scan"
LOG_CAP = 400_000  # characters of one command's output kept in the log (head and tail)

# mamba-ssm's own nvcc flags for the selective scan (its setup.py), without the verbose ptxas
# report, and without its -std=c++17: the C++ standard is the one torch's headers require (C++20
# for recent torch), which torch.utils.cpp_extension passes; the architecture is the present
# GPU's alone.
MAMBA_NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]
MAMBA_SOURCES = (
    "selective_scan.cpp",
    "selective_scan_fwd_fp32.cu",
    "selective_scan_fwd_fp16.cu",
    "selective_scan_fwd_bf16.cu",
    "selective_scan_bwd_fp32_real.cu",
    "selective_scan_bwd_fp32_complex.cu",
    "selective_scan_bwd_fp16_real.cu",
    "selective_scan_bwd_fp16_complex.cu",
    "selective_scan_bwd_bf16_real.cu",
    "selective_scan_bwd_bf16_complex.cu",
)


def progress(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class PartResult:
    """One part's verdict: ``passed``, ``failed: ...``, ``skipped: ...`` or ``cut: ...``."""

    name: str
    verdict: str = "not run"
    seconds: float = 0.0
    limit_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict == "passed" or self.verdict.startswith("skipped")


@dataclass
class CommandResult:
    returncode: Optional[int]  # None when cut at its time limit
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def cuda_arch(capability: tuple[int, int]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` entry of a compute capability: (9, 0) -> ``"9.0"``."""
    return f"{capability[0]}.{capability[1]}"


def gencode_flag(capability: tuple[int, int]) -> str:
    """nvcc's flag for machine code of exactly this architecture."""
    num = f"{capability[0]}{capability[1]}"
    return f"-gencode=arch=compute_{num},code=sm_{num}"


def install_command(python: str) -> list[str]:
    """The editable install of this checkout alone: no dependencies, no build isolation (the
    kernels are built against the torch already installed), nothing from an index."""
    return [
        python,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "-e",
        str(ROOT),
    ]


def build_env(capability: tuple[int, int], jobs: int) -> dict[str, str]:
    """Environment of the ahead-of-time build: this architecture only, ``jobs`` compilers."""
    return {
        "PKS4_BUILD_EXT": "1",
        "PKS4_BUILD_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": cuda_arch(capability),
        "MAX_JOBS": str(jobs),
    }


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and the failing tests' ids and first message lines from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failing = []
    skip_reasons: dict[str, int] = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                failing.append(f"{name}: {message[0][:300] if message else tag}")
        node = case.find("skipped")
        if node is not None:
            reason = (node.get("message") or "").strip()[:200]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": failing, "skip_reasons": skip_reasons}


def sanitizer_verdict(tool: str, returncode: Optional[int], output: str) -> tuple[bool, str]:
    """Whether a compute-sanitizer run is clean, from its exit status and its summary line."""
    if returncode is None:
        return False, "cut at its time limit"
    summary = [line for line in output.splitlines() if "SUMMARY" in line]
    last = summary[-1].strip() if summary else "no summary line"
    clean = returncode == 0 and (" 0 errors" in last or " 0 hazards" in last)
    return clean, last


def speed_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reader wants from one ``scan_speed.py`` JSON: per scan backend fwd and
    fwd+bwd ms, achieved GB/s, and the ratios of ``cuda`` to ``mamba`` and to the floor."""
    env = result.get("environment", {})
    rows = {}
    for row in result.get("rows", []):
        if row.get("kind") != "motion_scan":
            continue
        rows[row["backend"]] = {
            "fwd_ms": row.get("fwd_ms"),
            "fwd_bwd_ms": row.get("fwd_bwd_ms"),
            "fwd_gbps": row.get("fwd_gbps"),
            "max_abs_diff_y_vs_ref": row.get("max_abs_diff_y_vs_ref"),
            "max_abs_diff_grad_vs_ref": row.get("max_abs_diff_grad_vs_ref"),
            "error": row.get("error"),
        }
    out: dict[str, Any] = {
        "rows": rows,
        "copy_gbps": env.get("copy_gbps"),
        "fwd_floor_ms": env.get("fwd_floor_ms"),
    }
    cuda, mamba = rows.get("cuda", {}), rows.get("mamba", {})
    if cuda.get("fwd_bwd_ms") and mamba.get("fwd_bwd_ms"):
        out["cuda_over_mamba_fwd_bwd"] = mamba["fwd_bwd_ms"] / cuda["fwd_bwd_ms"]
    if cuda.get("fwd_ms") and mamba.get("fwd_ms"):
        out["cuda_over_mamba_fwd"] = mamba["fwd_ms"] / cuda["fwd_ms"]
    if cuda.get("fwd_ms") and out["fwd_floor_ms"]:
        out["cuda_fwd_over_floor"] = cuda["fwd_ms"] / out["fwd_floor_ms"]
    return out


def find_compute_sanitizer() -> Optional[str]:
    """``compute-sanitizer`` on the PATH, else beside the ``nvcc`` in use, else in a CUDA
    toolkit folder under /usr/local."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    folders = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        folders.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    folders += ["/usr/local/cuda", *sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))]
    for folder in filter(None, folders):
        candidate = Path(folder) / "bin" / "compute-sanitizer"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def report_text(output: str, first_line: str, max_lines: int = 80) -> str:
    """The report a benchmark printed, from its header line on (its progress lines, which
    come before, left out); the last lines of the output when there is no such header."""
    lines = output.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(first_line)), None)
    kept = lines[start:] if start is not None else lines[-max_lines:]
    return "\n".join(kept[:max_lines])


# ---------------------------------------------------------------------------------------------
# the sanitizer's workload (also runnable on the CPU, where the tests exercise it)


def sanitizer_workload(device: str) -> int:
    """Small forward+backward calls of the compiled op for each input dtype (and B/C in float32
    with half inputs), reverse and initial state, N = 16 and 64, D = 160 (a partial warp and two
    channel blocks) and T = 19 (a partial backward segment). Returns the number of calls."""
    import torch

    from pks4_layers.ops.build import load

    status = load("cuda" if device.startswith("cuda") else "cpu")
    if not status.loaded:
        raise RuntimeError(f"the compiled {device} extension is unavailable: {status.reason}")
    fwd, bwd = torch.ops.pks4.motion_scan_fwd, torch.ops.pks4.motion_scan_bwd
    gen = torch.Generator().manual_seed(0)
    batch, T, L, D = 1, 19, 3, 160
    calls = 0
    for dtype, bc_dtype in (
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ):
        for N in (16, 64):
            for reverse in (False, True):
                for with_h0 in (False, True):

                    def rnd(*shape: int, scale: float = 1.0, dt: Any = dtype) -> Any:
                        x = torch.randn(*shape, generator=gen) * scale
                        return x.to(device=device, dtype=dt)

                    u, z = rnd(batch, T, L, D), rnd(batch, T, L, D)
                    delta = rnd(batch, T, L, D, scale=0.5)
                    B, C = rnd(batch, T, L, N, dt=bc_dtype), rnd(batch, T, L, N, dt=bc_dtype)
                    A = -torch.rand(D, N, generator=gen).add(0.1).to(device)
                    Dskip = torch.randn(D, generator=gen).to(device)
                    bias = torch.randn(D, generator=gen).mul(0.1).to(device)
                    h0 = rnd(batch, L, D, N, dt=torch.float32) if with_h0 else None
                    y, last = fwd(u, delta, A, B, C, Dskip, z, bias, True, reverse, h0)
                    grads = bwd(
                        u,
                        delta,
                        A,
                        B,
                        C,
                        Dskip,
                        z,
                        bias,
                        True,
                        reverse,
                        h0,
                        torch.ones_like(y),
                        torch.ones_like(last),
                    )
                    for t in (y, last, *grads):
                        if t.numel() and not bool(torch.isfinite(t.float()).all()):
                            raise RuntimeError(
                                f"non-finite output for dtype {dtype}, B/C {bc_dtype}, N {N}, "
                                f"reverse {reverse}, initial_state {with_h0}"
                            )
                    calls += 2
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"sanitizer workload: {calls} kernel calls on {device}, all finite")
    return calls


# ---------------------------------------------------------------------------------------------
# device time of the kernels alone


def _shape_of(flags: list[str]) -> dict[str, Any]:
    """The ``scan_speed.py`` flags of a shape as numbers."""
    values = dict(f[2:].split("=", 1) for f in flags)
    h, w = (int(x) for x in values["size"].split("x"))
    return {
        "batch": int(values["batch"]),
        "frames": int(values["frames"]),
        "locations": h * w,
        "dim": int(values["dim"]),
        "state": int(values["state"]),
        "dtype": values.get("dtype", "float32"),
    }


def kernel_times(shape: str, repeats: int = 20) -> dict[str, Any]:
    """Device time per call of the CUDA kernels alone (torch's profiler), for our forward and
    backward and, where it imports, mamba-ssm's, on ``scan_speed.py``'s inputs of ``shape``;
    and a large device copy's bandwidth, for the forward's memory floor. What the wall-clock
    table adds on top of these is the host's time per call (checks, dispatch, allocation)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pks4_layers.bench.scan_speed import make_scan_inputs, scan_traffic_bytes
    from pks4_layers.bench.scan_speed import parse_args as parse_speed_args
    from pks4_layers.ops.build import load

    status = load("cuda")
    if not status.loaded:
        raise RuntimeError(f"the CUDA extension is unavailable: {status.reason}")

    dims = _shape_of(SPEED_SHAPES[shape])
    dtype = getattr(torch, dims["dtype"])
    x = make_scan_inputs(
        dims["batch"],
        dims["frames"],
        dims["locations"],
        dims["dim"],
        dims["state"],
        dtype,
        torch.device("cuda"),
        0,
    )
    x = {k: v.detach() for k, v in x.items()}
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"])
    ops = torch.ops.pks4
    y, _ = ops.motion_scan_fwd(*args, True, False, None)
    grad_y = torch.randn_like(y)

    calls: dict[str, Any] = {
        "cuda": (
            lambda: ops.motion_scan_fwd(*args, True, False, None),
            lambda: ops.motion_scan_bwd(*args, True, False, None, grad_y, None),
        )
    }
    try:
        import selective_scan_cuda
        from einops import rearrange

        def seq(t: Any, pattern: str) -> Any:
            return rearrange(t, pattern).contiguous()

        mu, md, mz = (seq(x[k], "b t l d -> (b l) d t") for k in ("u", "delta", "z"))
        # (batch, groups, N, T): one group of B and C, as selective_scan_fn passes them.
        mB, mC = (seq(x[k], "b t l n -> (b l) 1 n t") for k in ("B", "C"))
        mA, mD, mbias = x["A"].float(), x["D"].float(), x["delta_bias"].float()
        out = selective_scan_cuda.fwd(mu, md, mA, mB, mC, mD, mz, mbias, True)
        mdout = torch.randn_like(mu)
        calls["mamba"] = (
            lambda: selective_scan_cuda.fwd(mu, md, mA, mB, mC, mD, mz, mbias, True),
            lambda: selective_scan_cuda.bwd(
                mu, md, mA, mB, mC, mD, mz, mbias, mdout, out[1], out[0], None, True, False
            ),
        )
    except Exception as exc:  # not built, or another mamba-ssm signature
        calls_error = f"{type(exc).__name__}: {exc}"
    else:
        calls_error = None

    result: dict[str, Any] = {"shape": dims}
    for name, (fwd, bwd) in calls.items():
        for label, fn in (("fwd", fwd), ("bwd", bwd)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(repeats):
                    fn()
                torch.cuda.synchronize()
            scan_us = other_us = 0.0
            for event in prof.key_averages():
                total = getattr(event, "device_time_total", None)
                if total is None:
                    total = getattr(event, "cuda_time_total", 0.0)
                if "scan" in event.key:
                    scan_us += total
                else:
                    other_us += total
            result[f"{name}_{label}_kernel_us"] = scan_us / repeats
            result[f"{name}_{label}_other_us"] = other_us / repeats
    if calls_error:
        result["mamba_error"] = calls_error[:300]

    # The floor: the forward's compulsory traffic (as scan_speed.py counts it) over a large
    # copy's bandwidth.
    traffic = scan_traffic_bytes(parse_speed_args(SPEED_SHAPES[shape]))
    src = torch.empty(max(traffic, 2**30) // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    copy_gbps = 2 * src.numel() * 4 / seconds / 1e9
    result.update(
        fwd_traffic_bytes=traffic,
        copy_gbps=copy_gbps,
        fwd_floor_us=traffic / (copy_gbps * 1e9) * 1e6,
    )
    result["cuda_fwd_kernel_over_floor"] = result["cuda_fwd_kernel_us"] / result["fwd_floor_us"]
    if "mamba_fwd_kernel_us" in result:
        ours = result["cuda_fwd_kernel_us"] + result["cuda_bwd_kernel_us"]
        theirs = result["mamba_fwd_kernel_us"] + result["mamba_bwd_kernel_us"]
        result["mamba_over_cuda_kernel_fwd_bwd"] = theirs / ours
    print(json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------
# mamba-ssm's selective scan, compiled for this architecture only


def build_mamba(source: Path, build_dir: Path, capability: tuple[int, int], jobs: int) -> int:
    """Compile mamba-ssm's ``selective_scan_cuda`` from an unpacked sdist (runs in a child
    process of the check, so that it can be cut at its time limit)."""
    os.environ["MAX_JOBS"] = str(jobs)
    sys.path.insert(0, str(ROOT / "src"))
    from pks4_layers.ops.build import cuda_extra_include_dirs, find_cuda_home

    home = find_cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    csrc = source / "csrc" / "selective_scan"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="selective_scan_cuda",
        sources=[str(csrc / name) for name in MAMBA_SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=[*MAMBA_NVCC_FLAGS, gencode_flag(capability)],
        extra_include_paths=[str(csrc), *cuda_extra_include_dirs()],
        build_directory=str(build_dir),
        is_python_module=True,
        verbose=False,
    )
    print(f"built {build_dir / 'selective_scan_cuda.so'}")
    return 0


def write_mamba_shim(source: Path, shim_dir: Path) -> None:
    """A ``mamba_ssm`` package whose modules are the sdist's, without running its
    ``__init__`` (which imports every model of mamba-ssm and their optional dependencies)."""
    package = shim_dir / "mamba_ssm"
    package.mkdir(parents=True, exist_ok=True)
    version = "unknown"
    init = source / "mamba_ssm" / "__init__.py"
    for line in init.read_text().splitlines():
        if line.startswith("__version__"):
            version = line.split("=", 1)[1].strip().strip("\"'")
    (package / "__init__.py").write_text(
        "# Shim: mamba-ssm's modules from its source distribution, without its __init__.\n"
        f"__version__ = {version!r}\n"
        f"__path__.append({str(source / 'mamba_ssm')!r})\n"
    )


# ---------------------------------------------------------------------------------------------
# the check


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu_check.log"
        self.log = self.log_path.open("w", encoding="utf-8")
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.python = args.python
        self.scratch = Path(tempfile.mkdtemp(prefix="pks4_gpu_check_"))
        self.env = dict(os.environ)
        self.env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                # A private kernel cache: never a stale or foreign build.
                "PKS4_CACHE_DIR": str(self.scratch / "kernel_cache"),
            }
        )
        self.device = "cuda"  # of the benchmark parts
        self.parts: list[PartResult] = []
        self.card: dict[str, Any] = {}
        self.speed: dict[str, Any] = {}
        self.mamba: dict[str, Any] = {"status": "not requested (no --mamba-sdist)"}
        self._mamba_proc: Optional[subprocess.Popen] = None
        self._mamba_started = 0.0
        self._mamba_paths: list[str] = []

    # -- helpers -----------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write_log(self, text: str) -> None:
        self.log.write(text if text.endswith("\n") else text + "\n")
        self.log.flush()

    def run(
        self, cmd: Sequence[str], limit: float, env: Optional[dict[str, str]] = None
    ) -> CommandResult:
        """Run ``cmd`` in its own process group, killed whole at ``limit`` seconds; its
        output (capped) goes to the log."""
        self.write_log(f"\n$ {' '.join(cmd)}    # limit {limit:.0f} s")
        start = time.monotonic()
        proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=max(limit, 1.0))
            returncode: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            returncode = None
        took = time.monotonic() - start
        kept = output
        if len(kept) > LOG_CAP:
            half = LOG_CAP // 2
            cut = f"\n[... {len(output) - LOG_CAP} characters cut ...]\n"
            kept = kept[:half] + cut + kept[-half:]
        self.write_log(kept)
        status = "cut at its limit" if returncode is None else f"exit {returncode}"
        self.write_log(f"# {status} after {took:.1f} s")
        return CommandResult(returncode, output, took)

    def part(self, name: str) -> tuple[PartResult, float]:
        """Open part ``name``: its result (limit: its own, cut at the budget) and start time."""
        limit = min(LIMITS[name], self.remaining())
        result = PartResult(name, limit_s=round(limit, 1))
        self.parts.append(result)
        progress(f"part {name} (limit {limit:.0f} s)")
        self.write_log(f"\n===== {name} (limit {limit:.0f} s) =====")
        return result, time.monotonic()

    def finish(self, result: PartResult, started: float) -> None:
        result.seconds = round(time.monotonic() - started, 1)
        progress(f"part {result.name}: {result.verdict} ({result.seconds:.0f} s)")

    # -- the parts ---------------------------------------------------------------------------

    def probe_card(self) -> bool:
        import torch

        self.card = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cuda_available": torch.cuda.is_available(),
        }
        nvcc = shutil.which("nvcc")
        self.card["nvcc"] = nvcc
        if not torch.cuda.is_available():
            return False
        props = torch.cuda.get_device_properties(0)
        self.card.update(
            {
                "gpu": props.name,
                "capability": list(torch.cuda.get_device_capability(0)),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
        if nvcc:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
            self.card["nvcc_version"] = out.stdout.strip().splitlines()[-1] if out.stdout else ""
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run(
                [
                    smi,
                    "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            self.card["driver_and_max_clocks"] = out.stdout.strip()
        return True

    def skip_all(self, reason: str) -> None:
        for name in LIMITS:
            self.parts.append(PartResult(name, verdict=f"skipped: {reason}"))
        self.mamba["status"] = f"skipped: {reason}"

    def capability(self) -> tuple[int, int]:
        cap = self.card["capability"]
        return int(cap[0]), int(cap[1])

    def jobs(self) -> int:
        return max(1, os.cpu_count() or 1)

    def do_install(self) -> bool:
        result, started = self.part("install")
        env = {**self.env, **build_env(self.capability(), self.jobs())}
        self.env["TORCH_CUDA_ARCH_LIST"] = env["TORCH_CUDA_ARCH_LIST"]
        self.env["MAX_JOBS"] = env["MAX_JOBS"]
        res = self.run(install_command(self.python), result.limit_s, env)
        result.details["pip_seconds"] = round(res.seconds, 1)
        if res.returncode == 0:
            # The suite's ahead-of-time build tests apply (and must find our build loaded).
            self.env["PKS4_BUILD_EXT"] = "1"
        else:
            # The check still runs, on the just-in-time build from this checkout: say so.
            why = "cut at its limit" if res.timed_out else f"pip exited {res.returncode}"
            result.details["pip"] = f"editable install failed ({why}); using src/ and the JIT build"
            self.env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ROOT / "src"), self.env.get("PYTHONPATH", "")) if p
            )
        probe = (
            "import json, pks4_layers; from pks4_layers.ops.build import load; "
            "c = load('cuda'); print(json.dumps({'file': pks4_layers.__file__, "
            "'loaded': c.loaded, 'origin': c.origin, 'reason': c.reason}))"
        )
        limit = max(self.deadline - time.monotonic(), 1.0)
        limit = min(limit, LIMITS["install"] - (time.monotonic() - started) + 60.0)
        res = self.run([self.python, "-c", probe], limit)
        loaded = False
        try:
            info = json.loads(res.output.strip().splitlines()[-1])
            result.details["cuda_extension"] = info
            loaded = bool(info["loaded"])
        except (ValueError, IndexError, KeyError):
            result.details["cuda_extension"] = res.output.strip()[-500:]
        origin = info.get("origin", "") if loaded else ""
        if loaded and "pip" not in result.details and not origin.startswith("prebuilt"):
            result.verdict = f"failed: the ahead-of-time build is not the one loaded ({origin})"
        elif loaded and "pip" not in result.details:
            result.verdict = "passed"
        elif loaded:
            result.verdict = f"failed: {result.details['pip']}"
        else:
            ext = result.details["cuda_extension"]
            reason = ext.get("reason") if isinstance(ext, dict) else ext
            result.verdict = f"failed: the CUDA extension does not load: {reason}"
        self.finish(result, started)
        return loaded

    def start_mamba_build(self) -> None:
        sdist = self.args.mamba_sdist
        if sdist is None:
            return
        if not sdist.is_file():
            self.mamba["status"] = f"not built: --mamba-sdist {sdist}: no such file"
            return
        try:
            with tarfile.open(sdist) as tar:
                top = tar.getnames()[0].split("/")[0]
                target = self.scratch / "mamba_src"
                if hasattr(tarfile, "data_filter"):  # refuses links out, absolute paths
                    tar.extractall(target, filter="data")
                else:  # an older Python: a release archive from an index
                    tar.extractall(target)
        except (OSError, tarfile.TarError, IndexError) as exc:
            self.mamba["status"] = f"not built: cannot unpack {sdist}: {exc}"
            return
        source = target / top
        if not (source / "csrc" / "selective_scan" / "selective_scan.cpp").is_file():
            self.mamba["status"] = f"not built: {sdist} has no csrc/selective_scan"
            return
        build_dir = self.scratch / "mamba_build"
        shim = self.scratch / "mamba_shim"
        write_mamba_shim(source, shim)
        self._mamba_paths = [str(build_dir), str(shim)]
        cap = self.capability()
        cmd = [
            self.python,
            str(Path(__file__).resolve()),
            "--_build-mamba",
            str(source),
            str(build_dir),
            cuda_arch(cap),
            str(self.jobs()),
        ]
        self.write_log(f"\n$ {' '.join(cmd)}    # background, limit {MAMBA_BUILD_LIMIT:.0f} s")
        self._mamba_log = (self.scratch / "mamba_build.log").open("w+")
        self._mamba_proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdout=self._mamba_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._mamba_started = time.monotonic()
        self.mamba["status"] = "building"
        progress(f"building mamba-ssm's selective scan for sm_{cap[0]}{cap[1]} in the background")

    def wait_mamba_build(self, allowance: float) -> None:
        """Wait for the background build at most ``allowance`` seconds (and never past its own
        limit); record the outcome and put the module on the path of later parts."""
        proc = self._mamba_proc
        if proc is None:
            return
        limit_left = MAMBA_BUILD_LIMIT - (time.monotonic() - self._mamba_started)
        wait = max(0.0, min(allowance, limit_left))
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        took = time.monotonic() - self._mamba_started
        self._mamba_log.seek(0)
        output = self._mamba_log.read()
        self.write_log(f"\n# mamba-ssm build output ({took:.0f} s):\n{output[-LOG_CAP:]}")
        self.mamba["build_seconds"] = round(took, 1)
        if proc.returncode == 0:
            self.mamba["status"] = "built"
            self.env["PYTHONPATH"] = os.pathsep.join(
                [*self._mamba_paths, *filter(None, [self.env.get("PYTHONPATH", "")])]
            )
        elif proc.returncode is not None and proc.returncode < 0:
            self.mamba["status"] = (
                f"not built: cut after {took:.0f} s (limit {MAMBA_BUILD_LIMIT:.0f} s, or the "
                "time left for the speed part)"
            )
        else:
            tail = [ln for ln in output.strip().splitlines() if ln.strip()][-3:]
            self.mamba["status"] = f"not built: exit {proc.returncode}: {' | '.join(tail)[-400:]}"
        self._mamba_proc = None

    def do_tests(self) -> None:
        result, started = self.part("tests")
        junit = self.scratch / "junit.xml"
        cmd = [
            self.python,
            "-m",
            "pytest",
            "-m",
            "cuda",
            "-q",
            "-rfE",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *CUDA_TEST_FILES,
        ]
        try:
            import xdist  # noqa: F401

            # Several workers: the float64 oracles run on the CPU, which is otherwise idle.
            cmd += ["-n", str(max(1, min(8, self.jobs() // 2)))]
        except ImportError:
            pass
        res = self.run(cmd, result.limit_s)
        if junit.is_file():
            summary = parse_junit(junit)
            result.details.update(summary)
        else:
            summary = None
            result.details["output_tail"] = res.output[-2000:]
        if res.timed_out:
            result.verdict = f"cut: the tests ran past {result.limit_s:.0f} s"
        elif summary is None:
            result.verdict = f"failed: pytest exited {res.returncode} without a report"
        elif summary["failures"] or summary["errors"]:
            result.verdict = (
                f"failed: {summary['failures']} failed, {summary['errors']} errors, "
                f"{summary['passed']} passed, {summary['skipped']} skipped"
            )
        elif summary["passed"] == 0:
            result.verdict = "failed: no CUDA test ran"
        else:
            result.verdict = "passed"
            result.details["line"] = f"{summary['passed']} passed, {summary['skipped']} skipped"
        self.finish(result, started)

    def do_sanitizer(self) -> None:
        result, started = self.part("sanitizer")
        tool = find_compute_sanitizer()
        if tool is None:
            result.verdict = "skipped: compute-sanitizer not found"
            self.finish(result, started)
            return
        verdicts = []
        tools = self.args.sanitizers
        for name in tools:
            limit = min(result.limit_s / len(tools), self.remaining())
            cmd = [
                tool,
                f"--tool={name}",
                "--error-exitcode=9",
                KERNEL_FILTER,
                self.python,
                str(Path(__file__).resolve()),
                "--_sanitizer-workload=cuda",
            ]
            res = self.run(cmd, limit)
            ran = "sanitizer workload:" in res.output
            if not ran and not res.timed_out and "kernel-name" in res.output:
                # A compute-sanitizer without that filter syntax: instrument every kernel.
                cmd.remove(KERNEL_FILTER)
                res = self.run(cmd, min(limit, self.remaining()))
                ran = "sanitizer workload:" in res.output
            clean, line = sanitizer_verdict(name, res.returncode, res.output)
            result.details[name] = {
                "clean": clean and ran,
                "summary": line,
                "seconds": round(res.seconds, 1),
            }
            verdicts.append(clean and ran)
        if all(verdicts):
            result.verdict = "passed"
        else:
            bad = [n for n in tools if not result.details[n]["clean"]]
            result.verdict = "failed: " + "; ".join(
                f"{n}: {result.details[n]['summary']}" for n in bad
            )
        self.finish(result, started)

    def _scan_speed(self, shape: str, extra: list[str], limit: float) -> Optional[dict]:
        json_path = self.scratch / f"speed_{shape}.json"
        cmd = [
            self.python,
            str(BENCH / "scan_speed.py"),
            f"--device={self.device}",
            *SPEED_SHAPES[shape],
            *extra,
            f"--json={json_path}",
            f"--plot={self.out / f'speed_{shape}.png'}",
        ]
        res = self.run(cmd, limit)
        key = shape + ("_block" if "--no-scan" in extra else "")
        self.speed.setdefault("tables", {})[key] = report_text(res.output, "motion_scan speed |")
        if res.returncode != 0 or not json_path.is_file():
            return None
        return json.loads(json_path.read_text())

    def do_speed(self) -> None:
        result, started = self.part("speed")
        failures = []
        for i, shape in enumerate(SPEED_SHAPES):
            limit = min((result.limit_s - (time.monotonic() - started)) / (2 - i), self.remaining())
            data = self._scan_speed(shape, [f"--backends={SPEED_BACKENDS}", "--no-block"], limit)
            if data is None:
                failures.append(f"{shape}: scan_speed.py did not finish")
                continue
            summary = speed_summary(data)
            self.speed[shape] = summary
            res = self.run(
                [self.python, str(Path(__file__).resolve()), f"--_kernel-times={shape}"],
                min(30.0, self.remaining()),
            )
            try:
                summary["kernels"] = json.loads(res.output.strip().splitlines()[-1])
            except (ValueError, IndexError):
                summary["kernels"] = {"error": res.output.strip()[-500:]}
            errors = {b: r["error"] for b, r in summary["rows"].items() if r.get("error")}
            errors.pop("mamba", None)  # optional: its reason is in the mamba status
            if errors:
                failures.append(f"{shape}: " + "; ".join(f"{b}: {e}" for b, e in errors.items()))
        result.details = {k: v for k, v in self.speed.items() if k != "tables"}
        result.verdict = "passed" if not failures else "failed: " + " | ".join(failures)
        self.finish(result, started)

    def do_block_memory(self) -> None:
        result, started = self.part("block_memory")
        failures = []
        half = result.limit_s / 2
        data = self._scan_speed("default", ["--backends=ref,torch,cuda", "--no-scan"], half)
        if data is None:
            failures.append("block rows: scan_speed.py did not finish")
        else:
            rows = {r["backend"]: r for r in data["rows"]}
            result.details["block"] = {
                b: {
                    "fwd_ms": r.get("fwd_ms"),
                    "fwd_bwd_ms": r.get("fwd_bwd_ms"),
                    "error": r.get("error"),
                }
                for b, r in rows.items()
            }
            failures += [f"block {b}: {r['error']}" for b, r in rows.items() if r.get("error")]
        mem_json = self.scratch / "memory.json"
        cmd = [
            self.python,
            str(BENCH / "memory.py"),
            f"--device={self.device}",
            f"--json={mem_json}",
            f"--plot={self.out / 'memory.png'}",
        ]
        res = self.run(cmd, min(result.limit_s - (time.monotonic() - started), self.remaining()))
        self.speed.setdefault("tables", {})["memory"] = report_text(res.output, "training memory |")
        if res.returncode != 0 or not mem_json.is_file():
            failures.append("memory.py " + ("cut" if res.timed_out else f"exit {res.returncode}"))
        else:
            result.details["memory_rows"] = json.loads(mem_json.read_text()).get("rows", [])[:12]
        result.verdict = "passed" if not failures else "failed: " + " | ".join(failures)
        self.finish(result, started)

    # -- the whole run -----------------------------------------------------------------------

    def run_all(self) -> int:
        has_gpu = self.probe_card()
        progress(f"card: {json.dumps(self.card)}")
        self.write_log(f"card: {json.dumps(self.card, indent=1)}")
        if not has_gpu:
            self.skip_all("no CUDA device")
            return self.report()
        wanted = self.args.parts
        # mamba-ssm's build needs only torch and nvcc: it runs beside our own build and the tests.
        if "speed" in wanted:
            self.start_mamba_build()
        if self.do_install():
            steps = {
                "tests": self.do_tests,
                "sanitizer": self.do_sanitizer,
                "speed": self.do_speed,
                "block_memory": self.do_block_memory,
            }
            for name, step in steps.items():
                if name not in wanted:
                    self.parts.append(PartResult(name, verdict="skipped: not asked for (--parts)"))
                    continue
                if name == "speed":
                    # It needs the mamba build: wait for it, leaving the speed part and the
                    # block/memory part most of what is left.
                    self.wait_mamba_build(max(0.0, self.remaining() - LIMITS["speed"] - 30))
                if self.remaining() < 5:
                    self.parts.append(PartResult(name, verdict="cut: the check's budget is spent"))
                    continue
                step()
        else:
            for name in ("tests", "sanitizer", "speed", "block_memory"):
                self.parts.append(PartResult(name, verdict="skipped: the install failed"))
        if self._mamba_proc is not None:
            self.wait_mamba_build(0.0)
        return self.report()

    def report(self) -> int:
        total = time.monotonic() - self.start
        lines = [
            f"gpu_check: {self.card.get('gpu', 'no GPU')}, torch {self.card.get('torch')}, "
            f"CUDA {self.card.get('torch_cuda')}, {total:.0f} s"
        ]
        for part in self.parts:
            line = f"  {part.name:<13} {part.verdict}"
            if part.seconds:
                line += f"  ({part.seconds:.0f} s)"
            lines.append(line)
            if part.name == "tests" and "tests" in part.details:
                d = part.details
                lines.append(
                    f"      {d['passed']} passed, {d['failures']} failed, {d['errors']} errors, "
                    f"{d['skipped']} skipped"
                )
                lines += [f"      {f}" for f in d["failing"][:15]]
            if part.name == "sanitizer":
                for tool in ("memcheck", "racecheck"):
                    if tool in part.details:
                        lines.append(f"      {tool}: {part.details[tool]['summary']}")
        lines.append(f"  mamba-ssm     {self.mamba['status']}")
        for shape in SPEED_SHAPES:
            s = self.speed.get(shape)
            if not s:
                continue
            rows = s["rows"]

            def ms(backend: str, key: str, rows: dict = rows) -> str:
                value = rows.get(backend, {}).get(key)
                return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

            lines.append(
                f"  speed {shape}: cuda fwd {ms('cuda', 'fwd_ms')} ms, fwd+bwd "
                f"{ms('cuda', 'fwd_bwd_ms')} ms; mamba fwd {ms('mamba', 'fwd_ms')} ms, fwd+bwd "
                f"{ms('mamba', 'fwd_bwd_ms')} ms; torch fwd+bwd {ms('torch', 'fwd_bwd_ms')} ms"
            )
            ratio = s.get("cuda_over_mamba_fwd_bwd")
            floor = s.get("cuda_fwd_over_floor")
            k = s.get("kernels", {})
            if "cuda_fwd_kernel_us" in k:
                line = (
                    f"      kernels alone: cuda fwd {k['cuda_fwd_kernel_us']:.1f} us, bwd "
                    f"{k['cuda_bwd_kernel_us']:.1f} us; floor {k['fwd_floor_us']:.1f} us at "
                    f"{k['copy_gbps']:.0f} GB/s -> fwd {k['cuda_fwd_kernel_over_floor']:.2f}x floor"
                )
                if "mamba_fwd_kernel_us" in k:
                    line += (
                        f"; mamba fwd {k['mamba_fwd_kernel_us']:.1f} us, bwd "
                        f"{k['mamba_bwd_kernel_us']:.1f} us -> cuda "
                        f"{k['mamba_over_cuda_kernel_fwd_bwd']:.2f}x faster fwd+bwd"
                    )
                lines.append(line)
            elif k:
                lines.append(f"      kernels alone: {str(k)[:300]}")
            lines.append(
                "      cuda vs mamba fwd+bwd: "
                + (f"{ratio:.2f}x" if ratio else "n/a")
                + "; cuda fwd / memory floor: "
                + (f"{floor:.2f}x" if floor else "n/a")
                + (
                    f" (floor {s['fwd_floor_ms']:.3f} ms at {s['copy_gbps']:.0f} GB/s copy)"
                    if s.get("fwd_floor_ms")
                    else ""
                )
            )
        summary = "\n".join(lines)
        tables = self.speed.get("tables", {})
        print("\n\n".join([*(tables[k] for k in tables), summary]))
        payload = {
            "benchmark": "gpu_check",
            "ok": all(p.ok for p in self.parts),
            "seconds": round(total, 1),
            "budget_s": self.args.budget,
            "card": self.card,
            "parts": [asdict(p) for p in self.parts],
            "mamba": self.mamba,
            "speed": self.speed,
            "summary": summary,
        }
        (self.out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))
        self.write_log("\n" + summary)
        self.log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
        return 0 if payload["ok"] else 1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.log, charts")
    p.add_argument(
        "--budget", type=float, default=480.0, help="seconds for the whole check (default 480)"
    )
    p.add_argument("--mamba-sdist", type=Path, default=None, help="a mamba-ssm .tar.gz to build")
    p.add_argument(
        "--parts",
        default=",".join(PART_NAMES),
        help=f"comma-separated parts after the install (default: all of {', '.join(PART_NAMES)})",
    )
    p.add_argument(
        "--sanitizers",
        default="memcheck,racecheck",
        help="compute-sanitizer tools to run (default: memcheck,racecheck)",
    )
    p.add_argument(
        "--python", default=sys.executable, help="the python that holds torch (default: this one)"
    )
    # Internal entry points of the child processes.
    p.add_argument("--_sanitizer-workload", dest="sanitizer_workload", help=argparse.SUPPRESS)
    p.add_argument("--_build-mamba", dest="build_mamba", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--_kernel-times", dest="kernel_times", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.sanitizers = [x.strip() for x in args.sanitizers.split(",") if x.strip()]
    odd = sorted(set(args.sanitizers) - {"memcheck", "racecheck", "initcheck", "synccheck"})
    if odd or not args.sanitizers:
        p.error(
            "--sanitizers: expected names from memcheck, racecheck, initcheck, synccheck, "
            f"got {args.sanitizers}"
        )
    unknown = sorted(set(args.parts) - set(PART_NAMES))
    if unknown:
        p.error(f"--parts: expected names from {', '.join(PART_NAMES)}, got {', '.join(unknown)}")
    internal = (args.sanitizer_workload, args.build_mamba, args.kernel_times)
    if all(x is None for x in internal) and args.out is None:
        p.error("--out: expected a folder for the results, got nothing")
    if args.budget <= 0:
        p.error(f"--budget: expected a positive number of seconds, got {args.budget}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.sanitizer_workload is not None:
        sanitizer_workload(args.sanitizer_workload)
        return 0
    if args.kernel_times is not None:
        kernel_times(args.kernel_times)
        return 0
    if args.build_mamba is not None:
        source, build_dir, arch, jobs = args.build_mamba
        major, minor = arch.split(".")
        return build_mamba(Path(source), Path(build_dir), (int(major), int(minor)), int(jobs))
    return Check(args).run_all()


if __name__ == "__main__":
    sys.exit(main())
