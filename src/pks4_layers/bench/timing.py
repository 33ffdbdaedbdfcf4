"""Measurement and reporting helpers shared by the benchmark scripts in this folder.

* :func:`time_ms`: wall-clock time of a callable, ``warmup`` untimed calls then the median of
  ``repeats`` timed ones, with the device synchronised around every timed call (CUDA kernels
  are asynchronous: without a synchronisation the clock would only see the launch).
* :func:`saved_tensor_bytes`: the exact bytes autograd keeps alive for the backward of a
  forward pass, from :func:`torch.autograd.graph.saved_tensors_hooks`, counting every storage
  once however many views of it are saved.
* :func:`cuda_peak_growth_bytes` (CUDA, from the caching allocator's statistics) and
  :func:`rss_growth_bytes` (CPU, from the process's resident-set high-water mark, meaningful
  only in a fresh process: see :func:`run_json_subprocess`): how far the memory in use rose
  above what was in use before the call.
* :func:`format_table` and the ``format_*`` helpers for a plain-text report,
  :func:`write_json` and :func:`save_bar_chart` to save the results.
* ``arg_*`` argument types shared by the scripts' command lines, :func:`progress` and
  :func:`short_reason` for their progress lines and error cells.

``pks4-bench`` (:mod:`pks4_layers.bench.scan_speed`) and the checkout's ``benchmarks/memory.py``
share them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU, where calls are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Timed calls of one callable, in milliseconds."""

    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def time_ms(fn: Callable[[], object], *, repeats: int, warmup: int, device: torch.device) -> Timing:
    """Median wall-clock time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    The warm-up calls absorb one-off costs (lazy initialisation, the first page faults of
    fresh allocations, kernel compilation or autotuning) that a training loop pays only once.
    The median, not the mean, is reported so that a single preempted call does not skew it.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(samples)


def _storage_key(t: torch.Tensor) -> tuple[str, int, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr(), storage.nbytes())


@dataclass
class SavedBytes:
    """What a forward pass saved for its backward.

    ``total``: bytes of all unique storages saved. ``beyond_inputs``: the same without the
    storages of the tensors passed as ``inputs`` (the leaves and parameters, which stay alive
    whether or not a backward follows). ``tensors``: how many tensors were saved (views
    included).
    """

    total: int
    beyond_inputs: int
    tensors: int


def saved_tensor_bytes(
    fn: Callable[[], object], inputs: Iterable[torch.Tensor] = ()
) -> tuple[object, SavedBytes]:
    """Runs ``fn()`` with autograd recording and counts what it saved for the backward.

    Returns ``fn``'s result (keep it alive for as long as the graph is needed) and the counts.
    Every storage is counted once with its full size: a saved view keeps its whole storage
    alive, and many saved views of one buffer (a time slice per step, say) cost one buffer.
    """
    input_keys = {_storage_key(t) for t in inputs}
    seen: dict[tuple[str, int, int], int] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        key = _storage_key(t)
        seen[key] = key[2]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    total = sum(seen.values())
    beyond = sum(n for key, n in seen.items() if key not in input_keys)
    return result, SavedBytes(total=total, beyond_inputs=beyond, tensors=count)


def cuda_peak_growth_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of ``torch.cuda.memory_allocated`` during ``fn()`` above its value before the call."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes, or ``None`` where absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark.

    ``VmHWM`` where the kernel gives it, else ``getrusage(RUSAGE_SELF).ru_maxrss``. On Linux
    ``ru_maxrss`` is inherited across fork and exec, so a subprocess started by a large parent
    would report the parent's size; ``VmHWM`` belongs to the process's own address space.
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # POSIX only: imported here so that the rest of the file works elsewhere

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def _reset_peak_rss() -> bool:
    """Lowers the high-water mark to the current RSS (Linux >= 4.0); ``False`` if impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_growth_bytes(fn: Callable[[], object]) -> tuple[int, str]:
    """How far the resident set rose above its size before ``fn()``, at its highest.

    CPU tensors come from ``malloc``, which keeps no statistics torch could read, so the peak is
    taken from the kernel's high-water mark instead. Call this in a fresh process with the
    inputs already built: memory that an earlier computation freed but ``malloc`` kept would be
    reused without growing the resident set, hiding part of the call's own peak.

    Returns the growth in bytes and a description of how it was measured. Where the kernel
    lets the mark be reset, the growth is from the current RSS; elsewhere it is the rise of the
    mark itself, which misses a peak lower than an earlier one.
    """
    if _reset_peak_rss() and (current := _proc_status_bytes("VmRSS")) is not None:
        before, method = current, "VmHWM after a reset, minus VmRSS before"
    else:
        before, method = peak_rss_bytes(), "rise of the RSS high-water mark"
    fn()
    return max(0, peak_rss_bytes() - before), method


def run_json_subprocess(argv: Sequence[str], timeout_s: float = 1800.0) -> dict[str, Any]:
    """Runs ``python argv...`` and parses the last line of its stdout as a JSON object.

    Raises ``RuntimeError`` with the last line of the child's stderr (usually the exception)
    when it fails.
    """
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        reason = err[-1] if err else f"exit code {proc.returncode}"
        raise RuntimeError(f"measurement subprocess failed: {reason}")
    return json.loads(lines[-1])


def device_description(device: torch.device) -> str:
    """Human-readable name of the device: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_times() -> Optional[tuple[int, int]]:
    """(busy, total) jiffies of all cores from ``/proc/stat`` (Linux), or ``None``."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_fraction(interval_s: float = 0.5) -> Optional[float]:
    """Share of all cores' time spent busy over the next ``interval_s`` (this process sleeps).

    Other processes on the same cores make CPU timings slower and noisier; a load average
    would still show a run that ended a minute ago, this shows what is running now.
    """
    first = _cpu_times()
    time.sleep(interval_s)
    second = _cpu_times()
    if first is None or second is None or second[1] == first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1])


def environment_info(device: torch.device) -> dict[str, Any]:
    """What a timing depends on besides the code: hardware, versions, thread count."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    if device.type == "cpu":
        # Other processes on the same cores distort CPU timings: keep the evidence.
        info["cpu_busy_before_run"] = cpu_busy_fraction()
        if hasattr(os, "getloadavg"):
            info["load_average_1min"] = os.getloadavg()[0]
    return info


def format_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(per_s: Optional[float]) -> str:
    if per_s is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return f"{per_s / scale:.2f}{suffix}"
    return f"{per_s:.0f}"


def arg_size(text: str) -> tuple[int, int]:
    """``"HxW"`` -> ``(H, W)``, both positive."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 14x14, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return h, w


def arg_positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def arg_non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def progress(message: str) -> None:
    """A progress line on stderr, so stdout keeps only the report."""
    print(message, file=sys.stderr, flush=True)


def short_reason(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, for a table cell."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def format_ratio(ratio: Optional[float]) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def format_diff(diff: Optional[float]) -> str:
    if diff is None:
        return "-"
    if diff == 0:
        return "0"
    return f"{diff:.1e}"


@dataclass
class Column:
    """A table column: header text and whether cells are right-aligned (numbers)."""

    header: str
    right: bool = True


@dataclass
class Table:
    """A plain-text table with aligned columns."""

    columns: list[Column]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, cells: Sequence[str]) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} cells, got {len(cells)}")
        self.rows.append(list(cells))

    def render(self) -> str:
        widths = [
            max(len(col.header), *(len(row[i]) for row in self.rows))
            if self.rows
            else len(col.header)
            for i, col in enumerate(self.columns)
        ]

        def line(cells: Sequence[str]) -> str:
            parts = [
                cell.rjust(w) if col.right else cell.ljust(w)
                for cell, w, col in zip(cells, widths, self.columns)
            ]
            return "  ".join(parts).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join(
            [line([c.header for c in self.columns]), rule] + [line(r) for r in self.rows]
        )


def _json_safe(value: Any) -> Any:
    # JSON has no NaN or infinity: write them as strings rather than emit invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(payload), indent=2) + "\n", encoding="utf-8")


def save_bar_chart(
    path: Path,
    labels: Sequence[str],
    series: dict[str, Sequence[Optional[float]]],
    *,
    title: str,
    ylabel: str,
) -> None:
    """Grouped bar chart, one group per label and one bar per series; missing values are gaps.

    The y axis is logarithmic when the values span more than a factor of 20, so that a fast
    backend next to a slow reference is still readable.

    Raises ``ImportError`` with an installation hint when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "saving the chart needs matplotlib, which is not installed "
            "(pip install matplotlib); the table and the JSON are unaffected"
        ) from exc

    present = [v for values in series.values() for v in values if v is not None and v > 0]
    n_series = max(1, len(series))
    width = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) + 2.0), 4.5))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (n_series - 1) / 2) * width for i in range(len(labels))]
        heights = [float("nan") if v is None else v for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=[format_ms(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    if present and max(present) / min(present) > 20:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
