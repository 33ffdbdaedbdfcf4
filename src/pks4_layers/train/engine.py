"""The training and evaluation loop behind ``pks4-train``.

``run(config)`` builds the data and the model, trains with AdamW and a warm-up + cosine
schedule (mixed precision where asked, gradient clipping), evaluates top-1/top-5 (multi-view
when the config asks), keeps ``metrics.json``, ``curves.png`` and checkpoints in
``output_dir``, and resumes from a checkpoint. The same function runs as one process and as
one rank of a ``torchrun`` job: data are sharded by :class:`ShardedSampler`, gradients averaged
by DistributedDataParallel, metrics summed across ranks, and only rank 0 writes.

Videos that cannot be decoded are skipped with a warning and counted per epoch
(``train_skipped``, ``val_skipped`` in the records), or stop the run with
``on_bad_video="raise"``; see :func:`train_one_epoch` for what a step with no good clip does.

Mistakes in the config or in the files it names (a missing folder, a dataset in another layout,
weights or a checkpoint that do not fit the model) raise :class:`~.errors.UsageError` before
any training starts: :func:`check_inputs` looks at every path first, so a run does not list a
dataset for minutes to then stop at a missing weights file.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ..layers.masked_batch_norm import convert_sync_masked_batch_norm
from ..models.classifier import factored_loss
from .checkpoint import check_checkpoint_fits, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import (
    DistEnv,
    ShardedSampler,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
)
from .errors import MissingPathError, UsageError, did_you_mean, first_sentence, one_line
from .metrics import plot_curves, topk_correct, write_metrics
from .optim import optimizer_param_groups
from .progress import Progress
from .schedule import warmup_cosine


@dataclass
class RunResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------- inputs
def _need_path(key: str, value: str, expected: str, folder: bool) -> None:
    """Raises :class:`MissingPathError` unless config key ``key`` names an existing folder
    (``folder``) or file."""
    if not value:
        raise MissingPathError(key, expected, "'' (not set)")
    path = Path(value)
    if folder and not path.is_dir():
        got = "a file, not a folder" if path.exists() else "no such folder"
        raise MissingPathError(key, expected, f"{value!r} ({got})")
    if not folder and not path.is_file():
        got = "a folder, not a file" if path.is_dir() else "no such file"
        raise MissingPathError(key, expected, f"{value!r} ({got})")


def check_inputs(cfg: TrainConfig, eval_only: bool = False) -> None:
    """Every file and folder ``cfg`` names exists and the backbone can be built, or a
    :class:`~.errors.UsageError` names the first that does not; reads no video and no weights.
    The generated benchmark's ``data_root`` is where it is written, so it is not checked."""
    if cfg.dataset == "folder":
        layout = "a folder of class folders (<class>/<video>.mp4)"
        _need_path("data_root", cfg.data_root, layout, folder=True)
        if cfg.val_root:
            _need_path("val_root", cfg.val_root, layout, folder=True)
        files = {
            "train_split": "a split file (<class>/<video> per line)",
            "val_split": "a split file (<class>/<video> per line)",
            "classes_file": "a class index file ('<id> <class>' per line)",
        }
        for key, expected in files.items():
            if getattr(cfg, key):
                _need_path(key, getattr(cfg, key), expected, folder=False)
    elif cfg.dataset == "ssv2":
        key = "video_dir" if cfg.video_dir else "data_root"
        _need_path(key, getattr(cfg, key), "a folder of SSv2 <id>.webm videos", folder=True)
        jsons = {
            "labels_json": "the SSv2 labels json (labels.json)",
            "train_json": "the SSv2 training split json (train.json)",
            "val_json": "the SSv2 validation split json (validation.json)",
        }
        for key, expected in jsons.items():
            _need_path(key, getattr(cfg, key), expected, folder=False)
    if cfg.pretrained_path:
        expected = f"a weights file of {cfg.backbone}"
        _need_path("pretrained_path", cfg.pretrained_path, expected, folder=False)
    if cfg.resume and cfg.resume != "auto":
        _need_path("resume", cfg.resume, "a checkpoint file (or 'auto')", folder=False)
    elif eval_only and not cfg.resume:
        raise UsageError("resume", "a checkpoint to evaluate with --eval-only", "none")
    check_backbone(cfg, load_weights=True)


def check_backbone(cfg: TrainConfig, load_weights: bool = True) -> None:
    """``cfg.backbone`` names a model that can be built offline with its ``pretrained``
    setting, or :class:`~.errors.UsageError` says why not (with the closest model name for a
    typo). ``load_weights``: the weights will be loaded (their package must be installed)."""
    from ..models.backbone import TORCHVISION_RESNETS

    name = cfg.backbone
    if name.startswith("tv_"):
        names = ["tv_" + arch for arch in TORCHVISION_RESNETS]
        if name not in names:
            raise UsageError("backbone", f"one of {names}{did_you_mean(name, names)}", repr(name))
        if cfg.pretrained or cfg.pretrained_path:
            raise UsageError(
                "pretrained",
                "false for a torchvision backbone (this library downloads nothing)",
                "pretrained weights for " + repr(name),
            )
        return
    if name.startswith(("hf-hub:", "hf_hub:", "http://", "https://")):
        raise UsageError(
            "backbone", "a local timm architecture name (a hub reference needs the network)", name
        )
    try:
        import timm
    except ImportError:
        raise UsageError(
            "backbone",
            f"timm installed to build {name!r} (pip install 'pks4-layers[timm]')",
            "no timm",
        ) from None
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        hint = did_you_mean(arch, timm.list_models())
        raise UsageError("backbone", f"a timm model name or tv_<resnet>{hint}", repr(name))
    if tag:
        tagged = timm.list_pretrained(f"{arch}.*")
        if name not in tagged:
            tags = [t.split(".", 1)[1] for t in tagged]
            shown = ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "")
            known = (
                f"one of the {len(tags)} tags timm knows for {arch} ({shown})"
                if tags
                else (f"no tag: timm knows none for {arch}")
            )
            raise UsageError("backbone", f"{known}{did_you_mean(tag, tags)}", repr(tag))
    if cfg.pretrained and not cfg.pretrained_path:
        if name != "efficientnet_lite0":
            raise UsageError(
                "pretrained",
                "true only for efficientnet_lite0 (nothing downloads: for another backbone set "
                "pretrained_path to a local weights file)",
                f"true for {name!r}",
            )
        if load_weights:
            from ..models.pretrained import efficientnet_lite0_checkpoint

            try:
                efficientnet_lite0_checkpoint()
            except (ImportError, FileNotFoundError) as err:
                # The message names the package and the pip command that installs it.
                raise UsageError(
                    "pretrained", "efficientnet_lite0's weights package", one_line(str(err))
                ) from err


# ----------------------------------------------------------------------------------- data
def build_samples(cfg: TrainConfig, env: DistEnv) -> tuple[list, list, list[str]]:
    """(train samples, val samples, class names) for the config's dataset layout."""
    from ..data import folder_samples, make_benchmark

    if cfg.dataset == "benchmark":
        # Global rank 0 writes the generated videos; the others wait, then find them (the call
        # is idempotent and returns at once when the manifest matches). On nodes that do not
        # share data_root with rank 0, the node's first process writes its own copy, so no
        # two processes of a node write at once.
        def generate() -> Path:
            return Path(
                make_benchmark(
                    cfg.data_root,
                    cfg.benchmark_task,
                    num_train=cfg.benchmark_train,
                    num_val=cfg.benchmark_val,
                    num_frames=cfg.num_frames,
                    size=cfg.benchmark_size,
                )
            )

        if env.is_main:
            generate()
        barrier(env)
        if env.local_rank == 0 and not env.is_main:
            generate()
        barrier(env)
        root = generate()
        videos, classes_file = root / "videos", root / "classInd.txt"
        train, classes = folder_samples(videos, root / "trainlist.txt", classes_file)
        # Choices (checkpoints, early stopping) are made on validation; the test list is left
        # for the numbers a user reports.
        val, _ = folder_samples(videos, root / "vallist.txt", classes_file)
    else:
        try:
            train, val, classes = _dataset_samples(cfg)
        except UsageError:
            raise
        except (FileNotFoundError, ValueError) as err:
            # The sample lists come from the user's folders and files only: what they reject
            # (a missing video, a line in another format, a wrong layout) is a usage error.
            kind = MissingPathError if isinstance(err, FileNotFoundError) else UsageError
            raise kind.from_error(err) from err
    return train, val, classes


def _dataset_samples(cfg: TrainConfig) -> tuple[list, list, list[str]]:
    """The samples of a folder or ssv2 dataset."""
    from ..data import folder_samples, ssv2_samples

    if cfg.dataset == "folder":
        classes_file = cfg.classes_file or None
        train, classes = folder_samples(cfg.data_root, cfg.train_split or None, classes_file)
        val_root = cfg.val_root or cfg.data_root
        val, val_classes = folder_samples(val_root, cfg.val_split or None, classes_file)
        if list(val_classes) != list(classes):
            raise UsageError(
                "val_root",
                f"the class folders of data_root ({len(classes)} classes)",
                f"{len(val_classes)} different ones in {val_root!r} (pass classes_file)",
            )
    else:  # ssv2
        video_dir = cfg.video_dir or cfg.data_root
        train, classes = ssv2_samples(video_dir, cfg.train_json, cfg.labels_json)
        val, _ = ssv2_samples(video_dir, cfg.val_json, cfg.labels_json)
    return train, val, classes


def build_datasets(
    cfg: TrainConfig,
    train: list,
    val: list,
    classes: list[str],
    normalisation: tuple[tuple, tuple],
) -> tuple[Dataset, Dataset]:
    """The training and validation datasets; ``normalisation`` is the backbone's (mean, std).
    A flipped SSv2 clip swaps the labels of its left/right classes ("Pushing something from
    left to right" becomes "... from right to left")."""
    from ..data import SSV2_FLIP_PAIRS, VideoClipDataset, flip_label_map

    mean, std = normalisation
    common = dict(
        num_frames=cfg.num_frames,
        sampling=cfg.sampling,
        frame_stride=cfg.frame_stride,
        crop_size=cfg.crop_size,
        short_side=cfg.short_side,
        seed=cfg.seed,
        mean=mean,
        std=std,
        on_error=cfg.on_bad_video,
    )
    label_map = None
    if cfg.flip and cfg.dataset == "ssv2":
        label_map = flip_label_map(classes, SSV2_FLIP_PAIRS)
    train_ds = VideoClipDataset(
        train, train=True, flip=cfg.flip, flip_label_map=label_map, **common
    )
    val_ds = VideoClipDataset(
        val, train=False, num_clips=cfg.eval_clips, num_crops=cfg.eval_crops, **common
    )
    return train_ds, val_ds


def backbone_normalisation(model: nn.Module) -> tuple[tuple, tuple]:
    """The (mean, std) the backbone was trained with (a timm model's ``pretrained_cfg``),
    ImageNet's otherwise."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD

    inner = getattr(getattr(model, "backbone", None), "model", None)
    cfg = getattr(inner, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    return tuple(mean), tuple(std)


def worker_start_method(workers: int) -> Optional[str]:
    """How the DataLoader starts its ``workers``: ``"forkserver"`` where the platform has it,
    the platform's default otherwise (spawn on Windows and macOS); ``None`` without workers.

    Not ``fork``: the training process has decoded or written videos (PyAV, FFmpeg's threads)
    and run torch's thread pools before the loader starts; a forked worker inherits their locks
    in whatever state they were, and one held at the fork makes the worker wait forever. A
    forkserver worker starts from a clean process that has run none of it."""
    if workers == 0:
        return None
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


def _loader(ds: Dataset, sampler: ShardedSampler, cfg: TrainConfig, env: DistEnv) -> DataLoader:
    from ..data import collate_skipping_bad

    # Batches are (clips, labels, num_skipped): the items of undecodable videos are dropped.
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        collate_fn=collate_skipping_bad,
        multiprocessing_context=worker_start_method(cfg.workers),
    )


def _unpack(batch: Any) -> tuple[Optional[Tensor], Optional[Tensor], int]:
    """``(clips, labels, num_skipped)`` of a ``collate_skipping_bad`` batch; a plain
    ``(clips, labels)`` batch (any other loader) has nothing skipped."""
    if len(batch) == 3:
        clips, labels, skipped = batch
        return clips, labels, int(skipped)
    clips, labels = batch
    return clips, labels, 0


# ---------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, num_classes: int, random_weights: bool = False) -> nn.Module:
    """The config's classifier. ``random_weights``: the same architecture without loading the
    pretrained weights (``--dry-run``: needs neither the weights file nor its package)."""
    from ..models import PKS4VideoClassifier

    check_backbone(cfg, load_weights=not random_weights)
    backbone: Union[str, nn.Module] = cfg.backbone
    pretrained: Union[bool, str] = cfg.pretrained_path or cfg.pretrained
    if random_weights:
        pretrained = False
        if cfg.pretrained and not cfg.pretrained_path and cfg.backbone == "efficientnet_lite0":
            from ..models.pretrained import efficientnet_lite0

            # Its weights go into timm's tf_efficientnet_lite0 (TensorFlow "same" padding),
            # not efficientnet_lite0: build that architecture, without them.
            backbone = efficientnet_lite0(pretrained=False)
    try:
        model = PKS4VideoClassifier(
            backbone,
            num_classes=num_classes,
            num_frames=cfg.num_frames,
            temporal=cfg.temporal,
            freeze_backbone=cfg.freeze_backbone,
            drop_rate=cfg.drop_rate,
            block_kwargs=cfg.block_kwargs(),
            pretrained=pretrained,
            readout=cfg.readout_arg(),
            preset=cfg.preset_arg(),
            backbone_norm=cfg.backbone_norm_arg(),
        )
    except Exception as err:
        usage = _weights_file_error(cfg, err) if isinstance(pretrained, str) else None
        if usage is None:
            raise
        raise usage from err
    if cfg.tune_last_blocks:
        try:
            model.tune_last_blocks(cfg.tune_last_blocks)
        except ValueError as err:
            # A backbone without timm's blocks, or fewer blocks than asked: the config's value.
            usage = UsageError.from_error(err)
            raise UsageError("tune_last_blocks", usage.expected, usage.got) from err
    return model


# A line of torch's load_state_dict error: "size mismatch for bn1.weight: copying a param with
# shape torch.Size([64]) from checkpoint, the shape in current model is torch.Size([32])."
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _weights_file_error(cfg: TrainConfig, err: Exception) -> Optional[UsageError]:
    """A :class:`UsageError` when building the backbone failed on ``cfg.pretrained_path``
    (tensors of another model, a file that is not weights); ``None`` when the file reads and
    the failure is something else, which stays a bug with its traceback."""
    path, expected = cfg.pretrained_path, f"weights of {cfg.backbone}"
    text = str(err)
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in text:
        sizes = _SIZE_MISMATCH.findall(text)
        if sizes:
            name, theirs, ours = sizes[0]
            got = f"{len(sizes)} tensor(s) of other shapes, e.g. {name}: {theirs} in the file, "
            got += f"{ours} in the model"
        else:
            got = first_sentence(text.split("\n", 1)[-1])  # missing / unexpected keys
        return UsageError("pretrained_path", expected, f"{path!r}, which does not fit: {got}")
    try:
        from timm.models import load_state_dict

        load_state_dict(path)
    except Exception as probe:
        reason = first_sentence(str(probe)) or type(probe).__name__
        got = f"{path!r}, not a readable weights file ({reason})"
        return UsageError("pretrained_path", expected, got)
    return None


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision. "auto": bf16 on GPUs that support it."""
    if cfg.amp == "off":
        return None
    if cfg.amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ------------------------------------------------------------------------------ one epoch
def _zero_loss(
    model: nn.Module, cfg: TrainConfig, env: DistEnv, amp_dtype: Optional[torch.dtype]
) -> Tensor:
    """A loss of exactly zero with a real step's autograd graph, for a DDP rank whose batch
    held no decodable clip.

    DistributedDataParallel needs every rank to run forward (it broadcasts the buffers there)
    and backward (the gradient all-reduce) the same number of times, or the other ranks wait
    forever. A loss made from the parameters alone (``sum(p.sum() * 0)``) is not enough: the
    all-reduce hooks only fire after a forward through the DDP wrapper. So this rank runs one
    clip of zeros ``(1, T, 3, S, S)`` through the model, in eval mode so that batch-norm
    statistics do not learn from it, and multiplies the logits by 0: it contributes zero
    gradients, and the step's gradient is the other ranks' sum over the world size.
    """
    dummy = torch.zeros(1, cfg.num_frames, 3, cfg.crop_size, cfg.crop_size, device=env.device)
    model.eval()
    try:
        with _autocast(env.device, amp_dtype):
            logits = model(dummy)
    finally:
        model.train()
    return logits.float().sum() * 0.0


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Optional[torch.amp.GradScaler],
    cfg: TrainConfig,
    env: DistEnv,
    amp_dtype: Optional[torch.dtype],
    epoch: int,
    accum_steps: int = 1,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss, top-1 and the number of skipped videos,
    summed across ranks.

    One optimizer step accumulates the gradients of ``accum_steps`` consecutive micro-batches,
    each loss divided by ``accum_steps``, so the step's gradient is the mean over its global
    batch as if it had been one batch. Under DDP the gradient all-reduce runs only on the last
    micro-batch (``no_sync()`` on the others). The schedule steps once per optimizer step.

    Items of undecodable videos are dropped from their batch (``collate_skipping_bad``), so a
    micro-batch averages the loss over the clips that remain. A micro-batch that lost every
    clip: in one process it adds nothing, and a step whose micro-batches all lost every clip is
    skipped with its schedule step (the schedule then ends that many steps short of its
    floor); under DDP the rank takes part with a zero loss (:func:`_zero_loss`), since the
    other ranks' gradient all-reduce waits for it (when every rank's batches are empty, that
    step moves the weights by AdamW's momentum and decay only).
    """
    model.train()
    steps = len(loader) // accum_steps
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, count, skipped
    desc = f"epoch {epoch + 1}/{cfg.epochs} train"
    # The readout the model was built with (the preset's, unless the config names one).
    is_factored = getattr(getattr(model, "module", model), "readout", "output") == "factored"
    batches = iter(loader)
    with Progress(steps, desc, enabled=cfg.progress and env.is_main) as bar:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            backward_passes = 0
            step_loss, step_count = 0.0, 0
            for micro in range(accum_steps):
                clips, labels, skipped = _unpack(next(batches))
                totals[3] += skipped
                if clips is not None:
                    clips = clips.to(env.device, non_blocking=True)
                    labels = labels.to(env.device, non_blocking=True)
                elif not env.distributed:
                    continue
                # Every DDP rank must run the same forward/backward passes, and all of them
                # must sync on the same (last) one, or the others wait forever.
                last = micro == accum_steps - 1
                sync = contextlib.nullcontext()
                if env.distributed and not last:
                    sync = model.no_sync()
                with sync:
                    if clips is not None:
                        with _autocast(env.device, amp_dtype):
                            factored = {"return_heads": True} if is_factored else {}
                            logits = model(clips, **factored)
                        if is_factored:
                            # Each head on its own loss (the wrapper ran, so DDP's hooks did).
                            loss = factored_loss(*logits, labels)
                            logits = _unwrap(model).combine_heads(*logits)
                        else:
                            loss = F.cross_entropy(logits.float(), labels)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"training loss is {loss.item()} at epoch {epoch + 1}, "
                                f"step {step + 1}, micro-batch {micro + 1}"
                            )
                    else:
                        loss = _zero_loss(model, cfg, env, amp_dtype)
                    scaled = loss / accum_steps
                    if scaler is not None:
                        scaled = scaler.scale(scaled)
                    scaled.backward()
                backward_passes += 1
                if clips is not None:
                    n = labels.shape[0]
                    correct = topk_correct(logits.detach(), labels, (1,))[0]
                    batch_totals = [loss.item() * n, correct, n]
                    totals[:3] += torch.tensor(batch_totals, dtype=torch.float64)
                    step_loss += loss.item() * n
                    step_count += n
            if backward_passes == 0:  # one process, every clip of the step undecodable
                bar.update(lr=optimizer.param_groups[0]["lr"])
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                params = [p for p in model.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if step_count:
                bar.update(loss=step_loss / step_count, lr=optimizer.param_groups[0]["lr"])
            else:
                bar.update(lr=optimizer.param_groups[0]["lr"])
    loss_sum, correct, count, skipped = all_reduce_sum(totals, env).tolist()
    return {
        "train_loss": loss_sum / max(count, 1),
        "train_top1": 100.0 * correct / max(count, 1),
        "train_skipped": int(skipped),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    env: DistEnv,
    amp_dtype: Optional[torch.dtype],
    desc: str = "eval",
    calibrate: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 and loss over the loader, summed across ranks. Multi-view clips
    ``(B, V, T, 3, S, S)`` are scored by the mean of the views' softmax. Undecodable videos
    are left out of the metrics and counted (``val_skipped``); evaluation runs no collective
    per step, so ranks may take different numbers of forward passes.

    ``calibrate`` (a ``readout="factored"`` model): the two heads' weights are first fitted on
    these clips (:meth:`~pks4_layers.models.PKS4VideoClassifier.calibrate_readout`, every
    view a sample, the logits of every rank gathered, so all ranks fit the same weights), and
    the metrics are those of the calibrated model: the clips are then where the weights were
    fitted. One forward pass: the heads' logits are kept until the weights are known."""
    model.eval()
    base = _unwrap(model)
    calibrate = calibrate and getattr(base, "motion_head", None) is not None
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, top1, top5, count, skipped
    kept: list[tuple[Tensor, Tensor, Tensor, int]] = []  # content, motion, labels, views
    with Progress(len(loader), desc, enabled=cfg.progress and env.is_main) as bar:
        for batch in loader:
            clips, labels, skipped = _unpack(batch)
            totals[4] += skipped
            if clips is None:
                bar.update()
                continue
            clips = clips.to(env.device, non_blocking=True)
            labels = labels.to(env.device, non_blocking=True)
            views = 1
            if clips.dim() == 6:
                views = clips.shape[1]
                clips = clips.flatten(0, 1)
            with _autocast(env.device, amp_dtype):
                if calibrate:
                    content, motion = model(clips, return_heads=True)
                    kept.append((content.float().cpu(), motion.float().cpu(), labels.cpu(), views))
                    bar.update()
                    continue
                logits = model(clips)
            totals[:4] += _scores(logits, labels, views)
            bar.update()
    if calibrate:
        content, motion, labels = _gather_heads(kept, env)
        if labels.numel():
            base.calibrate_readout(content, motion, labels)
        for content, motion, labels, views in kept:
            logits = base.combine_heads(content, motion)
            totals[:4] += _scores(logits, labels, views)
    loss_sum, top1, top5, count, skipped = all_reduce_sum(totals, env).tolist()
    count = max(count, 1)
    return {
        "val_loss": loss_sum / count,
        "val_top1": 100.0 * top1 / count,
        "val_top5": 100.0 * top5 / count,
        "val_skipped": int(skipped),
    }


def _scores(logits: Tensor, labels: Tensor, views: int) -> Tensor:
    """Loss sum, top-1 and top-5 hits and count of a batch, the views' softmax averaged."""
    probs = logits.float().softmax(dim=-1)
    probs = probs.view(labels.shape[0], views, -1).mean(dim=1)
    labels = labels.to(probs.device)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
    top1, top5 = topk_correct(probs, labels, (1, 5))
    return torch.tensor([loss.item(), top1, top5, labels.shape[0]], dtype=torch.float64)


def _gather_heads(
    kept: list[tuple[Tensor, Tensor, Tensor, int]], env: DistEnv
) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's kept heads' logits, one row per view, with each view's label: the same
    tensors on every rank."""
    rows = [
        (content, motion, labels.repeat_interleave(views))
        for content, motion, labels, views in kept
    ]
    if env.distributed:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    if not rows:
        return torch.empty(0, 0), torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    content, motion, labels = (torch.cat(part) for part in zip(*rows))
    return content, motion, labels


# ------------------------------------------------------------------------------ the run
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def run(cfg: TrainConfig, eval_only: bool = False) -> RunResult:
    """Trains (or, with ``eval_only``, evaluates ``cfg.resume``) and returns the model, the
    per-epoch history and a summary. Joins a process group when launched by torchrun."""
    cfg.validate()
    check_inputs(cfg, eval_only)
    env = init_distributed(cfg.device)
    try:
        return _run(cfg, env, eval_only)
    finally:
        cleanup(env)


def _run(cfg: TrainConfig, env: DistEnv, eval_only: bool) -> RunResult:
    out_dir = Path(cfg.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # A global batch that the processes cannot split evenly fails here, before any data work.
    accum_steps = cfg.accum_steps(env.world_size)
    global_batch = cfg.effective_global_batch(env.world_size)
    train_samples, val_samples, classes = build_samples(cfg, env)
    model = build_model(cfg, len(classes)).to(env.device)
    normalisation = backbone_normalisation(model)
    train_ds, val_ds = build_datasets(cfg, train_samples, val_samples, classes, normalisation)
    params_total, params_trainable = count_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model: expected some trainable parameters, got none")

    train_sampler = ShardedSampler(
        len(train_ds),
        shuffle=True,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        drop_last=True,
        batch_size=cfg.batch_size,
        accum_steps=accum_steps,
    )
    if len(train_sampler) == 0:
        raise UsageError(
            "batch_size",
            f"a global batch of at most {len(train_ds)} training clips",
            f"batch_size {cfg.batch_size} x world size {env.world_size} x "
            f"{accum_steps} accumulation step(s) = {global_batch}",
        )
    val_sampler = ShardedSampler(len(val_ds), False, rank=env.rank, world_size=env.world_size)
    train_loader = _loader(train_ds, train_sampler, cfg, env)
    val_loader = _loader(val_ds, val_sampler, cfg, env)

    # Optimizer steps, not micro-batches: the schedule moves once per global batch.
    steps_per_epoch = len(train_loader) // accum_steps
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    # Weight decay on the weight matrices only: not on what the model's no_weight_decay() names
    # (norms, biases, the scan's A_log, D and dt bias, learnt time embeddings); a learning rate
    # per part (a backbone that trains learns slower than the module and the head).
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_scales=cfg.lr_scales()
        ),
        lr=cfg.lr,
    )
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        total_steps=cfg.epochs * steps_per_epoch,
        min_ratio=cfg.min_lr_ratio,
    )
    amp_dtype = autocast_dtype(cfg, env.device)
    scaler = None
    if amp_dtype == torch.float16:
        scaler = torch.amp.GradScaler(env.device.type)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    resume = cfg.resume
    if resume == "auto":
        last = out_dir / "checkpoint_last.pt"
        resume = str(last) if last.is_file() else ""
        _check_same_resume(bool(resume), env)
    if resume:
        state = load_checkpoint(resume)
        training = not eval_only
        check_checkpoint_fits(model, state, resume, cfg.to_dict(), classes, training)
        model.load_state_dict(state["model"])
        if training:
            _warn_if_global_batch_changed(state, global_batch, resume, env)
            try:
                optimizer.load_state_dict(state["optimizer"])
            except ValueError as err:
                # The weights fit but another set of them trains (freeze_backbone,
                # tune_last_blocks changed since the checkpoint), or they are grouped by other
                # learning rates.
                saved = state.get("config") or {}
                keys = (
                    "freeze_backbone",
                    "tune_last_blocks",
                    "backbone_lr_scale",
                    "temporal_lr_scale",
                )
                then = ", ".join(f"{k} {saved.get(k, '?')}" for k in keys)
                now = ", ".join(f"{k} {getattr(cfg, k)}" for k in keys)
                raise UsageError(
                    f"resume {resume}",
                    f"optimizer state for this run's trainable parameters and rates ({now})",
                    f"one for others ({then}): {one_line(str(err))}",
                ) from err
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            history = list(state.get("history", []))
    elif eval_only:
        raise UsageError(
            "resume", "a checkpoint to evaluate with --eval-only", f"none in {str(out_dir)!r}"
        )

    base = _unwrap(model)
    if env.distributed:
        # The motion cues' batch statistics over every process's clips: N processes then
        # standardise as one process with the global batch would (accumulated micro-batches
        # still have their own, as with BatchNorm).
        convert_sync_masked_batch_norm(model)
        model = DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None
        )

    summary: dict[str, Any] = {
        "classes": len(classes),
        "params_total": params_total,
        "params_trainable": params_trainable,
        "world_size": env.world_size,
        "global_batch": global_batch,
        "accum_steps": accum_steps,
        "normalisation": {"mean": list(normalisation[0]), "std": list(normalisation[1])},
        "config": cfg.to_dict(),
    }
    if eval_only:
        metrics = evaluate(model, val_loader, cfg, env, amp_dtype)
        summary.update(metrics)
        return RunResult(base, history, summary)

    best = max((h["val_top1"] for h in history if h.get("val_top1") is not None), default=-1.0)
    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        train_sampler.set_epoch(epoch)
        for ds in (train_ds, val_ds):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
        t0 = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        record.update(
            train_one_epoch(
                model,
                train_loader,
                optimizer,
                scheduler,
                scaler,
                cfg,
                env,
                amp_dtype,
                epoch,
                accum_steps,
            )
        )
        record["train_time_s"] = time.perf_counter() - t0
        # The optimizer steps taken so far: a resumed run continues the count and the schedule.
        record["step"] = int(scheduler.last_epoch)
        record["world_size"] = env.world_size
        record["global_batch"] = global_batch
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            record.update(
                evaluate(
                    model,
                    val_loader,
                    cfg,
                    env,
                    amp_dtype,
                    "         eval",
                    calibrate=cfg.calibrate_readout,
                )
            )
        history.append(record)
        improved = record.get("val_top1") is not None and record["val_top1"] > best
        if improved:
            best = record["val_top1"]
        if env.is_main:
            _log_epoch(record, cfg.epochs)
            state = {
                "model": base.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "step": int(scheduler.last_epoch),
                "world_size": env.world_size,
                "global_batch": global_batch,
                "config": cfg.to_dict(),
                "history": history,
                "classes": list(classes),
            }
            save_checkpoint(out_dir / "checkpoint_last.pt", state)
            if improved:
                save_checkpoint(out_dir / "checkpoint_best.pt", state)
            summary.update(summarize(history))
            summary["train_time_s"] = sum(h["train_time_s"] for h in history)
            write_metrics(out_dir / "metrics.json", history, summary)
            plot_curves(out_dir / "curves.png", history, f"{cfg.temporal} on {cfg.dataset}")
        barrier(env)
    summary.update(summarize(history))
    summary["train_time_s"] = sum(h["train_time_s"] for h in history)
    summary["wall_time_s"] = time.perf_counter() - run_start
    return RunResult(base, history, summary)


def _check_same_resume(found: bool, env: DistEnv) -> None:
    """``resume="auto"`` must pick the same thing on every rank: a rank that starts over while
    the others resume would train a different model (and, under DDP, fall out of step)."""
    if not env.distributed:
        return
    count = int(all_reduce_sum(torch.tensor([float(found)]), env).item())
    if count not in (0, env.world_size):
        raise UsageError(
            "resume",
            f"'auto' to find output_dir's checkpoint on all {env.world_size} processes or on "
            "none (a run over several nodes needs output_dir on a file system they share)",
            f"{count} of {env.world_size}",
        )


def _warn_if_global_batch_changed(
    state: dict[str, Any], global_batch: int, source: str, env: DistEnv
) -> None:
    """A resume may change the world size (the accumulation makes up for it), but a different
    global batch changes the steps per epoch and the gradient noise under the saved schedule
    and optimizer state: allowed, since it may be intended, but said."""
    saved = state.get("global_batch")  # absent from checkpoints written before it was recorded
    if saved is None or int(saved) == global_batch or not env.is_main:
        return
    warnings.warn(
        f"{source}: resuming with global_batch {global_batch}, but the checkpoint was trained "
        f"with {saved} (world size {state.get('world_size')}); set global_batch to {saved} "
        "to continue the same run",
        stacklevel=2,
    )


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Best and final validation top-1, and the first epoch that reached the best to within a
    point (how fast the method gets there)."""
    evals = [h for h in history if h.get("val_top1") is not None]
    if not evals:
        return {}
    best = max(h["val_top1"] for h in evals)
    best_record = next(h for h in evals if h["val_top1"] == best)
    reached = next(h["epoch"] for h in evals if h["val_top1"] >= best - 1.0)
    return {
        "best_val_top1": best,
        "best_val_top5": best_record["val_top5"],
        "best_epoch": best_record["epoch"],
        "epochs_to_best": reached,
        "final_val_top1": evals[-1]["val_top1"],
    }


def _log_epoch(record: dict[str, Any], epochs: int) -> None:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    parts.append(f"train top-1 {record['train_top1']:.1f}%")
    if record.get("val_top1") is not None:
        parts.append(f"val loss {record['val_loss']:.4f}")
        parts.append(f"val top-1 {record['val_top1']:.1f}% top-5 {record['val_top5']:.1f}%")
    skipped = [
        f"{record[key]} {split}"
        for key, split in (("train_skipped", "train"), ("val_skipped", "val"))
        if record.get(key)
    ]
    if skipped:
        parts.append(f"skipped bad videos: {', '.join(skipped)}")
    parts.append(f"{record['train_time_s']:.1f}s")
    print(" | ".join(parts), flush=True)
