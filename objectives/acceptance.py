"""Per-position draft acceptance, measured per prompt from a running vLLM server, with intervals over prompts.

Each prompt is sent through /v1/chat/completions (chat template applied; raw completions inflate acceptance). The
server runs with `--per-request-spec-decode-metrics summary` (vLLM >= 0.29, PR #48915), so every answer carries its
own histogram h_j = verify steps that accepted exactly j draft tokens; summed over a set's answers it equals the
differenced `vllm:spec_decode_*` counters of /metrics (tests/test_adaptive.py checks it). vLLM's definitions:
a_i = drafts whose first i+1 tokens were all accepted / drafts, and mean accepted tokens per draft = sum_i a_i
(vLLM's "mean acceptance length" is 1 + that).

Interval: drafts within one answer are correlated (a body that wanders off the draft's path does so for a whole
answer), so the prompt is the unit. Each figure is a ratio over prompts, sum(accepted_p) / sum(drafts_p), and its
95 % half-width is the ratio estimator's: 1.96 sqrt(sum_p (accepted_p - R drafts_p)^2 / (n (n-1))) / mean(drafts_p).
The mix of sets (independent samples) has half-width 1.96 sqrt(sum_s (w_s/W)^2 se_s^2).

Adaptive measurement: prompts are served in rounds (`round_size` per set, in a fixed seeded order), and serving
stops as soon as the mix's half-width is at most `target_halfwidth`, or as soon as the caller's `stop` rule says the
rest cannot change a decision (see search/trial/pipeline.py), or when every prompt has been served. A
`target_halfwidth` of 0 is the fixed budget: every prompt, in the configured order, in one round.

A measurement is invalid, with a reason, when speculation did not run (no drafts), when the draft was never
accepted (a_0 == 0), or when an answer is one word repeated (which inflates acceptance). Its value is still what was
measured (0 when nothing was drafted or accepted); the caller decides what an invalid measurement means: a broken
harness for the vanilla model, a bad candidate (recorded, infeasible) for an abliterated one.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx
from heretic.utils import Prompt

from mtp_abliterate.objectives.base import Direction, Objective, ObjectiveResult
from mtp_abliterate.objectives.served import Reply, chat, texts_digest

METRIC = re.compile(r"^(vllm:spec_decode_num_\w+?)(?:_total)?(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$")
Z95 = 1.96
ORDER_SEED = 0  # the adaptive order of every prompt set: fixed, so every trial serves the same prompts first


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
    """The server-wide spec-decode counters from /metrics (summed over engines)."""
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


@dataclass
class Draws:
    """One prompt's drafts (over its answers, one per request seed): verify steps by accepted draft tokens."""

    histogram: list[int]  # histogram[j]: verify steps that accepted exactly j draft tokens (j = 0..n)
    draft_tokens: int = 0

    @property
    def drafts(self) -> int:
        return sum(self.histogram)

    @property
    def accepted(self) -> int:
        return sum(j * h for j, h in enumerate(self.histogram))

    def accepted_at(self, position: int) -> int:
        """Drafts whose first position+1 tokens were all accepted."""
        return sum(self.histogram[position + 1 :])

    def add(self, reply: Reply) -> None:
        for j, h in enumerate(reply.spec_histogram or ()):
            self.histogram[j] += h
        self.draft_tokens += reply.spec_draft_tokens


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float]:
    """sum(num) / sum(den) over prompts and its 95 % half-width (the ratio estimator; inf below two prompts)."""
    n, total = len(denominators), sum(denominators)
    if total == 0:
        return 0.0, math.inf
    ratio = sum(numerators) / total
    if n < 2:
        return ratio, math.inf
    residuals = sum((a - ratio * d) ** 2 for a, d in zip(numerators, denominators, strict=True))
    return ratio, Z95 * math.sqrt(residuals / (n * (n - 1))) / (total / n)


def seeded_order(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The order adaptive measurement serves a set in: the same for every trial and every set of that content."""
    return random.Random(ORDER_SEED).sample(list(prompts), len(prompts))


def degenerate(text: str, min_words: int = 8) -> bool:
    """One word repeated: the pattern of a broken model, which inflates acceptance."""
    words = text.split()
    return len(words) >= min_words and len(set(words)) == 1


@dataclass
class SetMeasurement:
    name: str
    per_position: list[float]
    per_position_ci95: list[float]  # 95 % half-widths, prompts as the unit
    mean_accepted_tokens: float
    ci95: float  # 95 % half-width of mean_accepted_tokens, prompts as the unit
    num_prompts: int  # prompts served (adaptive measurement may stop before the set's end)
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    output_tokens: int
    seconds: float  # wall time of the measurement this set was part of (sets are served together)
    tok_s: float
    invalid_reason: str | None
    samples: list[dict[str, str]]
    answers_sha256: str  # every answer's text, in serving order: equal digests mean identical greedy texts


@dataclass
class Estimate:
    """Where a measurement stands: the configured mix's figures, each (value, 95 % half-width)."""

    mean_accepted_tokens: tuple[float, float]
    per_position: list[tuple[float, float]]


def _set_tally(n: int, positions: int) -> list[Draws]:
    return [Draws([0] * (positions + 1)) for _ in range(n)]


def measurement_of(
    name: str, draws: Sequence[Draws], answers: Sequence[tuple[Prompt, Reply]], positions: int, seconds: float
) -> SetMeasurement:
    """One set's figures from its prompts' draws and answers (in serving order)."""
    drafts = [d.drafts for d in draws]
    per_pos = [ratio_interval([d.accepted_at(i) for d in draws], drafts) for i in range(positions)]
    mean, ci = ratio_interval([d.accepted for d in draws], drafts)
    reasons = []  # every one that applies: a wrecked candidate is often both degenerate and never accepted
    if sum(drafts) == 0:
        reasons.append("no drafts were proposed: speculative decoding did not run")
    elif sum(d.accepted_at(0) for d in draws) == 0:
        reasons.append("no draft token was ever accepted: the draft does not match this body")
    if bad := [r.text for _, r in answers if degenerate(r.text)]:
        reasons.append(f"{len(bad)} degenerate answer(s), e.g. {bad[0][:60]!r}")
    tokens = sum(r.completion_tokens for _, r in answers)
    return SetMeasurement(
        name,
        [v for v, _ in per_pos],
        [h for _, h in per_pos],
        mean,
        ci,
        len(draws),
        sum(drafts),
        sum(d.draft_tokens for d in draws),
        sum(d.accepted for d in draws),
        tokens,
        seconds,
        tokens / seconds if seconds else 0.0,
        "; ".join(reasons) or None,
        [{"prompt": p.user, "response": r.text} for p, r in answers[:5]],
        texts_digest(r.text for _, r in answers),
    )


def mix_interval(parts: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """The weighted mean of (value, half-width, weight) over independent sets, and its half-width."""
    total = sum(w for _, _, w in parts)
    value = sum(w * v for v, _, w in parts) / total
    return value, math.sqrt(sum((w / total * h) ** 2 for _, h, w in parts))


class AcceptanceSets(Objective):
    """Weighted mean, over the configured prompt sets, of mean accepted tokens per draft; details per set.

    `target_halfwidth` > 0: adaptive rounds of `round_size` prompts per set (see the module doc); 0: every prompt."""

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
        target_halfwidth: float = 0.0,
        round_size: int = 16,
    ) -> None:
        self.base_url, self.served_name = base_url, served_name
        self.sets = [(n, list(p), w) for n, p, w in sets]
        self.n = num_speculative_tokens
        self.max_tokens, self.temperature, self.seeds, self.concurrency = max_tokens, temperature, seeds, concurrency
        self.keep_replies = set(keep_replies)  # sets whose first-seed replies (with token ids) are kept in `replies`
        self.replies: dict[str, list[Reply]] = {}
        self.target_halfwidth, self.round_size = target_halfwidth, round_size
        if keep_replies and target_halfwidth > 0:
            raise ValueError("keep_replies needs the fixed budget (target_halfwidth 0): every prompt, in order")

    def _ask(self, client: httpx.Client, job: tuple[str, Prompt, int]) -> Reply:
        name, prompt, seed = job
        keep = name in self.keep_replies
        return chat(client, self.base_url, self.served_name, prompt, self.max_tokens, self.temperature, seed, keep)

    def _serve(self, jobs: Sequence[tuple[str, Prompt, int]]) -> list[Reply]:
        """Answers to (set, prompt, seed) jobs, `concurrency` in flight."""
        with httpx.Client(timeout=600) as client, ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda job: self._ask(client, job), jobs))

    def measure_set(self, name: str, prompts: Sequence[Prompt]) -> SetMeasurement:
        """Every prompt of one set, alone on the server (its tok/s is this set's)."""
        t0 = time.perf_counter()
        replies = self._serve([(name, p, s) for s in self.seeds for p in prompts])
        seconds = time.perf_counter() - t0
        draws = _set_tally(len(prompts), self.n)
        for i, r in enumerate(replies):
            draws[i % len(prompts)].add(r)
        if name in self.keep_replies:
            self.replies[name] = replies[: len(prompts)]
        answers = list(zip(list(prompts) * len(self.seeds), replies, strict=True))
        return measurement_of(name, draws, answers, self.n, seconds)

    def estimate(self, measured: dict[str, SetMeasurement]) -> Estimate:
        parts = [(measured[n], w) for n, _, w in self.sets]
        mean = mix_interval([(m.mean_accepted_tokens, m.ci95, w) for m, w in parts])
        per_pos = [
            mix_interval([(m.per_position[i], m.per_position_ci95[i], w) for m, w in parts]) for i in range(self.n)
        ]
        return Estimate(mean, per_pos)

    def compute(
        self,
        stop: Callable[[Estimate], str | None] = lambda estimate: None,
        answered: Mapping[str, Sequence[Reply]] | None = None,
    ) -> ObjectiveResult:
        """Serve rounds until a stopping rule holds (`stop`: the caller's, a reason or None); the fixed budget
        (`target_halfwidth` 0) serves every prompt of every set in one round, in the configured order. `answered`:
        sets whose every answer (one seed, at `max_tokens`, in the set's order) the caller already has."""
        answered = answered or {}
        adaptive = self.target_halfwidth > 0
        orders = {
            name: seeded_order(prompts) if adaptive and name not in answered else prompts
            for name, prompts, _ in self.sets
        }
        step = self.round_size if adaptive else max(len(p) for p in orders.values())
        draws = {name: _set_tally(len(p), self.n) for name, p in orders.items()}
        answers: dict[str, list[tuple[Prompt, Reply]]] = {name: [] for name in orders}
        for name, replies in answered.items():
            for i, reply in enumerate(replies):
                draws[name][i].add(reply)
            answers[name] = list(zip(orders[name], replies, strict=True))
        # Every round's requests are queued at once, in round order, `concurrency` in flight: the next round is
        # served while this one's last answers finish (no barrier). Decisions are taken at round boundaries on
        # exactly the rounds' prompts, so they are deterministic; on a stop, queued requests are cancelled and the
        # few in flight are finished and counted as tokens, not as measurements.
        served = [name for name in orders if name not in answered]
        last = max((len(orders[name]) for name in served), default=0)
        rounds_of = [
            [(name, i) for name in served for i in range(start, min(start + step, len(orders[name])))]
            for start in range(0, max(last, 1), step)
        ]
        stopped, rounds, seconds, wasted = "", 0, 0.0, 0
        t0 = time.perf_counter()
        with httpx.Client(timeout=600) as client, ThreadPoolExecutor(self.concurrency) as pool:
            futures = [
                [
                    (name, i, pool.submit(self._ask, client, (name, orders[name][i], seed)))
                    for seed in self.seeds
                    for name, i in batch
                ]
                for batch in rounds_of
            ]
            for batch in futures:
                for name, i, future in batch:
                    reply = future.result()
                    draws[name][i].add(reply)
                    answers[name].append((orders[name][i], reply))
                rounds += 1
                done = {name: min(rounds * step, len(p)) if name in served else len(p) for name, p in orders.items()}
                seconds = time.perf_counter() - t0
                timed = {name: seconds if name in served else 0.0 for name in orders}
                measured = {  # an answered set's answers were generated (and timed) by the caller
                    name: measurement_of(name, draws[name][: done[name]], answers[name], self.n, timed[name])
                    for name in orders
                }
                estimate = self.estimate(measured)
                half = estimate.mean_accepted_tokens[1]
                if all(done[name] >= len(p) for name, p in orders.items()):
                    stopped = "every prompt served"
                elif half <= self.target_halfwidth:
                    stopped = f"mix half-width {half:.3f} <= target {self.target_halfwidth:g}"
                else:
                    stopped = stop(estimate) or ""
                if stopped:
                    break
            later = [future for batch in futures[rounds:] for _, _, future in batch]
            for future in later:
                future.cancel()
        wasted = sum(f.result().completion_tokens for f in later if not f.cancelled() and f.exception() is None)
        for name in self.keep_replies & set(orders):
            self.replies[name] = [r for _, r in answers[name][: len(orders[name])]]
        weights = [w for _, _, w in self.sets]
        value = estimate.mean_accepted_tokens[0]
        results = [measured[name] for name, _, _ in self.sets]
        invalid = [f"{r.name}: {r.invalid_reason}" for r in results if r.invalid_reason]
        details = {
            "sets": {r.name: asdict(r) for r in results},
            "invalid_reason": "; ".join(invalid) or None,
            "ci95": estimate.mean_accepted_tokens[1],
            "per_position_ci95": [h for _, h in estimate.per_position],
            "stopped": stopped,
            "rounds": rounds,
            "seconds": seconds,
            # tokens generated here: the measured answers' and those of requests in flight at a stop
            "output_tokens": sum(r.output_tokens for r in results if r.name not in answered) + wasted,
            "weights": dict(zip([n for n, _, _ in self.sets], weights, strict=True)),
        }
        return ObjectiveResult(value, details)
