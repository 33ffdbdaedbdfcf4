"""What a training job relies on: serialisation, copies, devices and dtypes, determinism,
``torch.compile`` and ``torch.export``.

Determinism. With ``torch.use_deterministic_algorithms(True)`` and a fixed seed, two runs give
bitwise-identical outputs and gradients on CPU, for a ``PKS4Block`` on the compiled ``cpu``
scan and on the ``torch`` scan, and for a ``PKS4VideoClassifier`` (checked below). The compiled
CPU backward leaves the gradients of ``A``, ``D`` and ``delta_bias`` per row and sums them in a
fixed order, so the scan's result does not even depend on the number of threads (also checked).
On CUDA the scan's backward kernel uses no atomics (one partial sum of ``dB_t`` / ``dC_t`` per
warp, reduced in a fixed order: ``csrc/motion_scan/motion_scan_bwd.cu``), so the scan is
deterministic too. The block's temporal convolution runs through causal-conv1d's
``causal_conv1d_fn`` on CUDA when that package is installed; its backward kernel adds the
per-sequence partial gradients of the convolution's weight and bias with ``atomicAdd``, in an
order that can change from run to run, and ``torch.use_deterministic_algorithms`` does not see
inside it. So under ``torch.use_deterministic_algorithms(True)`` the block does not call it: the
convolution runs through ``F.conv1d``, which the deterministic mode covers
(``pks4_layers/layers/temporal_conv.py``).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

from pks4_layers import PKS4Block
from pks4_layers.export import (
    SCAN_BACKENDS,
    export_program,
    scan_backend,
    scan_modules,
    set_scan_backend,
)
from pks4_layers.models import FrameBackbone, PKS4VideoClassifier
from pks4_layers.ops import available_backends, motion_scan

HAS_CPU_KERNEL = "cpu" in available_backends()
needs_cpu_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL, reason="the compiled cpu scan is unavailable here"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_TORCH = torch.torch_version.TorchVersion(torch.__version__)

DIM, T, GRID = 16, 5, (4, 3)
CLASSES, FRAMES, SIZE = 5, 4, 32
BLOCK_KWARGS = {"d_state": 4, "prior_dim": 8, "corr_dim": 8, "diff_dim": 8}


def make_block(seed: int = 0, backend: str = "auto") -> PKS4Block:
    """A small block whose output depends on its scans (a fresh block is the identity)."""
    torch.manual_seed(seed)
    block = PKS4Block(DIM, backend=backend, **BLOCK_KWARGS)
    block.scan.out_proj.reset_parameters()
    return block


def block_input(seed: int = 1, batch: int = 2, frames: int = T) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, DIM, *GRID, generator=g)


def make_classifier(seed: int = 0, backend: str = "auto") -> PKS4VideoClassifier:
    """A classifier on a tiny conv backbone (16 channels on a 4x4 map at 32x32 frames)."""
    torch.manual_seed(seed)
    backbone = FrameBackbone(
        nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.BatchNorm2d(16), nn.GELU()), 16
    )
    model = PKS4VideoClassifier(
        backbone, CLASSES, FRAMES, block_kwargs={**BLOCK_KWARGS, "backend": backend}
    )
    model.temporal.scan.out_proj.reset_parameters()
    return model


def clip_input(seed: int = 2, batch: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=g)


def _outputs_and_grads(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(out.shape, generator=g).to(out.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    return out.detach(), list(grads)


def _assert_bitwise_equal(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x, y), f"tensor {i} differs: max |diff| {(x - y).abs().max().item()}"


def _scan_backends(model: nn.Module) -> list[str]:
    return [m.backend for m in scan_modules(model)]


MODELS: dict[str, tuple[Callable[..., nn.Module], Callable[..., Tensor]]] = {
    "block": (make_block, block_input),
    "classifier": (make_classifier, clip_input),
}


# --- state_dict, whole-model pickling, deepcopy ---------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_state_dict_round_trip(kind: str, tmp_path) -> None:
    make, inputs = MODELS[kind]
    model, fresh = make(seed=0).eval(), make(seed=7).eval()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        assert not torch.equal(fresh(x), expected)  # the load below has something to do
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("kind", list(MODELS))
def test_whole_model_pickle(kind: str, tmp_path) -> None:
    make, inputs = MODELS[kind]
    model = make(seed=0, backend="torch")
    model.train()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    # Unpickling a whole model runs code: weights_only=False, for one's own files only.
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is type(model)
    assert loaded.training
    assert _scan_backends(loaded) == ["torch"] * len(_scan_backends(model))
    x = inputs()
    out, grads = _outputs_and_grads(model, x)
    out2, grads2 = _outputs_and_grads(loaded, x)
    _assert_bitwise_equal([out, *grads], [out2, *grads2])


@pytest.mark.parametrize("kind", list(MODELS))
def test_deepcopy(kind: str) -> None:
    make, inputs = MODELS[kind]
    model = make(seed=0)
    clone = copy.deepcopy(model)
    x = inputs()
    out, grads = _outputs_and_grads(model, x)
    out2, grads2 = _outputs_and_grads(clone, x)
    _assert_bitwise_equal([out, *grads], [out2, *grads2])
    # Independent parameters: changing the copy leaves the original alone.
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    out3, _ = _outputs_and_grads(model, x)
    assert torch.equal(out3, out)


# --- .to(): dtypes and devices ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float64, 1e-5), (torch.bfloat16, 0.06)], ids=["float64", "bfloat16"]
)
def test_to_dtype(backend: str, dtype: torch.dtype, atol: float) -> None:
    block = make_block(backend=backend).eval()
    x = block_input()
    with torch.no_grad():
        expected = block(x)
    moved = block.to(dtype)
    assert moved is block
    assert all(p.dtype == dtype for p in block.parameters())
    out, grads = _outputs_and_grads(block, x.to(dtype))
    assert out.dtype == dtype
    assert all(g.dtype == dtype for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.double(), expected.double(), atol=atol, rtol=0)


def test_classifier_to_float64_and_back() -> None:
    model = make_classifier().eval()
    x = clip_input()
    with torch.no_grad():
        expected = model(x)
        out64 = model.to(torch.float64)(x.double())
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), expected, atol=1e-5, rtol=1e-5)
        back = model.to(torch.float32)(x)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", list(MODELS))
def test_to_cuda_and_back(kind: str) -> None:
    make, inputs = MODELS[kind]
    model = make().eval()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        on_gpu = model.to("cuda")(x.cuda())
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), expected, atol=1e-4, rtol=1e-4)
        back = model.to("cpu")(x)
    torch.testing.assert_close(back, expected, atol=1e-5, rtol=1e-5)


# --- determinism ---------------------------------------------------------------------------------


@pytest.fixture
def deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _seeded_run(kind: str, backend: str, seed: int) -> list[Tensor]:
    """Everything from the seed: weights, input (drawn from the global generator too), step."""
    make, _ = MODELS[kind]
    model = make(seed=seed, backend=backend)
    model.train()
    if kind == "block":
        x = torch.randn(2, T, DIM, *GRID)
    else:
        x = torch.randn(2, FRAMES, 3, SIZE, SIZE)
    out, grads = _outputs_and_grads(model, x)
    return [out, *grads]


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize(
    ("kind", "backend"),
    [
        pytest.param("block", "cpu", marks=needs_cpu_kernel),
        ("block", "torch"),
        pytest.param("classifier", "cpu", marks=needs_cpu_kernel),
        ("classifier", "torch"),
    ],
)
def test_bitwise_deterministic(kind: str, backend: str) -> None:
    first = _seeded_run(kind, backend, seed=0)
    second = _seeded_run(kind, backend, seed=0)
    _assert_bitwise_equal(first, second)
    # The seed decides the result: another seed gives another one.
    assert not torch.equal(_seeded_run(kind, backend, seed=1)[0], first[0])


@needs_cpu_kernel
@pytest.mark.usefixtures("deterministic")
def test_compiled_scan_does_not_depend_on_thread_count() -> None:
    g = torch.Generator().manual_seed(0)
    batch, frames, locations, d, n = 3, 24, 7, 16, 4
    act = (batch, frames, locations, d)
    inputs = {
        "u": torch.randn(act, generator=g),
        "delta": torch.randn(act, generator=g) * 0.5,
        "A": -torch.rand(d, n, generator=g) - 0.5,
        "B": torch.randn(batch, frames, locations, n, generator=g),
        "C": torch.randn(batch, frames, locations, n, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(act, generator=g),
        "delta_bias": torch.randn(d, generator=g) * 0.1,
    }
    grad_y = torch.randn(act, generator=g)

    def run() -> list[Tensor]:
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y = motion_scan(**leaves, backend="cpu")
        return [y.detach(), *torch.autograd.grad(y, list(leaves.values()), grad_y)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        multi = run()
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(single, multi)


# --- torch.compile -------------------------------------------------------------------------------


def _compile_backend() -> str:
    """Inductor where a C++ compiler is found (it generates and builds C++ on CPU)."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:
        return "aot_eager"
    return "inductor"


def _train_losses(model: nn.Module, clips: Tensor, labels: Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(clips), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@needs_cpu_kernel
def test_torch_compile_trains_like_eager() -> None:
    eager = make_classifier(seed=0, backend="auto").train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=_compile_backend())
    clips = clip_input(batch=4)
    labels = torch.tensor([0, 1, 2, 3])
    expected = _train_losses(eager, clips, labels, steps=4)
    got = _train_losses(compiled, clips, labels, steps=4)
    assert expected[-1] < expected[0]  # the steps train: the comparison is not of constants
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


# --- scan backend switching ----------------------------------------------------------------------


def test_set_scan_backend_sets_every_scan() -> None:
    model = make_classifier(backend="auto")
    scans = scan_modules(model)
    assert len(scans) == 2  # forward and reverse
    assert set_scan_backend(model, "torch") is model
    assert _scan_backends(model) == ["torch", "torch"]
    assert set_scan_backend(model, "auto") is model
    assert _scan_backends(model) == ["auto", "auto"]
    assert SCAN_BACKENDS[0] == "auto" and "torch" in SCAN_BACKENDS
    # A model without scans is returned unchanged.
    plain = nn.Linear(2, 2)
    assert set_scan_backend(plain, "torch") is plain


def test_set_scan_backend_rejects_bad_arguments() -> None:
    model = make_block()
    with pytest.raises(ValueError, match="backend: expected one of"):
        set_scan_backend(model, "triton")
    with pytest.raises(ValueError, match="backend"):
        set_scan_backend(model, None)  # type: ignore[arg-type]
    assert _scan_backends(model) == ["auto", "auto"]  # nothing changed
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module"):
        set_scan_backend("model", "torch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        with scan_backend(model, "fast"):
            pass


def test_scan_backend_restores_each_scan() -> None:
    model = make_block()
    model.scan.directions[1].backend = "ref"
    with scan_backend(model, "torch") as inside:
        assert inside is model
        assert _scan_backends(model) == ["torch", "torch"]
    assert _scan_backends(model) == ["auto", "ref"]
    with pytest.raises(RuntimeError, match="boom"):
        with scan_backend(model, "torch"):
            raise RuntimeError("boom")
    assert _scan_backends(model) == ["auto", "ref"]


def test_scan_backend_changes_what_runs() -> None:
    """Under ``scan_backend(model, "ref")`` the scan's autograd graph is the reference loop's."""
    block = make_block()
    x = block_input()
    with scan_backend(block, "ref"):
        ref_out = block(x)
    out = block(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)

    def node_names(t: Tensor) -> set[str]:
        names, stack, seen = set(), [t.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            names.add(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
        return names

    x = x.requires_grad_(True)
    with scan_backend(block, "ref"):
        ref_nodes = node_names(block(x))
    with scan_backend(block, "torch"):
        torch_nodes = node_names(block(x))
    assert ref_nodes != torch_nodes


# --- torch.export --------------------------------------------------------------------------------


def _pks4_ops(program: torch.export.ExportedProgram) -> list[str]:
    return [
        str(n.target)
        for n in program.graph.nodes
        if n.op == "call_function" and "pks4" in str(n.target)
    ]


@pytest.mark.parametrize("kind", list(MODELS))
def test_export_program_on_torch_backend_matches_eager(kind: str) -> None:
    make, inputs = MODELS[kind]
    model = make().eval()
    x = inputs()
    program = export_program(model, x)
    assert _pks4_ops(program) == []  # ATen operators only: runs without the extension
    assert _scan_backends(model) == ["auto", "auto"]  # restored
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)
    # Round trip through the serialised format.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    (2, 6) <= _TORCH < (2, 8),
    reason=f"torch {torch.__version__}: torch.export of an autograd.Function (the torch "
    "backend) with a dynamic batch fails in torch 2.6 and 2.7 (Dynamo: source of the batch "
    "symbol is None when lifting it to the top level); the compiled op exports with one",
)
def test_export_torch_backend_with_dynamic_batch() -> None:
    block = make_block().eval()
    program = export_program(block, block_input(batch=2), dynamic_shapes={"x": {0: Dim("b")}})
    x = block_input(seed=5, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), block(x), atol=1e-5, rtol=1e-5)


@needs_cpu_kernel
def test_export_traces_the_compiled_op_directly() -> None:
    """``torch.export`` goes through ``pks4::motion_scan_fwd`` itself (it has a fake kernel):
    the graph keeps the op, and batch and T can both be dynamic."""
    block = make_block(backend="auto").eval()
    dims = {"x": {0: Dim("b", max=64), 1: Dim("t", min=3, max=256)}}
    program = torch.export.export(block, (block_input(),), dynamic_shapes=dims)
    assert _pks4_ops(program) == ["pks4.motion_scan_fwd.default"] * 2
    for batch, frames in ((2, T), (3, 9), (1, 3)):
        x = block_input(seed=batch + frames, batch=batch, frames=frames)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), block(x), atol=1e-6, rtol=1e-6)
    # The same through export_program with backend="auto".
    program = export_program(make_classifier(backend="torch").eval(), clip_input(), backend="auto")
    assert _pks4_ops(program) == ["pks4.motion_scan_fwd.default"] * 2


def test_export_of_a_training_model_matches_eager() -> None:
    model = make_classifier().train()
    x = clip_input()
    program = export_program(model, x)
    reference = copy.deepcopy(model)  # BatchNorm statistics move with every training forward
    torch.testing.assert_close(program.module()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_export_to_onnx(tmp_path) -> None:
    onnx = pytest.importorskip(
        "onnx", reason="the onnx package is not installed: ONNX export is not checked"
    )
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript")
    block = make_block().eval()
    x = block_input()
    path = tmp_path / "block.onnx"
    with scan_backend(block, "torch"):
        torch.onnx.export(block, (x,), str(path), dynamo=True)
    onnx.checker.check_model(onnx.load(str(path)))
    try:
        import onnxruntime
    except ImportError:
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), block(x), atol=1e-4, rtol=1e-4)
