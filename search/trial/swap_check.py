"""The swap self-check's verdict: whether an in-place swap into the study's server measures what a cold start does.

Bit-identical to the cold start: yes. Otherwise a second cold start gives the noise floor: if the cold starts
reproduce each other exactly, any difference is the swap's (fail); if they differ too (vLLM on GPUs is not
batch-invariant: greedy tokens change with batch composition), the swap passes when its gap to the nearer cold start
is within SWAP_NOISE_FACTOR x the cold-vs-cold gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtp_abliterate.objectives.base import ObjectiveResult

SWAP_NOISE_FACTOR = 2.0  # a swap within twice the cold-vs-cold gap is noise, not a broken reload


@dataclass
class Measured:
    """What one server measured for a candidate: the served objectives."""

    refusal: ObjectiveResult | None  # RefusalRate's (None: not served)
    acceptance: ObjectiveResult | None  # AcceptanceSets' (None: not measured)
    not_measured: str | None = None  # why an objective was not needed (pipeline.Decisions)
    tokens: int = 0  # tokens the server generated for this measurement (refusals and acceptance, each once)

    def fingerprint(self) -> dict[str, Any]:
        """Greedy texts (digests) and every spec-decode count: identical fingerprints, identical objectives."""
        sets = self.acceptance.details["sets"] if self.acceptance else {}
        return {
            "refusal_responses": self.refusal.details["responses_sha256"] if self.refusal else None,
            **{
                f"{name}.{k}": s[k]
                for name, s in sets.items()
                for k in (
                    "answers_sha256",
                    "num_prompts",
                    "num_drafts",
                    "num_draft_tokens",
                    "num_accepted_tokens",
                    "per_position",
                )
            },
        }


def objective_gap(a: Measured, b: Measured) -> float:
    """The largest difference between two measurements in what the search sees: the refusal rate and every
    per-position acceptance rate of every set."""
    sa, sb = a.acceptance.details["sets"], b.acceptance.details["sets"]
    gaps = [abs(a.refusal.value - b.refusal.value)]
    gaps += [abs(x - y) for name in sa for x, y in zip(sa[name]["per_position"], sb[name]["per_position"], strict=True)]
    return max(gaps)


def swap_verdict(swapped: Measured, cold: Measured, cold_again: Measured | None) -> dict[str, Any]:
    """The verdict (passed, identical, differences, rule, and gap/noise when not identical); `cold_again` is needed
    only when the swapped and cold fingerprints differ."""
    a, b = swapped.fingerprint(), cold.fingerprint()
    differences = sorted(k for k in a if a[k] != b[k])
    if not differences:
        return {"passed": True, "identical": True, "differences": [], "rule": "bit-identical to a cold start"}
    if cold_again is None:
        raise ValueError("swapped and cold measurements differ: the verdict needs a second cold measurement")
    noise = objective_gap(cold, cold_again)
    gap = min(objective_gap(swapped, cold), objective_gap(swapped, cold_again))
    verdict = {"identical": False, "differences": differences, "gap": gap, "noise": noise}
    if cold.fingerprint() == cold_again.fingerprint():
        return {**verdict, "passed": False, "rule": "cold starts reproduce each other exactly; the swap does not"}
    passed = gap <= SWAP_NOISE_FACTOR * noise
    rule = f"gap {gap:.4f} {'<=' if passed else '>'} {SWAP_NOISE_FACTOR:g} x cold-vs-cold noise {noise:.4f}"
    return {**verdict, "passed": passed, "rule": rule}
