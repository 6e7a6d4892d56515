"""`mtp-abliterate draft-tune <study> --trial N`: the candidate rebuilt (verified against its record), the draft
tuned and measured (search/draft/tune.py), the result kept in the study (for `export --draft tuned`) and logged to
MLflow as a child of the trial's run. Everything lands in runs/<study>/draft-tune/trial-N/."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna

from mtp_abliterate.search.candidate.quantize import quantize_fp8_dynamic
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.draft.distill import Budget, Progress
from mtp_abliterate.search.draft.report import record_metrics, tune_record, tune_table
from mtp_abliterate.search.draft.tune import tune_draft
from mtp_abliterate.search.prompts import load_prompt_set
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.records import TrialRecord
from mtp_abliterate.search.study.storage import run_dir_of, tracking_uri
from mtp_abliterate.search.study.tracking import log_draft_tune


def work_dir(cfg: StudyConfig, number: int) -> Path:
    return run_dir_of(cfg) / "draft-tune" / f"trial-{number:04d}"


def budget_of(cfg: StudyConfig, steps: int | None, minutes: float | None) -> Budget:
    d = cfg.draft_tune
    minutes = minutes if minutes is not None else d.max_minutes
    return Budget(
        steps or d.steps, minutes * 60 if minutes else None, d.batch_size, d.lr, min(d.warmup_steps, steps or d.steps)
    )


def candidate(cfg: StudyConfig, t: TrialRecord, work: Path) -> tuple[Path, Path]:
    """(FP8 as served, BF16) checkpoints of the trial, rebuilt once and verified against the recorded hash (a
    folder from an earlier draft-tune of the same trial is reused). Raises MaterializeError."""
    from mtp_abliterate.search.release.materialize import materialize

    fp8, bf16, stamp = work / "candidate-fp8", work / "candidate-bf16", work / "candidate.sha256"
    if stamp.is_file() and stamp.read_text() == t.merged_digest and (fp8 / "config.json").is_file():
        return fp8, bf16
    for folder in (fp8, bf16):
        shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    materialize(cfg, t, bf16, "bf16")
    quantize_fp8_dynamic(bf16, fp8, cfg.quantization.ignore)
    stamp.write_text(t.merged_digest)
    return fp8, bf16


def draft_tune(
    cfg: StudyConfig,
    study: optuna.Study,
    t: TrialRecord,
    budget: Budget,
    progress: Progress,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Tune, record and log; returns the record. Raises MaterializeError, DraftTuneError, ServerError,
    TrackingError."""
    started = time.time()
    work = work_dir(cfg, t.number)
    say(f"rebuilding trial {t.number}'s candidate (BF16 to learn from, FP8 to serve)")
    fp8, bf16 = candidate(cfg, t, work)
    prompts = [p for ps in cfg.draft_tune_prompts() for p in load_prompt_set(cfg.model, ps)]
    tuned = tune_draft(cfg, fp8, bf16, prompts, budget, work, progress, say)
    record = tune_record(tuned, records.vanilla(study), records.vanilla_per_prompt(study), budget)
    records.save_draft_tune(study, t.number, record)
    (work / "draft-tune.json").write_text(json.dumps(record, indent=2) + "\n")
    table = work / "draft-tune.txt"
    from rich.console import Console

    with table.open("w") as f:
        Console(file=f, width=140).print(tune_table(record, f"trial {t.number}: vanilla vs tuned draft"))
    params = {**{f"budget.{k}": v for k, v in asdict(budget).items()}, "trial": t.number, "prompts": len(prompts)}
    log_draft_tune(
        tracking_uri(cfg),
        cfg.name,
        records.mlflow_parent(study),
        t.number,
        record_metrics(record),
        params,
        [work / "draft-tune.json", table],
        tuned.draft_dir,
        started,
    )
    return record
