"""Draft positions come from `serving.num_speculative_tokens` everywhere: a study at n = 2 on the organism (conftest's
`study_at_n2`) records, prints, tabulates, exports and plots two positions, never four."""

from __future__ import annotations

import csv
import subprocess

from optuna.trial import FrozenTrial, TrialState

from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.release.export import model_card
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.records import TrialRecord
from tests.conftest import CLI, REPO, StudyAtN2

N = 2  # study_at_n2's serving.num_speculative_tokens


def _trial(s: StudyAtN2) -> FrozenTrial:
    """The informed ARA trial (conftest's `study_at_n2` also holds two degenerate candidates)."""
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
        assert r.metrics[f"{s}.mean_accepted_tokens"] <= N


def test_the_trial_line_status_table_csv_and_card_show_n_positions(study_at_n2: StudyAtN2) -> None:
    cfg, number = study_at_n2.config, study_at_n2.good
    line = next(x for x in study_at_n2.run.stdout.splitlines() if x.startswith(f"trial {number}:"))
    assert len(line.split("acc ")[1].split()[0].split("/")) == N
    status = subprocess.run([*CLI, "study", "status", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stdout[-2000:]
    row = next(x for x in status.stdout.splitlines() if x.startswith(f"│ {number} "))
    acceptance = next(cell.strip() for cell in row.split("│") if cell.count("/") >= 1 and "=" not in cell)
    assert len(acceptance.split("/")) == N
    [front_csv] = (cfg.parent / "runs" / "n2" / "mlartifacts").rglob("pareto.csv")
    header = next(csv.reader(front_csv.open()))
    assert [h for h in header if h.startswith("acc_pos_")] == ["acc_pos_0", "acc_pos_1"]
    card = model_card(load_config(cfg), TrialRecord.of(_trial(study_at_n2)), _vanilla(study_at_n2), None, "fp8")
    vanilla_row = next(x for x in card.splitlines() if x.startswith("| vanilla |"))
    assert len(vanilla_row.split("|")[4].split("/")) == N
