"""The objective seam without a study: a config names a fourth objective (`tests/toy_objective.py`), bad names fail
at load with the fix, and a trial that did not measure an objective records its declared unmeasured value. The
study that optimises the toy objective end to end is tests/test_study_at_n2.py's (no study of its own: CI time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtp_abliterate.objectives.base import Direction
from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search.config import ConfigError, load_config
from mtp_abliterate.search.trial.result import TrialResult
from tests.conftest import ORGANISM_CONFIG, ORGANISM_TOML, write_study_config
from tests.toy_objective import MEAN_ANSWER_TOKENS, mean_answer_tokens

TOY = f"tests.toy_objective:{MEAN_ANSWER_TOKENS}"


def _with(tmp_path: Path, extra: list[str]):
    path = write_study_config(ORGANISM_TOML, tmp_path / "study.toml", search={"extra_objectives": extra})
    return load_config(path, check_paths=False)


def test_a_configured_fourth_objective_follows_the_built_ins(tmp_path: Path) -> None:
    default = objective_specs(ORGANISM_CONFIG)
    specs = objective_specs(_with(tmp_path, [TOY]))
    assert specs[:3] == default and [o.name for o in specs[3:]] == [MEAN_ANSWER_TOKENS]
    assert specs[3].direction == Direction.MAXIMIZE and specs[3].measure is mean_answer_tokens


@pytest.mark.parametrize(
    ("extra", "fix"),
    [
        (["kld"], "remove it from extra_objectives"),
        (["acc_pos_0"], "remove it from extra_objectives"),
        (["tests.no_such_module:x"], "put its folder on PYTHONPATH"),
        (["tests.toy_objective:no_such_objective"], "name a module that registers it"),
        ([TOY, TOY], "remove the repeat"),
    ],
)
def test_a_bad_objective_entry_fails_at_load_naming_the_fix(tmp_path: Path, extra: list[str], fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        _with(tmp_path, extra)
    [line] = str(err.value).splitlines()
    assert line.startswith(f"{tmp_path / 'study.toml'}: search.extra_objectives: ") and fix in line


def test_objectives_a_trial_did_not_measure_record_their_unmeasured_values(tmp_path: Path) -> None:
    """A candidate over max_kl is not served: KL alone is measured; the rest go to Optuna as declared."""
    not_served = TrialResult(
        refusal_rate=None, kld=0.7, acceptance={"sets": {}}, accepted_per_step=None, per_position=[], tok_s=0.0
    )
    assert mean_answer_tokens(not_served) is None
    metrics = not_served.metrics()
    assert [o.recorded(metrics) for o in objective_specs(_with(tmp_path, [TOY]))] == [1.0, 0.7, 0.0, 0.0]
