"""Tables of a study for the terminal: every trial with its state, and the Pareto set next to vanilla."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.study.pareto import ObjectiveSpec, feasible, pareto_front, reference_points

SHORT = {
    "start_layer_index": "start",
    "end_layer_index": "end",
    "preserve_w": "pres",
    "steer_w": "steer",
    "overcorrect_w": "over",
    "k": "k",
}


def _params(t: FrozenTrial) -> str:
    return " ".join(
        f"{SHORT.get(k, k)}={v:.3g}" if isinstance(v, float) else f"{SHORT.get(k, k)}={v}" for k, v in t.params.items()
    )


def _acc(metrics: dict) -> str:
    return "/".join(f"{metrics[f'acc_pos_{i}']:.3f}" for i in range(8) if f"acc_pos_{i}" in metrics)


def trials_table(study: optuna.Study, objectives: list[ObjectiveSpec]) -> Table:
    table = Table(title=f"study {study.study_name}: trials", header_style="bold")
    for col in ("#", "state", *[o.name for o in objectives], "acceptance a0..", "s"):
        table.add_column(col, no_wrap=True)
    table.add_column("parameters / reason", overflow="fold")
    for t in study.get_trials(deepcopy=False):
        m = t.user_attrs.get("metrics", {})
        if t.state == TrialState.COMPLETE:
            values = [f"{v:.4g}" for v in t.values]
            note = _params(t) + ("" if feasible(t) else "  (infeasible)")
        else:
            values = ["-"] * len(objectives)
            reason = t.user_attrs.get("fail_reason") or t.user_attrs.get("stage", "")
            note = f"{t.user_attrs.get('failed_stage', '')}: {reason}"[:200] if t.state == TrialState.FAIL else reason
        duration = f"{m['trial_s']:.0f}" if "trial_s" in m else "-"
        table.add_row(str(t.number), t.state.name.lower(), *values, _acc(m) or "-", duration, note)
    return table


def pareto_table(study: optuna.Study, objectives: list[ObjectiveSpec]) -> Table:
    front = sorted(pareto_front(study.get_trials(deepcopy=False), objectives), key=lambda t: t.values[0])
    table = Table(title=f"Pareto set: {len(front)} trial(s), after vanilla and references", header_style="bold")
    for col in ("trial", *[o.name for o in objectives], "acceptance a0..", "tok/s (aggregate)"):
        table.add_column(col, no_wrap=True)
    table.add_column("parameters", overflow="fold")
    for label, point in reference_points(study).items():
        params = study.user_attrs.get(f"reference.{label}", {})
        table.add_row(
            label,
            *[f"{point.get(o.name, float('nan')):.4g}" for o in objectives],
            _acc(point),
            f"{point.get('aggregate_tok_s', point.get('tok_s', 0)):.1f}",
            f"{params.get('method', '')} {params.get('params', '')}"[:200] if params else "-",
            style="dim",
        )
    for t in front:
        m = t.user_attrs.get("metrics", {})
        table.add_row(
            str(t.number),
            *[f"{v:.4g}" for v in t.values],
            _acc(m),
            f"{m.get('aggregate_tok_s', m.get('tok_s', 0)):.1f}",
            _params(t),
        )
    return table


def swap_summary(cfg: StudyConfig, check: dict[str, Any] | None) -> str:
    """How the study serves candidates, and the swap self-check's verdict."""
    mode = cfg.serving.mode
    if mode == "cold":
        return "serving: a cold start per candidate (serving.mode = 'cold')"
    if check is None:
        return f"serving: swap (serving.mode = '{mode}'), " + (
            "no self-check (forced)" if mode == "swap" else "self-check pending (first candidate)"
        )
    if check.get("passed", check["identical"]):  # verdicts of earlier versions have only `identical`
        return f"serving: swap, self-check passed on trial {check['trial']} ({check.get('rule', 'bit-identical')})"
    return (
        f"serving: cold starts since trial {check['trial']}: the swap self-check found differences in "
        + ", ".join(check["differences"][:4])
        + (f" ({check['rule']})" if "rule" in check else "")
    )
