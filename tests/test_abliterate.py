"""ARA and heretic's directional method on the resident organism: parity with heretic's Evaluator, exact reset,
determinism across orders and processes, deployed == optimised, the documented effect, and clean bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from heretic.evaluator import Evaluator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mtp_abliterate.organism.check import DIRECTIONAL_PARAMETERS
from mtp_abliterate.search.candidate.abliterator import DirectionalParameters
from mtp_abliterate.search.candidate.ara import AbliterationError, AraParameters
from mtp_abliterate.search.candidate.module_io import load_or_capture
from mtp_abliterate.search.candidate.resident import ModelShape, Resident, parse_parameters, shape_of
from tests.conftest import CLI, ORGANISM_TOML
from tests.conftest import ORGANISM_CONFIG as CONFIG

DOCUMENTED = AraParameters(**CONFIG.search.enqueue[0])
OTHER = DOCUMENTED.model_copy(update={"start_layer_index": 2, "steer_w": 0.2, "overcorrect_w": 0.3})


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
        with resident.abliterator.deployed():  # the objectives score the candidate as deployed (docs/parity.md)
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
        "import json; from mtp_abliterate.search.config import load_config;"
        "from mtp_abliterate.search.candidate.resident import Resident;"
        "from mtp_abliterate.search.candidate.ara import AraParameters;"
        f"cfg = load_config({str(ORGANISM_TOML)!r}, check_paths=False); r = Resident(cfg, cache_dir=None);"
        "r.apply(AraParameters(**cfg.search.enqueue[0])); e = r.evaluate();"
        "print(json.dumps({'digest': r.abliterator.adapter_digest(), **{k: v.value for k, v in e.items()}}))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _first_token_logits(model, inputs, pad_token_id: int) -> torch.Tensor:
    """A transformers model's raw logits at the first generated token, through `generate` as heretic scores them."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=1,
            output_logits=True,
            return_dict_in_generate=True,
            use_cache=False,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    return out.logits[0].float()


@pytest.fixture(scope="module")
def vanilla_hf():
    """The vanilla organism loaded by transformers alone, in the resident's dtype (BF16)."""
    return AutoModelForCausalLM.from_pretrained(CONFIG.model.target, dtype=torch.bfloat16).eval()


def test_the_saved_checkpoint_is_the_optimised_candidate(resident: Resident, vanilla_hf, tmp_path: Path) -> None:
    """Deployed == optimised, checked without the merge code: the checkpoint `save_merged` writes, loaded by
    transformers alone, against the resident heretic model with its DoRA adapters active."""
    resident.apply(DOCUMENTED)
    digest = resident.abliterator.adapter_digest()
    source = Path(CONFIG.model.target)
    out = resident.abliterator.save_merged(tmp_path / "candidate", source)
    assert resident.abliterator.adapter_digest() == digest  # saving keeps the resident's adapters
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()

    # Only the edited layers' edited matrices differ from vanilla, and every edited row keeps its vanilla norm
    # (row_normalization = "full"), to one BF16 epsilon (2^-7): the magnitudes were taken from BF16 weights and the
    # merged rows are rounded to BF16 again.
    saved, vanilla = _safetensors(out), _safetensors(source)
    assert saved.keys() == vanilla.keys()
    changed = {k for k in saved if not torch.equal(saved[k], vanilla[k])}
    hf_name = {"attn.o_proj": "self_attn.o_proj", "mlp.down_proj": "mlp.down_proj"}
    layers = range(DOCUMENTED.start_layer_index, DOCUMENTED.end_layer_index)
    assert changed == {f"model.layers.{i}.{hf_name[c]}.weight" for i in layers for c in DOCUMENTED.components}
    for k in changed:
        assert saved[k].dtype == vanilla[k].dtype == torch.bfloat16
        torch.testing.assert_close(saved[k].float().norm(dim=1), vanilla[k].float().norm(dim=1), rtol=2**-7, atol=0)

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert merged.dtype == resident.model.model.dtype == torch.bfloat16
    pad = resident.model.tokenizer.pad_token_id
    prompts = resident.prompts("good_evaluation_prompts")[:8] + resident.prompts("bad_evaluation_prompts")[:8]
    inputs, out_resident = resident.model.generate(
        prompts, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, use_cache=False
    )
    ours = out_resident.logits[0].float()
    theirs = _first_token_logits(merged, inputs, pad)
    before = _first_token_logits(vanilla_hf, inputs, pad)
    # The resident runs DoRA (BF16 base matmul + adapter path) where the checkpoint runs one BF16 matmul of the
    # BF16-rounded merged weight: not bit-equal. Tolerance: each logit within 4 BF16 epsilons (4 * 2^-7) of the
    # largest logit's magnitude, i.e. a few roundings of BF16 activations through the 6 layers; and the first-token
    # distributions within KL 1e-3. The candidate's own distance from vanilla is asserted to be far above both, so
    # neither tolerance can pass a checkpoint that holds vanilla (or other) weights.
    atol = 4 * 2**-7 * ours.abs().max().item()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=atol)
    assert (before - ours).abs().max().item() > 4 * atol
    lp_ours = torch.log_softmax(ours, -1)

    def kl_from_ours(logits: torch.Tensor) -> float:
        lp = torch.log_softmax(logits, -1)
        return F.kl_div(lp, lp_ours, reduction="batchmean", log_target=True).item()

    assert kl_from_ours(theirs) <= 1e-3 and kl_from_ours(before) >= 10 * 1e-3
    # More strictly, greedy generation (EOS or 100 tokens) is token for token the same.
    _, generated = resident.model.generate(prompts, max_new_tokens=100)
    with torch.no_grad():
        kw = dict(max_new_tokens=100, do_sample=False, pad_token_id=pad)
        assert torch.equal(merged.generate(**inputs, **kw), generated)
        assert not torch.equal(vanilla_hf.generate(**inputs, **kw), generated)


def test_kl_is_heretics_definition_against_an_independently_loaded_vanilla_model(
    resident: Resident, vanilla_hf
) -> None:
    """KL(vanilla || candidate) at the first generated token, averaged over the harmless evaluation prompts,
    computed here by hand from transformers' vanilla model and the resident candidate's logits."""
    resident.apply(DOCUMENTED)
    kld = resident.kld.compute().value
    prompts = resident.prompts("good_evaluation_prompts")
    batch = CONFIG.abliteration.batch_size  # the same batches (and so the same padding) as the objective
    total = 0.0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        with resident.abliterator.deployed():  # the candidate as deployed, as the objective scores it
            inputs, out = resident.model.generate(
                chunk, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, use_cache=False
            )
        candidate = torch.log_softmax(out.logits[0].float(), -1)
        vanilla = torch.log_softmax(_first_token_logits(vanilla_hf, inputs, resident.model.tokenizer.pad_token_id), -1)
        total += (vanilla.exp() * (vanilla - candidate)).sum().item()
    expected = total / len(prompts)
    assert kld > 0.0
    assert kld == pytest.approx(expected, rel=1e-5)  # float32 sums in another order than F.kl_div's


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
        parse_parameters("ara", raw, shape_of(CONFIG.model.target))


@pytest.mark.usefixtures("vllm_python")  # the CLI validates the whole config, the vLLM environment included
def test_cli_reports_bad_parameters_in_one_line() -> None:
    raw = json.dumps({**DOCUMENTED.model_dump(), "end_layer_index": 9})
    proc = subprocess.run(
        [*CLI, "abliterate", str(ORGANISM_TOML), "--params", raw], capture_output=True, text=True, timeout=300
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
        parse_parameters(
            "directional", {**DIRECTIONAL_PARAMETERS, "parameters": {"mlp.gate_proj": {}}}, ModelShape(5, 0)
        )


def test_module_io_is_cached_on_disk_and_reused(resident: Resident) -> None:
    io, _ = resident.module_io()
    files = list(resident.cache_dir.glob("module_io-*.safetensors"))
    assert len(files) == 1
    good, bad = resident.prompts("good_prompts"), resident.prompts("bad_prompts")
    key = files[0].stem.removeprefix("module_io-")
    again, hit = load_or_capture(
        resident.model, resident.abliterator.experts.experts, good, bad, resident.cache_dir, key
    )
    assert hit
    assert again.keys() == io.keys()
    for k in io:
        assert again[k].keys() == io[k].keys()
        for name in io[k]:
            assert torch.equal(again[k][name], io[k][name])
    layer, component, _ = next(iter(io))
    assert io[(layer, component, 0)]["good_in"].shape[0] == len(good)
