"""Pareto plots of a study: a PNG (the built-in objectives pairwise + hypervolume history) and an interactive HTML
(3-D, hover shows each trial's values, extra objectives too, and parameters). Self-contained HTML: a DGX Spark is
often offline."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the machines that run studies
import matplotlib.pyplot as plt  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from optuna.trial import FrozenTrial  # noqa: E402

from mtp_abliterate.objectives.base import ObjectiveSpec  # noqa: E402
from mtp_abliterate.objectives.registry import BUILT_INS  # noqa: E402
from mtp_abliterate.search.metrics import ACCEPTED_PER_STEP, CI95  # noqa: E402
from mtp_abliterate.search.study.pareto import feasible  # noqa: E402
from mtp_abliterate.search.study.records import TrialRecord  # noqa: E402

MARKERS = ("*", "X", "P", "s")  # vanilla first, then `study reference` points


def _halfwidth(metrics: dict[str, float], objective: ObjectiveSpec) -> float:
    """The 95 % half-width drawn on an objective's axis: the acceptance objective's, prompts as the unit."""
    return metrics.get(CI95, 0.0) if objective.name == ACCEPTED_PER_STEP else 0.0


def _errors(points: list[dict[str, float]], objective: ObjectiveSpec) -> list[float] | None:
    widths = [_halfwidth(m, objective) for m in points]
    return widths if any(widths) else None


def _hover(t: FrozenTrial, objectives: list[ObjectiveSpec]) -> str:
    values = "<br>".join(f"{o.label}: {v:.4g}" for o, v in zip(objectives, t.values, strict=True))
    params = "<br>".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in t.params.items())
    return f"trial {t.number}<br>{values}<br>{params}"


def pareto_png(
    path: Path,
    complete: list[FrozenTrial],
    front: list[FrozenTrial],
    objectives: list[ObjectiveSpec],
    marks: dict[str, dict[str, float]],
    history: list[tuple[int, float]],
) -> None:
    on_front = {t.number for t in front}
    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    # the built-ins pairwise in three panels (extra objectives are in the HTML's hover), the hypervolume in the fourth
    for ax, (i, j) in zip(axes.flat, combinations(range(BUILT_INS), 2), strict=False):
        for label, pick, style in (
            ("infeasible", lambda t: not feasible(t), dict(facecolors="none", edgecolors="0.6")),
            ("dominated", lambda t: feasible(t) and t.number not in on_front, dict(color="0.6")),
            ("Pareto front", lambda t: t.number in on_front, dict(color="tab:red")),
        ):
            pts = [t for t in complete if pick(t)]
            if pts:
                ax.scatter([t.values[i] for t in pts], [t.values[j] for t in pts], label=label, s=28, **style)
        drawn = [t for t in complete if feasible(t)]
        metrics = [TrialRecord.of(t).metrics for t in drawn]
        xerr, yerr = _errors(metrics, objectives[i]), _errors(metrics, objectives[j])
        if drawn and (xerr or yerr):  # each point's 95 % interval on the acceptance axis
            xs, ys = [t.values[i] for t in drawn], [t.values[j] for t in drawn]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.75", elinewidth=0.8, zorder=0)
        for t in front:
            ax.annotate(
                str(t.number), (t.values[i], t.values[j]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        for (label, point), marker in zip(marks.items(), MARKERS, strict=False):
            ax.scatter(
                point[objectives[i].name], point[objectives[j].name], marker=marker, s=140, color="k", label=label
            )
            xerr, yerr = _errors([point], objectives[i]), _errors([point], objectives[j])
            if xerr or yerr:
                ax.errorbar(
                    point[objectives[i].name], point[objectives[j].name], xerr=xerr, yerr=yerr, fmt="none", ecolor="k"
                )
        ax.set_xlabel(objectives[i].label)
        ax.set_ylabel(objectives[j].label)
        # KL spans decades (1e-4 near vanilla to >1 for broken candidates): linear near 0, log beyond.
        if objectives[i].name == "kld":
            ax.set_xscale("symlog", linthresh=1e-3)
        if objectives[j].name == "kld":
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[3]
    if history:
        ax.step([n for n, _ in history], [h for _, h in history], where="post", marker="o")  # one trial: a dot
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume of the feasible front")
    ax.grid(alpha=0.3)
    fig.suptitle(
        f"{len(complete)} trials measured in full, {len(front)} on the Pareto front; bars: 95 % intervals over prompts"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_html(
    path: Path,
    complete: list[FrozenTrial],
    front: list[FrozenTrial],
    objectives: list[ObjectiveSpec],
    marks: dict[str, dict[str, float]],
) -> None:
    on_front = {t.number for t in front}
    fig = go.Figure()
    for name, pts, color in (
        ("other trials", [t for t in complete if t.number not in on_front], "lightgray"),
        ("Pareto front", [t for t in complete if t.number in on_front], "crimson"),
    ):
        fig.add_trace(
            go.Scatter3d(
                x=[t.values[0] for t in pts],
                y=[t.values[1] for t in pts],
                z=[t.values[2] for t in pts],
                mode="markers",
                name=name,
                marker=dict(size=5, color=color),
                error_z=dict(type="data", array=[_halfwidth(TrialRecord.of(t).metrics, objectives[2]) for t in pts]),
                hovertext=[_hover(t, objectives) for t in pts],
                hoverinfo="text",
            )
        )
    for (label, point), symbol in zip(marks.items(), ("diamond", "x", "cross", "square"), strict=False):
        fig.add_trace(
            go.Scatter3d(
                x=[point[objectives[0].name]],
                y=[point[objectives[1].name]],
                z=[point[objectives[2].name]],
                mode="markers",
                name=label,
                marker=dict(size=7, color="black", symbol=symbol),
                error_z=dict(type="data", array=[_halfwidth(point, objectives[2])]),
            )
        )
    fig.update_layout(
        scene=dict(xaxis_title=objectives[0].label, yaxis_title=objectives[1].label, zaxis_title=objectives[2].label),
        title=f"Pareto front: {len(front)} of {len(complete)} trials measured in full",
    )
    fig.write_html(path, include_plotlyjs=True)
