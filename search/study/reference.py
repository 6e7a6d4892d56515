"""`study reference`: one candidate of any method (e.g. heretic's directional ablation) scored in the study's harness
and kept in the study as a named point beside vanilla (tables, plots, MLflow)."""

from __future__ import annotations

from typing import Any

from mtp_abliterate.search.candidate.checkpoint import CheckpointError
from mtp_abliterate.search.candidate.heretic_bridge import ModelLoadError
from mtp_abliterate.search.candidate.resident import Resident, parse_parameters, shape_of
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.errors import StudyError
from mtp_abliterate.search.study.runner import StudyRunner
from mtp_abliterate.search.study.winner import dominating
from mtp_abliterate.search.trial.pipeline import StageError, TrialPipeline


def score_reference(
    runner: StudyRunner, method: str, raw: dict[str, Any], label: str
) -> tuple[dict[str, float], list[int]]:
    """Score the candidate, keep it as `label`, and return its metrics and the feasible complete trials that
    dominate it (paired by prompt on acceptance: `winner.dominating`). Raises StudyError or AbliterationError."""
    cfg = runner.cfg.model_copy(update={"abliteration": runner.cfg.abliteration.model_copy(update={"method": method})})
    with runner.console.status(f"scoring the {method} reference {label!r}"):
        try:
            params = parse_parameters(method, raw, shape_of(cfg.model.target))
            pipeline = TrialPipeline(cfg, Resident(cfg, cache_dir=runner.run_dir / "cache"))
        except (CheckpointError, ModelLoadError) as e:
            raise StudyError(str(e)) from None
        try:
            result = pipeline.run(params, runner.run_dir / "references" / label)
        except StageError as e:
            raise StudyError(f"the reference failed at stage {e.stage}: {e.reason} (log: {e.log_path})") from None
    metrics = result.metrics()
    records.save_reference(runner.study, label, method, raw, metrics, result.per_prompt)
    runner.sync(runner.tracker())
    return metrics, dominating(cfg, runner.study, metrics, result.per_prompt)
