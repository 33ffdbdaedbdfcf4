"""``benchmarks/motion_suite.py`` on a tiny configuration: both regimes, two seeds, real clips.

Checks that every (regime, task, model, seed) run trains on real computation (the loss moves,
the curves have one point per epoch), that each seed draws its own clips, that the summary's
mean, interval, worst seed and paired difference are those of the runs' per-clip results on
the reported split, that ``--resume`` keeps finished runs, and that the table, JSON and picture
are written. Accuracies are not asserted: a tiny run says nothing about them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pks4_layers.models.classifier import batch_norms

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(SCRIPTS))
import motion_suite  # noqa: E402
import suite_targets  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_suite_end_to_end(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "suite"
    argv = [
        "--regimes=frozen,scratch",
        "--tasks=shuttle,spatial",
        "--models=mean,probe,probe_local,pks4_inner256,pks4",
        "--seeds=0,1",
        "--epochs=2",
        "--frames=4",
        "--size=32",
        "--scratch-size=32",
        "--scratch-width=16",
        "--train-clips=8",
        "--val-clips=6",
        "--test-clips=4",
        "--batch-size=4",
        "--report-split=test",
        "--no-pretrained",
        f"--data-root={tmp_path / 'data'}",
        f"--out={out}",
        "--no-progress",
    ]
    assert motion_suite.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.with_suffix(".json").read_text())
    runs, rows = result["runs"], result["rows"]
    # the probes run in the frozen regime only: 2 tasks x 2 seeds x (5 frozen + 3 scratch)
    assert len(runs) == 2 * 2 * (5 + 3) and len(rows) == 2 * (5 + 3)
    for probe in ("probe", "probe_local"):
        mine = [r for r in runs if r["model"] == probe]
        assert {r["regime"] for r in mine} == {"frozen"} and len(mine) == 4
    for run in runs:
        epochs = [1] if run["model"].startswith("probe") else [1, 2]  # the probes: one fit
        assert [h["epoch"] for h in run["history"]] == epochs
        assert all(0.0 <= h["val_top1"] <= 100.0 for h in run["history"])
        assert all(h["train_loss"] > 0 for h in run["history"])
        if run.get("readout_scales") is None:
            assert run["final_val_top1"] == run["history"][-1]["val_top1"]
        else:  # a factored readout, its heads' weights fitted on val after the last epoch
            assert run["model"].startswith("pks4") and run["protocol"]["readout_scales"] == "fit"
            assert len(run["readout_scales"]) == 2 and min(run["readout_scales"]) > 0
        # per clip: the last epoch's validation, and the test split once
        assert len(run["val_correct"]) == 6 and set(run["val_correct"]) <= {0, 1}
        assert 100.0 * sum(run["val_correct"]) / 6 == pytest.approx(run["final_val_top1"])
        assert len(run["test_correct"]) == 4 and set(run["test_correct"]) <= {0, 1}
    calibrated = {r["model"] for r in runs if r.get("readout_scales") is not None}
    assert calibrated == {"pks4"}  # the classifier's default (inner256: preset features)
    # each seed draws its own clips: the data directories differ, and so do the clips
    data = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert data == ["32px-4f-seed0", "32px-4f-seed1"]
    first = [(tmp_path / "data" / d / "shuttle" / "testlist.txt").read_text() for d in data]
    assert first[0] == first[1]  # the same listing ...
    clip = "oneway/test_0000.mkv"
    frames = [
        motion_suite.read_frames(tmp_path / "data" / d / "shuttle" / "videos" / clip, range(4))
        for d in data
    ]
    assert not torch.equal(frames[0], frames[1])  # ... of other clips
    for row in rows:
        mine = [
            r
            for r in runs
            if (r["regime"], r["task"], r["model"]) == (row["regime"], row["task"], row["model"])
        ]
        per_seed = [100.0 * sum(r["test_correct"]) / 4 for r in mine]
        assert row["split"] == "test" and row["seeds"] == 2 and row["clips"] == 8
        assert row["mean"] == pytest.approx(statistics.fmean(per_seed))
        assert row["low"] <= row["mean"] <= row["high"]
        assert row["min"] == min(per_seed)
        assert row["val_mean"] == pytest.approx(statistics.fmean(r["final_val_top1"] for r in mine))
        assert f"| {row['regime']} | {row['task']} | {row['model']} |" in printed
        if row["model"] == "pks4" or (row["regime"], row["model"]) == ("scratch", "mean"):
            assert (row["vs_reference"] is None) == (row["model"] == "pks4")
        if row["vs_reference"] is not None:
            ref = [
                100.0 * sum(r["test_correct"]) / 4
                for r in runs
                if (r["regime"], r["task"], r["model"]) == (row["regime"], row["task"], "pks4")
            ]
            diff = statistics.fmean(a - b for a, b in zip(per_seed, ref))
            assert row["vs_reference"]["diff"] == pytest.approx(diff)
            assert row["vs_reference"]["verdict"] in ("better", "worse", "no difference")
    by_model = {r["model"]: r for r in rows if r["regime"] == "frozen"}
    assert by_model["mean"]["params_temporal"] == 0
    assert by_model["pks4_inner256"]["params_temporal"] > 0
    # the scratch regime's small CNN is 16 wide: inner_dim 256 falls back to the full width
    scratch = next(r for r in runs if r["regime"] == "scratch" and r["model"] == "pks4_inner256")
    assert scratch["params_temporal"] > 0
    assert result["config"]["variants"]["pks4_inner256"]["inner_dim"] == 256
    # per (regime, model) over the temporal task run (shuttle): mean, worst run, runs < 90%
    models = {(m["regime"], m["model"]): m for m in result["models"]}
    assert set(models) == {
        (g, m) for g in ("frozen", "scratch") for m in ("mean", "pks4_inner256", "pks4")
    } | {("frozen", "probe"), ("frozen", "probe_local")}
    for (regime, model), m in models.items():
        mine = [
            r for r in runs if (r["regime"], r["model"], r["task"]) == (regime, model, "shuttle")
        ]
        accuracy = [100.0 * sum(r["test_correct"]) / 4 for r in mine]
        assert m["tasks"] == ["shuttle"] and m["runs"] == 2
        assert m["mean"] == pytest.approx(statistics.fmean(accuracy))
        assert m["worst"] == min(accuracy)
        assert m["below_90"] == sum(a < 90 for a in accuracy)
        assert (m["vs_reference"] is None) == (model == "pks4")
    table = out.with_suffix(".md").read_text()
    assert table.startswith("Split reported: test (4 clips per task and seed, seeds 0,1")
    # the header, the per-task rows, the per-model rows, then per regime a task x model matrix
    # (2 tasks and the temporal mean)
    # ... then the order check (a header and one line per (regime, model)) and the costs of
    # every trained (regime, model) (a header, a note, the table)
    sections = table.split("\n\n")
    assert sum(s.count("\n") + 1 for s in sections[:5]) == 1 + (2 + len(rows)) + (
        2 + len(models)
    ) + 2 * (2 + 2 + 1)
    assert sections[5].startswith("Order check") and sections[6].count("\n") == 1 + len(models)
    # the targets: probe (frozen only), peers, prior, accuracy and spatial in each regime
    assert sections[7].startswith("Targets (test split")
    assert sections[8].count("\n") == 1 + 5 + 4
    assert result["targets"] == suite_targets.check_targets(rows, result["models"])
    assert sections[9].startswith("Cost of the temporal module")
    assert sections[10].startswith("Batch 4 clips of 4 frames")
    assert sections[11].strip().count("\n") == 1 + 2 * 3
    costs = result["costs"]
    assert set(costs) == {
        f"{g}/{m}" for g in ("frozen", "scratch") for m in ("mean", "pks4_inner256", "pks4")
    }
    for key, cost in costs.items():
        regime, model = key.split("/")
        run = next(r for r in runs if (r["regime"], r["model"]) == (regime, model))
        assert cost["params"] == run["params_temporal"]
        assert (cost["train_step_ms"] is None) == (model == "mean")
        assert (cost["saved_bytes_per_token"] > 0) == (model != "mean")
    assert (
        "| frozen: test top-1 (%) [95% CI] | mean | probe | probe_local | pks4_inner256 |" in table
    )
    pks4_shuttle = next(
        r for r in rows if (r["regime"], r["task"], r["model"]) == ("scratch", "shuttle", "pks4")
    )
    assert motion_suite.suite_stats.format_interval(pks4_shuttle) in table
    png = out.with_suffix(".png")
    if png.exists():
        assert png.read_bytes()[:8] == PNG_MAGIC
    # --resume keeps every finished run: nothing is trained again, the result is the same
    again = tmp_path / "again"
    (again.with_suffix(".runs.json")).write_text(out.with_suffix(".runs.json").read_text())
    argv_again = [a if not a.startswith("--out=") else f"--out={again}" for a in argv]
    assert motion_suite.main([*argv_again, "--resume"]) == 0
    capsys.readouterr()
    assert json.loads(again.with_suffix(".json").read_text())["runs"] == runs
    # ... of this protocol only: a record of another length is trained again, not reported
    assert all(r["protocol"]["epochs"] == 2 for r in runs if not r["model"].startswith("probe"))
    records = json.loads(out.with_suffix(".runs.json").read_text())
    stale = next(r for r in records["runs"] if r["model"] == "pks4")
    stale["protocol"]["epochs"] = 3
    unversioned = next(r for r in records["runs"] if r["model"] == "pks4_inner256")
    del unversioned["protocol"]  # a record written before runs carried their protocol
    again.with_suffix(".runs.json").write_text(json.dumps(records))
    assert motion_suite.main([*argv_again, "--resume"]) == 0
    assert "2 finished runs of another protocol" in capsys.readouterr().err
    rerun = json.loads(again.with_suffix(".json").read_text())["runs"]
    # those runs alone trained again (the random test backbone draws other weights then: their
    # numbers may differ), of today's protocol; every other record kept as it was
    keys = {motion_suite._key(stale), motion_suite._key(unversioned)}
    assert [motion_suite._key(r) for r in rerun] == [motion_suite._key(r) for r in runs]
    assert [r for r in rerun if motion_suite._key(r) not in keys] == [
        r for r in runs if motion_suite._key(r) not in keys
    ]
    for fresh in (r for r in rerun if motion_suite._key(r) in keys):
        assert fresh["protocol"]["epochs"] == 2
        assert [h["epoch"] for h in fresh["history"]] == [1, 2]
    # a resumed sweep cut short keeps on disk every kept run, those of the cells it has not
    # reached yet too: two stale runs, the first cell's and the last one's; it stops while
    # training the second
    records = json.loads(again.with_suffix(".runs.json").read_text())
    pks4_runs = [r for r in records["runs"] if r["model"] == "pks4"]
    first, last = pks4_runs[0], pks4_runs[-1]
    assert (first["task"], first["seed"]) != (last["task"], last["seed"])
    for r in (first, last):
        r["protocol"]["epochs"] = 3
    again.with_suffix(".runs.json").write_text(json.dumps(records))
    real_train_one, calls = motion_suite.train_one, []

    def train_then_stop(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_train_one(*args, **kwargs)

    monkeypatch.setattr(motion_suite, "train_one", train_then_stop)
    with pytest.raises(KeyboardInterrupt):
        motion_suite.main([*argv_again, "--resume"])
    monkeypatch.undo()
    capsys.readouterr()
    on_disk = json.loads(again.with_suffix(".runs.json").read_text())["runs"]
    want = [motion_suite._key(r) for r in records["runs"] if r is not last]
    assert sorted(motion_suite._key(r) for r in on_disk) == sorted(want)
    assert motion_suite.main([*argv_again, "--resume"]) == 0  # the last one trained again
    capsys.readouterr()
    # part of the matrix (another model, one regime, task and seed) adds to --out's records
    before = json.loads(again.with_suffix(".runs.json").read_text())["runs"]
    part = [a for a in argv_again if not a.startswith(("--regimes=", "--tasks=", "--seeds="))]
    part = [a for a in part if not a.startswith("--models=")]
    part += ["--regimes=frozen", "--tasks=shuttle", "--seeds=0", "--models=tconv", "--resume"]
    assert motion_suite.main(part) == 0
    capsys.readouterr()
    after = json.loads(again.with_suffix(".runs.json").read_text())["runs"]
    assert [r for r in after if r["model"] != "tconv"] == before
    assert [motion_suite._key(r) for r in after if r["model"] == "tconv"] == [
        ("frozen", "shuttle", "tconv", 0)
    ]
    # shards run concurrently, then one report from all of them: --runs-from
    shards = []
    for task in ("shuttle", "spatial"):
        shard = tmp_path / f"shard_{task}"
        shard_runs = [r for r in runs if r["task"] == task]
        shard.with_suffix(".runs.json").write_text(json.dumps({"runs": shard_runs}))
        shards.append(str(shard.with_suffix(".runs.json")))
    merged = tmp_path / "merged"
    argv_merged = [a if not a.startswith("--out=") else f"--out={merged}" for a in argv]
    assert motion_suite.main([*argv_merged, f"--runs-from={','.join(shards)}"]) == 0
    capsys.readouterr()
    assert json.loads(merged.with_suffix(".json").read_text())["runs"] == runs


def test_epochs_per_regime() -> None:
    parse = motion_suite.parse_epochs
    assert parse("8") == {r: 8 for r in motion_suite.REGIMES}
    assert parse("16,frozen=24") == {"frozen": 24, "finetune": 16, "scratch": 16}
    assert parse("frozen=3") == {"frozen": 3, "finetune": 8, "scratch": 8}
    args = motion_suite.parse_args([])
    assert args.epochs == parse(motion_suite.DEFAULT_EPOCHS)
    for bad, named in (("frozn=3", "'frozn'"), ("frozen=0", "'frozen=0'"), ("x", "'x'")):
        with pytest.raises(argparse.ArgumentTypeError, match=named):
            parse(bad)
    # the protocol a record is kept by: the regime's length, the preset as resolved today
    pks4 = motion_suite.VARIANTS["pks4"]
    frozen = motion_suite.run_protocol(args, "frozen", pks4)
    assert frozen["epochs"] == 24 and frozen["preset"] == "motion_only"
    # the preset's arguments resolved: a record of the preset before they changed is not kept
    assert frozen["block_kwargs"]["motion_norm"] == "batch"
    assert frozen["block_kwargs"]["scan_input"] == "prior"
    assert motion_suite.run_protocol(args, "scratch", pks4)["epochs"] == 16
    features = motion_suite.run_protocol(
        args, "frozen", motion_suite.VARIANTS["pks4_preset_features"]
    )
    assert features["preset"] == "features" and features != frozen


def test_the_finetuned_backbone_keeps_its_batchnorm_statistics_and_records_it() -> None:
    """The finetune regime builds the classifier with ``backbone_norm="eval"`` (its rule for a
    pretrained backbone) and its protocol says so; with ``--finetune-backbone-norm train`` the
    protocol is that of the records measured before the option (no key), kept as its ablation."""
    pks4 = motion_suite.VARIANTS["pks4"]
    args = motion_suite.parse_args([])
    assert motion_suite.run_protocol(args, "finetune", pks4)["backbone_norm"] == "eval"
    for regime in ("frozen", "scratch"):
        assert "backbone_norm" not in motion_suite.run_protocol(args, regime, pks4)
        assert motion_suite.backbone_norm_of(args, regime) is None
    train = motion_suite.parse_args(["--finetune-backbone-norm", "train"])
    assert "backbone_norm" not in motion_suite.run_protocol(train, "finetune", pks4)
    unpretrained = motion_suite.parse_args(["--no-pretrained"])
    assert motion_suite.backbone_norm_of(unpretrained, "finetune") == "train"
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)
    for norm in batch_norms(backbone):  # statistics as a pretrained backbone holds them
        norm.running_var.fill_(2.0)
    model = motion_suite.build_model(args, "finetune", pks4, 2, copy.deepcopy(backbone), 3)
    assert model.backbone_norm == "eval"
    forced = motion_suite.build_model(train, "finetune", pks4, 2, copy.deepcopy(backbone), 3)
    assert forced.backbone_norm == "train"


def test_seeds_change_the_initialisation_and_only_that(tmp_path: Path) -> None:
    """Same seed, same data -> the same run; another seed -> another initialisation."""
    args = motion_suite.parse_args(
        ["--epochs=1", "--frames=3", "--batch-size=2", "--no-progress", "--scratch-width=8"]
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 3, 16, 16, generator=g)
    data = {"train": (x, torch.tensor([0, 1, 0, 1])), "val": (x, torch.tensor([0, 1, 0, 1]))}

    def backbone():
        return motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)

    variant = motion_suite.VARIANTS["pks4"]
    runs = [
        motion_suite.train_one(args, "scratch", variant, data, 2, backbone, seed, "t")
        for seed in (0, 0, 1)
    ]
    assert runs[0]["history"] == runs[1]["history"]
    assert runs[0]["history"][0]["train_loss"] != runs[2]["history"][0]["train_loss"]


def test_block_learning_rate_factor_reaches_the_optimizer() -> None:
    args = motion_suite.parse_args(["--scratch-width=8", "--frames=3"])
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)
    model = motion_suite.build_model(args, "scratch", motion_suite.VARIANTS["pks4"], 2, backbone)
    opt = motion_suite._optimizer(model, lr=1e-3, weight_decay=0.05, block_lr_scale=3.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 3e-3 if name.startswith("temporal.") else 1e-3
        assert lr_of[id(p)] == pytest.approx(expected), name
        assert wd_of[id(p)] == (0.05 if p.dim() >= 2 and "A_log" not in name else 0.0), name


def test_unknown_names_are_refused(capsys) -> None:
    for flag in ("--models=pks5", "--tasks=colour", "--regimes=linear"):
        with pytest.raises(SystemExit) as exc:
            motion_suite.parse_args([flag])
        assert exc.value.code == 2
        assert flag.split("=")[1] in capsys.readouterr().err


def test_every_variant_builds_a_block() -> None:
    args = motion_suite.parse_args(["--frames=3"])
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(16), num_features=16)
    x = torch.randn(1, 3, 3, 32, 32)
    for name, variant in motion_suite.VARIANTS.items():
        if variant.temporal in motion_suite.PROBES:
            continue
        torch.manual_seed(0)
        model = motion_suite.build_model(args, "scratch", variant, 2, backbone)
        assert motion_suite.head_logits(model, variant, "scratch", x, (2, 2)).shape == (1, 2), name


def test_a_contribution_head_reads_what_the_block_adds_only() -> None:
    """``head_reads="contribution"``: at creation the block is the identity, so the head sees
    zeros whatever the clip; the ordinary head sees the features. The suite's training loop
    runs it."""
    args = motion_suite.parse_args(
        ["--scratch-width=8", "--frames=3", "--epochs=2", "--no-progress"]
    )
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)
    x = torch.randn(4, 3, 3, 32, 32)
    for name, varies in (("pks4", True), ("pks4_contribution", False)):
        variant = motion_suite.VARIANTS[name]
        torch.manual_seed(0)
        model = motion_suite.build_model(args, "scratch", variant, 2, backbone)
        logits = motion_suite.head_logits(model, variant, "scratch", x, (2, 2))
        assert (logits.std(0).max() > 1e-4) == varies, name
    with pytest.raises(ValueError, match="head_reads"):
        motion_suite._pks4("typo", head_reads="features")
    data = {s: (torch.randn(8, 3, 3, 32, 32), torch.arange(8) % 2) for s in ("train", "val")}
    run = motion_suite.train_one(
        args,
        "scratch",
        motion_suite.VARIANTS["pks4_contribution"],
        data,
        2,
        lambda: motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8),
        0,
        "t",
    )
    assert len(run["history"]) == 2 and run["params_temporal"] > 0


def test_content_drop_leaves_the_features_out_of_the_head_in_training_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``head_reads="content_drop"``: in evaluation the head reads the output as users run it;
    in training, the contribution alone for the dropped clips (all at ``CONTENT_DROP = 1``, none
    at 0), the output for the others; a mix at 0.5, clip by clip."""
    args = motion_suite.parse_args(["--scratch-width=8", "--frames=3"])
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)
    x = torch.randn(16, 3, 3, 32, 32)
    variant = motion_suite.VARIANTS["pks4_content_drop"]
    torch.manual_seed(0)
    model = motion_suite.build_model(args, "scratch", variant, 2, backbone)
    with torch.no_grad():  # a block that is no longer the identity: contribution != 0
        model.temporal.scan.out_proj.weight.normal_()
    model.train()  # BatchNorm: the features differ between modes, so compare within a mode

    def read(name: str) -> torch.Tensor:
        with torch.no_grad():
            return motion_suite.head_logits(
                model, motion_suite.VARIANTS[name], "scratch", x, (2, 2)
            )

    output, contribution = read("pks4"), read("pks4_contribution")
    assert not torch.allclose(output, contribution)
    monkeypatch.setattr(motion_suite, "CONTENT_DROP", 1.0)
    torch.testing.assert_close(read("pks4_content_drop"), contribution)
    monkeypatch.setattr(motion_suite, "CONTENT_DROP", 0.0)
    torch.testing.assert_close(read("pks4_content_drop"), output)
    monkeypatch.setattr(motion_suite, "CONTENT_DROP", 0.5)
    mixed = read("pks4_content_drop")
    as_output = torch.isclose(mixed, output).all(-1)
    as_contribution = torch.isclose(mixed, contribution).all(-1)
    assert bool((as_output | as_contribution).all()), "each clip reads one or the other"
    assert 0 < int(as_contribution.sum()) < len(x)
    model.eval()
    torch.testing.assert_close(read("pks4_content_drop"), read("pks4"))


def test_a_two_stream_head_reads_features_and_contribution_normalised_apart() -> None:
    """``head_reads="two_stream"``: a head over ``2 C``; at creation its second half is zero (the
    block adds nothing); then what the block adds reaches it at the same scale whether it is
    large or ten times smaller (normalised apart from the features, which it leaves as they
    were)."""
    args = motion_suite.parse_args(["--scratch-width=8", "--frames=3"])
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)
    variant = motion_suite.VARIANTS["pks4_two_stream"]
    torch.manual_seed(0)
    model = motion_suite.build_model(args, "scratch", variant, 2, backbone).eval()
    assert model.head.fc.in_features == 16
    seen = []
    model.head.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    x = torch.randn(4, 3, 3, 32, 32)
    weight = model.temporal.scan.out_proj.weight
    with torch.no_grad():
        motion_suite.head_logits(model, variant, "scratch", x, (2, 2))
        assert seen[-1][:, 8:].abs().max() == 0 and seen[-1][:, :8].abs().max() > 0
        for scale in (1.0, 0.1):
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
            weight.mul_(scale)
            motion_suite.head_logits(model, variant, "scratch", x, (2, 2))
    torch.testing.assert_close(seen[-1], seen[-2], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(seen[-1][:, :8], seen[0][:, :8])
    assert seen[-1][:, 8:].abs().max() > 0.1


def test_two_heads_train_the_block_on_the_motion_loss_alone() -> None:
    """``head_reads="two_heads"``: the content head reads the block's input, the motion head its
    contribution; the training loss is the sum of the two cross-entropies, so the block's
    gradient is that of the motion head's loss alone and the content head's that of its own;
    the logits are the sum of the two heads' log-probabilities."""
    args = motion_suite.parse_args(["--scratch-width=8", "--frames=3"])
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)
    variant = motion_suite.VARIANTS["pks4_motion_only_two_heads"]
    torch.manual_seed(0)
    model = motion_suite.build_model(args, "frozen", variant, 3, backbone)
    with torch.no_grad():
        model.temporal.scan.out_proj.weight.normal_()
    x, y = torch.randn(4, 3, 8, 2, 2), torch.tensor([0, 1, 2, 0])

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    both = grads(motion_suite.head_loss(model, variant, "frozen", x, y, (2, 2)))
    feats = motion_suite.Features("map", x, (2, 2))
    content, motion = model.forward_heads(feats, model.forward_temporal(feats))
    from_motion = grads(F.cross_entropy(motion, y))
    content, motion = model.forward_heads(feats, model.forward_temporal(feats))
    from_content = grads(F.cross_entropy(content, y))
    assert set(from_content) == {n for n in both if n.startswith("head.")}
    assert set(from_motion) == {n for n in both if not n.startswith("head.")}
    assert any(n.startswith("temporal.") for n in from_motion)
    for name, grad in both.items():
        torch.testing.assert_close(grad, {**from_motion, **from_content}[name], msg=name)
    with torch.no_grad():
        logits = motion_suite.head_logits(model, variant, "frozen", x, (2, 2))
        torch.testing.assert_close(logits, F.log_softmax(content, -1) + F.log_softmax(motion, -1))


def test_two_heads_raw_motion_head_reads_the_contribution_without_layernorm() -> None:
    """``head_reads="two_heads_raw"``: factored readout whose motion head is its linear layer
    on the pooled contribution (no LayerNorm); the block is still the identity at creation, so
    the motion head starts at its bias, and its gradient to the block is bounded (a LayerNorm
    on a zero contribution would multiply it by about 1/sqrt(eps))."""
    args = motion_suite.parse_args(["--scratch-width=8", "--frames=3"])
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)
    variant = motion_suite.VARIANTS["pks4_motion_only_curl_two_heads_raw"]
    torch.manual_seed(0)
    model = motion_suite.build_model(args, "frozen", variant, 3, backbone)
    assert model.readout == "factored" and isinstance(model.motion_head.norm, torch.nn.Identity)
    assert isinstance(model.head.norm, torch.nn.LayerNorm)
    first = motion_suite.VARIANTS["pks4_motion_only_curl_two_heads"]  # as first measured
    ln = motion_suite.build_model(args, "frozen", first, 3, backbone).motion_head.norm
    assert isinstance(ln, torch.nn.LayerNorm)
    x, y = torch.randn(4, 3, 8, 4, 4), torch.tensor([0, 1, 2, 0])
    feats = motion_suite.Features("map", x, (4, 4))
    out = model.forward_temporal(feats)
    torch.testing.assert_close(out.x, x)
    _, motion = model.forward_heads(feats, out)
    torch.testing.assert_close(motion, model.motion_head.fc.bias.expand(4, 3))
    pooled = model.pool(motion_suite._contribution(feats, out))
    torch.testing.assert_close(motion, model.motion_head.fc(pooled))
    motion_suite.head_loss(model, variant, "frozen", x, y, (4, 4)).backward()
    grad = model.temporal.scan.out_proj.weight.grad
    assert grad is not None and 0 < grad.abs().max() < 10


def test_probe_reads_motion_from_the_cost_volume() -> None:
    """Features that move left or right by one cell: the probe separates them; the same
    features in a random order per clip leave it near chance."""
    g = torch.Generator().manual_seed(0)

    def clips(n: int, shuffle: bool) -> tuple[torch.Tensor, torch.Tensor]:
        base = torch.rand(n, 8, 5, 12, generator=g)  # (N, C, H, W + room)
        labels = torch.arange(n) % 2
        frames = []
        for t in range(4):
            shift = torch.where(labels == 0, t, 3 - t)  # right, or left (reversed)
            frames.append(torch.stack([b[..., s : s + 8] for b, s in zip(base, shift.tolist())]))
        x = torch.stack(frames, 1)  # (N, T, C, H, W)
        if shuffle:
            x = torch.stack([c[torch.randperm(4, generator=g)] for c in x])
        return x, labels

    ordered = {"train": clips(40, False), "val": clips(40, False)}
    assert motion_suite.cost_volume_probe(ordered, 2)["final_val_top1"] == 100.0
    shuffled = {"train": clips(40, True), "val": clips(40, True)}
    assert motion_suite.cost_volume_probe(shuffled, 2)["final_val_top1"] < 80.0


def test_the_local_probe_reads_where_things_move() -> None:
    """Two halves of the map moving in opposite vertical directions, one way round or the
    other (a rotation's signature): every location's displacement has the same distribution in
    both classes, so the space-averaged probe stays near chance; the per-location probe
    separates them."""
    g = torch.Generator().manual_seed(0)

    def clips(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 2
        base = torch.rand(n, 8, 12, 4, generator=g)  # (N, C, H + room, W)
        frames = []
        for t in range(4):
            rows = []
            for b, label in zip(base, labels.tolist()):
                up, down = b[:, t : t + 6], b[:, 3 - t : 9 - t]
                left, right = (up, down) if label == 0 else (down, up)
                rows.append(torch.cat([left[..., :2], right[..., 2:]], dim=-1))
            frames.append(torch.stack(rows))
        return torch.stack(frames, 1), labels  # (N, T, C, 6, 4)

    data = {"train": clips(60), "val": clips(60)}
    averaged = motion_suite.cost_volume_probe(data, 2)["final_val_top1"]
    local = motion_suite.cost_volume_probe(data, 2, keep_locations=True)
    assert averaged < 75.0
    assert local["final_val_top1"] == 100.0
    assert local["params_trainable"] == 3 * 9 * 6 * 4 * 2 + 2
    assert len(local["val_correct"]) == 60 and local["test_correct"] is None


def test_full_sets_defaults_and_explicit_flags_win() -> None:
    full = motion_suite.parse_args(["--full"])
    assert (full.train_clips, full.val_clips, full.test_clips) == (240, 240, 240)
    assert full.seeds == [0, 1, 2, 3, 4] and "pks4_selection_only" in full.models
    mixed = motion_suite.parse_args(["--full", "--seeds=0", "--train-clips=16"])
    assert mixed.seeds == [0] and mixed.train_clips == 16 and mixed.test_clips == 240
    plain = motion_suite.parse_args([])
    assert plain.report_split == "val" and plain.seeds == [0, 1, 2]
    assert list(plain.tasks) == list(motion_suite.DEFAULT_TASKS)
    assert motion_suite.frames_of(plain, "event") == 16
    assert motion_suite.frames_of(plain, "onset") == 8


def test_finetune_models_limit_the_finetune_regime_only(capsys) -> None:
    peers = motion_suite.parse_args(["--peers"])
    assert peers.regimes == ["frozen", "scratch", "finetune"]
    assert peers.finetune_models == ["mean", "tsm", "attention", "scan", "pks4"]
    assert motion_suite.parse_args(["--peers", "--finetune-models=all"]).finetune_models == (
        peers.models
    )
    assert motion_suite.parse_args([]).finetune_models == list(motion_suite.DEFAULT_MODELS)
    kept = peers.finetune_models
    assert motion_suite.runs_in("finetune", "pks4", kept)
    assert not motion_suite.runs_in("finetune", "adapter", kept)
    assert motion_suite.runs_in("scratch", "adapter", kept)
    assert motion_suite.runs_in("frozen", "probe_local", kept)
    assert not motion_suite.runs_in("finetune", "probe_local", ["probe_local"])
    with pytest.raises(SystemExit):
        motion_suite.parse_args(["--finetune-models=pks4,nope"])
    assert "--finetune-models" in capsys.readouterr().err


def test_peers_in_three_regimes_at_pks4s_budget(tmp_path: Path) -> None:
    """``--peers``' models in the three regimes: every peer within 10% of PKS4's parameters at
    the regime's width, the order check (exact for the order-blind models), the costs, and a
    fine-tuned backbone that trains at a tenth of the module's learning rate."""
    out = tmp_path / "peers"
    peers = ("frame_mlp", "tsm", "adapter", "attention", "scan", "prior_adapter", "st_scan")
    argv = [
        "--regimes=frozen,scratch,finetune",
        "--tasks=onset",
        f"--models=mean,{','.join(peers)},pks4,pks4_preset_features",
        "--seeds=0",
        "--epochs=1",
        "--frames=4",
        "--size=32",
        "--scratch-size=32",
        "--scratch-width=16",
        "--train-clips=4",
        "--val-clips=4",
        "--test-clips=3",
        "--batch-size=4",
        "--no-pretrained",
        f"--data-root={tmp_path / 'data'}",
        f"--out={out}",
        "--no-progress",
    ]
    assert motion_suite.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    runs = {(r["regime"], r["model"]): r for r in result["runs"]}
    assert len(runs) == 3 * (len(peers) + 3)
    for regime in ("frozen", "scratch", "finetune"):
        # The peers' budget is the compared model's: the classifier's default (the preset
        # motion_only), smaller than PKS4Block's own defaults; --peer-budget features sizes
        # them to the latter.
        budget = runs[(regime, "pks4")]["params_temporal"]
        larger = runs[(regime, "pks4_preset_features")]["params_temporal"]
        assert budget < larger
        args = motion_suite.parse_args([*argv, "--peer-budget=features"])
        width = motion_suite.regime_features(args, regime)[0]
        for peer in peers:
            run = runs[(regime, peer)]
            assert abs(run["params_temporal"] / budget - 1) < 0.10, (regime, peer)
            assert run["inner_dim"] == result["costs"][f"{regime}/{peer}"]["inner_dim"]
            assert run["protocol"]["block_kwargs"]["inner_dim"] == run["inner_dim"]
            kwargs = motion_suite.module_kwargs(args, motion_suite.VARIANTS[peer], width)
            params = motion_suite.temporal_num_params(peer, width, **kwargs)
            assert abs(params / larger - 1) < 0.10, (regime, peer)
        for model in ("mean", "frame_mlp"):
            run = runs[(regime, model)]
            assert run["val_reversed_top1"] == run["final_val_top1"] == run["val_shuffled_top1"]
        assert sorted(runs[(regime, "pks4")]["shuffle"]) == [0, 1, 2, 3]
    # the fine-tuned backbone trains; the frozen one does not
    head_and_module = runs[("frozen", "pks4")]["params_trainable"]
    assert runs[("finetune", "pks4")]["params_trainable"] > head_and_module + 3_000_000
    args = motion_suite.parse_args(argv)
    model = motion_suite.build_model(
        args,
        "finetune",
        motion_suite.VARIANTS["attention"],
        2,
        motion_suite.make_backbones(args)["finetune"](),
    )
    opt = motion_suite._optimizer(model, 1e-3, 0.05, 1.0, backbone_lr_scale=0.1)
    lrs = {
        name: group["lr"]
        for group in opt.param_groups
        for name, p in model.named_parameters()
        if any(p is q for q in group["params"])
    }
    assert all(lr == pytest.approx(1e-4) for n, lr in lrs.items() if n.startswith("backbone."))
    assert all(lr == pytest.approx(1e-3) for n, lr in lrs.items() if not n.startswith("backbone."))
    assert "temporal.time_embed" in lrs
    decay = {
        name: group["weight_decay"]
        for group in opt.param_groups
        for name, p in model.named_parameters()
        if any(p is q for q in group["params"])
    }
    assert decay["temporal.time_embed"] == 0.0 and decay["temporal.qkv.weight"] == 0.05


def test_shards_split_the_task_seed_pairs_and_report_together(tmp_path: Path, capsys) -> None:
    """--shards 2: two processes of one thread on disjoint (task, seed) pairs, then one report
    from both, with every run of the plan."""
    out = tmp_path / "sharded"
    argv = [
        "--regimes=scratch",
        "--tasks=shuttle,spatial",
        "--models=mean,tconv",
        "--seeds=0,1",
        "--epochs=1",
        "--frames=3",
        "--size=32",
        "--scratch-size=32",
        "--scratch-width=8",
        "--train-clips=4",
        "--val-clips=4",
        "--test-clips=3",
        "--batch-size=4",
        f"--data-root={tmp_path / 'data'}",
        f"--out={out}",
        "--no-progress",
    ]
    assert motion_suite.main([*argv, "--shards=2"]) == 0
    capsys.readouterr()
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    plan = {
        (g, t, m, s)
        for g in ["scratch"]
        for t in ["shuttle", "spatial"]
        for m in ["mean", "tconv"]
        for s in [0, 1]
    }
    assert set(map(motion_suite._key, runs)) == plan and len(runs) == len(plan)
    shards = motion_suite.shard_runs(motion_suite.parse_args([*argv, "--shards=2"]))
    pairs = [{(r["task"], r["seed"]) for r in json.loads(p.read_text())["runs"]} for p in shards]
    assert len(pairs[0]) == len(pairs[1]) == 2 and not pairs[0] & pairs[1]


def test_readout_flag_gives_every_model_but_the_frame_average_the_factored_readout() -> None:
    """``--readout factored``: the peers and PKS4 get a content and a motion head (and the
    suite's loss is the sum of the two heads' losses); the frame average, with nothing to add,
    keeps one head; without the flag only the ``two_heads`` variants have two."""
    backbone = motion_suite.FrameBackbone(motion_suite.SmallCNN(8), num_features=8)
    factored = motion_suite.parse_args(["--scratch-width=8", "--frames=3", "--readout=factored"])
    plain = motion_suite.parse_args(["--scratch-width=8", "--frames=3"])
    x, y = torch.randn(4, 3, 8, 2, 2), torch.tensor([0, 1, 2, 0])
    for name, args, heads in [
        ("attention", factored, 2),
        ("pks4", factored, 2),
        ("mean", factored, 1),
        ("attention", plain, 1),
        ("pks4_motion_only_two_heads", plain, 2),
    ]:
        variant = motion_suite.VARIANTS[name]
        torch.manual_seed(0)
        model = motion_suite.build_model(args, "frozen", variant, 3, backbone)
        assert (model.motion_head is not None) == (heads == 2), name
        loss = motion_suite.head_loss(model, variant, "frozen", x, y, (2, 2))
        feats = motion_suite.Features("map", x, (2, 2))
        out = model.forward_temporal(feats)
        if heads == 2:
            expected = motion_suite.factored_loss(*model.forward_heads(feats, out), y)
        else:
            expected = F.cross_entropy(model.forward_head(model.pool(out)), y)
        torch.testing.assert_close(loss, expected, msg=name)


def test_report_only_trains_nothing_and_keeps_the_complete_cells(tmp_path: Path, capsys) -> None:
    """--report-only: the finished runs of the plan, reported without training; a (regime,
    task, seed) cell that one model has not finished is left out for every model."""
    out = tmp_path / "partial"
    argv = [
        "--regimes=scratch",
        "--tasks=shuttle",
        "--models=mean,tconv",
        "--seeds=0,1",
        "--epochs=1",
        "--frames=3",
        "--size=32",
        "--scratch-size=32",
        "--scratch-width=8",
        "--train-clips=4",
        "--val-clips=4",
        "--test-clips=3",
        "--batch-size=4",
        f"--data-root={tmp_path / 'data'}",
        f"--out={out}",
        "--no-progress",
    ]
    assert motion_suite.main(argv) == 0
    records = out.with_suffix(".runs.json")
    saved = json.loads(records.read_text())
    # tconv's seed 1 never finished
    saved["runs"] = [r for r in saved["runs"] if (r["model"], r["seed"]) != ("tconv", 1)]
    records.write_text(json.dumps(saved))
    capsys.readouterr()
    assert motion_suite.main([*argv, "--report-only"]) == 0
    err = capsys.readouterr().err
    assert "1 of 4 planned runs not finished" in err and "[1/" not in err  # nothing trained
    report = json.loads(out.with_suffix(".json").read_text())
    assert {(r["model"], r["seed"]) for r in report["runs"]} == {("mean", 0), ("tconv", 0)}
    assert json.loads(records.read_text())["runs"] == saved["runs"]  # the records untouched
    assert "Part of the plan: 1 of 4 runs" in out.with_suffix(".md").read_text()
    # nothing finished at all: an error, not an empty table
    records.write_text(json.dumps({"config": {}, "runs": []}))
    assert motion_suite.main([*argv, "--report-only"]) == 1


@pytest.mark.slow
def test_kept_val_heads_give_the_cross_fitted_calibration_table(tmp_path: Path, capsys) -> None:
    """``--keep-val-heads`` records both heads' val log-probabilities before the weights are
    fitted; ``readout_calibration.py`` scores every val clip with weights fitted on the other
    half and compares them with the plain sum, paired."""
    import readout_calibration

    out = tmp_path / "cal"
    argv = [
        "--regimes=frozen",
        "--tasks=shuttle,spatial",
        "--models=mean,pks4",
        "--seeds=0",
        "--epochs=2",
        "--frames=4",
        "--size=32",
        "--train-clips=8",
        "--val-clips=6",
        "--test-clips=4",
        "--batch-size=4",
        "--no-pretrained",
        "--keep-val-heads",
        f"--data-root={tmp_path / 'data'}",
        f"--out={out}",
        "--no-progress",
    ]
    assert motion_suite.main(argv) == 0
    runs = json.loads(out.with_suffix(".runs.json").read_text())["runs"]
    kept = [r for r in runs if "val_heads" in r]
    assert {r["model"] for r in kept} == {"pks4"} and len(kept) == 2  # mean has one head
    for run in kept:
        heads = run["val_heads"]
        assert len(heads["labels"]) == 6
        content, motion = (torch.tensor(heads[k]) for k in ("content_logp", "motion_logp"))
        assert content.shape == motion.shape == (6, run["classes"])
        # log-probabilities; the plain sum is the final epoch's prediction
        assert torch.allclose(content.exp().sum(-1), torch.ones(6), atol=1e-5)
        plain = (content + motion).argmax(-1) == torch.tensor(heads["labels"])
        ones, fitted = readout_calibration.cross_fitted(run)
        assert len(ones) == len(fitted) == 6 and set(ones) | set(fitted) <= {0, 1}
        assert ones == plain.int().tolist()
    table = tmp_path / "cal.md"
    assert readout_calibration.main([str(out.with_suffix(".runs.json")), f"--out={table}"]) == 0
    text = table.read_text()
    assert "| frozen | shuttle | 1 |" in text and "| frozen | spatial | 1 |" in text
    assert readout_calibration.main([str(tmp_path / "none*.json")]) == 2
    assert "expected runs with val_heads" in capsys.readouterr().out
