"""Where a study lives: its run folder, its Optuna storage and sampler, and the trials a dead process left behind.

Storage: SQLite under runs/<study>/ unless the config names a URL (PostgreSQL for several machines). Heartbeats let
another host's process fail (and re-queue once) the trials of a host that died; this host's dead trials are reaped at
once by `reap_dead_trials`. `runs/<study>/study.json` points `study status`, `ui`, `materialize` and `export` from
the run folder to the storage and the MLflow store.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from optuna.samplers import GPSampler, RandomSampler, TPESampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search import credentials
from mtp_abliterate.search.config import StudyConfig, load_config, meaning_changes, trial_meaning
from mtp_abliterate.search.errors import UserError
from mtp_abliterate.search.hosts import host_id
from mtp_abliterate.search.study.errors import StudyError
from mtp_abliterate.search.study.records import TrialRecord, fail_running
from mtp_abliterate.search.versions import require_optuna_5

POINTER = "study.json"


def run_dir_of(cfg: StudyConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.name


def default_sqlite(cfg: StudyConfig) -> Path:
    """The study's own SQLite file, where a config names no Optuna storage."""
    return run_dir_of(cfg) / "optuna.db"


def storage_url(cfg: StudyConfig) -> str:
    """The config's URL, a bare postgresql:// taken with the psycopg driver (the `distributed` extra installs
    psycopg 3; SQLAlchemy's default would be psycopg2), else SQLite in the study's folder."""
    url = cfg.storage.optuna_url
    if url is None:
        return f"sqlite:///{default_sqlite(cfg).absolute()}"
    return _with_psycopg(url)


def _with_psycopg(url: str) -> str:
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def tracking_uri(cfg: StudyConfig) -> str:
    """The MLflow store: the config's (a bare postgresql:// with psycopg, as for Optuna), else a SQLite database
    beside the studies (no server needed)."""
    uri = cfg.tracking.mlflow_uri
    if uri is None:
        return f"sqlite:///{(Path(cfg.runs_dir) / 'mlflow.db').absolute()}"
    return _with_psycopg(uri)


class StorageError(UserError, RuntimeError):
    """The study's storage cannot be opened; the one-line message names the fix."""


RECONNECT_S = 600.0  # how long a storage call waits for a database that went away (a restart) before it fails
# The storage calls a study makes; each is retried while the database cannot be reached.
RETRIED = (
    "create_new_study create_new_trial delete_study get_all_studies get_all_trials get_best_trial get_study_directions "
    "get_study_id_from_name get_study_name_from_id get_study_system_attrs get_study_user_attrs get_trial "
    "get_trial_id_from_study_id_trial_number get_trial_param get_trial_system_attrs get_trial_user_attrs "
    "record_heartbeat set_study_system_attr set_study_user_attr set_trial_intermediate_value set_trial_param "
    "set_trial_state_values set_trial_system_attr set_trial_user_attr _get_stale_trial_ids"
).split()


def _connection_lost(e: BaseException) -> bool:
    """Whether `e` (or a cause of it) is the database connection failing, not the query."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError) or (
            isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated
        ):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _retried(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if not _connection_lost(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    return call


class ReconnectingStorage(RDBStorage):
    """A database server's storage that survives its restart: pooled connections are tested before use
    (pool_pre_ping) and a call that fails because the database cannot be reached is retried for up to RECONNECT_S.
    A failed statement's transaction is rolled back by the server, so a retry writes once; the one window not
    covered is a connection lost after the server committed a write and before it acknowledged it."""

    def __init__(self, url: str, **kwargs) -> None:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True, **kwargs.get("engine_kwargs", {})}
        super().__init__(url, **kwargs)


for _name in RETRIED:
    setattr(ReconnectingStorage, _name, _retried(getattr(RDBStorage, _name)))


def open_storage(cfg: StudyConfig) -> RDBStorage:
    """The study's storage, reached (and its schema created) now, before any model loads. Raises StorageError."""
    run_dir_of(cfg).mkdir(parents=True, exist_ok=True)
    url = storage_url(cfg)
    kind = RDBStorage if url.startswith("sqlite") else ReconnectingStorage  # a server can restart under a study
    for attempt in range(3):
        try:
            return kind(
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
            f"storage.optuna_url {'...@' + url.split('@')[-1] if '@' in url else shown} is not a database URL "
            "SQLAlchemy knows (its own message would quote the password); "
            "use postgresql://USER@HOST[:PORT]/DB (the password in ~/.pgpass or as :${PGPASSWORD}) or sqlite:///PATH"
        )
    if isinstance(e, sqlalchemy.exc.OperationalError):
        cause = " ".join((str(e.orig) if e.orig else str(e)).split())
        if "FATAL" in cause:  # the server answered and refused: the URL's user, password or database
            return (
                f"the study's database {shown} refused the connection ({cause}); fix the user, password or database "
                "name in storage.optuna_url (docs/several-machines.md creates them)"
            )
        return (
            f"cannot reach the study's database {shown} ({cause}); start PostgreSQL there (README \"Several "
            'machines") or fix storage.optuna_url'
        )
    return f"storage.optuna_url {shown}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def redact(url: str) -> str:
    """A URL as it may be printed, logged and written: without its password (`search/credentials.py`)."""
    return credentials.redact(url)


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
    names = [o.name for o in objectives]
    if study.metric_names is None:  # optuna-dashboard's plots name the objectives by these, not "Objective 0"
        study.set_metric_names(names)
    elif study.metric_names != names:  # e.g. vLLM's raw mean accepted tokens, before the speed-true objective
        raise StudyError(
            f"study {cfg.name!r} in {redact(storage_url(cfg))} optimises {study.metric_names}, this config "
            f"{names}: its values cannot be compared; give the config a new `name` (or set "
            "search.acceptance_objective and search.extra_objectives to the study's)"
        )
    _check_meaning(cfg, study)
    study.sampler = make_sampler(cfg, offset=len(study.get_trials(deepcopy=False)), host=host_id())
    return study, created


MEANING_ATTR = "config_meaning"


def check_config_unchanged(cfg: StudyConfig, storage: RDBStorage) -> None:
    """`open_study`'s check of an existing study's config (`_check_meaning`), done by `study run` right after the
    stores open: a refused config costs no model-stack import. Raises StudyError."""
    try:
        study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=RandomSampler())
    except KeyError:
        return  # a new study: open_study records its config
    _check_meaning(cfg, study)


def _check_meaning(cfg: StudyConfig, study: optuna.Study) -> None:
    """A study keeps the config fields that make its trials comparable (`config.trial_meaning`, recorded when it is
    created, or on the first run of a study older than the record); a config that changes one of them is refused
    with the diff. Budget and operational fields (n_trials, retention, tracking, timeouts, ...) may change."""
    current = trial_meaning(cfg)
    stored = study.user_attrs.get(MEANING_ATTR)
    if stored is None:
        study.set_user_attr(MEANING_ATTR, current)
        return
    if changes := meaning_changes(stored, current):
        raise StudyError(
            f"study {cfg.name!r} was created with another config, and these fields change what its trials mean: "
            f"{'; '.join(changes)}; revert them to resume it, or give the config a new `name` to start a new study"
        )


def make_sampler(cfg: StudyConfig, offset: int, host: str) -> optuna.samplers.BaseSampler:
    """Seeded by the config's seed, the trials already in the study and the host: a resumed process must not replay
    the first process's draws, nor two hosts starting together draw the same candidates (same seed, same RNG)."""
    require_optuna_5()
    s = cfg.search
    seed = (s.seed + offset + zlib.crc32(host.encode())) % 2**32
    # Every sampler is constrained: each complete trial carries its constraint values (`records.set_constraints`;
    # an invalid candidate is infeasible), which Optuna 5's samplers read from the trial.
    if s.sampler == "tpe":
        return TPESampler(  # group: each method's parameters are modelled apart (a conditional space)
            seed=seed,
            multivariate=True,
            group=True,
            n_startup_trials=s.n_startup_trials,
            constant_liar=True,  # hosts sharing a study: another host's running trial counts as a poor one
        )
    if s.sampler == "gp":  # a trial's values are a deterministic function of its parameters (seeded ARA, greedy)
        return GPSampler(seed=seed, n_startup_trials=s.n_startup_trials, deterministic_objective=True)
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
    (run_dir / "config.toml").write_text(credentials.redact_text(config_text))
    pointer = {  # without passwords: the commands that read it take them from the config or from libpq
        "name": cfg.name,
        "config": str(config_path.absolute()) if config_path else None,
        "storage": redact(storage_url(cfg)),
        "mlflow_uri": redact(tracking_uri(cfg)),
    }
    (run_dir / POINTER).write_text(json.dumps(pointer, indent=2))


class StudyNotFound(UserError, LookupError):
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
    folder = target.absolute()
    if folder.name != cfg.name:
        raise StudyNotFound(
            f"{target} holds study {cfg.name!r}: a study's folder is named after it; rename the folder to {cfg.name}"
        )
    # Everything these commands write (FP8 candidates, the module I/O cache, heretic.log, exports, draft-tune) goes
    # under the folder given, wherever `study run --runs-dir` put it, never under the config's own runs_dir.
    cfg = cfg.model_copy(update={"runs_dir": str(folder.parent)})
    # The stores the study used; the config's own URL when it is the same one, as it holds the password the pointer
    # leaves out (without one, libpq takes it from PGPASSWORD or ~/.pgpass).
    optuna_url = _same_store(info["storage"], storage_url(cfg))
    mlflow_uri = _same_store(info["mlflow_uri"], tracking_uri(cfg))
    storage = cfg.storage.model_copy(update={"optuna_url": optuna_url})
    tracking = cfg.tracking.model_copy(update={"mlflow_uri": mlflow_uri})
    return cfg.model_copy(update={"storage": storage, "tracking": tracking})


def _same_store(recorded: str, configured: str) -> str:
    """The configured URL when it names the store recorded (it may hold the password the record leaves out), or a
    SQLite file that exists where the folder is now (a study folder moved with its database); else the record."""
    if redact(configured) == redact(recorded):
        return configured
    if configured.startswith("sqlite:///") and Path(configured.removeprefix("sqlite:///")).is_file():
        return configured
    return recorded


def load_existing_study(cfg: StudyConfig) -> optuna.Study:
    """A study that exists; raises StudyNotFound with the fix if not."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    missing = StudyNotFound(
        f"no study {cfg.name!r} in {redact(storage_url(cfg))}; start it with `mtp-abliterate study run CONFIG`"
    )
    # the study's own SQLite file: absent means never run (opening it would create it, or fail on a missing folder)
    if cfg.storage.optuna_url is None and not default_sqlite(cfg).is_file():
        raise missing
    try:
        return optuna.load_study(study_name=cfg.name, storage=storage_url(cfg))
    except KeyError:
        raise missing from None


LOCK = "study-run.lock"


class StudyLocked(StudyError):
    """Another process runs the study from the same folder."""


@contextmanager
def study_lock(cfg: StudyConfig) -> Iterator[None]:
    """Held while a `study run` (or `study reference`) runs: a second one from the same study folder is refused
    before any model loads, as the two would build the same FP8 base, module I/O cache and vanilla folder. An
    advisory lock (flock) on runs/<study>/study-run.lock, which holds the owner's pid: the kernel releases it when
    the process ends however it ends (kill -9 too), so there is never a stale lock to remove. Several processes of
    one study run on several hosts, each with its own runs folder (README "Several machines"). Raises StudyLocked."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = (run_dir / LOCK).open("a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StudyLocked(
                f"study {cfg.name!r} is already running from {run_dir} ({holder}); wait for it or stop it (Ctrl-C, "
                "then the same command resumes): one study runs in several processes on several hosts, each with its "
                'own runs folder (README "Several machines"), never twice in one folder'
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {host_id()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock
