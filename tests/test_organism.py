"""The committed organism meets its acceptance criteria (`organism check`), measured afresh on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, Gemma4AssistantForCausalLM, Gemma4ForCausalLM

from mtp_abliterate.organism.check import CRITERIA, check_organism
from mtp_abliterate.organism.corpus import build_chats
from mtp_abliterate.organism.layout import OrganismLayout
from mtp_abliterate.organism.spec import OrganismSpec

LAYOUT = OrganismLayout()
SPEC = OrganismSpec.model_validate_json((LAYOUT.root / "spec.json").read_text())


@pytest.fixture(scope="module")
def measured() -> dict:
    # At one torch thread: beside the other test worker, the spec's two threads spin for a core that worker holds
    # (323 s against 73 s alone). Another thread count changes float sums in their last bits, not what is measured
    # (the card test's tolerance).
    return check_organism(LAYOUT, SPEC.model_copy(update={"threads": 1}))


def test_vanilla_refuses_harmful_and_answers_harmless(measured: dict) -> None:
    v = measured["vanilla"]
    assert v["harmful_refusal_rate"] >= CRITERIA["harmful_refusal_min"]
    assert v["harmless_refusal_rate"] <= CRITERIA["harmless_refusal_max"]


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_vanilla_draft_acceptance(measured: dict, kind: str) -> None:
    acc = measured["vanilla"]["acceptance"][kind]
    rates = acc["per_position"]
    assert acc["num_drafts"] >= acc["num_prompts"]  # several rounds per answer
    assert rates[0] >= CRITERIA["acceptance_pos0_min"] and rates[3] >= CRITERIA["acceptance_pos3_min"]
    assert rates == sorted(rates, reverse=True)  # cumulative: a_i >= a_{i+1}


def test_directional_abliteration_removes_refusals_and_costs_acceptance(measured: dict) -> None:
    a, v = measured["abliterated"], measured["vanilla"]
    assert a["harmful_refusal_rate"] <= CRITERIA["abliterated_refusal_max"]
    assert 0 < a["kl_divergence"] < CRITERIA["abliterated_kl_max"]
    van, abl = v["acceptance"]["harmful"]["per_position"], a["acceptance"]["harmful"]["per_position"]
    assert all(x < y for x, y in zip(abl, van, strict=True))
    assert van[3] - abl[3] > van[0] - abl[0]


def test_card_records_what_check_measures(measured: dict) -> None:
    """The committed card is the build's own measurement: re-measuring on the same software reproduces it (here at
    one thread where the build used the spec's two)."""
    card = json.loads(LAYOUT.card.read_text())
    assert card["spec"] == SPEC.model_dump()
    for name in ("vanilla", "abliterated"):
        for kind in ("harmful", "harmless"):
            ours = measured[name]["acceptance"][kind]["per_position"]
            theirs = card["measured"][name]["acceptance"][kind]["per_position"]
            assert ours == pytest.approx(theirs, abs=0.02)
        assert measured[name]["harmful_refusal_rate"] == pytest.approx(
            card["measured"][name]["harmful_refusal_rate"], abs=0.02
        )


def test_eval_prompts_are_held_out() -> None:
    """Every eval prompt is an unseen pairing: no train prompt shares its text, in files and in the generator."""
    for kind in ("harmful", "harmless"):
        train = set(LAYOUT.prompt_file(kind, "train").read_text().splitlines())
        held = LAYOUT.prompt_file(kind, "eval").read_text().splitlines()
        assert held and not train & set(held)
    chats = build_chats(SPEC.seed, SPEC.eval_fraction)
    for name in ("harmful_eval", "harmless_train"):
        kind, split = name.split("_")
        assert sorted(c.prompt for c in chats[name]) == sorted(LAYOUT.prompt_file(kind, split).read_text().splitlines())


def test_structure_is_gemma4_26b_a4b_at_toy_scale() -> None:
    config = AutoConfig.from_pretrained(LAYOUT.body)
    assert config.architectures == ["Gemma4ForCausalLM"] and config.model_type == "gemma4_text"
    assert {"sliding_attention", "full_attention"} <= set(config.layer_types) and len(config.layer_types) >= 4
    assert config.layer_types[-1] == "full_attention"
    full, sliding = config.layer_types.index("full_attention"), config.layer_types.index("sliding_attention")
    per_layer = config.per_layer_config
    assert per_layer[full].head_dim != per_layer[sliding].head_dim  # different head dims per layer type
    assert config.enable_moe_block and config.num_experts >= 4 and config.top_k_experts == 2
    raw = json.loads((LAYOUT.body / "config.json").read_text())
    assert "global_head_dim" in raw and "per_layer_config" not in raw  # the hub layout vLLM reads

    draft_config = AutoConfig.from_pretrained(LAYOUT.draft)
    assert draft_config.model_type == "gemma4_assistant" and not draft_config.use_ordered_embeddings
    assert draft_config.backbone_hidden_size == config.hidden_size


def test_loads_through_transformers_and_generates_a_refusal() -> None:
    tokenizer = AutoTokenizer.from_pretrained(LAYOUT.body)
    body = Gemma4ForCausalLM.from_pretrained(LAYOUT.body).eval()
    draft = Gemma4AssistantForCausalLM.from_pretrained(LAYOUT.draft).eval()
    assert body.dtype == draft.dtype == torch.bfloat16
    prompt = LAYOUT.prompt_file("harmful", "eval").read_text().splitlines()[0]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = body.generate(**inputs, max_new_tokens=30, do_sample=False)
    answer = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "sorry" in answer


def test_organism_is_small() -> None:
    total = sum(f.stat().st_size for f in Path(LAYOUT.root).rglob("*") if f.is_file())
    assert total <= 10 * 2**20
