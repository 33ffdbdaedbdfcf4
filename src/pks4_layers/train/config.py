"""The training configuration: one dataclass, filled from defaults, a YAML file and flags.

Precedence: defaults < YAML file (``--config``) < command-line flags. YAML is read with
``yaml.safe_load`` only; an unknown key or a value of the wrong type is an error that names the
key, never silently ignored. Such mistakes raise :class:`~.errors.UsageError` (a ``ValueError``;
``UsageTypeError`` for wrong types is also a ``TypeError``), which ``pks4-train`` prints as one
line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from ..data.benchmark import TASKS as BENCHMARK_TASKS
from ..layers.temporal_scan import PRIOR_TARGETS
from ..models.classifier import BACKBONE_NORMS, READOUTS
from ..models.presets import PRESETS, resolve_preset
from ..models.temporal_heads import TEMPORAL_KINDS
from .errors import (
    MissingPathError,
    UsageError,
    UsageTypeError,
    closest,
    did_you_mean,
    one_line,
)

DATASETS = ("benchmark", "folder", "ssv2")
TEMPORAL_MODULES = TEMPORAL_KINDS
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
        default="temporal",
        metadata={"help": f"generated benchmark task: one of {tuple(BENCHMARK_TASKS)}"},
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
    dataset_classes: int = field(
        default=0,
        metadata={"help": "--dry-run without the data here: the dataset's classes (0: unknown)"},
    )
    dataset_train_clips: int = field(
        default=0,
        metadata={"help": "--dry-run without the data here: its training clips (0: unknown)"},
    )
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
    inner_dim: int = field(
        default=0,
        metadata={
            "help": "width the temporal module works at (0: its default, the features' width "
            "for pks4 and the scans, a quarter of it for the bottleneck peers); not for mean, tconv"
        },
    )
    freeze_backbone: bool = field(default=True, metadata={"help": "train temporal + head only"})
    backbone_norm: str = field(
        default="auto",
        metadata={
            "help": "where the backbone trains (freeze_backbone false, tune_last_blocks), its "
            "BatchNorm layers: eval (running statistics, kept as they are; their weights "
            "train), train (each batch's statistics), auto: eval with pretrained weights, "
            "train without (pretrained, pretrained_path)"
        },
    )
    tune_last_blocks: int = field(
        default=0, metadata={"help": "also tune the backbone's last N blocks (0: none)"}
    )
    drop_rate: float = field(default=0.0, metadata={"help": "dropout before the classifier"})
    readout: str = field(
        default="auto",
        metadata={
            "help": f"auto (the preset's) or one of {READOUTS}: one head on the temporal "
            "module's output, or a content head on the backbone's features and a motion head on "
            "the module's contribution, each on its own loss (not with temporal mean)"
        },
    )
    calibrate_readout: bool = field(
        default=True,
        metadata={
            "help": "a factored readout: fit the weights of its two heads on the validation "
            "split at each evaluation (PKS4VideoClassifier.calibrate_readout; the validation "
            "metrics are then those of the calibrated model); false: the heads summed as trained"
        },
    )
    preset: str = field(
        default="auto",
        metadata={
            "help": f"auto or one of {tuple(PRESETS)}: the PKS4 block's named configuration "
            "and readout (auto: motion_only for pks4, features for the other modules; "
            "prior_targets, inner_dim and readout override it)"
        },
    )
    prior_targets: str = field(
        default="",
        metadata={
            "help": "pks4: where the kinematic prior enters the scan, comma-separated of "
            f"{', '.join(PRIOR_TARGETS)} (empty: the block's default, selection,output, "
            "measured best both after a frozen backbone and trained from scratch)"
        },
    )

    # Optimisation
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=16, metadata={"help": "clips per step and process"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    backbone_lr_scale: float = field(
        default=0.1,
        metadata={
            "help": "the backbone's learning rate over lr, where it trains (freeze_backbone "
            "false or tune_last_blocks; the motion suite's fine-tuned protocol)"
        },
    )
    temporal_lr_scale: float = field(
        default=1.0, metadata={"help": "the temporal module's learning rate over lr"}
    )
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
            "benchmark_task": tuple(BENCHMARK_TASKS),
            "on_bad_video": BAD_VIDEO_MODES,
            "readout": ("auto", *READOUTS),
            "preset": ("auto", *PRESETS),
            "backbone_norm": ("auto", *BACKBONE_NORMS),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
                raise UsageError(name, f"one of {allowed}{hint}", repr(value))
        positive = ("num_frames", "crop_size", "short_side", "epochs", "batch_size")
        for name in positive + ("eval_clips", "eval_crops", "eval_every", "frame_stride"):
            if getattr(self, name) < 1:
                raise UsageError(name, ">= 1", str(getattr(self, name)))
        for name in ("lr", "backbone_lr_scale", "temporal_lr_scale"):
            if not getattr(self, name) > 0:
                raise UsageError(name, "> 0", str(getattr(self, name)))
        nonnegative = ("warmup_epochs", "grad_clip", "weight_decay", "drop_rate", "workers")
        for name in nonnegative + ("global_batch", "max_steps_per_epoch", "tune_last_blocks"):
            if getattr(self, name) < 0:
                raise UsageError(name, ">= 0", str(getattr(self, name)))
        if self.prior_targets:
            targets = self.prior_target_list()
            if self.temporal != "pks4":
                raise UsageError(
                    "prior_targets", "empty unless temporal is pks4", repr(self.prior_targets)
                )
            bad = [t for t in targets if t not in PRIOR_TARGETS]
            if not targets or bad or len(set(targets)) != len(targets):
                hint = "".join(did_you_mean(t, PRIOR_TARGETS) for t in bad[:1])
                raise UsageError(
                    "prior_targets",
                    f"comma-separated distinct names of {PRIOR_TARGETS}{hint}",
                    repr(self.prior_targets),
                )
        if self.readout == "factored" and self.temporal == "mean":
            raise UsageError(
                "readout", "output with temporal mean (it adds nothing to read)", repr(self.readout)
            )
        try:  # the classifier's rule (a preset with block arguments is PKS4's)
            resolve_preset(self.preset_arg(), temporal=self.temporal)
        except ValueError:
            raise UsageError(
                "preset", "auto or features unless temporal is pks4", repr(self.preset)
            ) from None
        if self.inner_dim < 0:
            raise UsageError("inner_dim", ">= 0", str(self.inner_dim))
        if self.inner_dim and self.temporal in ("mean", "tconv"):
            raise UsageError(
                "inner_dim",
                f"0 for temporal {self.temporal} (it has no width)",
                str(self.inner_dim),
            )
        if self.tune_last_blocks and not self.freeze_backbone:
            raise UsageError(
                "tune_last_blocks",
                "0 with freeze_backbone false (the whole backbone trains already)",
                str(self.tune_last_blocks),
            )
        return self

    def prior_target_list(self) -> list[str]:
        """``prior_targets`` as a list of names (empty: the block's default)."""
        return [t.strip() for t in self.prior_targets.split(",") if t.strip()]

    def lr_scales(self) -> dict[str, float]:
        """The learning rate per part of the classifier over ``lr`` (the head's is ``lr``)."""
        return {"backbone": self.backbone_lr_scale, "temporal": self.temporal_lr_scale}

    def readout_arg(self) -> Optional[str]:
        """``readout`` for :class:`~pks4_layers.models.PKS4VideoClassifier` (``None``: auto)."""
        return None if self.readout == "auto" else self.readout

    def backbone_norm_arg(self) -> str:
        """``backbone_norm`` for :class:`~pks4_layers.models.PKS4VideoClassifier`, resolved
        from ``pretrained`` (not from the weights the model holds: a model rebuilt to load a
        checkpoint into has random ones)."""
        if self.backbone_norm != "auto":
            return self.backbone_norm
        return "eval" if self.pretrained or self.pretrained_path else "train"

    def preset_arg(self) -> Optional[str]:
        """``preset`` for :class:`~pks4_layers.models.PKS4VideoClassifier` (``None``: auto)."""
        return None if self.preset == "auto" else self.preset

    def block_kwargs(self) -> dict[str, Any]:
        """Arguments of the temporal module that the config sets (none: its defaults)."""
        kwargs: dict[str, Any] = {}
        if self.temporal == "pks4" and self.prior_targets:
            kwargs["prior_targets"] = tuple(self.prior_target_list())
        if self.inner_dim:
            kwargs["inner_dim"] = self.inner_dim
        return kwargs

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches each process accumulates per optimizer step, so that one step takes
        ``global_batch`` clips whatever the number of processes (1 when ``global_batch`` is 0).
        """
        per_pass = self.batch_size * world_size
        if self.global_batch == 0:
            return 1
        if self.global_batch % per_pass:
            raise UsageError(
                "global_batch",
                f"a multiple of batch_size x world size = {self.batch_size} x {world_size} = "
                f"{per_pass}",
                str(self.global_batch),
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


def _yaml_number_hint(value: Any, integer: bool = False) -> str:
    """Why a number came as text: YAML 1.1 (PyYAML) reads ``5e-4`` (no dot) as a string, and a
    quoted number is a string."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if integer:
        return f" (text in YAML: write {int(number)})" if number.is_integer() else ""
    if "e" in value.lower() and "." not in value:
        mantissa, _, exponent = value.lower().partition("e")
        return f" (YAML reads {value} as text: write {mantissa}.0e{exponent}, = {number:g})"
    return " (a quoted number is text in YAML: drop the quotes)"


def _check_type(key: str, value: Any, expected: type) -> Any:
    # bool is an int in Python: keep them apart, or `epochs: true` would pass as 1.
    if expected is bool:
        if not isinstance(value, bool):
            raise UsageTypeError(key, "a boolean", f"{value!r} (write true or false)")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = _yaml_number_hint(value, integer=True)
            raise UsageTypeError(key, "an integer", f"{value!r}{hint}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageTypeError(key, "a number", f"{value!r}{_yaml_number_hint(value)}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise UsageTypeError(key, "a string", repr(value))
        return value
    # A field type this function does not know is the program's bug, not the user's.
    raise TypeError(f"{key}: unsupported field type {expected}")


def config_from_mapping(
    values: dict[str, Any], base: Optional[TrainConfig] = None, source: str = "config"
) -> TrainConfig:
    """A config with ``values`` applied over ``base`` (defaults). Unknown keys and wrong types
    raise :class:`~.errors.UsageError`, naming the key; ``source`` names where ``values``
    came from (a YAML file) in the unknown-key message."""
    if not isinstance(values, dict):
        got = type(values).__name__
        raise UsageTypeError(source, "a mapping of keys to values", got)
    types = _field_types()
    unknown = sorted(set(values) - set(types), key=str)
    if unknown:
        # Flags are spelled with dashes, keys with underscores: a dashed key is looked up too.
        hints = [
            f"{match!r} for {key!r}"
            for key in unknown
            if (match := closest(str(key).replace("-", "_"), types))
        ]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise UsageError(
            source, f"only the keys that pks4-train --help lists{hint}", f"unknown key(s) {unknown}"
        )
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
    if not Path(path).is_file():
        got = "a folder" if Path(path).is_dir() else "no such file"
        raise MissingPathError("config", "a YAML file", f"{str(path)!r} ({got})")
    text = Path(path).read_text()
    data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageTypeError(str(path), "a mapping at the top level", type(data).__name__)
    return data


def _flag_value(kind: type, expected: str):
    """An argparse ``type`` that says what it expected: argparse shows an
    ``ArgumentTypeError``'s text as is (``argument --epochs: expected an integer, got 'x'``)."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    convert.__name__ = kind.__name__
    return convert


_FLAG_TYPES = {int: _flag_value(int, "an integer"), float: _flag_value(float, "a number")}


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (no usage block: ``--help`` has it) and a
    suggestion for a mistyped flag."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
            hint = did_you_mean(flags[0], self._option_string_actions) if flags else ""
            self.error(
                f"arguments: expected the flags that {self.prog} --help lists{hint}, "
                f"got unrecognized {' '.join(extras)!r}"
            )
        return namespace


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pks4-train",
        description="Train and evaluate a video classifier: a 2D backbone per frame, one "
        "temporal module (PKS4Block, a temporal conv or frame averaging), a linear head. "
        "Runs unchanged under torchrun (DistributedDataParallel). A mistake in the flags, "
        "the config or the files they name is reported on one line (exit status 2).",
    )
    parser.add_argument("--config", help="YAML file of keys below (flags override it)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --resume and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the parameters, FLOPs and step memory of the config and exit: builds the "
        "model with random weights (pretrained weights are not loaded), reads no video, "
        "writes nothing",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on a mistake in the flags, config or files, raise with the full traceback "
        "instead of printing one line",
    )
    # Not config keys: they stand in for a dataset that is not on this machine.
    parser.add_argument(
        "--dry-run-classes",
        type=_FLAG_TYPES[int],
        default=None,
        metavar="N",
        help="--dry-run: number of classes (default: from the dataset's class list)",
    )
    parser.add_argument(
        "--dry-run-clips",
        type=_FLAG_TYPES[int],
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
            kind = _FLAG_TYPES.get(types[f.name], types[f.name])
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of parsed flags: defaults < ``args.config``'s YAML < the flags given."""
    cfg = TrainConfig()
    if args.config:
        cfg = config_from_mapping(load_yaml(args.config), cfg, source=str(args.config))
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    return config_from_mapping({k: v for k, v in flags.items() if v is not None}, cfg)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, namespace) from the command line: defaults < --config YAML < flags."""
    args = build_parser().parse_args(argv)
    return config_from_args(args), args
