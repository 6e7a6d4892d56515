"""The study: a multi-objective Optuna search over abliteration candidates (ARA, heretic's directional ablation or
both) that survives the night.

Objectives (`objectives/registry.py`): refusal rate (min), KL divergence (min) and an acceptance scalar at
n = num_speculative_tokens (max; mean accepted tokens per draft over the configured mix of prompt sets by default),
then any `search.extra_objectives`.
Resume = the same command: trials left RUNNING by a dead process of this host are failed at once and re-queued once
(other hosts' trials through Optuna's heartbeat); a failed stage fails only its trial; Ctrl-C fails the current trial
cleanly and re-queues it. MLflow mirrors the storage.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search.candidate.checkpoint import CheckpointError
from mtp_abliterate.search.candidate.fp8_base import Fp8BaseError
from mtp_abliterate.search.candidate.heretic_bridge import ModelLoadError
from mtp_abliterate.search.candidate.quantize import QuantizationError
from mtp_abliterate.search.candidate.resident import Resident
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.config_merge import standalone_text
from mtp_abliterate.search.credentials import redact_text
from mtp_abliterate.search.disk import DiskFullError, require_free_space
from mtp_abliterate.search.hosts import host_id
from mtp_abliterate.search.metrics import VLLM_MEAN_ACCEPTED
from mtp_abliterate.search.quiet import quiet_libraries
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.errors import StudyError
from mtp_abliterate.search.study.limits import RunLimits
from mtp_abliterate.search.study.monitor import StudyMonitor
from mtp_abliterate.search.study.pareto import constraint_values, pareto_front
from mtp_abliterate.search.study.preflight import check_method, open_stores
from mtp_abliterate.search.study.serving_plan import plan_serving, swap_key
from mtp_abliterate.search.study.space import SearchSpace
from mtp_abliterate.search.study.storage import (
    open_study,
    reap_dead_trials,
    redact,
    run_dir_of,
    storage_url,
    tracking_uri,
    write_pointer,
)
from mtp_abliterate.search.study.tracking import Tracker, served
from mtp_abliterate.search.study.winner import pick_winner
from mtp_abliterate.search.trial.pipeline import StageError, TrialPipeline, fp8_base, stderr_to
from mtp_abliterate.search.trial.result import TrialResult
from mtp_abliterate.search.versions import software_versions


class StudyRunner:
    """Owns the study loop; the stages are in TrialPipeline, the display and stop rules in StudyMonitor, the mirror
    in Tracker."""

    def __init__(
        self, cfg: StudyConfig, console: Console, config_path: Path | None = None, storage: RDBStorage | None = None
    ) -> None:
        """`storage`: the one `open_stores` returned (`study run` opens it before importing the model stack)."""
        quiet_libraries()
        self.cfg = cfg
        self.console = console
        # as written to the study folder and MLflow: store URLs without their passwords (search/credentials.py)
        self.config_text = redact_text(standalone_text(config_path) if config_path else cfg.model_dump_json(indent=2))
        self.run_dir = run_dir_of(cfg)
        self.objectives = objective_specs(cfg)
        # before any model loads: a bad URL costs seconds, not a model load
        self.storage = storage or open_stores(cfg)
        self.study, self.created = open_study(cfg, self.storage)
        self.host, self.pid = host_id(), os.getpid()
        self.swap_check_pending = False
        write_pointer(cfg, config_path, self.config_text)

    def mlflow_uri(self) -> str:
        return tracking_uri(self.cfg)

    def run(self, limits: RunLimits) -> list[FrozenTrial]:
        """Run until `limits`; returns the Pareto front. Raises StudyError or KeyboardInterrupt."""
        check_method(self.cfg)
        if reaped := reap_dead_trials(self.study, self.storage):
            self.console.print(f"resumed: trial(s) {reaped} of a killed run were failed and re-queued")
        with self.console.status("loading the model and capturing module I/O (once per study)"):
            self.resident = self.load_resident()
            self.resident.module_io()
            ab = self.resident.abliterator
            if self.cfg.abliteration.experts and not ab.num_experts:
                raise StudyError(
                    f"abliteration.experts = true, but {self.cfg.model.target} has no routed experts; set it to false"
                )
            experts = ab.num_experts if self.cfg.abliteration.experts else 0
            space = SearchSpace(ab.num_layers, self.cfg.search.space, tuple(self.cfg.search.methods), experts)
        base = self._fp8_base()
        plan = plan_serving(
            self.cfg, base, self.resident.local_dir(), records.swap_check(self.study, self.host), self.run_dir
        )
        if plan.note:
            self.console.print(plan.note)
        self.swap_check_pending = plan.check_pending
        pipeline = TrialPipeline(self.cfg, self.resident, base, plan.mode)
        if self.created or not self.study.trials:  # one process enqueues, however many start the study together
            for params in self.cfg.search.enqueue:
                self.study.enqueue_trial(space.check_enqueued(params), skip_if_exists=True)
        try:
            self._vanilla(pipeline)
            self._optimize_tracked(limits, space, pipeline)
        finally:
            pipeline.serving.close()  # the study's server, when swapping
        return pareto_front(self.study.get_trials(deepcopy=False), self.objectives)

    def load_resident(self) -> Resident:
        try:
            return Resident(self.cfg, cache_dir=self.run_dir / "cache")
        except (CheckpointError, ModelLoadError) as e:
            raise StudyError(str(e)) from None

    def _fp8_base(self) -> Path | None:
        with (
            self.console.status("FP8 base: quantizing the vanilla model (once per study, reused on resume)"),
            stderr_to(self.run_dir / "fp8-base.log"),
        ):
            try:
                return fp8_base(self.cfg, self.resident, self.run_dir, say=self.console.print)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise StudyError(
                    f"no space left under {self.run_dir} for the vanilla FP8 base (about the size of the FP8 model, "
                    "twice that while it is built); free space or move runs_dir"
                ) from None
            except (QuantizationError, Fp8BaseError) as e:
                raise StudyError(f"the vanilla FP8 base could not be built: {e}") from None

    def tracker(self) -> Tracker:
        """The study's MLflow mirror with its parent run started (or resumed)."""
        uri = self.mlflow_uri()
        tracker = Tracker(
            uri,
            self.cfg.name,
            None if served(uri) else self.run_dir / "mlartifacts",  # a tracking server keeps its own artifacts
            self.objectives,
            self.cfg.serving.num_speculative_tokens,
        )
        tracker.start_parent(self.study, self._parent_params(), software_versions(), self.config_text)
        return tracker

    def _parent_params(self) -> dict[str, Any]:
        c = self.cfg
        model = c.as_written()["model"]  # recorded as the TOML wrote them, as before paths resolved at load
        return {
            "target": model["target"],
            "draft": model["draft"],
            "method": c.abliteration.method,
            "rank": c.abliteration.rank,
            "row_normalization": c.abliteration.row_normalization,
            "quantization": c.quantization.scheme,
            "num_speculative_tokens": c.serving.num_speculative_tokens,
            "acceptance_objective": c.search.acceptance_objective,
            "acceptance_sets": ",".join(f"{s.name}:{s.weight}" for s in c.acceptance.sets),
            "sampler": c.search.sampler,
            "methods": ",".join(c.search.methods),
            "seed": c.search.seed,
            "n_trials": c.search.n_trials,
            "storage": redact(storage_url(c)),
        }

    def sync(self, tracker: Tracker) -> None:
        try:
            tracker.sync(self.study, pick_winner(self.cfg, self.study))
        except Exception as e:  # MLflow is a mirror; the next sync repairs it
            self.console.print(f"[yellow]warning: MLflow sync failed ({type(e).__name__}: {e}); will retry[/]")

    def _vanilla(self, pipeline: TrialPipeline, again: bool = False) -> dict[str, float]:
        """The vanilla FP8 model + draft, measured once per study in the same harness (kept in the study), and
        `again` after a failed swap self-check: it was measured on the swapped server too."""
        if not again and (known := records.vanilla(self.study)) is not None:
            return known
        with self.console.status("measuring the vanilla model in the same harness (once per study)"):
            try:
                result = pipeline.run(None, self.run_dir / "vanilla")
            except StageError as e:
                raise StudyError(
                    f"the vanilla model failed at stage {e.stage}: {e.reason} (log: {e.log_path}); "
                    "fix the serving settings before a study can run"
                ) from None
        metrics = result.metrics()
        records.save_vanilla(self.study, metrics, result.per_prompt)
        name = "vanilla (again, on a cold start)" if again else "vanilla"
        self.console.print(
            f"{name}: refusal rate {result.refusal_rate:.3f}, acceptance "
            + "/".join(f"{a:.3f}" for a in result.per_position)
            + f", accepted per step {result.accepted_per_step:.3f} (vLLM's mean accepted "
            + f"{metrics[VLLM_MEAN_ACCEPTED]:.3f})"
        )
        return metrics

    def _optimize_tracked(self, limits: RunLimits, space: SearchSpace, pipeline: TrialPipeline) -> None:
        tracker = self.tracker()
        self.sync(tracker)
        status = "FINISHED"
        try:
            self._optimize(limits, space, pipeline, partial(self.sync, tracker))
        except BaseException:
            status = "KILLED"
            raise
        finally:
            self.sync(tracker)
            try:
                tracker.finish(self.study, status)
            except Exception as e:  # MLflow down at the end: the study's results are in its storage
                self.console.print(
                    f"[yellow]warning: MLflow parent run not ended ({type(e).__name__}: {e}); the next run ends it[/]"
                )

    def _optimize(self, limits: RunLimits, space: SearchSpace, pipeline: TrialPipeline, sync) -> None:
        done = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if done >= limits.n_trials:
            self.console.print(f"the study already has {done} complete trials (target {limits.n_trials})")
            return
        c = self.cfg
        monitor = StudyMonitor(
            self.study, self.console, self.objectives, limits, c.retention, c.serving.num_speculative_tokens, sync
        )
        objective = partial(self._objective, space, pipeline, monitor)
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            with monitor.progress:
                self.study.optimize(objective, callbacks=[monitor], catch=(StageError,), gc_after_trial=False)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if monitor.too_many_failures:
            raise StudyError(
                f"{monitor.failures} trials failed in a row (see `mtp-abliterate study status` and the trial logs); "
                "fix the cause and run the same command to resume"
            )

    def _objective(
        self, space: SearchSpace, pipeline: TrialPipeline, monitor: StudyMonitor, trial: optuna.Trial
    ) -> list[float]:
        params = space.suggest(trial)
        trial_dir = self.run_dir / "trials" / f"{trial.number:04d}"
        log = records.TrialLog(trial)
        log.started(self.host, self.pid, trial_dir)

        def on_stage(stage: str) -> None:
            log.stage(stage)
            monitor.stage(trial.number, stage)

        try:
            require_free_space(self.run_dir, self.cfg.retention.min_free_gb)
            result = pipeline.run(
                params,
                trial_dir,
                on_stage,
                on_server=log.server,
                keep_candidate=self.cfg.retention.keep != "none",
                swap_check=self.swap_check_pending,
                front=[
                    (t.values, records.TrialRecord.of(t).per_prompt)
                    for t in pareto_front(self.study.get_trials(deepcopy=False), self.objectives)
                ],
            )
            if result.swap_check is not None:
                self._swap_verdict(trial.number, result.swap_check, pipeline, monitor.console)
        except StageError as e:
            log.failed(e.stage, e.reason, e.log_path)
            raise
        except (KeyboardInterrupt, DiskFullError) as e:
            log.interrupted("interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else str(e))
            # Re-queued every time (a killed trial is re-queued once, as it may be what kills the process): neither
            # the user's Ctrl-C nor a full disk is the trial's fault, and a retry interrupted again is not dropped.
            records.requeue(self.study, trial)
            raise
        return self._record(trial, log, trial_dir, result)

    def _swap_verdict(self, number: int, check: dict[str, Any], pipeline: TrialPipeline, console: Console) -> None:
        """Keep the self-check's verdict in the study (a resumed run reuses it) and fall back to cold starts when
        swapping did not reproduce a cold start."""
        self.swap_check_pending = False
        records.save_swap_check(
            self.study, self.host, {**check, "trial": number, "key": swap_key(self.cfg, pipeline.base)}
        )
        if check["passed"]:
            console.print(f"swap self-check passed on trial {number}: {check['rule']}")
            return
        console.print(
            f"[yellow]swap self-check FAILED on trial {number}: swapped and cold-start measurements differ in "
            f"{', '.join(check['differences'][:4])} ({check['rule']}); this vLLM's in-place reload is not trusted: "
            "cold starts from now on (trial values come from the cold start)[/]"
        )
        pipeline.use_cold_starts()
        self._vanilla(pipeline, again=True)  # its figures came from the same swapped server

    def _record(self, trial: optuna.Trial, log: records.TrialLog, trial_dir: Path, result: TrialResult) -> list[float]:
        metrics = result.metrics()
        # An objective the decision did not need (result.not_measured says why) goes to Optuna as its worst value:
        # the trial is infeasible or dominated either way, and the sampler learns from where it is.
        values = [o.recorded(metrics) for o in self.objectives]
        constraints = constraint_values(self.cfg, values[0], values[1], result.invalid_reason is None)
        records.set_constraints(trial, constraints)
        log.scored(
            {
                "metrics": metrics,
                "per_prompt": result.per_prompt or None,
                "adapter_digest": result.adapter_digest,
                "merged_digest": result.merged_digest,
                "module_io_key": self.resident.io_key,
                "versions": software_versions(),
                "candidate": result.candidate,
                "serving_mode": result.serving_mode,
                "fingerprint": result.fingerprint,
                "constraints": constraints,
                "feasible": all(c <= 0 for c in constraints),
                "invalid_reason": result.invalid_reason,
                "not_measured": result.not_measured,
            }
        )
        result_file = {
            "trial": trial.number,
            "params": trial.params,
            "metrics": metrics,
            "adapter_digest": result.adapter_digest,
            "acceptance": result.acceptance,
            "refusal_samples": result.refusal_samples,
        }
        (trial_dir / "result.json").write_text(json.dumps(result_file, indent=2, default=str))
        return values


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a polite kill (systemd, timeout) cleans up like Ctrl-C
