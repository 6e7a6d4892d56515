"""Bad candidates are data, not failures: on the organism, candidates from the corner of the space that really
degenerate (one word repeated) are COMPLETE trials with their measured values, infeasible, with the reason in the
record, `study status` and MLflow; a run of them cannot stop the study, which counts only failures of the setup."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mtp_abliterate.search.candidate.resident import shape_of
from mtp_abliterate.search.study.records import TrialRecord
from mtp_abliterate.search.study.tracking import TRIAL_TAG
from tests.conftest import CLI, ORGANISM_CONFIG, ORGANISM_TOML, REPO, write_study_config


@pytest.fixture(scope="module")
def bad_study(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path):
    tmp = tmp_path_factory.mktemp("bad")
    layers = shape_of(ORGANISM_CONFIG.resolve(ORGANISM_CONFIG.model.target)).num_layers
    # Every layer edited, nothing preserved, maximal steering and overcorrection: the model falls apart.
    corner = {"start_layer_index": 0, "end_layer_index": layers, "preserve_w": 0.0, "overcorrect_w": 1.3, "k": 1}
    enqueue = [{**corner, "steer_w": 1.0}, {**corner, "steer_w": 0.5}]
    cfg = write_study_config(
        ORGANISM_TOML,
        tmp / "bad.toml",
        name="bad",
        runs_dir=tmp / "runs",
        # One failure in a row would stop the study: bad candidates must not count as failures.
        search={"n_trials": 2, "enqueue": enqueue, "max_consecutive_failures": 1},
        serving={"python": vllm_python, "mode": "swap"},
    )
    proc = subprocess.run([*CLI, "study", "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    study = optuna.load_study(study_name="bad", storage=f"sqlite:///{tmp / 'runs' / 'bad' / 'optuna.db'}")
    return tmp, cfg, proc, study


def test_degenerate_candidates_are_complete_infeasible_trials(bad_study) -> None:
    _, _, proc, study = bad_study
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    for t in trials:
        r = TrialRecord.of(t)
        assert r.invalid_reason and "degenerate answer" in r.invalid_reason  # the served answers, one word repeated
        assert not r.feasible and r.constraints[-1] > 0
        refusal, kld, accepted = t.values
        assert 0.0 <= refusal <= 1.0 and kld > 0 and math.isfinite(accepted)  # measured values, not placeholders
        assert accepted == r.metrics["mean_accepted_tokens"]
    assert "infeasible, a bad candidate" in proc.stdout
    assert "Pareto set: 0 trial(s)" in proc.stdout  # the front never holds a bad candidate


def test_status_and_mlflow_say_why(bad_study) -> None:
    tmp, cfg, _, study = bad_study
    status = subprocess.run([*CLI, "study", "status", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stdout[-2000:]
    assert status.stdout.count("invalid:") == 2 and "(infeasible)" in status.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bad")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if TRIAL_TAG in r.data.tags]
    assert len(runs) == 2
    assert all("degenerate answer" in r.data.tags["invalid_reason"] for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)
