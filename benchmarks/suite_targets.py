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

from typing import Any, Iterable, Optional, Sequence

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

    def paired(regime: str, task: str, model: str) -> Optional[dict[str, Any]]:
        row = by_task.get((regime, task, model))
        return None if row is None else row["vs_reference"]

    def add(target: str, regime: str, judged: list[tuple[str, bool]]) -> None:
        """``judged``: (evidence, whether it meets the target) for each thing checked."""
        failures = [text for text, ok in judged if not ok]
        passes = [text for text, ok in judged if ok]
        status = "not run" if not judged else "missed" if failures else "met"
        evidence = "; ".join(failures + passes) or "-"
        out.append({"target": target, "regime": regime, "status": status, "evidence": evidence})

    for regime in regimes:
        tasks = [
            r["task"]
            for r in rows
            if r["regime"] == regime and r["model"] == REFERENCE and r["task"] != SPATIAL
        ]
        if regime == "frozen":
            probes = [(t, paired(regime, t, PROBE)) for t in tasks]
            judged = [(f"{t}: probe {_diff(d)}", d["verdict"] != "better") for t, d in probes if d]
            add("probe", regime, judged)

        peers = [
            m
            for m in models
            if m["regime"] == regime
            and m["model"] not in (REFERENCE, *NOT_PEERS)
            and not m["model"].startswith(REFERENCE + "_")
            and m["vs_reference"] is not None
        ]
        judged = [
            (f"{m['model']} {_diff(m['vs_reference'])}", m["vs_reference"]["verdict"] == "worse")
            for m in peers
        ]
        add("peers", regime, judged)

        scans = [(t, paired(regime, t, NO_PRIOR)) for t in tasks]
        judged = [(f"{t}: scan {_diff(d)}", d["verdict"] == "worse") for t, d in scans if d]
        add("prior", regime, judged)

        floor, worst_floor = ACCURACY[regime]
        judged = []
        for task in tasks:
            r = by_task[(regime, task, REFERENCE)]
            text = f"{task} {_fmt(r['mean'])} (worst seed {_fmt(r['min'])})"
            judged.append((text, r["mean"] >= floor and r["min"] >= worst_floor))
        add("accuracy", regime, judged)

        d = paired(regime, SPATIAL, FRAME_AVERAGE)
        if d is not None:
            add("spatial", regime, [(f"frame average {_diff(d)}", d["verdict"] != "better")])
    return out


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`check_targets`' entries."""
    lines = ["| target | regime | status | evidence (paired differences from PKS4) |"]
    lines.append("|---|---|---|---|")
    for t in targets:
        lines.append(f"| {t['target']} | {t['regime']} | {t['status']} | {t['evidence']} |")
    return "\n".join(lines)
