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
import time
import zlib
from pathlib import Path

import optuna
import sqlalchemy
from optuna.samplers import GPSampler, RandomSampler, TPESampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mtp_abliterate.search.config import StudyConfig, load_config
from mtp_abliterate.search.hosts import host_id
from mtp_abliterate.search.study.pareto import objective_specs
from mtp_abliterate.search.study.records import TrialRecord, constraints_of, fail_running

POINTER = "study.json"


def run_dir_of(cfg: StudyConfig) -> Path:
    return Path(cfg.resolve(cfg.runs_dir)) / cfg.name


def storage_url(cfg: StudyConfig) -> str:
    """The config's URL, a bare postgresql:// taken with the psycopg driver (the `distributed` extra installs
    psycopg 3; SQLAlchemy's default would be psycopg2), else SQLite in the study's folder."""
    url = cfg.storage.optuna_url
    if url is None:
        return f"sqlite:///{(run_dir_of(cfg) / 'optuna.db').absolute()}"
    return _with_psycopg(url)


def _with_psycopg(url: str) -> str:
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def tracking_uri(cfg: StudyConfig) -> str:
    """The MLflow store: the config's (a bare postgresql:// with psycopg, as for Optuna), else a SQLite database
    beside the studies (no server needed)."""
    uri = cfg.tracking.mlflow_uri
    if uri is None:
        return f"sqlite:///{(Path(cfg.resolve(cfg.runs_dir)) / 'mlflow.db').absolute()}"
    return _with_psycopg(uri)


class StorageError(RuntimeError):
    """The study's storage cannot be opened; the one-line message names the fix."""


def open_storage(cfg: StudyConfig) -> RDBStorage:
    """The study's storage, reached (and its schema created) now, before any model loads. Raises StorageError."""
    run_dir_of(cfg).mkdir(parents=True, exist_ok=True)
    url = storage_url(cfg)
    for attempt in range(3):
        try:
            return RDBStorage(
                url,
                heartbeat_interval=cfg.storage.heartbeat_s,
                grace_period=cfg.storage.grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Two processes creating the schema of a new database at once: the loser finds the tables next time.
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
        except Exception as e:
            raise StorageError(_storage_failure(url, e)) from None
    raise AssertionError("unreachable")


def _storage_failure(url: str, e: Exception) -> str:
    shown = redact(url)
    if isinstance(e, ImportError):
        return (
            f"storage.optuna_url {shown}: its database driver is not installed; "
            "run `pip install 'mtp-abliterate[distributed]'` (psycopg for postgresql://)"
        )
    if isinstance(e, sqlalchemy.exc.ArgumentError):
        return (
            f"storage.optuna_url {shown} is not a database URL SQLAlchemy knows ({str(e).splitlines()[0]}); "
            "use postgresql://USER[:PASSWORD]@HOST[:PORT]/DB or sqlite:///PATH"
        )
    if isinstance(e, sqlalchemy.exc.OperationalError):
        cause = " ".join((str(e.orig) if e.orig else str(e)).split())
        if "FATAL" in cause:  # the server answered and refused: the URL's user, password or database
            return (
                f"the study's database {shown} refused the connection ({cause}); fix the user, password or database "
                'name in storage.optuna_url (README "Several machines" creates them)'
            )
        return (
            f"cannot reach the study's database {shown} ({cause}); start PostgreSQL there (README \"Several "
            'machines") or fix storage.optuna_url'
        )
    return f"storage.optuna_url {shown}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def redact(url: str) -> str:
    """A URL as it may be printed and logged: without its password."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1]


def open_study(cfg: StudyConfig, storage: RDBStorage) -> tuple[optuna.Study, bool]:
    """The study in `storage` and whether this process created it (exactly one process does, however many start
    at once: the storage's unique study name decides), with a sampler that does not replay other processes' draws."""
    objectives = objective_specs(cfg)
    try:
        study = optuna.create_study(
            study_name=cfg.name, storage=storage, directions=[o.direction.value for o in objectives]
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(study_name=cfg.name, storage=storage), False
    if study.metric_names is None:  # optuna-dashboard's plots name the objectives by these, not "Objective 0"
        study.set_metric_names([o.name for o in objectives])
    study.sampler = make_sampler(cfg, offset=len(study.get_trials(deepcopy=False)), host=host_id())
    return study, created


def make_sampler(cfg: StudyConfig, offset: int, host: str) -> optuna.samplers.BaseSampler:
    """Seeded by the config's seed, the trials already in the study and the host: a resumed process must not replay
    the first process's draws, nor two hosts starting together draw the same candidates (same seed, same RNG)."""
    s = cfg.search
    seed = (s.seed + offset + zlib.crc32(host.encode())) % 2**32
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
    host = host_id()
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
