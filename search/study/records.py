"""What the study keeps in Optuna's storage, typed: the per-trial record and the study's own records.

Optuna's `user_attrs` are the storage format (a resumed study, `study status`, export and MLflow all read them), but
they are written and read only here. Everything else works with `TrialRecord` and the study-level readers
(`vanilla`, `swap_check`, `references`); metric names come from `search/metrics.py`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

# Study-level records.
VANILLA = "vanilla"
VANILLA_PER_PROMPT = "vanilla.per_prompt"
SWAP_CHECK = "swap_check"
REFERENCE_PREFIX = "reference."
MLFLOW_PARENT = "mlflow_parent_run_id"
DRAFT_TUNE_PREFIX = "draft_tune.trial-"


def vanilla(study: optuna.Study) -> dict[str, float] | None:
    """The vanilla model's metrics, measured once per study in the same harness."""
    return study.user_attrs.get(VANILLA)


def save_vanilla(study: optuna.Study, metrics: dict[str, float], per_prompt: dict[str, Any]) -> None:
    study.set_user_attr(VANILLA, metrics)
    study.set_user_attr(VANILLA_PER_PROMPT, per_prompt)


def vanilla_per_prompt(study: optuna.Study) -> dict[str, Any]:
    """The vanilla model's per-prompt acceptance counts, by set (for paired comparisons; empty if not recorded)."""
    return study.user_attrs.get(VANILLA_PER_PROMPT, {})


def swap_check(study: optuna.Study, host: str) -> dict[str, Any] | None:
    """`host`'s swap self-check verdict: passed, identical, differences, rule, gap, noise, trial, key. Each host
    checks its own vLLM: a verdict holds only for the host that measured it."""
    return study.user_attrs.get(f"{SWAP_CHECK}.{host}")


def swap_checks(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """Every host's verdict, by host."""
    prefix = SWAP_CHECK + "."
    attrs = study.user_attrs
    return {k.removeprefix(prefix): attrs[k] for k in sorted(attrs) if k.startswith(prefix)}


def save_swap_check(study: optuna.Study, host: str, verdict: dict[str, Any]) -> None:
    study.set_user_attr(f"{SWAP_CHECK}.{host}", verdict)  # one key per host: hosts never overwrite each other


def references(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """`study reference` points by label: {"method", "params", "metrics", "per_prompt"}."""
    attrs = study.user_attrs
    return {k.removeprefix(REFERENCE_PREFIX): attrs[k] for k in sorted(attrs) if k.startswith(REFERENCE_PREFIX)}


def draft_tune(study: optuna.Study, number: int) -> dict[str, Any] | None:
    """The last `draft-tune` of trial `number`: its tuned draft's folder and both drafts' acceptance."""
    return study.user_attrs.get(f"{DRAFT_TUNE_PREFIX}{number}")


def save_draft_tune(study: optuna.Study, number: int, record: dict[str, Any]) -> None:
    study.set_user_attr(f"{DRAFT_TUNE_PREFIX}{number}", record)


def save_reference(
    study: optuna.Study, label: str, method: str, params: dict[str, Any], metrics: dict, per_prompt: dict[str, Any]
) -> None:
    record = {"method": method, "params": params, "metrics": metrics, "per_prompt": per_prompt}
    study.set_user_attr(REFERENCE_PREFIX + label, record)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the study recorded it. Fields are None (or empty) until the trial got that far."""

    number: int
    state: TrialState
    params: dict[str, Any]
    values: list[float] | None
    host: str | None = None
    pid: int | None = None
    trial_dir: Path | None = None
    stage: str | None = None  # the stage running (or last run)
    server_pid: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    per_prompt: dict[str, Any] = field(default_factory=dict)  # acceptance counts by set and prompt (paired tests)
    adapter_digest: str | None = None
    merged_digest: str | None = None  # sha256 of the edited matrices as deployed: what materialize reproduces
    module_io_key: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    candidate: Path | None = None  # the kept served checkpoint
    serving_mode: str | None = None  # "swap" or "cold": how the candidate was served
    fingerprint: dict[str, Any] = field(default_factory=dict)
    constraints: list[float] = field(default_factory=list)  # Optuna's convention: <= 0 is feasible
    feasible: bool = True
    invalid_reason: str | None = None  # a bad candidate: why its acceptance measurement is not a valid result
    not_measured: str | None = None  # why objectives were not measured (the decision did not need them)
    fail_reason: str | None = None
    failed_stage: str | None = None
    log_path: Path | None = None
    retry_of: int | None = None  # the trial this one re-runs (after a kill or a Ctrl-C)

    @classmethod
    def of(cls, t: FrozenTrial) -> TrialRecord:
        a = t.user_attrs
        with warnings.catch_warnings():  # experimental since Optuna 2.8, and the public way to read it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
        return cls(
            number=t.number,
            state=t.state,
            params=dict(t.params),
            values=list(t.values) if t.values is not None else None,
            host=a.get("host"),
            pid=a.get("pid"),
            trial_dir=_path(a.get("trial_dir")),
            stage=a.get("stage"),
            server_pid=a.get("server_pid"),
            metrics=a.get("metrics", {}),
            per_prompt=a.get("per_prompt", {}),
            adapter_digest=a.get("adapter_digest"),
            merged_digest=a.get("merged_digest"),
            module_io_key=a.get("module_io_key"),
            versions=a.get("versions", {}),
            candidate=_path(a.get("candidate")),
            serving_mode=a.get("serving"),
            fingerprint=a.get("fingerprint", {}),
            constraints=a.get("constraints", []),
            feasible=feasible_of(t),
            invalid_reason=a.get("invalid_reason"),
            not_measured=a.get("not_measured"),
            fail_reason=a.get("fail_reason"),
            failed_stage=a.get("failed_stage"),
            log_path=_path(a.get("log_path")),
            retry_of=retried if retried is not None else a.get("retry_of"),
        )

    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE

    @property
    def scored(self) -> bool:
        """A complete trial with the digest needed to rebuild its candidate."""
        return self.complete and self.merged_digest is not None


def records(study: optuna.Study, *states: TrialState) -> list[TrialRecord]:
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=states or None)]


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def feasible_of(t: FrozenTrial) -> bool:
    """Whether the trial met the constraints (read alone: the Pareto front asks it of every trial)."""
    return t.user_attrs.get("feasible", True)


def measured_in_full(t: FrozenTrial) -> bool:
    """Whether every objective of the trial was measured (plots draw only those: the rest carry worst values)."""
    return "not_measured" not in t.user_attrs


def set_constraints(trial: optuna.Trial, values: list[float]) -> None:
    """The trial's constraint values (<= 0: met) through Optuna's core API, which every sampler, `best_trials` and
    Optuna's plots read. Keyed "0", "1", ...: how Optuna 5 reads the list a 4.9 `constraints_func` stored, so the
    trials of a study begun under 4.9 and those added now have one key set (the GP sampler refuses mixed ones)."""
    for i, value in enumerate(values):
        trial.set_constraint(str(i), value)


class TrialLog:
    """Writes a running trial's record; the keys are `TrialRecord.of`'s."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def started(self, host: str, pid: int, trial_dir: Path) -> None:
        for k, v in {"host": host, "pid": pid, "trial_dir": str(trial_dir)}.items():
            self.trial.set_user_attr(k, v)

    def stage(self, name: str) -> None:
        self.trial.set_user_attr("stage", name)

    def server(self, pid: int) -> None:
        self.trial.set_user_attr("server_pid", pid)

    def failed(self, stage: str, reason: str, log_path: Path | None = None) -> None:
        self.trial.set_user_attr("fail_reason", reason[:2000])
        self.trial.set_user_attr("failed_stage", stage)
        if log_path is not None:
            self.trial.set_user_attr("log_path", str(log_path))

    def interrupted(self, reason: str) -> None:
        """Ctrl-C or a full disk: the stage it was in is the failed stage."""
        self.failed(self.trial.user_attrs.get("stage", "?"), reason)

    def scored(self, record: dict[str, Any]) -> None:
        """`record`: the TrialRecord fields of a scored candidate (metrics, digests, serving_mode, constraints...)."""
        for name, value in record.items():
            if value is not None:
                key = "serving" if name == "serving_mode" else name
                self.trial.set_user_attr(key, str(value) if isinstance(value, Path) else value)


def requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """Enqueue `trial`'s parameters again, recording which trial the new one re-runs."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def fail_running(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int, reason: str) -> bool:
    """Fail another process's RUNNING trial (its process is gone) with a reason, through the storage's public API.
    Returns False when that process finished it first."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    frozen = storage.get_trial(trial_id)
    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    storage.set_trial_user_attr(trial_id, "failed_stage", frozen.user_attrs.get("stage", "?"))
    return storage.set_trial_state_values(trial_id, TrialState.FAIL)


def mlflow_parent(study: optuna.Study) -> str | None:
    """The id of the study's parent MLflow run (kept in the study so a resumed run reuses it)."""
    return study.user_attrs.get(MLFLOW_PARENT)


def set_mlflow_parent(study: optuna.Study, run_id: str) -> None:
    study.set_user_attr(MLFLOW_PARENT, run_id)
