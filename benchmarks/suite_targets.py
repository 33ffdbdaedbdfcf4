"""The peer comparison's targets, read off the motion suite's summary rows: met or missed.

The targets (what PKS4 must show against the temporal modules users would insert instead):

* ``probe``: after the frozen backbone, PKS4 at least matches the per-location cost-volume
  probe on every temporal task (the probe is not better on the paired comparison);
* ``peers``: in every regime, PKS4's mean over the temporal tasks is ahead of every peer's, on a
  paired comparison whose 95% interval excludes zero;
* ``prior``: in every regime, PKS4 beats ``scan`` (the same block without its kinematic prior)
  on every temporal task, paired, the interval excluding zero;
* ``accuracy``: every temporal task at least 95% after the frozen backbone (no seed below 90),
  at least 90% from scratch and fine-tuned (no seed below 85);
* ``spatial``: on the spatial control, the frame average is not better than PKS4.

Each verdict is computed from the rows :func:`motion_suite.summarise` and
:func:`motion_suite.summarise_models` return (``vs_reference`` is the paired difference of a
row's model from PKS4 on the same clips); nothing here is measured or assumed.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

REFERENCE = "pks4"
PROBE = "probe_local"
NO_PRIOR = "scan"
FRAME_AVERAGE = "mean"
SPATIAL = "spatial"
# Not peers: the logistic regressions (their own target) and the block's own variants.
NOT_PEERS = ("probe", "probe_local")
# (mean over seeds, worst seed) that every temporal task must reach, by regime.
ACCURACY = {"frozen": (95.0, 90.0), "scratch": (90.0, 85.0), "finetune": (90.0, 85.0)}


def _fmt(x: float, signed: bool = False) -> str:
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _diff(d: dict[str, Any]) -> str:
    return f"{_fmt(d['diff'], True)} [{_fmt(d['low'], True)}, {_fmt(d['high'], True)}]"


def _status(failures: Sequence[str], checked: int) -> str:
    if not checked:
        return "not run"
    return "met" if not failures else "missed"


def check_targets(
    rows: Iterable[dict[str, Any]], models: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One entry per (target, regime): ``target``, ``regime``, ``status`` (``met``,
    ``missed`` or ``not run``) and ``evidence`` (the numbers behind it, failures first).

    ``rows``: the per-(regime, task, model) summary rows; ``models``: the per-(regime, model)
    rows over the temporal tasks. Regimes where PKS4 did not run are left out.
    """
    rows, models = list(rows), list(models)
    by_task = {(r["regime"], r["task"], r["model"]): r for r in rows}
    regimes = list(dict.fromkeys(r["regime"] for r in rows if r["model"] == REFERENCE))
    out: list[dict[str, Any]] = []

    def add(target: str, regime: str, failures: list[str], passes: list[str]) -> None:
        out.append(
            {
                "target": target,
                "regime": regime,
                "status": _status(failures, len(failures) + len(passes)),
                "evidence": "; ".join(failures + passes) or "-",
            }
        )

    for regime in regimes:
        tasks = [
            r["task"]
            for r in rows
            if r["regime"] == regime and r["model"] == REFERENCE and r["task"] != SPATIAL
        ]
        if regime == "frozen":
            failures, passes = [], []
            for task in tasks:
                probe = by_task.get((regime, task, PROBE))
                if probe is None or probe["vs_reference"] is None:
                    continue
                d = probe["vs_reference"]
                text = f"{task}: probe {_diff(d)}"
                (failures if d["verdict"] == "better" else passes).append(text)
            add("probe", regime, failures, passes)

        failures, passes = [], []
        for m in models:
            if m["regime"] != regime or m["model"] in (REFERENCE, *NOT_PEERS):
                continue
            if m["model"].startswith(REFERENCE + "_") or m["vs_reference"] is None:
                continue
            d = m["vs_reference"]
            text = f"{m['model']} {_diff(d)}"
            (passes if d["verdict"] == "worse" else failures).append(text)
        add("peers", regime, failures, passes)

        failures, passes = [], []
        for task in tasks:
            scan = by_task.get((regime, task, NO_PRIOR))
            if scan is None or scan["vs_reference"] is None:
                continue
            d = scan["vs_reference"]
            text = f"{task}: scan {_diff(d)}"
            (passes if d["verdict"] == "worse" else failures).append(text)
        add("prior", regime, failures, passes)

        floor, worst_floor = ACCURACY[regime]
        failures, passes = [], []
        for task in tasks:
            r = by_task[(regime, task, REFERENCE)]
            text = f"{task} {_fmt(r['mean'])} (worst seed {_fmt(r['min'])})"
            ok = r["mean"] >= floor and r["min"] >= worst_floor
            (passes if ok else failures).append(text)
        add("accuracy", regime, failures, passes)

        average = by_task.get((regime, SPATIAL, FRAME_AVERAGE))
        if average is not None and average["vs_reference"] is not None:
            d = average["vs_reference"]
            text = f"frame average {_diff(d)}"
            worse_than_average = d["verdict"] == "better"
            add(
                "spatial",
                regime,
                [text] if worse_than_average else [],
                [] if worse_than_average else [text],
            )
    return out


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`check_targets`' entries."""
    lines = ["| target | regime | status | evidence (paired differences from PKS4) |"]
    lines.append("|---|---|---|---|")
    for t in targets:
        lines.append(f"| {t['target']} | {t['regime']} | {t['status']} | {t['evidence']} |")
    return "\n".join(lines)
