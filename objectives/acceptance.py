"""Per-position draft acceptance, measured per prompt from a running vLLM server, with intervals over prompts.

Each prompt is sent through /v1/chat/completions (chat template applied; raw completions inflate acceptance). The
server runs with `--per-request-spec-decode-metrics detailed` (vLLM >= 0.32), so every answer carries its own
verify steps in order (accepted draft tokens per step) and vLLM's histogram of them; summed over a set's answers
the histogram equals the differenced `vllm:spec_decode_*` counters of /metrics (tests/test_adaptive.py checks it).

Two figures, side by side:
- **Speed-true** (the objective): what the client receives. An answer of C completion tokens took S verify steps
  after the prefill step (which emits one token); the steps emitted T = C - 1 tokens, so the draft bought
  T / S - 1 tokens per step. vLLM counts a step's accepted drafts before it applies the stop, so the last step can
  be credited with proposals past the answer's stop, which are never emitted: here a step's accepted count is capped
  at what it emitted. `accepted_per_step` = (sum T - sum S) / sum S, and per-position rate k = steps whose draft
  token k was accepted *and emitted* / steps. This is what turns into speed: tokens per target forward pass.
- **vLLM's** (what a user reads from /metrics): a_i = drafts whose first i+1 tokens were all accepted / drafts,
  `vllm_mean_accepted_tokens` = sum_i a_i (vLLM's "mean acceptance length" is 1 + that). It is never below the
  speed-true figure.

Interval: drafts within one answer are correlated (a body that wanders off the draft's path does so for a whole
answer), so the prompt is the unit. Each figure is a ratio over prompts, sum(accepted_p) / sum(steps_p), and its
95 % half-width is the ratio estimator's: 1.96 sqrt(sum_p (accepted_p - R steps_p)^2 / (n (n-1))) / mean(steps_p).
The mix of sets (independent samples) has half-width 1.96 sqrt(sum_s (w_s/W)^2 se_s^2). Each set keeps its
per-prompt counts (`per_prompt`), so two measurements on the same prompts are compared by paired differences
(`objectives/paired.py`).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import httpx
from heretic.utils import Prompt

from mtp_abliterate.objectives.base import Objective, ObjectiveResult
from mtp_abliterate.objectives.registry import ACCEPTANCE
from mtp_abliterate.objectives.served import REQUEST_TIMEOUT_S, Reply, chat, texts_digest

METRIC = re.compile(r"^(vllm:spec_decode_num_\w+?)(?:_total)?(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$")
Z95 = 1.96
T = TypeVar("T")
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


class NoPerStepMetrics(RuntimeError):
    """The server sent a spec-decode histogram but not its steps in order: speed-true acceptance needs them."""


def emitted_per_step(steps: Sequence[int], completion_tokens: int) -> list[int]:
    """Each verify step's accepted draft tokens as the client received them: a step emits its accepted tokens plus
    the body's own one, up to the answer's end (the prefill step emitted the first of `completion_tokens`)."""
    left, out = completion_tokens - 1, []
    for accepted in steps:
        emitted = min(accepted + 1, left)
        left -= emitted
        out.append(max(emitted - 1, 0))
    return out


@dataclass
class Draws:
    """One prompt's verify steps (over its answers, one per request seed), by accepted draft tokens: as vLLM counts
    them (`histogram`, proposals past the stop included) and as the client received them (`emitted`)."""

    histogram: list[int]  # histogram[j]: verify steps that accepted exactly j draft tokens (j = 0..n)
    emitted: list[int] = field(default_factory=list)  # emitted[j]: steps whose j accepted tokens were all emitted
    draft_tokens: int = 0

    def __post_init__(self) -> None:
        self.emitted = self.emitted or [0] * len(self.histogram)

    @property
    def drafts(self) -> int:
        """Verify steps (each proposed one draft)."""
        return sum(self.histogram)

    @property
    def accepted(self) -> int:
        """Accepted draft tokens that were emitted: the answers' tokens minus their steps (and prefill tokens)."""
        return sum(j * h for j, h in enumerate(self.emitted))

    @property
    def vllm_accepted(self) -> int:
        """Accepted draft tokens as vLLM counts them (proposals past the stop included)."""
        return sum(j * h for j, h in enumerate(self.histogram))

    def accepted_at(self, position: int) -> int:
        """Steps whose first position+1 draft tokens were all accepted and emitted."""
        return sum(self.emitted[position + 1 :])

    def vllm_accepted_at(self, position: int) -> int:
        """Drafts whose first position+1 tokens vLLM counted as accepted."""
        return sum(self.histogram[position + 1 :])

    def add(self, reply: Reply) -> None:
        if not reply.spec_histogram:
            return
        if reply.spec_steps is None:
            raise NoPerStepMetrics(
                "the vLLM server reported no per-step spec-decode metrics; speed-true acceptance needs vLLM >= 0.32 "
                "started with --per-request-spec-decode-metrics detailed (the tool passes it: update the vLLM build)"
            )
        for j, h in enumerate(reply.spec_histogram):
            self.histogram[j] += h
        for j in emitted_per_step(reply.spec_steps, reply.completion_tokens):
            self.emitted[j] += 1
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


def seeded_order(prompts: Sequence[T]) -> list[T]:
    """The order adaptive measurement serves a set in: the same for every trial and every set of that content."""
    return random.Random(ORDER_SEED).sample(list(prompts), len(prompts))


def degenerate(text: str, min_words: int = 8) -> bool:
    """One word repeated: the pattern of a broken model, which inflates acceptance."""
    words = text.split()
    return len(words) >= min_words and len(set(words)) == 1


@dataclass
class SetMeasurement:
    name: str
    per_position: list[float]  # speed-true: accepted and emitted
    per_position_ci95: list[float]  # 95 % half-widths, prompts as the unit
    accepted_per_step: float  # speed-true: emitted tokens per verify step - 1
    ci95: float  # 95 % half-width of accepted_per_step, prompts as the unit
    vllm_per_position: list[float]  # vLLM's a_i (proposals past the stop counted), as /metrics gives them
    vllm_mean_accepted_tokens: float  # vLLM's mean accepted tokens per draft: sum of vllm_per_position
    num_prompts: int  # prompts served (adaptive measurement may stop before the set's end)
    num_drafts: int  # verify steps
    num_draft_tokens: int
    num_accepted_tokens: int  # emitted
    vllm_num_accepted_tokens: int  # vLLM's count: the emitted ones plus the proposals past the stop
    output_tokens: int
    seconds: float  # wall time of the measurement this set was part of (sets are served together)
    tok_s: float
    invalid_reason: str | None
    samples: list[dict[str, str]]
    answers_sha256: str  # every answer's text, in serving order: equal digests mean identical greedy texts
    per_prompt: dict[str, list]  # serving order: "index" in the set, "steps", "accepted", "at" (per position)


@dataclass
class Estimate:
    """Where a measurement stands: the configured mix's figures, each (value, 95 % half-width), and each set's
    measurement so far (for paired comparisons)."""

    accepted_per_step: tuple[float, float]
    per_position: list[tuple[float, float]]
    sets: dict[str, SetMeasurement] = field(default_factory=dict)


def _set_tally(n: int, positions: int) -> list[Draws]:
    return [Draws([0] * (positions + 1)) for _ in range(n)]


def _reasons(draws: Sequence[Draws], answers: Sequence[tuple[Prompt, Reply]]) -> list[str]:
    """Every reason that applies: a wrecked candidate is often both degenerate and never accepted."""
    reasons = []
    if sum(d.drafts for d in draws) == 0:
        reasons.append("no drafts were proposed: speculative decoding did not run")
    elif sum(d.vllm_accepted_at(0) for d in draws) == 0:
        reasons.append("no draft token was ever accepted: the draft does not match this body")
    if bad := [r.text for _, r in answers if degenerate(r.text)]:
        reasons.append(f"{len(bad)} degenerate answer(s), e.g. {bad[0][:60]!r}")
    return reasons


def measurement_of(
    name: str,
    draws: Sequence[Draws],
    answers: Sequence[tuple[Prompt, Reply]],
    positions: int,
    seconds: float,
    indices: Sequence[int],
) -> SetMeasurement:
    """One set's figures from its prompts' draws and answers (in serving order; `indices`: each draw's prompt's
    place in the configured set)."""
    drafts = [d.drafts for d in draws]
    per_pos = [ratio_interval([d.accepted_at(i) for d in draws], drafts) for i in range(positions)]
    mean, ci = ratio_interval([d.accepted for d in draws], drafts)
    vllm_pos = [sum(d.vllm_accepted_at(i) for d in draws) / max(sum(drafts), 1) for i in range(positions)]
    tokens = sum(r.completion_tokens for _, r in answers)
    return SetMeasurement(
        name,
        [v for v, _ in per_pos],
        [h for _, h in per_pos],
        mean,
        ci,
        vllm_pos,
        sum(vllm_pos),
        len(draws),
        sum(drafts),
        sum(d.draft_tokens for d in draws),
        sum(d.accepted for d in draws),
        sum(d.vllm_accepted for d in draws),
        tokens,
        seconds,
        tokens / seconds if seconds else 0.0,
        "; ".join(_reasons(draws, answers)) or None,
        [{"prompt": p.user, "response": r.text} for p, r in answers[:5]],
        texts_digest(r.text for _, r in answers),
        {
            "index": list(indices[: len(draws)]),
            "steps": drafts,
            "accepted": [d.accepted for d in draws],
            "at": [[d.accepted_at(i) for i in range(positions)] for d in draws],
        },
    )


def mix_interval(parts: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """The weighted mean of (value, half-width, weight) over independent sets, and its half-width."""
    total = sum(w for _, _, w in parts)
    value = sum(w * v for v, _, w in parts) / total
    return value, math.sqrt(sum((w / total * h) ** 2 for _, h, w in parts))


@contextmanager
def cancel_queued_on_error(pool: ThreadPoolExecutor) -> Iterator[None]:
    """On an exception (a dead or hung server, Ctrl-C) the requests still queued are never sent: a hung server costs
    one request timeout, not one per queued prompt."""
    try:
        yield
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


@dataclass
class _Plan:
    """How one measurement serves its sets and what it has gathered: each set's prompts in serving order (`orders`)
    as places in the configured set (`indices`), the sets served here (the others the caller answered), the round
    size, and each set's draws and (prompt, reply) answers so far."""

    indices: dict[str, Sequence[int]]
    orders: dict[str, list[Prompt]]
    served: list[str]
    step: int
    draws: dict[str, list[Draws]]
    answers: dict[str, list[tuple[Prompt, Reply]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.answers = {name: self.answers.get(name, []) for name in self.orders}

    def rounds(self) -> list[list[tuple[str, int]]]:
        """Each round's (set, place in its order), the served sets side by side; one empty round if none is."""
        last = max((len(self.orders[name]) for name in self.served), default=0)
        return [
            [(name, i) for name in self.served for i in range(start, min(start + self.step, len(self.orders[name])))]
            for start in range(0, max(last, 1), self.step)
        ]

    def add(self, name: str, i: int, reply: Reply) -> None:
        self.draws[name][i].add(reply)
        self.answers[name].append((self.orders[name][i], reply))

    def done(self, name: str, rounds: int) -> int:
        """How many of a set's prompts are measured after `rounds` rounds (all of an answered set's)."""
        return min(rounds * self.step, len(self.orders[name])) if name in self.served else len(self.orders[name])

    def measured(self, rounds: int, seconds: float, positions: int) -> dict[str, SetMeasurement]:
        """Each set's measurement after `rounds` rounds; an answered set's answers were generated (and timed) by the
        caller."""
        return {
            name: measurement_of(
                name,
                self.draws[name][: self.done(name, rounds)],
                self.answers[name],
                positions,
                seconds if name in self.served else 0.0,
                self.indices[name],
            )
            for name in self.orders
        }


class AcceptanceSets(Objective):
    """Weighted mean, over the configured prompt sets, of speed-true accepted tokens per step; details per set.

    `target_halfwidth` > 0: adaptive rounds of `round_size` prompts per set (see the module doc); 0: every prompt."""

    name, direction = ACCEPTANCE.name, ACCEPTANCE.direction

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
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        """`timeout`: seconds one request may take (serving.request_timeout_s); past it httpx.TimeoutException."""
        self.base_url, self.served_name = base_url, served_name
        self.timeout = timeout
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
        with httpx.Client(timeout=self.timeout) as client, ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda job: self._ask(client, job), jobs))  # map cancels the rest on a failure

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
        return measurement_of(name, draws, answers, self.n, seconds, range(len(prompts)))

    def estimate(self, measured: dict[str, SetMeasurement]) -> Estimate:
        parts = [(measured[n], w) for n, _, w in self.sets]
        mean = mix_interval([(m.accepted_per_step, m.ci95, w) for m, w in parts])
        per_pos = [
            mix_interval([(m.per_position[i], m.per_position_ci95[i], w) for m, w in parts]) for i in range(self.n)
        ]
        return Estimate(mean, per_pos, measured)

    def compute(
        self,
        stop: Callable[[Estimate], str | None] = lambda estimate: None,
        answered: Mapping[str, Sequence[Reply]] | None = None,
    ) -> ObjectiveResult:
        """Serve rounds until a stopping rule holds (`stop`: the caller's, a reason or None); the fixed budget
        (`target_halfwidth` 0) serves every prompt of every set in one round, in the configured order. `answered`:
        sets whose every answer (one seed, at `max_tokens`, in the set's order) the caller already has."""
        plan = self._plan(answered or {})
        # Every round's requests are queued at once, in round order, `concurrency` in flight: the next round is
        # served while this one's last answers finish (no barrier). Decisions are taken at round boundaries on
        # exactly the rounds' prompts, so they are deterministic; on a stop, queued requests are cancelled and the
        # few in flight are finished and counted as tokens, not as measurements.
        stopped, rounds, seconds = "", 0, 0.0
        t0 = time.perf_counter()
        with (
            httpx.Client(timeout=self.timeout) as client,
            ThreadPoolExecutor(self.concurrency) as pool,
            cancel_queued_on_error(pool),
        ):
            futures = [
                [
                    (name, i, pool.submit(self._ask, client, (name, plan.orders[name][i], seed)))
                    for seed in self.seeds
                    for name, i in batch
                ]
                for batch in plan.rounds()
            ]
            for batch in futures:
                for name, i, future in batch:
                    plan.add(name, i, future.result())
                rounds += 1
                seconds = time.perf_counter() - t0
                measured = plan.measured(rounds, seconds, self.n)
                estimate = self.estimate(measured)
                if stopped := self._stopped(plan, rounds, estimate, stop):
                    break
            later = [future for batch in futures[rounds:] for _, _, future in batch]
            for future in later:
                future.cancel()
        wasted = sum(f.result().completion_tokens for f in later if not f.cancelled() and f.exception() is None)
        for name in self.keep_replies & set(plan.orders):
            self.replies[name] = [r for _, r in plan.answers[name][: len(plan.orders[name])]]
        # tokens generated here: the measured answers' and those of requests in flight at a stop
        tokens = sum(measured[name].output_tokens for name in plan.served) + wasted
        run = {"stopped": stopped, "rounds": rounds, "seconds": seconds, "output_tokens": tokens}
        return ObjectiveResult(estimate.accepted_per_step[0], self._details(estimate, run))

    def _plan(self, answered: Mapping[str, Sequence[Reply]]) -> _Plan:
        """The serving plan: adaptive measurement serves each set in its seeded order, `round_size` prompts a
        round; the fixed budget serves the sets as configured, in one round. Answered sets are tallied at once."""
        adaptive = self.target_halfwidth > 0
        indices = {  # each set's serving order, as places in the configured set
            name: seeded_order(range(len(prompts))) if adaptive and name not in answered else range(len(prompts))
            for name, prompts, _ in self.sets
        }
        orders = {name: [prompts[i] for i in indices[name]] for name, prompts, _ in self.sets}
        step = self.round_size if adaptive else max(len(p) for p in orders.values())
        served = [name for name in orders if name not in answered]
        plan = _Plan(indices, orders, served, step, {name: _set_tally(len(p), self.n) for name, p in orders.items()})
        for name, replies in answered.items():
            for i, reply in enumerate(replies):
                plan.draws[name][i].add(reply)
            plan.answers[name] = list(zip(orders[name], replies, strict=True))
        return plan

    def _stopped(self, plan: _Plan, rounds: int, estimate: Estimate, stop: Callable[[Estimate], str | None]) -> str:
        """Why serving stops after `rounds` rounds, or "" to go on."""
        half = estimate.accepted_per_step[1]
        if all(plan.done(name, rounds) >= len(p) for name, p in plan.orders.items()):
            return "every prompt served"
        if half <= self.target_halfwidth:
            return f"mix half-width {half:.3f} <= target {self.target_halfwidth:g}"
        return stop(estimate) or ""

    def _details(self, estimate: Estimate, run: dict[str, Any]) -> dict[str, Any]:
        """The measurement's record: every set's figures, the mix's intervals and vLLM's raw figure, how it ran."""
        weights = {name: w for name, _, w in self.sets}
        results = [estimate.sets[name] for name in weights]
        invalid = [f"{r.name}: {r.invalid_reason}" for r in results if r.invalid_reason]
        total = sum(weights.values())
        return {
            "sets": {r.name: asdict(r) for r in results},
            "invalid_reason": "; ".join(invalid) or None,
            "ci95": estimate.accepted_per_step[1],
            "per_position_ci95": [h for _, h in estimate.per_position],
            "vllm_mean_accepted_tokens": sum(weights[r.name] * r.vllm_mean_accepted_tokens for r in results) / total,
            **run,
            "weights": weights,
        }
