"""Speed-true counting of verify steps and paired comparisons of acceptance measurements (no server: the counts a
server returns are the input; tests/test_acceptance.py checks them against a served organism)."""

from __future__ import annotations

import math
import random

import pytest

from mtp_abliterate.objectives.acceptance import Draws, emitted_per_step, ratio_interval
from mtp_abliterate.objectives.paired import paired
from mtp_abliterate.objectives.served import Reply


def _counts(accepted: list[int], steps: list[int], n: int = 4) -> dict[str, list]:
    """One set's per-prompt counts with every step's accepted tokens spread as evenly as the total allows."""
    at = [[min(a, s * 4) // (k + 1) for k in range(n)] for a, s in zip(accepted, steps, strict=True)]
    return {"index": list(range(len(steps))), "steps": steps, "accepted": accepted, "at": at}


def test_the_last_step_is_capped_at_the_answers_stop() -> None:
    # 1 prefill token + steps emitting 5, 5, 3 tokens = 14: the last step accepted 4 but emitted 2 of them + its own
    assert emitted_per_step([4, 4, 4], 14) == [4, 4, 2]
    assert emitted_per_step([4, 4, 4], 16) == [4, 4, 4]  # ended exactly on a full step: nothing past the stop
    assert emitted_per_step([2, 0, 3], 1 + 3 + 1 + 1) == [2, 0, 0]  # the stop is the last step's own token


def test_draws_count_what_was_emitted_beside_what_vllm_counted() -> None:
    d = Draws([0] * 5)
    d.add(Reply("x", 14, None, spec_histogram=[0, 0, 0, 0, 3], spec_draft_tokens=12, spec_steps=[4, 4, 4]))
    assert (d.drafts, d.vllm_accepted, d.accepted) == (3, 12, 10)
    assert d.accepted == 14 - 1 - d.drafts  # (T - S): emitted tokens after the prefill's, minus one per step
    assert [d.accepted_at(k) for k in range(4)] == [3, 3, 2, 2]  # the capped step reached position 1
    assert [d.vllm_accepted_at(k) for k in range(4)] == [3, 3, 3, 3]


def test_a_histogram_without_its_steps_is_refused_with_the_fix() -> None:
    with pytest.raises(RuntimeError, match="--per-request-spec-decode-metrics detailed"):
        Draws([0] * 5).add(Reply("x", 9, None, spec_histogram=[0, 0, 0, 0, 2], spec_draft_tokens=8))


def test_same_per_prompt_deltas_give_the_same_verdict_whatever_the_spread() -> None:
    rng = random.Random(0)
    steps = [10] * 40
    deltas = [rng.choice([2, 3, 4]) for _ in steps]  # B accepts 0.2-0.4 more per step on every prompt
    narrow = [20 + rng.randint(-1, 1) for _ in steps]  # candidates whose prompt-to-prompt spread differs 20-fold
    wide = [20 + rng.randint(-18, 18) for _ in steps]
    verdicts = []
    for base in (narrow, wide):
        a, b = _counts(base, steps), _counts([x + d for x, d in zip(base, deltas, strict=True)], steps)
        result = paired({"s": b}, {"s": a}, {"s": 1.0})
        verdicts.append((result.verdict, round(result.difference, 9), round(result.halfwidth, 9)))
        # the unpaired intervals of the two measurements overlap on the wide base: they cannot tell
        _, ha = ratio_interval(a["accepted"], steps)
        _, hb = ratio_interval(b["accepted"], steps)
        if base is wide:
            assert result.difference < ha + hb
    assert verdicts[0] == verdicts[1] and verdicts[0][0] == "better"


def test_a_candidate_identical_to_its_reference_matches_and_never_dominates() -> None:
    counts = _counts([20, 31, 12, 25], [10, 12, 9, 11])
    result = paired({"s": counts}, {"s": counts}, {"s": 1.0})
    assert (result.difference, result.halfwidth, result.verdict) == (0.0, 0.0, "matching")


def test_pairs_only_the_prompts_both_sides_measured_and_mixes_sets_by_weight() -> None:
    a = _counts([20, 20, 20, 20], [10, 10, 10, 10])
    b = {**_counts([10, 10, 10], [10, 10, 10]), "index": [3, 1, 7]}  # adaptive: another set of prompts served
    one = paired({"s": a}, {"s": b}, {"s": 1.0})
    assert one.prompts == 2 and one.difference == pytest.approx(1.0)
    mixed = paired({"s": a, "t": a}, {"s": b, "t": a}, {"s": 3.0, "t": 1.0})
    assert mixed.difference == pytest.approx(0.75)  # 3/4 of the first set's difference, none of the second's
    assert math.isinf(paired({"s": a}, {"s": {**b, "index": [3, 9, 9]}}, {"s": 1.0}).halfwidth)  # one prompt
