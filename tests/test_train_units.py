"""The training CLI's parts on their own: config parsing, sampler, schedule, metrics,
checkpoints, progress."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from torch import nn

from pks4_layers.train import ShardedSampler, TrainConfig, config_from_mapping, parse_args
from pks4_layers.train.checkpoint import check_model_state, load_checkpoint, save_checkpoint
from pks4_layers.train.metrics import topk_correct
from pks4_layers.train.progress import Progress
from pks4_layers.train.schedule import warmup_cosine, warmup_cosine_factor


# ---------------------------------------------------------------------------------- config
def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr: 0.01\ntemporal: tconv\nflip: true\n")
    cfg, _ = parse_args(["--config", str(path), "--lr", "0.5", "--no-flip"])
    assert cfg.epochs == 3  # from YAML
    assert cfg.lr == 0.5  # flag beats YAML
    assert cfg.temporal == "tconv"
    assert cfg.flip is False
    assert cfg.batch_size == TrainConfig().batch_size  # default


@pytest.mark.parametrize(
    ("text", "error", "pattern"),
    [
        ("epochs: 3\nlearning_rate: 0.1\n", ValueError, r"unknown key\(s\) \['learning_rate'\]"),
        ("epochs: three\n", TypeError, r"^epochs: expected an integer, got 'three'"),
        ("epochs: true\n", TypeError, r"^epochs: expected an integer, got True"),
        ("flip: 1\n", TypeError, r"^flip: expected a boolean, got 1"),
        ("lr: '0.1'\n", TypeError, r"^lr: expected a number, got '0.1'"),
        ("temporal: lstm\n", ValueError, r"^temporal: expected one of .*got 'lstm'"),
        ("batch_size: 0\n", ValueError, r"^batch_size: expected >= 1, got 0"),
        ("- epochs\n", TypeError, r"expected a mapping at the top level"),
    ],
)
def test_bad_yaml_config_is_an_error_naming_the_key(tmp_path, text, error, pattern):
    pytest.importorskip("yaml")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=pattern):
        parse_args(["--config", str(path)])


def test_yaml_python_objects_are_not_constructed(tmp_path):
    pytest.importorskip("yaml")
    import yaml

    path = tmp_path / "evil.yaml"
    path.write_text("epochs: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        parse_args(["--config", str(path)])


def test_ints_are_accepted_for_float_fields():
    cfg = config_from_mapping({"lr": 1, "warmup_epochs": 0})
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0


def test_prior_targets_reach_the_block_and_bad_ones_name_the_key():
    from pks4_layers.train.engine import build_model

    cfg, _ = parse_args(["--prior-targets", "selection", "--backbone", "resnet18"])
    assert cfg.block_kwargs() == {"prior_targets": ("selection",)}
    model = build_model(cfg, num_classes=3, random_weights=True)
    assert model.temporal.scan.prior_targets == ("selection",)
    assert model.temporal.scan.prior_in_proj is None
    default = build_model(parse_args(["--backbone", "resnet18"])[0], 3, random_weights=True)
    assert default.temporal.scan.prior_targets == ("selection", "output")
    with pytest.raises(ValueError, match=r"^prior_targets: expected .*did you mean 'selection'"):
        config_from_mapping({"prior_targets": "selction"})
    with pytest.raises(ValueError, match=r"^prior_targets: expected .*got 'output,output'"):
        config_from_mapping({"prior_targets": "output,output"})
    with pytest.raises(ValueError, match=r"^prior_targets: expected empty unless temporal is pks4"):
        config_from_mapping({"prior_targets": "selection", "temporal": "tconv"})


def test_every_peer_kind_and_its_width_reach_the_model_from_the_cli():
    from pks4_layers.baselines import TemporalAdapter
    from pks4_layers.models.temporal_heads import PEER_KINDS
    from pks4_layers.train.engine import build_model

    for kind in PEER_KINDS:
        cfg, _ = parse_args(["--temporal", kind, "--backbone", "resnet18", "--inner-dim", "24"])
        assert cfg.block_kwargs() == {"inner_dim": 24}
    model = build_model(cfg, num_classes=3, random_weights=True)
    assert model.temporal_kind == "st_scan" and model.temporal.inner_dim == 24
    cfg, _ = parse_args(["--temporal", "adapter", "--backbone", "resnet18"])
    model = build_model(cfg, num_classes=3, random_weights=True)
    assert isinstance(model.temporal, TemporalAdapter) and model.temporal.inner_dim == 512 // 4
    with pytest.raises(ValueError, match=r"^inner_dim: expected 0 for temporal mean"):
        config_from_mapping({"inner_dim": 8, "temporal": "mean"})
    with pytest.raises(ValueError, match=r"^temporal: expected one of .*did you mean 'tsm'"):
        config_from_mapping({"temporal": "tsn"})


# --------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_sampler_steps_equal_single_process_global_batches(world_size):
    n, batch = 23, 2
    single = list(ShardedSampler(n, True, seed=5, drop_last=True, batch_size=batch * world_size))
    ranks = [
        list(ShardedSampler(n, True, 5, r, world_size, drop_last=True, batch_size=batch))
        for r in range(world_size)
    ]
    assert len({len(r) for r in ranks}) == 1, "every rank takes the same number of steps"
    steps = len(ranks[0]) // batch
    assert steps == len(single) // (batch * world_size)
    for k in range(steps):
        ddp_step = sorted(i for r in ranks for i in r[k * batch : (k + 1) * batch])
        single_step = sorted(single[k * batch * world_size : (k + 1) * batch * world_size])
        assert ddp_step == single_step


def test_sharded_sampler_eval_covers_each_item_once_and_epochs_reshuffle():
    n = 11
    shards = [list(ShardedSampler(n, False, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    sampler = ShardedSampler(n, True, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == sorted(sampler) and first != list(sampler)


# -------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_to_the_floor():
    factors = [warmup_cosine_factor(s, 4, 20, 0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert warmup_cosine_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    mid = warmup_cosine_factor(12, 4, 20, 0.1)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, 4, 20, 0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)


# --------------------------------------------------------------------------------- metrics
def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, (1, 2, 5)) == [1, 2, 3]


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_round_trip_and_pickled_object_is_refused(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 2, "history": [{"a": 1.0}]})
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and torch.equal(state["model"]["weight"], model.weight)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": Payload()}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(evil)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(ValueError, match="not a loadable"):
        load_checkpoint(raw)


def test_checkpoint_mismatch_names_keys_and_shapes():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    state = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 4)).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["1.bias"]
    with pytest.raises(ValueError) as info:
        check_model_state(model, state, "ck.pt")
    text = str(info.value)
    assert "missing keys (1): ['1.bias']" in text
    assert "unexpected keys (1): ['extra.weight']" in text
    assert "0.weight: checkpoint (5, 3) vs model (2, 3)" in text


def test_progress_prints_every_n_steps_and_the_last():
    stream = io.StringIO()
    with Progress(5, "epoch 1/1", stream=stream, every=2) as bar:
        for _ in range(5):
            bar.update(loss=0.5)
    lines = stream.getvalue().splitlines()
    assert [line.split("] ")[1].split()[0] for line in lines] == ["2/5", "4/5", "5/5"]
    assert "loss 0.5000" in lines[-1]


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("pks4-train") == "pks4_layers.train.cli:main"
