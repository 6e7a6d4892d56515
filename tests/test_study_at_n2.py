"""One organism study at `serving.num_speculative_tokens = 2`: two candidates that really degenerate, then a good one.

Bad candidates are data, not failures: candidates from the corner of the space that degenerate (one word repeated)
are COMPLETE trials with their measured values, infeasible, with the reason in the record, `study status` and
MLflow; a run of them cannot stop the study, which counts only failures of the setup.

Draft positions come from `serving.num_speculative_tokens` everywhere: the study records, prints, tabulates, exports
and plots two positions, never four.
"""

from __future__ import annotations

import csv
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search.candidate.resident import shape_of
from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.release.export import model_card
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.pareto import pareto_front
from mtp_abliterate.search.study.records import TrialRecord
from mtp_abliterate.search.study.tracking import TRIAL_TAG
from tests.conftest import CLI, ORGANISM_CONFIG, ORGANISM_TOML, REPO, write_study_config

N = 2  # the study's serving.num_speculative_tokens


@dataclass
class StudyAtN2:
    """The organism study at `serving.num_speculative_tokens = 2` (see `study_at_n2`)."""

    tmp: Path
    config: Path
    run: subprocess.CompletedProcess  # `study run`
    bad: list[int]  # the degenerate candidates' trial numbers
    good: int  # the informed ARA trial's

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="n2", storage=f"sqlite:///{self.tmp / 'runs' / 'n2' / 'optuna.db'}")


@pytest.fixture(scope="module")
def study_at_n2(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> StudyAtN2:
    """One organism study at n = 2, swapped without the self-check (one vLLM start): two candidates from the corner
    of the space that really degenerate (every layer edited, nothing preserved, maximal steering and overcorrection),
    then the config's informed ARA trial. One failure in a row would stop it: bad candidates must not count as
    failures."""
    tmp = tmp_path_factory.mktemp("n2")
    layers = shape_of(ORGANISM_CONFIG.resolve(ORGANISM_CONFIG.model.target)).num_layers
    corner = {"start_layer_index": 0, "end_layer_index": layers, "preserve_w": 0.0, "overcorrect_w": 1.3, "k": 1}
    enqueue = [{**corner, "steer_w": 1.0}, {**corner, "steer_w": 0.5}, ORGANISM_CONFIG.search.enqueue[0]]
    cfg = write_study_config(
        ORGANISM_TOML,
        tmp / "n2.toml",
        name="n2",
        runs_dir=tmp / "runs",
        search={"n_trials": len(enqueue), "enqueue": enqueue, "max_consecutive_failures": 1},
        serving={"python": vllm_python, "num_speculative_tokens": N, "mode": "swap"},
    )
    proc = subprocess.run([*CLI, "study", "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    return StudyAtN2(tmp, cfg, proc, bad=[0, 1], good=2)


# ---- bad candidates ----


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
        assert accepted == r.metrics["accepted_per_step"]
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


# ---- draft positions ----


def _trial(s: StudyAtN2) -> FrozenTrial:
    """The informed ARA trial."""
    trial = s.study().trials[s.good]
    assert trial.state == TrialState.COMPLETE, s.run.stdout[-3000:] + s.run.stderr[-3000:]
    return trial


def _vanilla(s: StudyAtN2) -> dict[str, float]:
    return records.vanilla(s.study())


def _positions(metrics: dict[str, float], prompt_set: str | None = None) -> set[int]:
    prefix = f"{prompt_set}.acc_pos_" if prompt_set else "acc_pos_"
    return {int(k.removeprefix(prefix)) for k in metrics if k.startswith(prefix)}


def test_the_record_holds_n_positions_per_set_and_for_the_mix(study_at_n2: StudyAtN2) -> None:
    r = TrialRecord.of(_trial(study_at_n2))
    sets = [s.name for s in load_config(study_at_n2.config).acceptance.sets]
    assert _positions(r.metrics) == {0, 1}
    assert all(_positions(r.metrics, s) == {0, 1} for s in sets)
    assert _positions(_vanilla(study_at_n2)) == {0, 1}
    # vLLM proposed two tokens per draft: accepted counts cannot exceed two per draft.
    for s in sets:
        assert r.metrics[f"{s}.accepted_per_step"] <= N


def test_the_trial_line_status_table_csv_and_card_show_n_positions(study_at_n2: StudyAtN2) -> None:
    cfg, number = study_at_n2.config, study_at_n2.good
    line = next(x for x in study_at_n2.run.stdout.splitlines() if x.startswith(f"trial {number}:"))
    assert len(line.split("acc ")[1].split()[0].split("/")) == N
    status = subprocess.run([*CLI, "study", "status", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stdout[-2000:]
    row = next(x.split() for x in status.stdout.splitlines() if x.split()[:2] == [str(number), "complete"])
    acceptance = next(cell for cell in row if "/" in cell)  # the trials table's per-position column, "a0..a1"
    assert len(acceptance.split("/")) == N
    [front_csv] = (cfg.parent / "runs" / "n2" / "mlartifacts").rglob("pareto.csv")
    header = next(csv.reader(front_csv.open()))
    assert [h for h in header if h.startswith("acc_pos_")] == ["acc_pos_0", "acc_pos_1"]
    card = model_card(load_config(cfg), TrialRecord.of(_trial(study_at_n2)), _vanilla(study_at_n2), None, "fp8")
    vanilla_row = next(x for x in card.splitlines() if x.startswith("| vanilla |"))
    assert len(vanilla_row.split("|")[4].split("/")) == N
