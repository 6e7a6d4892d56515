"""The study's Pareto front and hypervolume on real Optuna trials: feasibility from the trial record, the front's
ties, and the hypervolume against an independent inclusion-exclusion computation."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import optuna
import pytest

from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search.study.pareto import (
    dominates,
    hypervolume,
    hypervolume_history,
    pareto_front,
)
from tests.conftest import ORGANISM_CONFIG


def inclusion_exclusion(points: np.ndarray, reference: np.ndarray) -> float:
    """The union of the boxes [p, reference] by inclusion-exclusion: exact, exponential, independent of slicing."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in combinations(points, size):
            corner = np.max(subset, axis=0)
            total += (-1) ** (size + 1) * float(np.prod(np.clip(reference - corner, 0, None)))
    return total


@pytest.mark.parametrize(("n", "d", "seed"), [(1, 3, 0), (6, 3, 1), (9, 3, 2), (7, 2, 3), (6, 4, 4)])
def test_hypervolume_equals_inclusion_exclusion(n: int, d: int, seed: int) -> None:
    points = np.random.default_rng(seed).random((n, d))
    reference = np.full(d, 1.1)
    assert hypervolume(points, reference) == pytest.approx(inclusion_exclusion(points, reference), rel=1e-12)


def _study(values_and_feasible: list[tuple[list[float], bool]]) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize", "maximize"])
    for values, ok in values_and_feasible:
        trial = study.ask()
        trial.set_user_attr("feasible", ok)
        study.tell(trial, values)
    return study


def test_front_keeps_ties_and_drops_infeasible_and_dominated() -> None:
    objectives = objective_specs(ORGANISM_CONFIG)
    study = _study(
        [
            ([0.1, 0.01, 3.0], True),  # 0: on the front
            ([0.1, 0.01, 3.0], True),  # 1: a tie with 0, stays
            ([0.2, 0.02, 2.0], True),  # 2: dominated by 0
            ([0.0, 0.00, 4.0], False),  # 3: would dominate everything, but infeasible
            ([0.0, 0.05, 2.5], True),  # 4: best refusal rate, on the front
        ],
    )
    front = pareto_front(study.get_trials(), objectives)
    assert sorted(t.number for t in front) == [0, 1, 4]
    assert dominates([0.1, 0.01, 3.0], [0.2, 0.02, 2.0], objectives)
    assert not dominates([0.1, 0.01, 3.0], [0.1, 0.01, 3.0], objectives)  # equal is not better
    history = hypervolume_history(study.get_trials(), objectives)
    assert [n for n, _ in history] == [0, 1, 2, 4]  # feasible trials only, in order
    assert history[0][1] == history[1][1] == history[2][1] < history[3][1]  # a tie and a dominated point add nothing
