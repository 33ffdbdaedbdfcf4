"""``benchmarks/suite_stats.py``: bootstrap intervals over seeds and clips, paired comparisons.

The point estimates are checked against hand computations, the intervals against a literal
(index-drawing) hierarchical bootstrap, the normal approximation and the paired/unpaired and
hierarchical/pooled orderings they must satisfy; the exact helpers against known values and
brute force; every ValueError against the argument it names.
"""

from __future__ import annotations

import math
import statistics
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(SCRIPTS))
import suite_stats as ss  # noqa: E402


def bernoulli(n: int, p: float, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=gen) < p).int().tolist()


def flip(x: list[int], fraction: float, seed: int) -> list[int]:
    """``x`` with a random ``fraction`` of its entries flipped."""
    gen = torch.Generator().manual_seed(seed)
    idx = set(torch.randperm(len(x), generator=gen)[: round(fraction * len(x))].tolist())
    return [1 - v if i in idx else v for i, v in enumerate(x)]


def width(d: dict) -> float:
    return d["high"] - d["low"]


def literal_bootstrap(correct: list[list[int]], resamples: int, seed: int) -> torch.Tensor:
    """The hierarchical bootstrap as described: draw seeds, then each drawn seed's clip indices."""
    gen = torch.Generator().manual_seed(seed)
    seeds = [torch.tensor(x, dtype=torch.float64) for x in correct]
    out = torch.empty(resamples, dtype=torch.float64)
    for r in range(resamples):
        picks = torch.randint(len(seeds), (len(seeds),), generator=gen).tolist()
        accs = []
        for s in picks:
            idx = torch.randint(len(seeds[s]), (len(seeds[s]),), generator=gen)
            accs.append(seeds[s][idx].mean())
        out[r] = 100 * torch.stack(accs).mean()
    return out


# --- accuracy_interval -----------------------------------------------------------------------


def test_mean_is_the_mean_of_per_seed_accuracies() -> None:
    correct = [[1, 1, 0, 1], [0, 1], [True, True, True, True, True, False]]
    d = ss.accuracy_interval(correct)
    # 75 %, 50 %, 83.33 %: their mean, not the pooled 9/12 = 75 %.
    assert d["mean"] == pytest.approx((75 + 50 + 500 / 6) / 3)
    assert d["seeds"] == 3 and d["clips"] == 12
    assert d["low"] <= d["mean"] <= d["high"]


def test_deterministic_given_seed_and_varies_with_it() -> None:
    correct = [bernoulli(200, 0.6, 1), bernoulli(150, 0.8, 2)]
    assert ss.accuracy_interval(correct, seed=3) == ss.accuracy_interval(correct, seed=3)
    d3, d4 = ss.accuracy_interval(correct, seed=3), ss.accuracy_interval(correct, seed=4)
    assert d3["mean"] == d4["mean"]
    assert (d3["low"], d3["high"]) != (d4["low"], d4["high"])
    assert d3["low"] == pytest.approx(d4["low"], abs=3) and d3["high"] == pytest.approx(
        d4["high"], abs=3
    )


def test_single_seed_matches_normal_approximation() -> None:
    x = bernoulli(400, 0.7, seed=0)
    d = ss.accuracy_interval([x])
    assert d["low"] < 70 < d["high"]
    normal = 2 * 1.96 * math.sqrt(0.7 * 0.3 / 400) * 100
    assert width(d) == pytest.approx(normal, rel=0.25)


def test_matches_a_literal_hierarchical_bootstrap() -> None:
    # The count draws must have the distribution of drawing seeds, then clip indices.
    correct = [bernoulli(40, 0.55, 5), bernoulli(60, 0.75, 6), bernoulli(90, 0.9, 7)]
    boot = literal_bootstrap(correct, resamples=2000, seed=11)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    d = ss.accuracy_interval(correct, resamples=4000)
    assert width(d) == pytest.approx(high - low, rel=0.15)
    assert d["low"] == pytest.approx(low, abs=2.5) and d["high"] == pytest.approx(high, abs=2.5)


def test_hierarchical_is_wider_than_pooled_clip_bootstrap() -> None:
    correct = [bernoulli(400, p, seed=i) for i, p in enumerate((0.5, 0.9, 0.7))]
    hierarchical = ss.accuracy_interval(correct)
    pooled = ss.accuracy_interval([[v for x in correct for v in x]])
    assert hierarchical["mean"] == pytest.approx(pooled["mean"], abs=0.5)  # equal lengths
    assert width(hierarchical) > 3 * width(pooled)


def test_level_orders_widths() -> None:
    correct = [bernoulli(300, 0.7, 0), bernoulli(300, 0.75, 1)]
    assert width(ss.accuracy_interval(correct, level=0.8)) < width(ss.accuracy_interval(correct))


def test_all_correct_gives_a_point_interval() -> None:
    d = ss.accuracy_interval([[1] * 20, [True] * 5])
    assert (d["mean"], d["low"], d["high"]) == (100.0, 100.0, 100.0)


def test_accepts_tensors() -> None:
    lists = [bernoulli(50, 0.6, 0), bernoulli(70, 0.6, 1)]
    tensors = [torch.tensor(x, dtype=torch.bool) for x in lists]
    assert ss.accuracy_interval(tensors) == ss.accuracy_interval(lists)


# --- paired_difference -----------------------------------------------------------------------


def test_identical_models_give_exactly_zero() -> None:
    correct = [bernoulli(100, 0.7, 0), bernoulli(80, 0.6, 1)]
    d = ss.paired_difference(correct, correct)
    assert (d["diff"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
    assert d["verdict"] == "no difference" and d["p_value"] == 1.0
    assert ss.format_difference(d) == "+0.0 [0.0, 0.0] no difference"


def test_difference_is_mean_of_per_seed_differences() -> None:
    a = [[1, 1, 0, 1], [1, 0]]
    b = [[1, 0, 0, 0], [1, 1]]
    d = ss.paired_difference(a, b)
    assert d["diff"] == pytest.approx(((75 - 25) + (50 - 100)) / 2)
    assert d["seeds"] == 2 and d["clips"] == 6


def test_dominating_model_is_better_and_the_reverse_worse() -> None:
    b = [bernoulli(300, 0.7, seed=i) for i in range(3)]
    a = [[1] * 300 for _ in b]  # right wherever b is, and more
    better = ss.paired_difference(a, b)
    assert better["verdict"] == "better" and better["low"] > 0 and better["p_value"] < 0.01
    worse = ss.paired_difference(b, a)
    assert worse["verdict"] == "worse" and worse["high"] < 0
    assert worse["diff"] == pytest.approx(-better["diff"])


def test_small_difference_is_no_difference() -> None:
    a = [bernoulli(200, 0.7, seed=i) for i in range(3)]
    b = [flip(x, 0.02, seed=10 + i) for i, x in enumerate(a)]
    d = ss.paired_difference(a, b)
    assert d["verdict"] == "no difference" and d["low"] <= 0 <= d["high"]
    assert d["p_value"] > 0.05


def test_p_value_is_two_sided() -> None:
    # As many clips only a gets right as clips only b does: the resampled differences are
    # symmetric about 0, so the two-sided p-value is near 1 (a one-sided one would be near 0.5).
    a = [[1] * 30 + [0] * 30 + [1] * 40 for _ in range(3)]
    b = [[0] * 30 + [1] * 30 + [1] * 40 for _ in range(3)]
    d = ss.paired_difference(a, b)
    assert d["diff"] == 0.0 and d["p_value"] > 0.85
    # A moderate difference: the p-value is consistent with the interval at the same level.
    # Per seed, 12 clips only a gets right and 6 only b: +6 points, p about 0.01.
    a = [[1] * 12 + [0] * 6 + [1] * 60 + [0] * 22 for _ in range(3)]
    b = [[0] * 12 + [1] * 6 + [1] * 60 + [0] * 22 for _ in range(3)]
    for level in (0.9, 0.95, 0.99, 0.999):
        d = ss.paired_difference(a, b, level=level)
        assert 0 < d["p_value"] < 1
        assert (d["verdict"] == "better") == (d["p_value"] < 1 - level), (level, d)


def test_paired_differs_from_independent_draws() -> None:
    # Discordant pairs only: the resampled n10 and n01 are negatively correlated (a multinomial),
    # so the paired spread is that of the -1/+1 vector, not of two independent accuracies.
    a, b = [[1] * 50 + [0] * 50], [[0] * 50 + [1] * 50]
    d = ss.paired_difference(a, b, resamples=4000)
    boot = literal_bootstrap([[u - v for u, v in zip(a[0], b[0])]], resamples=2000, seed=1)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert width(d) == pytest.approx(high - low, rel=0.1)


def test_paired_is_narrower_than_unpaired() -> None:
    a = [bernoulli(500, p, seed=i) for i, p in enumerate((0.6, 0.75, 0.7))]
    b = [flip(x, 0.03, seed=10 + i) for i, x in enumerate(a)]
    paired = ss.paired_difference(a, b)
    ia, ib = ss.accuracy_interval(a), ss.accuracy_interval(b, seed=1)
    unpaired = math.hypot(width(ia), width(ib))  # width of the difference of independent ones
    assert width(paired) < 0.3 * unpaired


def test_paired_matches_literal_bootstrap_of_differences() -> None:
    # Within a seed, the paired clip resample of a - b is the clip resample of the 0/+1/-1 vector
    # a_i - b_i: a single-seed bootstrap of it gives the same spread.
    a = bernoulli(300, 0.7, 0)
    b = flip(a, 0.1, 1)
    boot = literal_bootstrap([[u - v for u, v in zip(a, b)]], resamples=2000, seed=3)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    d = ss.paired_difference([a], [b], resamples=4000)
    assert width(d) == pytest.approx(high - low, rel=0.15)


# --- task means ------------------------------------------------------------------------------


def test_task_mean_is_mean_of_task_means() -> None:
    per_task = {
        "spatial": [[1, 1, 1, 0], [1, 1]],  # 75 %, 100 %
        "shuttle": [[0, 1], [0, 0, 1], [1]],  # 50 %, 33.3 %, 100 %
    }
    d = ss.task_mean_interval(per_task)
    assert d["per_task"] == pytest.approx({"spatial": 87.5, "shuttle": (50 + 100 / 3 + 100) / 3})
    assert d["mean"] == pytest.approx(statistics.fmean(d["per_task"].values()))
    assert d["tasks"] == 2 and d["low"] <= d["mean"] <= d["high"]


def test_single_task_equals_accuracy_interval() -> None:
    correct = [bernoulli(100, 0.6, 0), bernoulli(120, 0.8, 1)]
    d = ss.task_mean_interval({"only": correct}, seed=5)
    ref = ss.accuracy_interval(correct, seed=5)
    assert (d["mean"], d["low"], d["high"]) == (ref["mean"], ref["low"], ref["high"])


def test_task_mean_averages_independent_noise() -> None:
    # The same data under four names: resampled independently, the mean's width is about half a
    # single task's; resampled with shared draws, it would be the same.
    correct = [bernoulli(200, p, seed=s) for s, p in enumerate((0.6, 0.7, 0.8))]
    tasks = {f"t{i}": correct for i in range(4)}
    overall = ss.task_mean_interval(tasks)
    single = ss.accuracy_interval(correct)
    assert overall["mean"] == pytest.approx(single["mean"])
    assert 0.35 * width(single) < width(overall) < 0.7 * width(single)
    # Insertion order does not matter.
    reordered = dict(reversed(list(tasks.items())))
    assert ss.task_mean_interval(reordered) == overall


def test_paired_task_mean_difference() -> None:
    b = {f"t{i}": [bernoulli(200, 0.6, seed=10 * i + s) for s in range(3)] for i in range(3)}
    a = {k: [[1] * len(x) for x in v] for k, v in b.items()}
    d = ss.paired_task_mean_difference(a, b)
    assert d["verdict"] == "better" and d["low"] > 0 and d["tasks"] == 3
    per = {k: ss.paired_difference(a[k], b[k])["diff"] for k in b}
    assert d["per_task"] == pytest.approx(per)
    assert d["diff"] == pytest.approx(statistics.fmean(per.values()))
    assert ss.paired_task_mean_difference(b, a)["verdict"] == "worse"
    same = ss.paired_task_mean_difference(b, b)
    assert (same["diff"], same["low"], same["high"], same["verdict"]) == (
        0.0,
        0.0,
        0.0,
        "no difference",
    )


# --- exact helpers ---------------------------------------------------------------------------


def test_wilson_known_values() -> None:
    low, high = ss.binomial_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.96**2 / (10 + 1.96**2), abs=1e-4)
    assert ss.binomial_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert ss.binomial_interval(10, 10)[1] == 1.0
    # Symmetric in k <-> n - k; narrower at a lower level.
    lo, hi = ss.binomial_interval(3, 17)
    assert ss.binomial_interval(14, 17) == pytest.approx((1 - hi, 1 - lo))
    lo90, hi90 = ss.binomial_interval(3, 17, level=0.9)
    assert lo < lo90 < hi90 < hi


def tail(n: int, chance: Fraction, k: int) -> Fraction:
    return sum(math.comb(n, j) * chance**j * (1 - chance) ** (n - j) for j in range(k, n + 1))


@pytest.mark.parametrize("chance", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_chance_upper_bound_brute_force(chance: float, alpha: float) -> None:
    for n in range(1, 31):
        # Exact rationals of the decimal values: 0.1 ** 2 is exactly 0.01, a tie that counts.
        exact, level = Fraction(str(chance)), Fraction(str(alpha))
        k = next((k for k in range(n + 1) if tail(n, exact, k) <= level), None)
        expected = math.inf if k is None else k / n
        assert ss.chance_upper_bound(n, chance, alpha) == expected, n


def test_chance_upper_bound_monotone_and_large_n() -> None:
    bounds = [ss.chance_upper_bound(500, 0.2, a) for a in (0.2, 0.05, 0.01, 0.001)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    assert ss.chance_upper_bound(2, 0.5, 0.1) == math.inf  # P(2 of 2) = 0.25 > 0.1
    big = ss.chance_upper_bound(3000, 0.25, 0.05)
    normal = 0.25 + 1.645 * math.sqrt(0.25 * 0.75 / 3000)
    assert big == pytest.approx(normal, abs=2e-3)


# --- formatting ------------------------------------------------------------------------------


def test_formatting() -> None:
    assert ss.format_interval({"mean": 95.0, "low": 93.14, "high": 96.66}) == "95.0 [93.1, 96.7]"
    d = {"diff": 2.3, "low": -0.8, "high": 5.4, "verdict": "no difference"}
    assert ss.format_difference(d) == "+2.3 [-0.8, 5.4] no difference"
    d = {"diff": -4.04, "low": -6.0, "high": -2.01, "verdict": "worse"}
    assert ss.format_difference(d) == "-4.0 [-6.0, -2.0] worse"
    d = {"diff": -0.04, "low": -0.04, "high": 0.0, "verdict": "no difference"}
    assert ss.format_difference(d) == "+0.0 [0.0, 0.0] no difference"


# --- validation ------------------------------------------------------------------------------

OK = [[1, 0, 1]]

ERRORS = [
    (lambda: ss.accuracy_interval([]), "correct"),
    (lambda: ss.accuracy_interval("0101"), "correct"),
    (lambda: ss.accuracy_interval(5), "correct"),
    (lambda: ss.accuracy_interval([[1, 0], []]), "correct[1]"),
    (lambda: ss.accuracy_interval([[1, 2, 0]]), "correct[0]"),
    (lambda: ss.accuracy_interval([[1, 0.5]]), "correct[0]"),
    (lambda: ss.accuracy_interval([[1], [-1]]), "correct[1]"),
    (lambda: ss.accuracy_interval([[[1, 0]]]), "correct[0]"),
    (lambda: ss.accuracy_interval([["a", "b"]]), "correct[0]"),
    (lambda: ss.accuracy_interval(OK, level=0), "level"),
    (lambda: ss.accuracy_interval(OK, level=1.0), "level"),
    (lambda: ss.accuracy_interval(OK, level=95), "level"),
    (lambda: ss.accuracy_interval(OK, resamples=99), "resamples"),
    (lambda: ss.accuracy_interval(OK, resamples=1000.0), "resamples"),
    (lambda: ss.paired_difference(OK, [[1, 0]]), "correct_b[0]"),
    (lambda: ss.paired_difference(OK, OK + OK), "correct_b"),
    (lambda: ss.paired_difference([], OK), "correct_a"),
    (lambda: ss.paired_difference(OK, [[1, 3, 0]]), "correct_b[0]"),
    (lambda: ss.paired_difference(OK, OK, level=-0.1), "level"),
    (lambda: ss.paired_difference(OK, OK, resamples=10), "resamples"),
    (lambda: ss.task_mean_interval({}), "per_task"),
    (lambda: ss.task_mean_interval([OK]), "per_task"),
    (lambda: ss.task_mean_interval({"x": [[0, 2]]}), "per_task['x'][0]"),
    (lambda: ss.task_mean_interval({"x": OK}, level=2), "level"),
    (lambda: ss.paired_task_mean_difference({"x": OK}, {"y": OK}), "per_task_b"),
    (lambda: ss.paired_task_mean_difference({"x": OK}, {"x": [[1]]}), "per_task_b['x'][0]"),
    (lambda: ss.paired_task_mean_difference({"x": OK}, {"x": OK + OK}), "per_task_b['x']"),
    (lambda: ss.paired_task_mean_difference({}, {"x": OK}), "per_task_a"),
    (lambda: ss.paired_task_mean_difference({"x": OK}, {"x": OK}, resamples=5), "resamples"),
    (lambda: ss.binomial_interval(11, 10), "k"),
    (lambda: ss.binomial_interval(-1, 10), "k"),
    (lambda: ss.binomial_interval(0, 0), "n"),
    (lambda: ss.binomial_interval(1, 10, level=1.5), "level"),
    (lambda: ss.chance_upper_bound(0, 0.5, 0.05), "n"),
    (lambda: ss.chance_upper_bound(10, 0.0, 0.05), "chance"),
    (lambda: ss.chance_upper_bound(10, 1.5, 0.05), "chance"),
    (lambda: ss.chance_upper_bound(10, 0.5, 0.0), "alpha"),
    (lambda: ss.chance_upper_bound(10, 0.5, 1.0), "alpha"),
]


@pytest.mark.parametrize("call,name", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_value_errors_name_the_argument(call, name: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{name}: expected "), message
    assert ", got " in message, message
