"""Speed and memory of every ``motion_scan`` backend, and of a whole ``PKS4Block``.

Usage (the same code three ways: installed from an index, as a module, from a checkout)::

    pks4-bench                                            # batch 2, T 16, 14x14, D 384, N 16
    pks4-bench --device cuda --dtype bfloat16 --backends torch,cuda
    python -m pks4_layers.bench                           # = pks4-bench
    python benchmarks/scan_speed.py                       # = pks4-bench, into benchmarks/results

What is measured, per backend (every name :func:`pks4_layers.ops.available_backends` returns,
or those given with ``--backends``):

* ``fwd ms``: one forward pass under ``torch.no_grad`` (inference); ``fwd+bwd ms``: a forward
  with autograd recording plus the backward to every input (a training step's share). Both are
  the median of ``--repeats`` calls after ``--warmup`` untimed ones; on CUDA the device is
  synchronised around each call.
* ``tok/s``: tokens per second of the forward, a token being one (frame, location) of one
  clip: ``batch * T * H * W``.
* ``fwd/ref``, ``f+b/ref``: speed-up over the ``ref`` backend measured in the same run
  (``ref`` time divided by this backend's); ``n/a`` when ``ref`` is not benchmarked.
* ``saved``: exact bytes autograd keeps for the backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, inputs included; the JSON also
  has the part beyond the inputs).
* ``peak``: how far memory rose above the inputs during one forward+backward. On CUDA this is
  ``torch.cuda.max_memory_allocated`` after a reset; CPU allocations have no such statistic, so
  each CPU backend runs once in a fresh process of this script (memory freed earlier in this
  one would be reused unseen), which reports how far its resident set rose during the step
  above its size with the inputs built: the kernel's high-water mark (``VmHWM``, reset first
  through ``/proc/self/clear_refs``; ``getrusage`` ``ru_maxrss`` where there is no ``/proc``).
  ``--no-peak`` skips it.
* ``|dy|``, ``|dgrad|``: largest absolute difference from ``ref`` on the same inputs, of
  the output and of all input gradients: a sanity check printed next to the timings, never an
  assertion (half-precision runs differ by their rounding).

The inputs are those a PKS4 layer passes: ``A = -(1, 2, ..., N)`` for every channel (Mamba's
initialisation), ``delta`` of moderate size with a ``delta_bias`` giving step sizes between
1e-3 and 1e-1 as initialised in the layer, the skip ``D`` and the gate ``z``, softplus on; ``u``,
``delta``, ``z``, ``B``, ``C`` in ``--dtype`` and ``A``, ``D``, ``delta_bias`` in float32 (float64
for float64 runs), as in the layer.

The ``PKS4Block`` rows run ``PKS4Block(dim, d_state=state, backend=...)`` on a
``(batch, T, dim, H, W)`` map with one block's weights for every backend; their ratios are
relative to the block with ``backend="ref"``. The block's output projection starts at zero (a
fresh block is the identity); it is re-initialised here so that the output and the gradients
reaching the scans depend on them, as in a trained model.

A backend that fails (not built, wrong device, ...) shows as a row with the reason. Results go
to ``--json`` and ``--plot``; without either, to ``scan_speed.json`` and ``scan_speed.png`` in
``--results-dir``. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from pks4_layers import PKS4Block
from pks4_layers.ops import available_backends, motion_scan

from .timing import (
    Column,
    SavedBytes,
    Table,
    Timing,
    arg_non_negative,
    arg_positive,
    arg_size,
    cuda_peak_growth_bytes,
    environment_info,
    format_bytes,
    format_diff,
    format_ms,
    format_rate,
    format_ratio,
    progress,
    rss_growth_bytes,
    run_json_subprocess,
    save_bar_chart,
    saved_tensor_bytes,
    short_reason,
    time_ms,
    write_json,
)

# Where the JSON and the chart go without --json / --plot: the current folder's
# ``scan_speed_results`` (``benchmarks/results`` when run as ``benchmarks/scan_speed.py``).
DEFAULT_RESULTS_DIR = Path("scan_speed_results")
MODULE = "pks4_layers.bench.scan_speed"  # run as ``python -m`` for the fresh-process peaks
SCAN = "motion_scan"
BLOCK = "PKS4Block"
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# ---------------------------------------------------------------------------------------------
# configuration


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time every motion_scan backend and a PKS4Block: forward, forward+backward, "
        "memory saved for the backward and peak memory.",
    )
    p.add_argument("--batch", type=arg_positive, default=2, help="clips per batch (default 2)")
    p.add_argument("--frames", type=arg_positive, default=16, help="frames T (default 16)")
    p.add_argument(
        "--size", type=arg_size, default=(14, 14), help="feature map HxW (default 14x14)"
    )
    p.add_argument("--dim", type=arg_positive, default=384, help="channels D (default 384)")
    p.add_argument("--state", type=arg_positive, default=16, help="state size N (default 16)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated backends (default: all available, now {available_backends()})",
    )
    p.add_argument("--repeats", type=arg_positive, default=5, help="timed calls (default 5)")
    p.add_argument("--warmup", type=arg_non_negative, default=2, help="untimed calls (default 2)")
    p.add_argument("--json", type=Path, default=None, help="write all rows and the config here")
    p.add_argument("--plot", type=Path, default=None, help="save a PNG bar chart here")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help=f"where the JSON and chart go without --json/--plot (default ./{DEFAULT_RESULTS_DIR})",
    )
    p.add_argument("--no-block", action="store_true", help="skip the PKS4Block rows")
    p.add_argument("--no-scan", action="store_true", help="only the PKS4Block rows")
    p.add_argument("--no-peak", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--seed", type=int, default=0)
    # Internal: measure the CPU peak of one forward+backward of "KIND:BACKEND" in this fresh
    # process and print it as JSON (see the module docstring).
    p.add_argument("--_peak-child", dest="peak_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.no_block and args.no_scan:
        p.error("--no-block and --no-scan: expected at most one of them, got both")
    if args.backends is None:
        args.backend_list = available_backends()
    else:
        args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
        if not args.backend_list:
            p.error("--backends: expected at least one name")
    return args


def _config_argv(args: argparse.Namespace) -> list[str]:
    """The flags that rebuild the same inputs in a subprocess."""
    h, w = args.size
    return [
        f"--batch={args.batch}",
        f"--frames={args.frames}",
        f"--size={h}x{w}",
        f"--dim={args.dim}",
        f"--state={args.state}",
        f"--dtype={args.dtype}",
        f"--device={args.device}",
        f"--seed={args.seed}",
    ]


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    # A PKS4 layer keeps A, D and delta_bias in float32 (float64 in a float64 model).
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# workloads: a callable running the forward, the leaves to differentiate, a gradient for y


@dataclass
class Workload:
    """One benchmarked computation.

    ``forward`` runs it on the benchmark's inputs; ``leaves`` are what the backward
    differentiates (inputs and parameters); ``grad_out`` is the gradient fed to the output;
    ``tiny_step`` runs a forward+backward of the same code on a tiny input (to pay lazy
    initialisation before a memory measurement).
    """

    forward: Callable[[], Tensor]
    leaves: list[Tensor]
    grad_out: Tensor
    tiny_step: Callable[[], None]

    def fwd_bwd(self) -> tuple[Tensor, tuple[Optional[Tensor], ...]]:
        y = self.forward()
        # autograd.grad returns fresh gradients instead of accumulating into .grad, so every
        # call does the same work.
        grads = torch.autograd.grad(y, self.leaves, self.grad_out, allow_unused=True)
        return y, grads


def _fwd_bwd_once(forward: Callable[[], Tensor], leaves: list[Tensor]) -> None:
    y = forward()
    torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)


def make_scan_inputs(
    batch: int,
    frames: int,
    locations: int,
    dim: int,
    state: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> dict[str, Tensor]:
    """Inputs of ``motion_scan`` as a PKS4 layer passes them, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    pdt = _param_dtype(dtype)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        # Drawn in float32 on the CPU so that every dtype and device sees the same values.
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    act = (batch, frames, locations, dim)
    sel = (batch, frames, locations, state)
    # delta_bias as the layer initialises it: the inverse softplus of a step size drawn
    # log-uniformly in [1e-3, 1e-1].
    step = torch.exp(torch.rand(dim, generator=g) * math.log(100.0) + math.log(1e-3))
    bias = step + torch.log(-torch.expm1(-step))
    inputs = {
        "u": randn(*act),
        "delta": randn(*act, scale=0.5),
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1).to(device, pdt),
        "B": randn(*sel),
        "C": randn(*sel),
        "D": torch.ones(dim).to(device, pdt),
        "z": randn(*act),
        "delta_bias": bias.to(device, pdt),
    }
    for t in inputs.values():
        t.requires_grad_(True)
    return inputs


def scan_workload(args: argparse.Namespace, backend: str, device: torch.device) -> Workload:
    h, w = args.size
    dtype = DTYPES[args.dtype]
    inputs = make_scan_inputs(
        args.batch, args.frames, h * w, args.dim, args.state, dtype, device, args.seed
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    grad_out = torch.randn(inputs["u"].shape, generator=g).to(device, dtype)

    def forward() -> Tensor:
        return motion_scan(**inputs, delta_softplus=True, backend=backend)

    def tiny_step() -> None:
        tiny = make_scan_inputs(1, 2, 1, args.dim, args.state, dtype, device, args.seed)
        _fwd_bwd_once(lambda: motion_scan(**tiny, backend=backend), list(tiny.values()))

    return Workload(forward, list(inputs.values()), grad_out, tiny_step)


def make_block(args: argparse.Namespace, backend: str, device: torch.device) -> PKS4Block:
    torch.manual_seed(args.seed)
    block = PKS4Block(args.dim, d_state=args.state, backend=backend)
    # A fresh block is the identity (zero output projection); give it a random one so that
    # the output, and the gradients flowing back into the scans, depend on the scans.
    block.scan.out_proj.reset_parameters()
    return block.to(device=device, dtype=DTYPES[args.dtype])


def block_workload(
    args: argparse.Namespace,
    backend: str,
    device: torch.device,
    state_dict: Optional[dict[str, Tensor]] = None,
) -> Workload:
    block = make_block(args, backend, device)
    if state_dict is not None:
        block.load_state_dict(state_dict)
    h, w = args.size
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(args.seed + 2)
    shape = (args.batch, args.frames, args.dim, h, w)
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True)
    grad_out = torch.randn(shape, generator=g).to(device, dtype)
    leaves = [x, *block.parameters()]

    def tiny_step() -> None:
        tiny = torch.zeros(1, 2, args.dim, 2, 2, device=device, dtype=dtype, requires_grad=True)
        _fwd_bwd_once(lambda: block(tiny), [tiny, *block.parameters()])

    return Workload(lambda: block(x), leaves, grad_out, tiny_step)


# ---------------------------------------------------------------------------------------------
# measurements


@dataclass
class Row:
    kind: str
    backend: str
    tokens: int
    fwd: Optional[Timing] = None
    fwd_bwd: Optional[Timing] = None
    saved: Optional[SavedBytes] = None
    peak_bytes: Optional[int] = None
    peak_method: Optional[str] = None
    diff_y: Optional[float] = None
    diff_grad: Optional[float] = None
    fwd_speedup: Optional[float] = None
    fwd_bwd_speedup: Optional[float] = None
    fwd_traffic_bytes: Optional[int] = None
    error: Optional[str] = None

    @property
    def fwd_gbps(self) -> Optional[float]:
        """Achieved bandwidth of the forward: its compulsory traffic over its time."""
        if not self.fwd_traffic_bytes or not self.fwd:
            return None
        return self.fwd_traffic_bytes / (self.fwd.median_ms / 1e3) / 1e9

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.backend}]"

    def to_json(self) -> dict[str, Any]:
        fwd_ms = self.fwd.median_ms if self.fwd else None
        return {
            "kind": self.kind,
            "backend": self.backend,
            "label": self.label,
            "fwd_ms": fwd_ms,
            "fwd_ms_samples": self.fwd.samples_ms if self.fwd else None,
            "fwd_bwd_ms": self.fwd_bwd.median_ms if self.fwd_bwd else None,
            "fwd_bwd_ms_samples": self.fwd_bwd.samples_ms if self.fwd_bwd else None,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / (fwd_ms / 1e3) if fwd_ms else None,
            "fwd_speedup_vs_ref": self.fwd_speedup,
            "fwd_bwd_speedup_vs_ref": self.fwd_bwd_speedup,
            "fwd_traffic_bytes": self.fwd_traffic_bytes,
            "fwd_gbps": self.fwd_gbps,
            "saved_bytes": self.saved.total if self.saved else None,
            "saved_beyond_inputs_bytes": self.saved.beyond_inputs if self.saved else None,
            "saved_tensors": self.saved.tensors if self.saved else None,
            "peak_bytes": self.peak_bytes,
            "peak_method": self.peak_method,
            "max_abs_diff_y_vs_ref": self.diff_y,
            "max_abs_diff_grad_vs_ref": self.diff_grad,
            "error": self.error,
        }


def _max_abs_diff(a: Optional[Tensor], b: Optional[Tensor]) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf  # one side has a gradient the other lacks
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _grad_diff(a: Sequence[Optional[Tensor]], b: Sequence[Optional[Tensor]]) -> float:
    return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)


@dataclass
class Oracle:
    """The ``ref`` backend's output and gradients, to compare every backend against."""

    y: Tensor
    grads: tuple[Optional[Tensor], ...]


def compute_oracle(make: Callable[[str], Workload]) -> tuple[Optional[Oracle], Optional[str]]:
    if "ref" not in available_backends():
        return None, "the ref backend is not available"
    try:
        work = make("ref")
        y, grads = work.fwd_bwd()
        return Oracle(y.detach(), tuple(g.detach() if g is not None else None for g in grads)), None
    except Exception as exc:  # a reference that cannot run leaves the diffs empty
        return None, short_reason(exc)


def measure(
    row: Row,
    work: Workload,
    oracle: Optional[Oracle],
    args: argparse.Namespace,
    device: torch.device,
    peak: Optional[Callable[[], tuple[int, str]]],
) -> None:
    """Fills ``row``; stops at the first failure, keeping what was measured before it."""
    stage = "forward"
    try:
        with torch.no_grad():
            y = work.forward()
        if oracle is not None:
            row.diff_y = _max_abs_diff(y, oracle.y)
        del y
        row.fwd = _timed_no_grad(work.forward, args, device)

        stage = "forward+backward"
        y, grads = work.fwd_bwd()
        if oracle is not None:
            row.diff_grad = _grad_diff(grads, oracle.grads)
        del y, grads
        graph, row.saved = saved_tensor_bytes(work.forward, work.leaves)
        del graph
        row.fwd_bwd = time_ms(work.fwd_bwd, repeats=args.repeats, warmup=args.warmup, device=device)

        if peak is not None:
            stage = "peak memory"
            row.peak_bytes, row.peak_method = peak()
    except Exception as exc:  # shown as the row's note: one failing backend must not end the run
        row.error = f"{stage}: {short_reason(exc)}" if stage != "forward" else short_reason(exc)


def _timed_no_grad(
    fn: Callable[[], Tensor], args: argparse.Namespace, device: torch.device
) -> Timing:
    def call() -> None:
        with torch.no_grad():
            fn()

    return time_ms(call, repeats=args.repeats, warmup=args.warmup, device=device)


def _peak_measure(
    args: argparse.Namespace, kind: str, backend: str, work: Workload, device: torch.device
) -> Optional[Callable[[], tuple[int, str]]]:
    """How to measure the peak memory of one forward+backward of ``work``, or ``None``."""
    if args.no_peak:
        return None
    if device.type == "cuda":
        method = "torch.cuda.max_memory_allocated after a reset, minus memory_allocated before"
        return lambda: (cuda_peak_growth_bytes(work.fwd_bwd, device), method)

    def in_fresh_process() -> tuple[int, str]:
        result = run_json_subprocess(
            ["-m", MODULE, *_config_argv(args), f"--_peak-child={kind}:{backend}"]
        )
        return int(result["peak_bytes"]), f"{result['method']}, in a fresh process"

    return in_fresh_process


def peak_child(args: argparse.Namespace) -> int:
    """CPU peak of one forward+backward, run as ``--_peak-child KIND:BACKEND`` in a fresh process.

    Prints ``{"peak_bytes": ..., "method": ...}`` on stdout for :func:`run_json_subprocess`.
    """
    kind, _, backend = args.peak_child.partition(":")
    device = torch.device(args.device)
    if kind == SCAN:
        work = scan_workload(args, backend, device)
    elif kind == BLOCK:
        work = block_workload(args, backend, device)
    else:
        raise ValueError(f"--_peak-child: expected {SCAN}:NAME or {BLOCK}:NAME, got {kind!r}")
    # Lazy initialisation (thread pools, kernel tables) is paid on a tiny input first so that
    # it is not counted as the measured step's memory.
    work.tiny_step()
    peak, method = rss_growth_bytes(work.fwd_bwd)
    print(json.dumps({"peak_bytes": peak, "method": method}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# the run


def run_rows(
    args: argparse.Namespace,
    kind: str,
    make: Callable[[str], Workload],
    device: torch.device,
    step: list[int],
    total: int,
) -> list[Row]:
    h, w = args.size
    tokens = args.batch * args.frames * h * w
    traffic = scan_traffic_bytes(args) if kind == SCAN else None
    progress(f"{kind}: computing the ref output and gradients to compare against")
    oracle, why = compute_oracle(make)
    if oracle is None:
        progress(f"{kind}: no comparison against ref ({why})")
    rows = []
    for backend in args.backend_list:
        step[0] += 1
        row = Row(kind, backend, tokens, fwd_traffic_bytes=traffic)
        progress(f"[{step[0]}/{total}] {row.label} ...")
        start = time.perf_counter()
        try:
            work = make(backend)
        except Exception as exc:  # e.g. a backend whose module cannot be built here
            row.error = short_reason(exc)
        else:
            measure(
                row, work, oracle, args, device, _peak_measure(args, kind, backend, work, device)
            )
            del work
        took = time.perf_counter() - start
        if row.error:
            progress(f"[{step[0]}/{total}] {row.label} failed ({took:.1f} s): {row.error}")
        else:
            progress(
                f"[{step[0]}/{total}] {row.label}: fwd {format_ms(row.fwd and row.fwd.median_ms)}"
                f" ms, fwd+bwd {format_ms(row.fwd_bwd and row.fwd_bwd.median_ms)} ms"
                f" ({took:.1f} s)"
            )
        rows.append(row)
    del oracle
    _fill_speedups(rows)
    return rows


def scan_traffic_bytes(args: argparse.Namespace) -> int:
    """Bytes a forward must move at least: read u, delta, z, B, C once, write y and the last
    state once (A, D and delta_bias are negligible)."""
    h, w = args.size
    item = DTYPES[args.dtype].itemsize
    per_frame = args.batch * args.frames * h * w
    state_item = 8 if args.dtype == "float64" else 4
    return (
        4 * per_frame * args.dim * item
        + 2 * per_frame * args.state * item
        + args.batch * h * w * args.dim * args.state * state_item
    )


def copy_bandwidth_gbps(args: argparse.Namespace, device: torch.device) -> float:
    """Bandwidth of a large device-to-device tensor copy (bytes read + written per second),
    measured in the same run: the ceiling a memory-bound kernel can reach here."""
    n = max(64 * 2**20, scan_traffic_bytes(args)) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), repeats=max(3, args.repeats), warmup=1, device=device)
    return 2 * n * 4 / (timing.median_ms / 1e3) / 1e9


def _fill_speedups(rows: list[Row]) -> None:
    """Speed-up over the ``ref`` row of the same kind, measured in the same run."""
    ref = next((r for r in rows if r.backend == "ref"), None)
    if ref is None:
        return
    for row in rows:
        if ref.fwd and row.fwd:
            row.fwd_speedup = ref.fwd.median_ms / row.fwd.median_ms
        if ref.fwd_bwd and row.fwd_bwd:
            row.fwd_bwd_speedup = ref.fwd_bwd.median_ms / row.fwd_bwd.median_ms


def _auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    try:
        from pks4_layers.ops.motion_scan import resolve_backend

        return resolve_backend("auto", device, dtype)
    except Exception as exc:  # only used for the header
        return f"? ({short_reason(exc)})"


def header_lines(args: argparse.Namespace, env: dict[str, Any], device: torch.device) -> list[str]:
    h, w = args.size
    pdt = str(_param_dtype(DTYPES[args.dtype])).replace("torch.", "")
    busy = env.get("cpu_busy_before_run")
    other = f", CPUs {busy:.0%} busy with other work at start" if busy is not None else ""
    lines = [
        f"motion_scan speed | {env['device_name']} ({device}) | torch {env['torch']} | "
        f"{env['threads']} threads{other}",
        f"shape: batch {args.batch}, T {args.frames}, {h}x{w} (L {h * w}), D {args.dim}, "
        f"N {args.state}, {args.dtype} (A, D, delta_bias in {pdt})",
        f"times: median of {args.repeats} after {args.warmup} warm-up; fwd under no_grad; "
        "fwd+bwd = forward + backward to all inputs",
        f"tok/s: batch*T*L = {args.batch * args.frames * h * w} tokens / fwd time; "
        "x/ref: ref time / this time, same run",
        "saved: bytes kept for the backward (unique storages, inputs included)",
    ]
    if args.no_peak:
        lines.append("peak: not measured (--no-peak)")
    elif device.type == "cuda":
        lines.append("peak: torch.cuda.max_memory_allocated in one fwd+bwd, above the inputs")
    else:
        lines.append(
            "peak: CPU peak is RSS growth: the resident-set high-water mark of one fwd+bwd\n"
            "      in a fresh process, above its RSS with the inputs built"
        )
    lines.append("|dy|, |dgrad|: max abs difference from ref (output, all input gradients)")
    if not args.no_block:
        lines.append(
            f"{BLOCK}: PKS4Block({args.dim}, d_state={args.state}, backend=...) on "
            f"({args.batch}, {args.frames}, {args.dim}, {h}, {w}), same weights for each\n"
            f"      backend, compared with backend='ref' "
            f"('auto' is {_auto_backend(device, DTYPES[args.dtype])!r} here)"
        )
    return "\n".join(lines).splitlines()


def render_table(rows: list[Row]) -> str:
    """The aligned table, then the full reason of every failed row as a numbered note."""
    table = Table(
        [
            Column("row", right=False),
            Column("fwd ms"),
            Column("fwd+bwd ms"),
            Column("tok/s fwd"),
            Column("fwd/ref"),
            Column("f+b/ref"),
            Column("fwd GB/s"),
            Column("saved"),
            Column("peak"),
            Column("|dy|"),
            Column("|dgrad|"),
            Column("note", right=False),
        ]
    )
    notes = []
    for r in rows:
        fwd_ms = r.fwd.median_ms if r.fwd else None
        note = ""
        if r.error:
            notes.append(f"[{len(notes) + 1}] {r.label}: {r.error}")
            note = f"failed [{len(notes)}]"
        table.add(
            [
                r.label,
                format_ms(fwd_ms),
                format_ms(r.fwd_bwd.median_ms if r.fwd_bwd else None),
                format_rate(r.tokens / (fwd_ms / 1e3) if fwd_ms else None),
                format_ratio(r.fwd_speedup),
                format_ratio(r.fwd_bwd_speedup),
                "" if r.fwd_gbps is None else f"{r.fwd_gbps:.1f}",
                format_bytes(r.saved.total if r.saved else None),
                format_bytes(r.peak_bytes),
                format_diff(r.diff_y),
                format_diff(r.diff_grad),
                note,
            ]
        )
    return "\n".join([table.render(), *notes])


def save_outputs(
    args: argparse.Namespace,
    rows: list[Row],
    env: dict[str, Any],
    device: torch.device,
    header: list[str],
) -> None:
    json_path, plot_path = args.json, args.plot
    if json_path is None and plot_path is None:
        json_path = args.results_dir / "scan_speed.json"
        plot_path = args.results_dir / "scan_speed.png"
    h, w = args.size
    if json_path is not None:
        config = {
            "batch": args.batch,
            "frames": args.frames,
            "height": h,
            "width": w,
            "locations": h * w,
            "dim": args.dim,
            "state": args.state,
            "dtype": args.dtype,
            "device": str(device),
            "backends": args.backend_list,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "block": not args.no_block,
            "scan": not args.no_scan,
            "peak": not args.no_peak,
            "seed": args.seed,
            "tokens": args.batch * args.frames * h * w,
        }
        payload = {
            "benchmark": "scan_speed",
            "config": config,
            "environment": env,
            "header": header,
            "rows": [r.to_json() for r in rows],
        }
        write_json(json_path, payload)
        print(f"results: {json_path}")
    if plot_path is not None:
        title = (
            f"{env['device_name']} ({device}), torch {env['torch']}: batch {args.batch}, "
            f"T {args.frames}, {h}x{w}, D {args.dim}, N {args.state}, {args.dtype}"
        )
        try:
            save_bar_chart(
                plot_path,
                [r.label for r in rows],
                {
                    "forward": [r.fwd.median_ms if r.fwd else None for r in rows],
                    "forward+backward": [r.fwd_bwd.median_ms if r.fwd_bwd else None for r in rows],
                },
                title=title,
                ylabel="ms (median)",
            )
        except ImportError as exc:
            print(f"chart not saved: {exc}", file=sys.stderr)
        else:
            print(f"chart: {plot_path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.peak_child is not None:
        return peak_child(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here", file=sys.stderr)
        return 2
    env = environment_info(device)
    busy = env.get("cpu_busy_before_run")
    if busy is not None and busy >= 0.2:
        progress(
            f"note: the CPUs were {busy:.0%} busy with other work before the run; it makes "
            "the CPU timings slower and noisier"
        )
    total = len(args.backend_list) * (1 if args.no_block or args.no_scan else 2)
    step = [0]

    rows = []
    if not args.no_scan:
        rows += run_rows(args, SCAN, lambda b: scan_workload(args, b, device), device, step, total)
    if not args.no_block:
        weights = make_block(args, "ref", device).state_dict()
        rows += run_rows(
            args, BLOCK, lambda b: block_workload(args, b, device, weights), device, step, total
        )

    traffic = scan_traffic_bytes(args)
    if not args.no_scan:
        progress("measuring a large tensor copy for the bandwidth reference")
        copy_gbps = copy_bandwidth_gbps(args, device)
        env["copy_gbps"] = copy_gbps
        env["fwd_traffic_bytes"] = traffic
        env["fwd_floor_ms"] = traffic / (copy_gbps * 1e9) * 1e3
    header = header_lines(args, env, device)
    print("\n".join(header))
    print()
    print(render_table(rows))
    print()
    if not args.no_scan:
        print(
            f"bandwidth: a forward must move {traffic / 2**20:.1f} MiB; a large tensor copy runs "
            f"at {copy_gbps:.1f} GB/s here, so the memory floor of the forward is "
            f"{env['fwd_floor_ms']:.2f} ms (column 'fwd GB/s': achieved)"
        )
        print()
    save_outputs(args, rows, env, device, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
