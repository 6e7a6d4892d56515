"""Which trial a re-queued trial re-runs."""

from __future__ import annotations

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial


def retry_of(t: FrozenTrial | optuna.Trial) -> int | None:
    """The trial this one re-runs: re-queued after a kill (Optuna's retry attrs) or a Ctrl-C (ours)."""
    frozen = t if isinstance(t, FrozenTrial) else t.study._storage.get_trial(t._trial_id)
    n = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return n if n is not None else frozen.user_attrs.get("retry_of")
