"""Top-k accuracy counts, the metrics history file and the curves picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of rows of ``logits`` (batch, classes) whose label is among the top k, per k
    (k capped at the number of classes)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return [int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


def write_metrics(path: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    path.write_text(json.dumps({"summary": summary, "history": history}, indent=2) + "\n")


def plot_curves(path: Path, history: list[dict[str, Any]], title: str = "") -> bool:
    """Loss and accuracy per epoch into a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "s-", label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_top1"] for h in history], "o-", label="train top-1")
    val = [(h["epoch"], h["val_top1"]) for h in history if h.get("val_top1") is not None]
    if val:
        ax_acc.plot(*zip(*val), "s-", label="val top-1")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
