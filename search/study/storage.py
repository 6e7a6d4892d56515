"""Where a study lives: its run folder, its Optuna storage and sampler, and the trials a dead process left behind.

Storage: SQLite under runs/<study>/ unless the config names a URL (PostgreSQL for several machines). Heartbeats let
another host's process fail (and re-queue once) the trials of a host that died; this host's dead trials are reaped at
once by `reap_dead_trials`. `runs/<study>/study.json` points `study status`, `ui`, `materialize` and `export` from
the run folder to the storage and the MLflow store.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import optuna
from optuna.samplers import GPSampler, RandomSampler, TPESampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mtp_abliterate.search.config import StudyConfig, load_config
from mtp_abliterate.search.study.pareto import objective_specs
from mtp_abliterate.search.study.records import TrialRecord, constraints_of, fail_running

HEARTBEAT_S, GRACE_S = 60, 180
POINTER = "study.json"


def run_dir_of(cfg: StudyConfig) -> Path:
    return Path(cfg.resolve(cfg.runs_dir)) / cfg.name


def storage_url(cfg: StudyConfig) -> str:
    return cfg.storage.optuna_url or f"sqlite:///{(run_dir_of(cfg) / 'optuna.db').absolute()}"


def tracking_uri(cfg: StudyConfig) -> str:
    """The MLflow store: the config's, else a SQLite database beside the studies (no server needed)."""
    return cfg.tracking.mlflow_uri or f"sqlite:///{(Path(cfg.resolve(cfg.runs_dir)) / 'mlflow.db').absolute()}"


def open_storage(cfg: StudyConfig) -> RDBStorage:
    run_dir_of(cfg).mkdir(parents=True, exist_ok=True)
    return RDBStorage(
        storage_url(cfg),
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )


def open_study(cfg: StudyConfig, storage: RDBStorage) -> optuna.Study:
    """The study in `storage`, created on first use, with a sampler that does not replay earlier processes' draws."""
    study = optuna.create_study(
        study_name=cfg.name,
        storage=storage,
        directions=[o.direction.value for o in objective_specs(cfg)],
        load_if_exists=True,
    )
    study.sampler = make_sampler(cfg, offset=len(study.get_trials(deepcopy=False)))
    return study


def make_sampler(cfg: StudyConfig, offset: int) -> optuna.samplers.BaseSampler:
    """Seeded by the config's seed plus the trials already in the study: a resumed process must not replay the
    first process's draws (same seed, same RNG: it would propose the same candidates again)."""
    s = cfg.search
    seed = s.seed + offset
    # Model-based samplers are always constrained: an invalid candidate is infeasible (`constraint_values`).
    if s.sampler == "tpe":
        return TPESampler(  # group: each method's parameters are modelled apart (a conditional space)
            seed=seed,
            multivariate=True,
            group=True,
            n_startup_trials=s.n_startup_trials,
            constraints_func=constraints_of,
        )
    if s.sampler == "gp":  # a trial's values are a deterministic function of its parameters (seeded ARA, greedy)
        return GPSampler(
            seed=seed,
            n_startup_trials=s.n_startup_trials,
            deterministic_objective=True,
            constraints_func=constraints_of,
        )
    return RandomSampler(seed=seed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_trials(study: optuna.Study, storage: RDBStorage) -> list[int]:
    """Trials RUNNING for a process of this host that no longer exists: failed now, re-queued once."""
    host = socket.gethostname()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        r = TrialRecord.of(t)
        if r.host != host or r.pid is None or (_alive(r.pid) and r.pid != os.getpid()):
            continue
        if r.trial_dir:  # half-written checkpoints of the dead trial
            for leftover in ("bf16", "candidate"):
                shutil.rmtree(r.trial_dir / leftover, ignore_errors=True)
        if fail_running(storage, study, t.number, f"interrupted: the study process (pid {r.pid}) died"):
            failed = next(f for f in study.get_trials(deepcopy=False) if f.number == t.number)
            RetryHeartbeatStaleTrialCallback(max_retry=1)(study, failed)
            reaped.append(t.number)
    return reaped


def write_pointer(cfg: StudyConfig, config_path: Path | None, config_text: str) -> None:
    """runs/<study>/study.json and a copy of the config: what `study status RUN_DIR` and `ui RUN_DIR` read."""
    run_dir = run_dir_of(cfg)
    (run_dir / "config.toml").write_text(config_text)
    pointer = {
        "name": cfg.name,
        "config": str(config_path.absolute()) if config_path else None,
        "storage": storage_url(cfg),
        "mlflow_uri": tracking_uri(cfg),
    }
    (run_dir / POINTER).write_text(json.dumps(pointer, indent=2))


class StudyNotFound(LookupError):
    """No such study folder or study; the message names the fix."""


def load_study_config(target: Path) -> StudyConfig:
    """A study TOML, or a study's run folder (which keeps a copy of its config and a pointer to its storage).
    Raises ConfigError or StudyNotFound."""
    if not target.is_dir():
        return load_config(target, check_paths=False)
    pointer = target / POINTER
    if not pointer.is_file():
        raise StudyNotFound(f"{target} is not a study folder (no {POINTER}); pass the study's run folder or its config")
    info = json.loads(pointer.read_text())
    # The original TOML (its relative paths resolve from its own folder), else the copy kept in the folder.
    source = Path(info["config"]) if info.get("config") and Path(info["config"]).is_file() else None
    cfg = load_config(source or target / "config.toml", check_paths=False)
    storage = cfg.storage.model_copy(update={"optuna_url": info["storage"]})
    tracking = cfg.tracking.model_copy(update={"mlflow_uri": info["mlflow_uri"]})
    return cfg.model_copy(update={"storage": storage, "tracking": tracking})


def load_existing_study(cfg: StudyConfig) -> optuna.Study:
    """A study that exists; raises StudyNotFound with the fix if not."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=cfg.name, storage=storage_url(cfg))
    except KeyError:
        raise StudyNotFound(
            f"no study {cfg.name!r} in {storage_url(cfg)}; start it with `mtp-abliterate study run CONFIG`"
        ) from None
