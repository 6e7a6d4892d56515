"""MLflow tracking of a study: one experiment per study, a parent run, one nested child run per finished trial.

The Optuna storage is the source of truth; `sync` makes MLflow agree with it (a trial finished by a process that
was killed before it could log is logged on the next start), marks which trials are on the Pareto front, and
refreshes the parent run's artifacts: an interactive Pareto plot (HTML), a PNG, the Pareto set as CSV and the
hypervolume history. Default store: a SQLite database under runs/, no server needed.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import mlflow
import optuna
import sqlalchemy
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from mtp_abliterate.objectives.base import ObjectiveSpec
from mtp_abliterate.search.credentials import redact_text
from mtp_abliterate.search.errors import UserError
from mtp_abliterate.search.metrics import AGGREGATE_TOK_S, TRIAL_S, acc_pos
from mtp_abliterate.search.study.pareto import hypervolume_history, pareto_front, reference_points
from mtp_abliterate.search.study.records import TrialRecord, measured_in_full, mlflow_parent, set_mlflow_parent
from mtp_abliterate.search.study.storage import redact
from mtp_abliterate.search.study.winner import Winner

TRIAL_TAG = "mtp_abliterate.trial_number"
# MLflow's HTTP retries while a tracking server is down (its defaults: 7 retries, ~4 minutes per call)
SERVER_DOWN_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be reached; the one-line message names the fix."""


def served(uri: str) -> bool:
    """Whether `uri` is an MLflow tracking server (it keeps the artifacts) rather than a store written directly."""
    return uri.startswith(("http://", "https://"))


def check_tracking(uri: str) -> None:
    """Reach the MLflow store now, before any model loads (a study would otherwise find out after its vanilla
    measurement). Raises TrackingError."""
    if served(uri):
        try:
            httpx.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except httpx.HTTPError as e:
            raise TrackingError(
                f"cannot reach the MLflow tracking server {redact(uri)} ({type(e).__name__}: "
                f'{redact_text(str(e))}); start it (`mlflow server`, README "Several machines") or fix '
                "tracking.mlflow_uri"
            ) from None
        _check_credentials(uri)
    elif not uri.startswith(("sqlite:", "file:")) and "://" in uri:  # a database MLflow writes directly
        try:
            engine = sqlalchemy.create_engine(uri)
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()  # the study's MLflow client opens its own
        except ImportError:
            raise TrackingError(
                f"tracking.mlflow_uri {redact(uri)}: its database driver is not installed; "
                "run `pip install 'mtp-abliterate[distributed]'`"
            ) from None
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise TrackingError(
                f"cannot reach the MLflow store {redact(uri)} ({str(e).strip().splitlines()[0]}); start the database "
                "or fix tracking.mlflow_uri"
            ) from None


def _check_credentials(uri: str) -> None:
    """A server with MLflow's basic-auth app answers /health to anyone and the API only with credentials: ask the
    API now, as the study's client will (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from the environment,
    which MlflowClient reads itself), so that missing or wrong ones fail before the model loads."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    try:
        answer = httpx.get(
            uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=(user, password or "") if user else None,
            timeout=30,
        )
    except httpx.HTTPError:
        return  # reached a moment ago: the study's own client reports what follows
    if answer.status_code in (401, 403):
        given = "were refused" if user else "are not set"
        raise TrackingError(
            f"the MLflow tracking server {redact(uri)} requires authentication (HTTP {answer.status_code}) and the "
            f'credentials {given}; export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (README "Several '
            'machines")'
        )


class Tracker:
    """Writes a study to MLflow; knows the objectives' names and directions, not how they were measured."""

    def __init__(
        self, uri: str, experiment: str, artifact_dir: Path | None, objectives: list[ObjectiveSpec], positions: int
    ) -> None:
        """`artifact_dir`: where a new experiment keeps artifacts (None: the tracking server decides);
        `positions`: the draft positions measured (num_speculative_tokens)."""
        if served(uri):  # MLflow is a mirror: a call to a server that is down gives up after seconds (MLflow's own
            # default retries for ~4 minutes per call), and the next sync catches up; the user's settings win
            for name, value in SERVER_DOWN_RETRIES.items():
                os.environ.setdefault(name, value)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.objectives = objectives
        self.positions = positions
        self.experiment_id = self._experiment(experiment, artifact_dir)
        self.parent_id: str | None = None
        self._created: str | None = None  # the parent run this process created, until another's is adopted
        self._unfinished: set[str] = set()  # child runs whose logging an MLflow outage cut short: re-logged

    def _experiment(self, name: str, artifact_dir: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if artifact_dir is not None:
            artifact_dir.mkdir(parents=True, exist_ok=True)
            location = artifact_dir.absolute().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # another process of the study created it a moment ago
            if (found := self.client.get_experiment_by_name(name)) is None:
                raise
            return found.experiment_id

    def _active(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except mlflow.exceptions.MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise  # MLflow unreachable: never taken for "no parent run" (that would start a second one)
            return False  # a different MLflow store than last time

    def start_parent(
        self, study: optuna.Study, params: dict[str, Any], versions: dict[str, str], config_text: str
    ) -> str:
        """The study's parent run: the one recorded in the Optuna study (a resumed study, or another process of
        it), else created and recorded."""
        run_id = mlflow_parent(study)
        if run_id and self._active(run_id):
            self.parent_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=study.study_name, tags={"kind": "study"})
        self.parent_id = self._created = run.info.run_id
        set_mlflow_parent(study, self.parent_id)
        self.client.log_batch(
            self.parent_id,
            params=[Param(k, redact_text(str(v))[:6000]) for k, v in params.items()],
            tags=[RunTag(f"version.{k}", v) for k, v in versions.items()],
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.toml"
            path.write_text(redact_text(config_text))
            self.client.log_artifact(self.parent_id, str(path))
        self._follow_parent(study)
        return self.parent_id

    def _follow_parent(self, study: optuna.Study) -> None:
        """Two processes that start a study at the same moment each create a parent run; the storage keeps the one
        recorded last, and every process follows it: the other creator deletes its own (and any child logged
        under it, logged again under the survivor by the next sync). One parent whatever the timing."""
        current = mlflow_parent(study)
        if current is None or current == self.parent_id or not self._active(current):
            return
        mine, self.parent_id = self.parent_id, current
        if mine is not None and mine == self._created:
            self._created = None
            for run in self._children(mine):
                self._delete(run.info.run_id)
            self._delete(mine)

    def _delete(self, run_id: str) -> None:
        try:
            self.client.delete_run(run_id)
        except mlflow.exceptions.MlflowException:
            pass  # deleted a moment ago by another process

    def _log_reference_points(self, marks: dict[str, dict[str, float]]) -> None:
        """Vanilla and `study reference` points, as `<name>.*` metrics of the parent run."""
        metrics = [_metric(f"{name}.{k}", v) for name, m in marks.items() for k, v in m.items() if _finite(v)]
        for i in range(0, len(metrics), 900):  # MLflow's batch limit is 1000 metrics
            self.client.log_batch(self.parent_id, metrics=metrics[i : i + 900])

    def finish(self, study: optuna.Study, status: str = "FINISHED") -> None:
        """End the parent run, unless another process of the study is still running a trial: the last one to stop
        ends it."""
        if not self.parent_id:
            return
        fail_stale_trials(study)  # a trial of a dead host must not keep the run open
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        self.client.set_terminated(self.parent_id, status=status)

    def _children(self, parent_id: str) -> list[Run]:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50000
        )

    def _logged_trials(self) -> dict[int, str]:
        """Trial number -> its child run. A trial two processes logged at the same moment keeps one run, the same
        one whichever process looks (the smallest id); the others are deleted."""
        by_trial: dict[int, list[str]] = defaultdict(list)
        for r in self._children(self.parent_id):
            if TRIAL_TAG in r.data.tags:
                by_trial[int(r.data.tags[TRIAL_TAG])].append(r.info.run_id)
        logged = {}
        for number, ids in by_trial.items():
            keep, *extra = sorted(ids)
            for run_id in extra:
                self._delete(run_id)
            logged[number] = keep
        return logged

    def sync(self, study: optuna.Study, winner: Winner | None = None) -> list[FrozenTrial]:
        """Follow the study's parent run, log every finished trial not yet in MLflow (whichever process ran it),
        retag the Pareto front, refresh the parent's artifacts, mark the named winner. Returns the Pareto front.
        Raises TrackingError at once when the tracking server does not answer (the next sync catches up)."""
        if served(self.uri):
            try:
                httpx.get(self.uri.rstrip("/") + "/health", timeout=10).raise_for_status()
            except httpx.HTTPError as e:
                what = f"the MLflow server {redact(self.uri)} does not answer ({type(e).__name__})"
                raise TrackingError(what) from None
        for run_id in list(self._unfinished):  # a child run an outage cut short: logged again below
            try:
                self.client.delete_run(run_id)
            except mlflow.exceptions.MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            self._unfinished.discard(run_id)
        self._follow_parent(study)
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
        if winner is not None:
            self._log_winner(winner)
        return front

    def _log_winner(self, w: Winner) -> None:
        """The parent run's `winner_trial` tag and `winner.*` metrics: the trial `export --trial best` exports."""
        self.client.set_tag(self.parent_id, "winner_trial", str(w.record.number))
        metrics = {f"winner.{k}": v for k, v in w.record.metrics.items() if "." not in k and _finite(v)}
        if w.vs_vanilla is not None:
            metrics |= {"winner.vs_vanilla": w.vs_vanilla.difference, "winner.vs_vanilla_ci95": w.vs_vanilla.halfwidth}
        if w.vs_runner_up is not None:
            metrics |= {
                "winner.vs_runner_up": w.vs_runner_up.difference,
                "winner.vs_runner_up_ci95": w.vs_runner_up.halfwidth,
            }
        self.client.log_batch(self.parent_id, metrics=[_metric(k, v) for k, v in metrics.items()])

    def _log_trial(self, t: FrozenTrial) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{t.number:04d}",
            tags={"mlflow.parentRunId": self.parent_id, TRIAL_TAG: str(t.number), "state": t.state.name.lower()},
            start_time=int(t.datetime_start.timestamp() * 1000) if t.datetime_start else None,
        )
        run_id = run.info.run_id
        self._unfinished.add(run_id)
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
            "host": r.host,
        }
        self.client.log_batch(
            run_id,
            metrics=[_metric(k, v) for k, v in r.metrics.items() if _finite(v)],
            params=[Param(k, str(v)) for k, v in t.params.items()],
            tags=[RunTag(k, redact_text(str(v))[:5000]) for k, v in tags.items() if v is not None],
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
        self._unfinished.discard(run_id)
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


def log_draft_tune(
    uri: str,
    experiment: str,
    parent_id: str | None,
    number: int,
    metrics: dict[str, float],
    params: dict[str, Any],
    files: list[Path],
    draft_dir: Path,
    start_time: float,
) -> str:
    """A draft-tune of trial `number` (started at `start_time`, epoch seconds) as a child run of that trial's run (no
    trial tag: the study's trial runs stay one per trial); the tuned draft's files under `draft/`. Returns the run
    id; raises TrackingError when the trial has no run yet."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    trial_runs = (
        []
        if found is None or parent_id is None
        else client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{number}'",
        )
    )
    if not trial_runs:
        raise TrackingError(
            f"trial {number} has no MLflow run in {redact(uri)}; `mtp-abliterate study run` syncs MLflow with the study"
        )
    trial_run = min(r.info.run_id for r in trial_runs)
    run = client.create_run(
        found.experiment_id,
        run_name=f"trial-{number:04d}-draft-tune",
        tags={"mlflow.parentRunId": trial_run, "kind": "draft-tune", "draft_tune_of": str(number)},
        start_time=int(start_time * 1000),
    )
    run_id = run.info.run_id
    client.log_batch(
        run_id,
        metrics=[_metric(k, v) for k, v in metrics.items() if _finite(v)],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    for f in files:
        client.log_artifact(run_id, str(f))
    client.log_artifacts(run_id, str(draft_dir), "draft")
    client.set_terminated(run_id, status="FINISHED")
    return run_id
