"""Fault matrix, the rows of the study's stores and files (docs/reliability.md), each on the real component: a real
PostgreSQL restarted under a study's storage, a real `mlflow server` gone for a while under the study's tracker, the
FP8 base build killed with SIGKILL half-way through a file, and a corrupted FP8 base file found on resume. The study
calls are the product's own (open_storage/open_study, StudyRunner.sync, Tracker, fp8_base/prepare_base); the trials
are cheap stand-ins where the point is the store, not the measurement.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search.candidate.fp8_base import KEY_FILE, prepare_base
from mtp_abliterate.search.metrics import ACCEPTED_PER_STEP, KLD, REFUSAL_RATE
from mtp_abliterate.search.study.runner import StudyRunner
from mtp_abliterate.search.study.storage import open_storage, open_study
from mtp_abliterate.search.study.tracking import SERVER_DOWN_RETRIES, TRIAL_TAG, Tracker
from tests.conftest import ORGANISM_CONFIG, REPO
from tests.services import MlflowServer, Postgres


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400, color_system=None, soft_wrap=True), out


# --- PostgreSQL restarted during trials --------------------------------------------------------------------------


def test_postgresql_restarted_during_trials_loses_and_duplicates_no_trial(tmp_path: Path) -> None:
    pg = Postgres(("optuna",))
    try:
        storage_cfg = ORGANISM_CONFIG.storage.model_copy(
            update={"optuna_url": pg.url("optuna"), "heartbeat_s": 1, "grace_s": 60}
        )
        cfg = ORGANISM_CONFIG.model_copy(update={"name": "restarts", "runs_dir": str(tmp_path), "storage": storage_cfg})
        study, _ = open_study(cfg, open_storage(cfg))
        outages: list[float] = []

        def restart_in(seconds: float) -> threading.Thread:
            t0 = time.monotonic()
            pg.stop_server()  # fast shutdown: every client connection is cut, as a restart or an upgrade does
            thread = threading.Timer(seconds, lambda: (pg.start_server(), outages.append(time.monotonic() - t0)))
            thread.start()
            return thread

        def objective(trial: optuna.Trial) -> tuple[float, float, float]:
            x = trial.suggest_float("x", 0.0, 1.0)
            trial.set_user_attr("started", True)
            if trial.number == 1:  # down mid-trial: the trial's next write waits for the database (heartbeats too)
                restart = restart_in(4.0)
                trial.set_user_attr("written_while_down", True)
                restart.join()
            elif trial.number == 2:  # restarted between two writes: every pooled connection is dead
                pg.stop_server()
                pg.start_server()
                trial.set_user_attr("after_restart", True)
            elif trial.number == 3:  # down when the trial ends: its result waits for the database
                restart_in(4.0)
            return x, x / 2, 1.0 - x

        study.optimize(objective, n_trials=5)
        assert len(outages) == 2 and min(outages) >= 4.0  # the database really was down that long

        # What a fresh process reads from the database: every trial once, complete, with what it wrote.
        fresh = optuna.load_study(study_name="restarts", storage=open_storage(cfg))
        trials = fresh.get_trials(deepcopy=False)
        assert [t.number for t in trials] == [0, 1, 2, 3, 4]
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
        assert all(t.user_attrs["started"] for t in trials)
        assert trials[1].user_attrs["written_while_down"] and trials[2].user_attrs["after_restart"]
        for t in trials:
            x = t.params["x"]
            assert t.values == [x, x / 2, 1.0 - x]
    finally:
        pg.stop()


# --- MLflow server down for a while ------------------------------------------------------------------------------


def _trial(study: optuna.Study, x: float) -> None:
    """A complete trial as the study records it (objectives, metrics, host), added to the storage."""
    metrics = {REFUSAL_RATE: x, KLD: x / 2, ACCEPTED_PER_STEP: 2.0 - x}
    study.add_trial(
        create_trial(
            params={"x": x},
            distributions={"x": FloatDistribution(0.0, 1.0)},
            values=[x, x / 2, 2.0 - x],
            user_attrs={"metrics": metrics, "host": "here", "constraints": [x - 0.5, -1.0, 0.0]},
        )
    )


def test_mlflow_down_for_a_while_trials_go_on_and_mlflow_catches_up_with_one_parent_run(
    tmp_path: Path, monkeypatch
) -> None:
    for name in SERVER_DOWN_RETRIES:  # the tracker's defaults, removed again after the test
        monkeypatch.delenv(name, raising=False)
    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = MlflowServer(backend, tmp_path / "artifacts", tmp_path / "mlflow.log")
    try:
        study = optuna.create_study(
            study_name="mlflow-down",
            storage=f"sqlite:///{tmp_path / 'optuna.db'}",
            directions=["minimize", "minimize", "maximize"],
        )
        console, out = _console()
        runner = SimpleNamespace(cfg=ORGANISM_CONFIG, study=study, console=console)
        tracker = Tracker(server.uri, "mlflow-down", None, objective_specs(ORGANISM_CONFIG), 4)
        parent = tracker.start_parent(study, {"n_trials": 6}, {"torch": "test"}, 'name = "mlflow-down"\n')
        _trial(study, 0.1)
        StudyRunner.sync(runner, tracker)
        assert out.getvalue() == ""  # a sync that works says nothing

        # The server dies in the middle of a sync, while it logs trial 1's child run...
        _trial(study, 0.2)
        log_batch, died = tracker.client.log_batch, []

        def dies_while_logging(run_id, *args, **kwargs):
            if run_id != tracker.parent_id and not died:
                died.append(run_id)
                server.stop()
            return log_batch(run_id, *args, **kwargs)

        monkeypatch.setattr(tracker.client, "log_batch", dies_while_logging)
        StudyRunner.sync(runner, tracker)
        # ...and stays down while two more trials finish: each sync gives up within seconds, in one line.
        for x in (0.3, 0.4):
            _trial(study, x)
            t0 = time.monotonic()
            StudyRunner.sync(runner, tracker)
            assert time.monotonic() - t0 < 30
        warnings = out.getvalue().splitlines()
        assert len(warnings) == 3 and all(w.startswith("warning: MLflow sync failed (") for w in warnings)
        assert all(w.endswith("; will retry") for w in warnings)
        assert "does not answer" in warnings[2]

        # The server returns (same store, same address): the next sync logs what it missed, once each.
        server = MlflowServer(backend, tmp_path / "artifacts", tmp_path / "mlflow.log", port=server.port)
        StudyRunner.sync(runner, tracker)
        tracker.finish(study)
        assert len(died) == 1 and len(out.getvalue().splitlines()) == 3  # no new warning
        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("mlflow-down").experiment_id
        parents = client.search_runs([experiment], filter_string="tags.kind = 'study'")
        assert [r.info.run_id for r in parents] == [parent] and parents[0].info.status == "FINISHED"
        children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        by_trial = sorted((int(r.data.tags[TRIAL_TAG]), r) for r in children)
        assert [n for n, _ in by_trial] == [0, 1, 2, 3]  # each trial once: the child cut short was replaced
        for n, run in by_trial:
            assert run.info.status == "FINISHED"
            assert run.data.metrics[KLD] == study.trials[n].values[1]
    finally:
        server.stop()


# --- the FP8 base: killed while written, corrupted on resume -------------------------------------------------------

KILLED_BUILD = """
import json, sys, time
from pathlib import Path
from mtp_abliterate.search.candidate import fp8_base, quantize

args = json.loads(sys.argv[1])
real, written = quantize.save_file, []


def save_file(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    written.append(path)
    if len(written) == 3:  # the third file half on disk, then wait for the kill
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        print("half-written", flush=True)
        time.sleep(600)


quantize.save_file = save_file
fp8_base.prepare_base(Path(args["source"]), Path(args["base"]), args["ignore"], args["editable"], args["key"])
print("finished", flush=True)
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_sigkill_while_the_fp8_base_is_written_leaves_nothing_reusable_and_the_next_start_rebuilds_it(
    resident, tmp_path: Path
) -> None:
    args = {
        "source": str(resident.local_dir()),
        "base": str(tmp_path / "fp8-base"),
        "ignore": ORGANISM_CONFIG.quantization.ignore,
        "editable": [f"{n}.weight" for n in resident.abliterator.module_names.values()],
        "key": "organism-base",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, json.dumps(args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        lines = iter(proc.stdout.readline, "")  # llm-compressor logs to stdout too
        assert "half-written" in (line.strip() for line in lines)
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    base, staging = tmp_path / "fp8-base", tmp_path / "fp8-base.staging"
    assert not base.exists() and staging.is_dir()  # what the kill left: a half-built staging folder only
    assert not (staging / KEY_FILE).exists()

    said: list[str] = []
    rebuilt = prepare_base(Path(args["source"]), base, args["ignore"], args["editable"], args["key"], said.append)
    assert rebuilt == base and not staging.exists() and said == []  # nothing to reuse: built, not "repaired"
    reference = prepare_base(
        Path(args["source"]), tmp_path / "reference", args["ignore"], args["editable"], args["key"]
    )
    assert _files(rebuilt) == _files(reference)  # byte for byte what an uninterrupted build writes


def test_a_corrupted_fp8_base_file_is_found_by_its_hash_named_in_one_line_and_rebuilt_before_serving(
    resident, tmp_path: Path
) -> None:
    console, out = _console()
    study = SimpleNamespace(cfg=ORGANISM_CONFIG, resident=resident, run_dir=tmp_path, console=console)
    base = StudyRunner._fp8_base(study)  # the study's start (and every resume), before its server starts
    intact = _files(base)
    assert set(json.loads(intact[KEY_FILE])["files"]) == set(intact) - {KEY_FILE}

    # A resume that finds the base intact reuses it without a word (and without rewriting it).
    stamp = (base / KEY_FILE).stat().st_mtime_ns
    assert StudyRunner._fp8_base(study) == base and out.getvalue() == ""
    assert (base / KEY_FILE).stat().st_mtime_ns == stamp

    # One flipped bit in a matrix (safetensors would load it as it is), then a missing shard.
    victim = sorted(base.glob("edit-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    assert StudyRunner._fp8_base(study) == base
    shard = sorted(base.glob("base-*.safetensors"))[0]
    shard.unlink()
    assert StudyRunner._fp8_base(study) == base
    assert out.getvalue().splitlines() == [
        f"FP8 base {base}: {victim.name} does not match its recorded sha256 (corrupted); rebuilding it",
        f"FP8 base {base}: {shard.name} is missing; rebuilding it",
    ]
    rebuilt = _files(base)
    assert {k: v for k, v in rebuilt.items() if k != KEY_FILE} == {k: v for k, v in intact.items() if k != KEY_FILE}
