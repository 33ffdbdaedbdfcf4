"""What a training config costs, without reading a video: ``pks4-train --dry-run``.

:func:`compute_budget` builds the config's model with random weights (no pretrained weights,
no data, no checkpoint: the cost does not depend on them) and reports its
parameters, the forward FLOPs of one clip by part (:func:`~pks4_layers.models.model_report`),
the FLOPs of the whole training schedule and of evaluating one video, and the memory of one
training step: what autograd saves for the backward of a batch, plus the weights, gradients
and AdamW state.

FLOP convention: FLOPs as counted by ``torch.utils.flop_counter`` (matrix products,
convolutions, attention; a multiply-add is 2), plus the selective scan's recurrence and the
kinematic prior's cost volume from their formulas (:class:`pks4_layers.models.flops.FlopCount`);
other element-wise operations (norms, activations) are not counted. A
backward pass is counted as 2x its forward (one product for the input gradient, one for the
weight gradient), the usual convention. A frozen backbone runs forward only, under
``torch.no_grad``; what trains runs forward and backward, 3x its forward. For an unfrozen
backbone this slightly overcounts: nothing needs the gradient of the input pixels.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.classifier import factored_loss
from .config import TrainConfig
from .errors import UsageError

__all__ = ["ComputeBudget", "compute_budget", "count_train_clips", "resolve_num_classes"]

# AdamW keeps two tensors per parameter (exp_avg, exp_avg_sq), each the parameter's size.
ADAMW_STATES = 2


@dataclass
class ComputeBudget:
    """The compute and memory of a training config; :meth:`format` prints it as a table.

    FLOPs are per clip unless named otherwise (``schedule_flops``: the whole training run);
    bytes are float32 (the dry run does not model autocast).
    """

    backbone: str
    temporal: str
    freeze_backbone: bool
    clip_shape: tuple[int, ...]
    num_classes: int
    num_classes_source: str
    params_total: int
    params_trainable: int
    params_backbone: int
    params_temporal: int
    params_head: int
    gflops_backbone: float
    gflops_temporal: float
    gflops_head: float
    gflops_forward: float
    gflops_frozen_forward: float
    gflops_trainable_forward: float
    gflops_train_per_clip: float
    epochs: int
    batch_size: int
    train_clips: int
    train_clips_source: str
    clips_per_epoch: int
    steps_per_epoch: int
    schedule_flops: float
    eval_views: int
    gflops_eval_per_video: float
    activation_bytes: int
    weight_bytes: int
    trainable_weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    step_bytes: int
    # The pretrained weights the config names, which the dry run does not load ("": none).
    weights_not_loaded: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A readable report: parts of the model, schedule FLOPs, memory of one step."""
        t = self.clip_shape[1]
        size = self.clip_shape[-1]
        frozen = "frozen" if self.freeze_backbone else "trained"
        rows = [
            ("backbone", self.params_backbone, self.gflops_backbone),
            (f"temporal ({self.temporal})", self.params_temporal, self.gflops_temporal),
            ("head", self.params_head, self.gflops_head),
            ("total", self.params_total, self.gflops_forward),
        ]
        width = max(len(r[0]) for r in rows)
        header = f"{'part':<{width}}  {'params':>13}  {'GFLOPs/clip':>12}"
        lines = [
            f"dry run: {self.backbone} ({frozen}) + {self.temporal}, {self.num_classes} classes "
            f"({self.num_classes_source})",
            f"clip: {t} frames x 3 x {size} x {size}; forward of one clip",
            self.weights_note(),
            "",
            header,
            "-" * len(header),
        ]
        for name, params, gflops in rows:
            lines.append(f"{name:<{width}}  {params:>13,}  {gflops:>12.4f}")
        lines.append(f"{'trainable':<{width}}  {self.params_trainable:>13,}")
        lines += [
            "",
            "training FLOPs (backward = 2x forward; a frozen backbone runs forward only)",
            f"  per clip        {self.gflops_frozen_forward:.3f} frozen fwd + 3 x "
            f"{self.gflops_trainable_forward:.3f} trained fwd = "
            f"{self.gflops_train_per_clip:.3f} GFLOPs",
            f"  training clips  {self.train_clips:,} ({self.train_clips_source})",
            f"  per epoch       {self.clips_per_epoch:,} clips, {self.steps_per_epoch:,} steps "
            f"of {self.batch_size}",
            f"  schedule        {self.epochs} epochs: {_format_flops(self.schedule_flops)}",
            f"  evaluation      {self.eval_views} view(s) per video: "
            f"{self.gflops_eval_per_video:.3f} GFLOPs per video",
            "",
            f"memory of one training step (batch {self.batch_size}, float32)",
            f"  saved for backward   {_format_bytes(self.activation_bytes):>11}",
            f"  weights (all)        {_format_bytes(self.weight_bytes):>11}",
            f"  gradients            {_format_bytes(self.gradient_bytes):>11}",
            f"  AdamW state          {_format_bytes(self.optimizer_bytes):>11}",
            f"  total                {_format_bytes(self.step_bytes):>11}",
        ]
        return "\n".join(lines)

    def weights_note(self) -> str:
        """The line that says what the dry run did not load or read."""
        if self.weights_not_loaded:
            skipped = f"pretrained weights are not loaded: {self.weights_not_loaded}"
        else:
            skipped = "no pretrained weights configured"
        return f"dry run: random weights ({skipped}), no video read"

    def __str__(self) -> str:
        return self.format()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _format_flops(flops: float) -> str:
    for unit, scale in (("EFLOPs", 1e18), ("PFLOPs", 1e15), ("TFLOPs", 1e12)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit} ({flops:.3e} FLOPs)"
    return f"{flops / 1e9:,.3f} GFLOPs"


def _format_bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------- dataset, without decoding
# The way out when the dataset is elsewhere, named in both messages: a user who lacks the classes
# lacks the clips too.
_WITHOUT_DATA = "without the data: --dry-run-classes N --dry-run-clips N"


def _absent(key: str, value: str, folder: bool = False) -> str:
    """What is there instead of config key ``key``'s file or folder, in words."""
    if not value:
        return f"{key} not set"
    kind = "folder" if folder else "file"
    return f"no {kind} {value!r} ({key})"


def _json(path: str, key: str) -> object:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UsageError(key, "a JSON file", f"{path!r}: {err.msg} at line {err.lineno}") from err


def resolve_num_classes(cfg: TrainConfig) -> tuple[int, str]:
    """``(number of classes, where it came from)`` of the config's dataset, from class lists
    only: the generated benchmark's task, a ``classInd.txt`` or the class folders (folder), the
    labels json (ssv2). Raises :class:`~.errors.UsageError` (a ``ValueError``) when the files
    are not there."""
    from ..data import read_class_index
    from ..data.benchmark import TASKS

    if cfg.dataset == "benchmark":
        return len(TASKS[cfg.benchmark_task]), f"benchmark task {cfg.benchmark_task!r}"
    if cfg.dataset == "folder":
        if cfg.classes_file and Path(cfg.classes_file).is_file():
            return len(read_class_index(cfg.classes_file)), cfg.classes_file
        root = Path(cfg.data_root)
        if root.is_dir():
            classes = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
            if classes:
                return len(classes), f"class folders in {root}"
            got = f"no class folders in {cfg.data_root!r} (data_root)"
        else:
            got = _absent("data_root", cfg.data_root, folder=True)
        if cfg.classes_file:
            got = f"{_absent('classes_file', cfg.classes_file)}, {got}"
    else:  # ssv2
        if cfg.labels_json and Path(cfg.labels_json).is_file():
            labels = _json(cfg.labels_json, "labels_json")
            if isinstance(labels, dict) and labels:
                return len(labels), cfg.labels_json
            got = f"no {{template: id}} object in {cfg.labels_json!r} (labels_json)"
        else:
            got = _absent("labels_json", cfg.labels_json)
    raise UsageError(
        "number of classes", f"the {cfg.dataset} dataset's class list ({_WITHOUT_DATA})", got
    )


def count_train_clips(cfg: TrainConfig) -> tuple[int, str]:
    """``(training clips per epoch, where it came from)``: the benchmark's setting, the lines of
    a split file, a folder listing or the entries of a split json; nothing is decoded. Raises
    :class:`~.errors.UsageError` (a ``ValueError``) when the files are not there."""
    if cfg.dataset == "benchmark":
        return cfg.benchmark_train, "benchmark_train"
    if cfg.dataset == "folder":
        if cfg.train_split and Path(cfg.train_split).is_file():
            lines = Path(cfg.train_split).read_text().splitlines()
            return sum(1 for line in lines if line.strip()), cfg.train_split
        root = Path(cfg.data_root)
        if not cfg.train_split and root.is_dir():
            from ..data import folder_samples

            try:
                samples, _ = folder_samples(root, None, cfg.classes_file or None)
            except (FileNotFoundError, ValueError) as err:
                raise UsageError.from_error(err) from err  # a folder in another layout
            return len(samples), f"videos under {root}"
        if cfg.train_split:
            got = _absent("train_split", cfg.train_split)
        else:
            got = _absent("data_root", cfg.data_root, folder=True)
    else:  # ssv2
        if cfg.train_json and Path(cfg.train_json).is_file():
            entries = _json(cfg.train_json, "train_json")
            if isinstance(entries, list):
                return len(entries), cfg.train_json
            got = f"no list of videos in {cfg.train_json!r} (train_json)"
        else:
            got = _absent("train_json", cfg.train_json)
    raise UsageError(
        "training clips", f"the {cfg.dataset} dataset's training split ({_WITHOUT_DATA})", got
    )


def _from_data_or_config(
    count: Callable[[TrainConfig], tuple[int, str]], cfg: TrainConfig, key: str
) -> tuple[int, str]:
    """``count(cfg)`` from the data; where the data is not here, the size the config states
    under ``key`` (when it states one), else ``count``'s :class:`~.errors.UsageError`."""
    try:
        return count(cfg)
    except UsageError:
        stated = getattr(cfg, key)
        if stated <= 0:
            raise
        return stated, f"{key} of the config (the data is not here)"


# ------------------------------------------------------------------------- activation memory
def _storage_key(t: Tensor) -> tuple[str, int, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr(), storage.nbytes())


def saved_bytes(fn: Callable[[], object], exclude: tuple[Tensor, ...] = ()) -> tuple[int, object]:
    """Bytes autograd saves for the backward while ``fn()`` runs, and ``fn``'s result.

    Every storage counts once with its full size (a saved view keeps its whole storage alive);
    the storages of ``exclude`` (the parameters, alive whether or not a backward follows) are
    not counted.
    """
    skip = {_storage_key(t) for t in exclude}
    seen: dict[tuple[str, int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in skip:
            seen[key] = key[2]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def _step_activation_bytes(model: nn.Module, cfg: TrainConfig, num_classes: int) -> int:
    """Saved bytes of the forward (and loss) of one training batch of zero clips."""
    b = cfg.batch_size
    shape = (1, cfg.num_frames, 3, cfg.crop_size, cfg.crop_size)
    keep = tuple(model.parameters()) + tuple(model.buffers())
    labels = torch.zeros(b, dtype=torch.long)
    model.train()
    if model.backbone_frozen:
        # A frozen backbone runs under no_grad and saves nothing, and zero clips give the same
        # features: run it on one clip and tile its features to the batch, which saves the cost
        # of b - 1 backbone forwards (minutes for a ViT on a CPU) and changes no saved byte.
        feats = model.forward_features(torch.zeros(shape))
        x = feats.x.repeat(b, *([1] * (feats.x.dim() - 1)))
        feats = dataclasses.replace(feats, x=x)

        def step() -> Tensor:
            out = model.forward_temporal(feats)
            if model.motion_head is not None:
                return factored_loss(*model.forward_heads(feats, out), labels)
            return F.cross_entropy(model.forward_head(model.pool(out)), labels)

    else:
        clips = torch.zeros((b,) + shape[1:])

        def step() -> Tensor:
            return model.loss(clips, labels)[0]

    nbytes, loss = saved_bytes(step, exclude=keep)
    del loss  # the graph goes with it
    return nbytes


# ------------------------------------------------------------------------------------ budget
def compute_budget(
    cfg: TrainConfig,
    num_classes: Optional[int] = None,
    train_clips: Optional[int] = None,
) -> ComputeBudget:
    """The compute and memory of training ``cfg``, without reading any video.

    Args:
        cfg: the training config; its model is built on the CPU with random weights: the
            pretrained weights it names (``pretrained``, ``pretrained_path``) are not loaded
            and need not be there.
        num_classes: the head's classes; ``None``: from the config's dataset
            (:func:`resolve_num_classes`).
        train_clips: training clips per epoch to assume; ``None``: counted from the config's
            dataset (:func:`count_train_clips`).

    Returns:
        a :class:`ComputeBudget`.
    """
    from ..models import model_report
    from .engine import build_model

    cfg.validate()
    # The flags first, then the data when it is here, then the dataset's size the config
    # states (a recipe for a dataset that is not on this machine).
    if num_classes is None:
        num_classes, classes_source = _from_data_or_config(
            resolve_num_classes, cfg, "dataset_classes"
        )
    else:
        classes_source = "given"
    if num_classes < 1:
        raise UsageError("num_classes (--dry-run-classes)", ">= 1", str(num_classes))
    if train_clips is None:
        train_clips, clips_source = _from_data_or_config(
            count_train_clips, cfg, "dataset_train_clips"
        )
    else:
        clips_source = "assumed, not counted"
    if train_clips < 1:
        raise UsageError("train_clips (--dry-run-clips)", ">= 1", str(train_clips))

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes, random_weights=True)
    clip_shape = (1, cfg.num_frames, 3, cfg.crop_size, cfg.crop_size)
    report = model_report(model, clip_shape)

    frozen_gflops = report.gflops_backbone if cfg.freeze_backbone else 0.0
    if cfg.tune_last_blocks:
        # Partial tuning: the last blocks train. A ViT's blocks cost the same each, so the
        # frozen share is that of the other blocks (patch embedding and final norm are small).
        num_blocks = len(model.backbone.model.blocks)
        frozen_gflops *= (num_blocks - cfg.tune_last_blocks) / num_blocks
    trained_gflops = report.gflops_total - frozen_gflops
    per_clip = frozen_gflops + 3.0 * trained_gflops

    # The loader keeps the last, smaller batch; max_steps_per_epoch cuts the epoch short.
    steps = math.ceil(train_clips / cfg.batch_size)
    clips_per_epoch = train_clips
    if cfg.max_steps_per_epoch and cfg.max_steps_per_epoch < steps:
        steps = cfg.max_steps_per_epoch
        clips_per_epoch = steps * cfg.batch_size
    schedule = cfg.epochs * clips_per_epoch * per_clip * 1e9
    views = cfg.eval_clips * cfg.eval_crops

    activations = _step_activation_bytes(model, cfg, num_classes)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    gradients = trainable
    optimizer = ADAMW_STATES * trainable
    return ComputeBudget(
        backbone=cfg.backbone,
        temporal=cfg.temporal,
        freeze_backbone=cfg.freeze_backbone,
        clip_shape=clip_shape,
        num_classes=num_classes,
        num_classes_source=classes_source,
        params_total=report.params_total,
        params_trainable=report.params_trainable,
        params_backbone=report.params_backbone,
        params_temporal=report.params_temporal,
        params_head=report.params_head,
        gflops_backbone=report.gflops_backbone,
        gflops_temporal=report.gflops_temporal,
        gflops_head=report.gflops_head,
        gflops_forward=report.gflops_total,
        gflops_frozen_forward=frozen_gflops,
        gflops_trainable_forward=trained_gflops,
        gflops_train_per_clip=per_clip,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        train_clips=train_clips,
        train_clips_source=clips_source,
        clips_per_epoch=clips_per_epoch,
        steps_per_epoch=steps,
        schedule_flops=schedule,
        eval_views=views,
        gflops_eval_per_video=views * report.gflops_total,
        activation_bytes=activations,
        weight_bytes=weights,
        trainable_weight_bytes=trainable,
        gradient_bytes=gradients,
        optimizer_bytes=optimizer,
        step_bytes=activations + weights + gradients + optimizer,
        weights_not_loaded=_configured_weights(cfg),
    )


def _configured_weights(cfg: TrainConfig) -> str:
    """The pretrained weights ``cfg`` would load in a real run, in words ("": none)."""
    if cfg.pretrained_path:
        there = "" if Path(cfg.pretrained_path).is_file() else ", not on this machine"
        return f"{cfg.pretrained_path!r}{there}"
    if cfg.pretrained:
        return f"{cfg.backbone}'s from its weights package"
    return ""
