"""The motion suite: does a temporal module learn motion, on held-out content, on every seed?

Trains temporal modules on the generated tasks of :func:`pks4_layers.data.make_benchmark`
(real footage and photographs; training, validation and test clips cut from disjoint source
material, at disjoint speeds; see the benchmark's docstring), several seeds each, in two regimes:

``frozen``
    the method's own: the ImageNet-pretrained ``efficientnet_lite0`` (frozen, eval mode) runs
    once per clip; its last feature map (1280 channels, stride 32) is cached and every module
    trains on the same features. Only the temporal module and the linear head train.
``scratch``
    a small CNN (4 stride-2 convolutions with BatchNorm, 128 channels, stride 16) trained from
    scratch together with the temporal module and the head, on the clips resized to
    ``--scratch-size``: the temporal module carries the whole temporal signal and the
    backbone learns what to feed it.

Every task but ``spatial`` is temporal: its label is a direction, a sense of rotation, an order
or an onset, and no single frame tells it (tested). A run's seed draws its clips (the same
source split, new windows, speeds and phases), its initialisation and its batch order; two
models with the same seed see the same clips, so they are compared paired.

Splits: every choice (ablations, defaults, learning rates) is made on ``val``, the split
reported by default; ``--report-split test`` evaluates each final model once on the test clips
and reports those (``make suite``). The tables give, per regime, task and model, the reported
split's top-1 (mean over seeds) with a 95% interval (a bootstrap over seeds and clips,
:mod:`suite_stats`), the worst seed, and the paired difference from ``pks4`` on the same clips
with its interval ("no difference" when it includes zero); per regime and model, the same over
the mean of the temporal tasks. The JSON keeps every run's curve and per-clip correctness; the
picture shows the validation curves.

Models are the names of :data:`VARIANTS`: ``mean`` (frame average), ``tconv``, ``pks4`` (the
default ``PKS4Block``), the ablations, each a set of ``PKS4Block`` arguments (and of training
options such as the block's learning-rate factor), and two references that learn nothing but a
logistic regression on the frozen features' cost volume: ``probe`` (averaged over space) and
``probe_local`` (every location kept).

    python benchmarks/motion_suite.py                          # the default suite, on val
    python benchmarks/motion_suite.py --report-split test      # the reported numbers
    python benchmarks/motion_suite.py --full --report-split test   # the full matrix
    python benchmarks/motion_suite.py --regimes frozen --models pks4,pks4_gate --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pks4_layers.bench.timing import saved_tensor_bytes, time_ms
from pks4_layers.data import make_benchmark, read_frames
from pks4_layers.data.benchmark import TASKS
from pks4_layers.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pks4_layers.layers.kinematic_prior import local_correlation
from pks4_layers.models import (
    PRESETS,
    PKS4VideoClassifier,
    create_temporal,
    preset_block_kwargs,
    resolve_preset,
)
from pks4_layers.models.backbone import Features, FrameBackbone, create_backbone
from pks4_layers.models.classifier import READOUTS, ClassifierHead, factored_loss
from pks4_layers.models.flops import count_flops
from pks4_layers.models.temporal_heads import PEER_KINDS, inner_dim_for_params, temporal_num_params
from pks4_layers.train.optim import optimizer_param_groups

# suite_stats lives beside this script (benchmarks/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_stats
import suite_targets

REGIMES = ("frozen", "scratch", "finetune")
DEFAULT_REGIMES = ("frozen", "scratch")
TEMPORAL_TASKS = (
    "temporal",
    "subcell",
    "object",
    "background",
    "rotation",
    "onset",
    "event",
    "shuttle",
)
DEFAULT_TASKS = (*TEMPORAL_TASKS, "spatial")
DEFAULT_MODELS = ("mean", "probe", "probe_local", "tconv", "pks4")
# The references: a logistic regression on the frozen features; no scratch run.
PROBES = ("probe", "probe_local")
# ``--full``: every default task and model at 240 clips per split, five seeds, and the preset
# the scratch regime was measured with.
FULL = {
    "train_clips": 240,
    "val_clips": 240,
    "test_clips": 240,
    "seeds": "0,1,2,3,4",
    "models": ",".join((*DEFAULT_MODELS, "pks4_selection_only")),
}
# ``--peers``: PKS4 against the temporal modules users would insert instead, in all three
# regimes, on the tasks some model or probe reads (object and background stay at chance for
# every model and probe of the default suite: they separate nothing).
# Fine-tuning runs the backbone's backward too (about 140 s a run on 2 cores against 15-50 s):
# by default it trains the frame average, the two peers users insert most (TSM, temporal
# attention), the scan without the prior and PKS4; ``--finetune-models all`` runs every model.
PEER_MATRIX = {
    "regimes": ",".join(REGIMES),
    "tasks": "temporal,subcell,rotation,onset,shuttle,spatial",
    "models": ",".join(("mean", "probe", "probe_local", "tconv", *PEER_KINDS, "pks4")),
    "finetune_models": "mean,tsm,attention,scan,pks4",
}
# Epochs per regime: what the classifier's default (the content-free prior, preset
# motion_only) needs to fit; 8 leave it short in every regime (docs/motion_suite.md). Every
# model of a regime trains as long.
DEFAULT_EPOCHS = "frozen=24,finetune=16,scratch=16"
REFERENCE = "pks4"  # every row's paired comparison is against it


@dataclass(frozen=True)
class Variant:
    """A temporal module to measure: ``temporal`` kind, its constructor arguments, training
    options (``block_lr_scale``: the temporal module's learning rate over the head's) and what
    the linear head reads (``head_reads``: ``"output"``, the module's output as users run it;
    ``"contribution"``, the output minus the module's input, so that the backbone's features
    reach the head only through what the module makes of them: a diagnostic;
    ``"content_drop"``, the output, except that in training the module's input is left out of
    what the head reads for a random ``CONTENT_DROP`` of the clips, so that the label must be
    read from what the module adds there: a regulariser against the content shortcut;
    ``"two_stream"``, the module's input and its contribution pooled and layer-normalised
    apart, side by side (a head twice as wide): what the module adds reaches the head at the
    scale of the features, however much smaller it is (down to LayerNorm's eps);
    ``"two_heads"``, the classifier's ``readout="factored"``: two linear heads, one on the
    module's input and one on its contribution, each trained on its own loss (so the content
    cannot stand in for the motion), their log-probabilities summed, the motion head with a
    LayerNorm as first measured; ``"two_heads_raw"``, the classifier's factored readout as it
    is (also what ``--readout factored`` gives): no LayerNorm in the motion head, whose input,
    the contribution, is zero when the block is created, where a LayerNorm's gain is
    1/sqrt(eps)). ``preset``: the classifier's (``None``: its default, ``motion_only``; the
    ablations of PKS4Block's defaults name ``"features"``)."""

    temporal: str
    block_kwargs: tuple[tuple[str, Any], ...] = ()
    block_lr_scale: float = 1.0
    note: str = ""
    head_reads: str = "output"
    preset: Optional[str] = None

    def kwargs(self) -> dict[str, Any]:
        return dict(self.block_kwargs)


READOUT_SCALES = ("fit", "ones")
HEAD_READS = ("output", "contribution", "content_drop", "two_stream", "two_heads", "two_heads_raw")
FACTORED_READS = ("two_heads", "two_heads_raw")  # the classifier's readout="factored"
# The share of training clips whose head input is the module's contribution alone (no rescaling
# of the rest: at evaluation the head reads the output, as users run it).
CONTENT_DROP = 0.5


def _pks4(
    note: str,
    block_lr_scale: float = 1.0,
    head_reads: str = "output",
    preset: Optional[str] = "features",
    **kwargs: Any,
) -> Variant:
    if head_reads not in HEAD_READS:
        raise ValueError(f"head_reads: expected one of {list(HEAD_READS)}, got {head_reads!r}")
    items = tuple(sorted(kwargs.items()))
    return Variant("pks4", items, block_lr_scale, note, head_reads, preset)


# The scan reads a prior of cosine similarities alone (unreduced cost volume, its displacement
# and their change): no learnt function of the content reaches it.
MOTION_ONLY: dict[str, Any] = {
    "scan_input": "prior",
    "corr_dim": None,
    "cues": ("cost", "displacement", "change"),
}
# The same prior with the curl and divergence of the displacement field.
MOTION_ONLY_CURL: dict[str, Any] = {
    **MOTION_ONLY,
    "cues": ("cost", "displacement", "change", "curl"),
}

VARIANTS: dict[str, Variant] = {
    "mean": Variant("mean", note="frame average (order-free)"),
    "probe": Variant(
        "probe", note="logistic regression on the raw features' cost volume, averaged over space"
    ),
    "probe_local": Variant(
        "probe_local", note="logistic regression on the raw features' cost volume per location"
    ),
    "tconv": Variant("tconv", note="residual depthwise temporal conv, kernel 3"),
    # The peers (pks4_layers.baselines), each sized to PKS4's parameters at the backbone's width.
    "frame_mlp": Variant("frame_mlp", note="per-frame bottleneck MLP, no temporal mixing"),
    "tsm": Variant("tsm", note="temporal shift (1/8 each way), then a bottleneck MLP"),
    "adapter": Variant("adapter", note="ST-Adapter: down, depthwise temporal conv 3, GELU, up"),
    "attention": Variant("attention", note="divided temporal self-attention per location"),
    "scan": Variant("scan", note="PKS4Block without its kinematic prior"),
    "prior_adapter": Variant(
        "prior_adapter",
        # The prior of the classifier's default, whatever its cues are today.
        tuple(
            (k, PRESETS["motion_only"].block_kwargs[k]) for k in ("corr_dim", "cues", "motion_norm")
        ),
        note="the kinematic prior of PKS4's default (its cues, no learnt reduction) fed to the "
        "adapter",
    ),
    "st_scan": Variant("st_scan", note="VideoMamba: one bidirectional scan over T*H*W tokens"),
    "pks4": _pks4("PKS4VideoClassifier's defaults (preset motion_only)", preset=None),
    "pks4_preset_features": _pks4("preset features: PKS4Block's defaults, one head"),
    "pks4_default_motion_raw": _pks4(
        "PKS4VideoClassifier's defaults, the motion cues not standardised (motion_norm='none', "
        "the preset before it chose 'batch')",
        preset=None,
        motion_norm="none",
    ),
    "pks4_default_lr_x3": _pks4(
        "PKS4VideoClassifier's defaults, the block's learning rate x3 (pks4-train "
        "--temporal-lr-scale 3)",
        block_lr_scale=3.0,
        preset=None,
    ),
    "pks4_no_flow": _pks4(
        "PKS4VideoClassifier's defaults without the gradient-flow cue (the preset before it)",
        preset=None,
        cues=("cost", "displacement", "change", "curl"),
    ),
    "pks4_preset_motion_only": _pks4(
        "preset motion_only: content-free prior with the curl and flow cues, factored readout",
        preset="motion_only",
    ),
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
    # what the prior correlates and which relative motion it reads (research cues)
    "pks4_unreduced": _pks4(
        "cost volume on the block's own features (no learnt reduction)", corr_dim=None
    ),
    "pks4_curl": _pks4(
        "with the curl and divergence of the displacement field",
        cues=("cost", "displacement", "difference", "change", "curl"),
    ),
    "pks4_unreduced_curl": _pks4(
        "both: unreduced cost volume, curl and divergence",
        corr_dim=None,
        cues=("cost", "displacement", "difference", "change", "curl"),
    ),
    # against memorising the content of the training clips (regularisers of the scan)
    "pks4_kinematic": _pks4("the scan reads the prior, not the features", scan_input="prior"),
    "pks4_scan_drop": _pks4("dropout 0.5 on the features the scan reads", scan_dropout=0.5),
    "pks4_scan_drop_curl": _pks4(
        "scan dropout 0.5 and the curl cue",
        scan_dropout=0.5,
        cues=("cost", "displacement", "difference", "change", "curl"),
    ),
    "pks4_kinematic_curl": _pks4(
        "the scan reads the prior (with the curl cue)",
        scan_input="prior",
        cues=("cost", "displacement", "difference", "change", "curl"),
    ),
    # a prior read from cosine similarities alone (no learnt function of the content)
    "pks4_motion_only": _pks4(
        "the scan reads a prior of unreduced cost volume, displacement and change only",
        **MOTION_ONLY,
    ),
    # where the content shortcut is: the head without the backbone's features
    "pks4_contribution": _pks4(
        "the head reads the block's contribution only (output minus input)",
        head_reads="contribution",
    ),
    "pks4_motion_only_contribution": _pks4(
        "no content anywhere: the motion-only prior, the head reads the contribution only",
        head_reads="contribution",
        **MOTION_ONLY,
    ),
    "pks4_motion_only_contribution_curl": _pks4(
        "no content anywhere, with the curl cue: the head reads the contribution only",
        head_reads="contribution",
        **MOTION_ONLY_CURL,
    ),
    "pks4_motion_only_contribution_lr_x3": _pks4(
        "no content anywhere, block learning rate x3: the head reads the contribution only",
        block_lr_scale=3.0,
        head_reads="contribution",
        **MOTION_ONLY,
    ),
    "pks4_content_drop": _pks4(
        "in training, the head reads the contribution only for half of the clips",
        head_reads="content_drop",
    ),
    "pks4_motion_only_content_drop": _pks4(
        "the motion-only prior; in training, the head reads the contribution only for half of "
        "the clips",
        head_reads="content_drop",
        **MOTION_ONLY,
    ),
    "pks4_two_stream": _pks4(
        "the head reads the features and the contribution, normalised apart",
        head_reads="two_stream",
    ),
    "pks4_motion_only_two_stream": _pks4(
        "the motion-only prior; the head reads the features and the contribution, normalised apart",
        head_reads="two_stream",
        **MOTION_ONLY,
    ),
    "pks4_motion_only_two_heads": _pks4(
        "the motion-only prior; a content head and a motion head, each on its own loss",
        head_reads="two_heads",
        **MOTION_ONLY,
    ),
    "pks4_motion_only_curl_two_heads": _pks4(
        "the motion-only prior with the curl cue; a content head and a motion head, each on its "
        "own loss",
        head_reads="two_heads",
        **MOTION_ONLY_CURL,
    ),
    "pks4_motion_only_curl_two_heads_lr_x3": _pks4(
        "the motion-only prior with the curl cue, two heads, block learning rate x3",
        block_lr_scale=3.0,
        head_reads="two_heads",
        **MOTION_ONLY_CURL,
    ),
    "pks4_motion_only_curl_two_heads_small_out": _pks4(
        "the motion-only prior with the curl cue, two heads, output projection small random: "
        "the motion head reads a contribution that is not zero at creation",
        head_reads="two_heads",
        out_init="small",
        **MOTION_ONLY_CURL,
    ),
    "pks4_motion_only_curl_two_heads_raw": _pks4(
        "the motion-only prior with the curl cue, two heads, no LayerNorm in the motion head: "
        "the block stays the identity at creation and the head's gain stays bounded",
        head_reads="two_heads_raw",
        **MOTION_ONLY_CURL,
    ),
    "pks4_motion_only_curl_two_heads_raw_lr_x3": _pks4(
        "the same with the block's learning rate x3 (it has not fit in 8 epochs)",
        block_lr_scale=3.0,
        head_reads="two_heads_raw",
        **MOTION_ONLY_CURL,
    ),
    "pks4_no_difference_unreduced": _pks4(
        "unreduced cost volume, no frame-difference cue (the scan reads the features)",
        corr_dim=None,
        cues=("cost", "displacement", "change"),
    ),
    "pks4_no_difference_curl": _pks4(
        "no frame-difference cue, with the curl cue (the learnt reduction kept)",
        cues=("cost", "displacement", "change", "curl"),
    ),
    "pks4_no_difference_unreduced_curl": _pks4(
        "unreduced cost volume, no frame-difference cue, with the curl cue",
        corr_dim=None,
        cues=("cost", "displacement", "change", "curl"),
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


def parse_epochs(text: str) -> dict[str, int]:
    """``--epochs``: ``"8"`` -> 8 in every regime; ``"16,frozen=24"`` -> 24 frozen, 16 in the
    others. Every regime gets a count: one not named takes the bare number (8 without one)."""
    default, named = 8, {}
    for item in filter(None, (v.strip() for v in str(text).split(","))):
        regime, sep, value = item.rpartition("=")
        if sep and regime not in REGIMES:
            raise argparse.ArgumentTypeError(
                f"expected regimes from {', '.join(REGIMES)}, got {regime!r}"
            )
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            raise argparse.ArgumentTypeError(f"expected a positive epoch count, got {item!r}")
        if sep:
            named[regime] = count
        else:
            default = count
    return {regime: named.get(regime, default) for regime in REGIMES}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--regimes", default=",".join(DEFAULT_REGIMES), help=f"of {', '.join(REGIMES)}")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="each seed draws its own clips too")
    p.add_argument(
        "--epochs",
        type=parse_epochs,
        default=DEFAULT_EPOCHS,
        help="training epochs: one number for every regime, or per regime, e.g. "
        "'frozen=24,finetune=16,scratch=16' (a bare number sets the regimes not named)",
    )
    p.add_argument(
        "--readout",
        choices=("auto", *READOUTS),
        default="auto",
        help="the classifiers' readout (PKS4VideoClassifier's readout) for every model whose "
        "head reads the module's output (auto: the classifier's preset's); the frame average "
        "keeps one head",
    )
    p.add_argument(
        "--readout-scales",
        choices=READOUT_SCALES,
        default="fit",
        help="a factored readout's weights of its two heads: 'fit', fitted on the val split "
        "after training (PKS4VideoClassifier.calibrate_readout, what pks4-train does); "
        "'ones', the two heads' log-probabilities summed as trained",
    )
    p.add_argument(
        "--keep-val-heads",
        action="store_true",
        help="a factored readout: keep each run's val log-probabilities of both heads (before "
        "the weights are fitted) and the labels, for benchmarks/readout_calibration.py",
    )
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--event-frames", type=int, default=16, help="frames of the event task")
    p.add_argument("--size", type=int, default=96, help="frame size of the generated clips")
    p.add_argument("--scratch-size", type=int, default=64, help="frame size, scratch regime")
    p.add_argument("--scratch-width", type=int, default=128, help="channels of the small CNN")
    p.add_argument("--train-clips", type=int, default=128)
    p.add_argument("--val-clips", type=int, default=64)
    p.add_argument("--test-clips", type=int, default=128)
    p.add_argument(
        "--report-split",
        choices=("val", "test"),
        default="val",
        help="the split the tables report; 'test' evaluates each final model once on it",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the full matrix: " + ", ".join(f"{k}={v}" for k, v in FULL.items()),
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="PKS4 against its peers: " + ", ".join(f"{k}={v}" for k, v in PEER_MATRIX.items()),
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scratch-lr", type=float, default=3e-3)
    p.add_argument(
        "--finetune-backbone-lr-scale",
        type=float,
        default=0.1,
        help="finetune regime: the backbone's learning rate over the temporal module's (--lr)",
    )
    p.add_argument(
        "--finetune-backbone-norm",
        choices=("auto", "eval", "train"),
        default="auto",
        help="finetune regime: the backbone's BatchNorm layers (PKS4VideoClassifier's "
        "backbone_norm): eval keeps the pretrained statistics, train uses each batch's; auto: "
        "the classifier's rule (eval for pretrained weights)",
    )
    p.add_argument(
        "--finetune-models",
        default="all",
        help="the models of --models that also run in the finetune regime ('all': every one)",
    )
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--block-kwargs",
        type=json.loads,
        default={},
        help="JSON object of PKS4Block arguments laid over every pks4 variant's (a reduced "
        "protocol, e.g. '{\"inner_dim\": 256}')",
    )
    p.add_argument(
        "--peer-budget",
        choices=tuple(PEER_BUDGETS),
        default="pks4",
        help="the PKS4 block whose parameters every peer is sized to: "
        + "; ".join(f"{k}: {v}" for k, v in PEER_BUDGETS.items()),
    )
    p.add_argument("--no-pretrained", action="store_true", help="random backbone (tests only)")
    p.add_argument("--data-root", default="data/generated/suite")
    p.add_argument("--out", default="benchmarks/results/motion_suite")
    p.add_argument(
        "--resume", action="store_true", help="keep the finished runs of --out's .runs.json"
    )
    p.add_argument(
        "--runs-from",
        default="",
        help="comma-separated .runs.json files of other processes (the same protocol, other "
        "tasks or seeds) whose finished runs are kept, as with --resume: run shards of the "
        "matrix concurrently, then once more with all of them to report",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the finished runs of the plan in --out's records (its "
        "shards' with --shards, and --runs-from), keeping only the (regime, task, seed) cells "
        "in which every planned model finished, so that every comparison stays paired",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--shards",
        type=int,
        default=1,
        help="run the matrix in this many processes of one thread each (their (task, seed) "
        "pairs disjoint), then report from all of them: small models use two cores better so",
    )
    p.add_argument("--shard", default="", help=argparse.SUPPRESS)  # "i/n", set for the children
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.full or args.peers:
        # The presets' values replace the defaults only: explicit flags still win.
        preset = {**(FULL if args.full else {}), **(PEER_MATRIX if args.peers else {})}
        p.set_defaults(**preset)
        args = p.parse_args(argv)
    if args.finetune_models == "all":
        args.finetune_models = args.models
    for name in ("regimes", "tasks", "models", "finetune_models", "seeds"):
        setattr(args, name, [v for v in getattr(args, name).split(",") if v])
    allowed = {
        "regimes": REGIMES,
        "tasks": tuple(TASKS),
        "models": tuple(VARIANTS),
        "finetune_models": tuple(VARIANTS),
    }
    for name, options in allowed.items():
        bad = [v for v in getattr(args, name) if v not in options]
        if bad:
            flag = name.replace("_", "-")
            p.error(f"--{flag}: expected names from {', '.join(options)}, got {', '.join(bad)}")
    args.seeds = [int(s) for s in args.seeds]
    return args


def frames_of(args: argparse.Namespace, task: str) -> int:
    """The clip length of ``task``: ``--event-frames`` for ``event`` (an onset anywhere in a
    longer clip), ``--frames`` for the others."""
    return args.event_frames if task == "event" else args.frames


def load_clips(args: argparse.Namespace, task: str, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The task's clips drawn by ``seed``, generated once under ``--data-root``: split ->
    (uint8 ``(N, T, 3, S, S)``, labels ``(N,)``) for ``train``, ``val`` and ``test``."""
    frames = frames_of(args, task)
    root = make_benchmark(
        Path(args.data_root) / f"{args.size}px-{frames}f-seed{seed}",
        task,
        num_train=args.train_clips,
        num_val=args.val_clips,
        num_test=args.test_clips,
        num_frames=frames,
        size=args.size,
        seed=seed,
    )
    classes = TASKS[task]
    out = {}
    for split in ("train", "val", "test"):
        listing = (root / f"{split}list.txt").read_text().splitlines()
        rels = [line.split()[0] for line in listing if line]
        clips = [
            read_frames(root / "videos" / rel, range(frames)).permute(0, 3, 1, 2) for rel in rels
        ]
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
    args: argparse.Namespace,
    regime: str,
    variant: Variant,
    classes: int,
    backbone: FrameBackbone,
    num_frames: Optional[int] = None,
) -> PKS4VideoClassifier:
    """The classifier of one run; ``num_frames`` defaults to ``--frames``; a ``two_stream``
    head reads twice the backbone's width."""
    model = PKS4VideoClassifier(
        backbone,
        num_classes=classes,
        num_frames=args.frames if num_frames is None else num_frames,
        temporal=variant.temporal,
        freeze_backbone=regime == "frozen",
        block_kwargs=module_kwargs(args, variant, backbone.num_features),
        readout=readout_of(args, variant),
        preset=variant.preset,
        backbone_norm=backbone_norm_of(args, regime),
    )
    if variant.head_reads == "two_stream":
        model.head = ClassifierHead(2 * backbone.num_features, classes)
    if variant.head_reads == "two_heads":
        # The motion head as first measured (a LayerNorm before the linear layer): the
        # documented two_heads variants stay reproducible; two_heads_raw is the library's.
        model.motion_head.norm = nn.LayerNorm(backbone.num_features)
    return model


def readout_of(args: argparse.Namespace, variant: Variant) -> Optional[str]:
    """The classifier's readout: ``"factored"`` for the ``two_heads`` variants; for every model
    whose head reads the module's output, ``--readout``'s (the frame average, with no
    contribution to read, keeps one head), or with ``auto`` ``None``: the preset's."""
    if variant.head_reads in FACTORED_READS:
        return "factored"
    if variant.head_reads != "output" or variant.temporal == "mean":
        return "output"
    return None if args.readout == "auto" else args.readout


def module_kwargs(args: argparse.Namespace, variant: Variant, width: int) -> dict[str, Any]:
    """The temporal module's arguments at the backbone's ``width``: the variant's, with
    ``--block-kwargs`` for PKS4; a peer without its own ``inner_dim`` gets the one that gives it
    the parameter count of ``--peer-budget``'s PKS4 block at that width (every peer at the same
    budget)."""
    kwargs = variant.kwargs()
    if variant.temporal == "pks4":
        kwargs.update(args.block_kwargs)
    if variant.temporal in PEER_KINDS and "inner_dim" not in kwargs:
        budget = pks4_params(width, json.dumps(args.block_kwargs, sort_keys=True), args.peer_budget)
        kwargs["inner_dim"] = inner_dim_for_params(variant.temporal, width, budget, **kwargs)
    if kwargs.get("inner_dim", 0) >= width and variant.temporal == "pks4":
        kwargs.pop("inner_dim")  # no narrower than the backbone: the full width
    return kwargs


# ``--peer-budget``: the PKS4 block whose parameter count every peer is sized to.
PEER_BUDGETS = {
    "pks4": "the suite's pks4 (PKS4VideoClassifier's default preset)",
    "features": "PKS4Block's own defaults (the preset features, about 94 times larger at 1280)",
}


@functools.cache
def pks4_params(width: int, block_kwargs_json: str, peer_budget: str = "pks4") -> int:
    """Parameters of the PKS4 block every peer is sized to at ``width``: with ``"pks4"`` the
    suite's ``pks4`` model's (the classifier's default preset, ``motion_only``: the same budget
    as the model compared against), with ``"features"`` PKS4Block's own defaults (the budget
    the peers were first measured at)."""
    if peer_budget not in PEER_BUDGETS:
        raise ValueError(f"peer_budget: expected one of {list(PEER_BUDGETS)}, got {peer_budget!r}")
    preset = "features"
    if peer_budget == "pks4":
        preset = resolve_preset(VARIANTS[REFERENCE].preset, temporal="pks4")
    kwargs = preset_block_kwargs(preset, json.loads(block_kwargs_json))
    if kwargs.get("inner_dim", 0) >= width:
        kwargs.pop("inner_dim")
    return temporal_num_params("pks4", width, **kwargs)


def backbone_norm_of(args: argparse.Namespace, regime: str) -> Optional[str]:
    """The classifier's ``backbone_norm`` in ``regime``: ``--finetune-backbone-norm`` where the
    pretrained backbone trains (``auto``: ``eval``, the classifier's rule for learnt statistics;
    ``train`` with ``--no-pretrained``); ``None`` (the classifier's rule) in the others: the
    frozen backbone is in evaluation mode anyway, the one from scratch learns its statistics."""
    if regime != "finetune":
        return None
    if args.finetune_backbone_norm != "auto":
        return args.finetune_backbone_norm
    return "train" if args.no_pretrained else "eval"


def regime_rates(args: argparse.Namespace, regime: str) -> tuple[float, float]:
    """The head's learning rate in ``regime`` and the backbone's over it (1 where the backbone
    is frozen or trains from scratch): what a run trains with and its protocol records."""
    lr = args.scratch_lr if regime == "scratch" else args.lr
    return lr, args.finetune_backbone_lr_scale if regime == "finetune" else 1.0


def _optimizer(
    model: PKS4VideoClassifier,
    lr: float,
    weight_decay: float,
    block_lr_scale: float,
    backbone_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    # pks4-train's groups: no decay on what the model names (biases, norms, A_log, D, time
    # embeddings), a rate per part.
    scales = {"temporal": block_lr_scale, "backbone": backbone_lr_scale}
    return torch.optim.AdamW(
        optimizer_param_groups(model, lr=lr, weight_decay=weight_decay, lr_scales=scales)
    )


def cost_volume_probe(
    data: dict[str, tuple[Tensor, Tensor]],
    classes: int,
    *,
    keep_locations: bool = False,
    report_split: str = "val",
    seed: int = 0,
) -> dict[str, Any]:
    """What the frozen features say about motion without any learnt feature: per frame pair,
    the cosine cost volume of the raw features over a 3x3 window of displacements, averaged
    over space (``(T - 1) * 9`` numbers per clip) or, with ``keep_locations``, at every
    location (``(T - 1) * 9 * h * w``), standardised on the training clips and read by an
    L2-regularised logistic regression. Frozen regime only; deterministic given the clips."""

    def describe(x: Tensor) -> Tensor:
        f = F.normalize(x.double(), dim=2)
        n = f.shape[0]
        cost = local_correlation(f[:, 1:].flatten(0, 1), f[:, :-1].flatten(0, 1), radius=1)
        if not keep_locations:
            cost = cost.mean(dim=(2, 3))
        return cost.reshape(n, -1)

    x_train, y_train = data["train"]
    train = describe(x_train)
    mu, sd = train.mean(0), train.std(0) + 1e-6
    train = (train - mu) / sd
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

    @torch.no_grad()
    def correct(split: str) -> list[int]:
        x, y = data[split]
        return ((describe(x) - mu) / sd @ w + b).argmax(-1).eq(y).int().tolist()

    val = correct("val")
    with torch.no_grad():
        loss = F.cross_entropy(train @ w + b, y_train).item()
    top1 = 100.0 * statistics.fmean(val)

    @torch.no_grad()
    def correct_on(x: Tensor) -> list[int]:
        return ((describe(x) - mu) / sd @ w + b).argmax(-1).eq(data["val"][1]).int().tolist()

    return {
        "final_val_top1": top1,
        "best_val_top1": top1,
        "val_correct": val,
        "test_correct": correct("test") if report_split == "test" else None,
        "history": [{"epoch": 1, "train_loss": loss, "val_top1": top1}],
        "params_trainable": w.numel() + b.numel(),
        "params_temporal": 0,
        "inner_dim": None,
        "train_time_s": time.perf_counter() - start,
        **order_check(correct_on, data["val"][0], seed),
    }


def _forward(
    model: PKS4VideoClassifier, regime: str, x: Tensor, grid: tuple[int, int]
) -> tuple[Features, Features]:
    """The temporal module's input and output: ``x`` holds the cached features of the
    ``frozen`` regime (on a ``grid`` map), the clips otherwise."""
    feats = Features("map", x, grid) if regime == "frozen" else model.forward_features(x)
    return feats, model.forward_temporal(feats)


def _contribution(feats: Features, out: Features) -> Features:
    """What the temporal module adds to its input (its output minus the input)."""
    return out.replace(out.x - feats.x)


def head_logits(
    model: PKS4VideoClassifier, variant: Variant, regime: str, x: Tensor, grid: tuple[int, int]
) -> Tensor:
    """The classifier's logits as the suite trains and evaluates it (``x`` as in
    :func:`_forward`), the head reading what ``variant.head_reads`` says (see
    :class:`Variant`); ``"content_drop"`` leaves the input out for a random ``CONTENT_DROP``
    of the clips in training only."""
    feats, out = _forward(model, regime, x, grid)
    if variant.head_reads == "contribution":
        out = _contribution(feats, out)
    elif variant.head_reads == "content_drop" and model.training:
        shape = (x.shape[0],) + (1,) * (feats.x.dim() - 1)
        dropped = torch.rand(shape, device=x.device) < CONTENT_DROP
        out = out.replace(out.x - feats.x * dropped.to(feats.x.dtype))
    elif variant.head_reads == "two_stream":
        streams = (model.pool(feats), model.pool(_contribution(feats, out)))
        pooled = torch.cat([F.layer_norm(v, v.shape[-1:]) for v in streams], dim=-1)
        return model.forward_head(pooled)
    elif model.motion_head is not None:  # "two_heads", or --readout factored
        return model.combine_heads(*model.forward_heads(feats, out))
    return model.forward_head(model.pool(out))


def head_loss(
    model: PKS4VideoClassifier,
    variant: Variant,
    regime: str,
    x: Tensor,
    y: Tensor,
    grid: tuple[int, int],
) -> Tensor:
    """The training loss: cross-entropy of :func:`head_logits`; with the factored readout
    (``"two_heads"``, ``--readout factored``), the sum of each head's own cross-entropy."""
    if model.motion_head is None:
        return F.cross_entropy(head_logits(model, variant, regime, x, grid), y)
    return factored_loss(*model.forward_heads(*_forward(model, regime, x, grid)), y)


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
    ``scratch``), evaluate it on ``val`` after every epoch and, with ``--report-split test``,
    the final model once on ``test``."""
    if variant.temporal in PROBES:
        if regime != "frozen":
            raise ValueError(f"models: {variant.temporal!r} reads frozen features, got {regime!r}")
        return cost_volume_probe(
            data,
            classes,
            keep_locations=variant.temporal == "probe_local",
            report_split=args.report_split,
            seed=seed,
        )
    torch.manual_seed(seed)
    frames = data["train"][0].shape[1]
    model = build_model(args, regime, variant, classes, make_backbone(), frames)
    grid = tuple(data["train"][0].shape[-2:])

    def logits(x: Tensor) -> Tensor:
        return head_logits(model, variant, regime, x, grid)

    lr, backbone_scale = regime_rates(args, regime)
    opt = _optimizer(model, lr, args.weight_decay, variant.block_lr_scale, backbone_scale)
    x_train, y_train = data["train"]
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    epochs = args.epochs[regime]
    total = epochs * steps_per_epoch
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
    eval_batch = args.batch_size * 4
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        losses = []
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = head_loss(model, variant, regime, x_train[idx], y_train[idx], grid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        val_correct = evaluate(model, logits, *data["val"], eval_batch)
        val = 100.0 * statistics.fmean(val_correct)
        history.append({"epoch": epoch, "train_loss": statistics.fmean(losses), "val_top1": val})
        if not args.no_progress:
            print(
                f"    {desc} epoch {epoch}/{epochs} loss {history[-1]['train_loss']:.3f} "
                f"val {val:.1f}% ({time.perf_counter() - start:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    train_time = time.perf_counter() - start
    readout_scales = val_heads = None
    if model.motion_head is not None and (args.keep_val_heads or args.readout_scales == "fit"):
        content, motion = heads_on(model, regime, data["val"][0], grid, eval_batch)
        if args.keep_val_heads:
            val_heads = {
                "labels": data["val"][1].tolist(),
                "content_logp": content.log_softmax(-1).tolist(),
                "motion_logp": motion.log_softmax(-1).tolist(),
            }
        if args.readout_scales == "fit":
            # The factored readout's two weights, fitted on val (as pks4-train does): the val
            # accuracy below is then where they were fitted; the history's last is before.
            readout_scales = model.calibrate_readout(content, motion, data["val"][1]).tolist()
            # Scored from the heads already computed: what evaluate() would give, no second pass.
            hits = model.combine_heads(content, motion).argmax(-1) == data["val"][1]
            val_correct = [int(hit) for hit in hits.tolist()]
    # The test split: the final model, once, after every choice was made on val.
    test = (
        evaluate(model, logits, *data["test"], eval_batch) if args.report_split == "test" else None
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    temporal = sum(p.numel() for p in model.temporal.parameters())
    x_val, y_val = data["val"]
    return {
        "final_val_top1": 100.0 * statistics.fmean(val_correct),
        "readout_scales": readout_scales,
        **({"val_heads": val_heads} if val_heads is not None else {}),
        "best_val_top1": max(h["val_top1"] for h in history),
        "val_correct": val_correct,
        "test_correct": test,
        "history": history,
        "params_trainable": trainable,
        "params_temporal": temporal,
        "inner_dim": getattr(model.temporal, "inner_dim", None),
        "train_time_s": train_time,
        **order_check(lambda x: evaluate(model, logits, x, y_val, eval_batch), x_val, seed),
    }


def heads_on(
    model: PKS4VideoClassifier, regime: str, x: Tensor, grid: tuple[int, int], batch: int
) -> tuple[Tensor, Tensor]:
    """A factored readout's content and motion logits on ``x`` (as in :func:`_forward`), in
    evaluation mode."""
    model.eval()
    with torch.no_grad():
        heads = [
            model.forward_heads(*_forward(model, regime, x[i : i + batch], grid))
            for i in range(0, len(x), batch)
        ]
    content, motion = (torch.cat(h) for h in zip(*heads))
    return content, motion


# The features each regime's temporal module sees: (channels, map side) at --size / --scratch-size.
def regime_features(args: argparse.Namespace, regime: str) -> tuple[int, int]:
    if regime == "scratch":
        return args.scratch_width, args.scratch_size // 16
    return 1280, math.ceil(args.size / 32)  # efficientnet_lite0: 1280 channels, stride 32


def temporal_costs(
    args: argparse.Namespace, regime: str, variant: Variant, repeats: int = 5
) -> dict[str, Any]:
    """The temporal module's cost at the regime's width, map and ``--frames``, on a batch of
    ``--batch-size`` random feature maps, measured in the same run as its accuracy: forward
    GFLOPs per clip (:func:`pks4_layers.models.flops.count_flops`), the median time of a
    forward (no autograd) and of a forward+backward, and the bytes autograd keeps for the
    backward per token (frame x location)."""
    width, side = regime_features(args, regime)
    torch.manual_seed(0)
    # The module as the regime's classifier builds it: its preset's arguments under the run's.
    preset = resolve_preset(variant.preset, temporal=variant.temporal)
    kwargs = preset_block_kwargs(preset, module_kwargs(args, variant, width))
    module = create_temporal(variant.temporal, width, **kwargs)
    module.train()
    x = torch.randn(args.batch_size, args.frames, width, side, side)
    device = torch.device("cpu")
    with torch.no_grad():
        flops, _ = count_flops(module, x[:1])
        forward = time_ms(lambda: module(x), repeats=repeats, warmup=1, device=device)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    params = tuple(module.parameters())
    # A module without parameters (the frame average) has no backward of its own.
    train = time_ms(step, repeats=repeats, warmup=1, device=device) if params else None
    out, saved = saved_tensor_bytes(lambda: module(x.requires_grad_(False)), inputs=(x, *params))
    del out
    tokens = args.batch_size * args.frames * side * side
    return {
        "width": width,
        "grid": side,
        "params": sum(p.numel() for p in params),
        "inner_dim": getattr(module, "inner_dim", None),
        "gflops_per_clip": flops / 1e9,
        "forward_ms": forward.median_ms,
        "train_step_ms": None if train is None else train.median_ms,
        "saved_bytes_per_token": saved.beyond_inputs / tokens,
        "batch": args.batch_size,
        "frames": args.frames,
    }


def order_check(correct: Callable[[Tensor], list[int]], x_val: Tensor, seed: int) -> dict:
    """Validation top-1 with the frames reversed and shuffled (one permutation per seed that
    is neither the identity nor the reversal): an order-blind model scores the same on all
    three, a model that reads the order loses on the reversed clips of an order-only task."""
    frames = x_val.shape[1]
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(frames, generator=g)
    while frames > 2 and (
        torch.equal(perm, torch.arange(frames)) or torch.equal(perm, torch.arange(frames).flip(0))
    ):
        perm = torch.randperm(frames, generator=g)
    return {
        "val_reversed_top1": 100.0 * statistics.fmean(correct(x_val.flip(1))),
        "val_shuffled_top1": 100.0 * statistics.fmean(correct(x_val[:, perm])),
        "shuffle": perm.tolist(),
    }


@torch.no_grad()
def evaluate(model: nn.Module, logits: Callable, x: Tensor, y: Tensor, batch: int) -> list[int]:
    """Per clip, 1 where the model's top-1 is the label: what the intervals resample."""
    model.eval()
    return [
        int(hit)
        for i in range(0, len(x), batch)
        for hit in (logits(x[i : i + batch]).argmax(-1) == y[i : i + batch]).tolist()
    ]


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
        # The same pretrained weights, a fresh copy per run: it trains with the module.
        "finetune": lambda: copy.deepcopy(frozen()),
    }


def reported(run: dict[str, Any], split: str) -> list[int]:
    """The run's per-clip correctness on ``split``."""
    correct = run[f"{split}_correct"]
    if correct is None:
        raise ValueError(f"split: the run was not evaluated on {split!r}")
    return correct


def _group(runs: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r["seed"])
    return groups


def summarise(runs: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """One row per (regime, task, model): the top-1 on ``split`` (mean over seeds, 95%
    interval over seeds and clips, worst seed), the validation mean, and the paired difference
    from ``pks4`` on the same clips where both ran with the same seeds."""
    groups = _group(runs, "regime", "task", "model")
    rows = []
    for (regime, task, model), rs in groups.items():
        correct = [reported(r, split) for r in rs]
        acc = suite_stats.accuracy_interval(correct)
        per_seed = [100.0 * statistics.fmean(c) for c in correct]
        row = {
            "regime": regime,
            "task": task,
            "model": model,
            "split": split,
            "seeds": len(rs),
            "clips": acc["clips"],
            "mean": acc["mean"],
            "low": acc["low"],
            "high": acc["high"],
            "min": min(per_seed),
            "per_seed": per_seed,
            "val_mean": statistics.fmean(r["final_val_top1"] for r in rs),
            "best_val_mean": statistics.fmean(r["best_val_top1"] for r in rs),
            "chance": 100.0 / rs[0]["classes"],
            "params_temporal": rs[0]["params_temporal"],
            "train_time_s": statistics.fmean(r["train_time_s"] for r in rs),
            "vs_reference": None,
        }
        ref = groups.get((regime, task, REFERENCE))
        if model != REFERENCE and ref and [r["seed"] for r in ref] == [r["seed"] for r in rs]:
            row["vs_reference"] = suite_stats.paired_difference(
                correct, [reported(r, split) for r in ref]
            )
        rows.append(row)
    return rows


def summarise_models(runs: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """One row per (regime, model) over the temporal tasks run: the mean over tasks of the
    top-1 on ``split`` with its 95% interval, the paired difference of that mean from ``pks4``
    (same tasks, seeds and clips), the worst (task, seed) run and the runs below 90%."""
    groups = _group([r for r in runs if r["task"] in TEMPORAL_TASKS], "regime", "model")
    by_task = {
        key: {
            t: [reported(r, split) for r in rs if r["task"] == t]
            for t in TEMPORAL_TASKS
            if any(r["task"] == t for r in rs)
        }
        for key, rs in groups.items()
    }
    rows = []
    for (regime, model), rs in groups.items():
        per_task = by_task[(regime, model)]
        mean = suite_stats.task_mean_interval(per_task)
        accuracy = {id(r): 100.0 * statistics.fmean(reported(r, split)) for r in rs}
        worst = min(rs, key=lambda r: accuracy[id(r)])
        row = {
            "regime": regime,
            "model": model,
            "split": split,
            "tasks": list(per_task),
            "task_means": mean["per_task"],
            "seeds": len({r["seed"] for r in rs}),
            "mean": mean["mean"],
            "low": mean["low"],
            "high": mean["high"],
            "worst": accuracy[id(worst)],
            "worst_run": f"{worst['task']} seed {worst['seed']}",
            "below_90": sum(a < 90.0 for a in accuracy.values()),
            "runs": len(rs),
            "vs_reference": None,
        }
        ref = by_task.get((regime, REFERENCE))
        if model != REFERENCE and ref and list(ref) == list(per_task):
            same_seeds = all(
                [r["seed"] for r in rs if r["task"] == t]
                == [r["seed"] for r in groups[(regime, REFERENCE)] if r["task"] == t]
                for t in per_task
            )
            if same_seeds:
                row["vs_reference"] = suite_stats.paired_task_mean_difference(per_task, ref)
        rows.append(row)
    return rows


def _versus(d: Optional[dict[str, Any]]) -> str:
    return "-" if d is None else suite_stats.format_difference(d)


def format_table(rows: list[dict[str, Any]]) -> str:
    split = rows[0]["split"] if rows else "val"
    lines = [
        f"| regime | task | model | {split} top-1 (%) [95% CI] | worst seed | vs {REFERENCE} "
        "(points) [95% CI] | val top-1 | chance | temporal params | s/run |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['task']} | {r['model']} | {suite_stats.format_interval(r)} "
            f"| {r['min']:.1f} | {_versus(r['vs_reference'])} | {r['val_mean']:.1f} "
            f"| {r['chance']:.0f} | {r['params_temporal'] / 1e6:.2f} M | {r['train_time_s']:.0f} |"
        )
    return "\n".join(lines)


def format_model_table(rows: list[dict[str, Any]]) -> str:
    split = rows[0]["split"] if rows else "val"
    tasks = [t for t in TEMPORAL_TASKS if any(t in r["tasks"] for r in rows)]
    lines = [
        "| regime | model | " + " | ".join(tasks) + f" | mean {split} top-1 (%) [95% CI] "
        f"| vs {REFERENCE} (points) [95% CI] | worst run | runs < 90% |",
        "|" + "---|" * (6 + len(tasks)),
    ]
    for r in rows:
        per_task = " | ".join(
            f"{r['task_means'][t]:.1f}" if t in r["task_means"] else "-" for t in tasks
        )
        lines.append(
            f"| {r['regime']} | {r['model']} | {per_task} | {suite_stats.format_interval(r)} "
            f"| {_versus(r['vs_reference'])} | {r['worst']:.1f} ({r['worst_run']}) "
            f"| {r['below_90']}/{r['runs']} |"
        )
    return "\n".join(lines)


def format_matrix(rows: list[dict[str, Any]], models: list[dict[str, Any]]) -> str:
    """Per regime, one line per task and one for the mean of the temporal tasks, one column per
    model: the reported split's top-1 with its 95% interval (the README's form)."""
    split = rows[0]["split"] if rows else "val"
    cells = {(r["regime"], r["task"], r["model"]): r for r in rows}
    means = {(m["regime"], m["model"]): m for m in models}
    blocks = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        names = list(dict.fromkeys(r["model"] for r in rows if r["regime"] == regime))
        tasks = list(dict.fromkeys(r["task"] for r in rows if r["regime"] == regime))
        lines = [
            f"| {regime}: {split} top-1 (%) [95% CI] | " + " | ".join(names) + " |",
            "|" + "---|" * (1 + len(names)),
        ]
        for task in tasks:
            lines.append(
                f"| {task} | "
                + " | ".join(
                    suite_stats.format_interval(cells[(regime, task, m)])
                    if (regime, task, m) in cells
                    else "-"
                    for m in names
                )
                + " |"
            )
        if any((regime, m) in means for m in names):
            lines.append(
                "| mean of the temporal tasks | "
                + " | ".join(
                    suite_stats.format_interval(means[(regime, m)]) if (regime, m) in means else "-"
                    for m in names
                )
                + " |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_costs(costs: dict[str, dict[str, Any]]) -> str:
    """One line per (regime, model): width, parameters, forward GFLOPs per clip, times and
    saved bytes per token of the temporal module alone, measured in the same run."""
    lines = [
        "| regime | model | features (C, map) | inner_dim | params | GFLOPs/clip | forward (ms) "
        "| forward+backward (ms) | saved bytes/token |",
        "|" + "---|" * 9,
    ]
    for key, c in costs.items():
        regime, model = key.split("/")
        step = "-" if c["train_step_ms"] is None else f"{c['train_step_ms']:.1f}"
        lines.append(
            f"| {regime} | {model} | {c['width']}, {c['grid']}x{c['grid']} "
            f"| {c['inner_dim'] if c['inner_dim'] is not None else '-'} "
            f"| {c['params'] / 1e6:.3f} M | {c['gflops_per_clip']:.4f} | {c['forward_ms']:.1f} "
            f"| {step} | {c['saved_bytes_per_token']:.0f} |"
        )
    batch = next(iter(costs.values()), {})
    note = (
        f"Batch {batch.get('batch')} clips of {batch.get('frames')} frames of random features, "
        "CPU, median of 5 after a warm-up; saved bytes: what autograd keeps for the backward, "
        "per frame and location, beyond the input and the parameters."
    )
    return note + "\n\n" + "\n".join(lines)


def format_order_check(runs: list[dict[str, Any]]) -> str:
    """Per regime and model, over the temporal tasks and seeds: validation top-1 on the clips
    as they are, reversed and shuffled."""
    groups = _group([r for r in runs if r["task"] in TEMPORAL_TASKS], "regime", "model")
    lines = [
        "| regime | model | val top-1 (%) | reversed frames | shuffled frames |",
        "|---|---|---|---|---|",
    ]
    for (regime, model), rs in groups.items():
        if "val_reversed_top1" not in rs[0]:
            continue
        val = statistics.fmean(r["final_val_top1"] for r in rs)
        rev = statistics.fmean(r["val_reversed_top1"] for r in rs)
        shuf = statistics.fmean(r["val_shuffled_top1"] for r in rs)
        lines.append(f"| {regime} | {model} | {val:.1f} | {rev:.1f} | {shuf:.1f} |")
    return "\n".join(lines)


def report(
    runs: list[dict[str, Any]], split: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], str]:
    """The per-task rows, the per-model rows, the targets and the printed tables of ``runs``
    on ``split``."""
    rows, models = summarise(runs, split), summarise_models(runs, split)
    table = format_table(rows)
    if models:
        table += "\n\n" + format_model_table(models)
    table += "\n\n" + format_matrix(rows, models)
    order = format_order_check(runs)
    if order.count("\n") > 1:
        table += "\n\nOrder check (validation clips, mean over the temporal tasks and seeds):\n\n"
        table += order
    targets = suite_targets.check_targets(rows, models)
    if targets:
        table += f"\n\nTargets ({split} split; suite_targets.py says what each one asks):\n\n"
        table += suite_targets.format_targets(targets)
    return rows, models, targets, table


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


def runs_in(regime: str, model: str, finetune_models: Sequence[str] = ()) -> bool:
    """The probes read the frozen features: they have no scratch or finetune run; the finetune
    regime runs ``finetune_models`` only."""
    if model in PROBES:
        return regime == "frozen"
    return regime != "finetune" or model in finetune_models


def _key(run: dict[str, Any]) -> tuple[str, str, str, int]:
    return run["regime"], run["task"], run["model"], run["seed"]


def run_protocol(args: argparse.Namespace, regime: str, variant: Variant) -> dict[str, Any]:
    """What a run's number depends on beyond (regime, task, model, seed): its training length
    and rates, the module's arguments and the classifier's preset and readout as resolved
    today. ``--resume`` and ``--runs-from`` keep a finished run only when its protocol is
    this one, so that a record of another default or length never enters a table."""
    if variant.temporal in PROBES:
        return {"temporal": variant.temporal}
    lr, backbone_scale = regime_rates(args, regime)
    protocol = {
        "temporal": variant.temporal,
        # Resolved through the preset: a record of a preset before its arguments changed is
        # not today's.
        "block_kwargs": preset_block_kwargs(
            resolve_preset(variant.preset, temporal=variant.temporal),
            module_kwargs(args, variant, regime_features(args, regime)[0]),
        ),
        "preset": resolve_preset(variant.preset, temporal=variant.temporal),
        "readout": readout_of(args, variant),
        "head_reads": variant.head_reads,
        "block_lr_scale": variant.block_lr_scale,
        "epochs": args.epochs[regime],
        "lr": lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "train_clips": args.train_clips,
    }
    if regime == "finetune":
        protocol["backbone_lr_scale"] = backbone_scale
        norm = backbone_norm_of(args, regime)
        if norm != "train":
            # (a record without the key trained the backbone's BatchNorm on batch statistics)
            protocol["backbone_norm"] = norm
    readout = protocol["readout"] or PRESETS[protocol["preset"]].readout
    if readout == "factored" and args.readout_scales == "fit":
        # (a record without the key summed the heads as trained: --readout-scales ones)
        protocol["readout_scales"] = "fit"
    return json.loads(json.dumps(protocol))  # as read back from a file: lists, not tuples


def complete_cells(
    runs: list[dict[str, Any]], missing: list[tuple[str, str, str, int]]
) -> tuple[list[dict[str, Any]], int]:
    """The runs of the (regime, task, seed) cells that no ``missing`` run belongs to, and how
    many such cells there are: a model compared on a cell the reference has not finished (or
    the other way round) would not be paired."""
    gaps = {(regime, task, seed) for regime, task, _, seed in missing}
    kept = [r for r in runs if (r["regime"], r["task"], r["seed"]) not in gaps]
    return kept, len({(r["regime"], r["task"], r["seed"]) for r in kept})


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.shards > 1 and not args.shard:
        if not args.report_only and not run_shards(
            args, sys.argv[1:] if argv is None else list(argv)
        ):
            return 1
        args.runs_from = ",".join(
            [*filter(None, args.runs_from.split(",")), *map(str, shard_runs(args))]
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = make_backbones(args)
    plan = [
        (regime, task, model, seed)
        for task in args.tasks
        for seed in args.seeds
        for regime in args.regimes
        for model in args.models
        if runs_in(regime, model, args.finetune_models)
    ]
    if args.shard:
        index, count = (int(v) for v in args.shard.split("/"))
        pairs = list(dict.fromkeys((p[1], p[3]) for p in plan))
        mine = {pair for k, pair in enumerate(pairs) if k % count == index}
        plan = [p for p in plan if (p[1], p[3]) in mine]
    out = Path(args.out)
    partial = out.with_suffix(".runs.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    # --out's own records (with --resume), read once: those outside this matrix (other
    # regimes, tasks, models or seeds) stay in its file, so that a run of part of the matrix
    # adds to the records and never drops the rest.
    keep_own = args.resume or args.report_only
    own = json.loads(partial.read_text())["runs"] if keep_own and partial.exists() else []
    planned = set(plan)
    carried = [r for r in own if _key(r) not in planned]
    records = own + [
        r for f in args.runs_from.split(",") if f for r in json.loads(Path(f).read_text())["runs"]
    ]
    protocols = {
        (regime, model): run_protocol(args, regime, VARIANTS[model])
        for regime in args.regimes
        for model in args.models
    }
    stale = 0
    for r in records:
        # Runs of the same protocol only, where the reported split was evaluated.
        if r.get(f"{args.report_split}_correct") is None:
            continue
        protocol = protocols.get((r["regime"], r["model"]))
        if protocol is None:
            continue  # not in this matrix
        if r.get("protocol") != protocol:  # a record from before protocols: none
            stale += 1
            continue
        done[_key(r)] = r
    if stale:
        print(
            f"{stale} finished runs of another protocol (length, rates, defaults) not kept",
            file=sys.stderr,
        )
    runs: list[dict[str, Any]] = []
    missing: list[tuple[str, str, str, int]] = []
    start = time.perf_counter()
    passed: set[tuple[str, int]] = set()  # the (task, seed) cells reached
    for task in args.tasks:
        for seed in args.seeds:
            passed.add((task, seed))
            todo = [p for p in plan if p[1] == task and p[3] == seed and p not in done]
            runs += [done[p] for p in plan if p[1] == task and p[3] == seed and p in done]
            if args.report_only:
                missing += todo
                continue
            if not todo:
                continue
            clips = load_clips(args, task, seed)
            for regime in args.regimes:
                models = [p[2] for p in todo if p[0] == regime]
                if not models:
                    continue
                if regime == "frozen":
                    data = {
                        s: (cached_features(backbones["frozen"](), x), y)
                        for s, (x, y) in clips.items()
                    }
                elif regime == "scratch":
                    data = {s: (normalise(x, args.scratch_size), y) for s, (x, y) in clips.items()}
                else:  # finetune: the frozen regime's frames, through a backbone that trains
                    data = {s: (normalise(x), y) for s, (x, y) in clips.items()}
                for model in models:
                    desc = f"[{len(runs) + 1}/{len(plan)}] {regime} {task} {model} seed {seed}"
                    elapsed = time.perf_counter() - start
                    print(f"{desc} ({elapsed:.0f}s)", file=sys.stderr, flush=True)
                    classes = len(TASKS[task])
                    result = train_one(
                        args, regime, VARIANTS[model], data, classes, backbones[regime], seed, desc
                    )
                    runs.append(
                        {
                            "regime": regime,
                            "task": task,
                            "model": model,
                            "seed": seed,
                            "frames": frames_of(args, task),
                            "classes": classes,
                            "chance": 100.0 / classes,
                            "protocol": protocols[(regime, model)],
                            **result,
                        }
                    )
                    # Every finished run on disk at once: a long sweep cut short keeps them.
                    # Written aside, then renamed: a reader (or a commit) never sees half a file.
                    # The kept runs of cells not reached yet stay in it too.
                    ahead = [
                        r for k, r in done.items() if k in planned and (k[1], k[3]) not in passed
                    ]
                    aside = partial.with_name(partial.name + ".tmp")
                    aside.write_text(
                        json.dumps({"config": vars(args), "runs": carried + runs + ahead})
                    )
                    aside.replace(partial)
    if missing:
        runs, cells = complete_cells(runs, missing)
        print(
            f"--report-only: {len(missing)} of {len(plan)} planned runs not finished; reported: "
            f"the {cells} (regime, task, seed) cells in which every planned model finished",
            file=sys.stderr,
        )
    if not runs:
        print("nothing to report: no finished run of the plan", file=sys.stderr)
        return 1
    order = {p: i for i, p in enumerate(plan)}
    runs.sort(key=lambda r: order[_key(r)])
    # Measured once, by the process that reports (not by shards running side by side).
    costs = {
        f"{regime}/{model}": temporal_costs(args, regime, VARIANTS[model])
        for regime in args.regimes
        for model in args.models
        if model not in PROBES and not args.shard
    }
    rows, models, targets, table = report(runs, args.report_split)
    if costs:
        table += "\n\nCost of the temporal module at each regime's width:\n\n"
        table += format_costs(costs)
    header = (
        f"Split reported: {args.report_split} ({_clips_of(args)} clips per task and seed, "
        f"seeds {','.join(map(str, args.seeds))}, each drawing its own clips); "
        f"95% intervals: bootstrap over seeds and clips; differences paired on the same clips."
    )
    if missing:
        header += (
            f" Part of the plan: {len(missing)} of {len(plan)} runs not finished; a (regime, "
            f"task, seed) cell is reported only where every model finished it."
        )
    table = header + "\n\n" + table
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    config = {k: v for k, v in vars(args).items()}
    config["variants"] = {
        m: {
            "temporal": VARIANTS[m].temporal,
            **VARIANTS[m].kwargs(),
            "block_lr_scale": VARIANTS[m].block_lr_scale,
            "head_reads": VARIANTS[m].head_reads,
            "preset": VARIANTS[m].preset,
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
                "costs": costs,
                "targets": targets,
                "wall_time_s": time.perf_counter() - start,
            },
            indent=1,
        )
    )
    saved = [out.with_suffix(".md"), out.with_suffix(".json")]
    if args.report_split == "test":
        # The validation tables beside the reported ones: what choices are made on.
        val_table = report(runs, "val")[3]
        out.with_suffix(".val.md").write_text(val_table + "\n")
        saved.append(out.with_suffix(".val.md"))
    if plot(runs, out.with_suffix(".png")):
        saved.append(out.with_suffix(".png"))
    print("saved " + ", ".join(str(p) for p in saved), file=sys.stderr)
    return 0


def shard_runs(args: argparse.Namespace) -> list[Path]:
    """The ``.runs.json`` files the shards of ``--out`` write."""
    out = Path(args.out)
    return [
        out.with_name(f"{out.name}_shard{i}").with_suffix(".runs.json") for i in range(args.shards)
    ]


def run_shards(args: argparse.Namespace, argv: list[str]) -> bool:
    """``--shards N``: this script N times at once, one thread each, each on its share of the
    (task, seed) pairs, writing its runs beside ``--out``; True when all of them succeeded."""
    import subprocess

    out = Path(args.out)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                *argv,
                f"--shard={i}/{args.shards}",
                "--shards=1",
                "--threads=1",
                f"--out={out.with_name(f'{out.name}_shard{i}')}",
            ]
        )
        for i in range(args.shards)
    ]
    return all(proc.wait() == 0 for proc in procs)


def _clips_of(args: argparse.Namespace) -> int:
    return args.test_clips if args.report_split == "test" else args.val_clips


if __name__ == "__main__":
    sys.exit(main())
