"""The study's after-trial callback: progress display, MLflow sync, checkpoint retention and the stop rules.

An Optuna callback class (Optuna's own `MaxTrialsCallback` is the model): `study.optimize(..., callbacks=[monitor])`
calls it after every finished trial, and the objective reports the running stage through `stage`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from mtp_abliterate.objectives.base import ObjectiveSpec
from mtp_abliterate.objectives.registry import BUILT_INS
from mtp_abliterate.search.config import Retention
from mtp_abliterate.search.metrics import CI95, KLD, NUM_PROMPTS, REFUSAL_RATE, TRIAL_S, per_position
from mtp_abliterate.search.study.limits import RunLimits
from mtp_abliterate.search.study.pareto import pareto_front
from mtp_abliterate.search.study.records import TrialRecord, records
from mtp_abliterate.search.study.retention import apply_retention


class StudyMonitor:
    """Shows and stops the study. `sync`: mirrors the storage to MLflow (failures are warnings: the next sync
    repairs them); `positions`: the draft positions printed per trial."""

    def __init__(
        self,
        study: optuna.Study,
        console: Console,
        objectives: list[ObjectiveSpec],
        limits: RunLimits,
        retention: Retention,
        positions: int,
        sync: Callable[[], None],
    ) -> None:
        self.objectives, self.limits, self.retention = objectives, limits, retention
        self.positions, self.sync = positions, sync
        complete = records(study, TrialState.COMPLETE)
        self.durations = [r.metrics[TRIAL_S] for r in complete if TRIAL_S in r.metrics]
        self.failures = 0  # in a row
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("done ≈ {task.fields[eta]}"),
            TextColumn("{task.fields[stage]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("trials", total=limits.n_trials, completed=len(complete), eta="?", stage="")

    @property
    def console(self) -> Console:
        return self.progress.console

    @property
    def too_many_failures(self) -> bool:
        return self.failures >= self.limits.max_consecutive_failures

    def stage(self, number: int, stage: str) -> None:
        self.progress.update(self.task, description=f"trial {number}", stage=stage)

    def __call__(self, study: optuna.Study, t: FrozenTrial) -> None:
        self.sync()
        r = TrialRecord.of(t)
        if r.complete:  # a bad candidate too: recorded, not a failure of the setup
            self.failures = 0
            self.durations.append(r.metrics[TRIAL_S])
            self.console.print(self._line(r))
            if r.invalid_reason:
                self.console.print(f"[yellow]  infeasible, a bad candidate: {r.invalid_reason[:300]}[/]")
            if r.not_measured:
                self.console.print(f"  {r.not_measured}")
        else:
            self.failures += 1
            self.console.print(
                f"[red]trial {r.number} failed at {r.failed_stage or '?'}: {(r.fail_reason or '')[:300]}[/] "
                f"(log: {r.log_path})"
            )
        trials = study.get_trials(deepcopy=False)
        front = pareto_front(trials, self.objectives)
        apply_retention(trials, front, self.retention)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        self.progress.update(self.task, completed=complete, eta=self._eta(complete), stage=self._front(front))
        if self._should_stop(complete):
            study.stop()

    def _line(self, r: TrialRecord) -> str:
        m, scalar = r.metrics, self.objectives[2].name
        refusal = f"{m[REFUSAL_RATE]:.3f}" if REFUSAL_RATE in m else "-"
        if scalar in m:
            acc = "/".join(f"{a:.2f}" for a in per_position(m, self.positions))
            ci = f" ± {m[CI95]:.3f}" if CI95 in m else ""
            served = ", ".join(f"{m[k]:.0f}" for k in m if k.endswith("." + NUM_PROMPTS))
            measured = f"{scalar} {m[scalar]:.3f}{ci}  acc {acc}  prompts {served}"
        else:
            measured = f"{scalar} -"
        for o in self.objectives[BUILT_INS:]:
            measured += f"  {o.header} {m[o.name]:{o.fmt}}" if o.name in m else f"  {o.header} -"
        return f"trial {r.number}: refusal {refusal}  KL {m[KLD]:.4f}  {measured}  ({m[TRIAL_S]:.0f} s)"

    def _front(self, front: list[FrozenTrial]) -> str:
        if not front:
            return "Pareto front: 0"
        top = max(t.values[2] for t in front)
        return (
            f"Pareto front: {len(front)} · best {self.objectives[2].name} {top:.3f} · "
            f"min refusal {min(t.values[0] for t in front):.2f}"
        )

    def _eta(self, complete: int) -> str:
        if not self.durations:
            return "?"
        left = self.limits.n_trials - complete
        return time.strftime("%H:%M", time.localtime(time.time() + left * statistics.median(self.durations)))

    def _should_stop(self, complete: int) -> bool:
        if complete >= self.limits.n_trials or self.too_many_failures:
            return True
        deadline = self.limits.deadline
        if deadline and self.durations and time.time() + statistics.median(self.durations) > deadline:
            self.console.print("stopping: the next trial would not finish before the deadline")
            return True
        return False
