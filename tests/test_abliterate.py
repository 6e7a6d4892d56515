"""ARA and heretic's directional method on the resident organism: parity with heretic's Evaluator, exact reset,
determinism across orders and processes, deployed == optimised, the documented effect, and clean bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from heretic.evaluator import Evaluator
from transformers import Gemma4ForCausalLM

from mtp_abliterate.organism.check import DIRECTIONAL_PARAMETERS
from mtp_abliterate.search.candidate.abliterator import ADAPTER, DirectionalParameters
from mtp_abliterate.search.candidate.ara import AbliterationError, AraParameters, edited_weight
from mtp_abliterate.search.candidate.module_io import load_or_capture
from mtp_abliterate.search.candidate.resident import Resident, num_layers_of, parse_parameters
from mtp_abliterate.search.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = load_config(REPO / "configs" / "organism.toml")
DOCUMENTED = AraParameters(**CONFIG.search.enqueue[0])
OTHER = DOCUMENTED.model_copy(update={"start_layer_index": 2, "steer_w": 0.2, "overcorrect_w": 0.3})


@pytest.fixture(scope="module")
def resident(tmp_path_factory) -> Resident:
    return Resident(CONFIG, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def evaluator(resident: Resident) -> Evaluator:
    resident.abliterator.reset()
    return Evaluator(resident.settings, resident.model)  # built while vanilla, as heretic requires


def _logits(resident: Resident) -> torch.Tensor:
    _, out = resident.model.generate(
        resident.prompts("good_evaluation_prompts")[:8],
        max_new_tokens=1,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=False,
    )
    return out.logits[0]


def test_documented_ara_candidate_removes_refusals_at_low_kl(resident: Resident, evaluator: Evaluator) -> None:
    assert evaluator.base_refusals / len(evaluator.bad_prompts) >= 0.95
    resident.apply(DOCUMENTED)
    results = resident.evaluate()
    assert results["refusal_rate"].value <= 0.20
    assert 0 < results["kld"].value < 1.0


def test_objectives_match_heretic_evaluator(resident: Resident, evaluator: Evaluator) -> None:
    for params in (DOCUMENTED, OTHER):
        resident.apply(params)
        ours = resident.evaluate()
        _, kl, refusals = evaluator.get_score()
        assert abs(ours["kld"].value - kl) <= 1e-6
        assert ours["refusal_rate"].details["refusals"] == refusals


def test_reset_is_exactly_vanilla(resident: Resident) -> None:
    resident.abliterator.reset()
    vanilla = _logits(resident)
    resident.apply(DOCUMENTED)
    assert not torch.equal(_logits(resident), vanilla)
    resident.abliterator.reset()
    assert torch.equal(_logits(resident), vanilla)
    assert resident.kld.compute().value == 0.0


def test_same_parameters_same_adapter_in_any_order(resident: Resident) -> None:
    resident.apply(DOCUMENTED)
    first = (resident.abliterator.adapter_digest(), resident.evaluate()["kld"].value)
    resident.apply(OTHER)
    assert resident.abliterator.adapter_digest() != first[0]
    resident.apply(DOCUMENTED)
    assert (resident.abliterator.adapter_digest(), resident.evaluate()["kld"].value) == first


def test_same_parameters_same_adapter_in_a_fresh_process(resident: Resident) -> None:
    resident.apply(DOCUMENTED)
    expected = {"digest": resident.abliterator.adapter_digest(), **{k: v.value for k, v in resident.evaluate().items()}}
    script = (
        "import json, sys; from pathlib import Path; from search.config import load_config;"
        "from search.resident import Resident; from search.ara import AraParameters;"
        f"cfg = load_config({str(REPO / 'configs' / 'organism.toml')!r}); r = Resident(cfg, cache_dir=None);"
        "r.apply(AraParameters(**cfg.search.enqueue[0])); e = r.evaluate();"
        "print(json.dumps({'digest': r.abliterator.adapter_digest(), **{k: v.value for k, v in e.items()}}))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


def test_deployed_weight_is_the_optimised_weight(resident: Resident) -> None:
    """With row-norm preservation the served weight is ||W0|| * (W0 + BA) / ||W0 + BA||: what ARA optimised, what
    PEFT's DoRA computes in the resident model, and what the merged checkpoint holds."""
    resident.apply(DOCUMENTED)
    ab = resident.abliterator
    merged = ab.merged_weights()
    assert len(merged) == 6
    for key in sorted(ab.edited):
        module = ab.adapters[key]
        w0 = module.base_layer.weight.float()
        magnitude = module.lora_magnitude_vector[ADAPTER].weight.float()
        optimised = edited_weight(
            w0, module.lora_A[ADAPTER].weight.float(), module.lora_B[ADAPTER].weight.float(), magnitude
        )
        deployed = merged[f"{ab.module_names[key]}.weight"].float()
        torch.testing.assert_close(deployed, optimised, rtol=1e-2, atol=1e-3)  # bf16 rounding of the checkpoint
        torch.testing.assert_close(optimised.norm(dim=1), magnitude, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(magnitude, w0.norm(dim=1), rtol=1e-2, atol=0)  # PEFT took them in BF16
        assert not torch.allclose(optimised, w0)
        x = torch.randn(4, w0.shape[1], dtype=module.base_layer.weight.dtype)
        torch.testing.assert_close(module(x).float(), x.float() @ optimised.T, rtol=2e-2, atol=2e-2)


def test_merged_checkpoint_is_the_candidate_and_keeps_the_resident(resident: Resident, tmp_path: Path) -> None:
    resident.apply(DOCUMENTED)
    digest = resident.abliterator.adapter_digest()
    resident_logits = _logits(resident)
    out = resident.abliterator.save_merged(tmp_path / "candidate", CONFIG.resolve(CONFIG.model.target))
    assert resident.abliterator.adapter_digest() == digest
    assert (out / "config.json").read_bytes() == (
        Path(CONFIG.resolve(CONFIG.model.target)) / "config.json"
    ).read_bytes()
    merged = Gemma4ForCausalLM.from_pretrained(out).eval()
    prompts = resident.prompts("good_evaluation_prompts")[:8]
    inputs, _ = resident.model.generate(prompts, max_new_tokens=1)
    with torch.no_grad():
        logits = merged(**inputs).logits[:, -1].float()
    # The merged model runs plain BF16 matmuls where the resident runs DoRA in float32: close, not bit-equal.
    assert (logits.argmax(-1) == resident_logits.argmax(-1)).all()
    torch.testing.assert_close(logits.softmax(-1), resident_logits.float().softmax(-1), atol=0.05, rtol=0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**DOCUMENTED.model_dump(), "steer_w": 5.0}, "steer_w"),
        ({**DOCUMENTED.model_dump(), "components": ["mlp.up_proj"]}, "not among"),
        ({**DOCUMENTED.model_dump(), "end_layer_index": 9}, "outside"),
        ({**DOCUMENTED.model_dump(), "start_layer_index": 2, "end_layer_index": 2}, "must be below"),
        ({**DOCUMENTED.model_dump(), "learning_rate": 1.0}, "learning_rate"),
    ],
)
def test_bad_parameters_fail_before_any_work(raw: dict, message: str) -> None:
    with pytest.raises(AbliterationError, match=message):
        parse_parameters("ara", raw, num_layers_of(CONFIG.resolve(CONFIG.model.target)))


def test_cli_reports_bad_parameters_in_one_line() -> None:
    raw = json.dumps({**DOCUMENTED.model_dump(), "end_layer_index": 9})
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from search.cli import app; app()",
            "abliterate",
            str(REPO / "configs" / "organism.toml"),
            "--params",
            raw,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "end_layer_index=9 is outside [2, 5]" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_directional_method_is_heretics_own(tmp_path: Path) -> None:
    cfg = CONFIG.model_copy(
        update={"abliteration": CONFIG.abliteration.model_copy(update={"method": "directional", "rank": 3})}
    )
    resident = Resident(cfg, cache_dir=None)
    params = DirectionalParameters(**DIRECTIONAL_PARAMETERS)
    resident.apply(params)
    results = resident.evaluate()
    assert results["refusal_rate"].value <= 0.20 and results["kld"].value < 1.0
    with pytest.raises(AbliterationError, match="not among"):
        parse_parameters("directional", {**DIRECTIONAL_PARAMETERS, "parameters": {"mlp.gate_proj": {}}}, 5)


def test_module_io_is_cached_on_disk_and_reused(resident: Resident) -> None:
    io, _ = resident.module_io()
    files = list(resident.cache_dir.glob("module_io-*.safetensors"))
    assert len(files) == 1
    good, bad = resident.prompts("good_prompts"), resident.prompts("bad_prompts")
    key = files[0].stem.removeprefix("module_io-")
    again, hit = load_or_capture(resident.model, good, bad, resident.cache_dir, key)
    assert hit
    assert again.keys() == io.keys()
    for k in io:
        for name in ("good_in", "good_out", "bad_in", "bad_out"):
            assert torch.equal(again[k][name], io[k][name])
    layer, component, _ = next(iter(io))
    assert io[(layer, component, 0)]["good_in"].shape[0] == len(good)
