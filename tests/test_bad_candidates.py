"""Bad candidates are data, not failures: on the organism, candidates from the corner of the space that really
degenerate (one word repeated) are COMPLETE trials with their measured values, infeasible, with the reason in the
record, `study status` and MLflow; a run of them cannot stop the study, which counts only failures of the setup.
(The study is conftest's `study_at_n2`: the two bad candidates, then a good one.)"""

from __future__ import annotations

import math
import subprocess

from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.study.pareto import objective_specs, pareto_front
from mtp_abliterate.search.study.records import TrialRecord
from mtp_abliterate.search.study.tracking import TRIAL_TAG
from tests.conftest import CLI, REPO, StudyAtN2


def test_degenerate_candidates_are_complete_infeasible_trials(study_at_n2: StudyAtN2) -> None:
    proc = study_at_n2.run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = study_at_n2.study().get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # max_consecutive_failures = 1 did not stop it
    for t in (trials[n] for n in study_at_n2.bad):
        r = TrialRecord.of(t)
        assert r.invalid_reason and "degenerate answer" in r.invalid_reason  # the served answers, one word repeated
        assert not r.feasible and r.constraints[-1] > 0
        refusal, kld, accepted = t.values
        assert 0.0 <= refusal <= 1.0 and kld > 0 and math.isfinite(accepted)  # measured values, not placeholders
        assert accepted == r.metrics["mean_accepted_tokens"]
    assert TrialRecord.of(trials[study_at_n2.good]).feasible
    assert proc.stdout.count("infeasible, a bad candidate") == len(study_at_n2.bad)
    front = pareto_front(trials, objective_specs(load_config(study_at_n2.config)))
    assert [t.number for t in front] == [study_at_n2.good]  # the front never holds a bad candidate
    assert "Pareto set: 1 trial(s)" in proc.stdout


def test_status_and_mlflow_say_why(study_at_n2: StudyAtN2) -> None:
    cmd = [*CLI, "study", "status", str(study_at_n2.config)]
    status = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stdout[-2000:]
    assert status.stdout.count("invalid:") == len(study_at_n2.bad) and "(infeasible)" in status.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{study_at_n2.tmp / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("n2")
    children = [r for r in client.search_runs([experiment.experiment_id]) if TRIAL_TAG in r.data.tags]
    runs = {int(r.data.tags[TRIAL_TAG]): r for r in children}
    assert sorted(runs) == [*study_at_n2.bad, study_at_n2.good]
    assert all("degenerate answer" in runs[n].data.tags["invalid_reason"] for n in study_at_n2.bad)
    assert "invalid_reason" not in runs[study_at_n2.good].data.tags
    assert all(r.info.status == "FINISHED" for r in runs.values())
