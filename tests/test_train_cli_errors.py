"""``pks4-train`` answers a user's mistake with one line on stderr,
``pks4-train: error: <what>: expected <x>, got <y>``, and exit status 2; ``--debug`` shows the
traceback instead, and a bug keeps its traceback (status 1). ``--dry-run`` needs neither the
data nor the pretrained weights.

Each case runs the CLI's ``main`` on tiny inputs (in its own process where the traceback or
the network matters): empty files named like videos (the
errors come before anything is decoded), checkpoints of a small random EfficientNet-Lite0.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import pks4_layers.train.cli as cli_module
from pks4_layers.train import TrainConfig
from pks4_layers.train.checkpoint import save_checkpoint

pytest.importorskip("timm")
pytest.importorskip("yaml")

PREFIX = "pks4-train: error: "
ROOT = Path(__file__).resolve().parents[1]
K400 = ROOT / "configs" / "k400_vitb16_clip_8f.yaml"
# A small, quick model for every case that gets as far as building one.
SMALL = {
    "backbone": "efficientnet_lite0",
    "num_frames": 2,
    "crop_size": 32,
    "short_side": 32,
    "batch_size": 1,
}
SMALL_FLAGS = [
    "--backbone", "efficientnet_lite0", "--no-pretrained", "--num-frames", "2",
    "--crop-size", "32", "--short-side", "32", "--batch-size", "1", "--no-progress",
]  # fmt: skip


def cli_process(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pks4_layers.train ARGS`` in ``cwd``, in its own process (for what needs one:
    a traceback on stderr, the console entry); warnings (a kernel build note) off, so stderr
    holds the error alone."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    argv = [sys.executable, "-m", "pks4_layers.train", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``pks4-train ARGS`` in ``cwd``, in this process: the CLI's ``main`` with its stdout and
    stderr captured and argparse's exits turned into a status (a process per case would spend
    most of its time importing torch)."""
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    status = cli_module.main(list(args))
                except SystemExit as exc:  # argparse
                    status = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())


def usage_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Asserts the one-line usage error (status 2, no traceback) and that it contains every
    needle; returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(PREFIX), proc.stderr
    line = lines[0]
    assert ": expected " in line and ", got " in line, line
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder dataset of 2 classes (empty .mp4 files), a few broken layouts and files."""
    root = tmp_path_factory.mktemp("cli")
    for cls in ("a", "b"):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(2):
            (root / "data" / cls / f"{i}.mp4").write_bytes(b"")
    (root / "flat").mkdir()
    (root / "flat" / "clip.mp4").write_bytes(b"")  # videos without class folders
    (root / "k400" / "train" / "a").mkdir(parents=True)  # data_root one level too high
    (root / "k400" / "train" / "a" / "clip.mp4").write_bytes(b"")
    (root / "split.txt").write_text("a/0.mp4\nc/9.mp4\n")
    (root / "junk.pt").write_bytes(b"not a checkpoint " * 8)
    (root / "labels.json").write_text(json.dumps({"Pushing something": "0"}))
    return root


@pytest.fixture(scope="module")
def checkpoints(work: Path) -> dict[str, Path]:
    """Checkpoints that fit the 2-class folder dataset of ``work`` or not."""
    from pks4_layers.train.engine import build_model

    def save(name: str, classes: list[str], training: bool = True, **overrides) -> Path:
        cfg = TrainConfig(**{**SMALL, "dataset": "folder", **overrides})
        torch.manual_seed(0)
        model = build_model(cfg, len(classes))
        state = {"model": model.state_dict(), "config": cfg.to_dict(), "classes": classes}
        if training:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
            state.update(optimizer=opt.state_dict(), scheduler={}, epoch=1)
        path = work / f"{name}.pt"
        save_checkpoint(path, state)
        return path

    paths = {
        "three_classes": save("three_classes", ["a", "b", "c"]),
        "mean": save("mean", ["a", "b"], temporal="mean"),
        "other_names": save("other_names", ["x", "y"]),
        "model_only": save("model_only", ["a", "b"], training=False),
    }
    whole = paths["model_only"].read_bytes()
    paths["truncated"] = work / "truncated.pt"
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    import timm

    paths["resnet18_weights"] = work / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), paths["resnet18_weights"])
    return paths


def folder(work: Path, *extra: str) -> list[str]:
    out = ["--output-dir", str(work / "run")]
    return [*SMALL_FLAGS, "--dataset", "folder", "--data-root", str(work / "data"), *out, *extra]


# --------------------------------------------------------------------- missing files, folders
@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--dataset", "folder", "--data-root", "absent"], ["data_root:", "'absent'", "folder"]),
        (["--config", "absent.yaml"], ["config: expected a YAML file", "'absent.yaml'"]),
        (["--pretrained-path", "absent.safetensors"], ["pretrained_path:", "no such file"]),
        (["--resume", "absent.pt"], ["resume: expected a checkpoint file", "'absent.pt'"]),
        (["--dataset", "ssv2", "--data-root", "."], ["labels_json:", "(not set)"]),
    ],
    ids=["data_root", "config", "pretrained_path", "resume", "ssv2_labels_json"],
)
def test_a_missing_file_or_folder_is_one_line(work, flags, needles):
    usage_error(cli(*SMALL_FLAGS, *flags, cwd=work), *needles)


def test_a_missing_split_file_is_one_line(work):
    proc = cli(*folder(work, "--train-split", "absent_split.txt"), cwd=work)
    usage_error(proc, "train_split: expected a split file", "'absent_split.txt' (no such file)")


# ----------------------------------------------------------------------------- data layouts
@pytest.mark.parametrize(
    ("data_root", "extra", "needles"),
    [
        ("flat", [], ["root: expected one sub-folder per class", "no class folders"]),
        ("k400", [], ["expected video files", "one level too high"]),
        ("data", ["--train-split", "split.txt"], ["split.txt:2: class 'c'", "got 'c'"]),
        ("data", ["--classes-file", "labels.json"], ["labels.json:1: expected '<id> <class"]),
    ],
    ids=["videos_without_class_folders", "root_one_level_too_high", "split_class", "class_index"],
)
def test_a_wrong_dataset_layout_is_one_line(work, data_root, extra, needles):
    flags = [*SMALL_FLAGS, "--dataset", "folder", "--data-root", data_root, *extra]
    usage_error(cli(*flags, "--output-dir", str(work / "run"), cwd=work), *needles)


def test_an_ssv2_split_json_that_is_not_a_list_is_one_line(work):
    (work / "videos").mkdir(exist_ok=True)
    labels = str(work / "labels.json")
    jsons = ["--labels-json", labels, "--train-json", labels, "--val-json", labels]
    proc = cli(*SMALL_FLAGS, "--dataset", "ssv2", "--video-dir", "videos", *jsons, cwd=work)
    usage_error(proc, "labels.json: expected a list of", "is it the labels json?")


# ------------------------------------------------------------------------------------ flags
def test_a_bad_flag_value_is_argparse_one_line(work):
    usage_error(cli("--epochs", "three", cwd=work), "argument --epochs: expected an integer")


def test_a_mistyped_flag_suggests_the_right_one(work):
    usage_error(cli("--epcohs", "3", cwd=work), "did you mean '--epochs'?", "'--epcohs 3'")


def test_a_value_out_of_the_choices_suggests_the_closest(work):
    usage_error(cli("--temporal", "pks", cwd=work), "temporal: expected one of", "'pks4'?")


def test_a_mistyped_backbone_suggests_a_timm_name(work):
    proc = cli("--backbone", "resnet_18", cwd=work)
    usage_error(proc, "backbone: expected a timm model name", "did you mean 'resnet18'?")


def test_a_device_that_does_not_exist_is_one_line(work):
    usage_error(cli("--device", "gpu", cwd=work), "device: expected auto, cpu, cuda", "'gpu'")


# ------------------------------------------------------------------------------ YAML config
@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("epochs: 3\nbatchsize: 2\n", ["unknown key(s) ['batchsize']", "'batch_size'"]),
        ("lr: 5e-4\n", ["lr: expected a number, got '5e-4'", "write 5.0e-4"]),
        ("epochs: three\n", ["epochs: expected an integer, got 'three'"]),
        ("flip: 1\n", ["flip: expected a boolean, got 1"]),
        ("epochs: 3\n  lr: 0.1\n", ["expected YAML", "at line 2"]),
        ("- epochs\n", ["expected a mapping at the top level, got list"]),
    ],
    ids=["unknown_key", "number_as_text", "wrong_type", "bool", "syntax", "not_a_mapping"],
)
def test_a_bad_yaml_config_is_one_line(work, text, needles):
    path = work / "bad.yaml"
    path.write_text(text)
    usage_error(cli("--config", str(path), cwd=work), *needles)


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    ("name", "eval_only", "needles"),
    [
        ("three_classes", True, ["2 classes)", "got one of", "3 classes"]),
        ("mean", True, ["temporal 'pks4'", "got one of", "temporal 'mean'"]),
        ("other_names", True, ["trained on this dataset's 2 classes", "x; y"]),
        ("model_only", False, ["a training checkpoint", "one without optimizer"]),
        ("truncated", False, ["not a loadable", "failed finding central directory"]),
        ("junk", False, ["not a loadable", "got Unsupported operand"]),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_one_line(work, checkpoints, name, eval_only, needles):
    path = checkpoints.get(name, work / f"{name}.pt")
    flags = folder(work, "--resume", str(path), *(["--eval-only"] if eval_only else []))
    usage_error(cli(*flags, cwd=work), *needles)


def test_pretrained_weights_of_another_model_are_one_line(work, checkpoints):
    proc = cli(*folder(work, "--pretrained-path", str(checkpoints["resnet18_weights"])), cwd=work)
    usage_error(proc, "pretrained_path: expected weights of efficientnet_lite0", "bn1.weight")


# -------------------------------------------------------------------- --debug, genuine bugs
def test_debug_shows_the_traceback(work):
    proc = cli_process("--config", "absent.yaml", "--debug", cwd=work)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "MissingPathError" in proc.stderr
    assert not proc.stderr.startswith(PREFIX)


def test_a_bug_keeps_its_traceback_and_status_1(work):
    """An exception that is not a usage error is not turned into one."""
    script = textwrap.dedent(
        """
        import sys
        import pks4_layers.train.cli as cli

        def broken(cfg, eval_only=False):
            raise KeyError("an internal bug")

        cli.run = broken
        sys.exit(cli.main(["--epochs", "1"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "an internal bug" in proc.stderr
    assert PREFIX not in proc.stderr


# ------------------------------------------------------------------------------- --dry-run
# Any socket use in the process is refused and counted (PEP 578 audit hook, installed before
# anything is imported): the dry run must build the timm model without the network.
_OFFLINE_DRY_RUN = textwrap.dedent(
    """
    import sys

    attempts = []

    def audit(event, args):
        if event.startswith("socket.") and event != "socket.gethostname":
            attempts.append(event)
            raise OSError("network access refused in this test")

    sys.addaudithook(audit)
    from pks4_layers.train.cli import main

    status = main(sys.argv[1:])
    print("socket attempts:", len(attempts))
    sys.exit(status)
    """
)


@pytest.mark.slow
def test_dry_run_of_the_k400_recipe_needs_no_weights_data_or_network(tmp_path):
    """The recipe names a weights file and a data folder that are not here: the dry run builds
    ViT-B/16 with random weights and says so, and takes the dataset's size from the recipe."""
    argv = ["--config", str(K400), "--dry-run"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key, None)  # an offline switch would hide an attempt
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_DRY_RUN, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "weights").exists() and not (tmp_path / "data").exists()
    out = proc.stdout
    assert "dry run: random weights (pretrained weights are not loaded" in out
    assert "vit_base_patch16_clip_224.openai.safetensors', not on this machine" in out
    assert "socket attempts: 0" in out
    budget = json.loads(out.strip().splitlines()[-2])
    assert budget["num_classes"] == 400 and budget["params_total"] > 85_000_000
    assert budget["train_clips"] == 240436
    assert budget["num_classes_source"].startswith("dataset_classes of the config")
    assert budget["weights_not_loaded"].startswith("'weights/")
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


def test_dry_run_with_a_data_folder_that_does_not_exist(tmp_path):
    """Without the data, the counts come from the flags; without them, one line says so."""
    flags = [*SMALL_FLAGS, "--dataset", "folder", "--data-root", "absent", "--dry-run"]
    flags += ["--pretrained-path", "absent.safetensors"]
    proc = cli(*flags, "--dry-run-classes", "5", "--dry-run-clips", "100", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "dry run: random weights (pretrained weights are not loaded" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["train_clips"] == 100
    line = usage_error(cli(*flags, cwd=tmp_path), "number of classes", "--dry-run-classes N")
    assert "no folder 'absent' (data_root)" in line
