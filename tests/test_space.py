"""The search space, the Pareto front and the study's time limits: fast checks on real Optuna objects."""

from __future__ import annotations

import datetime as dt

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mtp_abliterate.objectives.base import Direction, ObjectiveSpec
from mtp_abliterate.search.candidate.ara import COMPONENTS, ModelShape
from mtp_abliterate.search.config import Range
from mtp_abliterate.search.study.limits import parse_duration, parse_until
from mtp_abliterate.search.study.pareto import dominates, hypervolume_history, pareto_front, point_values
from mtp_abliterate.search.study.space import SearchSpace, SpaceError

OBJECTIVES = [
    ObjectiveSpec("refusal_rate", Direction.MINIMIZE, "refusal rate", worst=1.01),
    ObjectiveSpec("kld", Direction.MINIMIZE, "KL"),
    ObjectiveSpec("accepted_per_step", Direction.MAXIMIZE, "acceptance", worst=0.0),
]


@pytest.mark.parametrize("num_layers", [5, 12, 30, 35])
def test_every_sampled_candidate_fits_the_model(num_layers: int) -> None:
    space = SearchSpace(num_layers)
    assert (space.bounds["start_layer_index"].low, space.bounds["start_layer_index"].high) == (0, num_layers // 2)
    assert (space.bounds["end_layer_index"].low, space.bounds["end_layer_index"].high) == (
        num_layers // 2 + 1,
        num_layers,
    )
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(200):
        params = space.suggest(study.ask())
        params.check_against(
            ModelShape(num_layers, 0), list(COMPONENTS)
        )  # raises if a range is empty or outside the model
        assert 1e-4 <= params.steer_w <= 1.0 and 1 <= params.k <= 15


def test_overrides_fix_or_narrow_parameters() -> None:
    space = SearchSpace(30, {"k": Range(value=5), "steer_w": Range(low=0.01, high=0.1)})
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=0))
    draws = [space.suggest(study.ask()) for _ in range(50)]
    assert {p.k for p in draws} == {5}
    assert all(0.01 <= p.steer_w <= 0.1 for p in draws)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steer_w": Range(low=0.5, high=2.0)}, "is not inside"),
        ({"start_layer_index": Range(value=20)}, "is not inside"),
        ({"k": Range(low=1.5, high=3)}, "whole numbers"),
        ({"rank": Range(value=4)}, "unknown parameter"),
    ],
)
def test_bad_overrides_are_one_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        SearchSpace(30, overrides)


def test_enqueued_trials_are_completed_and_checked() -> None:
    space = SearchSpace(5, {"k": Range(value=3)})
    full = space.check_enqueued(
        {"start_layer_index": 1, "end_layer_index": 4, "preserve_w": 1.0, "steer_w": 0.05, "overcorrect_w": 1.0}
    )
    assert full["k"] == 3 and isinstance(full["start_layer_index"], int)
    with pytest.raises(SpaceError, match="end_layer_index=2"):
        space.check_enqueued({**full, "end_layer_index": 2})
    with pytest.raises(SpaceError, match="preserve_w is missing"):
        space.check_enqueued({k: v for k, v in full.items() if k != "preserve_w"})


def _trial(number: int, values: list[float], feasible: bool = True):
    t = create_trial(
        values=values,
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"feasible": feasible},
        state=TrialState.COMPLETE,
    )
    t.number = number
    return t


def test_pareto_front_and_hypervolume() -> None:
    trials = [
        _trial(0, [0.0, 0.5, 2.0]),
        _trial(1, [0.0, 0.1, 3.0]),  # dominates 0
        _trial(2, [0.5, 0.01, 3.5]),  # a trade-off with 1
        _trial(3, [0.0, 0.01, 3.9], feasible=False),  # would dominate all, but infeasible
    ]
    assert [t.number for t in pareto_front(trials, OBJECTIVES)] == [1, 2]
    history = hypervolume_history(trials, OBJECTIVES)
    assert [n for n, _ in history] == [0, 1, 2]
    volumes = [h for _, h in history]
    assert volumes == sorted(volumes) and volumes[0] > 0 and volumes[2] > volumes[1] > volumes[0]
    vanilla = {"refusal_rate": 1.0, "kld": 0.0, "accepted_per_step": 3.8}
    assert not any(
        dominates(t.values, point_values(vanilla, OBJECTIVES), OBJECTIVES) for t in trials
    )  # KL 0 cannot be beaten
    reference = {"refusal_rate": 0.0, "kld": 0.2, "accepted_per_step": 2.5}
    assert [t.number for t in trials if dominates(t.values, point_values(reference, OBJECTIVES), OBJECTIVES)] == [1, 3]


def test_time_limits() -> None:
    assert parse_duration("8h") == 8 * 3600 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("tonight")
    now = dt.datetime(2026, 11, 27, 22, 30).timestamp()
    assert dt.datetime.fromtimestamp(parse_until("07:00", now)) == dt.datetime(2026, 11, 28, 7, 0)
    assert dt.datetime.fromtimestamp(parse_until("23:15", now)) == dt.datetime(2026, 11, 27, 23, 15)
    with pytest.raises(ValueError, match="HH:MM"):
        parse_until("7am", now)
