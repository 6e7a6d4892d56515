"""`mtp-abliterate ui`: the MLflow UI (and optuna-dashboard) on a study's stores, run until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.credentials import password
from mtp_abliterate.search.errors import UserError
from mtp_abliterate.search.serving.server import port_in_use
from mtp_abliterate.search.study.storage import redact, storage_url, tracking_uri

BIN = Path(sys.executable).parent  # the servers come from the tool's own environment


def store_password(cfg: StudyConfig) -> str | None:
    """The password of the study's stores: it reaches the servers as PGPASSWORD (libpq reads it), never on a command
    line `ps` shows."""
    secret = {password(u) for u in (tracking_uri(cfg), storage_url(cfg)) if password(u)}
    if len(secret) > 1:
        raise UserError(
            "the study's Optuna and MLflow databases have different passwords; keep them in ~/.pgpass instead"
        )
    return secret.pop() if secret else None


def mlflow_command(uri: str, host: str, port: int, workers: int) -> list[str]:
    server = [str(BIN / "mlflow"), "server", "--backend-store-uri", redact(uri)]
    return [*server, "--host", host, "--port", str(port), "--workers", str(workers)]


def dashboard_command(cfg: StudyConfig, host: str, port: int) -> list[str]:
    # wsgiref: optuna-dashboard would pick gunicorn, which MLflow installs
    server = [str(BIN / "optuna-dashboard"), redact(storage_url(cfg)), "--server", "wsgiref"]
    return [*server, "--host", host, "--port", str(port)]


def check_free(ports: dict[str, int]) -> None:
    """Each port (by the option that sets it) is free, or the one-line fix."""
    for option, p in ports.items():
        if port_in_use(p):
            raise UserError(f"port {p} is already in use; pass {option} with a free one")


def supervise(commands: list[list[str]], secret: str | None) -> None:
    """Run the servers until one exits, Ctrl-C or SIGTERM (`kill` or a service manager), then stop them all."""
    # MLflow's job consumers serve its GenAI features, which a study never uses: they would cost ~8 processes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if secret:
        env["PGPASSWORD"] = secret
    procs = [subprocess.Popen(c, env=env) for c in commands]
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
