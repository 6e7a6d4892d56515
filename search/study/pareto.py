"""The Pareto front of a study's objectives and its hypervolume history (all objectives compared as losses)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.trial import FrozenTrial, TrialState

from mtp_abliterate.objectives.base import Direction


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str  # metric name, e.g. "kld"
    direction: Direction
    label: str  # axis label
    worst: float | None = None  # hypervolume reference in loss space; None: 1.1 x the largest loss seen

    def loss(self, value: float) -> float:
        return value if self.direction == Direction.MINIMIZE else -value

    def reference(self, losses: np.ndarray) -> float:
        if self.worst is not None:
            return self.worst
        return max(float(losses.max()) * 1.1, 1e-9)


def feasible(t: FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE and t.user_attrs.get("feasible", True)


def pareto_front(trials: list[FrozenTrial], objectives: list[ObjectiveSpec]) -> list[FrozenTrial]:
    """Feasible complete trials that no other feasible trial dominates (ties on every objective both stay)."""
    pool = [t for t in trials if feasible(t)]
    losses = [[o.loss(v) for o, v in zip(objectives, t.values, strict=True)] for t in pool]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))

    return [t for t, lt in zip(pool, losses, strict=True) if not any(dominates(lo, lt) for lo in losses)]


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
        inside = seen[(seen < reference).all(axis=1)]
        out.append((t.number, float(compute_hypervolume(inside, reference)) if len(inside) else 0.0))
    return out


def reference_points(study: optuna.Study) -> dict[str, dict[str, float]]:
    """Named points measured in the study's harness but outside its search: vanilla, and `study reference` runs."""
    out = {}
    if "vanilla" in study.user_attrs:
        out["vanilla"] = study.user_attrs["vanilla"]
    for key, value in sorted(study.user_attrs.items()):
        if key.startswith("reference."):
            out[key.removeprefix("reference.")] = value["metrics"]
    return out


def dominates(values: list[float], point: dict[str, float], objectives: list[ObjectiveSpec]) -> bool:
    """Whether a trial's values dominate a reference point (at least as good everywhere, better somewhere)."""
    a = [o.loss(v) for o, v in zip(objectives, values, strict=True)]
    b = [o.loss(point[o.name]) for o in objectives]
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))
