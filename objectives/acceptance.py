"""Per-position draft acceptance, read from a running vLLM server's own counters.

Each prompt set is sent through /v1/chat/completions (chat template applied; raw completions inflate acceptance),
and the spec-decode counters of /metrics are differenced around that set's workload. vLLM's definitions:
a_i = accepted_per_pos[i] / num_drafts (the share of drafts whose first i+1 tokens were all accepted) and
mean accepted tokens per draft = sum_i a_i (vLLM's "mean acceptance length" is 1 + that).

Confidence interval: the counters give the whole distribution of X, the number of tokens accepted from one draft
(P(X >= i+1) = a_i), so the 95 % half-width of the mean is 1.96 * sd(X) / sqrt(num_drafts). It treats drafts as
independent; drafts of one answer are correlated, so read it as a lower bound on the uncertainty.

A measurement is invalid, with a reason, when speculation did not run (no drafts), when the draft was never
accepted (a_0 == 0), or when an answer is one word repeated (which inflates acceptance). Its value is still what was
measured (0 when nothing was drafted or accepted); the caller decides what an invalid measurement means: a broken
harness for the vanilla model, a bad candidate (recorded, infeasible) for an abliterated one.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx
from heretic.utils import Prompt

from mtp_abliterate.objectives.base import Direction, Objective, ObjectiveResult
from mtp_abliterate.objectives.served import Reply, chat, texts_digest

METRIC = re.compile(r"^(vllm:spec_decode_num_\w+?)(?:_total)?(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$")


@dataclass(frozen=True)
class SpecCounters:
    num_drafts: float
    num_draft_tokens: float
    num_accepted_tokens: float
    accepted_per_pos: tuple[float, ...]

    def __sub__(self, other: SpecCounters) -> SpecCounters:
        return SpecCounters(
            self.num_drafts - other.num_drafts,
            self.num_draft_tokens - other.num_draft_tokens,
            self.num_accepted_tokens - other.num_accepted_tokens,
            tuple(a - b for a, b in zip(self.accepted_per_pos, other.accepted_per_pos, strict=True)),
        )


def read_counters(base_url: str, positions: int) -> SpecCounters:
    """The spec-decode counters from /metrics (summed over engines)."""
    totals: Counter[str] = Counter()
    per_pos = [0.0] * positions
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        m = METRIC.match(line)
        if not m or line.split("{")[0].endswith("_created"):
            continue
        name, labels, value = m.groups()
        if name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            pos = int(re.search(r'position="(\d+)"', labels or "").group(1))
            if pos < positions:
                per_pos[pos] += float(value)
        else:
            totals[name] += float(value)
    return SpecCounters(
        totals["vllm:spec_decode_num_drafts"],
        totals["vllm:spec_decode_num_draft_tokens"],
        totals["vllm:spec_decode_num_accepted_tokens"],
        tuple(per_pos),
    )


def ci95_half_width(num_drafts: float, accepted_per_pos: Sequence[float]) -> float:
    """1.96 sd(X)/sqrt(N) for X = tokens accepted per draft, from P(X >= i+1) = accepted_per_pos[i] / N."""
    if num_drafts <= 1:
        return math.inf
    tail = [a / num_drafts for a in accepted_per_pos]
    mean = sum(tail)
    second = sum((2 * i + 1) * t for i, t in enumerate(tail))  # E[X^2] = sum_j (2j - 1) P(X >= j)
    return 1.96 * math.sqrt(max(second - mean * mean, 0.0) / num_drafts)


def degenerate(text: str, min_words: int = 8) -> bool:
    """One word repeated: the pattern of a broken model, which inflates acceptance."""
    words = text.split()
    return len(words) >= min_words and len(set(words)) == 1


@dataclass
class SetMeasurement:
    name: str
    per_position: list[float]
    mean_accepted_tokens: float
    ci95: float
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    output_tokens: int
    seconds: float
    tok_s: float
    invalid_reason: str | None
    samples: list[dict[str, str]]
    answers_sha256: str  # every answer's text, in prompt order: equal digests mean identical greedy texts


class AcceptanceSets(Objective):
    """Weighted mean, over the configured prompt sets, of mean accepted tokens per draft; details per set."""

    name = "mean_accepted_tokens"
    direction = Direction.MAXIMIZE

    def __init__(
        self,
        base_url: str,
        served_name: str,
        sets: Sequence[tuple[str, Sequence[Prompt], float]],
        num_speculative_tokens: int,
        max_tokens: int,
        temperature: float = 0.0,
        seeds: Sequence[int] = (0,),
        concurrency: int = 4,
        keep_replies: Sequence[str] = (),
    ) -> None:
        self.base_url, self.served_name = base_url, served_name
        self.sets = [(n, list(p), w) for n, p, w in sets]
        self.n = num_speculative_tokens
        self.max_tokens, self.temperature, self.seeds, self.concurrency = max_tokens, temperature, seeds, concurrency
        self.keep_replies = set(keep_replies)  # sets whose first-seed replies (with token ids) are kept in `replies`
        self.replies: dict[str, list[Reply]] = {}

    def measure_set(self, name: str, prompts: Sequence[Prompt]) -> SetMeasurement:
        jobs = [(p, s) for s in self.seeds for p in prompts]
        before = read_counters(self.base_url, self.n)
        t0 = time.perf_counter()
        with httpx.Client(timeout=600) as client, ThreadPoolExecutor(self.concurrency) as pool:
            keep = name in self.keep_replies

            def ask(job: tuple[Prompt, int]) -> Reply:
                prompt, seed = job
                return chat(
                    client, self.base_url, self.served_name, prompt, self.max_tokens, self.temperature, seed, keep
                )

            answers = list(pool.map(ask, jobs))
        if keep:
            self.replies[name] = answers[: len(prompts)]
        seconds = time.perf_counter() - t0
        delta = read_counters(self.base_url, self.n) - before
        drafts = delta.num_drafts
        rates = [a / drafts if drafts else 0.0 for a in delta.accepted_per_pos]
        reasons = []  # every one that applies: a wrecked candidate is often both degenerate and never accepted
        if drafts == 0:
            reasons.append("no drafts were proposed: speculative decoding did not run")
        elif delta.accepted_per_pos[0] == 0:
            reasons.append("no draft token was ever accepted: the draft does not match this body")
        if bad := [r.text for r in answers if degenerate(r.text)]:
            reasons.append(f"{len(bad)} degenerate answer(s), e.g. {bad[0][:60]!r}")
        reason = "; ".join(reasons) or None
        tokens = sum(r.completion_tokens for r in answers)
        return SetMeasurement(
            name,
            rates,
            sum(rates),
            ci95_half_width(drafts, delta.accepted_per_pos),
            int(drafts),
            int(delta.num_draft_tokens),
            int(delta.num_accepted_tokens),
            tokens,
            seconds,
            tokens / seconds,
            reason,
            [{"prompt": p.user, "response": r.text} for (p, _), r in list(zip(jobs, answers, strict=True))[:5]],
            texts_digest(r.text for r in answers),
        )

    def compute(self) -> ObjectiveResult:
        """Sets are measured one after another (the counter deltas must not mix)."""
        results = [self.measure_set(name, prompts) for name, prompts, _ in self.sets]
        weights = [w for _, _, w in self.sets]
        value = sum(w * r.mean_accepted_tokens for w, r in zip(weights, results, strict=True)) / sum(weights)
        invalid = [f"{r.name}: {r.invalid_reason}" for r in results if r.invalid_reason]
        details = {"sets": {r.name: asdict(r) for r in results}, "invalid_reason": "; ".join(invalid) or None}
        return ObjectiveResult(value, details)
