"""The serving stage: a vLLM OpenAI server process for one model, with the vanilla MTP draft.

`VllmServer` is a context manager: it builds the command from the config (the serving environment's python, or the
user's docker command), picks a free loopback port, writes the server log, waits for /health, and on every exit
path (exception, Ctrl-C, timeout) stops the whole process group, so no server outlives it. A start-up failure
raises `ServerError` carrying the log's last lines. `command()` is the dry run.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path

import httpx

from search.config import Serving

LOG_TAIL_LINES = 30


class ServerError(RuntimeError):
    """vLLM could not be started or stopped working; the message names the fix and quotes the log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log)"
    with path.open(errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


class VllmServer:
    """One server for `model` (+ `draft` as MTP drafter when given). Use as `with VllmServer(...) as server:`."""

    def __init__(
        self,
        serving: Serving,
        model: str,
        draft: str | None,
        log_path: Path,
        port: int | None = None,
        served_name: str = "candidate",
        resolve=lambda value: value,
    ) -> None:
        self.serving = serving
        self.model = model
        self.draft = draft
        self.log_path = log_path
        self.port = port
        self.served_name = served_name
        self.resolve = resolve
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def vllm_args(self) -> list[str]:
        args = ["--model", self.model, "--served-model-name", self.served_name]
        if self.draft:
            spec = {"method": "mtp", "model": self.draft, "num_speculative_tokens": self.serving.num_speculative_tokens}
            args += ["--speculative-config", json.dumps(spec)]
        return args + list(self.serving.vllm_args)

    def command(self, port: int | None = None) -> list[str]:
        """The exact command that starts the server (the dry run)."""
        port = port or self.port or 8000
        if self.serving.launcher == "python":
            python = self.resolve(self.serving.python)
            return [
                python,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *self.vllm_args(),
            ]
        # Docker: mount the local checkpoints' common folder (or the HF cache for hub ids) at the same path, and
        # hand serving.env to the container, not to the docker client.
        local = [p for p in (self.model, self.draft) if p and Path(p).is_absolute()]
        hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        models = os.path.commonpath(local) if local else hf_home
        head = shlex.split(
            self.serving.docker_template.format(port=port, models=models, image=self.serving.image, hf_home=hf_home)
        )
        env = [arg for k, v in self.serving.env.items() for arg in ("-e", f"{k}={v}")]
        return head[:2] + env + head[2:] + self.vllm_args()

    def _check_inputs(self) -> None:
        for what, path in (("model", self.model), ("draft", self.draft)):
            if path and (path.startswith(("/", ".")) or Path(path).exists()) and not Path(path).is_dir():
                raise ServerError(f"{what} directory {path} does not exist; build or export it first")
        if self.draft and Path(self.draft).is_dir() and Path(self.model).is_dir():
            body = _text_config(Path(self.model))
            backbone = json.loads((Path(self.draft) / "config.json").read_text()).get("backbone_hidden_size")
            if backbone != body.get("hidden_size"):
                raise ServerError(
                    f"draft {self.draft} was trained for a body of hidden size {backbone}, but {self.model} has "
                    f"{body.get('hidden_size')}; use the draft that belongs to this model"
                )
        if self.serving.launcher == "python" and not Path(self.resolve(self.serving.python)).exists():
            raise ServerError(f"vLLM python {self.resolve(self.serving.python)} not found; run `make vllm-env`")
        if self.port is not None and port_in_use(self.port):
            raise ServerError(f"port {self.port} is already in use; stop what listens there or pick another port")

    def start(self) -> VllmServer:
        self._check_inputs()
        self.port = self.port or free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.serving.env} if self.serving.launcher == "python" else dict(os.environ)
        with self.log_path.open("w") as log:
            log.write("$ " + shlex.join(self.command()) + "\n")
            log.flush()
            # Own process group: stopping it takes vLLM's engine and worker processes along.
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.serving.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"vLLM exited with status {code} during start-up; see {self.log_path}. Last lines:\n"
                    + log_tail(self.log_path)
                )
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerError(
            f"vLLM did not become healthy within {self.serving.startup_timeout_s:.0f} s (serving.startup_timeout_s); "
            f"see {self.log_path}. Last lines:\n" + log_tail(self.log_path)
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace_s`."""
        if self.process is None or self.process.poll() is not None and not _group_alive(self.process.pid):
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.process.pid):
                self.process.poll()
                time.sleep(0.2)
            if not _group_alive(self.process.pid):
                break
        self.process.wait(timeout=5)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _text_config(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    return cfg.get("text_config", cfg)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies, even by SIGKILL, so a killed study leaves no server behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still counts; reap-aware check through /proc where available.
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    return True
