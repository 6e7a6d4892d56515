"""Metric names, built in one place: the objectives, the acceptance mix and each prompt set's figures, throughput
and stage timings. Trackers, tables, export and the trial record use these; nothing else spells a metric name."""

from __future__ import annotations

REFUSAL_RATE = "refusal_rate"
KLD = "kld"
ACCEPTED_PER_STEP = "accepted_per_step"  # the objective: emitted tokens per verify step - 1 (speed-true)
VLLM_MEAN_ACCEPTED = "vllm_mean_accepted_tokens"  # vLLM's figure (/metrics): proposals past the stop counted
CI95 = "ci95"
NUM_DRAFTS = "num_drafts"
NUM_PROMPTS = "num_prompts"  # prompts served (adaptive measurement stops early)
OUTPUT_TOKENS = "output_tokens"  # the acceptance sets' answers' tokens
GENERATED_TOKENS = "generated_tokens"  # every token a trial's measurement served (refusals and acceptance, once each)
AGGREGATE_TOK_S = "aggregate_tok_s"  # at acceptance.concurrency requests in flight: what the search compares
TRIAL_S = "trial_s"


def acc_pos(position: int, prompt_set: str | None = None) -> str:
    """The acceptance rate at draft position `position` (0-based): of the mix, or of one prompt set."""
    return set_metric(prompt_set, f"acc_pos_{position}")


def set_metric(prompt_set: str | None, name: str) -> str:
    return f"{prompt_set}.{name}" if prompt_set else name


def stage_metric(stage: str) -> str:
    return f"stage_{stage}_s"


def per_position(metrics: dict[str, float], n: int, prompt_set: str | None = None) -> list[float]:
    """The n per-position acceptance rates of `metrics` (NaN where a position was not measured)."""
    return [metrics.get(acc_pos(i, prompt_set), float("nan")) for i in range(n)]
