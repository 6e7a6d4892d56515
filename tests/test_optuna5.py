"""Optuna 5: constraints through the core API (`Trial.set_constraint`, read by every sampler), studies begun under
Optuna 4.9 resumed as they are, and Optuna 4 refused at start with the command that fixes it."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mtp_abliterate.search.config import StudyConfig, load_config
from mtp_abliterate.search.errors import UserError
from mtp_abliterate.search.study.records import set_constraints
from mtp_abliterate.search.study.storage import make_sampler
from tests.conftest import ORGANISM_TOML, write_study_config

X = {"x": FloatDistribution(0.0, 1.0)}


def _config(tmp_path: Path, sampler: str) -> StudyConfig:
    search = {"sampler": sampler, "methods": ["ara"], "n_startup_trials": 2, "enqueue": []}
    return load_config(write_study_config(ORGANISM_TOML, tmp_path / f"{sampler}.toml", search=search))


def _objective(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    set_constraints(trial, [x - 0.5, 0.0])  # x above 0.5 breaks the first constraint
    return x, 1.0 - x


@pytest.mark.parametrize("sampler", ["tpe", "gp", "random"])
def test_every_sampler_sees_the_trials_constraints_and_nothing_is_deprecated(tmp_path: Path, sampler: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # Optuna 5 deprecates `constraints_func` with a FutureWarning
        study = optuna.create_study(
            directions=["minimize", "minimize"], sampler=make_sampler(_config(tmp_path, sampler), 0, "")
        )
        study.optimize(_objective, n_trials=6)
    for t in study.trials:
        assert t.constraints == {"0": t.params["x"] - 0.5, "1": 0.0}
    # Optuna's own Pareto set leaves out the infeasible trials, whichever sampler drew them
    feasible = {t.number for t in study.trials if t.params["x"] <= 0.5}
    assert {t.number for t in study.best_trials} == feasible and feasible


def test_a_study_begun_under_optuna_4_9_resumes_with_one_constraint_key_set(tmp_path: Path) -> None:
    """Optuna 4.9's `constraints_func` stored a trial's constraints as the list `system_attrs["constraints"]`
    (optuna 4.9, samplers/_base.py `_process_constraints_after_trial`): such trials, then new ones, in one SQLite
    study, sampled by the GP sampler, which refuses trials with differing constraint names."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    old = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    for x in (0.2, 0.7, 0.4):
        old.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                values=[x, 1.0 - x],
                params={"x": x},
                distributions=X,
                system_attrs={"constraints": [x - 0.5, 0.0]},
            )
        )
    cfg = _config(tmp_path, "gp")
    study = optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(cfg, 3, ""))
    study.optimize(_objective, n_trials=3)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    assert {tuple(t.constraints) for t in study.trials} == {("0", "1")}
    assert study.trials[1].constraints == {"0": pytest.approx(0.2), "1": 0.0}  # the 4.9 trial, read back
    assert 1 not in {t.number for t in study.best_trials}  # and still infeasible


def test_optuna_4_is_refused_at_start_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, "tpe")
    monkeypatch.setattr(optuna, "__version__", "4.9.0")  # what a plain `pip install` resolves beside heretic-llm
    with pytest.raises(UserError) as e:
        make_sampler(cfg, 0, "")
    assert "pip install --no-deps optuna==5.1.0" in str(e.value) and "\n" not in str(e.value)
