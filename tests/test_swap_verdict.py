"""The swap self-check's verdict on a vLLM that is not batch-invariant (GPUs): two cold starts of the same
candidate can differ in a few greedy tokens, and so in their counters. A swap that differs from a cold start by
no more than that noise is not a broken reload; one that differs while cold starts reproduce each other is."""

from __future__ import annotations

from mtp_abliterate.objectives.base import ObjectiveResult
from mtp_abliterate.search.trial.swap_check import SWAP_NOISE_FACTOR, Measured, swap_verdict


def measured(refusal: float, per_position: list[float], answers: str, accepted: int) -> Measured:
    """A measurement as the pipeline records it: refusal rate + one acceptance set's counters and digests."""
    sets = {
        "harmless": {
            "answers_sha256": answers,
            "num_prompts": 50,
            "num_drafts": 400,
            "num_draft_tokens": 1600,
            "num_accepted_tokens": accepted,
            "per_position": per_position,
        }
    }
    return Measured(
        ObjectiveResult(refusal, {"responses_sha256": f"responses-{refusal}"}),
        ObjectiveResult(accepted / 400, {"sets": sets}),
    )


COLD = measured(0.10, [0.80, 0.60, 0.45, 0.30], "a", 860)


def test_a_bit_identical_swap_passes_without_a_second_cold_start() -> None:
    swap = measured(0.10, [0.80, 0.60, 0.45, 0.30], "a", 860)
    verdict = swap_verdict(swap, COLD, None)
    assert verdict["passed"] and verdict["identical"] and verdict["differences"] == []


def test_a_cold_vs_cold_difference_is_not_reported_as_a_broken_swap() -> None:
    # GPU: the second cold start's batches formed differently; two answers diverged after a few tokens.
    cold_again = measured(0.10, [0.81, 0.59, 0.46, 0.31], "b", 868)
    swap = measured(0.10, [0.79, 0.61, 0.44, 0.30], "c", 852)  # as far from the cold start as noise goes
    verdict = swap_verdict(swap, COLD, cold_again)
    assert verdict["passed"] and not verdict["identical"]
    assert verdict["noise"] > 0 and verdict["gap"] <= SWAP_NOISE_FACTOR * verdict["noise"]
    assert "cold-vs-cold noise" in verdict["rule"]


def test_a_swap_far_outside_the_noise_floor_fails() -> None:
    cold_again = measured(0.10, [0.81, 0.59, 0.46, 0.31], "b", 868)
    broken = measured(0.10, [0.35, 0.12, 0.05, 0.01], "garbage", 212)  # stale weights or a missed repair
    verdict = swap_verdict(broken, COLD, cold_again)
    assert not verdict["passed"] and verdict["gap"] > SWAP_NOISE_FACTOR * verdict["noise"]


def test_any_difference_fails_where_cold_starts_reproduce_each_other() -> None:
    # CPU (batch-invariant here): the cold starts agree bit for bit, so a one-token difference is the swap's.
    swap = measured(0.10, [0.80, 0.60, 0.45, 0.30], "d", 861)
    verdict = swap_verdict(swap, COLD, measured(0.10, [0.80, 0.60, 0.45, 0.30], "a", 860))
    assert not verdict["passed"] and verdict["rule"].startswith("cold starts reproduce each other exactly")
    assert verdict["differences"] == ["harmless.answers_sha256", "harmless.num_accepted_tokens"]
