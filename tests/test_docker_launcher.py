"""The docker launcher as a DGX Spark user gets it, run for real: a `docker` stand-in on PATH (tests/docker_standin)
records the argv and runs the serving venv's vLLM server as the "container" with only the -e environment, refusing
paths no -v mounts. So the real vLLM server starts under the exact command a Spark would get: hub ids resolve from
the mounted HF cache, the port is published on 127.0.0.1 only, and the container is removed on stop, Ctrl-C, a
failed start and (on the next start) after the study process was killed with -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from heretic.utils import Prompt

from mtp_abliterate.objectives.served import chat
from mtp_abliterate.organism.layout import OrganismLayout
from mtp_abliterate.search.config import ConfigError, load_config
from mtp_abliterate.search.serving.launchers import remove_orphan_containers
from mtp_abliterate.search.serving.server import ServerError, VllmServer
from tests.conftest import ORGANISM_CONFIG as ORGANISM
from tests.conftest import ORGANISM_TOML, REPO, write_study_config
from tests.test_release_format import hub_cache

LAYOUT = OrganismLayout()
BODY_ID, DRAFT_ID = "mtp-abliterate/organism-body", "mtp-abliterate/organism-draft"
TEMPLATE = "docker run --rm --ipc host -p 127.0.0.1:{port}:{port} {image} --host 0.0.0.0 --port {port}"


@pytest.fixture
def docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vllm_python: Path) -> Path:
    """The stand-in first on PATH, its state under tmp_path, and an offline HF cache holding the organism."""
    state = tmp_path / "docker"
    monkeypatch.setenv("PATH", f"{REPO / 'tests' / 'docker_standin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_STANDIN_DIR", str(state))
    monkeypatch.setenv("DOCKER_STANDIN_VLLM", str(vllm_python))
    home = tmp_path / "hf-home"
    hub_cache(home, BODY_ID, LAYOUT.body)
    hub_cache(home, DRAFT_ID, LAYOUT.draft)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return state


def _serving(**kw):
    return ORGANISM.serving.model_copy(
        update={"launcher": "docker", "docker_template": TEMPLATE, "image": "vllm-cpu-standin", **kw}
    )


def _calls(state: Path) -> list[list[str]]:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def _containers(state: Path) -> dict[str, int]:
    return {f.stem: json.loads(f.read_text())["pid"] for f in (state / "containers").glob("*.json")}


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by the stand-in client, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_hub_ids_are_served_from_the_mounted_cache_on_loopback_and_ctrl_c_removes_the_container(
    docker: Path, tmp_path: Path
) -> None:
    server = VllmServer(_serving(), BODY_ID, DRAFT_ID, tmp_path / "server.log", label="spark-night")
    with pytest.raises(KeyboardInterrupt), server:
        with httpx.Client(timeout=120) as client:
            reply = chat(client, server.base_url, server.served_name, Prompt(system="", user="Hello!"), 8)
        assert reply.text
        running = _containers(docker)
        assert list(running) == [server.container] and _alive(running[server.container])
        raise KeyboardInterrupt
    run = next(c for c in _calls(docker) if c[0] == "run")
    cache = str((tmp_path / "hf-home" / "hub").absolute())
    assert run[run.index("-p") + 1] == f"127.0.0.1:{server.port}:{server.port}"
    assert f"{cache}:{cache}:ro" in run  # the HF cache, read-only, at the same path
    assert f"HF_HUB_CACHE={cache}" in run and "HF_HUB_OFFLINE=1" in run
    assert run[run.index("--name") + 1].startswith(f"mtp-abliterate-spark-night-{os.getpid()}-")
    assert "mtp-abliterate.study=spark-night" in run
    assert ["rm", "-f", run[run.index("--name") + 1]] in _calls(docker)
    assert _containers(docker) == {} and not _alive(running[run[run.index("--name") + 1]])


def test_a_failed_start_removes_its_container(docker: Path, tmp_path: Path) -> None:
    server = VllmServer(_serving(startup_timeout_s=3), BODY_ID, DRAFT_ID, tmp_path / "server.log", label="spark-night")
    with pytest.raises(ServerError, match="did not become healthy within 3 s"):
        server.start()
    name = next(c for c in _calls(docker) if c[0] == "run")
    assert ["rm", "-f", name[name.index("--name") + 1]] in _calls(docker) and _containers(docker) == {}


def test_a_container_left_by_a_killed_study_is_removed_at_the_next_start(docker: Path, tmp_path: Path) -> None:
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from tests.test_docker_launcher import _serving, BODY_ID, DRAFT_ID
from mtp_abliterate.search.serving.server import VllmServer
server = VllmServer(_serving(), BODY_ID, DRAFT_ID, Path({str(tmp_path / "s.log")!r}),
                    label="spark-night").start()
print("healthy", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    study = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert study.returncode == -signal.SIGKILL and "healthy" in study.stdout, study.stderr[-2000:]
    (name, pid), *_ = _containers(docker).items()
    time.sleep(2)
    assert _alive(pid)  # a container is not the client's child: it outlived the killed study
    serving = _serving()
    assert remove_orphan_containers(serving, "another-study") == []  # another study's containers are left alone
    assert remove_orphan_containers(serving, "spark-night") == [name]
    assert _containers(docker) == {} and not _alive(pid)


def test_a_template_publishing_on_every_interface_is_refused(tmp_path: Path) -> None:
    template = "docker run --rm -p {port}:{port} {image} --host 0.0.0.0 --port {port}"
    study = write_study_config(
        ORGANISM_TOML, tmp_path / "open.toml", serving={"launcher": "docker", "docker_template": template}
    )
    with pytest.raises(ConfigError, match=r"serving.docker_template: .*write -p 127.0.0.1:\{port\}:\{port\}"):
        load_config(study)


def test_a_missing_docker_client_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker here
    server = VllmServer(_serving(), str(LAYOUT.body), str(LAYOUT.draft), tmp_path / "server.log")
    with pytest.raises(ServerError, match=r"^docker not found on PATH .*install docker, or serve with"):
        server.start()
