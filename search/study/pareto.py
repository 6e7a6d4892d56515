"""Feasibility, the Pareto front and its hypervolume (all objectives compared as losses).

The front is computed here rather than read from `Study.best_trials`: it reads feasibility from the trial record, the
same way for every trial whatever sampled it (a trial of a random-search study that predates `set_constraint` has no
Optuna constraints, and Optuna 5 counts such a trial as feasible). The hypervolume is computed here too: Optuna has no
public hypervolume function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from mtp_abliterate.objectives.base import ObjectiveSpec
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.study.records import feasible_of, references, vanilla


def constraint_values(cfg: StudyConfig, refusal_rate: float, kld: float, valid: bool) -> list[float]:
    """The configured constraints, then validity, in Optuna's convention: <= 0 is feasible. A candidate whose
    acceptance measurement is invalid (degenerate answers, nothing accepted) is infeasible: the sampler learns to
    avoid its region and the front never holds it, while its measured values stay on record."""
    c = cfg.search.constraints
    out = []
    if c.max_refusal_rate is not None:
        out.append(refusal_rate - c.max_refusal_rate)
    if c.max_kl is not None:
        out.append(kld - c.max_kl)
    return [*out, 0.0 if valid else 1.0]


def feasible(t: FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE and feasible_of(t)


def dominates(a: Sequence[float], b: Sequence[float], objectives: list[ObjectiveSpec]) -> bool:
    """Whether objective values `a` dominate `b`: at least as good everywhere, better somewhere."""
    la = [o.loss(v) for o, v in zip(objectives, a, strict=True)]
    lb = [o.loss(v) for o, v in zip(objectives, b, strict=True)]
    return all(x <= y for x, y in zip(la, lb, strict=True)) and any(x < y for x, y in zip(la, lb, strict=True))


def pareto_front(trials: list[FrozenTrial], objectives: list[ObjectiveSpec]) -> list[FrozenTrial]:
    """Feasible complete trials that no other feasible trial dominates (ties on every objective both stay)."""
    pool = [t for t in trials if feasible(t)]
    return [t for t in pool if not any(dominates(o.values, t.values, objectives) for o in pool)]


def point_values(point: dict[str, float], objectives: list[ObjectiveSpec]) -> list[float]:
    """A reference point's metrics as objective values."""
    return [point[o.name] for o in objectives]


def hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by `losses` (points x objectives, all below `reference`) up to `reference`, by slicing
    along the first objective: exact, and fast enough for fronts of a few hundred points."""
    if len(losses) == 0:
        return 0.0
    if losses.shape[1] == 1:
        return float(reference[0] - losses[:, 0].min())
    pts = losses[np.argsort(losses[:, 0], kind="stable")]
    if losses.shape[1] == 2:  # a sweep: each slab is bounded by the lowest second loss seen so far
        widths = np.diff(np.append(pts[:, 0], reference[0]))
        return float((widths * (reference[1] - np.minimum.accumulate(pts[:, 1]))).sum())
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, 0] if i + 1 < len(pts) else reference[0]
        if upper > pts[i, 0]:
            volume += (upper - pts[i, 0]) * hypervolume(pts[: i + 1, 1:], reference[1:])
    return volume


def hypervolume_history(trials: list[FrozenTrial], objectives: list[ObjectiveSpec]) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the feasible front so far) after each feasible complete trial."""
    pool = sorted((t for t in trials if feasible(t)), key=lambda t: t.number)
    if not pool:
        return []
    losses = np.array([[o.loss(v) for o, v in zip(objectives, t.values, strict=True)] for t in pool])
    reference = np.array([o.reference(losses[:, i]) for i, o in enumerate(objectives)])
    out = []
    for i, t in enumerate(pool):
        seen = losses[: i + 1]
        out.append((t.number, hypervolume(seen[(seen < reference).all(axis=1)], reference)))
    return out


def reference_points(study: optuna.Study) -> dict[str, dict[str, float]]:
    """Named points measured in the study's harness but outside its search: vanilla, and `study reference` runs."""
    out = {}
    if (v := vanilla(study)) is not None:
        out["vanilla"] = v
    for label, ref in references(study).items():
        out[label] = ref["metrics"]
    return out
