"""MLflow tracking of a study: one experiment per study, a parent run, one nested child run per finished trial.

The Optuna storage is the source of truth; `sync` makes MLflow agree with it (a trial finished by a process that
was killed before it could log is logged on the next start), marks which trials are on the Pareto front, and
refreshes the parent run's artifacts: an interactive Pareto plot (HTML), a PNG, the Pareto set as CSV and the
hypervolume history. Default store: a SQLite database under runs/, no server needed.
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mtp_abliterate.search.metrics import AGGREGATE_TOK_S, TRIAL_S, acc_pos
from mtp_abliterate.search.study.pareto import ObjectiveSpec, hypervolume_history, pareto_front, reference_points
from mtp_abliterate.search.study.records import TrialRecord, measured_in_full, mlflow_parent, set_mlflow_parent

TRIAL_TAG = "mtp_abliterate.trial_number"


class Tracker:
    """Writes a study to MLflow; knows the objectives' names and directions, not how they were measured."""

    def __init__(
        self, uri: str, experiment: str, artifact_dir: Path | None, objectives: list[ObjectiveSpec], positions: int
    ) -> None:
        """`artifact_dir`: where a new experiment keeps artifacts (None: the tracking server decides);
        `positions`: the draft positions measured (num_speculative_tokens)."""
        self.client = MlflowClient(tracking_uri=uri)
        self.objectives = objectives
        self.positions = positions
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if artifact_dir is not None:
                artifact_dir.mkdir(parents=True, exist_ok=True)
                location = artifact_dir.absolute().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.parent_id: str | None = None

    def start_parent(
        self, study: optuna.Study, params: dict[str, Any], versions: dict[str, str], config_text: str
    ) -> str:
        """The study's parent run: reused on resume (its id is kept in the Optuna study), else created."""
        run_id = mlflow_parent(study)
        if run_id:
            try:
                self.client.get_run(run_id)
                self.parent_id = run_id
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except mlflow.exceptions.MlflowException:
                pass  # a different MLflow store than last time: start a new parent
        run = self.client.create_run(self.experiment_id, run_name=study.study_name, tags={"kind": "study"})
        self.parent_id = run.info.run_id
        set_mlflow_parent(study, self.parent_id)
        self.client.log_batch(
            self.parent_id,
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag(f"version.{k}", v) for k, v in versions.items()],
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.toml"
            path.write_text(config_text)
            self.client.log_artifact(self.parent_id, str(path))
        return self.parent_id

    def _log_reference_points(self, marks: dict[str, dict[str, float]]) -> None:
        """Vanilla and `study reference` points, as `<name>.*` metrics of the parent run."""
        metrics = [_metric(f"{name}.{k}", v) for name, m in marks.items() for k, v in m.items() if _finite(v)]
        for i in range(0, len(metrics), 900):  # MLflow's batch limit is 1000 metrics
            self.client.log_batch(self.parent_id, metrics=metrics[i : i + 900])

    def finish(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

    def _logged_trials(self) -> dict[int, str]:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'", max_results=50000
        )
        return {int(r.data.tags[TRIAL_TAG]): r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}

    def sync(self, study: optuna.Study) -> list[FrozenTrial]:
        """Log every finished trial not yet in MLflow, retag the Pareto front, refresh the parent's artifacts.
        Returns the Pareto front."""
        trials = study.get_trials(deepcopy=False)
        logged = self._logged_trials()
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.FAIL) and t.number not in logged:
                logged[t.number] = self._log_trial(t)
        front = pareto_front(trials, self.objectives)
        on_front = {t.number for t in front}
        for t in trials:
            if t.state == TrialState.COMPLETE and t.number in logged:
                self.client.set_tag(logged[t.number], "on_pareto_front", str(t.number in on_front).lower())
        marks = reference_points(study)
        self._log_reference_points(marks)
        self._refresh_artifacts(trials, front, marks)
        return front

    def _log_trial(self, t: FrozenTrial) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{t.number:04d}",
            tags={"mlflow.parentRunId": self.parent_id, TRIAL_TAG: str(t.number), "state": t.state.name.lower()},
            start_time=int(t.datetime_start.timestamp() * 1000) if t.datetime_start else None,
        )
        run_id = run.info.run_id
        r = TrialRecord.of(t)
        tags = {
            "fail_reason": r.fail_reason,
            "failed_stage": r.failed_stage,
            "log_path": r.log_path,
            "adapter_digest": r.adapter_digest,
            "serving": r.serving_mode,
            "invalid_reason": r.invalid_reason,
            "not_measured": r.not_measured,
            "retry_of": r.retry_of,
        }
        self.client.log_batch(
            run_id,
            metrics=[_metric(k, v) for k, v in r.metrics.items() if _finite(v)],
            params=[Param(k, str(v)) for k, v in t.params.items()],
            tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None],
        )
        for name in ("result.json", "server.log"):
            path = (r.trial_dir or Path()) / name
            if r.trial_dir and path.is_file():
                if name == "server.log":  # the tail is what explains a failure; whole logs can be large
                    with tempfile.TemporaryDirectory() as tmp:
                        tail = Path(tmp) / "server_log_tail.txt"
                        tail.write_text("".join(path.read_text(errors="replace").splitlines(True)[-200:]))
                        self.client.log_artifact(run_id, str(tail))
                else:
                    self.client.log_artifact(run_id, str(path))
        end = int(t.datetime_complete.timestamp() * 1000) if t.datetime_complete else None
        self.client.set_terminated(
            run_id, status="FINISHED" if t.state == TrialState.COMPLETE else "FAILED", end_time=end
        )
        return run_id

    def _refresh_artifacts(
        self, trials: list[FrozenTrial], front: list[FrozenTrial], marks: dict[str, dict[str, float]]
    ) -> None:
        from mtp_abliterate.search.study.plots import pareto_html, pareto_png

        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            return
        history = hypervolume_history(complete, self.objectives)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            write_front_csv(out / "pareto.csv", front, self.objectives, self.positions)
            with (out / "hypervolume.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["trial", "hypervolume"])
                writer.writerows(history)
            drawn = [t for t in complete if measured_in_full(t)]  # the others' skipped objectives are placeholders
            pareto_png(out / "pareto.png", drawn, front, self.objectives, marks, history)
            pareto_html(out / "pareto.html", drawn, front, self.objectives, marks)
            self.client.log_artifacts(self.parent_id, str(out))
        if history:
            self.client.log_metric(self.parent_id, "hypervolume", history[-1][1], step=history[-1][0])
        self.client.log_metric(self.parent_id, "pareto_size", len(front), step=complete[-1].number)


def write_front_csv(path: Path, front: list[FrozenTrial], objectives: list[ObjectiveSpec], positions: int) -> None:
    names = sorted({k for t in front for k in t.params})
    metric_names = [*(acc_pos(i) for i in range(positions)), AGGREGATE_TOK_S, TRIAL_S]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *[o.name for o in objectives], *metric_names, *names])
        for t in sorted(front, key=lambda t: t.number):
            m = TrialRecord.of(t).metrics
            writer.writerow(
                [t.number, *t.values, *[m.get(k, "") for k in metric_names], *[t.params.get(n) for n in names]]
            )


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _metric(key: str, value: float) -> Metric:
    return Metric(key, float(value), int(time.time() * 1000), 0)
