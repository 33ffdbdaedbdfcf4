"""Untrusted files run no code: every ``torch.load`` in the library uses ``weights_only=True``
(a source scan keeps it so), a checkpoint or YAML config whose loading would create a marker
file is refused and the marker never appears, and resuming into a model the checkpoint does not
fit is a readable error naming the keys and shapes."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from pks4_layers.train.checkpoint import check_model_state, load_checkpoint, save_checkpoint

SRC = Path(__file__).resolve().parent.parent / "src" / "pks4_layers"


# ------------------------------------------------------------------------------ source scan
# Calls that run code from the file they read, whatever the arguments.
_FORBIDDEN = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "marshal.load",
    "marshal.loads",
    "dill.load",
    "dill.loads",
    "shelve.open",
    "yaml.load",  # yaml.safe_load only
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "yaml.unsafe_load_all",
    "yaml.full_load_all",
    "torch.jit.load",
}
# Calls that are safe only with these keyword arguments.
_NEEDS = {
    "torch.load": ("weights_only", True),
    "torch.serialization.load": ("weights_only", True),
    "numpy.load": ("allow_pickle", False),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: call`` for each call above made without its safe argument.

    Import aliases are followed (``import torch as t``, ``from torch import load``), so that
    renaming the module does not hide a call.
    """
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                # "import a.b" binds "a"; "import a.b as c" binds "c" to "a.b".
                top = a.name.split(".")[0]
                aliases[a.asname or top] = a.name if a.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        name = ".".join(p for p in (aliases.get(head, head), rest) if p)
        where = f"{filename}:{node.lineno}: {name}"
        if name in _FORBIDDEN:
            found.append(where)
        elif name in _NEEDS:
            key, safe = _NEEDS[name]
            given = [k.value for k in node.keywords if k.arg == key]
            if not (len(given) == 1 and isinstance(given[0], ast.Constant)):
                found.append(f"{where} without {key}={safe}")
            elif given[0].value is not safe:
                found.append(f"{where} with {key}={given[0].value}")
    return found


def test_the_source_scan_flags_unsafe_loads():
    """The scan itself: it must see the calls it exists to catch."""
    bad = """
import pickle, yaml
import numpy as np
import torch as t
from torch import load
t.load(p)
t.load(p, weights_only=False)
load(p, map_location="cpu")
torch_state = t.serialization.load(p, weights_only=flag)
pickle.loads(b)
yaml.load(text, Loader=yaml.FullLoader)
np.load(p, allow_pickle=True)
"""
    assert [line.split(": ", 1)[1] for line in unsafe_loads(bad)] == [
        "torch.load without weights_only=True",
        "torch.load with weights_only=False",
        "torch.load without weights_only=True",
        "torch.serialization.load without weights_only=True",
        "pickle.loads",
        "yaml.load",
        "numpy.load with allow_pickle=True",
    ]
    good = "import torch, yaml\ntorch.load(p, weights_only=True)\nyaml.safe_load(text)\n"
    assert unsafe_loads(good) == []


def test_every_load_in_the_library_is_safe():
    """Fails when a ``torch.load`` without ``weights_only=True`` (or any pickle-based load)
    appears anywhere in the package."""
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, SRC
    found = [hit for f in files for hit in unsafe_loads(f.read_text(), str(f.relative_to(SRC)))]
    assert found == [], "loads that can run code from the file:\n" + "\n".join(found)
    calls = [
        f for f in files if "torch.load(" in f.read_text() and "weights_only=True" in f.read_text()
    ]
    # The known safe sites, so that the scan is seen to cover them.
    assert {str(f.relative_to(SRC)) for f in calls} >= {
        "train/checkpoint.py",
        "models/pretrained.py",
    }


# ------------------------------------------------------------------- files that would run code
class _CreatesMarker:
    """Unpickling this creates the file ``path`` (and does nothing else)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _armed_checkpoints(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """The payload next to real model weights, in the formats a ``.pt`` file can have: torch's
    zip format, its legacy format, and a bare pickle."""
    state = {"format_version": 1, "model": nn.Linear(3, 2).state_dict()}
    state["x"] = _CreatesMarker(marker)
    paths = {kind: tmp_path / f"evil_{kind}.pt" for kind in ("zip", "legacy", "pickle")}
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    paths["pickle"].write_bytes(pickle.dumps(state))
    return paths


def test_the_crafted_checkpoints_are_armed(tmp_path):
    """Control: read without the restricted unpickler, each file does create its marker."""
    marker = tmp_path / "marker"
    for kind, path in _armed_checkpoints(tmp_path, marker).items():
        if kind == "pickle":
            pickle.loads(path.read_bytes())  # not a torch file: only plain pickle reads it
        else:
            torch.load(path, map_location="cpu", weights_only=False)
        assert marker.exists(), kind
        marker.unlink()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_a_checkpoint_with_a_pickled_object_is_refused_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "marker"
    path = _armed_checkpoints(tmp_path, marker)[kind]
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert text.startswith(
        f"{path}: not a loadable pks4-layers checkpoint (it is read with weights_only=True, "
        "which refuses pickled objects): "
    ), text
    assert not marker.exists(), "loading the checkpoint ran code from it"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_pretrained_weights_with_a_pickled_object_are_refused(tmp_path, kind):
    pytest.importorskip("timm")
    from pks4_layers.models.pretrained import efficientnet_lite0, load_efficientnet_lite0

    marker = tmp_path / "marker"
    path = _armed_checkpoints(tmp_path, marker)[kind]
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_efficientnet_lite0(efficientnet_lite0(pretrained=False), path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_backbone_checkpoint_path_with_a_pickled_object_is_refused(tmp_path):
    """``create_backbone(name, pretrained=path)`` hands the file to timm, which reads it with
    weights_only=True too."""
    pytest.importorskip("timm")
    from pks4_layers.models import create_backbone

    marker = tmp_path / "marker"
    path = _armed_checkpoints(tmp_path, marker)["zip"]
    with pytest.raises(RuntimeError, match="weights_only=True blocked loading this checkpoint"):
        create_backbone("efficientnet_lite0", pretrained=path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("tag", "extra_args"),
    [
        ("!!python/object/apply:os.mkdir", ""),
        ("!!python/object/new:os.mkdir", ""),
        ("!!python/object/apply:builtins.open", ", 'w'"),
    ],
)
def test_a_yaml_config_with_python_objects_runs_nothing(tmp_path, tag, extra_args):
    yaml = pytest.importorskip("yaml")
    from pks4_layers.train import load_yaml, parse_args

    marker = tmp_path / "marker"
    text = f"epochs: {tag} [{str(marker)!r}{extra_args}]\n"
    armed = tmp_path / "armed"
    yaml.load(text.replace(str(marker), str(armed)), Loader=yaml.UnsafeLoader)
    assert armed.exists(), "control: the unsafe loader does run the tag"

    path = tmp_path / "evil.yaml"
    path.write_text(text)
    for read in (lambda: load_yaml(path), lambda: parse_args(["--config", str(path)])):
        with pytest.raises(yaml.constructor.ConstructorError, match="could not determine a"):
            read()
    assert not marker.exists(), "reading the config ran code from it"


# ------------------------------------------------------------------ resume into another model
def _classifier(num_classes: int = 3, temporal: str = "pks4", dim: int = 16) -> nn.Module:
    from pks4_layers.models import FrameBackbone, PKS4VideoClassifier

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, dim, 3, stride=4, padding=1), nn.ReLU())
    backbone = FrameBackbone(conv, num_features=dim)
    return PKS4VideoClassifier(backbone, num_classes=num_classes, num_frames=2, temporal=temporal)


def _resume(model: nn.Module, path: Path) -> None:
    """What the trainer does on --resume, with the library's functions."""
    state = load_checkpoint(path)
    check_model_state(model, state["model"], str(path))
    model.load_state_dict(state["model"])


def test_resume_into_a_model_that_fits(tmp_path):
    trained = _classifier()
    opt = torch.optim.AdamW(trained.parameters(), lr=0.1)
    clip = torch.randn(2, 2, 3, 16, 16)
    trained(clip).sum().backward()
    opt.step()
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint(path, {"model": trained.state_dict(), "optimizer": opt.state_dict()})

    fresh = _classifier()
    _resume(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(clip), trained(clip))


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (
            {"num_classes": 5},
            [  # both heads of PKS4's factored readout
                "shape mismatches (4): ['head.fc.weight: checkpoint (3, 16) vs model (5, 16)', "
                "'head.fc.bias: checkpoint (3,) vs model (5,)', "
                "'motion_head.fc.weight: checkpoint (3, 16) vs model (5, 16)', "
                "'motion_head.fc.bias: checkpoint (3,) vs model (5,)']",
            ],
        ),
        (
            {"temporal": "mean"},
            ["unexpected keys ("],
        ),
        (
            {"dim": 8},
            ["shape mismatches (", "backbone.model.0.weight: checkpoint (16, 3, 3, 3) vs model"],
        ),
    ],
)
def test_resume_into_a_model_that_does_not_fit_names_keys_and_shapes(tmp_path, other, expected):
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint(path, {"model": _classifier().state_dict(), "epoch": 1})
    model = _classifier(**other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        _resume(model, path)
    text = str(info.value)
    assert text.startswith(f"{path}: the checkpoint does not fit this model\n"), text
    for piece in expected:
        assert piece in text, text
    # Nothing was half-loaded into the model.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
