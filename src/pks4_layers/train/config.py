"""The training configuration: one dataclass, filled from defaults, a YAML file and flags.

Precedence: defaults < YAML file (``--config``) < command-line flags. YAML is read with
``yaml.safe_load`` only; an unknown key or a value of the wrong type is an error that names the
key, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

DATASETS = ("benchmark", "folder", "ssv2")
TEMPORAL_MODULES = ("pks4", "mean", "tconv")
AMP_MODES = ("auto", "bf16", "fp16", "off")
BAD_VIDEO_MODES = ("skip", "raise")


@dataclass
class TrainConfig:
    """Everything a training run needs. Field docs double as the ``--help`` text."""

    # Data
    dataset: str = field(default="benchmark", metadata={"help": f"one of {DATASETS}"})
    data_root: str = field(
        default="data/generated", metadata={"help": "dataset root (benchmark: where to write it)"}
    )
    benchmark_task: str = field(
        default="temporal", metadata={"help": "generated benchmark task: temporal or spatial"}
    )
    benchmark_size: int = field(default=96, metadata={"help": "generated clips' frame size"})
    benchmark_train: int = field(default=96, metadata={"help": "generated training clips"})
    benchmark_val: int = field(default=48, metadata={"help": "generated validation clips"})
    train_split: str = field(default="", metadata={"help": "folder: training split file"})
    val_split: str = field(default="", metadata={"help": "folder: validation split file"})
    val_root: str = field(
        default="",
        metadata={"help": "folder: validation videos when they are a separate tree (K400 val/)"},
    )
    classes_file: str = field(default="", metadata={"help": "folder: classInd.txt-style file"})
    video_dir: str = field(default="", metadata={"help": "ssv2: folder of <id>.webm videos"})
    train_json: str = field(default="", metadata={"help": "ssv2: train split json"})
    val_json: str = field(default="", metadata={"help": "ssv2: validation split json"})
    labels_json: str = field(default="", metadata={"help": "ssv2: labels json"})
    num_frames: int = field(default=8, metadata={"help": "frames T per clip"})
    sampling: str = field(default="segment", metadata={"help": "segment or dense"})
    frame_stride: int = field(default=4, metadata={"help": "dense sampling: frame stride"})
    crop_size: int = field(default=224, metadata={"help": "crop size (pixels)"})
    short_side: int = field(default=256, metadata={"help": "resize the short side to this"})
    flip: bool = field(default=False, metadata={"help": "random horizontal flip in training"})
    eval_clips: int = field(default=1, metadata={"help": "clips per video at evaluation"})
    eval_crops: int = field(default=1, metadata={"help": "crops per clip at evaluation (1/3)"})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    on_bad_video: str = field(
        default="skip",
        metadata={
            "help": "a video that cannot be decoded: skip (warn, count in the epoch's metrics) "
            "or raise (stop)"
        },
    )

    # Model
    backbone: str = field(
        default="efficientnet_lite0", metadata={"help": "timm model name, or tv_resnet18/50"}
    )
    pretrained: bool = field(default=False, metadata={"help": "load the backbone's weights"})
    pretrained_path: str = field(
        default="",
        metadata={
            "help": "local weights file of the timm backbone (loaded offline; implies pretrained)"
        },
    )
    temporal: str = field(default="pks4", metadata={"help": f"one of {TEMPORAL_MODULES}"})
    freeze_backbone: bool = field(default=True, metadata={"help": "train temporal + head only"})
    tune_last_blocks: int = field(
        default=0, metadata={"help": "also tune the backbone's last N blocks (0: none)"}
    )
    drop_rate: float = field(default=0.0, metadata={"help": "dropout before the classifier"})

    # Optimisation
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=16, metadata={"help": "clips per step and process"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length"})
    min_lr_ratio: float = field(default=0.01, metadata={"help": "cosine floor, x peak lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm (0: off)"})
    amp: str = field(
        default="auto", metadata={"help": "auto (bf16 on CUDA where supported), bf16, fp16, off"}
    )
    seed: int = field(default=0, metadata={"help": "seed of model init, sampling, shuffling"})
    global_batch: int = field(
        default=0,
        metadata={
            "help": "clips per optimizer step over all processes, reached by gradient "
            "accumulation (0: batch_size x world size, no accumulation)"
        },
    )
    max_steps_per_epoch: int = field(
        default=0, metadata={"help": "cap optimizer steps (0: no cap)"}
    )

    # Run
    output_dir: str = field(default="runs/pks4", metadata={"help": "metrics, curves, checkpoints"})
    resume: str = field(
        default="", metadata={"help": "checkpoint to resume from, or 'auto' for output_dir's"}
    )
    eval_every: int = field(default=1, metadata={"help": "evaluate every N epochs"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    progress: bool = field(default=True, metadata={"help": "progress bars on rank 0"})

    def validate(self) -> TrainConfig:
        """Checks values that no type annotation can express; returns self."""
        choices = {
            "dataset": DATASETS,
            "temporal": TEMPORAL_MODULES,
            "amp": AMP_MODES,
            "sampling": ("segment", "dense"),
            "benchmark_task": ("temporal", "spatial"),
            "on_bad_video": BAD_VIDEO_MODES,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        positive = ("num_frames", "crop_size", "short_side", "epochs", "batch_size")
        for name in positive + ("eval_clips", "eval_crops", "eval_every", "frame_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        nonnegative = ("warmup_epochs", "grad_clip", "weight_decay", "drop_rate", "workers")
        for name in nonnegative + ("global_batch", "max_steps_per_epoch", "tune_last_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.tune_last_blocks and not self.freeze_backbone:
            raise ValueError(
                "tune_last_blocks: expected 0 with freeze_backbone false (the whole backbone "
                f"trains already), got {self.tune_last_blocks}"
            )
        return self

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches each process accumulates per optimizer step, so that one step takes
        ``global_batch`` clips whatever the number of processes (1 when ``global_batch`` is 0).
        """
        per_pass = self.batch_size * world_size
        if self.global_batch == 0:
            return 1
        if self.global_batch % per_pass:
            raise ValueError(
                f"global_batch: expected a multiple of batch_size x world size = "
                f"{self.batch_size} x {world_size} = {per_pass}, got {self.global_batch}"
            )
        return self.global_batch // per_pass

    def effective_global_batch(self, world_size: int) -> int:
        """Clips per optimizer step over all processes."""
        return self.batch_size * world_size * self.accum_steps(world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _check_type(key: str, value: Any, expected: type) -> Any:
    # bool is an int in Python: keep them apart, or `epochs: true` would pass as 1.
    if expected is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{key}: expected a boolean, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key}: expected an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise TypeError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported field type {expected}")


def config_from_mapping(values: dict[str, Any], base: Optional[TrainConfig] = None) -> TrainConfig:
    """A config with ``values`` applied over ``base`` (defaults). Unknown keys and wrong types
    raise, naming the key."""
    if not isinstance(values, dict):
        got = type(values).__name__
        raise TypeError(f"config: expected a mapping of keys to values, got {got}")
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; valid keys: {sorted(types)}")
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in values.items():
        setattr(cfg, key, _check_type(key, value, types[key]))
    return cfg.validate()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, read with the safe loader (no Python objects)."""
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading a YAML config needs PyYAML: pip install pyyaml") from err
    text = Path(path).read_text()
    data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pks4-train",
        description="Train and evaluate a video classifier: a 2D backbone per frame, one "
        "temporal module (PKS4Block, a temporal conv or frame averaging), a linear head. "
        "Runs unchanged under torchrun (DistributedDataParallel).",
    )
    parser.add_argument("--config", help="YAML file of keys below (flags override it)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --resume and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the parameters, FLOPs and step memory of the config and exit: builds the "
        "model only, reads no video, writes nothing",
    )
    # Not config keys: they stand in for a dataset that is not on this machine.
    parser.add_argument(
        "--dry-run-classes",
        type=int,
        default=None,
        metavar="N",
        help="--dry-run: number of classes (default: from the dataset's class list)",
    )
    parser.add_argument(
        "--dry-run-clips",
        type=int,
        default=None,
        metavar="N",
        help="--dry-run: training clips per epoch to assume (default: counted from the "
        "dataset's split, without decoding)",
    )
    types = _field_types()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if types[f.name] is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=f.name, action=action, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=types[f.name], default=None, help=help_text)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, namespace) from the command line: defaults < --config YAML < flags."""
    args = build_parser().parse_args(argv)
    cfg = TrainConfig()
    if args.config:
        cfg = config_from_mapping(load_yaml(args.config), cfg)
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    cfg = config_from_mapping({k: v for k, v in flags.items() if v is not None}, cfg)
    return cfg, args
