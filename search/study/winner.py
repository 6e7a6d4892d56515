"""The study's answer to "which trial do I export?", and paired comparisons against recorded points.

The winner is the complete, feasible trial with the highest acceptance objective among those within
`[export] max_refusal_rate` and `max_kl` (default: 2 x the KL of the informed directional trial, heretic's default
enqueued in the study). It is reported with its paired difference (same prompts, `objectives/paired.py`) to the
runner-up and to vanilla, so "best" comes with how sure the measurement is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from mtp_abliterate.objectives.paired import Paired, paired
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.metrics import KLD, REFUSAL_RATE
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.records import TrialRecord


def compare(cfg: StudyConfig, a: Mapping[str, Any], b: Mapping[str, Any]) -> Paired:
    """A - B on the study's acceptance objective, paired by prompt (per-prompt counts by set)."""
    weights = {s.name: s.weight for s in cfg.acceptance.sets}
    return paired(a, b, weights, cfg.search.acceptance_position)


def informed_directional(study: optuna.Study) -> TrialRecord | None:
    """The first complete enqueued directional trial: heretic's default in the study (README "Picking and exporting
    the winner")."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "fixed_params" in t.system_attrs and t.params.get("method", "directional") == "directional":
            record = TrialRecord.of(t)
            if record.params.get("direction_scope") is not None:  # directional parameters, not ARA's
                return record
    return None


@dataclass(frozen=True)
class Bounds:
    max_refusal_rate: float
    max_kl: float | None
    why_kl: str  # where max_kl came from


def bounds(cfg: StudyConfig, study: optuna.Study) -> Bounds:
    e = cfg.export
    if e.max_kl is not None:
        return Bounds(e.max_refusal_rate, e.max_kl, "export.max_kl")
    d = informed_directional(study)
    if d is None or KLD not in d.metrics:
        return Bounds(e.max_refusal_rate, None, "no informed directional trial: no KL bound")
    return Bounds(e.max_refusal_rate, 2 * d.metrics[KLD], f"2 x trial {d.number}'s KL (informed directional)")


@dataclass(frozen=True)
class Winner:
    record: TrialRecord
    bounds: Bounds
    runner_up: TrialRecord | None
    vs_runner_up: Paired | None
    vs_vanilla: Paired | None


def eligible(cfg: StudyConfig, study: optuna.Study, limits: Bounds) -> list[TrialRecord]:
    """Complete feasible trials within the export bounds, best acceptance objective first."""
    scalar = cfg.search.acceptance_objective
    out = [
        r
        for r in records.records(study, TrialState.COMPLETE)
        if r.feasible
        and scalar in r.metrics
        and r.metrics.get(REFUSAL_RATE, 1.0) <= limits.max_refusal_rate
        and (limits.max_kl is None or r.metrics[KLD] <= limits.max_kl)
    ]
    return sorted(out, key=lambda r: (-r.metrics[scalar], r.number))


def pick_winner(cfg: StudyConfig, study: optuna.Study) -> Winner | None:
    """The named winner, or None when no trial is within the bounds."""
    limits = bounds(cfg, study)
    ranked = eligible(cfg, study, limits)
    if not ranked:
        return None
    best = ranked[0]
    up = ranked[1] if len(ranked) > 1 else None
    vanilla = records.vanilla_per_prompt(study)
    return Winner(
        best,
        limits,
        up,
        compare(cfg, best.per_prompt, up.per_prompt) if up and up.per_prompt and best.per_prompt else None,
        compare(cfg, best.per_prompt, vanilla) if vanilla and best.per_prompt else None,
    )


def dominating(
    cfg: StudyConfig, study: optuna.Study, metrics: Mapping[str, float], per_prompt: Mapping[str, Any]
) -> list[int]:
    """Complete feasible trials that dominate a point: at least as good on refusal and KL, and better on the
    acceptance objective beyond the paired 95 % interval (a trial identical to the point does not dominate it)."""
    out = []
    for r in records.records(study, TrialState.COMPLETE):
        if not (r.feasible and r.per_prompt and cfg.search.acceptance_objective in r.metrics):
            continue
        if r.metrics[REFUSAL_RATE] <= metrics[REFUSAL_RATE] and r.metrics[KLD] <= metrics[KLD]:
            if compare(cfg, r.per_prompt, per_prompt).verdict == "better":
                out.append(r.number)
    return out
