"""Candidate retention: which trial checkpoints stay on disk.

Policy `pareto` keeps the checkpoints of the current Pareto front (plus the last `keep_last` complete trials) and
removes a checkpoint as soon as its trial falls off the front; `all` keeps every one, `none` none. A removed
candidate can be rebuilt bit for bit with `mtp-abliterate materialize`.
"""

from __future__ import annotations

import shutil

from optuna.trial import FrozenTrial, TrialState

from mtp_abliterate.search.config import Retention
from mtp_abliterate.search.study.records import TrialRecord


def kept_trials(trials: list[FrozenTrial], front: list[FrozenTrial], policy: Retention) -> set[int]:
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    if policy.keep == "all":
        return {t.number for t in complete}
    if policy.keep == "none":
        return set()
    last = {t.number for t in complete[-policy.keep_last :]} if policy.keep_last else set()
    return {t.number for t in front} | last


def apply_retention(trials: list[FrozenTrial], front: list[FrozenTrial], policy: Retention) -> list[int]:
    """Delete the checkpoints of trials that are not to be kept; returns their trial numbers."""
    keep = kept_trials(trials, front, policy)
    removed = []
    for t in trials:
        candidate = TrialRecord.of(t).candidate
        if candidate and t.number not in keep and candidate.exists():
            shutil.rmtree(candidate)
            removed.append(t.number)
    return removed
