"""The result table: frame-average, temporal-conv and PKS4 on the shipped benchmark tasks.

Trains each temporal module after the same frozen, ImageNet-pretrained efficientnet_lite0 on
the generated temporal-heavy task (the label is the direction of motion, so frame averaging is
at chance by construction) and the spatial-heavy task (the label is the content), evaluates,
and prints and saves one table: final-epoch and best-epoch validation top-1 (both named; the
motion suite reports the final epoch), the first epoch within a point of the best,
trainable parameters, GFLOPs per clip (forward) and training time. Also saves the validation
curves as a picture.

    python benchmarks/result_table.py            # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pks4_layers.models import model_report
from pks4_layers.train import TrainConfig, run

TASK_NOTES = {
    "temporal": "label = direction of motion (no order-free model can tell it)",
    "spatial": "label = content (source video)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", default="temporal,spatial")
    p.add_argument("--models", default="mean,tconv,pks4", help="temporal modules to compare")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone (tests only)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=96, help="frame size of the generated clips")
    p.add_argument("--train-clips", type=int, default=192)
    p.add_argument("--val-clips", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default="data/generated")
    p.add_argument("--runs-dir", default="runs/result_table")
    p.add_argument("--out", default="benchmarks/results/result_table")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, task: str, temporal: str) -> dict[str, Any]:
    cfg = TrainConfig(
        dataset="benchmark",
        data_root=args.data_root,
        benchmark_task=task,
        benchmark_size=args.size,
        benchmark_train=args.train_clips,
        benchmark_val=args.val_clips,
        num_frames=args.frames,
        crop_size=args.size,
        short_side=args.size,
        backbone=args.backbone,
        pretrained=not args.no_pretrained,
        temporal=temporal,
        freeze_backbone=True,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=1.0,
        seed=args.seed,
        output_dir=str(Path(args.runs_dir) / f"{task}-{temporal}"),
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - start
    report = model_report(result.model, (1, args.frames, 3, args.size, args.size))
    s = result.summary
    return {
        "task": task,
        "model": temporal,
        "val_top1": s["best_val_top1"],
        "final_val_top1": s["final_val_top1"],
        "epochs_to_best": s["epochs_to_best"],
        "params_trainable": s["params_trainable"],
        "gflops": report.gflops_total,
        "gflops_temporal": report.gflops_temporal,
        "train_time_s": s["train_time_s"],
        "wall_time_s": wall,
        "classes": s["classes"],
        "history": result.history,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| task | model | final-epoch val top-1 (%) | best-epoch val top-1 (%) | chance (%) "
        "| epochs to best | trainable params | GFLOPs/clip (temporal part) | train time (s) |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        # Both statistics, named: the motion suite reports the final epoch.
        lines.append(
            f"| {r['task']} | {r['model']} | {r['final_val_top1']:.1f} | {r['val_top1']:.1f} "
            f"| {100.0 / r['classes']:.1f} "
            f"| {r['epochs_to_best']} | {r['params_trainable'] / 1e6:.2f} M "
            f"| {r['gflops']:.3f} ({r['gflops_temporal']:.3f}) | {r['train_time_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            pts = [(h["epoch"], h["val_top1"]) for h in r["history"] if "val_top1" in h]
            ax.plot(*zip(*pts), "o-", label=r["model"])
        classes = next(r["classes"] for r in rows if r["task"] == task)
        ax.axhline(100.0 / classes, color="grey", ls=":", label="chance")
        ax.set_title(f"{task}: {TASK_NOTES.get(task, '')}", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    tasks = [t for t in args.tasks.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    rows = []
    for i, task in enumerate(tasks):
        for j, temporal in enumerate(models):
            n = i * len(models) + j + 1
            print(f"[{n}/{len(tasks) * len(models)}] {task} task, {temporal}", flush=True)
            rows.append(run_one(args, task, temporal))
    table = format_table(rows)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    config = dict(vars(args))
    out.with_suffix(".json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    saved = [out.with_suffix(".md"), out.with_suffix(".json")]
    if plot(rows, out.with_suffix(".png")):
        saved.append(out.with_suffix(".png"))
    print("saved " + ", ".join(str(p) for p in saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
