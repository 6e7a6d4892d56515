"""A scored candidate: what the trial pipeline returns, and its flat metrics (names from `search/metrics.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp_abliterate.objectives.paired import per_prompt_of
from mtp_abliterate.search import metrics as names


@dataclass
class TrialResult:
    refusal_rate: float | None  # None: not served (the KL decided)
    kld: float
    acceptance: dict[str, Any]  # AcceptanceSets details: per set per-position rates, CIs, prompts, samples
    accepted_per_step: float | None  # the configured mix over the acceptance sets; None: not measured
    per_position: list[float]  # the same mix, per position
    tok_s: float  # aggregate output tok/s over every set, at acceptance.concurrency requests in flight
    durations: dict[str, float] = field(default_factory=dict)
    adapter_digest: str = ""
    merged_digest: str = ""  # sha256 of the edited matrices as deployed (BF16), for re-materialisation
    candidate: Path | None = None  # the served checkpoint, when kept
    refusal_samples: list[dict[str, Any]] = field(default_factory=list)
    log_path: Path | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what swap and cold serving must agree on
    swap_check: dict[str, Any] | None = None  # the self-check's verdict, when this trial ran it
    serving_mode: str = "cold"  # how the candidate was served: "swap" or "cold"
    invalid_reason: str | None = None  # why the acceptance measurement is not a valid result (a bad candidate)
    not_measured: str | None = None  # why objectives were not measured: the decision did not need them
    generated_tokens: int = 0  # tokens served for the measurement (refusals and acceptance, each answer once)
    extra: dict[str, float] = field(default_factory=dict)  # search.extra_objectives' values, those measured

    @property
    def per_prompt(self) -> dict[str, Any]:
        """Each set's per-prompt acceptance counts (`objectives/paired.py`); empty when not measured."""
        return per_prompt_of(self.acceptance)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for trackers: the measured objectives (extra ones too), per-position mix, per set, the
        measurement's size, tok/s and stage durations (an objective that was not measured has no metric)."""
        out = {names.KLD: self.kld}
        if self.refusal_rate is not None:
            out[names.REFUSAL_RATE] = self.refusal_rate
        if self.accepted_per_step is not None:
            out[names.ACCEPTED_PER_STEP] = self.accepted_per_step
            out[names.CI95] = self.acceptance["ci95"]
            out[names.VLLM_MEAN_ACCEPTED] = self.acceptance["vllm_mean_accepted_tokens"]
            out |= {names.acc_pos(i): a for i, a in enumerate(self.per_position)}
            out[names.AGGREGATE_TOK_S] = self.tok_s
            out[names.OUTPUT_TOKENS] = self.acceptance["output_tokens"]
        out |= self.extra
        for name, s in self.acceptance["sets"].items():
            out |= {names.acc_pos(i, name): a for i, a in enumerate(s["per_position"])}
            out[names.set_metric(name, names.ACCEPTED_PER_STEP)] = s["accepted_per_step"]
            out[names.set_metric(name, names.CI95)] = s["ci95"]
            out[names.set_metric(name, names.VLLM_MEAN_ACCEPTED)] = s["vllm_mean_accepted_tokens"]
            out[names.set_metric(name, names.NUM_DRAFTS)] = s["num_drafts"]
            out[names.set_metric(name, names.NUM_PROMPTS)] = s["num_prompts"]
        out |= {names.stage_metric(k): v for k, v in self.durations.items()}
        out[names.TRIAL_S] = sum(self.durations.values())
        out[names.GENERATED_TOKENS] = self.generated_tokens
        return out


def acceptance_mix(sets: dict[str, dict[str, Any]], weights: Sequence[tuple[str, float]]) -> list[float]:
    """The per-position acceptance of the weighted mix of prompt sets (`weights`: (set name, weight))."""
    total = sum(w for _, w in weights)
    positions = len(next(iter(sets.values()))["per_position"])
    return [sum(w * sets[n]["per_position"][i] for n, w in weights) / total for i in range(positions)]


def aggregate_tok_s(details: dict[str, Any]) -> float:
    """Output tokens over the measurement's seconds (every set served together, acceptance.concurrency in flight)."""
    return details["output_tokens"] / details["seconds"] if details["seconds"] else 0.0
