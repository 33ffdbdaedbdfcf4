"""``python -m pks4_layers.info``: versions, and which scan backends run here (and why not).

Loading the compiled backends may compile them on first use (about a minute).
"""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__
from .ops import build
from .ops.motion_scan import KNOWN_BACKENDS, backend_status, resolve_backend


def report() -> str:
    lines = [
        f"pks4-layers {__version__}",
        f"python      {sys.version.split()[0]} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"{torch.get_num_threads()} CPU threads)",
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"devices     {names}")
    else:
        lines.append("devices     no CUDA device visible to torch")
    lines.append(f"CUDA home   {build.find_cuda_home() or 'not found'}")
    src = build.csrc_dir()
    lines.append(f"sources     {src if src else 'not shipped with this install'}")
    lines.append(f"JIT cache   {build.cache_root()}")
    lines.append("")
    lines.append("backends:")
    for name in KNOWN_BACKENDS:
        usable, reason = backend_status(name)
        origin = ""
        if usable and name in ("cpu", "cuda"):
            origin = f" ({build.load(name).origin})"
        lines.append(f"  {name:<6} {'available' + origin if usable else 'unavailable: ' + reason}")
    lines.append("")
    auto = resolve_backend("auto", torch.device("cpu"), torch.float32)
    lines.append(f"auto on CPU float32:  {auto}")
    if torch.cuda.is_available():
        auto = resolve_backend("auto", torch.device("cuda"), torch.float32)
        lines.append(f"auto on CUDA float32: {auto}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
