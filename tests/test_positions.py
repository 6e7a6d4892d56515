"""Draft positions come from `serving.num_speculative_tokens` everywhere: a study at n = 2 on the organism records,
prints, tabulates, exports and plots two positions, never four."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.release.export import model_card
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.records import TrialRecord
from tests.conftest import CLI, ORGANISM_TOML, REPO, write_study_config

N = 2


@pytest.fixture(scope="module")
def study_at_n2(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path):
    tmp = tmp_path_factory.mktemp("positions")
    # One enqueued trial, swaps without the self-check: the cheapest study that scores a candidate.
    cfg = write_study_config(
        ORGANISM_TOML,
        tmp / "n2.toml",
        name="n2",
        runs_dir=tmp / "runs",
        search={"n_trials": 1},
        serving={"python": vllm_python, "num_speculative_tokens": N, "mode": "swap"},
    )
    proc = subprocess.run([*CLI, "study", "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="n2", storage=f"sqlite:///{tmp / 'runs' / 'n2' / 'optuna.db'}")
    return cfg, study, proc


def _positions(metrics: dict[str, float], prompt_set: str | None = None) -> set[int]:
    prefix = f"{prompt_set}.acc_pos_" if prompt_set else "acc_pos_"
    return {int(k.removeprefix(prefix)) for k in metrics if k.startswith(prefix)}


def test_the_record_holds_n_positions_per_set_and_for_the_mix(study_at_n2) -> None:
    cfg, study, _ = study_at_n2
    [trial] = study.get_trials(states=(TrialState.COMPLETE,))
    r = TrialRecord.of(trial)
    sets = [s.name for s in load_config(cfg).acceptance.sets]
    assert _positions(r.metrics) == {0, 1}
    assert all(_positions(r.metrics, s) == {0, 1} for s in sets)
    assert _positions(records.vanilla(study)) == {0, 1}
    # vLLM proposed two tokens per draft: accepted counts cannot exceed two per draft.
    for s in sets:
        assert r.metrics[f"{s}.mean_accepted_tokens"] <= N


def test_the_trial_line_status_table_csv_and_card_show_n_positions(study_at_n2) -> None:
    cfg, study, proc = study_at_n2
    line = next(x for x in proc.stdout.splitlines() if x.startswith("trial 0:"))
    assert len(line.split("acc ")[1].split()[0].split("/")) == N
    status = subprocess.run([*CLI, "study", "status", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stdout[-2000:]
    row = next(x for x in status.stdout.splitlines() if x.startswith("│ 0 "))
    acceptance = next(cell.strip() for cell in row.split("│") if cell.count("/") >= 1 and "=" not in cell)
    assert len(acceptance.split("/")) == N
    [front_csv] = (cfg.parent / "runs" / "n2" / "mlartifacts").rglob("pareto.csv")
    header = next(csv.reader(front_csv.open()))
    assert [h for h in header if h.startswith("acc_pos_")] == ["acc_pos_0", "acc_pos_1"]
    [trial] = study.get_trials(states=(TrialState.COMPLETE,))
    card = model_card(load_config(cfg), TrialRecord.of(trial), records.vanilla(study), None, "fp8")
    vanilla_row = next(x for x in card.splitlines() if x.startswith("| vanilla |"))
    assert len(vanilla_row.split("|")[4].split("/")) == N
