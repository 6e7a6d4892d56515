"""The study: a 3-objective Optuna search over ARA candidates that survives the night.

Objectives: refusal rate (min), KL divergence (min) and an acceptance scalar at n = 4 (max; mean accepted tokens
per draft over the configured mix of prompt sets by default). Storage: SQLite under runs/<study>/ unless the config
names a URL (PostgreSQL for several machines). Resume = the same command: trials left RUNNING by a dead process of
this host are failed at once and re-queued once (other hosts' trials through Optuna's heartbeat); a failed stage
fails only its trial; Ctrl-C fails the current trial cleanly and re-queues it. MLflow mirrors the storage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import RandomSampler, TPESampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from mtp_abliterate.objectives.base import Direction
from mtp_abliterate.search.candidate.checkpoint import CheckpointError
from mtp_abliterate.search.candidate.fp8_base import KEY_FILE, Fp8BaseError
from mtp_abliterate.search.candidate.heretic_bridge import ModelLoadError
from mtp_abliterate.search.candidate.quantize import QuantizationError
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.serving.modes import ColdServing, Serving, SwapServing
from mtp_abliterate.search.study.pareto import ObjectiveSpec, dominates, pareto_front
from mtp_abliterate.search.study.records import retry_of
from mtp_abliterate.search.study.retention import apply_retention, free_gb
from mtp_abliterate.search.study.space import SearchSpace
from mtp_abliterate.search.trial.pipeline import (
    DiskFullError,
    StageError,
    TrialPipeline,
    TrialResult,
    fp8_base,
    stderr_to,
)
from mtp_abliterate.search.versions import software_versions

HEARTBEAT_S, GRACE_S = 60, 180


class StudyError(RuntimeError):
    """The study cannot go on (vanilla model failing, too many failures in a row, disk full); one line + fix."""


def quiet_libraries() -> None:
    """Library chatter (progress bars, INFO logs) would bury the study's own display; failures still surface."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # read when llmcompressor is first imported
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run_dir_of(cfg: StudyConfig) -> Path:
    return Path(cfg.resolve(cfg.runs_dir)) / cfg.name


def objective_specs(cfg: StudyConfig) -> list[ObjectiveSpec]:
    scalar = cfg.search.acceptance_objective
    return [
        ObjectiveSpec("refusal_rate", Direction.MINIMIZE, "refusal rate", worst=1.01),
        ObjectiveSpec("kld", Direction.MINIMIZE, "KL divergence"),
        ObjectiveSpec(scalar, Direction.MAXIMIZE, f"{scalar} (n={cfg.serving.num_speculative_tokens})", worst=0.0),
    ]


def storage_url(cfg: StudyConfig) -> str:
    return cfg.storage.optuna_url or f"sqlite:///{(run_dir_of(cfg) / 'optuna.db').absolute()}"


def open_study(cfg: StudyConfig) -> optuna.Study:
    """The study in its storage, created on first use. Heartbeats let another host's process fail (and re-queue
    once) the trials of a host that died; this host's dead trials are reaped at once by `reap_dead_trials`."""
    run_dir_of(cfg).mkdir(parents=True, exist_ok=True)
    storage = RDBStorage(
        storage_url(cfg),
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
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
    constraints = _constraints if (s.constraints.max_refusal_rate, s.constraints.max_kl) != (None, None) else None
    if s.sampler == "tpe":
        return TPESampler(
            seed=seed, multivariate=True, n_startup_trials=s.n_startup_trials, constraints_func=constraints
        )
    return RandomSampler(seed=seed)


def _constraints(t: FrozenTrial) -> list[float]:
    """Stored by the objective (`constraint_values`); Optuna reads them for complete trials only."""
    return t.user_attrs.get("constraints", [])


def constraint_values(cfg: StudyConfig, refusal_rate: float, kld: float) -> list[float]:
    """Optuna's convention: <= 0 is feasible."""
    c = cfg.search.constraints
    out = []
    if c.max_refusal_rate is not None:
        out.append(refusal_rate - c.max_refusal_rate)
    if c.max_kl is not None:
        out.append(kld - c.max_kl)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_trials(study: optuna.Study) -> list[int]:
    """Trials RUNNING for a process of this host that no longer exists: failed now, re-queued once."""
    host = socket.gethostname()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or (_alive(pid) and pid != os.getpid()):
            continue
        storage = study._storage
        storage.set_trial_user_attr(t._trial_id, "fail_reason", f"interrupted: the study process (pid {pid}) died")
        storage.set_trial_user_attr(t._trial_id, "failed_stage", t.user_attrs.get("stage", "?"))
        if trial_dir := t.user_attrs.get("trial_dir"):  # half-written checkpoints of the dead trial
            for leftover in ("bf16", "candidate"):
                shutil.rmtree(Path(trial_dir) / leftover, ignore_errors=True)
        if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            RetryHeartbeatStaleTrialCallback(max_retry=1)(study, storage.get_trial(t._trial_id))
            reaped.append(t.number)
    return reaped


@dataclass
class RunLimits:
    n_trials: int  # complete trials the study should reach
    deadline: float | None  # time.time() after which no trial starts
    max_consecutive_failures: int


class StudyRunner:
    """Owns the study loop; the stages are in TrialPipeline, the mirror in Tracker."""

    def __init__(self, cfg: StudyConfig, console: Console, config_path: Path | None = None) -> None:
        quiet_libraries()
        self.cfg = cfg
        self.console = console
        self.config_path = config_path
        self.config_text = config_path.read_text() if config_path else cfg.model_dump_json(indent=2)
        self.run_dir = run_dir_of(cfg)
        self.objectives = objective_specs(cfg)
        self.study = open_study(cfg)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._write_pointer()

    def _write_pointer(self) -> None:
        """runs/<study>/study.json: lets `study status RUN_DIR` and `ui RUN_DIR` find the storage and store."""
        (self.run_dir / "config.toml").write_text(self.config_text)
        pointer = {
            "name": self.cfg.name,
            "config": str(self.config_path.absolute()) if self.config_path else None,
            "storage": storage_url(self.cfg),
            "mlflow_uri": self.mlflow_uri(),
        }
        (self.run_dir / "study.json").write_text(json.dumps(pointer, indent=2))

    def mlflow_uri(self) -> str:
        from mtp_abliterate.search.study.tracking import default_uri

        return self.cfg.tracking.mlflow_uri or default_uri(Path(self.cfg.resolve(self.cfg.runs_dir)))

    def complete(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def run(self, limits: RunLimits) -> list[FrozenTrial]:
        """Run until `limits`; returns the Pareto front. Raises StudyError or KeyboardInterrupt."""
        from mtp_abliterate.search.candidate.resident import Resident

        if self.cfg.abliteration.method != "ara":
            raise StudyError(
                f"the study searches ARA parameters, but abliteration.method = {self.cfg.abliteration.method!r}; "
                "set it to 'ara' (score a directional candidate with `mtp-abliterate study reference`)"
            )
        reaped = reap_dead_trials(self.study)
        if reaped:
            self.console.print(f"resumed: trial(s) {reaped} of a killed run were failed and re-queued")
        with self.console.status("loading the model and capturing module I/O (once per study)"):
            try:
                resident = Resident(self.cfg, cache_dir=self.run_dir / "cache")
            except (CheckpointError, ModelLoadError) as e:
                raise StudyError(str(e)) from None
            resident.module_io()
            self.resident = resident
            space = SearchSpace(resident.abliterator.num_layers, self.cfg.search.space)
        with (
            self.console.status("FP8 base: quantizing the vanilla model (once per study, reused on resume)"),
            stderr_to(self.run_dir / "fp8-base.log"),
        ):
            try:
                base = fp8_base(self.cfg, resident, self.run_dir)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise StudyError(
                    f"no space left under {self.run_dir} for the vanilla FP8 base (about the size of the FP8 model, "
                    "twice that while it is built); free space or move runs_dir"
                ) from None
            except (QuantizationError, Fp8BaseError) as e:
                raise StudyError(f"the vanilla FP8 base could not be built: {e}") from None
        pipeline = TrialPipeline(self.cfg, resident, base, self._serving(base))
        if not self.study.trials:
            for params in self.cfg.search.enqueue:
                self.study.enqueue_trial(space.check_enqueued(params), skip_if_exists=True)
        try:
            self._vanilla(pipeline)
            tracker = self.tracker()
            self._sync(tracker)
            status = "FINISHED"
            try:
                self._optimize(limits, space, pipeline, tracker)
            except BaseException:
                status = "KILLED"
                raise
            finally:
                self._sync(tracker)
                tracker.finish(status)
        finally:
            pipeline.serving.close()  # the study's server, when swapping
        return pareto_front(self.study.get_trials(deepcopy=False), self.objectives)

    def _swap_key(self, base: Path | None) -> str:
        """What a swap self-check verdict holds for: the serving settings, the draft and the base checkpoint."""
        c = self.cfg
        base_id = (base / KEY_FILE).read_text() if base else c.model.target
        payload = json.dumps([c.serving.model_dump(mode="json"), c.model.draft, base_id], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def _serving(self, base: Path | None) -> Serving:
        """Swap serving unless the config or an earlier failed self-check says cold; sets `self.check_swap`."""
        c = self.cfg
        self.check_swap = False
        initial = base if base else (None if c.quantization.scheme == "FP8_DYNAMIC" else self.resident.local_dir())
        if c.serving.mode == "cold":
            return ColdServing(c)
        if initial is None:
            if c.serving.mode == "swap":
                raise StudyError(
                    "serving.mode = 'swap' needs FP8 candidates built incrementally: set "
                    "quantization.incremental = true (or serving.mode = 'auto')"
                )
            self.console.print("serving: cold starts (swapping needs quantization.incremental = true)")
            return ColdServing(c)
        verdict = self.study.user_attrs.get("swap_check")
        key = self._swap_key(base)
        if (
            c.serving.mode == "auto"
            and verdict
            and verdict["key"] == key
            and not verdict.get("passed", verdict["identical"])
        ):
            self.console.print(f"serving: cold starts (the swap self-check failed on trial {verdict['trial']})")
            return ColdServing(c)
        self.check_swap = c.serving.mode == "auto" and not (verdict and verdict["key"] == key)
        return SwapServing(c, initial, self.run_dir / "server.log")

    def tracker(self):
        """The study's MLflow mirror with its parent run started (or resumed)."""
        from mtp_abliterate.search.study.tracking import Tracker

        local = self.cfg.tracking.mlflow_uri is None  # a tracking server decides its own artifact store
        tracker = Tracker(
            self.mlflow_uri(), self.cfg.name, self.run_dir / "mlartifacts" if local else None, self.objectives
        )
        tracker.start_parent(self.study, self._parent_params(), software_versions(), self.config_text)
        return tracker

    def _parent_params(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "target": c.model.target,
            "draft": c.model.draft,
            "method": c.abliteration.method,
            "rank": c.abliteration.rank,
            "row_normalization": c.abliteration.row_normalization,
            "quantization": c.quantization.scheme,
            "num_speculative_tokens": c.serving.num_speculative_tokens,
            "acceptance_objective": c.search.acceptance_objective,
            "acceptance_sets": ",".join(f"{s.name}:{s.weight}" for s in c.acceptance.sets),
            "sampler": c.search.sampler,
            "seed": c.search.seed,
            "n_trials": c.search.n_trials,
            "storage": storage_url(c).split("@")[-1],  # never a password
        }

    def _sync(self, tracker) -> None:
        try:
            tracker.sync(self.study)
        except Exception as e:  # MLflow is a mirror; the next sync repairs it
            self.console.print(f"[yellow]warning: MLflow sync failed ({type(e).__name__}: {e}); will retry[/]")

    def _vanilla(self, pipeline: TrialPipeline) -> dict[str, float]:
        """The vanilla FP8 model + draft, measured once per study in the same harness (kept in the study)."""
        if "vanilla" in self.study.user_attrs:
            return self.study.user_attrs["vanilla"]
        with self.console.status("measuring the vanilla model in the same harness (once per study)"):
            try:
                result = pipeline.run(None, self.run_dir / "vanilla")
            except StageError as e:
                raise StudyError(
                    f"the vanilla model failed at stage {e.stage}: {e.reason} (log: {e.log_path}); "
                    "fix the serving settings before a study can run"
                ) from None
        metrics = result.metrics()
        self.study.set_user_attr("vanilla", metrics)
        self.console.print(
            f"vanilla: refusal rate {result.refusal_rate:.3f}, acceptance "
            + "/".join(f"{a:.3f}" for a in result.per_position)
            + f", mean accepted {result.mean_accepted_tokens:.3f}"
        )
        return metrics

    def _optimize(self, limits: RunLimits, space: SearchSpace, pipeline, tracker) -> None:
        done = len(self.complete())
        if done >= limits.n_trials:
            self.console.print(f"the study already has {done} complete trials (target {limits.n_trials})")
            return
        durations = [t.user_attrs["metrics"]["trial_s"] for t in self.complete() if "metrics" in t.user_attrs]
        failures = 0
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("done ≈ {task.fields[eta]}"),
            TextColumn("{task.fields[stage]}"),
            console=self.console,
            transient=False,
        )
        task = progress.add_task("trials", total=limits.n_trials, completed=done, eta="?", stage="")

        def eta() -> str:
            left = limits.n_trials - len(self.complete())
            if not durations:
                return "?"
            return time.strftime("%H:%M", time.localtime(time.time() + left * statistics.median(durations)))

        def objective(trial: optuna.Trial) -> tuple[float, float, float]:
            params = space.suggest(trial)
            trial_dir = self.run_dir / "trials" / f"{trial.number:04d}"
            for k, v in {"host": self.host, "pid": self.pid, "trial_dir": str(trial_dir)}.items():
                trial.set_user_attr(k, v)

            def on_stage(stage: str) -> None:
                trial.set_user_attr("stage", stage)
                progress.update(task, description=f"trial {trial.number}", stage=stage)

            try:
                if (free := free_gb(self.run_dir)) < self.cfg.retention.min_free_gb:
                    raise DiskFullError(
                        f"only {free:.1f} GB free under {self.run_dir} (retention.min_free_gb = "
                        f"{self.cfg.retention.min_free_gb}); free space, move runs_dir, or keep fewer checkpoints "
                        "(retention.keep)"
                    )
                result = pipeline.run(
                    params,
                    trial_dir,
                    on_stage,
                    on_server=lambda pid: trial.set_user_attr("server_pid", pid),
                    keep_candidate=self.cfg.retention.keep != "none",
                    verify_swap=self.check_swap,
                )
                if result.swap_check is not None:
                    self._swap_verdict(trial.number, result.swap_check, pipeline, progress.console)
            except StageError as e:
                trial.set_user_attr("fail_reason", e.reason[:2000])
                trial.set_user_attr("failed_stage", e.stage)
                trial.set_user_attr("log_path", str(e.log_path))
                raise
            except (KeyboardInterrupt, DiskFullError) as e:
                interrupted = isinstance(e, KeyboardInterrupt)
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)" if interrupted else str(e))
                trial.set_user_attr("failed_stage", trial.user_attrs.get("stage", "?"))
                if retry_of(trial) is None:  # re-queued once, like a killed trial
                    self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                raise
            return self._record(trial, result)

        def after(study: optuna.Study, t: FrozenTrial) -> None:
            nonlocal failures
            self._sync(tracker)
            complete = len(self.complete())
            if t.state == TrialState.COMPLETE:
                failures = 0
                durations.append(t.user_attrs["metrics"]["trial_s"])
                m = t.user_attrs["metrics"]
                progress.console.print(
                    f"trial {t.number}: refusal {t.values[0]:.3f}  KL {t.values[1]:.4f}  "
                    f"{self.objectives[2].name} {t.values[2]:.3f}  acc "
                    + "/".join(f"{m.get(f'acc_pos_{i}', math.nan):.2f}" for i in range(4))
                    + f"  ({m['trial_s']:.0f} s)"
                )
            else:
                failures += 1
                progress.console.print(
                    f"[red]trial {t.number} failed at {t.user_attrs.get('failed_stage', '?')}: "
                    f"{str(t.user_attrs.get('fail_reason', ''))[:300]}[/] (log: {t.user_attrs.get('log_path')})"
                )
            front = pareto_front(study.get_trials(deepcopy=False), self.objectives)
            apply_retention(study.get_trials(deepcopy=False), front, self.cfg.retention)
            best = ""
            if front:
                top = max(t.values[2] for t in front)
                best = (
                    f" · best {self.objectives[2].name} {top:.3f} · min refusal {min(t.values[0] for t in front):.2f}"
                )
            progress.update(task, completed=complete, eta=eta(), stage=f"Pareto front: {len(front)}{best}")
            if complete >= limits.n_trials:
                study.stop()
            elif failures >= limits.max_consecutive_failures:
                study.stop()
            elif limits.deadline and durations and time.time() + statistics.median(durations) > limits.deadline:
                progress.console.print("stopping: the next trial would not finish before the deadline")
                study.stop()

        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            with progress:
                self.study.optimize(objective, callbacks=[after], catch=(StageError,), gc_after_trial=False)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if failures >= limits.max_consecutive_failures:
            raise StudyError(
                f"{failures} trials failed in a row (see `mtp-abliterate study status` and the trial logs); "
                "fix the cause and run the same command to resume"
            )

    def _swap_verdict(self, number: int, check: dict[str, Any], pipeline: TrialPipeline, console: Console) -> None:
        """Keep the self-check's verdict in the study (a resumed run reuses it) and fall back to cold starts when
        swapping did not reproduce a cold start."""
        self.check_swap = False
        verdict = {**check, "trial": number, "key": self._swap_key(pipeline.base)}
        self.study.set_user_attr("swap_check", verdict)
        if check["passed"]:
            console.print(f"swap self-check passed on trial {number}: {check['rule']}")
            return
        console.print(
            f"[yellow]swap self-check FAILED on trial {number}: swapped and cold-start measurements differ in "
            f"{', '.join(check['differences'][:4])} ({check['rule']}); this vLLM's in-place reload is not trusted: "
            "cold starts from now on (trial values come from the cold start)[/]"
        )
        pipeline.serving.close()
        pipeline.serving = ColdServing(self.cfg)

    def _record(self, trial: optuna.Trial, result: TrialResult) -> tuple[float, float, float]:
        metrics = result.metrics()
        constraints = constraint_values(self.cfg, result.refusal_rate, result.kld)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("adapter_digest", result.adapter_digest)
        trial.set_user_attr("merged_digest", result.merged_digest)
        trial.set_user_attr("module_io_key", self.resident.io_key)
        trial.set_user_attr("versions", software_versions())
        if result.candidate:
            trial.set_user_attr("candidate", str(result.candidate))
        trial.set_user_attr("serving", result.serving)
        trial.set_user_attr("fingerprint", result.fingerprint)
        trial.set_user_attr("constraints", constraints)
        trial.set_user_attr("feasible", all(c <= 0 for c in constraints))
        (Path(trial.user_attrs["trial_dir"]) / "result.json").write_text(
            json.dumps(
                {
                    "trial": trial.number,
                    "params": trial.params,
                    "metrics": metrics,
                    "adapter_digest": result.adapter_digest,
                    "acceptance": result.acceptance,
                    "refusal_samples": result.refusal_samples,
                },
                indent=2,
                default=str,
            )
        )
        return result.refusal_rate, result.kld, metrics[self.objectives[2].name]


def score_reference(
    runner: StudyRunner, method: str, raw: dict[str, Any], label: str
) -> tuple[dict[str, float], list[int]]:
    """Score one candidate of any method (e.g. heretic's directional ablation) in the study's harness, keep it in
    the study as `reference.<label>` (tables, plots, MLflow), and return its metrics and the feasible complete
    trials that dominate it."""
    from mtp_abliterate.search.candidate.resident import Resident, num_layers_of, parse_parameters

    cfg = runner.cfg.model_copy(update={"abliteration": runner.cfg.abliteration.model_copy(update={"method": method})})
    with runner.console.status(f"scoring the {method} reference {label!r}"):
        try:
            params = parse_parameters(method, raw, num_layers_of(cfg.resolve(cfg.model.target)))
            pipeline = TrialPipeline(cfg, Resident(cfg, cache_dir=runner.run_dir / "cache"))
        except (CheckpointError, ModelLoadError) as e:
            raise StudyError(str(e)) from None
        try:
            result = pipeline.run(params, runner.run_dir / "references" / label)
        except StageError as e:
            raise StudyError(f"the reference failed at stage {e.stage}: {e.reason} (log: {e.log_path})") from None
    metrics = result.metrics()
    runner.study.set_user_attr(f"reference.{label}", {"method": method, "params": raw, "metrics": metrics})
    runner._sync(runner.tracker())
    better = [
        t.number
        for t in runner.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("feasible", True) and dominates(list(t.values), metrics, runner.objectives)
    ]
    return metrics, better


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a polite kill (systemd, timeout) cleans up like Ctrl-C
