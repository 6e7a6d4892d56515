"""One organism study at `serving.num_speculative_tokens = 2`: two candidates that really degenerate, then a good one.

Bad candidates are data, not failures: candidates from the corner of the space that degenerate (one word repeated)
are COMPLETE trials with their measured values, infeasible, with the reason in the record, `study status` and
MLflow; a run of them cannot stop the study, which counts only failures of the setup.

Draft positions come from `serving.num_speculative_tokens` everywhere: the study records, prints, tabulates, exports
and plots two positions, never four.

The study also optimises a toy fourth objective from a test-only module (`tests/toy_objective.py`, named in
`search.extra_objectives`): its value reaches Optuna, the trial record, `study status`, MLflow and the model card.
"""

from __future__ import annotations

import csv
import math
import os
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
from tests.toy_objective import MEAN_ANSWER_TOKENS

N = 2  # the study's serving.num_speculative_tokens
TOY = f"tests.toy_objective:{MEAN_ANSWER_TOKENS}"  # the fourth objective
# The CLI imports the toy's module: the repository on its path, as a user's own objective module would be.
RUN = dict(
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
)


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
    layers = shape_of(ORGANISM_CONFIG.model.target).num_layers
    corner = {"start_layer_index": 0, "end_layer_index": layers, "preserve_w": 0.0, "overcorrect_w": 1.3, "k": 1}
    enqueue = [{**corner, "steer_w": 1.0}, {**corner, "steer_w": 0.5}, ORGANISM_CONFIG.search.enqueue[0]]
    cfg = write_study_config(
        ORGANISM_TOML,
        tmp / "n2.toml",
        name="n2",
        runs_dir=tmp / "runs",
        search={"n_trials": len(enqueue), "enqueue": enqueue, "max_consecutive_failures": 1, "extra_objectives": [TOY]},
        serving={"python": vllm_python, "num_speculative_tokens": N, "mode": "swap"},
    )
    proc = subprocess.run([*CLI, "study", "run", str(cfg)], **RUN, timeout=1200)
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
        refusal, kld, accepted, _ = t.values
        assert 0.0 <= refusal <= 1.0 and kld > 0 and math.isfinite(accepted)  # measured values, not placeholders
        assert accepted == r.metrics["accepted_per_step"]
    assert TrialRecord.of(trials[study_at_n2.good]).feasible
    assert proc.stdout.count("infeasible, a bad candidate") == len(study_at_n2.bad)
    front = pareto_front(trials, objective_specs(load_config(study_at_n2.config)))
    assert [t.number for t in front] == [study_at_n2.good]  # the front never holds a bad candidate
    assert "Pareto set: 1 trial(s)" in proc.stdout


def test_status_and_mlflow_say_why(study_at_n2: StudyAtN2) -> None:
    cmd = [*CLI, "study", "status", str(study_at_n2.config)]
    status = subprocess.run(cmd, **RUN)
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
    status = subprocess.run([*CLI, "study", "status", str(cfg)], **RUN)
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


# ---- a fourth objective ----


def test_a_fourth_objective_reaches_optuna_the_record_status_mlflow_and_card(study_at_n2: StudyAtN2) -> None:
    study, cfg = study_at_n2.study(), load_config(study_at_n2.config)
    assert study.directions[3] == optuna.study.StudyDirection.MAXIMIZE and len(study.directions) == 4
    assert study.metric_names == [o.name for o in objective_specs(cfg)] and study.metric_names[3] == MEAN_ANSWER_TOKENS
    for t in study.get_trials():
        r = TrialRecord.of(t)
        assert t.values[3] == r.metrics[MEAN_ANSWER_TOKENS] > 0  # measured from the trial's answers, every trial
    assert _vanilla(study_at_n2)[MEAN_ANSWER_TOKENS] > 0
    good = TrialRecord.of(_trial(study_at_n2))
    value = good.metrics[MEAN_ANSWER_TOKENS]
    status = subprocess.run([*CLI, "study", "status", str(study_at_n2.config)], **RUN)
    assert status.returncode == 0, status.stdout[-2000:]
    header = next(x.split() for x in status.stdout.splitlines() if x.split()[:2] == ["#", "state"])
    row = next(x.split() for x in status.stdout.splitlines() if x.split()[:2] == [str(good.number), "complete"])
    assert header[5] == "len" and row[5] == f"{value:.1f}"  # after refusal, KL and acc/step
    client = MlflowClient(tracking_uri=f"sqlite:///{study_at_n2.tmp / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("n2")
    [run] = [
        r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(TRIAL_TAG) == str(good.number)
    ]
    assert run.data.metrics[MEAN_ANSWER_TOKENS] == value
    card = model_card(cfg, good, _vanilla(study_at_n2), None, "fp8").splitlines()
    at = next(i for i, x in enumerate(card) if x.startswith("| model |"))  # the measured table: header, rule, rows
    head, rule, _, this = card[at : at + 4]
    assert head.endswith(" | mean answer length (tokens) |") and rule.count("---") == head.count("|") - 1
    assert this.startswith("| this model |") and this.endswith(f" | {value:.1f} |")
