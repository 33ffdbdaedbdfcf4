"""Error bars for the motion suite: accuracy over seeds and clips, and paired comparisons.

A training run (one model, one seed) is evaluated on a set of clips and gives a 0/1 correctness
vector over them. The data behind an accuracy is sampled at two levels:

* seeds: each seed draws its own clips (and initialisation), so clip ``i`` of seed 0 and clip
  ``i`` of seed 1 are unrelated, and the seeds themselves are a sample of possible runs;
* clips: within a seed, the clips are a sample of possible clips.

The intervals here are two-level (hierarchical) percentile bootstraps: each resample draws the
seeds with replacement, then, for every drawn seed, that seed's clips with replacement, and
takes the mean over the drawn seeds of the per-seed accuracy. With a single seed this is the
ordinary bootstrap over clips. With few seeds (3 or so) the seed level is poorly estimated and
percentile intervals tend to be somewhat narrow: read them as error bars, not exact coverage.

Two models run with the same seed see the same clips in the same order, so comparisons are
paired: the same resampled seeds and clips are used for both models, and the variation they
share (an easy seed, a hard clip) cancels out of the difference.

Inputs are ``correct[s]``: the 0/1 (or bool) vector of seed ``s``; seeds may differ in length.
Accuracies and differences are in percent (points); :func:`binomial_interval` and
:func:`chance_upper_bound` work in fractions. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import math
import reprlib
import statistics
from typing import Callable, Dict, List, Mapping, Sequence, Tuple, Union

import torch

Correct = Sequence[Sequence[Union[int, bool]]]
# Draws ``m`` resampled per-seed values (percent), as a float64 tensor of shape (m,).
Draw = Callable[[int, torch.Generator], torch.Tensor]

__all__ = [
    "accuracy_interval",
    "binomial_interval",
    "chance_upper_bound",
    "format_difference",
    "format_interval",
    "paired_difference",
    "paired_task_mean_difference",
    "task_mean_interval",
]


# --- validation ------------------------------------------------------------------------------


def _check_level(level: float, name: str = "level") -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"{name}: expected a number in (0, 1), got {level!r}")


def _check_options(level: float, resamples: int) -> None:
    _check_level(level)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples: expected an integer >= 100, got {resamples!r}")


def _seeds(name: str, correct: Correct) -> List[torch.Tensor]:
    """``correct`` as a list of 1-D bool tensors, one per seed, after checking it."""
    if isinstance(correct, (str, bytes)) or not hasattr(correct, "__iter__"):
        raise ValueError(f"{name}: expected a sequence of 0/1 vectors, got {reprlib.repr(correct)}")
    vectors = list(correct)
    if not vectors:
        raise ValueError(f"{name}: expected at least one seed, got none")
    seeds = []
    for s, vector in enumerate(vectors):
        where = f"{name}[{s}]"
        try:
            t = torch.as_tensor(vector if isinstance(vector, torch.Tensor) else list(vector))
        except (TypeError, ValueError, RuntimeError) as err:
            got = reprlib.repr(vector)  # short: these vectors can hold thousands of clips
            raise ValueError(f"{where}: expected a vector of 0/1 values, got {got}") from err
        if t.ndim != 1 or t.numel() == 0:
            got = f"shape {tuple(t.shape)}"
            raise ValueError(f"{where}: expected a non-empty 1-D vector of 0/1 values, got {got}")
        binary = (t == 0) | (t == 1)
        if not binary.all():
            bad = t[~binary][0].item()
            raise ValueError(f"{where}: expected only 0/1 values, got {bad!r}")
        seeds.append(t.to(torch.bool))
    return seeds


def _paired_seeds(
    name_a: str, correct_a: Correct, name_b: str, correct_b: Correct
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    a, b = _seeds(name_a, correct_a), _seeds(name_b, correct_b)
    if len(a) != len(b):
        raise ValueError(f"{name_b}: expected {len(a)} seeds (as {name_a}), got {len(b)}")
    for s, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y):
            raise ValueError(
                f"{name_b}[{s}]: expected length {len(x)} (that of {name_a}[{s}]), got {len(y)}"
            )
    return a, b


def _tasks(name: str, per_task: Mapping[str, Correct]) -> Dict[str, List[torch.Tensor]]:
    if not isinstance(per_task, Mapping) or len(per_task) == 0:
        got = "an empty mapping" if isinstance(per_task, Mapping) else type(per_task).__name__
        raise ValueError(f"{name}: expected a non-empty mapping of task -> seeds, got {got}")
    # Sorted, so that the result does not depend on the mapping's insertion order.
    return {task: _seeds(f"{name}[{task!r}]", per_task[task]) for task in sorted(per_task)}


# --- per-seed resampling ---------------------------------------------------------------------
#
# Drawing n clips with replacement from a 0/1 vector with k ones and counting the ones is exactly
# a Binomial(n, k/n) draw, so the counts are drawn directly: the same distribution as drawing
# clip indices, in O(1) memory per resample instead of O(n).


def _accuracy_draw(x: torch.Tensor) -> Tuple[float, Draw]:
    """Point accuracy (percent) of one seed and a draw of its clip-resampled accuracies."""
    n, k = len(x), int(x.sum())

    def draw(m: int, gen: torch.Generator) -> torch.Tensor:
        count = torch.full((m,), float(n), dtype=torch.float64)
        ones = torch.binomial(count, torch.full_like(count, k / n), generator=gen)
        return ones * (100.0 / n)

    return 100.0 * k / n, draw


def _difference_draw(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, Draw]:
    """Point difference a - b (points) of one seed and a draw of its paired clip resamples.

    Resampling clips (pairs (a_i, b_i)) is a multinomial draw over the four outcomes; the
    difference only depends on n10 (a right, b wrong) and n01 (a wrong, b right). They are drawn
    as n10 ~ Binomial(n, p10), then n01 ~ Binomial(n - n10, p01 / (1 - p10)).
    """
    n = len(a)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    q01 = n01 / (n - n10) if n > n10 else 0.0

    def draw(m: int, gen: torch.Generator) -> torch.Tensor:
        count = torch.full((m,), float(n), dtype=torch.float64)
        x10 = torch.binomial(count, torch.full_like(count, n10 / n), generator=gen)
        x01 = torch.binomial(count - x10, torch.full_like(count, q01), generator=gen)
        return (x10 - x01) * (100.0 / n)

    return 100.0 * (n10 - n01) / n, draw


def _hierarchical(draws: Sequence[Draw], resamples: int, gen: torch.Generator) -> torch.Tensor:
    """Resampled means over seeds, shape (resamples,): seeds, then each drawn seed's clips."""
    n_seeds = len(draws)
    picks = torch.randint(n_seeds, (resamples, n_seeds), generator=gen)
    values = torch.empty(resamples, n_seeds, dtype=torch.float64)
    for s, draw in enumerate(draws):
        # Every slot that drew seed s gets its own, independent clip resample of that seed.
        chosen = picks == s
        values[chosen] = draw(int(chosen.sum()), gen)
    return values.mean(dim=1)


def _bounds(boot: torch.Tensor, level: float) -> Tuple[float, float]:
    tail = (1.0 - level) / 2.0
    q = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    low, high = torch.quantile(boot, q).tolist()
    return low, high


def _comparison(diff: float, boot: torch.Tensor, level: float) -> dict:
    low, high = _bounds(boot, level)
    verdict = "better" if low > 0 else "worse" if high < 0 else "no difference"
    # Approximate two-sided bootstrap p-value: how often the resampled difference reaches 0 on
    # either side (resolution 1 / resamples; a percentile bootstrap, not an exact test).
    below = (boot <= 0).double().mean().item()
    above = (boot >= 0).double().mean().item()
    p_value = min(1.0, 2.0 * min(below, above))
    return {"diff": diff, "low": low, "high": high, "verdict": verdict, "p_value": p_value}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- public API ------------------------------------------------------------------------------


def accuracy_interval(
    correct: Correct, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict:
    """Accuracy over seeds with a hierarchical bootstrap interval.

    Args:
        correct: ``correct[s]`` is the 0/1 vector (length ``n_s``) of seed ``s``; S seeds.
        level: the interval's confidence level, in (0, 1).
        resamples: bootstrap resamples (>= 100).
        seed: seed of the resampling generator.

    Returns:
        ``{"mean", "low", "high", "seeds", "clips"}``: ``mean`` is the mean over seeds of each
        seed's accuracy (not the pooled clip accuracy), in percent; ``low`` and ``high`` are the
        percentile bounds of that mean when the seeds are resampled with replacement and, within
        each drawn seed, its clips too; ``seeds`` is S and ``clips`` the total number of clips.
    """
    _check_options(level, resamples)
    seeds = _seeds("correct", correct)
    points, draws = zip(*(_accuracy_draw(x) for x in seeds))
    boot = _hierarchical(draws, resamples, _generator(seed))
    low, high = _bounds(boot, level)
    return {
        "mean": statistics.fmean(points),
        "low": low,
        "high": high,
        "seeds": len(seeds),
        "clips": sum(len(x) for x in seeds),
    }


def paired_difference(
    correct_a: Correct,
    correct_b: Correct,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Paired difference of accuracy, model a minus model b, in percentage points.

    Args:
        correct_a, correct_b: ``correct_x[s]`` is the 0/1 vector of seed ``s``; both models have
            the same S seeds and, for each seed, the same clips in the same order (same lengths).
        level, resamples, seed: as in :func:`accuracy_interval`.

    Returns:
        ``{"diff", "low", "high", "verdict", "p_value", "seeds", "clips"}``: ``diff`` is the mean
        over seeds of the per-seed accuracy difference; the bounds resample seeds and clips as in
        :func:`accuracy_interval`, with the same seeds and clips for both models; ``verdict`` is
        ``"better"`` when ``low > 0``, ``"worse"`` when ``high < 0``, else ``"no difference"``;
        ``p_value`` is an approximate two-sided bootstrap p-value,
        ``2 * min(P(diff* <= 0), P(diff* >= 0))`` capped at 1.

    Raises:
        ValueError: the two models differ in the number of seeds or in a seed's length.
    """
    _check_options(level, resamples)
    a, b = _paired_seeds("correct_a", correct_a, "correct_b", correct_b)
    points, draws = zip(*(_difference_draw(x, y) for x, y in zip(a, b)))
    boot = _hierarchical(draws, resamples, _generator(seed))
    out = _comparison(statistics.fmean(points), boot, level)
    out.update(seeds=len(a), clips=sum(len(x) for x in a))
    return out


def task_mean_interval(
    per_task: Mapping[str, Correct], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict:
    """Mean accuracy over tasks with a hierarchical bootstrap interval.

    Args:
        per_task: task name -> ``correct`` as in :func:`accuracy_interval` (its own seeds).
        level, resamples, seed: as in :func:`accuracy_interval`.

    Returns:
        ``{"mean", "low", "high", "tasks", "per_task"}``: ``per_task[name]`` is the task's mean
        over seeds of per-seed accuracy, ``mean`` the mean of those over tasks (percent). The
        tasks are independent data, so each task's seeds and clips are resampled independently
        and the resampled task values are averaged.
    """
    _check_options(level, resamples)
    tasks = _tasks("per_task", per_task)
    gen = _generator(seed)
    means, boots = {}, []
    for task, seeds in tasks.items():
        points, draws = zip(*(_accuracy_draw(x) for x in seeds))
        means[task] = statistics.fmean(points)
        boots.append(_hierarchical(draws, resamples, gen))
    low, high = _bounds(torch.stack(boots).mean(dim=0), level)
    return {
        "mean": statistics.fmean(means.values()),
        "low": low,
        "high": high,
        "tasks": len(tasks),
        "per_task": means,
    }


def paired_task_mean_difference(
    per_task_a: Mapping[str, Correct],
    per_task_b: Mapping[str, Correct],
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Paired difference (a - b, points) of the mean accuracy over tasks.

    Args:
        per_task_a, per_task_b: task name -> ``correct`` as in :func:`paired_difference`; the
            same task names, and per task the same seeds and clips for both models.
        level, resamples, seed: as in :func:`accuracy_interval`.

    Returns:
        ``{"diff", "low", "high", "verdict", "p_value", "tasks", "per_task"}`` with the fields
        of :func:`paired_difference`; ``per_task[name]`` is that task's mean difference. Each
        task's seeds and clips are resampled independently, paired between the two models.
    """
    _check_options(level, resamples)
    tasks_a, tasks_b = _tasks("per_task_a", per_task_a), _tasks("per_task_b", per_task_b)
    if list(tasks_a) != list(tasks_b):
        raise ValueError(
            f"per_task_b: expected the tasks of per_task_a {list(tasks_a)}, got {list(tasks_b)}"
        )
    gen = _generator(seed)
    diffs, boots = {}, []
    for task in tasks_a:
        a, b = _paired_seeds(
            f"per_task_a[{task!r}]", tasks_a[task], f"per_task_b[{task!r}]", tasks_b[task]
        )
        points, draws = zip(*(_difference_draw(x, y) for x, y in zip(a, b)))
        diffs[task] = statistics.fmean(points)
        boots.append(_hierarchical(draws, resamples, gen))
    out = _comparison(statistics.fmean(diffs.values()), torch.stack(boots).mean(dim=0), level)
    out.update(tasks=len(tasks_a), per_task=diffs)
    return out


def binomial_interval(k: int, n: int, level: float = 0.95) -> Tuple[float, float]:
    """Wilson score interval for a proportion ``k / n``, as fractions in [0, 1].

    Unlike the normal (Wald) interval it stays inside [0, 1] and is sensible at k = 0 or k = n.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k: expected an integer in [0, {n}], got {k!r}")
    _check_level(level)
    z = statistics.NormalDist().inv_cdf((1.0 + level) / 2.0)
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); clamp away the rounding.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def chance_upper_bound(n: int, chance: float, alpha: float) -> float:
    """The smallest accuracy (fraction) that is significantly above chance on ``n`` clips.

    Returns ``k / n`` for the smallest integer ``k`` with ``P(Binomial(n, chance) >= k) <=
    alpha``: an accuracy below it is consistent with guessing at level ``alpha`` (one-sided).
    ``math.inf`` when no accuracy up to 1 gets there (``chance ** n > alpha``). The tail is
    summed exactly in log space (``math.comb`` is an exact integer), fine for n in the thousands.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    if isinstance(chance, bool) or not isinstance(chance, (int, float)) or not 0 < chance < 1:
        raise ValueError(f"chance: expected a number in (0, 1), got {chance!r}")
    _check_level(alpha, "alpha")
    log_p, log_q = math.log(chance), math.log1p(-chance)
    # A relative slack of 1e-9 so that ties in decimal (0.1 ** 2 == 0.01) count as reaching alpha
    # whatever the rounding of the floats and of the log-space sum.
    log_alpha = math.log(alpha) + 1e-9
    log_tail = -math.inf  # log P(X >= k), summed from k = n down
    smallest = n + 1
    for k in range(n, -1, -1):
        log_pmf = math.log(math.comb(n, k)) + k * log_p + (n - k) * log_q
        hi, lo = max(log_tail, log_pmf), min(log_tail, log_pmf)
        log_tail = hi + math.log1p(math.exp(lo - hi))
        if log_tail > log_alpha:  # the tail only grows as k decreases
            break
        smallest = k
    return math.inf if smallest > n else smallest / n


def _one_decimal(x: float, signed: bool = False) -> str:
    # Round first, so that -0.04 prints as 0.0 rather than -0.0.
    x = round(x, 1) + 0.0
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def format_interval(d: dict) -> str:
    """``"95.0 [93.1, 96.7]"`` from a dict with ``mean``, ``low`` and ``high``."""
    return f"{_one_decimal(d['mean'])} [{_one_decimal(d['low'])}, {_one_decimal(d['high'])}]"


def format_difference(d: dict) -> str:
    """``"+2.3 [-0.8, 5.4] no difference"`` from a dict with ``diff``, bounds and ``verdict``."""
    bounds = f"[{_one_decimal(d['low'])}, {_one_decimal(d['high'])}]"
    return f"{_one_decimal(d['diff'], signed=True)} {bounds} {d['verdict']}"
