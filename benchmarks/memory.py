"""Training memory of one ``PKS4Block`` against divided space-time attention and adapters.

Usage::

    python benchmarks/memory.py                 # 14x14 map, width 384, batch 1, 12 layers
    python benchmarks/memory.py --dim 768       # ViT-B/16 width (about 8 minutes on 2 cores)
    python benchmarks/memory.py --frames-list 8,16,32,64,128 --no-peak
    python benchmarks/memory.py --device cuda

The promise of the method is memory: a video model is one frozen image backbone, run per frame
without autograd, plus one temporal block that trains. This script measures what training
keeps in memory, for ``T`` in ``--frames-list`` frames of a ``--size`` feature map of width
``--dim`` (``--batch`` clips), for three ways of adding temporal modelling (five rows):

``pks4``
    ``PKS4Block(dim, d_state=--state)`` on the ``(B, T, dim, H, W)`` map. The backbone that
    made the map runs under ``torch.no_grad`` (it is frozen and nothing below the block
    trains), so the block is all that autograd records.
``pks4_ckpt``
    the same block, built the same way, with gradient checkpointing on
    (``block.set_grad_checkpointing(True)``): the forward keeps the block's input and only
    what the block computes outside its checkpointed region, and the backward recomputes the
    rest. ``torch.utils.checkpoint`` (``use_reentrant=False``) does this with its own
    ``saved_tensors_hooks``, nested inside the counting ones: what the checkpointed region
    saves goes to the checkpoint's hooks (which store a placeholder and drop the tensor), not
    to the counter, while the input that the checkpoint stores for the recomputation is saved
    through the counting hooks. So ``saved`` is the input (its storage, once, however many
    times it is saved), plus any tensor saved outside the checkpointed region: what stays
    alive between the forward and the backward. The activations the backward recomputes live
    only during the backward, a segment at a time; they are not in ``saved`` (nothing is
    counted twice) but they are in ``peak``, which runs the backward.
``st_attention``
    a divided space-time attention block of the same width on the same map, TimeSformer style:
    a transformer layer whose attention runs over the ``T`` frames at each location, then one
    whose attention runs over the ``H*W`` locations within each frame. Each layer is pre-norm
    attention plus a pre-norm MLP (ratio ``--mlp-ratio``), with residuals; attention is
    ``F.scaled_dot_product_attention`` with ``--heads`` heads (default ``dim // 64``). Like
    the PKS4 block it trains after a frozen backbone run without autograd.
``st_attention_bare``
    the same divided space-time attention without its MLPs: temporal attention over the ``T``
    frames at each location, then spatial attention over the ``H*W`` locations of each frame,
    each pre-norm (LayerNorm), with the same heads, qkv and output projections, and a
    residual. The least a space-time attention block of this width keeps.
``adapters``
    the parameter-efficient practice this method replaces (ST-Adapter, AIM): a frozen ViT of
    ``--layers`` layers of width ``dim`` (the layer above: spatial attention over the ``H*W``
    tokens of each frame, then an MLP; no class token) with a trainable bottleneck adapter
    before every layer, ``x + up(dwconv_t(down(x)))``: a linear map to ``dim *
    --adapter-ratio`` channels, a depthwise convolution over time (kernel
    ``--adapter-kernel``, the temporal modelling), a linear map back. Only the adapters train,
    but the gradient of the first adapter has to pass through every frozen layer above it, so
    autograd must keep the activations each frozen layer needs for its input gradient (layer
    norm inputs, attention inputs and outputs, MLP hidden activations), in every layer. This
    row measures exactly that: the input is the patch-embedded frames ``(B*T, H*W, dim)``
    (the frozen patch embedding below the first adapter needs no gradient), and what is
    counted is everything the backbone and its adapters keep for the backward.

What is measured, per method and ``T``:

* ``saved``: the exact bytes autograd keeps between the forward and the backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` during the forward of a training step, every
  storage once however many views of it are saved; the parameters (trainable or frozen) are
  not counted, they are there whether or not a backward follows. Deterministic: it depends on
  the shapes and the code, not on the machine's load. ``bytes/token`` divides it by
  ``B * T * H * W``, the tokens (frame, location) of the clip.
* ``peak``: how far memory rose during one forward+backward (gradients of all trainable
  parameters included), above the memory in use with the model and the input built. On CUDA
  ``torch.cuda.max_memory_allocated`` after a reset. On CPU, where allocations keep no such
  statistic, each (method, T) runs once in a fresh process of this script, which reports the
  growth of its resident set's high-water mark (``VmHWM``, reset first through
  ``/proc/self/clear_refs``), after one tiny step that pays the lazy initialisation. For
  ``pks4`` and ``st_attention`` the no_grad forward of the frozen backbone before them is not
  part of the step: its activations are freed layer by layer and it is the same for both (the
  ``adapters`` row is the backbone, so its step includes the backbone's forward).
  ``--no-peak`` skips it.
* ``/pks4``: this row's number divided by that of ``pks4`` (without checkpointing) at the
  same ``T``, measured in the same run.

Which attention kernel ``F.scaled_dot_product_attention`` picks decides whether attention
keeps ``O(S)`` or ``O(S^2)`` memory for a sequence of length ``S``: the flash and
memory-efficient kernels (chosen on CPU and on recent GPUs for float inputs without a mask)
keep the output and a log-sum-exp per query, the math kernel the whole attention matrix.
``--sdpa math`` forces the latter (what an implementation without a fused kernel pays). The
JSON records which backward node each run's attention had.

Results go to ``--json`` and ``--plot`` (memory against ``T``, log scales); without either, to
``benchmarks/results/memory.json`` and ``.png``. Progress goes to stderr, the table to stdout.

The default width is 384 (ViT-S/16; ``--heads`` 6), with a 14x14 map, batch 1, 12 adapted
layers and ``T`` in 8, 16, 32, 64: about 2 minutes on 2 CPU cores, most of it the adapters row
(a 12-layer ViT forward and backward on up to 64 frames) and the start of one process per
peak (timings measured before the ``pks4_ckpt`` and ``st_attention_bare`` rows were added).
``--dim 768`` (ViT-B/16) took 8.4 minutes on 2 busy cores and keeps 5.0 GiB for the
backward of the adapters row at ``T = 64`` (PKS4: 592 MiB); ``--no-peak`` runs in this
process and skips the backward, which the count does not need.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from pks4_layers import PKS4Block
from pks4_layers.bench.timing import (
    Column,
    Table,
    arg_positive,
    arg_size,
    cuda_peak_growth_bytes,
    environment_info,
    format_bytes,
    format_ratio,
    progress,
    rss_growth_bytes,
    run_json_subprocess,
    saved_tensor_bytes,
    short_reason,
    write_json,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("pks4", "pks4_ckpt", "st_attention", "st_attention_bare", "adapters")
REFERENCE = "pks4"


# ---------------------------------------------------------------------------------------------
# the compared modules


class Attention(nn.Module):
    """Multi-head self-attention over the sequence axis with ``F.scaled_dot_product_attention``.

    Shapes: ``(N, S, C)`` -> ``(N, S, C)``: ``N`` independent sequences of length ``S``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: expected a divisor of dim={dim}, got {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "n s (k h d) -> k n h s d", k=3, h=self.heads).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "n h s d -> n s (h d)"))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    ``mlp_ratio=0`` leaves the MLP (and its norm) out: the layer is ``x + attn(norm(x))``.

    Shapes: ``(N, S, C)`` -> ``(N, S, C)``, attention along ``S``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio: expected 0 (no MLP) or more, got {mlp_ratio}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2: Optional[nn.LayerNorm] = None
        self.mlp: Optional[nn.Sequential] = None
        if mlp_ratio > 0:
            hidden = max(1, int(dim * mlp_ratio))
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        if self.mlp is None or self.norm2 is None:
            return x
        return x + self.mlp(self.norm2(x))


class DividedSpaceTimeBlock(nn.Module):
    """TimeSformer-style divided attention: a layer attending over time at every location,
    then a layer attending over space within every frame. ``mlp_ratio=0``: attention only.

    Shapes: ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)``, like :class:`~pks4_layers.PKS4Block`.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.temporal = TransformerLayer(dim, heads, mlp_ratio)
        self.spatial = TransformerLayer(dim, heads, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _, h, w = x.shape
        x = self.temporal(rearrange(x, "b t c h w -> (b h w) t c"))
        x = rearrange(x, "(b l) t c -> (b t) l c", b=b)
        x = self.spatial(x)
        return rearrange(x, "(b t) (h w) c -> b t c h w", t=t, h=h, w=w)


class TemporalAdapter(nn.Module):
    """ST-Adapter-style bottleneck: ``x + up(dwconv_t(down(x)))``.

    The depthwise convolution runs over the frames of each clip at every token (zero padding,
    same length), which is where the adapter models time.

    Shapes: ``(B*T, L, C)`` with ``frames=T`` -> ``(B*T, L, C)``.
    """

    def __init__(self, dim: int, ratio: float, kernel: int) -> None:
        super().__init__()
        inner = max(1, int(dim * ratio))
        self.down = nn.Linear(dim, inner)
        self.conv = nn.Conv1d(inner, inner, kernel, padding=kernel // 2, groups=inner)
        self.up = nn.Linear(inner, dim)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        length = x.shape[1]
        h = rearrange(self.down(x), "(b t) l r -> (b l) r t", t=frames)
        h = self.conv(h)[..., :frames]  # an even kernel pads one step too many
        h = rearrange(h, "(b l) r t -> (b t) l r", l=length)
        return x + self.up(h)


class AdaptedBackbone(nn.Module):
    """A frozen ViT of ``layers`` :class:`TransformerLayer` s with a trainable
    :class:`TemporalAdapter` before each.

    Shapes: patch tokens ``(B*T, L, C)`` with ``frames=T`` -> ``(B*T, L, C)``.
    """

    def __init__(
        self, dim: int, layers: int, heads: int, mlp_ratio: float, ratio: float, kernel: int
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, mlp_ratio) for _ in range(layers))
        self.adapters = nn.ModuleList(TemporalAdapter(dim, ratio, kernel) for _ in range(layers))
        self.layers.requires_grad_(False)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        for adapter, layer in zip(self.adapters, self.layers):
            x = layer(adapter(x, frames))
        return x


# ---------------------------------------------------------------------------------------------
# configuration


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers such as 8,16,32, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 8,16, got {text!r}")
    return sorted(set(values))


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {list(METHODS)}, got {text!r}"
        )
    return [m for m in METHODS if m in names]  # table order


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Memory a training step keeps for its backward, and its peak: one PKS4Block "
        "against divided space-time attention and adapters in every backbone layer.",
    )
    p.add_argument("--dim", type=arg_positive, default=384, help="width C (default 384)")
    p.add_argument(
        "--size", type=arg_size, default=(14, 14), help="feature map HxW (default 14x14)"
    )
    p.add_argument("--batch", type=arg_positive, default=1, help="clips per batch (default 1)")
    p.add_argument(
        "--frames-list",
        type=_int_list,
        default=[8, 16, 32, 64],
        help="T values (default 8,16,32,64)",
    )
    p.add_argument(
        "--layers", type=arg_positive, default=12, help="backbone layers with adapters (default 12)"
    )
    p.add_argument(
        "--methods", type=_methods, default=list(METHODS), help=f"default: all of {METHODS}"
    )
    p.add_argument("--state", type=arg_positive, default=16, help="PKS4 state size N (default 16)")
    p.add_argument(
        "--backend", default="auto", help="PKS4 scan backend (default auto: the compiled kernel)"
    )
    p.add_argument("--heads", type=arg_positive, default=None, help="attention heads (dim // 64)")
    p.add_argument("--mlp-ratio", type=_positive_float, default=4.0, help="MLP width (default 4)")
    p.add_argument(
        "--adapter-ratio", type=_positive_float, default=0.25, help="adapter width (default 0.25)"
    )
    p.add_argument(
        "--adapter-kernel", type=arg_positive, default=3, help="adapter temporal kernel (default 3)"
    )
    p.add_argument(
        "--sdpa",
        choices=("default", "math"),
        default="default",
        help="attention kernel: what torch picks (default) or the math kernel",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--json", type=Path, default=None, help="write all rows and the config here")
    p.add_argument("--plot", type=Path, default=None, help="save a PNG chart here")
    p.add_argument("--no-peak", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--seed", type=int, default=0)
    # Internal: measure "METHOD:T" in this fresh process and print it as JSON (see the module
    # docstring).
    p.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.heads is None:
        args.heads = max(1, args.dim // 64)
    if args.dim % args.heads:
        p.error(f"--heads: expected a divisor of --dim={args.dim}, got {args.heads}")
    return args


def _config_argv(args: argparse.Namespace) -> list[str]:
    """The flags that rebuild the same modules and inputs in a subprocess."""
    h, w = args.size
    return [
        f"--dim={args.dim}",
        f"--size={h}x{w}",
        f"--batch={args.batch}",
        f"--layers={args.layers}",
        f"--state={args.state}",
        f"--backend={args.backend}",
        f"--heads={args.heads}",
        f"--mlp-ratio={args.mlp_ratio}",
        f"--adapter-ratio={args.adapter_ratio}",
        f"--adapter-kernel={args.adapter_kernel}",
        f"--sdpa={args.sdpa}",
        f"--device={args.device}",
        f"--seed={args.seed}",
    ]


# ---------------------------------------------------------------------------------------------
# workloads


@dataclass
class Workload:
    """One method at one ``T``: the forward of a training step and what it differentiates.

    ``x`` is the input (no gradient: it comes from a frozen part run without autograd),
    ``params`` every parameter of the module (frozen ones included, to exclude them from the
    count), ``trainable`` those the backward produces gradients for, ``grad_out`` the gradient
    fed to the output.
    """

    forward: Callable[[], Tensor]
    params: list[Tensor]
    trainable: list[Tensor]
    grad_out: Tensor


def pks4_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The constructor arguments of ``PKS4Block`` for the ``pks4`` rows: one place, so that
    ``pks4`` and ``pks4_ckpt`` always build the same block (the rest are its defaults)."""
    return {"dim": args.dim, "d_state": args.state, "backend": args.backend}


def make_module(args: argparse.Namespace, method: str) -> nn.Module:
    torch.manual_seed(args.seed)
    if method in ("pks4", "pks4_ckpt"):
        module = PKS4Block(**pks4_kwargs(args))
        # A fresh block is the identity (zero output projection); a trained one is not. The
        # memory is the same either way, the gradients reaching the scans are not zero.
        module.scan.out_proj.reset_parameters()
        if method == "pks4_ckpt":
            module.set_grad_checkpointing(True)
    elif method == "st_attention":
        module = DividedSpaceTimeBlock(args.dim, args.heads, args.mlp_ratio)
    elif method == "st_attention_bare":
        module = DividedSpaceTimeBlock(args.dim, args.heads, mlp_ratio=0)
    elif method == "adapters":
        module = AdaptedBackbone(
            args.dim,
            args.layers,
            args.heads,
            args.mlp_ratio,
            args.adapter_ratio,
            args.adapter_kernel,
        )
    else:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    return module.to(torch.device(args.device))


def make_workload(
    args: argparse.Namespace,
    method: str,
    frames: int,
    module: nn.Module,
    size: Optional[tuple[int, int]] = None,
) -> Workload:
    h, w = size or args.size
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed + frames)
    if method == "adapters":
        shape: tuple[int, ...] = (args.batch * frames, h * w, args.dim)
    else:
        shape = (args.batch, frames, args.dim, h, w)
    x = torch.randn(shape, generator=g).to(device)
    grad_out = torch.randn(shape, generator=g).to(device)

    def forward() -> Tensor:
        return module(x, frames) if method == "adapters" else module(x)

    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    return Workload(forward, params, trainable, grad_out)


@contextmanager
def _attention_kernel(args: argparse.Namespace) -> Iterator[None]:
    if args.sdpa == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield
    else:
        yield


def _attention_nodes(out: Tensor) -> list[str]:
    """Names of the attention backward nodes in the graph of ``out`` (which kernel ran)."""
    names: set[str] = set()
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Attention" in type(node).__name__ or "Softmax" in type(node).__name__:
            names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(names)


def training_step(
    args: argparse.Namespace, work: Workload, backward: bool = True
) -> dict[str, Any]:
    """One forward (counting what it saves) and, with ``backward``, the backward to the
    trainable parameters (not needed for the count: the graph is complete after the forward)."""
    with _attention_kernel(args):
        out, saved = saved_tensor_bytes(work.forward, work.params)
        kernels = _attention_nodes(out)
        if backward:
            torch.autograd.grad(out, work.trainable, work.grad_out)
    del out
    return {
        "saved_bytes": saved.beyond_inputs,
        "saved_tensors": saved.tensors,
        "attention_nodes": kernels,
    }


def measure_here(args: argparse.Namespace, method: str, frames: int) -> dict[str, Any]:
    """Saved bytes, and the peak on CUDA, measured in this process."""
    device = torch.device(args.device)
    module = make_module(args, method)
    work = make_workload(args, method, frames, module)
    if args.no_peak or device.type != "cuda":
        result = training_step(args, work, backward=False)
        result.update(peak_bytes=None, peak_method=None)
        return result
    training_step(args, make_workload(args, method, 2, module, size=(2, 2)))  # lazy init
    box: dict[str, Any] = {}
    peak = cuda_peak_growth_bytes(lambda: box.update(training_step(args, work)), device)
    box.update(
        peak_bytes=peak,
        peak_method="torch.cuda.max_memory_allocated after a reset, minus memory_allocated before",
    )
    return box


def child_main(args: argparse.Namespace) -> int:
    """``--_child METHOD:T``: saved bytes and the CPU peak of one step in this fresh process.

    Prints one JSON object on stdout for :func:`run_json_subprocess`.
    """
    import json

    method, _, frames_text = args.child.partition(":")
    frames = int(frames_text)
    module = make_module(args, method)
    work = make_workload(args, method, frames, module)
    # Lazy initialisation (thread pools, kernel tables, the compiled scan) is paid on a tiny
    # input first so that it is not counted as the measured step's memory.
    training_step(args, make_workload(args, method, 2, module, size=(2, 2)))
    box: dict[str, Any] = {}
    peak, method_text = rss_growth_bytes(lambda: box.update(training_step(args, work)))
    box.update(peak_bytes=peak, peak_method=f"{method_text}, in a fresh process")
    print(json.dumps(box), flush=True)
    return 0


def measure(args: argparse.Namespace, method: str, frames: int) -> dict[str, Any]:
    if torch.device(args.device).type == "cpu" and not args.no_peak:
        script = str(Path(__file__).resolve())
        return run_json_subprocess([script, *_config_argv(args), f"--_child={method}:{frames}"])
    return measure_here(args, method, frames)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Row:
    method: str
    frames: int
    tokens: int
    saved_bytes: Optional[int] = None
    saved_tensors: Optional[int] = None
    peak_bytes: Optional[int] = None
    peak_method: Optional[str] = None
    attention_nodes: Optional[list[str]] = None
    saved_ratio: Optional[float] = None
    peak_ratio: Optional[float] = None
    seconds: Optional[float] = None
    error: Optional[str] = None

    @property
    def bytes_per_token(self) -> Optional[float]:
        return None if self.saved_bytes is None else self.saved_bytes / self.tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "frames": self.frames,
            "tokens": self.tokens,
            "saved_bytes": self.saved_bytes,
            "saved_bytes_per_token": self.bytes_per_token,
            "saved_tensors": self.saved_tensors,
            "saved_ratio_vs_pks4": self.saved_ratio,
            "peak_bytes": self.peak_bytes,
            "peak_ratio_vs_pks4": self.peak_ratio,
            "peak_method": self.peak_method,
            "attention_nodes": self.attention_nodes,
            "seconds": self.seconds,
            "error": self.error,
        }


def run(args: argparse.Namespace) -> list[Row]:
    h, w = args.size
    jobs = [(t, m) for t in args.frames_list for m in args.methods]
    rows = []
    for k, (frames, method) in enumerate(jobs, 1):
        row = Row(method, frames, args.batch * frames * h * w)
        progress(f"[{k}/{len(jobs)}] {method} T={frames} ...")
        start = time.perf_counter()
        try:
            result = measure(args, method, frames)
        except Exception as exc:  # shown as the row's note: one failure must not end the run
            row.error = short_reason(exc)
        else:
            row.saved_bytes = result["saved_bytes"]
            row.saved_tensors = result["saved_tensors"]
            row.attention_nodes = result["attention_nodes"]
            row.peak_bytes = result["peak_bytes"]
            row.peak_method = result["peak_method"]
        row.seconds = time.perf_counter() - start
        if row.error:
            progress(f"[{k}/{len(jobs)}] {method} T={frames} failed: {row.error}")
        else:
            peak = "" if row.peak_bytes is None else f", peak {format_bytes(row.peak_bytes)}"
            progress(
                f"[{k}/{len(jobs)}] {method} T={frames}: saved "
                f"{format_bytes(row.saved_bytes)}{peak} ({row.seconds:.1f} s)"
            )
        rows.append(row)
    _fill_ratios(rows)
    return rows


def _fill_ratios(rows: list[Row]) -> None:
    """Each row over the ``pks4`` row of the same ``T``, measured in the same run."""
    ref = {r.frames: r for r in rows if r.method == REFERENCE and not r.error}
    for row in rows:
        base = ref.get(row.frames)
        if base is None:
            continue
        if row.saved_bytes is not None and base.saved_bytes:
            row.saved_ratio = row.saved_bytes / base.saved_bytes
        if row.peak_bytes is not None and base.peak_bytes:
            row.peak_ratio = row.peak_bytes / base.peak_bytes


def growth(rows: list[Row], method: str) -> Optional[tuple[int, int, float]]:
    """``(T_min, T_max, saved(T_max) / saved(T_min))`` of ``method``, or ``None``."""
    measured = sorted(
        (r.frames, r.saved_bytes) for r in rows if r.method == method and r.saved_bytes
    )
    if len(measured) < 2:
        return None
    (t0, s0), (t1, s1) = measured[0], measured[-1]
    return t0, t1, s1 / s0


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render_table(rows: list[Row]) -> str:
    table = Table(
        [
            Column("T"),
            Column("method", right=False),
            Column("saved MiB"),
            Column("bytes/token"),
            Column("saved/pks4"),
            Column("peak MiB"),
            Column("peak/pks4"),
            Column("note", right=False),
        ]
    )
    notes = []
    for r in rows:
        note = ""
        if r.error:
            notes.append(f"[{len(notes) + 1}] {r.method} T={r.frames}: {r.error}")
            note = f"failed [{len(notes)}]"
        table.add(
            [
                str(r.frames),
                r.method,
                _mib(r.saved_bytes),
                "-" if r.bytes_per_token is None else f"{r.bytes_per_token:,.0f}",
                format_ratio(r.saved_ratio),
                _mib(r.peak_bytes),
                format_ratio(r.peak_ratio),
                note,
            ]
        )
    return "\n".join([table.render(), *notes])


def header_lines(args: argparse.Namespace, env: dict[str, Any], device: torch.device) -> list[str]:
    h, w = args.size
    busy = env.get("cpu_busy_before_run")
    other = f", CPUs {busy:.0%} busy with other work at start" if busy is not None else ""
    pks4_text = ", ".join(f"{k}={v!r}" for k, v in pks4_kwargs(args).items())
    lines = [
        f"training memory | {env['device_name']} ({device}) | torch {env['torch']} | "
        f"{env['threads']} threads{other}",
        f"shape: batch {args.batch}, {h}x{w} map, width {args.dim}, T in "
        f"{', '.join(map(str, args.frames_list))}, float32",
        f"pks4: PKS4Block({pks4_text}) after a frozen backbone run under no_grad",
        "pks4_ckpt: the same block with set_grad_checkpointing(True): saved is its input (and "
        "whatever it saves outside the checkpoint), the backward recomputes the rest",
        f"st_attention: divided space-time attention (time, then space), {args.heads} heads, "
        f"MLP x{args.mlp_ratio:g}, after the same frozen backbone",
        "st_attention_bare: the same attention layers without their MLPs (norm, attention, "
        "residual)",
        f"adapters: {args.layers}-layer frozen ViT of width {args.dim}, an adapter "
        f"(x{args.adapter_ratio:g} bottleneck, temporal dwconv {args.adapter_kernel}) before "
        "every layer",
        f"attention kernel: {args.sdpa}",
        "saved: bytes autograd keeps for the backward (unique storages, parameters excluded); "
        "bytes/token: over B*T*H*W",
    ]
    if args.no_peak:
        lines.append("peak: not measured (--no-peak)")
    elif device.type == "cuda":
        lines.append("peak: torch.cuda.max_memory_allocated in one fwd+bwd, above model + input")
    else:
        lines.append(
            "peak: resident-set high-water mark of one fwd+bwd in a fresh process, above its "
            "RSS with model + input built"
        )
    lines.append("x/pks4: this row / the pks4 row of the same T, same run")
    return lines


def save_plot(path: Path, rows: list[Row], title: str) -> None:
    """Memory against ``T`` on log-log axes: saved bytes solid, peak dashed, one colour each."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "saving the chart needs matplotlib, which is not installed "
            "(pip install matplotlib); the table and the JSON are unaffected"
        ) from exc

    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    methods = [m for m in METHODS if any(r.method == m for r in rows)]
    for k, method in enumerate(methods):
        colour = f"C{k}"
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.frames)
        for attr, style, what in (("saved_bytes", "-o", "saved"), ("peak_bytes", "--s", "peak")):
            points = [(r.frames, getattr(r, attr) / 2**20) for r in mine if getattr(r, attr)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=colour, label=f"{method} ({what})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    frames = sorted({r.frames for r in rows})
    ax.set_xticks(frames)
    ax.set_xticklabels([str(t) for t in frames])
    ax.set_xlabel("frames T")
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_outputs(
    args: argparse.Namespace,
    rows: list[Row],
    env: dict[str, Any],
    device: torch.device,
    header: list[str],
) -> None:
    json_path, plot_path = args.json, args.plot
    if json_path is None and plot_path is None:
        json_path = RESULTS_DIR / "memory.json"
        plot_path = RESULTS_DIR / "memory.png"
    h, w = args.size
    if json_path is not None:
        config = {
            "dim": args.dim,
            "height": h,
            "width": w,
            "batch": args.batch,
            "frames_list": args.frames_list,
            "layers": args.layers,
            "methods": args.methods,
            "state": args.state,
            "backend": args.backend,
            "heads": args.heads,
            "mlp_ratio": args.mlp_ratio,
            "adapter_ratio": args.adapter_ratio,
            "adapter_kernel": args.adapter_kernel,
            "sdpa": args.sdpa,
            "device": str(device),
            "peak": not args.no_peak,
            "seed": args.seed,
            "dtype": "float32",
        }
        payload = {
            "benchmark": "memory",
            "config": config,
            "environment": env,
            "header": header,
            "growth": {
                m: dict(zip(("frames_min", "frames_max", "saved_ratio"), g))
                for m in args.methods
                if (g := growth(rows, m)) is not None
            },
            "rows": [r.to_json() for r in rows],
        }
        write_json(json_path, payload)
        print(f"results: {json_path}")
    if plot_path is not None:
        title = (
            f"{env['device_name']} ({device}), torch {env['torch']}: batch {args.batch}, "
            f"{h}x{w}, width {args.dim}, {args.layers} adapted layers"
        )
        try:
            save_plot(plot_path, rows, title)
        except ImportError as exc:
            print(f"chart not saved: {exc}", file=sys.stderr)
        else:
            print(f"chart: {plot_path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here", file=sys.stderr)
        return 2
    env = environment_info(device)
    rows = run(args)
    header = header_lines(args, env, device)
    print("\n".join(header))
    print()
    print(render_table(rows))
    print()
    for method in args.methods:
        g = growth(rows, method)
        if g is not None:
            t0, t1, ratio = g
            print(
                f"growth {method}: saved(T={t1}) / saved(T={t0}) = {ratio:.2f} "
                f"(linear in T: {t1 / t0:.2f})"
            )
    print()
    save_outputs(args, rows, env, device, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
