"""Credentials: store URLs expand `${VAR}` from the environment, passwords are removed from what the tool writes and
prints (`config check` warns of one in the TOML), and an MLflow tracking server running MLflow's basic-auth app is
reached with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from the environment, as README "Several machines"
sets it up. (A whole study with the database password in its TOML: tests/test_distributed.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import optuna
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from mtp_abliterate.objectives.registry import objective_specs
from mtp_abliterate.search.cli import app
from mtp_abliterate.search.config import ConfigError, load_config
from mtp_abliterate.search.credentials import redact, redact_text, scrub
from mtp_abliterate.search.study.storage import write_pointer
from mtp_abliterate.search.study.tracking import Tracker, TrackingError, check_tracking
from tests.conftest import ORGANISM_TOML, write_study_config
from tests.services import MlflowServer

ADMIN_PASSWORD = "admin-password-for-tests"  # MLflow wants 12 characters or more
DB_SECRET = "db-secret-in-the-toml"
ENV_SECRET = "db-secret-from-the-env"


def test_urls_lose_their_password_and_keep_a_variable_reference() -> None:
    assert redact("postgresql://postgres:p%40ss@db:5432/optuna") == "postgresql://postgres@db:5432/optuna"
    assert redact("http://spark-1:5000") == "http://spark-1:5000"
    toml = 'optuna_url = "postgresql://u:${PGPASSWORD}@h/o"\nmlflow_uri = "postgresql+psycopg://u:pw:x@h/m"  # c\n'
    assert redact_text(toml) == (
        'optuna_url = "postgresql://u:${PGPASSWORD}@h/o"\nmlflow_uri = "postgresql+psycopg://u@h/m"  # c\n'
    )


def test_a_config_expands_its_store_urls_from_the_environment_and_writes_them_without_passwords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_study_config(
        ORGANISM_TOML,
        tmp_path / "study.toml",
        runs_dir=tmp_path / "runs",
        storage={"optuna_url": "postgresql://postgres:${MTP_TEST_DB_PASSWORD}@db-host:5432/optuna"},
        tracking={"mlflow_uri": f"postgresql://mlflow:{DB_SECRET}@db-host/mlflow"},
    )
    monkeypatch.delenv("MTP_TEST_DB_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match=r"storage.optuna_url: \$\{MTP_TEST_DB_PASSWORD\} is not set"):
        load_config(config, check_paths=False)
    monkeypatch.setenv("MTP_TEST_DB_PASSWORD", ENV_SECRET)
    cfg = load_config(config, check_paths=False)
    assert cfg.storage.optuna_url == f"postgresql://postgres:{ENV_SECRET}@db-host:5432/optuna"
    assert cfg.password_fields == ("tracking.mlflow_uri",)  # the one written in the file

    run_dir = tmp_path / "runs" / cfg.name
    run_dir.mkdir(parents=True)
    write_pointer(cfg, config, config.read_text())
    copy, pointer = (run_dir / "config.toml").read_text(), (run_dir / "study.json").read_text()
    for text in (copy, pointer):
        assert DB_SECRET not in text and ENV_SECRET not in text
    assert "${MTP_TEST_DB_PASSWORD}" in copy  # the copy still says where the password comes from
    assert json.loads(pointer)["storage"] == "postgresql+psycopg://postgres@db-host:5432/optuna"

    result = CliRunner().invoke(app, ["config", "check", str(config), "--no-paths"])
    assert result.exit_code == 0, result.output
    assert DB_SECRET not in result.output and ENV_SECRET not in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "tracking.mlflow_uri holds a password" in warnings[0]
    assert "${PGPASSWORD}" in warnings[0] and "~/.pgpass" in warnings[0]
    assert scrub(f"a message with {DB_SECRET} in it") == "a message with *** in it"  # the console's last guard


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth`: the user store in its own SQLite file, the admin's password from the
    environment (README "Several machines")."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    ini = tmp / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp / 'users.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-tests",  # the app's CSRF protection needs a fixed key
    }
    server = MlflowServer(f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts", tmp / "server.log", auth=env)
    yield server
    server.stop()


def test_a_tracking_server_with_basic_auth_is_reached_with_the_credentials_of_the_environment(
    auth_server: MlflowServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    uri = auth_server.uri
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(api, timeout=30).status_code == 401  # the API needs credentials ...
    assert httpx.get(f"{uri}/health", timeout=30).status_code == 200  # ... /health does not

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(TrackingError, match="requires authentication .* are not set; export MLFLOW_TRACKING_USERNAME"):
        check_tracking(uri)  # before any model loads, not when the first trial is logged
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-admin-password")
    with pytest.raises(TrackingError, match="were refused") as refused:
        check_tracking(uri)
    assert "not-the-admin-password" not in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    check_tracking(uri)

    # The study's tracker logs through the same environment; a password in the config reaches no param or artifact.
    objectives = objective_specs(load_config(ORGANISM_TOML, check_paths=False))
    study = optuna.create_study(directions=[o.direction.value for o in objectives])
    tracker = Tracker(uri, "auth-study", None, objectives, 4)
    url = f"postgresql://postgres:{DB_SECRET}@db-host/optuna"
    parent = tracker.start_parent(study, {"storage": url}, {"mlflow": "3"}, f'optuna_url = "{url}"\n')
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(parent)
    assert run.data.params["storage"] == "postgresql://postgres@db-host/optuna"
    copy = Path(client.download_artifacts(parent, "config.toml", str(tmp_path))).read_text()
    assert copy == 'optuna_url = "postgresql://postgres@db-host/optuna"\n'
